#!/usr/bin/env python3
"""transformers baseline for `glimpse bench`: the same stages, timed the same way, on the same folder.

    python3 scripts/hf_reference.py DIR [--device cuda|cpu] [--attn eager,sdpa] [--compile]
                                        [--new-tokens N] [--repeats N] [--batches 1,8,32]
                                        [--out FILE.json] [--tensors FILE.safetensors]
                                        [--glimpse BIN]

DIR is a BLIP-2 OPT folder, typically written by `glimpse synth --preset blip2-opt-2.7b --out DIR`
(random weights at real shapes), so glimpse and transformers run identical weights.

Timings (fp16 on CUDA, fp32 on CPU; once per attention implementation in --attn): warm-up, then
the median of --repeats, each measured with torch.cuda.Event on CUDA (perf_counter on CPU):
  vision       model.vision_model(pixel_values)
  qformer      query tokens -> model.qformer(...) -> cast -> model.language_projection
  prefill      model.language_model(inputs_embeds=[B, 33, H]) (32 image tokens + BOS), and over
               the VQA prompt ("Question: what is this? Answer:")
  decode       ms/token: median over the steps of a manual greedy loop with past_key_values
               (N-1 steps after the prefill token, EOS ignored)
  first_token  model.generate(max_new_tokens=1): pixels in -> first token
  caption      model.generate(max_new_tokens=N, min_new_tokens=N): pixels in -> N tokens
  decode_sampled  ms/token of sampled generation (do_sample, top_p 0.9, temperature 0.7, top_k 50
               as transformers defaults it, seeded): (caption - first_token) / (N - 1) of
               generate() with those settings, so the logits processors and the draw are in it
               (glimpse bench's decode_sampled row runs the same settings)
  throughput   images/s of caption at each batch size of --batches (skipped on OOM)
With --compile: static cache + torch.compile(mode="reduce-overhead") of the language model forward,
timing first_token, caption and the generate-derived decode ms/token
((caption - first_token) / (N - 1)) at batch 1 only (every shape recompiles).

Numerics (fixed seeded input: pixel values ~N(0,1) from --seed, caption ids): prefill logits of
the fp16 model (on --device) and of an fp32 model (TF32 off), their relative error
||fp16 - fp32|| / ||fp32|| and max abs error (the yardstick glimpse's GPU logits are held to),
and greedy tokens of both. --tensors FILE writes pixel_values, input_ids and both logits.

--glimpse BIN: the CPU parity check. Captions a deterministic PNG with transformers (fp32, CPU,
eager) and with `BIN caption --model DIR --device cpu --json`, and fails unless the greedy tokens
are identical.

Everything goes to --out as one JSON object (and a summary to stdout).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import Blip2ForConditionalGeneration, Blip2Processor

transformers.logging.set_verbosity_error()
try:
    transformers.utils.logging.disable_progress_bar()
except AttributeError:
    pass

VQA_PROMPT = "Question: what is this? Answer:"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# timing
class Timer:
    """Times a callable: CUDA events on GPU, perf_counter on CPU; warm-up then median of repeats."""

    def __init__(self, device: str, warmup: int, repeats: int):
        self.cuda = device == "cuda"
        self.warmup, self.repeats = warmup, repeats

    def once(self, fn) -> float:
        if self.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            a.record()
            fn()
            b.record()
            b.synchronize()
            return a.elapsed_time(b)
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3

    def samples(self, fn, repeats: int | None = None) -> list[float]:
        for _ in range(self.warmup):
            fn()
        return [self.once(fn) for _ in range(repeats or self.repeats)]


def summary(samples: list[float]) -> dict:
    return {"median_ms": statistics.median(samples), "min_ms": min(samples), "samples": len(samples)}


# ----------------------------------------------------------------------------------------------
# inputs
def seeded_pixels(batch: int, size: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.standard_normal((batch, 3, size, size)).astype(np.float32))


def caption_ids(cfg, batch: int) -> torch.Tensor:
    ids = [cfg.image_token_index] * cfg.num_query_tokens + [cfg.text_config.bos_token_id]
    return torch.tensor([ids] * batch, dtype=torch.long)


def vqa_ids(processor, cfg, batch: int) -> torch.Tensor:
    text = processor.tokenizer(VQA_PROMPT)["input_ids"]
    ids = [cfg.image_token_index] * cfg.num_query_tokens + text
    return torch.tensor([ids] * batch, dtype=torch.long)


def load(model_dir: str, device: str, dtype, attn: str):
    model = Blip2ForConditionalGeneration.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn)
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------------
# stages, as Blip2ForConditionalGeneration.generate computes them
@torch.no_grad()
def stage_vision(model, pv):
    return model.vision_model(pv, return_dict=True).last_hidden_state


@torch.no_grad()
def stage_qformer(model, image_embeds):
    mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
    q = model.query_tokens.expand(image_embeds.shape[0], -1, -1)
    out = model.qformer(query_embeds=q, encoder_hidden_states=image_embeds, encoder_attention_mask=mask,
                        return_dict=True).last_hidden_state
    if out.dtype != image_embeds.dtype:
        out = out.to(image_embeds.dtype)
    return model.language_projection(out)


@torch.no_grad()
def decoder_inputs(model, ids, projected):
    embeds = model.get_input_embeddings()(ids)
    mask = (ids == model.config.image_token_index).unsqueeze(-1)
    return embeds.masked_scatter(mask, projected.to(embeds.dtype))


@torch.no_grad()
def stage_prefill(model, embeds, mask):
    return model.language_model(inputs_embeds=embeds, attention_mask=mask, use_cache=True)


@torch.no_grad()
def decode_steps(model, embeds, n_new: int, timer: Timer) -> list[float]:
    """Prefill, then n_new - 1 greedy steps with past_key_values; returns per-step ms."""
    b, p = embeds.shape[:2]
    mask = torch.ones((b, p), dtype=torch.long, device=embeds.device)
    out = stage_prefill(model, embeds, mask)
    pkv, nxt = out.past_key_values, out.logits[:, -1].argmax(-1)
    times = []
    for _ in range(n_new - 1):
        mask = torch.cat([mask, mask.new_ones((b, 1))], dim=1)
        holder = {}

        def step():
            holder["o"] = model.language_model(input_ids=nxt[:, None], past_key_values=pkv, attention_mask=mask,
                                               use_cache=True)
        times.append(timer.once(step))
        pkv, nxt = holder["o"].past_key_values, holder["o"].logits[:, -1].argmax(-1)
    return times


# The sampled-decode settings of glimpse bench's decode_sampled row.
SAMPLED = dict(do_sample=True, top_p=0.9, temperature=0.7)


@torch.no_grad()
def gen(model, pv, ids, n: int, **kw):
    kw = {"do_sample": False, **kw}
    return model.generate(pixel_values=pv, input_ids=ids, attention_mask=torch.ones_like(ids),
                          max_new_tokens=n, min_new_tokens=n, num_beams=1, **kw)


def seeded(fn, seed: int):
    """`fn` with torch's RNG reseeded first, so every timed sampled run draws the same stream."""
    def run():
        torch.manual_seed(seed)
        return fn()
    return run


def is_oom(e: Exception) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def run_timings(model, processor, device, dtype, args, label) -> dict:
    cfg = model.config
    size = cfg.vision_config.image_size
    timer = Timer(device, warmup=2, repeats=args.repeats)
    res: dict = {"label": label}
    b = 1
    pv = seeded_pixels(b, size, args.seed).to(device, dtype)
    ids_c, ids_q = caption_ids(cfg, b).to(device), vqa_ids(processor, cfg, b).to(device)
    image_embeds = stage_vision(model, pv)
    projected = stage_qformer(model, image_embeds)
    emb_c, emb_q = decoder_inputs(model, ids_c, projected), decoder_inputs(model, ids_q, projected)
    n = args.new_tokens
    stages = {}
    stages["vision"] = summary(timer.samples(lambda: stage_vision(model, pv)))
    stages["qformer"] = summary(timer.samples(lambda: stage_qformer(model, image_embeds)))
    stages["prefill"] = summary(timer.samples(lambda: stage_prefill(model, emb_c, torch.ones_like(ids_c))))
    stages["prefill"]["tokens"] = ids_c.shape[1]
    stages["prefill_vqa"] = summary(timer.samples(lambda: stage_prefill(model, emb_q, torch.ones_like(ids_q))))
    stages["prefill_vqa"]["tokens"] = ids_q.shape[1]
    decode_steps(model, emb_c, min(n, 4), timer)  # warm-up
    steps = []
    for _ in range(args.repeats):
        steps += decode_steps(model, emb_c, n, timer)
    stages["decode"] = summary(steps)
    stages["first_token"] = summary(timer.samples(lambda: gen(model, pv, ids_c, 1)))
    stages["caption"] = summary(timer.samples(lambda: gen(model, pv, ids_c, n)))
    stages["decode_from_generate"] = {
        "median_ms": (stages["caption"]["median_ms"] - stages["first_token"]["median_ms"]) / max(n - 1, 1)}
    first_s = summary(timer.samples(seeded(lambda: gen(model, pv, ids_c, 1, **SAMPLED), args.seed)))
    cap_s = summary(timer.samples(seeded(lambda: gen(model, pv, ids_c, n, **SAMPLED), args.seed)))
    stages["decode_sampled"] = {
        "median_ms": (cap_s["median_ms"] - first_s["median_ms"]) / max(n - 1, 1), "settings": SAMPLED}
    res["stages"] = stages
    thr = []
    for bb in args.batches:
        try:
            pvb = seeded_pixels(bb, size, args.seed + bb).to(device, dtype)
            idb = caption_ids(cfg, bb).to(device)
            s = timer.samples(lambda: gen(model, pvb, idb, n), repeats=min(args.repeats, 5))
            med = statistics.median(s)
            thr.append({"batch": bb, "caption_ms": med, "images_per_s": bb / (med / 1e3)})
        except Exception as e:  # noqa: BLE001 - OOM is reported, anything else too
            if device == "cuda":
                torch.cuda.empty_cache()
            thr.append({"batch": bb, "skipped": ("out of memory" if is_oom(e) else f"failed: {e}")[:300]})
    res["throughput"] = thr
    return res


def run_compiled(model_dir, processor, device, dtype, args) -> dict:
    """Static cache + torch.compile of the language model forward, batch 1."""
    model = load(model_dir, device, dtype, "sdpa")
    model.language_model.forward = torch.compile(model.language_model.forward, mode="reduce-overhead",
                                                 fullgraph=True)
    cfg = model.config
    timer = Timer(device, warmup=3, repeats=args.repeats)
    pv = seeded_pixels(1, cfg.vision_config.image_size, args.seed).to(device, dtype)
    ids = caption_ids(cfg, 1).to(device)
    n = args.new_tokens
    kw = {"cache_implementation": "static"}
    t0 = time.perf_counter()
    gen(model, pv, ids, n, **kw)
    compile_s = time.perf_counter() - t0
    first = summary(timer.samples(lambda: gen(model, pv, ids, 1, **kw)))
    cap = summary(timer.samples(lambda: gen(model, pv, ids, n, **kw)))
    out = {"label": "sdpa + static cache + torch.compile(reduce-overhead)", "compile_s": compile_s,
           "stages": {"first_token": first, "caption": cap,
                      "decode_from_generate": {"median_ms": (cap["median_ms"] - first["median_ms"]) / max(n - 1, 1)}}}
    del model
    return out


# ----------------------------------------------------------------------------------------------
# numerics
@torch.no_grad()
def prefill_logits(model, pv, ids) -> torch.Tensor:
    return model(pixel_values=pv, input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float()


@torch.no_grad()
def greedy(model, pv, ids, n) -> list[int]:
    out = model.generate(pixel_values=pv, input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                         do_sample=False, num_beams=1)
    return out[0, ids.shape[1]:].tolist()


def numerics(model_dir, device, args, fp16_model=None) -> tuple[dict, dict]:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    res, tensors = {}, {}
    m32 = load(model_dir, device, torch.float32, "eager")
    cfg = m32.config
    pv = seeded_pixels(1, cfg.vision_config.image_size, args.seed)
    ids = caption_ids(cfg, 1)
    l32 = prefill_logits(m32, pv.to(device), ids.to(device)).cpu()
    res["greedy_fp32"] = greedy(m32, pv.to(device), ids.to(device), args.new_tokens)
    del m32
    if device == "cuda":
        torch.cuda.empty_cache()
    m16 = fp16_model if fp16_model is not None else load(model_dir, device, torch.float16, "eager")
    l16 = prefill_logits(m16, pv.to(device, torch.float16), ids.to(device)).cpu()
    res["greedy_fp16"] = greedy(m16, pv.to(device, torch.float16), ids.to(device), args.new_tokens)
    d = (l16 - l32).double()
    res["input"] = {"seed": args.seed, "pixel_values": "N(0,1) [1,3,S,S] from numpy default_rng(seed)",
                    "input_ids": ids[0].tolist()}
    res["prefill_logits_shape"] = list(l32.shape)
    res["fp16_vs_fp32"] = {"rel_l2": (d.norm() / l32.double().norm()).item(), "max_abs": d.abs().max().item(),
                           "last_row_rel_l2": (d[-1].norm() / l32[-1].double().norm()).item()}
    top2 = l32[-1].double().topk(2).values
    res["fp32_last_row"] = {"std": l32[-1].std().item(), "absmax": l32[-1].abs().max().item(),
                            "top2_margin": (top2[0] - top2[1]).item(), "argmax": int(l32[-1].argmax())}
    res["greedy_fp16_equals_fp32"] = res["greedy_fp16"] == res["greedy_fp32"]
    tensors = {"pixel_values": pv.contiguous(), "input_ids": ids.to(torch.int64).contiguous(),
               "prefill_logits_fp32": l32.contiguous(), "prefill_logits_fp16": l16.contiguous()}
    return res, tensors


# ----------------------------------------------------------------------------------------------
# CPU parity with glimpse
def glimpse_parity(model_dir: str, binary: str, n: int, seed: int) -> dict:
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:181, 0:257].astype(np.float64)
    img = np.stack([128 + 100 * np.sin(x / 17 + c) * np.cos(y / 23 - c) for c in range(3)], -1)
    img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        png = os.path.join(tmp, "parity_257x181.png")
        Image.fromarray(img, "RGB").save(png)
        processor = Blip2Processor.from_pretrained(model_dir)
        model = load(model_dir, "cpu", torch.float32, "eager")
        pv = processor(images=Image.open(png), return_tensors="pt")["pixel_values"]
        ids = caption_ids(model.config, 1)
        hf = greedy(model, pv, ids, n)
        hf_text = processor.batch_decode([hf], skip_special_tokens=True)[0].strip()
        cmd = [binary, "caption", "--model", model_dir, "--device", "cpu", "--json", "--max-new-tokens", str(n), png]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            return {"ok": False, "error": proc.stderr.strip(), "command": cmd}
        g = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"ok": g["tokens"] == hf, "transformers_tokens": hf, "glimpse_tokens": g["tokens"],
            "transformers_text": hf_text, "glimpse_text": g["text"], "image_processor_backend":
            getattr(processor.image_processor, "backend", "unknown"), "new_tokens": n}


# ----------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--attn", default="eager,sdpa", help="attention implementations to time, comma-separated")
    ap.add_argument("--compile", action="store_true", help="also time static cache + torch.compile")
    ap.add_argument("--compile-only", action="store_true", help="only the compiled run (and numerics unless --no-numerics)")
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=None, help="default 10 on CUDA, 3 on CPU")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-numerics", action="store_true")
    ap.add_argument("--tensors", help="write pixel_values, input_ids and both prefill logits (safetensors)")
    ap.add_argument("--glimpse", help="glimpse binary: check greedy-token parity on the CPU and exit")
    ap.add_argument("--out", help="JSON output file")
    args = ap.parse_args()
    args.batches = [int(b) for b in args.batches.split(",") if b]
    if args.repeats is None:
        args.repeats = 10 if args.device == "cuda" else 3
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("hf_reference.py: --device cuda but torch sees no CUDA device")
    torch.manual_seed(args.seed)

    report = {"tool": "scripts/hf_reference.py", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "model_dir": os.path.abspath(args.model_dir), "device": args.device,
              "device_name": torch.cuda.get_device_name(0) if args.device == "cuda" else f"cpu ({os.cpu_count()} cores)",
              "torch": torch.__version__, "transformers": transformers.__version__,
              "cuda": torch.version.cuda, "new_tokens": args.new_tokens, "repeats": args.repeats,
              "threads": torch.get_num_threads()}
    if args.glimpse:
        report["glimpse_parity"] = glimpse_parity(args.model_dir, args.glimpse, args.new_tokens, args.seed)
        p = report["glimpse_parity"]
        print(json.dumps(p, indent=1))
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        sys.exit(0 if p["ok"] else 1)

    dtype = torch.float16 if args.device == "cuda" else torch.float32
    report["dtype"] = str(dtype).replace("torch.", "")
    processor = Blip2Processor.from_pretrained(args.model_dir)
    runs = []
    if not args.compile_only:
        for attn in [a for a in args.attn.split(",") if a]:
            t = time.perf_counter()
            model = load(args.model_dir, args.device, dtype, attn)
            log(f"loaded ({attn}, {report['dtype']}) in {time.perf_counter() - t:.1f} s; timing")
            runs.append(run_timings(model, processor, args.device, dtype, args, attn))
            del model
            if args.device == "cuda":
                torch.cuda.empty_cache()
    if args.compile or args.compile_only:
        try:
            runs.append(run_compiled(args.model_dir, processor, args.device, dtype, args))
        except Exception as e:  # noqa: BLE001 - report and go on
            runs.append({"label": "static cache + torch.compile", "error": f"{type(e).__name__}: {e}"[:500]})
    report["runs"] = runs
    if not args.no_numerics:
        res, tensors = numerics(args.model_dir, args.device, args)
        report["numerics"] = res
        if args.tensors:
            from safetensors.torch import save_file
            save_file(tensors, args.tensors, metadata={"format": "pt", "seed": str(args.seed)})
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print_summary(report)


def finish(report: dict, out: str | None) -> None:
    """Writes `report` to `out` (when given) and stdout as JSON; exits 1 when its parity check failed."""
    text = json.dumps(report, indent=1)
    if out:
        Path(out).write_text(text)
    print(text)
    if "parity" in report and not report["parity"]["ok"]:
        sys.exit(1)


def print_summary(report):
    print(f"transformers {report['transformers']} on {report['device_name']} ({report.get('dtype')}), "
          f"{report['new_tokens']} new tokens, median of {report['repeats']}")
    names = ["vision", "qformer", "prefill", "prefill_vqa", "decode", "decode_from_generate", "decode_sampled",
             "first_token", "caption"]
    for run in report["runs"]:
        if "error" in run:
            print(f"  {run['label']}: {run['error']}")
            continue
        cells = [f"{k} {run['stages'][k]['median_ms']:.3f}" for k in names if k in run["stages"]]
        print(f"  {run['label']}: " + ", ".join(cells) + " ms")
        for t in run.get("throughput", []):
            print(f"    batch {t['batch']}: " + (f"{t['images_per_s']:.2f} images/s" if "images_per_s" in t else t["skipped"]))
    if "numerics" in report:
        n = report["numerics"]
        print(f"  fp16 vs fp32 prefill logits: rel {n['fp16_vs_fp32']['rel_l2']:.3e}, max abs "
              f"{n['fp16_vs_fp32']['max_abs']:.3e}; greedy fp16 == fp32: {n['greedy_fp16_equals_fp32']}")


if __name__ == "__main__":
    main()

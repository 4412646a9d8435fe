#!/usr/bin/env python3
"""transformers baseline for `glimpse bench` on a LLaVA folder, and the CPU greedy-token parity check.

    python3 scripts/hf_reference_llava.py DIR [--device cuda|cpu] [--attn eager,sdpa]
                                              [--new-tokens N] [--repeats N] [--out FILE.json]
                                              [--glimpse BIN]

DIR is a LlavaForConditionalGeneration folder, typically `glimpse synth --preset llava-1.5-7b
--out DIR` (random weights at real shapes), so glimpse and transformers run identical weights.

The prompt is glimpse bench's VQA prompt through the folder's processor and chat template (one
user message: the image, then "what is this?"; add_generation_prompt), as `glimpse ask` builds it.
Timings (fp16 on CUDA, fp32 on CPU; once per attention implementation in --attn), warm-up then
the median of --repeats (CUDA events on a GPU, perf_counter on the CPU), batch 1:
  vision       model.model.get_image_features(pixel_values, ...) incl. the projector
  prefill_vqa  the language model over the prompt's embeddings (image features scattered in),
               logits of the last row only (as generate asks for them)
  decode       ms/token: median over the steps of a manual greedy loop with past_key_values
  first_token  model.generate(max_new_tokens=1): pixels in -> first token
  caption      model.generate(max_new_tokens=N, min_new_tokens=N)
first_token and caption run the VQA prompt too; glimpse bench's run its caption prompt (the chat
template around glimpse's default instruction), a few tokens longer: compare with that in mind.

--glimpse BIN: the CPU parity check. Answers the prompt about a deterministic PNG with
transformers (fp32, CPU, eager, greedy) and with `BIN ask --model DIR --device cpu --json`, and
fails unless the generated tokens are identical. --offload keeps transformers' decoder weights on
disk (accelerate), for full-size checkpoints whose fp32 copy does not fit in memory.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_reference import finish, Timer, log, summary  # noqa: E402

transformers.logging.set_verbosity_error()
QUESTION = "what is this?"


def prompt_inputs(processor, image: Image.Image) -> dict:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(images=image, text=text, return_tensors="pt")


def test_image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:181, 0:257].astype(np.float64)
    img = np.stack([128 + 100 * np.sin(x / 17 + c) * np.cos(y / 23 - c) for c in range(3)], -1)
    return Image.fromarray(np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8), "RGB")


@torch.no_grad()
def image_features(model, pv):
    cfg = model.config
    # 5.17 returns the vision output with the projected features (a list per image) as pooler_output.
    out = model.model.get_image_features(pixel_values=pv, vision_feature_layer=cfg.vision_feature_layer,
                                         vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                                         return_dict=True)
    return out.pooler_output


@torch.no_grad()
def prompt_embeds(model, ids, pv):
    embeds = model.get_input_embeddings()(ids)
    feats = image_features(model, pv)
    feats = torch.cat(list(feats), 0) if isinstance(feats, (list, tuple)) else feats
    mask = (ids == model.config.image_token_id).unsqueeze(-1)
    return embeds.masked_scatter(mask, feats.to(embeds.dtype))


@torch.no_grad()
def prefill(model, embeds):
    return model(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long,
                                                                   device=embeds.device),
                 use_cache=True, logits_to_keep=1)


@torch.no_grad()
def decode_steps(model, embeds, n_new: int, timer: Timer) -> list[float]:
    out = prefill(model, embeds)
    pkv, nxt = out.past_key_values, out.logits[:, -1].argmax(-1)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    times = []
    for _ in range(n_new - 1):
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        holder = {}

        def step():
            holder["o"] = model(input_ids=nxt[:, None], past_key_values=pkv, attention_mask=mask, use_cache=True,
                                logits_to_keep=1)
        times.append(timer.once(step))
        pkv, nxt = holder["o"].past_key_values, holder["o"].logits[:, -1].argmax(-1)
    return times


@torch.no_grad()
def generate(model, inputs, n: int, min_new: int | None = None):
    return model.generate(**inputs, max_new_tokens=n, min_new_tokens=min_new or 0, do_sample=False, num_beams=1)


def run_timings(model_dir: str, device: str, attn: str, args) -> dict:
    dtype = torch.float16 if device == "cuda" else torch.float32
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn)
    model = model.to(device).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    inputs = {k: v.to(device) for k, v in prompt_inputs(processor, test_image(args.seed)).items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    timer = Timer(device, warmup=2, repeats=args.repeats)
    ids, pv, n = inputs["input_ids"], inputs["pixel_values"], args.new_tokens
    embeds = prompt_embeds(model, ids, pv)
    stages = {
        "vision": summary(timer.samples(lambda: image_features(model, pv))),
        "prefill_vqa": {**summary(timer.samples(lambda: prefill(model, embeds))), "tokens": ids.shape[1]},
    }
    decode_steps(model, embeds, min(n, 4), timer)  # warm-up
    steps = []
    for _ in range(args.repeats):
        steps += decode_steps(model, embeds, n, timer)
    stages["decode"] = summary(steps)
    stages["first_token"] = summary(timer.samples(lambda: generate(model, inputs, 1)))
    stages["caption"] = summary(timer.samples(lambda: generate(model, inputs, n, n)))
    for name, s in stages.items():
        log(f"{attn} {name}: {s}")
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"label": attn, "attn": attn, "dtype": str(dtype), "prompt_tokens": ids.shape[1], "stages": stages}


def parity(model_dir: str, binary: str, n: int, seed: int, offload: bool = False) -> dict:
    # --offload: the decoder's weights stay in the fp16 safetensors and are read and widened to
    # fp32 one layer at a time (accelerate's disk offload), so a 7b model's fp32 copy (28 GB)
    # need not fit in memory. The arithmetic is the same fp32 forward.
    extra = {"device_map": {"model.vision_tower": "cpu", "model.multi_modal_projector": "cpu",
                            "model.language_model": "disk", "lm_head": "cpu"}} if offload else {}
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32,
                                                          attn_implementation="eager", **extra).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "parity_257x181.png"
        test_image(seed).save(png)
        inputs = prompt_inputs(processor, Image.open(png))
        hf = generate(model, inputs, n)[0, inputs["input_ids"].shape[1]:].tolist()
        cmd = [binary, "ask", "--model", model_dir, "--device", "cpu", "--json", "--max-new-tokens", str(n),
               str(png), QUESTION]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            return {"ok": False, "error": proc.stderr.strip(), "command": cmd}
        g = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"ok": g["tokens"] == hf, "transformers_tokens": hf, "glimpse_tokens": g["tokens"], "new_tokens": n,
            "prompt_tokens": int(inputs["input_ids"].shape[1])}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--attn", default="eager,sdpa")
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=None, help="default 10 on CUDA, 3 on CPU")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--glimpse", help="glimpse binary: check CPU greedy-token parity and exit")
    ap.add_argument("--offload", action="store_true",
                    help="parity: keep the decoder weights on disk (fp16 safetensors, widened per layer)")
    ap.add_argument("--out", help="JSON output file")
    args = ap.parse_args()
    args.repeats = args.repeats or (10 if args.device == "cuda" else 3)
    torch.backends.cuda.matmul.allow_tf32 = False
    if args.glimpse:
        report = {"parity": parity(args.model_dir, args.glimpse, args.new_tokens, args.seed, args.offload)}
    else:
        report = {
            "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "runs": [run_timings(args.model_dir, args.device, a, args) for a in args.attn.split(",")],
        }
    finish(report, args.out)


if __name__ == "__main__":
    main()

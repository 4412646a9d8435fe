#!/usr/bin/env python3
"""transformers baseline for `glimpse bench` on a BLIP-2 Flan-T5 or InstructBLIP folder, and the
CPU greedy-token parity check.

    python3 scripts/hf_reference_blip_family.py DIR [--device cuda|cpu] [--attn eager,sdpa]
                                                    [--new-tokens N] [--repeats N] [--batches 1,32]
                                                    [--out FILE.json] [--glimpse BIN]

DIR is a Blip2ForConditionalGeneration folder with a T5 language model, or an
InstructBlipForConditionalGeneration folder (Vicuna or Flan-T5), typically `glimpse synth --preset
blip2-flan-t5-xl|instructblip-vicuna-7b --out DIR` (random weights at real shapes), so glimpse and
transformers run identical weights. (BLIP-2 OPT: scripts/hf_reference.py; LLaVA:
scripts/hf_reference_llava.py.)

Prompts are glimpse bench's for presets: the caption prompt is the empty text, the VQA prompt
"Question: what is this? Answer:", both through the folder's processor (placeholders, tokenizer,
and InstructBLIP's Q-Former tokenizer). Timings (fp16 on CUDA, fp32 on CPU; once per attention
implementation in --attn), warm-up then the median of --repeats (CUDA events on a GPU,
perf_counter on the CPU), seeded N(0,1) pixel values:
  vision          model.vision_model(pixel_values)
  image_features  model.get_image_features(...): vision, Q-Former and language_projection
  first_token     model.generate(max_new_tokens=1), VQA prompt: pixels in -> first token
  caption         model.generate(max_new_tokens=N, min_new_tokens=N), caption prompt
  decode_from_generate  (caption - first_token of the caption prompt) / (N - 1), ms per token
  throughput      images/s of caption at each batch size of --batches (skipped on OOM)

--glimpse BIN: the CPU parity check. Asks "what is this?" about a deterministic PNG with
transformers (fp32, CPU, eager, greedy; the text as glimpse `ask` sends it: BLIP-2's
"Question: {q} Answer:" template, InstructBLIP's instruction verbatim) and with
`BIN ask --model DIR --device cpu --json`, and fails unless the generated tokens are identical.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from PIL import Image
from transformers import AutoConfig, AutoProcessor, Blip2ForConditionalGeneration, InstructBlipForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_reference import finish, Timer, log, seeded_pixels, summary  # noqa: E402
from hf_reference_llava import test_image  # noqa: E402

transformers.logging.set_verbosity_error()
QUESTION = "what is this?"
VQA_PROMPT = "Question: what is this? Answer:"


def model_class(model_dir: str):
    arch = (AutoConfig.from_pretrained(model_dir).architectures or [""])[0]
    classes = {c.__name__: c for c in (Blip2ForConditionalGeneration, InstructBlipForConditionalGeneration)}
    if arch not in classes:
        sys.exit(f"{model_dir}: architecture {arch!r}; this script takes {sorted(classes)}")
    return classes[arch]


def text_inputs(processor, text: str, batch: int, device: str) -> dict:
    """The processor's text side for `batch` copies of `text` (placeholders included)."""
    size = processor.image_processor.size
    blank = Image.new("RGB", (size["width"], size["height"]))
    enc = processor(images=[blank] * batch, text=[text] * batch, return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items() if k != "pixel_values"}


@torch.no_grad()
def generate(model, inputs: dict, n: int, min_new: int = 0):
    return model.generate(**inputs, max_new_tokens=n, min_new_tokens=min_new, do_sample=False, num_beams=1)


def image_features(model, inputs: dict):
    extra = {k: inputs[k] for k in ("qformer_input_ids", "qformer_attention_mask") if k in inputs}
    return model.get_image_features(pixel_values=inputs["pixel_values"], **extra)


def run_timings(model_dir: str, device: str, attn: str, args) -> dict:
    dtype = torch.float16 if device == "cuda" else torch.float32
    cls = model_class(model_dir)
    model = cls.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn).to(device).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    size = model.config.vision_config.image_size
    timer = Timer(device, warmup=2, repeats=args.repeats)

    def inputs_for(text: str, batch: int) -> dict:
        px = seeded_pixels(batch, size, args.seed).to(device, dtype)
        return {"pixel_values": px, **text_inputs(processor, text, batch, device)}

    n = args.new_tokens
    vqa, cap = inputs_for(VQA_PROMPT, 1), inputs_for("", 1)
    with torch.no_grad():
        stages = {
            "vision": summary(timer.samples(lambda: model.vision_model(pixel_values=vqa["pixel_values"]))),
            "image_features": summary(timer.samples(lambda: image_features(model, vqa))),
        }
    stages["first_token"] = {**summary(timer.samples(lambda: generate(model, vqa, 1))),
                             "prompt_tokens": int(vqa["input_ids"].shape[1])}
    stages["caption"] = summary(timer.samples(lambda: generate(model, cap, n, n)))
    first_cap = summary(timer.samples(lambda: generate(model, cap, 1)))
    stages["decode_from_generate"] = {
        "median_ms": (stages["caption"]["median_ms"] - first_cap["median_ms"]) / max(n - 1, 1),
        "how": "(caption - first token of the caption prompt) / (N - 1)"}
    throughput = []
    for b in args.batches:
        try:
            inp = inputs_for("", b)
            ms = summary(timer.samples(lambda: generate(model, inp, n, n), repeats=min(args.repeats, 5)))["median_ms"]
            throughput.append({"batch": b, "median_ms": ms, "images_per_s": b / (ms / 1e3)})
        except torch.OutOfMemoryError as e:  # noqa: PERF203  (a batch that does not fit is skipped)
            throughput.append({"batch": b, "skipped": f"out of memory: {str(e)[:80]}"})
            if device == "cuda":
                torch.cuda.empty_cache()
    for name, s in stages.items():
        log(f"{attn} {name}: {s}")
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"label": attn, "attn": attn, "dtype": str(dtype), "architecture": cls.__name__, "stages": stages,
            "throughput": throughput}


def parity(model_dir: str, binary: str, n: int, seed: int) -> dict:
    cls = model_class(model_dir)
    model = cls.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    # What `glimpse ask` sends: BLIP-2's question template, InstructBLIP's instruction verbatim.
    text = QUESTION if cls is InstructBlipForConditionalGeneration else f"Question: {QUESTION} Answer:"
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "parity_257x181.png"
        test_image(seed).save(png)
        inputs = processor(images=Image.open(png), text=text, return_tensors="pt")
        out = generate(model, inputs, n)[0]
        # Decoder-only output repeats the prompt; a T5 decoder's starts with its start token.
        hf = out[inputs["input_ids"].shape[1]:] if not model.config.text_config.is_encoder_decoder else out[1:]
        hf = hf.tolist()
        eos = model.config.text_config.eos_token_id
        if eos in hf:  # finished rows are padded after EOS
            hf = hf[: hf.index(eos) + 1]
        cmd = [binary, "ask", "--model", model_dir, "--device", "cpu", "--json", "--max-new-tokens", str(n),
               str(png), QUESTION]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            return {"ok": False, "error": proc.stderr.strip(), "command": cmd}
        g = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"ok": g["tokens"] == hf, "transformers_tokens": hf, "glimpse_tokens": g["tokens"], "new_tokens": n,
            "prompt_tokens": int(inputs["input_ids"].shape[1]), "architecture": cls.__name__}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--attn", default="eager,sdpa")
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=None, help="default 10 on CUDA, 3 on CPU")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--glimpse", help="glimpse binary: check CPU greedy-token parity and exit")
    ap.add_argument("--out", help="JSON output file")
    args = ap.parse_args()
    args.repeats = args.repeats or (10 if args.device == "cuda" else 3)
    args.batches = [int(b) for b in args.batches.split(",") if b]
    torch.backends.cuda.matmul.allow_tf32 = False
    if args.glimpse:
        report = {"parity": parity(args.model_dir, args.glimpse, args.new_tokens, args.seed)}
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

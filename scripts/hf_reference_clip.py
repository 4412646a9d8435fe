#!/usr/bin/env python3
"""transformers baseline for `glimpse bench` on a CLIP folder, and the CPU embedding parity check.

    python3 scripts/hf_reference_clip.py DIR [--device cuda|cpu] [--attn eager,sdpa]
                                             [--batches 1,32] [--repeats N] [--out FILE.json]
                                             [--glimpse BIN]

DIR is a CLIPModel folder, typically `glimpse synth --preset clip-vit-large-patch14 --out DIR`
(random weights at real shapes), so glimpse and transformers run identical weights.

Timings (fp16 on CUDA, fp32 on CPU; once per attention implementation in --attn), warm-up then
the median of --repeats (CUDA events on a GPU, perf_counter on the CPU), as glimpse bench's
"phase ms" rows: `model.get_image_features(pixel_values)` for a batch of seeded N(0,1) pixels,
and `model.get_text_features(input_ids)` for a batch of 16-token texts (BOS, random ids, EOS,
glimpse bench's BENCH_TEXT_TOKENS); images/s and texts/s are batch / median.

--glimpse BIN: the CPU parity check. Embeds a deterministic PNG and two texts with transformers
(CLIPModel + CLIPProcessor, fp32, CPU, eager) and with `BIN embed --model DIR --device cpu --json`,
and fails unless every element of the unit embeddings agrees within 1e-5 absolute: f32 rounding
accumulated over the layers in another summation order (measured 1.8e-7 on the
clip-vit-large-patch14 preset, 24 + 12 layers).
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
from transformers import CLIPModel, CLIPProcessor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_reference import finish, Timer, log, summary  # noqa: E402

transformers.logging.set_verbosity_error()
TEXT_TOKENS = 16
PARITY_TEXTS = ["a photo of a cat", "two dogs playing in the snow, at night!"]
PARITY_TOLERANCE = 1e-5


def text_ids(cfg, batch: int, seed: int) -> torch.Tensor:
    vocab = cfg.text_config.vocab_size
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab - 2, size=(batch, TEXT_TOKENS))
    ids[:, 0], ids[:, -1] = vocab - 2, vocab - 1
    return torch.from_numpy(ids).long()


def run_timings(model_dir: str, device: str, attn: str, batches: list[int], repeats: int, seed: int) -> dict:
    dtype = torch.float16 if device == "cuda" else torch.float32
    model = CLIPModel.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn).to(device).eval()
    cfg = model.config
    timer = Timer(device, warmup=2, repeats=repeats)
    side = cfg.vision_config.image_size
    rows = []
    with torch.no_grad():
        for b in batches:
            g = torch.Generator().manual_seed(seed + b)
            pv = torch.randn(b, 3, side, side, generator=g).to(device, dtype)
            ids = text_ids(cfg, b, seed + b).to(device)
            for kind, fn in (
                ("image", lambda: model.get_image_features(pixel_values=pv)),
                ("text", lambda: model.get_text_features(input_ids=ids)),
            ):
                try:
                    s = summary(timer.samples(fn))
                    s.update(input=kind, batch=b, per_s=b / (s["median_ms"] / 1e3))
                except torch.OutOfMemoryError as e:
                    s = {"input": kind, "batch": b, "skipped": f"out of memory: {e}"}
                rows.append(s)
                log(f"{attn} {kind} batch {b}: {s}")
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"label": attn, "attn": attn, "dtype": str(dtype), "rows": rows}


def parity(model_dir: str, binary: str) -> dict:
    """glimpse embed on the CPU against CLIPModel (fp32, eager) on the same image and texts."""
    model = CLIPModel.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    processor = CLIPProcessor.from_pretrained(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "parity.png"
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 256, size=(97, 131, 3), dtype=np.uint8)).save(image)
        with torch.no_grad():
            inputs = processor(images=Image.open(image), text=PARITY_TEXTS, return_tensors="pt", padding=True)
            out = model(**inputs)
        want_image = out.image_embeds[0].numpy()
        want_text = out.text_embeds.numpy()

        def glimpse(*args: str) -> list[dict]:
            cmd = [binary, "embed", "--model", model_dir, "--device", "cpu", "--json", *args]
            p = subprocess.run(cmd, capture_output=True, text=True, check=True)
            return [json.loads(line) for line in p.stdout.splitlines() if line.strip()]

        got_image = np.array(glimpse(str(image))[0]["embedding"], dtype=np.float32)
        text_args = [a for t in PARITY_TEXTS for a in ("--text", t)]
        got_text = np.array([r["embedding"] for r in glimpse(*text_args)], dtype=np.float32)
    err_image = float(np.abs(got_image - want_image).max())
    err_text = float(np.abs(got_text - want_text).max())
    ok = err_image <= PARITY_TOLERANCE and err_text <= PARITY_TOLERANCE
    return {"image_max_abs": err_image, "text_max_abs": err_text, "tolerance": PARITY_TOLERANCE, "ok": ok}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--attn", default="eager,sdpa")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--repeats", type=int, default=None, help="default 10 on CUDA, 3 on CPU")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--glimpse", help="glimpse binary: check CPU embedding parity and exit")
    ap.add_argument("--out", help="JSON output file")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    if args.glimpse:
        report = {"parity": parity(args.model_dir, args.glimpse)}
    else:
        repeats = args.repeats or (10 if args.device == "cuda" else 3)
        batches = [int(b) for b in args.batches.split(",")]
        report = {
            "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "text_tokens": TEXT_TOKENS,
            "runs": [
                run_timings(args.model_dir, args.device, a, batches, repeats, args.seed) for a in args.attn.split(",")
            ],
        }
    finish(report, args.out)


if __name__ == "__main__":
    main()

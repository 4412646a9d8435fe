#!/usr/bin/env python3
"""transformers baseline for `glimpse bench` on a SmolVLM (Idefics3) folder, and the CPU
greedy-token parity check.

    python3 scripts/hf_reference_smolvlm.py DIR [--device cuda|cpu] [--attn eager,sdpa]
                                                [--new-tokens N] [--repeats N] [--out FILE.json]
                                                [--glimpse BIN]

DIR is an Idefics3ForConditionalGeneration folder, typically `glimpse synth --preset smolvlm-256m
--out DIR` (random weights at real shapes), so glimpse and transformers run identical weights.

Timings (fp16 on CUDA, fp32 on CPU; once per attention implementation in --attn), warm-up then
the median of --repeats, batch 1, on ONE frame: the processor runs with do_image_splitting=False
(the image resized to one `max_image_size` square, image_seq_len image tokens), which is what
`glimpse bench` times (its synthetic image is one frame). A split image multiplies the vision
stage by its frame count (up to 17 for SmolVLM-256M's 2048 px longest edge).
  vision       model.model.get_image_features(pixel_values) incl. the connector
  prefill_vqa  the language model over the prompt's embeddings, logits of the last row only
  decode       ms/token: median over the steps of a manual greedy loop with past_key_values
  first_token  model.generate(max_new_tokens=1): pixels in -> first token
  caption      model.generate(max_new_tokens=N, min_new_tokens=N)

--glimpse BIN: the CPU parity check with the folder's own processor settings (splitting on):
answers "what is this?" about a deterministic PNG with transformers (fp32, CPU, eager, greedy)
and with `BIN ask --model DIR --device cpu --json`, and fails unless the tokens are identical.

The processor is built from the folder's files directly (Idefics3ImageProcessorPil, the
tokenizer, chat_template.jinja): AutoProcessor needs torchvision for Idefics3 in 5.17.
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
from transformers import AutoTokenizer, Idefics3ForConditionalGeneration, Idefics3Processor
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_reference import finish, Timer, log, summary  # noqa: E402
from hf_reference_llava import decode_steps, generate, prefill, test_image  # noqa: E402

transformers.logging.set_verbosity_error()
QUESTION = "what is this?"


def load_processor(model_dir: str, split: bool) -> Idefics3Processor:
    d = Path(model_dir)
    cfg = json.loads((d / "processor_config.json").read_text())
    ip = {k: v for k, v in cfg["image_processor"].items() if k != "image_processor_type"}
    ip["do_image_splitting"] = ip.get("do_image_splitting", True) and split
    chat = (d / "chat_template.jinja").read_text()
    return Idefics3Processor(image_processor=Idefics3ImageProcessorPil(**ip), tokenizer=AutoTokenizer.from_pretrained(d),
                             image_seq_len=cfg.get("image_seq_len", 169), chat_template=chat)


def prompt_inputs(processor, image: Image.Image) -> dict:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(images=[[image]], text=[text], return_tensors="pt")


@torch.no_grad()
def image_features(model, pv, mask):
    return model.model.get_image_features(pixel_values=pv, pixel_attention_mask=mask).pooler_output


@torch.no_grad()
def prompt_embeds(model, ids, pv, mask):
    embeds = model.get_input_embeddings()(ids)
    feats = image_features(model, pv, mask).reshape(-1, embeds.shape[-1])
    where = (ids == model.config.image_token_id).unsqueeze(-1)
    return embeds.masked_scatter(where, feats.to(embeds.dtype))


def run_timings(model_dir: str, device: str, attn: str, args) -> dict:
    dtype = torch.float16 if device == "cuda" else torch.float32
    model = Idefics3ForConditionalGeneration.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn)
    model = model.to(device).eval()
    processor = load_processor(model_dir, split=False)
    inputs = {k: v.to(device) for k, v in prompt_inputs(processor, test_image(args.seed)).items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    timer = Timer(device, warmup=2, repeats=args.repeats)
    ids, pv, mask, n = inputs["input_ids"], inputs["pixel_values"], inputs["pixel_attention_mask"], args.new_tokens
    embeds = prompt_embeds(model, ids, pv, mask)
    stages = {
        "vision": {**summary(timer.samples(lambda: image_features(model, pv, mask))), "frames": int(pv.shape[1])},
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
    return {"label": attn, "attn": attn, "dtype": str(dtype), "prompt_tokens": ids.shape[1], "stages": stages}


def parity(model_dir: str, binary: str, n: int, seed: int) -> dict:
    model = Idefics3ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32,
                                                             attn_implementation="eager").eval()
    processor = load_processor(model_dir, split=True)
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
            "prompt_tokens": int(inputs["input_ids"].shape[1]), "frames": int(inputs["pixel_values"].shape[1])}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--attn", default="eager,sdpa")
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=None, help="default 10 on CUDA, 3 on CPU")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--glimpse", help="glimpse binary: check CPU greedy-token parity and exit")
    ap.add_argument("--out", help="JSON output file")
    args = ap.parse_args()
    args.repeats = args.repeats or (10 if args.device == "cuda" else 3)
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

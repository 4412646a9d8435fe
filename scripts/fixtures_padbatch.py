#!/usr/bin/env python3
"""Golden for batches of different prompts (tests/padded_batch.rs): transformers' batched
`generate()` on blip2-opt-tiny with one question per image, the tokenizer padding on the left.

Writes tests/fixtures/goldens/padbatch_blip2-opt-tiny.json (deterministic: eager fp32 attention,
CPU, one thread, greedy). Per sequence: the image, the question, its unpadded token count, the new
ids (EOS cut after the first) and their log-probs (`log_softmax` of `output_logits`).

Run standalone (`python3 scripts/fixtures_padbatch.py`) or from make_fixtures.py's main().
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from transformers import Blip2ForConditionalGeneration, Blip2Processor

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
OUT = FIX / "goldens" / "padbatch_blip2-opt-tiny.json"
IMAGES = ["photo_q90.jpg", "wide_301x97.png", "tall_83x311.png"]
QUESTIONS = ["what?", "what is the colour of the big object in the middle of this picture?", "how many are there?"]


def main() -> None:
    torch.set_num_threads(1)
    model_dir = FIX / "blip2-opt-tiny"
    proc = Blip2Processor.from_pretrained(model_dir)
    proc.tokenizer.padding_side = "left"
    model = Blip2ForConditionalGeneration.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    images = [Image.open(FIX / "images" / n).convert("RGB") for n in IMAGES]
    enc = proc(images=images, text=[f"Question: {q} Answer:" for q in QUESTIONS], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, output_logits=True, return_dict_in_generate=True)
    eos = model.config.text_config.eos_token_id
    logprobs = torch.stack([torch.log_softmax(step.float(), dim=-1) for step in out.logits], dim=1)
    new = out.sequences[:, -logprobs.shape[1]:]
    cases = []
    for b, (image, question) in enumerate(zip(IMAGES, QUESTIONS)):
        ids = new[b].tolist()
        if eos in ids:
            ids = ids[: ids.index(eos) + 1]
        lps = [float(logprobs[b, i, t]) for i, t in enumerate(ids)]
        real = int(enc["attention_mask"][b].sum())
        cases.append(dict(image=image, question=question, input_len=real, generated_ids=ids, logprobs=lps))
    golden = dict(
        reference="transformers 5.17 Blip2ForConditionalGeneration.from_pretrained(dtype=float32, attn_implementation='eager'), CPU, one thread; "
        "Blip2Processor(images, texts, padding=True) with tokenizer.padding_side='left'; generate(do_sample=False, output_logits=True)",
        padded_len=int(enc["input_ids"].shape[1]),
        cases=cases,
    )
    tmp = OUT.with_suffix(".tmp")
    tmp.write_text(json.dumps(golden, indent=1) + "\n")
    tmp.replace(OUT)


if __name__ == "__main__":
    main()

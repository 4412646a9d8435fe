"""Beam-search goldens for glimpse: transformers 5.17 `generate(num_beams=...)` on the tiny BLIP-2
fixture (tests/fixtures/blip2-opt-tiny, images in tests/fixtures/images).

    python scripts/fixtures_beam.py        # writes tests/fixtures/goldens/beam_cases.json

Each case records the options passed to `generate()`, the generated ids of every returned
hypothesis (prompt removed; cut after the first EOS, since transformers pads shorter hypotheses
with pad_token_id) and `sequences_scores` (`output_scores=True, return_dict_in_generate=True`).
Deterministic: fp32 reference on one CPU thread, no sampling.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import transformers
from PIL import Image
from transformers import Blip2ForConditionalGeneration, Blip2Processor

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
MODEL = FIX / "blip2-opt-tiny"
OUT = FIX / "goldens" / "beam_cases.json"
VQA = "Question: {} Answer:"

if transformers.__version__ != "5.17.0":
    sys.exit(f"fixtures_beam.py: transformers==5.17.0 is required (found {transformers.__version__})")

# (name, images, prompt or None, generate() options). 773 and 532 are frequent mid-caption tokens of
# this model, so using one as EOS makes hypotheses finish early at different lengths; 202 ("\n") is the checkpoint's EOS.
CASES = [
    ("greedy_b1", ["odd_257x181.png"], None, dict(num_beams=1, max_new_tokens=20)),
    ("b2", ["odd_257x181.png"], None, dict(num_beams=2, max_new_tokens=20)),
    ("b3", ["odd_257x181.png"], None, dict(num_beams=3, max_new_tokens=20)),
    ("b5", ["wide_301x97.png"], None, dict(num_beams=5, max_new_tokens=20)),
    ("b8", ["greyalpha_40x50.png"], None, dict(num_beams=8, max_new_tokens=20)),
    ("b3_eos773", ["tall_83x311.png"], None, dict(num_beams=3, max_new_tokens=12, eos_token_id=773)),
    ("b5_eos773", ["grey_67x45.png"], None, dict(num_beams=5, max_new_tokens=12, eos_token_id=773)),
    ("b4_two_eos", ["palette_100x80.png"], None, dict(num_beams=4, max_new_tokens=12, eos_token_id=[773, 202])),
    ("b4_lp0", ["tiny_13x9.png"], None, dict(num_beams=4, max_new_tokens=12, eos_token_id=773, length_penalty=0.0)),
    ("b4_lp2", ["tiny_13x9.png"], None, dict(num_beams=4, max_new_tokens=12, eos_token_id=773, length_penalty=2.0)),
    ("b4_lpneg", ["tiny_13x9.png"], None,
     dict(num_beams=4, max_new_tokens=12, eos_token_id=773, length_penalty=-1.0)),
    ("b4_es_true", ["grey_67x45.png"], None, dict(num_beams=4, max_new_tokens=14, eos_token_id=532,
                                                   early_stopping=True)),
    ("b4_es_false", ["grey_67x45.png"], None, dict(num_beams=4, max_new_tokens=14, eos_token_id=532,
                                                    early_stopping=False)),
    ("b4_es_never", ["grey_67x45.png"], None, dict(num_beams=4, max_new_tokens=14, eos_token_id=532,
                                                    early_stopping="never", length_penalty=1.5)),
    ("b3_batch2", ["odd_257x181.png", "tall_83x311.png"], None,
     dict(num_beams=3, max_new_tokens=12, eos_token_id=773)),
    ("b3_batch2_es_true", ["grey_67x45.png", "tiny_13x9.png"], None,
     dict(num_beams=3, max_new_tokens=12, eos_token_id=532, early_stopping=True)),
    ("b5_nret3", ["wide_301x97.png"], None,
     dict(num_beams=5, max_new_tokens=12, eos_token_id=773, num_return_sequences=3)),
    ("b3_batch2_nret2", ["odd_257x181.png", "rgba_150x120.png"], None,
     dict(num_beams=3, max_new_tokens=10, num_return_sequences=2)),
    ("b3_min_new", ["tall_83x311.png"], None,
     dict(num_beams=3, max_new_tokens=12, eos_token_id=532, min_new_tokens=7)),
    ("b3_vqa", ["rgba_150x120.png"], VQA.format("what is in the picture?"), dict(num_beams=3, max_new_tokens=12)),
]


def cut(ids: list[int], eos: list[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in eos:
            return ids[: i + 1]
    return ids


@torch.no_grad()
def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    model = Blip2ForConditionalGeneration.from_pretrained(MODEL, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    processor = Blip2Processor.from_pretrained(MODEL)
    default_eos = model.language_model.generation_config.eos_token_id
    cases = []
    for name, images, prompt, opts in CASES:
        pil = [Image.open(FIX / "images" / p) for p in images]
        if prompt is None:
            inputs = processor(images=pil, return_tensors="pt")
            prompt_len = model.config.num_query_tokens + 1
        else:
            inputs = processor(images=pil, text=[prompt] * len(pil), return_tensors="pt")
            prompt_len = inputs["input_ids"].shape[1]
        out = model.generate(**inputs, do_sample=False, output_scores=True, return_dict_in_generate=True, **opts)
        eos = opts.get("eos_token_id", default_eos)
        eos = eos if isinstance(eos, list) else [eos]
        seqs = [cut(s[prompt_len:].tolist(), eos) for s in out.sequences]
        for s in seqs:
            assert s[-1] in eos or len(s) == opts["max_new_tokens"], (name, s)
        scores = None if out.get("sequences_scores") is None else [float(x) for x in out.sequences_scores]
        print(f"{name}: {seqs} {scores}", file=sys.stderr)
        cases.append({"name": name, "images": images, "prompt": prompt,
                      "options": {**opts, "eos_token_id": eos}, "sequences": seqs, "scores": scores})
    doc = {
        "model": "blip2-opt-tiny",
        "reference": "transformers 5.17.0 Blip2ForConditionalGeneration.from_pretrained(dtype=float32, "
                     "attn_implementation='eager'), CPU, one thread; generate(do_sample=False, output_scores=True, "
                     "return_dict_in_generate=True, **options). sequences: new ids of each returned hypothesis "
                     "(batch-major, num_return_sequences each), cut after the first EOS; scores: sequences_scores "
                     "(null for num_beams=1, which is greedy).",
        "cases": cases,
    }
    tmp = OUT.with_suffix(".json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(doc, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, OUT)


if __name__ == "__main__":
    main()

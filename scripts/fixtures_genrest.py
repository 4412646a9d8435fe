"""Goldens for the rest of generation (issue 11) on the tiny BLIP-2 fixture
(tests/fixtures/blip2-opt-tiny, images in tests/fixtures/images): transformers 5.17 `generate()` with
`stop_strings` (greedy and beam search) and beam search with logits processors (repetition_penalty,
no_repeat_ngram_size, min_new_tokens).

    python scripts/fixtures_genrest.py        # writes tests/fixtures/goldens/genrest_cases.json

Each case records the options passed to `generate()`, the generated ids of every returned sequence
(prompt removed; cut after the first EOS, and trailing fill ids dropped from sequences a stop string
finished) and `sequences_scores` (null for greedy). Deterministic: fp32 reference on one CPU thread,
no sampling (sampling is tested statistically: torch's RNG stream cannot be reproduced).
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
OUT = FIX / "goldens" / "genrest_cases.json"
VQA = "Question: {} Answer:"

if transformers.__version__ != "5.17.0":
    sys.exit(f"fixtures_genrest.py: transformers==5.17.0 is required (found {transformers.__version__})")

# Greedy on odd_257x181 gives the tokens '+', '¾Ñ', 'Í', '%', 'zoo', 'eping', 'eping', 'Ġbran', 'dd', ...;
# on tall_83x311 "'s" x5, 'eping', 'X', "'s", 'zoo', ...; on grey_67x45 ... 'umps', 'Ã©' (byte-level "é").
ODD, TALL, GREY = "odd_257x181.png", "tall_83x311.png", "grey_67x45.png"
CASES = [
    # The stop string ends inside the last token ("zo" of "zoo").
    ("stop_mid_token", [ODD], None, dict(num_beams=1, max_new_tokens=20, stop_strings=["zo"])),
    # Spans two tokens: "eping" + "eping", the second completing it.
    ("stop_across_two", [ODD], None, dict(num_beams=1, max_new_tokens=20, stop_strings=["epinge"])),
    # Spans the end of one token and the whole next one ("g" + " bran").
    ("stop_across_space", [ODD], None, dict(num_beams=1, max_new_tokens=20, stop_strings=["g bran"])),
    # Spans three tokens "'s" "'s" "'s".
    ("stop_three_tokens", [TALL], None, dict(num_beams=1, max_new_tokens=20, stop_strings=["'s's's"])),
    ("stop_never", [ODD], None, dict(num_beams=1, max_new_tokens=20, stop_strings=["xyz", "qq"])),
    # A non-ASCII stop string matched on byte-level tokens ("é" is the two bytes of 'Ã©').
    ("stop_bytes", [GREY], None, dict(num_beams=1, max_new_tokens=20, stop_strings=["xyz", "é"])),
    # One sequence stops, the other goes on (and stops later).
    ("stop_batch2", [ODD, TALL], None, dict(num_beams=1, max_new_tokens=20, stop_strings=["zoo"])),
    ("stop_with_eos", [ODD], None, dict(num_beams=1, max_new_tokens=20, stop_strings=["xyz"], eos_token_id=773)),
    # Beam search: a candidate completing a stop string finishes like an EOS candidate.
    ("stop_beam3", [ODD], None, dict(num_beams=3, max_new_tokens=12, stop_strings=["eping"])),
    ("stop_beam2_batch2", [ODD, TALL], None, dict(num_beams=2, max_new_tokens=12, stop_strings=["zoo"])),
    # Logits processors on the log-probs of beam search.
    ("bp_rep13", [ODD], None, dict(num_beams=3, max_new_tokens=12, repetition_penalty=1.3)),
    ("bp_rep08_batch2", [ODD, TALL], None,
     dict(num_beams=2, max_new_tokens=10, repetition_penalty=0.8, eos_token_id=773)),
    ("bp_ngram2", [TALL], None, dict(num_beams=4, max_new_tokens=12, no_repeat_ngram_size=2)),
    ("bp_all", [GREY], None, dict(num_beams=3, max_new_tokens=14, repetition_penalty=1.5, no_repeat_ngram_size=3,
                                  min_new_tokens=5, eos_token_id=532)),
    ("bp_ngram_nret2", ["wide_301x97.png"], None,
     dict(num_beams=4, max_new_tokens=12, no_repeat_ngram_size=2, eos_token_id=773, num_return_sequences=2)),
    ("bp_rep_vqa", ["rgba_150x120.png"], VQA.format("what is in the picture?"),
     dict(num_beams=3, max_new_tokens=10, repetition_penalty=1.2)),
]


def cut(ids: list[int], eos: list[int], fill: int, max_new: int) -> list[int]:
    for i, t in enumerate(ids):
        if t in eos:
            return ids[: i + 1]
    # A sequence a stop string finished is padded with the fill id up to the longest one.
    while len(ids) > 0 and ids[-1] == fill:
        ids = ids[:-1]
    return ids


@torch.no_grad()
def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    model = Blip2ForConditionalGeneration.from_pretrained(MODEL, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    processor = Blip2Processor.from_pretrained(MODEL)
    gc = model.language_model.generation_config
    default_eos, pad = gc.eos_token_id, gc.pad_token_id
    cases = []
    for name, images, prompt, opts in CASES:
        pil = [Image.open(FIX / "images" / p) for p in images]
        if prompt is None:
            inputs = processor(images=pil, return_tensors="pt")
            prompt_len = model.config.num_query_tokens + 1
        else:
            inputs = processor(images=pil, text=[prompt] * len(pil), return_tensors="pt")
            prompt_len = inputs["input_ids"].shape[1]
        out = model.generate(**inputs, do_sample=False, output_scores=True, return_dict_in_generate=True,
                             tokenizer=processor.tokenizer, **opts)
        eos = opts.get("eos_token_id", default_eos)
        eos = eos if isinstance(eos, list) else [eos]
        # Greedy pads finished rows with pad; beam search with `pad or eos[0]` (pad is 1 here).
        seqs = [cut(s[prompt_len:].tolist(), eos, pad, opts["max_new_tokens"]) for s in out.sequences]
        scores = None if out.get("sequences_scores") is None else [float(x) for x in out.sequences_scores]
        texts = [processor.tokenizer.decode(s) for s in seqs]
        print(f"{name}: {seqs} {texts} {scores}", file=sys.stderr)
        cases.append({"name": name, "images": images, "prompt": prompt,
                      "options": {**opts, "eos_token_id": eos}, "sequences": seqs, "texts": texts,
                      "scores": scores})
    doc = {
        "model": "blip2-opt-tiny",
        "reference": "transformers 5.17.0 Blip2ForConditionalGeneration.from_pretrained(dtype=float32, "
                     "attn_implementation='eager'), CPU, one thread; generate(do_sample=False, output_scores=True, "
                     "return_dict_in_generate=True, tokenizer=processor.tokenizer, **options). sequences: new ids of "
                     "each returned sequence (batch-major), cut after the first EOS, trailing pad fill removed; "
                     "texts: tokenizer.decode of each; scores: sequences_scores (null for greedy).",
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

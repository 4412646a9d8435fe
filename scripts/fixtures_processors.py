#!/usr/bin/env python3
"""Goldens for src/generate/processors.rs: transformers' logits processors and warpers, in the
order `GenerationMixin._get_logits_processor` builds them for `generate()`.

Writes tests/fixtures/goldens/processors.json (deterministic: fixed seed, one thread). Each case
is a settings dict (resolved GenerationConfig fields), a token history (`input_ids` of one
sequence: prompt + generated), the prompt length, an entry point (`logits`: what greedy/sample
hand the processors; `log_probs`: beam search's `log_softmax(logits)` first), the processor
class names transformers built, and the processed fp32 row.

Floats are stored as the shortest decimal that round-trips through float64 -> float32 (checked);
non-finite values as the strings "inf", "-inf", "nan".

Run standalone (`python3 scripts/fixtures_processors.py`) or from make_fixtures.py's main().
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from transformers import GenerationConfig
from transformers.generation import MinPLogitsWarper, TopPLogitsWarper
from transformers.generation.utils import GenerationMixin

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "goldens" / "processors.json"
SEED = 20250517
# Decisions of top-p / min-p compare softmax outputs with a threshold; glimpse's softmax is not
# torch's bit for bit, so every case keeps its probabilities this far (relative) from the cut.
MARGIN = 1e-5


def enc(x: float):
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    f = np.float32(x)
    s = repr(float(f)) if f == 0 else np.format_float_positional(f, unique=True, trim="-") \
        if 1e-4 <= abs(f) < 1e7 else np.format_float_scientific(f, unique=True, trim="-")
    assert np.float32(float(s)) == f, (x, s)  # parsed as f64 then cast, as the Rust test does
    return float(s) if ("." in s or "e" in s) else int(s)


def enc_row(t: torch.Tensor):
    return [enc(v) for v in t.tolist()]


def make_rows(g: torch.Generator) -> list[torch.Tensor]:
    """Logit rows: plain, ties (repeated values, ties at the top), -inf entries, large magnitudes."""
    rows = []
    for vocab, scale, kind in [
        (64, 3.0, "plain"), (97, 1.0, "ties"), (128, 8.0, "neginf"), (300, 2.0, "plain"),
        (211, 1000.0, "large"), (80, 0.5, "ties"), (150, 4.0, "ties_neginf"), (72, 30.0, "large"),
    ]:
        r = torch.randn(vocab, generator=g) * scale
        r = torch.round(r * 64) / 64  # short decimals in the JSON; still distinct values mostly
        if "ties" in kind:
            idx = torch.randperm(vocab, generator=g)
            # groups of equal values, one of them at the maximum
            r[idx[:4]] = r.max().item()
            r[idx[4:10]] = r[idx[10]].item()
            r[idx[11:14]] = r[idx[15]].item()
        if "neginf" in kind:
            idx = torch.randperm(vocab, generator=g)[: vocab // 5]
            r[idx] = -math.inf
        if kind == "large":
            r[torch.randperm(vocab, generator=g)[:3]] *= 50.0
        rows.append(r.float())
    return rows


class FakeModel:
    """What `_get_logits_processor` reads of `self`: a decoder-only config and the merge helper."""
    config = SimpleNamespace(is_encoder_decoder=False)
    _merge_criteria_processor_list = GenerationMixin._merge_criteria_processor_list


def build(settings: dict, prompt_len: int):
    """The processor list generate() builds, after `_prepare_generated_length` resolves min_length."""
    s = dict(settings)
    eos = s.pop("eos_token_ids")
    if s.get("min_new_tokens") is not None:
        s["min_length"] = s["min_new_tokens"] + prompt_len
    gc = GenerationConfig(**s)
    gc._eos_token_tensor = torch.tensor(eos, dtype=torch.long) if eos else None
    return GenerationMixin._get_logits_processor(FakeModel(), gc, input_ids_seq_length=prompt_len, device="cpu")


def check_margins(proc, ids, scores):
    """Asserts the top-p / min-p cut is not decided by fp32 softmax rounding, and that no group of
    tied scores straddles the top-p cut (torch.sort is unstable; glimpse orders ties by id)."""
    if isinstance(proc, TopPLogitsWarper):
        srt, order = torch.sort(scores, descending=False)
        cum = srt.softmax(-1).cumsum(-1)[0]
        thr = 1 - proc.top_p
        finite = torch.isfinite(srt[0])
        near = ((cum - thr).abs() <= MARGIN * max(thr, 1e-30)) & finite
        near[-proc.min_tokens_to_keep:] = False
        assert not near.any(), f"top-p cut too close to a cumulative probability: {cum[near]}"
        removed = cum <= thr
        removed[-proc.min_tokens_to_keep:] = False
        vals = srt[0]
        for i in range(1, len(vals)):
            if vals[i] == vals[i - 1] and removed[i] != removed[i - 1] and torch.isfinite(vals[i]):
                raise AssertionError("a tie group straddles the top-p cut")
    if isinstance(proc, MinPLogitsWarper):
        probs = scores.softmax(-1)[0]
        cut = (proc.min_p * probs.max()).item()
        near = ((probs - cut).abs() <= MARGIN * cut) & (probs > 0) & (probs != probs.max())
        assert not near.any(), f"min-p cut too close to a probability: {probs[near]}"


def run_case(row: torch.Tensor, history: list[int], prompt_len: int, settings: dict, entry: str):
    procs = build(settings, prompt_len)
    ids = torch.tensor([history], dtype=torch.long)
    scores = row[None].clone()
    if entry == "log_probs":
        scores = torch.nn.functional.log_softmax(scores, dim=-1)
    for p in procs:
        check_margins(p, ids, scores)
        scores = p(ids, scores)
    return [type(p).__name__ for p in procs], scores[0]


DEFAULTS = dict(do_sample=False, num_beams=1, temperature=1.0, top_k=50, top_p=1.0, min_p=None,
                repetition_penalty=1.0, no_repeat_ngram_size=0, min_length=0, min_new_tokens=None,
                remove_invalid_values=False)


def history_for(g: torch.Generator, vocab: int, n: int, pool: int = 12) -> list[int]:
    """Token ids drawn from a small pool so that tokens and n-grams repeat."""
    ids = torch.randperm(vocab, generator=g)[:pool]
    picks = torch.randint(0, pool, (n,), generator=g)
    return [int(ids[i]) for i in picks]


def cases(g: torch.Generator, rows: list[torch.Tensor]):
    out = []

    def add(name, r, history, prompt_len, entry="logits", **kw):
        settings = {**DEFAULTS, "eos_token_ids": kw.pop("eos_token_ids", [2]), **kw}
        names, processed = run_case(rows[r], history, prompt_len, settings, entry)
        out.append(dict(name=name, row=r, history=history, prompt_len=prompt_len, entry=entry,
                        settings=settings, processors=names, expected=enc_row(processed)))

    V = [len(r) for r in rows]
    # no processors at all (greedy defaults), both entry points
    add("greedy_defaults", 0, [1, 5, 9], 2)
    add("beam_defaults_log_softmax", 4, [1, 5, 9], 2, entry="log_probs", num_beams=4)
    # repetition penalty: >1 and <1, positive and negative scores, -inf ids, large magnitudes
    for r, pen in [(0, 1.3), (1, 0.7), (2, 1.2), (4, 1.5), (7, 2.0)]:
        h = history_for(g, V[r], 20)
        add(f"repetition_{r}_{pen}", r, h, 8, repetition_penalty=pen)
    add("repetition_log_probs", 3, history_for(g, V[3], 16), 5, entry="log_probs", repetition_penalty=1.3, num_beams=2)
    # no-repeat n-gram: n = 1..4, histories with repeated n-grams, and one shorter than n
    for n in [1, 2, 3, 4]:
        base = history_for(g, V[3], 6, pool=4)
        h = base + base[: n + 1] + base[:2] + base[: n - 1]
        add(f"no_repeat_{n}", 3, h, 4, no_repeat_ngram_size=n)
    add("no_repeat_short_history", 3, [7, 8], 2, no_repeat_ngram_size=3)
    add("no_repeat_log_probs", 0, [3, 4, 5, 3, 4, 6, 3, 4], 3, entry="log_probs", no_repeat_ngram_size=3, num_beams=3)
    # min_length / min_new_tokens: EOS (several ids) to -inf while too short, untouched after
    add("min_length_active", 0, list(range(1, 9)), 3, min_length=10, eos_token_ids=[2, 7])
    add("min_length_reached", 0, list(range(1, 11)), 3, min_length=10, eos_token_ids=[2, 7])
    add("min_new_tokens_active", 1, list(range(10, 22)), 10, min_new_tokens=3, eos_token_ids=[11, 40, 96])
    add("min_new_tokens_reached", 1, list(range(10, 23)), 10, min_new_tokens=3, eos_token_ids=[11, 40, 96])
    add("min_new_tokens_zero", 1, list(range(10, 12)), 2, min_new_tokens=0, eos_token_ids=[11])
    add("min_new_tokens_no_eos", 1, list(range(10, 12)), 2, min_new_tokens=4, eos_token_ids=[])
    # InfNan removal (after min-length: its -inf becomes the fp32 minimum)
    nan_row = rows[6].clone()
    nan_row[[3, 17]] = math.nan
    nan_row[[5, 40]] = math.inf
    rows.append(nan_row)
    add("inf_nan_remove", len(rows) - 1, [1, 2, 3], 2, remove_invalid_values=True, min_new_tokens=5,
        eos_token_ids=[9])
    # warpers one by one (do_sample; top_k=0 switches the default 50 off)
    for r, t in [(0, 0.7), (3, 1.5), (4, 0.3), (2, 2.0)]:
        add(f"temperature_{r}_{t}", r, [1], 1, do_sample=True, top_k=0, temperature=t)
    for r, k in [(1, 1), (1, 4), (5, 5), (0, 50), (6, 3), (2, 200), (3, 10)]:
        add(f"top_k_{r}_{k}", r, [1], 1, do_sample=True, top_k=k)
    add("top_k_min_tokens_to_keep", 0, [1], 1, do_sample=True, top_k=1, num_beams=2, eos_token_ids=[2, 3, 4])
    for r, p in [(0, 0.9), (3, 0.5), (4, 0.95), (2, 0.8), (5, 0.3), (7, 0.99), (3, 0.0)]:
        add(f"top_p_{r}_{p}", r, [1], 1, do_sample=True, top_k=0, top_p=p)
    add("top_p_min_tokens_to_keep", 3, [1], 1, do_sample=True, top_k=0, top_p=0.05, num_beams=3, eos_token_ids=[2, 9])
    for r, m in [(0, 0.05), (3, 0.2), (1, 0.5), (2, 0.01), (6, 0.1), (4, 1.0)]:
        add(f"min_p_{r}_{m}", r, [1], 1, do_sample=True, top_k=0, min_p=m)
    add("min_p_min_tokens_to_keep", 3, [1], 1, do_sample=True, top_k=0, min_p=0.9, num_beams=2, eos_token_ids=[2, 9, 12])
    # default sampling: top-k 50 only
    add("sample_defaults", 3, [1, 2], 1, do_sample=True)
    # everything, in generate's order, both entry points
    # (top-p 0.8 on row 1: at 0.9 a group of tied scores straddles the cut)
    for r, p in [(0, 0.9), (3, 0.9), (6, 0.9), (1, 0.8)]:
        h = history_for(g, V[r], 14, pool=6)
        add(f"all_sample_{r}", r, h, 6, do_sample=True, temperature=0.8, top_k=40, top_p=p, min_p=0.02,
            repetition_penalty=1.2, no_repeat_ngram_size=2, min_new_tokens=10, eos_token_ids=[2, 5])
    for r in [3, 0]:
        h = history_for(g, V[r], 12, pool=6)
        add(f"all_beam_sample_{r}", r, h, 4, entry="log_probs", do_sample=True, num_beams=3, temperature=1.3,
            top_k=20, top_p=0.8, min_p=0.05, repetition_penalty=1.4, no_repeat_ngram_size=3, min_new_tokens=20,
            eos_token_ids=[2])
    for r in [4, 5]:
        h = history_for(g, V[r], 12, pool=6)
        add(f"all_beam_{r}", r, h, 4, entry="log_probs", num_beams=3, repetition_penalty=1.4,
            no_repeat_ngram_size=2, min_new_tokens=20, eos_token_ids=[2, 3])
        add(f"all_greedy_{r}", r, h, 4, repetition_penalty=0.8, no_repeat_ngram_size=2, min_length=30)
    return out


def main() -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(SEED)
    rows = make_rows(g)
    cs = cases(g, rows)
    doc = {
        "about": "transformers logits processors as generate() builds them (_get_logits_processor); see "
                 "scripts/fixtures_processors.py. Floats: shortest decimals of fp32 values; 'inf'/'-inf'/'nan'.",
        "transformers": __import__("transformers").__version__,
        "torch": torch.__version__,
        "rows": [enc_row(r) for r in rows],
        "cases": cs,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tmp = OUT.with_suffix(".json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(doc, separators=(",", ":")) + "\n")
        f.flush()
        import os
        os.fsync(f.fileno())
    tmp.replace(OUT)
    print(f"processors: {len(cs)} cases, {OUT.stat().st_size} bytes -> {OUT.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()

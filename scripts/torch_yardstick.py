#!/usr/bin/env python3
"""Torch yardstick for benches/kernels.rs: the same shapes with cuBLAS / SDPA / copy, fp16,
median of 25 reps timed with CUDA events after 5 warm-ups. Markdown table, or JSON lines (--json)."""
import json
import sys

import torch
import torch.nn.functional as F

WARMUP, REPS = 5, 25


def timeit(fn):
    for _ in range(WARMUP):
        fn()
    ts = []
    for _ in range(REPS):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[REPS // 2]


def main():
    if not torch.cuda.is_available():
        print("torch yardstick skipped: no CUDA device")
        return
    dev, h = "cuda", torch.float16
    rows = []
    n = 1 << 30
    src, dst = torch.empty(n, dtype=torch.uint8, device=dev), torch.empty(n, dtype=torch.uint8, device=dev)
    ms = timeit(lambda: dst.copy_(src))
    copy = 2 * n / (ms * 1e-3) / 1e9
    rows.append(("memcpy d2d 1 GiB", ms, copy, "GB/s", "read+write"))
    del src, dst
    for nn, k in [(10240, 2560), (2560, 10240), (2560, 2560)]:
        x, w, b = torch.randn(1, k, device=dev, dtype=h), torch.randn(nn, k, device=dev, dtype=h), torch.randn(nn, device=dev, dtype=h)
        ms = timeit(lambda: F.linear(x, w, b))
        gbs = 2 * (nn * k + k + 2 * nn) / (ms * 1e-3) / 1e9
        rows.append((f"F.linear m=1 n={nn} k={k}", ms, gbs, "GB/s", f"{100 * gbs / copy:.0f}% of copy"))
    for m, nn, k in [(257, 4224, 1408), (257, 6144, 1408), (257, 1408, 6144), (512, 2560, 2560), (1024, 10240, 2560), (1024, 2560, 10240), (1024, 6144, 1408)]:
        x, w, b = torch.randn(m, k, device=dev, dtype=h), torch.randn(nn, k, device=dev, dtype=h), torch.randn(nn, device=dev, dtype=h)
        ms = timeit(lambda: F.gelu(F.linear(x, w, b)))
        rows.append((f"F.linear+gelu m={m} n={nn} k={k}", ms, 2 * m * nn * k / (ms * 1e-3) / 1e12, "TFLOP/s", ""))
    for name, b, hh, sq, skv, d, causal in [
        ("vit self-attn", 1, 16, 257, 257, 88, False),
        ("qformer self-attn", 1, 12, 32, 32, 64, False),
        ("qformer cross-attn", 1, 12, 32, 257, 64, False),
        ("opt prefill causal", 1, 32, 64, 64, 80, True),
    ]:
        q = torch.randn(b, hh, sq, d, device=dev, dtype=h)
        k_ = torch.randn(b, hh, skv, d, device=dev, dtype=h)
        v = torch.randn(b, hh, skv, d, device=dev, dtype=h)
        ms = timeit(lambda: F.scaled_dot_product_attention(q, k_, v, is_causal=causal))
        rows.append((f"SDPA {name} b={b} h={hh} sq={sq} skv={skv} d={d}", ms, 4 * b * hh * sq * skv * d / (ms * 1e-3) / 1e12, "TFLOP/s", ""))
    for r, dim in [(257, 1408), (1, 2560), (1024, 2560)]:
        x, res = torch.randn(r, dim, device=dev, dtype=h), torch.randn(r, dim, device=dev, dtype=h)
        w, bb = torch.randn(dim, device=dev, dtype=h), torch.randn(dim, device=dev, dtype=h)
        ms = timeit(lambda: F.layer_norm(x + res, (dim,), w, bb, 1e-5))
        rows.append((f"layer_norm(x+r) rows={r} dim={dim}", ms, 2 * 4 * r * dim / (ms * 1e-3) / 1e9, "GB/s", ""))
    if "--json" in sys.argv:
        for name, ms, val, unit, note in rows:
            print(json.dumps({"name": name, "device": torch.cuda.get_device_name(), "ms": ms, "metric": unit, "value": val, "note": note}))
    else:
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
        print("| op | median ms | value | unit | note |\n|---|---:|---:|---|---|")
        for name, ms, val, unit, note in rows:
            print(f"| {name} | {ms:.4f} | {val:.1f} | {unit} | {note} |")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Load figures of `glimpse serve` over loopback: time to first token (p50, p99) and completed
requests/s at several concurrency levels, closed loop (each of C clients sends its next request
when its last one ends). Standard library only.

Each request is a streamed greedy chat completion with `logprobs` (every generated token then
arrives as its own chunk), over 8 images x 8 questions of tests/fixtures/images, so calls mix
images and captions with questions. Time to first token is measured by the client: from sending
the request to the chunk of its first token (HTTP round trip, queueing and the image stage
included). One server per run; a warm-up pass of the 64 distinct requests comes first, so the
image cache (on by default) holds every image during the timed levels unless
`--image-cache-bytes 0` is passed through.

    python3 scripts/serve_load.py --model tests/fixtures/blip2-opt-tiny \\
        --concurrency 1 4 16 64 -- --max-batch 16

Everything after `--` goes to `glimpse serve`. Prints a Markdown table.
"""

import argparse
import base64
import http.client
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGES = [
    "photo_q90.jpg",
    "wide_301x97.png",
    "tall_83x311.png",
    "odd_257x181.png",
    "rgba_150x120.png",
    "palette_100x80.png",
    "grey_67x45.png",
    "exact_224x224.png",
]
QUESTIONS = ["", "what is this?", "how many?", "what colour is the big object in the middle?", "who?", "", "is it a cat?", "where?"]


def bodies():
    uris = []
    for name in IMAGES:
        mime = "image/jpeg" if name.endswith(".jpg") else "image/png"
        data = base64.b64encode((ROOT / "tests" / "fixtures" / "images" / name).read_bytes()).decode()
        uris.append(f"data:{mime};base64,{data}")
    out = []
    for i in range(64):
        content = [{"type": "image_url", "image_url": {"url": uris[i % 8]}}, {"type": "text", "text": QUESTIONS[(i // 8 + i) % 8]}]
        out.append(
            json.dumps(
                {
                    "model": "bench",
                    "messages": [{"role": "user", "content": content}],
                    "temperature": 0,
                    "logprobs": True,
                    "stream": True,
                }
            )
        )
    return out


def one(host, port, body):
    """(seconds to the first token, seconds to the end) of one streamed request."""
    conn = http.client.HTTPConnection(host, port, timeout=600)
    start = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"status {resp.status}: {resp.read()[:300]!r}")
    first = None
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:
            raise RuntimeError(chunk["error"])
        if first is None and any(c.get("logprobs") for c in chunk.get("choices", [])):
            first = time.perf_counter() - start
    end = time.perf_counter() - start
    conn.close()
    if first is None:
        raise RuntimeError("no token came back")
    return first, end


def percentile(values, p):
    """Nearest-rank percentile."""
    v = sorted(values)
    return v[max(0, min(len(v) - 1, int(-(-p * len(v) // 100)) - 1))]


def level(host, port, reqs, concurrency, total):
    lock = threading.Lock()
    next_i = [0]
    results = []
    errors = []

    def client():
        while True:
            with lock:
                i = next_i[0]
                if i >= total:
                    return
                next_i[0] += 1
            try:
                r = one(host, port, reqs[i % len(reqs)])
            except Exception as e:  # noqa: BLE001 - reported below
                with lock:
                    errors.append(str(e))
                return
            with lock:
                results.append(r)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed: {errors[0]}")
    ttft = [r[0] for r in results]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "wall_s": wall,
        "rps": len(results) / wall,
        "ttft_p50_ms": percentile(ttft, 50) * 1e3,
        "ttft_p99_ms": percentile(ttft, 99) * 1e3,
        "latency_p50_ms": percentile([r[1] for r in results], 50) * 1e3,
    }


def metric(host, port, name):
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=os.environ.get("GLIMPSE_BIN", str(ROOT / "target" / "release" / "glimpse")))
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--requests", type=int, default=0, help="requests per level (default: max(64, 8 x concurrency))")
    ap.add_argument("serve_args", nargs="*", help="after --: more `glimpse serve` options")
    args = ap.parse_args()
    cmd = [args.bin, "serve", "--model", args.model, "--device", args.device, "--port", "0", "--served-model-name", "bench"]
    cmd += ["--max-queue", "1024", *args.serve_args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        if not line.startswith("listening on http://"):
            sys.exit(f"glimpse serve did not start: {line!r}")
        host, port = line.strip().removeprefix("listening on http://").rsplit(":", 1)
        port = int(port)
        reqs = bodies()
        level(host, port, reqs, 8, len(reqs))  # warm-up: every distinct request once
        print(f"serve options: {' '.join(args.serve_args) or '(defaults)'}; model {args.model}; device {args.device}")
        print("| concurrency | requests | requests/s | TTFT p50 (ms) | TTFT p99 (ms) | latency p50 (ms) | model calls |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for c in args.concurrency:
            calls_before = metric(host, port, "glimpse_batch_size_count")
            r = level(host, port, reqs, c, args.requests or max(64, 8 * c))
            calls = metric(host, port, "glimpse_batch_size_count") - calls_before
            print(
                f"| {c} | {r['requests']} | {r['rps']:.1f} | {r['ttft_p50_ms']:.1f} | {r['ttft_p99_ms']:.1f} "
                f"| {r['latency_p50_ms']:.1f} | {calls:.0f} |",
                flush=True,
            )
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()

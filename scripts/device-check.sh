#!/usr/bin/env bash
# Runs on the GPU machine (no cargo, no network; nvcc 13.0, python3 + torch available):
#   scripts/device-check.sh .devbin/
# 1. the prebuilt GPU kernel tests (every kernel vs CPU reference),
# 2. the kernel micro-benchmarks (markdown + JSON),
# 3. the torch yardstick at the same shapes, in the same run, on the same card.
# Logs go to $OUT when set (else ./device-check-logs). Exit status: non-zero if the tests failed.
set -uo pipefail
BIN="${1:?usage: device-check.sh DIR_WITH_BINARIES}"
LOG="${OUT:-./device-check-logs}"
mkdir -p "$LOG"
HERE="$(cd "$(dirname "$0")" && pwd)"
{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
    git -C "$HERE/.." rev-parse HEAD 2>/dev/null || echo "commit: unknown (no git)"
} | tee "$LOG/env.txt"

rc=0
echo "== gpu_kernels tests"
if [ -x "$BIN/gpu_kernels" ]; then
    "$BIN/gpu_kernels" --include-ignored --test-threads=1 --nocapture 2>&1 | tee "$LOG/gpu_kernels.log"
    rc=${PIPESTATUS[0]}
else
    echo "missing $BIN/gpu_kernels" | tee "$LOG/gpu_kernels.log"; rc=1
fi
echo "== gpu_model tests (tiny fixtures on the CUDA executor vs goldens)"
if [ -x "$BIN/gpu_model" ]; then
    # Test binaries resolve fixtures through CARGO_MANIFEST_DIR baked at build time: run from the
    # repository root with the fixtures present (they travel with the working tree).
    (cd "$HERE/.." && "$BIN/gpu_model" --include-ignored --test-threads=1 --nocapture) 2>&1 | tee "$LOG/gpu_model.log"
    m=${PIPESTATUS[0]}; [ "$m" -ne 0 ] && rc=$m
else
    echo "missing $BIN/gpu_model" | tee "$LOG/gpu_model.log"; rc=1
fi
echo "== kernel benchmarks"
if [ -x "$BIN/kernels" ]; then
    "$BIN/kernels" 2>&1 | tee "$LOG/bench.md"
    "$BIN/kernels" --json > "$LOG/bench.jsonl" 2>&1
else
    echo "missing $BIN/kernels" | tee "$LOG/bench.md"
fi
echo "== torch yardstick"
python3 "$HERE/torch_yardstick.py" 2>&1 | tee "$LOG/torch.md"
python3 "$HERE/torch_yardstick.py" --json > "$LOG/torch.jsonl" 2>&1
echo "tests exit status: $rc (logs in $LOG)"
exit $rc

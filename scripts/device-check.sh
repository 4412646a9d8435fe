#!/usr/bin/env bash
# Device run 1 of 2, correctness only (fits a 15-minute device lease with the machine start):
#   bash scripts/device-check.sh [.devbin]        (binaries from scripts/build-devbin.sh)
# 1. gpu_kernels: every kernel vs its f64/CPU reference (awkward shapes, masks, NaN poisoning),
# 2. gpu_model: the tiny BLIP-2 fixtures on the CUDA executor vs the transformers goldens, graph
#    replay vs direct launches, recording-failure fallback, concurrent executors, op-by-op
#    lockstep with the CPU executor,
# 3. backend_ops: every op kind (norms, GELU-tanh, gated MLP, RoPE, GQA with masks and bias,
#    row selection) on the CUDA executor vs the fp16-emulating CPU executor.
# Both with --include-ignored --test-threads=1 (one test at a time: some set GLIMPSE_CUDA_GRAPH).
# Each binary has a timeout; together they take ~2-4 minutes on an H100/H200 (an estimate until
# the first run is logged in docs/device-log.md). Logs go to $OUT when set (else
# ./device-check-logs): env.txt, gpu_kernels.log, gpu_model.log, backend_ops.log, summary.txt.
# Exit status: non-zero if any test failed or timed out, or (unless ALLOW_SKIP=1) skipped.
# The performance run is scripts/device-perf.sh; kernel micro-benchmarks with the torch
# yardstick are scripts/device-kernel-bench.sh, the full end-to-end comparison device-e2e.sh.
set -uo pipefail
BIN="${1:-.devbin}"
LOG="${OUT:-./device-check-logs}"
KERNELS_TIMEOUT="${KERNELS_TIMEOUT:-240}"
MODEL_TIMEOUT="${MODEL_TIMEOUT:-180}"
OPS_TIMEOUT="${OPS_TIMEOUT:-60}"
mkdir -p "$LOG"
HERE="$(cd "$(dirname "$0")" && pwd)"
{
    date -u +%Y-%m-%dT%H:%M:%SZ
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
    echo "commit $(git -C "$HERE/.." rev-parse --short=12 HEAD 2>/dev/null || cat "$BIN/COMMIT" 2>/dev/null || echo unknown)"
    "$BIN/glimpse" --version 2>&1
} | tee "$LOG/env.txt"

rc=0
# Test binaries resolve fixtures through CARGO_MANIFEST_DIR baked at build time: run from the
# repository root with the fixtures present (they travel with the working tree).
run_tests() {  # name timeout
    local name=$1 limit=$2 r
    echo "== $name ($(date -u +%H:%M:%S), timeout ${limit}s)"
    if [ ! -x "$BIN/$name" ]; then
        echo "missing $BIN/$name: run scripts/build-devbin.sh first" | tee "$LOG/$name.log"
        rc=1; return
    fi
    (cd "$HERE/.." && timeout "$limit" "$BIN/$name" --include-ignored --test-threads=1 --nocapture) 2>&1 | tee "$LOG/$name.log"
    r=${PIPESTATUS[0]}
    [ "$r" -eq 124 ] && echo "$name: TIMED OUT after ${limit}s" | tee -a "$LOG/$name.log"
    [ "$r" -ne 0 ] && rc=$r
}
run_tests gpu_kernels "$KERNELS_TIMEOUT"
run_tests gpu_model "$MODEL_TIMEOUT"
run_tests backend_ops "$OPS_TIMEOUT"

# On the device a skipped GPU test is a failure of the run (nothing was verified); a dry run on
# a CPU-only machine sets ALLOW_SKIP=1.
skips=$(grep -h -o "SKIP [a-z_0-9]*" "$LOG"/gpu_*.log "$LOG"/backend_ops.log 2>/dev/null | sort -u)
if [ -n "$skips" ] && [ "${ALLOW_SKIP:-0}" != 1 ]; then
    echo "skipped on the device (not verified):"; echo "$skips"
    [ "$rc" -eq 0 ] && rc=2
fi
{
    echo "exit status: $rc"
    grep -h -E "^test result:|FAILED|panicked at|TIMED OUT" "$LOG"/gpu_*.log "$LOG"/backend_ops.log
    echo "skipped: $(echo -n "$skips" | grep -c . ) tests${skips:+ (ALLOW_SKIP=${ALLOW_SKIP:-0})}"
} > "$LOG/summary.txt"
cat "$LOG/summary.txt"
exit $rc

#!/usr/bin/env bash
# Kernel micro-benchmarks and the torch yardstick at the same shapes, same card, same run
# (for a device lease after scripts/device-check.sh and scripts/device-perf.sh have passed):
#   bash scripts/device-kernel-bench.sh [.devbin]
# Logs go to $OUT when set (else ./device-kernel-bench-logs): bench.md, bench.jsonl, torch.md,
# torch.jsonl.
set -uo pipefail
BIN="${1:-.devbin}"
LOG="${OUT:-./device-kernel-bench-logs}"
mkdir -p "$LOG"
HERE="$(cd "$(dirname "$0")" && pwd)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$LOG/env.txt"
if [ -x "$BIN/kernels" ]; then
    timeout 240 "$BIN/kernels" 2>&1 | tee "$LOG/bench.md"
    timeout 240 "$BIN/kernels" --json > "$LOG/bench.jsonl" 2>&1
else
    echo "missing $BIN/kernels" | tee "$LOG/bench.md"
fi
timeout 180 python3 "$HERE/torch_yardstick.py" 2>&1 | tee "$LOG/torch.md"
timeout 180 python3 "$HERE/torch_yardstick.py" --json > "$LOG/torch.jsonl" 2>&1

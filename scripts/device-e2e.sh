#!/usr/bin/env bash
# End-to-end benchmark on the GPU machine (no cargo, no network; torch + transformers installed):
#   scripts/device-e2e.sh [DIR_WITH_BINARIES]        (default .devbin, from scripts/build-devbin.sh)
# 1. `glimpse synth --preset blip2-opt-2.7b` to /tmp (random weights, real shapes, HF folder),
# 2. a cuBLAS fp16 GEMM rate from torch, passed to glimpse bench as GLIMPSE_MATRIX_TFLOPS (the
#    compute floor; glimpse measures the copy bandwidth itself),
# 3. `glimpse bench --preset blip2-opt-2.7b --device cuda --json` (same weights: same preset+seed),
# 4. scripts/hf_reference.py on the folder: eager + sdpa (timings, fp16-vs-fp32 logits, greedy
#    tokens), then static cache + torch.compile,
# 5. a summary table: glimpse vs transformers per stage, with floors.
# Writes at most 8 files to $OUT (else ./device-e2e-logs): env.txt, log.txt, glimpse-bench.json,
# hf-eager.json, hf-logits.safetensors, parity.json, hf-compiled.json, summary.md. Every step has a timeout;
# the whole run is budgeted for ~6 minutes on an H100. Exit status: non-zero if glimpse bench or
# glimpse parity failed.
set -uo pipefail
BIN="${1:-.devbin}"
LOG="${OUT:-./device-e2e-logs}"
PRESET="${PRESET:-blip2-opt-2.7b}"
SEED="${SEED:-0}"
# DEVICE=cpu PRESET=tiny runs the whole flow on a CPU-only machine (a dry run of this script).
DEVICE="${DEVICE:-cuda}"
MODEL="${MODEL_DIR:-/tmp/glimpse-synth-$PRESET}"
HERE="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1
G="$BIN/glimpse"
: "${GLIMPSE_COMMIT:=$(git -C "$HERE/.." rev-parse --short=12 HEAD 2>/dev/null || cat "$BIN/COMMIT" 2>/dev/null || echo unknown)}"
export GLIMPSE_COMMIT
step() { echo "== $* ($(date -u +%H:%M:%S))" | tee -a "$LOG/log.txt"; }

{
    date -u +%Y-%m-%dT%H:%M:%SZ
    echo "commit $GLIMPSE_COMMIT"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
    python3 -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)' 2>&1
    nproc
} | tee "$LOG/env.txt"

if [ ! -x "$G" ]; then
    echo "missing $G: run scripts/build-devbin.sh on the dev machine (it must copy the glimpse binary)" | tee -a "$LOG/log.txt"
    exit 1
fi

step "synth $PRESET -> $MODEL"
rm -rf "$MODEL"
timeout 300 "$G" synth --preset "$PRESET" --out "$MODEL" --seed "$SEED" 2>&1 | tee -a "$LOG/log.txt"

step "torch fp16 GEMM rate (cuBLAS, 8192^3, median of 20)"
TFLOPS=$(timeout 120 python3 - <<'EOF' 2>>"$LOG/log.txt"
import torch
a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
b = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
for _ in range(5):
    a @ b
ts = []
for _ in range(20):
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record(); a @ b; e.record(); e.synchronize()
    ts.append(s.elapsed_time(e))
ts.sort()
print(f"{2 * 8192**3 / (ts[10] * 1e-3) / 1e12:.1f}")
EOF
)
echo "cuBLAS fp16 GEMM: ${TFLOPS:-failed} TFLOP/s" | tee -a "$LOG/log.txt"
[ -n "${TFLOPS:-}" ] && export GLIMPSE_MATRIX_TFLOPS="$TFLOPS"

step "glimpse bench --preset $PRESET --device $DEVICE"
timeout 300 "$G" bench --preset "$PRESET" --device "$DEVICE" --seed "$SEED" --json > "$LOG/glimpse-bench.json" 2>>"$LOG/log.txt"
rc=$?
echo "glimpse bench exit status $rc" | tee -a "$LOG/log.txt"

step "hf_reference.py eager + sdpa, numerics"
timeout 420 python3 "$HERE/hf_reference.py" "$MODEL" --device "$DEVICE" --attn eager,sdpa --seed "$SEED" \
    --out "$LOG/hf-eager.json" --tensors "$LOG/hf-logits.safetensors" 2>&1 | tee -a "$LOG/log.txt"

step "glimpse parity: prefill logits vs transformers fp32, bar <= 2x transformers fp16 error"
timeout 300 "$G" parity --model "$MODEL" --reference "$LOG/hf-logits.safetensors" --device "$DEVICE" --json > "$LOG/parity.json" 2>>"$LOG/log.txt"
prc=$?
cat "$LOG/parity.json" | tee -a "$LOG/log.txt"
[ "$prc" -ne 0 ] && [ "$rc" -eq 0 ] && rc=$prc

step "hf_reference.py static cache + torch.compile"
timeout 360 python3 "$HERE/hf_reference.py" "$MODEL" --device "$DEVICE" --compile-only --no-numerics --seed "$SEED" \
    --out "$LOG/hf-compiled.json" 2>&1 | tee -a "$LOG/log.txt"

step "summary"
python3 "$HERE/device_summary.py" "$LOG" 2>&1 | tee "$LOG/summary.md"
ls -la "$LOG"
exit $rc

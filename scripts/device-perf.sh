#!/usr/bin/env bash
# Device run 2 of 2, a short performance run for what is left of a 15-minute device lease after
# scripts/device-check.sh (~5 minutes of wall time; every step has a timeout):
#   bash scripts/device-perf.sh [.devbin]
# 1. `glimpse synth --preset blip2-opt-2.7b` to /tmp (random weights, real shapes, HF folder),
# 2. `glimpse bench --model` on that folder: vision, Q-Former, prefill, decode ms/token,
#    first-token and caption latency at batch 1, throughput at batch 1 and 32; 3 repeats,
# 3. the transformers baseline on the same folder, eager, 3 repeats: scripts/hf_reference.py at
#    batch 1 without numerics or torch.compile (those are in the full scripts/device-e2e.sh);
#    PRESET=llava-1.5-7b: scripts/hf_reference_llava.py; PRESET=clip-vit-large-patch14:
#    scripts/hf_reference_clip.py at batch 1 and 32 (bench then times images/s and texts/s);
#    PRESET=blip2-flan-t5-xl, instructblip-vicuna-7b or instructblip-flan-t5-xl:
#    scripts/hf_reference_blip_family.py
#    (whole-request stages and images/s at batch 1 and 32),
# 4. the side-by-side table (scripts/device_summary.py).
# The copy bandwidth is measured by glimpse bench itself; the matrix rate is left to bench's
# default unless GLIMPSE_MATRIX_TFLOPS is set. Logs go to $OUT when set (else
# ./device-perf-logs): env.txt, log.txt, glimpse-bench.json, hf-eager.json, summary.md.
# DEVICE=cpu PRESET=tiny dry-runs the whole flow on a CPU-only machine.
# Exit status: non-zero if glimpse bench failed.
set -uo pipefail
BIN="${1:-.devbin}"
LOG="${OUT:-./device-perf-logs}"
PRESET="${PRESET:-blip2-opt-2.7b}"
SEED="${SEED:-0}"
DEVICE="${DEVICE:-cuda}"
REPEATS="${REPEATS:-3}"
MODEL="${MODEL_DIR:-/tmp/glimpse-synth-$PRESET}"
HERE="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1
G="$BIN/glimpse"
step() { echo "== $* ($(date -u +%H:%M:%S))" | tee -a "$LOG/log.txt"; }

{
    date -u +%Y-%m-%dT%H:%M:%SZ
    echo "commit $(git -C "$HERE/.." rev-parse --short=12 HEAD 2>/dev/null || cat "$BIN/COMMIT" 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
    python3 -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)' 2>&1
} | tee "$LOG/env.txt"
if [ ! -x "$G" ]; then
    echo "missing $G: run scripts/build-devbin.sh on the dev machine" | tee -a "$LOG/log.txt"
    exit 1
fi

step "synth $PRESET -> $MODEL"
rm -rf "$MODEL"
timeout 120 "$G" synth --preset "$PRESET" --out "$MODEL" --seed "$SEED" 2>&1 | tee -a "$LOG/log.txt"

step "glimpse bench --model $MODEL --device $DEVICE (repeats $REPEATS, throughput 1,32)"
timeout 150 "$G" bench --model "$MODEL" --device "$DEVICE" --seed "$SEED" --repeats "$REPEATS" \
    --throughput-batches 1,32 --json > "$LOG/glimpse-bench.json" 2>>"$LOG/log.txt"
rc=$?
echo "glimpse bench exit status $rc" | tee -a "$LOG/log.txt"

# The transformers baseline of the preset's family, eager attention.
case "$PRESET" in
    clip-*) REF=(hf_reference_clip.py --batches 1,32) ;;
    llava-*) REF=(hf_reference_llava.py) ;;
    blip2-flan-t5-*|instructblip-*) REF=(hf_reference_blip_family.py --batches 1,32) ;;
    *) REF=(hf_reference.py --batches 1 --no-numerics) ;;
esac
step "${REF[0]} eager"
timeout 150 python3 "$HERE/${REF[0]}" "$MODEL" "${REF[@]:1}" --device "$DEVICE" --attn eager \
    --repeats "$REPEATS" --seed "$SEED" --out "$LOG/hf-eager.json" 2>&1 | tee -a "$LOG/log.txt"

step "summary"
python3 "$HERE/device_summary.py" "$LOG" 2>&1 | tee "$LOG/summary.md"
exit $rc

#!/usr/bin/env bash
# On a GPU machine, after scripts/device-check.sh: the kernel tests under NVIDIA's
# compute-sanitizer, memcheck then racecheck (what the simulated device checks with guard pages
# and ThreadSanitizer, here on the real card and nvcc's code):
#   bash scripts/device-sanitize.sh [.devbin]
# compute-sanitizer is looked up in $COMPUTE_SANITIZER, PATH, /usr/local/cuda*/bin and the
# nvidia-cuda-sanitizer-api wheel (pip install nvidia-cuda-sanitizer-api==13.0.85 puts it in
# site-packages/nvidia/cu13/bin). GLIMPSE_SIM_QUICK=1 leaves gemm's large shapes out (the
# sanitizers slow kernels 10-100x). Each tool has a timeout (SANITIZE_TIMEOUT, default 150 s).
# Logs go to $OUT (else ./device-sanitize-logs); exit non-zero on any reported error.
set -uo pipefail
BIN="${1:-.devbin}"
LOG="${OUT:-./device-sanitize-logs}"
LIMIT="${SANITIZE_TIMEOUT:-150}"
mkdir -p "$LOG"
HERE="$(cd "$(dirname "$0")" && pwd)"

find_sanitizer() {
    if [ -n "${COMPUTE_SANITIZER:-}" ] && [ -x "$COMPUTE_SANITIZER" ]; then echo "$COMPUTE_SANITIZER"; return; fi
    command -v compute-sanitizer 2>/dev/null && return
    for c in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer; do
        [ -x "$c" ] && { echo "$c"; return; }
    done
    python3 - <<'EOF' 2>/dev/null
import os, site, sys
for d in site.getsitepackages() + [site.getusersitepackages()]:
    p = os.path.join(d, "nvidia", "cu13", "bin", "compute-sanitizer")
    if os.access(p, os.X_OK):
        print(p)
        sys.exit(0)
sys.exit(1)
EOF
}
SAN="$(find_sanitizer)"
if [ -z "$SAN" ]; then
    echo "no compute-sanitizer found (install nvidia-cuda-sanitizer-api==13.0.85 or set COMPUTE_SANITIZER)" | tee "$LOG/summary.txt"
    exit 2
fi
echo "compute-sanitizer: $SAN ($("$SAN" --version 2>&1 | tail -1))" | tee "$LOG/summary.txt"
rc=0
for tool in memcheck racecheck; do
    echo "== $tool ($(date -u +%H:%M:%S), timeout ${LIMIT}s)"
    (cd "$HERE/.." && GLIMPSE_SIM_QUICK=1 timeout "$LIMIT" "$SAN" --tool "$tool" --error-exitcode 86 \
        --print-limit 20 "$BIN/gpu_kernels" --include-ignored --test-threads=1) >"$LOG/$tool.log" 2>&1
    r=$?
    [ "$r" -eq 124 ] && echo "$tool: TIMED OUT after ${LIMIT}s" >>"$LOG/$tool.log"
    { echo "$tool: exit $r"; grep -E "^test result:|ERROR SUMMARY|RACECHECK SUMMARY|TIMED OUT" "$LOG/$tool.log"; } | tee -a "$LOG/summary.txt"
    [ "$r" -ne 0 ] && rc=1
done
exit $rc

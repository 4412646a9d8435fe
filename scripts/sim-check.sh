#!/usr/bin/env bash
# Runs every GPU test on the simulated device (docs/simulated-device.md), no GPU needed:
#
#   bash scripts/sim-check.sh            (from the repository root or anywhere; CI runs it)
#
# 1. builds the simulated driver and kernels (scripts/sim-build.sh) and the test binaries;
# 2. runs gpu_kernels, gpu_model, backend_ops and padded_batch with --include-ignored on it, so
#    `--device cuda` / `Device::Cuda` go through the same Rust code (launchers, arena, executor,
#    CUDA graph capture and replay, events) as on a card; a test that prints SKIP fails the run;
# 3. runs gpu_kernels again with a seeded random thread order (GLIMPSE_SIM_SCHED=random);
# 4. runs gpu_kernels once more on the kernels built with ThreadSanitizer (races between the
#    threads of a block, e.g. a missing __syncthreads, are errors even when results are right).
# Exits non-zero on any failure and prints cargo's `test result` lines.
# GLIMPSE_SIM_SKIP_TSAN=1 leaves out step 4 (where g++'s libtsan is missing it must be said).
set -uo pipefail
cd "$(dirname "$0")/.."
LOG="${SIM_LOG:-target/sim-check}"
mkdir -p "$LOG"

# The test binaries embed the nvcc-built fatbins as on a card (the simulated driver loads them as
# modules and runs the host builds of their kernels): the same NVCC as the rest of the build.
NVCC="${NVCC:-$(bash scripts/install-nvcc.sh)}"
export NVCC
SIM="$(bash scripts/sim-build.sh)" || { echo "sim-check: building the simulated device failed"; exit 1; }
cargo test --release --no-run --test gpu_kernels --test gpu_model --test backend_ops --test padded_batch \
    >"$LOG/build.log" 2>&1 || { tail -50 "$LOG/build.log"; echo "sim-check: cargo build failed"; exit 1; }

# The test binaries cargo just built (the newest of each name).
bin_of() {
    ls -t target/release/deps/"$1"-* 2>/dev/null | grep -v '\.d$' | head -1
}

rc=0
run() {  # label, test binary name, extra env...
    local label=$1 name=$2
    shift 2
    local bin
    bin="$(bin_of "$name")"
    if [ -z "$bin" ]; then
        echo "sim-check: no test binary for $name"
        rc=1
        return
    fi
    echo "== $label ($(date -u +%H:%M:%S))"
    env LD_LIBRARY_PATH="$PWD/$SIM${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" GLIMPSE_SIM=1 "$@" \
        timeout "${SIM_TIMEOUT:-1500}" "$bin" --include-ignored >"$LOG/$label.log" 2>&1
    local r=$?
    grep -E "^test result:" "$LOG/$label.log" | sed "s/^/$label: /"
    if grep -q "^SKIP " "$LOG/$label.log"; then
        echo "$label: tests skipped on the simulated device:"
        grep "^SKIP " "$LOG/$label.log" | sort -u
        r=2
    fi
    if [ "$r" -ne 0 ]; then
        echo "$label: FAILED (exit $r); the end of $LOG/$label.log:"
        grep -E "panicked|FAILED|failed|glimpse-sim|ThreadSanitizer" "$LOG/$label.log" | head -40
        rc=1
    fi
}

run gpu_kernels gpu_kernels
run gpu_model gpu_model
run backend_ops backend_ops
run padded_batch padded_batch
run gpu_kernels-random gpu_kernels GLIMPSE_SIM_SCHED=random

if [ "${GLIMPSE_SIM_SKIP_TSAN:-0}" = 1 ]; then
    echo "sim-check: ThreadSanitizer pass left out (GLIMPSE_SIM_SKIP_TSAN=1)"
else
    TSAN_LIB="$(g++ -print-file-name=libtsan.so)"
    if [ ! -f "$TSAN_LIB" ]; then
        echo "sim-check: g++ has no libtsan.so ($TSAN_LIB): install libtsan (Debian: libtsan2) or set GLIMPSE_SIM_SKIP_TSAN=1"
        rc=1
    else
        TSIM="$(GLIMPSE_SIM_TSAN=1 bash scripts/sim-build.sh)" || { echo "sim-check: TSan build failed"; exit 1; }
        SIM="$TSIM" run gpu_kernels-tsan gpu_kernels LD_PRELOAD="$TSAN_LIB" \
            TSAN_OPTIONS="halt_on_error=1 exitcode=66 report_signal_unsafe=0"
    fi
fi
echo "sim-check: $([ $rc -eq 0 ] && echo passed || echo FAILED)"
exit $rc

#!/usr/bin/env bash
# Runs every GPU test on the simulated device (docs/simulated-device.md), no GPU needed:
#
#   bash scripts/sim-check.sh            (from the repository root or anywhere; CI runs it)
#
# 1. builds the simulated driver and kernels (scripts/sim-build.sh) and the test binaries;
# 2. runs gpu_kernels, gpu_model (one test at a time, as on a card: some set GLIMPSE_CUDA_GRAPH),
#    backend_ops and padded_batch with --include-ignored on it, so `--device cuda` /
#    `Device::Cuda` go through the same Rust code (launchers, arena, executor, CUDA graph capture
#    and replay, events) as on a card; a test that prints SKIP fails the run;
# 3. runs gpu_kernels and backend_ops again with a seeded random thread order
#    (GLIMPSE_SIM_SCHED=random; GLIMPSE_SIM_QUICK=1 leaves out gemm's real shapes there);
# 4. runs them once more on kernels built with ThreadSanitizer: threads of a block touching the
#    same location with no barrier between them (a missing __syncthreads) is an error even when
#    the numbers come out right;
# 5. plants the known kernel bugs of scripts/sim-mutants.py and checks each one is caught.
# Exits non-zero on any failure and prints cargo's `test result` lines.
# GLIMPSE_SIM_SKIP_TSAN=1 / GLIMPSE_SIM_SKIP_MUTANTS=1 leave out steps 4 / 5 (say so if you do).
set -uo pipefail
cd "$(dirname "$0")/.."
LOG="${SIM_LOG:-target/sim-check}"
mkdir -p "$LOG"

# The test binaries embed the nvcc-built fatbins as on a card (the simulated driver loads them as
# modules and runs the host builds of their kernels): the same NVCC as the rest of the build.
NVCC="${NVCC:-$(bash scripts/install-nvcc.sh)}"
export NVCC
SIM="$(bash scripts/sim-build.sh)" || { echo "sim-check: building the simulated device failed"; exit 1; }
# SIM_REUSE_BINARIES=1 (the kernel-edit loop) keeps the test binaries already built: the
# simulated device runs the kernels of its own library, so only their embedded fatbins, which it
# does not execute, are stale; the kernel rebuild then takes seconds instead of nvcc's minutes.
if [ "${SIM_REUSE_BINARIES:-0}" != 1 ]; then
    cargo test --release --no-run --test gpu_kernels --test gpu_model --test backend_ops --test padded_batch \
        >"$LOG/build.log" 2>&1 || { tail -50 "$LOG/build.log"; echo "sim-check: cargo build failed"; exit 1; }
fi

# The test binaries cargo just built (the newest of each name).
bin_of() {
    ls -t target/release/deps/"$1"-* 2>/dev/null | grep -v '\.d$' | head -1
}

rc=0
run() {  # label, test binary name, libtest flags (one word), extra env...
    local label=$1 name=$2 flags=$3
    shift 3
    local bin
    bin="$(bin_of "$name")"
    if [ -z "$bin" ]; then
        echo "sim-check: no test binary for $name"
        rc=1
        return
    fi
    echo "== $label ($(date -u +%H:%M:%S))"
    env LD_LIBRARY_PATH="$PWD/$SIM${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$@" \
        timeout "${SIM_TIMEOUT:-1500}" "$bin" --include-ignored $flags >"$LOG/$label.log" 2>&1
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

run gpu_kernels gpu_kernels --test-threads=2
run gpu_model gpu_model --test-threads=1
run backend_ops backend_ops --test-threads=2
run padded_batch padded_batch --test-threads=2
run gpu_kernels-random gpu_kernels --test-threads=2 GLIMPSE_SIM_SCHED=random GLIMPSE_SIM_QUICK=1
run backend_ops-random backend_ops --test-threads=2 GLIMPSE_SIM_SCHED=random

if [ "${GLIMPSE_SIM_SKIP_TSAN:-0}" = 1 ]; then
    echo "sim-check: ThreadSanitizer pass LEFT OUT (GLIMPSE_SIM_SKIP_TSAN=1)"
else
    TSAN_LIB="$(g++ -print-file-name=libtsan.so)"
    if [ ! -f "$TSAN_LIB" ]; then
        echo "sim-check: g++ has no libtsan.so ($TSAN_LIB): install libtsan (Debian: libtsan2) or set GLIMPSE_SIM_SKIP_TSAN=1"
        rc=1
    else
        TSIM="$(GLIMPSE_SIM_TSAN=1 bash scripts/sim-build.sh)" || { echo "sim-check: TSan build failed"; exit 1; }
        # Reports are about the kernels: the Rust test harness and the simulated driver are not
        # instrumented, so their own synchronisation (atomics) is invisible to TSan.
        SUPP="$LOG/tsan.supp"
        {
            echo "called_from_lib:$(basename "$(bin_of gpu_kernels)")"
            echo "called_from_lib:$(basename "$(bin_of backend_ops)")"
            echo "called_from_lib:libcuda.so"
        } >"$SUPP"
        for t in gpu_kernels backend_ops; do
            SIM="$TSIM" run "$t-tsan" "$t" --test-threads=2 GLIMPSE_SIM_QUICK=1 LD_PRELOAD="$TSAN_LIB" \
                TSAN_OPTIONS="halt_on_error=1 exitcode=66 suppressions=$PWD/$SUPP"
        done
    fi
fi

if [ "${GLIMPSE_SIM_SKIP_MUTANTS:-0}" = 1 ]; then
    echo "sim-check: planted-bug check LEFT OUT (GLIMPSE_SIM_SKIP_MUTANTS=1)"
else
    echo "== mutants ($(date -u +%H:%M:%S))"
    if python3 scripts/sim-mutants.py >"$LOG/mutants.log" 2>&1; then
        tail -1 "$LOG/mutants.log"
    else
        echo "mutants: FAILED; the end of $LOG/mutants.log:"
        tail -20 "$LOG/mutants.log"
        rc=1
    fi
fi
echo "sim-check: $([ $rc -eq 0 ] && echo passed || echo FAILED)"
exit $rc

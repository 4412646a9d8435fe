#!/usr/bin/env bash
# Builds the simulated device (docs/simulated-device.md) with the host C++ compiler, no nvcc:
#
#   scripts/sim-build.sh [OUT]          (default OUT: target/sim; GLIMPSE_SIM_TSAN=1: target/sim-tsan)
#
#   OUT/libcuda.so, OUT/libcuda.so.1   the simulated driver (sim/driver.cpp, runtime.cpp, memory.cpp)
#   OUT/libglimpse_sim_kernels.so      kernels/*.cu compiled unchanged as host C++
#
# Put OUT first on LD_LIBRARY_PATH and cudarc loads this libcuda instead of NVIDIA's. Incremental:
# a kernel edit recompiles that kernel file only (seconds); GLIMPSE_SIM_TSAN=1 builds the kernels
# with ThreadSanitizer (run them with LD_PRELOAD of libtsan, as scripts/sim-check.sh does).
set -euo pipefail
cd "$(dirname "$0")/.."

TSAN="${GLIMPSE_SIM_TSAN:-0}"
# Another copy of kernels/ (scripts/sim-mutants.py builds planted bugs this way).
KDIR="${GLIMPSE_SIM_KERNELS_DIR:-kernels}"
SUFFIX=""
[ "$TSAN" = 1 ] && SUFFIX=-tsan
OUT="${1:-target/sim$SUFFIX}"
CXX="${CXX:-g++}"
mkdir -p "$OUT/gen" "$OUT/obj"

COMMON=(-std=c++17 -g -fPIC -Wall -Wno-unused-function -Wno-unused-variable -fno-extern-tls-init -Isim)
# fmaf as one instruction where the CPU has FMA (same results: fmaf is exact either way).
grep -qw fma /proc/cpuinfo 2>/dev/null && COMMON+=(-mfma)
KFLAGS=(-O2 -fno-strict-aliasing -Wno-unknown-pragmas -include sim/glimpse_sim.h -Isim/include -I"$KDIR")
if [ "$TSAN" = 1 ]; then
    KFLAGS+=(-fsanitize=thread)
fi

modules=$(python3 sim/gen_registry.py "$KDIR" "$OUT/gen" "$CXX")

# Rebuilds $2 from $1 when $1 or any shared header is newer.
needs() {
    local src="$1" obj="$2"
    [ ! -f "$obj" ] && return 0
    for dep in "$src" sim/glimpse_sim.h sim/kernel_registry.h sim/sim.h "$KDIR/common.cuh" "$0"; do
        [ "$dep" -nt "$obj" ] && return 0
    done
    return 1
}

objs=()
jobs=()
for m in $modules index; do
    src="$OUT/gen/$m.cpp"
    obj="$OUT/obj/$m.o"
    objs+=("$obj")
    dep_cu="$KDIR/$m.cu"
    if needs "$src" "$obj" || { [ -f "$dep_cu" ] && [ "$dep_cu" -nt "$obj" ]; }; then
        echo "sim-build: compiling kernels/$m" >&2
        "$CXX" "${COMMON[@]}" "${KFLAGS[@]}" -c "$src" -o "$obj" &
        jobs+=($!)
        # Two compilers at a time (the machines have 2 cores).
        if [ "${#jobs[@]}" -ge 2 ]; then
            wait "${jobs[0]}"
            jobs=("${jobs[@]:1}")
        fi
    fi
done
for j in "${jobs[@]}"; do wait "$j"; done

KLIB="$OUT/libglimpse_sim_kernels.so"
relink=0
[ -f "$KLIB" ] || relink=1
for o in "${objs[@]}"; do [ "$o" -nt "$KLIB" ] && relink=1; done
if [ "$relink" = 1 ]; then
    LINK_EXTRA=()
    [ "$TSAN" = 1 ] && LINK_EXTRA+=(-fsanitize=thread)
    "$CXX" -shared -o "$KLIB.tmp" "${objs[@]}" "${LINK_EXTRA[@]}"
    mv "$KLIB.tmp" "$KLIB"
fi

DLIB="$OUT/libcuda.so.1"
rebuild=0
[ -f "$DLIB" ] || rebuild=1
for src in sim/driver.cpp sim/runtime.cpp sim/memory.cpp sim/sim.h sim/glimpse_sim.h sim/kernel_registry.h; do
    [ "$src" -nt "$DLIB" ] && rebuild=1
done
if [ "$rebuild" = 1 ]; then
    echo "sim-build: compiling the simulated driver" >&2
    # No _FORTIFY_SOURCE: the fault handler leaves a fiber's stack with siglongjmp.
    "$CXX" "${COMMON[@]}" -O2 -U_FORTIFY_SOURCE -shared -Wl,-soname,libcuda.so.1 -o "$DLIB.tmp" \
        sim/driver.cpp sim/runtime.cpp sim/memory.cpp -ldl -lpthread
    mv "$DLIB.tmp" "$DLIB"
    ln -sf libcuda.so.1 "$OUT/libcuda.so"
fi
echo "$OUT"

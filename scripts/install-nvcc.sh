#!/usr/bin/env bash
# Install a root-free, GPU-free CUDA 13.0 nvcc from PyPI wheels and print the nvcc path.
#
#   scripts/install-nvcc.sh [DIR]        (default DIR: $HOME/.cache/glimpse-nvcc)
#
# Idempotent: if DIR already holds a working nvcc of the pinned version, nothing is downloaded.
# Pinned to 13.0: the project's GPUs run driver 580 (CUDA 13.0), which cannot JIT PTX emitted by
# a newer nvcc. Host compiler: the system g++ (gcc 12 works; nvcc 13 accepts gcc 6..14).
#
# What the wheels need to run (checked below):
#   - nvcc finds cicc via nvcc.profile: NVVMIR_LIBRARY_DIR / PATH entries point at
#     $(TOP)/nvvm/... where TOP = bin/..; the nvidia-nvvm wheel installs nvvm/ into the same
#     nvidia/cu13 tree, so no symlink is needed as long as both wheels use the same --target.
#   - crt/host_config.h etc. come from nvidia-cuda-crt, cuda_runtime.h from nvidia-cuda-runtime,
#     cuda/std headers (used by cuda_fp16.h) from nvidia-cuda-cccl; all install into
#     nvidia/cu13/include which nvcc.profile adds with -I$(TOP)/include.
# Usage in builds:  export NVCC="$(scripts/install-nvcc.sh)"
set -euo pipefail

DIR="${1:-${HOME}/.cache/glimpse-nvcc}"
NVCC="${DIR}/nvidia/cu13/bin/nvcc"
WANT="13.0"

have_nvcc() {
    [ -x "$NVCC" ] && "$NVCC" --version 2>/dev/null | grep -q "release ${WANT}"
}

if ! have_nvcc; then
    mkdir -p "$DIR"
    PY="${PYTHON:-python3}"
    echo "installing nvcc ${WANT} wheels into ${DIR} ..." >&2
    "$PY" -m pip install --quiet --disable-pip-version-check --no-deps --upgrade --target "$DIR" \
        nvidia-cuda-nvcc==13.0.88 \
        nvidia-cuda-crt==13.0.88 \
        nvidia-cuda-runtime==13.0.96 \
        nvidia-cuda-cccl==13.0.85 \
        nvidia-nvvm==13.0.88 >&2
fi

# Smoke test: compile a tiny kernel to a cubin (exercises cicc, ptxas, host headers, cuda_fp16.h).
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cat > "$tmp/t.cu" <<'CU'
#include <cuda_fp16.h>
extern "C" __global__ void k(__half* x) { x[threadIdx.x] = __float2half(1.0f); }
CU
if ! "$NVCC" -std=c++17 -arch=sm_80 -cubin -o "$tmp/t.cubin" "$tmp/t.cu" >"$tmp/log" 2>&1; then
    echo "nvcc at ${NVCC} is installed but cannot compile a test kernel:" >&2
    cat "$tmp/log" >&2
    exit 1
fi
echo "$NVCC"

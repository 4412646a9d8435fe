#!/usr/bin/env bash
# Builds the release GPU test and bench binaries here (needs cargo + nvcc) and copies them into
# .devbin/ (git-ignored) for scripts/device-check.sh and scripts/device-e2e.sh on the GPU machine
# (no cargo there): gpu_kernels and gpu_model tests, the kernel bench, the glimpse binary.
#   scripts/build-devbin.sh            (archs: GLIMPSE_CUDA_ARCHS, default all)
set -euo pipefail
cd "$(dirname "$0")/.."
export NVCC="${NVCC:-$(scripts/install-nvcc.sh)}"
export GLIMPSE_REQUIRE_CUDA=1
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-1}"
OUTDIR=.devbin
mkdir -p "$OUTDIR"
collect() {  # reads cargo JSON messages, prints executables of the given target names
    python3 -c '
import json, sys
want = set(sys.argv[1:])
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] in want:
        print(m["target"]["name"], m["executable"])
' "$@"
}
cargo test --release --no-run --test gpu_kernels --test gpu_model --message-format=json | collect gpu_kernels gpu_model > "$OUTDIR/.list"
cargo bench --no-run --bench kernels --message-format=json | collect kernels >> "$OUTDIR/.list"
cargo build --release --bin glimpse --message-format=json | collect glimpse >> "$OUTDIR/.list"
while read -r name exe; do
    cp "$exe" "$OUTDIR/$name"
    echo "copied $exe -> $OUTDIR/$name"
done < "$OUTDIR/.list"
rm -f "$OUTDIR/.list"

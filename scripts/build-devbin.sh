#!/usr/bin/env bash
# Builds the release GPU test and bench binaries here (needs cargo + nvcc) and copies them into
# .devbin/ (git-ignored) for scripts/device-check.sh and scripts/device-e2e.sh on the GPU machine
# (no cargo there): gpu_kernels, gpu_model and backend_ops tests, the kernel bench, the glimpse binary.
#   scripts/build-devbin.sh            (archs: GLIMPSE_CUDA_ARCHS, default 90a: the lent H100/H200)
# The device tool carries at most 64 MiB with the working tree, so the binaries are built for the
# one arch the device needs and stripped (all four archs would be ~80 MB even stripped).
set -euo pipefail
cd "$(dirname "$0")/.."
export NVCC="${NVCC:-$(scripts/install-nvcc.sh)}"
export GLIMPSE_REQUIRE_CUDA=1
export GLIMPSE_CUDA_ARCHS="${GLIMPSE_CUDA_ARCHS:-90a}"
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-1}"
OUTDIR=.devbin
mkdir -p "$OUTDIR"
# Re-run build.rs even if cargo believes an earlier (kernel-less) run is fresh.
touch build.rs
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
cargo test --release --no-run --test gpu_kernels --test gpu_model --test backend_ops --message-format=json | collect gpu_kernels gpu_model backend_ops > "$OUTDIR/.list"
cargo bench --no-run --bench kernels --message-format=json | collect kernels >> "$OUTDIR/.list"
cargo build --release --bin glimpse --message-format=json | collect glimpse >> "$OUTDIR/.list"
while read -r name exe; do
    strip -o "$OUTDIR/$name" "$exe"
    echo "copied $exe -> $OUTDIR/$name"
done < "$OUTDIR/.list"
rm -f "$OUTDIR/.list"
git rev-parse --short=12 HEAD > "$OUTDIR/COMMIT" 2>/dev/null || true
# The binaries must embed the kernels, or the GPU run would only print SKIP lines.
if ! "$OUTDIR/glimpse" --version | grep -q "CUDA kernels:"; then
    echo "error: $OUTDIR/glimpse was built without CUDA kernels: $("$OUTDIR/glimpse" --version)" >&2
    exit 1
fi
"$OUTDIR/glimpse" --version
size_mb=$(du -sm "$OUTDIR" | cut -f1)
echo "$OUTDIR: ${size_mb} MB (the device tool carries 64 MiB including the working tree)"
if [ "$size_mb" -gt 48 ]; then
    echo "error: $OUTDIR is too large to carry" >&2
    exit 1
fi

#!/usr/bin/env python3
"""Plants known kernel bugs and checks that the simulated device catches every one.

    python3 scripts/sim-mutants.py [--list] [NAME ...]

Each mutant is one textual change to a copy of kernels/ (the real files are never touched),
built with scripts/sim-build.sh into target/sim-mutants/, then the GPU kernel tests that cover the
changed code run on it (the ThreadSanitizer build for races that give right numbers by luck).
A mutant is caught when those tests fail (a wrong result, a simulator error or a TSan report);
the script exits non-zero if any mutant survives or if the unchanged kernels fail. Needs the
gpu_kernels test binary (scripts/sim-check.sh builds it).
"""
import glob
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (file, old text, new text, test filter, "sim" | "tsan", what the bug is)
MUTANTS = {
    "attention-missing-barrier": (
        "attention.cu",
        "        __syncthreads();\n\n        const int j = kv0 + lane;",
        "\n        const int j = kv0 + lane;",
        "attention_matches_reference", "sim",
        "no __syncthreads between staging a K/V tile and reading it"),
    "decode-merge-missing-barrier": (
        "attention.cu",
        "    for (int e = 0; e < E; ++e) wo[warp][lane + 32 * e] = o[e];\n    __syncthreads();",
        "    for (int e = 0; e < E; ++e) wo[warp][lane + 32 * e] = o[e];",
        "decode_attention_matches_reference", "sim",
        "split-KV decode merges the warps' partials without a barrier"),
    "attention-per-query-mask-shared": (
        "attention.cu",
        "b * p.mask_stride + i * p.mask_qstride + j",
        "b * p.mask_stride + j",
        "attention_matches_reference", "sim",
        "IDEFICS' per-query image mask read as one row per batch item (every query sees query 0's image)"),
    "gated-add-ignores-mask": (
        "pointwise.cu",
        "            if (!__any_sync(0xffffffffu, visible)) continue;",
        "            (void)__any_sync(0xffffffffu, visible);",
        "gated_add_matches_reference", "sim",
        "the gated residual adds the cross-attention output to rows that see no image"),
    "vit-embed-classless-offset": (
        "elementwise.cu",
        "patches[((size_t)b * P + t - C) * D + i]",
        "patches[((size_t)b * P + t - 1) * D + i]",
        "elementwise_matches_reference", "sim",
        "SigLIP's class-free embedding reads the patch one row back (the class-token offset hard-coded)"),
    "block-sum-missing-barrier": (
        "common.cuh",
        "    __syncthreads();  // protect scratch from a previous call still being read",
        "",
        "norms_match_reference", "tsan",
        "block_sum reuses its scratch without waiting for the previous call's readers (right numbers, a race)"),
    "gemm-cp-async-read-early": (
        "gemm.cu",
        "        cp_async_wait<C::STAGES - 2>();",
        "        cp_async_wait<C::STAGES - 1>();",
        "gemm_matches_reference", "sim",
        "the pipeline waits one cp.async group short: a stage is read before it lands"),
    "gemm-ldmatrix-a-offset": (
        "gemm.cu",
        "                const int r = wm * C::WTM + i * 16 + (lane & 15);",
        "                const int r = wm * C::WTM + i * 16 + (lane & 7);",
        "gemm_matches_reference", "sim",
        "A fragments loaded from the wrong rows (ldmatrix address)"),
    "gemm-b-fragment-order": (
        "gemm.cu",
        "                bf[2 * j][1] = t[1];\n                bf[2 * j + 1][0] = t[2];",
        "                bf[2 * j][1] = t[2];\n                bf[2 * j + 1][0] = t[1];",
        "gemm_matches_reference", "sim",
        "B fragment registers swapped between the two n8 tiles"),
    "layernorm-one-past-the-end": (
        "layernorm.cu",
        "    for (int i = threadIdx.x; i < p.dim; i += blockDim.x) {\n        float v = (load_sum(p, base, i, false) - mean) * rstd * __half2float(p.w[i]);",
        "    for (int i = threadIdx.x; i <= p.dim; i += blockDim.x) {\n        float v = (load_sum(p, base, i, false) - mean) * rstd * __half2float(p.w[i]);",
        "norms_match_reference", "sim",
        "the output loop writes one element past each row (past the buffer on the last row)"),
    "warp-sum-wrong-mask": (
        "common.cuh",
        "    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);",
        "    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0x0000ffffu, v, o);",
        "norms_match_reference", "sim",
        "warp_sum's shuffle mask leaves out lanes 16-31, which execute it"),
    "ballot-wrong-mask": (
        "elementwise.cu",
        "        const unsigned mask = __ballot_sync(0xffffffffu, is_img);",
        "        const unsigned mask = __ballot_sync(0x7fffffffu, is_img);",
        "elementwise_matches_reference", "sim",
        "image_scatter's ballot mask leaves out lane 31"),
    "gemv-partial-row-reduction": (
        "gemv.cu",
        "        for (int w = 0; w < nw; ++w) {",
        "        for (int w = 0; w + 1 < nw; ++w) {",
        "gemv_matches_reference", "sim",
        "gemv sums one warp too few of a row's partials"),
    "argmax-tie-break": (
        "sampling.cu",
        "    return va > vb || (va == vb && ia < ib);",
        "    return va > vb || (va == vb && ia > ib);",
        "argmax_matches_reference", "sim",
        "argmax ties go to the highest index (torch takes the lowest)"),
    "rope-sin-sign": (
        "pointwise.cu",
        "        head[j] = __float2half_rn(ac - bs);",
        "        head[j] = __float2half_rn(ac + bs);",
        "", "model",
        "RoPE rotates the wrong way (gpu_kernels has no RoPE case: backend_ops covers it)"),
}


def run(cmd, env=None, timeout=None, log=None):
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout, capture_output=True, text=True)
        out, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = (e.stdout or b"").decode() + (e.stderr or b"").decode() + "\nTIMED OUT", 124
    if log:
        with open(log, "w") as f:
            f.write(out)
    return rc, out, time.time() - t0


def newest(pattern):
    files = [f for f in glob.glob(os.path.join(ROOT, "target/release/deps", pattern)) if not f.endswith(".d")]
    return max(files, key=os.path.getmtime) if files else None


def main():
    args = sys.argv[1:]
    if args and args[0] == "--list":
        for name, m in MUTANTS.items():
            print(f"{name:32} {m[0]:16} {m[5]}")
        return 0
    chosen = args or list(MUTANTS)
    unknown = [n for n in chosen if n not in MUTANTS]
    if unknown:
        sys.exit(f"unknown mutant(s) {unknown}; --list shows them")
    binaries = {"sim": newest("gpu_kernels-*"), "tsan": newest("gpu_kernels-*"), "model": newest("backend_ops-*")}
    if not binaries["sim"] or not binaries["model"]:
        sys.exit("build the GPU test binaries first (bash scripts/sim-check.sh, or cargo test --release --no-run)")
    work = os.path.join(ROOT, "target/sim-mutants")
    kdir = os.path.join(work, "kernels")
    os.makedirs(work, exist_ok=True)
    tsan_lib = subprocess.run(["g++", "-print-file-name=libtsan.so"], capture_output=True, text=True).stdout.strip()

    def build_and_test(mode, test, label):
        out_dir = os.path.join(work, "sim-tsan" if mode == "tsan" else "sim")
        env = dict(os.environ, GLIMPSE_SIM_KERNELS_DIR=kdir, GLIMPSE_SIM_TSAN="1" if mode == "tsan" else "0")
        rc, out, _ = run(["bash", "scripts/sim-build.sh", out_dir], env=env, log=os.path.join(work, f"{label}.build.log"))
        if rc != 0:
            return "build failed", out
        # One fixed seed for every baseline and mutant: each mutant meets the data its baseline
        # passed on (the first sim-check passes keep fresh random data).
        env = dict(os.environ, LD_LIBRARY_PATH=out_dir, GLIMPSE_SIM_QUICK="1")
        env.setdefault("GLIMPSE_TEST_SEED", "20261207")
        if mode == "tsan":
            supp = os.path.join(work, "tsan.supp")
            with open(supp, "w") as f:
                f.write(f"called_from_lib:{os.path.basename(binaries['tsan'])}\ncalled_from_lib:libcuda.so\n")
            env.update(LD_PRELOAD=tsan_lib, TSAN_OPTIONS=f"halt_on_error=1 exitcode=66 suppressions={supp}")
        cmd = [binaries[mode], "--include-ignored", "--test-threads=1"] + ([test] if test else [])
        rc, out, secs = run(cmd, env=env, timeout=900, log=os.path.join(work, f"{label}.log"))
        if "SKIP " in out:
            return "skipped", out
        return ("passed" if rc == 0 else f"failed (exit {rc})") + f", {secs:.0f} s", out

    # A copy of kernels/ that each mutant changes and then restores (the build is incremental:
    # only the mutated file recompiles, twice).
    shutil.rmtree(kdir, ignore_errors=True)
    shutil.copytree(os.path.join(ROOT, "kernels"), kdir, copy_function=shutil.copyfile)
    rows, survived, baselines = [], 0, {}
    for name in chosen:
        file, old, new, test, mode, what = MUTANTS[name]
        # The unchanged kernels must pass the same tests first, or a "caught" means nothing.
        if (mode, test) not in baselines:
            baselines[(mode, test)] = build_and_test(mode, test, f"{name}.baseline")[0]
        base_status = baselines[(mode, test)]
        if not base_status.startswith("passed"):
            rows.append((name, f"BASELINE {base_status}", ""))
            survived += 1
            continue
        path = os.path.join(kdir, file)
        text = open(path).read()
        if text.count(old) != 1:
            rows.append((name, "MUTATION DOES NOT APPLY (kernel text changed: update scripts/sim-mutants.py)", ""))
            survived += 1
            continue
        with open(path, "w") as f:
            f.write(text.replace(old, new))
        try:
            status, out = build_and_test(mode, test, name)
        finally:
            with open(path, "w") as f:  # restored, with a new mtime: the next build recompiles it
                f.write(text)
        caught = status.startswith("failed")
        survived += not caught
        evidence = ""
        for line in out.splitlines():
            if "glimpse-sim:" in line or "ThreadSanitizer:" in line or "panicked" in line or "SUMMARY" in line:
                evidence = line.strip()[:160]
                break
        rows.append((name, ("caught: " if caught else "SURVIVED: ") + status, evidence))
        print(f"{name}: {rows[-1][1]}  {evidence}", flush=True)
    print()
    print("| mutant | result | first sign |")
    print("|---|---|---|")
    for name, status, ev in rows:
        print(f"| {name} | {status} | {ev.replace('|', '/')} |")
    print(f"\n{len(rows) - survived} of {len(rows)} mutants caught")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())

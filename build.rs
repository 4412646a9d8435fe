//! Build script: compiles `kernels/*.cu` with nvcc into fatbins in `$OUT_DIR` and writes
//! `$OUT_DIR/kernels.rs`, which `src/backend/cuda` includes.
//!
//! - nvcc is looked up in `$NVCC`, `$CUDA_HOME/bin/nvcc`, then `PATH`
//!   (`scripts/install-nvcc.sh` installs a root-free CUDA 13.0 nvcc from PyPI).
//! - Targets: cubins for sm_80, sm_86, sm_89, sm_90a plus compute_80 PTX. `GLIMPSE_CUDA_ARCHS`
//!   overrides the cubin list ("90a", "80,90a", "sm_86"); PTX is then emitted for the lowest
//!   listed arch without its `a` suffix (arch-specific `a` PTX is not forward compatible).
//! - ptxas runs with `-v`; its resource report (registers, smem, spills per kernel and arch) is
//!   printed to this script's stdout (kept by cargo in `target/.../build/glimpse-*/output`, shown
//!   with `cargo build -vv`) and written to `$OUT_DIR/<name>.ptxas.log`.
//! - The build FAILS on any nvcc error and on any register spill (`N bytes spill stores/loads`
//!   with N != 0): a spilling kernel is a performance bug we want to see immediately.
//! - Without nvcc the crate still builds: `KERNELS_AVAILABLE = false`, an empty registry and one
//!   `cargo:warning`. `GLIMPSE_REQUIRE_CUDA=1` makes a missing nvcc a build error (CI).
//! - Everything is written inside `$OUT_DIR`.
//! - `GLIMPSE_BUILD_COMMIT` (read with `env!`) is the commit of this source tree:
//!   `git rev-parse --short=12 HEAD`, with `-dirty` when `git status --porcelain
//!   --untracked-files=no` lists changes, else `unknown` (no git, or not a repository). The script
//!   reruns when HEAD, the branch ref, packed-refs or the index change (a commit, checkout or
//!   `git add`); edits to files that were not staged since the last run are not seen.
//! - Files are compiled one after another: the dev machine is small and shared, and nvcc already
//!   spends most of its time in ptxas per arch.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// `--use_fast_math` policy per kernel file (why, in one line each). Off by default.
///
/// fast math = `-ftz=true -prec-div=false -prec-sqrt=false -fmad=true` + intrinsic exp/log/sin.
/// fp32 denormals are far below the fp16 range (so ftz cannot change an fp16 result) and the
/// approximate div/sqrt/exp are a few fp32 ulp, ~2^13 times finer than one fp16 ulp; it is only
/// kept off where a result is returned in fp32 or where a reference-exact activation matters.
const FAST_MATH: &[(&str, bool)] = &[
    // softmax uses exp2f of max-subtracted (<= 0) arguments, as flash-attention does; the output
    // is fp16, and the approximate reciprocal of the row sum is 1-2 fp32 ulp.
    ("attention", true),
    // only adds, multiplies, casts: fast math changes nothing observable in fp16.
    ("elementwise", true),
    // rsqrt/div approximations are <= 2 fp32 ulp; output is fp16.
    ("layernorm", true),
    // epilogues: erf-GELU must match PyTorch's erff; quick_gelu/SiLU use expf -> keep exact.
    ("gemm", false),
    ("gemv", false),
    // rope needs accurate sinf/cosf of angles up to position * inv_freq (thousands of rad).
    ("pointwise", false),
    // log-softmax value of the chosen token is returned in fp32 to the host: keep expf/logf exact.
    ("sampling", false),
    // integer copies only.
    ("reorder", true),
    // the probe of the PTX wrappers (tests only): no arithmetic outside mma.sync.
    ("ptx_probe", false),
];

const DEFAULT_ARCHS: &[&str] = &["80", "86", "89", "90a"];

fn main() {
    embed_commit();
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-changed=build.rs");
    for var in ["NVCC", "CUDA_HOME", "GLIMPSE_CUDA_ARCHS", "PATH", "GLIMPSE_REQUIRE_CUDA"] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let kernel_dir = manifest_dir.join("kernels");
    let require = env::var("GLIMPSE_REQUIRE_CUDA").map(|v| v == "1").unwrap_or(false);

    let nvcc = match find_nvcc() {
        Ok(p) => p,
        Err(why) => {
            if require {
                panic!("GLIMPSE_REQUIRE_CUDA=1 but {why}");
            }
            println!(
                "cargo:warning=glimpse: CUDA kernels were not built ({why}); the CUDA backend \
                 will report NotBuilt. Run scripts/install-nvcc.sh and set NVCC to build them."
            );
            write_registry(&out_dir, &[], false, "");
            return;
        }
    };

    let archs = parse_archs();
    let mut sources: Vec<PathBuf> = fs::read_dir(&kernel_dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == "cu")).collect()
        })
        .unwrap_or_default();
    sources.sort();

    let mut built = Vec::new();
    let mut problems = Vec::new();
    for src in &sources {
        let name = src.file_stem().unwrap().to_string_lossy().to_string();
        let fatbin = out_dir.join(format!("{name}.fatbin"));
        let fast = FAST_MATH.iter().find(|(n, _)| *n == name).map(|(_, f)| *f).unwrap_or(false);
        let mut cmd = Command::new(&nvcc);
        cmd.arg("-fatbin")
            .arg("-O3")
            .arg("-std=c++17")
            .arg("-Xptxas")
            .arg("-v")
            .arg("-lineinfo")
            .arg("-I")
            .arg(&kernel_dir)
            .arg("-o")
            .arg(&fatbin);
        if fast {
            cmd.arg("--use_fast_math");
        }
        for a in &archs.cubins {
            let compute = format!("compute_{a}");
            cmd.arg("-gencode").arg(format!("arch={compute},code=sm_{a}"));
        }
        if let Some(p) = &archs.ptx {
            cmd.arg("-gencode").arg(format!("arch=compute_{p},code=compute_{p}"));
        }
        cmd.arg(src);
        let output = match cmd.output() {
            Ok(o) => o,
            Err(e) => panic!("failed to run {}: {e}", nvcc.display()),
        };
        let log = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        let _ = fs::write(out_dir.join(format!("{name}.ptxas.log")), &log);
        println!("=== nvcc {name}.cu (fast_math={fast}) ===");
        for line in log.lines() {
            println!("{line}");
        }
        if !output.status.success() {
            panic!("nvcc failed on kernels/{name}.cu:\n{log}");
        }
        let spills = find_spills(&log);
        if !spills.is_empty() {
            problems.push(format!("kernels/{name}.cu spills registers:\n  {}", spills.join("\n  ")));
        }
        for line in log.lines().filter(|l| l.contains("warning")) {
            println!("cargo:warning=glimpse {name}.cu: {line}");
        }
        built.push((name, fatbin));
    }
    if !problems.is_empty() {
        panic!("register spills are build errors:\n{}", problems.join("\n"));
    }
    let arch_desc = format!(
        "cubin sm_{}{}",
        archs.cubins.join(",sm_"),
        archs.ptx.as_ref().map(|p| format!(" + PTX compute_{p}")).unwrap_or_default()
    );
    write_registry(&out_dir, &built, true, &arch_desc);
}

/// Sets `GLIMPSE_BUILD_COMMIT` for the crate (see the header) and watches the git files whose
/// change means another commit or another staged state.
fn embed_commit() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let git = |args: &[&str]| -> Option<String> {
        let out = Command::new("git").args(args).current_dir(&manifest_dir).output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let commit = match git(&["rev-parse", "--short=12", "HEAD"]) {
        Some(head) if !head.is_empty() => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{head}-dirty")
            } else {
                head
            }
        }
        _ => "unknown".to_string(),
    };
    println!("cargo:rustc-env=GLIMPSE_BUILD_COMMIT={commit}");
    // --git-path resolves worktrees (HEAD per worktree, refs in the common dir).
    let mut watch = vec!["HEAD".to_string(), "packed-refs".to_string(), "index".to_string()];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watch.push(branch);
    }
    for name in watch {
        // A watched path that does not exist would rerun this script (and nvcc) on every build.
        if let Some(path) =
            git(&["rev-parse", "--git-path", &name]).map(|p| manifest_dir.join(p)).filter(|p| p.exists())
        {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
}

struct Archs {
    cubins: Vec<String>,
    ptx: Option<String>,
}

fn parse_archs() -> Archs {
    let list: Vec<String> = match env::var("GLIMPSE_CUDA_ARCHS") {
        Ok(s) if !s.trim().is_empty() => s
            .split(|c: char| c == ',' || c == ';' || c.is_whitespace())
            .map(|t| t.trim().trim_start_matches("sm_").trim_start_matches("compute_").to_string())
            .filter(|t| !t.is_empty())
            .collect(),
        _ => DEFAULT_ARCHS.iter().map(|s| s.to_string()).collect(),
    };
    for a in &list {
        let digits = a.trim_end_matches(['a', 'f']);
        if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) {
            panic!("GLIMPSE_CUDA_ARCHS: cannot parse arch {a:?} (expected e.g. \"80,90a\")");
        }
        if digits.parse::<u32>().unwrap() < 80 {
            panic!("GLIMPSE_CUDA_ARCHS: sm_{a} is unsupported (kernels need sm_80+: cp.async, bf16 mma)");
        }
    }
    let ptx = list.iter().map(|a| a.trim_end_matches(['a', 'f']).to_string()).min_by_key(|a| a.parse::<u32>().unwrap());
    Archs { cubins: list, ptx }
}

fn find_nvcc() -> Result<PathBuf, String> {
    if let Ok(p) = env::var("NVCC") {
        let p = PathBuf::from(p);
        return if is_exe(&p) { Ok(p) } else { Err(format!("NVCC={} is not an executable file", p.display())) };
    }
    if let Ok(home) = env::var("CUDA_HOME") {
        let p = Path::new(&home).join("bin").join("nvcc");
        if is_exe(&p) {
            return Ok(p);
        }
    }
    if let Some(paths) = env::var_os("PATH") {
        for dir in env::split_paths(&paths) {
            let p = dir.join("nvcc");
            if is_exe(&p) {
                return Ok(p);
            }
        }
    }
    Err("no nvcc found in $NVCC, $CUDA_HOME/bin or PATH".to_string())
}

fn is_exe(p: &Path) -> bool {
    p.is_file()
}

/// Returns one line per (kernel, arch) whose ptxas report shows a non-zero spill.
fn find_spills(log: &str) -> Vec<String> {
    let mut current = String::new();
    let mut out = Vec::new();
    for line in log.lines() {
        if let Some(pos) = line.find("Compiling entry function '") {
            current = line[pos + "Compiling entry function ".len()..].to_string();
        } else if line.contains("Function properties for") {
            // device functions (non-entry) report under this header too
            if let Some(pos) = line.find("Function properties for ") {
                let f = &line[pos + "Function properties for ".len()..];
                if !current.contains(f) {
                    current = f.to_string();
                }
            }
        }
        if line.contains("bytes spill stores") {
            let nums: Vec<u64> = line
                .split(',')
                .filter(|part| part.contains("spill"))
                .filter_map(|part| part.split_whitespace().next()?.parse().ok())
                .collect();
            if nums.iter().any(|&n| n != 0) {
                out.push(format!("{current}: {}", line.trim()));
            }
        }
    }
    out
}

fn write_registry(out_dir: &Path, built: &[(String, PathBuf)], available: bool, archs: &str) {
    let mut s = String::new();
    s.push_str("// @generated by build.rs: embedded CUDA fatbins, one per kernels/*.cu.\n");
    let _ = writeln!(s, "/// True when nvcc was found and every kernel file compiled.");
    let _ = writeln!(s, "pub const KERNELS_AVAILABLE: bool = {available};");
    let _ = writeln!(s, "/// Targets compiled into each fatbin.");
    let _ = writeln!(s, "pub const KERNEL_ARCHS: &str = {archs:?};");
    let _ = writeln!(s, "/// (module name = file stem, fatbin bytes).");
    s.push_str("pub static FATBINS: &[(&str, &[u8])] = &[\n");
    for (name, path) in built {
        let _ = writeln!(s, "    ({name:?}, include_bytes!({:?})),", path.display().to_string());
    }
    s.push_str("];\n");
    fs::write(out_dir.join("kernels.rs"), s).expect("write kernels.rs");
}

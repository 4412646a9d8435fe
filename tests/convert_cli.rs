//! `glimpse convert` data safety: it never writes over the checkpoint it reads, a failed write
//! leaves no partial file (and a retry completes the folder), write errors are not called
//! malformed safetensors, and hub ids resolve from the cache without writing into it.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn glimpse(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_glimpse")).args(args).env("RUST_BACKTRACE", "1").output().expect("run glimpse")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Exits non-zero with exactly one `error: ...` line containing `needle`, and no panic.
fn assert_clean_error(o: &Output, needle: &str) {
    let err = stderr(o);
    assert!(!o.status.success(), "expected failure, got success: {}", String::from_utf8_lossy(&o.stdout));
    assert!(!err.contains("panicked") && !err.contains("malformed safetensors"), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected: {err}");
    assert!(lines[0].starts_with("error: ") && lines[0].contains(needle), "{err}");
}

/// Every file under `dir` (recursively) with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            out.extend(snapshot(&p));
        } else {
            out.insert(p.clone(), std::fs::read(&p).unwrap());
        }
    }
    out
}

/// The sharded fp32 fixture copied into a fresh temp dir: (temp dir, the copy).
fn sharded_copy() -> (tempfile::TempDir, PathBuf) {
    let src = common::model_dir("blip2-opt-tiny-proj");
    let ckpt = glimpse::weights::Checkpoint::open_dir(&src).unwrap();
    assert!(ckpt.origin().ends_with("model.safetensors.index.json"), "the fixture is sharded");
    assert_eq!(ckpt.info("language_model.lm_head.weight").unwrap().dtype.name(), "F32", "the fixture is fp32");
    let tmp = common::tempdir();
    let copy = tmp.path().join("model");
    std::fs::create_dir(&copy).unwrap();
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), copy.join(f.file_name())).unwrap();
    }
    (tmp, copy)
}

/// No `.NAME.glimpse-tmp-PID` file is left in `dir`.
fn assert_no_temp_files(dir: &Path) {
    let left: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("glimpse-tmp"))
        .collect();
    assert!(left.is_empty(), "temp files left in {}: {left:?}", dir.display());
}

#[test]
fn convert_refuses_an_output_that_overlaps_the_input() {
    let (tmp, model) = sharded_copy();
    let before = snapshot(tmp.path());
    let model_before = snapshot(&model);
    let m = model.display().to_string();
    for (output, relation) in [
        (m.clone(), "is the input folder"),
        (format!("{m}/"), "is the input folder"),
        (format!("{m}/../model"), "is the input folder"),
        (format!("{m}/fp16"), "is inside the input folder"),
        (format!("{m}/new/../deeper/fp16"), "is inside the input folder"),
        (tmp.path().display().to_string(), "contains the input folder"),
    ] {
        let o = glimpse(&["convert", &m, &output]);
        assert_clean_error(&o, relation);
        assert!(stderr(&o).contains("pick another output folder"), "{}", stderr(&o));
        assert_eq!(snapshot(tmp.path()), before, "convert {m} {output} changed files");
    }
    // Through a symlink to the input: the same folder once resolved.
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(&model, &link).unwrap();
    assert_clean_error(
        &glimpse(&["convert", &m, &link.join("fp16").display().to_string()]),
        "is inside the input folder",
    );
    assert_eq!(snapshot(&model), model_before);
}

/// A target that cannot be written (a directory where config.json goes): an error naming it,
/// no partial file, and a retry once it is fixed writes the whole folder.
#[test]
fn convert_write_failure_leaves_no_partial_file_and_a_retry_works() {
    let (tmp, model) = sharded_copy();
    let out = tmp.path().join("fp16");
    std::fs::create_dir_all(out.join("config.json")).unwrap();
    let o = glimpse(&["convert", &model.display().to_string(), &out.display().to_string()]);
    assert_clean_error(&o, &out.join("config.json").display().to_string());
    assert!(!out.join("model.safetensors").exists(), "no checkpoint after a failed run");
    assert_no_temp_files(&out);
    std::fs::remove_dir(out.join("config.json")).unwrap();
    let retry = glimpse(&["convert", &model.display().to_string(), &out.display().to_string()]);
    assert!(retry.status.success(), "{}", stderr(&retry));
    assert_eq!(std::fs::read(out.join("config.json")).unwrap(), std::fs::read(model.join("config.json")).unwrap());
    glimpse::weights::Checkpoint::open_dir(&out).unwrap();
}

/// A full disk, simulated with a file-size limit (`ulimit -f`, SIGXFSZ ignored so the write fails
/// with EFBIG): the error names model.safetensors as an I/O failure, nothing partial is left.
#[test]
fn convert_out_of_space_is_an_io_error_without_partial_file() {
    let (tmp, model) = sharded_copy();
    let out = tmp.path().join("fp16");
    let o = Command::new("sh")
        .args(["-c", "trap '' XFSZ; ulimit -f 200 && exec \"$0\" convert \"$1\" \"$2\"", env!("CARGO_BIN_EXE_glimpse")])
        .arg(&model)
        .arg(&out)
        .output()
        .expect("sh");
    assert_clean_error(&o, &out.join("model.safetensors").display().to_string());
    assert!(stderr(&o).contains("File too large"), "{}", stderr(&o));
    assert!(!out.join("model.safetensors").exists());
    assert_no_temp_files(&out);
    let retry = glimpse(&["convert", &model.display().to_string(), &out.display().to_string()]);
    assert!(retry.status.success(), "{}", stderr(&retry));
}

#[test]
fn convert_into_a_read_only_folder_fails_cleanly() {
    let (tmp, model) = sharded_copy();
    let out = tmp.path().join("ro");
    std::fs::create_dir(&out).unwrap();
    let mut perms = std::fs::metadata(&out).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o555);
    std::fs::set_permissions(&out, perms).unwrap();
    if std::fs::write(out.join("probe"), b"").is_ok() {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIP convert_into_a_read_only_folder_fails_cleanly: permissions are not enforced (root)"
        );
        return;
    }
    let o = glimpse(&["convert", &model.display().to_string(), &out.display().to_string()]);
    assert_clean_error(&o, "Permission denied");
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0, "nothing written");
}

/// A hub id resolves from the cache as `caption` does; the output may not be inside the cache.
#[test]
fn convert_takes_hub_ids_and_never_writes_into_the_cache() {
    let cache = common::tempdir();
    let repo = cache.path().join("models--tiny--blip2-proj");
    let snap = repo.join("snapshots/0123abcd0123abcd0123abcd0123abcd0123abcd");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd0123abcd0123abcd0123abcd0123abcd").unwrap();
    for f in std::fs::read_dir(common::model_dir("blip2-opt-tiny-proj")).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), snap.join(f.file_name())).unwrap();
    }
    let before = snapshot(cache.path());
    let convert = |output: &Path| {
        Command::new(env!("CARGO_BIN_EXE_glimpse"))
            .args(["convert", "tiny/blip2-proj"])
            .arg(output)
            .env("HF_HUB_CACHE", cache.path())
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap()
    };
    for inside in [repo.join("fp16"), cache.path().join("fp16")] {
        assert_clean_error(&convert(&inside), "inside the Hugging Face cache");
        assert_eq!(snapshot(cache.path()), before);
    }
    let out = common::tempdir();
    let o = convert(&out.path().join("fp16"));
    assert!(o.status.success(), "{}", stderr(&o));
    glimpse::weights::Checkpoint::open_dir(&out.path().join("fp16")).unwrap();
    assert_eq!(snapshot(cache.path()), before);
}

//! `glimpse bench` on the CPU with the tiny preset: every stage reported with positive numbers
//! (speeds are not asserted), and a clear one-line error for `--device cuda` without a GPU.

use std::process::{Command, Output};

fn glimpse(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_glimpse")).args(args).env("RUST_BACKTRACE", "1").output().expect("run glimpse")
}

#[test]
fn bench_tiny_cpu_json_has_every_stage() {
    let o = glimpse(&["bench", "--preset", "tiny", "--device", "cpu", "--repeats", "1", "--new-tokens", "3", "--json"]);
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "bench failed: {err}");
    let v: serde_json::Value =
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("not one JSON object ({e}): {out}"));
    assert_eq!(v["device"], "cpu");
    assert_eq!(v["preset"], "tiny");
    assert_eq!(v["new_tokens"], 3);
    assert!(v["date"].as_str().is_some_and(|d| d.ends_with('Z')));
    assert!(v["rates"]["copy_gbs"].as_f64().unwrap() > 0.0);
    assert!(v["rates"]["matrix_gflops"].as_f64().unwrap() > 0.0);
    let stages = v["stages"].as_array().unwrap();
    let names: Vec<&str> = stages.iter().map(|s| s["stage"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "vision",
            "qformer",
            "prefill",
            "prefill_vqa",
            "decode",
            "decode_sampled",
            "first_token",
            "caption",
            "caption_beam5"
        ]
    );
    for s in stages {
        for key in ["median_ms", "min_ms", "floor_ms", "memory_floor_ms", "bytes", "flops", "fraction_of_floor"] {
            let x = s[key].as_f64().unwrap_or_else(|| panic!("{} has no {key}: {s}", s["stage"]));
            assert!(x.is_finite() && x > 0.0, "{}.{key} = {x}", s["stage"]);
        }
    }
    assert_eq!(v["prefill"].as_object(), None);
    assert_eq!(v["caption_prompt_tokens"], 33);
    assert_eq!(v["vqa_prompt_tokens"], 41);
    let thr = v["throughput"].as_array().unwrap();
    assert_eq!(thr.iter().map(|t| t["batch"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 8, 32]);
    for t in thr {
        match t["images_per_s"].as_f64() {
            Some(ips) => assert!(ips > 0.0 && t["caption_ms"].as_f64().unwrap() > 0.0),
            None => assert!(t["skipped"].as_str().is_some_and(|s| !s.is_empty()), "{t}"),
        }
    }
}

#[test]
fn bench_table_names_device_and_stages() {
    let o =
        glimpse(&["bench", "--device", "cpu", "--repeats", "1", "--new-tokens", "2", "--throughput-batches", "1,2"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.starts_with("glimpse bench"), "{out}");
    assert!(out.contains("preset tiny"), "the CPU default is the tiny preset: {out}");
    assert!(out.contains("\n2      "), "throughput row for batch 2: {out}");
    for stage in ["vision", "qformer", "prefill", "decode", "decode_sampled", "first_token", "caption", "% of floor"] {
        assert!(out.contains(stage), "{stage} missing: {out}");
    }
}

#[test]
fn bench_cuda_without_gpu_is_one_clear_error() {
    if glimpse::backend::cuda_unavailable_reason().is_none() {
        eprintln!("skipped: a usable GPU is present");
        return;
    }
    let o = glimpse(&["bench", "--preset", "tiny", "--device", "cuda", "--repeats", "1", "--new-tokens", "2"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(!err.contains("panicked"), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].starts_with("error: --device cuda: "), "{err}");
}

#[test]
fn bench_rejects_bad_arguments() {
    for (args, needle) in [
        (&["bench", "--preset", "huge", "--device", "cpu"][..], "unknown preset"),
        (&["bench", "--preset", "tiny", "--device", "cpu", "--new-tokens", "1"][..], "--new-tokens"),
        (&["bench", "--preset", "tiny", "--device", "tpu"][..], "unknown device"),
        (
            &["bench", "--preset", "tiny", "--device", "cpu", "--repeats", "0"][..],
            "--repeats 0: each stage needs at least 1 timed run",
        ),
        (
            &["bench", "--preset", "tiny", "--device", "cpu", "--throughput-batches", "1,0"][..],
            "--throughput-batches 1,0: batch sizes must be at least 1",
        ),
        // Absurd batch sizes are refused with their bound (they used to panic or abort).
        (
            &["bench", "--preset", "tiny", "--device", "cpu", "--batch", "18446744073709551615"][..],
            "--batch 18446744073709551615 is out of range: it must be 1 to 1024",
        ),
        (
            &["bench", "--preset", "tiny", "--device", "cpu", "--batch", "1000000000"][..],
            "--batch 1000000000 is out of range",
        ),
        (
            &["bench", "--preset", "tiny", "--device", "cpu", "--throughput-batches", "1,1000000000"][..],
            "--throughput-batches 1000000000 is out of range",
        ),
        (
            &["bench", "--preset", "clip-tiny", "--device", "cpu", "--throughput-batches", "5000"][..],
            "--throughput-batches 5000 is out of range",
        ),
        (
            &["bench", "--preset", "tiny", "--device", "cpu", "--dataset", "imgs", "--dataset-batch", "5000"][..],
            "--dataset-batch 5000 is out of range",
        ),
    ] {
        let o = glimpse(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(needle) && !err.contains("panicked"), "{args:?}: {err}");
        assert!(o.stdout.is_empty(), "{args:?}: no table or report: {}", String::from_utf8_lossy(&o.stdout));
    }
}

/// The commit of the sources the binary was built from, as build.rs reads it (None outside git).
fn build_tree_head() -> Option<String> {
    let o = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()?;
    o.status.success().then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

/// Run from another git repository, bench reports the commit of the binary, not of the current
/// directory; GLIMPSE_COMMIT still overrides it.
#[test]
fn bench_reports_the_commit_of_the_binary() {
    let other = tempfile::tempdir().unwrap();
    let git = |args: &[&str]| {
        let o = Command::new("git").args(args).current_dir(other.path()).output().expect("git");
        assert!(o.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    git(&["init", "-q"]);
    std::fs::write(other.path().join("f"), "x").unwrap();
    git(&["add", "f"]);
    git(&["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "other"]);
    let other_head = git(&["rev-parse", "--short=12", "HEAD"]);
    let bench = |commit_env: Option<&str>| -> serde_json::Value {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_glimpse"));
        cmd.args([
            "bench",
            "--device",
            "cpu",
            "--repeats",
            "1",
            "--new-tokens",
            "2",
            "--throughput-batches",
            "1",
            "--json",
        ])
        .current_dir(other.path());
        match commit_env {
            Some(c) => cmd.env("GLIMPSE_COMMIT", c),
            None => cmd.env_remove("GLIMPSE_COMMIT"),
        };
        let o = cmd.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let v = bench(None);
    let commit = v["commit"].as_str();
    assert_ne!(commit, Some(other_head.as_str()), "the current directory's HEAD was reported");
    match build_tree_head() {
        Some(head) => assert!(
            commit.is_some_and(|c| c == head || c == format!("{head}-dirty")),
            "{commit:?} vs the build tree's {head}"
        ),
        None => assert_eq!(v["commit"], serde_json::Value::Null),
    }
    assert_eq!(bench(Some("abc123"))["commit"], "abc123");
}

/// `--model` takes any generative family: LLaVA's stages are its own phases (vision, projector),
/// its prompts come from the chat template, and every floor is read off its graph.
#[test]
fn bench_model_runs_a_llava_folder() {
    let dir = format!("{}/tests/fixtures/llava-tiny", env!("CARGO_MANIFEST_DIR"));
    let o = glimpse(&[
        "bench",
        "--model",
        &dir,
        "--device",
        "cpu",
        "--repeats",
        "1",
        "--new-tokens",
        "3",
        "--throughput-batches",
        "1",
        "--json",
    ]);
    assert!(o.status.success(), "bench failed: {}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let stages = v["stages"].as_array().unwrap();
    let names: Vec<&str> = stages.iter().map(|s| s["stage"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "vision",
            "projector",
            "prefill",
            "prefill_vqa",
            "decode",
            "decode_sampled",
            "first_token",
            "caption",
            "caption_beam5"
        ]
    );
    for s in stages {
        assert!(s["floor_ms"].as_f64().unwrap() > 0.0 && s["flops"].as_f64().unwrap() > 0.0, "{s}");
    }
    // The caption prompt is the chat template with the image tokens expanded, not a bare BOS.
    assert!(v["caption_prompt_tokens"].as_u64().unwrap() > 20, "{}", v["caption_prompt_tokens"]);
}

#[test]
fn bench_takes_llava_presets() {
    let o = glimpse(&[
        "bench",
        "--preset",
        "llava-tiny",
        "--device",
        "cpu",
        "--repeats",
        "1",
        "--new-tokens",
        "2",
        "--json",
    ]);
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "bench failed: {err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"));
    assert_eq!(v["preset"], "llava-tiny");
    // The prompts come from the preset's chat template with its 16 image tokens expanded.
    assert!(v["caption_prompt_tokens"].as_u64().unwrap() > 16, "{}", v["caption_prompt_tokens"]);
    let stages: Vec<&str> = v["stages"].as_array().unwrap().iter().map(|s| s["stage"].as_str().unwrap()).collect();
    assert!(stages.contains(&"vision") && stages.contains(&"projector") && stages.contains(&"decode"), "{stages:?}");
}

/// InstructBLIP's Q-Former reads the prompt text: the bench feeds it each prompt's instruction
/// inputs (folders: the folder's qformer_tokenizer/; presets: the preset's folder files), for
/// both language models (Vicuna and the Flan-T5 encoder phase).
#[test]
fn bench_runs_instructblip_folders_and_presets() {
    let root = env!("CARGO_MANIFEST_DIR");
    let cases = [
        (vec!["--model".to_string(), format!("{root}/tests/fixtures/instructblip-tiny")], "prefill"),
        (vec!["--model".to_string(), format!("{root}/tests/fixtures/instructblip-flan-t5-tiny")], "encoder"),
        (vec!["--preset".to_string(), "instructblip-tiny".to_string()], "prefill"),
    ];
    for (which, stage) in cases {
        let mut args: Vec<&str> = vec!["bench"];
        args.extend(which.iter().map(String::as_str));
        args.extend(["--device", "cpu", "--repeats", "1", "--new-tokens", "3", "--throughput-batches", "2", "--json"]);
        let o = glimpse(&args);
        assert!(o.status.success(), "{which:?}: {}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let names: Vec<&str> = v["stages"].as_array().unwrap().iter().map(|s| s["stage"].as_str().unwrap()).collect();
        assert!(
            names.contains(&"qformer") && names.contains(&stage) && names.contains(&"caption_beam5"),
            "{which:?}: {names:?}"
        );
        let t = &v["throughput"][0];
        assert!(t["images_per_s"].as_f64().unwrap() > 0.0, "{which:?}: {t}");
    }
}

/// An embedding model (preset or folder) gets images/s and texts/s rows at each batch size, each
/// with a floor read off its graph.
#[test]
fn bench_times_clip_images_and_texts() {
    let fixture = format!("{}/tests/fixtures/clip-tiny", env!("CARGO_MANIFEST_DIR"));
    for source in [["--preset", "clip-tiny"], ["--model", fixture.as_str()]] {
        let o = glimpse(&[
            "bench",
            source[0],
            source[1],
            "--device",
            "cpu",
            "--repeats",
            "2",
            "--throughput-batches",
            "1,3",
            "--json",
        ]);
        let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        assert!(o.status.success(), "bench {source:?} failed: {err}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"));
        assert_eq!(v["text_tokens"], 16);
        let rows = v["rows"].as_array().unwrap();
        let shape: Vec<(&str, u64)> =
            rows.iter().map(|r| (r["input"].as_str().unwrap(), r["batch"].as_u64().unwrap())).collect();
        assert_eq!(shape, [("image", 1), ("text", 1), ("image", 3), ("text", 3)], "{source:?}");
        for r in rows {
            assert!(r["skipped"].is_null(), "{r}");
            let (phase, request, per_s) =
                (r["phase_ms"].as_f64().unwrap(), r["request_ms"].as_f64().unwrap(), r["per_s"].as_f64().unwrap());
            assert!(phase > 0.0 && request > 0.0, "{r}");
            // per_s is batch / request time, in seconds.
            let batch = r["batch"].as_f64().unwrap();
            assert!((per_s - batch / (request / 1e3)).abs() <= 1e-6 * per_s, "{r}");
            assert!(r["floor_ms"].as_f64().unwrap() > 0.0 && r["flops"].as_f64().unwrap() > 0.0, "{r}");
        }
        // Three images cost three times one image's FLOPs (same graph per image).
        let flops = |i: usize| rows[i]["flops"].as_f64().unwrap();
        assert!((flops(2) - 3.0 * flops(0)).abs() <= 1e-9 * flops(2), "{} vs {}", flops(2), flops(0));
    }
    let o = glimpse(&["bench", "--preset", "clip-tiny", "--device", "cpu", "--repeats", "1"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && out.contains("request ms") && out.contains("image"), "{out}");
}

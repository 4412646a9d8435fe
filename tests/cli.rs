//! The `glimpse` command line on the fixtures: outputs, JSON, and one clear line (no panic, no
//! backtrace) with a non-zero exit for each kind of bad input.

mod common;

use std::process::{Command, Output};

fn glimpse(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_glimpse")).args(args).env("RUST_BACKTRACE", "1").output().expect("run glimpse")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Exits non-zero with exactly one `error: ...` line containing `needle`, and no panic.
fn assert_clean_error(o: &Output, needle: &str) {
    let err = stderr(o);
    assert!(!o.status.success(), "expected failure, got success: {}", stdout(o));
    assert!(!err.contains("panicked") && !err.contains("backtrace"), "panic: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected: {err}");
    assert!(lines[0].starts_with("error: ") && lines[0].contains(needle), "{err}");
}

fn model() -> String {
    common::model_dir("blip2-opt-tiny").display().to_string()
}

fn img(name: &str) -> String {
    common::image(name).display().to_string()
}

fn golden_case(name: &str) -> serde_json::Value {
    let g = common::golden_json("blip2-opt-tiny.json");
    g["cases"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap().clone()
}

#[test]
fn caption_json_matches_transformers() {
    let o = glimpse(&["caption", "--model", &model(), "--device", "cpu", "--json", &img("wide_301x97.png"), &img("odd_257x181.png")]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<serde_json::Value> = stdout(&o).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    for (line, case) in lines.iter().zip(["caption_wide_301x97", "caption_odd_257x181"]) {
        let want = golden_case(case);
        assert_eq!(line["tokens"], want["generated_ids"], "{case}");
        assert_eq!(line["text"], want["text"], "{case}");
        assert!(line["image"].as_str().unwrap().ends_with(want["image"].as_str().unwrap()));
        assert_eq!(line["logprobs"].as_array().unwrap().len(), want["generated_ids"].as_array().unwrap().len());
        assert!(line["timings"]["total_ms"].as_f64().unwrap() > 0.0);
        assert_eq!(line["device"], "cpu");
    }
}

#[test]
fn caption_plain_prints_text() {
    let o = glimpse(&["caption", "--model", &model(), &img("odd_257x181.png")]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim_end_matches('\n'), golden_case("caption_odd_257x181")["text"].as_str().unwrap());
}

#[test]
fn ask_answers_with_the_vqa_template() {
    let case = golden_case("vqa_rgba_150x120");
    let q = case["prompt"].as_str().unwrap().strip_prefix("Question: ").unwrap().strip_suffix(" Answer:").unwrap().to_string();
    let o = glimpse(&["ask", "--model", &model(), "--json", &img("rgba_150x120.png"), &q]);
    assert!(o.status.success(), "{}", stderr(&o));
    let line: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(line["tokens"], case["generated_ids"]);
}

#[test]
fn max_new_tokens_is_respected() {
    let o = glimpse(&["caption", "--model", &model(), "--json", "--max-new-tokens", "3", &img("wide_301x97.png")]);
    let line: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(line["tokens"].as_array().unwrap().len(), 3);
}

#[test]
fn info_describes_the_model() {
    let o = glimpse(&["info", &model()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = stdout(&o);
    for needle in ["BLIP-2", "2 heads x 88", "32 queries", "vocab 808", "F16"] {
        assert!(s.contains(needle), "{needle} missing from:\n{s}");
    }
}

#[test]
fn convert_writes_a_zero_copy_fp16_checkpoint() {
    let out = common::tempdir();
    let target = out.path().join("fp16");
    let o = glimpse(&["convert", &common::model_dir("blip2-opt-tiny-proj").display().to_string(), &target.display().to_string()]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The fp32 sharded original and its fp16 copy caption identically.
    let a = glimpse(&["caption", "--model", &common::model_dir("blip2-opt-tiny-proj").display().to_string(), "--json", &img("wide_301x97.png")]);
    let b = glimpse(&["caption", "--model", &target.display().to_string(), "--json", &img("wide_301x97.png")]);
    let (a, b): (serde_json::Value, serde_json::Value) = (serde_json::from_str(stdout(&a).trim()).unwrap(), serde_json::from_str(stdout(&b).trim()).unwrap());
    assert_eq!(a["tokens"], b["tokens"]);
    let ckpt = glimpse::weights::Checkpoint::open_dir(&target).unwrap();
    let name = "language_model.lm_head.weight";
    let shape = ckpt.info(name).unwrap().shape.clone();
    assert!(ckpt.f16(name, &shape).unwrap().is_mapped());
    // Refuses to overwrite.
    let again = glimpse(&["convert", &common::model_dir("blip2-opt-tiny-proj").display().to_string(), &target.display().to_string()]);
    assert_clean_error(&again, "refusing to overwrite");
}

#[test]
fn missing_model_folder() {
    assert_clean_error(&glimpse(&["caption", "--model", "/nonexistent/model", &img("wide_301x97.png")]), "/nonexistent/model");
}

#[test]
fn hub_id_not_in_cache() {
    let cache = common::tempdir();
    let o = Command::new(env!("CARGO_BIN_EXE_glimpse"))
        .args(["caption", "--model", "Salesforce/blip2-opt-2.7b", &img("wide_301x97.png")])
        .env("HF_HUB_CACHE", cache.path())
        .output()
        .unwrap();
    assert_clean_error(&o, "not in the Hugging Face cache");
}

#[test]
fn hub_id_resolves_from_the_cache() {
    // Lay the fixture out as huggingface_hub does: models--org--name/{refs/main, snapshots/<hash>/}.
    let cache = common::tempdir();
    let repo = cache.path().join("models--tiny--blip2");
    let snap = repo.join("snapshots/0123abcd");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    for f in std::fs::read_dir(common::model_dir("blip2-opt-tiny")).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), snap.join(f.file_name())).unwrap();
    }
    let o = Command::new(env!("CARGO_BIN_EXE_glimpse"))
        .args(["caption", "--model", "tiny/blip2", &img("odd_257x181.png")])
        .env("HF_HUB_CACHE", cache.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim_end_matches('\n'), golden_case("caption_odd_257x181")["text"].as_str().unwrap());
}

#[test]
fn unreadable_image_fails_but_others_are_captioned() {
    let dir = common::tempdir();
    let bad = dir.path().join("broken.png");
    std::fs::write(&bad, b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let o = glimpse(&["caption", "--model", &model(), &bad.display().to_string(), &img("odd_257x181.png")]);
    assert_clean_error(&o, "broken.png");
    assert_eq!(stdout(&o).lines().count(), 1, "the good image is still captioned");
}

#[test]
fn missing_image() {
    assert_clean_error(&glimpse(&["caption", "--model", &model(), "/nonexistent/cat.png"]), "/nonexistent/cat.png");
}

/// transformers formats a whitespace-only question like any other; so does glimpse.
#[test]
fn whitespace_question_is_answered() {
    let o = glimpse(&["ask", "--model", &model(), "--max-new-tokens", "2", &img("wide_301x97.png"), "   "]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn zero_new_tokens_is_an_error() {
    assert_clean_error(&glimpse(&["caption", "--model", &model(), "--max-new-tokens", "0", &img("wide_301x97.png")]), "max_new_tokens is 0");
}

#[test]
fn prompt_longer_than_the_positions() {
    let long = "a very long question ".repeat(40);
    assert_clean_error(&glimpse(&["ask", "--model", &model(), &img("wide_301x97.png"), &long]), "positions");
    assert_clean_error(&glimpse(&["caption", "--model", &model(), "--max-new-tokens", "500", &img("wide_301x97.png")]), "positions");
}

#[test]
fn unknown_device() {
    assert_clean_error(&glimpse(&["caption", "--model", &model(), "--device", "tpu", &img("wide_301x97.png")]), "unknown device");
}

#[test]
fn cuda_without_a_gpu_says_why() {
    if glimpse::backend::cuda_unavailable_reason().is_none() {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "SKIP cuda_without_a_gpu_says_why: a GPU is present (tests/gpu_model.rs covers it)");
        return;
    }
    assert_clean_error(&glimpse(&["caption", "--model", &model(), "--device", "cuda", &img("wide_301x97.png")]), "CUDA");
}

#[test]
fn malformed_checkpoint() {
    let dir = common::tempdir();
    for f in ["config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(common::model_dir("blip2-opt-tiny").join(f), dir.path().join(f)).unwrap();
    }
    std::fs::write(dir.path().join("model.safetensors"), [0xffu8; 64]).unwrap();
    assert_clean_error(&glimpse(&["caption", "--model", &dir.path().display().to_string(), &img("wide_301x97.png")]), "model.safetensors");
}

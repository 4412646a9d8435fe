//! The `glimpse` command line on the fixtures: outputs, JSON, one record per input image, and one
//! clear line (no panic, no backtrace) with a non-zero exit for each kind of bad input, including
//! a stdout that is full or closed.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn glimpse(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_glimpse")).args(args).env("RUST_BACKTRACE", "1").output().expect("run glimpse")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The stderr line `--device auto` adds when it runs on the CPU (tested by
/// `auto_device_says_when_it_falls_back_to_the_cpu`).
const CPU_FALLBACK_NOTE: &str = "note: --device auto: running on the CPU (";

/// stderr lines, without blank ones and without the `--device auto` CPU note.
fn error_lines(o: &Output) -> Vec<String> {
    stderr(o)
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with(CPU_FALLBACK_NOTE))
        .map(str::to_string)
        .collect()
}

/// Exits non-zero with exactly one `error: ...` line containing `needle`, and no panic.
fn assert_clean_error(o: &Output, needle: &str) {
    let err = stderr(o);
    assert!(!o.status.success(), "expected failure, got success: {}", stdout(o));
    assert!(!err.contains("panicked") && !err.contains("backtrace"), "panic: {err}");
    let lines = error_lines(o);
    assert_eq!(lines.len(), 1, "one line expected: {err}");
    assert!(lines[0].starts_with("error: ") && lines[0].contains(needle), "{err}");
}

/// Reverses the plain-output escaping (\\ \n \r \t \u{HEX}), written independently of the binary's.
fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('t') => out.push('\t'),
            Some('\\') => out.push('\\'),
            Some('u') => {
                let hex: String = chars.by_ref().skip(1).take_while(|&c| c != '}').collect();
                out.push(char::from_u32(u32::from_str_radix(&hex, 16).expect("hex")).expect("char"));
            }
            other => panic!("bad escape \\{other:?} in {s:?}"),
        }
    }
    out
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
    let o = glimpse(&[
        "caption",
        "--model",
        &model(),
        "--device",
        "cpu",
        "--json",
        &img("wide_301x97.png"),
        &img("odd_257x181.png"),
    ]);
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

/// One image: the caption alone, on one line, with control characters escaped (the fixture's
/// caption holds U+0014).
#[test]
fn caption_plain_prints_text() {
    let o = glimpse(&["caption", "--model", &model(), &img("odd_257x181.png")]);
    assert!(o.status.success(), "{}", stderr(&o));
    let want = golden_case("caption_odd_257x181")["text"].as_str().unwrap().to_string();
    assert!(want.chars().any(char::is_control), "the fixture caption exercises escaping: {want:?}");
    let out = stdout(&o);
    assert_eq!(out.lines().count(), 1, "{out:?}");
    assert!(
        !out.trim_end_matches('\n').chars().any(char::is_control),
        "control characters reach the terminal: {out:?}"
    );
    assert_eq!(unescape(out.trim_end_matches('\n')), want);
}

#[test]
fn ask_answers_with_the_vqa_template() {
    let case = golden_case("vqa_rgba_150x120");
    let q = case["prompt"]
        .as_str()
        .unwrap()
        .strip_prefix("Question: ")
        .unwrap()
        .strip_suffix(" Answer:")
        .unwrap()
        .to_string();
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
    let o = glimpse(&[
        "convert",
        &common::model_dir("blip2-opt-tiny-proj").display().to_string(),
        &target.display().to_string(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The fp32 sharded original and its fp16 copy caption identically.
    let a = glimpse(&[
        "caption",
        "--model",
        &common::model_dir("blip2-opt-tiny-proj").display().to_string(),
        "--json",
        &img("wide_301x97.png"),
    ]);
    let b = glimpse(&["caption", "--model", &target.display().to_string(), "--json", &img("wide_301x97.png")]);
    let (a, b): (serde_json::Value, serde_json::Value) =
        (serde_json::from_str(stdout(&a).trim()).unwrap(), serde_json::from_str(stdout(&b).trim()).unwrap());
    assert_eq!(a["tokens"], b["tokens"]);
    let ckpt = glimpse::weights::Checkpoint::open_dir(&target).unwrap();
    let name = "language_model.lm_head.weight";
    let shape = ckpt.info(name).unwrap().shape.clone();
    assert!(ckpt.f16(name, &shape).unwrap().is_mapped());
    // Refuses to overwrite.
    let again = glimpse(&[
        "convert",
        &common::model_dir("blip2-opt-tiny-proj").display().to_string(),
        &target.display().to_string(),
    ]);
    assert_clean_error(&again, "refusing to overwrite");
}

#[test]
fn missing_model_folder() {
    assert_clean_error(
        &glimpse(&["caption", "--model", "/nonexistent/model", &img("wide_301x97.png")]),
        "/nonexistent/model",
    );
}

#[test]
fn hub_id_not_in_cache() {
    let cache = common::tempdir();
    let o = Command::new(env!("CARGO_BIN_EXE_glimpse"))
        .args(["caption", "--model", "Salesforce/blip2-opt-2.7b", &img("wide_301x97.png")])
        .env("HF_HUB_CACHE", cache.path())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert_clean_error(&o, "not in the Hugging Face cache");
    assert!(
        stderr(&o).contains("`glimpse download Salesforce/blip2-opt-2.7b`") && stderr(&o).contains("offline"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn hub_id_with_several_snapshots_and_no_main_lists_them() {
    let cache = common::tempdir();
    let snapshots = cache.path().join("models--tiny--blip2/snapshots");
    for hash in ["1111aaaa", "2222bbbb"] {
        std::fs::create_dir_all(snapshots.join(hash)).unwrap();
    }
    let o = Command::new(env!("CARGO_BIN_EXE_glimpse"))
        .args(["caption", "--model", "tiny/blip2", &img("wide_301x97.png")])
        .env("HF_HUB_CACHE", cache.path())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert_clean_error(&o, "2 snapshots");
    let err = stderr(&o);
    assert!(!err.contains("not in the") && err.contains("1111aaaa, 2222bbbb") && err.contains("no refs/main"), "{err}");
    assert!(
        err.contains("pass the snapshot folder") && err.contains(&snapshots.join("1111aaaa").display().to_string()),
        "{err}"
    );
}

#[test]
fn model_path_to_a_file_says_it_must_be_a_folder() {
    let file = common::model_dir("blip2-opt-tiny").join("config.json");
    for args in [
        &["caption", "--model", &file.display().to_string(), &img("wide_301x97.png")][..],
        &["info", &file.display().to_string()][..],
    ] {
        let o = glimpse(args);
        assert_clean_error(&o, "is a file, not a folder");
        assert!(!stderr(&o).contains("not found"), "{}", stderr(&o));
        assert!(
            stderr(&o).contains(&common::model_dir("blip2-opt-tiny").display().to_string()),
            "names the folder to pass: {}",
            stderr(&o)
        );
    }
}

/// A copy of the tiny fixture with `edit` applied.
fn edited_copy(edit: impl Fn(&Path)) -> tempfile::TempDir {
    let dir = common::tempdir();
    for f in std::fs::read_dir(common::model_dir("blip2-opt-tiny")).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), dir.path().join(f.file_name())).unwrap();
    }
    edit(dir.path());
    dir
}

/// `info` runs the checks `caption` runs: a folder `caption` refuses, `info` refuses with the
/// same message.
#[test]
fn info_rejects_what_caption_rejects() {
    let no_tokenizer = edited_copy(|d| std::fs::remove_file(d.join("tokenizer.json")).unwrap());
    let wrong_size = edited_copy(|d| {
        let p = d.join("processor_config.json");
        let text = std::fs::read_to_string(&p).unwrap().replace("224", "100");
        std::fs::write(p, text).unwrap();
    });
    for (dir, needle) in [(no_tokenizer, "tokenizer"), (wrong_size, "vision model takes")] {
        let d = dir.path().display().to_string();
        let caption = glimpse(&["caption", "--model", &d, "--device", "cpu", &img("wide_301x97.png")]);
        let info = glimpse(&["info", &d]);
        assert_clean_error(&caption, needle);
        assert_clean_error(&info, needle);
        assert_eq!(error_lines(&caption), error_lines(&info));
    }
}

/// A copy of fixture `model` with `edit` applied.
fn edited_fixture(model: &str, edit: impl Fn(&Path)) -> tempfile::TempDir {
    let dir = common::tempdir();
    common::copy_dir(&common::model_dir(model), dir.path());
    edit(dir.path());
    dir
}

/// Each model file glimpse reads (configs, tokenizer, chat template, weights) replaced by
/// /dev/zero, a FIFO or a folder fails at once with one line naming it, instead of reading
/// without end or blocking.
#[cfg(unix)]
#[test]
fn model_files_that_are_not_regular_files_are_refused() {
    let cases = [
        ("blip2-opt-tiny", "config.json"),
        ("blip2-opt-tiny", "generation_config.json"),
        ("blip2-opt-tiny", "processor_config.json"),
        ("blip2-opt-tiny", "tokenizer.json"),
        ("blip2-opt-tiny", "tokenizer_config.json"),
        ("blip2-opt-tiny", "model.safetensors"),
        ("llava-tiny", "chat_template.jinja"),
    ];
    for (model, file) in cases {
        for kind in ["/dev/zero", "fifo", "folder"] {
            let dir = edited_fixture(model, |d| {
                let p = d.join(file);
                std::fs::remove_file(&p).unwrap();
                match kind {
                    "fifo" => {
                        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
                        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
                    }
                    "folder" => std::fs::create_dir(&p).unwrap(),
                    dev => std::os::unix::fs::symlink(dev, &p).unwrap(),
                }
            });
            let d = dir.path().display().to_string();
            let image = img("wide_301x97.png");
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_glimpse"));
            cmd.args(["caption", "--model", &d, "--device", "cpu", "--max-new-tokens", "2", &image]);
            let o = common::output_within(&mut cmd, 60);
            assert_clean_error(&o, file);
            assert!(stderr(&o).contains("not a regular file"), "{model}/{file} as {kind}: {}", stderr(&o));
        }
    }
}

/// Every float tensor of `dir`'s model.safetensors set to NaN, in place.
fn poison_weights(dir: &Path) {
    let path = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    for (name, t) in header.as_object().unwrap() {
        if name == "__metadata__" {
            continue;
        }
        let nan: &[u8] = match t["dtype"].as_str().unwrap() {
            "F16" => &[0x00, 0x7e],
            "BF16" => &[0xc0, 0x7f],
            "F32" => &[0x00, 0x00, 0xc0, 0x7f],
            _ => continue,
        };
        let (a, b) = (t["data_offsets"][0].as_u64().unwrap() as usize, t["data_offsets"][1].as_u64().unwrap() as usize);
        for chunk in bytes[8 + n + a..8 + n + b].chunks_mut(nan.len()) {
            chunk.copy_from_slice(nan);
        }
    }
    std::fs::write(&path, bytes).unwrap();
}

/// Sets values of tensor `name` in safetensors file `file`: `(index, little-endian bytes)`.
fn poison_tensor(file: &Path, name: &str, values: &[(usize, &[u8])]) {
    let mut bytes = std::fs::read(file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let start = 8 + n + header[name]["data_offsets"][0].as_u64().unwrap() as usize;
    for (i, v) in values {
        bytes[start + i * v.len()..start + (i + 1) * v.len()].copy_from_slice(v);
    }
    std::fs::write(file, bytes).unwrap();
}

/// `info --check-weights` names each tensor holding NaN or infinite values (count, dtype,
/// shape) and exits 1; a clean checkpoint reads "all finite"; plain `info` reads no weight.
/// An fp16 single file and an fp32 sharded checkpoint, one tensor poisoned in a copy of each.
#[test]
fn info_check_weights_names_non_finite_tensors() {
    // (model, file, tensor or "" for its first F32 tensor, values set, what its line says)
    type Values = &'static [(usize, &'static [u8])];
    let cases: [(&str, &str, &str, Values, &str); 2] = [
        (
            "blip2-opt-tiny",
            "model.safetensors",
            "language_projection.weight",
            &[(0, &[0x00, 0x7e]), (5, &[0x01, 0xfc]), (7, &[0x00, 0x7c])],
            "(F16 [160, 128]): 2 NaN, 1 infinite of 20480 values",
        ),
        (
            "blip2-opt-tiny-proj",
            "model-00001-of-00003.safetensors",
            "",
            &[(3, &[0x00, 0x00, 0x80, 0xff])],
            ": 0 NaN, 1 infinite of",
        ),
    ];
    for (model, file, name, values, needle) in cases {
        let clean = common::model_dir(model).display().to_string();
        let o = glimpse(&["info", "--check-weights", &clean]);
        assert!(o.status.success(), "{model}: {}", stderr(&o));
        assert!(stdout(&o).contains("weights:    all finite ("), "{model}: {}", stdout(&o));

        let dir = edited_fixture(model, |d| {
            let path = d.join(file);
            let name = if name.is_empty() { first_float_tensor(&path) } else { name.to_string() };
            poison_tensor(&path, &name, values);
        });
        let d = dir.path().display().to_string();
        let name = if name.is_empty() { first_float_tensor(&dir.path().join(file)) } else { name.to_string() };
        let o = glimpse(&["info", "--check-weights", &d]);
        assert_clean_error(&o, "holds NaN or infinite values in 1 tensor (");
        let err = stderr(&o);
        assert!(err.contains(&d) && err.contains(&format!("`{name}`")), "{model}: {err}");
        let out = stdout(&o);
        assert!(out.contains("weights:    NaN or infinite values in 1 tensor ("), "{model}: {out}");
        let line = out.lines().find(|l| l.contains(&format!(" {name} ("))).unwrap_or_else(|| panic!("{name}: {out}"));
        assert!(line.contains(needle), "{model}: {line}");
        // Plain info reads no weight: no scan, no warning, exit 0.
        let o = glimpse(&["info", &d]);
        assert!(o.status.success() && !stdout(&o).contains("weights:"), "{model}: {}", stderr(&o));
        // The library call behind it.
        let found = glimpse::weights::Checkpoint::open_dir(dir.path()).unwrap().non_finite();
        assert_eq!(found.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), [name.as_str()], "{model}");
    }
}

/// The name of the first F32 tensor of safetensors file `path` (in name order).
fn first_float_tensor(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut names: Vec<&String> = header.iter().filter(|(_, t)| t["dtype"] == "F32").map(|(k, _)| k).collect();
    names.sort();
    names.first().expect("an F32 tensor").to_string()
}

/// NaN weights are an error naming the phase, in every family (they used to give exit 0, empty
/// text, tokens [0, ...] and null log-probs), for greedy decoding and beam search.
#[test]
fn non_finite_logits_are_an_error_naming_the_phase() {
    for model in ["blip2-opt-tiny", "blip2-flan-t5-tiny", "instructblip-tiny", "llava-tiny"] {
        let dir = edited_fixture(model, poison_weights);
        let d = dir.path().display().to_string();
        for beams in ["1", "2"] {
            let o = glimpse(&[
                "caption",
                "--model",
                &d,
                "--device",
                "cpu",
                "--max-new-tokens",
                "3",
                "--num-beams",
                beams,
                "--json",
                &img("wide_301x97.png"),
            ]);
            let err = stderr(&o);
            assert_eq!(o.status.code(), Some(1), "{model}: {err}");
            assert!(err.contains("logits are not finite") && err.contains("prefill"), "{model}: {err}");
            assert!(!stdout(&o).contains("\"text\":\"\""), "{model}: {}", stdout(&o));
        }
    }
}

/// A processor size read from the checkpoint is bounded before anything is allocated: a
/// `shortest_edge` of 1000000 is refused naming the field, and a resize that would make an
/// elongated image larger than the pixel limit fails that image (it used to abort allocating
/// terabytes).
#[test]
fn processor_sizes_are_bounded_before_allocating() {
    for (edge, needle) in [(1_000_000, "`size.shortest_edge` is 1000000"), (8192, "over the 178956970-pixel limit")] {
        let dir = edited_fixture("clip-tiny", |d| {
            let p = d.join("processor_config.json");
            let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            v["image_processor"]["size"]["shortest_edge"] = edge.into();
            std::fs::write(p, v.to_string()).unwrap();
        });
        let d = dir.path().display().to_string();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_glimpse"));
        cmd.args(["embed", "--model", &d, "--device", "cpu", &img("wide_301x97.png")]);
        let o = common::output_within(&mut cmd, 60);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains(needle) && !err.contains("panicked"), "{err}");
    }
}

/// Checkpoint values glimpse could not use are refused at load, naming the file: an
/// `eos_token_id` outside the vocabulary in a chat model's generation_config.json, and an empty
/// tokenizer vocabulary.
#[test]
fn unusable_generation_and_tokenizer_files_are_refused() {
    let eos = edited_fixture("llava-tiny", |d| {
        let p = d.join("generation_config.json");
        let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        v["eos_token_id"] = 1_000_000.into();
        std::fs::write(p, v.to_string()).unwrap();
    });
    let empty = edited_fixture("instructblip-tiny", |d| {
        let p = d.join("tokenizer.json");
        let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        v["model"]["vocab"] = serde_json::json!({});
        v["model"]["merges"] = serde_json::json!([]);
        std::fs::write(p, v.to_string()).unwrap();
    });
    for (dir, needles) in [
        (eos, ["generation_config.json", "`eos_token_id` is 1000000"]),
        (empty, ["tokenizer.json", "vocabulary is empty"]),
    ] {
        let d = dir.path().display().to_string();
        let o =
            glimpse(&["caption", "--model", &d, "--device", "cpu", "--max-new-tokens", "2", &img("wide_301x97.png")]);
        for n in needles {
            assert_clean_error(&o, n);
        }
    }
}

/// A chat template that loops without end stops with an error naming the template.
#[test]
fn runaway_chat_template_is_stopped() {
    let dir = edited_fixture("llava-tiny", |d| {
        let t = "{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}";
        std::fs::write(d.join("chat_template.jinja"), t).unwrap();
    });
    let d = dir.path().display().to_string();
    let image = img("wide_301x97.png");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_glimpse"));
    cmd.args(["caption", "--model", &d, "--device", "cpu", "--max-new-tokens", "2", &image]);
    let o = common::output_within(&mut cmd, 60);
    assert!(stderr(&o).contains("chat_template.jinja") && stderr(&o).contains("fuel"), "{}", stderr(&o));
    assert!(!o.status.success() && !stderr(&o).contains("panicked"), "{}", stderr(&o));
}

#[test]
fn auto_device_says_when_it_falls_back_to_the_cpu() {
    let Some(reason) = glimpse::backend::cuda_unavailable_reason() else {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "SKIP auto_device_says_when_it_falls_back_to_the_cpu: a GPU is present");
        return;
    };
    let o = glimpse(&["caption", "--model", &model(), "--device", "auto", &img("wide_301x97.png")]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].starts_with(CPU_FALLBACK_NOTE) && lines[0].contains(&reason.to_string()), "{err}");
    let cpu = glimpse(&["caption", "--model", &model(), "--device", "cpu", &img("wide_301x97.png")]);
    assert_eq!(stderr(&cpu), "", "--device cpu is what was asked for: no note");
    let bench =
        glimpse(&["bench", "--device", "auto", "--repeats", "1", "--new-tokens", "2", "--throughput-batches", "1"]);
    assert!(bench.status.success() && stderr(&bench).starts_with(CPU_FALLBACK_NOTE), "{}", stderr(&bench));
}

#[test]
fn version_names_the_commit() {
    let o = glimpse(&["--version"]);
    let out = stdout(&o);
    assert!(o.status.success() && out.contains(&format!("(commit {}", glimpse::bench::BUILD_COMMIT)), "{out}");
}

#[test]
fn hub_id_resolves_from_the_cache() {
    // Lay the fixture out as huggingface_hub does: models--org--name/{refs/main, snapshots/<hash>/}.
    let cache = common::tempdir();
    let repo = cache.path().join("models--tiny--blip2");
    let snap = repo.join("snapshots/0123abcd0123abcd0123abcd0123abcd0123abcd");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd0123abcd0123abcd0123abcd0123abcd").unwrap();
    for f in std::fs::read_dir(common::model_dir("blip2-opt-tiny")).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), snap.join(f.file_name())).unwrap();
    }
    let o = Command::new(env!("CARGO_BIN_EXE_glimpse"))
        .args(["caption", "--model", "tiny/blip2", &img("odd_257x181.png")])
        .env("HF_HUB_CACHE", cache.path())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        unescape(stdout(&o).trim_end_matches('\n')),
        golden_case("caption_odd_257x181")["text"].as_str().unwrap()
    );
}

/// A `refs/<revision>` is trusted only as a 40-hex commit naming a snapshot of the cache: a path
/// (relative or absolute) to a model elsewhere is refused, and a ref to a missing snapshot does
/// not fall back to another snapshot.
#[test]
fn hub_refs_must_name_a_cached_snapshot() {
    let cache = common::tempdir();
    let repo = cache.path().join("models--tiny--blip2");
    let snap = repo.join("snapshots/1111111111111111111111111111111111111111");
    common::copy_dir(&common::model_dir("blip2-opt-tiny"), &snap);
    common::copy_dir(&common::model_dir("blip2-opt-tiny"), &cache.path().join("outside_model"));
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    let outside = cache.path().join("outside_model").display().to_string();
    let missing = "2222222222222222222222222222222222222222";
    for (content, needle) in [
        ("../../../outside_model", "not a 40-hex commit"),
        (outside.as_str(), "not a 40-hex commit"),
        (missing, "names snapshot 2222222222222222222222222222222222222222, which is not in"),
    ] {
        std::fs::write(repo.join("refs/main"), content).unwrap();
        let o = Command::new(env!("CARGO_BIN_EXE_glimpse"))
            .args(["caption", "--model", "tiny/blip2", "--device", "cpu", &img("wide_301x97.png")])
            .env("HF_HUB_CACHE", cache.path())
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap();
        assert_clean_error(&o, needle);
    }
}

/// Good images and bad ones (missing, corrupt PNG, a directory), interleaved: (path, golden case
/// or None for a bad one).
fn mixed_inputs(dir: &Path) -> Vec<(String, Option<&'static str>)> {
    let corrupt = dir.join("broken.png");
    std::fs::write(&corrupt, b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let folder = dir.join("a folder.png");
    std::fs::create_dir(&folder).unwrap();
    vec![
        (dir.join("missing.png").display().to_string(), None),
        (img("wide_301x97.png"), Some("caption_wide_301x97")),
        (corrupt.display().to_string(), None),
        (folder.display().to_string(), None),
        (img("odd_257x181.png"), Some("caption_odd_257x181")),
    ]
}

#[test]
fn mixed_images_give_one_plain_record_each_in_order() {
    let dir = common::tempdir();
    let inputs = mixed_inputs(dir.path());
    let m = model();
    let mut args = vec!["caption", "--model", m.as_str()];
    args.extend(inputs.iter().map(|(p, _)| p.as_str()));
    let o = glimpse(&args);
    assert!(!o.status.success(), "a failed image makes the exit status non-zero");
    let out = stdout(&o);
    let records: Vec<&str> = out.lines().collect();
    assert_eq!(records.len(), inputs.len(), "one record per input: {out}");
    for ((path, case), record) in inputs.iter().zip(&records) {
        let (name, text) = record.split_once('\t').unwrap_or_else(|| panic!("no IMAGE<TAB>TEXT: {record:?}"));
        assert_eq!(unescape(name), *path);
        match case {
            Some(case) => assert_eq!(unescape(text), golden_case(case)["text"].as_str().unwrap(), "{path}"),
            None => assert!(text.starts_with("error: "), "{record}"),
        }
    }
    let errors = error_lines(&o);
    let bad: Vec<&String> = inputs.iter().filter(|(_, c)| c.is_none()).map(|(p, _)| p).collect();
    assert_eq!(errors.len(), bad.len(), "one error line per failed image: {errors:?}");
    for (line, path) in errors.iter().zip(bad) {
        assert!(line.starts_with("error: ") && line.contains(path.as_str()), "{line} should name {path}");
    }
    assert!(!stderr(&o).contains("panicked"));
}

#[test]
fn mixed_images_give_one_json_record_each_in_order() {
    let dir = common::tempdir();
    let inputs = mixed_inputs(dir.path());
    let m = model();
    let mut args = vec!["caption", "--model", m.as_str(), "--device", "cpu", "--json"];
    args.extend(inputs.iter().map(|(p, _)| p.as_str()));
    let o = glimpse(&args);
    assert!(!o.status.success());
    let records: Vec<serde_json::Value> = stdout(&o).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(records.len(), inputs.len());
    for ((path, case), r) in inputs.iter().zip(&records) {
        assert_eq!(r["image"], path.as_str());
        match case {
            Some(case) => {
                assert_eq!(r["tokens"], golden_case(case)["generated_ids"]);
                assert!(r.get("error").is_none(), "{r}");
            }
            None => {
                assert!(r["error"].as_str().is_some_and(|e| !e.is_empty()), "{r}");
                assert!(r.get("text").is_none(), "{r}");
            }
        }
    }
}

#[test]
fn stdout_full_is_one_error_line() {
    for args in [
        &["caption", "--model", &model(), "--device", "cpu", &img("odd_257x181.png"), &img("wide_301x97.png")][..],
        &["info", &model()][..],
        &["--version"][..],
    ] {
        let full = std::fs::OpenOptions::new().write(true).open("/dev/full").expect("/dev/full");
        let o = Command::new(env!("CARGO_BIN_EXE_glimpse")).args(args).stdout(full).output().unwrap();
        assert_clean_error(&o, "cannot write to standard output");
        assert_ne!(o.status.code(), Some(101), "{args:?} panicked");
    }
}

#[test]
fn stdout_closed_early_ends_quietly() {
    let images: Vec<String> = [
        "odd_257x181.png",
        "wide_301x97.png",
        "tiny_13x9.png",
        "tall_83x311.png",
        "grey_67x45.png",
        "exact_224x224.png",
    ]
    .iter()
    .map(|n| img(n))
    .collect();
    let m = model();
    let mut child = Command::new(env!("CARGO_BIN_EXE_glimpse"))
        .args(["caption", "--model", m.as_str(), "--device", "cpu"])
        .args(&images)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // `| head -1`: read one record, then close the pipe while glimpse is still captioning.
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
    assert!(first.starts_with(&images[0]), "{first}");
    let o = child.wait_with_output().unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "a closed pipe ends glimpse quietly with status 0 (as ripgrep): {}",
        stderr(&o)
    );
    assert_eq!(stderr(&o), "", "nothing on stderr");
}

#[test]
fn missing_image() {
    assert_clean_error(&glimpse(&["caption", "--model", &model(), "/nonexistent/cat.png"]), "/nonexistent/cat.png");
}

/// transformers formats a whitespace-only question like any other; so does glimpse.
/// `ask` takes an image path that is not UTF-8, as `caption` does.
#[cfg(target_os = "linux")]
#[test]
fn ask_takes_a_non_utf8_image_path() {
    use std::os::unix::ffi::OsStrExt;
    let dir = common::tempdir();
    let path = dir.path().join(std::ffi::OsStr::from_bytes(b"a\xff.png"));
    std::fs::copy(common::image("wide_301x97.png"), &path).unwrap();
    for args in [&["caption"][..], &["ask"]] {
        let o = Command::new(env!("CARGO_BIN_EXE_glimpse"))
            .args(args)
            .args(["--model", &model(), "--device", "cpu", "--max-new-tokens", "2"])
            .arg(&path)
            .args(&["what?"][..args.len().min(1) * usize::from(args[0] == "ask")])
            .output()
            .unwrap();
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    }
}

#[test]
fn whitespace_question_is_answered() {
    let o = glimpse(&["ask", "--model", &model(), "--max-new-tokens", "2", &img("wide_301x97.png"), "   "]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn zero_new_tokens_is_an_error() {
    assert_clean_error(
        &glimpse(&["caption", "--model", &model(), "--max-new-tokens", "0", &img("wide_301x97.png")]),
        "max_new_tokens is 0",
    );
}

/// `top_p` past 1 is refused as transformers' TopPLogitsWarper refuses it; beams and returned
/// sequences past the stated bound are refused with the reason instead of exhausting memory.
#[test]
fn absurd_sampling_and_beam_settings_are_refused() {
    let (m, image) = (model(), img("wide_301x97.png"));
    let run = |flags: &[&str]| {
        let mut args = vec!["caption", "--model", &m, "--device", "cpu", "--max-new-tokens", "2"];
        args.extend(flags);
        args.push(&image);
        glimpse(&args)
    };
    for p in ["1.5", "2", "NaN"] {
        let want = format!("`top_p` has to be a float > 0 and < 1, but is {}", p.parse::<f64>().unwrap());
        assert_clean_error(&run(&["--do-sample", "--top-p", p]), &want);
    }
    assert!(run(&["--do-sample", "--top-p", "1", "--seed", "1"]).status.success());
    assert_clean_error(&run(&["--num-beams", "100000"]), "num_beams is 100000: glimpse runs at most 256");
    // An encoder-decoder's relative positions set no bound: the cache would take 192 GB.
    let t5 = common::model_dir("blip2-flan-t5-tiny").display().to_string();
    let o = glimpse(&["caption", "--model", &t5, "--device", "cpu", "--max-new-tokens", "1000000000", &image]);
    assert_clean_error(&o, "max_new_tokens is 1000000000: glimpse generates at most 16384 new tokens");
    assert_clean_error(
        &run(&["--do-sample", "--num-return-sequences", "1000000"]),
        "num_return_sequences is 1000000: glimpse runs at most 256",
    );
}

#[test]
fn prompt_longer_than_the_positions() {
    let long = "a very long question ".repeat(40);
    assert_clean_error(&glimpse(&["ask", "--model", &model(), &img("wide_301x97.png"), &long]), "positions");
    assert_clean_error(
        &glimpse(&["caption", "--model", &model(), "--max-new-tokens", "500", &img("wide_301x97.png")]),
        "positions",
    );
}

#[test]
fn unknown_device() {
    assert_clean_error(
        &glimpse(&["caption", "--model", &model(), "--device", "tpu", &img("wide_301x97.png")]),
        "unknown device",
    );
}

#[test]
fn cuda_without_a_gpu_says_why() {
    if glimpse::backend::cuda_unavailable_reason().is_none() {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIP cuda_without_a_gpu_says_why: a GPU is present (tests/gpu_model.rs covers it)"
        );
        return;
    }
    assert_clean_error(
        &glimpse(&["caption", "--model", &model(), "--device", "cuda", &img("wide_301x97.png")]),
        "CUDA",
    );
}

#[test]
fn malformed_checkpoint() {
    let dir = common::tempdir();
    for f in ["config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(common::model_dir("blip2-opt-tiny").join(f), dir.path().join(f)).unwrap();
    }
    std::fs::write(dir.path().join("model.safetensors"), [0xffu8; 64]).unwrap();
    assert_clean_error(
        &glimpse(&["caption", "--model", &dir.path().display().to_string(), &img("wide_301x97.png")]),
        "model.safetensors",
    );
}

/// `caption --json` and `embed --json` name a file whose name is not UTF-8 as dataset records
/// do: `image` shows each invalid byte as `\xHH`, `image_bytes` holds the path's exact bytes
/// (base64), in a result record and in an error record alike; a UTF-8 name has no
/// `image_bytes`.
#[cfg(target_os = "linux")]
#[test]
fn json_records_name_non_utf8_files_exactly() {
    use base64::Engine;
    use std::os::unix::ffi::OsStrExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let odd = dir.join(std::ffi::OsStr::from_bytes(b"a\xff.png"));
    std::fs::copy(common::image("odd_257x181.png"), &odd).unwrap();
    let broken = dir.join(std::ffi::OsStr::from_bytes(b"b\xfe.png"));
    std::fs::write(&broken, b"not an image").unwrap();
    let plain = dir.join("c.png");
    std::fs::copy(common::image("odd_257x181.png"), &plain).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD;
    let check = |line: &serde_json::Value, want_raw: Option<&[u8]>| {
        let image = line["image"].as_str().unwrap();
        match want_raw {
            Some(raw) => {
                assert!(!image.contains('\u{fffd}'), "{line}");
                let got = b64.decode(line["image_bytes"].as_str().expect("image_bytes")).unwrap();
                assert_eq!(got, raw, "{line}");
            }
            None => assert!(line.get("image_bytes").is_none(), "{line}"),
        }
    };
    let raw = |p: &std::path::Path| p.as_os_str().as_bytes().to_vec();

    let caption = Command::new(env!("CARGO_BIN_EXE_glimpse"))
        .args(["caption", "--model", &model(), "--device", "cpu", "--json", "--max-new-tokens", "2"])
        .args([&odd, &broken, &plain])
        .output()
        .unwrap();
    assert_eq!(caption.status.code(), Some(1), "{}", stderr(&caption));
    let lines: Vec<serde_json::Value> = stdout(&caption).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3, "{}", stdout(&caption));
    assert!(lines[0]["text"].is_string() && lines[1]["error"].is_string() && lines[2]["text"].is_string());
    assert!(lines[0]["image"].as_str().unwrap().ends_with("a\\xff.png"), "{}", lines[0]);
    assert!(lines[1]["image"].as_str().unwrap().ends_with("b\\xfe.png"), "{}", lines[1]);
    check(&lines[0], Some(&raw(&odd)));
    check(&lines[1], Some(&raw(&broken)));
    check(&lines[2], None);

    let embed = Command::new(env!("CARGO_BIN_EXE_glimpse"))
        .args(["embed", "--model", &common::model_dir("clip-tiny").display().to_string(), "--device", "cpu", "--json"])
        .args([&odd, &broken, &plain])
        .output()
        .unwrap();
    assert_eq!(embed.status.code(), Some(1), "{}", stderr(&embed));
    let lines: Vec<serde_json::Value> = stdout(&embed).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3, "{}", stdout(&embed));
    assert!(lines[0]["embedding"].is_array() && lines[1]["error"].is_string() && lines[2]["embedding"].is_array());
    assert!(lines[0]["image"].as_str().unwrap().ends_with("a\\xff.png"), "{}", lines[0]);
    check(&lines[0], Some(&raw(&odd)));
    check(&lines[1], Some(&raw(&broken)));
    check(&lines[2], None);
    // The two embeddings of the same pixels are the same.
    assert_eq!(lines[0]["embedding"], lines[2]["embedding"]);

    // One question about several images: one record whose `image` lists the names and whose
    // `image_bytes` lists each path's bytes where its name is not exact (null where it is).
    let llava = common::model_dir("llava-tiny").display().to_string();
    let multi = Command::new(env!("CARGO_BIN_EXE_glimpse"))
        .args(["ask", "--model", &llava, "--device", "cpu", "--json", "--max-new-tokens", "2"])
        .arg("--image")
        .arg(&odd)
        .arg("--image")
        .arg(&plain)
        .arg("what is it?")
        .output()
        .unwrap();
    assert!(multi.status.success(), "{}", stderr(&multi));
    let line: serde_json::Value = serde_json::from_str(stdout(&multi).trim()).unwrap();
    let names = line["image"].as_array().expect("a list of names");
    assert!(names[0].as_str().unwrap().ends_with("a\\xff.png") && names[1].as_str().unwrap().ends_with("c.png"));
    let raws = line["image_bytes"].as_array().expect("image_bytes");
    assert_eq!(b64.decode(raws[0].as_str().unwrap()).unwrap(), raw(&odd), "{line}");
    assert!(raws[1].is_null(), "{line}");
    assert!(line["text"].is_string(), "{line}");
}

/// A `GLIMPSE_CPU_ISA` that names no GEMM path is one clear error naming the variable and the
/// paths there are, with a failing exit status and no panic.
#[test]
fn unknown_cpu_isa_is_a_clear_error() {
    let o = Command::new(env!("CARGO_BIN_EXE_glimpse"))
        .args(["caption", "--model", &model(), "--device", "cpu", &img("odd_257x181.png")])
        .env("GLIMPSE_CPU_ISA", "sse9")
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    assert_clean_error(&o, "GLIMPSE_CPU_ISA=sse9: unknown CPU path (expected one of avx512, avx2, portable)");
    assert!(o.stdout.is_empty(), "{}", stdout(&o));
}

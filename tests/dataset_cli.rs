//! Dataset mode of the CLI (`caption|ask|embed --input SRC --output DST`) on the tiny fixtures:
//! each record equals what the single-image command prints, JSONL and Parquet agree, a crashed
//! run resumes without loss or duplicates, and an existing output is never overwritten.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use glimpse::dataset::output::{read_records, Record};
use serde_json::Value;

/// Log-probabilities and embeddings: the same math at another batch size (as tests/padded_batch.rs).
const ABS: f64 = 1e-4;

fn glimpse(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_glimpse"));
    c.args(args).env("RUST_BACKTRACE", "1");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run glimpse")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn model(name: &str) -> String {
    common::model_dir(name).display().to_string()
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Images of mixed formats in nested folders, a corrupt PNG and a non-image; returns the image
/// paths (corrupt one included) in the sorted order a folder input yields.
fn make_images(root: &Path) -> Vec<PathBuf> {
    let sub = root.join("sub");
    let deeper = sub.join("deeper");
    std::fs::create_dir_all(&deeper).unwrap();
    let gradient = |w: u32, h: u32, k: u32| {
        image::RgbImage::from_fn(w, h, move |x, y| image::Rgb([(x * k) as u8, (y * 3) as u8, ((x + y) * 7) as u8]))
    };
    gradient(40, 30, 5).save(root.join("a.png")).unwrap();
    gradient(23, 57, 2).save(root.join("b.webp")).unwrap();
    std::fs::copy(common::image("photo_q90.jpg"), sub.join("c.jpg")).unwrap();
    gradient(64, 20, 9).save(sub.join("d.png")).unwrap();
    std::fs::write(sub.join("e_broken.png"), b"\x89PNG\r\n\x1a\nnot really a png").unwrap();
    gradient(31, 31, 1).save(deeper.join("f.png")).unwrap();
    std::fs::copy(common::image("odd_257x181.png"), deeper.join("g.PNG")).unwrap();
    std::fs::write(root.join("notes.txt"), "not an image").unwrap();
    let mut v = vec![
        root.join("a.png"),
        root.join("b.webp"),
        sub.join("c.jpg"),
        sub.join("d.png"),
        sub.join("e_broken.png"),
        deeper.join("f.png"),
        deeper.join("g.PNG"),
    ];
    v.sort();
    v
}

/// Where the corrupt image sits in [`make_images`]'s order.
fn broken_index(images: &[PathBuf]) -> usize {
    images.iter().position(|p| p.ends_with("e_broken.png")).unwrap()
}

/// `glimpse caption --json` of each image alone, in order.
fn single_captions(images: &[PathBuf]) -> Vec<Value> {
    let m = model("blip2-opt-tiny");
    let mut args = vec!["caption", "--device", "cpu", "--json", "-m", &m];
    let paths: Vec<String> = images.iter().map(|p| s(p)).collect();
    args.extend(paths.iter().map(String::as_str));
    let o = glimpse(&args, &[]);
    String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// A dataset record against the single-image `--json` record: same image, text, tokens, device
/// and error; log-probs within [`ABS`] (another batch size).
fn assert_same(got: &Record, want: &Value) {
    assert_close(got, want, ABS);
}

/// As [`assert_same`] with log-probs and embeddings within `tol`.
fn assert_close(got: &Record, want: &Value, tol: f64) {
    for field in ["image", "text", "tokens", "device", "error", "score", "id"] {
        assert_eq!(got.get(field), want.get(field), "field {field} of {got:?} vs {want}");
    }
    let nums = |v: Option<&Value>| -> Vec<f64> {
        v.and_then(Value::as_array).map(|a| a.iter().map(|x| x.as_f64().unwrap()).collect()).unwrap_or_default()
    };
    for field in ["logprobs", "embedding"] {
        let (a, b) = (nums(got.get(field)), nums(want.get(field)));
        assert_eq!(a.len(), b.len(), "{field} of {got:?}");
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= tol, "{field}: {x} vs {y} in {got:?}");
        }
    }
}

fn caption_dataset(src: &Path, dst: &Path, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let m = model("blip2-opt-tiny");
    let mut args = vec!["caption", "--device", "cpu", "-m", &m, "--input"];
    let (src, dst) = (s(src), s(dst));
    args.extend([src.as_str(), "--output", dst.as_str(), "--batch-size", "2"]);
    args.extend(extra);
    glimpse(&args, env)
}

fn keys(records: &[Record]) -> Vec<String> {
    records.iter().map(|r| r["image"].as_str().unwrap().to_string()).collect()
}

#[test]
fn folder_to_jsonl_and_parquet_equals_single_image_captions() {
    let tmp = tempfile::tempdir().unwrap();
    let images = make_images(&tmp.path().join("imgs"));
    let single = single_captions(&images);
    assert_eq!(single.len(), images.len());

    let jsonl = tmp.path().join("out.jsonl");
    let o = caption_dataset(&tmp.path().join("imgs"), &jsonl, &["--quiet"], &[]);
    // One input failed (the corrupt PNG): its record holds the error, the status says so.
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("1 of 7 inputs failed") && stderr(&o).contains("e_broken.png"), "{}", stderr(&o));
    let records = read_records(&jsonl).unwrap();
    assert_eq!(keys(&records), images.iter().map(|p| s(p)).collect::<Vec<_>>(), "sorted, recursive, images only");
    for (r, want) in records.iter().zip(&single) {
        assert_same(r, want);
    }
    let broken = &records[broken_index(&images)];
    assert!(broken["error"].as_str().unwrap().contains("e_broken.png") && broken.get("text").is_none());
    assert!(records[0]["text"].is_string() && !records[0]["tokens"].as_array().unwrap().is_empty());

    let parquet = tmp.path().join("out.parquet");
    let o = caption_dataset(&tmp.path().join("imgs"), &parquet, &["--quiet"], &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    // The same batches: the Parquet records are the JSONL ones, value for value (to the last
    // bit but one: serde_json's default float parsing can be 1 ulp off the text it reads).
    let from_parquet = read_records(&parquet).unwrap();
    assert_eq!(from_parquet.len(), records.len());
    for (p, j) in from_parquet.iter().zip(&records) {
        assert_eq!(p.keys().collect::<Vec<_>>(), j.keys().collect::<Vec<_>>());
        assert_close(p, &Value::Object(j.clone()), 1e-12);
    }
    assert!(!tmp.path().join("out.parquet.parts").exists(), "the parts folder is removed");
}

/// A crash after 2 batches (the test hook tears the third write and aborts), then `--resume`:
/// the records equal an uninterrupted run's, none lost, none twice.
fn crash_and_resume(ext: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("imgs");
    make_images(&src);
    let full = tmp.path().join(format!("full.{ext}"));
    caption_dataset(&src, &full, &["--quiet"], &[]);
    let want = read_records(&full).unwrap();

    let dst = tmp.path().join(format!("out.{ext}"));
    let o = caption_dataset(&src, &dst, &["--quiet"], &[(glimpse::dataset::CRASH_AFTER_ENV, "2")]);
    assert!(o.status.code().is_none() || o.status.code() == Some(134), "expected an abort: {:?}", o.status);
    if ext == "jsonl" {
        let text = std::fs::read_to_string(&dst).unwrap();
        assert_eq!(text.matches('\n').count(), 4, "two batches of 2 kept");
        assert!(!text.ends_with('\n'), "the torn third write is there: {text}");
    } else {
        assert!(!dst.exists(), "DST is only ever written whole");
        let parts: Vec<_> = std::fs::read_dir(tmp.path().join("out.parquet.parts")).unwrap().collect();
        assert_eq!(parts.len(), 3, "two parts and a torn temporary");
    }

    let o = caption_dataset(&src, &dst, &["--resume"], &[]);
    assert_eq!(o.status.code(), Some(1), "the corrupt image still fails: {}", stderr(&o));
    assert!(stderr(&o).contains("4 skipped as already in it"), "{}", stderr(&o));
    let got = read_records(&dst).unwrap();
    assert_eq!(keys(&got), keys(&want), "no loss, no duplicates, input order");
    for (g, w) in got.iter().zip(&want) {
        assert_same(g, &Value::Object(w.clone()));
    }
    // Resuming a finished output runs nothing and changes nothing.
    let before = std::fs::read(&dst).unwrap();
    let o = caption_dataset(&src, &dst, &["--resume"], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stderr(&o).contains("wrote 0 records") && stderr(&o).contains("7 skipped"), "{}", stderr(&o));
    if ext == "jsonl" {
        assert_eq!(std::fs::read(&dst).unwrap(), before);
    } else {
        assert_eq!(read_records(&dst).unwrap(), got);
    }
}

#[test]
fn jsonl_crash_then_resume_loses_nothing() {
    crash_and_resume("jsonl");
}

#[test]
fn parquet_crash_then_resume_loses_nothing() {
    crash_and_resume("parquet");
}

#[test]
fn existing_output_is_refused_without_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("imgs");
    make_images(&src);
    for name in ["taken.jsonl", "taken.parquet"] {
        let dst = tmp.path().join(name);
        std::fs::write(&dst, "user data").unwrap();
        let o = caption_dataset(&src, &dst, &[], &[]);
        assert_eq!(o.status.code(), Some(1));
        let err = stderr(&o);
        assert!(!err.contains("panicked"), "{err}");
        let line = err.lines().find(|l| l.starts_with("error: ")).expect("an error line");
        assert!(line.contains(&s(&dst)) && line.contains("already exists") && line.contains("--resume"), "{err}");
        assert_eq!(std::fs::read_to_string(&dst).unwrap(), "user data", "never overwritten");
    }
}

#[test]
fn jsonl_input_with_questions_runs_batches_of_different_questions() {
    let tmp = tempfile::tempdir().unwrap();
    make_images(&tmp.path().join("imgs"));
    let rows = [
        ("q1", "imgs/a.png", Some("what?")),
        ("q2", "imgs/sub/c.jpg", Some("what is the colour of the big object in the middle of this picture?")),
        ("q3", "imgs/sub/d.png", None),
        ("q4", "imgs/missing.png", Some("how many are there?")),
    ];
    let lines: Vec<String> = rows
        .iter()
        .map(|(id, p, q)| {
            let mut v = serde_json::json!({ "id": id, "image": p });
            if let Some(q) = q {
                v["question"] = Value::from(*q);
            }
            v.to_string()
        })
        .collect();
    let src = tmp.path().join("questions.jsonl");
    std::fs::write(&src, lines.join("\n") + "\n").unwrap();
    let dst = tmp.path().join("answers.jsonl");
    let m = model("blip2-opt-tiny");
    let default_q = "how many are there?";
    let o = glimpse(
        &[
            "ask",
            "--device",
            "cpu",
            "-m",
            &m,
            "--input",
            &s(&src),
            "--output",
            &s(&dst),
            "--batch-size",
            "3",
            "--question",
            default_q,
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(1), "the missing image fails: {}", stderr(&o));
    let got = read_records(&dst).unwrap();
    assert_eq!(got.len(), 4);
    for ((id, p, q), r) in rows.iter().zip(&got) {
        assert_eq!(r["id"], *id);
        assert_eq!(r["image"], *p, "the path as the input gives it");
        let path = tmp.path().join(p);
        let question = q.unwrap_or(default_q);
        let o = glimpse(&["ask", "--device", "cpu", "--json", "-m", &m, &s(&path), question], &[]);
        let mut want: Value = serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().next().unwrap()).unwrap();
        want["image"] = Value::from(*p);
        want["id"] = Value::from(*id);
        if r.get("error").is_none() {
            assert_eq!(r["question"], question);
        }
        assert_same(r, &want);
    }
}

#[test]
fn text_file_input_resolves_relative_paths_against_its_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let images = make_images(&tmp.path().join("imgs"));
    let lists = tmp.path().join("lists");
    std::fs::create_dir(&lists).unwrap();
    let absolute = s(&images[2]);
    let lines = ["../imgs/a.png", "", &absolute, "../imgs/nope.png", "../imgs/sub/deeper/f.png"];
    std::fs::write(lists.join("paths.txt"), lines.join("\n")).unwrap();
    let dst = tmp.path().join("out.jsonl");
    let o = caption_dataset(&lists.join("paths.txt"), &dst, &[], &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let got = read_records(&dst).unwrap();
    assert_eq!(keys(&got), ["../imgs/a.png", absolute.as_str(), "../imgs/nope.png", "../imgs/sub/deeper/f.png"]);
    // Joined to the list's folder as written (no normalisation, as a shell would pass them).
    let resolved: Vec<PathBuf> =
        vec![lists.join(lines[0]), images[2].clone(), lists.join(lines[3]), lists.join(lines[4])];
    for ((r, want), line) in got.iter().zip(single_captions(&resolved)).zip([0, 2, 3, 4]) {
        let mut want = want;
        want["image"] = Value::from(lines[line]);
        if let Some(e) = want.get("error").and_then(Value::as_str) {
            // The error names the file it read: the resolved path.
            assert_eq!(r["error"].as_str(), Some(e));
            continue;
        }
        assert_same(r, &want);
    }
}

#[test]
fn embed_to_parquet_equals_single_embeddings() {
    let tmp = tempfile::tempdir().unwrap();
    let images = make_images(&tmp.path().join("imgs"));
    let dst = tmp.path().join("emb.parquet");
    let m = model("clip-tiny");
    let o = glimpse(
        &[
            "embed",
            "--device",
            "cpu",
            "-m",
            &m,
            "--input",
            &s(&tmp.path().join("imgs")),
            "--output",
            &s(&dst),
            "--batch-size",
            "3",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let got = read_records(&dst).unwrap();
    let paths: Vec<String> = images.iter().map(|p| s(p)).collect();
    let mut args = vec!["embed", "--device", "cpu", "--json", "-m", &m];
    args.extend(paths.iter().map(String::as_str));
    let o = glimpse(&args, &[]);
    let want: Vec<Value> =
        String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert_same(g, w);
    }
    assert!(got[0]["embedding"].as_array().is_some_and(|e| e.len() > 1));
}

/// A Parquet table of image bytes with ids (as a Hugging Face dataset stores images): records
/// carry the ids, and `--resume` matches them.
#[test]
fn parquet_input_of_image_bytes_keyed_by_id() {
    use arrow_array::{BinaryArray, RecordBatch, StringArray};
    let tmp = tempfile::tempdir().unwrap();
    let images = make_images(&tmp.path().join("imgs"));
    let chosen = [&images[0], &images[2], &images[broken_index(&images)]];
    let bytes: Vec<Vec<u8>> = chosen.iter().map(|p| std::fs::read(p).unwrap()).collect();
    let batch = RecordBatch::try_from_iter([
        ("id", std::sync::Arc::new(StringArray::from(vec!["x", "y", "z"])) as arrow_array::ArrayRef),
        ("image", std::sync::Arc::new(BinaryArray::from_iter_values(bytes.iter()))),
    ])
    .unwrap();
    let src = tmp.path().join("table.parquet");
    let mut w =
        parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&src).unwrap(), batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    let dst = tmp.path().join("out.jsonl");
    let o = caption_dataset(&src, &dst, &[], &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let got = read_records(&dst).unwrap();
    let ids: Vec<&str> = got.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["x", "y", "z"]);
    let single = single_captions(&chosen.map(|p| p.to_path_buf()));
    for (i, (r, want)) in got.iter().zip(single).enumerate() {
        assert_eq!(r["image"], format!("{}#{i}", s(&src)), "bytes without a path are named by row");
        assert_eq!(r.get("tokens"), want.get("tokens"));
        assert_eq!(r.get("error").is_some(), want.get("error").is_some());
    }
    let o = caption_dataset(&src, &dst, &["--resume"], &[]);
    assert!(stderr(&o).contains("3 skipped"), "{}", stderr(&o));
}

/// A crash after the consolidated Parquet file was renamed into place but before its parts were
/// removed: `--resume` recognises the parts as already in DST and drops them (no duplicates).
#[test]
fn parquet_parts_left_after_consolidation_are_not_counted_twice() {
    use glimpse::dataset::output::{self, Kind};
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("out.parquet");
    let parts = tmp.path().join("out.parquet.parts");
    let columns = vec![("image".to_string(), Kind::Str), ("text".to_string(), Kind::Str)];
    let record = |i: usize| {
        let v = serde_json::json!({ "image": format!("img{i}.png"), "text": format!("caption {i}") });
        v.as_object().unwrap().clone()
    };
    let (mut sink, keys) = output::open(&dst, false, &columns, "image").unwrap();
    assert!(keys.is_empty());
    sink.write(&[record(0), record(1)]).unwrap();
    sink.write(&[record(2)]).unwrap();
    let saved = tmp.path().join("saved-parts");
    std::fs::create_dir(&saved).unwrap();
    for e in std::fs::read_dir(&parts).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, saved.join(p.file_name().unwrap())).unwrap();
    }
    sink.finish().unwrap();
    assert!(!parts.exists());
    std::fs::rename(&saved, &parts).unwrap();

    let (mut sink, keys) = output::open(&dst, true, &columns, "image").unwrap();
    let mut keys: Vec<String> = keys.into_iter().collect();
    keys.sort();
    assert_eq!(keys, ["img0.png", "img1.png", "img2.png"]);
    sink.write(&[record(3)]).unwrap();
    sink.finish().unwrap();
    let got = read_records(&dst).unwrap();
    assert_eq!(got, (0..4).map(record).collect::<Vec<_>>(), "each record once, in order");
    assert!(!parts.exists());
}

/// Ctrl-C (SIGINT) finishes the batch in flight, says how to continue and exits 130; DST holds
/// only whole records, and `--resume` completes it.
#[cfg(unix)]
#[test]
fn ctrl_c_stops_after_the_batch_in_flight_and_resume_completes() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("imgs");
    std::fs::create_dir(&src).unwrap();
    for i in 0..60 {
        std::fs::copy(common::image("wide_301x97.png"), src.join(format!("{i:03}.png"))).unwrap();
    }
    let dst = tmp.path().join("out.jsonl");
    let m = model("blip2-opt-tiny");
    let child = Command::new(env!("CARGO_BIN_EXE_glimpse"))
        .args(["caption", "--device", "cpu", "-m", &m, "--input", &s(&src), "--output", &s(&dst), "--batch-size", "1"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupt once the first record is on disk.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::fs::metadata(&dst).map_or(0, |m| m.len()) == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    assert!(stderr(&o).contains("interrupted") && stderr(&o).contains("--resume"), "{}", stderr(&o));
    let first = read_records(&dst).unwrap();
    assert!(!first.is_empty() && first.len() < 60, "stopped early: {} records", first.len());
    let o = caption_dataset(&src, &dst, &["--resume", "--quiet"], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let all = read_records(&dst).unwrap();
    let want: Vec<String> = (0..60).map(|i| s(&src.join(format!("{i:03}.png")))).collect();
    assert_eq!(keys(&all), want);
}

/// The scale: a folder of 2,000 mixed images (PNG, WebP, BMP, GIF of many sizes in 20
/// nested folders, 40 of them corrupt) captioned to Parquet in one command, crashed after 10
/// batches and resumed: 2,000 records in input order, each key once, the corrupt ones as `error`
/// records, and the first records equal the single-image command's.
#[test]
fn two_thousand_mixed_images_to_parquet_crash_and_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("imgs");
    let mut paths = Vec::new();
    for i in 0..2000u32 {
        let dir = src.join(format!("part{:02}", i % 20));
        std::fs::create_dir_all(&dir).unwrap();
        let (w, h) = (8 + (i * 7) % 41, 8 + (i * 13) % 37);
        let img =
            image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 9 + i) as u8, (y * 5) as u8, (i % 251) as u8]));
        let path = match i % 50 {
            0 => {
                let p = dir.join(format!("img{i:04}.png"));
                std::fs::write(&p, b"\x89PNG\r\n\x1a\ntruncated").unwrap();
                p
            }
            k => {
                let ext = ["png", "webp", "bmp", "gif"][k as usize % 4];
                let p = dir.join(format!("img{i:04}.{ext}"));
                img.save(&p).unwrap();
                p
            }
        };
        paths.push(path);
    }
    paths.sort();
    let dst = tmp.path().join("captions.parquet");
    let run = |extra: &[&str], env: &[(&str, &str)]| {
        let m = model("blip2-opt-tiny");
        let (src, dst) = (s(&src), s(&dst));
        let mut args = vec!["caption", "--device", "cpu", "-m", &m, "--input", &src, "--output", &dst];
        args.extend(["--batch-size", "64", "--max-new-tokens", "2"]);
        args.extend(extra);
        glimpse(&args, env)
    };
    let o = run(&["--quiet"], &[(glimpse::dataset::CRASH_AFTER_ENV, "10")]);
    assert!(o.status.code().is_none() || o.status.code() == Some(134), "expected an abort: {:?}", o.status);
    assert!(!dst.exists(), "DST is only ever written whole");
    let o = run(&["--resume"], &[]);
    assert_eq!(o.status.code(), Some(1), "the corrupt images fail: {}", stderr(&o));
    assert!(stderr(&o).contains("640 skipped as already in it"), "{}", stderr(&o));
    let got = read_records(&dst).unwrap();
    assert_eq!(keys(&got), paths.iter().map(|p| s(p)).collect::<Vec<_>>(), "every input once, in order");
    let failed: Vec<&Record> = got.iter().filter(|r| r.get("error").is_some()).collect();
    assert_eq!(failed.len(), 40, "the 40 corrupt PNGs (every 50th image) and nothing else");
    assert!(failed.iter().all(|r| r["image"].as_str().unwrap().ends_with(".png") && r.get("text").is_none()));
    let ok: Vec<&Record> = got.iter().filter(|r| r.get("error").is_none()).collect();
    assert!(ok.iter().all(|r| r["tokens"].as_array().is_some_and(|t| t.len() == 2)), "2 tokens each");
    let first: Vec<PathBuf> = ok.iter().take(3).map(|r| PathBuf::from(r["image"].as_str().unwrap())).collect();
    let m = model("blip2-opt-tiny");
    let mut args = vec!["caption", "--device", "cpu", "--json", "--max-new-tokens", "2", "-m", &m];
    let names: Vec<String> = first.iter().map(|p| s(p)).collect();
    args.extend(names.iter().map(String::as_str));
    let single = glimpse(&args, &[]);
    let lines: Vec<String> = String::from_utf8_lossy(&single.stdout).lines().map(str::to_string).collect();
    assert_eq!(lines.len(), 3, "{}", stderr(&single));
    for (line, r) in lines.iter().zip(&ok) {
        let want: Value = serde_json::from_str(line).unwrap();
        assert_same(r, &want);
    }
}

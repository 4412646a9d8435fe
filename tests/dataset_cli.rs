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
    let mut keys: Vec<String> = keys.into_iter().map(|k| String::from_utf8(k).unwrap()).collect();
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

/// Writes `columns` as a Parquet table at `path`.
fn write_parquet(path: &Path, columns: Vec<(&str, arrow_array::ArrayRef)>) {
    let batch = arrow_array::RecordBatch::try_from_iter(columns).unwrap();
    let mut w =
        parquet::arrow::ArrowWriter::try_new(std::fs::File::create(path).unwrap(), batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

/// A Parquet input with neither an id nor a question column (a plain `{path}` table, or a
/// Hugging Face `{image: {bytes, path}, label}` table) runs every row, for caption, ask and
/// embed, to JSONL and Parquet.
#[test]
fn parquet_input_without_id_or_question_columns() {
    use arrow_array::{ArrayRef, BinaryArray, Int64Array, StringArray, StructArray};
    use std::sync::Arc;
    let tmp = tempfile::tempdir().unwrap();
    let images = make_images(&tmp.path().join("imgs"));
    let chosen = [&images[0], &images[2]];
    let paths: Vec<String> = chosen.iter().map(|p| s(p)).collect();
    let plain = tmp.path().join("plain.parquet");
    write_parquet(&plain, vec![("path", Arc::new(StringArray::from(paths.clone())) as ArrayRef)]);
    let bytes: Vec<Vec<u8>> = chosen.iter().map(|p| std::fs::read(p).unwrap()).collect();
    let image = StructArray::from(vec![
        (
            Arc::new(arrow_schema::Field::new("bytes", arrow_schema::DataType::Binary, true)),
            Arc::new(BinaryArray::from_iter_values(bytes.iter())) as ArrayRef,
        ),
        (
            Arc::new(arrow_schema::Field::new("path", arrow_schema::DataType::Utf8, true)),
            Arc::new(StringArray::from(vec!["a.png", "c.jpg"])) as ArrayRef,
        ),
    ]);
    let hf = tmp.path().join("hf.parquet");
    write_parquet(&hf, vec![("image", Arc::new(image) as ArrayRef), ("label", Arc::new(Int64Array::from(vec![3, 7])))]);
    let (blip, clip) = (model("blip2-opt-tiny"), model("clip-tiny"));
    for src in [&plain, &hf] {
        for (i, cmd) in ["caption", "ask", "embed"].into_iter().enumerate() {
            for ext in ["jsonl", "parquet"] {
                let dst = tmp.path().join(format!("{}-{cmd}.{ext}", src.file_stem().unwrap().to_string_lossy()));
                let m = if cmd == "embed" { &clip } else { &blip };
                let (src_s, dst_s) = (s(src), s(&dst));
                let mut args = vec![cmd, "--device", "cpu", "-m", m, "--input", &src_s, "--output", &dst_s];
                args.extend(["--max-new-tokens", "2"].iter().take(if cmd == "embed" { 0 } else { 2 }));
                if i == 1 {
                    args.extend(["--question", "what?"]);
                }
                let o = glimpse(&args, &[]);
                let err = stderr(&o);
                assert_eq!(o.status.code(), Some(0), "{cmd} {src_s} -> {ext}: {err}");
                assert!(!err.contains("panicked"), "{err}");
                let got = read_records(&dst).unwrap();
                assert_eq!(got.len(), 2, "{cmd} {src_s} -> {ext}");
                assert!(got.iter().all(|r| r.get("error").is_none()), "{got:?}");
            }
        }
    }
}

/// One `error: ` line and no panic.
fn assert_error_line(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let line = err.lines().find(|l| l.starts_with("error: ")).unwrap_or_else(|| panic!("no error line: {err}"));
    for n in needles {
        assert!(line.contains(n), "{n:?} not in {line}");
    }
}

/// An absurd `--batch-size` is refused up front with its bound, before any output is created
/// (it used to overflow a capacity, or abort allocating 104 GB).
#[test]
fn absurd_batch_size_is_refused_with_its_bound() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("imgs");
    make_images(&src);
    let dst = tmp.path().join("out.jsonl");
    let (m, clip, img) = (model("blip2-opt-tiny"), model("clip-tiny"), s(&src.join("a.png")));
    let (src, dst_s) = (s(&src), s(&dst));
    let caption = |n: &str| {
        glimpse(&["caption", "--device", "cpu", "-m", &m, "--input", &src, "--output", &dst_s, "--batch-size", n], &[])
    };
    for n in ["18446744073709551615", "1000000000", "1025"] {
        assert_error_line(&caption(n), &["--batch-size", n, "1024"]);
        assert!(!dst.exists());
        let o = glimpse(&["embed", "--device", "cpu", "-m", &clip, "--batch-size", n, &img], &[]);
        assert_error_line(&o, &["--batch-size", n, "1024"]);
    }
    let o = caption("1024");
    assert_eq!(read_records(&dst).unwrap().len(), 7, "{}", stderr(&o));
}

/// Runs glimpse in `dir` with `stdin` piped in, killed (and the test failed) after 60 s: a
/// regression here would otherwise hang or grow without bound.
fn glimpse_in(dir: &Path, args: &[&str], env: &[(&str, &str)], stdin: Option<&[u8]>) -> Output {
    use std::io::Write;
    use std::process::Stdio;
    let mut c = Command::new(env!("CARGO_BIN_EXE_glimpse"));
    c.args(args).current_dir(dir).env("RUST_BACKTRACE", "1").stdout(Stdio::piped()).stderr(Stdio::piped());
    c.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c.spawn().expect("run glimpse");
    if let Some(data) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        let data = data.to_vec();
        std::thread::spawn(move || {
            let _ = pipe.write_all(&data);
        });
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("glimpse {args:?} ran past 60 s: {:?}", child.wait_with_output().map(|o| stderr(&o)));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// A piped list (`--input /dev/stdin`, as `ls *.png | glimpse ...`) is read once and runs every
/// input; a device as input or output is refused at once instead of read without end.
#[cfg(unix)]
#[test]
fn piped_input_is_read_once_and_devices_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let images = make_images(&tmp.path().join("imgs"));
    let list: String = images[..3].iter().map(|p| s(p) + "\n").collect();
    let m = model("blip2-opt-tiny");
    let dst = tmp.path().join("out.jsonl");
    let run = |src: &str, dst: &str, extra: &[&str], stdin: Option<&[u8]>| {
        let mut args = vec!["caption", "--device", "cpu", "-m", &m, "--max-new-tokens", "2", "--input", src];
        args.extend(["--output", dst]);
        args.extend(extra);
        glimpse_in(tmp.path(), &args, &[], stdin)
    };
    let o = run("/dev/stdin", &s(&dst), &[], Some(list.as_bytes()));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(keys(&read_records(&dst).unwrap()), images[..3].iter().map(|p| s(p)).collect::<Vec<_>>());

    let o = run("/dev/zero", "zero.jsonl", &[], None);
    assert_error_line(&o, &["/dev/zero", "not a regular file"]);
    for dev in ["/dev/full", "/dev/zero"] {
        let o = run(&s(&tmp.path().join("imgs")), dev, &["--resume"], None);
        assert_error_line(&o, &[dev, "not a regular file"]);
    }
}

/// `--output` naming the input itself (another spelling, or a hard link) is refused: the run
/// would read its own records back forever.
#[test]
fn output_that_is_the_input_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    make_images(&tmp.path().join("imgs"));
    let src = tmp.path().join("list.jsonl");
    std::fs::write(&src, "{\"image\": \"imgs/a.png\"}\n").unwrap();
    std::fs::hard_link(&src, tmp.path().join("link.jsonl")).unwrap();
    let m = model("blip2-opt-tiny");
    for dst in ["./list.jsonl", "link.jsonl"] {
        let args = ["caption", "--device", "cpu", "-m", &m, "--input", "list.jsonl", "--output", dst, "--resume"];
        let o = glimpse_in(tmp.path(), &args, &[], None);
        assert_error_line(&o, &[dst, "is the input file", "list.jsonl"]);
    }
    assert_eq!(std::fs::read_to_string(&src).unwrap(), "{\"image\": \"imgs/a.png\"}\n");
}

/// A crash after `batches` batches of 1, then `--resume`: the image/id pairs of the records,
/// which must be the input's rows, each once, in order.
fn crash_then_resume(dir: &Path, src: &str, dst: &str, resume_src: &str, batches: &str) -> Vec<(String, Value)> {
    let m = model("blip2-opt-tiny");
    let run = |src: &str, extra: &[&str], env: &[(&str, &str)]| {
        let mut args = vec!["caption", "--device", "cpu", "-m", &m, "--max-new-tokens", "1", "--input", src];
        args.extend(["--output", dst, "--batch-size", "1", "--quiet"]);
        args.extend(extra);
        glimpse_in(dir, &args, env, None)
    };
    let o = run(src, &[], &[(glimpse::dataset::CRASH_AFTER_ENV, batches)]);
    assert!(o.status.code().is_none() || o.status.code() == Some(134), "expected an abort: {}", stderr(&o));
    let o = run(resume_src, &["--resume"], &[]);
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    let got = read_records(&dir.join(dst)).unwrap();
    got.iter()
        .map(|r| (r["image"].as_str().unwrap().to_string(), r.get("id").cloned().unwrap_or(Value::Null)))
        .collect()
}

/// `--resume` after a crash loses no input that shares its key with another: duplicate ids in a
/// table, and file names that read the same as text (non-UTF-8 bytes).
#[test]
fn resume_keeps_inputs_that_share_a_key() {
    let tmp = tempfile::tempdir().unwrap();
    make_images(&tmp.path().join("imgs"));
    let rows = [("x", "imgs/a.png"), ("x", "imgs/b.webp"), ("y", "imgs/sub/c.jpg"), ("x", "imgs/sub/d.png")];
    let lines: String =
        rows.iter().map(|(id, p)| serde_json::json!({ "id": id, "image": p }).to_string() + "\n").collect();
    std::fs::write(tmp.path().join("dup.jsonl"), lines).unwrap();
    let got = crash_then_resume(tmp.path(), "dup.jsonl", "dup-out.jsonl", "dup.jsonl", "2");
    let want: Vec<(String, Value)> = rows.iter().map(|(id, p)| (p.to_string(), Value::from(*id))).collect();
    assert_eq!(got, want);

    #[cfg(target_os = "linux")]
    {
        use std::os::unix::ffi::OsStrExt;
        let dir = tmp.path().join("odd");
        std::fs::create_dir(&dir).unwrap();
        for b in [0xfe, 0xff] {
            let name = [b'a', b, b'.', b'p', b'n', b'g'];
            std::fs::copy(common::image("odd_257x181.png"), dir.join(std::ffi::OsStr::from_bytes(&name))).unwrap();
        }
        let got = crash_then_resume(tmp.path(), "odd", "odd-out.jsonl", "odd", "1");
        assert_eq!(got.len(), 2, "{got:?}");
    }
}

/// `--resume` writes no input twice when some rows have an id and others do not, when a
/// Parquet id column is float or bool, or when the input folder is spelled another way.
#[test]
fn resume_never_duplicates_records() {
    use arrow_array::{ArrayRef, BooleanArray, Float64Array, StringArray};
    use std::sync::Arc;
    let tmp = tempfile::tempdir().unwrap();
    let images = make_images(&tmp.path().join("imgs"));
    let rows = [Some("p"), None, None, Some("q")];
    let paths = ["imgs/a.png", "imgs/b.webp", "imgs/sub/c.jpg", "imgs/sub/d.png"];
    let lines: String = rows
        .iter()
        .zip(paths)
        .map(|(id, p)| {
            let mut v = serde_json::json!({ "image": p });
            if let Some(id) = id {
                v["id"] = Value::from(*id);
            }
            v.to_string() + "\n"
        })
        .collect();
    std::fs::write(tmp.path().join("mixed.jsonl"), lines).unwrap();
    let got = crash_then_resume(tmp.path(), "mixed.jsonl", "mixed-out.jsonl", "mixed.jsonl", "2");
    assert_eq!(got.iter().map(|g| g.0.as_str()).collect::<Vec<_>>(), paths);

    let ids: [(&str, ArrayRef); 2] = [
        ("float", Arc::new(Float64Array::from(vec![1.5, 2.5, 3.5, 4.5]))),
        ("bool", Arc::new(BooleanArray::from(vec![true, false, true, false]))),
    ];
    for (name, id) in ids {
        let src = format!("{name}.parquet");
        let path = Arc::new(StringArray::from(paths.to_vec())) as ArrayRef;
        write_parquet(&tmp.path().join(&src), vec![("id", id), ("path", path)]);
        let got = crash_then_resume(tmp.path(), &src, &format!("{name}-out.parquet"), &src, "2");
        assert_eq!(got.iter().map(|g| g.0.as_str()).collect::<Vec<_>>(), paths, "{name}");
        assert!(got.iter().all(|g| g.1.is_string()), "{name} ids are kept: {got:?}");
    }

    let abs = s(&tmp.path().join("imgs"));
    let got = crash_then_resume(tmp.path(), "./imgs", "folder-out.jsonl", &abs, "3");
    assert_eq!(got.len(), images.len(), "{got:?}");
}

/// A second run on an output another run is writing is refused, naming it; the lock goes with
/// the run that held it.
#[cfg(unix)]
#[test]
fn a_second_writer_of_an_output_is_refused() {
    use std::os::unix::io::AsRawFd;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("imgs");
    make_images(&src);
    let dst = tmp.path().join("out.jsonl");
    let lock = std::fs::File::create(tmp.path().join("out.jsonl.lock")).unwrap();
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }, 0);
    let o = caption_dataset(&src, &dst, &["--max-new-tokens", "1"], &[]);
    assert_error_line(&o, &["another glimpse run", &s(&dst)]);
    assert!(std::fs::metadata(&dst).map_or(true, |m| m.len() == 0), "nothing written");
    drop(lock);
    std::fs::remove_file(&dst).ok();
    // A process another test forks in the meantime shares the lock until it execs: retry then.
    let mut o = caption_dataset(&src, &dst, &["--max-new-tokens", "1"], &[]);
    for _ in 0..20 {
        if !stderr(&o).contains("another glimpse run") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        o = caption_dataset(&src, &dst, &["--max-new-tokens", "1"], &[]);
    }
    assert_eq!(o.status.code(), Some(1), "the corrupt image fails: {}", stderr(&o));
    assert_eq!(read_records(&dst).unwrap().len(), 7, "{}", stderr(&o));
    assert!(!tmp.path().join("out.jsonl.lock").exists(), "the lock file is removed at the end");
}

/// `--resume` refuses an output another command wrote (or one rewritten with other column
/// types) before running any input.
#[test]
fn resume_refuses_an_incompatible_output_up_front() {
    use arrow_array::cast::AsArray;
    use arrow_array::{Array, ArrayRef, ListArray, RecordBatch};
    use std::sync::Arc;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("imgs");
    make_images(&src);
    let clip = model("clip-tiny");
    for ext in ["jsonl", "parquet"] {
        let dst = tmp.path().join(format!("captions.{ext}"));
        caption_dataset(&src, &dst, &["--max-new-tokens", "1", "--quiet"], &[]);
        let before = std::fs::read(&dst).unwrap();
        let args = ["embed", "--device", "cpu", "-m", &clip, "--input", &s(&src), "--output", &s(&dst), "--resume"];
        let o = glimpse(&args, &[]);
        assert_error_line(&o, &[&s(&dst), "--resume"]);
        assert_eq!(std::fs::read(&dst).unwrap(), before, "{ext} unchanged");
        assert!(!tmp.path().join(format!("captions.{ext}.parts")).exists(), "nothing ran");
    }
    // As pyarrow re-saves it: list items named `element`.
    let dst = tmp.path().join("captions.parquet");
    let batches: Vec<RecordBatch> =
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&dst).unwrap())
            .unwrap()
            .build()
            .unwrap()
            .map(Result::unwrap)
            .collect();
    let renamed: Vec<(String, ArrayRef)> = batches[0]
        .schema()
        .fields()
        .iter()
        .zip(batches[0].columns())
        .map(|(f, c)| {
            let c = match c.as_list_opt::<i32>() {
                Some(l) => {
                    let item = Arc::new(arrow_schema::Field::new("element", l.value_type(), true));
                    Arc::new(ListArray::new(item, l.offsets().clone(), l.values().clone(), l.nulls().cloned()))
                }
                None => c.clone(),
            };
            (f.name().clone(), c as ArrayRef)
        })
        .collect();
    std::fs::remove_file(&dst).unwrap();
    write_parquet(&dst, renamed.iter().map(|(n, c)| (n.as_str(), c.clone())).collect());
    std::fs::remove_dir_all(src.join("sub")).unwrap();
    for i in 0..3 {
        std::fs::copy(common::image("odd_257x181.png"), src.join(format!("new{i}.png"))).unwrap();
    }
    let o = caption_dataset(&src, &dst, &["--max-new-tokens", "1", "--resume"], &[]);
    assert_error_line(&o, &[&s(&dst), "other columns"]);
    assert!(!tmp.path().join("captions.parquet.parts").exists(), "nothing ran");
}

/// In dataset `ask`, each row succeeds or fails alone: a question past the positions and a row
/// without a question fail only their own records, not the rest of their batch.
#[test]
fn ask_rows_succeed_or_fail_alone() {
    let tmp = tempfile::tempdir().unwrap();
    make_images(&tmp.path().join("imgs"));
    let long = "a very long question ".repeat(40);
    let rows = [
        serde_json::json!({ "image": "imgs/a.png", "question": "what?" }),
        serde_json::json!({ "image": "imgs/sub/c.jpg", "question": long }),
        serde_json::json!({ "image": "imgs/sub/d.png" }),
        serde_json::json!({ "image": "imgs/b.webp", "question": "how many?" }),
    ];
    let src = tmp.path().join("q.jsonl");
    std::fs::write(&src, rows.iter().map(|r| r.to_string() + "\n").collect::<String>()).unwrap();
    let dst = tmp.path().join("a.jsonl");
    let m = model("blip2-opt-tiny");
    let args = ["ask", "--device", "cpu", "-m", &m, "--input", &s(&src), "--output", &s(&dst), "--batch-size", "4"];
    let o = glimpse(&args, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let got = read_records(&dst).unwrap();
    assert_eq!(got.len(), 4);
    let error = |i: usize| got[i].get("error").and_then(Value::as_str).unwrap_or_default().to_string();
    assert!(error(1).contains("positions"), "{:?}", got[1]);
    assert!(error(2).contains("no question"), "{:?}", got[2]);
    for i in [0, 3] {
        assert!(got[i].get("error").is_none() && got[i]["text"].is_string(), "{:?}", got[i]);
        let path = tmp.path().join(rows[i]["image"].as_str().unwrap());
        let o = glimpse(
            &["ask", "--device", "cpu", "--json", "-m", &m, &s(&path), rows[i]["question"].as_str().unwrap()],
            &[],
        );
        let mut want: Value = serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().next().unwrap()).unwrap();
        want["image"] = rows[i]["image"].clone();
        assert_same(&got[i], &want);
    }
}

/// A consolidation temporary left by a writer killed while consolidating (`DST.tmp-PID`) is
/// removed by the next run on that output.
#[test]
fn parquet_consolidation_leftovers_are_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("imgs");
    make_images(&src);
    let dst = tmp.path().join("out.parquet");
    let stale = tmp.path().join("out.parquet.tmp-4194303");
    std::fs::write(&stale, b"PAR1 half written").unwrap();
    let other = tmp.path().join("out.parquet.tmp-notes");
    std::fs::write(&other, b"user file").unwrap();
    let o = caption_dataset(&src, &dst, &["--max-new-tokens", "1"], &[]);
    assert_eq!(read_records(&dst).unwrap().len(), 7, "{}", stderr(&o));
    assert!(!stale.exists(), "the stale temporary is removed");
    assert!(other.exists(), "a file that is not one is kept");
}

/// Dataset flags without `--input` are refused (a usage error, or one line naming the flag)
/// instead of silently ignored.
#[test]
fn dataset_flags_without_input_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let img = s(&common::image("wide_301x97.png"));
    let (m, clip) = (model("blip2-opt-tiny"), model("clip-tiny"));
    let dst = s(&tmp.path().join("out.jsonl"));
    for flags in [&["--output", dst.as_str()][..], &["--resume"], &["--path-column", "file"]] {
        let caption = ["caption", "--device", "cpu", "-m", &m, "--max-new-tokens", "1", &img];
        let embed = ["embed", "--device", "cpu", "-m", &clip, &img];
        for base in [&caption[..], &embed[..]] {
            let o = glimpse(&[base, flags].concat(), &[]);
            let err = stderr(&o);
            assert!(matches!(o.status.code(), Some(1 | 2)) && !err.contains("panicked"), "{flags:?}: {err}");
            assert!(err.starts_with("error: ") && err.contains("--input") && o.stdout.is_empty(), "{flags:?}: {err}");
        }
    }
    assert!(!tmp.path().join("out.jsonl").exists());
}

/// Parquet inputs compressed with every codec writers use (Polars' default is zstd) and with
/// dictionary-encoded string columns are read.
#[test]
fn parquet_input_codecs_and_dictionary_columns() {
    use arrow_array::{ArrayRef, DictionaryArray, RecordBatch, StringArray};
    use parquet::basic::{BrotliLevel, Compression, GzipLevel, ZstdLevel};
    use std::sync::Arc;
    let tmp = tempfile::tempdir().unwrap();
    let images = make_images(&tmp.path().join("imgs"));
    let paths: Vec<String> = [&images[0], &images[2]].iter().map(|p| s(p)).collect();
    let dict: DictionaryArray<arrow_array::types::Int32Type> = paths.iter().map(String::as_str).collect();
    let batch = RecordBatch::try_from_iter([
        ("path", Arc::new(dict) as ArrayRef),
        ("id", Arc::new(StringArray::from(vec!["p", "q"])) as ArrayRef),
    ])
    .unwrap();
    for codec in [
        Compression::UNCOMPRESSED,
        Compression::SNAPPY,
        Compression::ZSTD(ZstdLevel::default()),
        Compression::GZIP(GzipLevel::default()),
        Compression::BROTLI(BrotliLevel::default()),
        Compression::LZ4_RAW,
        Compression::LZ4,
    ] {
        let src = tmp.path().join(format!("{codec:?}.parquet").replace(['(', ')', ' '], "_"));
        let props = parquet::file::properties::WriterProperties::builder().set_compression(codec).build();
        let file = std::fs::File::create(&src).unwrap();
        let mut w = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), Some(props)).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        let dst = src.with_extension("jsonl");
        let o = caption_dataset(&src, &dst, &["--max-new-tokens", "1"], &[]);
        assert_eq!(o.status.code(), Some(0), "{codec:?}: {}", stderr(&o));
        let got = read_records(&dst).unwrap();
        assert_eq!(keys(&got), paths, "{codec:?}");
        assert_eq!(got.iter().map(|r| r["id"].as_str().unwrap()).collect::<Vec<_>>(), ["p", "q"]);
    }
}

/// `--batch-size` times the sequences each input runs is bounded too, before anything runs.
#[test]
fn batch_times_beams_is_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("imgs");
    make_images(&src);
    let dst = tmp.path().join("out.jsonl");
    let (m, src_s, dst_s) = (model("blip2-opt-tiny"), s(&src), s(&dst));
    let args = ["caption", "--device", "cpu", "-m", &m, "--input", &src_s, "--output", &dst_s];
    let o = glimpse(&[&args[..], &["--batch-size", "1024", "--num-beams", "256"]].concat(), &[]);
    assert_error_line(&o, &["--batch-size 1024 inputs x 256 sequences each", "4096", "lower --batch-size"]);
    assert!(!dst.exists());
}

/// The (`image`, exact path bytes) of each record of `path`: `image_bytes` decoded where a
/// record has it, else None.
fn images_and_bytes(path: &Path) -> Vec<(String, Option<Vec<u8>>)> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    read_records(path)
        .unwrap()
        .iter()
        .map(|r| {
            let raw = r.get("image_bytes").map(|b| b64.decode(b.as_str().expect("image_bytes is text")).unwrap());
            (r["image"].as_str().unwrap().to_string(), raw)
        })
        .collect()
}

/// File names that are not UTF-8 round-trip exactly: `image` shows each invalid byte as `\xHH`,
/// `image_bytes` holds the path's exact bytes (base64), and `--resume` matches by those bytes.
/// Two names that differ only in an invalid byte, and a UTF-8 name that reads the same as one of
/// them (`a\xff.png` with a real backslash), are each written exactly once: in a full run, a
/// `--resume` of it, and a crash then `--resume`, to JSONL and Parquet, from a folder and a list.
#[cfg(target_os = "linux")]
#[test]
fn non_utf8_file_names_round_trip_and_resume_exactly_once() {
    use std::os::unix::ffi::OsStrExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("odd");
    std::fs::create_dir(&dir).unwrap();
    let names: [&[u8]; 4] = [b"a\xfe.png", b"a\xff.png", b"a\\xff.png", b"b.png"];
    for name in names {
        std::fs::copy(common::image("odd_257x181.png"), dir.join(std::ffi::OsStr::from_bytes(name))).unwrap();
    }
    // Folder order: by bytes (`\` is 0x5c).
    let want: Vec<(String, Option<Vec<u8>>)> = vec![
        ("odd/a\\xff.png".into(), None),
        ("odd/a\\xfe.png".into(), Some(b"odd/a\xfe.png".to_vec())),
        ("odd/a\\xff.png".into(), Some(b"odd/a\xff.png".to_vec())),
        ("odd/b.png".into(), None),
    ];
    let m = model("blip2-opt-tiny");
    let run = |src: &str, dst: &str, extra: &[&str], env: &[(&str, &str)]| {
        let mut args = vec!["caption", "--device", "cpu", "-m", &m, "--max-new-tokens", "1", "--input", src];
        args.extend(["--output", dst, "--batch-size", "1", "--quiet"]);
        args.extend(extra);
        glimpse_in(tmp.path(), &args, env, None)
    };
    let list: Vec<u8> = want
        .iter()
        .flat_map(|(t, raw)| [raw.clone().unwrap_or(t.clone().into_bytes()), b"\n".to_vec()].concat())
        .collect();
    std::fs::write(tmp.path().join("list.txt"), list).unwrap();
    for (src, ext) in [("odd", "jsonl"), ("odd", "parquet"), ("list.txt", "jsonl"), ("list.txt", "parquet")] {
        let what = format!("{src} -> {ext}");
        let full = format!("full-{src}.{ext}");
        let o = run(src, &full, &[], &[]);
        assert_eq!(o.status.code(), Some(0), "{what}: {}", stderr(&o));
        assert_eq!(images_and_bytes(&tmp.path().join(&full)), want, "{what}: a full run");
        let o = run(src, &full, &["--resume"], &[]);
        assert_eq!(o.status.code(), Some(0), "{what}: {}", stderr(&o));
        assert!(!stderr(&o).contains("panicked"), "{what}: {}", stderr(&o));
        assert_eq!(images_and_bytes(&tmp.path().join(&full)), want, "{what}: --resume of a finished output");

        for batches in ["1", "3"] {
            let dst = format!("crash-{batches}-{src}.{ext}");
            let o = run(src, &dst, &[], &[(glimpse::dataset::CRASH_AFTER_ENV, batches)]);
            assert!(o.status.code().is_none() || o.status.code() == Some(134), "expected an abort: {}", stderr(&o));
            let o = run(src, &dst, &["--resume"], &[]);
            assert_eq!(o.status.code(), Some(0), "{what}: {}", stderr(&o));
            assert_eq!(images_and_bytes(&tmp.path().join(&dst)), want, "{what}: crash after {batches}, then --resume");
        }
    }
    // A JSONL output of UTF-8 names is what it was: no `image_bytes` field.
    let text = std::fs::read_to_string(tmp.path().join("full-odd.jsonl")).unwrap();
    let first: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert!(first.get("image_bytes").is_none(), "{first}");
    // A record whose `image_bytes` is not base64 is refused by --resume, naming it.
    let bad = text.replacen("\"image_bytes\":\"", "\"image_bytes\":\"!", 1);
    std::fs::write(tmp.path().join("bad.jsonl"), bad).unwrap();
    let o = run("odd", "bad.jsonl", &["--resume"], &[]);
    assert_error_line(&o, &["bad.jsonl line 2", "image_bytes", "not base64"]);
}

/// A Parquet table of one `path` column holding `rows` varied strings: snappy-compressed and
/// without a dictionary, so its one column chunk is one data page. Returns the file's bytes.
fn one_page_parquet(path: &Path, rows: usize) -> Vec<u8> {
    use arrow_array::{ArrayRef, StringArray};
    use parquet::file::properties::WriterProperties;
    let paths: Vec<String> =
        (0..rows as u64).map(|i| format!("imgs/{:016x}.png", i.wrapping_mul(0x9e37_79b9_7f4a_7c15))).collect();
    let batch =
        arrow_array::RecordBatch::try_from_iter([("path", std::sync::Arc::new(StringArray::from(paths)) as ArrayRef)])
            .unwrap();
    let props = WriterProperties::builder()
        .set_compression(parquet::basic::Compression::SNAPPY)
        .set_dictionary_enabled(false)
        .build();
    let mut w = parquet::arrow::ArrowWriter::try_new(std::fs::File::create(path).unwrap(), batch.schema(), Some(props))
        .unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    std::fs::read(path).unwrap()
}

/// Thrift compact integers, written independently of glimpse's reader.
fn varint(mut v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return out;
        }
        out.push(b | 0x80);
    }
}

fn zigzag(v: i64) -> Vec<u8> {
    varint(((v << 1) ^ (v >> 63)) as u64)
}

/// The integer at the start of `b` and its length in bytes.
fn read_zigzag(b: &[u8]) -> (i64, usize) {
    let (mut v, mut n) = (0u64, 0);
    while {
        v |= u64::from(b[n] & 0x7f) << (7 * n);
        n += 1;
        b[n - 1] & 0x80 != 0
    } {}
    ((v >> 1) as i64 ^ -((v & 1) as i64), n)
}

/// `file` (a Parquet file's bytes) with `old` replaced by `new` in its footer, where `old`
/// occurs exactly once; the footer length is rewritten.
fn patch_footer(file: &[u8], old: &[u8], new: &[u8]) -> Vec<u8> {
    let len = file.len();
    let footer_len = u32::from_le_bytes(file[len - 8..len - 4].try_into().unwrap()) as usize;
    let start = len - 8 - footer_len;
    let footer = &file[start..len - 8];
    let hits: Vec<usize> = footer.windows(old.len()).enumerate().filter(|(_, w)| *w == old).map(|(i, _)| i).collect();
    assert_eq!(hits.len(), 1, "{old:02x?} must be once in the footer");
    let footer = [&footer[..hits[0]], new, &footer[hits[0] + old.len()..]].concat();
    [&file[..start], &footer, &(footer.len() as u32).to_le_bytes(), b"PAR1"].concat()
}

/// Runs glimpse in `dir` with at most `limit` bytes of address space (and few threads and
/// malloc arenas, which reserve address space they do not use), killed after 60 s.
#[cfg(target_os = "linux")]
fn glimpse_limited(dir: &Path, args: &[&str], limit: u64) -> Output {
    use std::os::unix::process::CommandExt;
    let mut c = Command::new(env!("CARGO_BIN_EXE_glimpse"));
    c.args(args).current_dir(dir).env("MALLOC_ARENA_MAX", "2").env("RAYON_NUM_THREADS", "2");
    // SAFETY: only setrlimit (async-signal-safe) runs between fork and exec.
    unsafe {
        c.pre_exec(move || {
            let r = libc::rlimit { rlim_cur: limit, rlim_max: limit };
            if libc::setrlimit(libc::RLIMIT_AS, &r) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    common::output_within(&mut c, 60)
}

/// A Parquet input declaring sizes it does not hold is refused before the parquet crate
/// allocates them, naming the file, the column, the size and the limit, in 1 GiB of address
/// space (the crate used to reserve 2 GiB for a page header's uncompressed size and abort, to
/// panic on a negative column offset, and to abort reserving a footer list of 2^31 items); the
/// same run on an honest table passes in that space.
#[cfg(target_os = "linux")]
#[test]
fn hostile_parquet_sizes_are_refused_before_allocating() {
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let tmp = tempfile::tempdir().unwrap();
    make_images(&tmp.path().join("imgs"));
    let m = model("blip2-opt-tiny");
    let limit = 1 << 30;
    let run = |src: &str| {
        let dst = format!("{src}.jsonl");
        let args = ["caption", "--device", "cpu", "-m", &m, "--max-new-tokens", "1", "--input", src, "--output", &dst];
        glimpse_limited(tmp.path(), &args, limit)
    };
    write_parquet(
        &tmp.path().join("honest.parquet"),
        vec![("path", std::sync::Arc::new(arrow_array::StringArray::from(vec!["imgs/a.png", "imgs/b.webp"])) as _)],
    );
    let o = run("honest.parquet");
    assert_eq!(o.status.code(), Some(0), "an honest table runs within the limit: {}", stderr(&o));

    let clean = one_page_parquet(&tmp.path().join("clean.parquet"), 40);
    let meta = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(tmp.path().join("clean.parquet")).unwrap())
        .unwrap()
        .metadata()
        .clone();
    let col = meta.row_group(0).column(0);
    assert!(col.dictionary_page_offset().is_none());

    // A page header claiming 2^31 - 1 bytes uncompressed: parquet-rs writes its fields in order
    // (type, uncompressed size, compressed size, ...); the header grows by the longer integer and
    // the page's compressed size shrinks by as much, so every offset of the file still holds.
    let at = col.data_page_offset() as usize;
    assert_eq!(&clean[at..at + 3], &[0x15u8, 0x00, 0x15][..], "a data page header");
    let (_, ulen) = read_zigzag(&clean[at + 3..]);
    assert_eq!(clean[at + 3 + ulen], 0x15);
    let (compressed, clen) = read_zigzag(&clean[at + 4 + ulen..]);
    let huge = zigzag(i32::MAX.into());
    let grow = huge.len() - ulen;
    let shrunk = zigzag(compressed - grow as i64);
    assert_eq!(shrunk.len(), clen, "the compressed size keeps its length");
    // The rest of the header: the data page header struct (field 5) of i32 fields, then the end.
    let mut end = at + 4 + ulen + clen;
    assert_eq!(clean[end], 0x2c, "a data page header struct");
    end += 1;
    while clean[end] != 0 {
        assert_eq!(clean[end] & 0x0f, 5, "i32 fields only (no statistics)");
        end += 1 + read_zigzag(&clean[end + 1..]).1;
    }
    assert_eq!(clean[end + 1], 0, "the header's end");
    let data = end + 2;
    let page =
        [&clean[..at + 3], &huge, &[0x15], &shrunk, &clean[at + 4 + ulen + clen..data], &clean[data + grow..]].concat();
    assert_eq!(page.len(), clean.len());
    std::fs::write(tmp.path().join("page.parquet"), page).unwrap();
    assert_error_line(
        &run("page.parquet"),
        &["page.parquet", "column `path`", "2147483647 bytes uncompressed", "256 MiB"],
    );

    // Column chunks placed outside the file: a negative offset, and a huge length.
    let size = zigzag(col.compressed_size());
    let here = [&[0x16], &size[..], &[0x26], &zigzag(col.data_page_offset())[..]].concat();
    let negative = [&[0x16], &size[..], &[0x26], &zigzag(-1)[..]].concat();
    std::fs::write(tmp.path().join("negative.parquet"), patch_footer(&clean, &here, &negative)).unwrap();
    assert_error_line(
        &run("negative.parquet"),
        &["negative.parquet", "column `path`", "at offset -1", "outside the file"],
    );
    let long = [&[0x16], &zigzag(1 << 40)[..], &[0x26], &zigzag(col.data_page_offset())[..]].concat();
    std::fs::write(tmp.path().join("long.parquet"), patch_footer(&clean, &here, &long)).unwrap();
    assert_error_line(
        &run("long.parquet"),
        &["long.parquet", "column `path`", "declares 1099511627776 bytes", "outside the file"],
    );

    // A footer declaring 2^31 - 1 schema elements in the 0 bytes left of it.
    let footer = [&[0x15u8, 0x02, 0x19, 0xfc][..], &varint(i32::MAX as u64)].concat();
    let file = [&b"PAR1"[..], &footer, &(footer.len() as u32).to_le_bytes(), b"PAR1"].concat();
    std::fs::write(tmp.path().join("footer.parquet"), file).unwrap();
    assert_error_line(&run("footer.parquet"), &["footer.parquet", "footer", "a list of 2147483647 items"]);

    // The library refuses them when the input is opened, before any row is read.
    for name in ["page", "negative", "long", "footer"] {
        let src = tmp.path().join(format!("{name}.parquet"));
        let err = glimpse::dataset::input::open(&src, &Default::default()).err().map(|e| e.to_string());
        assert!(err.as_deref().is_some_and(|e| e.contains(&s(&src))), "{name}: {err:?}");
    }
}

/// A panic while the input is read (a decoder's, on a corrupt file) fails the run with an error
/// naming it, keeping the records written before; it used to end the inputs early and report a
/// complete run (exit 0, the remaining inputs never written).
#[test]
fn a_panic_while_reading_the_input_is_an_error() {
    use glimpse::dataset::input::Item;
    let tmp = tempfile::tempdir().unwrap();
    make_images(&tmp.path().join("imgs"));
    let model = glimpse::EmbedModel::load(common::model_dir("clip-tiny"), glimpse::Device::Cpu).unwrap();
    let task = glimpse::dataset::Task::Embed { model: &model };
    let mut input = glimpse::dataset::input::open(&tmp.path().join("imgs"), &Default::default()).unwrap();
    let items = std::mem::replace(&mut input.items, Box::new(std::iter::empty()));
    let exploding = std::iter::from_fn(|| -> Option<glimpse::Result<Item>> { panic!("the decoder exploded") });
    input.items = Box::new(items.take(2).chain(exploding));
    let opts = glimpse::dataset::RunOptions { batch_size: 1, resume: false, progress: false };
    let dst = tmp.path().join("out.jsonl");
    let stop = std::sync::atomic::AtomicBool::new(false);
    let err = glimpse::dataset::run(&task, input, &dst, &opts, &stop).err().map(|e| e.to_string());
    assert!(err.as_deref().is_some_and(|e| e.contains("the decoder exploded") && e.contains("--resume")), "{err:?}");
    assert_eq!(read_records(&dst).unwrap().len(), 2, "the records before it are kept");
}

/// An unusable `GLIMPSE_CPU_ISA` stops a dataset run before any input is read: one clear error,
/// no output file (not one error record per input).
#[test]
fn unknown_cpu_isa_fails_a_dataset_run_up_front() {
    let tmp = tempfile::tempdir().unwrap();
    make_images(&tmp.path().join("imgs"));
    let out = tmp.path().join("out.jsonl");
    let o = caption_dataset(&tmp.path().join("imgs"), &out, &["--quiet"], &[("GLIMPSE_CPU_ISA", "sse9")]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("GLIMPSE_CPU_ISA=sse9: unknown CPU path"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    assert!(!out.exists(), "no output is written");
}

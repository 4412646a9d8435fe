//! Labelling whole datasets: captions, answers or embeddings of every image of a folder, a list
//! or a table, written to JSONL or Parquet (`glimpse caption|ask|embed --input SRC --output DST`).
//!
//! The pipeline: one thread reads the input and cuts it into batches; each batch's images are
//! read, decoded and preprocessed in parallel on rayon's global pool (idle while a GPU runs the
//! model; shared with the CPU executor's own parallel loops otherwise, so the cores are never
//! oversubscribed); ready batches wait in a bounded queue ([`QUEUE_BATCHES`]), so memory stays
//! flat for any dataset size while the model runs the batch before. The model runs on the
//! calling thread, one batch at a time, and each batch's records are written durably
//! ([`output`]) before the next starts.

pub mod input;
pub mod output;
pub mod parquet_check;

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::sync_channel;
use std::time::Instant;

use rayon::prelude::*;
use serde_json::{json, Value};

use crate::api::{EmbedModel, Model, Output};
use crate::error::{Error, Result};
use crate::generate::GenerateOptions;
use crate::image::PixelValues;
use input::{ImageRef, Input, Item};
use output::{Columns, Keys, Kind, Record};

/// Preprocessed batches allowed to wait for the model (besides the one being prepared).
pub const QUEUE_BATCHES: usize = 2;

/// The largest `--batch-size`: a batch's images are held decoded and preprocessed (a few MB
/// each), [`QUEUE_BATCHES`] more wait behind it, and the model's activations grow with it too.
pub const MAX_BATCH: usize = 1024;

/// The most sequences one model batch of a dataset run holds: `--batch-size` inputs times the
/// sequences each runs (`--num-beams`, `--num-return-sequences`), each with its own cache and
/// vocabulary-size scores.
pub const MAX_BATCH_SEQUENCES: usize = 4096;

/// `n` as a `--batch-size`, refused past [`MAX_BATCH`] or at 0 with the reason.
pub fn batch_size(n: u64) -> Result<usize> {
    check_batch("--batch-size", n)
}

/// `n` as the batch size of option `flag`, refused past [`MAX_BATCH`] or at 0 with the reason.
pub fn check_batch(flag: &str, n: u64) -> Result<usize> {
    match usize::try_from(n) {
        Ok(b @ 1..=MAX_BATCH) => Ok(b),
        _ => Err(Error::InvalidInput(format!(
            "{flag} {n} is out of range: it must be 1 to {MAX_BATCH} (each batch's images are held preprocessed in memory, a few MB each, with up to {QUEUE_BATCHES} more batches queued); larger batches gain nothing once the device is busy"
        ))),
    }
}

/// Test hook: after this many batches are written, the next write is torn and the process
/// aborts, as a crash (power loss, OOM kill) would leave the output.
pub const CRASH_AFTER_ENV: &str = "GLIMPSE_DATASET_CRASH_AFTER_BATCHES";

/// What runs on each batch.
pub enum Task<'a> {
    Caption {
        model: &'a Model,
        opts: &'a GenerateOptions,
    },
    /// Each row's question, or `question` for rows without one.
    Ask {
        model: &'a Model,
        opts: &'a GenerateOptions,
        question: Option<&'a str>,
    },
    Embed {
        model: &'a EmbedModel,
    },
}

/// The `--json` fields of one generated output (after `image`): text, tokens, logprobs, device,
/// and with beam search `score` and `sequences` (every returned hypothesis, best first).
/// The `--json` record of one generated output, as `glimpse caption/ask --json` and Python's
/// `Model` write it: `image` (a name, or a list for a multi-image question), `timings`,
/// `load_seconds`, then [`output_fields`].
pub fn json_record(image: Value, out: &Output, load_seconds: f64) -> Value {
    let mut record = Record::new();
    record.insert("image".into(), image);
    record.insert("timings".into(), json!(out.timings));
    record.insert("load_seconds".into(), load_seconds.into());
    record.extend(output_fields(out));
    Value::Object(record)
}

pub fn output_fields(out: &Output) -> Record {
    let mut r = Record::new();
    r.insert("text".into(), json!(out.text));
    r.insert("tokens".into(), json!(out.tokens));
    r.insert("logprobs".into(), json!(out.logprobs));
    if let Some(score) = out.score {
        r.insert("score".into(), score.into());
    }
    if !out.alternatives.is_empty() {
        let best = json!({ "text": out.text, "tokens": out.tokens, "score": out.score });
        let rest = out.alternatives.iter().map(|h| json!({ "text": h.text, "tokens": h.tokens, "score": h.score }));
        r.insert("sequences".into(), std::iter::once(best).chain(rest).collect());
    }
    r.insert("device".into(), json!(out.device));
    r
}

impl Task<'_> {
    fn preprocess(&self, image: &ImageRef, name: &str) -> Result<PixelValues> {
        let processor = match self {
            Task::Caption { model, .. } | Task::Ask { model, .. } => &model.image_processor,
            Task::Embed { model } => model.image_processor.as_ref().ok_or_else(|| {
                Error::InvalidInput(format!("{} has no vision tower: it embeds texts only", model.dir.display()))
            })?,
        };
        match image {
            ImageRef::Path(p) => processor.preprocess_file(p),
            ImageRef::Bytes(b) => processor.preprocess_bytes(b, name),
        }
    }

    /// The record fields of each input, in order (a failed run fails each of them).
    fn run(&self, items: &[&Item], pixels: &[PixelValues]) -> Vec<std::result::Result<Record, String>> {
        let outputs = |r: Result<Vec<Output>>| match r {
            Ok(v) => v.iter().map(|o| Ok(output_fields(o))).collect(),
            Err(e) => vec![Err(e.to_string()); pixels.len()],
        };
        match self {
            Task::Caption { model, opts } => outputs(model.run(pixels, None, opts, &mut |_| {})),
            Task::Ask { model, opts, question } => {
                // Each row succeeds or fails alone: the batch runs whole when every row has a
                // question; rows run one by one when some have none, or when the batch fails
                // (a question past the positions fails only its own row).
                let questions: Vec<Option<&str>> = items.iter().map(|i| i.question.as_deref().or(*question)).collect();
                let all: Option<Vec<&str>> = questions.iter().copied().collect();
                let batch = all.as_ref().map(|qs| model.ask_batch_pixels(pixels, qs, opts));
                let mut records: Vec<_> = match batch {
                    Some(Ok(v)) if v.len() == pixels.len() => v.iter().map(|o| Ok(output_fields(o))).collect(),
                    _ => questions
                        .iter()
                        .zip(pixels)
                        .map(|(q, px)| match q {
                            None => Err("no question: the input has no `question` column; pass --question".into()),
                            Some(q) => match model.ask_batch_pixels(std::slice::from_ref(px), &[q], opts) {
                                Ok(v) => v.first().map(output_fields).ok_or_else(|| "no output".into()),
                                Err(e) => Err(e.to_string()),
                            },
                        })
                        .collect(),
                };
                for (r, q) in records.iter_mut().zip(&questions) {
                    if let (Ok(r), Some(q)) = (r, q) {
                        r.insert("question".into(), json!(q));
                    }
                }
                records
            }
            Task::Embed { model } => match model.embed_images(pixels) {
                Ok(v) => v.into_iter().map(|e| Ok(Record::from_iter([("embedding".into(), json!(e))]))).collect(),
                Err(e) => vec![Err(e.to_string()); pixels.len()],
            },
        }
    }

    /// The Parquet columns of this task's records, after `image` and the input's id column.
    fn columns(&self) -> Columns {
        let c = |n: &str, k| (n.to_string(), k);
        let generated = || {
            vec![
                c("text", Kind::Str),
                c("tokens", Kind::ListU32),
                c("logprobs", Kind::ListF64),
                c("score", Kind::F64),
                c("sequences", Kind::Json),
                c("device", Kind::Str),
            ]
        };
        match self {
            Task::Caption { .. } => generated(),
            Task::Ask { .. } => [vec![c("question", Kind::Str)], generated()].concat(),
            Task::Embed { .. } => vec![c("embedding", Kind::ListF32)],
        }
    }
}

/// Settings of one dataset run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub batch_size: usize,
    /// Continue an existing output: inputs whose key it already holds are skipped.
    pub resume: bool,
    /// Progress on stderr (done/total, images/s, ETA); only shown when stderr is a terminal.
    pub progress: bool,
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Records written by this run (failed ones included).
    pub written: usize,
    pub failed: usize,
    /// Inputs skipped because the output already held them (`--resume`).
    pub skipped: usize,
    /// The first failure's input and message.
    pub first_error: Option<(String, String)>,
    /// Stopped early by the stop flag (Ctrl-C): the output holds every finished batch.
    pub interrupted: bool,
    pub seconds: f64,
}

/// A batch read and preprocessed, waiting for the model.
struct Ready {
    items: Vec<Item>,
    pixels: Vec<std::result::Result<PixelValues, String>>,
}

/// Runs `task` over every input of `input`, writing one record per input to `dst` in input
/// order. Stops after the batch in flight once `stop` is set.
pub fn run(task: &Task, input: Input, dst: &Path, opts: &RunOptions, stop: &AtomicBool) -> Result<Summary> {
    batch_size(opts.batch_size as u64)?;
    if let Task::Caption { opts: gen, .. } | Task::Ask { opts: gen, .. } = task {
        let seqs = opts.batch_size.saturating_mul(gen.expansion());
        if seqs > MAX_BATCH_SEQUENCES {
            return Err(Error::InvalidInput(format!(
                "--batch-size {} inputs x {} sequences each (--num-beams / --num-return-sequences) = {seqs} sequences in one model batch, over the {MAX_BATCH_SEQUENCES} glimpse runs at once (each holds its own cache and vocabulary-size scores): lower --batch-size",
                opts.batch_size,
                gen.expansion()
            )));
        }
    }
    let start = Instant::now();
    let key_field = input.key_field().to_string();
    let mut columns: Columns = vec![("image".into(), Kind::Str)];
    if input.raw_names {
        columns.push((input::RAW_PATH_FIELD.into(), Kind::Str));
    }
    if let Some(id) = &input.id_field {
        columns.push((id.clone(), Kind::Str));
    }
    columns.extend(task.columns());
    columns.push(("error".into(), Kind::Str));
    let _lock = output::OutputLock::acquire(dst)?;
    let (mut sink, done) = output::open(dst, opts.resume, &columns, &key_field)?;
    let path_keys = input.path_keys;
    let done = if path_keys { done.map(|k| Input::match_key(true, k)) } else { done };
    let crash_after: Option<usize> = std::env::var(CRASH_AFTER_ENV).ok().and_then(|v| v.parse().ok());
    let mut progress = Progress::new(opts.progress && std::io::stderr().is_terminal(), input.total);
    let mut summary = Summary::default();
    let id_field = input.id_field.clone();

    let (tx, rx) = sync_channel::<Result<Ready>>(QUEUE_BATCHES);
    let batch_size = opts.batch_size;
    let items = input.items;
    let result = std::thread::scope(|s| -> Result<()> {
        let reader = s.spawn(move || -> (usize, bool) {
            read_batches(task, items, done, path_keys, batch_size, stop, |b| tx.send(b).is_ok())
        });
        for (batches, ready) in rx.iter().enumerate() {
            let ready = ready?;
            let records = records_for(task, ready, id_field.as_deref());
            if crash_after == Some(batches) {
                sink.tear();
                std::process::abort();
            }
            sink.write(&records)?;
            for r in &records {
                if let Some(e) = r.get("error").and_then(Value::as_str) {
                    summary.failed += 1;
                    if summary.first_error.is_none() {
                        let name = r.get("image").and_then(Value::as_str).unwrap_or_default();
                        summary.first_error = Some((name.to_string(), e.to_string()));
                    }
                }
            }
            summary.written += records.len();
            progress.update(summary.written, start);
            if stop.load(Ordering::SeqCst) {
                summary.interrupted = true;
                break;
            }
        }
        drop(rx);
        // A panic while reading (a bug, or a decoder's on a corrupt input) ends the inputs
        // early: an error, never a run that looks complete.
        let (skipped, finished) = reader.join().map_err(|panic| {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            Error::InvalidInput(format!(
                "reading the input failed after {} records ({what}): this is a bug in glimpse or a library it uses, please report it; the records written are kept (--resume continues)",
                summary.written
            ))
        })?;
        summary.skipped = skipped;
        // The reader may have seen the flag first and stopped handing out batches.
        summary.interrupted |= !finished && stop.load(Ordering::SeqCst);
        Ok(())
    });
    progress.finish();
    result?;
    sink.finish()?;
    summary.seconds = start.elapsed().as_secs_f64();
    Ok(summary)
}

/// The reader thread: skips inputs already done, cuts batches, preprocesses each on the rayon
/// pool and hands it to `send` (false: the consumer stopped). Returns the inputs skipped and
/// whether every input was handed out.
fn read_batches(
    task: &Task,
    items: Box<dyn Iterator<Item = Result<Item>> + Send>,
    mut done: Keys,
    path_keys: bool,
    batch_size: usize,
    stop: &AtomicBool,
    mut send: impl FnMut(Result<Ready>) -> bool,
) -> (usize, bool) {
    let mut skipped = 0;
    let resuming = !done.is_empty();
    let mut batch = Vec::with_capacity(batch_size);
    let mut items = items.peekable();
    while let Some(item) = items.next() {
        let item = match item {
            Ok(i) => i,
            Err(e) => {
                send(Err(e));
                return (skipped, false);
            }
        };
        if resuming && done.take(&Input::match_key(path_keys, item.key())) {
            skipped += 1;
        } else {
            batch.push(item);
        }
        if batch.len() == batch_size || (items.peek().is_none() && !batch.is_empty()) {
            if stop.load(Ordering::SeqCst) {
                return (skipped, false);
            }
            let items = std::mem::replace(&mut batch, Vec::with_capacity(batch_size));
            let pixels = items
                .par_iter()
                .map(|i| match &i.source {
                    Ok(img) => task.preprocess(img, &i.image).map_err(|e| e.to_string()),
                    Err(e) => Err(e.clone()),
                })
                .collect();
            if !send(Ok(Ready { items, pixels })) {
                return (skipped, false);
            }
        }
    }
    (skipped, true)
}

/// One record per input of `ready`, in order: its fields, or its error. The pixels are moved to
/// the model, not copied (a batch of them is tens of megabytes).
fn records_for(task: &Task, ready: Ready, id_field: Option<&str>) -> Vec<Record> {
    let Ready { items, pixels } = ready;
    let (mut ok_items, mut ok_pixels, mut failed) = (Vec::new(), Vec::new(), Vec::with_capacity(items.len()));
    for (item, px) in items.iter().zip(pixels) {
        match px {
            Ok(px) => {
                ok_items.push(item);
                ok_pixels.push(px);
                failed.push(None);
            }
            Err(e) => failed.push(Some(e)),
        }
    }
    let mut results = if ok_pixels.is_empty() { Vec::new() } else { task.run(&ok_items, &ok_pixels) }.into_iter();
    drop(ok_pixels);
    items
        .iter()
        .zip(failed)
        .map(|(item, failure)| {
            let mut r = Record::new();
            r.insert("image".into(), json!(item.image));
            if let Some(raw) = &item.raw {
                r.insert(input::RAW_PATH_FIELD.into(), json!(output::base64(raw)));
            }
            if let Some(f) = id_field {
                r.insert(f.into(), item.id.as_ref().map_or(Value::Null, |v| json!(v)));
            }
            let fields = match failure {
                None => results.next().unwrap_or_else(|| Err("the model returned no result for this input".into())),
                Some(e) => Err(e),
            };
            match fields {
                Ok(f) => r.extend(f),
                Err(e) => {
                    r.insert("error".into(), json!(e));
                }
            }
            r
        })
        .collect()
}

/// The stderr progress line: done/total, images/s, ETA.
struct Progress {
    on: bool,
    total: Option<usize>,
    drawn: bool,
}

impl Progress {
    fn new(on: bool, total: Option<usize>) -> Self {
        Self { on, total, drawn: false }
    }

    fn update(&mut self, written: usize, start: Instant) {
        if !self.on {
            return;
        }
        let secs = start.elapsed().as_secs_f64().max(1e-9);
        let rate = written as f64 / secs;
        let line = match self.total {
            Some(t) => {
                let left = t.saturating_sub(written);
                let eta = if rate > 0.0 { format_eta(left as f64 / rate) } else { "?".into() };
                format!("{written}/{t} images  {rate:.1} images/s  ETA {eta}")
            }
            None => format!("{written} images  {rate:.1} images/s"),
        };
        // \r and clear-to-end: one line, rewritten in place.
        let _ = write!(std::io::stderr().lock(), "\r{line}\x1b[K");
        self.drawn = true;
    }

    fn finish(&mut self) {
        if self.drawn {
            let _ = writeln!(std::io::stderr().lock());
        }
    }
}

fn format_eta(secs: f64) -> String {
    let s = secs.round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// A flag set by Ctrl-C (SIGINT), for [`run`]'s `stop`: the first Ctrl-C lets the batch in flight
/// finish and the output be completed; a second one exits at once (status 130), as shells expect.
pub fn interrupt_flag() -> &'static AtomicBool {
    #[cfg(unix)]
    {
        static INSTALL: std::sync::Once = std::sync::Once::new();
        extern "C" fn on_sigint(_: libc::c_int) {
            // Async-signal-safe only: an atomic swap and _exit.
            if INTERRUPTED.swap(true, Ordering::SeqCst) {
                unsafe { libc::_exit(130) };
            }
        }
        INSTALL.call_once(|| unsafe {
            libc::signal(libc::SIGINT, on_sigint as extern "C" fn(libc::c_int) as libc::sighandler_t);
        });
    }
    &INTERRUPTED
}

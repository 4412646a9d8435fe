//! Dataset outputs, written so that a crash loses at most the batch in flight and never leaves a
//! corrupt file, and so that `--resume` knows which inputs are done.
//!
//! - JSONL: each batch is appended as whole lines in one write, then fsync'd. A crash can leave
//!   only a torn last line (no newline); `--resume` truncates it away and reads the keys of the
//!   complete lines.
//! - Parquet (a footer-indexed format that cannot be appended to): each batch becomes its own
//!   file `DST.parts/part-NNNNNNNN.parquet` (written to a `.tmp`, fsync'd, renamed). At the end
//!   (or on Ctrl-C) the previous DST and the parts are streamed into `DST.tmp-PID`, which is
//!   fsync'd and renamed over DST; then the parts folder is removed. The consolidated file records
//!   in its metadata (`glimpse.last_part`) the last part it holds, so parts left behind by a crash
//!   between the rename and the removal are recognised and dropped, never counted twice.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::{ArrayBuilder, Float32Builder, Float64Builder, ListBuilder, StringBuilder, UInt32Builder};
use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::{ArrowWriter, ProjectionMask};
use parquet::file::properties::WriterProperties;
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// One output record: the `--json` fields of one input.
pub type Record = Map<String, Value>;

/// How a record field is stored as a Parquet column.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    Str,
    F64,
    ListU32,
    ListF64,
    ListF32,
    /// Nested values (beam `sequences`), stored as their JSON text.
    Json,
}

/// The columns of a Parquet output, in order (every column nullable).
pub type Columns = Vec<(String, Kind)>;

/// The keys of the records an output holds, each with its count: inputs may share a key
/// (duplicate ids), and the output holds them in input order, so the first `count` inputs of a
/// key are the ones done. A key is bytes: an id's text, or a path's exact bytes (a file name need
/// not be UTF-8), so two inputs share a key only when they name the same thing.
#[derive(Debug, Default, Clone)]
pub struct Keys(HashMap<Vec<u8>, usize>);

impl Keys {
    pub fn add(&mut self, key: Vec<u8>) {
        *self.0.entry(key).or_default() += 1;
    }

    /// Takes one occurrence of `key`: true when the output held it (that input is done).
    pub fn take(&mut self, key: &[u8]) -> bool {
        match self.0.get_mut(key) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        }
    }

    /// The same keys through `f` (occurrences of keys that `f` maps together add up).
    pub fn map(self, f: impl Fn(&[u8]) -> Vec<u8>) -> Keys {
        let mut out = Keys::default();
        for (k, n) in self.0 {
            *out.0.entry(f(&k)).or_default() += n;
        }
        out
    }

    /// Records in all.
    pub fn len(&self) -> usize {
        self.0.values().sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Each key as many times as the output holds it.
impl IntoIterator for Keys {
    type Item = Vec<u8>;
    type IntoIter = Box<dyn Iterator<Item = Vec<u8>>>;
    fn into_iter(self) -> Self::IntoIter {
        Box::new(self.0.into_iter().flat_map(|(k, n)| std::iter::repeat_n(k, n)))
    }
}

/// `bytes` as a record's `image_bytes`: base64, standard alphabet with padding (RFC 4648 §4;
/// Python: `base64.b64decode(record["image_bytes"])` gives the path's bytes).
pub fn base64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The bytes of a record's `image_bytes`, or why it is not base64 (`at` names the record).
fn unbase64(text: &str, at: &dyn Fn() -> String) -> Result<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(text).map_err(|e| {
        Error::InvalidInput(format!(
            "{} holds `{}` {text:?}, which is not base64 ({e}): --resume continues an output glimpse wrote; choose another --output",
            at(),
            super::input::RAW_PATH_FIELD
        ))
    })
}

/// Where records go.
pub trait Sink: Send {
    /// Writes one batch durably: after it returns, a crash keeps these records.
    fn write(&mut self, records: &[Record]) -> Result<()>;
    /// Makes DST complete (Parquet: consolidates the parts).
    fn finish(self: Box<Self>) -> Result<()>;
    /// Test hook: leaves what a crash in the middle of the next write would leave.
    fn tear(&mut self) {}
}

/// The output format of `dst`, by extension.
pub fn is_parquet(dst: &Path) -> bool {
    dst.extension().is_some_and(|e| e.eq_ignore_ascii_case("parquet"))
}

/// Opens `dst` (JSONL, or Parquet by extension) and, with `resume`, returns the `key_field`
/// values of the records it already holds. Without `resume` an existing output is refused.
pub fn open(dst: &Path, resume: bool, columns: &Columns, key_field: &str) -> Result<(Box<dyn Sink>, Keys)> {
    if is_parquet(dst) {
        let (sink, keys) = ParquetSink::open(dst, resume, columns, key_field)?;
        Ok((Box::new(sink), keys))
    } else {
        let (sink, keys) = JsonlSink::open(dst, resume, columns, key_field)?;
        Ok((Box::new(sink), keys))
    }
}

/// Refuses a `dst` that exists but is not a regular file (a device such as /dev/full, a pipe, a
/// folder), and without `resume` one that exists at all (or, for Parquet, its parts folder):
/// glimpse never overwrites an output.
pub fn check_new(dst: &Path, resume: bool) -> Result<()> {
    if let Ok(meta) = std::fs::metadata(dst) {
        if !meta.is_file() {
            return Err(Error::InvalidInput(format!(
                "--output {} exists and is not a regular file (a folder, device or pipe): --output takes the path of a .jsonl or .parquet file",
                dst.display()
            )));
        }
    }
    if resume {
        return Ok(());
    }
    let parts = is_parquet(dst).then(|| parts_dir(dst));
    for what in std::iter::once(dst).chain(parts.as_deref()) {
        if what.exists() {
            return Err(Error::InvalidInput(format!(
                "{} already exists: pass --resume to continue that run (inputs already in {} are skipped), or choose another --output (glimpse never overwrites it)",
                what.display(),
                dst.display()
            )));
        }
    }
    Ok(())
}

/// `DST.lock`, next to DST.
fn lock_path(dst: &Path) -> PathBuf {
    let mut name = dst.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    dst.with_file_name(name)
}

/// An exclusive lock on an output (a flock on `DST.lock`, which holds the writer's pid), held
/// while a run writes it: a second run on the same DST is refused instead of interleaving its
/// records. Released, and the lock file removed, when dropped; a crashed writer's lock is
/// released by the system, and its file is taken over.
pub struct OutputLock {
    path: PathBuf,
    _file: File,
}

impl OutputLock {
    pub fn acquire(dst: &Path) -> Result<Self> {
        let path = lock_path(dst);
        // The holder removes the file as it lets go: a lock taken on a removed file is retaken.
        for _ in 0..10 {
            let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(
                |e| match e.kind() {
                    std::io::ErrorKind::NotFound => Error::InvalidInput(format!(
                        "--output {}: its folder does not exist; create it first",
                        dst.display()
                    )),
                    _ => Error::io(&path, e),
                },
            )?;
            if !try_lock(&file).map_err(|e| Error::io(&path, e))? {
                let mut pid = String::new();
                let _ = (&file).take(32).read_to_string(&mut pid);
                let pid = pid.trim();
                let who = if pid.is_empty() { String::new() } else { format!(" (pid {pid})") };
                return Err(Error::InvalidInput(format!(
                    "another glimpse run{who} is writing {} (it holds {}): wait for it to finish (then --resume continues its output), or choose another --output",
                    dst.display(),
                    path.display()
                )));
            }
            if same_file(&file, &path) {
                let _ = file.set_len(0).and_then(|()| write!(file, "{}", std::process::id()));
                return Ok(Self { path, _file: file });
            }
        }
        Err(Error::InvalidInput(format!("{}: could not take the output's lock: try again", path.display())))
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        // Removed while still held (the file closes after), so no other run sees a stale lock.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// flock(LOCK_EX | LOCK_NB): false when another open file holds it.
fn try_lock(file: &File) -> std::io::Result<bool> {
    #[cfg(unix)]
    {
        use std::os::unix::io::AsRawFd;
        // SAFETY: flock on a descriptor `file` owns for the whole call; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::WouldBlock {
            return Ok(false);
        }
        Err(e)
    }
    #[cfg(not(unix))]
    {
        let _ = file;
        Ok(true)
    }
}

/// Whether `path` still names the open `file` (it was not removed or replaced meanwhile).
fn same_file(file: &File, path: &Path) -> bool {
    cfg!(not(unix)) || same_inode(file.metadata(), std::fs::metadata(path))
}

/// Whether both exist and are one file (one inode: links and other spellings included).
fn same_inode(a: std::io::Result<std::fs::Metadata>, b: std::io::Result<std::fs::Metadata>) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        matches!((a, b), (Ok(a), Ok(b)) if a.dev() == b.dev() && a.ino() == b.ino())
    }
    #[cfg(not(unix))]
    {
        let _ = (a, b);
        false
    }
}

/// Refuses an output that is the input (`--input X.jsonl --output X.jsonl --resume` would read
/// its own records back forever).
pub fn check_not_input(src: &Path, dst: &Path) -> Result<()> {
    let same = same_inode(std::fs::metadata(src), std::fs::metadata(dst))
        || (cfg!(not(unix)) && src.canonicalize().ok().is_some_and(|s| dst.canonicalize().ok() == Some(s)));
    if same {
        return Err(Error::InvalidInput(format!(
            "--output {} is the input file {}: the records would be appended to the input; choose another --output",
            dst.display(),
            src.display()
        )));
    }
    Ok(())
}

/// fsync of a folder, so a rename or a new file in it survives a crash.
fn sync_dir(dir: &Path) -> Result<()> {
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    #[cfg(unix)]
    File::open(dir).and_then(|f| f.sync_all()).map_err(|e| Error::io(dir, e))?;
    Ok(())
}

fn parent(p: &Path) -> &Path {
    p.parent().unwrap_or(Path::new(""))
}

/// The key of `record`, as [`super::input::Item::key`]: its `key_field` (an id), else, where
/// that is null or the key is the image, the path's exact bytes (`image_bytes`, else `image`).
fn key_of(record: &Record, key_field: &str, at: &dyn Fn() -> String) -> Result<Option<Vec<u8>>> {
    let text = |f: &str| match record.get(f)? {
        Value::String(s) => Some(s.clone()),
        Value::Null => None,
        v => Some(v.to_string()),
    };
    if key_field != "image" {
        if let Some(id) = text(key_field) {
            return Ok(Some(id.into_bytes()));
        }
    }
    match record.get(super::input::RAW_PATH_FIELD) {
        Some(Value::String(b)) => unbase64(b, at).map(Some),
        _ => Ok(text("image").map(String::into_bytes)),
    }
}

// ---------------------------------------------------------------------------------------------
// JSONL

struct JsonlSink {
    path: PathBuf,
    file: File,
}

impl JsonlSink {
    fn open(dst: &Path, resume: bool, columns: &Columns, key_field: &str) -> Result<(Self, Keys)> {
        let mut keys = Keys::default();
        check_new(dst, resume)?;
        let file = if dst.exists() {
            let mut file = OpenOptions::new().read(true).write(true).open(dst).map_err(|e| Error::io(dst, e))?;
            let complete = read_jsonl_keys(dst, &file, columns, key_field, &mut keys)?;
            // A torn last line (a crash in the middle of a write): cut it away.
            if file.metadata().map_err(|e| Error::io(dst, e))?.len() > complete {
                file.set_len(complete).and_then(|()| file.sync_all()).map_err(|e| Error::io(dst, e))?;
            }
            file.seek(SeekFrom::End(0)).map_err(|e| Error::io(dst, e))?;
            file
        } else {
            let file = OpenOptions::new().write(true).create_new(true).open(dst).map_err(|e| Error::io(dst, e))?;
            sync_dir(parent(dst))?;
            file
        };
        Ok((Self { path: dst.to_path_buf(), file }, keys))
    }
}

/// The field every record of this run has unless it failed: the task's first column (`text`,
/// `question`, `embedding`), after `image`, `image_bytes` and the key.
fn result_field<'a>(columns: &'a Columns, key_field: &str) -> Option<&'a str> {
    let input_fields = ["image", super::input::RAW_PATH_FIELD, "error"];
    columns.iter().map(|(n, _)| n.as_str()).find(|n| !input_fields.contains(n) && *n != key_field)
}

/// Refuses a record another command, or this command on another input, wrote: one with a field
/// this run does not write, without the input's id column, or (unless it failed) without the
/// task's result. `at` names the record.
fn check_record(record: &Record, columns: &Columns, key_field: &str, at: &dyn Fn() -> String) -> Result<()> {
    let has = |f: &str| record.contains_key(f);
    let foreign = record.keys().find(|k| !columns.iter().any(|(n, _)| n == *k));
    let why = match (foreign, result_field(columns, key_field)) {
        (Some(f), _) => format!("holds field `{f}`, which this run does not write"),
        (None, _) if key_field != "image" && !has(key_field) => {
            format!("has no `{key_field}` field, which this input has")
        }
        (None, Some(r)) if !has("error") && !has(r) => format!("has no `{r}` field, which this run writes"),
        _ => return Ok(()),
    };
    Err(Error::InvalidInput(format!(
        "{} {why}: --resume continues an output of the same command, options and input; finish it with that command, or choose another --output",
        at()
    )))
}

/// Collects the keys of `file`'s complete lines, each checked against this run's `columns`;
/// returns the byte length of those lines.
fn read_jsonl_keys(dst: &Path, file: &File, columns: &Columns, key_field: &str, keys: &mut Keys) -> Result<u64> {
    let mut reader = BufReader::new(file);
    let (mut complete, mut line, mut n) = (0u64, Vec::new(), 0usize);
    loop {
        line.clear();
        let limit = super::input::MAX_LINE as u64 + 1;
        let read = (&mut reader).take(limit).read_until(b'\n', &mut line).map_err(|e| Error::io(dst, e))?;
        if read == 0 || line.last() != Some(&b'\n') {
            if line.len() > super::input::MAX_LINE {
                return Err(Error::InvalidInput(format!(
                    "{} line {} is longer than {} MiB: not an output glimpse wrote; choose another --output",
                    dst.display(),
                    n + 1,
                    super::input::MAX_LINE >> 20
                )));
            }
            return Ok(complete);
        }
        n += 1;
        complete += read as u64;
        let record: Record = serde_json::from_slice(&line).map_err(|e| {
            Error::InvalidInput(format!(
                "{} line {n} is not a JSON record ({e}): --resume continues an output glimpse wrote; choose another --output",
                dst.display()
            ))
        })?;
        let at = || format!("{} line {n}", dst.display());
        check_record(&record, columns, key_field, &at)?;
        if let Some(k) = key_of(&record, key_field, &at)? {
            keys.add(k);
        }
    }
}

impl Sink for JsonlSink {
    fn write(&mut self, records: &[Record]) -> Result<()> {
        let mut buf = Vec::new();
        for r in records {
            serde_json::to_writer(&mut buf, r).map_err(|e| Error::InvalidInput(format!("record as JSON: {e}")))?;
            buf.push(b'\n');
        }
        self.file.write_all(&buf).and_then(|()| self.file.sync_data()).map_err(|e| Error::io(&self.path, e))
    }

    fn finish(self: Box<Self>) -> Result<()> {
        self.file.sync_all().map_err(|e| Error::io(&self.path, e))
    }

    fn tear(&mut self) {
        let _ = self.file.write_all(b"{\"image\": \"torn").and_then(|()| self.file.sync_data());
    }
}

// ---------------------------------------------------------------------------------------------
// Parquet

/// Metadata key of a consolidated file: the index of the last part folded into it.
const LAST_PART: &str = "glimpse.last_part";
/// Rows per row group of the consolidated file (bounds the writer's buffered rows).
const ROW_GROUP: usize = 4096;

struct ParquetSink {
    dst: PathBuf,
    parts: PathBuf,
    schema: SchemaRef,
    columns: Columns,
    next_part: u64,
    /// The last part index DST already holds (its `glimpse.last_part`).
    folded: Option<u64>,
}

/// `DST.parts`, next to DST.
fn parts_dir(dst: &Path) -> PathBuf {
    let mut name = dst.file_name().unwrap_or_default().to_os_string();
    name.push(".parts");
    dst.with_file_name(name)
}

fn parquet_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::InvalidInput(format!("{}: Parquet: {e}", path.display()))
}

/// Removes the `DST.tmp-PID` files a writer killed while consolidating left behind. The caller
/// holds the output's [`OutputLock`], so no other run is writing one.
fn remove_stale_consolidations(dst: &Path) -> Result<()> {
    let mut prefix = dst.file_name().unwrap_or_default().to_os_string();
    prefix.push(".tmp-");
    let prefix = prefix.to_string_lossy().into_owned();
    let dir = parent(dst);
    let Ok(entries) = std::fs::read_dir(if dir.as_os_str().is_empty() { Path::new(".") } else { dir }) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = name.strip_prefix(&prefix).filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
        if pid.is_some() && entry.file_type().is_ok_and(|t| t.is_file()) {
            let path = entry.path();
            std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
        }
    }
    Ok(())
}

/// The part files in `dir` with their indices, in order; leftover temporaries are removed.
fn list_parts(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut parts = Vec::new();
    if !dir.is_dir() {
        return Ok(parts);
    }
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy().to_string();
        if name.ends_with(".tmp") {
            std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
        } else if let Some(i) = name.strip_prefix("part-").and_then(|n| n.strip_suffix(".parquet")) {
            if let Ok(i) = i.parse() {
                parts.push((i, path));
            }
        }
    }
    parts.sort();
    Ok(parts)
}

/// A reader of the Parquet file `path` (an output, or one of its parts), its declared sizes
/// checked first ([`super::parquet_check`]).
fn reader(path: &Path) -> Result<ParquetRecordBatchReaderBuilder<File>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let check = file.try_clone().map_err(|e| Error::io(path, e))?;
    super::parquet_check::check_footer(path, &check)?;
    let b = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| parquet_err(path, e))?;
    let all = vec![true; b.parquet_schema().num_columns()];
    super::parquet_check::check_chunks(path, &check, b.metadata(), &all)?;
    Ok(b)
}

/// The keys of a Parquet file's records, as [`key_of`]: column `key_field`, else (null, or the
/// key is the image) `image_bytes` where the file has that column and the row a value, else
/// `image`.
fn parquet_keys(path: &Path, key_field: &str, keys: &mut Keys) -> Result<()> {
    let raw_field = super::input::RAW_PATH_FIELD;
    let b = reader(path)?;
    let position = |name: &str| b.schema().fields().iter().position(|f| f.name() == name);
    let find = |name: &str| {
        position(name).ok_or_else(|| {
            Error::InvalidInput(format!(
                "{} has no column `{name}` to resume by: --resume continues an output of the same command and input; choose another --output",
                path.display()
            ))
        })
    };
    let (k, i) = (find(key_field)?, find("image")?);
    let roots = [Some(k), Some(i), position(raw_field)].into_iter().flatten();
    let mask = ProjectionMask::roots(b.parquet_schema(), roots);
    let mut row = 0usize;
    for batch in b.with_projection(mask).build().map_err(|e| parquet_err(path, e))? {
        let batch = batch.map_err(|e| parquet_err(path, e))?;
        let text = |name: &str| batch.column_by_name(name).and_then(|c| c.as_string_opt::<i32>().cloned());
        let (Some(key), Some(image)) = (text(key_field), text("image")) else { continue };
        let raw = text(raw_field);
        for (r, (k, i)) in key.iter().zip(image.iter()).enumerate() {
            let at = || format!("{} row {}", path.display(), row + r);
            let key = match (k.filter(|_| key_field != "image"), raw.as_ref().filter(|c| c.is_valid(r))) {
                (Some(id), _) => Some(id.as_bytes().to_vec()),
                (None, Some(raw)) => Some(unbase64(raw.value(r), &at)?),
                (None, None) => i.map(|i| i.as_bytes().to_vec()),
            };
            if let Some(k) = key {
                keys.add(k);
            }
        }
        row += batch.num_rows();
    }
    Ok(())
}

impl ParquetSink {
    fn open(dst: &Path, resume: bool, columns: &Columns, key_field: &str) -> Result<(Self, Keys)> {
        let parts = parts_dir(dst);
        check_new(dst, resume)?;
        remove_stale_consolidations(dst)?;
        let mut keys = Keys::default();
        let mut folded = None;
        let schema =
            Arc::new(Schema::new(columns.iter().map(|(n, k)| Field::new(n, data_type(*k), true)).collect::<Vec<_>>()));
        if dst.exists() {
            let b = reader(dst)?;
            check_schema(dst, b.schema(), &schema)?;
            folded = b
                .metadata()
                .file_metadata()
                .key_value_metadata()
                .and_then(|kv| kv.iter().find(|k| k.key == LAST_PART))
                .and_then(|k| k.value.as_deref()?.parse::<u64>().ok());
            parquet_keys(dst, key_field, &mut keys)?;
        }
        let mut next_part = folded.map_or(0, |f| f + 1);
        for (i, path) in list_parts(&parts)? {
            if folded.is_some_and(|f| i <= f) {
                // Already in DST: a crash came between the rename and the removal of the parts.
                std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
                continue;
            }
            check_schema(&path, reader(&path)?.schema(), &schema)?;
            parquet_keys(&path, key_field, &mut keys)?;
            next_part = next_part.max(i + 1);
        }
        Ok((Self { dst: dst.to_path_buf(), parts, schema, columns: columns.clone(), next_part, folded }, keys))
    }

    fn part_path(&self, i: u64) -> PathBuf {
        self.parts.join(format!("part-{i:08}.parquet"))
    }

    /// Writes `batch` to `tmp` through `props`, fsyncs it and renames it to `path`.
    fn write_file(
        &self,
        path: &Path,
        tmp: &Path,
        batches: &mut dyn FnMut(&mut ArrowWriter<File>) -> Result<()>,
        props: WriterProperties,
    ) -> Result<()> {
        let file = File::create(tmp).map_err(|e| Error::io(tmp, e))?;
        let mut w = ArrowWriter::try_new(file, self.schema.clone(), Some(props)).map_err(|e| parquet_err(tmp, e))?;
        batches(&mut w)?;
        let file = w.into_inner().map_err(|e| parquet_err(tmp, e))?;
        file.sync_all().map_err(|e| Error::io(tmp, e))?;
        drop(file);
        std::fs::rename(tmp, path).map_err(|e| Error::io(path, e))?;
        sync_dir(parent(path))
    }
}

/// Refuses a Parquet file `src` whose columns (names, types, list item names) are not `want`'s.
fn check_schema(src: &Path, found: &SchemaRef, want: &SchemaRef) -> Result<()> {
    if found.fields() == want.fields() {
        return Ok(());
    }
    Err(Error::InvalidInput(format!(
        "{} holds other columns than this run writes ({}): it comes from another command or other options (or was rewritten by another tool), and --resume continues an output of the same command, options and input; finish it with that command, or choose another --output",
        src.display(),
        want.fields().iter().map(|f| format!("{}: {}", f.name(), f.data_type())).collect::<Vec<_>>().join(", ")
    )))
}

fn data_type(k: Kind) -> DataType {
    let list = |t| DataType::List(Arc::new(Field::new_list_field(t, true)));
    match k {
        Kind::Str | Kind::Json => DataType::Utf8,
        Kind::F64 => DataType::Float64,
        Kind::ListU32 => list(DataType::UInt32),
        Kind::ListF64 => list(DataType::Float64),
        Kind::ListF32 => list(DataType::Float32),
    }
}

/// One column of `records` (a missing or null field is null).
fn column(records: &[Record], name: &str, kind: Kind) -> ArrayRef {
    let values = records.iter().map(|r| r.get(name).filter(|v| !v.is_null()));
    fn list<'a, B: ArrayBuilder + Default>(
        values: impl Iterator<Item = Option<&'a Value>>,
        mut push: impl FnMut(&mut B, &Value),
    ) -> ArrayRef {
        let mut b = ListBuilder::new(B::default());
        for v in values {
            match v.and_then(Value::as_array) {
                Some(items) => {
                    for x in items {
                        push(b.values(), x);
                    }
                    b.append(true);
                }
                None => b.append(false),
            }
        }
        Arc::new(b.finish())
    }
    match kind {
        Kind::Str | Kind::Json => {
            let mut b = StringBuilder::new();
            for v in values {
                match (v, kind) {
                    (Some(Value::String(s)), Kind::Str) => b.append_value(s),
                    (Some(v), _) => b.append_value(v.to_string()),
                    (None, _) => b.append_null(),
                }
            }
            Arc::new(b.finish())
        }
        Kind::F64 => {
            let mut b = Float64Builder::new();
            for v in values {
                b.append_option(v.and_then(Value::as_f64));
            }
            Arc::new(b.finish())
        }
        Kind::ListU32 => {
            list::<UInt32Builder>(values, |b, x| b.append_option(x.as_u64().and_then(|v| u32::try_from(v).ok())))
        }
        Kind::ListF64 => list::<Float64Builder>(values, |b, x| b.append_option(x.as_f64())),
        Kind::ListF32 => list::<Float32Builder>(values, |b, x| b.append_option(x.as_f64().map(|v| v as f32))),
    }
}

impl Sink for ParquetSink {
    fn write(&mut self, records: &[Record]) -> Result<()> {
        let arrays = self.columns.iter().map(|(n, k)| column(records, n, *k)).collect();
        let batch = RecordBatch::try_new(self.schema.clone(), arrays).map_err(|e| parquet_err(&self.dst, e))?;
        if !self.parts.exists() {
            std::fs::create_dir_all(&self.parts).map_err(|e| Error::io(&self.parts, e))?;
            sync_dir(parent(&self.parts))?;
        }
        let path = self.part_path(self.next_part);
        let tmp = path.with_extension("parquet.tmp");
        self.write_file(
            &path,
            &tmp,
            &mut |w| w.write(&batch).map_err(|e| parquet_err(&tmp, e)),
            WriterProperties::builder().build(),
        )?;
        self.next_part += 1;
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<()> {
        let parts = list_parts(&self.parts)?;
        if parts.is_empty() && self.dst.exists() {
            return self.remove_parts();
        }
        let last = parts.last().map(|(i, _)| *i).or(self.folded);
        let mut props = WriterProperties::builder().set_max_row_group_size(ROW_GROUP);
        if let Some(last) = last {
            props = props.set_key_value_metadata(Some(vec![parquet::file::metadata::KeyValue::new(
                LAST_PART.to_string(),
                last.to_string(),
            )]));
        }
        let mut name = self.dst.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".tmp-{}", std::process::id()));
        let tmp = self.dst.with_file_name(name);
        let sources: Vec<PathBuf> =
            self.dst.exists().then(|| self.dst.clone()).into_iter().chain(parts.into_iter().map(|(_, p)| p)).collect();
        let schema = self.schema.clone();
        let result = self.write_file(
            &self.dst,
            &tmp,
            &mut |w| {
                for src in &sources {
                    let r = reader(src)?.with_batch_size(ROW_GROUP).build().map_err(|e| parquet_err(src, e))?;
                    for batch in r {
                        let batch = batch.map_err(|e| parquet_err(src, e))?;
                        check_schema(src, &batch.schema(), &schema)?;
                        w.write(&batch).map_err(|e| parquet_err(&tmp, e))?;
                    }
                }
                Ok(())
            },
            props.build(),
        );
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result?;
        self.remove_parts()
    }

    fn tear(&mut self) {
        // A crash while a part is written leaves its temporary behind.
        let _ = std::fs::create_dir_all(&self.parts);
        let _ = std::fs::write(self.part_path(self.next_part).with_extension("parquet.tmp"), b"PAR1 torn");
    }
}

impl ParquetSink {
    fn remove_parts(&self) -> Result<()> {
        if self.parts.exists() {
            std::fs::remove_dir_all(&self.parts).map_err(|e| Error::io(&self.parts, e))?;
            sync_dir(parent(&self.parts))?;
        }
        Ok(())
    }
}

/// Reads a whole output (JSONL or Parquet) back as JSON records, for tests and tools. Parquet
/// lists become arrays, `Json` columns stay text, nulls are dropped from each record.
pub fn read_records(path: &Path) -> Result<Vec<Record>> {
    if !is_parquet(path) {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        return text
            .lines()
            .map(|l| serde_json::from_str(l).map_err(|e| Error::Json { path: path.to_path_buf(), msg: e.to_string() }))
            .collect();
    }
    let mut out = Vec::new();
    for batch in reader(path)?.build().map_err(|e| parquet_err(path, e))? {
        let batch = batch.map_err(|e| parquet_err(path, e))?;
        for r in 0..batch.num_rows() {
            let mut rec = Record::new();
            for (f, col) in batch.schema().fields().iter().zip(batch.columns()) {
                if let Some(v) = cell_json(col.as_ref(), r) {
                    rec.insert(f.name().clone(), v);
                }
            }
            out.push(rec);
        }
    }
    Ok(out)
}

fn cell_json(a: &dyn Array, r: usize) -> Option<Value> {
    use arrow_array::types::{Float32Type, Float64Type, UInt32Type};
    if a.is_null(r) {
        return None;
    }
    Some(match a.data_type() {
        DataType::Utf8 => Value::from(a.as_string::<i32>().value(r)),
        DataType::Float64 => Value::from(a.as_primitive::<Float64Type>().value(r)),
        DataType::Float32 => Value::from(a.as_primitive::<Float32Type>().value(r)),
        DataType::UInt32 => Value::from(a.as_primitive::<UInt32Type>().value(r)),
        DataType::List(_) => {
            let items = a.as_list::<i32>().value(r);
            Value::Array((0..items.len()).map(|i| cell_json(items.as_ref(), i).unwrap_or(Value::Null)).collect())
        }
        _ => return None,
    })
}

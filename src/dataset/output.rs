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

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
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
pub fn open(dst: &Path, resume: bool, columns: &Columns, key_field: &str) -> Result<(Box<dyn Sink>, HashSet<String>)> {
    if is_parquet(dst) {
        let (sink, keys) = ParquetSink::open(dst, resume, columns, key_field)?;
        Ok((Box::new(sink), keys))
    } else {
        let (sink, keys) = JsonlSink::open(dst, resume, key_field)?;
        Ok((Box::new(sink), keys))
    }
}

/// Without `resume`, refuses a `dst` that exists (or, for Parquet, its parts folder): glimpse
/// never overwrites an output.
pub fn check_new(dst: &Path, resume: bool) -> Result<()> {
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

fn key_of(record: &Record, key_field: &str) -> Option<String> {
    match record.get(key_field)? {
        Value::String(s) => Some(s.clone()),
        Value::Null => None,
        v => Some(v.to_string()),
    }
}

// ---------------------------------------------------------------------------------------------
// JSONL

struct JsonlSink {
    path: PathBuf,
    file: File,
}

impl JsonlSink {
    fn open(dst: &Path, resume: bool, key_field: &str) -> Result<(Self, HashSet<String>)> {
        let mut keys = HashSet::new();
        check_new(dst, resume)?;
        let file = if dst.exists() {
            let mut file = OpenOptions::new().read(true).write(true).open(dst).map_err(|e| Error::io(dst, e))?;
            let complete = read_jsonl_keys(dst, &file, key_field, &mut keys)?;
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

/// Collects the keys of `file`'s complete lines; returns the byte length of those lines.
fn read_jsonl_keys(dst: &Path, file: &File, key_field: &str, keys: &mut HashSet<String>) -> Result<u64> {
    let mut reader = BufReader::new(file);
    let (mut complete, mut line, mut n) = (0u64, Vec::new(), 0usize);
    loop {
        line.clear();
        let read = reader.read_until(b'\n', &mut line).map_err(|e| Error::io(dst, e))?;
        if read == 0 || line.last() != Some(&b'\n') {
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
        keys.extend(key_of(&record, key_field));
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

fn reader(path: &Path) -> Result<ParquetRecordBatchReaderBuilder<File>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| parquet_err(path, e))
}

/// The values of column `key_field` of a Parquet file.
fn parquet_keys(path: &Path, key_field: &str, keys: &mut HashSet<String>) -> Result<()> {
    let b = reader(path)?;
    let Some(i) = b.schema().fields().iter().position(|f| f.name() == key_field) else {
        return Err(Error::InvalidInput(format!(
            "{} has no column `{key_field}` to resume by: --resume continues an output of the same command and input; choose another --output",
            path.display()
        )));
    };
    let mask = ProjectionMask::roots(b.parquet_schema(), [i]);
    for batch in b.with_projection(mask).build().map_err(|e| parquet_err(path, e))? {
        let batch = batch.map_err(|e| parquet_err(path, e))?;
        let col = batch.column(0);
        if let Some(s) = col.as_string_opt::<i32>() {
            keys.extend(s.iter().flatten().map(str::to_string));
        }
    }
    Ok(())
}

impl ParquetSink {
    fn open(dst: &Path, resume: bool, columns: &Columns, key_field: &str) -> Result<(Self, HashSet<String>)> {
        let parts = parts_dir(dst);
        check_new(dst, resume)?;
        let mut keys = HashSet::new();
        let mut folded = None;
        if dst.exists() {
            let b = reader(dst)?;
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
            parquet_keys(&path, key_field, &mut keys)?;
            next_part = next_part.max(i + 1);
        }
        let schema =
            Arc::new(Schema::new(columns.iter().map(|(n, k)| Field::new(n, data_type(*k), true)).collect::<Vec<_>>()));
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
                        if batch.schema().fields() != schema.fields() {
                            return Err(Error::InvalidInput(format!(
                                "{} holds other columns than this run writes ({}): it comes from another command or other options; finish it with the same command, or choose another --output",
                                src.display(),
                                schema.fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>().join(", ")
                            )));
                        }
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

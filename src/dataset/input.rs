//! Dataset inputs: a folder of images, a text file of paths, or a JSONL / Parquet table with a
//! path (or image-bytes) column. Each yields [`Item`]s lazily (tables stream row by row), so the
//! memory a run holds does not grow with the dataset; only a folder's path list is collected, to
//! sort it.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;

use crate::error::{Error, Result};

/// File extensions a folder walk takes as images (those glimpse decodes), matched ignoring case.
pub const IMAGE_EXTENSIONS: [&str; 6] = ["png", "jpg", "jpeg", "webp", "gif", "bmp"];
/// Columns tried, in order, for an input's image when `--path-column` is not given.
pub const PATH_COLUMNS: [&str; 3] = ["path", "image", "file_name"];
/// Columns that name a record instead of its path (kept in the output, used by `--resume`).
pub const ID_COLUMNS: [&str; 2] = ["id", "key"];
/// The column holding each row's question (`ask`).
pub const QUESTION_COLUMN: &str = "question";

/// Where one input's image comes from.
#[derive(Debug, Clone)]
pub enum ImageRef {
    Path(PathBuf),
    /// Encoded image bytes (a Parquet binary column, or the `bytes` of a Hugging Face image struct).
    Bytes(Vec<u8>),
}

/// One input of a dataset.
#[derive(Debug, Clone)]
pub struct Item {
    /// The record's `image` field: the path as the input gives it, or `SOURCE#ROW` for bytes that
    /// come without a path. A path that is not UTF-8 is shown as [`path_label`] writes it.
    pub image: String,
    /// The path's exact bytes when they are not UTF-8 (a folder or list input on Unix): the
    /// record's `image_bytes` (base64), and what `--resume` matches such an input by.
    pub raw: Option<Vec<u8>>,
    /// The `id` / `key` column's value, when the input has that column.
    pub id: Option<String>,
    /// The image, or why this row has none (that row's record gets the error).
    pub source: std::result::Result<ImageRef, String>,
    pub question: Option<String>,
}

impl Item {
    /// What `--resume` matches against the output: the id when the input has one, else the
    /// path's exact bytes (`image`, or the bytes of a path that is not UTF-8).
    pub fn key(&self) -> &[u8] {
        match (&self.id, &self.raw) {
            (Some(id), _) => id.as_bytes(),
            (None, Some(raw)) => raw,
            (None, None) => self.image.as_bytes(),
        }
    }
}

/// The record field holding the exact bytes (base64) of a path that is not UTF-8.
pub const RAW_PATH_FIELD: &str = "image_bytes";

/// A path's bytes as record text, and its exact bytes when the text cannot hold them: a UTF-8
/// path is itself (and no bytes); in any other, each byte that is not part of a UTF-8 character
/// is written `\xHH` (two lowercase hex digits, as Python's `backslashreplace`), readable but not
/// unique (a UTF-8 name may read the same), so the exact bytes come beside it.
pub fn path_label(bytes: &[u8]) -> (String, Option<Vec<u8>>) {
    if let Ok(s) = std::str::from_utf8(bytes) {
        return (s.to_string(), None);
    }
    let mut text = String::with_capacity(bytes.len() + 8);
    for chunk in bytes.utf8_chunks() {
        text.push_str(chunk.valid());
        for b in chunk.invalid() {
            text.push_str(&format!("\\x{b:02x}"));
        }
    }
    (text, Some(bytes.to_vec()))
}

/// The bytes of a path as the system spells it (on Unix, exactly the file name's bytes).
pub fn path_bytes(p: &Path) -> &[u8] {
    p.as_os_str().as_encoded_bytes()
}

/// A path from its bytes ([`path_bytes`]); elsewhere than on Unix, bytes that are not UTF-8 are
/// replaced (no such path came from this system).
fn bytes_path(b: &[u8]) -> PathBuf {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        PathBuf::from(std::ffi::OsStr::from_bytes(b))
    }
    #[cfg(not(unix))]
    PathBuf::from(String::from_utf8_lossy(b).into_owned())
}

/// An opened input.
pub struct Input {
    /// Inputs in all (before `--resume` skips any), when known up front.
    pub total: Option<usize>,
    /// `id` or `key` when the input names its records with that column (records carry it).
    pub id_field: Option<String>,
    pub items: Box<dyn Iterator<Item = Result<Item>> + Send>,
    /// Keys are the paths a folder walk spelled (from the folder as given): `--resume` matches
    /// them by canonical path, so `./imgs` and `/abs/imgs` name the same inputs.
    pub path_keys: bool,
    /// Some path of this input is not UTF-8: its records carry [`RAW_PATH_FIELD`] (a Parquet
    /// output gets that column).
    pub raw_names: bool,
}

impl Input {
    /// The output field `--resume` reads keys from.
    pub fn key_field(&self) -> &str {
        self.id_field.as_deref().unwrap_or("image")
    }

    /// `key` (an [`Item::key`], or one read back from an output) as `--resume` compares it: its
    /// bytes, or with `path_keys` the bytes of the canonical path it names.
    pub fn match_key(path_keys: bool, key: &[u8]) -> Vec<u8> {
        if !path_keys {
            return key.to_vec();
        }
        let p = bytes_path(key);
        std::fs::canonicalize(&p)
            .or_else(|_| std::path::absolute(&p))
            .map_or_else(|_| key.to_vec(), |p| path_bytes(&p).to_vec())
    }
}

/// How to read a table's columns.
#[derive(Debug, Clone, Default)]
pub struct InputOptions {
    /// The column holding each row's image path or bytes (default: the first of [`PATH_COLUMNS`]).
    pub path_column: Option<String>,
}

/// The most a pipe (`--input /dev/stdin`, `<(ls ...)`) is read into memory: it can be read only
/// once, so it is held whole (a regular file is streamed instead).
pub const MAX_PIPED_INPUT: u64 = 256 << 20;
/// The longest line of a text or JSONL input (and of a JSONL output read by `--resume`).
pub const MAX_LINE: usize = 64 << 20;

/// Opens `src`: a folder (walked recursively for [`IMAGE_EXTENSIONS`], sorted), a `.jsonl` /
/// `.ndjson` or `.parquet` table, or else a text file of paths (one per line). Relative paths in
/// a file resolve against that file's folder. A pipe is read once, into memory (at most
/// [`MAX_PIPED_INPUT`]); devices and other special files are refused.
pub fn open(src: &Path, opts: &InputOptions) -> Result<Input> {
    let meta = std::fs::metadata(src).map_err(|e| match Error::io(src, e) {
        Error::MissingFile { path, .. } => Error::MissingFile {
            path,
            hint: " (--input takes a folder of images, a text file of paths, or a .jsonl / .parquet table)".into(),
        },
        e => e,
    })?;
    if meta.is_dir() {
        let mut paths = Vec::new();
        walk(src, &mut paths)?;
        paths.sort();
        let raw_names = paths.iter().any(|p| p.to_str().is_none());
        let items = paths.into_iter().map(|p| {
            let (image, raw) = path_label(path_bytes(&p));
            Ok(Item { image, raw, id: None, source: Ok(ImageRef::Path(p)), question: None })
        });
        let total = items.len();
        return Ok(Input { total: Some(total), id_field: None, items: Box::new(items), path_keys: true, raw_names });
    }
    let data = if meta.is_file() { Source::File(src.to_path_buf()) } else { Source::Memory(read_pipe(src, &meta)?) };
    let base = src.parent().map(Path::to_path_buf).unwrap_or_default();
    match extension(src).as_str() {
        "jsonl" | "ndjson" => open_jsonl(src, &data, base, opts),
        "parquet" => open_parquet(src, data, base, opts),
        _ => open_list(&data, base),
    }
}

/// The bytes of a list or table: its file (read as often as needed), or a pipe's whole content.
#[derive(Clone)]
enum Source {
    File(PathBuf),
    Memory(bytes::Bytes),
}

impl Source {
    fn reader(&self) -> Result<Box<dyn BufRead + Send>> {
        Ok(match self {
            Source::File(p) => Box::new(BufReader::new(File::open(p).map_err(|e| Error::io(p, e))?)),
            Source::Memory(b) => Box::new(std::io::Cursor::new(b.clone())),
        })
    }
}

/// The whole content of a pipe or socket `src`, refused past [`MAX_PIPED_INPUT`]; any other
/// special file (a device such as /dev/zero or a terminal) is refused.
fn read_pipe(src: &Path, meta: &std::fs::Metadata) -> Result<bytes::Bytes> {
    #[cfg(unix)]
    let pipe = {
        use std::os::unix::fs::FileTypeExt;
        meta.file_type().is_fifo() || meta.file_type().is_socket()
    };
    #[cfg(not(unix))]
    let pipe = false;
    if !pipe {
        return Err(Error::InvalidInput(format!(
            "--input {} is not a regular file, a folder or a pipe (a device or other special file): pass a folder of images, a text file of paths, or a .jsonl / .parquet table",
            src.display()
        )));
    }
    let mut data = Vec::new();
    let file = File::open(src).map_err(|e| Error::io(src, e))?;
    std::io::Read::read_to_end(&mut std::io::Read::take(file, MAX_PIPED_INPUT + 1), &mut data)
        .map_err(|e| Error::io(src, e))?;
    if data.len() as u64 > MAX_PIPED_INPUT {
        return Err(Error::InvalidInput(format!(
            "--input {} is a pipe of more than {} MiB, read into memory as it can be read only once: write it to a file and pass that",
            src.display(),
            MAX_PIPED_INPUT >> 20
        )));
    }
    Ok(data.into())
}

fn extension(p: &Path) -> String {
    p.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default()
}

/// Image files under `dir`, recursively. Symlinked folders are not followed (no cycles).
fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(|e| Error::io(&path, e))?;
        if kind.is_dir() {
            walk(&path, out)?;
        } else if (kind.is_file() || (kind.is_symlink() && path.is_file()))
            && IMAGE_EXTENSIONS.contains(&extension(&path).as_str())
        {
            out.push(path);
        }
    }
    Ok(())
}

fn resolve(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_relative() {
        base.join(p)
    } else {
        p.to_path_buf()
    }
}

/// Lines of a list or table with their 1-based numbers, without line ends (`\n` or `\r\n`);
/// blank lines dropped. A line past [`MAX_LINE`] bytes is an error.
fn lines(src: &Source) -> Result<impl Iterator<Item = Result<(usize, Vec<u8>)>> + Send> {
    let mut reader = src.reader()?;
    let mut n = 0;
    Ok(std::iter::from_fn(move || loop {
        let mut line = Vec::new();
        n += 1;
        let read = std::io::Read::take(&mut reader, MAX_LINE as u64 + 1).read_until(b'\n', &mut line);
        match read {
            Ok(0) => return None,
            Err(e) => return Some(Err(Error::InvalidInput(format!("line {n}: cannot read: {e}")))),
            Ok(_) if line.len() > MAX_LINE && line.last() != Some(&b'\n') => {
                return Some(Err(Error::InvalidInput(format!(
                    "line {n} is longer than {} MiB: not a list of paths or a JSONL table",
                    MAX_LINE >> 20
                ))))
            }
            Ok(_) => {}
        }
        let end = line.strip_suffix(b"\n").map_or(line.len(), <[u8]>::len);
        let end = line[..end].strip_suffix(b"\r").map_or(end, <[u8]>::len);
        line.truncate(end);
        if !line.iter().all(u8::is_ascii_whitespace) {
            return Some(Ok((n, line)));
        }
    }))
}

/// Non-blank lines: a first pass for the progress total (cheap next to decoding the images).
fn count_lines(src: &Source) -> Result<usize> {
    lines(src)?.try_fold(0, |n, l| l.map(|_| n + 1))
}

/// [`count_lines`], and whether some line is not UTF-8 (a list of paths: that input's records
/// carry [`RAW_PATH_FIELD`]).
fn count_list_lines(src: &Source) -> Result<(usize, bool)> {
    lines(src)?.try_fold((0, false), |(n, raw), l| l.map(|(_, l)| (n + 1, raw || std::str::from_utf8(&l).is_err())))
}

/// A list line as a path: its bytes as they are (a file name need not be UTF-8 on Unix).
fn line_path(line: &[u8]) -> PathBuf {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        PathBuf::from(std::ffi::OsStr::from_bytes(line))
    }
    #[cfg(not(unix))]
    PathBuf::from(String::from_utf8_lossy(line).into_owned())
}

fn open_list(src: &Source, base: PathBuf) -> Result<Input> {
    let (total, raw_names) = count_list_lines(src)?;
    let items = lines(src)?.map(move |l| {
        let (_, line) = l?;
        let path = line_path(&line);
        let (image, raw) = path_label(&line);
        Ok(Item {
            source: Ok(ImageRef::Path(if path.is_relative() { base.join(&path) } else { path })),
            image,
            raw,
            id: None,
            question: None,
        })
    });
    Ok(Input { total: Some(total), id_field: None, items: Box::new(items), path_keys: false, raw_names })
}

fn open_jsonl(src: &Path, data: &Source, base: PathBuf, opts: &InputOptions) -> Result<Input> {
    let total = count_lines(data)?;
    // The id column is the first line's: every record of one output has the same fields.
    let first = lines(data)?.next().transpose()?;
    let id_field = first
        .and_then(|(_, l)| serde_json::from_slice::<serde_json::Value>(&l).ok())
        .and_then(|v| ID_COLUMNS.iter().find(|c| v.get(**c).is_some()).map(|c| c.to_string()));
    let name = src.display().to_string();
    let (path_column, idf) = (opts.path_column.clone(), id_field.clone());
    let items = lines(data)?.map(move |l| {
        let (n, line) = l?;
        let here = format!("{name}:{n}");
        let v: serde_json::Value = match serde_json::from_slice(&line) {
            Ok(v @ serde_json::Value::Object(_)) => v,
            Ok(_) => return Ok(bad_row(here, "the line is not a JSON object".into())),
            Err(e) => return Ok(bad_row(here, format!("the line is not JSON: {e}"))),
        };
        let id = idf.as_ref().and_then(|f| v.get(f)).and_then(|v| match v {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Null => None,
            other => Some(other.to_string()),
        });
        let question = v.get(QUESTION_COLUMN).and_then(|q| q.as_str()).map(str::to_string);
        let column = match &path_column {
            Some(c) => Some(c.as_str()),
            None => PATH_COLUMNS.iter().copied().find(|c| v.get(*c).is_some()),
        };
        // A path string, or a Hugging Face image object `{"path": ...}`.
        let path = column.and_then(|c| v.get(c)).and_then(|p| p.as_str().or_else(|| p.get("path")?.as_str()));
        let (image, source) = match path {
            Some(p) => (p.to_string(), Ok(ImageRef::Path(resolve(&base, p)))),
            None => (here, Err(missing_column(column, &path_column))),
        };
        Ok(Item { image, raw: None, id, source, question })
    });
    Ok(Input { total: Some(total), id_field, items: Box::new(items), path_keys: false, raw_names: false })
}

fn bad_row(here: String, msg: String) -> Item {
    Item { image: here, raw: None, id: None, source: Err(msg), question: None }
}

fn missing_column(found: Option<&str>, asked: &Option<String>) -> String {
    match (found, asked) {
        (_, Some(c)) => format!("no image path in column `{c}` (--path-column)"),
        (Some(c), None) => format!("column `{c}` holds no image path"),
        (None, None) => format!(
            "no image column: expected one of {} (or name it with --path-column)",
            PATH_COLUMNS.map(|c| format!("`{c}`")).join(", ")
        ),
    }
}

fn open_parquet(src: &Path, data: Source, base: PathBuf, opts: &InputOptions) -> Result<Input> {
    match data {
        Source::File(p) => {
            let file = File::open(&p).map_err(|e| Error::io(&p, e))?;
            let check = file.try_clone().map_err(|e| Error::io(&p, e))?;
            open_parquet_from(src, file, &check, base, opts)
        }
        Source::Memory(b) => open_parquet_from(src, b.clone(), &b, base, opts),
    }
}

/// Opens the Parquet table `reader` (`check`: the same bytes, for the size checks of
/// [`super::parquet_check`], made before the parquet crate parses or reads anything).
fn open_parquet_from<R: parquet::file::reader::ChunkReader + 'static, C: parquet::file::reader::ChunkReader>(
    src: &Path,
    reader: R,
    check: &C,
    base: PathBuf,
    opts: &InputOptions,
) -> Result<Input> {
    super::parquet_check::check_footer(src, check)?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(reader)
        .map_err(|e| Error::InvalidInput(format!("{}: not a readable Parquet file: {e}", src.display())))?;
    let schema = builder.schema().clone();
    let find = |name: &str| schema.fields().iter().position(|f| f.name() == name);
    let image_col = match &opts.path_column {
        Some(c) => find(c).ok_or_else(|| {
            Error::InvalidInput(format!(
                "{}: no column `{c}` (--path-column); its columns are {}",
                src.display(),
                schema.fields().iter().map(|f| format!("`{}`", f.name())).collect::<Vec<_>>().join(", ")
            ))
        })?,
        None => PATH_COLUMNS
            .iter()
            .find_map(|c| find(c))
            .ok_or_else(|| Error::InvalidInput(format!("{}: {}", src.display(), missing_column(None, &None))))?,
    };
    let id_col = ID_COLUMNS.iter().find_map(|c| find(c));
    let question_col = find(QUESTION_COLUMN);
    let wanted: Vec<usize> = [Some(image_col), id_col, question_col].into_iter().flatten().collect();
    let mask = ProjectionMask::roots(builder.parquet_schema(), wanted.iter().copied());
    let scan = super::parquet_check::leaves_of(builder.metadata(), &wanted);
    super::parquet_check::check_chunks(src, check, builder.metadata(), &scan)?;
    let total = usize::try_from(builder.metadata().file_metadata().num_rows()).unwrap_or(0);
    // Small record batches: image bytes can be large, and only a few batches are held at once.
    let reader = builder
        .with_projection(mask)
        .with_batch_size(64)
        .build()
        .map_err(|e| Error::InvalidInput(format!("{}: cannot read: {e}", src.display())))?;
    let name_of = |i: Option<usize>| i.map(|i| schema.field(i).name().clone());
    let (image_name, id_field, question_name) = (name_of(Some(image_col)), name_of(id_col), name_of(question_col));
    let (name, path) = (src.display().to_string(), src.to_path_buf());
    let mut row = 0usize;
    let id_name = id_field.clone();
    let items = reader.flat_map(move |batch| -> Vec<Result<Item>> {
        let batch: RecordBatch = match batch {
            Ok(b) => b,
            Err(e) => return vec![Err(Error::InvalidInput(format!("{}: cannot read: {e}", path.display())))],
        };
        // A dictionary-encoded column (pyarrow, Polars) as its values.
        let col = |n: &Option<String>| {
            let a = n.as_deref().and_then(|n| batch.column_by_name(n)).cloned()?;
            match a.data_type() {
                DataType::Dictionary(_, values) => arrow_cast::cast(&a, values).ok(),
                _ => Some(a),
            }
        };
        let (image, id, question) = (col(&image_name), col(&id_name), col(&question_name));
        let out = (0..batch.num_rows())
            .map(|r| {
                let here = format!("{name}#{}", row + r);
                let (label, source) = match image.as_ref().map(|a| image_cell(a, r)) {
                    Some(Cell::Path(p)) => (p.clone(), Ok(ImageRef::Path(resolve(&base, &p)))),
                    Some(Cell::Bytes(b, p)) => (p.unwrap_or(here), Ok(ImageRef::Bytes(b))),
                    Some(Cell::Missing(why)) | Some(Cell::Bad(why)) => (here, Err(why)),
                    None => (here, Err("no image column".into())),
                };
                let id = id.as_ref().and_then(|a| id_cell(a, r));
                let question = question.as_ref().and_then(|a| text_cell(a, r));
                Ok(Item { image: label, raw: None, id, source, question })
            })
            .collect();
        row += batch.num_rows();
        out
    });
    Ok(Input { total: Some(total), id_field, items: Box::new(items), path_keys: false, raw_names: false })
}

enum Cell {
    Path(String),
    /// Image bytes and the path stored with them, if any.
    Bytes(Vec<u8>, Option<String>),
    Missing(String),
    Bad(String),
}

/// A cell as text: strings as they are, integers in decimal (ids), None for null or other types.
fn text_cell(a: &ArrayRef, r: usize) -> Option<String> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Int32Type, Int64Type, UInt32Type, UInt64Type};
    if a.is_null(r) {
        return None;
    }
    Some(match a.data_type() {
        DataType::Utf8 => a.as_string::<i32>().value(r).to_string(),
        DataType::LargeUtf8 => a.as_string::<i64>().value(r).to_string(),
        DataType::Utf8View => a.as_string_view().value(r).to_string(),
        DataType::Int64 => a.as_primitive::<Int64Type>().value(r).to_string(),
        DataType::Int32 => a.as_primitive::<Int32Type>().value(r).to_string(),
        DataType::UInt64 => a.as_primitive::<UInt64Type>().value(r).to_string(),
        DataType::UInt32 => a.as_primitive::<UInt32Type>().value(r).to_string(),
        _ => return None,
    })
}

/// An id cell as text: a string or integer as [`text_cell`], a float or bool as its JSON text
/// (as a JSONL id of that value), None for null or other types.
fn id_cell(a: &ArrayRef, r: usize) -> Option<String> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Float32Type, Float64Type, Int16Type, Int8Type, UInt16Type, UInt8Type};
    use serde_json::Value;
    if a.is_null(r) {
        return None;
    }
    let v = match a.data_type() {
        DataType::Int8 => Value::from(a.as_primitive::<Int8Type>().value(r)),
        DataType::Int16 => Value::from(a.as_primitive::<Int16Type>().value(r)),
        DataType::UInt8 => Value::from(a.as_primitive::<UInt8Type>().value(r)),
        DataType::UInt16 => Value::from(a.as_primitive::<UInt16Type>().value(r)),
        DataType::Float32 => Value::from(a.as_primitive::<Float32Type>().value(r)),
        DataType::Float64 => Value::from(a.as_primitive::<Float64Type>().value(r)),
        DataType::Boolean => Value::from(a.as_boolean().value(r)),
        _ => return text_cell(a, r),
    };
    Some(v.to_string())
}

fn bytes_cell(a: &ArrayRef, r: usize) -> Option<Vec<u8>> {
    use arrow_array::cast::AsArray;
    if a.is_null(r) {
        return None;
    }
    Some(match a.data_type() {
        DataType::Binary => a.as_binary::<i32>().value(r).to_vec(),
        DataType::LargeBinary => a.as_binary::<i64>().value(r).to_vec(),
        DataType::BinaryView => a.as_binary_view().value(r).to_vec(),
        _ => return None,
    })
}

/// The image of row `r`: a path string, bytes, or a Hugging Face image struct
/// `{bytes, path}` (bytes when present, else the path).
fn image_cell(a: &ArrayRef, r: usize) -> Cell {
    use arrow_array::cast::AsArray;
    if a.is_null(r) {
        return Cell::Missing("the image cell is null".into());
    }
    match a.data_type() {
        DataType::Struct(_) => {
            let s = a.as_struct();
            let path = s.column_by_name("path").and_then(|p| text_cell(p, r));
            match (s.column_by_name("bytes").and_then(|b| bytes_cell(b, r)), path) {
                (Some(b), p) => Cell::Bytes(b, p),
                (None, Some(p)) => Cell::Path(p),
                (None, None) => Cell::Missing("the image struct has neither `bytes` nor `path`".into()),
            }
        }
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView => {
            bytes_cell(a, r).map_or_else(|| Cell::Missing("null".into()), |b| Cell::Bytes(b, None))
        }
        t => match text_cell(a, r) {
            Some(p) => Cell::Path(p),
            None => Cell::Bad(format!(
                "the image column is {t}: expected a path string, bytes, or a {{bytes, path}} struct"
            )),
        },
    }
}

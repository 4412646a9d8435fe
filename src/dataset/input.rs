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
    /// come without a path.
    pub image: String,
    /// The `id` / `key` column's value, when the input has that column.
    pub id: Option<String>,
    /// The image, or why this row has none (that row's record gets the error).
    pub source: std::result::Result<ImageRef, String>,
    pub question: Option<String>,
}

impl Item {
    /// What `--resume` matches against the output: the id when the input has one, else the image.
    pub fn key(&self) -> &str {
        self.id.as_deref().unwrap_or(&self.image)
    }
}

/// An opened input.
pub struct Input {
    /// Inputs in all (before `--resume` skips any), when known up front.
    pub total: Option<usize>,
    /// `id` or `key` when the input names its records with that column (records carry it).
    pub id_field: Option<String>,
    pub items: Box<dyn Iterator<Item = Result<Item>> + Send>,
}

impl Input {
    /// The output field `--resume` reads keys from.
    pub fn key_field(&self) -> &str {
        self.id_field.as_deref().unwrap_or("image")
    }
}

/// How to read a table's columns.
#[derive(Debug, Clone, Default)]
pub struct InputOptions {
    /// The column holding each row's image path or bytes (default: the first of [`PATH_COLUMNS`]).
    pub path_column: Option<String>,
}

/// Opens `src`: a folder (walked recursively for [`IMAGE_EXTENSIONS`], sorted), a `.jsonl` /
/// `.ndjson` or `.parquet` table, or else a text file of paths (one per line). Relative paths in
/// a file resolve against that file's folder.
pub fn open(src: &Path, opts: &InputOptions) -> Result<Input> {
    if src.is_dir() {
        let mut paths = Vec::new();
        walk(src, &mut paths)?;
        paths.sort();
        let items = paths.into_iter().map(|p| {
            Ok(Item { image: p.display().to_string(), id: None, source: Ok(ImageRef::Path(p)), question: None })
        });
        let total = items.len();
        return Ok(Input { total: Some(total), id_field: None, items: Box::new(items) });
    }
    if !src.exists() {
        return Err(Error::MissingFile {
            path: src.to_path_buf(),
            hint: " (--input takes a folder of images, a text file of paths, or a .jsonl / .parquet table)".into(),
        });
    }
    let base = src.parent().map(Path::to_path_buf).unwrap_or_default();
    match extension(src).as_str() {
        "jsonl" | "ndjson" => open_jsonl(src, base, opts),
        "parquet" => open_parquet(src, base, opts),
        _ => open_list(src, base),
    }
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

/// Lines of a text file with their 1-based numbers, without line ends; blank lines dropped.
fn lines(src: &Path) -> Result<impl Iterator<Item = Result<(usize, String)>> + Send> {
    let file = File::open(src).map_err(|e| Error::io(src, e))?;
    let src = src.to_path_buf();
    Ok(BufReader::new(file).lines().enumerate().filter_map(move |(i, l)| match l {
        Ok(l) => {
            let l = l.strip_suffix('\r').unwrap_or(&l).to_string();
            (!l.trim().is_empty()).then_some(Ok((i + 1, l)))
        }
        Err(e) => Some(Err(Error::io(&src, e))),
    }))
}

/// Non-blank lines: a first pass for the progress total (cheap next to decoding the images).
fn count_lines(src: &Path) -> Result<usize> {
    lines(src)?.try_fold(0, |n, l| l.map(|_| n + 1))
}

fn open_list(src: &Path, base: PathBuf) -> Result<Input> {
    let total = count_lines(src)?;
    let items = lines(src)?.map(move |l| {
        let (_, line) = l?;
        Ok(Item { source: Ok(ImageRef::Path(resolve(&base, &line))), image: line, id: None, question: None })
    });
    Ok(Input { total: Some(total), id_field: None, items: Box::new(items) })
}

fn open_jsonl(src: &Path, base: PathBuf, opts: &InputOptions) -> Result<Input> {
    let total = count_lines(src)?;
    // The id column is the first line's: every record of one output has the same fields.
    let first = lines(src)?.next().transpose()?;
    let id_field = first
        .and_then(|(_, l)| serde_json::from_str::<serde_json::Value>(&l).ok())
        .and_then(|v| ID_COLUMNS.iter().find(|c| v.get(**c).is_some()).map(|c| c.to_string()));
    let name = src.display().to_string();
    let (path_column, idf) = (opts.path_column.clone(), id_field.clone());
    let items = lines(src)?.map(move |l| {
        let (n, line) = l?;
        let here = format!("{name}:{n}");
        let v: serde_json::Value = match serde_json::from_str(&line) {
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
        Ok(Item { image, id, source, question })
    });
    Ok(Input { total: Some(total), id_field, items: Box::new(items) })
}

fn bad_row(here: String, msg: String) -> Item {
    Item { image: here, id: None, source: Err(msg), question: None }
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

fn open_parquet(src: &Path, base: PathBuf, opts: &InputOptions) -> Result<Input> {
    let file = File::open(src).map_err(|e| Error::io(src, e))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
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
    let total = usize::try_from(builder.metadata().file_metadata().num_rows()).unwrap_or(0);
    // Small record batches: image bytes can be large, and only a few batches are held at once.
    let reader = builder
        .with_projection(mask)
        .with_batch_size(64)
        .build()
        .map_err(|e| Error::InvalidInput(format!("{}: cannot read: {e}", src.display())))?;
    let names: Vec<String> = wanted.iter().map(|&i| schema.field(i).name().clone()).collect();
    let id_field = id_col.map(|i| schema.field(i).name().clone());
    let (name, path) = (src.display().to_string(), src.to_path_buf());
    let mut row = 0usize;
    let items = reader.flat_map(move |batch| -> Vec<Result<Item>> {
        let batch: RecordBatch = match batch {
            Ok(b) => b,
            Err(e) => return vec![Err(Error::InvalidInput(format!("{}: cannot read: {e}", path.display())))],
        };
        let col = |n: &str| batch.column_by_name(n).cloned();
        let image = col(&names[0]);
        let id = id_col.and(col(&names[1]));
        let question = question_col.and(col(names.last().map_or("", String::as_str)));
        let out = (0..batch.num_rows())
            .map(|r| {
                let here = format!("{name}#{}", row + r);
                let (label, source) = match image.as_ref().map(|a| image_cell(a, r)) {
                    Some(Cell::Path(p)) => (p.clone(), Ok(ImageRef::Path(resolve(&base, &p)))),
                    Some(Cell::Bytes(b, p)) => (p.unwrap_or(here), Ok(ImageRef::Bytes(b))),
                    Some(Cell::Missing(why)) | Some(Cell::Bad(why)) => (here, Err(why)),
                    None => (here, Err("no image column".into())),
                };
                let id = id.as_ref().and_then(|a| text_cell(a, r));
                let question = question.as_ref().and_then(|a| text_cell(a, r));
                Ok(Item { image: label, id, source, question })
            })
            .collect();
        row += batch.num_rows();
        out
    });
    Ok(Input { total: Some(total), id_field, items: Box::new(items) })
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

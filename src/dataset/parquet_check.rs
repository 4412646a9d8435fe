//! What a Parquet file declares, checked before the parquet crate allocates it. The crate trusts
//! a file's sizes: a list in the footer is a `Vec::with_capacity` of the count it declares (2^31
//! schema elements abort the process), a column chunk may sit past the end of the file (a
//! negative offset panics; a huge length lets a page claim up to 2 GiB that is reserved before
//! the read fails), and a compressed page's uncompressed size (up to 2 GiB) is reserved before
//! it is decompressed. These checks read only the footer and the page headers, streaming (a few
//! bytes per page), and refuse a size the file cannot hold or past [`MAX_PAGE_BYTES`], naming
//! the file, the column, the size and the limit.

use std::io::Read;
use std::path::Path;

use parquet::file::metadata::ParquetMetaData;
use parquet::file::reader::ChunkReader;

use crate::error::{Error, Result};

/// The largest page, compressed or not, glimpse reads: one page is held whole (and decompressed
/// whole) while it is decoded. Writers cut pages at about 1 MiB (pyarrow, Polars, Spark,
/// parquet-rs); a page holding one large image is the size of that image.
pub const MAX_PAGE_BYTES: u64 = 256 << 20;

/// Nesting depth of Thrift structs and lists walked (the parquet crate's own bound).
const MAX_DEPTH: u32 = 64;

/// Why a Thrift value is not valid, in words.
type Walk<T> = std::result::Result<T, String>;

/// A reader of Thrift's compact protocol (the encoding of Parquet's footer and page headers)
/// that only walks values, never holding one: `left` is how many bytes the value may span, and
/// no list, binary or string may declare more than that.
struct Thrift<R> {
    r: R,
    left: u64,
}

impl<R: Read> Thrift<R> {
    fn byte(&mut self) -> Walk<u8> {
        if self.left == 0 {
            return Err("it ends in the middle of a value".into());
        }
        let mut b = [0u8];
        self.r.read_exact(&mut b).map_err(|e| format!("cannot read it: {e}"))?;
        self.left -= 1;
        Ok(b[0])
    }

    fn varint(&mut self) -> Walk<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("an integer runs past 10 bytes".into())
    }

    fn zigzag(&mut self) -> Walk<i64> {
        let v = self.varint()?;
        Ok((v >> 1) as i64 ^ -((v & 1) as i64))
    }

    fn skip_bytes(&mut self, n: u64, what: &str) -> Walk<()> {
        if n > self.left {
            return Err(format!("{what} of {n} bytes in the {} bytes left of it", self.left));
        }
        let copied = std::io::copy(&mut (&mut self.r).take(n), &mut std::io::sink())
            .map_err(|e| format!("cannot read it: {e}"))?;
        if copied != n {
            return Err("it ends in the middle of a value".into());
        }
        self.left -= n;
        Ok(())
    }

    /// `n` items, each at least a byte: refused when fewer bytes are left.
    fn check_count(&self, n: u64, what: &str) -> Walk<()> {
        if n > self.left {
            return Err(format!("{what} of {n} items in the {} bytes left of it", self.left));
        }
        Ok(())
    }

    /// Skips a value of compact type `ty` (a struct field's; a bool's value is in its field header).
    fn skip(&mut self, ty: u8, depth: u32) -> Walk<()> {
        if depth == 0 {
            return Err(format!("values nested more than {MAX_DEPTH} deep"));
        }
        match ty {
            1 | 2 => Ok(()),
            3 => self.byte().map(drop),
            4..=6 => self.varint().map(drop),
            7 => self.skip_bytes(8, "a double"),
            8 => {
                let n = self.varint()?;
                self.skip_bytes(n, "a string")
            }
            9 | 10 => {
                let h = self.byte()?;
                let n = if h >> 4 == 15 { self.varint()? } else { u64::from(h >> 4) };
                self.check_count(n, "a list")?;
                (0..n).try_for_each(|_| self.skip_item(h & 0x0f, depth - 1))
            }
            11 => {
                let n = self.varint()?;
                if n == 0 {
                    return Ok(());
                }
                let kv = self.byte()?;
                self.check_count(n.saturating_mul(2), "a map")?;
                (0..n).try_for_each(|_| {
                    self.skip_item(kv >> 4, depth - 1)?;
                    self.skip_item(kv & 0x0f, depth - 1)
                })
            }
            12 => self.walk_struct(depth - 1, &mut |_, _, _| Ok(false)),
            13 => self.skip_bytes(16, "a uuid"),
            t => Err(format!("a value of unknown type {t}")),
        }
    }

    /// Skips a list item of type `ty` (a bool item is a byte of its own).
    fn skip_item(&mut self, ty: u8, depth: u32) -> Walk<()> {
        match ty {
            1 | 2 => self.byte().map(drop),
            _ => self.skip(ty, depth),
        }
    }

    /// Walks a struct's fields to its end: `visit(self, field id, type)` reads a field it wants
    /// and returns true; every other field is skipped.
    fn walk_struct(&mut self, depth: u32, visit: &mut dyn FnMut(&mut Self, i16, u8) -> Walk<bool>) -> Walk<()> {
        let mut last = 0i16;
        loop {
            let h = self.byte()?;
            if h == 0 {
                return Ok(());
            }
            let ty = h & 0x0f;
            let id = match h >> 4 {
                0 => self.zigzag()? as i16,
                delta => last.wrapping_add(i16::from(delta)),
            };
            last = id;
            if !visit(self, id, ty)? {
                self.skip(ty, depth)?;
            }
        }
    }
}

fn refused(src: &Path, why: String) -> Error {
    Error::InvalidInput(format!("{}: not a readable Parquet file: {why}", src.display()))
}

fn read_err(src: &Path, e: impl std::fmt::Display) -> Error {
    Error::InvalidInput(format!("{}: cannot read: {e}", src.display()))
}

/// Walks the footer of the Parquet file `file` (`src` names it) before the parquet crate parses
/// it: a list or string declaring more than the footer holds is refused. A file too short or
/// without the `PAR1` magic is left to the crate's own error.
pub fn check_footer<R: ChunkReader>(src: &Path, file: &R) -> Result<()> {
    let len = file.len();
    if len < 12 {
        return Ok(());
    }
    let tail = file.get_bytes(len - 8, 8).map_err(|e| read_err(src, e))?;
    if &tail[4..] != b"PAR1" {
        return Ok(());
    }
    let footer = u64::from(u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]));
    if footer + 12 > len {
        return Ok(());
    }
    let r = file.get_read(len - 8 - footer).map_err(|e| read_err(src, e))?;
    let mut t = Thrift { r, left: footer };
    t.walk_struct(MAX_DEPTH, &mut |_, _, _| Ok(false)).map_err(|why| {
        refused(src, format!("its footer ({footer} bytes) declares {why}: the file is corrupt or not Parquet"))
    })
}

/// Refuses a column chunk that the footer `meta` places outside the file `file`, and walks the
/// page headers of the leaf columns `scan[i]` marks (those a reader will read): a page larger
/// than [`MAX_PAGE_BYTES`] (compressed or uncompressed), or running past its column chunk, is
/// refused before the parquet crate reserves room for it.
pub fn check_chunks<R: ChunkReader>(src: &Path, file: &R, meta: &ParquetMetaData, scan: &[bool]) -> Result<()> {
    let file_len = file.len();
    let leaves = meta.file_metadata().schema_descr().num_columns();
    for (g, group) in meta.row_groups().iter().enumerate() {
        if group.columns().len() != leaves {
            return Err(refused(
                src,
                format!("row group {g} has {} column chunks for {leaves} columns", group.columns().len()),
            ));
        }
        for (c, col) in group.columns().iter().enumerate() {
            let name = col.column_path().string();
            // As the crate's `byte_range`, which panics on a negative value.
            let start = col.dictionary_page_offset().unwrap_or(col.data_page_offset());
            let len = col.compressed_size();
            let end = u64::try_from(start).ok().zip(u64::try_from(len).ok()).and_then(|(s, l)| s.checked_add(l));
            if end.is_none_or(|end| end > file_len) {
                return Err(refused(
                    src,
                    format!(
                        "column `{name}` (row group {g}) declares {len} bytes at offset {start}, outside the file's {file_len} bytes: the file is truncated or corrupt"
                    ),
                ));
            }
            if scan.get(c).copied().unwrap_or(false) {
                check_pages(src, file, &name, g, start as u64, len as u64)?;
            }
        }
    }
    Ok(())
}

/// Walks the page headers of one column chunk (`len` bytes at `start`).
fn check_pages<R: ChunkReader>(src: &Path, file: &R, column: &str, group: usize, start: u64, len: u64) -> Result<()> {
    let end = start + len;
    let (mut at, mut page) = (start, 0usize);
    while at < end {
        let here = || format!("column `{column}` (row group {group}), page {page} at offset {at}");
        let r = file.get_read(at).map_err(|e| read_err(src, e))?;
        let mut t = Thrift { r, left: end - at };
        let (mut uncompressed, mut compressed) = (None, None);
        t.walk_struct(MAX_DEPTH, &mut |t, id, ty| match (id, ty) {
            (2, 5) => t.zigzag().map(|v| uncompressed = Some(v)).map(|()| true),
            (3, 5) => t.zigzag().map(|v| compressed = Some(v)).map(|()| true),
            _ => Ok(false),
        })
        .map_err(|why| refused(src, format!("{}: its header declares {why}", here())))?;
        let header = end - at - t.left;
        let (Some(uncompressed), Some(compressed)) = (uncompressed, compressed) else {
            return Err(refused(src, format!("{}: its header gives no page size", here())));
        };
        for (size, what) in [(compressed, "compressed"), (uncompressed, "uncompressed")] {
            if size < 0 || size as u64 > MAX_PAGE_BYTES {
                return Err(Error::InvalidInput(format!(
                    "{}: {} declares a page of {size} bytes {what}, over the {} MiB glimpse reads as one page (refused before reading it): the file is corrupt, or rewrite it with smaller pages (pyarrow: `data_page_size`; one image per row)",
                    src.display(),
                    here(),
                    MAX_PAGE_BYTES >> 20
                )));
            }
        }
        if compressed as u64 > t.left {
            return Err(refused(
                src,
                format!(
                    "{}: its {compressed} bytes run past the end of the column chunk ({} bytes left)",
                    here(),
                    t.left
                ),
            ));
        }
        at += header + compressed as u64;
        page += 1;
    }
    Ok(())
}

/// The leaf columns under the root columns `roots` of `meta`'s schema, as [`check_chunks`]'s
/// `scan`.
pub fn leaves_of(meta: &ParquetMetaData, roots: &[usize]) -> Vec<bool> {
    let schema = meta.file_metadata().schema_descr();
    (0..schema.num_columns()).map(|i| roots.contains(&schema.get_column_root_idx(i))).collect()
}

//! Bytes or a file to 8-bit RGB, as transformers' `load_image` + `convert("RGB")` on Pillow 13:
//! EXIF orientation applied, alpha dropped, grey replicated, palettes expanded, 16-bit samples
//! reduced the way Pillow reduces them. JPEG goes through libjpeg-turbo (see `jpeg.rs`), the
//! other formats through the `image` crate. Sizes are bounded before anything big is allocated.

use std::io::{Cursor, Read};
use std::path::Path;

use image::{DynamicImage, ImageReader, Limits, RgbImage};

use super::{jpeg, orientation, MAX_PIXELS};
use crate::error::{Error, Result};

/// Environment variable that raises (or lowers) [`DecodeLimits::max_file_bytes`].
pub const MAX_BYTES_ENV: &str = "GLIMPSE_MAX_IMAGE_BYTES";
/// Environment variable that sets [`DecodeLimits::max_pixels`] (like Pillow's `MAX_IMAGE_PIXELS`,
/// but this is the refusal threshold itself, not half of it).
pub const MAX_PIXELS_ENV: &str = "GLIMPSE_MAX_IMAGE_PIXELS";

/// Bounds on one image: what may be read and what may be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest image file (or byte buffer) accepted. Checked on the file's size before reading,
    /// and the read itself stops one byte past it.
    pub max_file_bytes: u64,
    /// Largest width x height accepted, checked on the header before decoding.
    pub max_pixels: u64,
}

impl DecodeLimits {
    /// 256 MiB: a maximum-size image (179 megapixels) compresses to far less than this.
    pub const DEFAULT_MAX_FILE_BYTES: u64 = 256 << 20;

    /// The defaults, overridden by `GLIMPSE_MAX_IMAGE_BYTES` / `GLIMPSE_MAX_IMAGE_PIXELS` when set.
    pub fn from_env() -> Result<Self> {
        let var = |name: &str, default: u64| -> Result<u64> {
            match std::env::var(name) {
                Err(std::env::VarError::NotPresent) => Ok(default),
                Ok(v) => v.trim().parse::<u64>().ok().filter(|&n| n > 0).ok_or_else(|| {
                    Error::InvalidInput(format!(
                        "{name}={v:?} is not a positive whole number: unset it or set e.g. {name}={default}"
                    ))
                }),
                Err(e) => Err(Error::InvalidInput(format!("{name}: {e}: unset it or set e.g. {name}={default}"))),
            }
        };
        Ok(Self {
            max_file_bytes: var(MAX_BYTES_ENV, Self::DEFAULT_MAX_FILE_BYTES)?,
            max_pixels: var(MAX_PIXELS_ENV, MAX_PIXELS)?,
        })
    }

    /// What a decoder may allocate: the largest pixel buffer (RGBA, 16 bits) plus headroom.
    fn max_alloc(&self) -> u64 {
        self.max_pixels.saturating_mul(8).saturating_add(64 << 20).max(1 << 30)
    }
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self { max_file_bytes: Self::DEFAULT_MAX_FILE_BYTES, max_pixels: MAX_PIXELS }
    }
}

pub(crate) fn too_many_pixels(w: u32, h: u32, max: u64) -> String {
    format!(
        "image is {w}x{h} = {} pixels, over the {max}-pixel limit (Pillow refuses more than 2 x \
         MAX_IMAGE_PIXELS as a decompression bomb); set {MAX_PIXELS_ENV} to raise it",
        u64::from(w) * u64::from(h)
    )
}

/// Decodes PNG, JPEG, WebP, GIF (first frame) or BMP bytes to 8-bit RGB like transformers'
/// `load_image` (Pillow `ImageOps.exif_transpose` then `convert("RGB")`), within the limits of
/// [`DecodeLimits::from_env`]. `name` is used in error messages.
pub fn decode_rgb(bytes: &[u8], name: &str) -> Result<RgbImage> {
    decode_rgb_with(bytes, name, &DecodeLimits::from_env()?)
}

/// [`decode_rgb`] with explicit limits.
pub fn decode_rgb_with(bytes: &[u8], name: &str, limits: &DecodeLimits) -> Result<RgbImage> {
    let err = |msg: String| Error::Image { path: name.to_string(), msg };
    if bytes.len() as u64 > limits.max_file_bytes {
        return Err(err(too_many_bytes(bytes.len() as u64, limits.max_file_bytes)));
    }
    // Decoders are third-party code fed untrusted bytes: a panic inside one becomes an error for
    // this image instead of taking the process (and the other images of a batch) down.
    let decoded = std::panic::catch_unwind(|| decode_unguarded(bytes, limits))
        .unwrap_or_else(|_| Err("the decoder failed on malformed data".into()))
        .map_err(err)?;
    Ok(orientation::apply(decoded, orientation::orientation(bytes)))
}

fn too_many_bytes(len: u64, max: u64) -> String {
    format!("the file is {len} bytes, over the {max}-byte limit for an image; set {MAX_BYTES_ENV} to raise it")
}

fn decode_unguarded(bytes: &[u8], limits: &DecodeLimits) -> std::result::Result<RgbImage, String> {
    if bytes.is_empty() {
        return Err("the file is empty".into());
    }
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return jpeg::decode(bytes, limits.max_pixels, limits.max_alloc());
    }
    let reader = || ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|e| format!("cannot read: {e}"));
    let probe = reader()?;
    if probe.format().is_none() {
        return Err("not a recognised image format (PNG, JPEG, WebP, GIF, BMP)".into());
    }
    if bytes.starts_with(PNG_SIGNATURE) {
        png_check_compressed_chunks(bytes)?;
    }
    let (w, h) = probe.into_dimensions().map_err(|e| format!("cannot decode: {e}"))?;
    if w == 0 || h == 0 {
        return Err(format!("image is {w}x{h}: it has no pixels"));
    }
    if u64::from(w) * u64::from(h) > limits.max_pixels {
        return Err(too_many_pixels(w, h, limits.max_pixels));
    }
    let mut limited = reader()?;
    let mut decode_limits = Limits::default();
    decode_limits.max_alloc = Some(limits.max_alloc());
    limited.limits(decode_limits.clone());
    match limited.decode() {
        Ok(decoded) => Ok(to_rgb8(decoded)),
        Err(e) => {
            // Pillow stops reading a PNG once every row is decoded, so a file cut after its
            // image data (zlib checksum, chunk CRC or IEND missing) still opens there. Retry such
            // a file with its tail completed; if rows are missing it still fails.
            let repaired = png_complete_tail(bytes).ok_or_else(|| format!("cannot decode: {e}"))?;
            let mut reader =
                ImageReader::new(Cursor::new(&repaired[..])).with_guessed_format().map_err(|e| e.to_string())?;
            reader.limits(decode_limits);
            let decoded = reader.decode().map_err(|_| format!("cannot decode: {e} (image file is truncated)"))?;
            Ok(to_rgb8(decoded))
        }
    }
}

const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";
/// Pillow's `MAX_TEXT_CHUNK` (`ImageFile.SAFEBLOCK`): the most one compressed PNG chunk (iCCP,
/// zTXt, compressed iTXt) may inflate to.
const PNG_MAX_CHUNK_INFLATED: usize = 1 << 20;
/// Pillow's `MAX_TEXT_MEMORY`: the most the text chunks of one PNG may hold in all.
const PNG_MAX_TEXT_MEMORY: usize = 64 << 20;

/// Pillow's checks on a PNG's compressed metadata, made before the decoder inflates it (a 4 MB
/// iCCP chunk can inflate to 4 GB): an iCCP, zTXt or compressed iTXt chunk that inflates past
/// [`PNG_MAX_CHUNK_INFLATED`] is refused ("Decompressed Data Too Large", as Pillow), and so is
/// text past [`PNG_MAX_TEXT_MEMORY`] in all. A chunk that does not inflate is left to the decoder
/// (Pillow ignores it).
fn png_check_compressed_chunks(b: &[u8]) -> std::result::Result<(), String> {
    let mut at = PNG_SIGNATURE.len();
    let mut text = 0usize;
    while at + 8 <= b.len() {
        let len = u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]) as usize;
        let kind = &b[at + 4..at + 8];
        let data = &b[at + 8..b.len().min((at + 8).saturating_add(len))];
        at = at.saturating_add(12).saturating_add(len);
        let nul = data.iter().position(|&c| c == 0);
        // The compressed bytes after "keyword\0 method" (iTXt: "keyword\0 flag method
        // language\0 translated\0", compressed only when flag is 1).
        let compressed = match (kind, nul) {
            (b"iCCP" | b"zTXt", Some(n)) => data.get(n + 2..),
            (b"iTXt", Some(n)) if data.get(n + 1) == Some(&1) => {
                let rest = data.get(n + 3..).unwrap_or_default();
                let lang = rest.iter().position(|&c| c == 0);
                let rest = lang.and_then(|l| rest.get(l + 1..)).unwrap_or_default();
                rest.iter().position(|&c| c == 0).and_then(|t| rest.get(t + 1..))
            }
            (b"tEXt" | b"iTXt", _) => {
                text += data.len();
                None
            }
            _ => None,
        };
        let Some(compressed) = compressed else { continue };
        let inflated = match miniz_oxide::inflate::decompress_to_vec_zlib_with_limit(compressed, PNG_MAX_CHUNK_INFLATED) {
            Ok(v) => v.len(),
            Err(e) if e.status == miniz_oxide::inflate::TINFLStatus::HasMoreOutput => {
                return Err(format!(
                    "cannot decode: Decompressed Data Too Large: its {} chunk inflates past {} bytes (Pillow refuses it too)",
                    String::from_utf8_lossy(kind),
                    PNG_MAX_CHUNK_INFLATED
                ))
            }
            Err(_) => 0,
        };
        if kind != b"iCCP" {
            text += inflated;
        }
        if text > PNG_MAX_TEXT_MEMORY {
            return Err(format!(
                "cannot decode: Too much memory used in text chunks: over {PNG_MAX_TEXT_MEMORY} bytes (Pillow refuses it too)"
            ));
        }
    }
    Ok(())
}

/// A PNG whose last chunk is cut short, or that lacks IEND, with that chunk's length and CRC
/// fitted to the bytes present and IEND appended. None when the file is not such a PNG.
fn png_complete_tail(b: &[u8]) -> Option<Vec<u8>> {
    const SIG: &[u8] = b"\x89PNG\r\n\x1a\n";
    if !b.starts_with(SIG) {
        return None;
    }
    let mut at = SIG.len();
    let mut out = SIG.to_vec();
    while at + 8 <= b.len() {
        let len = u32::from_be_bytes(b[at..at + 4].try_into().ok()?) as usize;
        let kind = &b[at + 4..at + 8];
        if kind == b"IEND" {
            return None; // complete file: its failure is not a truncation
        }
        let data = &b[at + 8..b.len().min((at + 8).saturating_add(len))];
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let start = out.len();
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        let crc = crc32(&out[start..]);
        out.extend_from_slice(&crc.to_be_bytes());
        at = at.saturating_add(12).saturating_add(len);
    }
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(b"IEND");
    out.extend_from_slice(&crc32(b"IEND").to_be_bytes());
    Some(out)
}

fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &byte in data {
        c ^= u32::from(byte);
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}

/// Pillow 13 `convert("RGB")` of what the `image` crate decoded. 8-bit modes: alpha dropped (no
/// compositing), grey replicated. 16-bit PNG: Pillow opens grey as mode `I;16` and clamps each
/// value to 255 on conversion; grey+alpha, RGB and RGBA are unpacked to 8 bits by keeping the
/// high byte.
fn to_rgb8(img: DynamicImage) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    let rgb: Vec<u8> = match &img {
        DynamicImage::ImageLuma16(g) => g.as_raw().iter().flat_map(|&v| [v.min(255) as u8; 3]).collect(),
        DynamicImage::ImageLumaA16(g) => g.as_raw().chunks_exact(2).flat_map(|p| [(p[0] >> 8) as u8; 3]).collect(),
        DynamicImage::ImageRgb16(c) => c.as_raw().iter().map(|&v| (v >> 8) as u8).collect(),
        DynamicImage::ImageRgba16(c) => {
            c.as_raw().chunks_exact(4).flat_map(|p| [(p[0] >> 8) as u8, (p[1] >> 8) as u8, (p[2] >> 8) as u8]).collect()
        }
        // 8-bit RGB is moved out as it is; other 8-bit modes are converted.
        _ => return img.into_rgb8(),
    };
    RgbImage::from_raw(w, h, rgb).expect("buffer sized for the image")
}

/// Reads and decodes an image file within the limits of [`DecodeLimits::from_env`].
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    load_rgb_with(path, &DecodeLimits::from_env()?)
}

/// [`load_rgb`] with explicit limits. Only regular files are read (not devices, FIFOs or
/// directories, whose size says nothing about what a read returns), and never more than
/// `max_file_bytes + 1` bytes, so a file that grows while being read cannot exceed the limit.
pub fn load_rgb_with(path: &Path, limits: &DecodeLimits) -> Result<RgbImage> {
    let name = path.display().to_string();
    let err = |msg: String| Error::Image { path: name.clone(), msg };
    // Checked before opening: opening a FIFO would block until something writes to it.
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(err(format!(
            "not a regular file ({}): give the path of an image file",
            if meta.is_dir() { "a directory" } else { "a device, FIFO or socket" }
        )));
    }
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // The path may have been replaced between the two calls: check what was actually opened.
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(err("not a regular file: give the path of an image file".into()));
    }
    if meta.len() > limits.max_file_bytes {
        return Err(err(too_many_bytes(meta.len(), limits.max_file_bytes)));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(limits.max_file_bytes.saturating_add(1)).read_to_end(&mut bytes).map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > limits.max_file_bytes {
        return Err(err(format!(
            "the file grew past the {}-byte limit while being read; set {MAX_BYTES_ENV} to raise it",
            limits.max_file_bytes
        )));
    }
    decode_rgb_with(&bytes, &name, limits)
}

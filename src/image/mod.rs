//! Image decoding and preprocessing, bit-exact with transformers' PIL backend
//! (`BlipImageProcessorPil`, `CLIPImageProcessorPil`): RGB conversion, Pillow's fixed-point
//! bicubic resize, center crop, rescale and normalize to float32 CHW pixel values.

use std::path::Path;

use image::RgbImage;

use crate::config::PreprocessorConfig;
use crate::error::Result;

mod decode;
mod jpeg;
mod orientation;

pub(crate) use decode::too_many_pixels;
pub use decode::{decode_rgb, decode_rgb_with, load_rgb, load_rgb_with, DecodeLimits};
pub use jpeg::MAX_SCANS as MAX_JPEG_SCANS;

/// Pillow's `Image.MAX_IMAGE_PIXELS` (89.5 megapixels): above it Pillow warns of a possible
/// decompression bomb, above twice it (`MAX_PIXELS`) it raises `DecompressionBombError`.
pub const PILLOW_MAX_IMAGE_PIXELS: u64 = 89_478_485;
/// Images with more pixels than this are refused before decoding, as Pillow refuses them.
pub const MAX_PIXELS: u64 = 2 * PILLOW_MAX_IMAGE_PIXELS;

/// Preprocessed image: float32, channels first, `[3, height, width]`.
#[derive(Debug, Clone, PartialEq)]
pub struct PixelValues {
    pub height: usize,
    pub width: usize,
    pub data: Vec<f32>,
}

/// An image as the library takes it: a file, its encoded bytes, or pixels decoded elsewhere
/// (PIL, numpy). Bytes go through the same decoder as files, so both give the same pixels;
/// decoded pixels skip decoding (and EXIF orientation, as transformers does for a PIL image).
#[derive(Debug, Clone, Copy)]
pub enum ImageInput<'a> {
    Path(&'a Path),
    /// Encoded PNG, JPEG, WebP, GIF or BMP bytes; `name` stands for the image in errors.
    Bytes {
        bytes: &'a [u8],
        name: &'a str,
    },
    /// 8-bit RGB, row-major, `height` rows of `width * 3` bytes (numpy's HWC uint8).
    Rgb {
        width: usize,
        height: usize,
        data: &'a [u8],
        name: &'a str,
    },
}

impl ImageInput<'_> {
    /// What errors call the image: its path or its name.
    pub fn name(&self) -> String {
        match self {
            ImageInput::Path(p) => p.display().to_string(),
            ImageInput::Bytes { name, .. } | ImageInput::Rgb { name, .. } => name.to_string(),
        }
    }
}

/// Decoded pixels as an [`RgbImage`], checked as a decoded file is: a size that matches the
/// data, at least one pixel, and no more than the decoder's pixel limit.
fn rgb_image(width: usize, height: usize, data: &[u8], name: &str) -> Result<RgbImage> {
    let err = |msg: String| crate::error::Error::Image { path: name.to_string(), msg };
    if width == 0 || height == 0 {
        return Err(err(format!("the pixels are {width}x{height}: an image needs at least one pixel")));
    }
    let limits = DecodeLimits::from_env()?;
    let (w, h) = (u32::try_from(width).unwrap_or(u32::MAX), u32::try_from(height).unwrap_or(u32::MAX));
    if (width as u64).saturating_mul(height as u64) > limits.max_pixels {
        return Err(err(too_many_pixels(w, h, limits.max_pixels)));
    }
    let expected = width * height * 3;
    if data.len() != expected {
        return Err(err(format!(
            "{} bytes of pixels for a {width}x{height} RGB image, which takes {expected} (height x width x 3, uint8)",
            data.len()
        )));
    }
    Ok(RgbImage::from_raw(w, h, data.to_vec()).expect("length checked above"))
}

/// An image processor configured from a checkpoint's preprocessor config.
#[derive(Debug, Clone)]
pub struct ImageProcessor {
    cfg: PreprocessorConfig,
}

impl ImageProcessor {
    pub fn new(cfg: PreprocessorConfig) -> Self {
        Self { cfg }
    }

    pub fn config(&self) -> &PreprocessorConfig {
        &self.cfg
    }

    pub fn preprocess_file(&self, path: &Path) -> Result<PixelValues> {
        Ok(self.preprocess(&load_rgb(path)?))
    }

    pub fn preprocess_bytes(&self, bytes: &[u8], name: &str) -> Result<PixelValues> {
        Ok(self.preprocess(&decode_rgb(bytes, name)?))
    }

    /// Pixel values of an image given in memory: a file, encoded bytes, or decoded RGB pixels.
    pub fn preprocess_input(&self, input: &ImageInput<'_>) -> Result<PixelValues> {
        match *input {
            ImageInput::Path(path) => self.preprocess_file(path),
            ImageInput::Bytes { bytes, name } => self.preprocess_bytes(bytes, name),
            ImageInput::Rgb { width, height, data, name } => {
                Ok(self.preprocess(&rgb_image(width, height, data, name)?))
            }
        }
    }

    /// resize -> center crop -> rescale -> normalize, each only when the config asks for it.
    pub fn preprocess(&self, rgb: &RgbImage) -> PixelValues {
        let cfg = &self.cfg;
        let resized;
        let mut img = rgb;
        if cfg.do_resize {
            let (h, w) = self.resize_target(img.height() as usize, img.width() as usize);
            resized = resize_bicubic(img, w, h);
            img = &resized;
        }
        let (h, w) = (img.height() as usize, img.width() as usize);
        // Channels-first u8 planes; center crop may pad with zeros as transformers does.
        let (out_h, out_w, planes) = match (&cfg.crop_size, cfg.do_center_crop) {
            (Some(crop), true) => {
                let (ch, cw) = (crop.height.unwrap_or(h), crop.width.unwrap_or(w));
                (ch, cw, center_crop_chw(img, ch, cw))
            }
            _ => (h, w, to_chw(img)),
        };
        let mut data = Vec::with_capacity(planes.len());
        let plane = out_h * out_w;
        for (i, &v) in planes.iter().enumerate() {
            let c = i / plane;
            // numpy: float64 multiply then cast to float32; normalize in float32.
            let mut x = if cfg.do_rescale { (f64::from(v) * cfg.rescale_factor) as f32 } else { f32::from(v) };
            if cfg.do_normalize {
                x = (x - cfg.image_mean[c]) / cfg.image_std[c];
            }
            data.push(x);
        }
        PixelValues { height: out_h, width: out_w, data }
    }

    /// Output (height, width) of the resize step for an input of (h, w).
    fn resize_target(&self, h: usize, w: usize) -> (usize, usize) {
        let s = &self.cfg.size;
        match (s.height, s.width, s.shortest_edge) {
            (Some(th), Some(tw), _) => (th, tw),
            (_, _, Some(edge)) => {
                // transformers' get_resize_output_image_size(default_to_square=False).
                let (short, long) = if w <= h { (w, h) } else { (h, w) };
                let new_long = (edge as f64 * long as f64 / short as f64) as usize;
                if w <= h {
                    (new_long, edge)
                } else {
                    (edge, new_long)
                }
            }
            // validate() rejects configs without a size; keep the image as it is.
            _ => (h, w),
        }
    }
}

fn to_chw(img: &RgbImage) -> Vec<u8> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let raw = img.as_raw();
    let mut out = vec![0u8; 3 * h * w];
    for (p, px) in raw.chunks_exact(3).enumerate() {
        for c in 0..3 {
            out[c * h * w + p] = px[c];
        }
    }
    out
}

/// transformers' `center_crop`: top = (H - ch) // 2 and left = (W - cw) // 2 (floor division);
/// where the crop reaches outside a smaller image, transformers zero-pads it, so those pixels are 0.
fn center_crop_chw(img: &RgbImage, ch: usize, cw: usize) -> Vec<u8> {
    let (w, h) = (img.width() as i64, img.height() as i64);
    let top = (h - ch as i64).div_euclid(2);
    let left = (w - cw as i64).div_euclid(2);
    let raw = img.as_raw();
    let mut out = vec![0u8; 3 * ch * cw];
    for oy in 0..ch {
        let sy = top + oy as i64;
        if !(0..h).contains(&sy) {
            continue;
        }
        for ox in 0..cw {
            let sx = left + ox as i64;
            if !(0..w).contains(&sx) {
                continue;
            }
            let src = ((sy * w + sx) * 3) as usize;
            for c in 0..3 {
                out[c * ch * cw + oy * cw + ox] = raw[src + c];
            }
        }
    }
    out
}

// ---- Pillow's resampling (libImaging/Resample.c), 8 bits per channel ------------------------

/// Fixed-point fraction bits of the coefficients (32 - 8 - 2, as in Pillow).
const PRECISION_BITS: u32 = 22;

/// Pillow's bicubic kernel with a = -0.5 and support 2.
fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per output pixel: first input index, tap count, and fixed-point weights (`ksize` per pixel).
struct Coeffs {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for the full-image box.
fn precompute_coeffs(in_size: usize, out_size: usize) -> Coeffs {
    const SUPPORT: f64 = 2.0;
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = SUPPORT * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C casts truncate toward zero; negative values are clamped to 0 right after.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(xmax) {
            *kx = bicubic_filter((x as f64 + xmin as f64 - center + 0.5) * ss);
            ww += *kx;
        }
        for (x, &kx) in k.iter().enumerate().take(xmax) {
            let w = if ww != 0.0 { kx / ww } else { kx };
            let scaled = w * f64::from(1u32 << PRECISION_BITS);
            weights[xx * ksize + x] = if w < 0.0 { (-0.5 + scaled) as i32 } else { (0.5 + scaled) as i32 };
        }
        bounds.push((xmin, xmax));
    }
    Coeffs { ksize, bounds, weights }
}

fn clip8(v: i32) -> u8 {
    if v >= (1 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// Resizes like Pillow's `Image.resize((w, h), BICUBIC)` on an RGB image: two separable passes
/// with a uint8 intermediate. Pillow 13 runs the vertical pass first when the height shrinks
/// by more than twice as many pixels as the width (python-pillow/Pillow#9549), else the
/// horizontal one; the order changes the rounding of the intermediate, so it is mirrored here.
pub fn resize_bicubic(src: &RgbImage, out_w: usize, out_h: usize) -> RgbImage {
    let (in_w, in_h) = (src.width() as usize, src.height() as usize);
    let need_h = in_w != out_w;
    let need_v = in_h != out_h;
    let vertical_first = out_h < in_h && (in_h - out_h) as i64 > 2 * (in_w as i64 - out_w as i64);
    let mut pixels = src.as_raw().clone();
    let (mut w, mut h) = (in_w, in_h);
    let horizontal = |pixels: &mut Vec<u8>, w: &mut usize, h: usize| {
        if need_h {
            *pixels = resample_pass(pixels, *w, h, out_w, true);
            *w = out_w;
        }
    };
    if vertical_first {
        pixels = resample_pass(&pixels, w, h, out_h, false);
        h = out_h;
        horizontal(&mut pixels, &mut w, h);
    } else {
        horizontal(&mut pixels, &mut w, h);
        if need_v {
            pixels = resample_pass(&pixels, w, h, out_h, false);
            h = out_h;
        }
    }
    RgbImage::from_raw(w as u32, h as u32, pixels).expect("buffer sized for the image")
}

/// One Pillow 8-bit pass over an RGB `w x h` image, along x (`along_x`) or y, to `out` pixels.
fn resample_pass(src: &[u8], w: usize, h: usize, out: usize, along_x: bool) -> Vec<u8> {
    let coeffs = precompute_coeffs(if along_x { w } else { h }, out);
    let (ow, oh) = if along_x { (out, h) } else { (w, out) };
    // Pixel (x, y) of the source; the pass reads consecutive taps along one axis.
    let step = if along_x { 3 } else { w * 3 };
    let half = 1i32 << (PRECISION_BITS - 1);
    let mut dst = vec![0u8; ow * oh * 3];
    for y in 0..oh {
        for x in 0..ow {
            let o = if along_x { x } else { y };
            let (first, taps) = coeffs.bounds[o];
            let k = &coeffs.weights[o * coeffs.ksize..o * coeffs.ksize + taps];
            let base = if along_x { (y * w + first) * 3 } else { (first * w + x) * 3 };
            let mut ss = [half; 3];
            for (t, &kw) in k.iter().enumerate() {
                let px = &src[base + t * step..base + t * step + 3];
                for c in 0..3 {
                    ss[c] = ss[c].wrapping_add(i32::from(px[c]).wrapping_mul(kw));
                }
            }
            for c in 0..3 {
                dst[(y * ow + x) * 3 + c] = clip8(ss[c]);
            }
        }
    }
    dst
}

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
mod resize;

pub(crate) use decode::too_many_pixels;
pub use decode::{decode_rgb, decode_rgb_with, load_rgb, load_rgb_with, DecodeLimits};
pub use jpeg::MAX_SCANS as MAX_JPEG_SCANS;
#[doc(hidden)]
pub use resize::resize_with;
pub use resize::{resize, resize_bicubic, Filter};

/// Pillow's `Image.MAX_IMAGE_PIXELS` (89.5 megapixels): above it Pillow warns of a possible
/// decompression bomb, above twice it (`MAX_PIXELS`) it raises `DecompressionBombError`.
pub const PILLOW_MAX_IMAGE_PIXELS: u64 = 89_478_485;
/// Images with more pixels than this are refused before decoding, as Pillow refuses them.
pub const MAX_PIXELS: u64 = 2 * PILLOW_MAX_IMAGE_PIXELS;

/// Preprocessed image: float32, channels first, `[frames, 3, height, width]`. One frame for
/// most families; an image splitter ([`ImageSplitter`], SmolVLM) gives its tiles in row-major
/// order, then the global image, and records the grid in `tiles`.
#[derive(Debug, Clone, PartialEq)]
pub struct PixelValues {
    pub height: usize,
    pub width: usize,
    pub data: Vec<f32>,
    /// The (rows, cols) tile grid of a split image ((0, 0): one frame, not split); None for the
    /// processors that do not split.
    pub tiles: Option<(usize, usize)>,
}

impl PixelValues {
    /// One `[3, height, width]` frame.
    pub fn frame(height: usize, width: usize, data: Vec<f32>) -> Self {
        Self { height, width, data, tiles: None }
    }

    /// Frames held (`data` over one frame's values).
    pub fn frames(&self) -> usize {
        self.data.len() / (3 * self.height * self.width).max(1)
    }
}

/// A processor that cuts each image into frames of one size (SmolVLM's tiles plus the global
/// image): what a family supplies when a single resize does not describe its preprocessing.
pub trait ImageSplitter: std::fmt::Debug + Send + Sync {
    /// The frames of one decoded image (`name` stands for it in errors), with `tiles` set.
    fn split(&self, rgb: &RgbImage, name: &str) -> Result<PixelValues>;
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

/// An image processor configured from a checkpoint's preprocessor config, or a family's
/// [`ImageSplitter`].
#[derive(Debug, Clone)]
pub struct ImageProcessor {
    cfg: PreprocessorConfig,
    splitter: Option<std::sync::Arc<dyn ImageSplitter>>,
}

impl ImageProcessor {
    pub fn new(cfg: PreprocessorConfig) -> Self {
        Self { cfg, splitter: None }
    }

    /// A processor whose images go through `splitter` (decoding and its limits as for every
    /// other processor).
    pub fn splitting(splitter: std::sync::Arc<dyn ImageSplitter>) -> Self {
        Self { cfg: PreprocessorConfig::default(), splitter: Some(splitter) }
    }

    pub fn config(&self) -> &PreprocessorConfig {
        &self.cfg
    }

    pub fn preprocess_file(&self, path: &Path) -> Result<PixelValues> {
        self.preprocess_checked(&load_rgb(path)?, &path.display().to_string())
    }

    pub fn preprocess_bytes(&self, bytes: &[u8], name: &str) -> Result<PixelValues> {
        self.preprocess_checked(&decode_rgb(bytes, name)?, name)
    }

    /// [`Self::preprocess`], refusing an image the resize would make larger than the decoder's
    /// pixel limit (a `shortest_edge` resize of a very elongated image), before allocating it.
    pub fn preprocess_checked(&self, rgb: &RgbImage, name: &str) -> Result<PixelValues> {
        if let Some(splitter) = &self.splitter {
            return splitter.split(rgb, name);
        }
        if self.cfg.do_resize {
            let (h, w) = self.resize_target(rgb.height() as usize, rgb.width() as usize);
            let max = DecodeLimits::from_env()?.max_pixels;
            if (h as u64).saturating_mul(w as u64) > max {
                return Err(crate::error::Error::Image {
                    path: name.to_string(),
                    msg: format!(
                        "the processor's resize ({}) makes this {}x{} image {w}x{h}, over the {max}-pixel limit; set {} to raise it",
                        self.cfg.size.describe(),
                        rgb.width(),
                        rgb.height(),
                        decode::MAX_PIXELS_ENV
                    ),
                });
            }
        }
        Ok(self.preprocess(rgb))
    }

    /// Pixel values of an image given in memory: a file, encoded bytes, or decoded RGB pixels.
    pub fn preprocess_input(&self, input: &ImageInput<'_>) -> Result<PixelValues> {
        match *input {
            ImageInput::Path(path) => self.preprocess_file(path),
            ImageInput::Bytes { bytes, name } => self.preprocess_bytes(bytes, name),
            ImageInput::Rgb { width, height, data, name } => {
                self.preprocess_checked(&rgb_image(width, height, data, name)?, name)
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
        let (out_h, out_w) = match (&cfg.crop_size, cfg.do_center_crop) {
            (Some(crop), true) => (crop.height.unwrap_or(h), crop.width.unwrap_or(w)),
            _ => (h, w),
        };
        let data = center_crop_values(img, out_h, out_w, &self.value_table());
        PixelValues::frame(out_h, out_w, data)
    }

    fn value_table(&self) -> [[f32; 256]; 3] {
        let cfg = &self.cfg;
        let rescale = cfg.do_rescale.then_some(cfg.rescale_factor);
        let normalize = cfg.do_normalize.then_some((&cfg.image_mean[..], &cfg.image_std[..]));
        value_table(rescale, normalize)
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

/// The float value of each byte of each channel after transformers' rescale (by the factor, when
/// given) and normalize (by (mean, std), when given). Both act on one value at a time, so a table
/// of 3 x 256 entries gives every pixel its exact value.
pub fn value_table(rescale: Option<f64>, normalize: Option<(&[f32], &[f32])>) -> [[f32; 256]; 3] {
    let mut table = [[0f32; 256]; 3];
    for (c, values) in table.iter_mut().enumerate() {
        for (v, x) in values.iter_mut().enumerate() {
            // numpy: float64 multiply then cast to float32; normalize in float32.
            *x = rescale.map_or(v as f32, |factor| (v as f64 * factor) as f32);
            if let Some((mean, std)) = normalize {
                *x = (*x - mean[c]) / std[c];
            }
        }
    }
    table
}

/// The whole image, channels first, each byte through `table` ([`value_table`]).
pub fn channels_first(img: &RgbImage, table: &[[f32; 256]; 3]) -> PixelValues {
    let (height, width) = (img.height() as usize, img.width() as usize);
    PixelValues::frame(height, width, center_crop_values(img, height, width, table))
}

/// transformers' `center_crop` to `ch x cw` (the whole image when that is its size), channels
/// first, each byte through `table`: top = (H - ch) // 2 and left = (W - cw) // 2 (floor
/// division); where the crop reaches outside a smaller image, transformers zero-pads it, so those
/// pixels take the value of a 0 byte.
fn center_crop_values(img: &RgbImage, ch: usize, cw: usize, table: &[[f32; 256]; 3]) -> Vec<f32> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let top = (h as i64 - ch as i64).div_euclid(2);
    let left = (w as i64 - cw as i64).div_euclid(2);
    let plane = ch * cw;
    let mut out = vec![0f32; 3 * plane];
    for (c, values) in out.chunks_exact_mut(plane.max(1)).enumerate() {
        values.fill(table[c][0]);
    }
    // The output columns whose source column lies inside the image, and where they start.
    let ox0 = (-left).clamp(0, cw as i64) as usize;
    let ox1 = (w as i64 - left).clamp(ox0 as i64, cw as i64) as usize;
    if ox0 == ox1 {
        return out;
    }
    let raw = img.as_raw();
    let (r_plane, rest) = out.split_at_mut(plane);
    let (g_plane, b_plane) = rest.split_at_mut(plane);
    for oy in 0..ch {
        let sy = top + oy as i64;
        if !(0..h as i64).contains(&sy) {
            continue;
        }
        let sx0 = (left + ox0 as i64) as usize;
        let src = &raw[(sy as usize * w + sx0) * 3..(sy as usize * w + sx0 + (ox1 - ox0)) * 3];
        let row = oy * cw + ox0..oy * cw + ox1;
        let planes = r_plane[row.clone()].iter_mut().zip(&mut g_plane[row.clone()]).zip(&mut b_plane[row]);
        for (((r, g), b), px) in planes.zip(src.chunks_exact(3)) {
            *r = table[0][usize::from(px[0])];
            *g = table[1][usize::from(px[1])];
            *b = table[2][usize::from(px[2])];
        }
    }
    out
}

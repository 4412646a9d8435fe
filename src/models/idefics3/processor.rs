//! SmolVLM's and Idefics3's processor, as transformers 5.17's `Idefics3ImageProcessorPil` and
//! `Idefics3Processor` run it (docs/models/idefics3.md):
//!
//! 1. resize the longest edge to `size.longest_edge` (small images grow too), the other side
//!    rounded to even, the whole capped at 4096 a side;
//! 2. with `do_image_splitting`, resize again to multiples of the tile side M
//!    (`max_image_size.longest_edge`), cut it into row-major M x M tiles and add the whole image
//!    resized to M x M (the global image); without, resize to M x M;
//! 3. rescale and normalize every frame.
//!
//! Every resize is Pillow's on 8-bit RGB (LANCZOS unless `resample` says otherwise), so each
//! step rounds to bytes as transformers' does. Each `<image>` of a prompt then expands to one
//! `<fake_token_around_image><row_r_col_c>` + `image_seq_len` `<image>` tokens per tile, a
//! newline after each row, and the global image's tokens after `<global-img>`.

use std::path::{Path, PathBuf};

use image::RgbImage;
use serde::Deserialize;

use crate::config::{check_positive, field_error, image_processor_section, MAX_PROCESSOR_SIDE};
use crate::error::{Error, Result};
use crate::image::{channels_first, resize, value_table, Filter, PixelValues};
use crate::json::from_json_value_at;

/// transformers' `MAX_IMAGE_SIZE`: the longest side the first resize may give.
pub const MAX_IMAGE_SIZE: usize = 4096;

/// The token around each image's tiles.
pub const FAKE_IMAGE_TOKEN: &str = "<fake_token_around_image>";
/// The placeholder a prompt holds for each image, and the token its features replace.
pub const IMAGE_TOKEN: &str = "<image>";
/// The tag before the global image's tokens.
pub const GLOBAL_IMAGE_TAG: &str = "<global-img>";

/// A `size` or `max_image_size` entry: `{"longest_edge": n}`, or (for `size`) `{"height": h,
/// "width": w}`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct EdgeSize {
    pub longest_edge: Option<usize>,
    pub height: Option<usize>,
    pub width: Option<usize>,
}

impl EdgeSize {
    fn longest(n: usize) -> Self {
        Self { longest_edge: Some(n), ..Self::default() }
    }
}

/// The `image_processor` settings of an Idefics3 / SmolVLM checkpoint, with
/// `Idefics3ImageProcessorPil`'s defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Idefics3ImageConfig {
    pub image_processor_type: Option<String>,
    pub do_convert_rgb: bool,
    pub do_resize: bool,
    pub size: EdgeSize,
    /// Pillow's `Image.Resampling`: 1 (LANCZOS) or 3 (BICUBIC).
    pub resample: u32,
    pub do_image_splitting: bool,
    /// The tile side M.
    pub max_image_size: EdgeSize,
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: Vec<f32>,
    pub image_std: Vec<f32>,
    pub do_pad: bool,
}

impl Default for Idefics3ImageConfig {
    fn default() -> Self {
        Self {
            image_processor_type: None,
            do_convert_rgb: true,
            do_resize: true,
            size: EdgeSize::longest(4 * 364),
            resample: 1,
            do_image_splitting: true,
            max_image_size: EdgeSize::longest(364),
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: vec![0.5; 3],
            image_std: vec![0.5; 3],
            do_pad: true,
        }
    }
}

impl Idefics3ImageConfig {
    /// The tile side M (`max_image_size.longest_edge`).
    pub fn tile(&self) -> usize {
        self.max_image_size.longest_edge.unwrap_or(0)
    }

    fn check(&self) -> Result<(), String> {
        for (field, values) in [("image_mean", &self.image_mean), ("image_std", &self.image_std)] {
            if values.len() != 3 || values.iter().any(|v| !v.is_finite()) {
                return Err(field_error(field, format!("{values:?}"), "it needs 3 finite values, one per RGB channel"));
            }
        }
        if self.image_std.contains(&0.0) {
            return Err(field_error("image_std", format!("{:?}", self.image_std), "a zero divides by zero"));
        }
        if !self.rescale_factor.is_finite() {
            return Err(field_error("rescale_factor", self.rescale_factor, "it must be a finite number (1/255)"));
        }
        if Filter::from_pil(self.resample).is_none() {
            return Err(field_error("resample", self.resample, "glimpse resizes with 1 (LANCZOS) or 3 (BICUBIC)"));
        }
        let side = |field: &str, v: usize| {
            check_positive(field, v)?;
            if v > MAX_PROCESSOR_SIDE {
                return Err(field_error(field, v, format!("glimpse resizes to at most {MAX_PROCESSOR_SIDE} a side")));
            }
            Ok(())
        };
        match self.max_image_size.longest_edge {
            Some(m) => side("max_image_size.longest_edge", m)?,
            None => {
                return Err(field_error(
                    "max_image_size",
                    format!("{:?}", self.max_image_size),
                    "it needs \"longest_edge\" (the tile side, e.g. 512)",
                ))
            }
        }
        if self.do_resize {
            match (self.size.longest_edge, self.size.height, self.size.width) {
                (Some(e), _, _) => side("size.longest_edge", e)?,
                (None, Some(h), Some(w)) => side("size.height", h).and(side("size.width", w))?,
                _ => {
                    return Err(field_error(
                        "size",
                        format!("{:?}", self.size),
                        "it needs \"longest_edge\", or \"height\" and \"width\"",
                    ))
                }
            }
        }
        Ok(())
    }
}

/// One image as the model sees it: its frames and the tile grid they came from.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageTiles {
    /// Tile rows and columns; both 0 when the image was not split (one frame).
    pub rows: usize,
    pub cols: usize,
    /// `rows * cols` tiles in row-major order, then the global image; each `[3, M, M]`.
    pub frames: Vec<PixelValues>,
}

impl ImageTiles {
    /// The frames as one multi-frame [`PixelValues`] with its grid.
    pub fn into_pixel_values(self) -> PixelValues {
        let (height, width) = self.frames.first().map_or((0, 0), |f| (f.height, f.width));
        let data = self.frames.into_iter().flat_map(|f| f.data).collect();
        PixelValues { height, width, data, tiles: Some((self.rows, self.cols)) }
    }
}

impl crate::image::ImageSplitter for Idefics3ImageProcessor {
    fn split(&self, rgb: &RgbImage, name: &str) -> Result<PixelValues> {
        Ok(self.preprocess(rgb, name)?.into_pixel_values())
    }
}

/// The Idefics3 image processor of one checkpoint.
#[derive(Debug, Clone)]
pub struct Idefics3ImageProcessor {
    cfg: Idefics3ImageConfig,
    filter: Filter,
    table: [[f32; 256]; 3],
}

impl Idefics3ImageProcessor {
    /// A processor of checked settings; `path` names the file in errors.
    pub fn new(cfg: Idefics3ImageConfig, path: &Path) -> Result<Self> {
        cfg.check().map_err(|msg| Error::config(path, msg))?;
        let filter = Filter::from_pil(cfg.resample).expect("checked");
        let rescale = cfg.do_rescale.then_some(cfg.rescale_factor);
        let normalize = cfg.do_normalize.then_some((&cfg.image_mean[..], &cfg.image_std[..]));
        let table = value_table(rescale, normalize);
        Ok(Self { cfg, filter, table })
    }

    /// The settings of a model folder (processor_config.json's `image_processor`, else
    /// preprocessor_config.json), and the file they came from.
    pub fn load_from_dir(dir: &Path) -> Result<(Self, PathBuf)> {
        let (value, path, prefix) = image_processor_section(dir)?;
        let cfg = from_json_value_at(&value, &path, prefix)?;
        Ok((Self::new(cfg, &path)?, path))
    }

    pub fn config(&self) -> &Idefics3ImageConfig {
        &self.cfg
    }

    /// The frames of one RGB image, or an error naming it when a resize would leave no pixel.
    pub fn preprocess(&self, rgb: &RgbImage, name: &str) -> Result<ImageTiles> {
        let (rows, cols, frames) = self.frames(rgb, name)?;
        let frames = frames.iter().map(|f| channels_first(f, &self.table)).collect();
        Ok(ImageTiles { rows, cols, frames })
    }

    /// The 8-bit frames (tiles, then the global image) and the grid, before rescale and
    /// normalize.
    pub fn frames(&self, rgb: &RgbImage, name: &str) -> Result<(usize, usize, Vec<RgbImage>)> {
        let cfg = &self.cfg;
        let tile = cfg.tile();
        let (h, w) = (rgb.height() as usize, rgb.width() as usize);
        let resized;
        let mut img = rgb;
        if cfg.do_resize {
            let (th, tw) = match (cfg.size.longest_edge, cfg.size.height, cfg.size.width) {
                (Some(edge), _, _) => {
                    let (h, w) = rescale_to_max_len(h, w, edge);
                    scale_below_upper_bound(h, w, MAX_IMAGE_SIZE)
                }
                (None, Some(th), Some(tw)) => (th, tw),
                _ => unreachable!("checked: size has longest_edge or height and width"),
            };
            resized = self.resize(img, th, tw, name)?;
            img = &resized;
        }
        if !cfg.do_image_splitting {
            return Ok((0, 0, vec![self.resize(img, tile, tile, name)?]));
        }
        // Multiples of the tile side, keeping the aspect ratio as transformers computes it.
        let (h, w) = (img.height() as usize, img.width() as usize);
        let aspect = w as f64 / h as f64;
        let (th, tw) = if w >= h {
            let tw = w.div_ceil(tile) * tile;
            (((tw as f64 / aspect) as usize).div_ceil(tile) * tile, tw)
        } else {
            let th = h.div_ceil(tile) * tile;
            (th, ((th as f64 * aspect) as usize).div_ceil(tile) * tile)
        };
        let img = self.resize(img, th, tw, name)?;
        if th <= tile && tw <= tile {
            return Ok((0, 0, vec![img]));
        }
        let (rows, cols) = (th / tile, tw / tile);
        let mut frames = Vec::with_capacity(rows * cols + 1);
        for r in 0..rows {
            for c in 0..cols {
                let crop =
                    image::imageops::crop_imm(&img, (c * tile) as u32, (r * tile) as u32, tile as u32, tile as u32);
                frames.push(crop.to_image());
            }
        }
        frames.push(self.resize(&img, tile, tile, name)?);
        Ok((rows, cols, frames))
    }

    /// Pillow's resize to `h x w` (a copy when the size is already that), refusing a size
    /// Pillow refuses (a side of 0) or one past glimpse's bound.
    fn resize(&self, img: &RgbImage, h: usize, w: usize, name: &str) -> Result<RgbImage> {
        let limit = MAX_IMAGE_SIZE + MAX_PROCESSOR_SIDE;
        if h == 0 || w == 0 || h > limit || w > limit {
            return Err(Error::Image {
                path: name.to_string(),
                msg: format!(
                    "the Idefics3 processor resizes this {}x{} image to {w}x{h}, which has no pixels or is over {limit} a side",
                    img.width(),
                    img.height()
                ),
            });
        }
        if (img.height() as usize, img.width() as usize) == (h, w) {
            return Ok(img.clone());
        }
        Ok(resize(img, w, h, self.filter))
    }
}

/// transformers' `_resize_output_size_rescale_to_max_len` (min_len 1): the longest side becomes
/// `max_len`, the other keeps the aspect ratio, truncated, then rounded up to even.
pub fn rescale_to_max_len(height: usize, width: usize, max_len: usize) -> (usize, usize) {
    let aspect = width as f64 / height as f64;
    let (mut h, mut w) = (height, width);
    if w >= h {
        w = max_len;
        h = (w as f64 / aspect) as usize;
        h += h % 2;
    } else {
        h = max_len;
        w = (h as f64 * aspect) as usize;
        w += w % 2;
    }
    (h.max(1), w.max(1))
}

/// transformers' `_resize_output_size_scale_below_upper_bound`: a longest side over `max_len`
/// becomes `max_len`, the other side keeps the aspect ratio (truncated).
pub fn scale_below_upper_bound(height: usize, width: usize, max_len: usize) -> (usize, usize) {
    let aspect = width as f64 / height as f64;
    let (mut h, mut w) = (height, width);
    if w >= h && w > max_len {
        w = max_len;
        h = (w as f64 / aspect) as usize;
    } else if h > w && h > max_len {
        h = max_len;
        w = (h as f64 * aspect) as usize;
    }
    (h.max(1), w.max(1))
}

/// The text one `<image>` of a prompt becomes (`Idefics3Processor.replace_image_token`).
pub fn image_prompt(rows: usize, cols: usize, image_seq_len: usize) -> String {
    let image_tokens = IMAGE_TOKEN.repeat(image_seq_len);
    let global = format!("{FAKE_IMAGE_TOKEN}{GLOBAL_IMAGE_TAG}{image_tokens}{FAKE_IMAGE_TOKEN}");
    if rows == 0 && cols == 0 {
        return global;
    }
    let mut text = String::new();
    for r in 1..=rows {
        for c in 1..=cols {
            text.push_str(&format!("{FAKE_IMAGE_TOKEN}<row_{r}_col_{c}>{image_tokens}"));
        }
        text.push('\n');
    }
    text.push('\n');
    text.push_str(&global);
    text
}

/// `text` with its i-th `<image>` replaced by the prompt of the i-th image's grid
/// (`get_text_with_replacements`); the counts must match, as transformers checks.
pub fn expand_image_tokens(text: &str, grids: &[(usize, usize)], image_seq_len: usize) -> Result<String> {
    let parts: Vec<&str> = text.split(IMAGE_TOKEN).collect();
    if parts.len() - 1 != grids.len() {
        return Err(Error::InvalidInput(format!(
            "the prompt holds {} {IMAGE_TOKEN} tokens but {} images were given: put one {IMAGE_TOKEN} in the text where each image goes",
            parts.len() - 1,
            grids.len()
        )));
    }
    let mut out = String::from(parts[0]);
    for (part, &(rows, cols)) in parts[1..].iter().zip(grids) {
        out.push_str(&image_prompt(rows, cols, image_seq_len));
        out.push_str(part);
    }
    Ok(out)
}

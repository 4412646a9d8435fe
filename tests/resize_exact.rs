//! The fast resize (SIMD and portable paths) and the table-driven rescale/normalize against the
//! straightforward implementations they replaced, kept here as references: the same bytes and
//! the same float bits on random images of odd sizes, upscaled and downscaled, cropped and padded.

use glimpse::config::{PreprocessorConfig, SizeSpec, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD};
use glimpse::image::{resize, resize_bicubic, resize_with, Filter, ImageProcessor};
use image::RgbImage;

/// xorshift64: deterministic random sizes and pixels.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn image(&mut self, w: usize, h: usize) -> RgbImage {
        let data = (0..w * h * 3).map(|_| self.next() as u8).collect();
        RgbImage::from_raw(w as u32, h as u32, data).expect("sized")
    }
}

// ---- Reference: Pillow's 8-bit resample (bicubic, Lanczos), one output byte at a time ------

const PRECISION_BITS: u32 = 22;

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

/// Pillow's `lanczos_filter`, written from its definition: sinc(x) sinc(x / 3) on [-3, 3).
fn lanczos_filter(x: f64) -> f64 {
    let sinc = |x: f64| if x == 0.0 { 1.0 } else { (x * std::f64::consts::PI).sin() / (x * std::f64::consts::PI) };
    if (-3.0..3.0).contains(&x) {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

/// (kernel, support) of a filter.
fn kernel(filter: Filter) -> (fn(f64) -> f64, f64) {
    match filter {
        Filter::Bicubic => (bicubic_filter, 2.0),
        Filter::Lanczos => (lanczos_filter, 3.0),
    }
}

/// (first, weights) of each output pixel, as Pillow's `precompute_coeffs` + 8-bit normalisation.
fn coeffs(in_size: usize, out_size: usize, filter: Filter) -> Vec<(usize, Vec<i32>)> {
    let (kernel, support) = kernel(filter);
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = support * filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
            let k: Vec<f64> =
                (0..xmax).map(|x| kernel((x as f64 + xmin as f64 - center + 0.5) / filterscale)).collect();
            let ww: f64 = k.iter().sum();
            let weights = k
                .iter()
                .map(|&kx| {
                    let w = if ww != 0.0 { kx / ww } else { kx };
                    let scaled = w * f64::from(1u32 << PRECISION_BITS);
                    if w < 0.0 {
                        (-0.5 + scaled) as i32
                    } else {
                        (0.5 + scaled) as i32
                    }
                })
                .collect();
            (xmin, weights)
        })
        .collect()
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

/// One pass along x (`along_x`) or y of an RGB `w x h` image to `out` pixels.
fn reference_pass(src: &[u8], w: usize, h: usize, out: usize, along_x: bool, filter: Filter) -> Vec<u8> {
    let coeffs = coeffs(if along_x { w } else { h }, out, filter);
    let (ow, oh) = if along_x { (out, h) } else { (w, out) };
    let mut dst = vec![0u8; ow * oh * 3];
    for y in 0..oh {
        for x in 0..ow {
            let (first, k) = &coeffs[if along_x { x } else { y }];
            for c in 0..3 {
                let mut ss = 1i32 << (PRECISION_BITS - 1);
                for (t, &kw) in k.iter().enumerate() {
                    let (sx, sy) = if along_x { (first + t, y) } else { (x, first + t) };
                    ss = ss.wrapping_add(i32::from(src[(sy * w + sx) * 3 + c]).wrapping_mul(kw));
                }
                dst[(y * ow + x) * 3 + c] = clip8(ss);
            }
        }
    }
    dst
}

/// Pillow 13's pass order: vertical first when the height shrinks by more than twice as many
/// pixels as the width.
fn reference_resize(src: &RgbImage, out_w: usize, out_h: usize, filter: Filter) -> RgbImage {
    let (in_w, in_h) = (src.width() as usize, src.height() as usize);
    let vertical_first = out_h < in_h && (in_h - out_h) as i64 > 2 * (in_w as i64 - out_w as i64);
    let mut px = src.as_raw().clone();
    let (mut w, mut h) = (in_w, in_h);
    if vertical_first {
        px = reference_pass(&px, w, h, out_h, false, filter);
        h = out_h;
    }
    if w != out_w {
        px = reference_pass(&px, w, h, out_w, true, filter);
        w = out_w;
    }
    if h != out_h {
        px = reference_pass(&px, w, h, out_h, false, filter);
        h = out_h;
    }
    RgbImage::from_raw(w as u32, h as u32, px).expect("sized")
}

/// Both paths of the fast resize equal the reference on one case, with each filter, named in
/// the failure.
fn check_resize(img: &RgbImage, out_w: usize, out_h: usize) {
    for filter in [Filter::Bicubic, Filter::Lanczos] {
        let want = reference_resize(img, out_w, out_h, filter);
        let case = format!("{filter:?} {}x{} -> {out_w}x{out_h}", img.width(), img.height());
        assert_eq!((want.width() as usize, want.height() as usize), (out_w, out_h), "{case}: reference size");
        assert!(resize(img, out_w, out_h, filter) == want, "{case}: default (SIMD where the CPU has it) path differs");
        assert!(resize_with(img, out_w, out_h, filter, false) == want, "{case}: portable path differs");
    }
    assert!(resize_bicubic(img, out_w, out_h) == resize(img, out_w, out_h, Filter::Bicubic));
}

#[test]
fn resize_equals_the_reference_on_random_odd_sizes() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for _ in 0..300 {
        let (iw, ih) = (1 + rng.below(90), 1 + rng.below(90));
        let (ow, oh) = (1 + rng.below(90), 1 + rng.below(90));
        let img = rng.image(iw, ih);
        check_resize(&img, ow, oh);
    }
}

#[test]
fn resize_equals_the_reference_on_edge_cases() {
    let mut rng = Rng(42);
    let cases = [
        // (in_w, in_h, out_w, out_h): one pixel, one row/column, same size, single-axis resizes,
        // heavy down- and upscales (windows of 1..hundreds of taps), both pass orders.
        (1, 1, 1, 1),
        (1, 1, 7, 5),
        (9, 1, 3, 1),
        (1, 9, 1, 4),
        (2, 2, 1, 1),
        (224, 224, 224, 224),
        (301, 97, 224, 224),
        (83, 311, 224, 224),
        (640, 480, 224, 224),
        (480, 640, 224, 224),
        (633, 211, 224, 224),
        (201, 627, 224, 224),
        (640, 480, 640, 200),
        (640, 480, 300, 480),
        (700, 3, 2, 3),
        (3, 700, 3, 2),
        (5, 4, 300, 301),
        (13, 9, 224, 224),
        (1000, 17, 5, 1),
    ];
    for (iw, ih, ow, oh) in cases {
        let img = rng.image(iw, ih);
        check_resize(&img, ow, oh);
    }
}

#[test]
fn resize_of_an_empty_image_or_to_an_empty_size_is_black() {
    let img = RgbImage::new(0, 5);
    assert_eq!(resize_bicubic(&img, 3, 2), RgbImage::new(3, 2));
    let img = Rng(7).image(4, 4);
    assert_eq!(resize_bicubic(&img, 0, 3), RgbImage::new(0, 3));
}

// ---- Reference: channels-first crop, then rescale and normalize value by value -------------

fn reference_preprocess(cfg: &PreprocessorConfig, img: &RgbImage) -> (usize, usize, Vec<f32>) {
    let resized;
    let mut img = img;
    if cfg.do_resize {
        resized = reference_resize(img, cfg.size.width.expect("w"), cfg.size.height.expect("h"), Filter::Bicubic);
        img = &resized;
    }
    let (w, h) = (img.width() as i64, img.height() as i64);
    let (ch, cw) = match (&cfg.crop_size, cfg.do_center_crop) {
        (Some(c), true) => (c.height.unwrap_or(h as usize), c.width.unwrap_or(w as usize)),
        _ => (h as usize, w as usize),
    };
    let (top, left) = ((h - ch as i64).div_euclid(2), (w - cw as i64).div_euclid(2));
    let mut data = vec![0f32; 3 * ch * cw];
    for c in 0..3 {
        for oy in 0..ch {
            for ox in 0..cw {
                let (sy, sx) = (top + oy as i64, left + ox as i64);
                let v = if (0..h).contains(&sy) && (0..w).contains(&sx) {
                    img.as_raw()[((sy * w + sx) * 3) as usize + c]
                } else {
                    0 // transformers zero-pads a crop larger than the image
                };
                // numpy: float64 multiply then cast to float32; normalize in float32.
                let mut x = if cfg.do_rescale { (f64::from(v) * cfg.rescale_factor) as f32 } else { f32::from(v) };
                if cfg.do_normalize {
                    x = (x - cfg.image_mean[c]) / cfg.image_std[c];
                }
                data[c * ch * cw + oy * cw + ox] = x;
            }
        }
    }
    (ch, cw, data)
}

#[test]
fn preprocess_equals_the_reference_bit_for_bit() {
    let mut rng = Rng(0xC0FF_EE00_1234_5678);
    for case in 0..120 {
        let size = |rng: &mut Rng| Some(1 + rng.below(60));
        let cfg = PreprocessorConfig {
            do_resize: rng.below(4) != 0,
            size: SizeSpec { height: size(&mut rng), width: size(&mut rng), shortest_edge: None },
            do_center_crop: rng.below(2) == 0,
            crop_size: Some(SizeSpec { height: size(&mut rng), width: size(&mut rng), shortest_edge: None }),
            do_rescale: rng.below(4) != 0,
            rescale_factor: [1.0 / 255.0, 0.5, 0.003_921_568_627_451][rng.below(3)],
            do_normalize: rng.below(4) != 0,
            image_mean: OPENAI_CLIP_MEAN.to_vec(),
            image_std: OPENAI_CLIP_STD.to_vec(),
            ..PreprocessorConfig::default()
        };
        let (w, h) = (1 + rng.below(70), 1 + rng.below(70));
        let img = rng.image(w, h);
        let (h, w, want) = reference_preprocess(&cfg, &img);
        let got = ImageProcessor::new(cfg.clone()).preprocess(&img);
        assert_eq!((got.height, got.width), (h, w), "case {case}: shape ({cfg:?})");
        let same = got.data.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same && got.data.len() == want.len(), "case {case}: pixel values differ ({cfg:?})");
    }
}

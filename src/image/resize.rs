//! Pillow's resampling (libImaging/Resample.c), 8 bits per channel, bicubic and Lanczos filters.
//!
//! The arithmetic is Pillow's: fixed-point i32 coefficients computed once per output column (or
//! row), `i32` sums of `pixel * coefficient` started at one half, clipped to a byte. Sums are
//! taken modulo 2^32 (wrapping), so the order of the additions and how they are grouped into
//! SIMD lanes cannot change a result: every path here gives the same bytes.

use image::RgbImage;

/// Fixed-point fraction bits of the coefficients (32 - 8 - 2, as in Pillow).
const PRECISION_BITS: u32 = 22;
/// Rounding term every sum starts from.
const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// A Pillow resampling filter (`Image.Resampling`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// `BICUBIC` (3): a = -0.5, support 2 (BLIP, CLIP, LLaVA).
    Bicubic,
    /// `LANCZOS` (1): a 3-lobed windowed sinc, support 3 (Idefics3, SmolVLM).
    Lanczos,
}

impl Filter {
    /// The filter of Pillow's `Image.Resampling` value `resample`, if glimpse has it.
    pub fn from_pil(resample: u32) -> Option<Self> {
        match resample {
            3 => Some(Filter::Bicubic),
            1 => Some(Filter::Lanczos),
            _ => None,
        }
    }

    fn support(self) -> f64 {
        match self {
            Filter::Bicubic => 2.0,
            Filter::Lanczos => 3.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Filter::Bicubic => bicubic_filter(x),
            Filter::Lanczos => lanczos_filter(x),
        }
    }
}

/// Pillow's `sinc_filter`: sin(pi x) / (pi x), 1 at 0.
fn sinc_filter(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    let x = x * std::f64::consts::PI;
    x.sin() / x
}

/// Pillow's `lanczos_filter`: sinc(x) * sinc(x / 3) on [-3, 3).
fn lanczos_filter(x: f64) -> f64 {
    if (-3.0..3.0).contains(&x) {
        sinc_filter(x) * sinc_filter(x / 3.0)
    } else {
        0.0
    }
}

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

/// Per output pixel: first input index, tap count, and fixed-point weights (`ksize` per pixel,
/// zero past the tap count).
struct Coeffs {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
}

impl Coeffs {
    /// Each output pixel's first input index and its weights (exactly its taps).
    fn taps(&self) -> impl Iterator<Item = (usize, &[i32])> {
        self.bounds.iter().zip(self.weights.chunks_exact(self.ksize)).map(|(&(first, n), k)| (first, &k[..n]))
    }
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for the full-image box.
/// `in_size` and `out_size` are at least 1.
fn precompute_coeffs(in_size: usize, out_size: usize, filter: Filter) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
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
            *kx = filter.weight((x as f64 + xmin as f64 - center + 0.5) * ss);
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
    resize(src, out_w, out_h, Filter::Bicubic)
}

/// Resizes like Pillow's `Image.resize((w, h), filter)` on an RGB image (see [`resize_bicubic`]).
pub fn resize(src: &RgbImage, out_w: usize, out_h: usize, filter: Filter) -> RgbImage {
    resize_with(src, out_w, out_h, filter, true)
}

/// [`resize`] with the SIMD paths allowed (`simd`, used when the CPU has AVX2) or not; both
/// give the same bytes. Public for the test that holds them to each other.
#[doc(hidden)]
pub fn resize_with(src: &RgbImage, out_w: usize, out_h: usize, filter: Filter, simd: bool) -> RgbImage {
    let (in_w, in_h) = (src.width() as usize, src.height() as usize);
    let (w32, h32) = (u32::try_from(out_w).unwrap_or(u32::MAX), u32::try_from(out_h).unwrap_or(u32::MAX));
    if in_w == 0 || in_h == 0 || out_w == 0 || out_h == 0 {
        // No taps: every sum stays at one half, which clips to 0 (as Pillow's loops give).
        return RgbImage::new(w32, h32);
    }
    let simd = simd && has_avx2();
    let src = src.as_raw();
    let vertical_first = out_h < in_h && (in_h - out_h) as i64 > 2 * (in_w as i64 - out_w as i64);
    let pixels = match (in_w != out_w, in_h != out_h) {
        (false, false) => src.clone(),
        (true, false) => horizontal(src, in_w, out_w, filter, simd),
        (false, true) => vertical(src, in_w, out_h, filter, simd),
        (true, true) if vertical_first => {
            horizontal(&vertical(src, in_w, out_h, filter, simd), in_w, out_w, filter, simd)
        }
        (true, true) => vertical(&horizontal(src, in_w, out_w, filter, simd), out_w, out_h, filter, simd),
    };
    RgbImage::from_raw(w32, h32, pixels).expect("buffer sized for the image")
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The horizontal pass: each row of the RGB `w`-pixel-wide image `src` to `out_w` pixels.
fn horizontal(src: &[u8], w: usize, out_w: usize, filter: Filter, simd: bool) -> Vec<u8> {
    let coeffs = precompute_coeffs(w, out_w, filter);
    let rows = src.len() / (w * 3);
    let mut dst = vec![0u8; out_w * rows * 3];
    // SAFETY: `simd` is only true when the CPU has AVX2 (checked by the caller).
    #[cfg(target_arch = "x86_64")]
    if simd && unsafe { horizontal_avx2(src, w, out_w, &coeffs, &mut dst) } {
        return dst;
    }
    let _ = simd;
    for (src_row, dst_row) in src.chunks_exact(w * 3).zip(dst.chunks_exact_mut(out_w * 3)) {
        for (out, (first, k)) in dst_row.chunks_exact_mut(3).zip(coeffs.taps()) {
            let mut ss = [HALF; 3];
            for (px, &kw) in src_row[first * 3..].chunks_exact(3).zip(k) {
                for c in 0..3 {
                    ss[c] = ss[c].wrapping_add(i32::from(px[c]).wrapping_mul(kw));
                }
            }
            for c in 0..3 {
                out[c] = clip8(ss[c]);
            }
        }
    }
    dst
}

/// A weight `k` as `hi * 2048 + lo` with `lo` in 0..2048, both as i16 (None when `hi` does
/// not fit). Then `sum(p * k) = 2048 * sum(p * hi) + sum(p * lo)` modulo 2^32, and every
/// `p * hi` or `p * lo` product fits the 16-bit multiply-adds of AVX2.
fn split_weight(k: i32) -> Option<(i16, i16)> {
    Some((i16::try_from(k >> 11).ok()?, (k & 2047) as i16))
}

/// The horizontal pass on AVX2: per output pixel, four taps a step. The twelve bytes of four
/// pixels are spread to 16-bit lanes (pairs of taps per channel; the fourth channel lane is
/// zero), multiplied by the taps' hi and lo weight halves and summed pairwise (`vpmaddwd`).
/// False (nothing written) when a weight does not split; the caller then takes the portable path.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn horizontal_avx2(src: &[u8], w: usize, out_w: usize, coeffs: &Coeffs, dst: &mut [u8]) -> bool {
    use std::arch::x86_64::*;
    // Per output pixel and group of 4 taps: 16 hi lanes, then 16 lo lanes. Lane of tap j
    // (0..4) and channel c: (j / 2) * 8 + c * 2 + j % 2, matching `spread` below.
    let groups = coeffs.ksize.div_ceil(4);
    let mut lanes = vec![0i16; out_w * groups * 32];
    for (o, (_, k)) in coeffs.taps().enumerate() {
        for (t, &kw) in k.iter().enumerate() {
            let Some((hi, lo)) = split_weight(kw) else { return false };
            let at = (o * groups + t / 4) * 32 + (t % 4 / 2) * 8 + t % 2;
            for c in 0..3 {
                lanes[at + c * 2] = hi;
                lanes[at + 16 + c * 2] = lo;
            }
        }
    }
    // Bytes of pixels 0 and 1 to the low 128 bits as (p0.r, p1.r, p0.g, p1.g, p0.b, p1.b, 0, 0)
    // 16-bit lanes, pixels 2 and 3 likewise to the high 128 bits; -1 gives a zero byte.
    #[rustfmt::skip]
    let spread = _mm256_setr_epi8(
        0, -1, 3, -1, 1, -1, 4, -1, 2, -1, 5, -1, -1, -1, -1, -1,
        6, -1, 9, -1, 7, -1, 10, -1, 8, -1, 11, -1, -1, -1, -1, -1,
    );
    let row_len = w * 3;
    for (src_row, dst_row) in src.chunks_exact(row_len).zip(dst.chunks_exact_mut(out_w * 3)) {
        for (o, (out, &(first, n))) in dst_row.chunks_exact_mut(3).zip(&coeffs.bounds).enumerate() {
            let (mut hi, mut lo) = (_mm256_setzero_si256(), _mm256_setzero_si256());
            for (g, weights) in lanes[o * groups * 32..][..n.div_ceil(4) * 32].chunks_exact(32).enumerate() {
                // 16 bytes from the group's first pixel; near the row's end, the bytes left, then
                // zeros (their weights are 0 past the last tap).
                let at = (first + g * 4) * 3;
                let mut buf = [0u8; 16];
                let bytes = match src_row.get(at..at + 16) {
                    Some(b) => b,
                    None => {
                        let left = &src_row[at.min(row_len)..];
                        buf[..left.len()].copy_from_slice(left);
                        &buf
                    }
                };
                let px =
                    _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128(bytes.as_ptr().cast())), spread);
                hi = _mm256_add_epi32(hi, _mm256_madd_epi16(px, _mm256_loadu_si256(weights.as_ptr().cast())));
                lo = _mm256_add_epi32(lo, _mm256_madd_epi16(px, _mm256_loadu_si256(weights[16..].as_ptr().cast())));
            }
            let hi = _mm_add_epi32(_mm256_castsi256_si128(hi), _mm256_extracti128_si256::<1>(hi));
            let lo = _mm_add_epi32(_mm256_castsi256_si128(lo), _mm256_extracti128_si256::<1>(lo));
            let sum = _mm_add_epi32(_mm_add_epi32(_mm_slli_epi32::<11>(hi), lo), _mm_set1_epi32(HALF));
            // clip8 as saturation: v >> 22 is below 0 exactly when v <= 0 (-> 0) and above 254
            // exactly when v >= 255 << 22 (-> 255).
            let v = _mm_srai_epi32::<22>(sum);
            let bytes = _mm_packus_epi16(_mm_packs_epi32(v, v), _mm_setzero_si128());
            out.copy_from_slice(&_mm_cvtsi128_si32(bytes).to_le_bytes()[..3]);
        }
    }
    true
}

/// The vertical pass: the RGB image `src`, `w` pixels wide, to `out_h` rows. Each output row
/// accumulates whole input rows, contiguous memory that the compiler vectorises.
fn vertical(src: &[u8], w: usize, out_h: usize, filter: Filter, simd: bool) -> Vec<u8> {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is only true when the CPU has AVX2 (checked by the caller).
        return unsafe { vertical_avx2(src, w, out_h, filter) };
    }
    let _ = simd;
    vertical_rows(src, w, out_h, filter)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn vertical_avx2(src: &[u8], w: usize, out_h: usize, filter: Filter) -> Vec<u8> {
    vertical_rows(src, w, out_h, filter)
}

#[inline(always)]
fn vertical_rows(src: &[u8], w: usize, out_h: usize, filter: Filter) -> Vec<u8> {
    let row = w * 3;
    let coeffs = precompute_coeffs(src.len() / row, out_h, filter);
    let mut dst = vec![0u8; row * out_h];
    let mut acc = vec![0i32; row];
    for (dst_row, (first, k)) in dst.chunks_exact_mut(row).zip(coeffs.taps()) {
        acc.fill(HALF);
        for (src_row, &kw) in src[first * row..].chunks_exact(row).zip(k) {
            for (a, &p) in acc.iter_mut().zip(src_row) {
                *a = a.wrapping_add(i32::from(p).wrapping_mul(kw));
            }
        }
        for (d, &a) in dst_row.iter_mut().zip(&acc) {
            *d = clip8(a);
        }
    }
    dst
}

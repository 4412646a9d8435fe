//! Linear products with weights quantized at load (`crate::quant`): int8 per output row, int4
//! in groups of 128 inputs, fp16 scales. The weights are never widened as a whole:
//!
//! - **GEMV** (decode, up to [`super::simd::MAX_ROWS`] rows of x): each weight row is read once
//!   for every row of x; 16 (AVX-512) or 8 (AVX2) quantized values are widened to f32 in
//!   registers, multiplied by their scale (exact: at most 8 bits times 11) and fused into f32
//!   accumulators. int4 nibbles come out of a byte as (even input, odd input) pairs; instead of
//!   shuffling them back into order, x is permuted once per call into the same order (evens then
//!   odds within each 32 (AVX-512) or 16 (AVX2) inputs), so the inner loop is loads, masks,
//!   shifts, converts and FMAs.
//! - **GEMM** (prefill): [`super::gemm::matmul_rows`] with the weights dequantized into its
//!   L2-sized panels (`[KC][NR]` f32) as it packs them.
//!
//! Paths as in `gemm.rs` (`GLIMPSE_CPU_ISA`: avx512, avx2, portable). Every path computes
//! `sum_k x[r, k] * deq(w[j, k])` with exact products and f32 sums, differing only in the
//! summation order.

use std::ops::Range;

use super::gemm::{Isa, WeightRows, NR};
use super::simd::MAX_ROWS;
use crate::quant::{QuantTensor, Quantize};

/// Inputs per int4 step of the GEMV on `isa` (the unit x is permuted in), 1 for the portable path.
fn int4_chunk(isa: Isa) -> usize {
    match isa {
        Isa::Avx512 => 32,
        Isa::Avx2 => 16,
        Isa::Portable => 1,
    }
}

/// The GEMV path `isa` asks for on this CPU (the `avx2` GEMV needs AVX2 and FMA; without them
/// it is the portable one, as the `avx2` GEMM's tiles then are).
pub fn gemv_isa(isa: Isa) -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if isa != Isa::Avx2 || (std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")) {
            return isa;
        }
    }
    let _ = isa;
    Isa::Portable
}

/// Row `r` of x in the order the int4 GEMV of `isa` reads it: within each full chunk of
/// [`int4_chunk`] inputs, the even inputs then the odd ones; the tail (k mod chunk) unchanged.
pub fn permute_for_int4(isa: Isa, x: &[f32]) -> Vec<f32> {
    let c = int4_chunk(isa);
    let mut out = x.to_vec();
    if c > 1 {
        for (dst, src) in out.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
            for i in 0..c / 2 {
                dst[i] = src[2 * i];
                dst[c / 2 + i] = src[2 * i + 1];
            }
        }
    }
    out
}

/// `out[r] = sum_k xs[r][k] * deq(w[j, k])` for the `xs.len() <= MAX_ROWS` rows, on `isa` (as
/// [`gemv_isa`] gives it). For int4, `xs` are the rows as [`permute_for_int4`] gives them for
/// the same `isa`.
pub fn dot_rows(isa: Isa, xs: &[&[f32]], w: &QuantTensor, j: usize) -> [f32; MAX_ROWS] {
    let k = w.cols;
    assert!(xs.len() <= MAX_ROWS && xs.iter().all(|x| x.len() == k) && j < w.rows, "qgemm::dot_rows: shapes");
    let (rb, groups) = (w.row_bytes(), w.groups());
    let q = &w.data[j * rb..(j + 1) * rb];
    let scales = &w.scales[j * groups..(j + 1) * groups];
    match (isa, w.format) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY (both AVX-512 arms): `Isa::Avx512` is only used where the CPU has AVX-512F
        // (`Isa::available`, checked by `selected()` and the tests); q holds row_bytes bytes for
        // k inputs and every x holds k values (asserted above).
        (Isa::Avx512, Quantize::Int8) => unsafe { dot_int8_avx512(xs, q, scales[0].to_f32()) },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512, Quantize::Int4) => unsafe { dot_int4_avx512(xs, q, scales, k) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY (both AVX2 arms): `gemv_isa` only yields Avx2 where AVX2 and FMA were detected;
        // extents as above.
        (Isa::Avx2, Quantize::Int8) if gemv_isa(isa) == Isa::Avx2 => unsafe {
            dot_int8_avx2(xs, q, scales[0].to_f32())
        },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, Quantize::Int4) if gemv_isa(isa) == Isa::Avx2 => unsafe { dot_int4_avx2(xs, q, scales, k) },
        _ => dot_portable(xs, w, j),
    }
}

/// The portable GEMV: one element at a time, dequantized then multiplied into each row's sum
/// (x in natural order).
fn dot_portable(xs: &[&[f32]], w: &QuantTensor, j: usize) -> [f32; MAX_ROWS] {
    let mut out = [0f32; MAX_ROWS];
    // Eight partial sums per row (a vectorizable pattern), added at the end.
    let mut acc = [[0f32; 8]; MAX_ROWS];
    for kk in 0..w.cols {
        let wv = w.dequant(j, kk);
        for (a, x) in acc.iter_mut().zip(xs) {
            a[kk % 8] += x[kk] * wv;
        }
    }
    for (o, a) in out.iter_mut().zip(&acc).take(xs.len()) {
        *o = a.iter().sum();
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_int8_avx512(xs: &[&[f32]], q: &[u8], s: f32) -> [f32; MAX_ROWS] {
    use std::arch::x86_64::*;
    let (k, rows) = (q.len(), xs.len());
    let sv = _mm512_set1_ps(s);
    let mut acc = [[_mm512_setzero_ps(); 2]; MAX_ROWS];
    let qp = q.as_ptr();
    let mut i = 0;
    while i + 32 <= k {
        // SAFETY (whole loop): i + 32 <= k = q.len() = every x's length; unaligned loads.
        let (w0, w1) = unsafe {
            let q0 = _mm512_cvtepi8_epi32(_mm_loadu_si128(qp.add(i) as *const __m128i));
            let q1 = _mm512_cvtepi8_epi32(_mm_loadu_si128(qp.add(i + 16) as *const __m128i));
            (_mm512_mul_ps(_mm512_cvtepi32_ps(q0), sv), _mm512_mul_ps(_mm512_cvtepi32_ps(q1), sv))
        };
        for r in 0..rows {
            let xp = xs[r].as_ptr();
            // SAFETY: as above.
            unsafe {
                acc[r][0] = _mm512_fmadd_ps(_mm512_loadu_ps(xp.add(i)), w0, acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(_mm512_loadu_ps(xp.add(i + 16)), w1, acc[r][1]);
            }
        }
        i += 32;
    }
    let mut out = [0f32; MAX_ROWS];
    for r in 0..rows {
        out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
        for j in i..k {
            out[r] += xs[r][j] * (q[j] as i8 as f32 * s);
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_int4_avx512(xs: &[&[f32]], q: &[u8], scales: &[half::f16], k: usize) -> [f32; MAX_ROWS] {
    use std::arch::x86_64::*;
    let rows = xs.len();
    let low = _mm512_set1_epi32(0xF);
    let mut acc = [[_mm512_setzero_ps(); 2]; MAX_ROWS];
    let mut out = [0f32; MAX_ROWS];
    let qp = q.as_ptr();
    for (g, s) in scales.iter().enumerate() {
        let s = s.to_f32();
        let end = ((g + 1) * crate::quant::INT4_GROUP).min(k);
        // (n - 8) * s as n * s - 8 s in one FMA: exact, since the result q * s is an f32.
        let (sv, off) = (_mm512_set1_ps(s), _mm512_set1_ps(-8.0 * s));
        let mut i = g * crate::quant::INT4_GROUP;
        while i + 32 <= end {
            // SAFETY (whole loop): inputs i..i+32 are bytes i/2..i/2+16 < row_bytes, and
            // i + 32 <= k = every x's length; unaligned loads.
            let (we, wo) = unsafe {
                let b = _mm512_cvtepu8_epi32(_mm_loadu_si128(qp.add(i / 2) as *const __m128i));
                let lo = _mm512_and_si512(b, low);
                let hi = _mm512_srli_epi32::<4>(b);
                (_mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), sv, off), _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), sv, off))
            };
            for r in 0..rows {
                let xp = xs[r].as_ptr();
                // SAFETY: as above; x is permuted: evens at i..i+16, odds at i+16..i+32.
                unsafe {
                    acc[r][0] = _mm512_fmadd_ps(_mm512_loadu_ps(xp.add(i)), we, acc[r][0]);
                    acc[r][1] = _mm512_fmadd_ps(_mm512_loadu_ps(xp.add(i + 16)), wo, acc[r][1]);
                }
            }
            i += 32;
        }
        // The row's last inputs (fewer than 32, only in its last group), in natural order.
        for (o, x) in out.iter_mut().zip(xs) {
            for (kk, &xv) in x.iter().enumerate().take(end).skip(i) {
                *o += xv * (int4_at(q, kk) as f32 * s);
            }
        }
    }
    for r in 0..rows {
        out[r] += _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_int8_avx2(xs: &[&[f32]], q: &[u8], s: f32) -> [f32; MAX_ROWS] {
    use std::arch::x86_64::*;
    let (k, rows) = (q.len(), xs.len());
    let sv = _mm256_set1_ps(s);
    let mut acc = [[_mm256_setzero_ps(); 2]; MAX_ROWS];
    let qp = q.as_ptr();
    let mut i = 0;
    while i + 16 <= k {
        // SAFETY (whole loop): i + 16 <= k = q.len() = every x's length; unaligned loads.
        let (w0, w1) = unsafe {
            let q0 = _mm256_cvtepi8_epi32(_mm_loadl_epi64(qp.add(i) as *const __m128i));
            let q1 = _mm256_cvtepi8_epi32(_mm_loadl_epi64(qp.add(i + 8) as *const __m128i));
            (_mm256_mul_ps(_mm256_cvtepi32_ps(q0), sv), _mm256_mul_ps(_mm256_cvtepi32_ps(q1), sv))
        };
        for r in 0..rows {
            let xp = xs[r].as_ptr();
            // SAFETY: as above.
            unsafe {
                acc[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(i)), w0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(i + 8)), w1, acc[r][1]);
            }
        }
        i += 16;
    }
    let mut out = [0f32; MAX_ROWS];
    for r in 0..rows {
        out[r] = hsum256(_mm256_add_ps(acc[r][0], acc[r][1]));
        for j in i..k {
            out[r] += xs[r][j] * (q[j] as i8 as f32 * s);
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_int4_avx2(xs: &[&[f32]], q: &[u8], scales: &[half::f16], k: usize) -> [f32; MAX_ROWS] {
    use std::arch::x86_64::*;
    let rows = xs.len();
    let low = _mm256_set1_epi32(0xF);
    let mut acc = [[_mm256_setzero_ps(); 2]; MAX_ROWS];
    let mut out = [0f32; MAX_ROWS];
    let qp = q.as_ptr();
    for (g, s) in scales.iter().enumerate() {
        let s = s.to_f32();
        let end = ((g + 1) * crate::quant::INT4_GROUP).min(k);
        // (n - 8) * s as n * s - 8 s in one FMA: exact, since the result q * s is an f32.
        let (sv, off) = (_mm256_set1_ps(s), _mm256_set1_ps(-8.0 * s));
        let mut i = g * crate::quant::INT4_GROUP;
        while i + 16 <= end {
            // SAFETY (whole loop): inputs i..i+16 are bytes i/2..i/2+8 < row_bytes, and
            // i + 16 <= k = every x's length; unaligned loads.
            let (we, wo) = unsafe {
                let b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(qp.add(i / 2) as *const __m128i));
                let lo = _mm256_and_si256(b, low);
                let hi = _mm256_srli_epi32::<4>(b);
                (_mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), sv, off), _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), sv, off))
            };
            for r in 0..rows {
                let xp = xs[r].as_ptr();
                // SAFETY: as above; x is permuted: evens at i..i+8, odds at i+8..i+16.
                unsafe {
                    acc[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(i)), we, acc[r][0]);
                    acc[r][1] = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(i + 8)), wo, acc[r][1]);
                }
            }
            i += 16;
        }
        for (o, x) in out.iter_mut().zip(xs) {
            for (kk, &xv) in x.iter().enumerate().take(end).skip(i) {
                *o += xv * (int4_at(q, kk) as f32 * s);
            }
        }
    }
    for r in 0..rows {
        out[r] += hsum256(_mm256_add_ps(acc[r][0], acc[r][1]));
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn hsum256(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let mut lanes = [0f32; 8];
    // SAFETY: lanes holds 8 floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), v) };
    lanes.iter().sum()
}

/// The int4 value of input `kk` of a packed row.
#[inline]
fn int4_at(q: &[u8], kk: usize) -> i32 {
    ((q[kk / 2] >> (4 * (kk % 2))) & 0xF) as i32 - 8
}

/// The scalar packing of panel rows `kks` (k offsets within the slice) for all NR columns (see
/// [`WeightRows::pack_panel`]).
fn pack_scalar(w: &QuantTensor, rows: Range<usize>, k0: usize, kks: Range<usize>, panel: &mut [f32]) {
    for j in rows.len()..NR {
        for kk in kks.clone() {
            panel[kk * NR + j] = 0.0;
        }
    }
    let (rb, groups, group) = (w.row_bytes(), w.groups(), w.group_len());
    for (j, row) in rows.enumerate() {
        let q = &w.data[row * rb..(row + 1) * rb];
        let scales = &w.scales[row * groups..(row + 1) * groups];
        match w.format {
            Quantize::Int8 => {
                let s = scales[0].to_f32();
                for kk in kks.clone() {
                    panel[kk * NR + j] = q[k0 + kk] as i8 as f32 * s;
                }
            }
            Quantize::Int4 => {
                for kk in kks.clone() {
                    let e = k0 + kk;
                    panel[kk * NR + j] = int4_at(q, e) as f32 * scales[e / group].to_f32();
                }
            }
        }
    }
}

/// [`WeightRows::pack_panel`] with 16 x 16 blocks (16 weight rows x 16 inputs, inside one int4
/// group since k0 and the block start are multiples of 16) widened, scaled and transposed in
/// registers; the k remainder (< 16) through the scalar packing. `rows` is a full panel.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_avx512(w: &QuantTensor, rows: Range<usize>, k0: usize, panel: &mut [f32]) {
    use std::arch::x86_64::*;
    let kc = panel.len() / NR;
    let full_k = kc - kc % 16;
    let (rb, groups, group) = (w.row_bytes(), w.groups(), w.group_len());
    // int4: lane i takes byte i / 2, shifted right by 4 for odd i.
    let pairs = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    let shifts = _mm512_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
    let (low, eight) = (_mm512_set1_epi32(0xF), _mm512_set1_epi32(8));
    for half in 0..2 {
        let row0 = rows.start + half * 16;
        for kb in (0..full_k).step_by(16) {
            let e = k0 + kb;
            let mut v = [_mm512_setzero_ps(); 16];
            for (i, vi) in v.iter_mut().enumerate() {
                let row = row0 + i;
                let s = _mm512_set1_ps(w.scales[row * groups + e / group].to_f32());
                let q = match w.format {
                    Quantize::Int8 => {
                        let src = &w.data[row * rb + e..][..16];
                        // SAFETY: src holds 16 bytes; loadu has no alignment requirement.
                        _mm512_cvtepi8_epi32(unsafe { _mm_loadu_si128(src.as_ptr() as *const __m128i) })
                    }
                    Quantize::Int4 => {
                        // e is even (a multiple of 16): inputs e..e+16 are these 8 bytes.
                        let src = &w.data[row * rb + e / 2..][..8];
                        // SAFETY: src holds 8 bytes, what loadl reads.
                        let b = _mm512_cvtepu8_epi32(unsafe { _mm_loadl_epi64(src.as_ptr() as *const __m128i) });
                        let n = _mm512_srlv_epi32(_mm512_permutexvar_epi32(pairs, b), shifts);
                        _mm512_sub_epi32(_mm512_and_si512(n, low), eight)
                    }
                };
                *vi = _mm512_mul_ps(_mm512_cvtepi32_ps(q), s);
            }
            let t = super::gemm::transpose16(v);
            for (c, tc) in t.iter().enumerate() {
                let dst = &mut panel[(kb + c) * NR + half * 16..][..16];
                // SAFETY: dst holds 16 floats.
                unsafe { _mm512_storeu_ps(dst.as_mut_ptr(), *tc) };
            }
        }
    }
    pack_scalar(w, rows, k0, full_k..kc, panel);
}

impl WeightRows for QuantTensor {
    fn elements(&self) -> usize {
        self.rows * self.cols
    }

    fn pack_panel(&self, isa: Isa, k: usize, rows: Range<usize>, k0: usize, panel: &mut [f32]) {
        let kc = panel.len() / NR;
        assert!(rows.len() <= NR && k == self.cols && k0 + kc <= k && rows.end <= self.rows, "pack_panel: shapes");
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Avx512 && rows.len() == NR && k0 % 16 == 0 {
            // SAFETY: Avx512 is only selected where the CPU has AVX-512F; shapes asserted above.
            return unsafe { pack_avx512(self, rows, k0, panel) };
        }
        let _ = isa;
        pack_scalar(self, rows, k0, 0..kc, panel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::accuracy::{self, full_mantissa_normal};
    use crate::backend::GemmDims;
    use half::f16;

    /// [`accuracy::worst_error_ratio`] over the dequantized weights, with a bound of k + 1
    /// terms. The products are exact on every path (deq(w) = q * s is exact in f32, and FMA or
    /// a product of f32 values rounded once is within the bound's per-term allowance), so every
    /// path must be within it.
    fn worst_error_ratio(x: &[f32], w: &QuantTensor, out: &[f32], m: usize) -> f64 {
        let dims = GemmDims { m, n: w.rows, k: w.cols };
        accuracy::worst_error_ratio(x, out, dims, w.cols + 1, |j| {
            w.dequant_row(j).iter().map(|&v| f64::from(v)).collect()
        })
    }

    fn random_weight(format: Quantize, n: usize, k: usize, seed: u64) -> QuantTensor {
        let w: Vec<f16> = crate::synth::random_normal(n * k, seed).into_iter().map(f16::from_f32).collect();
        QuantTensor::quantize(format, "test", &[n, k], &w).unwrap()
    }

    /// Every GEMV and GEMM path on shapes off every chunk, group and tile boundary (k = 1,
    /// odd k, k with a short last int4 group, k over several groups), several threads (rayon's
    /// pool), against the f64 product.
    #[test]
    fn every_path_matches_f64_reference() {
        let shapes = [
            (1, 33, 1),
            (2, 7, 3),
            (3, 40, 31),
            (4, 19, 33),
            (1, 64, 128),
            (4, 5, 129),
            (3, 70, 300),
            (2, 3, 517),
            (5, 33, 1),
            (14, 32, 16),
            (15, 31, 17),
            (29, 97, 255),
            (33, 88, 300),
            (6, 40, 2 * super::super::gemm::KC + 37),
        ];
        for format in [Quantize::Int8, Quantize::Int4] {
            for isa in Isa::ALL {
                if !isa.available() {
                    println!("skipping the {} path: this CPU lacks its instructions", isa.name());
                    continue;
                }
                for (seed, &(m, n, k)) in shapes.iter().enumerate() {
                    let w = random_weight(format, n, k, 7 * seed as u64 + 1);
                    let x = full_mantissa_normal(m * k, 7 * seed as u64 + 2);
                    let bias: Vec<f16> =
                        crate::synth::random_normal(n, 7 * seed as u64 + 3).into_iter().map(f16::from_f32).collect();
                    let mut out = vec![f32::NAN; m * n];
                    let dims = GemmDims { m, n, k };
                    // The path the executor picks for m rows.
                    let linear = |bias: Option<&[f16]>, out: &mut [f32], accumulate: bool| {
                        use super::super::ops::{linear_path, LinearPath, LinearWeight};
                        let (weight, act) = (LinearWeight::Quant(&w), crate::graph::Activation::None);
                        linear_path(isa, LinearPath::for_rows(m), &x, weight, bias, act, out, accumulate, dims)
                    };
                    linear(None, &mut out, false);
                    let ratio = worst_error_ratio(&x, &w, &out, m);
                    assert!(ratio <= 1.0, "{format} {} {dims:?}: error {ratio} x the f32 summation bound", isa.name());
                    // With a bias and a residual: out = old + (x·wᵀ + b), checked against the
                    // product just verified (same path, same sums).
                    let mut res = out.clone();
                    linear(Some(&bias), &mut res, true);
                    for (i, (&r, &o)) in res.iter().zip(&out).enumerate() {
                        let want = o + (o + bias[i % n].to_f32());
                        assert_eq!(r, want, "{format} {} {dims:?}: bias/residual epilogue at {i}", isa.name());
                    }
                }
            }
        }
    }

    #[test]
    fn permutation_is_evens_then_odds() {
        let x: Vec<f32> = (0..40).map(|v| v as f32).collect();
        let p = permute_for_int4(Isa::Avx2, &x);
        assert_eq!(&p[..16], &[0., 2., 4., 6., 8., 10., 12., 14., 1., 3., 5., 7., 9., 11., 13., 15.]);
        assert_eq!(&p[32..], &x[32..]);
        let p = permute_for_int4(Isa::Avx512, &x);
        assert_eq!(p[15], 30.0);
        assert_eq!(p[16], 1.0);
        assert_eq!(&p[32..], &x[32..]);
    }
}

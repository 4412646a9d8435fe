//! The reference CPU ops: f32 math on fp16 weights, parallel with rayon. Each function is the
//! definition its CUDA kernel is tested against, so clarity and exactness come before speed.

use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use crate::backend::{GemmDims, NormShape};
use crate::error::{Error, Result};
use crate::graph::Activation;

pub use super::attention::{attention, attention_ex, attention_path, AttnExtras, AttnShape, HeadBias, KeyMask};

/// Up to this many rows a Linear that knows nothing of sequences ([`LinearPath::for_rows`]) runs
/// as matrix-vector products, above it as a GEMM; also the rows of x one GEMV pass streams a
/// weight row for.
pub const GEMV_MAX_ROWS: usize = super::simd::MAX_ROWS;

/// The product a Linear call runs. On either path a row's result depends only on that row of x,
/// the weight and the path (with the `GLIMPSE_CPU_ISA` path), never on the other rows of the
/// call, their number or its own place among them: the GEMV sums each row in its own
/// accumulators (`simd::dot_rows`, `qgemm::dot_rows`), whatever chunk of rows it is in; the
/// GEMM (`gemm.rs`) sums each output in k order in one accumulator whatever the row tile and
/// block, on every path (the `avx2` path included: see `gemm.rs`). So a batch gives each
/// sequence what it gets alone as long as its rows take the same path in both calls, which
/// [`LinearPath::for_step`] decides from the sequence, not from the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinearPath {
    /// Matrix-vector products: each weight row is streamed once for every [`GEMV_MAX_ROWS`]
    /// rows of x (decode).
    Gemv,
    /// The blocked GEMM of `gemm.rs` / `qgemm.rs` (prefill, encoders).
    Gemm,
}

impl LinearPath {
    /// A call of `rows` rows that carries no sequence structure (encoders, direct callers):
    /// the GEMV up to [`GEMV_MAX_ROWS`] rows, else the GEMM.
    pub fn for_rows(rows: usize) -> Self {
        if rows <= GEMV_MAX_ROWS {
            LinearPath::Gemv
        } else {
            LinearPath::Gemm
        }
    }

    /// A call of `rows` rows inside a decoder step of `seqs` sequences at `position` (the
    /// executor's left padding gives `seqs`; 0 means the call is no decoder step, and
    /// [`LinearPath::for_rows`] decides). The GEMV for a decode step, one row per sequence after
    /// the prompt (`position > 0`), however many sequences share it; the GEMM for everything
    /// else in a decoder step: prefill of any length (a prompt alone and the same prompt
    /// left-padded in a batch then take the GEMM both, whatever their row counts) and rows that
    /// are not one per sequence (cross-attention keys of an encoder output).
    pub fn for_step(rows: usize, seqs: usize, position: usize) -> Self {
        match seqs {
            0 => LinearPath::for_rows(rows),
            _ if rows == seqs && position > 0 => LinearPath::Gemv,
            _ => LinearPath::Gemm,
        }
    }
}

/// `out[r, j] (+)= act(sum_k x[r, k] * w[j, k] + bias[j])` for `dims.m` rows; `x` is contiguous
/// `[m, k]`, `w` is `[n, k]` (PyTorch Linear layout), `out` is `[m, n]`. With `accumulate` the
/// result is added to `out` (a fused residual), else it overwrites it. Fails (before computing
/// anything) when a GEMM is needed and `GLIMPSE_CPU_ISA` names no usable path.
pub fn linear(
    x: &[f32],
    w: &[f16],
    bias: Option<&[f16]>,
    act: Activation,
    out: &mut [f32],
    accumulate: bool,
    dims: GemmDims,
) -> Result<()> {
    let isa = super::gemm::selected().map_err(Error::InvalidInput)?;
    linear_path(isa, LinearPath::for_rows(dims.m), x, LinearWeight::F16(w), bias, act, out, accumulate, dims);
    Ok(())
}

/// The weight of a Linear: fp16, or quantized at load (`crate::quant`).
#[derive(Clone, Copy)]
pub enum LinearWeight<'a> {
    F16(&'a [f16]),
    Quant(&'a crate::quant::QuantTensor),
}

/// [`linear`] on the CPU path `isa` (`GLIMPSE_CPU_ISA`), for either kind of weight, as the
/// product `path`. fp16 weights take the fused fp16 GEMV (its own feature detection) and
/// [`super::gemm::matmul`]; quantized ones take `super::qgemm`'s GEMV and the same GEMM over
/// dequantized panels. The GEMV takes any number of rows, [`GEMV_MAX_ROWS`] at a time.
#[allow(clippy::too_many_arguments)]
pub fn linear_path(
    isa: super::gemm::Isa,
    path: LinearPath,
    x: &[f32],
    w: LinearWeight<'_>,
    bias: Option<&[f16]>,
    act: Activation,
    out: &mut [f32],
    accumulate: bool,
    dims: GemmDims,
) {
    let GemmDims { m: rows, n, k } = dims;
    let w_len = match w {
        LinearWeight::F16(w) => w.len(),
        LinearWeight::Quant(q) => {
            assert!(q.rows == n && q.cols == k, "linear: quantized weight shape");
            n * k
        }
    };
    assert!(x.len() >= rows * k && w_len == n * k && out.len() >= rows * n, "linear: buffer sizes");
    let bias: Vec<f32> = bias.map_or_else(|| vec![0.0; n], |b| b.iter().map(|v| v.to_f32()).collect());
    // out[j] (+)= act(acc[j] + bias[j]) over the columns `cols` of one output row.
    let epilogue = |out_cols: &mut [f32], acc: &[f32], cols: std::ops::Range<usize>| {
        super::vmath::epilogue(isa, act, out_cols, &acc[..out_cols.len()], &bias[cols], accumulate)
    };
    if path == LinearPath::Gemv {
        if rows == 0 {
            return;
        }
        // One output column per task, `cols[j * rows + r]`: each weight row is streamed once
        // per GEMV_MAX_ROWS rows of x (from L1 after the first chunk); each row's sum is its
        // own, so it does not depend on the chunk it falls in.
        let mut cols = vec![0f32; n * rows];
        match w {
            LinearWeight::F16(w) => {
                let xs: Vec<&[f32]> = (0..rows).map(|r| &x[r * k..(r + 1) * k]).collect();
                gemv_columns(&xs, &mut cols, |chunk, j| super::simd::dot_rows(chunk, &w[j * k..(j + 1) * k]));
            }
            LinearWeight::Quant(q) => {
                let isa = super::qgemm::gemv_isa(isa);
                let permuted: Vec<Vec<f32>> = (0..rows)
                    .map(|r| {
                        let xr = &x[r * k..(r + 1) * k];
                        match q.format {
                            crate::quant::Quantize::Int4 => super::qgemm::permute_for_int4(isa, xr),
                            crate::quant::Quantize::Int8 => xr.to_vec(),
                        }
                    })
                    .collect();
                let xs: Vec<&[f32]> = permuted.iter().map(Vec::as_slice).collect();
                gemv_columns(&xs, &mut cols, |chunk, j| super::qgemm::dot_rows(isa, chunk, q, j));
            }
        }
        if rows == 1 {
            epilogue(&mut out[..n], &cols, 0..n);
            return;
        }
        let mut acc = vec![0f32; n];
        for (r, out_row) in out.chunks_mut(n).take(rows).enumerate() {
            for (a, col) in acc.iter_mut().zip(cols.chunks_exact(rows)) {
                *a = col[r];
            }
            epilogue(out_row, &acc, 0..n);
        }
        return;
    }
    match w {
        LinearWeight::F16(w) => super::gemm::matmul(isa, x, w, dims, out, epilogue),
        LinearWeight::Quant(q) => super::gemm::matmul_rows(isa, x, q, dims, out, epilogue),
    }
}

/// `cols[j * rows + r] = dot(rows r of xs, j)` for every output column j (one task per column),
/// `dot` taking at most [`GEMV_MAX_ROWS`] rows at a time.
fn gemv_columns<D>(xs: &[&[f32]], cols: &mut [f32], dot: D)
where
    D: Fn(&[&[f32]], usize) -> [f32; GEMV_MAX_ROWS] + Sync,
{
    let rows = xs.len();
    cols.par_chunks_mut(rows).with_min_len(16).enumerate().for_each(|(j, col)| {
        if rows <= GEMV_MAX_ROWS {
            col.copy_from_slice(&dot(xs, j)[..rows]);
        } else {
            for (c, chunk) in col.chunks_mut(GEMV_MAX_ROWS).zip(xs.chunks(GEMV_MAX_ROWS)) {
                c.copy_from_slice(&dot(chunk, j)[..chunk.len()]);
            }
        }
    });
}

/// `out[r] = (s - mean(s)) / sqrt(var(s) + eps) * w (+ b)` with `s = x[r] (+ residual[r])`;
/// statistics in f64 (biased variance, as torch).
pub fn layer_norm(
    x: &[f32],
    residual: Option<&[f32]>,
    w: &[f16],
    b: Option<&[f16]>,
    out: &mut [f32],
    shape: NormShape,
) {
    let NormShape { rows, dim, eps } = shape;
    assert!(w.len() >= dim && b.is_none_or(|b| b.len() >= dim), "layer_norm: weight shorter than the row");
    // The fp16 weights widened once per call (adding a 0 bias is the identity).
    let (w, b) = (w.to_f32_vec(), b.map_or_else(|| vec![0.0; dim], |b| b.to_f32_vec()));
    out[..rows * dim].par_chunks_mut(dim).enumerate().for_each(|(r, o)| {
        let xr = &x[r * dim..(r + 1) * dim];
        for (i, v) in o.iter_mut().enumerate() {
            *v = xr[i] + residual.map_or(0.0, |res| res[r * dim + i]);
        }
        let mean = o.iter().map(|&v| f64::from(v)).sum::<f64>() / dim as f64;
        let var = o.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>() / dim as f64;
        let rstd = 1.0 / (var + f64::from(eps)).sqrt();
        for (v, (&w, &b)) in o.iter_mut().zip(w.iter().zip(&b)) {
            *v = ((f64::from(*v) - mean) * rstd) as f32 * w + b;
        }
    });
}

/// HF Llama / T5 RMSNorm: `out[r] = f32(s * rsqrt(mean(s²) + eps)) * w` with
/// `s = x[r] (+ residual[r])`: the normalised value is cast to the activation dtype (f32 here,
/// fp16 on the GPU) before the weight multiplies it. Statistics in f64.
pub fn rms_norm(x: &[f32], residual: Option<&[f32]>, w: &[f16], out: &mut [f32], shape: NormShape) {
    let NormShape { rows, dim, eps } = shape;
    assert!(w.len() >= dim, "rms_norm: weight shorter than the row");
    let w = w.to_f32_vec();
    out[..rows * dim].par_chunks_mut(dim).enumerate().for_each(|(r, o)| {
        let xr = &x[r * dim..(r + 1) * dim];
        for (i, v) in o.iter_mut().enumerate() {
            *v = xr[i] + residual.map_or(0.0, |res| res[r * dim + i]);
        }
        let ms = o.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / dim as f64;
        let rstd = 1.0 / (ms + f64::from(eps)).sqrt();
        for (v, &w) in o.iter_mut().zip(&w) {
            *v = (f64::from(*v) * rstd) as f32 * w;
        }
    });
}

/// `out[r] = x[r] / ||x[r]||` over rows of `dim`: the sum of squares and the division in f64,
/// rounded once to f32 (transformers' `x / x.norm(p=2, dim=-1, keepdim=True)` in fp32 agrees to
/// f32 rounding; no epsilon, so a zero row gives NaN as there).
pub fn l2_normalize(x: &[f32], rows: usize, dim: usize, out: &mut [f32]) {
    for (o, xr) in out[..rows * dim].chunks_mut(dim).zip(x.chunks(dim)) {
        let norm = xr.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>().sqrt();
        for (o, &v) in o.iter_mut().zip(xr) {
            *o = (f64::from(v) / norm) as f32;
        }
    }
}

/// `out[i] = act(gate[i]) * up[i]`.
pub fn gated_act(gate: &[f32], up: &[f32], act: Activation, out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = act.apply(g) * u;
    }
}

/// RoPE (HF `rotate_half`) in place on one head row `x` (`head_dim` values) at `position`:
/// for j < rot/2, `(x_j, x_{j+rot/2}) <- (x_j c - x_{j+rot/2} s, x_{j+rot/2} c + x_j s)` with
/// `c, s = cos, sin(f32(position) * inv_freq[j])` in f32, rot = 2 * inv_freq.len().
pub fn rope_row(x: &mut [f32], position: usize, inv_freq: &[f32]) {
    let half = inv_freq.len();
    for (j, &f) in inv_freq.iter().enumerate() {
        let angle = position as f32 * f;
        let (s, c) = (angle.sin(), angle.cos());
        let (a, b) = (x[j], x[j + half]);
        x[j] = a * c - b * s;
        x[j + half] = b * c + a * s;
    }
}

/// IDEFICS' gated residual ([`crate::graph::Op::GatedAdd`]) over rows of `width` values:
/// `out[r] += tanh(alpha) * x[r]` (alpha one value or one per column) on every row, or with a
/// `(mask, mask_width)` only on the rows whose mask row holds a 0; f32 throughout, as
/// transformers' float32 forward.
pub fn gated_add(x: &[f32], alpha: &[f32], mask: Option<(&[f32], usize)>, out: &mut [f32], width: usize) {
    let gates: Vec<f32> = alpha.iter().map(|a| a.tanh()).collect();
    for (r, (o, xr)) in out.chunks_exact_mut(width).zip(x.chunks_exact(width)).enumerate() {
        if mask.is_some_and(|(m, w)| !m[r * w..(r + 1) * w].contains(&0.0)) {
            continue;
        }
        for (c, (o, &v)) in o.iter_mut().zip(xr).enumerate() {
            *o += gates[if gates.len() == 1 { 0 } else { c }] * v;
        }
    }
}

/// Idefics3's pixel shuffle ([`crate::graph::Op::PixelShuffle`]) of `batch` images of
/// `side x side` rows of `dim` values: `x` `[batch * side², dim]` -> `out`
/// `[batch * (side/scale)², scale² * dim]`, where out row `(Y, X)` holds rows
/// `(Y*scale + a, X*scale + c)` of `x` in `(a, c)` order (transformers' view/permute/reshape).
pub fn pixel_shuffle(x: &[f32], out: &mut [f32], dim: usize, batch: usize, side: usize, scale: usize) {
    let grid = side / scale;
    let mut dst = out.chunks_exact_mut(dim);
    for b in 0..batch {
        for (y, xx) in (0..grid).flat_map(|y| (0..grid).map(move |xx| (y, xx))) {
            for (a, c) in (0..scale).flat_map(|a| (0..scale).map(move |c| (a, c))) {
                let src = b * side * side + (y * scale + a) * side + xx * scale + c;
                dst.next().expect("out holds batch * side² rows").copy_from_slice(&x[src * dim..(src + 1) * dim]);
            }
        }
    }
}

/// A `patch x patch`, stride-`patch` Conv2d with bias over one `[3, size, size]` image, as the
/// GEMM `[P, 3*patch*patch] x [D, 3*patch*patch]ᵀ` (im2col order = PyTorch weight order c, kh, kw).
pub fn patch_embed(
    pixels: &[f32],
    image_size: usize,
    patch: usize,
    w: &[f16],
    bias: &[f16],
    dim: usize,
    out: &mut [f32],
) -> Result<()> {
    let side = image_size / patch;
    let kdim = 3 * patch * patch;
    let mut cols = vec![0f32; side * side * kdim];
    cols.par_chunks_mut(kdim).enumerate().for_each(|(p, col)| {
        let (py, px) = (p / side, p % side);
        for c in 0..3 {
            for ky in 0..patch {
                let src = &pixels[c * image_size * image_size + (py * patch + ky) * image_size + px * patch..][..patch];
                col[c * patch * patch + ky * patch..][..patch].copy_from_slice(src);
            }
        }
    });
    linear(&cols, w, Some(bias), Activation::None, out, false, GemmDims { m: side * side, n: dim, k: kdim })
}

/// log_softmax(logits)[token], in f64.
pub fn log_prob(logits: &[f32], token: usize) -> f64 {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = logits.iter().map(|&l| (l as f64 - max).exp()).sum::<f64>().ln() + max;
    logits[token] as f64 - lse
}

/// Index of the largest logit; ties go to the lowest index, as `torch.argmax`.
pub fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best
}

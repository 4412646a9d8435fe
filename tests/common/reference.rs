//! One naive f64 definition of each op glimpse computes, written from the PyTorch / transformers
//! 5.17 definitions (not from glimpse's code), shared by tests/cpu_ops.rs (f32 executor) and
//! tests/gpu_kernels.rs (fp16 kernels). Inputs are f32, f16 or f64 slices ([`Num`]); every
//! result is computed in f64 from the exact input values, so what a comparison measures is the
//! implementation's rounding, against tolerances each test file states.
//!
//! Layouts are row-major: a `[rows, cols]` buffer holds row r at `r * cols`.

// Each test crate that declares `mod common;` calls only some of these definitions.
#![allow(dead_code)]

use glimpse::graph::{Activation, ATTN_MASK_FLOOR};
use half::f16;

/// An element type the references read.
pub trait Num: Copy {
    fn f64(self) -> f64;
    /// `x` rounded to this type (torch's `.to(dtype)`), as f64.
    fn round(x: f64) -> f64;
}

impl Num for f64 {
    fn f64(self) -> f64 {
        self
    }
    fn round(x: f64) -> f64 {
        x
    }
}

impl Num for f32 {
    fn f64(self) -> f64 {
        f64::from(self)
    }
    fn round(x: f64) -> f64 {
        f64::from(x as f32)
    }
}

impl Num for f16 {
    fn f64(self) -> f64 {
        self.to_f64()
    }
    fn round(x: f64) -> f64 {
        f16::from_f64(x).to_f64()
    }
}

/// An absent optional operand (bias, residual) of any [`Num`] type.
pub const NONE: Option<&'static [f32]> = None;

pub fn f64s<T: Num>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| x.f64()).collect()
}

/// Columns `start..start + width` of every row of a `[rows, cols]` buffer (a view of a fused
/// buffer, e.g. q of a fused qkv), as a contiguous `[rows, width]` buffer.
pub fn columns<T: Copy>(x: &[T], cols: usize, start: usize, width: usize) -> Vec<T> {
    x.chunks(cols).flat_map(|row| row[start..start + width].iter().copied()).collect()
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Every activation [`act`] defines, for tests that sweep them.
pub const ACTIVATIONS: [Activation; 6] = [
    Activation::None,
    Activation::Relu,
    Activation::Gelu,
    Activation::QuickGelu,
    Activation::Silu,
    Activation::GeluTanh,
];

/// transformers' ACT2FN: `gelu` (nn.GELU, erf form), `quick_gelu` (x * sigmoid(1.702 x)),
/// `gelu_pytorch_tanh` (nn.GELU(approximate="tanh")), `silu`, `relu`.
pub fn act(a: Activation, x: f64) -> f64 {
    match a {
        Activation::None => x,
        Activation::Relu => x.max(0.0),
        Activation::Gelu => 0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2)),
        Activation::QuickGelu => x * sigmoid(1.702 * x),
        Activation::Silu => x * sigmoid(x),
        Activation::GeluTanh => {
            0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
        }
    }
}

/// nn.Linear on `[rows, k]` x with a `[n, k]` weight: `act(x W^T + b) + residual` (the residual
/// `[rows, n]` added after the activation, as a transformer block's skip connection).
pub fn linear<X: Num, W: Num, B: Num, R: Num>(
    x: &[X],
    w: &[W],
    bias: Option<&[B]>,
    a: Activation,
    residual: Option<&[R]>,
    (rows, n, k): (usize, usize, usize),
) -> Vec<f64> {
    let mut y = vec![0f64; rows * n];
    for r in 0..rows {
        for j in 0..n {
            let dot: f64 = (0..k).map(|t| x[r * k + t].f64() * w[j * k + t].f64()).sum();
            let s = act(a, dot + bias.map_or(0.0, |b| b[j].f64()));
            y[r * n + j] = s + residual.map_or(0.0, |res| res[r * n + j].f64());
        }
    }
    y
}

fn abs<T: Num>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| x.f64().abs()).collect()
}

/// `|b| + sum |x w|` of each output of [`linear`]: the magnitude an f32 accumulation's rounding
/// error scales with, for tolerances.
pub fn linear_abs<X: Num, W: Num, B: Num>(
    x: &[X],
    w: &[W],
    bias: Option<&[B]>,
    dims: (usize, usize, usize),
) -> Vec<f64> {
    linear(&abs(x), &abs(w), bias.map(abs).as_deref(), Activation::None, NONE, dims)
}

/// nn.LayerNorm over each `dim`-row: `(x - mean) / sqrt(var + eps) * w + b`, biased variance.
/// A fused residual is the caller's: pass the sum as the implementation forms it.
pub fn layer_norm<X: Num, W: Num, B: Num>(x: &[X], w: &[W], bias: Option<&[B]>, eps: f64, dim: usize) -> Vec<f64> {
    let mut y = Vec::with_capacity(x.len());
    for row in x.chunks(dim) {
        let row = f64s(row);
        let mean = row.iter().sum::<f64>() / dim as f64;
        let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / dim as f64;
        for (j, v) in row.iter().enumerate() {
            y.push((v - mean) / (var + eps).sqrt() * w[j].f64() + bias.map_or(0.0, |b| b[j].f64()));
        }
    }
    y
}

/// LlamaRMSNorm over each `dim`-row: statistics in float (`x / sqrt(mean(x^2) + eps)`), the
/// result cast back to the input dtype (`.to(input_dtype)`), then times the weight.
pub fn rms_norm<X: Num, W: Num>(x: &[X], w: &[W], eps: f64, dim: usize) -> Vec<f64> {
    let mut y = Vec::with_capacity(x.len());
    for row in x.chunks(dim) {
        let row = f64s(row);
        let ms = row.iter().map(|v| v * v).sum::<f64>() / dim as f64;
        for (j, v) in row.iter().enumerate() {
            y.push(X::round(v / (ms + eps).sqrt()) * w[j].f64());
        }
    }
    y
}

/// Each `dim`-row divided by its Euclidean norm (transformers' `x / x.norm(p=2, dim=-1,
/// keepdim=True)`, no epsilon).
pub fn l2_normalize<X: Num>(x: &[X], dim: usize) -> Vec<f64> {
    let mut y = Vec::with_capacity(x.len());
    for row in x.chunks(dim) {
        let row = f64s(row);
        let norm = row.iter().map(|v| v * v).sum::<f64>().sqrt();
        y.extend(row.iter().map(|v| v / norm));
    }
    y
}

/// Where the heads of q, k or v lie: batch item b, row i, head h, column c is element
/// `(b * batch_stride + i) * stride + col + h * head_dim + c`.
#[derive(Debug, Clone, Copy)]
pub struct Rows {
    pub stride: usize,
    pub col: usize,
    /// Rows between batch items (the sequence length, or a KV cache's capacity).
    pub batch_stride: usize,
}

impl Rows {
    /// `[batch, len, width]` contiguous.
    pub fn contiguous(len: usize, width: usize) -> Self {
        Rows { stride: width, col: 0, batch_stride: len }
    }
}

/// Scaled dot-product attention as transformers' eager path computes it, with every extra the
/// models use. The output is `[batch * q_len, heads * head_dim]` contiguous.
#[derive(Debug, Clone, Copy)]
pub struct Attn<'a> {
    pub batch: usize,
    pub heads: usize,
    /// Query head h reads kv head `h / (heads / kv_heads)` (`repeat_kv`).
    pub kv_heads: usize,
    pub head_dim: usize,
    pub q_len: usize,
    pub kv_len: usize,
    pub q: Rows,
    pub k: Rows,
    pub v: Rows,
    pub scale: f64,
    /// Query row i sees keys `j <= i + offset` only (causal after `offset` cached keys; a
    /// negative offset hides whole rows).
    pub causal: Option<i64>,
    /// Batch item b has keys `0..kv_valid[b]` only (a KV cache's filled length).
    pub kv_valid: Option<&'a [i32]>,
    /// Additive per-key mask `[batch, stride]` (HF padding masks: 0 or `finfo.min`), clamped at
    /// `ATTN_MASK_FLOOR` before it is added: a score plus `finfo.min` rounds back to it in fp32,
    /// so transformers gives a row whose keys are all masked equal scores (the mean of V) and
    /// masked keys of other rows weight 0; the floor keeps exactly that in f64.
    pub key_mask: Option<(&'a [f32], usize)>,
    /// `key_mask` has one row per query row (`b * q_len + i`) instead of one per batch item.
    pub mask_per_query: bool,
    /// Additive bias of head h, query row i: row `h * q_len + i` of a `[heads * q_len, stride]`
    /// buffer (T5-style position bias), the same for every batch item.
    pub head_bias: Option<(&'a [f32], usize)>,
}

impl Attn<'_> {
    /// Multi-head attention over contiguous `[batch, len, heads, head_dim]` q, k and v, no mask.
    pub fn contiguous(batch: usize, heads: usize, q_len: usize, kv_len: usize, head_dim: usize, scale: f64) -> Self {
        let width = heads * head_dim;
        Attn {
            batch,
            heads,
            kv_heads: heads,
            head_dim,
            q_len,
            kv_len,
            q: Rows::contiguous(q_len, width),
            k: Rows::contiguous(kv_len, width),
            v: Rows::contiguous(kv_len, width),
            scale,
            causal: None,
            kv_valid: None,
            key_mask: None,
            mask_per_query: false,
            head_bias: None,
        }
    }
}

/// softmax(q k^T * scale + mask + bias) v per batch item, head and query row, over the keys the
/// row sees (`causal`, `kv_valid`); a row that sees no key at all is zeros.
pub fn attention<T: Num>(q: &[T], k: &[T], v: &[T], a: &Attn<'_>) -> Vec<f64> {
    let (d, width) = (a.head_dim, a.heads * a.head_dim);
    let group = a.heads / a.kv_heads;
    let at = |x: &[T], rows: Rows, b: usize, i: usize, h: usize| -> Vec<f64> {
        f64s(&x[(b * rows.batch_stride + i) * rows.stride + rows.col + h * d..][..d])
    };
    let mut out = vec![0f64; a.batch * a.q_len * width];
    for b in 0..a.batch {
        let valid = a.kv_valid.map_or(a.kv_len as i64, |v| i64::from(v[b]).min(a.kv_len as i64));
        for h in 0..a.heads {
            for i in 0..a.q_len {
                let seen = a.causal.map_or(valid, |off| valid.min(i as i64 + off + 1)).max(0) as usize;
                let qi = at(q, a.q, b, i, h);
                let scores: Vec<f64> = (0..seen)
                    .map(|j| {
                        let kj = at(k, a.k, b, j, h / group);
                        let dot: f64 = qi.iter().zip(&kj).map(|(x, y)| x * y).sum();
                        let mask_row = if a.mask_per_query { b * a.q_len + i } else { b };
                        let mask = a
                            .key_mask
                            .map_or(0.0, |(m, stride)| f64::from(m[mask_row * stride + j].max(ATTN_MASK_FLOOR)));
                        let bias =
                            a.head_bias.map_or(0.0, |(hb, stride)| f64::from(hb[(h * a.q_len + i) * stride + j]));
                        dot * a.scale + mask + bias
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                let o = &mut out[(b * a.q_len + i) * width + h * d..][..d];
                for (j, s) in scores.iter().enumerate() {
                    let p = (s - max).exp() / z;
                    for (oc, vc) in o.iter_mut().zip(at(v, a.v, b, j, h / group)) {
                        *oc += p * vc;
                    }
                }
            }
        }
    }
    out
}

/// An HF padding mask for left-padded sequences, `[pads.len(), stride]`: `finfo(float32).min`
/// on the first `pads[b]` keys of sequence b, 0 elsewhere.
pub fn left_padding_mask(pads: &[usize], stride: usize) -> Vec<f32> {
    pads.iter().flat_map(|&pad| (0..stride).map(move |j| if j < pad { f32::MIN } else { 0.0 })).collect()
}

/// Rotary positions of `rows` rows per sequence starting at absolute position `start`, for
/// left-padded sequences: row i of sequence b is at `start + i - pads[b]`, and pad rows at 0.
/// (transformers' generate puts pad rows at 1; they are masked keys whose values no real token
/// reads, so either choice leaves every real output the same.)
pub fn left_padded_positions(pads: &[usize], start: usize, rows: usize) -> Vec<usize> {
    pads.iter().flat_map(|&pad| (0..rows).map(move |i| (start + i).saturating_sub(pad))).collect()
}

/// transformers' `apply_rotary_pos_emb` with `rotate_half` on `heads` heads of `head_dim`
/// columns from column `col` of a `[rows, cols]` buffer, row r at `positions[r]`. The first
/// `2 * inv_freq.len()` dims of each head rotate (partial rotary); everything else passes
/// through. The angle is HF's fp32 `position * inv_freq`; cos and sin are taken in f64.
pub fn rope<T: Num>(
    x: &[T],
    cols: usize,
    col: usize,
    heads: usize,
    head_dim: usize,
    positions: &[usize],
    inv_freq: &[f32],
) -> Vec<f64> {
    let half = inv_freq.len();
    let mut y = f64s(x);
    for (r, &pos) in positions.iter().enumerate() {
        for h in 0..heads {
            let base = r * cols + col + h * head_dim;
            for (j, &f) in inv_freq.iter().enumerate() {
                let angle = f64::from(pos as f32 * f);
                let (x1, x2) = (x[base + j].f64(), x[base + j + half].f64());
                // x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1)
                y[base + j] = x1 * angle.cos() - x2 * angle.sin();
                y[base + j + half] = x2 * angle.cos() + x1 * angle.sin();
            }
        }
    }
    y
}

/// The gated MLP's `act(gate) * up`, elementwise.
pub fn gated<G: Num, U: Num>(a: Activation, gate: &[G], up: &[U]) -> Vec<f64> {
    gate.iter().zip(up).map(|(g, u)| act(a, g.f64()) * u.f64()).collect()
}

/// The input of a `kernel = stride = patch` Conv2d as a matrix: `[batch * patches, channels *
/// patch^2]` from `[batch, channels, height, width]` pixels, patches row-major, each row in the
/// conv weight's `(channel, ky, kx)` order, so the conv is [`linear`] of this with its weight.
pub fn im2col<T: Num>(
    px: &[T],
    (batch, channels, height, width): (usize, usize, usize, usize),
    patch: usize,
) -> Vec<f64> {
    let (across, down) = (width / patch, height / patch);
    let mut cols = Vec::with_capacity(batch * across * down * channels * patch * patch);
    for b in 0..batch {
        for py in 0..down {
            for pxx in 0..across {
                for c in 0..channels {
                    for ky in 0..patch {
                        for kx in 0..patch {
                            let (yy, xx) = (py * patch + ky, pxx * patch + kx);
                            cols.push(px[((b * channels + c) * height + yy) * width + xx].f64());
                        }
                    }
                }
            }
        }
    }
    cols
}

/// Rows `index` of a `[rows, dim]` buffer (`x[index]`, nn.Embedding); a None index is a zero
/// row (the GPU gather's answer for a token id outside the table).
pub fn select_rows<T: Num>(x: &[T], dim: usize, index: impl IntoIterator<Item = Option<usize>>) -> Vec<f64> {
    index
        .into_iter()
        .flat_map(|r| match r {
            Some(r) => f64s(&x[r * dim..][..dim]),
            None => vec![0.0; dim],
        })
        .collect()
}

/// torch.argmax of a row: the first maximum, and a NaN counts as larger than everything.
pub fn argmax<T: Num>(row: &[T]) -> usize {
    let mut best = 0;
    for (j, v) in row.iter().enumerate().skip(1) {
        let (v, b) = (v.f64(), row[best].f64());
        if b.is_nan() {
            break;
        }
        if v.is_nan() || v > b {
            best = j;
        }
    }
    best
}

/// log(sum(exp(row))), shifted by the maximum.
pub fn logsumexp<T: Num>(row: &[T]) -> f64 {
    let max = row.iter().map(|v| v.f64()).fold(f64::NEG_INFINITY, f64::max);
    max + row.iter().map(|v| (v.f64() - max).exp()).sum::<f64>().ln()
}

/// log_softmax(row)[index].
pub fn log_softmax<T: Num>(row: &[T], index: usize) -> f64 {
    row[index].f64() - logsumexp(row)
}

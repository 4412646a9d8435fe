//! Weight-only quantization at load time (`--quantize int8|int4`, [`crate::api::LoadOptions`]).
//!
//! Which weights: the Linear weights the language model's decoder phases (`prefill`, `decode`)
//! read, found from a plan of the loaded model (`models::quantize`), except the logits
//! projection (lm_head) and any weight some other op also reads (a tied embedding). Embeddings,
//! norms, biases, lm_head, the vision tower, the Q-Former / projector and T5's encoder (whose
//! phase also computes the decoder's cross-attention K/V) stay fp16. Activations are unchanged:
//! f32 on the CPU executor.
//!
//! Formats (symmetric, round to nearest, ties away from zero; the scale is rounded *up* to
//! fp16 so that no value is clamped):
//! - **int8**, one fp16 scale per output row: `s = up16(max_k |w[j,k]| / 127)`,
//!   `q = round(w / s)` in [-127, 127], `w' = q * s`. Hence `|w - w'| <= s / 2` for every element.
//! - **int4**, one fp16 scale per group of [`INT4_GROUP`] consecutive inputs of a row (the last
//!   group of a row whose input dimension is not a multiple of 128 is shorter, with its own
//!   scale): `s = up16(max_group |w| / 7)`, `q = round(w / s)` in [-7, 7]. The grid is
//!   symmetric (-8 is never produced): with a scale from max|w| only ±7 can be reached without
//!   clamping, and a symmetric grid keeps `deq(q(-w)) = -deq(q(w))`. Stored as `q + 8` in a
//!   nibble, two per byte: byte `b` of a row holds inputs `2b` (low nibble) and `2b + 1` (high
//!   nibble), the order of compressed-tensors' int32 packing read as little-endian bytes; a row
//!   of odd length ends in a half-used byte.
//!
//! `q * s` is exact in f32 (an integer of at most 8 bits times an fp16 of 11), so a kernel that
//! dequantizes in registers computes exactly the products of x with the dequantized weights.

use half::f16;
use rayon::prelude::*;

use crate::error::{Error, Result};

/// Inputs per int4 scale.
pub const INT4_GROUP: usize = 128;

/// A weight-only quantization format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Quantize {
    Int8,
    Int4,
}

impl Quantize {
    pub fn name(self) -> &'static str {
        match self {
            Quantize::Int8 => "int8",
            Quantize::Int4 => "int4",
        }
    }

    /// Largest |q|.
    fn qmax(self) -> f32 {
        match self {
            Quantize::Int8 => 127.0,
            Quantize::Int4 => 7.0,
        }
    }
}

impl std::fmt::Display for Quantize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Quantize {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "int8" => Ok(Quantize::Int8),
            "int4" => Ok(Quantize::Int4),
            _ => Err(Error::InvalidInput(format!(
                "unknown quantization `{s}`: expected int8 or int4 (or leave it out for fp16 weights)"
            ))),
        }
    }
}

/// A quantized `[rows, cols]` weight (PyTorch Linear layout: rows are output features).
#[derive(Debug, Clone)]
pub struct QuantTensor {
    pub format: Quantize,
    pub rows: usize,
    pub cols: usize,
    /// int8: `rows * cols` i8 values as bytes; int4: `rows * row_bytes()` packed nibbles.
    pub data: Vec<u8>,
    /// int8: one per row; int4: `rows * groups()`, row-major.
    pub scales: Vec<f16>,
}

/// The smallest fp16 >= `v` (v finite, >= 0, <= 65504).
fn f16_up(v: f32) -> f16 {
    let h = f16::from_f32(v);
    if h.to_f32() >= v {
        h
    } else {
        f16::from_bits(h.to_bits() + 1)
    }
}

/// `round(w / s)` (ties away from zero) for a scale that makes |w / s| <= qmax; 0 when s is 0.
#[inline]
fn quantize_value(w: f32, s: f32) -> i32 {
    if s == 0.0 {
        0
    } else {
        // f64: w and s are fp16 values, so the quotient is correctly rounded and the rounding
        // of a tie is exact.
        (f64::from(w) / f64::from(s)).round() as i32
    }
}

impl QuantTensor {
    /// Quantizes an fp16 `[rows, cols]` weight; `name` is for messages.
    pub fn quantize(format: Quantize, name: &str, shape: &[usize], w: &[f16]) -> Result<Self> {
        let &[rows, cols] = shape else {
            return Err(Error::InvalidInput(format!(
                "cannot quantize `{name}`: shape {shape:?} is not a 2-D Linear weight [out, in]"
            )));
        };
        if rows == 0 || cols == 0 || w.len() != rows * cols {
            return Err(Error::InvalidInput(format!(
                "cannot quantize `{name}`: shape {shape:?} with {} values",
                w.len()
            )));
        }
        if let Some(i) = w.iter().position(|v| !v.is_finite()) {
            return Err(Error::InvalidInput(format!(
                "cannot quantize `{name}`: element {i} is {} (not finite); check the checkpoint with `glimpse info --check-weights`",
                w[i]
            )));
        }
        let mut t = QuantTensor { format, rows, cols, data: Vec::new(), scales: Vec::new() };
        let (row_bytes, groups) = (t.row_bytes(), t.groups());
        t.data = vec![0u8; rows * row_bytes];
        t.scales = vec![f16::ZERO; rows * groups];
        let qmax = format.qmax();
        let group = t.group_len();
        t.data.par_chunks_mut(row_bytes).zip(t.scales.par_chunks_mut(groups)).enumerate().for_each(
            |(j, (dst, scales))| {
                let row = &w[j * cols..(j + 1) * cols];
                for (g, s_out) in scales.iter_mut().enumerate() {
                    let span = g * group..((g + 1) * group).min(cols);
                    let max = row[span.clone()].iter().map(|v| v.to_f32().abs()).fold(0f32, f32::max);
                    let s = f16_up(max / qmax);
                    *s_out = s;
                    let s = s.to_f32();
                    for kk in span {
                        let q = quantize_value(row[kk].to_f32(), s);
                        debug_assert!(q.unsigned_abs() as f32 <= qmax);
                        match format {
                            Quantize::Int8 => dst[kk] = q as i8 as u8,
                            Quantize::Int4 => dst[kk / 2] |= ((q + 8) as u8) << (4 * (kk % 2)),
                        }
                    }
                }
            },
        );
        Ok(t)
    }

    /// Bytes per row of `data`.
    pub fn row_bytes(&self) -> usize {
        match self.format {
            Quantize::Int8 => self.cols,
            Quantize::Int4 => self.cols.div_ceil(2),
        }
    }

    /// Inputs per scale.
    pub fn group_len(&self) -> usize {
        match self.format {
            Quantize::Int8 => self.cols,
            Quantize::Int4 => INT4_GROUP,
        }
    }

    /// Scales per row.
    pub fn groups(&self) -> usize {
        self.cols.div_ceil(self.group_len())
    }

    /// The quantized value of element (j, kk).
    #[inline]
    pub fn q(&self, j: usize, kk: usize) -> i32 {
        match self.format {
            Quantize::Int8 => self.data[j * self.cols + kk] as i8 as i32,
            Quantize::Int4 => ((self.data[j * self.row_bytes() + kk / 2] >> (4 * (kk % 2))) & 0xF) as i32 - 8,
        }
    }

    /// The scale of element (j, kk).
    #[inline]
    pub fn scale(&self, j: usize, kk: usize) -> f16 {
        self.scales[j * self.groups() + kk / self.group_len()]
    }

    /// The dequantized element (j, kk): `q * s`, exact in f32.
    #[inline]
    pub fn dequant(&self, j: usize, kk: usize) -> f32 {
        self.q(j, kk) as f32 * self.scale(j, kk).to_f32()
    }

    /// Row `j` dequantized (the scalar reference; the kernels never build it).
    pub fn dequant_row(&self, j: usize) -> Vec<f32> {
        (0..self.cols).map(|kk| self.dequant(j, kk)).collect()
    }

    /// Bytes held: quantized values and fp16 scales.
    pub fn bytes(&self) -> usize {
        self.data.len() + self.scales.len() * 2
    }
}

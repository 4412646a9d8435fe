//! The reference executor: every buffer is an f32 `Vec`, allocated once; weights stay fp16.

mod attention;
pub mod gemm;
pub mod ops;
pub mod qgemm;
mod simd;
mod vmath;

use std::sync::Arc;

use crate::backend::{rope_position, validate_op, Executor, GemmDims, NormShape, RunState};
use crate::error::{Error, Result};
use crate::graph::{Attention, Buf, BufferDesc, DType, KvLen, Op, Phase, RowSelect, View, WeightTable};

pub struct CpuExecutor {
    weights: Arc<WeightTable>,
    descs: Vec<BufferDesc>,
    bufs: Vec<Vec<f32>>,
    /// Buffers whose values are rounded to fp16 after every op that writes them (see
    /// [`CpuExecutor::emulate_fp16`]); empty for the f32 reference.
    fp16: Vec<bool>,
    tokens: Vec<u32>,
    position: usize,
    pads: Vec<usize>,
    row_indices: Vec<usize>,
}

impl CpuExecutor {
    /// Allocates every buffer of the graph.
    pub fn new(weights: Arc<WeightTable>, buffers: &[BufferDesc]) -> Self {
        let bufs = buffers.iter().map(|d| vec![0f32; d.rows * d.cols]).collect();
        Self {
            weights,
            descs: buffers.to_vec(),
            bufs,
            fp16: Vec::new(),
            tokens: Vec::new(),
            position: 0,
            pads: Vec::new(),
            row_indices: Vec::new(),
        }
    }

    /// Emulates a device that stores activations in fp16 (the CUDA executor): the output of
    /// every op, and written inputs, are rounded to fp16 (each op still computes in f32 and
    /// rounds once, as a fused kernel does), except buffers the graph keeps in fp32
    /// ([`DType::F32`], as the CUDA executor does) and those for which `keep_f32(name)` holds
    /// (to measure what keeping more in fp32 would change). Used to predict GPU numerics on the
    /// CPU and to choose what must stay in fp32.
    pub fn emulate_fp16(&mut self, keep_f32: impl Fn(&str) -> bool) {
        self.fp16 = self.descs.iter().map(|d| d.dtype == DType::F16 && !keep_f32(&d.name)).collect();
    }

    fn round_if_fp16(&mut self, b: Buf) {
        if self.fp16.get(b.0).copied().unwrap_or(false) {
            for v in &mut self.bufs[b.0] {
                *v = half::f16::from_f32(*v).to_f32();
            }
        }
    }

    fn cols(&self, b: Buf) -> usize {
        self.descs[b.0].cols
    }

    /// Contiguous copy of `rows` rows x `width` columns of a view.
    fn gather(&self, v: View, rows: usize, width: usize) -> Vec<f32> {
        let stride = self.cols(v.buf);
        let src = &self.bufs[v.buf.0];
        if v.col == 0 && width == stride {
            return src[..rows * width].to_vec();
        }
        (0..rows).flat_map(|r| src[r * stride + v.col..][..width].iter().copied()).collect()
    }

    fn run_op(&mut self, op: &Op) -> Result<()> {
        let weights = self.weights.clone();
        let wt = |w| weights.get(w).as_slice();
        match *op {
            Op::PatchEmbed { pixels, weight, bias, class, positions, out, batch, image_size, patch } => {
                let dim = self.cols(out);
                let per_image = 3 * image_size * image_size;
                let lead = usize::from(class.is_some());
                let tokens = (image_size / patch).pow(2) + lead;
                let mut o = std::mem::take(&mut self.bufs[out.0]);
                let pos = wt(positions);
                let embed = |o: &mut [f32]| -> Result<()> {
                    for b in 0..batch {
                        let img = &self.bufs[pixels.0][b * per_image..(b + 1) * per_image];
                        let dst = &mut o[b * tokens * dim..(b + 1) * tokens * dim];
                        ops::patch_embed(img, image_size, patch, wt(weight), wt(bias), dim, &mut dst[lead * dim..])?;
                        if let Some(cls) = class.map(wt) {
                            for (v, c) in dst[..dim].iter_mut().zip(cls) {
                                *v = c.to_f32();
                            }
                        }
                        for (v, p) in dst.iter_mut().zip(pos) {
                            *v += p.to_f32();
                        }
                    }
                    Ok(())
                };
                let done = embed(&mut o);
                // The buffer goes back whatever happened: the executor stays usable after an error.
                self.bufs[out.0] = o;
                done?;
            }
            Op::Linear { x, weight, bias, act, residual, out, rows } => {
                let w = weights.get(weight);
                let (n, k) = (w.shape[0], w.shape[1]);
                let isa = gemm::selected().map_err(Error::InvalidInput)?;
                let xs = self.gather(x, rows, k);
                let mut o = std::mem::take(&mut self.bufs[out.0]);
                if let Some(r) = residual.filter(|r| *r != out) {
                    o[..rows * n].copy_from_slice(&self.bufs[r.0][..rows * n]);
                }
                let dims = GemmDims { m: rows, n, k };
                let wl = match w.quantized() {
                    Some(q) => ops::LinearWeight::Quant(q),
                    None => ops::LinearWeight::F16(w.as_slice()),
                };
                // Decided per sequence (the left padding holds one value per sequence of a
                // decoder step), so a batched row takes the path it takes alone.
                let path = ops::LinearPath::for_step(rows, self.pads.len(), self.position);
                ops::linear_path(isa, path, &xs, wl, bias.map(wt), act, &mut o, residual.is_some(), dims);
                self.bufs[out.0] = o;
            }
            Op::LayerNorm { x, residual, weight, bias, eps, out, rows } => {
                let dim = self.cols(out);
                let mut o = std::mem::take(&mut self.bufs[out.0]);
                let res = residual.map(|r| &self.bufs[r.0][..]);
                ops::layer_norm(&self.bufs[x.0], res, wt(weight), bias.map(wt), &mut o, NormShape { rows, dim, eps });
                self.bufs[out.0] = o;
            }
            Op::RmsNorm { x, residual, weight, eps, out, rows } => {
                let dim = self.cols(out);
                let mut o = std::mem::take(&mut self.bufs[out.0]);
                let res = residual.map(|r| &self.bufs[r.0][..]);
                ops::rms_norm(&self.bufs[x.0], res, wt(weight), &mut o, NormShape { rows, dim, eps });
                self.bufs[out.0] = o;
            }
            Op::GatedAct { gate, up, act, out, rows } => {
                let width = self.cols(out);
                let (g, u) = (self.gather(gate, rows, width), self.gather(up, rows, width));
                ops::gated_act(&g, &u, act, &mut self.bufs[out.0][..rows * width]);
            }
            Op::Rope { x, batch, rows_per_batch, heads, head_dim, ref inv_freq } => {
                let stride = self.cols(x.buf);
                let (position, pads) = (self.position, &self.pads);
                let data = &mut self.bufs[x.buf.0];
                for b in 0..batch {
                    for i in 0..rows_per_batch {
                        let pos = rope_position(position, pads, b, i);
                        let row = &mut data[(b * rows_per_batch + i) * stride + x.col..][..heads * head_dim];
                        row.chunks_mut(head_dim).for_each(|h| ops::rope_row(h, pos, inv_freq));
                    }
                }
            }
            Op::Attention(ref a) => self.attention(a),
            Op::SelectRows { x, out, batch, rows_per_batch, select } => {
                let dim = self.cols(x);
                let picks: Vec<(usize, usize)> = match select {
                    RowSelect::Skip(skip) => (0..batch)
                        .flat_map(|b| (skip..rows_per_batch).map(move |i| b * rows_per_batch + i))
                        .enumerate()
                        .collect(),
                    RowSelect::Row(i) => (0..batch).map(|b| (b, b * rows_per_batch + i)).collect(),
                    RowSelect::Indexed => (0..batch).map(|b| (b, b * rows_per_batch + self.row_indices[b])).collect(),
                };
                let mut o = std::mem::take(&mut self.bufs[out.0]);
                for (dst, src) in picks {
                    o[dst * dim..(dst + 1) * dim].copy_from_slice(&self.bufs[x.0][src * dim..(src + 1) * dim]);
                }
                self.bufs[out.0] = o;
            }
            Op::GatedAdd { x, alpha, mask, out, rows } => {
                let width = self.cols(out);
                let alpha: Vec<f32> = wt(alpha).iter().map(|a| a.to_f32()).collect();
                let mut o = std::mem::take(&mut self.bufs[out.0]);
                let mask = mask.map(|m| (&self.bufs[m.0][..rows * self.cols(m)], self.cols(m)));
                ops::gated_add(&self.bufs[x.0][..rows * width], &alpha, mask, &mut o[..rows * width], width);
                self.bufs[out.0] = o;
            }
            Op::PixelShuffle { x, out, batch, side, scale } => {
                let mut o = std::mem::take(&mut self.bufs[out.0]);
                ops::pixel_shuffle(&self.bufs[x.0], &mut o, self.cols(x), batch, side, scale);
                self.bufs[out.0] = o;
            }
            Op::KvAppend { k, v, cache_k, cache_v, batch, rows_per_batch, capacity } => {
                let width = self.cols(cache_k);
                for (src, cache) in [(k, cache_k), (v, cache_v)] {
                    let rows = self.gather(src, batch * rows_per_batch, width);
                    let dst = &mut self.bufs[cache.0];
                    for b in 0..batch {
                        let at = (b * capacity + self.position) * width;
                        dst[at..at + rows_per_batch * width]
                            .copy_from_slice(&rows[b * rows_per_batch * width..(b + 1) * rows_per_batch * width]);
                    }
                }
            }
            Op::Embed { table, out } => {
                let dim = self.cols(out);
                let t = wt(table);
                let o = &mut self.bufs[out.0];
                // Ids were checked against the vocabulary by `validate_op`.
                for (r, &tok) in self.tokens.iter().enumerate() {
                    for (d, s) in o[r * dim..(r + 1) * dim].iter_mut().zip(&t[tok as usize * dim..]) {
                        *d = s.to_f32();
                    }
                }
            }
            Op::ScatterTokens { src, token, out, .. } => {
                let dim = self.cols(out);
                let mut o = std::mem::take(&mut self.bufs[out.0]);
                let s = &self.bufs[src.0];
                let mut next = 0;
                for (r, &tok) in self.tokens.iter().enumerate() {
                    if tok == token {
                        if next + dim > s.len() {
                            let provided = s.len() / dim.max(1);
                            self.bufs[out.0] = o;
                            let held = self.tokens.iter().filter(|&&t| t == token).count();
                            return Err(Error::InvalidInput(format!(
                                "the prompt holds {held} image tokens (id {token}) but the images provide {provided} \
                                 query embeddings: remove image tokens from the prompt text"
                            )));
                        }
                        o[r * dim..(r + 1) * dim].copy_from_slice(&s[next..next + dim]);
                        next += dim;
                    }
                }
                self.bufs[out.0] = o;
            }
            Op::AddPositions { table, offset, x, batch, rows_per_batch } => {
                let dim = self.cols(x);
                let t = wt(table);
                let (position, pads) = (self.position, &self.pads);
                let o = &mut self.bufs[x.0];
                for b in 0..batch {
                    for i in 0..rows_per_batch {
                        let p = rope_position(position, pads, b, i) + offset;
                        let row = &mut o[(b * rows_per_batch + i) * dim..][..dim];
                        for (d, s) in row.iter_mut().zip(&t[p * dim..(p + 1) * dim]) {
                            *d += s.to_f32();
                        }
                    }
                }
            }
            Op::LastRows { x, out, batch, rows_per_batch } => {
                let dim = self.cols(x);
                for b in 0..batch {
                    let src = (b * rows_per_batch + rows_per_batch - 1) * dim;
                    let row = self.bufs[x.0][src..src + dim].to_vec();
                    self.bufs[out.0][b * dim..(b + 1) * dim].copy_from_slice(&row);
                }
            }
            Op::CopyRows { x, x_rows_per_batch, x_start, out, out_rows_per_batch, out_start, rows, batch } => {
                let (dim, src) = (self.cols(x), std::mem::take(&mut self.bufs[x.0]));
                for b in 0..batch {
                    let from = (b * x_rows_per_batch + x_start) * dim;
                    let to = (b * out_rows_per_batch + out_start) * dim;
                    self.bufs[out.0][to..to + rows * dim].copy_from_slice(&src[from..from + rows * dim]);
                }
                self.bufs[x.0] = src;
            }
            Op::Broadcast { table, out, batch } => {
                let t = wt(table);
                let o = &mut self.bufs[out.0];
                for b in 0..batch {
                    for (d, s) in o[b * t.len()..(b + 1) * t.len()].iter_mut().zip(t) {
                        *d = s.to_f32();
                    }
                }
            }
            // Every buffer is f32 here; the emulation rounds `out` if it is fp16.
            Op::Convert { x, out, rows } if x != out => {
                let n = rows * self.cols(x);
                let src = std::mem::take(&mut self.bufs[x.0]);
                self.bufs[out.0][..n].copy_from_slice(&src[..n]);
                self.bufs[x.0] = src;
            }
            Op::Convert { .. } => {}
            Op::L2Normalize { x, out, rows } => {
                let dim = self.cols(out);
                let mut o = std::mem::take(&mut self.bufs[out.0]);
                ops::l2_normalize(&self.bufs[x.0], rows, dim, &mut o);
                self.bufs[out.0] = o;
            }
        }
        Ok(())
    }

    fn attention(&mut self, a: &Attention) {
        let kv_len = match a.kv_len {
            KvLen::Fixed(n) => n,
            KvLen::Cache => self.position + a.q_len,
        };
        let shape = ops::AttnShape {
            batch: a.batch,
            heads: a.heads,
            head_dim: a.head_dim,
            q_len: a.q_len,
            kv_len,
            q_stride: self.cols(a.q.buf),
            q_col: a.q.col,
            kv_stride: self.cols(a.k.buf),
            k_col: a.k.col,
            v_col: a.v.col,
            kv_batch_stride: a.kv_batch_stride,
            causal_from: a.causal.then_some(self.position),
            scale: a.scale,
        };
        // Models give K and V buffers of one width (a fused qkv, or twin projections/caches).
        debug_assert_eq!(self.cols(a.k.buf), self.cols(a.v.buf));
        let mut o = std::mem::take(&mut self.bufs[a.out.0]);
        let extras = ops::AttnExtras {
            kv_heads: a.kv_heads,
            mask: a.key_mask.map(|m| ops::KeyMask {
                values: &self.bufs[m.0],
                stride: self.cols(m),
                per_query: a.mask_per_query,
            }),
            bias: a.head_bias.map(|b| ops::HeadBias { values: &self.bufs[b.0], stride: self.cols(b) }),
        };
        ops::attention_ex(&self.bufs[a.q.buf.0], &self.bufs[a.k.buf.0], &self.bufs[a.v.buf.0], &shape, &extras, &mut o);
        self.bufs[a.out.0] = o;
    }
}

impl Executor for CpuExecutor {
    fn set_tokens(&mut self, tokens: &[u32]) {
        self.tokens = tokens.to_vec();
    }

    fn set_position(&mut self, position: usize) {
        self.position = position;
    }

    fn position(&self) -> usize {
        self.position
    }

    fn set_left_padding(&mut self, pads: &[usize]) {
        self.pads = pads.to_vec();
    }

    fn set_row_indices(&mut self, rows: &[usize]) {
        self.row_indices = rows.to_vec();
    }

    fn write(&mut self, buf: Buf, data: &[f32]) -> Result<()> {
        let dst = &mut self.bufs[buf.0];
        if data.len() > dst.len() {
            return Err(Error::InvalidInput(format!(
                "{} values do not fit buffer `{}` ({} values)",
                data.len(),
                self.descs[buf.0].name,
                dst.len()
            )));
        }
        dst[..data.len()].copy_from_slice(data);
        self.round_if_fp16(buf);
        Ok(())
    }

    fn read(&mut self, buf: Buf, rows: usize) -> Result<Vec<f32>> {
        let n = rows * self.cols(buf);
        self.bufs[buf.0].get(..n).map(<[f32]>::to_vec).ok_or_else(|| {
            Error::InvalidInput(format!("buffer `{}` has fewer than {rows} rows", self.descs[buf.0].name))
        })
    }

    fn run(&mut self, phase: &Phase) -> Result<()> {
        for op in &phase.ops {
            let st = RunState {
                tokens: &self.tokens,
                position: self.position,
                pads: &self.pads,
                row_indices: &self.row_indices,
            };
            validate_op(op, &st, &self.weights, &self.descs)?;
            self.run_op(op)?;
            if !self.fp16.is_empty() {
                op.outputs().into_iter().for_each(|b| self.round_if_fp16(b));
            }
        }
        Ok(())
    }

    fn reorder_sequences(&mut self, bufs: &[Buf], rows_per_seq: usize, from: &[usize]) -> Result<()> {
        crate::backend::validate_reorder(&self.descs, bufs, rows_per_seq, from)?;
        for &b in bufs {
            let len = rows_per_seq * self.descs[b.0].cols;
            let old = self.bufs[b.0].clone();
            for (to, &src) in from.iter().enumerate() {
                self.bufs[b.0][to * len..(to + 1) * len].copy_from_slice(&old[src * len..(src + 1) * len]);
            }
        }
        Ok(())
    }

    fn device_name(&self) -> String {
        "cpu".into()
    }
}

/// Test helpers shared by the fp16 and quantized GEMM tests: inputs that expose rounding, and
/// the worst error of a product measured against the bound any f32 summation must stay within.
#[cfg(test)]
mod accuracy {
    use crate::backend::GemmDims;

    /// Max |got - exact| / bound over `out` `[m, n]`, with the exact product `x [m, k] · wᵀ` in f64
    /// and the bound gamma * sum_k |x w| (gamma = t u / (1 - t u), u = 2^-24, t = `bound_terms`):
    /// the worst-case error of any f32 summation of t exact products, FMA or not, in any order.
    /// `weight_row(j)` is row j of w (k values), exact in f64.
    pub(super) fn worst_error_ratio(
        x: &[f32],
        out: &[f32],
        dims: GemmDims,
        bound_terms: usize,
        weight_row: impl Fn(usize) -> Vec<f64>,
    ) -> f64 {
        let GemmDims { m, n, k } = dims;
        let u = f64::from(f32::EPSILON) / 2.0;
        let gamma = bound_terms as f64 * u / (1.0 - bound_terms as f64 * u);
        let mut worst = 0f64;
        for j in 0..n {
            let row = weight_row(j);
            for r in 0..m {
                let terms = (0..k).map(|kk| f64::from(x[r * k + kk]) * row[kk]);
                let (exact, mag) = terms.fold((0.0, 0.0), |(s, a), t| (s + t, a + t.abs()));
                let got = f64::from(out[r * n + j]);
                assert!(got.is_finite(), "({r}, {j}) not written");
                worst = worst.max((got - exact).abs() / (gamma * mag).max(f64::MIN_POSITIVE));
            }
        }
        worst
    }

    /// ~N(0, 1) values with full f32 mantissas (synth's draws are fp16 values, whose products
    /// with fp16 weights would be exact in f32 and hide FMA-vs-separate rounding).
    pub(super) fn full_mantissa_normal(len: usize, seed: u64) -> Vec<f32> {
        let (a, b) = (crate::synth::random_normal(len, seed), crate::synth::random_normal(len, seed + 1000));
        a.iter().zip(&b).map(|(a, b)| a + b * 1e-3).collect()
    }
}

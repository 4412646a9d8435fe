//! kernels/pointwise.cu: gated activations and rotary embeddings (exact libm math).

use half::f16;

use super::*;
use crate::backend::cuda::error::{bad, GpuResult};
use crate::backend::cuda::memory::{DevSlice, DeviceScalar};
use crate::backend::cuda::CudaDevice;

kernel_params! {
    struct GatedParams = 56 bytes {
        gate: u64,
        up: u64,
        out: u64,
        gate_rs: i64,
        up_rs: i64,
        rows: i32,
        cols: i32,
        act: i32,
        pad_: i32,
    }
}

kernel_params! {
    struct RopeParams = 56 bytes {
        x: u64,
        inv_freq: u64,
        start: u64,
        row_stride: i64,
        batch: i32,
        seq: i32,
        heads: i32,
        head_dim: i32,
        nfreq: i32,
        pad_: i32,
    }
}

kernel_params! {
    struct GatedAddParams = 56 bytes {
        x: u64,
        alpha: u64,
        mask: u64,
        out: u64,
        mask_stride: i64,
        rows: i32,
        cols: i32,
        nalpha: i32,
        mask_cols: i32,
    }
}

/// A column view of rows: row `r` starts at element `offset + r * row_stride` of `buf`.
#[derive(Clone, Copy, Debug)]
pub struct RowsView<'a, T: DeviceScalar = f16> {
    pub buf: &'a DevSlice<T>,
    pub offset: usize,
    pub row_stride: usize,
}

/// The sizes of a RoPE launch: rows `b * seq + i` (b < batch, i < seq), each holding `heads`
/// heads of `head_dim`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RopeDims {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub head_dim: usize,
}

impl<T: DeviceScalar> RowsView<'_, T> {
    /// Checks that `rows` rows of `width` elements fit; returns the device address of row 0 and
    /// the byte range the rows span.
    fn check(&self, kernel: &'static str, what: &str, rows: usize, width: usize) -> GpuResult<(u64, (u64, u64))> {
        if width > self.row_stride {
            return Err(bad(kernel, format!("{what}: width {width} exceeds the row stride {}", self.row_stride)));
        }
        let last = self.offset + (rows - 1) * self.row_stride + width;
        need(kernel, what, self.buf, last)?;
        let start = self.buf.ptr_at(self.offset);
        Ok((start, (start, self.buf.ptr_at(last))))
    }
}

impl CudaDevice {
    /// out[r, c] = half(half(act(gate[r, c])) * up[r, c]) for r < rows, c < cols; `out` is
    /// contiguous `[rows, cols]`, gate and up are column views.
    pub fn gated_act(
        &self,
        gate: RowsView<'_>,
        up: RowsView<'_>,
        act: Activation,
        out: &DevSlice<f16>,
        rows: usize,
        cols: usize,
    ) -> GpuResult<()> {
        const K: &str = "gated_act";
        if rows == 0 || cols == 0 {
            return Err(bad(K, "empty shape"));
        }
        let (gp, gr) = gate.check(K, "gate", rows, cols)?;
        let (up_ptr, ur) = up.check(K, "up", rows, cols)?;
        need(K, "out", out, rows * cols)?;
        written_apart(K, "out", out.range(), &[("gate", Some(gr)), ("up", Some(ur))])?;
        let p = GatedParams {
            gate: gp,
            up: up_ptr,
            out: out.ptr(),
            gate_rs: gate.row_stride as i64,
            up_rs: up.row_stride as i64,
            rows: to_i32(K, "rows", rows)?,
            cols: to_i32(K, "cols", cols)?,
            act: act_code(act),
            pad_: 0,
        };
        let cfg = elementwise_cfg(rows * cols, self.num_sms());
        // SAFETY: gate/up rows r < rows hold cols elements at their strides and out holds
        // rows*cols (checked); out is disjoint from gate and up; grid-stride loop.
        unsafe { self.launch("pointwise", "gated_act_f16", cfg, &[&p]) }
    }

    /// IDEFICS' gated residual in place: `out[r] = half(out[r] + half(half(tanh(alpha)) * x[r]))`
    /// for every row `r < rows`, or with a `(mask, mask_cols)` only for the rows whose mask row
    /// (an additive attention mask) holds a 0; `x` and `out` contiguous `[rows, cols]`, `alpha`
    /// 1 or `cols` values.
    pub fn gated_add(
        &self,
        x: &DevSlice<f16>,
        alpha: &DevSlice<f16>,
        mask: Option<(RowsView<'_>, usize)>,
        out: &DevSlice<f16>,
        rows: usize,
        cols: usize,
    ) -> GpuResult<()> {
        const K: &str = "gated_add";
        let mask_cols = mask.map_or(0, |(_, c)| c);
        if rows == 0 || cols == 0 || mask.is_some_and(|(_, c)| c == 0) || !(alpha.len() == 1 || alpha.len() == cols) {
            return Err(bad(K, format!("shape rows={rows} cols={cols} mask_cols={mask_cols} alpha={}", alpha.len())));
        }
        need(K, "x", x, rows * cols)?;
        need(K, "out", out, rows * cols)?;
        let (mask_ptr, mask_range, mask_stride) = match mask {
            Some((m, c)) => {
                let (ptr, range) = m.check(K, "mask", rows, c)?;
                (ptr, Some(range), m.row_stride)
            }
            None => (0, None, 0),
        };
        written_apart(K, "out", out.range(), &[("x", Some(x.range())), ("mask", mask_range)])?;
        let p = GatedAddParams {
            x: x.ptr(),
            alpha: alpha.ptr(),
            mask: mask_ptr,
            out: out.ptr(),
            mask_stride: mask_stride as i64,
            rows: to_i32(K, "rows", rows)?,
            cols: to_i32(K, "cols", cols)?,
            nalpha: to_i32(K, "alpha", alpha.len())?,
            mask_cols: to_i32(K, "mask_cols", mask_cols)?,
        };
        // One warp per row, 8 rows per block.
        let blocks = rows.div_ceil(8).clamp(1, self.num_sms() as usize * 32) as u32;
        // SAFETY: x/out hold rows*cols halves, mask (if any) rows r < rows hold mask_cols at its
        // stride, alpha 1 or cols (checked); out is disjoint from x and mask; 256 threads = 8
        // warps; grid-stride loop over rows.
        unsafe { self.launch("pointwise", "gated_add_f16", blocks_of((blocks, 1, 1), 256), &[&p]) }
    }

    /// HF rotate_half RoPE in place on `heads` heads of `head_dim` in rows `b * seq + i` of
    /// `x`, at position `max(start[b] + i, 0)` (`start` in device memory), with the rotated
    /// dims `2 * inv_freq.len() <= head_dim`.
    pub fn rope(
        &self,
        x: RowsView<'_>,
        inv_freq: &DevSlice<f32>,
        start: &DevSlice<i32>,
        dims: RopeDims,
    ) -> GpuResult<()> {
        const K: &str = "rope";
        let RopeDims { batch, seq, heads, head_dim } = dims;
        let nfreq = inv_freq.len();
        if batch == 0 || seq == 0 || heads == 0 || nfreq == 0 || 2 * nfreq > head_dim {
            return Err(bad(
                K,
                format!("shape batch={batch} seq={seq} heads={heads} head_dim={head_dim} with {nfreq} frequencies"),
            ));
        }
        let (xp, _) = x.check(K, "x", batch * seq, heads * head_dim)?;
        need(K, "start", start, batch)?;
        let p = RopeParams {
            x: xp,
            inv_freq: inv_freq.ptr(),
            start: start.ptr(),
            row_stride: x.row_stride as i64,
            batch: to_i32(K, "batch", batch)?,
            seq: to_i32(K, "seq", seq)?,
            heads: to_i32(K, "heads", heads)?,
            head_dim: to_i32(K, "head_dim", head_dim)?,
            nfreq: to_i32(K, "nfreq", nfreq)?,
            pad_: 0,
        };
        let cfg = elementwise_cfg(batch * seq * heads * nfreq, self.num_sms());
        // SAFETY: every row b*seq + i < batch*seq of x holds heads*head_dim elements at its
        // stride (checked); 2*nfreq <= head_dim so j + nfreq stays inside the head; inv_freq has
        // nfreq floats and start batch ints (different allocations from x: f32/i32 slices);
        // each thread updates its own pair in place; grid-stride loop.
        unsafe { self.launch("pointwise", "rope_f16", cfg, &[&p]) }
    }
}

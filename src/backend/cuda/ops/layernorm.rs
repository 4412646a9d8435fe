//! kernels/layernorm.cu: LayerNorm and RMSNorm with a fused residual add; L2 normalisation.

use half::f16;

use super::*;
use crate::backend::cuda::error::{bad, GpuResult};
use crate::backend::cuda::memory::{same, DevSlice};
use crate::backend::cuda::CudaDevice;

/// Where a norm writes the residual sum x + r (of x's element type).
#[derive(Clone, Copy, Debug)]
pub enum SumOut<'a, T: ActElem = f16> {
    None,
    /// Into a separate buffer.
    To(&'a DevSlice<T>),
    /// Back into x (in-place residual stream).
    InPlace,
}

/// What a norm reads, `s = x + residual`, and where it writes that sum (the pre-norm residual
/// stream); all of x's element type (fp16, or fp32 for a stream kept in fp32).
#[derive(Clone, Copy, Debug)]
pub struct NormInput<'a, T: ActElem = f16> {
    pub x: &'a DevSlice<T>,
    pub residual: Option<&'a DevSlice<T>>,
    pub sum_out: SumOut<'a, T>,
}

kernel_params! {
    struct NormParams = 64 bytes {
        x: u64,
        r: u64,
        w: u64,
        b: u64,
        y: u64,
        sum_out: u64,
        rows: i32,
        dim: i32,
        eps: f32,
        in_f32: i32,
    }
}

kernel_params! {
    struct L2Params = 32 bytes {
        x: u64,
        y: u64,
        rows: i32,
        dim: i32,
        out_f32: i32,
        pad: i32,
    }
}

impl CudaDevice {
    /// y = x / ||x||₂ per row of `dim` (fp32 sum of squares); x fp16, y fp16 or fp32.
    pub fn l2_normalize<O: ActElem>(
        &self,
        x: &DevSlice<f16>,
        y: &DevSlice<O>,
        rows: usize,
        dim: usize,
    ) -> GpuResult<()> {
        const KERNEL: &str = "l2norm_f16";
        if rows == 0 || dim == 0 {
            return Err(bad(KERNEL, "empty shape"));
        }
        need(KERNEL, "x", x, rows * dim)?;
        need(KERNEL, "y", y, rows * dim)?;
        if O::F32 && !y.is_aligned(4) {
            return Err(bad(KERNEL, "fp32 y must be 4-byte aligned"));
        }
        disjoint(KERNEL, "y", y, "x", x)?;
        let grid = to_i32(KERNEL, "rows", rows)? as u32;
        let threads = (dim.div_ceil(32) * 32).clamp(32, 256) as u32;
        let p = L2Params {
            x: x.ptr(),
            y: y.ptr(),
            rows: grid as i32,
            dim: to_i32(KERNEL, "dim", dim)?,
            out_f32: O::F32 as i32,
            pad: 0,
        };
        let cfg = blocks_of((grid, 1, 1), threads);
        // SAFETY: x and y hold >= rows*dim elements of their types (checked), y is disjoint from
        // x and 4-byte aligned when fp32; one block (multiple of 32 threads, <= 256) per row.
        unsafe { self.launch("layernorm", KERNEL, cfg, &[&p]) }
    }

    fn norm<I: ActElem>(
        &self,
        kernel: &'static str,
        input: NormInput<'_, I>,
        w: &DevSlice<f16>,
        b: Option<&DevSlice<f16>>,
        y: &DevSlice<f16>,
        shape: NormShape,
    ) -> GpuResult<()> {
        let (NormInput { x, residual, sum_out }, NormShape { rows, dim, eps }) = (input, shape);
        if rows == 0 || dim == 0 {
            return Err(bad(kernel, "empty shape"));
        }
        need(kernel, "x", x, rows * dim)?;
        need(kernel, "y", y, rows * dim)?;
        need(kernel, "weight", w, dim)?;
        if I::F32 && (!x.is_aligned(4) || residual.is_some_and(|r| !r.is_aligned(4))) {
            return Err(bad(kernel, "fp32 x and residual must be 4-byte aligned"));
        }
        disjoint(kernel, "y", y, "x", x)?;
        disjoint(kernel, "y", y, "weight", w)?;
        if let Some(b) = b {
            need(kernel, "bias", b, dim)?;
            disjoint(kernel, "y", y, "bias", b)?;
        }
        if let Some(r) = residual {
            need(kernel, "residual", r, rows * dim)?;
            disjoint(kernel, "y", y, "residual", r)?;
        }
        let sum_ptr = match sum_out {
            SumOut::None => 0,
            SumOut::InPlace => x.ptr(),
            SumOut::To(s) => {
                need(kernel, "sum_out", s, rows * dim)?;
                disjoint(kernel, "y", y, "sum_out", s)?;
                if overlaps(s, x) && !same(s, x) {
                    return Err(bad(kernel, "sum_out partially overlaps x"));
                }
                if let Some(r) = residual {
                    disjoint(kernel, "sum_out", s, "residual", r)?;
                }
                s.ptr()
            }
        };
        if matches!(sum_out, SumOut::InPlace) {
            if let Some(r) = residual {
                disjoint(kernel, "x (sum_out)", x, "residual", r)?;
            }
        }
        // Whatever receives the sum is written by one block while every other block reads the
        // weight and bias: those must not share a byte with it.
        let sum_dst = match sum_out {
            SumOut::None => None,
            SumOut::To(s) => Some(s),
            SumOut::InPlace => Some(x),
        };
        if let Some(s) = sum_dst {
            disjoint(kernel, "sum_out", s, "weight", w)?;
            if let Some(b) = b {
                disjoint(kernel, "sum_out", s, "bias", b)?;
            }
        }
        let grid = to_i32(kernel, "rows", rows)? as u32;
        let threads = (dim.div_ceil(32) * 32).clamp(32, if dim >= 2048 { 512 } else { 256 }) as u32;
        let p = NormParams {
            x: x.ptr(),
            r: residual.map_or(0, |r| r.ptr()),
            w: w.ptr(),
            b: b.map_or(0, |b| b.ptr()),
            y: y.ptr(),
            sum_out: sum_ptr,
            rows: grid as i32,
            dim: to_i32(kernel, "dim", dim)?,
            eps,
            in_f32: I::F32 as i32,
        };
        let cfg = blocks_of((grid, 1, 1), threads);
        // SAFETY: x, y (and residual, sum_out) hold >= rows*dim elements, weight/bias >= dim
        // (checked); y is disjoint from every input; sum_out is x itself or disjoint from x and
        // the residual; one block (multiple of 32 threads, <= 512) per row.
        unsafe { self.launch("layernorm", kernel, cfg, &[&p]) }
    }

    /// y = LayerNorm(x + residual) * w + b per row of `dim`; optionally writes x + residual.
    /// x, the residual and the sum are fp16, or fp32 for a stream kept in fp32; y is fp16.
    pub fn layernorm<I: ActElem>(
        &self,
        input: NormInput<'_, I>,
        w: &DevSlice<f16>,
        b: Option<&DevSlice<f16>>,
        y: &DevSlice<f16>,
        shape: NormShape,
    ) -> GpuResult<()> {
        self.norm("layernorm_f16", input, w, b, y, shape)
    }

    /// y = half(s * rsqrt(mean(s^2) + eps)) * w with s = x + residual (Llama RMSNorm).
    pub fn rmsnorm<I: ActElem>(
        &self,
        input: NormInput<'_, I>,
        w: &DevSlice<f16>,
        y: &DevSlice<f16>,
        shape: NormShape,
    ) -> GpuResult<()> {
        self.norm("rmsnorm_f16", input, w, None, y, shape)
    }
}

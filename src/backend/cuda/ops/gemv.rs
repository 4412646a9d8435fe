//! kernels/gemv.cu: weight-streaming matrix-vector products for decode (M = 1..=8).

use super::*;
use crate::backend::cuda::error::{bad, GpuResult};
use crate::backend::cuda::CudaDevice;

kernel_params! {
    struct GemvParams = 64 bytes {
        ptrs: LinearPtrs,
        n: i32,
        k: i32,
        act: i32,
        threads_per_row: i32,
        out_f32: i32,
        pad_: i32,
    }
}

/// GEMV threads-per-output-column heuristic (see kernels/gemv.cu).
pub fn gemv_threads_per_row(n: usize, k: usize, num_sms: u32) -> u32 {
    let chunks = k / 8;
    let mut t = chunks.div_ceil(8).next_power_of_two().clamp(32, 256);
    while t < 256 && n.div_ceil(256 / t) < 2 * num_sms as usize {
        t *= 2;
    }
    t as u32
}

impl CudaDevice {
    /// Decode GEMV (M = 1..=8): same math as [`gemm`](Self::gemm), weight-streaming kernel.
    /// Needs k % 8 == 0 and 16-byte aligned x, w ([`linear`](Self::linear) falls back to gemm).
    pub fn gemv<O: ActElem>(&self, args: LinearArgs<'_, O>) -> GpuResult<()> {
        const K: &str = "gemv";
        let LinearArgs { x, w, epilogue: Epilogue { act, .. }, dims: GemmDims { m, n, k }, .. } = args;
        if !(1..=8).contains(&m) || n == 0 || k == 0 {
            return Err(bad(K, format!("shape m={m} n={n} k={k}: needs 1 <= m <= 8, n, k >= 1")));
        }
        if k % 8 != 0 || !x.is_aligned(16) || !w.is_aligned(16) {
            return Err(bad(K, "needs k % 8 == 0 and 16-byte aligned x, w"));
        }
        let ptrs = check_linear_operands(K, &args)?;
        let t = gemv_threads_per_row(n, k, self.num_sms());
        let cols_per_block = (256 / t) as usize;
        let grid = to_i32(K, "grid", n.div_ceil(cols_per_block))? as u32;
        let p = GemvParams {
            ptrs,
            n: to_i32(K, "n", n)?,
            k: to_i32(K, "k", k)?,
            act: act_code(act),
            threads_per_row: t as i32,
            out_f32: O::F32 as i32,
            pad_: 0,
        };
        const NAMES: [&str; 8] =
            ["gemv_m1", "gemv_m2", "gemv_m3", "gemv_m4", "gemv_m5", "gemv_m6", "gemv_m7", "gemv_m8"];
        let name = NAMES[m - 1];
        let cfg = blocks_of((grid, 1, 1), 256);
        // SAFETY: 1 <= m <= 8 selects the matching instance; k % 8 == 0 and x/w 16-byte aligned
        // (checked) for the 16-byte loads; x >= m*k, w >= n*k, y >= m*n, bias >= n, residual >=
        // m*n (checked); residual is y or disjoint; threads_per_row is a power of two in
        // [32, 256] dividing the 256-thread block; grid covers all n columns.
        unsafe { self.launch("gemv", name, cfg, &[&p]) }
    }
}

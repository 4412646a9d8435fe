//! kernels/gemm.cu: tensor-core GEMM with fused epilogues; `linear` picks GEMV or GEMM.

use cudarc::driver::LaunchConfig;

use super::*;
use crate::backend::cuda::error::{bad, GpuResult};
use crate::backend::cuda::CudaDevice;

/// GEMM tile config (see kernels/gemm.cu).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmTile {
    /// 128x128, 256 threads, 64 KiB smem.
    Large,
    /// 64x64, 128 threads, 32 KiB smem.
    Small,
}

kernel_params! {
    struct GemmParams = 64 bytes {
        ptrs: LinearPtrs,
        m: i32,
        n: i32,
        k: i32,
        vec: i32,
        pair: i32,
        out_f32: i32,
    }
}

impl CudaDevice {
    /// Y[M,N] = act(X[M,K] · W[N,K]^T + bias) + residual on tensor cores (any M, N, K >= 1);
    /// Y and the residual are fp16, or fp32 for a stream kept in fp32.
    pub fn gemm<O: ActElem>(&self, args: LinearArgs<'_, O>) -> GpuResult<()> {
        let GemmDims { m, n, .. } = args.dims;
        let tile = if m.div_ceil(128) * n.div_ceil(128) >= self.num_sms() as usize {
            GemmTile::Large
        } else {
            GemmTile::Small
        };
        self.gemm_with_tile(args, tile)
    }

    /// [`gemm`](Self::gemm) with an explicit tile config (tests exercise both).
    pub fn gemm_with_tile<O: ActElem>(&self, args: LinearArgs<'_, O>, tile: GemmTile) -> GpuResult<()> {
        const K: &str = "gemm";
        let LinearArgs { x, w, epilogue: Epilogue { bias, act, .. }, y, dims: GemmDims { m, n, k } } = args;
        if m == 0 || n == 0 || k == 0 {
            return Err(bad(K, format!("empty shape m={m} n={n} k={k}")));
        }
        let ptrs = check_linear_operands(K, &args)?;
        let vec = k % 8 == 0 && x.is_aligned(16) && w.is_aligned(16);
        let pair = !O::F32
            && n % 2 == 0
            && y.is_aligned(4)
            && bias.is_none_or(|b| b.is_aligned(4))
            && (ptrs.residual % 4 == 0);
        let (bm, bn, threads, smem, cfg) = match tile {
            GemmTile::Large => (128, 128, 256, 65536u32, "l"),
            GemmTile::Small => (64, 64, 128, 32768u32, "s"),
        };
        let grid_y = grid_yz(K, "ceil(M/BM)", m.div_ceil(bm))?;
        let grid_x = to_i32(K, "ceil(N/BN)", n.div_ceil(bn))? as u32;
        let p = GemmParams {
            ptrs,
            m: to_i32(K, "m", m)?,
            n: to_i32(K, "n", n)?,
            k: to_i32(K, "k", k)?,
            vec: vec as i32,
            pair: pair as i32,
            out_f32: O::F32 as i32,
        };
        let name: &'static str = match (cfg, act) {
            ("l", Activation::None) => "gemm_l_none",
            ("l", Activation::Relu) => "gemm_l_relu",
            ("l", Activation::Gelu) => "gemm_l_gelu",
            ("l", Activation::QuickGelu) => "gemm_l_quick_gelu",
            ("l", Activation::Silu) => "gemm_l_silu",
            ("l", Activation::GeluTanh) => "gemm_l_gelu_tanh",
            (_, Activation::None) => "gemm_s_none",
            (_, Activation::Relu) => "gemm_s_relu",
            (_, Activation::Gelu) => "gemm_s_gelu",
            (_, Activation::QuickGelu) => "gemm_s_quick_gelu",
            (_, Activation::Silu) => "gemm_s_silu",
            (_, Activation::GeluTanh) => "gemm_s_gelu_tanh",
        };
        debug_assert!(name.ends_with(act_suffix(act)));
        if smem > 48 * 1024 {
            // Once per function: the first launch of each kernel is never inside a CUDA graph
            // recording (the executor runs a phase directly before it records it).
            self.once(name, || {
                self.func("gemm", name)?
                    .set_attribute(
                        cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        smem as i32,
                    )
                    .map_err(lerr(name))
            })?;
        }
        let cfg = LaunchConfig { grid_dim: (grid_x, grid_y, 1), block_dim: (threads, 1, 1), shared_mem_bytes: smem };
        // SAFETY: x >= m*k, w >= n*k, y >= m*n, bias >= n, residual >= m*n elements (checked; fp32
        // ones for out_f32, 4-byte aligned);
        // vec=1 only with k % 8 == 0 and 16-byte aligned x/w; pair=1 only with n even and
        // 4-byte aligned y/bias/residual; y is disjoint from x, w, bias and the residual either
        // is y or is disjoint; grid covers ceil(n/BN) x ceil(m/BM) tiles with the block size and
        // dynamic smem the kernel was compiled for (attribute raised above 48 KiB).
        unsafe { self.launch("gemm", name, cfg, &[&p]) }
    }

    /// Linear layer: GEMV for m <= 8 when its preconditions hold, else GEMM.
    pub fn linear<O: ActElem>(&self, args: LinearArgs<'_, O>) -> GpuResult<()> {
        let LinearArgs { x, w, dims, .. } = args;
        if dims.m <= 8 && dims.k % 8 == 0 && x.is_aligned(16) && w.is_aligned(16) {
            self.gemv(args)
        } else {
            self.gemm(args)
        }
    }
}

//! One typed launcher per kernel. Each launcher checks every precondition the kernel's SAFETY
//! comment (kernels/*.cu) lists - buffer lengths versus what the grid touches, alignment for
//! 16-byte loads, aliasing, grid limits - and returns `GpuError::Launch` instead of launching
//! when one fails. Parameter structs are `#[repr(C)]` mirrors of the CUDA ones (sizes are
//! asserted on both sides).

use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use half::f16;

use super::error::{bad, GpuResult};
use super::memory::{overlaps, same, DevSlice, DeviceScalar};
use super::CudaDevice;

/// Epilogue activation: the crate-wide enum (`crate::graph::Activation`, re-exported by
/// `crate::backend`); codes below match `ActCode` in kernels/common.cuh.
pub use crate::backend::Activation;

fn act_code(a: Activation) -> i32 {
    match a {
        Activation::None => 0,
        Activation::Relu => 1,
        Activation::Gelu => 2,
        Activation::QuickGelu => 3,
        Activation::Silu => 4,
    }
}

fn act_suffix(a: Activation) -> &'static str {
    match a {
        Activation::None => "none",
        Activation::Relu => "relu",
        Activation::Gelu => "gelu",
        Activation::QuickGelu => "quick_gelu",
        Activation::Silu => "silu",
    }
}

/// Residual added after the activation.
#[derive(Clone, Copy, Debug)]
pub enum Residual<'a> {
    None,
    /// y = act(...) + r, r disjoint from y.
    Add(&'a DevSlice<f16>),
    /// y = act(...) + y (in-place residual stream update).
    InPlace,
}

/// Where a norm writes the fp16 residual sum x + r.
#[derive(Clone, Copy, Debug)]
pub enum SumOut<'a> {
    None,
    /// Into a separate buffer.
    To(&'a DevSlice<f16>),
    /// Back into x (in-place residual stream).
    InPlace,
}

/// GEMM tile config (see kernels/gemm.cu).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmTile {
    /// 128x128, 256 threads, 64 KiB smem.
    Large,
    /// 64x64, 128 threads, 32 KiB smem.
    Small,
}

/// `[batch, rows, heads, head_dim]` view into a buffer: head `h` of row `i` of batch `b` starts
/// at element `offset + b*batch_stride + i*row_stride + h*head_dim`. A column slice of a fused
/// qkv buffer `[S, 3*H*d]` is `offset = part*H*d, row_stride = 3*H*d`.
#[derive(Clone, Copy, Debug)]
pub struct HeadsView<'a> {
    pub buf: &'a DevSlice<f16>,
    pub offset: usize,
    pub batch_stride: usize,
    pub row_stride: usize,
}

/// Attention masking options (combinable).
#[derive(Clone, Copy, Debug, Default)]
pub struct AttnMask<'a> {
    /// Causal with offset: query i attends keys j <= i + offset (prefill after a cache: offset =
    /// number of cached keys). Ignored by decode attention (the new token sees the whole cache).
    pub causal: Option<i32>,
    /// Per-batch number of valid keys (prefill only).
    pub kv_valid: Option<&'a DevSlice<i32>>,
    /// Additive fp32 per-key mask `[B, stride]` and its stride.
    pub additive: Option<(&'a DevSlice<f32>, usize)>,
}

// ---------------------------------------------------------------------------------------------
// Parameter structs (mirrors of kernels/*.cu).

#[repr(C)]
#[derive(Clone, Copy)]
struct GemmParams {
    x: u64,
    w: u64,
    bias: u64,
    residual: u64,
    y: u64,
    m: i32,
    n: i32,
    k: i32,
    vec: i32,
    pair: i32,
    pad_: i32,
}
const _: () = assert!(std::mem::size_of::<GemmParams>() == 64);
// SAFETY: plain #[repr(C)] data (u64 device addresses and i32), layout identical to the CUDA
// struct (size asserted here and with static_assert in gemm.cu).
unsafe impl DeviceRepr for GemmParams {}

#[repr(C)]
#[derive(Clone, Copy)]
struct GemvParams {
    x: u64,
    w: u64,
    bias: u64,
    residual: u64,
    y: u64,
    n: i32,
    k: i32,
    act: i32,
    threads_per_row: i32,
}
const _: () = assert!(std::mem::size_of::<GemvParams>() == 56);
// SAFETY: see GemmParams (mirrors gemv.cu GemvParams, size asserted on both sides).
unsafe impl DeviceRepr for GemvParams {}

#[repr(C)]
#[derive(Clone, Copy)]
struct NormParams {
    x: u64,
    r: u64,
    w: u64,
    b: u64,
    y: u64,
    sum_out: u64,
    rows: i32,
    dim: i32,
    eps: f32,
    pad_: i32,
}
const _: () = assert!(std::mem::size_of::<NormParams>() == 64);
// SAFETY: see GemmParams (mirrors layernorm.cu NormParams).
unsafe impl DeviceRepr for NormParams {}

#[repr(C)]
#[derive(Clone, Copy)]
struct AttnParams {
    q: u64,
    k: u64,
    v: u64,
    o: u64,
    mask: u64,
    kv_valid: u64,
    q_bs: i64,
    q_rs: i64,
    k_bs: i64,
    k_rs: i64,
    v_bs: i64,
    v_rs: i64,
    o_bs: i64,
    o_rs: i64,
    mask_stride: i64,
    heads: i32,
    sq: i32,
    skv: i32,
    d: i32,
    causal: i32,
    kv_offset: i32,
    scale: f32,
    pad_: i32,
}
const _: () = assert!(std::mem::size_of::<AttnParams>() == 152);
// SAFETY: see GemmParams (mirrors attention.cu AttnParams).
unsafe impl DeviceRepr for AttnParams {}

#[repr(C)]
#[derive(Clone, Copy)]
struct DecodeAttnParams {
    q: u64,
    k_cache: u64,
    v_cache: u64,
    kv_len: u64,
    mask: u64,
    partial: u64,
    o: u64,
    q_bs: i64,
    k_bs: i64,
    k_rs: i64,
    v_bs: i64,
    v_rs: i64,
    o_bs: i64,
    mask_stride: i64,
    heads: i32,
    d: i32,
    max_len: i32,
    chunk: i32,
    nsplit: i32,
    scale: f32,
}
const _: () = assert!(std::mem::size_of::<DecodeAttnParams>() == 136);
// SAFETY: see GemmParams (mirrors attention.cu DecodeAttnParams).
unsafe impl DeviceRepr for DecodeAttnParams {}

// ---------------------------------------------------------------------------------------------
// Helpers

fn need<T: DeviceScalar>(kernel: &'static str, what: &str, s: &DevSlice<T>, elems: usize) -> GpuResult<()> {
    if s.len() < elems {
        return Err(bad(kernel, format!("{what} has {} elements, needs {elems}", s.len())));
    }
    Ok(())
}

fn disjoint<A: DeviceScalar, B: DeviceScalar>(
    kernel: &'static str,
    a_name: &str,
    a: &DevSlice<A>,
    b_name: &str,
    b: &DevSlice<B>,
) -> GpuResult<()> {
    if overlaps(a, b) {
        return Err(bad(kernel, format!("{a_name} overlaps {b_name}")));
    }
    Ok(())
}

fn to_i32(kernel: &'static str, what: &str, v: usize) -> GpuResult<i32> {
    i32::try_from(v).map_err(|_| bad(kernel, format!("{what} = {v} exceeds i32")))
}

fn grid_yz(kernel: &'static str, what: &str, v: usize) -> GpuResult<u32> {
    if v == 0 || v > 65535 {
        return Err(bad(kernel, format!("{what} = {v} outside grid limit 1..=65535")));
    }
    Ok(v as u32)
}

fn elementwise_cfg(n: usize, num_sms: u32) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, num_sms as usize * 32) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

fn lerr(kernel: &'static str) -> impl Fn(cudarc::driver::DriverError) -> super::GpuError {
    move |e| bad(kernel, format!("launch failed: {e:?}"))
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

const DECODE_CHUNK: usize = 256;

fn padded_head_dim(kernel: &'static str, d: usize) -> GpuResult<usize> {
    if d == 0 || d % 8 != 0 || d > 128 {
        return Err(bad(kernel, format!("head_dim {d} unsupported (needs d % 8 == 0, d <= 128)")));
    }
    Ok(if d <= 64 { 64 } else if d <= 96 { 96 } else { 128 })
}

/// fp32 elements of workspace `decode_attention` needs for these shapes.
pub fn decode_workspace_len(batch: usize, heads: usize, head_dim: usize, max_len: usize) -> usize {
    let dp = if head_dim <= 64 { 64 } else if head_dim <= 96 { 96 } else { 128 };
    batch * heads * max_len.div_ceil(DECODE_CHUNK).max(1) * (dp + 2)
}

impl HeadsView<'_> {
    /// Checks that rows `0..rows` of batches `0..batch`, heads `0..heads` fit in the buffer and
    /// the 16-byte-load alignment rules hold. Returns the device address of element (0, 0, 0).
    fn check(&self, kernel: &'static str, what: &str, batch: usize, rows: usize, heads: usize, d: usize) -> GpuResult<u64> {
        let last = self.offset
            + (batch - 1) * self.batch_stride
            + (rows - 1) * self.row_stride
            + heads * d;
        need(kernel, what, self.buf, last)?;
        if self.batch_stride % 8 != 0 || self.row_stride % 8 != 0 {
            return Err(bad(kernel, format!("{what}: strides must be multiples of 8 elements")));
        }
        let ptr = self.buf.ptr_at(self.offset);
        if ptr % 16 != 0 {
            return Err(bad(kernel, format!("{what}: base pointer not 16-byte aligned")));
        }
        Ok(ptr)
    }
    fn byte_range(&self, batch: usize, rows: usize, heads: usize, d: usize) -> (u64, u64) {
        let start = self.buf.ptr_at(self.offset);
        let last = (batch - 1) * self.batch_stride + (rows - 1) * self.row_stride + heads * d;
        (start, start + 2 * last as u64)
    }
}

/// Shared checks of gemm and gemv: X [m,k], W [n,k], Y [m,n], bias [n], residual [m,n] hold
/// enough elements; Y is disjoint from X, W and the bias; the residual is Y itself or disjoint.
/// Returns the residual pointer (0 = none).
#[allow(clippy::too_many_arguments)]
fn check_linear_operands(
    kernel: &'static str,
    x: &DevSlice<f16>,
    w: &DevSlice<f16>,
    bias: Option<&DevSlice<f16>>,
    residual: Residual<'_>,
    y: &DevSlice<f16>,
    m: usize,
    n: usize,
    k: usize,
) -> GpuResult<u64> {
    need(kernel, "x", x, m * k)?;
    need(kernel, "w", w, n * k)?;
    need(kernel, "y", y, m * n)?;
    if let Some(b) = bias {
        need(kernel, "bias", b, n)?;
        disjoint(kernel, "y", y, "bias", b)?;
    }
    disjoint(kernel, "y", y, "x", x)?;
    disjoint(kernel, "y", y, "w", w)?;
    Ok(match residual {
        Residual::None => 0,
        Residual::InPlace => y.ptr(),
        Residual::Add(r) => {
            need(kernel, "residual", r, m * n)?;
            if overlaps(r, y) && r.ptr() != y.ptr() {
                return Err(bad(kernel, "residual partially overlaps y"));
            }
            r.ptr()
        }
    })
}

fn ranges_overlap(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

// ---------------------------------------------------------------------------------------------
// Launchers

impl CudaDevice {
    /// Y[M,N] = act(X[M,K] · W[N,K]^T + bias) + residual on tensor cores (any M, N, K >= 1).
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        x: &DevSlice<f16>,
        w: &DevSlice<f16>,
        bias: Option<&DevSlice<f16>>,
        act: Activation,
        residual: Residual<'_>,
        y: &DevSlice<f16>,
        m: usize,
        n: usize,
        k: usize,
    ) -> GpuResult<()> {
        let tile = if m.div_ceil(128) * n.div_ceil(128) >= self.num_sms() as usize { GemmTile::Large } else { GemmTile::Small };
        self.gemm_with_tile(x, w, bias, act, residual, y, m, n, k, tile)
    }

    /// [`gemm`](Self::gemm) with an explicit tile config (tests exercise both).
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_with_tile(
        &self,
        x: &DevSlice<f16>,
        w: &DevSlice<f16>,
        bias: Option<&DevSlice<f16>>,
        act: Activation,
        residual: Residual<'_>,
        y: &DevSlice<f16>,
        m: usize,
        n: usize,
        k: usize,
        tile: GemmTile,
    ) -> GpuResult<()> {
        const K: &str = "gemm";
        if m == 0 || n == 0 || k == 0 {
            return Err(bad(K, format!("empty shape m={m} n={n} k={k}")));
        }
        let res_ptr = check_linear_operands(K, x, w, bias, residual, y, m, n, k)?;
        let vec = k % 8 == 0 && x.is_aligned(16) && w.is_aligned(16);
        let pair = n % 2 == 0
            && y.is_aligned(4)
            && bias.is_none_or(|b| b.is_aligned(4))
            && (res_ptr % 4 == 0);
        let (bm, bn, threads, smem, cfg) = match tile {
            GemmTile::Large => (128, 128, 256, 65536u32, "l"),
            GemmTile::Small => (64, 64, 128, 32768u32, "s"),
        };
        let grid_y = grid_yz(K, "ceil(M/BM)", m.div_ceil(bm))?;
        let grid_x = to_i32(K, "ceil(N/BN)", n.div_ceil(bn))? as u32;
        let p = GemmParams {
            x: x.ptr(),
            w: w.ptr(),
            bias: bias.map_or(0, |b| b.ptr()),
            residual: res_ptr,
            y: y.ptr(),
            m: to_i32(K, "m", m)?,
            n: to_i32(K, "n", n)?,
            k: to_i32(K, "k", k)?,
            vec: vec as i32,
            pair: pair as i32,
            pad_: 0,
        };
        let name: &'static str = match (cfg, act) {
            ("l", Activation::None) => "gemm_l_none",
            ("l", Activation::Relu) => "gemm_l_relu",
            ("l", Activation::Gelu) => "gemm_l_gelu",
            ("l", Activation::QuickGelu) => "gemm_l_quick_gelu",
            ("l", Activation::Silu) => "gemm_l_silu",
            (_, Activation::None) => "gemm_s_none",
            (_, Activation::Relu) => "gemm_s_relu",
            (_, Activation::Gelu) => "gemm_s_gelu",
            (_, Activation::QuickGelu) => "gemm_s_quick_gelu",
            (_, Activation::Silu) => "gemm_s_silu",
        };
        debug_assert!(name.ends_with(act_suffix(act)));
        let f = self.func("gemm", name)?;
        if smem > 48 * 1024 {
            // Once per function: the first launch of each kernel is never inside a CUDA graph
            // recording (the executor runs a phase directly before it records it).
            self.once(name, || {
                f.set_attribute(
                    cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    smem as i32,
                )
                .map_err(lerr(name))
            })?;
        }
        let cfg = LaunchConfig { grid_dim: (grid_x, grid_y, 1), block_dim: (threads, 1, 1), shared_mem_bytes: smem };
        // SAFETY: x >= m*k, w >= n*k, y >= m*n, bias >= n, residual >= m*n elements (checked);
        // vec=1 only with k % 8 == 0 and 16-byte aligned x/w; pair=1 only with n even and
        // 4-byte aligned y/bias/residual; y is disjoint from x, w, bias and the residual either
        // is y or is disjoint; grid covers ceil(n/BN) x ceil(m/BM) tiles with the block size and
        // dynamic smem the kernel was compiled for (attribute raised above 48 KiB).
        unsafe { self.stream().launch_builder(&f).arg(&p).launch(cfg) }.map_err(lerr(name))?;
        Ok(())
    }

    /// Decode GEMV (M = 1..=8): same math as [`gemm`](Self::gemm), weight-streaming kernel.
    /// Needs k % 8 == 0 and 16-byte aligned x, w ([`linear`](Self::linear) falls back to gemm).
    #[allow(clippy::too_many_arguments)]
    pub fn gemv(
        &self,
        x: &DevSlice<f16>,
        w: &DevSlice<f16>,
        bias: Option<&DevSlice<f16>>,
        act: Activation,
        residual: Residual<'_>,
        y: &DevSlice<f16>,
        m: usize,
        n: usize,
        k: usize,
    ) -> GpuResult<()> {
        const K: &str = "gemv";
        if !(1..=8).contains(&m) || n == 0 || k == 0 {
            return Err(bad(K, format!("shape m={m} n={n} k={k}: needs 1 <= m <= 8, n, k >= 1")));
        }
        if k % 8 != 0 || !x.is_aligned(16) || !w.is_aligned(16) {
            return Err(bad(K, "needs k % 8 == 0 and 16-byte aligned x, w"));
        }
        let res_ptr = check_linear_operands(K, x, w, bias, residual, y, m, n, k)?;
        let t = gemv_threads_per_row(n, k, self.num_sms());
        let cols_per_block = (256 / t) as usize;
        let grid = to_i32(K, "grid", n.div_ceil(cols_per_block))? as u32;
        let p = GemvParams {
            x: x.ptr(),
            w: w.ptr(),
            bias: bias.map_or(0, |b| b.ptr()),
            residual: res_ptr,
            y: y.ptr(),
            n: to_i32(K, "n", n)?,
            k: to_i32(K, "k", k)?,
            act: act_code(act),
            threads_per_row: t as i32,
        };
        const NAMES: [&str; 8] = ["gemv_m1", "gemv_m2", "gemv_m3", "gemv_m4", "gemv_m5", "gemv_m6", "gemv_m7", "gemv_m8"];
        let name = NAMES[m - 1];
        let f = self.func("gemv", name)?;
        let cfg = LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: 1 <= m <= 8 selects the matching instance; k % 8 == 0 and x/w 16-byte aligned
        // (checked) for the 16-byte loads; x >= m*k, w >= n*k, y >= m*n, bias >= n, residual >=
        // m*n (checked); residual is y or disjoint; threads_per_row is a power of two in
        // [32, 256] dividing the 256-thread block; grid covers all n columns.
        unsafe { self.stream().launch_builder(&f).arg(&p).launch(cfg) }.map_err(lerr(name))?;
        Ok(())
    }

    /// Linear layer: GEMV for m <= 8 when its preconditions hold, else GEMM.
    #[allow(clippy::too_many_arguments)]
    pub fn linear(
        &self,
        x: &DevSlice<f16>,
        w: &DevSlice<f16>,
        bias: Option<&DevSlice<f16>>,
        act: Activation,
        residual: Residual<'_>,
        y: &DevSlice<f16>,
        m: usize,
        n: usize,
        k: usize,
    ) -> GpuResult<()> {
        if m <= 8 && k % 8 == 0 && x.is_aligned(16) && w.is_aligned(16) {
            self.gemv(x, w, bias, act, residual, y, m, n, k)
        } else {
            self.gemm(x, w, bias, act, residual, y, m, n, k)
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn norm(
        &self,
        kernel: &'static str,
        x: &DevSlice<f16>,
        residual: Option<&DevSlice<f16>>,
        sum_out: SumOut<'_>,
        w: &DevSlice<f16>,
        b: Option<&DevSlice<f16>>,
        y: &DevSlice<f16>,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> GpuResult<()> {
        if rows == 0 || dim == 0 {
            return Err(bad(kernel, "empty shape"));
        }
        need(kernel, "x", x, rows * dim)?;
        need(kernel, "y", y, rows * dim)?;
        need(kernel, "weight", w, dim)?;
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
            pad_: 0,
        };
        let f = self.func("layernorm", kernel)?;
        let cfg = LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: x, y (and residual, sum_out) hold >= rows*dim elements, weight/bias >= dim
        // (checked); y is disjoint from every input; sum_out is x itself or disjoint from x and
        // the residual; one block (multiple of 32 threads, <= 512) per row.
        unsafe { self.stream().launch_builder(&f).arg(&p).launch(cfg) }.map_err(lerr(kernel))?;
        Ok(())
    }

    /// y = LayerNorm(x + residual) * w + b per row of `dim`; optionally writes x + residual.
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm(
        &self,
        x: &DevSlice<f16>,
        residual: Option<&DevSlice<f16>>,
        sum_out: SumOut<'_>,
        w: &DevSlice<f16>,
        b: Option<&DevSlice<f16>>,
        y: &DevSlice<f16>,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> GpuResult<()> {
        self.norm("layernorm_f16", x, residual, sum_out, w, b, y, rows, dim, eps)
    }

    /// y = half(s * rsqrt(mean(s^2) + eps)) * w with s = x + residual (Llama RMSNorm).
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm(
        &self,
        x: &DevSlice<f16>,
        residual: Option<&DevSlice<f16>>,
        sum_out: SumOut<'_>,
        w: &DevSlice<f16>,
        y: &DevSlice<f16>,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> GpuResult<()> {
        self.norm("rmsnorm_f16", x, residual, sum_out, w, None, y, rows, dim, eps)
    }

    /// Flash-style attention, O[b,i,h,:] = softmax(scale * q·k + mask) · v. Head dims with
    /// d % 8 == 0 and d <= 128 (64, 80, 88, 128, ...).
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        q: HeadsView<'_>,
        k: HeadsView<'_>,
        v: HeadsView<'_>,
        o: HeadsView<'_>,
        batch: usize,
        heads: usize,
        sq: usize,
        skv: usize,
        head_dim: usize,
        scale: f32,
        mask: AttnMask<'_>,
    ) -> GpuResult<()> {
        const K: &str = "attention";
        if batch == 0 || heads == 0 || sq == 0 || skv == 0 {
            return Err(bad(K, "empty shape"));
        }
        let dp = padded_head_dim(K, head_dim)?;
        let qp = q.check(K, "q", batch, sq, heads, head_dim)?;
        let kp = k.check(K, "k", batch, skv, heads, head_dim)?;
        let vp = v.check(K, "v", batch, skv, heads, head_dim)?;
        let op = o.check(K, "o", batch, sq, heads, head_dim)?;
        let orange = o.byte_range(batch, sq, heads, head_dim);
        for (name, r) in [
            ("q", q.byte_range(batch, sq, heads, head_dim)),
            ("k", k.byte_range(batch, skv, heads, head_dim)),
            ("v", v.byte_range(batch, skv, heads, head_dim)),
        ] {
            if ranges_overlap(orange, r) {
                return Err(bad(K, format!("o overlaps {name}")));
            }
        }
        let (mask_ptr, mask_stride) = match mask.additive {
            Some((m, stride)) => {
                if stride < skv {
                    return Err(bad(K, format!("mask stride {stride} < skv {skv}")));
                }
                need(K, "mask", m, (batch - 1) * stride + skv)?;
                (m.ptr(), stride)
            }
            None => (0, 0),
        };
        let kv_valid = match mask.kv_valid {
            Some(kv) => {
                need(K, "kv_valid", kv, batch)?;
                kv.ptr()
            }
            None => 0,
        };
        // Blocks read the mask / kv_valid while other blocks write o.
        for (name, r) in [("mask", mask.additive.map(|(m, _)| m.range())), ("kv_valid", mask.kv_valid.map(|kv| kv.range()))] {
            if r.is_some_and(|r| ranges_overlap(orange, r)) {
                return Err(bad(K, format!("o overlaps {name}")));
            }
        }
        let p = AttnParams {
            q: qp,
            k: kp,
            v: vp,
            o: op,
            mask: mask_ptr,
            kv_valid,
            q_bs: q.batch_stride as i64,
            q_rs: q.row_stride as i64,
            k_bs: k.batch_stride as i64,
            k_rs: k.row_stride as i64,
            v_bs: v.batch_stride as i64,
            v_rs: v.row_stride as i64,
            o_bs: o.batch_stride as i64,
            o_rs: o.row_stride as i64,
            mask_stride: mask_stride as i64,
            heads: to_i32(K, "heads", heads)?,
            sq: to_i32(K, "sq", sq)?,
            skv: to_i32(K, "skv", skv)?,
            d: head_dim as i32,
            causal: mask.causal.is_some() as i32,
            kv_offset: mask.causal.unwrap_or(0),
            scale,
            pad_: 0,
        };
        let name = match dp {
            64 => "attn_fwd_d64",
            96 => "attn_fwd_d96",
            _ => "attn_fwd_d128",
        };
        let f = self.func("attention", name)?;
        let cfg = LaunchConfig {
            grid_dim: (to_i32(K, "q blocks", sq.div_ceil(16))? as u32, grid_yz(K, "heads", heads)?, grid_yz(K, "batch", batch)?),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: every (batch, row, head) row the grid reads or writes lies inside q/k/v/o
        // (HeadsView::check); d % 8 == 0, strides % 8 == 0 and base pointers 16-byte aligned for
        // the 16-byte loads; d <= padded dim of the chosen instance; o is disjoint from q, k, v;
        // mask holds (B-1)*stride + skv floats and kv_valid B ints (values clamped on device);
        // grid (ceil(sq/16), heads, batch) within limits, 128 threads as compiled.
        unsafe { self.stream().launch_builder(&f).arg(&p).launch(cfg) }.map_err(lerr(name))?;
        Ok(())
    }

    /// Split-KV decode attention for one new token per sequence against a KV cache
    /// `[B, max_len, H, d]` whose current lengths `kv_len[b]` live in device memory; the launch
    /// depends only on `max_len`, so it can be captured in a CUDA graph. `workspace` needs
    /// [`decode_workspace_len`] floats. Masks: only `additive` is used (stride >= max_len).
    #[allow(clippy::too_many_arguments)]
    pub fn decode_attention(
        &self,
        q: HeadsView<'_>,
        k_cache: HeadsView<'_>,
        v_cache: HeadsView<'_>,
        kv_len: &DevSlice<i32>,
        o: HeadsView<'_>,
        workspace: &DevSlice<f32>,
        batch: usize,
        heads: usize,
        max_len: usize,
        head_dim: usize,
        scale: f32,
        mask: AttnMask<'_>,
    ) -> GpuResult<()> {
        const K: &str = "decode_attention";
        if batch == 0 || heads == 0 || max_len == 0 {
            return Err(bad(K, "empty shape"));
        }
        let dp = padded_head_dim(K, head_dim)?;
        let qp = q.check(K, "q", batch, 1, heads, head_dim)?;
        let kp = k_cache.check(K, "k_cache", batch, max_len, heads, head_dim)?;
        let vp = v_cache.check(K, "v_cache", batch, max_len, heads, head_dim)?;
        let op = o.check(K, "o", batch, 1, heads, head_dim)?;
        need(K, "kv_len", kv_len, batch)?;
        let nsplit = max_len.div_ceil(DECODE_CHUNK);
        need(K, "workspace", workspace, decode_workspace_len(batch, heads, head_dim, max_len))?;
        let orange = o.byte_range(batch, 1, heads, head_dim);
        for (name, r) in [
            ("q", q.byte_range(batch, 1, heads, head_dim)),
            ("k_cache", k_cache.byte_range(batch, max_len, heads, head_dim)),
            ("v_cache", v_cache.byte_range(batch, max_len, heads, head_dim)),
            ("workspace", workspace.range()),
        ] {
            if ranges_overlap(orange, r) {
                return Err(bad(K, format!("o overlaps {name}")));
            }
        }
        for (name, r) in [
            ("q", q.byte_range(batch, 1, heads, head_dim)),
            ("k_cache", k_cache.byte_range(batch, max_len, heads, head_dim)),
            ("v_cache", v_cache.byte_range(batch, max_len, heads, head_dim)),
            ("kv_len", kv_len.range()),
        ] {
            if ranges_overlap(workspace.range(), r) {
                return Err(bad(K, format!("workspace overlaps {name}")));
            }
        }
        let (mask_ptr, mask_stride) = match mask.additive {
            Some((m, stride)) => {
                if stride < max_len {
                    return Err(bad(K, format!("mask stride {stride} < max_len {max_len}")));
                }
                need(K, "mask", m, (batch - 1) * stride + max_len)?;
                if ranges_overlap(orange, m.range()) || ranges_overlap(workspace.range(), m.range()) {
                    return Err(bad(K, "mask overlaps o or the workspace"));
                }
                (m.ptr(), stride)
            }
            None => (0, 0),
        };
        if ranges_overlap(orange, kv_len.range()) {
            return Err(bad(K, "o overlaps kv_len"));
        }
        let p = DecodeAttnParams {
            q: qp,
            k_cache: kp,
            v_cache: vp,
            kv_len: kv_len.ptr(),
            mask: mask_ptr,
            partial: workspace.ptr(),
            o: op,
            q_bs: q.batch_stride as i64,
            k_bs: k_cache.batch_stride as i64,
            k_rs: k_cache.row_stride as i64,
            v_bs: v_cache.batch_stride as i64,
            v_rs: v_cache.row_stride as i64,
            o_bs: o.batch_stride as i64,
            mask_stride: mask_stride as i64,
            heads: to_i32(K, "heads", heads)?,
            d: head_dim as i32,
            max_len: to_i32(K, "max_len", max_len)?,
            chunk: DECODE_CHUNK as i32,
            nsplit: nsplit as i32,
            scale,
        };
        let name = match dp {
            64 => "attn_decode_split_d64",
            96 => "attn_decode_split_d96",
            _ => "attn_decode_split_d128",
        };
        let f = self.func("attention", name)?;
        let fc = self.func("attention", "attn_decode_combine")?;
        let gh = grid_yz(K, "heads", heads)?;
        let gb = grid_yz(K, "batch", batch)?;
        let cfg = LaunchConfig { grid_dim: (nsplit as u32, gh, gb), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
        let cfg_c = LaunchConfig { grid_dim: (gh, gb, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
        let dp_i = dp as i32;
        // SAFETY: q/o rows for every (b, h) and cache rows 0..max_len lie inside their buffers
        // (HeadsView::check) with 16-byte alignment and d % 8 == 0; kv_len has B ints (clamped to
        // [0, max_len] on device); workspace holds B*H*nsplit*(dp+2) floats and is disjoint from
        // all inputs and o; o is disjoint from q, caches, workspace; nsplit*chunk >= max_len;
        // grids (nsplit, H, B) and (H, B) within limits; the combine reads the workspace the
        // split kernel wrote earlier on the same stream, with the same padded dim.
        unsafe {
            self.stream().launch_builder(&f).arg(&p).launch(cfg).map_err(lerr(name))?;
            self.stream().launch_builder(&fc).arg(&p).arg(&dp_i).launch(cfg_c).map_err(lerr("attn_decode_combine"))?;
        }
        Ok(())
    }

    /// Token embeddings: out[t] = table[ids[t]] for `tokens` ids (device memory).
    pub fn embed_rows(&self, ids: &DevSlice<i32>, table: &DevSlice<f16>, out: &DevSlice<f16>, tokens: usize, dim: usize) -> GpuResult<()> {
        const K: &str = "embed_rows";
        if tokens == 0 || dim == 0 || table.len() < dim {
            return Err(bad(K, "empty shape or table smaller than one row"));
        }
        need(K, "ids", ids, tokens)?;
        need(K, "out", out, tokens * dim)?;
        disjoint(K, "out", out, "table", table)?;
        disjoint(K, "out", out, "ids", ids)?;
        let vocab = to_i32(K, "vocab", table.len() / dim)?;
        let (t, d) = (to_i32(K, "tokens", tokens)?, to_i32(K, "dim", dim)?);
        let f = self.func("elementwise", K)?;
        let cfg = LaunchConfig { grid_dim: (t as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let (ip, tp, op) = (ids.ptr(), table.ptr(), out.ptr());
        // SAFETY: ids hold >= tokens ints and out >= tokens*dim halves (checked); vocab is the
        // table's row count, so the device-side id check keeps the gather inside the table; out
        // is disjoint from the inputs; one block per token.
        unsafe { self.stream().launch_builder(&f).arg(&ip).arg(&tp).arg(&op).arg(&t).arg(&d).arg(&vocab).launch(cfg) }
            .map_err(lerr(K))?;
        Ok(())
    }

    /// Learned positions in place: x[b, i] += table[pos[b] + i + offset] for i < seq, with the
    /// start positions `pos` [batch] in device memory.
    #[allow(clippy::too_many_arguments)]
    pub fn add_positions(
        &self,
        x: &DevSlice<f16>,
        table: &DevSlice<f16>,
        pos: &DevSlice<i32>,
        batch: usize,
        seq: usize,
        dim: usize,
        offset: i32,
    ) -> GpuResult<()> {
        const K: &str = "add_positions";
        if batch == 0 || seq == 0 || dim == 0 || table.len() < dim {
            return Err(bad(K, "empty shape or table smaller than one row"));
        }
        need(K, "x", x, batch * seq * dim)?;
        need(K, "pos", pos, batch)?;
        disjoint(K, "x", x, "table", table)?;
        disjoint(K, "x", x, "pos", pos)?;
        let npos = to_i32(K, "npos", table.len() / dim)?;
        let (s, d) = (to_i32(K, "seq", seq)?, to_i32(K, "dim", dim)?);
        let rows = to_i32(K, "rows", batch * seq)?;
        let f = self.func("elementwise", K)?;
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let (xp, tp, pp) = (x.ptr(), table.ptr(), pos.ptr());
        // SAFETY: x holds batch*seq*dim halves and pos batch ints (checked); npos is the table's
        // row count and the kernel skips positions outside it; x is disjoint from the table and
        // pos; one block per row of x.
        unsafe { self.stream().launch_builder(&f).arg(&xp).arg(&tp).arg(&pp).arg(&s).arg(&d).arg(&npos).arg(&offset).launch(cfg) }
            .map_err(lerr(K))?;
        Ok(())
    }

    /// Overwrites, per sequence, the rows whose id == image_token with consecutive rows of
    /// `image_embeds` [B, n_img, D] (in place on `embeds` [B, S, D]).
    #[allow(clippy::too_many_arguments)]
    pub fn image_scatter(
        &self,
        ids: &DevSlice<i32>,
        embeds: &DevSlice<f16>,
        image_embeds: &DevSlice<f16>,
        batch: usize,
        seq: usize,
        dim: usize,
        n_img: usize,
        image_token: i32,
    ) -> GpuResult<()> {
        const K: &str = "image_scatter";
        if batch == 0 || seq == 0 || dim == 0 {
            return Err(bad(K, "empty shape"));
        }
        need(K, "ids", ids, batch * seq)?;
        need(K, "embeds", embeds, batch * seq * dim)?;
        need(K, "image_embeds", image_embeds, batch * n_img * dim)?;
        disjoint(K, "embeds", embeds, "image_embeds", image_embeds)?;
        disjoint(K, "embeds", embeds, "ids", ids)?;
        let f = self.func("elementwise", "image_scatter")?;
        let cfg = LaunchConfig { grid_dim: (grid_yz(K, "batch", batch)?, 1, 1), block_dim: (32, 1, 1), shared_mem_bytes: 0 };
        let (s, d, n) = (to_i32(K, "seq", seq)?, to_i32(K, "dim", dim)?, to_i32(K, "n_img", n_img)?);
        let (ip, ep, mp) = (ids.ptr(), embeds.ptr(), image_embeds.ptr());
        // SAFETY: ids >= B*S, embeds >= B*S*D, image_embeds >= B*n_img*D (checked); the kernel
        // never uses an image row index >= n_img; embeds disjoint from the other inputs; one
        // warp per sequence.
        unsafe {
            self.stream().launch_builder(&f).arg(&ip).arg(&ep).arg(&mp).arg(&s).arg(&d).arg(&n).arg(&image_token).launch(cfg)
        }
        .map_err(lerr(K))?;
        Ok(())
    }

    /// im2col for a patch x patch, stride patch conv over pixels [B, C, H, W] (f32 or f16) into
    /// out [B * (H/patch) * (W/patch), C*patch*patch] fp16.
    #[allow(clippy::too_many_arguments)]
    pub fn patch_im2col<T: PixelType>(
        &self,
        pixels: &DevSlice<T>,
        out: &DevSlice<f16>,
        batch: usize,
        channels: usize,
        height: usize,
        width: usize,
        patch: usize,
    ) -> GpuResult<()> {
        const K: &str = "patch_im2col";
        if batch == 0 || channels == 0 || patch == 0 || height < patch || width < patch {
            return Err(bad(K, "empty shape or image smaller than one patch"));
        }
        let p = (height / patch) * (width / patch);
        need(K, "pixels", pixels, batch * channels * height * width)?;
        let total = batch * p * channels * patch * patch;
        need(K, "out", out, total)?;
        disjoint(K, "out", out, "pixels", pixels)?;
        let name = T::IM2COL;
        let f = self.func("elementwise", name)?;
        let cfg = elementwise_cfg(total, self.num_sms());
        let (b, c, h, w, pt) = (
            to_i32(K, "batch", batch)?,
            to_i32(K, "channels", channels)?,
            to_i32(K, "height", height)?,
            to_i32(K, "width", width)?,
            to_i32(K, "patch", patch)?,
        );
        let (ip, op) = (pixels.ptr(), out.ptr());
        // SAFETY: pixels hold B*C*H*W elements and out B*P*C*patch^2 (checked); the grid-stride
        // loop stops at that total; out and pixels are disjoint.
        unsafe {
            self.stream().launch_builder(&f).arg(&ip).arg(&op).arg(&b).arg(&c).arg(&h).arg(&w).arg(&pt).launch(cfg)
        }
        .map_err(lerr(name))?;
        Ok(())
    }

    /// ViT embeddings: out[b,0] = cls + pos[0]; out[b,1+p] = patches[b,p] + pos[1+p].
    #[allow(clippy::too_many_arguments)]
    pub fn vit_embed(
        &self,
        patches: &DevSlice<f16>,
        cls: &DevSlice<f16>,
        pos: &DevSlice<f16>,
        out: &DevSlice<f16>,
        batch: usize,
        num_patches: usize,
        dim: usize,
    ) -> GpuResult<()> {
        const K: &str = "vit_embed";
        if batch == 0 || dim == 0 {
            return Err(bad(K, "empty shape"));
        }
        need(K, "patches", patches, batch * num_patches * dim)?;
        need(K, "cls", cls, dim)?;
        need(K, "pos", pos, (num_patches + 1) * dim)?;
        let total = batch * (num_patches + 1) * dim;
        need(K, "out", out, total)?;
        disjoint(K, "out", out, "patches", patches)?;
        disjoint(K, "out", out, "cls", cls)?;
        disjoint(K, "out", out, "pos", pos)?;
        let f = self.func("elementwise", "vit_embed")?;
        let cfg = elementwise_cfg(total, self.num_sms());
        let (b, np, d) = (to_i32(K, "batch", batch)?, to_i32(K, "num_patches", num_patches)?, to_i32(K, "dim", dim)?);
        let (pp, cp, ep, op) = (patches.ptr(), cls.ptr(), pos.ptr(), out.ptr());
        // SAFETY: all lengths checked against B*(P+1)*D / B*P*D / (P+1)*D / D; out disjoint from
        // the inputs; grid-stride loop bounded by the total.
        unsafe {
            self.stream().launch_builder(&f).arg(&pp).arg(&cp).arg(&ep).arg(&op).arg(&b).arg(&np).arg(&d).launch(cfg)
        }
        .map_err(lerr(K))?;
        Ok(())
    }

    /// y = a + b (n elements); y may be exactly a or b.
    pub fn add(&self, a: &DevSlice<f16>, b: &DevSlice<f16>, y: &DevSlice<f16>, n: usize) -> GpuResult<()> {
        const K: &str = "add_f16";
        need(K, "a", a, n)?;
        need(K, "b", b, n)?;
        need(K, "y", y, n)?;
        let a_n = a.slice(0, n).unwrap();
        let b_n = b.slice(0, n).unwrap();
        let y_n = y.slice(0, n).unwrap();
        for (name, s) in [("a", &a_n), ("b", &b_n)] {
            if overlaps(&y_n, s) && !same(&y_n, s) {
                return Err(bad(K, format!("y partially overlaps {name}")));
            }
        }
        if n == 0 {
            return Ok(());
        }
        let f = self.func("elementwise", K)?;
        let cfg = elementwise_cfg(n, self.num_sms());
        let (ap, bp, yp, nn) = (a.ptr(), b.ptr(), y.ptr(), n as i64);
        // SAFETY: a, b, y hold >= n elements; y is exactly a/b or disjoint (same-thread
        // read-then-write); grid-stride loop bounded by n.
        unsafe { self.stream().launch_builder(&f).arg(&ap).arg(&bp).arg(&yp).arg(&nn).launch(cfg) }.map_err(lerr(K))?;
        Ok(())
    }

    /// f32 -> f16 (round to nearest even), n elements.
    pub fn cast_f32_f16(&self, x: &DevSlice<f32>, y: &DevSlice<f16>, n: usize) -> GpuResult<()> {
        self.cast("cast_f32_f16", x, y, n)
    }
    /// f16 -> f32, n elements.
    pub fn cast_f16_f32(&self, x: &DevSlice<f16>, y: &DevSlice<f32>, n: usize) -> GpuResult<()> {
        self.cast("cast_f16_f32", x, y, n)
    }
    fn cast<A: DeviceScalar, B: DeviceScalar>(&self, name: &'static str, x: &DevSlice<A>, y: &DevSlice<B>, n: usize) -> GpuResult<()> {
        need(name, "x", x, n)?;
        need(name, "y", y, n)?;
        disjoint(name, "y", y, "x", x)?;
        if n == 0 {
            return Ok(());
        }
        let f = self.func("elementwise", name)?;
        let cfg = elementwise_cfg(n, self.num_sms());
        let (xp, yp, nn) = (x.ptr(), y.ptr(), n as i64);
        // SAFETY: x and y hold >= n elements of the kernel's types, do not overlap; the
        // grid-stride loop is bounded by n.
        unsafe { self.stream().launch_builder(&f).arg(&xp).arg(&yp).arg(&nn).launch(cfg) }.map_err(lerr(name))?;
        Ok(())
    }

    /// Appends one token's k/v rows per sequence at position pos[b] (device memory) of caches
    /// `[B, max_len, row]`; `k_new`/`v_new` rows start at element b*new_row_stride.
    #[allow(clippy::too_many_arguments)]
    pub fn kv_append(
        &self,
        k_new: &DevSlice<f16>,
        v_new: &DevSlice<f16>,
        new_row_stride: usize,
        k_cache: &DevSlice<f16>,
        v_cache: &DevSlice<f16>,
        pos: &DevSlice<i32>,
        batch: usize,
        max_len: usize,
        row: usize,
    ) -> GpuResult<()> {
        const K: &str = "kv_append";
        if batch == 0 || max_len == 0 || row == 0 || new_row_stride < row {
            return Err(bad(K, "empty shape or new_row_stride < row"));
        }
        let new_len = (batch - 1) * new_row_stride + row;
        need(K, "k_new", k_new, new_len)?;
        need(K, "v_new", v_new, new_len)?;
        need(K, "k_cache", k_cache, batch * max_len * row)?;
        need(K, "v_cache", v_cache, batch * max_len * row)?;
        need(K, "pos", pos, batch)?;
        for (cn, c) in [("k_cache", k_cache), ("v_cache", v_cache)] {
            disjoint(K, cn, c, "k_new", k_new)?;
            disjoint(K, cn, c, "v_new", v_new)?;
            disjoint(K, cn, c, "pos", pos)?;
        }
        disjoint(K, "k_cache", k_cache, "v_cache", v_cache)?;
        let f = self.func("elementwise", K)?;
        let cfg = LaunchConfig { grid_dim: (grid_yz(K, "batch", batch)?, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let (kn, vn, rs, kc, vc, pp) = (k_new.ptr(), v_new.ptr(), new_row_stride as i64, k_cache.ptr(), v_cache.ptr(), pos.ptr());
        let (ml, r) = (to_i32(K, "max_len", max_len)?, to_i32(K, "row", row)?);
        // SAFETY: new rows (B-1)*stride + row and caches B*max_len*row elements fit (checked);
        // positions are range-checked on device (out-of-range sequences skipped); caches are
        // disjoint from the sources and each other; one block per sequence.
        unsafe {
            self.stream().launch_builder(&f).arg(&kn).arg(&vn).arg(&rs).arg(&kc).arg(&vc).arg(&pp).arg(&ml).arg(&r).launch(cfg)
        }
        .map_err(lerr(K))?;
        Ok(())
    }

    /// x[i] += delta for the first n ints (advance positions / KV lengths on device).
    pub fn add_i32(&self, x: &DevSlice<i32>, delta: i32, n: usize) -> GpuResult<()> {
        const K: &str = "add_i32";
        need(K, "x", x, n)?;
        if n == 0 {
            return Ok(());
        }
        let f = self.func("elementwise", K)?;
        let nn = to_i32(K, "n", n)?;
        let cfg = LaunchConfig { grid_dim: ((n as u32).div_ceil(256), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let xp = x.ptr();
        // SAFETY: x holds >= n ints; threads with i >= n do nothing.
        unsafe { self.stream().launch_builder(&f).arg(&xp).arg(&delta).arg(&nn).launch(cfg) }.map_err(lerr(K))?;
        Ok(())
    }

    /// Greedy pick per row of logits [rows, vocab]: idx[r] = argmax (ties -> lowest index),
    /// logprob[r] = log_softmax(logits[r])[idx[r]] in fp32.
    pub fn argmax<T: LogitType>(
        &self,
        logits: &DevSlice<T>,
        idx: &DevSlice<i32>,
        logprob: &DevSlice<f32>,
        rows: usize,
        vocab: usize,
    ) -> GpuResult<()> {
        const K: &str = "argmax";
        if rows == 0 || vocab == 0 {
            return Err(bad(K, "empty shape"));
        }
        need(K, "logits", logits, rows * vocab)?;
        need(K, "idx", idx, rows)?;
        need(K, "logprob", logprob, rows)?;
        disjoint(K, "idx", idx, "logits", logits)?;
        disjoint(K, "logprob", logprob, "logits", logits)?;
        disjoint(K, "idx", idx, "logprob", logprob)?;
        let v = to_i32(K, "vocab", vocab)?;
        let f = self.func("sampling", T::ARGMAX)?;
        let cfg = LaunchConfig { grid_dim: (to_i32(K, "rows", rows)? as u32, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
        let (lp, ip, pp) = (logits.ptr(), idx.ptr(), logprob.ptr());
        // SAFETY: logits hold rows*vocab elements of the instance's type, idx/logprob >= rows;
        // outputs disjoint from logits and each other; one 1024-thread block per row.
        unsafe { self.stream().launch_builder(&f).arg(&lp).arg(&v).arg(&ip).arg(&pp).launch(cfg) }.map_err(lerr(T::ARGMAX))?;
        Ok(())
    }
}

/// Pixel storage accepted by [`CudaDevice::patch_im2col`].
pub trait PixelType: DeviceScalar {
    const IM2COL: &'static str;
}
impl PixelType for f32 {
    const IM2COL: &'static str = "patch_im2col_f32";
}
impl PixelType for f16 {
    const IM2COL: &'static str = "patch_im2col_f16";
}

/// Logit storage accepted by [`CudaDevice::argmax`].
pub trait LogitType: DeviceScalar {
    const ARGMAX: &'static str;
}
impl LogitType for f32 {
    const ARGMAX: &'static str = "argmax_f32";
}
impl LogitType for f16 {
    const ARGMAX: &'static str = "argmax_f16";
}

//! One typed launcher per kernel, one file per kernel family mirroring kernels/*.cu (gemm,
//! gemv, layernorm, attention, elementwise, sampling, reorder, ptx_probe), each with its `#[repr(C)]` parameter
//! struct beside it (sizes asserted on both sides). Each launcher checks every precondition the
//! kernel's SAFETY comment lists - buffer lengths versus what the grid touches, alignment for
//! 16-byte loads, aliasing, grid limits - and returns `GpuError::Launch` instead of launching
//! when one fails. This file holds the checks the families share.

mod attention;
mod elementwise;
mod gemm;
mod gemv;
mod layernorm;
mod pointwise;
mod ptx_probe;
mod reorder;
mod sampling;

pub use attention::{decode_workspace_len, AttnDims, AttnMask, AttnViews, HeadsView};
pub use elementwise::{ImageDims, KvRows, PixelType, SeqDims};
pub use gemm::GemmTile;
pub use gemv::gemv_threads_per_row;
pub use layernorm::{NormInput, SumOut};
pub use pointwise::{RopeDims, RowsView};
pub use ptx_probe::PtxProbeOut;
pub use reorder::SeqIndices;
pub use sampling::LogitType;

use cudarc::driver::{DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg};
use half::f16;

use super::error::{bad, GpuResult};
use super::memory::{overlaps, DevSlice, DeviceScalar};
use super::CudaDevice;

/// Declares a kernel's parameter struct: `#[repr(C)]` with the fields of the CUDA struct of the
/// same name, its size asserted (the .cu side asserts it too with `static_assert`), passed to
/// the kernel by value.
macro_rules! kernel_params {
    ($(#[$doc:meta])* struct $name:ident = $size:literal bytes { $($field:ident: $ty:ty),+ $(,)? }) => {
        $(#[$doc])*
        #[repr(C)]
        #[derive(Clone, Copy)]
        struct $name {
            $($field: $ty),+
        }
        const _: () = assert!(std::mem::size_of::<$name>() == $size);
        // SAFETY: plain #[repr(C)] data (u64 device addresses, i64/i32/f32 sizes and flags)
        // laid out as the CUDA struct, whose size the .cu file asserts to be the same.
        unsafe impl cudarc::driver::DeviceRepr for $name {}
    };
}
pub(crate) use kernel_params;

/// Epilogue activation: the crate-wide enum (`crate::graph::Activation`, re-exported by
/// `crate::backend`); codes below match `ActCode` in kernels/common.cuh.
pub use crate::backend::Activation;
/// Sizes shared with the CPU ops (`crate::backend`), re-exported beside the launchers.
pub use crate::backend::{GemmDims, NormShape};

fn act_code(a: Activation) -> i32 {
    match a {
        Activation::None => 0,
        Activation::Relu => 1,
        Activation::Gelu => 2,
        Activation::QuickGelu => 3,
        Activation::Silu => 4,
        Activation::GeluTanh => 5,
    }
}

fn act_suffix(a: Activation) -> &'static str {
    match a {
        Activation::None => "none",
        Activation::Relu => "relu",
        Activation::Gelu => "gelu",
        Activation::QuickGelu => "quick_gelu",
        Activation::Silu => "silu",
        Activation::GeluTanh => "gelu_tanh",
    }
}

/// The element type of an activation buffer: fp16, or fp32 for a buffer the graph keeps in
/// fp32 (`graph::DType::F32`, e.g. a residual stream). Kernels that accept both take a flag.
pub trait ActElem: DeviceScalar {
    /// The kernels' `*_f32` flag.
    const F32: bool;
}
impl ActElem for f16 {
    const F32: bool = false;
}
impl ActElem for f32 {
    const F32: bool = true;
}

/// Residual added after the activation, of the output's element type.
#[derive(Clone, Copy, Debug)]
pub enum Residual<'a, T: ActElem = f16> {
    None,
    /// y = act(...) + r, r disjoint from y.
    Add(&'a DevSlice<T>),
    /// y = act(...) + y (in-place residual stream update).
    InPlace,
}

/// What gemm and gemv fuse after the product: `y = act(x · wᵀ + bias) + residual`.
/// `Epilogue::default()` is the bare product (no bias, no activation, no residual).
#[derive(Clone, Copy, Debug)]
pub struct Epilogue<'a, O: ActElem = f16> {
    /// `[n]`, added before the activation.
    pub bias: Option<&'a DevSlice<f16>>,
    pub act: Activation,
    pub residual: Residual<'a, O>,
}

impl<O: ActElem> Default for Epilogue<'_, O> {
    fn default() -> Self {
        Self { bias: None, act: Activation::None, residual: Residual::None }
    }
}

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
    blocks_of((blocks, 1, 1), 256)
}

/// `grid` blocks of `threads` threads each, no dynamic shared memory.
fn blocks_of(grid: (u32, u32, u32), threads: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: grid, block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}

fn lerr(kernel: &'static str) -> impl Fn(cudarc::driver::DriverError) -> super::GpuError {
    move |e| bad(kernel, format!("launch failed: {e:?}"))
}

/// One kernel argument, passed by value: a parameter struct, a device address or a size.
trait KernelArg {
    fn push<'a>(&'a self, args: &mut LaunchArgs<'a>);
}
impl<T: DeviceRepr> KernelArg for T {
    fn push<'a>(&'a self, args: &mut LaunchArgs<'a>) {
        args.arg(self);
    }
}

impl CudaDevice {
    /// Enqueues kernel `name` of module `module` (kernels/<module>.cu) with `cfg` and `args`, in
    /// the kernel's parameter order, on this handle's stream.
    ///
    /// # Safety
    /// Every precondition of the kernel holds for `cfg` and `args`: each launcher checks them
    /// and states them in the SAFETY comment at its call.
    unsafe fn launch(
        &self,
        module: &'static str,
        name: &'static str,
        cfg: LaunchConfig,
        args: &[&dyn KernelArg],
    ) -> GpuResult<()> {
        let f = self.func(module, name)?;
        let mut builder = self.stream().launch_builder(&f);
        for arg in args {
            arg.push(&mut builder);
        }
        // SAFETY: the caller's contract above.
        unsafe { builder.launch(cfg) }.map(drop).map_err(lerr(name))
    }
}

/// Shared checks of gemm and gemv: X [m,k], W [n,k], Y [m,n], bias [n], residual [m,n] hold
/// enough elements; Y is disjoint from X, W and the bias; the residual is Y itself or disjoint.
/// Returns the residual pointer (0 = none).
/// The operands of `y[M,N] = act(x[M,K] · w[N,K]ᵀ + bias) + residual`: what
/// [`gemm`](CudaDevice::gemm), [`gemv`](CudaDevice::gemv) and [`linear`](CudaDevice::linear) take.
#[derive(Clone, Copy, Debug)]
pub struct LinearArgs<'a, O: ActElem = f16> {
    pub x: &'a DevSlice<f16>,
    /// `[N, K]`, PyTorch's Linear layout.
    pub w: &'a DevSlice<f16>,
    pub epilogue: Epilogue<'a, O>,
    pub y: &'a DevSlice<O>,
    pub dims: GemmDims,
}

/// Checks the operands' sizes, overlaps and alignment; returns their device addresses.
fn check_linear_operands<O: ActElem>(kernel: &'static str, a: &LinearArgs<'_, O>) -> GpuResult<LinearPtrs> {
    let LinearArgs { x, w, epilogue, y, dims } = *a;
    let (GemmDims { m, n, k }, bias) = (dims, epilogue.bias);
    need(kernel, "x", x, m * k)?;
    need(kernel, "w", w, n * k)?;
    need(kernel, "y", y, m * n)?;
    if let Some(b) = bias {
        need(kernel, "bias", b, n)?;
        disjoint(kernel, "y", y, "bias", b)?;
    }
    disjoint(kernel, "y", y, "x", x)?;
    disjoint(kernel, "y", y, "w", w)?;
    if O::F32 && !y.is_aligned(4) {
        return Err(bad(kernel, "an fp32 y must be 4-byte aligned"));
    }
    let residual = match epilogue.residual {
        Residual::None => 0,
        Residual::InPlace => y.ptr(),
        Residual::Add(r) => {
            need(kernel, "residual", r, m * n)?;
            if overlaps(r, y) && r.ptr() != y.ptr() {
                return Err(bad(kernel, "residual partially overlaps y"));
            }
            if O::F32 && !r.is_aligned(4) {
                return Err(bad(kernel, "an fp32 residual must be 4-byte aligned"));
            }
            r.ptr()
        }
    };
    Ok(LinearPtrs { x: x.ptr(), w: w.ptr(), bias: bias.map_or(0, |b| b.ptr()), residual, y: y.ptr() })
}

/// The device addresses a linear kernel (gemm, gemv) takes first in its parameters, in the
/// CUDA structs' order: x, w, bias (0: none), residual (0: none; y: in place), y.
#[repr(C)]
#[derive(Clone, Copy)]
struct LinearPtrs {
    x: u64,
    w: u64,
    bias: u64,
    residual: u64,
    y: u64,
}

fn ranges_overlap(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

/// Checks that the byte range a kernel writes, `written` (named `what`), shares no byte with any
/// of the ranges it reads (None: an operand not given).
fn written_apart(
    kernel: &'static str,
    what: &str,
    written: (u64, u64),
    reads: &[(&str, Option<(u64, u64)>)],
) -> GpuResult<()> {
    match reads.iter().find(|(_, r)| r.is_some_and(|r| ranges_overlap(written, r))) {
        Some((name, _)) => Err(bad(kernel, format!("{what} overlaps {name}"))),
        None => Ok(()),
    }
}

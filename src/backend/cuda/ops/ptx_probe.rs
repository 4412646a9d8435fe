//! kernels/ptx_probe.cu: one warp through the inline-PTX wrappers (cp.async, ldmatrix, mma.sync)
//! on fixed inputs, so a test holds a real card and the simulated device to the PTX ISA's answers.

use half::f16;

use super::*;
use crate::backend::cuda::error::{bad, GpuResult};
use crate::backend::cuda::memory::DevSlice;
use crate::backend::cuda::CudaDevice;

/// The probe's outputs (see kernels/ptx_probe.cu for the layouts).
pub struct PtxProbeOut<'a> {
    /// [16][8] fp32: A·B + C from mma.sync.m16n8k16.
    pub d: &'a DevSlice<f32>,
    /// [32][6] u32 bits: per lane, ldmatrix's four A registers and the two B registers.
    pub frag: &'a DevSlice<i32>,
    /// [32][8] fp16: lane l's cp.async of 16 bytes with src-size min(l % 18, 16).
    pub copied: &'a DevSlice<f16>,
}

impl CudaDevice {
    /// Runs the probe: `a` [16][16] fp16, `b` [8][16] fp16 (B transposed), `c` [16][8] fp32,
    /// `src` 256 fp16 for the copies.
    pub fn ptx_probe(
        &self,
        a: &DevSlice<f16>,
        b: &DevSlice<f16>,
        c: &DevSlice<f32>,
        src: &DevSlice<f16>,
        out: PtxProbeOut<'_>,
    ) -> GpuResult<()> {
        const K: &str = "ptx_probe";
        need(K, "a", a, 256)?;
        need(K, "b", b, 128)?;
        need(K, "c", c, 128)?;
        need(K, "src", src, 256)?;
        need(K, "d", out.d, 128)?;
        need(K, "frag", out.frag, 32 * 6)?;
        need(K, "copied", out.copied, 256)?;
        if ![a.ptr(), b.ptr(), src.ptr(), out.copied.ptr()].iter().all(|p| p % 16 == 0) {
            return Err(bad(K, "a, b, src and copied must be 16-byte aligned"));
        }
        disjoint(K, "d", out.d, "c", c)?;
        let cfg = blocks_of((1, 1, 1), 32);
        let (ap, bp, cp, dp, fp, op, sp) =
            (a.ptr(), b.ptr(), c.ptr(), out.d.ptr(), out.frag.ptr(), out.copied.ptr(), src.ptr());
        // SAFETY: every buffer holds what the kernel touches (checked above), a/b/src/copied are
        // 16-byte aligned for the 16-byte copies, the outputs do not overlap the inputs they follow.
        unsafe { self.launch("ptx_probe", K, cfg, &[&ap, &bp, &cp, &dp, &fp, &op, &sp]) }
    }
}

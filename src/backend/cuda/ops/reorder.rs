//! kernels/reorder.cu: beam search's KV-cache reorder as a gather of whole sequences.

use half::f16;

use super::*;
use crate::backend::cuda::error::{bad, GpuResult};
use crate::backend::cuda::memory::DevSlice;
use crate::backend::cuda::CudaDevice;

/// A list of sequence indices twice: in device memory for the kernel, and the host values it
/// was written from, which the launcher checks (the kernel cannot).
#[derive(Clone, Copy, Debug)]
pub struct SeqIndices<'a> {
    pub dev: &'a DevSlice<i32>,
    pub host: &'a [usize],
}

impl CudaDevice {
    /// For i < count: sequence `to[i]` of `dst` = sequence `from[i]` of `src`, sequences being
    /// `len` fp16 slots (the host copies are checked here: in range, no duplicate destination).
    pub fn gather_sequences(
        &self,
        src: &DevSlice<f16>,
        dst: &DevSlice<f16>,
        len: usize,
        from: SeqIndices<'_>,
        to: SeqIndices<'_>,
    ) -> GpuResult<()> {
        const K: &str = "gather_seqs";
        let (SeqIndices { dev: src_seq, host: src_host }, SeqIndices { dev: dst_seq, host: dst_host }) = (from, to);
        let count = src_host.len();
        if count != dst_host.len() {
            return Err(bad(K, format!("{count} sources for {} destinations", dst_host.len())));
        }
        if count == 0 || len == 0 {
            return Ok(());
        }
        need(K, "src_seq", src_seq, count)?;
        need(K, "dst_seq", dst_seq, count)?;
        let fits = |s: &DevSlice<f16>, seqs: &[usize]| {
            seqs.iter().all(|&q| (q + 1).checked_mul(len).is_some_and(|e| e <= s.len()))
        };
        if !fits(src, src_host) || !fits(dst, dst_host) {
            return Err(bad(K, format!("a sequence index of {src_host:?} -> {dst_host:?} is outside the buffers ({} / {} slots of {len} per sequence)", src.len(), dst.len())));
        }
        let mut seen = dst_host.to_vec();
        seen.sort_unstable();
        if seen.windows(2).any(|w| w[0] == w[1]) {
            return Err(bad(K, format!("destination sequences {dst_host:?} repeat")));
        }
        disjoint(K, "src", src, "dst", dst)?;
        let c = to_i32(K, "count", count)?;
        // 16-byte moves when every sequence starts 16-byte aligned.
        let wide = len % 8 == 0 && src.is_aligned(16) && dst.is_aligned(16);
        let (name, units) = if wide { ("gather_seqs_u128", len / 8) } else { ("gather_seqs_u16", len) };
        let l = i64::try_from(units).map_err(|_| bad(K, format!("len {len} exceeds i64")))?;
        let cfg = elementwise_cfg(count * units, self.num_sms());
        let (sp, dp, ss, ds) = (src.ptr(), dst.ptr(), src_seq.ptr(), dst_seq.ptr());
        // SAFETY: src_seq/dst_seq hold `count` indices, each within its buffer's sequences (checked
        // above on the host copies the device ones were written from); src and dst are disjoint;
        // no destination repeats; the kernel's grid-stride loop covers count*units elements.
        unsafe { self.launch("reorder", name, cfg, &[&sp, &dp, &ss, &ds, &c, &l]) }
    }
}

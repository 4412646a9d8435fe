//! kernels/sampling.cu: greedy argmax with the chosen token's log-prob, and beam search's top-k
//! log-probs per row.

use cudarc::driver::LaunchConfig;
use half::f16;

use super::*;
use crate::backend::cuda::error::{bad, GpuResult};
use crate::backend::cuda::memory::{DevSlice, DeviceScalar};
use crate::backend::cuda::CudaDevice;

/// Logit storage accepted by [`CudaDevice::argmax`].
pub trait LogitType: DeviceScalar {
    const ARGMAX: &'static str;
    const TOPK: &'static str;
}
impl LogitType for f32 {
    const ARGMAX: &'static str = "argmax_f32";
    const TOPK: &'static str = "topk_f32";
}
impl LogitType for f16 {
    const ARGMAX: &'static str = "argmax_f16";
    const TOPK: &'static str = "topk_f16";
}

/// The checks argmax and top-k share: `logits` `[rows, vocab]`, `k` picks per row in `idx` and
/// `logprob` (both disjoint from the logits and each other), `1 <= k <= vocab`. Returns the
/// launch (one 1024-thread block per row), the vocabulary as i32 and the three addresses.
fn check_picks<T: LogitType>(
    kernel: &'static str,
    logits: &DevSlice<T>,
    idx: &DevSlice<i32>,
    logprob: &DevSlice<f32>,
    rows: usize,
    vocab: usize,
    k: usize,
) -> GpuResult<(LaunchConfig, i32, [u64; 3])> {
    if rows == 0 || vocab == 0 {
        return Err(bad(kernel, "empty shape"));
    }
    if k == 0 || k > vocab {
        return Err(bad(kernel, format!("k = {k} must be in 1..={vocab} (the vocabulary)")));
    }
    need(kernel, "logits", logits, rows * vocab)?;
    need(kernel, "idx", idx, rows * k)?;
    need(kernel, "logprob", logprob, rows * k)?;
    disjoint(kernel, "idx", idx, "logits", logits)?;
    disjoint(kernel, "logprob", logprob, "logits", logits)?;
    disjoint(kernel, "idx", idx, "logprob", logprob)?;
    let v = to_i32(kernel, "vocab", vocab)?;
    let cfg = blocks_of((to_i32(kernel, "rows", rows)? as u32, 1, 1), 1024);
    Ok((cfg, v, [logits.ptr(), idx.ptr(), logprob.ptr()]))
}

impl CudaDevice {
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
        let (cfg, v, [lp, ip, pp]) = check_picks("argmax", logits, idx, logprob, rows, vocab, 1)?;
        // SAFETY: logits hold rows*vocab elements of the instance's type, idx/logprob >= rows;
        // outputs disjoint from logits and each other; one 1024-thread block per row.
        unsafe { self.launch("sampling", T::ARGMAX, cfg, &[&lp, &v, &ip, &pp]) }
    }

    /// The `k` best entries of each row of logits [rows, vocab] in torch.topk order (value
    /// descending, ties -> lowest index, NaN first) with their log_softmax values:
    /// idx[r*k + t], logprob[r*k + t] (fp32).
    pub fn top_k_logprobs<T: LogitType>(
        &self,
        logits: &DevSlice<T>,
        idx: &DevSlice<i32>,
        logprob: &DevSlice<f32>,
        rows: usize,
        vocab: usize,
        k: usize,
    ) -> GpuResult<()> {
        let (cfg, v, [lp, ip, pp]) = check_picks("topk", logits, idx, logprob, rows, vocab, k)?;
        let kk = k as i32;
        // SAFETY: logits hold rows*vocab elements of the instance's type, idx/logprob >= rows*k;
        // 1 <= k <= vocab; outputs disjoint from logits and each other; one 1024-thread block per row.
        unsafe { self.launch("sampling", T::TOPK, cfg, &[&lp, &v, &kk, &ip, &pp]) }
    }
}

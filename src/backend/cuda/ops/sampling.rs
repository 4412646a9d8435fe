//! kernels/sampling.cu: greedy argmax with the chosen token's log-prob, and beam search's top-k
//! log-probs per row.

use cudarc::driver::{LaunchConfig, PushKernelArg};
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
        let cfg = LaunchConfig {
            grid_dim: (to_i32(K, "rows", rows)? as u32, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        let (lp, ip, pp) = (logits.ptr(), idx.ptr(), logprob.ptr());
        // SAFETY: logits hold rows*vocab elements of the instance's type, idx/logprob >= rows;
        // outputs disjoint from logits and each other; one 1024-thread block per row.
        unsafe { self.stream().launch_builder(&f).arg(&lp).arg(&v).arg(&ip).arg(&pp).launch(cfg) }
            .map_err(lerr(T::ARGMAX))?;
        Ok(())
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
        const K: &str = "topk";
        if rows == 0 || vocab == 0 {
            return Err(bad(K, "empty shape"));
        }
        if k == 0 || k > vocab {
            return Err(bad(K, format!("k = {k} must be in 1..={vocab} (the vocabulary)")));
        }
        need(K, "logits", logits, rows * vocab)?;
        need(K, "idx", idx, rows * k)?;
        need(K, "logprob", logprob, rows * k)?;
        disjoint(K, "idx", idx, "logits", logits)?;
        disjoint(K, "logprob", logprob, "logits", logits)?;
        disjoint(K, "idx", idx, "logprob", logprob)?;
        let v = to_i32(K, "vocab", vocab)?;
        let kk = to_i32(K, "k", k)?;
        let f = self.func("sampling", T::TOPK)?;
        let cfg = LaunchConfig {
            grid_dim: (to_i32(K, "rows", rows)? as u32, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        let (lp, ip, pp) = (logits.ptr(), idx.ptr(), logprob.ptr());
        // SAFETY: logits hold rows*vocab elements of the instance's type, idx/logprob >= rows*k;
        // 1 <= k <= vocab; outputs disjoint from logits and each other; one 1024-thread block per row.
        unsafe { self.stream().launch_builder(&f).arg(&lp).arg(&v).arg(&kk).arg(&ip).arg(&pp).launch(cfg) }
            .map_err(lerr(T::TOPK))?;
        Ok(())
    }
}

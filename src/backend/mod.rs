//! Executors of the graph. The CPU executor is the reference every kernel is checked against;
//! the CUDA backend runs the same ops with glimpse's own kernels.

pub mod cpu;
pub mod cuda;

use std::sync::Arc;

use crate::api::Device;
use crate::error::{Error, Result};
use crate::graph::{Buf, Graph, Phase, WeightTable};

pub use crate::graph::Activation;

/// Runs the phases of a graph over buffers it allocated once.
pub trait Executor: Send {
    /// Token ids of the next run (one per row of the embedded sequence).
    fn set_tokens(&mut self, tokens: &[u32]);
    /// Tokens already in the KV cache; the next run's first row sits at this position.
    fn set_position(&mut self, position: usize);
    fn position(&self) -> usize;
    /// Writes the first `data.len() / cols` rows of `buf`.
    fn write(&mut self, buf: Buf, data: &[f32]) -> Result<()>;
    /// Reads the first `rows` rows of `buf` as f32.
    fn read(&mut self, buf: Buf, rows: usize) -> Result<Vec<f32>>;
    fn run(&mut self, phase: &Phase) -> Result<()>;
    /// Waits until all submitted work is done (for timing); the CPU executor is synchronous.
    fn synchronize(&mut self) -> Result<()> {
        Ok(())
    }
    /// Runs `phase` and returns how long it took in ms: wall clock around a synchronous run by
    /// default; device events around the phase's kernels on a GPU.
    fn run_timed(&mut self, phase: &Phase) -> Result<f64> {
        self.synchronize()?;
        let start = std::time::Instant::now();
        self.run(phase)?;
        self.synchronize()?;
        Ok(start.elapsed().as_secs_f64() * 1e3)
    }
    /// Greedy choice per row of `logits` (`[rows, vocab]`): the argmax (ties to the lowest id,
    /// as torch) and its log-softmax value. Executors on a device override this so only ids
    /// and log-probs leave it.
    fn greedy(&mut self, logits: Buf, rows: usize) -> Result<Vec<(u32, f64)>> {
        let all = self.read(logits, rows)?;
        let vocab = all.len() / rows.max(1);
        Ok(all
            .chunks(vocab.max(1))
            .map(|row| {
                let t = cpu::ops::argmax(row);
                (t as u32, cpu::ops::log_prob(row, t))
            })
            .collect())
    }
    /// A short name for messages and JSON output ("cpu", "cuda").
    fn device_name(&self) -> String;
}

/// Where a model's graphs run: the CPU reference, or one GPU with the weights uploaded once.
#[derive(Clone)]
pub enum Backend {
    Cpu,
    Cuda(Arc<cuda::CudaWeights>),
}

impl Backend {
    /// Opens the backend for `device`: `Cuda` fails with the reason when no GPU can be used;
    /// `Auto` falls back to the CPU (callers report `name()`; [`auto_fallback_reason`] says
    /// why, e.g. a GPU is present but the weights do not fit in its memory).
    pub fn new(device: Device, weights: &WeightTable) -> Result<Self> {
        match device {
            Device::Cpu => Ok(Backend::Cpu),
            Device::Cuda => Self::cuda(weights),
            Device::Auto => Ok(Self::cuda(weights).unwrap_or_else(|e| {
                *AUTO_FALLBACK.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                Backend::Cpu
            })),
        }
    }

    fn cuda(weights: &WeightTable) -> Result<Self> {
        let dev = Arc::new(cuda::CudaDevice::new(0)?);
        Ok(Backend::Cuda(Arc::new(cuda::CudaWeights::upload(dev, weights)?)))
    }

    /// An executor for `graph`, with every buffer allocated.
    pub fn executor(&self, weights: &Arc<WeightTable>, graph: &Graph) -> Result<Box<dyn Executor>> {
        Ok(match self {
            Backend::Cpu => Box::new(cpu::CpuExecutor::new(Arc::clone(weights), &graph.buffers)),
            Backend::Cuda(w) => Box::new(cuda::CudaExecutor::new(Arc::clone(w), Arc::clone(weights), &graph.buffers)?),
        })
    }

    pub fn is_cuda(&self) -> bool {
        matches!(self, Backend::Cuda(_))
    }

    /// "cpu" or "cuda:<device name>".
    pub fn name(&self) -> String {
        match self {
            Backend::Cpu => "cpu".into(),
            Backend::Cuda(w) => format!("cuda:{}", w.dev.name()),
        }
    }
}

/// Why the latest `Device::Auto` backend in this process fell back to the CPU.
static AUTO_FALLBACK: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// Why the most recent `--device auto` load in this process ran on the CPU (None if none did).
pub fn auto_fallback_reason() -> Option<String> {
    AUTO_FALLBACK.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Convenience for benchmarks: a backend for `device` and an executor for `graph` on it.
pub fn new_executor(device: Device, weights: Arc<WeightTable>, graph: &Graph) -> Result<Box<dyn Executor>> {
    Backend::new(device, &weights)?.executor(&weights, graph)
}

/// Why CUDA cannot be used here, or None when it can (without uploading anything).
pub fn cuda_unavailable_reason() -> Option<Error> {
    cuda::probe().err().map(Error::from)
}

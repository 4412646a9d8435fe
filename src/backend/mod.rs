//! Executors of the graph. The CPU executor is the reference every kernel is checked against;
//! the CUDA backend runs the same ops with glimpse's own kernels.

pub mod cpu;
pub mod cuda;

use crate::error::Result;
use crate::graph::{Buf, Phase};

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
    /// A short name for messages and JSON output ("cpu", "cuda").
    fn device_name(&self) -> String;
}

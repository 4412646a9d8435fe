//! Errors of the CUDA backend: [`GpuError`] itself is defined in `crate::error` (beside the
//! crate-level `Error` that wraps it with `#[from]`, so imports run from the backend down to the
//! error module, never back); this module adds the launchers' shorthands.

pub use crate::error::GpuError;

/// Shorthand for a launcher precondition failure.
pub(crate) fn bad(kernel: &'static str, msg: impl Into<String>) -> GpuError {
    GpuError::Launch { kernel, msg: msg.into() }
}

pub type GpuResult<T> = Result<T, GpuError>;

//! The CUDA backend's error type. It lives here, beside the crate-level [`Error`](super::Error)
//! that wraps it, so imports run one way: `backend::cuda` uses it (and re-exports it as
//! `backend::cuda::GpuError`); nothing in `error` imports from the backend.

use cudarc::driver::{sys::cudaError_enum as CuResult, DriverError};

/// Everything that can go wrong in the CUDA backend. Launchers never panic on bad shapes: they
/// return [`GpuError::Launch`] naming the kernel and the violated precondition.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// The crate was compiled without nvcc, so there are no kernels to load.
    #[error("built without CUDA kernels: install the CUDA toolkit or set NVCC and rebuild")]
    NotBuilt,
    /// libcuda (the driver library) could not be loaded on this machine.
    #[error("no CUDA driver: libcuda.so could not be loaded")]
    NoDriver,
    /// The driver loaded but reports no usable device (or the requested ordinal is absent).
    #[error("no CUDA device available")]
    NoDevice,
    /// A device allocation failed or an arena is exhausted.
    #[error("CUDA out of memory: {requested} bytes requested")]
    OutOfMemory { requested: usize },
    /// A launcher rejected its arguments, or the launch itself failed.
    #[error("kernel `{kernel}`: {msg}")]
    Launch { kernel: &'static str, msg: String },
    /// Any other driver error.
    #[error("CUDA driver error: {0}")]
    Driver(String),
}

impl From<DriverError> for GpuError {
    fn from(e: DriverError) -> Self {
        match e.0 {
            CuResult::CUDA_ERROR_NO_DEVICE | CuResult::CUDA_ERROR_INVALID_DEVICE => GpuError::NoDevice,
            CuResult::CUDA_ERROR_OUT_OF_MEMORY => GpuError::OutOfMemory { requested: 0 },
            _ => GpuError::Driver(format!("{e:?}")),
        }
    }
}

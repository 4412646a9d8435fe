//! The one error type of glimpse. Every failure a user can cause (a bad checkpoint, a corrupt
//! image, a prompt that does not fit) comes back as one of these, never as a panic.

use std::path::PathBuf;

mod gpu;

pub use gpu::GpuError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    #[error("{path}: file not found{hint}")]
    MissingFile { path: PathBuf, hint: String },

    #[error("{path}: invalid JSON: {msg}")]
    Json { path: PathBuf, msg: String },

    #[error("{path}: {msg}")]
    Config { path: PathBuf, msg: String },

    /// A safetensors file whose bytes do not make a valid file (header, offsets, dtype, ...).
    #[error("{path}: malformed safetensors file: {msg}")]
    Safetensors { path: PathBuf, msg: String },

    #[error("missing tensor `{name}` (expected shape {expected:?}) in {path}")]
    MissingTensor { name: String, expected: Vec<usize>, path: PathBuf },

    #[error("tensor `{name}` in {path}: expected shape {expected:?}, found {found:?}")]
    ShapeMismatch { name: String, path: PathBuf, expected: Vec<usize>, found: Vec<usize> },

    #[error("tensor `{name}` in {path}: unsupported dtype {dtype} (glimpse reads F16, BF16, F32)")]
    UnsupportedDtype { name: String, path: PathBuf, dtype: String },

    #[error("image {path}: {msg}")]
    Image { path: String, msg: String },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("{0}")]
    InvalidInput(String),

    #[error("unsupported model: {0}")]
    Unsupported(String),

    #[error("GPU: {0}")]
    Gpu(String),

    #[error(transparent)]
    Cuda(#[from] GpuError),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::MissingFile { path, hint: String::new() }
        } else {
            Error::Io { path, source }
        }
    }

    pub(crate) fn config(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Config { path: path.into(), msg: msg.into() }
    }

    pub(crate) fn safetensors(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Safetensors { path: path.into(), msg: msg.into() }
    }
}

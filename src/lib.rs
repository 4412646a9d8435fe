//! glimpse: vision-language models (BLIP-2, InstructBLIP, LLaVA, CLIP) from Hugging Face
//! checkpoints, on a reference CPU executor and on hand-written CUDA kernels. The layers are
//! described in docs/architecture.md; each family lives in its own file under [`models`].
//!
//! ```no_run
//! let model = glimpse::Model::load("blip2-opt-2.7b", glimpse::Device::Auto)?;
//! let opts = model.default_options();
//! let out = model.caption(std::path::Path::new("photo.jpg"), &opts)?;
//! println!("{}", out.text);
//! # Ok::<(), glimpse::Error>(())
//! ```

pub mod api;
pub mod backend;
pub mod bench;
pub mod chat;
pub mod config;
pub mod convert;
pub mod cost;
pub mod dataset;
pub mod error;
pub mod files;
#[doc(hidden)]
pub mod fuzz;
pub mod generate;
pub mod graph;
pub mod hub;
pub mod image;
pub mod info;
pub mod json;
pub mod models;
pub mod parity;
pub mod quant;
pub mod serve;
pub mod synth;
pub mod tokenizer;
pub mod weights;

pub use api::{Device, EmbedModel, ImageFeatures, LoadOptions, Model, Output, Prompt, Request};
pub use error::{Error, Result};
pub use generate::{Cancel, GenerateOptions, Sequence, Timings, TokenEvent};
pub use image::ImageInput;
pub use quant::Quantize;

//! Model definitions, one file per Hugging Face module family; names mirror transformers so
//! tensor names map 1:1. Each model loads its weights into a [`WeightTable`] once and emits
//! graph ops; it never touches an executor.

pub mod blip2;
pub mod layers;
pub mod opt;
pub mod qformer;
pub mod vit;

use crate::error::Result;
use crate::graph::{Linear, Norm, WeightTable, W};
use crate::weights::Checkpoint;

/// Reads named tensors of a checkpoint into a weight table, checking every shape.
pub struct Loader<'a> {
    pub ckpt: &'a Checkpoint,
    pub table: &'a mut WeightTable,
}

impl Loader<'_> {
    pub fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<W> {
        let w = self.ckpt.f16(name, shape)?;
        Ok(self.table.add(name, w))
    }

    /// `{prefix}.weight` `[out, in]` and, when `bias`, `{prefix}.bias` `[out]`.
    pub fn linear(&mut self, prefix: &str, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear> {
        let weight = self.tensor(&format!("{prefix}.weight"), &[out_dim, in_dim])?;
        let bias = if bias { Some(self.tensor(&format!("{prefix}.bias"), &[out_dim])?) } else { None };
        Ok(Linear { weight, bias, in_dim, out_dim })
    }

    /// `{prefix}.weight` and `{prefix}.bias`, both `[dim]`.
    pub fn norm(&mut self, prefix: &str, dim: usize, eps: f64) -> Result<Norm> {
        Ok(Norm {
            weight: self.tensor(&format!("{prefix}.weight"), &[dim])?,
            bias: self.tensor(&format!("{prefix}.bias"), &[dim])?,
            eps: eps as f32,
        })
    }
}

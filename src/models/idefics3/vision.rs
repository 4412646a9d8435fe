//! Idefics3's vision transformer (`Idefics3VisionTransformer` / `SmolVLMVisionTransformer`,
//! transformers 5.17): SigLIP with a patch-grid position lookup. A biased patch Conv2d, learned
//! positions (no class token, no pre-norm), pre-norm encoder layers laid out as CLIP's (separate
//! biased q/k/v/out projections, `gelu_pytorch_tanh` MLP) and `post_layernorm` over every row.
//!
//! glimpse runs whole frames only (the processor's tiles and global image are all
//! `image_size` square), whose patch attention mask is all ones: attention is unmasked, and the
//! position ids are transformers' float32 bucketized grid coordinates of a full grid
//! ([`grid_buckets`]): 0..P for the released checkpoints' grids (26, 27, 32 patches per side),
//! skipping and repeating ids for others (19, 25, 29, 31, 38, ...).

use half::f16;
use serde::Deserialize;

use super::super::clip_vision::{load_layers, ClipLayer, ClipLayerDims, LayerBufs};
use super::super::family::Loader;
use super::super::layers::{AttnCall, Keys, NormLayer};
use crate::config::{check_activation, check_eps, check_heads, check_patches, check_positive};
use crate::error::Result;
use crate::graph::{Activation, Buf, Graph, Op, W};
use crate::weights::Weight;

/// `vision_config` (`Idefics3VisionConfig` / `SmolVLMVisionConfig`, 5.17 defaults).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Idefics3VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
}

impl Default for Idefics3VisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 1152,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 16,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            hidden_act: "gelu_pytorch_tanh".into(),
            layer_norm_eps: 1e-6,
        }
    }
}

impl Idefics3VisionConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
    pub fn patches_per_side(&self) -> usize {
        self.image_size / self.patch_size
    }
    /// Rows per frame: one per patch.
    pub fn num_patches(&self) -> usize {
        self.patches_per_side() * self.patches_per_side()
    }

    /// Checks every field the tower reads (`vision_config.` prefixes the names).
    pub fn check(&self) -> Result<(), String> {
        let s = "vision_config";
        check_heads(s, self.hidden_size, self.num_attention_heads)?;
        check_positive(&format!("{s}.intermediate_size"), self.intermediate_size)?;
        check_positive(&format!("{s}.num_hidden_layers"), self.num_hidden_layers)?;
        // The patch conv floors: SmolVLM-Instruct's 384 px frames at patch 14 are 27 x 27 patches,
        // the last 6 pixels of each row and column unread (a tiling ViT's check does not apply).
        let tiling = self.image_size - self.image_size % self.patch_size.max(1);
        check_patches(s, tiling.max(self.patch_size), self.patch_size, self.num_channels)?;
        if self.image_size < self.patch_size {
            return Err(crate::config::field_error(
                &format!("{s}.image_size"),
                self.image_size,
                format!("it must be at least one patch ({s}.patch_size = {})", self.patch_size),
            ));
        }
        check_eps(&format!("{s}.layer_norm_eps"), self.layer_norm_eps)?;
        check_activation(&format!("{s}.hidden_act"), &self.hidden_act, &["gelu_pytorch_tanh", "gelu_new", "gelu"])
    }

    fn activation(&self) -> Activation {
        if self.hidden_act == "gelu" {
            Activation::Gelu
        } else {
            Activation::GeluTanh
        }
    }

    /// The `describe` line.
    pub fn describe(&self) -> String {
        let layers = self.layer_dims().describe(self.num_hidden_layers);
        format!(
            "vision:     SigLIP, {layers}, {}px / patch {} -> {} rows per frame",
            self.image_size,
            self.patch_size,
            self.num_patches()
        )
    }

    /// The encoder layers' shapes (SigLIP's are CLIP's).
    fn layer_dims(&self) -> ClipLayerDims {
        let (h, heads) = (self.hidden_size, self.num_attention_heads);
        ClipLayerDims::new(h, heads, self.intermediate_size, self.layer_norm_eps, self.activation())
    }
}

/// The bucket `Idefics3VisionEmbeddings.forward` gives each row (and column) of a full `n x n`
/// patch grid in float32 on the CPU; patch (r, c) takes position id `b[r] * n + b[c]`.
///
/// transformers bucketizes the coordinates `i * f32(1/n)` (clamped below 1 - 1e-6) against
/// `torch.arange(1/n, 1, 1/n)`, whose float32 values are not `f32(k/n)`: torch's CPU kernel
/// writes two vectors of 8 floats per iteration, value j of a vector as
/// `f32(f32(start + step * first) + j * step)` (double arithmetic, `first` the vector's first
/// index), and the tail past the last pair of vectors as `f32(start + step * i)`; the count is
/// `ceil((1 - 1/n) / (1/n))`. Checked against torch for 1..=64 (goldens/idefics3_positions.json).
pub fn grid_buckets(n: usize) -> Vec<usize> {
    const LANES: usize = 8;
    let step64 = 1.0f64 / n as f64;
    let count = ((1.0 - step64) / step64).ceil().max(0.0) as usize;
    let mut boundaries = Vec::with_capacity(count);
    let mut i = 0;
    while i + 2 * LANES <= count {
        for first in [i, i + LANES] {
            let base = (step64 + step64 * first as f64) as f32;
            boundaries.extend((0..LANES).map(|j| (base as f64 + j as f64 * step64) as f32));
        }
        i += 2 * LANES;
    }
    boundaries.extend((i..count).map(|k| (step64 + step64 * k as f64) as f32));
    let step = 1.0f32 / n as f32;
    let max = (1.0f64 - 1e-6) as f32;
    // bucketize(right=True): how many boundaries are <= the coordinate.
    (0..n).map(|r| boundaries.partition_point(|&b| b <= (r as f32 * step).min(max))).collect()
}

/// A loaded Idefics3 vision transformer.
pub struct Idefics3Vision {
    pub cfg: Idefics3VisionConfig,
    patch_weight: W,
    patch_bias: W,
    /// `[patches, hidden]`: row p is the embedding of patch p's position id.
    positions: W,
    layers: Vec<ClipLayer>,
    post_layernorm: NormLayer,
}

impl Idefics3Vision {
    /// Loads the tower under `prefix` (`model.vision_model.`).
    pub fn load(cfg: &Idefics3VisionConfig, ld: &mut Loader, prefix: &str) -> Result<Self> {
        let (d, p, n) = (cfg.hidden_size, cfg.patch_size, cfg.num_patches());
        let e = format!("{prefix}embeddings");
        let patch_weight = ld.tensor(&format!("{e}.patch_embedding.weight"), &[d, cfg.num_channels, p, p])?;
        let patch_bias = ld.tensor(&format!("{e}.patch_embedding.bias"), &[d])?;
        let table_name = format!("{e}.position_embedding.weight");
        let mut positions = ld.tensor(&table_name, &[n, d])?;
        let side = cfg.patches_per_side();
        let buckets = grid_buckets(side);
        let ids: Vec<usize> = buckets.iter().flat_map(|&r| buckets.iter().map(move |&c| r * side + c)).collect();
        if ids.iter().enumerate().any(|(p, &id)| p != id) {
            // Row p of the table the graph adds is the row of patch p's id.
            let table = ld.table.get(positions).as_slice();
            let rows: Vec<f16> = ids.iter().flat_map(|&id| table[id * d..(id + 1) * d].iter().copied()).collect();
            positions = ld.table.add(format!("{table_name} (by patch)"), Weight::from_vec(vec![n, d], rows));
        }
        let layers = load_layers(ld, prefix, cfg.num_hidden_layers, &cfg.layer_dims())?;
        let post_layernorm = ld.norm(&format!("{prefix}post_layernorm"), d, cfg.layer_norm_eps)?.into();
        Ok(Self { cfg: cfg.clone(), patch_weight, patch_bias, positions, layers, post_layernorm })
    }

    /// Emits the tower for `frames` frames in `pixels` (`[frames, 3*S*S]`); returns
    /// `last_hidden_state` `[frames * patches, hidden]`.
    pub fn emit(&self, g: &mut Graph, pixels: Buf, frames: usize) -> Buf {
        let c = &self.cfg;
        let (d, patches) = (c.hidden_size, c.num_patches());
        let rows = frames * patches;
        let x = g.buffer("vision.residual", rows, d);
        let bufs = LayerBufs {
            x,
            normed: g.buffer("vision.normed", rows, d),
            mlp: g.buffer("vision.mlp", rows, c.intermediate_size),
            rows,
        };

        // x = conv(pixels) + bias + positions           [F*P, D]
        g.push(Op::PatchEmbed {
            pixels,
            weight: self.patch_weight,
            bias: self.patch_bias,
            class: None,
            positions: self.positions,
            out: x,
            batch: frames,
            image_size: c.image_size,
            patch: c.patch_size,
        });
        // Full frames: every patch attends to every patch of its frame.
        let call = AttnCall::new(frames, patches, Keys::Same);
        let mut scratch = None;
        for l in &self.layers {
            let s = *scratch.get_or_insert_with(|| l.scratch(g, "vision", rows));
            // x += out_proj(attention(LN1(x))); x += fc2(gelu_tanh(fc1(LN2(x))))
            l.emit(g, &s, &bufs, &call);
        }
        let out = g.buffer("vision.out", rows, d);
        self.post_layernorm.emit(g, x, None, out, rows);
        out
    }
}

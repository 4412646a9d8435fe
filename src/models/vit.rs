//! BLIP-2's EVA ViT (`Blip2VisionModel`): patch embedding, pre-norm encoder layers with a fused
//! qkv projection and exact GELU, post layer norm over all tokens.

use half::f16;

use super::family::Loader;
use super::layers::{pre_norm, AttentionLayer, AttnCall, Keys, Mlp, NormLayer, Qkv};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::graph::{Activation, Buf, Graph, Op, W};
use crate::weights::Weight;

/// `vision_config` of a BLIP-2 checkpoint (EVA ViT-g defaults).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
    pub layer_norm_eps: f64,
    pub hidden_act: String,
    pub qkv_bias: bool,
}

impl Default for VisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 1408,
            intermediate_size: 6144,
            num_hidden_layers: 39,
            num_attention_heads: 16,
            image_size: 224,
            patch_size: 14,
            num_channels: 3,
            layer_norm_eps: 1e-6,
            hidden_act: "gelu".into(),
            qkv_bias: true,
        }
    }
}

impl VisionConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
    pub fn patches_per_side(&self) -> usize {
        self.image_size / self.patch_size
    }
    /// Patches plus the class token.
    pub fn num_positions(&self) -> usize {
        self.patches_per_side() * self.patches_per_side() + 1
    }
}

struct VitLayer {
    layer_norm1: NormLayer,
    self_attn: AttentionLayer,
    layer_norm2: NormLayer,
    mlp: Mlp,
}

pub struct VisionModel {
    pub cfg: VisionConfig,
    patch_weight: W,
    patch_bias: W,
    class_embedding: W,
    position_embedding: W,
    layers: Vec<VitLayer>,
    post_layernorm: NormLayer,
}

impl VisionModel {
    /// The `describe` line of the tower.
    pub fn describe(&self) -> String {
        let v = &self.cfg;
        format!(
            "vision:     {} layers, hidden {}, {} heads x {}, mlp {}, {}px / patch {} -> {} tokens",
            v.num_hidden_layers,
            v.hidden_size,
            v.num_attention_heads,
            v.head_dim(),
            v.intermediate_size,
            v.image_size,
            v.patch_size,
            v.num_positions()
        )
    }

    pub fn load(cfg: &VisionConfig, ld: &mut Loader, prefix: &str) -> Result<Self> {
        let (d, p) = (cfg.hidden_size, cfg.patch_size);
        let e = format!("{prefix}.embeddings");
        let patch_weight = ld.tensor(&format!("{e}.patch_embedding.weight"), &[d, cfg.num_channels, p, p])?;
        let patch_bias = ld.tensor(&format!("{e}.patch_embedding.bias"), &[d])?;
        let class_embedding = ld.tensor(&format!("{e}.class_embedding"), &[1, 1, d])?;
        let position_embedding = ld.tensor(&format!("{e}.position_embedding"), &[1, cfg.num_positions(), d])?;
        let eps = cfg.layer_norm_eps;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = format!("{prefix}.encoder.layers.{i}");
                let mut qkv = ld.linear(&format!("{l}.self_attn.qkv"), d, 3 * d, false)?;
                if cfg.qkv_bias {
                    qkv.bias = Some(load_qkv_bias(ld, &format!("{l}.self_attn"), d)?);
                }
                let layer_norm1 = ld.norm(&format!("{l}.layer_norm1"), d, eps)?.into();
                let heads = cfg.num_attention_heads;
                let self_attn = AttentionLayer {
                    qk_norm: None,
                    qkv: Qkv::Fused(qkv),
                    out: ld.linear(&format!("{l}.self_attn.projection"), d, d, true)?,
                    heads,
                    kv_heads: heads,
                    head_dim: cfg.head_dim(),
                    scale: (cfg.head_dim() as f32).powf(-0.5),
                    rope: None,
                };
                let layer_norm2 = ld.norm(&format!("{l}.layer_norm2"), d, eps)?.into();
                let mlp = super::layers::load_mlp(
                    ld,
                    &format!("{l}.mlp.fc1"),
                    &format!("{l}.mlp.fc2"),
                    d,
                    cfg.intermediate_size,
                    true,
                    Activation::Gelu,
                )?;
                Ok(VitLayer { layer_norm1, self_attn, layer_norm2, mlp })
            })
            .collect::<Result<Vec<_>>>()?;
        let post_layernorm = ld.norm(&format!("{prefix}.post_layernorm"), d, eps)?.into();
        Ok(Self {
            cfg: cfg.clone(),
            patch_weight,
            patch_bias,
            class_embedding,
            position_embedding,
            layers,
            post_layernorm,
        })
    }

    /// Emits the encoder for `batch` images in `pixels` (`[batch, 3*S*S]`); returns the
    /// post-layernorm hidden states `[batch * tokens, hidden]`.
    pub fn build(&self, g: &mut Graph, pixels: Buf, batch: usize) -> Buf {
        let c = &self.cfg;
        let (d, tokens) = (c.hidden_size, c.num_positions());
        let rows = batch * tokens;
        // Activations, allocated once and reused by every layer.
        let x = g.buffer("vision.residual", rows, d);
        let h = g.buffer("vision.normed", rows, d);
        let mlp = g.buffer("vision.mlp", rows, c.intermediate_size);
        let out = g.buffer("vision.out", rows, d);
        let mut scratch = None;

        // x = [cls; conv(pixels)] + positions          [B*257, D]
        g.push(Op::PatchEmbed {
            pixels,
            weight: self.patch_weight,
            bias: self.patch_bias,
            class: Some(self.class_embedding),
            positions: self.position_embedding,
            out: x,
            batch,
            image_size: c.image_size,
            patch: c.patch_size,
        });
        let call = AttnCall::new(batch, tokens, Keys::Same);
        for l in &self.layers {
            let s = *scratch.get_or_insert_with(|| l.self_attn.scratch(g, "vision", rows, rows));
            // x += projection(attention(qkv(LN1(x))))
            pre_norm(g, &l.layer_norm1, x, h, rows, |g, h, r| l.self_attn.emit(g, &s, h, &call, r));
            // x += fc2(GELU(fc1(LN2(x))))
            pre_norm(g, &l.layer_norm2, x, h, rows, |g, h, r| l.mlp.emit(g, h, mlp, r, rows));
        }
        self.post_layernorm.emit(g, x, None, out, rows);
        out
    }
}

/// The qkv bias: fused `qkv.bias` [3D] as transformers 5 writes it, or the older separate
/// `q_bias` / `v_bias` (the key bias is zero).
fn load_qkv_bias(ld: &mut Loader, attn_prefix: &str, d: usize) -> Result<W> {
    let fused = format!("{attn_prefix}.qkv.bias");
    let (q, v) = (format!("{attn_prefix}.q_bias"), format!("{attn_prefix}.v_bias"));
    if ld.ckpt.contains(&fused) || !(ld.ckpt.contains(&q) && ld.ckpt.contains(&v)) {
        return ld.tensor(&fused, &[3 * d]).map_err(|e| match e {
            Error::MissingTensor { name, expected, path } => {
                Error::MissingTensor { name: format!("{name}` (or `{q}` + `{v}`"), expected, path }
            }
            other => other,
        });
    }
    let qb = ld.ckpt.f16(&q, &[d])?;
    let vb = ld.ckpt.f16(&v, &[d])?;
    let mut bias = qb.as_slice().to_vec();
    bias.extend(std::iter::repeat_n(f16::ZERO, d));
    bias.extend_from_slice(vb.as_slice());
    Ok(ld.table.add(fused, Weight::from_vec(vec![3 * d], bias)))
}

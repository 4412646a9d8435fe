//! BLIP-2's EVA ViT (`Blip2VisionModel`): patch embedding, pre-norm encoder layers with a fused
//! qkv projection and exact GELU, post layer norm over all tokens.

use half::f16;

use super::Loader;
use crate::config::VisionConfig;
use crate::error::{Error, Result};
use crate::graph::{Activation, Attention, Buf, Graph, KvLen, Linear, Norm, Op, View, W};
use crate::weights::Weight;

struct VitLayer {
    layer_norm1: Norm,
    qkv: Linear,
    projection: Linear,
    layer_norm2: Norm,
    fc1: Linear,
    fc2: Linear,
}

pub struct VisionModel {
    pub cfg: VisionConfig,
    patch_weight: W,
    patch_bias: W,
    class_embedding: W,
    position_embedding: W,
    layers: Vec<VitLayer>,
    post_layernorm: Norm,
}

impl VisionModel {
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
                Ok(VitLayer {
                    layer_norm1: ld.norm(&format!("{l}.layer_norm1"), d, eps)?,
                    qkv,
                    projection: ld.linear(&format!("{l}.self_attn.projection"), d, d, true)?,
                    layer_norm2: ld.norm(&format!("{l}.layer_norm2"), d, eps)?,
                    fc1: ld.linear(&format!("{l}.mlp.fc1"), d, cfg.intermediate_size, true)?,
                    fc2: ld.linear(&format!("{l}.mlp.fc2"), cfg.intermediate_size, d, true)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let post_layernorm = ld.norm(&format!("{prefix}.post_layernorm"), d, eps)?;
        Ok(Self { cfg: cfg.clone(), patch_weight, patch_bias, class_embedding, position_embedding, layers, post_layernorm })
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
        let qkv = g.buffer("vision.qkv", rows, 3 * d);
        let attn = g.buffer("vision.attn", rows, d);
        let mlp = g.buffer("vision.mlp", rows, c.intermediate_size);
        let out = g.buffer("vision.out", rows, d);

        // x = [cls; conv(pixels)] + positions          [B*257, D]
        g.push(Op::PatchEmbed {
            pixels,
            weight: self.patch_weight,
            bias: self.patch_bias,
            class: self.class_embedding,
            positions: self.position_embedding,
            out: x,
            batch,
            image_size: c.image_size,
            patch: c.patch_size,
        });
        for l in &self.layers {
            // x += projection(attention(qkv(LN1(x))))
            g.layer_norm(x, None, &l.layer_norm1, h, rows);
            g.linear(h, l.qkv.weight, l.qkv.bias, Activation::None, None, qkv, rows);
            g.push(Op::Attention(Attention {
                q: View { buf: qkv, col: 0 },
                k: View { buf: qkv, col: d },
                v: View { buf: qkv, col: 2 * d },
                out: attn,
                batch,
                heads: c.num_attention_heads,
                head_dim: c.head_dim(),
                q_len: tokens,
                kv_len: KvLen::Fixed(tokens),
                kv_batch_stride: tokens,
                causal: false,
                scale: (c.head_dim() as f32).powf(-0.5),
            }));
            g.linear(attn, l.projection.weight, l.projection.bias, Activation::None, Some(x), x, rows);
            // x += fc2(GELU(fc1(LN2(x))))
            g.layer_norm(x, None, &l.layer_norm2, h, rows);
            g.linear(h, l.fc1.weight, l.fc1.bias, Activation::Gelu, None, mlp, rows);
            g.linear(mlp, l.fc2.weight, l.fc2.bias, Activation::None, Some(x), x, rows);
        }
        g.layer_norm(x, None, &self.post_layernorm, out, rows);
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
            Error::MissingTensor { name, expected, path } => Error::MissingTensor {
                name: format!("{name}` (or `{q}` + `{v}`"),
                expected,
                path,
            },
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

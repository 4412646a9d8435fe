//! IDEFICS' Perceiver Resampler (`IdeficsPerceiverResampler`): a fixed set of learned latents
//! attends, block after block, over `[image tokens; latents]` of each image and becomes the
//! image's `n_latents` rows the decoder cross-attends to.

use super::config::IdeficsConfig;
use crate::error::Result;
use crate::graph::{Activation, Buf, Graph, Op, W};
use crate::models::family::Loader;
use crate::models::layers::{
    load_attention, pre_norm, AttentionLayer, AttnCall, AttnSpec, HeadNorms, Keys, Mlp, NormLayer,
};

/// Every `nn.LayerNorm` of the resampler uses PyTorch's default epsilon.
const EPS: f64 = 1e-5;

struct Block {
    context_layer_norm: NormLayer,
    latents_layer_norm: NormLayer,
    /// Bias-free q/k/v/output projections (`output_proj`), qk layer norms when configured.
    attn: AttentionLayer,
    mlp_norm: NormLayer,
    /// `fc` -> ReLU -> `c_proj`, bias-free, 4 x the vision width.
    mlp: Mlp,
}

pub struct Resampler {
    latents: W,
    blocks: Vec<Block>,
    layer_norm: NormLayer,
    n_latents: usize,
    dim: usize,
}

impl Resampler {
    /// Loads `{p}latents`, `{p}blocks.{i}.0.*` (attention), `{p}blocks.{i}.1.*` (MLP) and
    /// `{p}layer_norm`.
    pub fn load(cfg: &IdeficsConfig, ld: &mut Loader, p: &str) -> Result<Self> {
        let pc = &cfg.perceiver_config;
        let (d, n, heads, head_dim) =
            (cfg.vision_config.embed_dim, pc.resampler_n_latents, pc.resampler_n_heads, pc.resampler_head_dim);
        let latents = ld.tensor(&format!("{p}latents"), &[n, d])?;
        let norm =
            |ld: &mut Loader, name: String, dim: usize| -> Result<NormLayer> { Ok(ld.norm(&name, dim, EPS)?.into()) };
        let blocks = (0..pc.resampler_depth)
            .map(|i| {
                let (a, m) = (format!("{p}blocks.{i}.0"), format!("{p}blocks.{i}.1"));
                let names = ["q_proj", "k_proj", "v_proj", "output_proj"].map(|n| format!("{a}.{n}"));
                // qk_scale = head_dim ** -0.5 (a Python float, applied to q in fp32): `mha`'s.
                let spec = AttnSpec::mha(names.each_ref().map(String::as_str), d, heads, head_dim);
                let mut attn = load_attention(ld, &spec)?;
                if pc.qk_layer_norms_perceiver {
                    attn.qk_norm = Some(HeadNorms {
                        q: norm(ld, format!("{a}.q_layer_norm"), head_dim)?,
                        k: norm(ld, format!("{a}.k_layer_norm"), head_dim)?,
                    });
                }
                let inter = 4 * d;
                Ok(Block {
                    context_layer_norm: norm(ld, format!("{a}.context_layer_norm"), d)?,
                    latents_layer_norm: norm(ld, format!("{a}.latents_layer_norm"), d)?,
                    attn,
                    mlp_norm: norm(ld, format!("{m}.ln"), d)?,
                    mlp: Mlp {
                        fc1: ld.linear(&format!("{m}.fc"), d, inter, false)?,
                        fc2: ld.linear(&format!("{m}.c_proj"), inter, d, false)?,
                        act: Activation::Relu,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let layer_norm = norm(ld, format!("{p}layer_norm"), d)?;
        Ok(Self { latents, blocks, layer_norm, n_latents: n, dim: d })
    }

    /// Resamples `images` images' `tokens` rows each of `context` (`[images * tokens, D]`) into
    /// a new `[images * n_latents, D]` buffer.
    pub fn emit(&self, g: &mut Graph, context: Buf, images: usize, tokens: usize) -> Buf {
        let (n, d) = (self.n_latents, self.dim);
        let (rows, kv_len) = (images * n, tokens + n);
        let latents = g.buffer("perceiver.latents", rows, d);
        let (ctx_normed, lat_normed) =
            (g.buffer("perceiver.context_normed", images * tokens, d), g.buffer("perceiver.latents_normed", rows, d));
        let kv_in = g.buffer("perceiver.kv_in", images * kv_len, d);
        let mlp_hidden = g.buffer("perceiver.mlp", rows, self.mlp_width());
        let out = g.buffer("perceiver.out", rows, d);

        // latents = self.latents repeated per image                      [I*n, D]
        g.push(Op::Broadcast { table: self.latents, out: latents, batch: images });
        let mut scratch = None;
        for b in &self.blocks {
            let s = *scratch.get_or_insert_with(|| b.attn.scratch(g, "perceiver", rows, images * kv_len));
            // kv_in = [LN(context); LN(latents)] per image                [I*(T+n), D]
            b.context_layer_norm.emit(g, context, None, ctx_normed, images * tokens);
            b.latents_layer_norm.emit(g, latents, None, lat_normed, rows);
            for (src, per, start) in [(ctx_normed, tokens, 0), (lat_normed, n, tokens)] {
                g.push(Op::CopyRows {
                    x: src,
                    x_rows_per_batch: per,
                    x_start: 0,
                    out: kv_in,
                    out_rows_per_batch: kv_len,
                    out_start: start,
                    rows: per,
                    batch: images,
                });
            }
            // latents += output_proj(attn(q(LN(latents)), k(kv_in), v(kv_in)))
            let call = AttnCall::new(images, n, Keys::Cross { src: kv_in, kv_len });
            b.attn.emit(g, &s, lat_normed, &call, crate::models::layers::Residual { add: latents, out: latents });
            // latents += c_proj(relu(fc(LN(latents))))
            pre_norm(g, &b.mlp_norm, latents, lat_normed, rows, |g, h, r| b.mlp.emit(g, h, mlp_hidden, r, rows));
        }
        // out = LN(latents)
        self.layer_norm.emit(g, latents, None, out, rows);
        out
    }

    fn mlp_width(&self) -> usize {
        self.blocks.first().map_or(4 * self.dim, |b| b.mlp.fc1.out_dim)
    }
}

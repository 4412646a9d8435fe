//! BLIP-2's Q-Former (`Blip2QFormerModel`, BERT-style post-norm): learned query tokens attend to
//! themselves and, every `cross_attention_frequency` layers, to the image embeddings.

use super::Loader;
use crate::config::QFormerConfig;
use crate::error::Result;
use crate::graph::{Activation, Attention, Buf, Graph, KvLen, Linear, Norm, Op, View, W};

/// query/key/value projections, output dense and post-norm of one attention block.
struct AttentionBlock {
    query: Linear,
    key: Linear,
    value: Linear,
    dense: Linear,
    layer_norm: Norm,
}

impl AttentionBlock {
    fn load(ld: &mut Loader, prefix: &str, d: usize, kv_in: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            query: ld.linear(&format!("{prefix}.attention.query"), d, d, true)?,
            key: ld.linear(&format!("{prefix}.attention.key"), kv_in, d, true)?,
            value: ld.linear(&format!("{prefix}.attention.value"), kv_in, d, true)?,
            dense: ld.linear(&format!("{prefix}.output.dense"), d, d, true)?,
            layer_norm: ld.norm(&format!("{prefix}.output.LayerNorm"), d, eps)?,
        })
    }
}

struct QFormerLayer {
    self_attention: AttentionBlock,
    cross_attention: Option<AttentionBlock>,
    intermediate_query: Linear,
    output_query: Linear,
    output_layer_norm: Norm,
}

pub struct QFormer {
    pub cfg: QFormerConfig,
    pub num_query_tokens: usize,
    query_tokens: W,
    layernorm: Norm,
    layers: Vec<QFormerLayer>,
}

/// Scratch buffers of one attention block: q [rows, D], k and v [kv_rows, D], context [rows, D].
struct AttnScratch {
    q: Buf,
    k: Buf,
    v: Buf,
    ctx: Buf,
    dense: Buf,
}

impl QFormer {
    /// `query_tokens` lives at the top level of the checkpoint, the rest under `prefix`.
    pub fn load(cfg: &QFormerConfig, num_query_tokens: usize, ld: &mut Loader, prefix: &str) -> Result<Self> {
        let (d, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        let query_tokens = ld.tensor("query_tokens", &[1, num_query_tokens, d])?;
        let layernorm = ld.norm(&format!("{prefix}.layernorm"), d, eps)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = format!("{prefix}.encoder.layer.{i}");
                Ok(QFormerLayer {
                    self_attention: AttentionBlock::load(ld, &format!("{l}.attention"), d, d, eps)?,
                    cross_attention: if cfg.has_cross_attention(i) {
                        Some(AttentionBlock::load(ld, &format!("{l}.crossattention"), d, cfg.encoder_hidden_size, eps)?)
                    } else {
                        None
                    },
                    intermediate_query: ld.linear(&format!("{l}.intermediate_query.dense"), d, cfg.intermediate_size, true)?,
                    output_query: ld.linear(&format!("{l}.output_query.dense"), cfg.intermediate_size, d, true)?,
                    output_layer_norm: ld.norm(&format!("{l}.output_query.LayerNorm"), d, eps)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { cfg: cfg.clone(), num_query_tokens, query_tokens, layernorm, layers })
    }

    /// Emits the Q-Former over `image` (`[batch * image_tokens, encoder_hidden]`); returns the
    /// query outputs `[batch * num_query_tokens, hidden]`.
    pub fn build(&self, g: &mut Graph, image: Buf, batch: usize, image_tokens: usize) -> Buf {
        let d = self.cfg.hidden_size;
        let nq = self.num_query_tokens;
        let rows = batch * nq;
        let image_rows = batch * image_tokens;
        let queries = g.buffer("qformer.queries", rows, d);
        let x = g.buffer("qformer.hidden", rows, d);
        let h = g.buffer("qformer.attended", rows, d);
        let ffn = g.buffer("qformer.ffn", rows, self.cfg.intermediate_size);
        let self_scratch = AttnScratch {
            q: g.buffer("qformer.q", rows, d),
            k: g.buffer("qformer.k", rows, d),
            v: g.buffer("qformer.v", rows, d),
            ctx: g.buffer("qformer.context", rows, d),
            dense: g.buffer("qformer.dense", rows, d),
        };
        let cross_scratch = AttnScratch {
            q: self_scratch.q,
            k: g.buffer("qformer.cross_k", image_rows, d),
            v: g.buffer("qformer.cross_v", image_rows, d),
            ctx: self_scratch.ctx,
            dense: self_scratch.dense,
        };

        // x = LayerNorm(query_tokens), one copy per image   [B*32, D]
        g.push(Op::Broadcast { table: self.query_tokens, out: queries, batch });
        g.layer_norm(queries, None, &self.layernorm, x, rows);
        for l in &self.layers {
            // h = LN(dense(SelfAttn(x)) + x)
            self.attention(g, &l.self_attention, &self_scratch, x, x, batch, nq, h);
            if let Some(cross) = &l.cross_attention {
                // h = LN(dense(CrossAttn(h, image)) + h)   (dense writes a scratch, LN back to h)
                self.attention(g, cross, &cross_scratch, h, image, batch, image_tokens, h);
            }
            // x = LN(output_query(GELU(intermediate_query(h))) + h)
            g.linear(h, l.intermediate_query.weight, l.intermediate_query.bias, Activation::Gelu, None, ffn, rows);
            g.linear(ffn, l.output_query.weight, l.output_query.bias, Activation::None, Some(h), self_scratch.dense, rows);
            g.layer_norm(self_scratch.dense, None, &l.output_layer_norm, x, rows);
        }
        x
    }

    /// `out = LN(dense(MHA(q(x), k(kv), v(kv))) + x)`.
    #[allow(clippy::too_many_arguments)]
    fn attention(&self, g: &mut Graph, blk: &AttentionBlock, s: &AttnScratch, x: Buf, kv: Buf, batch: usize, kv_len: usize, out: Buf) {
        let rows = batch * self.num_query_tokens;
        let kv_rows = batch * kv_len;
        g.linear(x, blk.query.weight, blk.query.bias, Activation::None, None, s.q, rows);
        g.linear(kv, blk.key.weight, blk.key.bias, Activation::None, None, s.k, kv_rows);
        g.linear(kv, blk.value.weight, blk.value.bias, Activation::None, None, s.v, kv_rows);
        g.push(Op::Attention(Attention {
            q: View::from(s.q),
            k: View::from(s.k),
            v: View::from(s.v),
            out: s.ctx,
            batch,
            heads: self.cfg.num_attention_heads,
            head_dim: self.cfg.head_dim(),
            q_len: self.num_query_tokens,
            kv_len: KvLen::Fixed(kv_len),
            kv_batch_stride: kv_len,
            causal: false,
            scale: 1.0 / (self.cfg.head_dim() as f32).sqrt(),
        }));
        g.linear(s.ctx, blk.dense.weight, blk.dense.bias, Activation::None, Some(x), s.dense, rows);
        g.layer_norm(s.dense, None, &blk.layer_norm, out, rows);
    }
}

//! BLIP-2's Q-Former (`Blip2QFormerModel`, BERT-style post-norm): learned query tokens attend to
//! themselves and, every `cross_attention_frequency` layers, to the image embeddings.

use super::layers::{
    load_attention, load_mlp, post_norm, AttentionLayer, AttnCall, AttnScratch, AttnSpec, Keys, Mlp, NormLayer,
};
use super::Loader;
use crate::config::QFormerConfig;
use crate::error::Result;
use crate::graph::{Activation, Buf, Graph, Op, W};

/// query/key/value projections and output dense, then the post-norm, of one attention block.
struct AttentionBlock {
    attention: AttentionLayer,
    layer_norm: NormLayer,
}

impl AttentionBlock {
    fn load(ld: &mut Loader, cfg: &QFormerConfig, prefix: &str, kv_in: usize) -> Result<Self> {
        let names =
            ["attention.query", "attention.key", "attention.value", "output.dense"].map(|n| format!("{prefix}.{n}"));
        let (d, head_dim) = (cfg.hidden_size, cfg.head_dim());
        let attention = load_attention(
            ld,
            &AttnSpec {
                names: names.each_ref().map(String::as_str),
                q_in: d,
                kv_in,
                heads: cfg.num_attention_heads,
                kv_heads: cfg.num_attention_heads,
                head_dim,
                bias: true,
                scale: 1.0 / (head_dim as f32).sqrt(),
            },
        )?;
        let layer_norm = ld.norm(&format!("{prefix}.output.LayerNorm"), d, cfg.layer_norm_eps)?.into();
        Ok(Self { attention, layer_norm })
    }

    /// `out = LN(dense(MHA(q(x), k(keys), v(keys))) + x)`, the sum in `sum`.
    fn emit(&self, g: &mut Graph, s: &AttnScratch, x: Buf, call: &AttnCall, sum: Buf, out: Buf) {
        let rows = call.batch * call.q_len;
        post_norm(g, &self.layer_norm, x, sum, out, rows, |g, x, r| self.attention.emit(g, s, x, call, r));
    }
}

struct QFormerLayer {
    self_attention: AttentionBlock,
    cross_attention: Option<AttentionBlock>,
    /// intermediate_query -> GELU -> output_query, then its post-norm.
    ffn: Mlp,
    output_layer_norm: NormLayer,
}

pub struct QFormer {
    pub cfg: QFormerConfig,
    pub num_query_tokens: usize,
    query_tokens: W,
    layernorm: NormLayer,
    layers: Vec<QFormerLayer>,
}

impl QFormer {
    /// `query_tokens` lives at the top level of the checkpoint, the rest under `prefix`.
    pub fn load(cfg: &QFormerConfig, num_query_tokens: usize, ld: &mut Loader, prefix: &str) -> Result<Self> {
        let (d, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        let query_tokens = ld.tensor("query_tokens", &[1, num_query_tokens, d])?;
        let layernorm = ld.norm(&format!("{prefix}.layernorm"), d, eps)?.into();
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = format!("{prefix}.encoder.layer.{i}");
                Ok(QFormerLayer {
                    self_attention: AttentionBlock::load(ld, cfg, &format!("{l}.attention"), d)?,
                    cross_attention: if cfg.has_cross_attention(i) {
                        Some(AttentionBlock::load(ld, cfg, &format!("{l}.crossattention"), cfg.encoder_hidden_size)?)
                    } else {
                        None
                    },
                    ffn: load_mlp(
                        ld,
                        &format!("{l}.intermediate_query.dense"),
                        &format!("{l}.output_query.dense"),
                        d,
                        cfg.intermediate_size,
                        true,
                        Activation::Gelu,
                    )?,
                    output_layer_norm: ld.norm(&format!("{l}.output_query.LayerNorm"), d, eps)?.into(),
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
        let queries = g.buffer("qformer.queries", rows, d);
        let x = g.buffer("qformer.hidden", rows, d);
        let h = g.buffer("qformer.attended", rows, d);
        let ffn = g.buffer("qformer.ffn", rows, self.cfg.intermediate_size);
        let dense = g.buffer("qformer.dense", rows, d);
        // Self- and cross-attention share the query and context buffers.
        let (mut self_scratch, mut cross_scratch) = (None, None);
        let self_call = AttnCall::new(batch, nq, Keys::Same);
        let cross_call = AttnCall::new(batch, nq, Keys::Cross { src: image, kv_len: image_tokens });

        // x = LayerNorm(query_tokens), one copy per image   [B*32, D]
        g.push(Op::Broadcast { table: self.query_tokens, out: queries, batch });
        self.layernorm.emit(g, queries, None, x, rows);
        for l in &self.layers {
            let s = *self_scratch.get_or_insert_with(|| l.self_attention.attention.scratch(g, "qformer", rows, rows));
            // h = LN(dense(SelfAttn(x)) + x)
            l.self_attention.emit(g, &s, x, &self_call, dense, h);
            if let Some(cross) = &l.cross_attention {
                let cs = *cross_scratch.get_or_insert_with(|| {
                    let (kv_rows, kv_width) = (batch * image_tokens, cross.attention.kv_width());
                    let k = g.buffer("qformer.cross_k", kv_rows, kv_width);
                    AttnScratch { k, v: g.buffer("qformer.cross_v", kv_rows, kv_width), ..s }
                });
                // h = LN(dense(CrossAttn(h, image)) + h)   (dense writes a scratch, LN back to h)
                cross.emit(g, &cs, h, &cross_call, dense, h);
            }
            // x = LN(output_query(GELU(intermediate_query(h))) + h)
            post_norm(g, &l.output_layer_norm, h, dense, x, rows, |g, h, r| l.ffn.emit(g, h, ffn, r, rows));
        }
        x
    }
}

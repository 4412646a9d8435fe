//! The OPT decoder (`OPTForCausalLM`): learned positions offset by 2, pre-norm layers with ReLU
//! FFN, optional project_in/project_out, lm_head tied to embed_tokens unless stored.

use super::Loader;
use crate::config::OptConfig;
use crate::error::Result;
use crate::graph::{Activation, Attention, Buf, Graph, KvLen, Linear, Norm, Op, View, W};

struct OptLayer {
    self_attn_layer_norm: Norm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    final_layer_norm: Norm,
    fc1: Linear,
    fc2: Linear,
}

pub struct OptDecoder {
    pub cfg: OptConfig,
    pub embed_tokens: W,
    embed_positions: W,
    project_in: Option<Linear>,
    project_out: Option<Linear>,
    layers: Vec<OptLayer>,
    final_layer_norm: Norm,
    lm_head: W,
}

/// The per-layer K and V caches `[batch * capacity, hidden]`, shared by prefill and decode.
pub struct KvCache {
    pub layers: Vec<(Buf, Buf)>,
    pub batch: usize,
    pub capacity: usize,
}

/// Where a built decoder pass reads its input and leaves its logits.
pub struct DecoderPass {
    /// `[rows, embed_dim]` token embeddings (image rows overwritten by the caller's scatter).
    pub embeds: Buf,
    /// `[logit_rows, vocab]`.
    pub logits: Buf,
    pub logit_rows: usize,
}

const LN_EPS: f64 = 1e-5;

impl OptDecoder {
    /// `prefix` is the causal-LM module (`language_model`); the decoder is `{prefix}.model.decoder`.
    pub fn load(cfg: &OptConfig, ld: &mut Loader, prefix: &str) -> Result<Self> {
        let (h, e) = (cfg.hidden_size, cfg.embed_dim());
        let dec = format!("{prefix}.model.decoder");
        let embed_tokens = ld.tensor(&format!("{dec}.embed_tokens.weight"), &[cfg.vocab_size, e])?;
        let embed_positions = ld.tensor(
            &format!("{dec}.embed_positions.weight"),
            &[cfg.max_position_embeddings + OptConfig::POSITION_OFFSET, h],
        )?;
        let (project_in, project_out) = if e != h {
            (
                Some(ld.linear(&format!("{dec}.project_in"), e, h, false)?),
                Some(ld.linear(&format!("{dec}.project_out"), h, e, false)?),
            )
        } else {
            (None, None)
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = format!("{dec}.layers.{i}");
                Ok(OptLayer {
                    self_attn_layer_norm: ld.norm(&format!("{l}.self_attn_layer_norm"), h, LN_EPS)?,
                    q_proj: ld.linear(&format!("{l}.self_attn.q_proj"), h, h, true)?,
                    k_proj: ld.linear(&format!("{l}.self_attn.k_proj"), h, h, true)?,
                    v_proj: ld.linear(&format!("{l}.self_attn.v_proj"), h, h, true)?,
                    out_proj: ld.linear(&format!("{l}.self_attn.out_proj"), h, h, true)?,
                    final_layer_norm: ld.norm(&format!("{l}.final_layer_norm"), h, LN_EPS)?,
                    fc1: ld.linear(&format!("{l}.fc1"), h, cfg.ffn_dim, true)?,
                    fc2: ld.linear(&format!("{l}.fc2"), cfg.ffn_dim, h, true)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = ld.norm(&format!("{dec}.final_layer_norm"), h, LN_EPS)?;
        let lm_head_name = format!("{prefix}.lm_head.weight");
        let lm_head = if ld.ckpt.contains(&lm_head_name) || !cfg.tie_word_embeddings {
            ld.tensor(&lm_head_name, &[cfg.vocab_size, e])?
        } else {
            embed_tokens
        };
        Ok(Self { cfg: cfg.clone(), embed_tokens, embed_positions, project_in, project_out, layers, final_layer_norm, lm_head })
    }

    pub fn kv_cache(&self, g: &mut Graph, batch: usize, capacity: usize) -> KvCache {
        let h = self.cfg.hidden_size;
        let layers = (0..self.layers.len())
            .map(|i| {
                (g.buffer(format!("opt.{i}.cache_k"), batch * capacity, h), g.buffer(format!("opt.{i}.cache_v"), batch * capacity, h))
            })
            .collect();
        KvCache { layers, batch, capacity }
    }

    /// Emits one pass over `seq` new tokens per batch item, starting at the executor's position:
    /// a prefill (seq = prompt length) or a decode step (seq = 1). `image` (when given) is
    /// scattered over the rows holding `image_token`. With `all_logits` every row gets logits,
    /// else only the last row of each batch item.
    pub fn build(&self, g: &mut Graph, cache: &KvCache, seq: usize, image: Option<(Buf, u32)>, all_logits: bool, tag: &str) -> DecoderPass {
        let c = &self.cfg;
        let (h, e, batch) = (c.hidden_size, c.embed_dim(), cache.batch);
        let rows = batch * seq;
        let embeds = g.buffer(format!("{tag}.embeds"), rows, e);
        let x = if self.project_in.is_some() { g.buffer(format!("{tag}.residual"), rows, h) } else { embeds };
        let normed = g.buffer(format!("{tag}.normed"), rows, h);
        let (q, k, v) =
            (g.buffer(format!("{tag}.q"), rows, h), g.buffer(format!("{tag}.k"), rows, h), g.buffer(format!("{tag}.v"), rows, h));
        let ctx = g.buffer(format!("{tag}.context"), rows, h);
        let ffn = g.buffer(format!("{tag}.ffn"), rows, c.ffn_dim);

        // x = project_in(embed_tokens[ids] with image rows replaced) + positions   [B*S, H]
        g.push(Op::Embed { table: self.embed_tokens, out: embeds });
        if let Some((src, token)) = image {
            g.push(Op::ScatterTokens { src, token, out: embeds, batch, rows_per_batch: seq });
        }
        if let Some(p) = &self.project_in {
            g.linear(embeds, p.weight, p.bias, Activation::None, None, x, rows);
        }
        g.push(Op::AddPositions { table: self.embed_positions, offset: OptConfig::POSITION_OFFSET, x, batch, rows_per_batch: seq });

        for (l, &(cache_k, cache_v)) in self.layers.iter().zip(&cache.layers) {
            // x += out_proj(CausalAttn(LN(x)) over the cache)
            g.layer_norm(x, None, &l.self_attn_layer_norm, normed, rows);
            g.linear(normed, l.q_proj.weight, l.q_proj.bias, Activation::None, None, q, rows);
            g.linear(normed, l.k_proj.weight, l.k_proj.bias, Activation::None, None, k, rows);
            g.linear(normed, l.v_proj.weight, l.v_proj.bias, Activation::None, None, v, rows);
            g.push(Op::KvAppend {
                k: View::from(k),
                v: View::from(v),
                cache_k,
                cache_v,
                batch,
                rows_per_batch: seq,
                capacity: cache.capacity,
            });
            g.push(Op::Attention(Attention {
                q: View::from(q),
                k: View::from(cache_k),
                v: View::from(cache_v),
                out: ctx,
                batch,
                heads: c.num_attention_heads,
                head_dim: c.head_dim(),
                q_len: seq,
                kv_len: KvLen::Cache,
                kv_batch_stride: cache.capacity,
                causal: true,
                scale: (c.head_dim() as f32).powf(-0.5),
            }));
            g.linear(ctx, l.out_proj.weight, l.out_proj.bias, Activation::None, Some(x), x, rows);
            // x += fc2(ReLU(fc1(LN(x))))
            g.layer_norm(x, None, &l.final_layer_norm, normed, rows);
            g.linear(normed, l.fc1.weight, l.fc1.bias, Activation::Relu, None, ffn, rows);
            g.linear(ffn, l.fc2.weight, l.fc2.bias, Activation::None, Some(x), x, rows);
        }

        // logits = lm_head(project_out(LN(x)))   (last row of each item unless all_logits)
        g.layer_norm(x, None, &self.final_layer_norm, normed, rows);
        let (mut head_in, logit_rows) = (normed, if all_logits { rows } else { batch });
        if !all_logits && seq > 1 {
            head_in = g.buffer(format!("{tag}.last"), batch, h);
            g.push(Op::LastRows { x: normed, out: head_in, batch, rows_per_batch: seq });
        }
        if let Some(p) = &self.project_out {
            let projected = g.buffer(format!("{tag}.projected"), logit_rows, e);
            g.linear(head_in, p.weight, p.bias, Activation::None, None, projected, logit_rows);
            head_in = projected;
        }
        let logits = g.buffer(format!("{tag}.logits"), logit_rows, c.vocab_size);
        g.linear(head_in, self.lm_head, None, Activation::None, None, logits, logit_rows);
        DecoderPass { embeds, logits, logit_rows }
    }

    pub fn max_positions(&self) -> usize {
        self.cfg.max_position_embeddings
    }
}

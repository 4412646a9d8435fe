//! The OPT decoder (`OPTForCausalLM`): learned positions offset by 2, pre-norm layers with ReLU
//! FFN, optional project_in/project_out, lm_head tied to embed_tokens unless stored.

use super::decoder::{CausalDecoder, DecoderPass, PassSpec};
use super::family::Loader;
pub use super::layers::KvCache;
use super::layers::{load_attention, load_mlp, pre_norm, AttentionLayer, AttnCall, AttnSpec, Mlp, NormLayer};
use serde::Deserialize;

use crate::config::TokenIds;
use crate::error::Result;
use crate::graph::{Activation, Fused, Graph, Linear, Op, W};

/// `text_config` of an OPT decoder (BLIP-2 OPT's language model).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct OptConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub ffn_dim: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub word_embed_proj_dim: Option<usize>,
    pub do_layer_norm_before: bool,
    pub activation_function: String,
    pub enable_bias: bool,
    pub layer_norm_elementwise_affine: bool,
    #[serde(rename = "_remove_final_layer_norm")]
    pub remove_final_layer_norm: bool,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<TokenIds>,
    pub pad_token_id: Option<u32>,
    /// Not an OPT field, but transformers keeps it on the config and the language model's
    /// generation config picks it up (`GenerationConfig.from_model_config(text_config)`).
    /// (`max_length` is dropped from model configs, so it has no counterpart here.)
    pub max_new_tokens: Option<usize>,
    /// Kept the same way. transformers 5.17 drops every other generation parameter from model
    /// configs (`GenerationConfig._get_default_generation_params()`: num_beams, length_penalty,
    /// do_sample, temperature, top_k, top_p, ...), so only these reach the language model.
    pub min_new_tokens: Option<usize>,
    pub min_p: Option<f64>,
}

impl Default for OptConfig {
    fn default() -> Self {
        Self {
            model_type: "opt".into(),
            vocab_size: 50272,
            hidden_size: 768,
            num_hidden_layers: 12,
            ffn_dim: 3072,
            num_attention_heads: 12,
            max_position_embeddings: 2048,
            word_embed_proj_dim: None,
            do_layer_norm_before: true,
            activation_function: "relu".into(),
            enable_bias: true,
            layer_norm_elementwise_affine: true,
            remove_final_layer_norm: false,
            tie_word_embeddings: true,
            bos_token_id: Some(2),
            eos_token_id: Some(TokenIds::One(2)),
            pad_token_id: Some(1),
            max_new_tokens: None,
            min_new_tokens: None,
            min_p: None,
        }
    }
}

impl OptConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
    pub fn embed_dim(&self) -> usize {
        self.word_embed_proj_dim.unwrap_or(self.hidden_size)
    }
    /// OPT's learned positions are offset by 2 (fairseq legacy).
    pub const POSITION_OFFSET: usize = 2;
}

struct OptLayer {
    self_attn_layer_norm: NormLayer,
    self_attn: AttentionLayer,
    final_layer_norm: NormLayer,
    /// fc1 -> ReLU -> fc2.
    mlp: Mlp,
}

pub struct OptDecoder {
    pub cfg: OptConfig,
    pub embed_tokens: W,
    embed_positions: W,
    project_in: Option<Linear>,
    project_out: Option<Linear>,
    layers: Vec<OptLayer>,
    final_layer_norm: NormLayer,
    lm_head: W,
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
                let self_attn_layer_norm = ld.norm(&format!("{l}.self_attn_layer_norm"), h, LN_EPS)?.into();
                let names = ["q_proj", "k_proj", "v_proj", "out_proj"].map(|n| format!("{l}.self_attn.{n}"));
                let spec = AttnSpec {
                    bias: true,
                    scale: (cfg.head_dim() as f32).powf(-0.5),
                    ..AttnSpec::mha(names.each_ref().map(String::as_str), h, cfg.num_attention_heads, cfg.head_dim())
                };
                let self_attn = load_attention(ld, &spec)?;
                Ok(OptLayer {
                    self_attn_layer_norm,
                    self_attn,
                    final_layer_norm: ld.norm(&format!("{l}.final_layer_norm"), h, LN_EPS)?.into(),
                    mlp: load_mlp(
                        ld,
                        &format!("{l}.fc1"),
                        &format!("{l}.fc2"),
                        h,
                        cfg.ffn_dim,
                        true,
                        Activation::Relu,
                    )?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = ld.norm(&format!("{dec}.final_layer_norm"), h, LN_EPS)?.into();
        let lm_head_name = format!("{prefix}.lm_head.weight");
        let lm_head = if ld.ckpt.contains(&lm_head_name) || !cfg.tie_word_embeddings {
            ld.tensor(&lm_head_name, &[cfg.vocab_size, e])?
        } else {
            embed_tokens
        };
        Ok(Self {
            cfg: cfg.clone(),
            embed_tokens,
            embed_positions,
            project_in,
            project_out,
            layers,
            final_layer_norm,
            lm_head,
        })
    }
}

impl CausalDecoder for OptDecoder {
    fn kv_cache(&self, g: &mut Graph, batch: usize, capacity: usize) -> KvCache {
        KvCache::new(g, "opt", self.layers.len(), batch, capacity, self.cfg.hidden_size)
    }

    fn build(&self, g: &mut Graph, cache: &KvCache, pass: &PassSpec<'_>) -> DecoderPass {
        let PassSpec { seq, image, key_mask, all_logits, tag } = *pass;
        let c = &self.cfg;
        let (h, e, batch) = (c.hidden_size, c.embed_dim(), cache.batch);
        let rows = batch * seq;
        let embeds = g.buffer(format!("{tag}.embeds"), rows, e);
        let x = if self.project_in.is_some() { g.buffer(format!("{tag}.residual"), rows, h) } else { embeds };
        let normed = g.buffer(format!("{tag}.normed"), rows, h);
        let mut scratch = None;
        let ffn = g.buffer(format!("{tag}.ffn"), rows, c.ffn_dim);

        // x = project_in(embed_tokens[ids] with image rows replaced) + positions   [B*S, H]
        g.push(Op::Embed { table: self.embed_tokens, out: embeds });
        if let Some((src, token)) = image {
            g.push(Op::ScatterTokens { src, token, out: embeds, batch, rows_per_batch: seq });
        }
        if let Some(p) = &self.project_in {
            g.linear(embeds, p.weight, p.bias, Fused::NONE, x, rows);
        }
        g.push(Op::AddPositions {
            table: self.embed_positions,
            offset: OptConfig::POSITION_OFFSET,
            x,
            batch,
            rows_per_batch: seq,
        });

        for (i, l) in self.layers.iter().enumerate() {
            let s = *scratch.get_or_insert_with(|| l.self_attn.scratch(g, tag, rows, rows));
            // x += out_proj(CausalAttn(LN(x)) over the cache)
            let call = AttnCall { key_mask, ..AttnCall::new(batch, seq, cache.keys(i)).causal() };
            pre_norm(g, &l.self_attn_layer_norm, x, normed, rows, |g, h, r| l.self_attn.emit(g, &s, h, &call, r));
            // x += fc2(ReLU(fc1(LN(x))))
            pre_norm(g, &l.final_layer_norm, x, normed, rows, |g, h, r| l.mlp.emit(g, h, ffn, r, rows));
        }

        // logits = lm_head(project_out(LN(x)))   (last row of each item unless all_logits)
        self.final_layer_norm.emit(g, x, None, normed, rows);
        let (mut head_in, logit_rows) = (normed, if all_logits { rows } else { batch });
        if !all_logits && seq > 1 {
            head_in = g.buffer(format!("{tag}.last"), batch, h);
            g.push(Op::LastRows { x: normed, out: head_in, batch, rows_per_batch: seq });
        }
        if let Some(p) = &self.project_out {
            let projected = g.buffer(format!("{tag}.projected"), logit_rows, e);
            g.linear(head_in, p.weight, p.bias, Fused::NONE, projected, logit_rows);
            head_in = projected;
        }
        let logits = g.buffer(format!("{tag}.logits"), logit_rows, c.vocab_size);
        g.linear(head_in, self.lm_head, None, Fused::NONE, logits, logit_rows);
        DecoderPass { embeds, logits, logit_rows }
    }

    fn max_positions(&self) -> usize {
        self.cfg.max_position_embeddings
    }
}

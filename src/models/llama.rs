//! The LLaMA decoder (`LlamaModel` + `lm_head`, transformers 5.17; docs/models/llama.md): RMSNorm,
//! RoPE (default / linear / llama3, half-split pairing), grouped-query attention over a KV cache,
//! SwiGLU MLP, optional attention / MLP biases, tied or untied head, head_dim from the config.

use std::sync::Arc;

use super::decoder::{CausalDecoder, DecoderPass, PassSpec};
use super::family::Loader;
pub use super::layers::KvCache;
use super::layers::{load_attention, pre_norm, AttentionLayer, AttnCall, AttnSpec, GatedMlp, GatedScratch, NormLayer};
use serde::Deserialize;
use serde_json::Value;

use crate::config::{check_activation, check_heads, check_positive, check_text_tokens, field_error, TokenIds};
use crate::error::{Error, Result};
use crate::graph::{rope_inv_freq, Activation, Buf, Fused, Graph, Op, W};

/// `text_config` of a LLaMA decoder (`LlamaConfig`, transformers 5.17 defaults).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct LlamaConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// None: `num_attention_heads` (no grouping).
    pub num_key_value_heads: Option<usize>,
    /// None: `hidden_size / num_attention_heads`.
    pub head_dim: Option<usize>,
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    /// 5.17's form: `{"rope_type", "rope_theta", ...}`.
    pub rope_parameters: Option<Value>,
    /// Legacy keys, folded into `rope_parameters` as transformers does (see [`LlamaConfig::rope`]).
    pub rope_scaling: Option<Value>,
    pub rope_theta: Option<f64>,
    pub partial_rotary_factor: Option<f64>,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<TokenIds>,
    pub pad_token_id: Option<u32>,
    /// Kept on the config like OPT's (the language model's generation config reads it), with
    /// `min_new_tokens` and `min_p`: InstructBLIP-Vicuna's language model generates with them.
    pub max_new_tokens: Option<usize>,
    pub min_new_tokens: Option<usize>,
    pub min_p: Option<f64>,
}

impl Default for LlamaConfig {
    fn default() -> Self {
        Self {
            model_type: "llama".into(),
            vocab_size: 32000,
            hidden_size: 4096,
            intermediate_size: 11008,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: None,
            head_dim: None,
            hidden_act: "silu".into(),
            max_position_embeddings: 2048,
            rms_norm_eps: 1e-6,
            rope_parameters: None,
            rope_scaling: None,
            rope_theta: None,
            partial_rotary_factor: None,
            attention_bias: false,
            mlp_bias: false,
            tie_word_embeddings: false,
            bos_token_id: Some(1),
            eos_token_id: Some(TokenIds::One(2)),
            pad_token_id: None,
            max_new_tokens: None,
            min_new_tokens: None,
            min_p: None,
        }
    }
}

impl LlamaConfig {
    /// The generation settings transformers builds from this config when the checkpoint has no
    /// generation_config.json (`GenerationConfig.from_model_config`): EOS and the generation
    /// fields the config keeps, else transformers' defaults.
    pub fn generate_options(&self) -> crate::generate::GenerateOptions {
        let eos = self.eos_token_id.as_ref();
        crate::generate::GenerateOptions::from_model_config(eos, self.max_new_tokens, self.min_new_tokens, self.min_p)
    }

    /// Checks a multimodal family's token ids `ids` (named by field) and `eos_token_id` against
    /// the vocabulary.
    pub fn check_token_ids(&self, ids: &[(&str, Option<u32>)]) -> Result<(), String> {
        check_text_tokens(ids, self.eos_token_id.as_ref(), self.vocab_size, None)
    }

    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// RoPE base and scaling as transformers 5.17 resolves them: `rope_parameters`, with a legacy
    /// `rope_scaling` object merged over it (`type` is an alias of `rope_type`) and a legacy
    /// top-level `rope_theta` filling a missing theta; defaults `default` / 10000.
    pub fn rope(&self) -> Result<(f64, crate::graph::RopeScaling), String> {
        use crate::graph::RopeScaling;
        let mut p = serde_json::Map::new();
        for src in [&self.rope_parameters, &self.rope_scaling].into_iter().flatten() {
            match src {
                Value::Object(m) => p.extend(m.clone()),
                Value::Null => {}
                other => {
                    return Err(field_error(
                        "text_config.rope_parameters",
                        other,
                        "it must be an object such as {\"rope_type\": \"default\", \"rope_theta\": 10000.0}",
                    ))
                }
            }
        }
        let num = |key: &str| -> Result<Option<f64>, String> {
            match p.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                    field_error(&format!("text_config.rope_parameters.{key}"), v, "it must be a number")
                }),
            }
        };
        let theta = num("rope_theta")?.or(self.rope_theta).unwrap_or(10000.0);
        if !(theta > 0.0 && theta.is_finite()) {
            return Err(field_error("text_config.rope_parameters.rope_theta", theta, "it must be a positive number"));
        }
        let kind = p.get("rope_type").or_else(|| p.get("type")).and_then(Value::as_str).unwrap_or("default");
        let need = |key: &str| -> Result<f64, String> {
            num(key)?.ok_or_else(|| {
                field_error(
                    &format!("text_config.rope_parameters.{key}"),
                    "missing",
                    format!("rope_type `{kind}` needs it"),
                )
            })
        };
        let scaling = match kind {
            "default" => RopeScaling::Default,
            "linear" => RopeScaling::Linear { factor: need("factor")? },
            "llama3" => RopeScaling::Llama3 {
                factor: need("factor")?,
                low_freq_factor: need("low_freq_factor")?,
                high_freq_factor: need("high_freq_factor")?,
                original_max_position_embeddings: num("original_max_position_embeddings")?
                    .unwrap_or(self.max_position_embeddings as f64),
            },
            other => {
                return Err(field_error(
                    "text_config.rope_parameters.rope_type",
                    format!("`{other}`"),
                    "glimpse implements default, linear and llama3 RoPE",
                ))
            }
        };
        Ok((theta, scaling))
    }

    /// Checks every field the decoder reads.
    pub fn check(&self) -> Result<(), String> {
        check_positive("text_config.vocab_size", self.vocab_size)?;
        check_positive("text_config.hidden_size", self.hidden_size)?;
        check_positive("text_config.num_attention_heads", self.num_attention_heads)?;
        check_positive("text_config.intermediate_size", self.intermediate_size)?;
        check_positive("text_config.num_hidden_layers", self.num_hidden_layers)?;
        check_positive("text_config.max_position_embeddings", self.max_position_embeddings)?;
        let kv = self.kv_heads();
        if kv == 0 || self.num_attention_heads % kv != 0 {
            return Err(field_error(
                "text_config.num_key_value_heads",
                kv,
                format!(
                    "it must divide num_attention_heads ({}): each key/value head serves a whole group of query heads",
                    self.num_attention_heads
                ),
            ));
        }
        if self.head_dim.is_none() && self.hidden_size % self.num_attention_heads != 0 {
            check_heads("text_config", self.hidden_size, self.num_attention_heads)?;
        }
        let hd = self.head_dim();
        if hd == 0 || hd % 2 != 0 {
            return Err(field_error("text_config.head_dim", hd, "RoPE needs an even, positive head_dim"));
        }
        if self.partial_rotary_factor.is_some_and(|f| f != 1.0) {
            return Err(field_error(
                "text_config.partial_rotary_factor",
                self.partial_rotary_factor.unwrap_or(1.0),
                "glimpse rotates every head dimension (1.0)",
            ));
        }
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps.is_finite()) {
            return Err(field_error(
                "text_config.rms_norm_eps",
                self.rms_norm_eps,
                "it must be a positive number (LLaVA-1.5 uses 1e-5)",
            ));
        }
        check_activation("text_config.hidden_act", &self.hidden_act, &["silu", "swish"])?;
        check_text_tokens(&[], None, self.vocab_size, self.max_new_tokens)?;
        self.rope().map(|_| ())
    }
}

struct LlamaLayer {
    input_layernorm: NormLayer,
    self_attn: AttentionLayer,
    post_attention_layernorm: NormLayer,
    mlp: GatedMlp,
}

pub struct LlamaDecoder {
    pub cfg: LlamaConfig,
    pub embed_tokens: W,
    layers: Vec<LlamaLayer>,
    norm: NormLayer,
    lm_head: W,
    /// Logits per row: the head's rows (`vocab_size`, plus IDEFICS' additional ids).
    logits_width: usize,
}

/// What a [`LayerHook`] sees before decoder layer `layer`: the residual stream `x`, a normed
/// scratch of the same shape, and the pass being emitted.
pub struct LayerInput<'a> {
    pub layer: usize,
    pub x: Buf,
    pub normed: Buf,
    pub rows: usize,
    pub pass: &'a PassSpec<'a>,
}

/// Blocks a family inserts before LLaMA decoder layers (IDEFICS' gated cross-attention).
pub trait LayerHook {
    fn before_layer(&self, g: &mut Graph, at: &LayerInput<'_>);
}

impl LlamaDecoder {
    /// `model` is the `LlamaModel` prefix (`language_model.model.`, `model.language_model.`, or
    /// `model.` for a bare LlamaForCausalLM) and `lm_head` the head's weight name. With `tie` the
    /// head falls back to `embed_tokens` when the checkpoint has no head (transformers' tying).
    pub fn load(cfg: &LlamaConfig, ld: &mut Loader, model: &str, lm_head: &str, tie: bool) -> Result<Self> {
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let embed_tokens = ld.tensor(&format!("{model}embed_tokens.weight"), &[v, h])?;
        Self::load_with(cfg, ld, model, embed_tokens, |ld| {
            if ld.ckpt.contains(lm_head) || !tie {
                ld.tensor(lm_head, &[v, h])
            } else {
                Ok(embed_tokens)
            }
        })
    }

    /// [`LlamaDecoder::load`] with the embedding table given (`[ids, hidden]`) and the head
    /// loaded by `head` after the layers (`[logits, hidden]`; IDEFICS joins extra rows to both).
    pub fn load_with(
        cfg: &LlamaConfig,
        ld: &mut Loader,
        model: &str,
        embed_tokens: W,
        head: impl FnOnce(&mut Loader) -> Result<W>,
    ) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let (heads, kv_heads, head_dim) = (cfg.num_attention_heads, cfg.kv_heads(), cfg.head_dim());
        let (theta, scaling) = cfg.rope().map_err(|m| Error::config(ld.ckpt.origin(), m))?;
        let inv_freq: Arc<[f32]> = rope_inv_freq(head_dim, theta, scaling).into();
        let eps = cfg.rms_norm_eps as f32;
        let rms = |ld: &mut Loader, name: String| -> Result<NormLayer> {
            Ok(NormLayer::RmsNorm { weight: ld.tensor(&name, &[h])?, eps })
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|n| {
                let l = format!("{model}layers.{n}");
                let names = ["q_proj", "k_proj", "v_proj", "o_proj"].map(|p| format!("{l}.self_attn.{p}"));
                // LlamaAttention.scaling = head_dim ** -0.5 (a Python float): `mha`'s.
                let spec = AttnSpec {
                    kv_heads,
                    bias: cfg.attention_bias,
                    ..AttnSpec::mha(names.each_ref().map(String::as_str), h, heads, head_dim)
                };
                let mut self_attn = load_attention(ld, &spec)?;
                self_attn.rope = Some(inv_freq.clone());
                let mlp_linear = |ld: &mut Loader, name: &str, din, dout| {
                    ld.linear(&format!("{l}.mlp.{name}"), din, dout, cfg.mlp_bias)
                };
                Ok(LlamaLayer {
                    input_layernorm: rms(ld, format!("{l}.input_layernorm.weight"))?,
                    self_attn,
                    post_attention_layernorm: rms(ld, format!("{l}.post_attention_layernorm.weight"))?,
                    mlp: GatedMlp {
                        gate: mlp_linear(ld, "gate_proj", h, i)?,
                        up: mlp_linear(ld, "up_proj", h, i)?,
                        down: mlp_linear(ld, "down_proj", i, h)?,
                        act: Activation::Silu,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = rms(ld, format!("{model}norm.weight"))?;
        let lm_head = head(ld)?;
        let logits_width = ld.table.get(lm_head).numel() / h.max(1);
        Ok(Self { cfg: cfg.clone(), embed_tokens, layers, norm, lm_head, logits_width })
    }

    /// The `describe` line of the decoder.
    pub fn describe(&self) -> String {
        let t = &self.cfg;
        let (theta, scaling) = t.rope().unwrap_or((0.0, crate::graph::RopeScaling::Default));
        format!(
            "decoder:    LLaMA, {} layers, hidden {}, {} heads ({} kv) x {}, mlp {}, vocab {}, {} positions, rope theta {theta} {scaling:?}",
            t.num_hidden_layers,
            t.hidden_size,
            t.num_attention_heads,
            t.kv_heads(),
            t.head_dim(),
            t.intermediate_size,
            t.vocab_size,
            t.max_position_embeddings
        )
    }
}

impl CausalDecoder for LlamaDecoder {
    fn kv_cache(&self, g: &mut Graph, batch: usize, capacity: usize) -> KvCache {
        let kv_width = self.cfg.kv_heads() * self.cfg.head_dim();
        KvCache::new(g, "llama", self.layers.len(), batch, capacity, kv_width)
    }

    fn build(&self, g: &mut Graph, cache: &KvCache, pass: &PassSpec<'_>) -> DecoderPass {
        self.build_with(g, cache, pass, None)
    }

    fn max_positions(&self) -> usize {
        self.cfg.max_position_embeddings
    }
}

impl LlamaDecoder {
    /// [`CausalDecoder::build`] with `hook`'s blocks emitted before each layer.
    pub fn build_with(
        &self,
        g: &mut Graph,
        cache: &KvCache,
        pass: &PassSpec<'_>,
        hook: Option<&dyn LayerHook>,
    ) -> DecoderPass {
        let PassSpec { seq, image, key_mask, all_logits, tag } = *pass;
        let c = &self.cfg;
        let (h, batch) = (c.hidden_size, cache.batch);
        let rows = batch * seq;
        let x = g.buffer(format!("{tag}.embeds"), rows, h);
        let normed = g.buffer(format!("{tag}.normed"), rows, h);
        let gated = GatedScratch {
            gate: g.buffer(format!("{tag}.gate"), rows, c.intermediate_size),
            up: g.buffer(format!("{tag}.up"), rows, c.intermediate_size),
            hidden: g.buffer(format!("{tag}.mlp"), rows, c.intermediate_size),
        };
        let mut scratch = None;

        // x = embed_tokens[ids], image rows replaced                              [B*S, H]
        g.push(Op::Embed { table: self.embed_tokens, out: x });
        if let Some((src, token)) = image {
            g.push(Op::ScatterTokens { src, token, out: x, batch, rows_per_batch: seq });
        }
        for (i, l) in self.layers.iter().enumerate() {
            if let Some(hook) = hook {
                hook.before_layer(g, &LayerInput { layer: i, x, normed, rows, pass });
            }
            let s = *scratch.get_or_insert_with(|| l.self_attn.scratch(g, tag, rows, rows));
            // x += o_proj(CausalGQA(RoPE(q), RoPE(k), v of RMS(x)) over the cache)
            let call = AttnCall { key_mask, ..AttnCall::new(batch, seq, cache.keys(i)).causal() };
            pre_norm(g, &l.input_layernorm, x, normed, rows, |g, n, r| l.self_attn.emit(g, &s, n, &call, r));
            // x += down(silu(gate(RMS(x))) * up(RMS(x)))
            pre_norm(g, &l.post_attention_layernorm, x, normed, rows, |g, n, r| l.mlp.emit(g, n, &gated, r, rows));
        }
        // logits = lm_head(RMS(x))   (last row of each sequence unless all_logits)
        self.norm.emit(g, x, None, normed, rows);
        let (mut head_in, logit_rows) = (normed, if all_logits { rows } else { batch });
        if !all_logits && seq > 1 {
            head_in = g.buffer(format!("{tag}.last"), batch, h);
            g.push(Op::LastRows { x: normed, out: head_in, batch, rows_per_batch: seq });
        }
        let logits = g.buffer(format!("{tag}.logits"), logit_rows, self.logits_width);
        g.linear(head_in, self.lm_head, None, Fused::NONE, logits, logit_rows);
        DecoderPass { embeds: x, logits, logit_rows }
    }
}

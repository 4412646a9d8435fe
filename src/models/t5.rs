//! The T5 encoder-decoder (`T5ForConditionalGeneration`, transformers 5.17; docs/models/t5.md):
//! RMS layer norms (T5LayerNorm), attention without 1/sqrt(d) scaling plus a learned bucketed
//! relative-position bias held by block 0 of each stack (bidirectional in the encoder, causal in
//! the decoder, none in cross-attention), gated or plain FFN, untied or tied head with the
//! `scale_decoder_outputs` rule.
//!
//! The residual streams are fp32 buffers: transformers keeps `wo` in fp32 under fp16, which
//! promotes its residual stream to fp32 from block 0's FFN on, and Flan-T5 overflows fp16
//! without it (tests/t5_parity.rs measures what fp16 would cost).
//!
//! The relative-position bias is written by the host ([`StepInput`]): the encoder's once per
//! request, the decoder's before every step from its position (a write into a fixed buffer, so
//! the decode step stays replayable). The decoder's cross-attention keys and values are
//! projected once, in the encoder phase.

use std::sync::Arc;

pub use super::decoder::DecoderPass;
use super::family::Loader;
use super::layers::{
    load_attention, pre_norm, AttentionLayer, AttnCall, AttnSpec, GatedMlp, GatedScratch, Keys, KvCache, Mlp, NormLayer,
};
use serde::Deserialize;

use crate::config::{
    check_activation, check_eps, check_positive, check_text_tokens, check_token, field_error, TokenIds,
};
use crate::error::{Error, Result};
use crate::generate::{EncoderInput, Encoders, KvCaches, Plan, Step, StepInput};
use crate::graph::{Activation, Buf, DType, Fused, Graph, Op, Phase, W};
use crate::weights::Weight;

/// `text_config` of a T5 encoder-decoder (`T5Config`, transformers 5.17 defaults; docs/models/t5.md#config).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct T5Config {
    pub model_type: String,
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    /// None: `num_layers`.
    pub num_decoder_layers: Option<usize>,
    pub num_heads: usize,
    pub relative_attention_num_buckets: usize,
    pub relative_attention_max_distance: usize,
    pub layer_norm_epsilon: f64,
    pub feed_forward_proj: String,
    /// An explicit key wins over the one derived from `feed_forward_proj`.
    pub dense_act_fn: Option<String>,
    pub tie_word_embeddings: Option<bool>,
    /// Written by 5.17's save_pretrained; when absent, `tie_word_embeddings != false`.
    pub scale_decoder_outputs: Option<bool>,
    pub decoder_start_token_id: Option<u32>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<TokenIds>,
    pub pad_token_id: Option<u32>,
    /// Kept on the config like OPT's (the language model's generation config reads it).
    pub max_new_tokens: Option<usize>,
    pub min_new_tokens: Option<usize>,
    pub min_p: Option<f64>,
}

impl Default for T5Config {
    fn default() -> Self {
        Self {
            model_type: "t5".into(),
            vocab_size: 32128,
            d_model: 512,
            d_kv: 64,
            d_ff: 2048,
            num_layers: 6,
            num_decoder_layers: None,
            num_heads: 8,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
            feed_forward_proj: "relu".into(),
            dense_act_fn: None,
            tie_word_embeddings: None,
            scale_decoder_outputs: None,
            decoder_start_token_id: None,
            bos_token_id: None,
            eos_token_id: Some(TokenIds::One(1)),
            pad_token_id: Some(0),
            max_new_tokens: None,
            min_new_tokens: None,
            min_p: None,
        }
    }
}

impl T5Config {
    /// `feed_forward_proj` "gated-gelu" style: `wi_0`, `wi_1`, `wo`; else `wi`, `wo`.
    pub fn is_gated(&self) -> bool {
        self.feed_forward_proj.starts_with("gated-")
    }

    /// The FFN activation as 5.17's `__post_init__` resolves it: the last part of
    /// `feed_forward_proj` ("gated-gelu" meaning `gelu_new`) unless `dense_act_fn` is written.
    pub fn act_name(&self) -> String {
        if let Some(a) = &self.dense_act_fn {
            return a.clone();
        }
        match self.feed_forward_proj.as_str() {
            "gated-gelu" => "gelu_new".into(),
            f => f.rsplit('-').next().unwrap_or(f).to_string(),
        }
    }

    pub fn decoder_layers(&self) -> usize {
        self.num_decoder_layers.unwrap_or(self.num_layers)
    }

    /// Width of the attention projections (`num_heads * d_kv`, may differ from `d_model`).
    pub fn inner_dim(&self) -> usize {
        self.num_heads * self.d_kv
    }

    /// `h * d_model**-0.5` before the head (original tied T5, not Flan): docs/models/t5.md#lm-head.
    pub fn scale_outputs(&self) -> bool {
        self.scale_decoder_outputs.unwrap_or(self.tie_word_embeddings != Some(false))
    }

    /// transformers' `decoder_start_token_id`, falling back to `bos_token_id` (encoder-decoders).
    pub fn decoder_start(&self) -> Option<u32> {
        self.decoder_start_token_id.or(self.bos_token_id)
    }

    pub(crate) fn check(&self) -> Result<(), String> {
        check_positive("text_config.vocab_size", self.vocab_size)?;
        check_positive("text_config.d_model", self.d_model)?;
        check_positive("text_config.d_kv", self.d_kv)?;
        check_positive("text_config.d_ff", self.d_ff)?;
        check_positive("text_config.num_heads", self.num_heads)?;
        check_positive("text_config.num_layers", self.num_layers)?;
        check_positive("text_config.num_decoder_layers", self.decoder_layers())?;
        if self.relative_attention_num_buckets < 4 {
            return Err(field_error(
                "text_config.relative_attention_num_buckets",
                self.relative_attention_num_buckets,
                "it must be at least 4 (T5 uses 32): the encoder halves it, then half of that is exact",
            ));
        }
        if self.relative_attention_max_distance * 4 <= self.relative_attention_num_buckets {
            return Err(field_error(
                "text_config.relative_attention_max_distance",
                self.relative_attention_max_distance,
                format!(
                    "it must exceed a quarter of relative_attention_num_buckets ({}), so the log-spaced buckets are well defined (T5 uses 128)",
                    self.relative_attention_num_buckets
                ),
            ));
        }
        check_eps("text_config.layer_norm_epsilon", self.layer_norm_epsilon)?;
        let parts: Vec<&str> = self.feed_forward_proj.split('-').collect();
        if parts.len() > 2 || (parts.len() == 2 && parts[0] != "gated") {
            return Err(field_error(
                "text_config.feed_forward_proj",
                format!("`{}`", self.feed_forward_proj),
                "it must be `{ACT_FN}` or `gated-{ACT_FN}` (transformers refuses it too), e.g. \"gated-gelu\"",
            ));
        }
        check_activation("text_config.dense_act_fn", &self.act_name(), &["gelu", "gelu_new", "relu"])?;
        let vocab = self.vocab_size;
        match self.decoder_start() {
            Some(id) => check_token("text_config.decoder_start_token_id", id, vocab)?,
            None => {
                return Err("neither `text_config.decoder_start_token_id` nor `text_config.bos_token_id` is set: transformers cannot start the T5 decoder either; add \"decoder_start_token_id\": 0 (T5's <pad>)".into())
            }
        }
        check_text_tokens(&[], self.eos_token_id.as_ref(), vocab, self.max_new_tokens)
    }
}

/// transformers' `T5Attention._relative_position_bucket` for one relative position
/// (`key_pos - query_pos`), in the f32 arithmetic torch uses.
pub fn relative_position_bucket(rel: i64, bidirectional: bool, num_buckets: usize, max_distance: usize) -> usize {
    let mut nb = num_buckets as i64;
    let mut ret = 0i64;
    let n = if bidirectional {
        nb /= 2;
        if rel > 0 {
            ret += nb;
        }
        rel.abs()
    } else {
        (-rel).max(0)
    };
    let max_exact = nb / 2;
    if n < max_exact {
        return (ret + n) as usize;
    }
    // torch: log(n.float() / max_exact) / math.log(max_distance / max_exact) * (nb - max_exact),
    // the Python float cast to f32, truncated toward zero.
    let log_ratio = (n as f32 / max_exact as f32).ln();
    let log_range = (max_distance as f64 / max_exact as f64).ln() as f32;
    let large = max_exact + (log_ratio / log_range * (nb - max_exact) as f32) as i64;
    (ret + large.min(nb - 1)) as usize
}

/// A block-0 relative-attention-bias table `[num_buckets, heads]` on the host.
#[derive(Clone)]
struct RelBias {
    table: Arc<[f32]>,
    heads: usize,
    num_buckets: usize,
    max_distance: usize,
    bidirectional: bool,
}

impl RelBias {
    /// `[heads * q_len, kv_cols]`: element (h, i, j) = table[bucket(j - (first + i)), h] for
    /// keys `j < kv_len`, 0 beyond (those columns are never read).
    fn values(&self, first: usize, q_len: usize, kv_len: usize, kv_cols: usize) -> Vec<f32> {
        let mut out = vec![0.0f32; self.heads * q_len * kv_cols];
        for i in 0..q_len {
            for j in 0..kv_len.min(kv_cols) {
                let rel = j as i64 - (first + i) as i64;
                let b = relative_position_bucket(rel, self.bidirectional, self.num_buckets, self.max_distance);
                for h in 0..self.heads {
                    out[(h * q_len + i) * kv_cols + j] = self.table[b * self.heads + h];
                }
            }
        }
        out
    }
}

enum Ffn {
    /// `wo(act(wi_0(x)) * wi_1(x))` (`gated-*`).
    Gated(GatedMlp),
    /// `wo(act(wi(x)))` (original T5: relu).
    Plain(Mlp),
}

struct Block {
    self_norm: NormLayer,
    self_attn: AttentionLayer,
    /// Decoder blocks: `layer.1.EncDecAttention` and its norm.
    cross: Option<(NormLayer, AttentionLayer)>,
    ff_norm: NormLayer,
    ff: Ffn,
}

struct Stack {
    blocks: Vec<Block>,
    final_layer_norm: NormLayer,
    bias: RelBias,
}

pub struct T5 {
    pub cfg: T5Config,
    pub shared: W,
    encoder: Stack,
    decoder: Stack,
    lm_head: W,
}

/// What the encoder phase leaves for the decoder.
pub struct EncoderOut {
    /// `[batch * len, d_model]` (fp16) encoder output.
    pub hidden: Buf,
    /// Per decoder layer, the cross-attention keys and values `[batch * len, num_heads * d_kv]`.
    pub cross: Vec<(Buf, Buf)>,
    pub batch: usize,
    pub len: usize,
    /// `[batch * len, d_model]` input embeddings (image rows scattered in).
    pub embeds: Buf,
    /// Additive `[batch, len]` padding mask over the encoder rows, when the input may be padded.
    pub key_mask: Option<Buf>,
}

/// What one stack's attention reads: each block's self-attention keys, their padding mask and
/// the relative position bias `[heads, keys]`, and for the decoder the per-layer cross-attention
/// keys and values over `len` encoder rows with the encoder's padding mask.
struct StackKeys<'a> {
    keys: &'a dyn Fn(usize) -> Keys,
    mask: Option<Buf>,
    bias: Buf,
    cross: Option<CrossKeys<'a>>,
}

/// The rows one stack runs over: `rows_per_item` rows of each of `batch` items, read from
/// `input` (fp16 embeddings) and left normalised in `output`.
#[derive(Clone, Copy)]
struct StackRows {
    input: Buf,
    output: Buf,
    batch: usize,
    rows_per_item: usize,
}

/// The decoder's cross-attention keys: per layer the projected K and V over `len` encoder rows
/// per item, and the encoder's padding mask.
struct CrossKeys<'a> {
    kv: &'a [(Buf, Buf)],
    len: usize,
    mask: Option<Buf>,
}

/// The T5 half of a vision-language plan (BLIP-2 Flan-T5, InstructBLIP Flan-T5): what
/// [`T5::build_phases`] emits after the image phases.
pub struct T5Phases {
    /// The encoder over the input ids with the image rows scattered in, then every decoder
    /// layer's cross-attention keys and values.
    pub encoder: Phase,
    /// The decoder's first step (the start token at position 0) and every later one.
    pub prefill: Step,
    pub decode: Step,
    /// The decoder's self-attention caches. Only these follow beams: the cross-attention keys and
    /// values are the same for every beam of an input (its encoder inputs are repeated per beam),
    /// and beams move only among their input's rows.
    pub kv: KvCaches,
    /// The relative biases the host writes before the encoder and each decoder step.
    pub step_inputs: Vec<StepInput>,
    pub encoder_input: EncoderInput,
    /// `[batch * input_len, d_model]` encoder input embeddings and encoder output.
    pub encoder_embeds: Buf,
    pub encoder_out: Buf,
}

impl T5Phases {
    /// The whole plan: the image `encoders`, then the T5 encoder phase, the decoder from its
    /// start token (`prompt_len` 1) with a cache of `max_new_tokens` rows.
    pub fn into_plan(self, graph: Graph, batch: usize, max_new_tokens: usize, mut encoders: Encoders) -> Plan {
        encoders.phases.push(self.encoder);
        encoders.outputs.extend([("encoder_embeds", self.encoder_embeds), ("encoder_out", self.encoder_out)]);
        Plan {
            graph,
            batch,
            prompt_len: 1,
            capacity: max_new_tokens,
            max_new_tokens,
            inputs: encoders.inputs,
            encoders: encoders.phases,
            outputs: encoders.outputs,
            prefill: self.prefill,
            decode: self.decode,
            kv: self.kv,
            key_mask: None,
            encoder_input: Some(self.encoder_input),
            step_inputs: self.step_inputs,
            prompt_inputs: Vec::new(),
            image_stage: encoders.image_stage,
        }
    }
}

impl T5 {
    /// `prefix` is the `T5ForConditionalGeneration` module (`language_model` in BLIP-2).
    pub fn load(cfg: &T5Config, ld: &mut Loader, prefix: &str) -> Result<Self> {
        let (d, v) = (cfg.d_model, cfg.vocab_size);
        let act = match cfg.act_name().as_str() {
            "gelu" => Activation::Gelu,
            "gelu_new" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            other => {
                return Err(Error::config(
                    ld.ckpt.origin(),
                    format!("text_config.dense_act_fn `{other}`: glimpse runs T5 with gelu, gelu_new or relu"),
                ))
            }
        };
        // transformers ties encoder/decoder embed_tokens to `shared`; either may be what is stored.
        let shared_name = [format!("{prefix}.shared.weight"), format!("{prefix}.encoder.embed_tokens.weight")]
            .into_iter()
            .find(|n| ld.ckpt.contains(n))
            .unwrap_or_else(|| format!("{prefix}.shared.weight"));
        let shared = ld.tensor(&shared_name, &[v, d])?;
        let encoder = load_stack(cfg, ld, &format!("{prefix}.encoder"), cfg.num_layers, false, act)?;
        let decoder = load_stack(cfg, ld, &format!("{prefix}.decoder"), cfg.decoder_layers(), true, act)?;
        // docs/models/t5.md#lm-head: a stored head is used as it is (Flan: distinct from `shared`).
        let head_name = format!("{prefix}.lm_head.weight");
        let lm_head = if ld.ckpt.contains(&head_name) { ld.tensor(&head_name, &[v, d])? } else { shared };
        let mut t5 = Self { cfg: cfg.clone(), shared, encoder, decoder, lm_head };
        if cfg.scale_outputs() {
            // `h * d_model**-0.5` after the final norm, folded into its weight (one fp16
            // rounding of the product; only original tied T5 scales, Flan does not).
            let NormLayer::RmsNorm { weight, eps } = t5.decoder.final_layer_norm else {
                unreachable!("T5 norms are RMS")
            };
            let s = (d as f64).powf(-0.5) as f32;
            let scaled: Vec<half::f16> =
                ld.table.get(weight).as_slice().iter().map(|x| half::f16::from_f32(x.to_f32() * s)).collect();
            let name = format!("{prefix}.decoder.final_layer_norm.weight*d_model^-0.5");
            let weight = ld.table.add(name, Weight::from_vec(vec![d], scaled));
            t5.decoder.final_layer_norm = NormLayer::RmsNorm { weight, eps };
        }
        Ok(t5)
    }

    pub fn d_model(&self) -> usize {
        self.cfg.d_model
    }

    /// The encoder phase over `input_len` tokens per item (`image`'s rows replacing the
    /// placeholder token's embeddings), and decoder steps for up to `max_new_tokens` new tokens:
    /// the decoder input is the start token, then each generated token but the last.
    pub fn build_phases(
        &self,
        g: &mut Graph,
        batch: usize,
        input_len: usize,
        max_new_tokens: usize,
        image: (Buf, u32),
    ) -> Result<T5Phases> {
        if input_len == 0 {
            return Err(Error::InvalidInput("the encoder input is empty: it needs at least one token".into()));
        }
        let decoder_start = self.cfg.decoder_start().ok_or_else(|| {
            Error::InvalidInput(
                "the T5 config has neither decoder_start_token_id nor bos_token_id: add \"decoder_start_token_id\": 0"
                    .into(),
            )
        })?;
        let key_mask = g.buffer("encoder.key_mask", batch, input_len);
        let (enc, enc_bias) = self.build_encoder(g, batch, input_len, Some(image), Some(key_mask), "encoder");
        let encoder = g.take_phase("encoder");
        let cache = self.kv_cache(g, batch, max_new_tokens);
        let (pre, pre_bias) = self.build_decoder(g, &cache, &enc, "prefill");
        let prefill = g.take_phase("prefill");
        let (dec, dec_bias) = self.build_decoder(g, &cache, &enc, "decode");
        let decode = Phase { replayable: true, ..g.take_phase("decode") };
        Ok(T5Phases {
            encoder,
            prefill: Step { phase: prefill, logits: pre.logits, rows_per_seq: 1 },
            decode: Step { phase: decode, logits: dec.logits, rows_per_seq: 1 },
            kv: cache.caches(),
            step_inputs: vec![enc_bias, pre_bias, dec_bias],
            encoder_input: EncoderInput { len: input_len, decoder_start, key_mask },
            encoder_embeds: enc.embeds,
            encoder_out: enc.hidden,
        })
    }

    /// The `describe` line of the language model.
    pub fn describe(&self) -> String {
        let t = &self.cfg;
        format!(
            "t5:         {} encoder + {} decoder layers, d_model {}, {} heads x {}, ff {} ({}{}), vocab {}, {} buckets / max distance {}, head {}",
            t.num_layers,
            t.decoder_layers(),
            t.d_model,
            t.num_heads,
            t.d_kv,
            t.d_ff,
            if t.is_gated() { "gated " } else { "" },
            t.act_name(),
            t.vocab_size,
            t.relative_attention_num_buckets,
            t.relative_attention_max_distance,
            if t.scale_outputs() { "scaled by d_model^-0.5" } else { "unscaled" }
        )
    }

    /// transformers' generate() hands over to the T5 language model, whose generation config
    /// comes from `text_config` (EOS `</s>` = 1, 20 new tokens after the decoder start token).
    pub fn default_options(&self) -> crate::generate::GenerateOptions {
        let t = &self.cfg;
        crate::generate::GenerateOptions::from_model_config(
            t.eos_token_id.as_ref(),
            t.max_new_tokens,
            t.min_new_tokens,
            t.min_p,
        )
    }

    /// The decoder's self-attention caches.
    pub fn kv_cache(&self, g: &mut Graph, batch: usize, capacity: usize) -> KvCache {
        KvCache::new(g, "t5", self.decoder.blocks.len(), batch, capacity, self.cfg.inner_dim())
    }

    /// Emits the encoder over `len` tokens per item (the executor's tokens), `image` rows (when
    /// given) scattered over the rows holding the image token, then every decoder layer's
    /// cross-attention keys and values. `phase` names the phase these ops end up in: the
    /// returned [`StepInput`] (the encoder's relative bias) is written before it.
    pub fn build_encoder(
        &self,
        g: &mut Graph,
        batch: usize,
        len: usize,
        image: Option<(Buf, u32)>,
        key_mask: Option<Buf>,
        phase: &'static str,
    ) -> (EncoderOut, StepInput) {
        let (d, rows) = (self.cfg.d_model, batch * len);
        let embeds = g.buffer(format!("{phase}.embeds"), rows, d);
        g.push(Op::Embed { table: self.shared, out: embeds });
        if let Some((src, token)) = image {
            g.push(Op::ScatterTokens { src, token, out: embeds, batch, rows_per_batch: len });
        }
        let bias = g.buffer(format!("{phase}.position_bias"), self.cfg.num_heads * len, len);
        let hidden = g.buffer(format!("{phase}.hidden"), rows, d);
        let keys = StackKeys { keys: &|_| Keys::Same, mask: key_mask, bias, cross: None };
        let rows_in = StackRows { input: embeds, output: hidden, batch, rows_per_item: len };
        self.run_stack(g, &self.encoder, &rows_in, &keys, phase);
        let inner = self.cfg.inner_dim();
        let cross = self
            .decoder
            .blocks
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let (_, attn) = b.cross.as_ref().expect("decoder blocks cross-attend");
                let k = g.buffer(format!("{phase}.{i}.cross_k"), rows, inner);
                let v = g.buffer(format!("{phase}.{i}.cross_v"), rows, inner);
                attn.project_kv(g, hidden, k, v, rows);
                (k, v)
            })
            .collect();
        let rb = self.encoder.bias.clone();
        let fill = Box::new(move |_position: usize| rb.values(0, len, len, len));
        let rows = self.cfg.num_heads * len;
        (EncoderOut { hidden, cross, batch, len, embeds, key_mask }, StepInput { phase, buf: bias, rows, fill })
    }

    /// Emits one decoder step: one token per sequence (the executor's tokens) at the executor's
    /// position, self-attention over `cache`, cross-attention over `enc`. The returned
    /// [`StepInput`] (the decoder's relative bias for the step's position) is written before
    /// every run of phase `phase`.
    pub fn build_decoder(
        &self,
        g: &mut Graph,
        cache: &KvCache,
        enc: &EncoderOut,
        phase: &'static str,
    ) -> (DecoderPass, StepInput) {
        let (d, batch) = (self.cfg.d_model, cache.batch);
        let embeds = g.buffer(format!("{phase}.embeds"), batch, d);
        g.push(Op::Embed { table: self.shared, out: embeds });
        let capacity = cache.capacity;
        let bias = g.buffer(format!("{phase}.position_bias"), self.cfg.num_heads, capacity);
        let normed_out = g.buffer(format!("{phase}.final"), batch, d);
        // The decoder's own input is never padded; its cross-attention masks the encoder's pads.
        let keys = StackKeys {
            keys: &|i| cache.keys(i),
            mask: None,
            bias,
            cross: Some(CrossKeys { kv: &enc.cross, len: enc.len, mask: enc.key_mask }),
        };
        let rows_in = StackRows { input: embeds, output: normed_out, batch, rows_per_item: 1 };
        self.run_stack(g, &self.decoder, &rows_in, &keys, phase);
        let logits = g.buffer(format!("{phase}.logits"), batch, self.cfg.vocab_size);
        g.linear(normed_out, self.lm_head, None, Fused::NONE, logits, batch);
        let rb = self.decoder.bias.clone();
        // Query at `position` over keys 0..=position (the cache after this step's append).
        let fill = Box::new(move |position: usize| rb.values(position, 1, position + 1, capacity));
        let heads = self.cfg.num_heads;
        (DecoderPass { embeds, logits, logit_rows: batch }, StepInput { phase, buf: bias, rows: heads, fill })
    }

    /// One stack over [`StackRows`]: fp32 residual stream from the input, each block's
    /// self-attention (keys from `keys.keys(i)`, relative bias `keys.bias`), cross-attention when
    /// `keys.cross` (per-layer K/V, keys per item) is given, FFN; `output = final_layer_norm(x)`
    /// (fp16).
    fn run_stack(&self, g: &mut Graph, stack: &Stack, rows_in: &StackRows, keys: &StackKeys, phase: &str) {
        let StackRows { input: embeds, output: out, batch, rows_per_item } = *rows_in;
        let bias = keys.bias;
        let c = &self.cfg;
        let rows = batch * rows_per_item;
        let x = g.typed_buffer(format!("{phase}.residual"), rows, c.d_model, DType::F32);
        g.push(Op::Convert { x: embeds, out: x, rows });
        let normed = g.buffer(format!("{phase}.normed"), rows, c.d_model);
        let ff = GatedScratch {
            gate: g.buffer(format!("{phase}.wi_0"), rows, c.d_ff),
            up: g.buffer(format!("{phase}.wi_1"), rows, c.d_ff),
            hidden: g.buffer(format!("{phase}.ff"), rows, c.d_ff),
        };
        let s = stack.blocks[0].self_attn.scratch(g, phase, rows, rows);
        for (i, b) in stack.blocks.iter().enumerate() {
            let call = AttnCall {
                head_bias: Some(bias),
                causal: keys.cross.is_some(),
                key_mask: keys.mask,
                ..AttnCall::new(batch, rows_per_item, (keys.keys)(i))
            };
            pre_norm(g, &b.self_norm, x, normed, rows, |g, n, r| b.self_attn.emit(g, &s, n, &call, r));
            if let (Some((norm, attn)), Some(cross)) = (&b.cross, &keys.cross) {
                let (k, v) = cross.kv[i];
                let call = AttnCall {
                    key_mask: cross.mask,
                    ..AttnCall::new(batch, rows_per_item, Keys::Projected { k, v, kv_len: cross.len })
                };
                pre_norm(g, norm, x, normed, rows, |g, n, r| attn.emit(g, &s, n, &call, r));
            }
            pre_norm(g, &b.ff_norm, x, normed, rows, |g, n, r| match &b.ff {
                Ffn::Gated(m) => m.emit(g, n, &ff, r, rows),
                Ffn::Plain(m) => m.emit(g, n, ff.hidden, r, rows),
            });
        }
        stack.final_layer_norm.emit(g, x, None, out, rows);
    }
}

fn load_stack(
    cfg: &T5Config,
    ld: &mut Loader,
    p: &str,
    layers: usize,
    decoder: bool,
    act: Activation,
) -> Result<Stack> {
    let (d, ff) = (cfg.d_model, cfg.d_ff);
    let eps = cfg.layer_norm_epsilon as f32;
    let rms = |ld: &mut Loader, name: String| -> Result<NormLayer> {
        Ok(NormLayer::RmsNorm { weight: ld.tensor(&name, &[d])?, eps })
    };
    let attention = |ld: &mut Loader, prefix: String| {
        let names = ["q", "k", "v", "o"].map(|n| format!("{prefix}.{n}"));
        // T5 has no 1/sqrt(d_kv): its initialisation absorbs it.
        let spec =
            AttnSpec { scale: 1.0, ..AttnSpec::mha(names.each_ref().map(String::as_str), d, cfg.num_heads, cfg.d_kv) };
        load_attention(ld, &spec)
    };
    let (nb, heads) = (cfg.relative_attention_num_buckets, cfg.num_heads);
    let bias_w =
        ld.tensor(&format!("{p}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"), &[nb, heads])?;
    let table: Arc<[f32]> = ld.table.get(bias_w).as_slice().iter().map(|x| x.to_f32()).collect();
    let blocks = (0..layers)
        .map(|i| {
            let l = format!("{p}.block.{i}.layer");
            let ff_layer = if decoder { 2 } else { 1 };
            let cross = if decoder {
                Some((rms(ld, format!("{l}.1.layer_norm.weight"))?, attention(ld, format!("{l}.1.EncDecAttention"))?))
            } else {
                None
            };
            let dense = format!("{l}.{ff_layer}.DenseReluDense");
            let ff = if cfg.is_gated() {
                Ffn::Gated(GatedMlp {
                    gate: ld.linear(&format!("{dense}.wi_0"), d, ff, false)?,
                    up: ld.linear(&format!("{dense}.wi_1"), d, ff, false)?,
                    down: ld.linear(&format!("{dense}.wo"), ff, d, false)?,
                    act,
                })
            } else {
                Ffn::Plain(Mlp {
                    fc1: ld.linear(&format!("{dense}.wi"), d, ff, false)?,
                    fc2: ld.linear(&format!("{dense}.wo"), ff, d, false)?,
                    act,
                })
            };
            Ok(Block {
                self_norm: rms(ld, format!("{l}.0.layer_norm.weight"))?,
                self_attn: attention(ld, format!("{l}.0.SelfAttention"))?,
                cross,
                ff_norm: rms(ld, format!("{l}.{ff_layer}.layer_norm.weight"))?,
                ff,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Stack {
        blocks,
        final_layer_norm: rms(ld, format!("{p}.final_layer_norm.weight"))?,
        bias: RelBias {
            table,
            heads,
            num_buckets: nb,
            max_distance: cfg.relative_attention_max_distance,
            bidirectional: !decoder,
        },
    })
}

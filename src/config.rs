//! Hugging Face `config.json`, `generation_config.json` and image-processor configs, as serde
//! structs whose defaults are transformers' defaults (hub configs omit fields equal to them).

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{DeserializeOwned, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};

/// Reads and parses a JSON file, naming the file in every error.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = crate::files::read(path, crate::files::MAX_CONFIG_BYTES)?;
    from_json_slice(&bytes, path)
}

/// Parses JSON bytes as `T`. The text goes through a [`Value`] first, so a repeated key keeps
/// its last value as Python's `json` does; type errors name the field (`vision_config.image_size`).
pub fn from_json_slice<T: DeserializeOwned>(bytes: &[u8], path: &Path) -> Result<T> {
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| Error::Json { path: path.to_path_buf(), msg: e.to_string() })?;
    from_json_value(&value, path)
}

/// Deserializes an already parsed JSON value, naming the offending field in the error.
pub fn from_json_value<T: DeserializeOwned>(value: &Value, path: &Path) -> Result<T> {
    from_json_value_at(value, path, "")
}

/// [`from_json_value`] for a section of a file: field names in errors get `prefix` (`text_config.`).
fn from_json_value_at<T: DeserializeOwned>(value: &Value, path: &Path, prefix: &str) -> Result<T> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let field = e.path().to_string();
        // Valid JSON holding a value of the wrong type: a config error about that field.
        let msg = match (field.as_str(), prefix) {
            (".", "") => e.inner().to_string(),
            (".", p) => format!("`{}`: {}", p.trim_end_matches('.'), e.inner()),
            (f, p) => format!("`{p}{f}`: {}", e.inner()),
        };
        Error::config(path, msg)
    })
}

/// The error for one config field: its name, its value and what would fix it.
fn field_error(field: &str, value: impl fmt::Display, fix: impl fmt::Display) -> String {
    format!("`{field}` is {value}: {fix}")
}

fn check_positive(field: &str, value: usize) -> Result<(), String> {
    if value == 0 {
        return Err(field_error(field, 0, "it must be at least 1"));
    }
    Ok(())
}

/// transformers' attention layers raise when the hidden size does not split into whole heads.
fn check_heads(section: &str, hidden: usize, heads: usize) -> Result<(), String> {
    check_positive(&format!("{section}.hidden_size"), hidden)?;
    check_positive(&format!("{section}.num_attention_heads"), heads)?;
    if hidden % heads != 0 {
        return Err(field_error(
            &format!("{section}.hidden_size"),
            hidden,
            format!("it must be a multiple of {section}.num_attention_heads ({heads}); each head gets hidden_size / num_attention_heads features"),
        ));
    }
    Ok(())
}

fn check_eps(field: &str, eps: f64) -> Result<(), String> {
    if !(eps > 0.0 && eps.is_finite()) {
        return Err(field_error(
            field,
            eps,
            "it must be a positive finite number (BLIP-2 uses 1e-6 for the vision model, 1e-12 for the Q-Former)",
        ));
    }
    Ok(())
}

fn check_token(field: &str, id: u32, vocab_size: usize) -> Result<(), String> {
    if id as usize >= vocab_size {
        return Err(field_error(
            field,
            id,
            format!(
                "it is outside the vocabulary (text_config.vocab_size = {vocab_size}); token ids run from 0 to {}",
                vocab_size.saturating_sub(1)
            ),
        ));
    }
    Ok(())
}

/// The activation names transformers' `ACT2FN` knows (5.17).
const KNOWN_ACTIVATIONS: [&str; 24] = [
    "gelu",
    "gelu_10",
    "gelu_fast",
    "gelu_new",
    "gelu_python",
    "gelu_pytorch_tanh",
    "gelu_python_tanh",
    "gelu_accurate",
    "hardswish",
    "laplace",
    "leaky_relu",
    "linear",
    "mish",
    "quick_gelu",
    "relu",
    "relu2",
    "relu6",
    "sigmoid",
    "silu",
    "sqrtsoftplus",
    "swish",
    "tanh",
    "prelu",
    "xielu",
];

/// `name` must be one of `implemented`; a name transformers knows but glimpse does not run is
/// told apart from a name that is not an activation at all.
fn check_activation(field: &str, name: &str, implemented: &[&str]) -> Result<(), String> {
    if implemented.contains(&name) {
        return Ok(());
    }
    let fix = if KNOWN_ACTIVATIONS.contains(&name) {
        format!("glimpse implements only {} here", implemented.join(", "))
    } else {
        format!("not an activation transformers knows (ACT2FN); this model uses {}", implemented.join(", "))
    };
    Err(field_error(field, format!("`{name}`"), fix))
}

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

/// `vision_config` of a CLIP vision tower (`CLIPVisionConfig`, 5.17 defaults: ViT-B/32).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
    pub layer_norm_eps: f64,
    pub hidden_act: String,
    pub projection_dim: usize,
}

impl Default for ClipVisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            image_size: 224,
            patch_size: 32,
            num_channels: 3,
            layer_norm_eps: 1e-5,
            hidden_act: "quick_gelu".into(),
            projection_dim: 512,
        }
    }
}

impl ClipVisionConfig {
    /// LlavaConfig's vision tower when config.json has no `vision_config` (CLIP ViT-L/14-336).
    pub fn llava_default() -> Self {
        Self {
            hidden_size: 1024,
            intermediate_size: 4096,
            num_hidden_layers: 24,
            num_attention_heads: 16,
            image_size: 336,
            patch_size: 14,
            projection_dim: 768,
            ..Self::default()
        }
    }
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

    /// Checks every field the tower reads; `section` prefixes field names (`vision_config`).
    pub fn check(&self, section: &str) -> Result<(), String> {
        check_heads(section, self.hidden_size, self.num_attention_heads)?;
        check_positive(&format!("{section}.intermediate_size"), self.intermediate_size)?;
        check_positive(&format!("{section}.num_hidden_layers"), self.num_hidden_layers)?;
        check_positive(&format!("{section}.patch_size"), self.patch_size)?;
        if self.image_size == 0 || self.image_size % self.patch_size != 0 {
            return Err(field_error(
                &format!("{section}.image_size"),
                self.image_size,
                format!(
                    "it must be a positive multiple of {section}.patch_size ({}), so the patches tile the image",
                    self.patch_size
                ),
            ));
        }
        if self.num_channels != 3 {
            return Err(field_error(
                &format!("{section}.num_channels"),
                self.num_channels,
                "glimpse feeds RGB images: it must be 3",
            ));
        }
        check_eps(&format!("{section}.layer_norm_eps"), self.layer_norm_eps)?;
        check_activation(&format!("{section}.hidden_act"), &self.hidden_act, &["quick_gelu", "gelu", "gelu_python"])
    }

    /// The MLP activation (`check` has accepted the name).
    pub fn activation(&self) -> crate::graph::Activation {
        if self.hidden_act == "quick_gelu" {
            crate::graph::Activation::QuickGelu
        } else {
            crate::graph::Activation::Gelu
        }
    }
}

/// `qformer_config` (BERT-style, post-norm).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct QFormerConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub cross_attention_frequency: usize,
    pub encoder_hidden_size: usize,
    pub layer_norm_eps: f64,
    pub hidden_act: String,
    /// Word and position embeddings of the instruction (InstructBLIP; BLIP-2 has no text input).
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
}

impl Default for QFormerConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            cross_attention_frequency: 2,
            encoder_hidden_size: 1408,
            layer_norm_eps: 1e-12,
            hidden_act: "gelu".into(),
            vocab_size: 30522,
            max_position_embeddings: 512,
        }
    }
}

impl QFormerConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
    /// transformers: `layer_idx % cross_attention_frequency == 0`.
    pub fn has_cross_attention(&self, layer: usize) -> bool {
        self.cross_attention_frequency != 0 && layer % self.cross_attention_frequency == 0
    }
}

/// A token id field that HF writes either as one integer or as a list.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

// By hand rather than `#[serde(untagged)]`, whose error ("did not match any variant") says
// nothing about what was expected.
impl<'de> Deserialize<'de> for TokenIds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Ids;
        impl<'de> Visitor<'de> for Ids {
            type Value = TokenIds;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a token id (an integer from 0 to 4294967295) or a list of token ids")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<TokenIds, E> {
                u32::try_from(v)
                    .map(TokenIds::One)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(v), &self))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<TokenIds, E> {
                u32::try_from(v)
                    .map(TokenIds::One)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<TokenIds, A::Error> {
                let mut ids = Vec::new();
                while let Some(id) = seq.next_element::<u32>()? {
                    ids.push(id);
                }
                Ok(TokenIds::Many(ids))
            }
        }
        d.deserialize_any(Ids)
    }
}

/// `text_config` for an OPT decoder (the only BLIP-2 language model glimpse runs so far).
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
    /// Kept on the config like OPT's (the language model's generation config reads it).
    pub max_new_tokens: Option<usize>,
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
        }
    }
}

impl LlamaConfig {
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
        if self.max_new_tokens == Some(0) {
            return Err(field_error(
                "text_config.max_new_tokens",
                0,
                "transformers rejects it (it must be at least 1); remove it for the default of 20",
            ));
        }
        self.rope().map(|_| ())
    }
}

/// `text_config` of a T5 encoder-decoder (`T5Config`, transformers 5.17 defaults; design/t5.md §1).
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

    /// `h * d_model**-0.5` before the head (original tied T5, not Flan): design/t5.md §4.
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
        for id in self.eos_token_id.as_ref().map(TokenIds::to_vec).unwrap_or_default() {
            check_token("text_config.eos_token_id", id, vocab)?;
        }
        if self.max_new_tokens == Some(0) {
            return Err(field_error(
                "text_config.max_new_tokens",
                0,
                "transformers rejects it (it must be at least 1); remove it for the default of 20",
            ));
        }
        Ok(())
    }
}

/// `text_config`: the language model, one variant per decoder kind glimpse runs. LLaMA and T5
/// decoders are parsed to a clear "not supported yet" until their families land.
#[derive(Debug, Clone)]
pub enum TextConfig {
    Opt(OptConfig),
    Llama(LlamaConfig),
    T5(T5Config),
}

impl Default for TextConfig {
    /// transformers' BLIP-2 default text config is OPT's.
    fn default() -> Self {
        TextConfig::Opt(OptConfig::default())
    }
}

impl TextConfig {
    /// The decoder kinds transformers may name in `text_config.model_type` that glimpse knows of
    /// but does not run yet.
    const NOT_YET: &'static [&'static str] = &["mistral", "vicuna", "mt5"];

    /// Parses a `text_config` object by its `model_type` (`opt` when absent, as transformers);
    /// `path` names the file in errors.
    pub fn from_value(value: &Value, path: &Path) -> Result<Self> {
        Self::from_value_or(value, path, "opt")
    }

    /// [`TextConfig::from_value`] where a missing `model_type` means `default_kind` (LLaVA: llama).
    pub fn from_value_or(value: &Value, path: &Path, default_kind: &str) -> Result<Self> {
        let kind = match value.get("model_type") {
            None | Some(Value::Null) => default_kind.to_string(),
            _ => Self::kind(value).map_err(|m| Error::config(path, m))?,
        };
        match kind.as_str() {
            "opt" => Ok(TextConfig::Opt(from_json_value_at(value, path, "text_config.")?)),
            "llama" => {
                let mut c: LlamaConfig = from_json_value_at(value, path, "text_config.")?;
                c.model_type = "llama".into();
                Ok(TextConfig::Llama(c))
            }
            "t5" => {
                let mut c: T5Config = from_json_value_at(value, path, "text_config.")?;
                c.model_type = "t5".into();
                Ok(TextConfig::T5(c))
            }
            other => Err(Error::Unsupported(format!("{}: {}", path.display(), Self::unsupported(other)))),
        }
    }

    fn kind(value: &Value) -> Result<String, String> {
        match value.get("model_type") {
            None | Some(Value::Null) => Ok("opt".into()),
            Some(Value::String(t)) => Ok(t.clone()),
            Some(other) => Err(field_error("text_config.model_type", other, "it must be a string such as \"opt\"")),
        }
    }

    fn unsupported(kind: &str) -> String {
        let known = if Self::NOT_YET.contains(&kind) { " (planned)" } else { "" };
        format!("text_config.model_type `{kind}` is not supported yet{known}: glimpse runs OPT, LLaMA and T5 language models so far")
    }

    pub fn model_type(&self) -> &str {
        match self {
            TextConfig::Opt(c) => &c.model_type,
            TextConfig::Llama(c) => &c.model_type,
            TextConfig::T5(c) => &c.model_type,
        }
    }
    pub fn hidden_size(&self) -> usize {
        match self {
            TextConfig::Opt(c) => c.hidden_size,
            TextConfig::Llama(c) => c.hidden_size,
            TextConfig::T5(c) => c.d_model,
        }
    }
    pub fn vocab_size(&self) -> usize {
        match self {
            TextConfig::Opt(c) => c.vocab_size,
            TextConfig::Llama(c) => c.vocab_size,
            TextConfig::T5(c) => c.vocab_size,
        }
    }
    pub fn max_position_embeddings(&self) -> usize {
        match self {
            TextConfig::Opt(c) => c.max_position_embeddings,
            TextConfig::Llama(c) => c.max_position_embeddings,
            // Relative positions: no table bounds the length (transformers' default length applies).
            TextConfig::T5(_) => usize::MAX / 4,
        }
    }
    pub fn eos_token_id(&self) -> Option<&TokenIds> {
        match self {
            TextConfig::Opt(c) => c.eos_token_id.as_ref(),
            TextConfig::Llama(c) => c.eos_token_id.as_ref(),
            TextConfig::T5(c) => c.eos_token_id.as_ref(),
        }
    }
    /// `max_new_tokens` kept on the text config (the language model's generation config reads it).
    pub fn max_new_tokens(&self) -> Option<usize> {
        match self {
            TextConfig::Opt(c) => c.max_new_tokens,
            TextConfig::Llama(c) => c.max_new_tokens,
            TextConfig::T5(c) => c.max_new_tokens,
        }
    }
    /// `min_new_tokens` and `min_p` kept on the text config (see [`OptConfig::min_new_tokens`]).
    /// (LLaVA's LLaMA text config keeps neither: its settings come from generation_config.json.)
    pub fn min_new_tokens(&self) -> Option<usize> {
        match self {
            TextConfig::Opt(c) => c.min_new_tokens,
            TextConfig::T5(c) => c.min_new_tokens,
            TextConfig::Llama(_) => None,
        }
    }
    pub fn min_p(&self) -> Option<f64> {
        match self {
            TextConfig::Opt(c) => c.min_p,
            TextConfig::T5(c) => c.min_p,
            TextConfig::Llama(_) => None,
        }
    }
    /// The OPT config, or an error naming the decoder kind (for OPT-only code such as synth).
    pub fn opt(&self) -> Result<&OptConfig> {
        match self {
            TextConfig::Opt(c) => Ok(c),
            other => Err(Error::Unsupported(format!(
                "this needs an OPT language model; text_config.model_type is `{}`",
                other.model_type()
            ))),
        }
    }
}

impl<'de> Deserialize<'de> for TextConfig {
    /// For configs built in code (synth presets); config.json goes through [`TextConfig::from_value`],
    /// whose errors name the field.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use serde::de::Error as _;
        let value = Value::deserialize(d)?;
        match Self::kind(&value).map_err(D::Error::custom)?.as_str() {
            "opt" => serde_json::from_value(value).map(TextConfig::Opt).map_err(D::Error::custom),
            "llama" => serde_json::from_value(value).map(TextConfig::Llama).map_err(D::Error::custom),
            "t5" => serde_json::from_value(value).map(TextConfig::T5).map_err(D::Error::custom),
            other => Err(D::Error::custom(Self::unsupported(other))),
        }
    }
}

/// `config.json` of a `Blip2ForConditionalGeneration` checkpoint.
#[derive(Debug, Clone, Deserialize)]
pub struct Blip2Config {
    #[serde(default)]
    pub vision_config: VisionConfig,
    #[serde(default)]
    pub qformer_config: QFormerConfig,
    #[serde(default)]
    pub text_config: TextConfig,
    #[serde(default = "default_num_query_tokens")]
    pub num_query_tokens: usize,
    #[serde(default, alias = "image_token_id")]
    pub image_token_index: Option<u32>,
    /// As written in config.json; transformers derives it from `text_config.model_type` when
    /// absent, and a written value wins.
    #[serde(default)]
    pub use_decoder_only_language_model: Option<bool>,
}

fn default_num_query_tokens() -> usize {
    32
}

/// The model family named by `config.json`'s `model_type`.
#[derive(Debug, Clone)]
pub enum ModelConfig {
    Blip2(Blip2Config),
    Clip(ClipConfig),
    Llava(LlavaConfig),
    InstructBlip(InstructBlipConfig),
}

impl ModelConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = crate::files::read(path, crate::files::MAX_CONFIG_BYTES)?;
        Self::from_slice(&bytes, path)
    }

    /// Parses and validates config.json bytes; `path` names the file in errors.
    pub fn from_slice(bytes: &[u8], path: &Path) -> Result<Self> {
        let value: Value =
            serde_json::from_slice(bytes).map_err(|e| Error::Json { path: path.to_path_buf(), msg: e.to_string() })?;
        if !value.is_object() {
            return Err(Error::config(path, "the file is not a JSON object: is this a Hugging Face config.json?"));
        }
        crate::models::parse_config(&value, path)
    }

    /// Whether the family embeds (CLIP) rather than generates (BLIP-2).
    pub fn embeds(&self) -> bool {
        matches!(self, ModelConfig::Clip(_))
    }

    /// The transformers class the checkpoint loads as, for messages.
    pub fn architecture(&self) -> &str {
        match self {
            ModelConfig::Blip2(_) => "Blip2ForConditionalGeneration",
            ModelConfig::Clip(c) => &c.architecture,
            ModelConfig::Llava(_) => "LlavaForConditionalGeneration",
            ModelConfig::InstructBlip(_) => "InstructBlipForConditionalGeneration",
        }
    }

    /// The BLIP-2 config, if this is one (for BLIP-2-only tools such as `bench`).
    pub fn as_blip2(&self) -> Option<&Blip2Config> {
        match self {
            ModelConfig::Blip2(c) => Some(c),
            _ => None,
        }
    }
}

/// `vision_feature_layer`: one hidden-state index or a list (concatenated on the feature axis).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum FeatureLayers {
    One(i64),
    Many(Vec<i64>),
}

/// `config.json` of a `LlavaForConditionalGeneration` checkpoint (transformers 5.17 `LlavaConfig`).
#[derive(Debug, Clone)]
pub struct LlavaConfig {
    pub vision_config: ClipVisionConfig,
    pub text_config: LlamaConfig,
    pub image_token_index: u32,
    pub projector_hidden_act: String,
    /// `default` drops the CLS row of every selected hidden state, `full` keeps it.
    pub vision_feature_select_strategy: String,
    pub vision_feature_layer: FeatureLayers,
    pub multimodal_projector_bias: bool,
    /// True when config.json or text_config ties the head to the input embeddings.
    pub tie_word_embeddings: bool,
}

impl LlavaConfig {
    /// Parses as `LlavaConfig.__init__` does: a missing vision_config is CLIP ViT-L/14-336, a
    /// present one fills missing keys with CLIPVisionConfig defaults; text_config defaults to llama.
    pub fn from_value(value: &Value, path: &Path) -> Result<Self> {
        #[derive(Deserialize)]
        #[serde(default)]
        struct Top {
            #[serde(alias = "image_token_id")]
            image_token_index: u32,
            projector_hidden_act: String,
            vision_feature_select_strategy: String,
            vision_feature_layer: FeatureLayers,
            multimodal_projector_bias: bool,
            tie_word_embeddings: bool,
        }
        impl Default for Top {
            fn default() -> Self {
                Self {
                    image_token_index: 32000,
                    projector_hidden_act: "gelu".into(),
                    vision_feature_select_strategy: "default".into(),
                    vision_feature_layer: FeatureLayers::One(-2),
                    multimodal_projector_bias: true,
                    tie_word_embeddings: false,
                }
            }
        }
        let mut rest = value.clone();
        let (mut vision, mut text) = (None, None);
        if let Some(obj) = rest.as_object_mut() {
            vision = obj.remove("vision_config").filter(|v| !v.is_null());
            text = obj.remove("text_config").filter(|v| !v.is_null());
        }
        let top: Top = from_json_value(&rest, path)?;
        let vision_config = match vision {
            Some(v) => from_json_value_at(&v, path, "vision_config.")?,
            None => ClipVisionConfig::llava_default(),
        };
        let text_config = match text.map(|t| TextConfig::from_value_or(&t, path, "llama")).transpose()? {
            None => LlamaConfig::default(),
            Some(TextConfig::Llama(c)) => c,
            Some(other) => {
                return Err(Error::Unsupported(format!(
                    "{}: text_config.model_type `{}`: glimpse runs LLaVA with a LLaMA decoder",
                    path.display(),
                    other.model_type()
                )))
            }
        };
        let cfg = Self {
            tie_word_embeddings: top.tie_word_embeddings || text_config.tie_word_embeddings,
            vision_config,
            text_config,
            image_token_index: top.image_token_index,
            projector_hidden_act: top.projector_hidden_act,
            vision_feature_select_strategy: top.vision_feature_select_strategy,
            vision_feature_layer: top.vision_feature_layer,
            multimodal_projector_bias: top.multimodal_projector_bias,
        };
        cfg.check().map_err(|m| Error::config(path, m))?;
        Ok(cfg)
    }

    /// The selected `hidden_states` indices (non-negative), in config order.
    pub fn feature_layers(&self) -> Result<Vec<usize>, String> {
        let raw = match &self.vision_feature_layer {
            FeatureLayers::One(i) => vec![*i],
            FeatureLayers::Many(v) => v.clone(),
        };
        if raw.is_empty() {
            return Err(field_error(
                "vision_feature_layer",
                "[]",
                "it needs at least one layer index (LLaVA-1.5 uses -2)",
            ));
        }
        let n = self.vision_config.num_hidden_layers;
        raw.iter().map(|&i| crate::models::clip_vision::resolve_layer(i, n, "vision_feature_layer")).collect()
    }

    /// Rows dropped from each image's hidden states: 1 (CLS) for `default`, 0 for `full`.
    pub fn skip_rows(&self) -> usize {
        usize::from(self.vision_feature_select_strategy == "default")
    }

    /// Decoder rows per image: patches, plus CLS under `full`.
    pub fn image_rows(&self) -> usize {
        self.vision_config.num_positions() - self.skip_rows()
    }

    fn check(&self) -> Result<(), String> {
        self.vision_config.check("vision_config")?;
        self.text_config.check()?;
        if !["default", "full"].contains(&self.vision_feature_select_strategy.as_str()) {
            return Err(field_error(
                "vision_feature_select_strategy",
                format!("`{}`", self.vision_feature_select_strategy),
                "it must be \"default\" (drop CLS) or \"full\"",
            ));
        }
        check_activation("projector_hidden_act", &self.projector_hidden_act, &["gelu", "gelu_python"])?;
        self.feature_layers()?;
        let t = &self.text_config;
        check_token("image_token_index", self.image_token_index, t.vocab_size)?;
        for id in t.eos_token_id.as_ref().map(TokenIds::to_vec).unwrap_or_default() {
            check_token("text_config.eos_token_id", id, t.vocab_size)?;
        }
        Ok(())
    }
}

/// The vision encoder, Q-Former and query count BLIP-2 and InstructBLIP share.
fn check_blip_towers(v: &VisionConfig, q: &QFormerConfig, num_query_tokens: usize) -> Result<(), String> {
    // Vision encoder.
    check_heads("vision_config", v.hidden_size, v.num_attention_heads)?;
    check_positive("vision_config.intermediate_size", v.intermediate_size)?;
    check_positive("vision_config.patch_size", v.patch_size)?;
    if v.image_size == 0 || v.image_size % v.patch_size != 0 {
        return Err(field_error(
            "vision_config.image_size",
            v.image_size,
            format!(
                "it must be a positive multiple of vision_config.patch_size ({}), so the patches tile the image",
                v.patch_size
            ),
        ));
    }
    if v.num_channels != 3 {
        return Err(field_error(
            "vision_config.num_channels",
            v.num_channels,
            "glimpse feeds RGB images: it must be 3",
        ));
    }
    check_eps("vision_config.layer_norm_eps", v.layer_norm_eps)?;
    check_activation("vision_config.hidden_act", &v.hidden_act, &["gelu", "gelu_python"])?;

    // Q-Former.
    check_heads("qformer_config", q.hidden_size, q.num_attention_heads)?;
    check_positive("qformer_config.intermediate_size", q.intermediate_size)?;
    if q.cross_attention_frequency == 0 {
        return Err(field_error(
                "qformer_config.cross_attention_frequency",
                0,
                "it must be at least 1 (layer i cross-attends to the image when i % cross_attention_frequency == 0; BLIP-2 uses 2)",
            ));
    }
    if q.encoder_hidden_size != v.hidden_size {
        return Err(field_error(
            "qformer_config.encoder_hidden_size",
            q.encoder_hidden_size,
            format!("it must equal vision_config.hidden_size ({})", v.hidden_size),
        ));
    }
    check_eps("qformer_config.layer_norm_eps", q.layer_norm_eps)?;
    check_activation("qformer_config.hidden_act", &q.hidden_act, &["gelu", "gelu_python"])?;
    check_positive("num_query_tokens", num_query_tokens)?;
    Ok(())
}

/// A T5 language model behind (Instruct)BLIP's image side: an encoder-decoder, its own
/// config, and the placeholder id the image rows replace (`missing_image_token`: the fix when
/// the config lacks it).
fn check_t5_language_model(
    t: &T5Config,
    decoder_only: Option<bool>,
    image_token_index: Option<u32>,
    missing_image_token: &str,
) -> Result<(), String> {
    if decoder_only == Some(true) {
        return Err(field_error(
            "use_decoder_only_language_model",
            true,
            "text_config.model_type is `t5`, an encoder-decoder (transformers fails to build this model too): set it to false or remove it",
        ));
    }
    t.check()?;
    match image_token_index {
        None => Err(format!("no `image_token_index`: {missing_image_token}")),
        Some(id) => check_token("image_token_index", id, t.vocab_size),
    }
}

impl Blip2Config {
    /// Parses the JSON of a BLIP-2 config as transformers' `Blip2Config` does, then validates it.
    /// The language model's kind is checked before its fields are read, so a T5 checkpoint gets
    /// "not supported" rather than a field error about OPT.
    pub fn from_value(value: &Value, path: &Path) -> Result<Self> {
        let text_value = value.get("text_config").filter(|t| !t.is_null());
        let text_type = TextConfig::kind(text_value.unwrap_or(&Value::Null)).map_err(|m| Error::config(path, m))?;
        let decoder_only = match value.get("use_decoder_only_language_model") {
            None | Some(Value::Null) => None,
            Some(Value::Bool(b)) => Some(*b),
            Some(other) => {
                return Err(Error::config(
                    path,
                    field_error("use_decoder_only_language_model", other, "it must be true or false"),
                ))
            }
        };
        if decoder_only == Some(false) {
            if text_type == "opt" {
                return Err(Error::config(
                    path,
                    "`use_decoder_only_language_model` is false, which asks for an encoder-decoder (T5) language model, but text_config.model_type is `opt` (transformers fails to build this model too): set it to true or remove it",
                ));
            }
            if text_type != "t5" {
                return Err(Error::Unsupported(format!(
                    "{}: `use_decoder_only_language_model` is false (text_config.model_type `{text_type}`): glimpse runs BLIP-2's encoder-decoder language model with T5 only",
                    path.display()
                )));
            }
        }
        // The language model is parsed by its kind, so a T5 text config gets "not supported"
        // rather than a field error about OPT. LLaMA decoders run in LLaVA, not yet in BLIP-2.
        if text_type == "llama" {
            return Err(Error::Unsupported(format!(
                "{}: text_config.model_type `llama` is not supported yet in BLIP-2 (glimpse runs BLIP-2 with OPT; LLaMA decoders run in LLaVA)",
                path.display()
            )));
        }
        let text_config = match text_value {
            Some(t) => TextConfig::from_value(t, path)?,
            None => TextConfig::default(),
        };
        let mut rest = value.clone();
        if let Some(obj) = rest.as_object_mut() {
            obj.remove("text_config");
        }
        let mut cfg: Blip2Config = from_json_value(&rest, path)?;
        cfg.text_config = text_config;
        // transformers' Blip2Config overwrites it: the Q-Former cross-attends to the vision output.
        cfg.qformer_config.encoder_hidden_size = cfg.vision_config.hidden_size;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Checks every field the model reads, naming the field, its value and the fix.
    pub fn validate(&self, path: &Path) -> Result<()> {
        self.check().map_err(|msg| Error::config(path, msg))
    }

    /// Vision encoder and Q-Former (shared by the OPT and T5 variants).
    fn check_towers(&self) -> Result<(), String> {
        check_blip_towers(&self.vision_config, &self.qformer_config, self.num_query_tokens)
    }

    /// BLIP-2 Flan-T5 (design/t5.md): the T5 config and the token ids the model looks up.
    fn check_t5(&self, t: &T5Config) -> Result<(), String> {
        check_t5_language_model(
            t,
            self.use_decoder_only_language_model,
            self.image_token_index,
            "checkpoints saved before transformers 4.47 lack it; add \"image_token_index\": <id of <image>> to config.json (32100 for Salesforce/blip2-flan-t5-*)",
        )
    }

    fn check(&self) -> Result<(), String> {
        self.check_towers()?;
        let t = match &self.text_config {
            TextConfig::Opt(t) => t,
            TextConfig::T5(t) => return self.check_t5(t),
            other => {
                return Err(field_error(
                    "text_config.model_type",
                    format!("`{}`", other.model_type()),
                    "not supported yet; glimpse runs BLIP-2 with OPT",
                ))
            }
        };
        if self.use_decoder_only_language_model == Some(false) {
            return Err(field_error(
                "use_decoder_only_language_model",
                false,
                "an encoder-decoder (T5) language model is not supported yet; glimpse runs BLIP-2 with OPT",
            ));
        }
        if t.model_type != "opt" {
            return Err(field_error(
                "text_config.model_type",
                format!("`{}`", t.model_type),
                "not supported yet; glimpse runs BLIP-2 with OPT",
            ));
        }

        // OPT decoder.
        check_positive("text_config.vocab_size", t.vocab_size)?;
        check_heads("text_config", t.hidden_size, t.num_attention_heads)?;
        check_positive("text_config.ffn_dim", t.ffn_dim)?;
        check_positive("text_config.max_position_embeddings", t.max_position_embeddings)?;
        if let Some(e) = t.word_embed_proj_dim {
            check_positive("text_config.word_embed_proj_dim", e)?;
        }
        check_activation("text_config.activation_function", &t.activation_function, &["relu"])?;
        for (field, value) in [
            ("text_config.do_layer_norm_before", !t.do_layer_norm_before),
            ("text_config.enable_bias", !t.enable_bias),
            ("text_config.layer_norm_elementwise_affine", !t.layer_norm_elementwise_affine),
        ] {
            if value {
                return Err(field_error(field, false, "only pre-norm OPT with biases and affine layer norms is implemented (opt-350m style post-norm is not)"));
            }
        }
        if t.remove_final_layer_norm {
            return Err(field_error(
                "text_config._remove_final_layer_norm",
                true,
                "OPT without its final layer norm is not implemented",
            ));
        }
        if t.max_new_tokens == Some(0) {
            return Err(field_error(
                "text_config.max_new_tokens",
                0,
                "transformers rejects it (it must be at least 1); remove it for the default of 20",
            ));
        }

        // Token ids: every one is looked up in the embedding table.
        let vocab = t.vocab_size;
        match self.image_token_index {
            None => {
                return Err("no `image_token_index`: checkpoints saved before transformers 4.47 lack it; add \"image_token_index\": <id of <image>> to config.json".into())
            }
            Some(id) => check_token("image_token_index", id, vocab)?,
        }
        if let Some(id) = t.bos_token_id {
            check_token("text_config.bos_token_id", id, vocab)?;
        }
        if let Some(id) = t.pad_token_id {
            check_token("text_config.pad_token_id", id, vocab)?;
        }
        for id in t.eos_token_id.as_ref().map(TokenIds::to_vec).unwrap_or_default() {
            check_token("text_config.eos_token_id", id, vocab)?;
        }
        Ok(())
    }

    pub fn image_token(&self) -> u32 {
        // validate() guarantees presence; a config that skipped validation gets OPT's id.
        self.image_token_index.unwrap_or(50265)
    }
}

/// `config.json` of an `InstructBlipForConditionalGeneration` checkpoint (transformers 5.17
/// `InstructBlipConfig`, design/instructblip.md): BLIP-2's towers, a Q-Former that also reads the
/// instruction, and a language model (a LLaMA/Vicuna decoder; Flan-T5 is another `text_config`).
#[derive(Debug, Clone, Deserialize)]
pub struct InstructBlipConfig {
    #[serde(default)]
    pub vision_config: VisionConfig,
    #[serde(default)]
    pub qformer_config: QFormerConfig,
    #[serde(default)]
    pub text_config: TextConfig,
    #[serde(default = "default_num_query_tokens")]
    pub num_query_tokens: usize,
    #[serde(default, alias = "image_token_id")]
    pub image_token_index: Option<u32>,
    #[serde(default)]
    pub use_decoder_only_language_model: Option<bool>,
}

impl InstructBlipConfig {
    /// Parses as `InstructBlipConfig.__init__` does (a missing `text_config` is OPT's, which glimpse
    /// refuses with the decoders it runs), then validates.
    pub fn from_value(value: &Value, path: &Path) -> Result<Self> {
        let text_config = match value.get("text_config").filter(|t| !t.is_null()) {
            Some(t) => TextConfig::from_value(t, path)?,
            None => TextConfig::default(),
        };
        let mut rest = value.clone();
        if let Some(obj) = rest.as_object_mut() {
            obj.remove("text_config");
        }
        let mut cfg: InstructBlipConfig = from_json_value(&rest, path)?;
        cfg.text_config = text_config;
        // As in BLIP-2, transformers overwrites it with the vision width.
        cfg.qformer_config.encoder_hidden_size = cfg.vision_config.hidden_size;
        cfg.check().map_err(|m| Error::config(path, m))?;
        Ok(cfg)
    }

    /// The LLaMA decoder's config (Vicuna checkpoints).
    pub fn llama(&self) -> Result<&LlamaConfig> {
        match &self.text_config {
            TextConfig::Llama(t) => Ok(t),
            other => Err(Error::Unsupported(format!(
                "InstructBLIP with text_config.model_type `{}` has no LLaMA decoder (glimpse runs InstructBLIP with LLaMA (Vicuna) or T5 (Flan-T5))",
                other.model_type()
            ))),
        }
    }

    /// `<image>`'s id (`check` guarantees it is set).
    pub fn image_token(&self) -> u32 {
        self.image_token_index.unwrap_or(0)
    }

    fn check(&self) -> Result<(), String> {
        let (v, q) = (&self.vision_config, &self.qformer_config);
        check_blip_towers(v, q, self.num_query_tokens)?;
        check_positive("qformer_config.vocab_size", q.vocab_size)?;
        check_positive("qformer_config.max_position_embeddings", q.max_position_embeddings)?;
        let t = match &self.text_config {
            TextConfig::Llama(t) => t,
            TextConfig::T5(t) => {
                return check_t5_language_model(
                    t,
                    self.use_decoder_only_language_model,
                    self.image_token_index,
                    "without it transformers ignores the image; add \"image_token_index\": <id of <image>> to config.json (32100 in Salesforce/instructblip-flan-t5-xl)",
                )
            }
            other => {
                return Err(field_error(
                    "text_config.model_type",
                    format!("`{}`", other.model_type()),
                    "glimpse runs InstructBLIP with a LLaMA (Vicuna) or T5 (Flan-T5) language model; set text_config.model_type to \"llama\" for a Vicuna checkpoint or \"t5\" for a Flan-T5 one",
                ))
            }
        };
        if self.use_decoder_only_language_model == Some(false) {
            return Err(field_error(
                "use_decoder_only_language_model",
                false,
                "a LLaMA language model is decoder-only: set it to true or remove it",
            ));
        }
        t.check()?;
        match self.image_token_index {
            // transformers would silently drop the image (no placeholder matches).
            None => return Err("no `image_token_index`: without it transformers ignores the image; add \"image_token_index\": <id of <image>> to config.json (32001 in Salesforce/instructblip-vicuna-7b)".into()),
            Some(id) => check_token("image_token_index", id, t.vocab_size)?,
        }
        if let Some(id) = t.bos_token_id {
            check_token("text_config.bos_token_id", id, t.vocab_size)?;
        }
        for id in t.eos_token_id.as_ref().map(TokenIds::to_vec).unwrap_or_default() {
            check_token("text_config.eos_token_id", id, t.vocab_size)?;
        }
        Ok(())
    }
}

/// `text_config` of CLIP (`CLIPTextConfig`, 5.17 defaults: ViT-B/32's text tower).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    pub projection_dim: usize,
    pub bos_token_id: Option<u32>,
    /// Decides the pooling rule: 2 is transformers' legacy value (pool at the largest id),
    /// anything else pools at the first occurrence of this id.
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            projection_dim: 512,
            bos_token_id: Some(49406),
            eos_token_id: Some(49407),
            pad_token_id: Some(1),
        }
    }
}

impl ClipTextConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Checks every field the tower reads; `section` prefixes field names (`text_config`).
    pub fn check(&self, section: &str) -> Result<(), String> {
        check_positive(&format!("{section}.vocab_size"), self.vocab_size)?;
        check_heads(section, self.hidden_size, self.num_attention_heads)?;
        check_positive(&format!("{section}.intermediate_size"), self.intermediate_size)?;
        check_positive(&format!("{section}.num_hidden_layers"), self.num_hidden_layers)?;
        check_positive(&format!("{section}.max_position_embeddings"), self.max_position_embeddings)?;
        check_eps(&format!("{section}.layer_norm_eps"), self.layer_norm_eps)?;
        check_activation(&format!("{section}.hidden_act"), &self.hidden_act, &["quick_gelu", "gelu", "gelu_python"])?;
        match self.eos_token_id {
            None => Err(field_error(
                &format!("{section}.eos_token_id"),
                "missing",
                "CLIP pools each text at its EOS token: set it to the id of <|endoftext|>",
            )),
            // 2 is the legacy marker (pool at the largest id), not a token that must exist.
            Some(2) => Ok(()),
            Some(id) => check_token(&format!("{section}.eos_token_id"), id, self.vocab_size),
        }
    }

    /// The MLP activation (`check` has accepted the name).
    pub fn activation(&self) -> crate::graph::Activation {
        if self.hidden_act == "quick_gelu" {
            crate::graph::Activation::QuickGelu
        } else {
            crate::graph::Activation::Gelu
        }
    }
}

/// A CLIP checkpoint: `CLIPModel` (`model_type` "clip", both towers), or one tower with its
/// projection (`CLIPTextModelWithProjection`: "clip_text_model", `CLIPVisionModelWithProjection`:
/// "clip_vision_model", whose config.json is the tower's config itself).
#[derive(Debug, Clone)]
pub struct ClipConfig {
    pub text_config: Option<ClipTextConfig>,
    pub vision_config: Option<ClipVisionConfig>,
    /// Width of the projected embeddings (`CLIPConfig.projection_dim`, or the tower's own for a
    /// single-tower model).
    pub projection_dim: usize,
    /// `architectures[0]` of config.json, for messages (`CLIPModel` when absent).
    pub architecture: String,
}

impl ClipConfig {
    /// Parses config.json of any CLIP `model_type` as transformers 5.17 does. For "clip", a non-null
    /// `text_config_dict` (`vision_config_dict`) replaces `text_config` (`vision_config`) entirely,
    /// defaults included: openai's clip-vit-large-patch14 config.json has one, which is why its
    /// text tower gets eos 49407 although `text_config` says 2.
    pub fn from_value(value: &Value, path: &Path) -> Result<Self> {
        let model_type = value.get("model_type").and_then(Value::as_str).unwrap_or("clip");
        let architecture = value
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str)
            .unwrap_or(match model_type {
                "clip_text_model" => "CLIPTextModelWithProjection",
                "clip_vision_model" => "CLIPVisionModelWithProjection",
                _ => "CLIPModel",
            })
            .to_string();
        let section = |key: &str| -> Option<(&Value, String)> {
            let dict = format!("{key}_dict");
            match value.get(&dict).filter(|v| !v.is_null()) {
                Some(v) => Some((v, format!("{dict}."))),
                None => value.get(key).filter(|v| !v.is_null()).map(|v| (v, format!("{key}."))),
            }
        };
        let empty = Value::Object(Default::default());
        let cfg = match model_type {
            "clip" => {
                let (t, tp) = section("text_config").unwrap_or((&empty, "text_config.".into()));
                let (v, vp) = section("vision_config").unwrap_or((&empty, "vision_config.".into()));
                #[derive(Deserialize)]
                struct Top {
                    #[serde(default = "default_projection_dim")]
                    projection_dim: usize,
                }
                let top: Top = from_json_value(value, path)?;
                ClipConfig {
                    text_config: Some(from_json_value_at(t, path, &tp)?),
                    vision_config: Some(from_json_value_at(v, path, &vp)?),
                    projection_dim: top.projection_dim,
                    architecture,
                }
            }
            "clip_text_model" => {
                let t: ClipTextConfig = from_json_value(value, path)?;
                ClipConfig { projection_dim: t.projection_dim, text_config: Some(t), vision_config: None, architecture }
            }
            "clip_vision_model" => {
                let v: ClipVisionConfig = from_json_value(value, path)?;
                ClipConfig { projection_dim: v.projection_dim, vision_config: Some(v), text_config: None, architecture }
            }
            other => {
                return Err(Error::config(
                    path,
                    field_error("model_type", format!("`{other}`"), "not a CLIP model type"),
                ))
            }
        };
        cfg.check().map_err(|m| Error::config(path, m))?;
        Ok(cfg)
    }

    fn check(&self) -> Result<(), String> {
        let single = self.text_config.is_none() || self.vision_config.is_none();
        let (text, vision) = if single { ("", "") } else { ("text_config", "vision_config") };
        if let Some(t) = &self.text_config {
            t.check(if single { "text" } else { text }).map_err(|m| m.replace("`text.", "`"))?;
        }
        if let Some(v) = &self.vision_config {
            v.check(if single { "vision" } else { vision }).map_err(|m| m.replace("`vision.", "`"))?;
        }
        check_positive("projection_dim", self.projection_dim)
    }
}

fn default_projection_dim() -> usize {
    512
}

/// `generation_config.json`. BLIP-2's `generate()` hands over to its language model, whose
/// generation config comes from `text_config`, so none of these values steer BLIP-2 generation
/// (see [`crate::api::Model::default_options`]); they are read for `info` and checked as
/// transformers checks them when it loads the model. Chat families (LLaVA) generate with the
/// values it sets, as transformers does (`null` or absent: the global default).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct GenerationConfig {
    pub max_new_tokens: Option<usize>,
    pub max_length: Option<usize>,
    pub eos_token_id: Option<TokenIds>,
    pub bos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    // What chat families (LLaVA) generate with when set (`Model::default_options`).
    pub min_new_tokens: Option<usize>,
    pub do_sample: Option<bool>,
    pub temperature: Option<f64>,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub no_repeat_ngram_size: Option<usize>,
    pub num_beams: Option<usize>,
    pub length_penalty: Option<f64>,
    /// `true`, `false` or `"never"`.
    pub early_stopping: Option<Value>,
    pub num_return_sequences: Option<usize>,
    /// A string or a list of strings (transformers accepts both).
    pub stop_strings: Option<StopStringsField>,
}

/// `stop_strings` of generation_config.json: one string or a list.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum StopStringsField {
    One(String),
    Many(Vec<String>),
}

impl StopStringsField {
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s.clone()],
            Self::Many(v) => v.clone(),
        }
    }
}

impl GenerationConfig {
    /// An absent file gives the defaults. So does a file that is not JSON: transformers then
    /// falls back to a generation config made from config.json (the load succeeds).
    pub fn load_or_default(path: &Path) -> Result<Self> {
        match crate::files::read(path, crate::files::MAX_CONFIG_BYTES) {
            Ok(bytes) => Self::from_slice(&bytes, path),
            Err(Error::MissingFile { .. }) => Ok(Self::default()),
            Err(e) => Err(e),
        }
    }

    /// Parses generation_config.json bytes (see [`Self::load_or_default`]).
    pub fn from_slice(bytes: &[u8], path: &Path) -> Result<Self> {
        let Ok(value) = serde_json::from_slice::<Value>(bytes) else {
            return Ok(Self::default());
        };
        if !value.is_object() {
            return Err(Error::config(path, "the file is not a JSON object"));
        }
        let cfg: Self = from_json_value(&value, path)?;
        if cfg.max_new_tokens == Some(0) {
            // GenerationConfig.validate() raises here, so transformers cannot load the model.
            return Err(Error::config(
                path,
                field_error(
                    "max_new_tokens",
                    0,
                    "it must be at least 1 (transformers refuses it too); remove it or set a positive count",
                ),
            ));
        }
        Ok(cfg)
    }

    /// Refuses an `eos_token_id` outside a vocabulary of `vocab_size`, as config.json's is
    /// refused: the language model never produces it, so generation would never stop on it.
    pub fn check_tokens(&self, vocab_size: usize, path: &Path) -> Result<()> {
        for id in self.eos_token_id.as_ref().map(TokenIds::to_vec).unwrap_or_default() {
            check_token("eos_token_id", id, vocab_size).map_err(|e| Error::config(path, e))?;
        }
        Ok(())
    }
}

/// Size field of an image-processor config: `{height, width}` or `{shortest_edge}`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct SizeSpec {
    pub height: Option<usize>,
    pub width: Option<usize>,
    pub shortest_edge: Option<usize>,
}

/// `preprocessor_config.json` (BlipImageProcessor, CLIPImageProcessor).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct PreprocessorConfig {
    pub image_processor_type: Option<String>,
    pub do_convert_rgb: bool,
    pub do_resize: bool,
    pub size: SizeSpec,
    pub resample: u32,
    pub do_center_crop: bool,
    pub crop_size: Option<SizeSpec>,
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: Vec<f32>,
    pub image_std: Vec<f32>,
}

// The values exactly as HF configs spell them (more digits than f32 holds; they round the same).
#[allow(clippy::excessive_precision)]
pub const OPENAI_CLIP_MEAN: [f32; 3] = [0.48145466, 0.4578275, 0.40821073];
#[allow(clippy::excessive_precision)]
pub const OPENAI_CLIP_STD: [f32; 3] = [0.26862954, 0.26130258, 0.27577711];

impl Default for PreprocessorConfig {
    /// BlipImageProcessor's defaults.
    fn default() -> Self {
        Self {
            image_processor_type: None,
            do_convert_rgb: true,
            do_resize: true,
            size: SizeSpec { height: Some(384), width: Some(384), shortest_edge: None },
            resample: 3,
            do_center_crop: false,
            crop_size: None,
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: OPENAI_CLIP_MEAN.to_vec(),
            image_std: OPENAI_CLIP_STD.to_vec(),
        }
    }
}

impl PreprocessorConfig {
    /// The image-processor settings of a model folder, chosen as transformers 5.17 does
    /// (`ImageProcessingMixin.get_image_processor_dict`): the `image_processor` section of
    /// `processor_config.json` when there is one, else `preprocessor_config.json`.
    pub fn load_from_dir(dir: &Path) -> Result<(Self, PathBuf)> {
        let pre = dir.join("preprocessor_config.json");
        let proc = dir.join("processor_config.json");
        if proc.exists() {
            let bytes = crate::files::read(&proc, crate::files::MAX_CONFIG_BYTES)?;
            if let Some(cfg) = Self::from_processor_slice(&bytes, &proc)? {
                return Ok((cfg, proc));
            }
        }
        if pre.exists() {
            let bytes = crate::files::read(&pre, crate::files::MAX_CONFIG_BYTES)?;
            return Ok((Self::from_slice(&bytes, &pre)?, pre));
        }
        Err(Error::MissingFile {
            path: pre,
            hint: " (nor an `image_processor` section in processor_config.json)".into(),
        })
    }

    /// Parses and validates preprocessor_config.json bytes.
    pub fn from_slice(bytes: &[u8], path: &Path) -> Result<Self> {
        let cfg: Self = from_json_slice(bytes, path)?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// The `image_processor` section of processor_config.json bytes; `None` when the file has
    /// none (or it is null), in which case transformers reads preprocessor_config.json.
    pub fn from_processor_slice(bytes: &[u8], path: &Path) -> Result<Option<Self>> {
        let value: Value =
            serde_json::from_slice(bytes).map_err(|e| Error::Json { path: path.to_path_buf(), msg: e.to_string() })?;
        match value.get("image_processor") {
            None | Some(Value::Null) => Ok(None),
            Some(_) => {
                // Through the whole file, so errors name `image_processor.<field>`.
                #[derive(Deserialize)]
                struct Processor {
                    image_processor: PreprocessorConfig,
                }
                let cfg = from_json_value::<Processor>(&value, path)?.image_processor;
                cfg.validate(path)?;
                Ok(Some(cfg))
            }
        }
    }

    pub fn validate(&self, path: &Path) -> Result<()> {
        self.check().map_err(|msg| Error::config(path, msg))
    }

    fn check(&self) -> Result<(), String> {
        for (field, values) in [("image_mean", &self.image_mean), ("image_std", &self.image_std)] {
            if values.len() != 3 {
                return Err(field_error(field, format!("{values:?}"), "it needs one value per RGB channel (3 values)"));
            }
            if values.iter().any(|v| !v.is_finite()) {
                return Err(field_error(field, format!("{values:?}"), "every value must be a finite number"));
            }
        }
        if self.image_std.contains(&0.0) {
            return Err(field_error(
                "image_std",
                format!("{:?}", self.image_std),
                "a zero standard deviation divides by zero",
            ));
        }
        if !(self.rescale_factor.is_finite()) {
            return Err(field_error(
                "rescale_factor",
                self.rescale_factor,
                "it must be a finite number (usually 1/255)",
            ));
        }
        if self.do_resize {
            if self.resample != 3 {
                return Err(field_error("resample", self.resample, "only 3 (bicubic) is supported"));
            }
            check_size("size", &self.size)?;
        }
        if self.do_center_crop {
            match &self.crop_size {
                Some(c) if c.height.is_some() && c.width.is_some() => check_size("crop_size", c)?,
                other => {
                    return Err(field_error(
                        "crop_size",
                        other.as_ref().map_or("missing".to_string(), SizeSpec::describe),
                        "do_center_crop needs crop_size with a height and a width",
                    ))
                }
            }
        }
        Ok(())
    }
}

impl SizeSpec {
    /// The size as config.json spells it, for messages.
    pub fn describe(&self) -> String {
        let parts: Vec<String> =
            [("height", self.height), ("width", self.width), ("shortest_edge", self.shortest_edge)]
                .iter()
                .filter_map(|(k, v)| v.map(|v| format!("\"{k}\": {v}")))
                .collect();
        format!("{{{}}}", parts.join(", "))
    }
}

/// The largest side an image processor may resize or crop to: far above any vision tower's
/// input, and small enough that the resized image's buffers stay bounded.
pub const MAX_PROCESSOR_SIDE: usize = 8192;

/// A size needs a positive height and width, or a positive shortest_edge, none past
/// [`MAX_PROCESSOR_SIDE`].
fn check_size(field: &str, s: &SizeSpec) -> Result<(), String> {
    let positive = |name: &str, v: usize| {
        check_positive(&format!("{field}.{name}"), v)?;
        if v > MAX_PROCESSOR_SIDE {
            return Err(field_error(
                &format!("{field}.{name}"),
                v,
                format!("glimpse resizes images to at most {MAX_PROCESSOR_SIDE} pixels a side (the resized image is held in memory)"),
            ));
        }
        Ok(())
    };
    match (s.height, s.width, s.shortest_edge) {
        (Some(h), Some(w), _) => positive("height", h).and(positive("width", w)),
        (_, _, Some(e)) => positive("shortest_edge", e),
        _ => Err(field_error(field, s.describe(), "it needs \"height\" and \"width\", or \"shortest_edge\"")),
    }
}

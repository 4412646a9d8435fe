//! `text_config`: the language model a BLIP-2, InstructBLIP or LLaVA checkpoint names, parsed by
//! its `model_type` into the decoder config glimpse runs.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::config::{field_error, TokenIds};
use crate::error::{Error, Result};
use crate::json::from_json_value_at;
use crate::models::llama::LlamaConfig;
use crate::models::opt::OptConfig;
use crate::models::t5::T5Config;
use crate::weights::Checkpoint;

/// `text_config`: the language model, one variant per decoder kind glimpse runs; other kinds
/// are a clear "not supported yet" naming the kind. Which kinds a family accepts is the family's
/// check (BLIP-2 runs OPT and T5, InstructBLIP LLaMA and T5, LLaVA LLaMA).
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

    /// The `text_config` section of a family that runs a LLaMA decoder (a missing `model_type`
    /// means llama): None when absent; another decoder is refused, naming `family`.
    pub fn llama_section(section: Option<Value>, path: &Path, family: &str) -> Result<Option<LlamaConfig>> {
        match section.map(|t| Self::from_value_or(&t, path, "llama")).transpose()? {
            None => Ok(None),
            Some(TextConfig::Llama(c)) => Ok(Some(c)),
            Some(other) => Err(Error::Unsupported(format!(
                "{}: text_config.model_type `{}`: glimpse runs {family} with a LLaMA decoder",
                path.display(),
                other.model_type()
            ))),
        }
    }

    pub(crate) fn kind(value: &Value) -> Result<String, String> {
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

    /// The error for a language model the family does not run: `text_config.model_type`, then
    /// `hint` (what the family runs, and what to set).
    pub fn unsupported_by_family(model_type: &str, hint: &str) -> String {
        field_error("text_config.model_type", format!("`{model_type}`"), hint)
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
    pub fn is_t5(&self) -> bool {
        matches!(self, TextConfig::T5(_))
    }

    /// For synth: declares the untied Flan-T5 head a T5 checkpoint stores (the BLIP loaders read
    /// it only when present); nothing for the other kinds.
    pub fn record_untied_head(&self, recorder: &Checkpoint) -> Result<()> {
        if self.is_t5() {
            recorder.f16("language_model.lm_head.weight", &[self.vocab_size(), self.hidden_size()])?;
        }
        Ok(())
    }

    /// The first of `eos_token_id` (synth scales its embedding row).
    pub fn first_eos(&self) -> Option<u32> {
        self.eos_token_id().and_then(|e| e.to_vec().first().copied())
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
    /// The families whose `generate()` hands over to the language model (BLIP-2, InstructBLIP)
    /// use them; LLaVA's settings come from generation_config.json instead.
    pub fn min_new_tokens(&self) -> Option<usize> {
        match self {
            TextConfig::Opt(c) => c.min_new_tokens,
            TextConfig::T5(c) => c.min_new_tokens,
            TextConfig::Llama(c) => c.min_new_tokens,
        }
    }
    pub fn min_p(&self) -> Option<f64> {
        match self {
            TextConfig::Opt(c) => c.min_p,
            TextConfig::T5(c) => c.min_p,
            TextConfig::Llama(c) => c.min_p,
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

//! BLIP-2's config.json (`Blip2Config`, transformers 5.17): the vision encoder, the Q-Former,
//! the language model `text_config` names (OPT, LLaMA or T5), and their validation. InstructBLIP
//! reuses the language-model choice and the towers' checks.

use std::ops::Deref;
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::config::{
    check_activation, check_eps, check_heads, check_patches, check_positive, check_text_tokens, check_token,
    field_error,
};
use crate::error::{Error, Result};
use crate::json::{from_json_value, split_sections};
use crate::models::language_model::TextConfig;
use crate::models::qformer::QFormerConfig;
use crate::models::t5::T5Config;
use crate::models::vit::VisionConfig;

/// The `config.json` layout BLIP-2 and InstructBLIP share (the same keys and defaults in
/// transformers 5.17): the vision encoder, the Q-Former, the language model `text_config` and
/// the query count. Each family wraps it and validates it its own way.
#[derive(Debug, Clone, Deserialize)]
pub struct BlipConfig {
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

impl BlipConfig {
    /// Parses the layout, `text_config` by its `model_type` (so its errors name its own fields;
    /// absent, OPT's defaults as in transformers), without validating it.
    pub(crate) fn parse(value: &Value, path: &Path) -> Result<Self> {
        let (rest, [text]) = split_sections(value, ["text_config"]);
        let text_config = match text {
            Some(t) => TextConfig::from_value(&t, path)?,
            None => TextConfig::default(),
        };
        let mut cfg: BlipConfig = from_json_value(&rest, path)?;
        cfg.text_config = text_config;
        // transformers overwrites it: the Q-Former cross-attends to the vision output.
        cfg.qformer_config.encoder_hidden_size = cfg.vision_config.hidden_size;
        Ok(cfg)
    }

    /// The language model's input as the processors build it: `num_query_tokens` copies of
    /// `image_token` (the rows the Q-Former's outputs take), then the tokenized prompt.
    pub fn query_placeholders_then(&self, image_token: u32, prompt_ids: &[u32]) -> Vec<u32> {
        let mut ids = vec![image_token; self.num_query_tokens];
        ids.extend_from_slice(prompt_ids);
        ids
    }
}

/// `config.json` of a `Blip2ForConditionalGeneration` checkpoint (the shared layout, read as
/// [`BlipConfig`]'s fields through `Deref`).
#[derive(Debug, Clone)]
pub struct Blip2Config(pub BlipConfig);

impl Deref for Blip2Config {
    type Target = BlipConfig;
    fn deref(&self) -> &BlipConfig {
        &self.0
    }
}

pub(crate) fn default_num_query_tokens() -> usize {
    32
}

/// The vision encoder, Q-Former and query count BLIP-2 and InstructBLIP share.
pub(crate) fn check_blip_towers(v: &VisionConfig, q: &QFormerConfig, num_query_tokens: usize) -> Result<(), String> {
    // Vision encoder.
    check_heads("vision_config", v.hidden_size, v.num_attention_heads)?;
    check_positive("vision_config.intermediate_size", v.intermediate_size)?;
    check_patches("vision_config", v.image_size, v.patch_size, v.num_channels)?;
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
pub(crate) fn check_t5_language_model(
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
        let cfg = Blip2Config(BlipConfig::parse(value, path)?);
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

    /// BLIP-2 Flan-T5 (docs/models/blip2-t5.md#config): the T5 config and the token ids the model looks up.
    fn check_t5(&self, t: &T5Config) -> Result<(), String> {
        check_t5_language_model(
            t,
            self.use_decoder_only_language_model,
            self.image_token_index,
            "checkpoints saved before transformers 4.47 lack it; add \"image_token_index\": <id of <image>> to config.json (32100 for Salesforce/blip2-flan-t5-*)",
        )
    }

    fn check(&self) -> Result<(), String> {
        /// The hint of a decoder-only language model other than OPT.
        const OPT_ONLY: &str = "not supported yet; glimpse runs BLIP-2 with OPT";
        self.check_towers()?;
        let t = match &self.text_config {
            TextConfig::Opt(t) => t,
            TextConfig::T5(t) => return self.check_t5(t),
            other => return Err(TextConfig::unsupported_by_family(other.model_type(), OPT_ONLY)),
        };
        if self.use_decoder_only_language_model == Some(false) {
            return Err(field_error(
                "use_decoder_only_language_model",
                false,
                "an encoder-decoder (T5) language model is not supported yet; glimpse runs BLIP-2 with OPT",
            ));
        }
        if t.model_type != "opt" {
            return Err(TextConfig::unsupported_by_family(&t.model_type, OPT_ONLY));
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
        // Token ids: every one is looked up in the embedding table.
        if self.image_token_index.is_none() {
            return Err("no `image_token_index`: checkpoints saved before transformers 4.47 lack it; add \"image_token_index\": <id of <image>> to config.json".into());
        }
        check_text_tokens(
            &[
                ("image_token_index", self.image_token_index),
                ("text_config.bos_token_id", t.bos_token_id),
                ("text_config.pad_token_id", t.pad_token_id),
            ],
            t.eos_token_id.as_ref(),
            t.vocab_size,
            t.max_new_tokens,
        )
    }

    pub fn image_token(&self) -> u32 {
        // validate() guarantees presence; a config that skipped validation gets OPT's id.
        self.image_token_index.unwrap_or(50265)
    }
}

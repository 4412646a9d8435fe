//! `config.json` of an IDEFICS checkpoint (transformers 5.17 `IdeficsConfig`, with its
//! `IdeficsVisionConfig` and `IdeficsPerceiverConfig`): the decoder's fields sit at the top level.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::config::{check_positive, check_text_tokens, field_error};
use crate::error::{Error, Result};
use crate::json::{from_json_value, section_or, split_sections};
use crate::models::clip_vision::ClipVisionConfig;
use crate::models::llama::LlamaConfig;

/// `vision_config` (`IdeficsVisionConfig`: CLIP's vision transformer, `embed_dim` for its width).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct IdeficsVisionConfig {
    #[serde(alias = "hidden_size")]
    pub embed_dim: usize,
    pub image_size: usize,
    pub intermediate_size: usize,
    pub patch_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
}

impl Default for IdeficsVisionConfig {
    fn default() -> Self {
        Self {
            embed_dim: 768,
            image_size: 224,
            intermediate_size: 5120,
            patch_size: 14,
            num_hidden_layers: 32,
            num_attention_heads: 16,
            num_channels: 3,
            hidden_act: "gelu".into(),
            layer_norm_eps: 1e-5,
        }
    }
}

impl IdeficsVisionConfig {
    /// The same tower as glimpse's CLIP vision config (the modules and their names are CLIP's).
    pub fn clip(&self) -> ClipVisionConfig {
        ClipVisionConfig {
            hidden_size: self.embed_dim,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            image_size: self.image_size,
            patch_size: self.patch_size,
            num_channels: self.num_channels,
            layer_norm_eps: self.layer_norm_eps,
            hidden_act: self.hidden_act.clone(),
            projection_dim: self.embed_dim,
        }
    }
}

/// `perceiver_config` (`IdeficsPerceiverConfig`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct IdeficsPerceiverConfig {
    pub resampler_n_latents: usize,
    pub resampler_depth: usize,
    pub resampler_n_heads: usize,
    pub resampler_head_dim: usize,
    pub qk_layer_norms_perceiver: bool,
}

impl Default for IdeficsPerceiverConfig {
    fn default() -> Self {
        Self {
            resampler_n_latents: 64,
            resampler_depth: 6,
            resampler_n_heads: 16,
            resampler_head_dim: 96,
            qk_layer_norms_perceiver: false,
        }
    }
}

/// Whether the cross-attention gates are one value or one per hidden feature (`alpha_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlphaType {
    Float,
    Vector,
}

/// `config.json` of an `IdeficsForVisionText2Text` checkpoint.
#[derive(Debug, Clone)]
pub struct IdeficsConfig {
    /// The LLaMA-style decoder (IDEFICS' top-level text fields; multi-head, no biases).
    pub text: LlamaConfig,
    /// Ids at or past `text.vocab_size` use the additional embedding and head rows.
    pub additional_vocab_size: usize,
    pub alpha_type: AlphaType,
    /// A gated cross-attention block runs before every layer whose index is a multiple of it.
    pub cross_layer_interval: usize,
    /// Per-head RMSNorm of the cross-attention queries and keys.
    pub qk_layer_norms: bool,
    /// The Perceiver Resampler compresses each image (top-level `use_resampler`, which the model
    /// reads; the perceiver_config copy is ignored as transformers ignores it).
    pub use_resampler: bool,
    pub vision_config: IdeficsVisionConfig,
    pub perceiver_config: IdeficsPerceiverConfig,
}

impl IdeficsConfig {
    /// Parses as `IdeficsConfig.__post_init__` does: missing sub-configs take their defaults.
    pub fn from_value(value: &Value, path: &Path) -> Result<Self> {
        #[derive(Deserialize)]
        #[serde(default)]
        struct Top {
            additional_vocab_size: usize,
            alpha_type: String,
            cross_layer_interval: usize,
            qk_layer_norms: bool,
            use_resampler: bool,
            pad_token_id: Option<u32>,
        }
        impl Default for Top {
            fn default() -> Self {
                Self {
                    additional_vocab_size: 0,
                    alpha_type: "float".into(),
                    cross_layer_interval: 1,
                    qk_layer_norms: false,
                    use_resampler: false,
                    pad_token_id: Some(0),
                }
            }
        }
        let (rest, [vision, perceiver]) = split_sections(value, ["vision_config", "perceiver_config"]);
        let top: Top = from_json_value(&rest, path)?;
        let mut text: LlamaConfig = from_json_value(&rest, path)?;
        // IdeficsConfig has no GQA or head_dim fields: its attention is multi-head over hidden / heads.
        text.model_type = "llama".into();
        text.num_key_value_heads = None;
        text.head_dim = None;
        text.pad_token_id = top.pad_token_id;
        let alpha_type = match top.alpha_type.as_str() {
            "float" => AlphaType::Float,
            "vector" => AlphaType::Vector,
            other => {
                return Err(Error::config(
                    path,
                    field_error("alpha_type", format!("`{other}`"), "it must be \"float\" or \"vector\""),
                ))
            }
        };
        let cfg = Self {
            text,
            additional_vocab_size: top.additional_vocab_size,
            alpha_type,
            cross_layer_interval: top.cross_layer_interval,
            qk_layer_norms: top.qk_layer_norms,
            use_resampler: top.use_resampler,
            vision_config: section_or(vision, path, "vision_config.", IdeficsVisionConfig::default)?,
            perceiver_config: section_or(perceiver, path, "perceiver_config.", IdeficsPerceiverConfig::default)?,
        };
        cfg.check().map_err(|m| Error::config(path, m))?;
        Ok(cfg)
    }

    /// Ids the embedding and the head cover: `vocab_size + additional_vocab_size`.
    pub fn total_vocab(&self) -> usize {
        self.text.vocab_size + self.additional_vocab_size
    }

    /// Gated cross-attention blocks: one per `cross_layer_interval` decoder layers.
    pub fn cross_layers(&self) -> usize {
        self.text.num_hidden_layers / self.cross_layer_interval
    }

    /// Rows each image gives the cross-attention: the resampler's latents, or every vision token
    /// (patches and CLS).
    pub fn image_rows(&self) -> usize {
        if self.use_resampler {
            self.perceiver_config.resampler_n_latents
        } else {
            self.vision_config.clip().num_positions()
        }
    }

    fn check(&self) -> Result<(), String> {
        // The decoder's fields are top-level here: name them as config.json does.
        self.text.check().map_err(|m| m.replace("text_config.", ""))?;
        check_text_tokens(&[("pad_token_id", self.text.pad_token_id)], None, self.text.vocab_size, None)?;
        self.vision_config.clip().check("vision_config")?;
        check_positive("cross_layer_interval", self.cross_layer_interval)?;
        let layers = self.text.num_hidden_layers;
        if layers % self.cross_layer_interval != 0 {
            // transformers indexes a cross-attention block that does not exist for the last layers.
            return Err(field_error(
                "cross_layer_interval",
                self.cross_layer_interval,
                format!("it must divide num_hidden_layers ({layers}): every layer index that is a multiple of it runs a gated cross-attention block"),
            ));
        }
        if self.use_resampler {
            let p = &self.perceiver_config;
            check_positive("perceiver_config.resampler_n_latents", p.resampler_n_latents)?;
            check_positive("perceiver_config.resampler_depth", p.resampler_depth)?;
            check_positive("perceiver_config.resampler_n_heads", p.resampler_n_heads)?;
            check_positive("perceiver_config.resampler_head_dim", p.resampler_head_dim)?;
        }
        Ok(())
    }
}

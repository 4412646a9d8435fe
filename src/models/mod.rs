//! The model registry: every family glimpse runs, one file (or folder) each, and the dispatch
//! from a checkpoint's config.json to the family that parses, loads and synthesises it.
//!
//! A family file holds its config structs and their validation, its model (load, plans,
//! prompt rules), its [`FamilyConfig`] and [`Family`]/[`Embedder`] implementations and its synth
//! presets, and exports one [`FamilyEntry`]; [`FAMILIES`] lists those entries and is the one
//! list that names families (docs/adding-a-model.md). The towers and decoders families share
//! (ViT, Q-Former, OPT, LLaMA, T5, CLIP's towers, layers) are files of their own here.

pub mod blip2;
pub mod clip;
pub mod clip_text;
pub mod clip_vision;
pub mod decoder;
pub mod family;
pub mod idefics;
pub mod idefics3;
pub mod instructblip;
pub mod language_model;
pub mod layers;
pub mod llama;
pub mod llava;
pub mod opt;
pub mod preset_tokenizers;
pub mod presets;
pub mod qformer;
pub mod quantize;
pub mod t5;
pub mod vit;

use std::path::Path;

use serde_json::Value;

pub use family::{
    check_square_input, image_token_sequences, EmbedPlan, Embedder, Family, FamilyConfig, Loaded, Loader, ModelConfig,
    ModelCore, PromptText, TextInputs,
};

use crate::error::{Error, Result};
use crate::weights::Checkpoint;

/// One `model_type` a family parses.
pub struct ModelType {
    /// `model_type` in config.json.
    pub name: &'static str,
    /// The `architectures` transformers writes for it (for messages; `model_type` decides).
    pub architectures: &'static [&'static str],
    /// What it runs, for "glimpse runs ..." messages.
    pub label: &'static str,
    /// Parses and validates the whole config.json object.
    pub parse: fn(&Value, &Path) -> Result<ModelConfig>,
}

/// One family: the config.json kinds it parses and the `glimpse synth` presets it offers.
pub struct FamilyEntry {
    pub model_types: &'static [ModelType],
    /// Preset names (`glimpse synth`, `glimpse bench --preset`).
    pub presets: &'static [&'static str],
    /// `config.json` of one of [`FamilyEntry::presets`], as transformers 5.17 writes it.
    pub preset_config: fn(&str) -> Result<Value>,
}

/// Every family glimpse runs.
pub const FAMILIES: &[FamilyEntry] =
    &[blip2::FAMILY, clip::FAMILY, llava::FAMILY, instructblip::FAMILY, idefics3::FAMILY, idefics::FAMILY];

/// Every `model_type` of every family, in registry order.
pub fn model_types() -> impl Iterator<Item = &'static ModelType> {
    FAMILIES.iter().flat_map(|f| f.model_types)
}

/// Parses a config.json object through the family its `model_type` names.
pub fn parse_config(value: &Value, path: &Path) -> Result<ModelConfig> {
    match value.get("model_type") {
        Some(Value::String(t)) => match model_types().find(|e| e.name == t) {
            Some(entry) => (entry.parse)(value, path),
            None => Err(Error::Unsupported(format!(
                "{}: model_type `{t}` (architectures {}); glimpse runs {} checkpoints",
                path.display(),
                value.get("architectures").map_or("none".to_string(), |a| a.to_string()),
                model_types().map(|e| e.label).collect::<Vec<_>>().join(", ")
            ))),
        },
        Some(other) => {
            Err(Error::config(path, format!("`model_type` is {other}: it must be a string such as \"blip-2\"")))
        }
        None => Err(Error::config(path, "no `model_type` field: is this a Hugging Face config.json?")),
    }
}

impl ModelConfig {
    /// Reads, parses and validates a config.json file.
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
        parse_config(&value, path)
    }
}

/// Every preset name of every family, in registry order.
pub fn preset_names() -> impl Iterator<Item = &'static str> {
    FAMILIES.iter().flat_map(|f| f.presets.iter().copied())
}

/// `config.json` of preset `name`, from the family that offers it.
pub fn preset_config(name: &str) -> Result<Value> {
    match FAMILIES.iter().find(|f| f.presets.contains(&name)) {
        Some(family) => (family.preset_config)(name),
        None => Err(Error::InvalidInput(format!(
            "unknown preset `{name}` (presets: {})",
            preset_names().collect::<Vec<_>>().join(", ")
        ))),
    }
}

/// Loads the weights of the family `cfg` belongs to.
pub fn load_any(cfg: &ModelConfig, ckpt: &Checkpoint) -> Result<Loaded> {
    cfg.family().load(ckpt)
}

/// Loads a generating family (`caption`, `ask`, `bench`); an embedding model is an error that
/// names the commands it runs with (checked before any weight is read).
pub fn load(cfg: &ModelConfig, ckpt: &Checkpoint) -> Result<Box<dyn Family>> {
    if cfg.embeds() {
        return Err(wrong_kind(cfg, ckpt));
    }
    match load_any(cfg, ckpt)? {
        Loaded::Generates(f) => Ok(f),
        Loaded::Embeds(_) => Err(wrong_kind(cfg, ckpt)),
    }
}

/// Loads an embedding family (`embed`, `classify`); a generating model is an error that names
/// the commands it runs with (checked before any weight is read).
pub fn load_embedder(cfg: &ModelConfig, ckpt: &Checkpoint) -> Result<Box<dyn Embedder>> {
    if !cfg.embeds() {
        return Err(wrong_kind(cfg, ckpt));
    }
    match load_any(cfg, ckpt)? {
        Loaded::Embeds(e) => Ok(e),
        Loaded::Generates(_) => Err(wrong_kind(cfg, ckpt)),
    }
}

fn wrong_kind(cfg: &ModelConfig, ckpt: &Checkpoint) -> Error {
    let (does, use_) = if cfg.embeds() {
        (
            "embeds images and texts, it does not generate text",
            "`glimpse embed` or `glimpse classify` (glimpse::EmbedModel)",
        )
    } else {
        ("generates text, it does not embed images or texts", "`glimpse caption` or `glimpse ask` (glimpse::Model)")
    };
    Error::Unsupported(format!("{}: {} {does}: use {use_}", ckpt.origin().display(), cfg.architecture()))
}

//! Model definitions, one file per Hugging Face module family; names mirror transformers so
//! tensor names map 1:1. Each model loads its weights into a [`WeightTable`] once and emits
//! graph ops; it never touches an executor.
//!
//! This file is also the registry: [`FAMILIES`] maps a checkpoint's `model_type` (and its
//! `architectures`) to the family that parses its config, and [`load`] maps the parsed config
//! to the [`Family`] that loads, plans, templates prompts and describes it. Adding a model family
//! means one entry in each, a [`ModelConfig`] variant, and the family's own files
//! (docs/adding-a-model.md).

pub mod blip2;
pub mod blip2_t5;
pub mod clip;
pub mod clip_text;
pub mod clip_vision;
pub mod instructblip;
pub mod layers;
pub mod llama;
pub mod llava;
pub mod opt;
pub mod qformer;
pub mod t5;
pub mod vit;

use std::path::Path;
use std::sync::Arc;

use serde_json::Value;

use crate::config::{ModelConfig, PreprocessorConfig};
use crate::error::{Error, Result};
use crate::generate::{GenerateOptions, Plan};
use crate::graph::{Linear, Norm, WeightTable, W};
use crate::weights::Checkpoint;

/// A loaded model of one family: everything above the graph that differs between families.
pub trait Family: Send + Sync {
    /// The parsed config.json.
    fn config(&self) -> &ModelConfig;
    /// Every weight, uploaded once per backend.
    fn weights(&self) -> &Arc<WeightTable>;
    /// Checks the image processor's output against what the vision tower takes (`path` names
    /// the preprocessor file in errors).
    fn check_preprocessor(&self, pre: &PreprocessorConfig, path: &Path) -> Result<()>;
    /// Side of the square pixel input of the plan's `pixels` input.
    fn image_size(&self) -> usize;
    /// Decoder positions (`text_config.max_position_embeddings`): bounds prompt + new tokens.
    fn max_positions(&self) -> usize;
    /// The decoder input for tokenized prompt `prompt_ids` (image placeholders, then the prompt).
    fn input_ids(&self, prompt_ids: &[u32]) -> Vec<u32>;
    /// The family's question-answering prompt template applied to `question`.
    fn question_prompt(&self, question: &str) -> String;
    /// Generation settings as transformers' `generate()` resolves them for this family.
    fn default_options(&self) -> GenerateOptions;
    /// The phases for `batch` inputs, a decoder input of `prompt_len` tokens and up to
    /// `max_new_tokens` new tokens; `all_prefill_logits` keeps every prefill row's logits.
    fn plan(&self, batch: usize, prompt_len: usize, max_new_tokens: usize, all_prefill_logits: bool) -> Result<Plan>;
    /// `info` lines after the model path: family, towers, decoder (label padded to 12 columns).
    fn describe(&self) -> Vec<String>;
    /// [`Family::plan`] for `images` images spread over `sequences` decoder sequences (chat
    /// families put all of a request's images in one prompt). One image per sequence by default.
    fn plan_images(
        &self,
        images: usize,
        sequences: usize,
        prompt_len: usize,
        max_new_tokens: usize,
        all_prefill_logits: bool,
    ) -> Result<Plan> {
        if images != sequences {
            return Err(Error::InvalidInput(format!(
                "this model takes one image per prompt; got {images} images for {sequences} prompts"
            )));
        }
        self.plan(sequences, prompt_len, max_new_tokens, all_prefill_logits)
    }
    /// Decoder sequences for `images` images and one decoder input `input_ids` (default: one
    /// sequence per image, as BLIP-2 batches).
    fn sequences_for(&self, images: usize, _input_ids: &[u32]) -> Result<usize> {
        Ok(images)
    }
    /// Host inputs the encoders read from each sequence's prompt text besides the image
    /// (InstructBLIP: the Q-Former's instruction), one text per sequence; None (the default)
    /// when the encoders see the image only.
    fn text_inputs(&self, _texts: &[&str]) -> Result<Option<TextInputs>> {
        Ok(None)
    }
    /// [`Family::plan_images`] for encoders that also read `text_rows` rows per sequence
    /// ([`TextInputs::rows`]; 0 for families without [`Family::text_inputs`]).
    #[allow(clippy::too_many_arguments)]
    fn plan_text(
        &self,
        images: usize,
        sequences: usize,
        prompt_len: usize,
        max_new_tokens: usize,
        all_prefill_logits: bool,
        text_rows: usize,
    ) -> Result<Plan> {
        if text_rows != 0 {
            return Err(Error::InvalidInput(format!(
                "this model's encoders read no text, but {text_rows} text rows per sequence were given"
            )));
        }
        self.plan_images(images, sequences, prompt_len, max_new_tokens, all_prefill_logits)
    }
    /// True for chat models: prompts come from the checkpoint's chat template and processor
    /// (`crate::chat`), generation settings from generation_config.json.
    fn chat(&self) -> bool {
        false
    }
}

/// What [`Family::text_inputs`] gives the encoders: named host data (each `[sequences * ..]`,
/// sequence-major, so beam search can repeat each sequence's block) and the text rows per
/// sequence the plan is built for ([`Family::plan_text`]).
#[derive(Debug)]
pub struct TextInputs {
    pub rows: usize,
    pub inputs: Vec<(&'static str, Vec<f32>)>,
}

/// A loaded model that embeds images and texts into one space instead of generating (CLIP):
/// the family builds one graph per request shape and says how its text inputs are padded and
/// pooled; `api::Embedder` runs them.
pub trait Embedder: Send + Sync {
    fn config(&self) -> &ModelConfig;
    fn weights(&self) -> &Arc<WeightTable>;
    /// Checks the image processor's output against the vision tower (vision models only).
    fn check_preprocessor(&self, pre: &PreprocessorConfig, path: &Path) -> Result<()>;
    /// Side of the square pixel input; None when the model has no vision tower.
    fn image_size(&self) -> Option<usize>;
    /// Token positions of the text tower; None when the model has no text tower.
    fn text_positions(&self) -> Option<usize>;
    /// Width of the embeddings both towers produce.
    fn embed_dim(&self) -> usize;
    /// `exp(logit_scale)`, the factor of image-text similarities (None: single-tower model).
    fn logit_scale(&self) -> Option<f32>;
    /// The graph for `batch` images: input `pixels` `[batch, 3*S*S]`, outputs `[batch, embed_dim]`
    /// embeddings and their unit vectors.
    fn image_plan(&self, batch: usize) -> Result<EmbedPlan>;
    /// The graph for `batch` texts of `len` tokens (padded): tokens through `set_tokens`, input
    /// `key_mask` `[batch, len]` (0 or `f32::MIN` per key), pooling rows through
    /// `set_row_indices` ([`Embedder::pool_rows`]); output `[batch, embed_dim]`.
    fn text_plan(&self, batch: usize, len: usize) -> Result<EmbedPlan>;
    /// The row each padded id sequence is pooled at.
    fn pool_rows(&self, ids: &[Vec<u32>]) -> Vec<usize>;
    /// `info` lines after the model path.
    fn describe(&self) -> Vec<String>;
}

/// One embedding request shape: a graph, its single phase, named host inputs and the output.
pub struct EmbedPlan {
    pub graph: crate::graph::Graph,
    pub phase: crate::graph::Phase,
    pub batch: usize,
    pub inputs: Vec<(&'static str, crate::graph::Buf)>,
    /// `[batch, embed_dim]`: the projected embeddings (`get_image_features` / `get_text_features`).
    pub output: crate::graph::Buf,
    /// `[batch, embed_dim]` fp32: the same rows L2-normalised on the device (`CLIPModel`'s
    /// `image_embeds` / `text_embeds`).
    pub normalized: crate::graph::Buf,
}

/// What a loaded checkpoint does.
pub enum Loaded {
    /// Generates text from images and prompts (BLIP-2): `caption`, `ask`.
    Generates(Box<dyn Family>),
    /// Embeds images and texts (CLIP): `embed`, `classify`.
    Embeds(Box<dyn Embedder>),
}

/// One registry entry: how to recognise and parse a family's config.json.
pub struct Entry {
    /// `model_type` in config.json.
    pub model_type: &'static str,
    /// The `architectures` transformers writes for it (for messages; `model_type` decides).
    pub architectures: &'static [&'static str],
    /// What it runs, for "glimpse runs ..." messages.
    pub label: &'static str,
    /// Parses and validates the whole config.json object.
    pub parse: fn(&Value, &Path) -> Result<ModelConfig>,
}

/// Every family glimpse runs.
pub const FAMILIES: &[Entry] = &[
    Entry {
        model_type: "blip-2",
        architectures: &["Blip2ForConditionalGeneration"],
        label: "blip-2 (OPT, Flan-T5)",
        parse: |v, p| Ok(ModelConfig::Blip2(crate::config::Blip2Config::from_value(v, p)?)),
    },
    Entry { model_type: "clip", architectures: &["CLIPModel"], label: "clip", parse: parse_clip },
    Entry {
        model_type: "clip_text_model",
        architectures: &["CLIPTextModelWithProjection"],
        label: "clip_text_model (with projection)",
        parse: parse_clip,
    },
    Entry {
        model_type: "clip_vision_model",
        architectures: &["CLIPVisionModelWithProjection"],
        label: "clip_vision_model (with projection)",
        parse: parse_clip,
    },
    Entry {
        model_type: "llava",
        architectures: &["LlavaForConditionalGeneration"],
        label: "llava (LLaMA)",
        parse: |v, p| Ok(ModelConfig::Llava(crate::config::LlavaConfig::from_value(v, p)?)),
    },
    Entry {
        model_type: "instructblip",
        architectures: &["InstructBlipForConditionalGeneration"],
        label: "instructblip (LLaMA/Vicuna)",
        parse: |v, p| Ok(ModelConfig::InstructBlip(crate::config::InstructBlipConfig::from_value(v, p)?)),
    },
];

fn parse_clip(v: &Value, p: &Path) -> Result<ModelConfig> {
    Ok(ModelConfig::Clip(crate::config::ClipConfig::from_value(v, p)?))
}

/// Parses a config.json object through the family its `model_type` names.
pub fn parse_config(value: &Value, path: &Path) -> Result<ModelConfig> {
    match value.get("model_type") {
        Some(Value::String(t)) => match FAMILIES.iter().find(|e| e.model_type == t) {
            Some(entry) => (entry.parse)(value, path),
            None => Err(Error::Unsupported(format!(
                "{}: model_type `{t}` (architectures {}); glimpse runs {} checkpoints",
                path.display(),
                value.get("architectures").map_or("none".to_string(), |a| a.to_string()),
                FAMILIES.iter().map(|e| e.label).collect::<Vec<_>>().join(", ")
            ))),
        },
        Some(other) => {
            Err(Error::config(path, format!("`model_type` is {other}: it must be a string such as \"blip-2\"")))
        }
        None => Err(Error::config(path, "no `model_type` field: is this a Hugging Face config.json?")),
    }
}

/// Loads the weights of the family `cfg` belongs to.
pub fn load_any(cfg: &ModelConfig, ckpt: &Checkpoint) -> Result<Loaded> {
    Ok(match cfg {
        ModelConfig::Blip2(c) if matches!(c.text_config, crate::config::TextConfig::T5(_)) => {
            Loaded::Generates(Box::new(blip2_t5::Blip2T5::load(c, ckpt)?))
        }
        ModelConfig::Blip2(c) => Loaded::Generates(Box::new(blip2::Blip2::load(c, ckpt)?)),
        ModelConfig::Clip(c) => Loaded::Embeds(Box::new(clip::Clip::load(c, ckpt)?)),
        ModelConfig::Llava(c) => Loaded::Generates(Box::new(llava::Llava::load(c, ckpt)?)),
        ModelConfig::InstructBlip(c) => Loaded::Generates(Box::new(instructblip::InstructBlip::load(c, ckpt)?)),
    })
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

/// Checks that the image processor's output (`crop_size` when it center-crops, else `size`) is
/// the `expected` x `expected` input the vision tower takes (`path` names the file in errors).
pub fn check_square_input(pre: &PreprocessorConfig, path: &Path, expected: usize) -> Result<()> {
    let out = pre.crop_size.as_ref().filter(|_| pre.do_center_crop).unwrap_or(&pre.size);
    if (out.height, out.width) != (Some(expected), Some(expected)) {
        let field = if pre.do_center_crop { "crop_size" } else { "size" };
        return Err(Error::config(
            path,
            format!(
                "`{field}` is {}, but the vision model takes {expected}x{expected} images (vision_config.image_size in config.json): set {field} to {{\"height\": {expected}, \"width\": {expected}}}",
                out.describe()
            ),
        ));
    }
    Ok(())
}

/// Reads named tensors of a checkpoint into a weight table, checking every shape.
pub struct Loader<'a> {
    pub ckpt: &'a Checkpoint,
    pub table: &'a mut WeightTable,
}

impl Loader<'_> {
    pub fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<W> {
        let w = self.ckpt.f16(name, shape)?;
        Ok(self.table.add(name, w))
    }

    /// `{prefix}.weight` `[out, in]` and, when `bias`, `{prefix}.bias` `[out]`.
    pub fn linear(&mut self, prefix: &str, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear> {
        let weight = self.tensor(&format!("{prefix}.weight"), &[out_dim, in_dim])?;
        let bias = if bias { Some(self.tensor(&format!("{prefix}.bias"), &[out_dim])?) } else { None };
        Ok(Linear { weight, bias, in_dim, out_dim })
    }

    /// `{prefix}.weight` and `{prefix}.bias`, both `[dim]`.
    pub fn norm(&mut self, prefix: &str, dim: usize, eps: f64) -> Result<Norm> {
        Ok(Norm {
            weight: self.tensor(&format!("{prefix}.weight"), &[dim])?,
            bias: self.tensor(&format!("{prefix}.bias"), &[dim])?,
            eps: eps as f32,
        })
    }
}

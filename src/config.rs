//! Hugging Face files every family shares: `generation_config.json`, the image-processor
//! configs and `token_id` fields, as serde structs whose defaults are transformers' defaults (hub
//! configs omit fields equal to them), and the checks families validate their config.json
//! fields with. Each family's own config.json structs live in its file under `crate::models`.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::json::from_json_value;

/// The error for one config field: its name, its value and what would fix it.
pub(crate) fn field_error(field: &str, value: impl fmt::Display, fix: impl fmt::Display) -> String {
    format!("`{field}` is {value}: {fix}")
}

pub(crate) fn check_positive(field: &str, value: usize) -> Result<(), String> {
    if value == 0 {
        return Err(field_error(field, 0, "it must be at least 1"));
    }
    Ok(())
}

/// transformers' attention layers raise when the hidden size does not split into whole heads.
pub(crate) fn check_heads(section: &str, hidden: usize, heads: usize) -> Result<(), String> {
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

pub(crate) fn check_eps(field: &str, eps: f64) -> Result<(), String> {
    if !(eps > 0.0 && eps.is_finite()) {
        return Err(field_error(
            field,
            eps,
            "it must be a positive finite number (BLIP-2 uses 1e-6 for the vision model, 1e-12 for the Q-Former)",
        ));
    }
    Ok(())
}

/// The checks a language model's `text_config` shares whatever its kind: every special token id
/// it names (`(field, id)`, unset ones skipped) and each id of `eos_token_id` is inside the
/// vocabulary, and `max_new_tokens`, when set, is at least 1 (transformers refuses 0).
pub(crate) fn check_text_tokens(
    ids: &[(&str, Option<u32>)],
    eos: Option<&TokenIds>,
    vocab_size: usize,
    max_new_tokens: Option<usize>,
) -> Result<(), String> {
    for &(field, id) in ids {
        if let Some(id) = id {
            check_token(field, id, vocab_size)?;
        }
    }
    for id in eos.map(TokenIds::to_vec).unwrap_or_default() {
        check_token("text_config.eos_token_id", id, vocab_size)?;
    }
    if max_new_tokens == Some(0) {
        return Err(field_error(
            "text_config.max_new_tokens",
            0,
            "transformers rejects it (it must be at least 1); remove it for the default of 20",
        ));
    }
    Ok(())
}

/// The patch embedding of a ViT tower (`section`: `vision_config`): `patch_size` > 0 tiles
/// `image_size`, and the input has 3 channels (glimpse feeds RGB).
pub(crate) fn check_patches(
    section: &str,
    image_size: usize,
    patch_size: usize,
    channels: usize,
) -> Result<(), String> {
    check_positive(&format!("{section}.patch_size"), patch_size)?;
    if image_size == 0 || image_size % patch_size != 0 {
        return Err(field_error(
            &format!("{section}.image_size"),
            image_size,
            format!(
                "it must be a positive multiple of {section}.patch_size ({patch_size}), so the patches tile the image"
            ),
        ));
    }
    if channels != 3 {
        return Err(field_error(
            &format!("{section}.num_channels"),
            channels,
            "glimpse feeds RGB images: it must be 3",
        ));
    }
    Ok(())
}

pub(crate) fn check_token(field: &str, id: u32, vocab_size: usize) -> Result<(), String> {
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
pub(crate) const KNOWN_ACTIVATIONS: [&str; 24] = [
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
pub(crate) fn check_activation(field: &str, name: &str, implemented: &[&str]) -> Result<(), String> {
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
    /// Read from a generation_config.json (false: the file is absent or not JSON, and
    /// transformers builds the generation config from config.json instead).
    #[serde(skip)]
    pub from_file: bool,
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
        let mut cfg: Self = from_json_value(&value, path)?;
        cfg.from_file = true;
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
    /// ([`image_processor_section`]).
    pub fn load_from_dir(dir: &Path) -> Result<(Self, PathBuf)> {
        let (mut value, path, prefix) = image_processor_section(dir)?;
        expand_legacy_sizes(&mut value);
        let cfg: Self = crate::json::from_json_value_at(&value, &path, prefix)?;
        cfg.validate(&path)?;
        Ok((cfg, path))
    }

    /// Parses and validates preprocessor_config.json bytes.
    pub fn from_slice(bytes: &[u8], path: &Path) -> Result<Self> {
        let mut value: Value =
            serde_json::from_slice(bytes).map_err(|e| Error::Json { path: path.to_path_buf(), msg: e.to_string() })?;
        expand_legacy_sizes(&mut value);
        let cfg: Self = from_json_value(&value, path)?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// The `image_processor` section of processor_config.json bytes; `None` when the file has
    /// none (or it is null), in which case transformers reads preprocessor_config.json.
    pub fn from_processor_slice(bytes: &[u8], path: &Path) -> Result<Option<Self>> {
        let mut value: Value =
            serde_json::from_slice(bytes).map_err(|e| Error::Json { path: path.to_path_buf(), msg: e.to_string() })?;
        match value.get_mut("image_processor") {
            None | Some(Value::Null) => Ok(None),
            Some(section) => {
                expand_legacy_sizes(section);
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

/// The image-processor settings of a model folder as transformers 5.17 chooses them
/// (`ImageProcessingMixin.get_image_processor_dict`): the `image_processor` section of
/// `processor_config.json` when it has one (not null), else `preprocessor_config.json`. Returns
/// the settings, the file they came from and the prefix errors put before a field's name
/// (`image_processor.`, or nothing).
pub fn image_processor_section(dir: &Path) -> Result<(Value, PathBuf, &'static str)> {
    let read = |path: &Path| -> Result<Value> {
        let bytes = crate::files::read(path, crate::files::MAX_CONFIG_BYTES)?;
        serde_json::from_slice(&bytes).map_err(|e| Error::Json { path: path.to_path_buf(), msg: e.to_string() })
    };
    let proc = dir.join("processor_config.json");
    if proc.exists() {
        // A file that is not an object has no section (transformers' `"image_processor" in d`).
        if let Value::Object(mut file) = read(&proc)? {
            match file.remove("image_processor") {
                None | Some(Value::Null) => {}
                Some(section) => return Ok((section, proc, "image_processor.")),
            }
        }
    }
    let pre = dir.join("preprocessor_config.json");
    if pre.exists() {
        return Ok((read(&pre)?, pre, ""));
    }
    Err(Error::MissingFile { path: pre, hint: " (nor an `image_processor` section in processor_config.json)".into() })
}

/// Rewrites the legacy shorthands of `size` and `crop_size` in an image-processor config into
/// the mappings they stand for, as transformers' `get_size_dict` does when it loads one:
/// `[height, width]` is that; an integer `n` is `{"height": n, "width": n}`, except `size` for
/// the processors built with `default_to_square = False` (CLIP's and LLaVA's), where it is
/// `{"shortest_edge": n}`. openai/clip-vit-base-patch32's preprocessor_config.json is written
/// this way (`"size": 224, "crop_size": 224`, `feature_extractor_type` CLIPFeatureExtractor).
fn expand_legacy_sizes(config: &mut Value) {
    let class = ["image_processor_type", "feature_extractor_type"]
        .iter()
        .find_map(|key| config.get(*key).and_then(Value::as_str))
        .map(|name| name.trim_end_matches("Fast").replace("FeatureExtractor", "ImageProcessor"));
    let size_is_shortest_edge = matches!(class.as_deref(), Some("CLIPImageProcessor" | "LlavaImageProcessor"));
    let Some(obj) = config.as_object_mut() else { return };
    if class.as_deref() == Some("IdeficsImageProcessor") {
        // IdeficsImageProcessor: `image_size` (idefics-9b's only size field) replaces `size`;
        // with neither, 224 x 224.
        match obj.get("image_size").cloned() {
            Some(side @ Value::Number(_)) => {
                obj.insert("size".into(), serde_json::json!({ "height": side, "width": side }));
            }
            _ if !obj.contains_key("size") => {
                obj.insert("size".into(), serde_json::json!({ "height": 224, "width": 224 }));
            }
            _ => {}
        }
    }
    for (field, edge) in [("size", size_is_shortest_edge), ("crop_size", false)] {
        let expanded = match obj.get(field) {
            Some(Value::Number(n)) if n.is_u64() && edge => serde_json::json!({ "shortest_edge": n }),
            Some(Value::Number(n)) if n.is_u64() => serde_json::json!({ "height": n, "width": n }),
            Some(Value::Array(hw)) if hw.len() == 2 && hw.iter().all(Value::is_u64) => {
                serde_json::json!({ "height": hw[0], "width": hw[1] })
            }
            _ => continue,
        };
        obj.insert(field.to_string(), expanded);
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

//! Hugging Face `config.json`, `generation_config.json` and image-processor configs, as serde
//! structs whose defaults are transformers' defaults (hub configs omit fields equal to them).

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::error::{Error, Result};

/// Reads and parses a JSON file, naming the file in every error.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Json { path: path.to_path_buf(), msg: e.to_string() })
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
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
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

/// `config.json` of a `Blip2ForConditionalGeneration` checkpoint.
#[derive(Debug, Clone, Deserialize)]
pub struct Blip2Config {
    #[serde(default)]
    pub vision_config: VisionConfig,
    #[serde(default)]
    pub qformer_config: QFormerConfig,
    #[serde(default)]
    pub text_config: OptConfig,
    #[serde(default = "default_num_query_tokens")]
    pub num_query_tokens: usize,
    #[serde(default, alias = "image_token_id")]
    pub image_token_index: Option<u32>,
}

fn default_num_query_tokens() -> usize {
    32
}

/// The model family named by `config.json`'s `model_type`.
#[derive(Debug, Clone)]
pub enum ModelConfig {
    Blip2(Blip2Config),
}

#[derive(Deserialize)]
struct ModelTypeOnly {
    model_type: Option<String>,
    architectures: Option<Vec<String>>,
}

impl ModelConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let head: ModelTypeOnly = read_json(path)?;
        match head.model_type.as_deref() {
            Some("blip-2") => {
                let cfg: Blip2Config = read_json(path)?;
                cfg.validate(path)?;
                Ok(ModelConfig::Blip2(cfg))
            }
            Some(other) => Err(Error::Unsupported(format!(
                "{}: model_type `{other}` (architectures {:?}); glimpse runs blip-2 (OPT) checkpoints",
                path.display(),
                head.architectures.unwrap_or_default()
            ))),
            None => Err(Error::config(path, "no `model_type` field: is this a Hugging Face config.json?")),
        }
    }
}

impl Blip2Config {
    /// Checks what the math needs: divisibility of heads, a supported decoder, the image token.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let err = |msg: String| Err(Error::config(path, msg));
        let v = &self.vision_config;
        let q = &self.qformer_config;
        let t = &self.text_config;
        if t.model_type != "opt" {
            return err(format!(
                "text_config.model_type `{}` is not supported yet (glimpse runs BLIP-2 with OPT)",
                t.model_type
            ));
        }
        for (what, hidden, heads) in [
            ("vision_config", v.hidden_size, v.num_attention_heads),
            ("qformer_config", q.hidden_size, q.num_attention_heads),
            ("text_config", t.hidden_size, t.num_attention_heads),
        ] {
            if heads == 0 || hidden == 0 || hidden % heads != 0 {
                return err(format!("{what}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}"));
            }
        }
        if v.patch_size == 0 || v.image_size % v.patch_size != 0 {
            return err(format!(
                "vision_config: image_size {} is not a multiple of patch_size {}",
                v.image_size, v.patch_size
            ));
        }
        if v.num_channels != 3 {
            return err(format!("vision_config: num_channels {} (glimpse feeds RGB images)", v.num_channels));
        }
        if v.hidden_act != "gelu" || q.hidden_act != "gelu" {
            return err(format!(
                "hidden_act `{}`/`{}`: only exact `gelu` is implemented for BLIP-2",
                v.hidden_act, q.hidden_act
            ));
        }
        if t.activation_function != "relu" {
            return err(format!("text_config.activation_function `{}`: only relu is implemented", t.activation_function));
        }
        if !t.do_layer_norm_before || !t.enable_bias || !t.layer_norm_elementwise_affine || t.remove_final_layer_norm {
            return err("text_config: only pre-norm OPT with biases and affine layer norms is implemented (opt-350m style post-norm is not)".into());
        }
        if self.num_query_tokens == 0 {
            return err("num_query_tokens is 0".into());
        }
        match self.image_token_index {
            None => return err("no `image_token_index`: checkpoints saved before transformers 4.47 lack it; add \"image_token_index\": <id of <image>> to config.json".into()),
            Some(id) if id as usize >= t.vocab_size => {
                return err(format!("image_token_index {id} is outside the vocabulary ({})", t.vocab_size))
            }
            Some(_) => {}
        }
        Ok(())
    }

    pub fn image_token(&self) -> u32 {
        // validate() guarantees presence; a config that skipped validation gets OPT's id.
        self.image_token_index.unwrap_or(50265)
    }
}

/// `generation_config.json`: the parts greedy decoding uses.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct GenerationConfig {
    pub max_new_tokens: Option<usize>,
    pub max_length: Option<usize>,
    pub eos_token_id: Option<TokenIds>,
    pub bos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
}

impl GenerationConfig {
    /// Absent file -> defaults (transformers does the same).
    pub fn load_or_default(path: &Path) -> Result<Self> {
        if path.exists() {
            read_json(path)
        } else {
            Ok(Self::default())
        }
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
    /// `preprocessor_config.json`, else the `image_processor` section of `processor_config.json`.
    pub fn load_from_dir(dir: &Path) -> Result<(Self, PathBuf)> {
        let pre = dir.join("preprocessor_config.json");
        if pre.exists() {
            let cfg: Self = read_json(&pre)?;
            cfg.validate(&pre)?;
            return Ok((cfg, pre));
        }
        let proc = dir.join("processor_config.json");
        if proc.exists() {
            let value: serde_json::Value = read_json(&proc)?;
            if let Some(section) = value.get("image_processor") {
                let cfg: Self = serde_json::from_value(section.clone())
                    .map_err(|e| Error::Json { path: proc.clone(), msg: format!("image_processor: {e}") })?;
                cfg.validate(&proc)?;
                return Ok((cfg, proc));
            }
        }
        Err(Error::MissingFile {
            path: pre,
            hint: " (nor an `image_processor` section in processor_config.json)".into(),
        })
    }

    pub fn validate(&self, path: &Path) -> Result<()> {
        let err = |msg: String| Err(Error::config(path, msg));
        if self.image_mean.len() != 3 || self.image_std.len() != 3 {
            return err("image_mean and image_std must have 3 entries".into());
        }
        if self.image_std.contains(&0.0) {
            return err("image_std has a zero entry".into());
        }
        if self.do_resize {
            if self.resample != 3 {
                return err(format!("resample {} is not supported (only 3 = bicubic)", self.resample));
            }
            let s = &self.size;
            let ok = matches!((s.height, s.width), (Some(h), Some(w)) if h > 0 && w > 0)
                || matches!(s.shortest_edge, Some(e) if e > 0);
            if !ok {
                return err(format!("size {s:?} needs height and width, or shortest_edge"));
            }
        }
        if self.do_center_crop {
            match &self.crop_size {
                Some(SizeSpec { height: Some(h), width: Some(w), .. }) if *h > 0 && *w > 0 => {}
                other => return err(format!("do_center_crop needs crop_size with height and width, got {other:?}")),
            }
        }
        Ok(())
    }
}

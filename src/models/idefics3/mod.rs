//! SmolVLM and Idefics3 (`Idefics3ForConditionalGeneration`, `SmolVLMForConditionalGeneration`;
//! docs/models/idefics3.md): each image becomes frames (tiles plus the global image, see
//! [`processor`]) -> SigLIP vision transformer ([`vision`]) -> pixel shuffle by `scale_factor`
//! and the bias-free modality projection (the connector) -> rows scattered over the `<image>`
//! tokens of a LLaMA decoder's input, in order.
//!
//! A plan's "images" are frames: `Family::sequences_for` counts a sequence's frames from its
//! `<image>` tokens (`image_seq_len` per frame).

pub mod processor;
pub mod vision;

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::decoder::{CausalDecoder, PrefillSpec};
use super::family::{
    core_accessors, image_token_sequences, Family, FamilyConfig, Loaded, Loader, ModelConfig, ModelCore,
};
use super::language_model::TextConfig;
use super::llama::{LlamaConfig, LlamaDecoder};
use super::{FamilyEntry, ModelType};
use crate::config::{check_positive, field_error, GenerationConfig};
use crate::error::{Error, Result};
use crate::generate::{kv_capacity, Encoders, GenerateOptions, ImagePlan, ImageStage, Plan, PlanShape};
use crate::graph::{Buf, Fused, Graph, Linear, Op, Phase, WeightTable};
use crate::image::{ImageProcessor, PixelValues};
use crate::json::{from_json_value, section_or, split_sections};
use crate::weights::Checkpoint;
use vision::{Idefics3Vision, Idefics3VisionConfig};

/// `config.json` of an Idefics3 / SmolVLM checkpoint (transformers 5.17 `Idefics3Config`,
/// `SmolVLMConfig`: the same fields and defaults).
#[derive(Debug, Clone)]
pub struct Idefics3Config {
    /// `idefics3` or `smolvlm`.
    pub model_type: String,
    pub vision_config: Idefics3VisionConfig,
    pub text_config: LlamaConfig,
    pub image_token_id: u32,
    pub scale_factor: usize,
    /// config.json's own `tie_word_embeddings` (the head ties to `model.text_model.embed_tokens`
    /// when it is set; text_config's flag does not apply to the composite model).
    pub tie_word_embeddings: bool,
}

impl Idefics3Config {
    /// Parses as `Idefics3Config.__post_init__` does: a missing vision_config takes the defaults,
    /// text_config defaults to llama (and when absent entirely, a LLaMA with `rms_norm_eps` 1e-5).
    pub fn from_value(value: &Value, path: &Path) -> Result<Self> {
        #[derive(Deserialize)]
        #[serde(default)]
        struct Top {
            model_type: String,
            image_token_id: u32,
            scale_factor: usize,
            tie_word_embeddings: bool,
            pad_token_id: Option<u32>,
        }
        impl Default for Top {
            fn default() -> Self {
                Self {
                    model_type: "idefics3".into(),
                    image_token_id: 128257,
                    scale_factor: 2,
                    tie_word_embeddings: false,
                    pad_token_id: Some(128_002),
                }
            }
        }
        let (rest, [vision, text]) = split_sections(value, ["vision_config", "text_config"]);
        let top: Top = from_json_value(&rest, path)?;
        let vision_config = section_or(vision, path, "vision_config.", Idefics3VisionConfig::default)?;
        let text_config = TextConfig::llama_section(text, path, &top.model_type)?.unwrap_or_else(|| LlamaConfig {
            rms_norm_eps: 1e-5,
            pad_token_id: top.pad_token_id,
            tie_word_embeddings: top.tie_word_embeddings,
            ..LlamaConfig::default()
        });
        let cfg = Self {
            model_type: top.model_type,
            vision_config,
            text_config,
            image_token_id: top.image_token_id,
            scale_factor: top.scale_factor,
            tie_word_embeddings: top.tie_word_embeddings,
        };
        cfg.check().map_err(|m| Error::config(path, m))?;
        Ok(cfg)
    }

    /// Decoder rows (and `<image>` tokens) per frame: patches over `scale_factor²`.
    pub fn image_seq_len(&self) -> usize {
        self.vision_config.num_patches() / (self.scale_factor * self.scale_factor)
    }

    fn check(&self) -> Result<(), String> {
        self.vision_config.check()?;
        self.text_config.check()?;
        check_positive("scale_factor", self.scale_factor)?;
        let side = self.vision_config.patches_per_side();
        if side % self.scale_factor != 0 {
            return Err(field_error(
                "scale_factor",
                self.scale_factor,
                format!(
                    "the pixel shuffle groups scale_factor x scale_factor patches, so it must divide the {side} patches per side (vision_config.image_size / patch_size)"
                ),
            ));
        }
        self.text_config.check_token_ids(&[("image_token_id", Some(self.image_token_id))])
    }
}

fn architecture(model_type: &str) -> &'static str {
    if model_type == "smolvlm" {
        "SmolVLMForConditionalGeneration"
    } else {
        "Idefics3ForConditionalGeneration"
    }
}

pub const FAMILY: FamilyEntry = FamilyEntry {
    model_types: &[
        ModelType {
            name: "idefics3",
            architectures: &["Idefics3ForConditionalGeneration"],
            label: "idefics3 (SmolVLM, Idefics3)",
            parse: |v, p| Ok(ModelConfig::new(Idefics3Config::from_value(v, p)?)),
        },
        ModelType {
            name: "smolvlm",
            architectures: &["SmolVLMForConditionalGeneration"],
            label: "smolvlm (SmolVLM2)",
            parse: |v, p| Ok(ModelConfig::new(Idefics3Config::from_value(v, p)?)),
        },
    ],
    presets: &["smolvlm-256m", "smolvlm-500m", "smolvlm-2.2b", "smolvlm-tiny"],
    preset_config: smolvlm_json,
};

impl FamilyConfig for Idefics3Config {
    fn architecture(&self) -> &str {
        architecture(&self.model_type)
    }
    fn load(&self, ckpt: &Checkpoint) -> Result<Loaded> {
        Ok(Loaded::Generates(Box::new(Idefics3::load(self, ckpt)?)))
    }
    fn check_generation_config(&self, generation: &GenerationConfig, path: &Path) -> Result<()> {
        generation.check_tokens(self.text_config.vocab_size, path)
    }
    fn synth_token_ids(&self) -> (u32, u32) {
        (
            self.text_config.eos_token_id.as_ref().and_then(|e| e.to_vec().first().copied()).unwrap_or(2),
            self.image_token_id,
        )
    }
    fn synth_tokenizer(&self) -> Result<Value> {
        synth::tokenizer(self)
    }
    fn synth_files(&self) -> Result<Vec<(&'static str, Value)>> {
        synth::files(self)
    }
    fn synth_chat_template(&self) -> Option<&'static str> {
        Some(SMOLVLM_CHAT_TEMPLATE)
    }
}

/// Key prefixes: transformers 5.17's module tree (`model.vision_model.`, ...), and the same
/// without `model.` (a bare `Idefics3Model` saved on its own).
const PREFIXES: [&str; 2] = ["model.", ""];

/// A loaded Idefics3 / SmolVLM model.
pub struct Idefics3 {
    pub cfg: Idefics3Config,
    pub core: ModelCore,
    pub vision: Idefics3Vision,
    /// `modality_projection.proj`: `[text hidden, vision hidden * scale_factor²]`, no bias.
    projection: Linear,
    pub decoder: LlamaDecoder,
}

impl Idefics3 {
    pub fn load(cfg: &Idefics3Config, ckpt: &Checkpoint) -> Result<Self> {
        let mut table = WeightTable::default();
        let mut ld = Loader { ckpt, table: &mut table };
        let p = PREFIXES
            .iter()
            .copied()
            .find(|p| ckpt.contains(&format!("{p}vision_model.embeddings.patch_embedding.weight")))
            .unwrap_or(PREFIXES[0]);
        let vision = Idefics3Vision::load(&cfg.vision_config, &mut ld, &format!("{p}vision_model."))?;
        let (d, h, s) = (cfg.vision_config.hidden_size, cfg.text_config.hidden_size, cfg.scale_factor);
        let projection = ld.linear(&format!("{p}connector.modality_projection.proj"), d * s * s, h, false)?;
        let decoder = LlamaDecoder::load(
            &cfg.text_config,
            &mut ld,
            &format!("{p}text_model."),
            "lm_head.weight",
            cfg.tie_word_embeddings,
        )?;
        Ok(Self { cfg: cfg.clone(), core: ModelCore::new(cfg.clone(), table), vision, projection, decoder })
    }

    /// The image side for `frames` frames: `vision` (pixels -> last hidden state) and
    /// `connector` (pixel shuffle, projection -> `[frames * image_seq_len, H]`).
    fn image_phases(&self, g: &mut Graph, frames: usize) -> ImagePhases {
        let v = &self.cfg.vision_config;
        let (s, h) = (self.cfg.scale_factor, self.cfg.text_config.hidden_size);
        let pixels = g.buffer("pixels", frames, 3 * v.image_size * v.image_size);

        // Vision: pixels -> last_hidden_state              [F*P, D]
        let hidden = self.vision.emit(g, pixels, frames);
        let vision = g.take_phase("vision");

        // Connector: proj(pixel_shuffle(hidden))             [F*P/s², D*s²] -> [F*P/s², H]
        let rows = frames * self.cfg.image_seq_len();
        let shuffled = g.buffer("connector.shuffled", rows, v.hidden_size * s * s);
        g.push(Op::PixelShuffle { x: hidden, out: shuffled, batch: frames, side: v.patches_per_side(), scale: s });
        let image_features = g.buffer("image_features", rows, h);
        g.linear(shuffled, self.projection.weight, None, Fused::NONE, image_features, rows);
        let connector = g.take_phase("connector");
        ImagePhases { pixels, hidden, image_features, phases: vec![vision, connector] }
    }
}

/// The image side in a graph.
struct ImagePhases {
    pixels: Buf,
    /// The vision tower's `last_hidden_state` (a plan output for tests).
    hidden: Buf,
    /// `[frames * image_seq_len, H]`: what replaces the `<image>` tokens' embeddings.
    image_features: Buf,
    phases: Vec<Phase>,
}

impl Family for Idefics3 {
    core_accessors!();

    /// Idefics3's own processor ([`processor::Idefics3ImageProcessor`]), whose frames must be
    /// the vision tower's `image_size` squares and whose `image_seq_len` (processor_config.json)
    /// must be the rows the connector gives per frame.
    fn image_processor(&self, dir: &Path) -> Result<ImageProcessor> {
        let (proc, proc_path) = processor::Idefics3ImageProcessor::load_from_dir(dir)?;
        let (tile, side) = (proc.config().tile(), self.cfg.vision_config.image_size);
        if tile != side {
            return Err(Error::config(
                &proc_path,
                format!(
                    "`max_image_size` is {{\"longest_edge\": {tile}}}, but the vision model takes {side}x{side} frames (vision_config.image_size in config.json): set it to {{\"longest_edge\": {side}}}"
                ),
            ));
        }
        let path = dir.join("processor_config.json");
        if path.exists() {
            let value: Value = crate::json::read_json(&path)?;
            let want = self.cfg.image_seq_len();
            match value.get("image_seq_len") {
                None | Some(Value::Null) => {}
                Some(v) if v.as_u64() == Some(want as u64) => {}
                Some(v) => {
                    return Err(Error::config(
                        &path,
                        format!(
                            "`image_seq_len` is {v}, but the model gives {want} rows per frame ((vision_config.image_size / patch_size)² / scale_factor²): set it to {want}"
                        ),
                    ))
                }
            }
        }
        Ok(ImageProcessor::splitting(std::sync::Arc::new(proc)))
    }

    /// Each `<image>` becomes its image's tile rows and global image (`Idefics3Processor`).
    fn expand_image_prompt(&self, text: &str, images: &[PixelValues]) -> Result<Option<String>> {
        let grids = images
            .iter()
            .map(|p| {
                p.tiles.ok_or_else(|| {
                    Error::InvalidInput(
                        "SmolVLM needs each image's tile grid: preprocess images with this model (Model::preprocess)"
                            .into(),
                    )
                })
            })
            .collect::<Result<Vec<_>>>()?;
        processor::expand_image_tokens(text, &grids, self.cfg.image_seq_len()).map(Some)
    }

    /// Side of one frame.
    fn image_size(&self) -> usize {
        self.cfg.vision_config.image_size
    }

    fn max_positions(&self) -> usize {
        self.decoder.max_positions()
    }

    /// What transformers builds from config.json without generation_config.json; with the file
    /// the api generates with it instead (a chat family).
    fn default_options(&self) -> GenerateOptions {
        self.cfg.text_config.generate_options()
    }

    fn image_plan(&self, frames: usize) -> Result<Option<ImagePlan>> {
        let mut g = Graph::new();
        let img = self.image_phases(&mut g, frames);
        let stage = ImageStage::new(&img.phases, img.pixels, img.image_features, self.cfg.image_seq_len());
        Ok(Some(stage.into_plan(g, frames, img.phases)))
    }

    /// `shape.images` counts frames (all sequences' frames, in order).
    fn build_plan(&self, shape: &PlanShape) -> Result<Plan> {
        shape.image_only()?;
        let (frames, sequences) = (shape.images, shape.sequences);
        if frames == 0 || sequences == 0 {
            return Err(Error::InvalidInput("no images given: SmolVLM prompts hold at least one image".into()));
        }
        let per = self.cfg.image_seq_len();
        let capacity = kv_capacity(
            shape.prompt_len,
            shape.max_new_tokens,
            self.decoder.max_positions(),
            &format!("{per} per frame, up to 17 frames per image"),
            "use fewer or smaller images, a shorter prompt, or fewer new tokens",
        )?;
        let mut g = Graph::new();
        let img = self.image_phases(&mut g, frames);
        let stage = ImageStage::new(&img.phases, img.pixels, img.image_features, per);

        // Decoder: prompts holding different frame counts are left-padded to one length.
        let image = (img.image_features, self.cfg.image_token_id);
        let prompt = PrefillSpec {
            prompt_len: shape.prompt_len,
            image: Some(image),
            padded: true,
            all_logits: shape.all_prefill_logits,
        };
        let encoders = Encoders {
            inputs: vec![("pixels", img.pixels)],
            phases: img.phases,
            outputs: vec![("vision", img.hidden), ("image_features", img.image_features)],
            image_stage: Some(stage),
        };
        Ok(self.decoder.plan(g, sequences, capacity, shape.max_new_tokens, prompt, encoders))
    }

    fn chat(&self) -> bool {
        true
    }

    /// Every frame fills `image_seq_len` tokens: the frames per sequence are the prompt's image
    /// tokens over that, and must divide the frames given.
    fn sequences_for(&self, frames: usize, input_ids: &[u32]) -> Result<usize> {
        let fix = "check image_seq_len in processor_config.json";
        image_token_sequences(input_ids, self.cfg.image_token_id, self.cfg.image_seq_len(), frames, "frame", fix)
    }

    fn describe(&self) -> Vec<String> {
        let c = &self.cfg;
        vec![
            format!("family:     {} with a LLaMA decoder", architecture(&c.model_type)),
            c.vision_config.describe(),
            format!(
                "connector:  pixel shuffle x{} -> {} -> {} (no bias), {} rows per frame",
                c.scale_factor,
                self.projection.in_dim,
                self.projection.out_dim,
                c.image_seq_len()
            ),
            self.decoder.describe(),
        ]
    }
}

/// HuggingFaceTB/SmolVLM-*-Instruct's chat template ("User:<image>...<end_of_utterance>\nAssistant:").
const SMOLVLM_CHAT_TEMPLATE: &str = "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}";

mod synth;
use synth::smolvlm_json;

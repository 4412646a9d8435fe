//! `LlavaForConditionalGeneration` (LLaVA-1.5, docs/models/llava.md): CLIP vision tower run up to
//! `vision_feature_layer` -> (CLS dropped under the "default" strategy) -> MLP projector
//! (`linear_1`, GELU, `linear_2`) -> rows scattered over the `<image>` tokens of a LLaMA decoder's
//! input. The prompt (chat template, `<image>` expansion) is built by [`crate::chat`].

use std::path::Path;

use half::f16;

use super::clip_vision::{find_prefix, ClipVision, VisionRequest};
use super::decoder::{CausalDecoder, PrefillSpec};
use super::family::{core_accessors, image_token_sequences, Family, Loader};
use super::llama::LlamaDecoder;
use serde::Deserialize;
use serde_json::{json, Value};

use super::clip_vision::ClipVisionConfig;
use super::family::{FamilyConfig, Loaded, ModelConfig, ModelCore};
use super::language_model::TextConfig;
use super::llama::LlamaConfig;
use super::preset_tokenizers::{llama_generation_config, llama_special_tokens, llama_tokenizer_json};
use super::presets::{clip_image_processor, clip_vision_json, llama_text_json, not_a_preset, Widths};
use super::{FamilyEntry, ModelType};
use crate::config::{check_activation, field_error, GenerationConfig};
use crate::error::{Error, Result};
use crate::generate::{kv_capacity, Encoders, GenerateOptions, ImagePlan, ImageStage, Plan, PlanShape};
use crate::graph::{Activation, Buf, Fused, Graph, Linear, Phase, WeightTable, W};
use crate::json::{from_json_value, section_or, split_sections};
use crate::weights::{Checkpoint, Weight};

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
        let (rest, [vision, text]) = split_sections(value, ["vision_config", "text_config"]);
        let top: Top = from_json_value(&rest, path)?;
        let vision_config = section_or(vision, path, "vision_config.", ClipVisionConfig::llava_default)?;
        let text_config = TextConfig::llama_section(text, path, "LLaVA")?.unwrap_or_default();
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
        self.text_config.check_token_ids(&[("image_token_index", Some(self.image_token_index))])
    }
}

pub const FAMILY: FamilyEntry = FamilyEntry {
    model_types: &[ModelType {
        name: "llava",
        architectures: &["LlavaForConditionalGeneration"],
        label: "llava (LLaMA)",
        parse: |v, p| Ok(ModelConfig::new(LlavaConfig::from_value(v, p)?)),
    }],
    presets: &["llava-1.5-7b", "llava-1.5-13b", "llava-tiny"],
    preset_config: llava_json,
};

impl FamilyConfig for LlavaConfig {
    fn architecture(&self) -> &str {
        "LlavaForConditionalGeneration"
    }
    fn load(&self, ckpt: &Checkpoint) -> Result<Loaded> {
        Ok(Loaded::Generates(Box::new(Llava::load(self, ckpt)?)))
    }
    fn check_generation_config(&self, generation: &GenerationConfig, path: &Path) -> Result<()> {
        // A chat family generates with these ids (`default_options`).
        generation.check_tokens(self.text_config.vocab_size, path)
    }
    /// The model's tensors plus the vision layers past `vision_feature_layer` and
    /// `post_layernorm`, which glimpse never runs but transformers' `CLIPVisionModel` holds.
    fn record_tensors(&self, recorder: &Checkpoint) -> Result<()> {
        Llava::load(self, recorder)?;
        let v = &self.vision_config;
        let prefix = find_prefix(recorder, &VISION_PREFIXES)
            .ok_or_else(|| Error::InvalidInput("Llava::load read no vision tower".into()))?;
        let mut table = WeightTable::default();
        let mut ld = Loader { ckpt: recorder, table: &mut table };
        ClipVision::load(v, &mut ld, prefix, v.num_hidden_layers, true)?;
        Ok(())
    }
    fn synth_token_ids(&self) -> (u32, u32) {
        (
            self.text_config.eos_token_id.as_ref().and_then(|e| e.to_vec().first().copied()).unwrap_or(2),
            self.image_token_index,
        )
    }
    fn synth_tokenizer(&self) -> Result<Value> {
        llama_tokenizer_json(self.image_token_index)
    }
    fn synth_files(&self) -> Result<Vec<(&'static str, Value)>> {
        let (image, v) = (self.image_token_index, &self.vision_config);
        let special = |id: u32, t: &str| {
            (
                id.to_string(),
                json!({"content": t, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true}),
            )
        };
        let added: serde_json::Map<String, Value> =
            llama_special_tokens(image).into_iter().map(|(id, t)| special(id, t)).collect();
        Ok(vec![
            ("generation_config.json", llama_generation_config(image)),
            ("tokenizer.json", self.synth_tokenizer()?),
            (
                "tokenizer_config.json",
                json!({
                "add_bos_token": true, "add_eos_token": false, "added_tokens_decoder": added,
                "bos_token": "<s>", "clean_up_tokenization_spaces": false, "eos_token": "</s>", "legacy": false,
                "model_max_length": self.text_config.max_position_embeddings, "pad_token": "<pad>",
                "padding_side": "left", "processor_class": "LlavaProcessor", "tokenizer_class": "LlamaTokenizer",
                "unk_token": "<unk>"}),
            ),
            (
                "processor_config.json",
                json!({
                "image_processor": clip_image_processor(v.image_size), "image_token": "<image>",
                "num_additional_image_tokens": 1, "patch_size": v.patch_size, "processor_class": "LlavaProcessor",
                "vision_feature_select_strategy": self.vision_feature_select_strategy}),
            ),
        ])
    }
    fn synth_chat_template(&self) -> Option<&'static str> {
        Some(LLAVA_CHAT_TEMPLATE)
    }
}

/// Where each part lives on disk: the hub layout (transformers 4.36), what 5.17's
/// `save_pretrained` writes (no `vision_model.`), and the 5.17 module tree (`model.` first).
pub const VISION_PREFIXES: [&str; 4] =
    ["vision_tower.vision_model.", "vision_tower.", "model.vision_tower.vision_model.", "model.vision_tower."];
const LM_PREFIXES: [&str; 3] = ["language_model.model.", "model.language_model.", "language_model."];
const HEADS: [&str; 2] = ["language_model.lm_head.weight", "lm_head.weight"];
const PROJECTOR_PREFIXES: [&str; 2] = ["multi_modal_projector.", "model.multi_modal_projector."];

pub struct Llava {
    pub cfg: LlavaConfig,
    pub core: ModelCore,
    pub vision: ClipVision,
    /// `hidden_states` indices feeding the projector.
    layers: Vec<usize>,
    /// With several feature layers: 0/1 matrices `[D * k, D]` placing layer j's rows at columns
    /// `j * D..` (an exact concatenation through the Linear op).
    concat: Vec<W>,
    linear_1: Linear,
    linear_2: Linear,
    pub decoder: LlamaDecoder,
}

fn first_present<'a>(ckpt: &Checkpoint, candidates: &[&'a str], suffix: &str) -> &'a str {
    candidates.iter().copied().find(|p| ckpt.contains(&format!("{p}{suffix}"))).unwrap_or(candidates[0])
}

impl Llava {
    pub fn load(cfg: &LlavaConfig, ckpt: &Checkpoint) -> Result<Self> {
        let layers = cfg.feature_layers().map_err(|m| Error::config(ckpt.origin(), m))?;
        let mut table = WeightTable::default();
        let mut ld = Loader { ckpt, table: &mut table };
        let v = &cfg.vision_config;
        let vprefix = find_prefix(ckpt, &VISION_PREFIXES).unwrap_or(VISION_PREFIXES[0]);
        let run = layers.iter().copied().max().unwrap_or(0);
        let vision = ClipVision::load(v, &mut ld, vprefix, run, false)?;
        let (d, h, k) = (v.hidden_size, cfg.text_config.hidden_size, layers.len());
        let concat = if k > 1 {
            (0..k)
                .map(|j| {
                    let mut m = vec![f16::ZERO; d * k * d];
                    (0..d).for_each(|c| m[(j * d + c) * d + c] = f16::ONE);
                    ld.table.add(format!("vision_feature_layer concat {j}"), Weight::from_vec(vec![d * k, d], m))
                })
                .collect()
        } else {
            Vec::new()
        };
        let p = first_present(ckpt, &PROJECTOR_PREFIXES, "linear_1.weight");
        let bias = cfg.multimodal_projector_bias;
        let linear_1 = ld.linear(&format!("{p}linear_1"), d * k, h, bias)?;
        let linear_2 = ld.linear(&format!("{p}linear_2"), h, h, bias)?;
        let lm = first_present(ckpt, &LM_PREFIXES, "embed_tokens.weight");
        let head = first_present(ckpt, &HEADS, "");
        let decoder = LlamaDecoder::load(&cfg.text_config, &mut ld, lm, head, cfg.tie_word_embeddings)?;
        Ok(Self {
            cfg: cfg.clone(),
            core: ModelCore::new(cfg.clone(), table),
            vision,
            layers,
            concat,
            linear_1,
            linear_2,
            decoder,
        })
    }

    /// The image side of `images` images: `vision` (pixels -> the selected hidden states
    /// `[N*(T-skip), D]` each, concatenated) and `projector` (-> `[N*(T-skip), H]`), which read
    /// the pixels alone.
    fn image_phases(&self, g: &mut Graph, images: usize) -> Result<LlavaImagePhases> {
        let v = &self.cfg.vision_config;
        let (d, h) = (v.hidden_size, self.cfg.text_config.hidden_size);
        let rows = images * self.cfg.image_rows();
        let pixels = g.buffer("pixels", images, 3 * v.image_size * v.image_size);

        // Vision: pixels -> selected hidden states [N*(T-skip), D] each.
        let req = VisionRequest { hidden_states: self.layers.clone(), skip_rows: self.cfg.skip_rows(), pooled: false };
        let taps = self.vision.emit(g, "vision", pixels, images, &req)?.hidden_states;
        let features = if let [one] = taps[..] {
            one
        } else {
            let cat = g.buffer("features", rows, d * taps.len());
            for (j, (&tap, &w)) in taps.iter().zip(&self.concat).enumerate() {
                g.linear(tap, w, None, Fused::add(Activation::None, (j > 0).then_some(cat)), cat, rows);
            }
            cat
        };
        let vision = g.take_phase("vision");

        // Projector: linear_2(gelu(linear_1(features)))   [N*(T-skip), H]
        let hidden = g.buffer("projector.hidden", rows, h);
        let (l1, l2) = (&self.linear_1, &self.linear_2);
        g.linear(features, l1.weight, l1.bias, Fused::act(Activation::Gelu), hidden, rows);
        let image_features = g.buffer("image_features", rows, h);
        g.linear(hidden, l2.weight, l2.bias, Fused::NONE, image_features, rows);
        let projector = g.take_phase("projector");
        Ok(LlavaImagePhases {
            pixels,
            features,
            image_features,
            phases: vec![vision, projector],
            rows_per_image: self.cfg.image_rows(),
        })
    }

    /// The phases for `images` images spread over `sequences` decoder sequences of `prompt_len`
    /// tokens (image `i` fills the `i`-th run of image tokens in flattened order).
    fn plan_images(
        &self,
        images: usize,
        sequences: usize,
        prompt_len: usize,
        max_new_tokens: usize,
        all_prefill_logits: bool,
    ) -> Result<Plan> {
        if images == 0 || sequences == 0 {
            return Err(Error::InvalidInput("no images given: LLaVA prompts hold at least one image".into()));
        }
        let max_pos = self.decoder.max_positions();
        let holds = format!("{} per image", self.cfg.image_rows());
        let capacity =
            kv_capacity(prompt_len, max_new_tokens, max_pos, &holds, "use fewer images or a shorter prompt")?;
        let mut g = Graph::new();
        let img = self.image_phases(&mut g, images)?;
        let (features, image_features, image_stage) = (img.features, img.image_features, img.stage());

        // Decoder: every sequence's prompt has the same length (no key mask).
        let image = (image_features, self.cfg.image_token_index);
        let prompt = PrefillSpec { prompt_len, image: Some(image), padded: false, all_logits: all_prefill_logits };
        let encoders = Encoders {
            inputs: vec![("pixels", img.pixels)],
            phases: img.phases,
            outputs: vec![("features", features), ("image_features", image_features)],
            image_stage: Some(image_stage),
        };
        Ok(self.decoder.plan(g, sequences, capacity, max_new_tokens, prompt, encoders))
    }
}

/// LLaVA's image side in a graph: the `vision` and `projector` phases.
struct LlavaImagePhases {
    pixels: Buf,
    /// The vision tower's selected hidden states (a plan output for tests).
    features: Buf,
    /// `[images * rows_per_image, H]`: what replaces the image tokens' embeddings.
    image_features: Buf,
    phases: Vec<Phase>,
    rows_per_image: usize,
}

impl LlavaImagePhases {
    fn stage(&self) -> ImageStage {
        ImageStage::new(&self.phases, self.pixels, self.image_features, self.rows_per_image)
    }
}

impl Family for Llava {
    core_accessors!();

    fn image_size(&self) -> usize {
        self.cfg.vision_config.image_size
    }

    fn max_positions(&self) -> usize {
        self.decoder.max_positions()
    }

    /// What transformers builds from config.json when there is no generation_config.json
    /// (`GenerationConfig.from_model_config`): EOS and the generation fields `text_config`
    /// keeps, else transformers' defaults. With the file, the api generates with it instead.
    fn default_options(&self) -> GenerateOptions {
        self.cfg.text_config.generate_options()
    }

    fn image_plan(&self, images: usize) -> Result<Option<ImagePlan>> {
        let mut g = Graph::new();
        let img = self.image_phases(&mut g, images)?;
        Ok(Some(img.stage().into_plan(g, images, img.phases)))
    }

    fn build_plan(&self, shape: &PlanShape) -> Result<Plan> {
        shape.image_only()?;
        let s = shape;
        self.plan_images(s.images, s.sequences, s.prompt_len, s.max_new_tokens, s.all_prefill_logits)
    }

    fn chat(&self) -> bool {
        true
    }

    /// transformers' check: every image fills `image_rows` tokens, so the images per sequence are
    /// the prompt's image tokens over that, and must divide the images given.
    fn sequences_for(&self, images: usize, input_ids: &[u32]) -> Result<usize> {
        let fix = "check num_additional_image_tokens and patch_size in processor_config.json";
        image_token_sequences(input_ids, self.cfg.image_token_index, self.cfg.image_rows(), images, "image", fix)
    }

    fn describe(&self) -> Vec<String> {
        let v = &self.cfg.vision_config;
        vec![
            "family:     LLaVA (LlavaForConditionalGeneration) with a LLaMA decoder".to_string(),
            format!(
                "vision:     CLIP, {}; features from hidden_states {:?} ({} strategy)",
                v.describe_sizes(),
                self.layers,
                self.cfg.vision_feature_select_strategy
            ),
            format!(
                "projector:  {} -> {} -> {} ({}), {} rows per image",
                self.linear_1.in_dim,
                self.linear_1.out_dim,
                self.linear_2.out_dim,
                self.cfg.projector_hidden_act,
                self.cfg.image_rows()
            ),
            self.decoder.describe(),
        ]
    }
}

// ---------------------------------------------------------------------------------------------
// `glimpse synth` presets.

/// `config.json` of a LLaVA-1.5 preset, as transformers 5.17 writes llava-hf/llava-1.5-*-hf:
/// CLIP ViT-L/14-336 (hidden state -2, CLS dropped), a GELU projector, a LLaMA-2 decoder.
fn llava_json(name: &str) -> Result<Value> {
    // vision (hidden, intermediate, layers, heads, image, patch), text (hidden, intermediate,
    // layers, heads, vocab, image token, max positions)
    let ((vh, vi, vl, vn, vs, vp), (th, ti, tl, tn, vocab, image, positions)) = match name {
        "llava-1.5-7b" => ((1024, 4096, 24, 16, 336, 14), (4096, 11008, 32, 32, 32064, 32000, 4096)),
        "llava-1.5-13b" => ((1024, 4096, 24, 16, 336, 14), (5120, 13824, 40, 40, 32064, 32000, 4096)),
        // tests/fixtures/llava-tiny's towers; room for the synthetic tokenizer's base entries.
        "llava-tiny" => ((32, 48, 3, 4, 24, 6), (32, 48, 2, 4, 1024, 1000, 512)),
        _ => return Err(not_a_preset(name)),
    };
    let pad = image + 1;
    Ok(json!({
        "architectures": ["LlavaForConditionalGeneration"],
        "dtype": "float16",
        "glimpse_synth": { "preset": name, "note": "random weights made by `glimpse synth`; not a trained model" },
        "image_seq_length": (vs / vp) * (vs / vp),
        "image_token_index": image,
        "model_type": "llava",
        "multimodal_projector_bias": true,
        "pad_token_id": pad,
        "projector_hidden_act": "gelu",
        "text_config": llama_text_json(Widths { hidden: th, intermediate: ti, layers: tl, heads: tn }, tn, positions, vocab, pad, 1e-05),
        "tie_word_embeddings": false,
        "transformers_version": "5.17.0",
        "vision_config": clip_vision_json(Widths { hidden: vh, intermediate: vi, layers: vl, heads: vn }, vs, vp, 768),
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default"
    }))
}

/// The chat template llava-hf/llava-1.5-*-hf ship ("USER: <image>\n... ASSISTANT:").
const LLAVA_CHAT_TEMPLATE: &str = "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}";

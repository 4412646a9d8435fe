//! `LlavaForConditionalGeneration` (LLaVA-1.5, design/llava.md): CLIP vision tower run up to
//! `vision_feature_layer` -> (CLS dropped under the "default" strategy) -> MLP projector
//! (`linear_1`, GELU, `linear_2`) -> rows scattered over the `<image>` tokens of a LLaMA decoder's
//! input. The prompt (chat template, `<image>` expansion) is built by [`crate::chat`].

use std::path::Path;
use std::sync::Arc;

use half::f16;

use super::clip_vision::{find_prefix, ClipVision, VisionRequest};
use super::llama::{KvCache, LlamaDecoder};
use super::{Family, Loader};
use crate::config::{LlavaConfig, ModelConfig, PreprocessorConfig, TokenIds};
use crate::error::{Error, Result};
use crate::generate::{GenerateOptions, KvCaches, Plan, Step};
use crate::graph::{Activation, Graph, Linear, Phase, WeightTable, W};
use crate::weights::{Checkpoint, Weight};

/// Where each part lives on disk: the hub layout (transformers 4.36), what 5.17's
/// `save_pretrained` writes (no `vision_model.`), and the 5.17 module tree (`model.` first).
pub const VISION_PREFIXES: [&str; 4] =
    ["vision_tower.vision_model.", "vision_tower.", "model.vision_tower.vision_model.", "model.vision_tower."];
const LM_PREFIXES: [&str; 3] = ["language_model.model.", "model.language_model.", "language_model."];
const HEADS: [&str; 2] = ["language_model.lm_head.weight", "lm_head.weight"];
const PROJECTOR_PREFIXES: [&str; 2] = ["multi_modal_projector.", "model.multi_modal_projector."];

pub struct Llava {
    pub cfg: LlavaConfig,
    config: ModelConfig,
    pub weights: Arc<WeightTable>,
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
            config: ModelConfig::Llava(cfg.clone()),
            weights: Arc::new(table),
            vision,
            layers,
            concat,
            linear_1,
            linear_2,
            decoder,
        })
    }

    /// The phases for `images` images spread over `sequences` decoder sequences of `prompt_len`
    /// tokens (image `i` fills the `i`-th run of image tokens in flattened order).
    pub fn plan_images(
        &self,
        images: usize,
        sequences: usize,
        prompt_len: usize,
        max_new_tokens: usize,
        all_prefill_logits: bool,
    ) -> Result<Plan> {
        if max_new_tokens == 0 {
            return Err(Error::InvalidInput(
                "max_new_tokens is 0: it must be at least 1 (transformers refuses 0 too)".into(),
            ));
        }
        if images == 0 || sequences == 0 {
            return Err(Error::InvalidInput("no images given: LLaVA prompts hold at least one image".into()));
        }
        let max_pos = self.decoder.max_positions();
        let capacity = prompt_len.saturating_add(max_new_tokens - 1);
        if capacity > max_pos {
            return Err(Error::InvalidInput(format!(
                "the prompt ({prompt_len} tokens, {} per image) plus {max_new_tokens} new tokens exceeds the model's {max_pos} positions (text_config.max_position_embeddings): {}",
                self.cfg.image_rows(),
                match (max_pos + 1).checked_sub(prompt_len) {
                    Some(n) if n > 0 => format!("ask for at most {n} new tokens"),
                    _ => "use fewer images or a shorter prompt".to_string(),
                }
            )));
        }
        let v = &self.cfg.vision_config;
        let (d, h) = (v.hidden_size, self.cfg.text_config.hidden_size);
        let rows = images * self.cfg.image_rows();
        let mut g = Graph::new();
        let pixels = g.buffer("pixels", images, 3 * v.image_size * v.image_size);

        // Vision: pixels -> selected hidden states [N*(T-skip), D] each.
        let req = VisionRequest { hidden_states: self.layers.clone(), skip_rows: self.cfg.skip_rows(), pooled: false };
        let taps = self.vision.emit(&mut g, "vision", pixels, images, &req)?.hidden_states;
        let features = if let [one] = taps[..] {
            one
        } else {
            let cat = g.buffer("features", rows, d * taps.len());
            for (j, (&tap, &w)) in taps.iter().zip(&self.concat).enumerate() {
                g.linear(tap, w, None, Activation::None, (j > 0).then_some(cat), cat, rows);
            }
            cat
        };
        let vision = g.take_phase("vision");

        // Projector: linear_2(gelu(linear_1(features)))   [N*(T-skip), H]
        let hidden = g.buffer("projector.hidden", rows, h);
        let (l1, l2) = (&self.linear_1, &self.linear_2);
        g.linear(features, l1.weight, l1.bias, Activation::Gelu, None, hidden, rows);
        let image_features = g.buffer("image_features", rows, h);
        g.linear(hidden, l2.weight, l2.bias, Activation::None, None, image_features, rows);
        let projector = g.take_phase("projector");

        let cache: KvCache = self.decoder.kv_cache(&mut g, sequences, capacity.max(1));
        let token = self.cfg.image_token_index;
        let pre = self.decoder.build(
            &mut g,
            &cache,
            prompt_len,
            Some((image_features, token)),
            all_prefill_logits,
            "prefill",
        );
        let prefill = g.take_phase("prefill");
        let dec = self.decoder.build(&mut g, &cache, 1, None, false, "decode");
        let decode = Phase { replayable: true, ..g.take_phase("decode") };
        let kv =
            KvCaches { bufs: cache.layers.iter().flat_map(|&(k, v)| [k, v]).collect(), rows_per_seq: cache.capacity };
        Ok(Plan {
            graph: g,
            batch: sequences,
            prompt_len,
            capacity,
            max_new_tokens,
            inputs: vec![("pixels", pixels)],
            encoders: vec![vision, projector],
            outputs: vec![("features", features), ("image_features", image_features)],
            prefill: Step { phase: prefill, logits: pre.logits, rows_per_seq: pre.logit_rows / sequences },
            decode: Step { phase: decode, logits: dec.logits, rows_per_seq: 1 },
            kv,
            key_mask: None,
            encoder_input: None,
            step_inputs: Vec::new(),
        })
    }
}

impl Family for Llava {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn weights(&self) -> &Arc<WeightTable> {
        &self.weights
    }

    fn check_preprocessor(&self, pre: &PreprocessorConfig, path: &Path) -> Result<()> {
        super::check_square_input(pre, path, self.image_size())
    }

    fn image_size(&self) -> usize {
        self.cfg.vision_config.image_size
    }

    fn max_positions(&self) -> usize {
        self.decoder.max_positions()
    }

    /// The prompt already holds the expanded image tokens and BOS (see [`crate::chat`]).
    fn input_ids(&self, prompt_ids: &[u32]) -> Vec<u32> {
        prompt_ids.to_vec()
    }

    /// Not used for LLaVA: questions go through the chat template ([`Family::chat`]).
    fn question_prompt(&self, question: &str) -> String {
        question.to_string()
    }

    /// EOS from `text_config` (generation_config.json, read by the api, takes precedence) and
    /// transformers' default length.
    fn default_options(&self) -> GenerateOptions {
        let t = &self.cfg.text_config;
        GenerateOptions {
            max_new_tokens: t.max_new_tokens,
            eos_token_ids: t.eos_token_id.as_ref().map(TokenIds::to_vec).unwrap_or_default(),
            ..GenerateOptions::default()
        }
    }

    fn plan(&self, batch: usize, prompt_len: usize, max_new_tokens: usize, all_prefill_logits: bool) -> Result<Plan> {
        self.plan_images(batch, batch, prompt_len, max_new_tokens, all_prefill_logits)
    }

    fn plan_images(
        &self,
        images: usize,
        sequences: usize,
        prompt_len: usize,
        max_new_tokens: usize,
        all_prefill_logits: bool,
    ) -> Result<Plan> {
        Llava::plan_images(self, images, sequences, prompt_len, max_new_tokens, all_prefill_logits)
    }

    fn chat(&self) -> bool {
        true
    }

    /// transformers' check: every image fills `image_rows` tokens, so the images per sequence are
    /// the prompt's image tokens over that, and must divide the images given.
    fn sequences_for(&self, images: usize, input_ids: &[u32]) -> Result<usize> {
        let token = self.cfg.image_token_index;
        let held = input_ids.iter().filter(|&&t| t == token).count();
        let per = self.cfg.image_rows();
        let per_seq = held / per;
        if held % per != 0 || per_seq == 0 || images % per_seq != 0 {
            return Err(Error::InvalidInput(format!(
                "Image features and image tokens do not match: the prompt holds {held} image tokens (id {token}), each image fills {per}, and {images} images were given; check num_additional_image_tokens and patch_size in processor_config.json"
            )));
        }
        Ok(images / per_seq)
    }

    fn describe(&self) -> Vec<String> {
        let v = &self.cfg.vision_config;
        vec![
            "family:     LLaVA (LlavaForConditionalGeneration) with a LLaMA decoder".to_string(),
            format!(
                "vision:     CLIP, {} layers, hidden {}, {} heads x {}, mlp {}, {}px / patch {} -> {} tokens; features from hidden_states {:?} ({} strategy)",
                v.num_hidden_layers,
                v.hidden_size,
                v.num_attention_heads,
                v.head_dim(),
                v.intermediate_size,
                v.image_size,
                v.patch_size,
                v.num_positions(),
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

//! `Blip2ForConditionalGeneration`: vision encoder -> Q-Former -> language projection, whose
//! outputs replace the image-token embeddings of the OPT decoder's input.

use std::sync::Arc;

use super::config::Blip2Config;
use crate::error::{Error, Result};
use crate::generate::{GenerateOptions, KvCaches, Plan, PlanShape, Step};
use crate::graph::{Buf, Fused, Graph, Linear, Phase, WeightTable};
use crate::models::family::ModelConfig;
use crate::models::family::{Family, Loader};
use crate::models::language_model::TextConfig;
use crate::models::opt::{KvCache, OptDecoder, PassSpec};
use crate::models::qformer::QFormer;
use crate::models::vit::VisionModel;
use crate::weights::Checkpoint;

pub struct Blip2 {
    pub cfg: Blip2Config,
    config: ModelConfig,
    pub weights: Arc<WeightTable>,
    pub vision: VisionModel,
    pub qformer: QFormer,
    pub language_projection: Linear,
    pub decoder: OptDecoder,
}

impl Blip2 {
    pub fn load(cfg: &Blip2Config, ckpt: &Checkpoint) -> Result<Self> {
        let mut table = WeightTable::default();
        let mut ld = Loader { ckpt, table: &mut table };
        let vision = VisionModel::load(&cfg.vision_config, &mut ld, "vision_model")?;
        let qformer = QFormer::load(&cfg.qformer_config, cfg.num_query_tokens, &mut ld, "qformer")?;
        let language_projection =
            ld.linear("language_projection", cfg.qformer_config.hidden_size, cfg.text_config.hidden_size(), true)?;
        let text = cfg.text_config.opt()?;
        let decoder = OptDecoder::load(text, &mut ld, "language_model")?;
        Ok(Self {
            cfg: cfg.clone(),
            config: ModelConfig::new(cfg.clone()),
            weights: Arc::new(table),
            vision,
            qformer,
            language_projection,
            decoder,
        })
    }

    pub fn image_size(&self) -> usize {
        self.cfg.vision_config.image_size
    }

    /// Decoder input ids: `num_query_tokens` image tokens, then the tokenized prompt (with BOS).
    pub fn input_ids(&self, prompt_ids: &[u32]) -> Vec<u32> {
        let mut ids = vec![self.cfg.image_token(); self.cfg.num_query_tokens];
        ids.extend_from_slice(prompt_ids);
        ids
    }

    /// Builds the phases for `batch` images, a decoder input of `prompt_len` tokens (image
    /// tokens included) and up to `max_new_tokens` generated tokens.
    fn plan_phases(
        &self,
        batch: usize,
        prompt_len: usize,
        max_new_tokens: usize,
        all_prefill_logits: bool,
    ) -> Result<Plan> {
        let max_pos = self.decoder.max_positions();
        // The last generated token is never fed back, so the cache needs one row less.
        let capacity = prompt_len.saturating_add(max_new_tokens - 1);
        if capacity > max_pos {
            return Err(Error::InvalidInput(format!(
                "the prompt ({prompt_len} tokens, {} of them image queries) plus {max_new_tokens} new tokens exceeds the model's {max_pos} positions: {}",
                self.cfg.num_query_tokens,
                match (max_pos + 1).checked_sub(prompt_len) {
                    Some(n) if n > 0 => format!("ask for at most {n} new tokens"),
                    _ => "shorten the prompt".to_string(),
                }
            )));
        }
        if batch == 0 {
            return Err(Error::InvalidInput("no images given".into()));
        }
        let mut g = Graph::new();
        let img = ImagePhases::build(&mut g, &self.cfg, &self.vision, &self.qformer, &self.language_projection, batch);
        let (pixels, image_embeds) = (img.pixels, img.image_embeds);

        // Decoder: prefill over the whole input, then one-token steps over the shared cache.
        let cache: KvCache = self.decoder.kv_cache(&mut g, batch, capacity.max(1));
        // Left-padded batches (prompts of different lengths): pad keys masked out.
        let key_mask = g.buffer("key_mask", batch, cache.capacity);
        let image = Some((image_embeds, self.cfg.image_token()));
        let pre = self.decoder.build(
            &mut g,
            &cache,
            &PassSpec::prefill(prompt_len, image, Some(key_mask), all_prefill_logits),
        );
        let prefill = g.take_phase("prefill");
        let dec = self.decoder.build(&mut g, &cache, &PassSpec::decode(Some(key_mask)));
        let decode = Phase { replayable: true, ..g.take_phase("decode") };

        let kv =
            KvCaches { bufs: cache.layers.iter().flat_map(|&(k, v)| [k, v]).collect(), rows_per_seq: cache.capacity };
        Ok(Plan {
            graph: g,
            batch,
            prompt_len,
            capacity,
            max_new_tokens,
            inputs: vec![("pixels", pixels)],
            outputs: img.outputs(),
            encoders: img.phases,
            prefill: Step { phase: prefill, logits: pre.logits, rows_per_seq: pre.logit_rows / batch },
            decode: Step { phase: decode, logits: dec.logits, rows_per_seq: 1 },
            kv,
            key_mask: Some(key_mask),
            encoder_input: None,
            step_inputs: Vec::new(),
        })
    }
}

/// The image side shared by BLIP-2's OPT and T5 variants: pixels -> vision encoder -> Q-Former
/// -> `language_projection`, as the phases `vision` and `qformer`.
pub(crate) struct ImagePhases {
    /// `[batch, 3*S*S]` host input.
    pub pixels: Buf,
    /// `[batch*positions, vision hidden]`.
    pub vision_out: Buf,
    /// `[batch*queries, qformer hidden]`.
    pub qformer_out: Buf,
    /// `[batch*queries, text hidden]`: what replaces the image tokens' embeddings.
    pub image_embeds: Buf,
    pub phases: Vec<Phase>,
}

impl ImagePhases {
    pub fn build(
        g: &mut Graph,
        cfg: &Blip2Config,
        vision: &VisionModel,
        qformer: &QFormer,
        projection: &Linear,
        batch: usize,
    ) -> Self {
        let v = &cfg.vision_config;
        let pixels = g.buffer("pixels", batch, 3 * v.image_size * v.image_size);

        // Vision: pixels -> [B*257, Dv].
        let vision_out = vision.build(g, pixels, batch);
        let vision_phase = g.take_phase("vision");

        // Q-Former + projection: [B*257, Dv] -> [B*32, Dq] -> [B*32, Dt].
        let qformer_out = qformer.build(g, vision_out, batch, v.num_positions());
        let rows = batch * cfg.num_query_tokens;
        let image_embeds = g.buffer("image_embeds", rows, cfg.text_config.hidden_size());
        g.linear(qformer_out, projection.weight, projection.bias, Fused::NONE, image_embeds, rows);
        let qformer_phase = g.take_phase("qformer");
        Self { pixels, vision_out, qformer_out, image_embeds, phases: vec![vision_phase, qformer_phase] }
    }

    /// The plan outputs tests read.
    pub fn outputs(&self) -> Vec<(&'static str, Buf)> {
        vec![("vision_out", self.vision_out), ("qformer_out", self.qformer_out), ("image_embeds", self.image_embeds)]
    }
}

impl Family for Blip2 {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn weights(&self) -> &Arc<WeightTable> {
        &self.weights
    }

    fn image_size(&self) -> usize {
        Blip2::image_size(self)
    }

    fn max_positions(&self) -> usize {
        self.decoder.max_positions()
    }

    fn input_ids(&self, prompt_ids: &[u32]) -> Vec<u32> {
        Blip2::input_ids(self, prompt_ids)
    }

    /// BLIP-2's VQA template, with the question verbatim: transformers formats the string it is
    /// given, spaces and all, and an empty question is a valid prompt there too.
    fn question_prompt(&self, question: &str) -> String {
        format!("Question: {question} Answer:")
    }

    /// transformers 5.17's BLIP-2 `generate()` hands over to the language model, whose
    /// generation config is made from `text_config` (generation_config.json belongs to the
    /// outer model and is not consulted). So EOS is `text_config.eos_token_id` and the length is
    /// transformers' default (20 new tokens, capped at `text_config.max_position_embeddings`)
    /// unless `text_config` sets `max_new_tokens`. The model config keeps no other generation
    /// parameter than `min_new_tokens` and `min_p` (transformers 5.17 drops num_beams,
    /// length_penalty, do_sample, ... from it), so the rest are transformers' global defaults.
    fn default_options(&self) -> GenerateOptions {
        let t = &self.cfg.text_config;
        GenerateOptions {
            max_new_tokens: t.max_new_tokens(),
            min_new_tokens: t.min_new_tokens().unwrap_or(0),
            min_p: t.min_p(),
            eos_token_ids: t.eos_token_id().map(|e| e.to_vec()).unwrap_or_default(),
            ..Default::default()
        }
    }

    fn build_plan(&self, shape: &PlanShape) -> Result<Plan> {
        shape.one_image_per_sequence()?;
        shape.image_only()?;
        self.plan_phases(shape.sequences, shape.prompt_len, shape.max_new_tokens, shape.all_prefill_logits)
    }

    fn describe(&self) -> Vec<String> {
        let TextConfig::Opt(t) = &self.cfg.text_config else { unreachable!("Blip2Config::validate admits OPT only") };
        vec![
            "family:     BLIP-2 (Blip2ForConditionalGeneration) with an OPT decoder".to_string(),
            self.vision.describe(),
            self.qformer.describe(),
            format!(
                "decoder:    OPT, {} layers, hidden {}, {} heads x {}, ffn {}, vocab {}, {} positions",
                t.num_hidden_layers,
                t.hidden_size,
                t.num_attention_heads,
                t.head_dim(),
                t.ffn_dim,
                t.vocab_size,
                t.max_position_embeddings
            ),
        ]
    }
}

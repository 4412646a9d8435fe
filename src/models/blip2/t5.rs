//! BLIP-2 with a Flan-T5 language model (`Blip2ForConditionalGeneration`, text_config
//! `model_type` t5; docs/models/blip2-t5.md#encoder-input): the image side of BLIP-2 OPT (vision encoder, Q-Former,
//! `language_projection`), whose 32 query outputs replace the `<image>` placeholder embeddings
//! at the start of the T5 *encoder* input; the decoder then generates from
//! `decoder_start_token_id` alone.

use super::config::Blip2Config;
use super::towers::BlipTowers;
use crate::error::{Error, Result};
use crate::generate::{GenerateOptions, ImagePlan, Plan, PlanShape};
use crate::graph::{Graph, WeightTable};
use crate::models::family::ModelCore;
use crate::models::family::{core_accessors, Family, Loader};
use crate::models::language_model::TextConfig;
use crate::models::t5::T5Config;
use crate::models::t5::T5;
use crate::weights::Checkpoint;

pub struct Blip2T5 {
    pub cfg: Blip2Config,
    pub core: ModelCore,
    pub towers: BlipTowers,
    pub t5: T5,
}

impl Blip2T5 {
    pub fn load(cfg: &Blip2Config, ckpt: &Checkpoint) -> Result<Self> {
        let text = t5_config(cfg)?;
        let mut table = WeightTable::default();
        let mut ld = Loader { ckpt, table: &mut table };
        let towers = BlipTowers::load(cfg, &mut ld, text.d_model)?;
        let t5 = T5::load(text, &mut ld, "language_model")?;
        Ok(Self { cfg: cfg.clone(), core: ModelCore::new(cfg.clone(), table), towers, t5 })
    }

    /// The encoder phases of `batch` images with `input_len` encoder tokens, one decoder step
    /// as prefill (the decoder start token at position 0) and one as decode.
    fn plan_phases(&self, batch: usize, input_len: usize, max_new_tokens: usize) -> Result<Plan> {
        if batch == 0 {
            return Err(Error::InvalidInput("no images given".into()));
        }
        let mut g = Graph::new();
        let img = self.towers.build(&mut g, &self.cfg, batch);
        let t5 = self.t5.build_phases(
            &mut g,
            batch,
            input_len,
            max_new_tokens,
            (img.image_embeds, self.cfg.image_token()),
        )?;
        Ok(t5.into_plan(g, batch, max_new_tokens, img.encoders()))
    }
}

fn t5_config(cfg: &Blip2Config) -> Result<&T5Config> {
    match &cfg.text_config {
        TextConfig::T5(t) => Ok(t),
        other => Err(Error::Unsupported(format!(
            "BLIP-2 Flan-T5 needs a T5 text_config; text_config.model_type is `{}`",
            other.model_type()
        ))),
    }
}

impl Family for Blip2T5 {
    core_accessors!();

    fn image_size(&self) -> usize {
        self.cfg.vision_config.image_size
    }

    /// T5 positions are relative: no table bounds the length.
    fn max_positions(&self) -> usize {
        self.cfg.text_config.max_position_embeddings()
    }

    /// The encoder input as 5.17's Blip2Processor builds it: `num_query_tokens` image
    /// placeholders, then the tokenized prompt (which ends with `</s>`). Captioning (no prompt)
    /// gives `[image]*32 + [</s>]`, what `generate` builds from `bos_token_id` there too.
    fn input_ids(&self, prompt_ids: &[u32]) -> Vec<u32> {
        self.cfg.query_placeholders_then(self.cfg.image_token(), prompt_ids)
    }

    fn question_prompt(&self, question: &str) -> String {
        super::vqa_prompt(question)
    }

    /// As BLIP-2 OPT: the language model's generation config, from `text_config`.
    fn default_options(&self) -> GenerateOptions {
        self.t5.default_options()
    }

    /// `prompt_len` is the encoder input's length; the decoder's default length does not depend
    /// on it (transformers counts the decoder's one start token).
    fn build_plan(&self, shape: &PlanShape) -> Result<Plan> {
        shape.one_image_per_sequence()?;
        shape.image_only()?;
        self.plan_phases(shape.sequences, shape.prompt_len, shape.max_new_tokens)
    }

    fn image_plan(&self, images: usize) -> Result<Option<ImagePlan>> {
        Ok(Some(self.towers.image_plan(&self.cfg, images)))
    }

    fn describe(&self) -> Vec<String> {
        vec![
            "family:     BLIP-2 (Blip2ForConditionalGeneration) with a T5 encoder-decoder".to_string(),
            self.towers.vision.describe(),
            self.towers.qformer.describe(),
            self.t5.describe(),
        ]
    }
}

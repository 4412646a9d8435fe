//! `Blip2ForConditionalGeneration`: vision encoder -> Q-Former -> language projection, whose
//! outputs replace the image-token embeddings of the OPT decoder's input.

use super::config::Blip2Config;
use super::towers::BlipTowers;
use crate::error::{Error, Result};
use crate::generate::{kv_capacity, GenerateOptions, ImagePlan, Plan, PlanShape};
use crate::graph::{Graph, WeightTable};
use crate::models::decoder::{CausalDecoder, PrefillSpec};
use crate::models::family::ModelCore;
use crate::models::family::{core_accessors, Family, Loader};
use crate::models::language_model::TextConfig;
use crate::models::opt::OptDecoder;
use crate::weights::Checkpoint;

pub struct Blip2 {
    pub cfg: Blip2Config,
    pub core: ModelCore,
    pub towers: BlipTowers,
    pub decoder: OptDecoder,
}

impl Blip2 {
    pub fn load(cfg: &Blip2Config, ckpt: &Checkpoint) -> Result<Self> {
        let mut table = WeightTable::default();
        let mut ld = Loader { ckpt, table: &mut table };
        let towers = BlipTowers::load(cfg, &mut ld, cfg.text_config.hidden_size())?;
        let decoder = OptDecoder::load(cfg.text_config.opt()?, &mut ld, "language_model")?;
        Ok(Self { cfg: cfg.clone(), core: ModelCore::new(cfg.clone(), table), towers, decoder })
    }

    pub fn image_size(&self) -> usize {
        self.cfg.vision_config.image_size
    }

    /// Decoder input ids: `num_query_tokens` image tokens, then the tokenized prompt (with BOS).
    pub fn input_ids(&self, prompt_ids: &[u32]) -> Vec<u32> {
        self.cfg.query_placeholders_then(self.cfg.image_token(), prompt_ids)
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
        let holds = format!("{} of them image queries", self.cfg.num_query_tokens);
        let capacity = kv_capacity(prompt_len, max_new_tokens, max_pos, &holds, "shorten the prompt")?;
        if batch == 0 {
            return Err(Error::InvalidInput("no images given".into()));
        }
        let mut g = Graph::new();
        let img = self.towers.build(&mut g, &self.cfg, batch);

        // Decoder: prefill over the whole input, then one-token steps over the shared cache;
        // left-padded batches (prompts of different lengths) mask out the pad keys.
        let image = (img.image_embeds, self.cfg.image_token());
        let prompt = PrefillSpec { prompt_len, image: Some(image), padded: true, all_logits: all_prefill_logits };
        Ok(self.decoder.plan(g, batch, capacity, max_new_tokens, prompt, img.encoders()))
    }
}

impl Family for Blip2 {
    core_accessors!();

    fn image_size(&self) -> usize {
        Blip2::image_size(self)
    }

    fn max_positions(&self) -> usize {
        self.decoder.max_positions()
    }

    fn input_ids(&self, prompt_ids: &[u32]) -> Vec<u32> {
        Blip2::input_ids(self, prompt_ids)
    }

    /// BLIP-2's VQA template ([`super::vqa_prompt`]).
    fn question_prompt(&self, question: &str) -> String {
        super::vqa_prompt(question)
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
        GenerateOptions::from_model_config(t.eos_token_id(), t.max_new_tokens(), t.min_new_tokens(), t.min_p())
    }

    fn build_plan(&self, shape: &PlanShape) -> Result<Plan> {
        shape.one_image_per_sequence()?;
        shape.image_only()?;
        self.plan_phases(shape.sequences, shape.prompt_len, shape.max_new_tokens, shape.all_prefill_logits)
    }

    fn image_plan(&self, images: usize) -> Result<Option<ImagePlan>> {
        Ok(Some(self.towers.image_plan(&self.cfg, images)))
    }

    fn describe(&self) -> Vec<String> {
        let TextConfig::Opt(t) = &self.cfg.text_config else { unreachable!("Blip2Config::validate admits OPT only") };
        vec![
            "family:     BLIP-2 (Blip2ForConditionalGeneration) with an OPT decoder".to_string(),
            self.towers.vision.describe(),
            self.towers.qformer.describe(),
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

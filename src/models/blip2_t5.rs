//! BLIP-2 with a Flan-T5 language model (`Blip2ForConditionalGeneration`, text_config
//! `model_type` t5; design/t5.md §2.2): the image side of BLIP-2 OPT (vision encoder, Q-Former,
//! `language_projection`), whose 32 query outputs replace the `<image>` placeholder embeddings
//! at the start of the T5 *encoder* input; the decoder then generates from
//! `decoder_start_token_id` alone.

use std::path::Path;
use std::sync::Arc;

use super::blip2::ImagePhases;
use super::qformer::QFormer;
use super::t5::T5;
use super::vit::VisionModel;
use super::{Family, Loader};
use crate::config::{Blip2Config, ModelConfig, PreprocessorConfig, T5Config, TextConfig};
use crate::error::{Error, Result};
use crate::generate::{EncoderInput, GenerateOptions, KvCaches, Plan, Step};
use crate::graph::{Graph, Linear, Phase, WeightTable};
use crate::weights::Checkpoint;

pub struct Blip2T5 {
    pub cfg: Blip2Config,
    config: ModelConfig,
    pub weights: Arc<WeightTable>,
    pub vision: VisionModel,
    pub qformer: QFormer,
    language_projection: Linear,
    pub t5: T5,
}

impl Blip2T5 {
    pub fn load(cfg: &Blip2Config, ckpt: &Checkpoint) -> Result<Self> {
        let text = t5_config(cfg)?;
        let mut table = WeightTable::default();
        let mut ld = Loader { ckpt, table: &mut table };
        let vision = VisionModel::load(&cfg.vision_config, &mut ld, "vision_model")?;
        let qformer = QFormer::load(&cfg.qformer_config, cfg.num_query_tokens, &mut ld, "qformer")?;
        let language_projection =
            ld.linear("language_projection", cfg.qformer_config.hidden_size, text.d_model, true)?;
        let t5 = T5::load(text, &mut ld, "language_model")?;
        Ok(Self {
            cfg: cfg.clone(),
            config: ModelConfig::Blip2(cfg.clone()),
            weights: Arc::new(table),
            vision,
            qformer,
            language_projection,
            t5,
        })
    }

    fn text(&self) -> &T5Config {
        t5_config(&self.cfg).expect("checked by load")
    }

    /// The encoder phases of `batch` images with `input_len` encoder tokens, one decoder step
    /// as prefill (the decoder start token at position 0) and one as decode.
    pub fn plan(&self, batch: usize, input_len: usize, max_new_tokens: usize) -> Result<Plan> {
        if max_new_tokens == 0 {
            return Err(Error::InvalidInput(
                "max_new_tokens is 0: it must be at least 1 (transformers refuses 0 too)".into(),
            ));
        }
        if batch == 0 {
            return Err(Error::InvalidInput("no images given".into()));
        }
        if input_len == 0 {
            return Err(Error::InvalidInput("the encoder input is empty: it needs at least one token".into()));
        }
        let start = self.text().decoder_start().expect("checked by Blip2Config::validate");
        let mut g = Graph::new();
        let img = ImagePhases::build(&mut g, &self.cfg, &self.vision, &self.qformer, &self.language_projection, batch);
        let (enc, enc_bias) = self.t5.build_encoder(
            &mut g,
            batch,
            input_len,
            Some((img.image_embeds, self.cfg.image_token())),
            "encoder",
        );
        let encoder = g.take_phase("encoder");

        // The decoder input is the start token, then each generated token but the last.
        let capacity = max_new_tokens;
        let cache = self.t5.kv_cache(&mut g, batch, capacity);
        let (pre, pre_bias) = self.t5.build_decoder(&mut g, &cache, &enc, "prefill");
        let prefill = g.take_phase("prefill");
        let (dec, dec_bias) = self.t5.build_decoder(&mut g, &cache, &enc, "decode");
        let decode = Phase { replayable: true, ..g.take_phase("decode") };

        // Only the self-attention caches follow beams: the cross-attention keys and values are
        // the same for every beam of an input (its encoder inputs are repeated per beam), and
        // beams move only among their input's rows.
        let kv =
            KvCaches { bufs: cache.layers.iter().flat_map(|&(k, v)| [k, v]).collect(), rows_per_seq: cache.capacity };
        let mut outputs = img.outputs();
        outputs.extend([("encoder_embeds", enc.embeds), ("encoder_out", enc.hidden)]);
        let mut encoders = img.phases;
        encoders.push(encoder);
        Ok(Plan {
            graph: g,
            batch,
            prompt_len: 1,
            capacity,
            max_new_tokens,
            inputs: vec![("pixels", img.pixels)],
            encoders,
            outputs,
            prefill: Step { phase: prefill, logits: pre.logits, rows_per_seq: 1 },
            decode: Step { phase: decode, logits: dec.logits, rows_per_seq: 1 },
            kv,
            key_mask: None,
            encoder_input: Some(EncoderInput { len: input_len, decoder_start: start }),
            step_inputs: vec![enc_bias, pre_bias, dec_bias],
        })
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
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn weights(&self) -> &Arc<WeightTable> {
        &self.weights
    }

    fn check_preprocessor(&self, pre: &PreprocessorConfig, path: &Path) -> Result<()> {
        super::check_square_input(pre, path, self.cfg.vision_config.image_size)
    }

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
        let mut ids = vec![self.cfg.image_token(); self.cfg.num_query_tokens];
        ids.extend_from_slice(prompt_ids);
        ids
    }

    fn question_prompt(&self, question: &str) -> String {
        format!("Question: {question} Answer:")
    }

    /// As BLIP-2 OPT: transformers' generate() hands over to the T5 language model, whose
    /// generation config comes from `text_config` (EOS `</s>` = 1, 20 new tokens after the
    /// decoder start token).
    fn default_options(&self) -> GenerateOptions {
        let t = self.text();
        GenerateOptions {
            max_new_tokens: t.max_new_tokens,
            min_new_tokens: t.min_new_tokens.unwrap_or(0),
            min_p: t.min_p,
            eos_token_ids: t.eos_token_id.as_ref().map(|e| e.to_vec()).unwrap_or_default(),
            ..Default::default()
        }
    }

    /// `prompt_len` is the encoder input's length; the decoder's default length does not depend
    /// on it (transformers counts the decoder's one start token).
    fn plan(&self, batch: usize, prompt_len: usize, max_new_tokens: usize, _all_prefill_logits: bool) -> Result<Plan> {
        Blip2T5::plan(self, batch, prompt_len, max_new_tokens)
    }

    fn describe(&self) -> Vec<String> {
        let cfg = &self.cfg;
        let (v, q, t) = (&cfg.vision_config, &cfg.qformer_config, self.text());
        vec![
            "family:     BLIP-2 (Blip2ForConditionalGeneration) with a T5 encoder-decoder".to_string(),
            format!(
                "vision:     {} layers, hidden {}, {} heads x {}, mlp {}, {}px / patch {} -> {} tokens",
                v.num_hidden_layers,
                v.hidden_size,
                v.num_attention_heads,
                v.head_dim(),
                v.intermediate_size,
                v.image_size,
                v.patch_size,
                v.num_positions()
            ),
            format!(
                "q-former:   {} layers, hidden {}, {} heads x {}, cross-attention every {} layers, {} queries",
                q.num_hidden_layers,
                q.hidden_size,
                q.num_attention_heads,
                q.head_dim(),
                q.cross_attention_frequency,
                cfg.num_query_tokens
            ),
            format!(
                "t5:         {} encoder + {} decoder layers, d_model {}, {} heads x {}, ff {} ({}{}), vocab {}, {} buckets / max distance {}, head {}",
                t.num_layers,
                t.decoder_layers(),
                t.d_model,
                t.num_heads,
                t.d_kv,
                t.d_ff,
                if t.is_gated() { "gated " } else { "" },
                t.act_name(),
                t.vocab_size,
                t.relative_attention_num_buckets,
                t.relative_attention_max_distance,
                if t.scale_outputs() { "scaled by d_model^-0.5" } else { "unscaled" }
            ),
        ]
    }
}

//! `Blip2ForConditionalGeneration`: vision encoder -> Q-Former -> language projection, whose
//! outputs replace the image-token embeddings of the OPT decoder's input.

use std::sync::Arc;

use super::opt::{KvCache, OptDecoder};
use super::qformer::QFormer;
use super::vit::VisionModel;
use super::Loader;
use crate::config::Blip2Config;
use crate::error::{Error, Result};
use crate::graph::{Activation, Buf, Graph, Linear, Phase, WeightTable};
use crate::weights::Checkpoint;

pub struct Blip2 {
    pub cfg: Blip2Config,
    pub weights: Arc<WeightTable>,
    pub vision: VisionModel,
    pub qformer: QFormer,
    language_projection: Linear,
    pub decoder: OptDecoder,
}

/// The graph of one request shape (batch, prompt length, KV capacity): buffers plus the ops of
/// each phase, built once and run by any executor.
pub struct Blip2Plan {
    pub graph: Graph,
    pub batch: usize,
    pub prompt_len: usize,
    pub capacity: usize,
    /// Tokens generated at most (at least 1).
    pub max_new_tokens: usize,
    /// `[batch, 3*S*S]` pixel values in.
    pub pixels: Buf,
    pub vision_out: Buf,
    pub qformer_out: Buf,
    pub image_embeds: Buf,
    pub vision: Phase,
    /// Q-Former and language projection.
    pub qformer: Phase,
    pub prefill: Phase,
    pub prefill_logits: Buf,
    pub prefill_logit_rows: usize,
    pub decode: Phase,
    pub decode_logits: Buf,
}

impl Blip2 {
    pub fn load(cfg: &Blip2Config, ckpt: &Checkpoint) -> Result<Self> {
        let mut table = WeightTable::default();
        let mut ld = Loader { ckpt, table: &mut table };
        let vision = VisionModel::load(&cfg.vision_config, &mut ld, "vision_model")?;
        let qformer = QFormer::load(&cfg.qformer_config, cfg.num_query_tokens, &mut ld, "qformer")?;
        let language_projection =
            ld.linear("language_projection", cfg.qformer_config.hidden_size, cfg.text_config.hidden_size, true)?;
        let decoder = OptDecoder::load(&cfg.text_config, &mut ld, "language_model")?;
        Ok(Self { cfg: cfg.clone(), weights: Arc::new(table), vision, qformer, language_projection, decoder })
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
    pub fn plan(&self, batch: usize, prompt_len: usize, max_new_tokens: usize, all_prefill_logits: bool) -> Result<Blip2Plan> {
        if max_new_tokens == 0 {
            return Err(Error::InvalidInput("max_new_tokens is 0: it must be at least 1 (transformers refuses 0 too)".into()));
        }
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
        let v = &self.cfg.vision_config;
        let mut g = Graph::new();
        let pixels = g.buffer("pixels", batch, 3 * v.image_size * v.image_size);

        // Vision: pixels -> [B*257, Dv].
        let vision_out = self.vision.build(&mut g, pixels, batch);
        let vision = g.take_phase("vision");

        // Q-Former + projection: [B*257, Dv] -> [B*32, Dq] -> [B*32, Dt].
        let qformer_out = self.qformer.build(&mut g, vision_out, batch, v.num_positions());
        let image_embeds = g.buffer("image_embeds", batch * self.cfg.num_query_tokens, self.cfg.text_config.hidden_size);
        let p = &self.language_projection;
        g.linear(qformer_out, p.weight, p.bias, Activation::None, None, image_embeds, batch * self.cfg.num_query_tokens);
        let qformer = g.take_phase("qformer");

        // Decoder: prefill over the whole input, then one-token steps over the shared cache.
        let cache: KvCache = self.decoder.kv_cache(&mut g, batch, capacity.max(1));
        let pre = self.decoder.build(&mut g, &cache, prompt_len, Some((image_embeds, self.cfg.image_token())), all_prefill_logits, "prefill");
        let prefill = g.take_phase("prefill");
        let dec = self.decoder.build(&mut g, &cache, 1, None, false, "decode");
        let decode = Phase { replayable: true, ..g.take_phase("decode") };

        Ok(Blip2Plan {
            graph: g,
            batch,
            prompt_len,
            capacity,
            max_new_tokens,
            pixels,
            vision_out,
            qformer_out,
            image_embeds,
            vision,
            qformer,
            prefill,
            prefill_logits: pre.logits,
            prefill_logit_rows: pre.logit_rows,
            decode,
            decode_logits: dec.logits,
        })
    }
}

//! What every decoder-only language model (OPT, LLaMA) gives the families built on it: one pass
//! over its KV cache ([`CausalDecoder::build`]), and the prefill and decode phases a plan runs
//! ([`CausalDecoder::plan`]), so a family's plan is its image phases plus one call.

use super::layers::KvCache;
use crate::generate::{Encoders, Plan, Step};
use crate::graph::{Buf, Graph, Phase};

/// One decoder pass to emit: `seq` new tokens per sequence from the executor's position (a
/// prefill over the prompt, or a decode step with `seq` 1).
#[derive(Debug, Clone, Copy)]
pub struct PassSpec<'a> {
    pub seq: usize,
    /// Rows scattered over the tokens holding this id (the image features), in order
    /// (`masked_scatter`).
    pub image: Option<(Buf, u32)>,
    /// Additive `[batch, capacity]` mask over the cache: 0, or `f32::MIN` on each left-padded
    /// sequence's pad keys.
    pub key_mask: Option<Buf>,
    /// Logits for every row, not only each sequence's last.
    pub all_logits: bool,
    /// Name of the pass's phase and prefix of its buffers (`prefill`, `decode`).
    pub tag: &'a str,
}

impl PassSpec<'static> {
    /// The prefill over `seq` prompt tokens.
    pub fn prefill(seq: usize, image: Option<(Buf, u32)>, key_mask: Option<Buf>, all_logits: bool) -> Self {
        Self { seq, image, key_mask, all_logits, tag: "prefill" }
    }
    /// One decode step.
    pub fn decode(key_mask: Option<Buf>) -> Self {
        Self { seq: 1, image: None, key_mask, all_logits: false, tag: "decode" }
    }
}

/// Where a built decoder pass reads its input and leaves its logits.
pub struct DecoderPass {
    /// `[rows, embed_dim]` token embeddings (image rows overwritten by the caller's scatter).
    pub embeds: Buf,
    /// `[logit_rows, vocab]`.
    pub logits: Buf,
    pub logit_rows: usize,
}

/// The prompt a plan's prefill reads, per sequence.
#[derive(Debug, Clone, Copy)]
pub struct PrefillSpec {
    /// Decoder input tokens per sequence, image placeholders included.
    pub prompt_len: usize,
    /// The image features scattered over the placeholders holding this token id, in order
    /// (None: the images enter elsewhere, IDEFICS' cross-attention).
    pub image: Option<(Buf, u32)>,
    /// Prompts may be left-padded to one length: a `[batch, capacity]` key mask (`key_mask`)
    /// hides each sequence's pad keys.
    pub padded: bool,
    /// Logits for every prompt row (parity tests), not only each sequence's last.
    pub all_logits: bool,
}

/// A decoder-only language model.
pub trait CausalDecoder {
    /// Per-layer K and V caches of `capacity` rows for each of `batch` sequences.
    fn kv_cache(&self, g: &mut Graph, batch: usize, capacity: usize) -> KvCache;

    /// Emits one pass ([`PassSpec`]) over the cache, starting at the executor's position.
    fn build(&self, g: &mut Graph, cache: &KvCache, pass: &PassSpec<'_>) -> DecoderPass;

    /// Positions the model has (`max_position_embeddings`).
    fn max_positions(&self) -> usize;

    /// The plan of `batch` sequences: the image `encoders` already in `g`, then the `prefill`
    /// phase over the prompt and the replayable one-token `decode` phase, over one KV cache of
    /// `capacity` rows per sequence (at least 1), for up to `max_new_tokens` new tokens.
    fn plan(
        &self,
        mut g: Graph,
        batch: usize,
        capacity: usize,
        max_new_tokens: usize,
        prompt: PrefillSpec,
        encoders: Encoders,
    ) -> Plan {
        let cache = self.kv_cache(&mut g, batch, capacity.max(1));
        let key_mask = prompt.padded.then(|| g.buffer("key_mask", batch, cache.capacity));
        let pass = PassSpec::prefill(prompt.prompt_len, prompt.image, key_mask, prompt.all_logits);
        let pre = self.build(&mut g, &cache, &pass);
        let prefill = g.take_phase("prefill");
        let step = self.build(&mut g, &cache, &PassSpec::decode(key_mask));
        let decode = Phase { replayable: true, ..g.take_phase("decode") };
        Plan {
            graph: g,
            batch,
            prompt_len: prompt.prompt_len,
            capacity,
            max_new_tokens,
            inputs: encoders.inputs,
            encoders: encoders.phases,
            outputs: encoders.outputs,
            prefill: Step { phase: prefill, logits: pre.logits, rows_per_seq: pre.logit_rows / batch },
            decode: Step { phase: decode, logits: step.logits, rows_per_seq: 1 },
            kv: cache.caches(),
            key_mask,
            encoder_input: None,
            step_inputs: Vec::new(),
            prompt_inputs: Vec::new(),
            image_stage: encoders.image_stage,
        }
    }
}

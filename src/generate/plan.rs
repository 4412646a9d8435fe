//! What a model family hands the generation loop: one graph of buffers and named phases, with
//! their declared inputs, outputs and KV caches, built for one request shape.

use crate::error::{Error, Result};
use crate::graph::{Buf, Graph, Phase};

/// A decoder pass and where it leaves its logits.
pub struct Step {
    pub phase: Phase,
    /// `[rows, vocab]` logits.
    pub logits: Buf,
    /// Logit rows per sequence: 1 (the last input row), or every input row when the plan was
    /// built with all prefill logits (parity tests); the loop decodes from each sequence's last.
    pub rows_per_seq: usize,
}

/// The decoder's KV caches: every buffer holds `batch` sequences of `rows_per_seq` rows, so
/// [`crate::backend::Executor::reorder_sequences`] can move whole sequences (beam search).
pub struct KvCaches {
    pub bufs: Vec<Buf>,
    pub rows_per_seq: usize,
}

/// Host data a family computes from the position of each run of one phase (T5's relative
/// position bias), written before every run of that phase: encoders at position 0, prefill and
/// decode steps at theirs. A host write into a fixed buffer keeps a replayed decode step valid.
pub struct StepInput {
    /// The phase it is written before (an encoder's name, `prefill` or `decode`).
    pub phase: &'static str,
    pub buf: Buf,
    /// `[rows, cols]` of `buf`: `fill` returns `rows * cols` values.
    pub rows: usize,
    pub fill: Box<dyn Fn(usize) -> Vec<f32> + Send + Sync>,
}

/// The encoder side of an encoder-decoder plan (T5): the request's input ids (image
/// placeholders and prompt) are the encoder's tokens, set before the encoders run; every
/// sequence's decoder then starts from `decoder_start` alone (the plan's `prompt_len` is 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncoderInput {
    /// Encoder tokens per sequence.
    pub len: usize,
    /// transformers' `decoder_start_token_id`.
    pub decoder_start: u32,
    /// Additive `[batch, len]` mask over the encoder's keys (its self-attention and the
    /// decoder's cross-attention), written before the encoders run: `finfo.min` on a padded
    /// input's pad rows, 0 elsewhere. Padding sits on the left here, where transformers' T5
    /// tokenizer pads on the right: T5's relative positions make the two the same.
    pub key_mask: Buf,
}

/// One request shape (batch, decoder input length, new tokens) of one model, built once and run
/// by any executor: host inputs are written, encoders run once, then the prefill over the
/// decoder input and one-token decode steps over the shared caches.
pub struct Plan {
    pub graph: Graph,
    pub batch: usize,
    /// Decoder input tokens per sequence (image placeholders included; 1 for an encoder-decoder).
    pub prompt_len: usize,
    /// KV positions per sequence.
    pub capacity: usize,
    /// Tokens generated at most (at least 1).
    pub max_new_tokens: usize,
    /// Host data written before the encoders, by name (BLIP-2: `pixels`, `[batch, 3*S*S]`).
    pub inputs: Vec<(&'static str, Buf)>,
    /// Phases run once per request before the decoder, in order (BLIP-2: vision, qformer).
    pub encoders: Vec<Phase>,
    /// Intermediate results by name, for tests and parity checks (BLIP-2: vision_out,
    /// qformer_out, image_embeds).
    pub outputs: Vec<(&'static str, Buf)>,
    pub prefill: Step,
    pub decode: Step,
    pub kv: KvCaches,
    /// `[batch, capacity]` additive mask over the decoder's keys (0, or `f32::MIN` for left
    /// padding), written by the generation loop; None: the plan runs equal-length prompts only.
    pub key_mask: Option<Buf>,
    /// Encoder-decoder plans (T5): where the request's input ids go; None for decoder-only.
    pub encoder_input: Option<EncoderInput>,
    /// Host data written before the phases that read it, from their position.
    pub step_inputs: Vec<StepInput>,
}

impl Plan {
    /// Input ids per sequence a request brings: the encoder's for an encoder-decoder, else the
    /// decoder's.
    pub fn input_len(&self) -> usize {
        self.encoder_input.map_or(self.prompt_len, |e| e.len)
    }

    /// The buffer of host input `name`.
    pub fn input(&self, name: &str) -> Result<Buf> {
        lookup(&self.inputs, name, "input")
    }

    /// The buffer of intermediate result `name`.
    pub fn output(&self, name: &str) -> Result<Buf> {
        lookup(&self.outputs, name, "output")
    }

    /// The phase called `name`: an encoder, `prefill` or `decode`.
    pub fn phase(&self, name: &str) -> Result<&Phase> {
        self.encoders.iter().chain([&self.prefill.phase, &self.decode.phase]).find(|p| p.name == name).ok_or_else(
            || {
                let names: Vec<&str> = self.encoders.iter().map(|p| p.name).chain(["prefill", "decode"]).collect();
                Error::InvalidInput(format!("the plan has no phase `{name}` (it has {})", names.join(", ")))
            },
        )
    }

    /// Every phase in run order (for op-by-op checks).
    pub fn phases(&self) -> impl Iterator<Item = &Phase> {
        self.encoders.iter().chain([&self.prefill.phase, &self.decode.phase])
    }
}

fn lookup(list: &[(&'static str, Buf)], name: &str, what: &str) -> Result<Buf> {
    list.iter().find(|(n, _)| *n == name).map(|&(_, b)| b).ok_or_else(|| {
        let names: Vec<&str> = list.iter().map(|&(n, _)| n).collect();
        Error::InvalidInput(format!("the plan has no {what} `{name}` (it has {})", names.join(", ")))
    })
}

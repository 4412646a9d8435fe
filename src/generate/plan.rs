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

/// `(tokens, prompt_len)`: every sequence's `prompt_len` decoder input tokens (left-padded,
/// sequence-major) -> a [`PromptInput`]'s values.
pub type PromptFill = Box<dyn Fn(&[u32], usize) -> Vec<f32> + Send + Sync>;

/// Host data a family computes from every sequence's prompt tokens (IDEFICS' image attention
/// masks), written once per request before the prefill.
pub struct PromptInput {
    pub buf: Buf,
    pub fill: PromptFill,
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

/// The request shape a [`Plan`] is built for (and the key of a model's cached plan).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PlanShape {
    /// Images the encoders read.
    pub images: usize,
    /// Decoder sequences: one per image for BLIP-2; chat families may put several images in one.
    pub sequences: usize,
    /// Decoder input tokens per sequence (image placeholders included).
    pub prompt_len: usize,
    /// Tokens generated at most per sequence (at least 1).
    pub max_new_tokens: usize,
    /// Text rows per sequence the encoders read besides the image (InstructBLIP's Q-Former
    /// instruction, `crate::models::TextInputs::rows`); 0 for the image only.
    pub text_rows: usize,
    /// Keep every prefill row's logits (parity tests), not only each sequence's last.
    pub all_prefill_logits: bool,
}

impl PlanShape {
    /// `batch` sequences of one image each, image only, last-row logits.
    pub fn new(batch: usize, prompt_len: usize, max_new_tokens: usize) -> Self {
        Self { images: batch, sequences: batch, prompt_len, max_new_tokens, text_rows: 0, all_prefill_logits: false }
    }

    /// What every family requires, checked once before a family builds its plan.
    pub fn check(&self) -> Result<()> {
        if self.max_new_tokens == 0 {
            return Err(Error::InvalidInput(
                "max_new_tokens is 0: it must be at least 1 (transformers refuses 0 too)".into(),
            ));
        }
        if self.images == 0 || self.sequences == 0 {
            return Err(Error::InvalidInput("no images given".into()));
        }
        Ok(())
    }

    /// For families whose prompts hold one image each.
    pub fn one_image_per_sequence(&self) -> Result<()> {
        if self.images != self.sequences {
            return Err(Error::InvalidInput(format!(
                "this model takes one image per prompt; got {} images for {} prompts",
                self.images, self.sequences
            )));
        }
        Ok(())
    }

    /// For families whose encoders read the image only.
    pub fn image_only(&self) -> Result<()> {
        if self.text_rows != 0 {
            return Err(Error::InvalidInput(format!(
                "this model's encoders read no text, but {} text rows per sequence were given",
                self.text_rows
            )));
        }
        Ok(())
    }
}

/// The KV rows per sequence a decoder of `max_positions` positions needs for a prompt of
/// `prompt_len` tokens and `max_new_tokens` new ones (the last new token is never fed back, so
/// one row less), or an error saying how many new tokens fit. `prompt_holds` says what the
/// prompt holds besides text ("32 of them image queries"); `otherwise` is the fix when no new
/// token fits.
pub fn kv_capacity(
    prompt_len: usize,
    max_new_tokens: usize,
    max_positions: usize,
    prompt_holds: &str,
    otherwise: &str,
) -> Result<usize> {
    let capacity = prompt_len.saturating_add(max_new_tokens.saturating_sub(1));
    if capacity > max_positions {
        let fix = match (max_positions + 1).checked_sub(prompt_len) {
            Some(n) if n > 0 => format!("ask for at most {n} new tokens"),
            _ => otherwise.to_string(),
        };
        return Err(Error::InvalidInput(format!(
            "the prompt ({prompt_len} tokens, {prompt_holds}) plus {max_new_tokens} new tokens exceeds the model's {max_positions} positions (text_config.max_position_embeddings): {fix}"
        )));
    }
    Ok(capacity)
}

/// The part of a plan's encoders that reads the pixels alone: its first `phases` encoders
/// compute `features` (`[images * rows_per_image, cols]`, image-major) from host input `pixels`
/// and nothing else (BLIP-2: vision, Q-Former and projection; LLaVA: vision and projector;
/// InstructBLIP: vision only, its Q-Former reads the instruction too). A request that brings
/// these features, computed earlier by the family's [`ImagePlan`] (an image cache), writes
/// them into `features` and skips those phases; the later phases read nothing else of theirs
/// ([`Plan::check_image_stage`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageStage {
    pub phases: usize,
    pub pixels: Buf,
    pub features: Buf,
    pub rows_per_image: usize,
}

impl ImageStage {
    /// The image encoders `phases`, reading `pixels` and leaving `features`, `rows_per_image`
    /// rows per image.
    pub fn new(phases: &[Phase], pixels: Buf, features: Buf, rows_per_image: usize) -> Self {
        Self { phases: phases.len(), pixels, features, rows_per_image }
    }

    /// The stage alone for `images` images: its `phases` in their graph `graph`.
    pub fn into_plan(self, graph: Graph, images: usize, phases: Vec<Phase>) -> ImagePlan {
        debug_assert_eq!(phases.len(), self.phases);
        let Self { pixels, features, rows_per_image, .. } = self;
        ImagePlan { graph, images, pixels, phases, features, rows_per_image }
    }
}

/// The image stage alone, for `images` images, in a graph of its own: the same ops the family's
/// full plan runs in its [`ImageStage`] phases (built by the same code), so each image's
/// features are the rows the full plan computes for it.
pub struct ImagePlan {
    pub graph: Graph,
    pub images: usize,
    /// `[images, 3*S*S]` host input.
    pub pixels: Buf,
    pub phases: Vec<Phase>,
    /// `[images * rows_per_image, cols]`.
    pub features: Buf,
    pub rows_per_image: usize,
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
    /// Host data written from the prompt tokens before the prefill.
    pub prompt_inputs: Vec<PromptInput>,
    /// The encoders that read the pixels alone, and what they leave for the rest (None: the
    /// family cannot take precomputed image features).
    pub image_stage: Option<ImageStage>,
}

/// What a plan runs before its language model, in order.
pub struct Encoders {
    /// Host data by name ([`Plan::inputs`]).
    pub inputs: Vec<(&'static str, Buf)>,
    pub phases: Vec<Phase>,
    /// Intermediate results by name ([`Plan::outputs`]).
    pub outputs: Vec<(&'static str, Buf)>,
    /// The first phases that read the pixels alone ([`Plan::image_stage`]).
    pub image_stage: Option<ImageStage>,
}

impl Plan {
    /// Input ids per sequence a request brings: the encoder's for an encoder-decoder, else the
    /// decoder's.
    pub fn input_len(&self) -> usize {
        self.encoder_input.map_or(self.prompt_len, |e| e.len)
    }

    /// Writes every [`PromptInput`] for the sequences' prompt `tokens` (sequence-major,
    /// `prompt_len` each): before the prefill, by the generation loop and by tests that run
    /// the phases themselves.
    pub fn write_prompt_inputs(&self, exec: &mut dyn crate::backend::Executor, tokens: &[u32]) -> Result<()> {
        for input in &self.prompt_inputs {
            exec.write(input.buf, &(input.fill)(tokens, self.prompt_len))?;
        }
        Ok(())
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

    /// Checks that skipping the [`ImageStage`] phases and writing its features instead leaves
    /// every later phase with what it reads: no later phase reads a buffer the stage writes
    /// other than its features, nor the pixels; the stage's phases read no host input but the
    /// pixels.
    pub fn check_image_stage(&self) -> Result<()> {
        let Some(stage) = self.image_stage else { return Ok(()) };
        if stage.phases == 0 || stage.phases > self.encoders.len() {
            return Err(Error::InvalidInput(format!(
                "the image stage spans {} phases of {} encoders",
                stage.phases,
                self.encoders.len()
            )));
        }
        let (head, tail) = self.encoders.split_at(stage.phases);
        let written: std::collections::HashSet<Buf> =
            head.iter().flat_map(|p| &p.ops).flat_map(|op| op.outputs()).collect();
        if !written.contains(&stage.features) {
            return Err(Error::InvalidInput("the image stage does not write its features".into()));
        }
        let hosts: Vec<Buf> = self.inputs.iter().map(|&(_, b)| b).filter(|&b| b != stage.pixels).collect();
        if let Some(op) = head.iter().flat_map(|p| &p.ops).find(|op| op.inputs().iter().any(|b| hosts.contains(b))) {
            return Err(Error::InvalidInput(format!(
                "the image stage's `{}` reads a host input besides the pixels",
                op.kind()
            )));
        }
        // Buffers a later phase wrote itself before reading them (shared scratch) are fine.
        let mut fresh = std::collections::HashSet::new();
        for phase in tail.iter().chain([&self.prefill.phase, &self.decode.phase]) {
            for op in &phase.ops {
                let stale =
                    |b: &Buf| *b == stage.pixels || (*b != stage.features && written.contains(b) && !fresh.contains(b));
                if let Some(b) = op.inputs().into_iter().find(stale) {
                    return Err(Error::InvalidInput(format!(
                        "phase `{}` ({}) reads `{}`, which the skipped image stage computes",
                        phase.name,
                        op.kind(),
                        self.graph.desc(b).name
                    )));
                }
                fresh.extend(op.outputs());
            }
        }
        Ok(())
    }
}

fn lookup(list: &[(&'static str, Buf)], name: &str, what: &str) -> Result<Buf> {
    list.iter().find(|(n, _)| *n == name).map(|&(_, b)| b).ok_or_else(|| {
        let names: Vec<&str> = list.iter().map(|&(n, _)| n).collect();
        Error::InvalidInput(format!("the plan has no {what} `{name}` (it has {})", names.join(", ")))
    })
}

#[cfg(test)]
mod tests {
    use super::PlanShape;

    #[test]
    fn shapes_every_family_refuses_are_errors_naming_the_value() {
        assert!(PlanShape::new(2, 8, 1).check().is_ok());
        let err = |r: crate::error::Result<()>| r.unwrap_err().to_string();
        assert!(err(PlanShape::new(1, 8, 0).check()).contains("max_new_tokens is 0"));
        assert!(err(PlanShape::new(0, 8, 4).check()).contains("no images given"));
        let two_per_prompt = PlanShape { images: 4, sequences: 2, ..PlanShape::new(2, 8, 4) };
        assert!(two_per_prompt.check().is_ok());
        assert!(err(two_per_prompt.one_image_per_sequence()).contains("got 4 images for 2 prompts"));
        let with_text = PlanShape { text_rows: 3, ..PlanShape::new(1, 8, 4) };
        assert!(err(with_text.image_only()).contains("3 text rows"));
        assert!(PlanShape::new(1, 8, 4).image_only().is_ok());
    }
}

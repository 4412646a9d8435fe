//! Generation over a model family's [`Plan`]: the loop's shared machinery ([`Session`]: host
//! inputs, encoders, prefill and decode steps, timing hooks) and the decoding strategies on top
//! of the executor's primitives (`top_k`, `reorder_sequences`, positions). Greedy is the one
//! strategy so far (greedy.rs); beam search and sampling are further files over the same session.
//! Sampling (and greedy with logits processors) is sample.rs over processors.rs.

mod greedy;
mod plan;
pub mod processors;
pub mod sample;

use std::collections::BTreeMap;
use std::time::Instant;

pub use plan::{KvCaches, Plan, Step};

use crate::backend::{Candidate, Executor};
use crate::error::{Error, Result};

/// transformers' `max_length` when nothing sets a length: 20 tokens past the decoder input.
pub const DEFAULT_NEW_TOKENS: usize = 20;

#[derive(Debug, Clone, Default)]
pub struct GenerateOptions {
    /// How many tokens to generate at most. `None` is transformers' default: `max_length =
    /// input length + 20`, capped at the decoder's `max_position_embeddings`.
    pub max_new_tokens: Option<usize>,
    /// Generation stops for a sequence when it produces any of these (the token is kept).
    pub eos_token_ids: Vec<u32>,
    /// Logits processors and seeded sampling (sample.rs); None is plain greedy decoding.
    pub sampling: Option<sample::Sampling>,
}

impl GenerateOptions {
    /// transformers raises for `max_new_tokens` 0 (`GenerationConfig.validate`); so does glimpse.
    pub fn validate(&self) -> Result<()> {
        if self.max_new_tokens == Some(0) {
            return Err(Error::InvalidInput(
                "max_new_tokens is 0: it must be at least 1 (transformers refuses 0 too); leave it unset for the default of up to 20".into(),
            ));
        }
        Ok(())
    }

    /// The number of tokens to generate after a decoder input of `input_len` tokens (image
    /// queries included) on a decoder with `max_positions` positions, as transformers 5.17's
    /// `_prepare_generated_length` and `_validate_generated_length` resolve it. An explicit count
    /// is kept as it is (the plan reports one that does not fit); the default is capped.
    pub fn new_tokens(&self, input_len: usize, max_positions: usize) -> Result<usize> {
        self.validate()?;
        if let Some(n) = self.max_new_tokens {
            return Ok(n);
        }
        let max_length = (input_len + DEFAULT_NEW_TOKENS).min(max_positions);
        if input_len >= max_length {
            return Err(Error::InvalidInput(format!(
                "the decoder input ({input_len} tokens) fills the model's {max_positions} positions (text_config.max_position_embeddings), leaving no room to generate: shorten the prompt"
            )));
        }
        Ok(max_length - input_len)
    }
}

/// One generated sequence: new tokens only, EOS included when produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sequence {
    pub tokens: Vec<u32>,
    /// Natural-log probability of each token under the model (log-softmax of the raw logits).
    pub logprobs: Vec<f64>,
    pub stopped_by_eos: bool,
}

/// Wall-clock milliseconds of each stage of one request.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Timings {
    /// Each encoder phase, keyed `{phase}_ms` (BLIP-2: `vision_ms`, `qformer_ms`).
    #[serde(flatten)]
    pub encoders_ms: BTreeMap<String, f64>,
    pub prefill_ms: f64,
    /// All decode steps together.
    pub decode_ms: f64,
    pub decode_steps: usize,
    /// Inputs in to first token out.
    pub first_token_ms: f64,
    pub total_ms: f64,
}

impl Timings {
    /// Milliseconds of encoder phase `phase` (0 when the plan has none of that name).
    pub fn encoder_ms(&self, phase: &str) -> f64 {
        self.encoders_ms.get(&format!("{phase}_ms")).copied().unwrap_or(0.0)
    }
}

/// A token as it is produced, for streaming.
#[derive(Debug, Clone, Copy)]
pub struct TokenEvent {
    /// Which image of the batch.
    pub sequence: usize,
    pub step: usize,
    pub token: u32,
    pub logprob: f64,
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// Called after each phase with its name and milliseconds; false stops the run.
pub type PhaseHook<'a> = dyn FnMut(&str, f64) -> bool + 'a;

/// What a caller observes of a run besides its result.
pub struct Hooks<'a> {
    /// Each token as it is produced.
    pub on_token: &'a mut dyn FnMut(&TokenEvent),
    /// When set, every phase runs through `Executor::run_timed` (device events on a GPU) and is
    /// reported by name with its milliseconds; returning false stops the run after that phase
    /// (what was generated so far is returned). For benchmarks: the timed loop is the real one.
    pub on_phase: Option<&'a mut PhaseHook<'a>>,
}

/// One request on one executor: the machinery every strategy shares. Strategies call
/// [`Session::prefill`] and [`Session::decode`] and choose tokens from what they return.
pub struct Session<'a, 'h> {
    pub plan: &'a Plan,
    pub exec: &'a mut dyn Executor,
    hooks: &'a mut Hooks<'h>,
    start: Instant,
    pub timings: Timings,
}

impl<'a, 'h> Session<'a, 'h> {
    /// Runs one phase, timed through the hook when it is set. `Ok(false)`: the hook stopped the run.
    fn run(&mut self, phase: &crate::graph::Phase) -> Result<bool> {
        match self.hooks.on_phase.as_mut() {
            None => {
                self.exec.run(phase)?;
                Ok(true)
            }
            Some(hook) => {
                let t = self.exec.run_timed(phase)?;
                Ok(hook(phase.name, t))
            }
        }
    }

    /// Writes the host inputs (each of the plan's inputs exactly once) and runs the encoders.
    pub fn encode(&mut self, inputs: &[(&str, &[f32])]) -> Result<bool> {
        for (name, _) in &self.plan.inputs {
            if inputs.iter().filter(|(n, _)| n == name).count() != 1 {
                return Err(Error::InvalidInput(format!(
                    "the plan needs input `{name}` exactly once; got {} of it",
                    inputs.iter().filter(|(n, _)| n == name).count()
                )));
            }
        }
        for (name, data) in inputs {
            let buf = self.plan.input(name)?;
            self.exec.write(buf, data)?;
        }
        for phase in &self.plan.encoders {
            let s = Instant::now();
            let go = self.run(phase)?;
            self.timings.encoders_ms.insert(format!("{}_ms", phase.name), ms(s));
            if !go {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Prefills `tokens` (`batch x prompt_len`, sequence-major) from position 0 and ranks the
    /// `k` best next tokens of each sequence's last row. None: a hook stopped the run.
    pub fn prefill(&mut self, tokens: &[u32], k: usize) -> Result<Option<Vec<Vec<Candidate>>>> {
        let s = Instant::now();
        let plan = self.plan;
        if !self.run_step(&plan.prefill, tokens, 0)? {
            return Ok(None);
        }
        let per = plan.prefill.rows_per_seq;
        let mut ranked = self.exec.top_k(plan.prefill.logits, plan.batch * per, k)?;
        if per != 1 {
            ranked = ranked.into_iter().skip(per - 1).step_by(per).collect();
        }
        self.timings.prefill_ms = ms(s);
        Ok(Some(ranked))
    }

    /// [`Session::prefill`] returning each sequence's last logits row (`[batch, vocab]`, read
    /// back to the host) instead of ranked candidates: for strategies that process whole rows.
    pub fn prefill_logits(&mut self, tokens: &[u32]) -> Result<Option<Vec<f32>>> {
        let s = Instant::now();
        let plan = self.plan;
        if !self.run_step(&plan.prefill, tokens, 0)? {
            return Ok(None);
        }
        let per = plan.prefill.rows_per_seq;
        let mut rows = self.exec.read(plan.prefill.logits, plan.batch * per)?;
        if per != 1 {
            let vocab = rows.len() / (plan.batch * per).max(1);
            rows = rows.chunks(vocab.max(1)).skip(per - 1).step_by(per).flatten().copied().collect();
        }
        self.timings.prefill_ms = ms(s);
        Ok(Some(rows))
    }

    /// Feeds `tokens` (one row each) to `step` at `position`. False: a hook stopped the run.
    fn run_step(&mut self, step: &Step, tokens: &[u32], position: usize) -> Result<bool> {
        self.exec.set_tokens(tokens);
        self.exec.set_position(position);
        self.run(&step.phase)
    }

    /// One decode step: feeds one token per sequence at `position` and ranks the `k` best next
    /// tokens of each. None: a hook stopped the run.
    pub fn decode(&mut self, tokens: &[u32], position: usize, k: usize) -> Result<Option<Vec<Vec<Candidate>>>> {
        let plan = self.plan;
        if !self.run_step(&plan.decode, tokens, position)? {
            return Ok(None);
        }
        self.timings.decode_steps += 1;
        Ok(Some(self.exec.top_k(plan.decode.logits, plan.batch, k)?))
    }

    /// [`Session::decode`] returning the logits rows (`[batch, vocab]`, on the host).
    pub fn decode_logits(&mut self, tokens: &[u32], position: usize) -> Result<Option<Vec<f32>>> {
        let plan = self.plan;
        if !self.run_step(&plan.decode, tokens, position)? {
            return Ok(None);
        }
        self.timings.decode_steps += 1;
        Ok(Some(self.exec.read(plan.decode.logits, plan.batch)?))
    }

    /// Milliseconds since the request started.
    pub fn elapsed_ms(&self) -> f64 {
        ms(self.start)
    }

    fn token(&mut self, ev: &TokenEvent) {
        (self.hooks.on_token)(ev)
    }
}

/// Runs the plan with host `inputs` (by name, e.g. `("pixels", data)` holding `plan.batch`
/// images) and one decoder input `input_ids` shared by every sequence (image tokens, BOS,
/// prompt); `on_token` sees each token as it is produced.
pub fn generate(
    plan: &Plan,
    exec: &mut dyn Executor,
    inputs: &[(&str, &[f32])],
    input_ids: &[u32],
    opts: &GenerateOptions,
    on_token: &mut dyn FnMut(&TokenEvent),
) -> Result<(Vec<Sequence>, Timings)> {
    generate_with(plan, exec, inputs, input_ids, opts, &mut Hooks { on_token, on_phase: None })
}

/// [`generate`] with every hook (e.g. per-phase timing for `bench`).
pub fn generate_with(
    plan: &Plan,
    exec: &mut dyn Executor,
    inputs: &[(&str, &[f32])],
    input_ids: &[u32],
    opts: &GenerateOptions,
    hooks: &mut Hooks<'_>,
) -> Result<(Vec<Sequence>, Timings)> {
    opts.validate()?;
    if opts.max_new_tokens.is_some_and(|n| n != plan.max_new_tokens) {
        return Err(Error::InvalidInput(format!(
            "plan built for {} new tokens, asked for {:?}",
            plan.max_new_tokens, opts.max_new_tokens
        )));
    }
    if input_ids.len() != plan.prompt_len {
        return Err(Error::InvalidInput(format!(
            "plan built for {} input tokens, got {}",
            plan.prompt_len,
            input_ids.len()
        )));
    }
    let mut session = Session { plan, exec, hooks, start: Instant::now(), timings: Timings::default() };
    let seqs = match &opts.sampling {
        Some(sampling) => sample::run(&mut session, inputs, input_ids, opts, sampling)?,
        None => greedy::run(&mut session, inputs, input_ids, opts)?,
    };
    session.timings.total_ms = session.elapsed_ms();
    Ok((seqs, session.timings))
}

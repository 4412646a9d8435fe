//! Generation over a model family's [`Plan`]: the loop's shared machinery ([`Session`]: host
//! inputs, encoders, prefill and decode steps, timing hooks) and the decoding strategies on top
//! of the executor's primitives (`top_k`, `reorder_sequences`, positions): greedy (greedy.rs),
//! beam search (beam.rs), and sampling or greedy with logits processors (sample.rs over
//! processors.rs), with transformers' stopping criteria (EOS, length, stop strings: stop.rs).

mod beam;
mod greedy;
pub mod overrides;
mod plan;
pub mod processors;
pub mod sample;
pub mod stop;
pub mod stream;

use std::collections::BTreeMap;
use std::time::Instant;

pub use overrides::GenerationOverrides;
pub use plan::{
    kv_capacity, EncoderInput, Encoders, ImagePlan, ImageStage, KvCaches, Plan, PlanShape, PromptInput, Step, StepInput,
};
pub use stop::StopStrings;

use crate::backend::{Candidate, Executor};
use crate::error::{Error, Result};

/// The name of the host input that brings a plan's image features precomputed ([`ImageStage`],
/// `[images * rows_per_image, cols]`) in place of its `pixels`: the image stage's phases are
/// then skipped.
pub const IMAGE_FEATURES: &str = "image_features";

/// transformers' `max_length` when nothing sets a length: 20 tokens past the decoder input.
pub const DEFAULT_NEW_TOKENS: usize = 20;

/// transformers' `early_stopping`: `true`, `false` or `"never"` (see beam.rs for what each does).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EarlyStopping {
    /// `False` (the default): stop a batch item once no running beam, scored at the current
    /// length, can beat its worst finished hypothesis.
    #[default]
    Heuristic,
    /// `True`: stop a batch item as soon as it has `num_beams` finished hypotheses.
    Done,
    /// `"never"`: like `False`, but with `length_penalty > 0` the bound assumes `max_length`.
    Never,
}

impl std::str::FromStr for EarlyStopping {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "false" | "False" => Ok(Self::Heuristic),
            "true" | "True" => Ok(Self::Done),
            "never" => Ok(Self::Never),
            _ => Err(Error::InvalidInput(format!(
                "early_stopping `{s}` must be a boolean or 'never' (as transformers): use true, false or never"
            ))),
        }
    }
}

/// What `generate()` does, field for field transformers 5.17's `GenerationConfig` (the fields
/// glimpse runs). [`Default`] is transformers' global default; a family's
/// [`crate::models::Family::default_options`] applies what the checkpoint sets.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// How many tokens to generate at most. `None` is transformers' default: `max_length =
    /// input length + 20`, capped at the decoder's `max_position_embeddings`.
    pub max_new_tokens: Option<usize>,
    /// An explicit `max_length` (generation_config.json of chat families): the whole sequence,
    /// prompt included, used when `max_new_tokens` is unset.
    pub max_length: Option<usize>,
    /// EOS is masked until this many tokens were generated (`MinNewTokensLengthLogitsProcessor`).
    pub min_new_tokens: usize,
    /// Sample instead of greedy / beam search.
    pub do_sample: bool,
    pub temperature: f64,
    /// 0 disables top-k (transformers' default 50 applies when sampling).
    pub top_k: usize,
    pub top_p: f64,
    pub min_p: Option<f64>,
    pub repetition_penalty: f64,
    pub no_repeat_ngram_size: usize,
    /// 1: greedy (or sampling); more: beam search.
    pub num_beams: usize,
    /// Beam scores are `sum(logprobs) / generated_len ^ length_penalty`.
    pub length_penalty: f64,
    pub early_stopping: EarlyStopping,
    /// Hypotheses returned per input (at most `num_beams`), best first.
    pub num_return_sequences: usize,
    /// Generation stops for a sequence when it produces any of these (the token is kept).
    pub eos_token_ids: Vec<u32>,
    /// Generation stops for a sequence when its tokens end with one of these (transformers'
    /// `StopStringCriteria`, matched on the tokenizer's token strings: see stop.rs); the
    /// completing token is kept. Needs the tokenizer: [`crate::Model`] resolves them, direct
    /// callers pass a [`StopStrings`] to [`generate_prompts`].
    pub stop_strings: Vec<String>,
    /// Seed of the sampling RNG.
    pub seed: Option<u64>,
    /// Stops the request before its next phase once cancelled (a streaming consumer that went
    /// away); what was generated so far is returned. Not a transformers option.
    pub cancel: Option<Cancel>,
}

/// A flag that stops a running request at its next phase ([`GenerateOptions::cancel`]); clones
/// share it. Two flags are equal when they are the same flag.
#[derive(Debug, Clone, Default)]
pub struct Cancel(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Cancel {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn cancel(&self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl PartialEq for Cancel {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Default for GenerateOptions {
    /// transformers 5.17's `_get_default_generation_params`.
    fn default() -> Self {
        Self {
            max_new_tokens: None,
            max_length: None,
            min_new_tokens: 0,
            do_sample: false,
            temperature: 1.0,
            top_k: 50,
            top_p: 1.0,
            min_p: None,
            repetition_penalty: 1.0,
            no_repeat_ngram_size: 0,
            num_beams: 1,
            length_penalty: 1.0,
            early_stopping: EarlyStopping::Heuristic,
            num_return_sequences: 1,
            eos_token_ids: Vec::new(),
            stop_strings: Vec::new(),
            seed: None,
            cancel: None,
        }
    }
}

fn invalid(msg: String) -> Error {
    Error::InvalidInput(msg)
}

/// The most new tokens one sequence generates: the key/value cache of every sequence is
/// allocated for all of them up front (an encoder-decoder's relative positions set no bound).
pub const MAX_NEW_TOKENS: usize = 16384;

/// The most sequences one input runs at once (`num_beams`, `num_return_sequences`): each holds
/// its own key/value cache and a vocabulary-size row of scores, so memory grows with them.
pub const MAX_SEQUENCES: usize = 256;

impl GenerateOptions {
    /// What transformers' `GenerationConfig.from_model_config` builds from a language model's
    /// config without a generation_config.json: its `eos_token_id` and the generation fields the
    /// config keeps (`max_new_tokens`, `min_new_tokens`, `min_p`), else the global defaults.
    pub fn from_model_config(
        eos_token_id: Option<&crate::config::TokenIds>,
        max_new_tokens: Option<usize>,
        min_new_tokens: Option<usize>,
        min_p: Option<f64>,
    ) -> Self {
        Self {
            max_new_tokens,
            min_new_tokens: min_new_tokens.unwrap_or(0),
            min_p,
            eos_token_ids: eos_token_id.map(crate::config::TokenIds::to_vec).unwrap_or_default(),
            ..Self::default()
        }
    }

    /// transformers' checks, raised where transformers raises (`GenerationConfig.validate` and
    /// the logits processors' constructors); combinations transformers only warns about
    /// (`early_stopping` or `length_penalty` with one beam, sampling flags without `do_sample`)
    /// are accepted and ignored, as there.
    pub fn validate(&self) -> Result<()> {
        if self.max_new_tokens == Some(0) {
            return Err(invalid(
                "max_new_tokens is 0: it must be at least 1 (transformers refuses 0 too); leave it unset for the default of up to 20".into(),
            ));
        }
        if let Some(n) = self.max_new_tokens.filter(|&n| n > MAX_NEW_TOKENS) {
            return Err(invalid(too_many_new_tokens(&format!("max_new_tokens is {n}"))));
        }
        if self.num_beams == 0 {
            return Err(invalid("num_beams is 0: it must be at least 1 (1 is greedy decoding)".into()));
        }
        if self.num_return_sequences == 0 {
            return Err(invalid("num_return_sequences is 0: it must be at least 1".into()));
        }
        for (name, n) in [("num_beams", self.num_beams), ("num_return_sequences", self.num_return_sequences)] {
            if n > MAX_SEQUENCES {
                return Err(invalid(format!(
                    "{name} is {n}: glimpse runs at most {MAX_SEQUENCES} sequences per input (each one holds its own key/value cache and a vocabulary-size row of scores at every step, so memory grows with it); use at most {MAX_SEQUENCES}"
                )));
            }
        }
        if self.num_return_sequences > 1 && self.num_beams == 1 && !self.do_sample {
            return Err(invalid(format!(
                "num_return_sequences is {} but greedy decoding returns one sequence (transformers refuses it too): set num_beams to at least {0} or enable do_sample",
                self.num_return_sequences
            )));
        }
        if self.num_beams > 1 && self.num_return_sequences > self.num_beams {
            return Err(invalid(format!(
                "num_return_sequences ({}) has to be smaller or equal to num_beams ({}): raise num_beams or return fewer",
                self.num_return_sequences, self.num_beams
            )));
        }
        if !self.length_penalty.is_finite() {
            return Err(invalid(format!("length_penalty is {}: it must be a finite number", self.length_penalty)));
        }
        // The logits processors' constructors (built only when the option is active).
        if self.repetition_penalty != 1.0 && !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(invalid(format!(
                "repetition_penalty has to be a strictly positive float, but is {}: 1.0 disables it",
                self.repetition_penalty
            )));
        }
        if self.do_sample {
            if self.temperature != 1.0 && !(self.temperature > 0.0 && self.temperature.is_finite()) {
                return Err(invalid(format!(
                    "temperature has to be a strictly positive float, but is {}: use do_sample=false for greedy decoding",
                    self.temperature
                )));
            }
            if !(0.0..=1.0).contains(&self.top_p) {
                return Err(invalid(format!(
                    "`top_p` has to be a float > 0 and < 1, but is {} (transformers refuses it too): use a value in [0, 1], 1 disables it",
                    self.top_p
                )));
            }
            if let Some(m) = self.min_p.filter(|m| !(0.0..=1.0).contains(m)) {
                return Err(invalid(format!("min_p has to be a float in the [0, 1] interval, but is {m}")));
            }
        }
        Ok(())
    }

    /// The one place that refuses what glimpse does not run yet. Every option above now runs
    /// (beam search with processors and sampling, several sampled sequences, stop strings), so
    /// nothing is refused; callers keep calling it so a future option has one place to land.
    pub fn check_available(&self) -> Result<()> {
        Ok(())
    }

    /// Sequences the plan runs per input: transformers expands its inputs
    /// `max(num_beams, num_return_sequences)` times (beam search: one per beam; sampling with
    /// several returned sequences: one per sequence, each drawing its own tokens).
    pub fn expansion(&self) -> usize {
        self.num_beams.max(self.num_return_sequences).max(1)
    }

    /// True when one-beam decoding goes through the logits processors (sample.rs): sampling,
    /// or greedy with a repetition penalty or a no-repeat n-gram size (greedy.rs handles
    /// `min_new_tokens` itself).
    pub fn uses_processors(&self) -> bool {
        self.do_sample || self.repetition_penalty != 1.0 || self.no_repeat_ngram_size > 0
    }

    /// The logits processors these options ask for, as transformers' `_get_logits_processor`
    /// builds them.
    pub fn processor_settings(&self) -> processors::ProcessorSettings {
        processors::ProcessorSettings {
            do_sample: self.do_sample,
            num_beams: self.num_beams,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            no_repeat_ngram_size: self.no_repeat_ngram_size,
            min_new_tokens: (self.min_new_tokens > 0).then_some(self.min_new_tokens),
            eos_token_ids: self.eos_token_ids.clone(),
            ..Default::default()
        }
    }

    /// The sampling seed: `seed` when set (reproducible on every device), else one drawn from
    /// the clock (transformers' unseeded sampling differs run to run too).
    pub fn sampling_seed(&self) -> u64 {
        self.seed.unwrap_or_else(|| {
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            t.as_nanos() as u64
        })
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
        if let Some(max_length) = self.max_length {
            // An explicit max_length counts the prompt and is not capped (transformers).
            if input_len >= max_length {
                return Err(Error::InvalidInput(format!(
                    "the decoder input ({input_len} tokens) reaches max_length {max_length} (generation_config.json), leaving no room to generate: raise max_length or set max_new_tokens"
                )));
            }
            let n = max_length - input_len;
            if n > MAX_NEW_TOKENS {
                let what = format!("max_length {max_length} (generation_config.json) leaves {n} new tokens");
                return Err(invalid(too_many_new_tokens(&what)));
            }
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

fn too_many_new_tokens(what: &str) -> String {
    format!(
        "{what}: glimpse generates at most {MAX_NEW_TOKENS} new tokens per sequence (the key/value cache of every sequence is allocated for all of them up front); ask for fewer"
    )
}

/// The decoder inputs of a batch, one row of [`Prompts::len`] tokens per sequence: prompts of
/// different lengths are padded on the left (transformers' `padding_side="left"`), and each
/// row's pad count becomes the executor's left padding (positions `cumsum(mask) - 1`) and the
/// plan's key mask (pad keys at `finfo.min`).
#[derive(Debug, Clone, PartialEq)]
pub struct Prompts {
    ids: Vec<u32>,
    pads: Vec<usize>,
    len: usize,
}

impl Prompts {
    /// `batch` sequences with the same input (no padding).
    pub fn shared(input_ids: &[u32], batch: usize) -> Self {
        Self { ids: input_ids.repeat(batch), pads: vec![0; batch], len: input_ids.len() }
    }

    /// One sequence per prompt, the shorter ones padded on the left with `pad_id` to the
    /// longest.
    pub fn left_padded(prompts: &[Vec<u32>], pad_id: u32) -> Result<Self> {
        let len = prompts.iter().map(Vec::len).max().ok_or_else(|| invalid("no prompts given".into()))?;
        if let Some(i) = prompts.iter().position(Vec::is_empty) {
            return Err(invalid(format!("prompt {i} of the batch is empty: every sequence needs at least one token")));
        }
        let mut ids = Vec::with_capacity(prompts.len() * len);
        let pads = prompts
            .iter()
            .map(|p| {
                let pad = len - p.len();
                ids.extend(std::iter::repeat_n(pad_id, pad).chain(p.iter().copied()));
                pad
            })
            .collect();
        Ok(Self { ids, pads, len })
    }

    /// Each sequence repeated `n` times in a row (beam search's `repeat_interleave`). Beam
    /// search reorders caches only among one input's beams, which share its padding, so the
    /// pads and key mask stay valid as beams move.
    pub fn repeat_each(&self, n: usize) -> Self {
        let n = n.max(1);
        Self {
            ids: self.ids.chunks(self.len.max(1)).flat_map(|row| row.repeat(n)).collect(),
            pads: self.pads.iter().flat_map(|&p| std::iter::repeat_n(p, n)).collect(),
            len: self.len,
        }
    }

    /// Tokens per sequence, padding included.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn batch(&self) -> usize {
        self.pads.len()
    }

    /// Every row, sequence-major (`batch x len`).
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Row `b`, padding included (transformers' `input_ids[b]`).
    pub fn row(&self, b: usize) -> &[u32] {
        &self.ids[b * self.len..(b + 1) * self.len]
    }

    /// Left pad count of each sequence.
    pub fn pads(&self) -> &[usize] {
        &self.pads
    }

    fn padded(&self) -> bool {
        self.pads.iter().any(|&p| p > 0)
    }
}

/// The additive key mask `[batch, capacity]` of left-padded sequences: `f32::MIN`
/// (transformers' `finfo.min`) on each sequence's pad positions, 0 elsewhere.
fn pad_mask(pads: &[usize], capacity: usize) -> Vec<f32> {
    pads.iter().flat_map(|&p| (0..capacity).map(move |c| if c < p { f32::MIN } else { 0.0 })).collect()
}

/// One generated sequence: new tokens only, EOS included when produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sequence {
    pub tokens: Vec<u32>,
    /// Natural-log probability of each token under the model (log-softmax of the raw logits).
    pub logprobs: Vec<f64>,
    pub stopped_by_eos: bool,
    /// Beam search: transformers' `sequences_scores`, `sum(logprobs) / len(tokens) ^
    /// length_penalty`. None for greedy decoding.
    pub score: Option<f64>,
    /// `num_return_sequences > 1`: the other returned hypotheses (beam search: best first;
    /// sampling: the other draws).
    pub alternatives: Vec<Sequence>,
    /// The sequence ended by completing one of the stop strings (its last token completed it).
    pub stopped_by_string: bool,
}

impl Sequence {
    /// Ended by EOS or a stop string (transformers' stopping criteria other than the length).
    pub fn finished(&self) -> bool {
        self.stopped_by_eos || self.stopped_by_string
    }
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
    /// Which input of the batch (with several sampled sequences per input, the first of them is
    /// the one streamed).
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

/// What a decoding strategy runs: the host inputs (by name), the decoder's prompts and the
/// settings, checked by [`generate_prompts`].
#[derive(Clone, Copy)]
struct Request<'r> {
    inputs: &'r [(&'r str, &'r [f32])],
    prompts: &'r Prompts,
    opts: &'r GenerateOptions,
}

/// One request on one executor: the machinery every strategy shares. Strategies call
/// [`Session::prefill`] and [`Session::decode`] and choose tokens from what they return.
pub struct Session<'a, 'h> {
    pub plan: &'a Plan,
    pub exec: &'a mut dyn Executor,
    hooks: &'a mut Hooks<'h>,
    start: Instant,
    pub timings: Timings,
    /// Left pad count of each sequence, set for every decoder step.
    pads: Vec<usize>,
    /// Stop strings resolved against the tokenizer (None: no stop strings).
    stop: Option<&'a StopStrings>,
    /// Encoder-decoder plans: the request's input ids (the encoders' tokens) and their left
    /// pad counts.
    encoder_tokens: Option<(Vec<u32>, Vec<usize>)>,
    /// [`GenerateOptions::cancel`], checked before every phase.
    cancel: Option<Cancel>,
}

impl<'a, 'h> Session<'a, 'h> {
    /// Runs one phase, timed through the hook when it is set. `Ok(false)`: the hook stopped the run.
    fn run(&mut self, phase: &crate::graph::Phase) -> Result<bool> {
        if self.cancel.as_ref().is_some_and(Cancel::is_cancelled) {
            return Ok(false);
        }
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
    /// With [`IMAGE_FEATURES`] among the inputs, the plan's image stage is not run: its
    /// features are written instead, and its `pixels` are not needed.
    pub fn encode(&mut self, inputs: &[(&str, &[f32])]) -> Result<bool> {
        let count = |name: &str| inputs.iter().filter(|(n, _)| *n == name).count();
        let stage =
            match count(IMAGE_FEATURES) {
                0 => None,
                1 => Some(self.plan.image_stage.ok_or_else(|| {
                    Error::Unsupported("this model's plan takes no precomputed image features".into())
                })?),
                n => return Err(Error::InvalidInput(format!("input `{IMAGE_FEATURES}` given {n} times"))),
            };
        for &(name, buf) in &self.plan.inputs {
            let want = if stage.is_some_and(|s| s.pixels == buf) { 0 } else { 1 };
            if count(name) != want {
                return Err(Error::InvalidInput(format!(
                    "the plan needs input `{name}` {}; got {} of it",
                    if want == 1 { "exactly once" } else { "not at all with precomputed image features" },
                    count(name)
                )));
            }
        }
        for (name, data) in inputs {
            let buf = match stage {
                Some(s) if *name == IMAGE_FEATURES => {
                    let d = self.plan.graph.desc(s.features);
                    if data.len() != d.rows * d.cols {
                        return Err(Error::InvalidInput(format!(
                            "{} image feature values given, the plan's `{}` holds {} ({} rows of {})",
                            data.len(),
                            d.name,
                            d.rows * d.cols,
                            d.rows,
                            d.cols
                        )));
                    }
                    s.features
                }
                _ => self.plan.input(name)?,
            };
            self.exec.write(buf, data)?;
        }
        // Written on every request (zeros without padding): a GPU executor is reused.
        if let Some(mask) = self.plan.key_mask {
            self.exec.write(mask, &pad_mask(&self.pads, self.plan.capacity.max(1)))?;
        }
        // The encoders see no padding (it belongs to the decoder input).
        self.exec.set_left_padding(&[]);
        if let (Some((tokens, pads)), Some(enc)) = (&self.encoder_tokens, self.plan.encoder_input) {
            self.exec.write(enc.key_mask, &pad_mask(pads, enc.len))?;
            self.exec.set_tokens(tokens);
            self.exec.set_position(0);
        }
        let skip = stage.map_or(0, |s| s.phases);
        for phase in &self.plan.encoders[skip..] {
            self.write_step_inputs(phase.name, 0)?;
            let s = Instant::now();
            let go = self.run(phase)?;
            self.timings.encoders_ms.insert(format!("{}_ms", phase.name), ms(s));
            if !go {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Writes the prompt's host inputs and runs the prefill step over `tokens` from position 0;
    /// false: a hook stopped the run.
    fn run_prefill(&mut self, tokens: &[u32]) -> Result<bool> {
        let plan = self.plan;
        plan.write_prompt_inputs(self.exec, tokens)?;
        self.run_step(&plan.prefill, tokens, 0)
    }

    /// Prefills `tokens` (`batch x prompt_len`, sequence-major) from position 0 and ranks the
    /// `k` best next tokens of each sequence's last row. None: a hook stopped the run.
    pub fn prefill(&mut self, tokens: &[u32], k: usize) -> Result<Option<Vec<Vec<Candidate>>>> {
        let s = Instant::now();
        if !self.run_prefill(tokens)? {
            return Ok(None);
        }
        let (plan, per) = (self.plan, self.plan.prefill.rows_per_seq);
        let mut ranked = self.exec.top_k(plan.prefill.logits, plan.batch * per, k)?;
        if per != 1 {
            ranked = ranked.into_iter().skip(per - 1).step_by(per).collect();
        }
        check_finite(&ranked, "the prefill (first new token)")?;
        self.timings.prefill_ms = ms(s);
        Ok(Some(ranked))
    }

    /// [`Session::prefill`] returning each sequence's last logits row (`[batch, vocab]`, read
    /// back to the host) instead of ranked candidates: for strategies that process whole rows.
    pub fn prefill_logits(&mut self, tokens: &[u32]) -> Result<Option<Vec<f32>>> {
        let s = Instant::now();
        if !self.run_prefill(tokens)? {
            return Ok(None);
        }
        let (plan, per) = (self.plan, self.plan.prefill.rows_per_seq);
        let mut rows = self.exec.read(plan.prefill.logits, plan.batch * per)?;
        if per != 1 {
            let vocab = rows.len() / (plan.batch * per).max(1);
            rows = rows.chunks(vocab.max(1)).skip(per - 1).step_by(per).flatten().copied().collect();
        }
        self.timings.prefill_ms = ms(s);
        Ok(Some(rows))
    }

    /// Writes the plan's step inputs of phase `phase` for `position`.
    fn write_step_inputs(&mut self, phase: &str, position: usize) -> Result<()> {
        for input in self.plan.step_inputs.iter().filter(|i| i.phase == phase) {
            self.exec.write(input.buf, &(input.fill)(position))?;
        }
        Ok(())
    }

    /// Feeds `tokens` (one row each) to `step` at `position`. False: a hook stopped the run.
    fn run_step(&mut self, step: &Step, tokens: &[u32], position: usize) -> Result<bool> {
        self.write_step_inputs(step.phase.name, position)?;
        self.exec.set_tokens(tokens);
        self.exec.set_left_padding(&self.pads);
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
        let ranked = self.exec.top_k(plan.decode.logits, plan.batch, k)?;
        check_finite(
            &ranked,
            &format!("decode step {} (new token {})", self.timings.decode_steps, self.timings.decode_steps + 1),
        )?;
        Ok(Some(ranked))
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

    /// transformers' `StopStringCriteria` on one sequence's `input_ids` (decoder input, then what
    /// was generated): false without stop strings.
    pub fn stops(&self, history: &[u32]) -> bool {
        self.stop.is_some_and(|s| s.matches(history))
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
/// prompt); `on_token` sees each token as it is produced. With `num_beams > 1` the plan runs
/// `images x num_beams` sequences (each image's inputs repeated `num_beams` times in a row, see
/// [`beam_rows`]), one [`Sequence`] comes back per image, and `on_token` sees each image's best
/// hypothesis once the search ends.
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

/// [`generate`] with a decoder input per sequence (`prompts.batch() == plan.batch`; with beam
/// search, each input's prompt repeated per beam by [`Prompts::repeat_each`]): prompts of
/// different lengths run left-padded, each giving what it gives alone, as transformers' batched
/// `generate()` with `padding_side="left"`.
pub fn generate_batch(
    plan: &Plan,
    exec: &mut dyn Executor,
    inputs: &[(&str, &[f32])],
    prompts: &Prompts,
    opts: &GenerateOptions,
    on_token: &mut dyn FnMut(&TokenEvent),
) -> Result<(Vec<Sequence>, Timings)> {
    generate_prompts(plan, exec, inputs, prompts, opts, None, &mut Hooks { on_token, on_phase: None })
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
    generate_prompts(plan, exec, inputs, &Prompts::shared(input_ids, plan.batch), opts, None, hooks)
}

/// [`generate_batch`] with every hook and the stop strings of `opts.stop_strings` resolved
/// against the tokenizer ([`StopStrings::new`]; required when there are stop strings).
pub fn generate_prompts(
    plan: &Plan,
    exec: &mut dyn Executor,
    inputs: &[(&str, &[f32])],
    prompts: &Prompts,
    opts: &GenerateOptions,
    stop: Option<&StopStrings>,
    hooks: &mut Hooks<'_>,
) -> Result<(Vec<Sequence>, Timings)> {
    opts.validate()?;
    if !opts.stop_strings.is_empty() && stop.is_none() {
        return Err(Error::InvalidInput(format!(
            "stop strings {:?} need the tokenizer's token strings: generate through Model (which resolves them) or pass StopStrings::new(stop_strings, tokenizer) to generate_prompts",
            opts.stop_strings
        )));
    }
    if opts.max_new_tokens.is_some_and(|n| n != plan.max_new_tokens) {
        return Err(Error::InvalidInput(format!(
            "plan built for {} new tokens, asked for {:?}",
            plan.max_new_tokens, opts.max_new_tokens
        )));
    }
    if prompts.len() != plan.input_len() {
        return Err(Error::InvalidInput(format!(
            "plan built for {} input tokens, got {}",
            plan.input_len(),
            prompts.len()
        )));
    }
    if prompts.batch() != plan.batch {
        return Err(Error::InvalidInput(format!(
            "plan built for {} sequences, got {} prompts (beam search: one per input and beam)",
            plan.batch,
            prompts.batch()
        )));
    }
    if prompts.padded() && plan.key_mask.is_none() && plan.encoder_input.is_none() {
        return Err(Error::Unsupported(
            "this model runs prompts of one length per batch only (its plan has no key mask): send prompts of different lengths one at a time".into(),
        ));
    }
    opts.check_available()?;
    // An encoder-decoder's input ids (and their padding) feed its encoder; its decoder starts
    // from one token, unpadded.
    let (encoder_tokens, decoder_prompts) = match plan.encoder_input {
        Some(e) => (
            Some((prompts.ids().to_vec(), prompts.pads().to_vec())),
            Some(Prompts::shared(&[e.decoder_start], plan.batch)),
        ),
        None => (None, None),
    };
    let prompts = decoder_prompts.as_ref().unwrap_or(prompts);
    let pads = prompts.pads().to_vec();
    let mut session = Session {
        plan,
        exec,
        hooks,
        start: Instant::now(),
        timings: Timings::default(),
        pads,
        stop,
        encoder_tokens,
        cancel: opts.cancel.clone(),
    };
    let req = Request { inputs, prompts, opts };
    let seqs = if opts.num_beams > 1 {
        beam::run(&mut session, &req)?
    } else if opts.uses_processors() {
        group_returned(sample::run(&mut session, &req)?, opts.expansion())
    } else {
        greedy::run(&mut session, &req)?
    };
    session.timings.total_ms = session.elapsed_ms();
    Ok((seqs, session.timings))
}

/// Refuses logits that are not finite: a row whose best candidate has a NaN log-probability
/// holds NaN or +inf (or only -inf), which greedy and beam search would turn silently into
/// token 0 and null log-probs. `phase` names where they appeared.
fn check_finite(ranked: &[Vec<crate::backend::Candidate>], phase: &str) -> Result<()> {
    match ranked.iter().position(|row| row.first().is_some_and(|c| c.logprob.is_nan())) {
        None => Ok(()),
        Some(row) => Err(Error::InvalidInput(format!(
            "the model's logits are not finite (NaN or infinite) at {phase}, sequence {row}: the checkpoint holds NaN/Inf weights (`glimpse info --check-weights MODEL` names them), or the model overflowed"
        ))),
    }
}

/// Sampled rows of one input (`per` in a row) as one [`Sequence`]: the first, with the others as
/// its alternatives (transformers returns them flattened, input-major).
fn group_returned(seqs: Vec<Sequence>, per: usize) -> Vec<Sequence> {
    if per <= 1 {
        return seqs;
    }
    let mut out = Vec::with_capacity(seqs.len() / per);
    let mut rows = seqs.into_iter();
    while let Some(mut first) = rows.next() {
        first.alternatives = rows.by_ref().take(per - 1).collect();
        out.push(first);
    }
    out
}

/// The plan batch for `inputs` inputs: [`GenerateOptions::expansion`] sequences per input
/// (beam search: `num_beams`; sampling: `num_return_sequences`).
pub fn beam_rows(inputs: usize, opts: &GenerateOptions) -> usize {
    inputs * opts.expansion()
}

/// Repeats each of the `inputs` rows of `data` (`[inputs, cols]`) [`GenerateOptions::expansion`]
/// times in a row (transformers' `repeat_interleave` of the inputs for beam search and for
/// several sampled sequences); unchanged for one sequence per input.
pub fn expand_for_beams(data: &[f32], inputs: usize, opts: &GenerateOptions) -> Vec<f32> {
    let n = opts.expansion();
    let cols = data.len() / inputs.max(1);
    data.chunks(cols.max(1)).flat_map(|row| std::iter::repeat_n(row, n).flatten().copied()).collect()
}

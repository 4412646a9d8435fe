//! transformers 5.17's logits processors, with its semantics and in the order
//! `GenerationMixin._get_logits_processor` builds them for `generate()`:
//! repetition penalty, no-repeat n-gram, min length, min new tokens, InfNan removal, then (only
//! when sampling) temperature, top-k, top-p, min-p. One fp32 row of one sequence at a time.
//!
//! Two entry points, as generate's loops use them: greedy and sampling (`_sample`) hand the
//! processors the raw fp32 logits ([`LogitsProcessorList::process_logits`]); beam search hands
//! them `log_softmax(logits)` ([`LogitsProcessorList::process_log_probs`]), so there a
//! repetition penalty always multiplies (log-probs are never positive).
//!
//! The token history is the sequence's `input_ids` as transformers holds them: for a decoder-only
//! model the whole decoder input (prompt, BOS and, for BLIP-2 / LLaVA, the image placeholder ids
//! whose embeddings carry the image: BLIP-2's `generate` passes `input_ids` alongside
//! `inputs_embeds`, so the penalty covers them) followed by the generated tokens; for an
//! encoder-decoder model the decoder ids only, starting with the decoder start token.
//!
//! Arithmetic follows torch's fp32 kernels: a Python-float setting meets an fp32 tensor as an
//! fp32 scalar (`s * f32(penalty)`, `s / f32(temperature)`, `cum <= f32(1 - top_p)`), cumulative
//! sums accumulate in f64 (torch's CPU accumulate type for float), softmax / log-softmax are
//! computed in f64 and rounded once to f32 (within an ulp or two of torch's vectorised kernels).

use crate::error::{Error, Result};

/// The GenerationConfig fields that decide the processors, as `generate()` resolves them
/// (defaults are transformers' global ones). `Default` is greedy decoding: no processors.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessorSettings {
    /// Sampling adds the warpers (temperature, top-k, top-p, min-p); without it they are ignored.
    pub do_sample: bool,
    /// Beam count: with sampling and more than one beam, every warper keeps at least
    /// `n_eos + 1` tokens (`min_tokens_to_keep`), else 1.
    pub num_beams: usize,
    /// 1.0 = off.
    pub temperature: f64,
    /// 0 = off. transformers' default 50 is on whenever sampling.
    pub top_k: usize,
    /// 1.0 = off.
    pub top_p: f64,
    /// None = off.
    pub min_p: Option<f64>,
    /// 1.0 = off; above 1 penalises tokens of the history, below 1 favours them.
    pub repetition_penalty: f64,
    /// 0 = off.
    pub no_repeat_ngram_size: usize,
    /// Whole-sequence minimum (history length, prompt included); 0 = off. Replaced by
    /// `prompt_len + min_new_tokens` when `min_new_tokens` is set, as `_prepare_generated_length` does.
    pub min_length: usize,
    /// Minimum new tokens; None = off (Some(0) still adds a no-op MinLength, as transformers).
    pub min_new_tokens: Option<usize>,
    /// InfNanRemoveLogitsProcessor: NaN to 0, ±inf to the fp32 extremes.
    pub remove_invalid_values: bool,
    /// Ids whose scores the min-length processors set to -inf; none disables those processors.
    pub eos_token_ids: Vec<u32>,
}

impl Default for ProcessorSettings {
    fn default() -> Self {
        Self {
            do_sample: false,
            num_beams: 1,
            temperature: 1.0,
            top_k: 50,
            top_p: 1.0,
            min_p: None,
            repetition_penalty: 1.0,
            no_repeat_ngram_size: 0,
            min_length: 0,
            min_new_tokens: None,
            remove_invalid_values: false,
            eos_token_ids: Vec::new(),
        }
    }
}

impl ProcessorSettings {
    /// Tokens every warper keeps: `n_eos + 1` for beam sampling (2 without EOS ids, as
    /// transformers' `_eos_token_tensor is None` branch), else 1.
    pub fn min_tokens_to_keep(&self) -> usize {
        if self.num_beams > 1 {
            self.eos_token_ids.len().max(1) + 1
        } else {
            1
        }
    }
}

/// One processor with its parameters; [`Processor::name`] is transformers' class name.
#[derive(Debug, Clone, PartialEq)]
pub enum Processor {
    RepetitionPenalty { penalty: f64 },
    NoRepeatNGram { size: usize },
    MinLength { min_length: usize, eos: Vec<u32> },
    MinNewTokens { prompt_len: usize, min_new_tokens: usize, eos: Vec<u32> },
    InfNanRemove,
    Temperature { temperature: f64 },
    TopK { top_k: usize },
    TopP { top_p: f64, min_tokens_to_keep: usize },
    MinP { min_p: f64, min_tokens_to_keep: usize },
}

impl Processor {
    /// The transformers class this mirrors.
    pub fn name(&self) -> &'static str {
        match self {
            Processor::RepetitionPenalty { .. } => "RepetitionPenaltyLogitsProcessor",
            Processor::NoRepeatNGram { .. } => "NoRepeatNGramLogitsProcessor",
            Processor::MinLength { .. } => "MinLengthLogitsProcessor",
            Processor::MinNewTokens { .. } => "MinNewTokensLengthLogitsProcessor",
            Processor::InfNanRemove => "InfNanRemoveLogitsProcessor",
            Processor::Temperature { .. } => "TemperatureLogitsWarper",
            Processor::TopK { .. } => "TopKLogitsWarper",
            Processor::TopP { .. } => "TopPLogitsWarper",
            Processor::MinP { .. } => "MinPLogitsWarper",
        }
    }

    /// Processes one row in place given the sequence's token history (`input_ids`).
    pub fn apply(&self, history: &[u32], scores: &mut [f32]) -> Result<()> {
        match self {
            Processor::RepetitionPenalty { penalty } => {
                let p = *penalty as f32;
                // Each distinct id once (torch gathers then scatters the same value back).
                let mut seen = vec![false; scores.len()];
                for &t in history {
                    let i = in_vocab(t, scores.len(), self.name())?;
                    if !std::mem::replace(&mut seen[i], true) {
                        let s = scores[i];
                        scores[i] = if s < 0.0 { s * p } else { s / p };
                    }
                }
            }
            Processor::NoRepeatNGram { size } => {
                let n = *size;
                if history.len() < n {
                    return Ok(());
                }
                // Every window whose first n-1 tokens equal the last n-1 tokens bans its last token.
                let prefix = &history[history.len() + 1 - n..];
                for w in history.windows(n) {
                    if &w[..n - 1] == prefix {
                        let i = in_vocab(w[n - 1], scores.len(), self.name())?;
                        scores[i] = f32::NEG_INFINITY;
                    }
                }
            }
            Processor::MinLength { min_length, eos } => {
                if history.len() < *min_length {
                    ban(eos, scores);
                }
            }
            Processor::MinNewTokens { prompt_len, min_new_tokens, eos } => {
                if (history.len() as i64 - *prompt_len as i64) < *min_new_tokens as i64 {
                    ban(eos, scores);
                }
            }
            Processor::InfNanRemove => {
                for s in scores.iter_mut() {
                    if s.is_nan() {
                        *s = 0.0;
                    } else if *s == f32::INFINITY {
                        *s = f32::MAX;
                    } else if *s == f32::NEG_INFINITY {
                        *s = f32::MIN;
                    }
                }
            }
            Processor::Temperature { temperature } => {
                let t = *temperature as f32;
                scores.iter_mut().for_each(|s| *s /= t);
            }
            Processor::TopK { top_k } => {
                let k = (*top_k).min(scores.len());
                if k == 0 {
                    return Ok(());
                }
                // Remove what is below the k-th largest value: ties with it all stay.
                let mut sorted: Vec<f32> = scores.to_vec();
                sorted.select_nth_unstable_by(k - 1, |a, b| torch_order(*b, *a));
                let kth = sorted[k - 1];
                scores.iter_mut().filter(|s| **s < kth).for_each(|s| *s = f32::NEG_INFINITY);
            }
            Processor::TopP { top_p, min_tokens_to_keep } => {
                // Ascending order; among equal scores the higher id comes first, so a tie group cut
                // by the threshold loses its higher ids (torch.sort is unstable there: an arbitrary
                // but fixed rule is the best one can do; the same "lower id first" as top-k ranks).
                let mut order: Vec<usize> = (0..scores.len()).collect();
                order.sort_by(|&a, &b| torch_order(scores[a], scores[b]).then(b.cmp(&a)));
                let sorted: Vec<f32> = order.iter().map(|&i| scores[i]).collect();
                let probs = softmax(&sorted);
                let threshold = (1.0 - *top_p) as f32;
                let keep_from = order.len().saturating_sub(*min_tokens_to_keep);
                let mut cum = 0f64;
                let mut remove = Vec::new();
                for (pos, (&i, &p)) in order.iter().zip(&probs).enumerate() {
                    cum += p as f64;
                    if (cum as f32) <= threshold && pos < keep_from {
                        remove.push(i);
                    }
                }
                remove.into_iter().for_each(|i| scores[i] = f32::NEG_INFINITY);
            }
            Processor::MinP { min_p, min_tokens_to_keep } => {
                let probs = softmax(scores);
                let top = probs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let cut = *min_p as f32 * top;
                let mut keep = vec![false; scores.len()];
                let mut ranked: Vec<usize> = (0..scores.len()).collect();
                ranked.sort_by(|&a, &b| torch_order(probs[b], probs[a]).then(a.cmp(&b)));
                ranked.iter().take(*min_tokens_to_keep).for_each(|&i| keep[i] = true);
                for (i, s) in scores.iter_mut().enumerate() {
                    if probs[i] < cut && !keep[i] {
                        *s = f32::NEG_INFINITY;
                    }
                }
            }
        }
        Ok(())
    }
}

/// torch's order of floats in sort / topk: NaN above everything.
fn torch_order(a: f32, b: f32) -> std::cmp::Ordering {
    match (a.is_nan(), b.is_nan()) {
        (true, true) => std::cmp::Ordering::Equal,
        (true, false) => std::cmp::Ordering::Greater,
        (false, true) => std::cmp::Ordering::Less,
        _ => a.total_cmp(&b),
    }
}

/// EOS ids to -inf; ids outside the row are ignored (transformers masks with `isin(arange(V), eos)`).
fn ban(eos: &[u32], scores: &mut [f32]) {
    for &e in eos {
        if let Some(s) = scores.get_mut(e as usize) {
            *s = f32::NEG_INFINITY;
        }
    }
}

fn in_vocab(token: u32, vocab: usize, what: &str) -> Result<usize> {
    if (token as usize) < vocab {
        Ok(token as usize)
    } else {
        Err(Error::InvalidInput(format!(
            "{what}: token id {token} in the sequence is outside the {vocab}-token logits row; the input ids must be below the model's vocab_size"
        )))
    }
}

/// `softmax` of an fp32 row: computed in f64, rounded once (NaN everywhere when every score is
/// -inf or one is +inf/NaN, as torch).
pub fn softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, |m, x| if x > m || x.is_nan() { x } else { m }) as f64;
    let exps: Vec<f64> = row.iter().map(|&x| (x as f64 - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|&e| (e / sum) as f32).collect()
}

/// `log_softmax` of an fp32 row in place: `x - logsumexp(x)` in f64, rounded once.
pub fn log_softmax(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, |m, x| if x > m || x.is_nan() { x } else { m }) as f64;
    let lse = row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln() + max;
    row.iter_mut().for_each(|x| *x = (*x as f64 - lse) as f32);
}

/// The processors `generate()` applies, in its order (transformers' `LogitsProcessorList`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LogitsProcessorList {
    processors: Vec<Processor>,
}

/// A factor where 1.0 is off (temperature, repetition penalty): None when off, else the value;
/// unless it is positive and finite, an error naming `name`, its value, and `hint` after.
fn positive_factor(name: &str, value: f64, hint: &str) -> Result<Option<f64>> {
    if value == 1.0 {
        Ok(None)
    } else if value > 0.0 && value.is_finite() {
        Ok(Some(value))
    } else {
        Err(Error::InvalidInput(format!("{name} {value} is invalid: it must be a positive number{hint}")))
    }
}

impl LogitsProcessorList {
    /// The list `_get_logits_processor` builds from `settings` for a decoder input of
    /// `prompt_len` tokens (`input_ids.shape[1]`: image placeholders included for BLIP-2; the
    /// decoder start token for encoder-decoders). Rejects the values transformers' constructors reject.
    pub fn new(settings: &ProcessorSettings, prompt_len: usize) -> Result<Self> {
        let s = settings;
        let mut p = Vec::new();
        let bad = |msg: String| Err(Error::InvalidInput(msg));
        let no_penalty = " (1.0 = no penalty, above 1 discourages repeats)";
        if let Some(penalty) = positive_factor("repetition_penalty", s.repetition_penalty, no_penalty)? {
            p.push(Processor::RepetitionPenalty { penalty });
        }
        if s.no_repeat_ngram_size > 0 {
            p.push(Processor::NoRepeatNGram { size: s.no_repeat_ngram_size });
        }
        let min_length = s.min_new_tokens.map_or(s.min_length, |m| prompt_len + m);
        if !s.eos_token_ids.is_empty() {
            if min_length > 0 {
                p.push(Processor::MinLength { min_length, eos: s.eos_token_ids.clone() });
            }
            if let Some(m) = s.min_new_tokens.filter(|&m| m > 0) {
                p.push(Processor::MinNewTokens { prompt_len, min_new_tokens: m, eos: s.eos_token_ids.clone() });
            }
        }
        if s.remove_invalid_values {
            p.push(Processor::InfNanRemove);
        }
        if s.do_sample {
            if s.num_beams == 0 {
                return bad("num_beams is 0: it must be at least 1".into());
            }
            let keep = s.min_tokens_to_keep();
            let greedy = "; for greedy decoding turn sampling off instead of setting 0";
            if let Some(temperature) = positive_factor("temperature", s.temperature, greedy)? {
                p.push(Processor::Temperature { temperature });
            }
            if s.top_k != 0 {
                p.push(Processor::TopK { top_k: s.top_k.max(keep) });
            }
            if !(0.0..=1.0).contains(&s.top_p) {
                return bad(format!("top_p {} is invalid: it must be in [0, 1] (1.0 = off)", s.top_p));
            }
            if s.top_p < 1.0 {
                p.push(Processor::TopP { top_p: s.top_p, min_tokens_to_keep: keep });
            }
            if let Some(m) = s.min_p {
                if !(0.0..=1.0).contains(&m) {
                    return bad(format!("min_p {m} is invalid: it must be in [0, 1] (unset = off)"));
                }
                p.push(Processor::MinP { min_p: m, min_tokens_to_keep: keep });
            }
        }
        Ok(Self { processors: p })
    }

    pub fn processors(&self) -> &[Processor] {
        &self.processors
    }

    pub fn is_empty(&self) -> bool {
        self.processors.is_empty()
    }

    /// Greedy / sampling entry point: processes raw fp32 logits in place.
    pub fn process_logits(&self, history: &[u32], logits: &mut [f32]) -> Result<()> {
        self.processors.iter().try_for_each(|p| p.apply(history, logits))
    }

    /// Beam-search entry point: `log_softmax(logits)` in place, then the processors.
    pub fn process_log_probs(&self, history: &[u32], logits: &mut [f32]) -> Result<()> {
        log_softmax(logits);
        self.process_logits(history, logits)
    }
}

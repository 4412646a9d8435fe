//! Multinomial sampling (transformers' `_sample` with `do_sample=True`), and greedy decoding
//! with logits processors (`do_sample=False`): each step reads every sequence's full logits
//! row back to the host, applies the processors (processors.rs) to the raw fp32 logits, and
//! draws a token from `softmax(processed)` — or takes its first maximum when not sampling.
//!
//! The draw is glimpse's own, not torch's (torch's multinomial/Philox stream cannot be
//! reproduced outside torch): a seeded [`Rng`] per sequence, so a seed gives the same tokens on
//! every executor and machine as long as the logits agree. Sequence `b` of a request draws from
//! `Rng::new(seed, b)`, one uniform per generated token; finished sequences draw nothing.
//! Log-probs are recorded as greedy records them: log-softmax of the raw logits. With
//! `num_return_sequences > 1` each input's rows (expanded by the caller, as transformers) are
//! independent sequences drawing their own streams; only the first of each is streamed.

use std::time::Instant;

use super::processors::LogitsProcessorList;
use super::{Request, Sequence, Session, TokenEvent};
use crate::backend::cpu::ops::{argmax, log_prob};
use crate::error::{Error, Result};

/// xoshiro256** (Blackman & Vigna) seeded through SplitMix64: small, fast, and specified
/// bit for bit, so draws are identical on every platform. `new(seed, stream)` runs SplitMix64
/// from `splitmix64(seed) ^ stream` to fill the four state words, giving each (seed, stream)
/// its own sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Rng {
    s: [u64; 4],
}

/// One SplitMix64 step: advances `state` and returns the next output.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Rng {
    pub fn new(seed: u64, stream: u64) -> Self {
        let mut key = seed;
        let mut sm = splitmix64(&mut key) ^ stream;
        Self::from_state([splitmix64(&mut sm), splitmix64(&mut sm), splitmix64(&mut sm), splitmix64(&mut sm)])
    }

    /// The generator with this exact state (for known-answer tests; not all zero).
    pub fn from_state(s: [u64; 4]) -> Self {
        Self { s }
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let out = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        out
    }

    /// Uniform in [0, 1): the top 53 bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Draws a token from `softmax(scores)` with one uniform `u` of `rng`: the first id whose
/// cumulative weight exceeds `u` times the total (weights `exp(s - max)` in f64; -inf scores
/// weigh nothing and are never drawn). Errors where torch's multinomial does: NaN, +inf, or
/// every score -inf.
pub fn draw(scores: &[f32], rng: &mut Rng) -> Result<u32> {
    if let Some(i) = scores.iter().position(|s| s.is_nan() || *s == f32::INFINITY) {
        return Err(Error::InvalidInput(format!(
            "cannot sample: score {i} is {} (the model's logits are not finite; `remove_invalid_values` replaces them)",
            scores[i]
        )));
    }
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return Err(Error::InvalidInput(
            "cannot sample: every token was filtered out (all scores are -inf); loosen the processors (top_p, min_p, no_repeat_ngram_size, min_new_tokens)".into(),
        ));
    }
    let weights: Vec<f64> = scores.iter().map(|&s| (s as f64 - max as f64).exp()).collect();
    let target = rng.next_f64() * weights.iter().sum::<f64>();
    let mut cum = 0.0;
    let mut last = 0;
    for (i, &w) in weights.iter().enumerate() {
        if w > 0.0 {
            cum += w;
            last = i;
            if cum > target {
                return Ok(i as u32);
            }
        }
    }
    // Only when rounding leaves the running sum at or below the target: the last drawable id.
    Ok(last as u32)
}

/// Draws `k` distinct indices from `softmax(scores)` without replacement (torch's
/// `multinomial(probs, k)`, as beam sampling uses it): one uniform of `rng` per draw, each over the
/// weights not drawn yet, in draw order. Errors as torch does when fewer than `k` indices have a
/// positive weight, or a score is NaN / +inf.
pub fn draw_distinct(scores: &[f64], k: usize, rng: &mut Rng) -> Result<Vec<usize>> {
    if let Some(i) = scores.iter().position(|s| s.is_nan() || *s == f64::INFINITY) {
        return Err(Error::InvalidInput(format!("cannot sample: score {i} is {}", scores[i])));
    }
    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut weights: Vec<f64> = scores.iter().map(|&s| (s - max).exp()).collect();
    let positive = weights.iter().filter(|&&w| w > 0.0).count();
    if positive < k {
        return Err(Error::InvalidInput(format!(
            "cannot sample {k} distinct candidates: only {positive} have a non-zero probability (as torch.multinomial without replacement); loosen the processors (top_k, top_p, min_p) or use fewer beams"
        )));
    }
    let mut out = Vec::with_capacity(k);
    for _ in 0..k {
        let target = rng.next_f64() * weights.iter().sum::<f64>();
        let mut cum = 0.0;
        let mut pick = None;
        for (i, &w) in weights.iter().enumerate() {
            if w > 0.0 {
                cum += w;
                pick = Some(i);
                if cum > target {
                    break;
                }
            }
        }
        let i =
            pick.ok_or_else(|| Error::InvalidInput("cannot sample: no candidate left with a positive weight".into()))?;
        weights[i] = 0.0;
        out.push(i);
    }
    Ok(out)
}

pub(super) fn run(s: &mut Session<'_, '_>, req: &Request<'_>) -> Result<Vec<Sequence>> {
    let Request { inputs, prompts, opts } = *req;
    let plan = s.plan;
    let batch = plan.batch;
    let settings = opts.processor_settings();
    let processors = LogitsProcessorList::new(&settings, plan.prompt_len)?;
    let seed = opts.sampling_seed();
    let per = opts.expansion();
    let mut seqs = vec![Sequence::default(); batch];
    if !s.encode(inputs)? {
        return Ok(seqs);
    }
    let tokens = prompts.ids().to_vec();
    let Some(mut rows) = s.prefill_logits(&tokens)? else { return Ok(seqs) };
    let mut rngs: Vec<Rng> = (0..batch).map(|b| Rng::new(seed, b as u64)).collect();
    // transformers' `input_ids` of each sequence: the decoder input, then what was generated.
    let mut history: Vec<Vec<u32>> = (0..batch).map(|b| prompts.row(b).to_vec()).collect();

    let decode_start = Instant::now();
    for step in 0..plan.max_new_tokens {
        let vocab = rows.len() / batch.max(1);
        let mut next = vec![0u32; batch];
        for (b, seq) in seqs.iter_mut().enumerate() {
            if seq.finished() {
                // Finished sequences keep feeding their last token; their outputs are ignored.
                next[b] = *seq.tokens.last().unwrap_or(&0);
                continue;
            }
            let raw = &rows[b * vocab..(b + 1) * vocab];
            let mut scores = raw.to_vec();
            processors.process_logits(&history[b], &mut scores)?;
            let token = if settings.do_sample {
                draw(&scores, &mut rngs[b])
                    .map_err(|e| Error::InvalidInput(format!("sequence {b}, new token {}: {e}", step + 1)))?
            } else {
                argmax(&scores) as u32
            };
            let logprob = log_prob(raw, token as usize);
            seq.tokens.push(token);
            seq.logprobs.push(logprob);
            seq.stopped_by_eos = opts.eos_token_ids.contains(&token);
            history[b].push(token);
            seq.stopped_by_string = s.stops(&history[b]);
            next[b] = token;
            // Several sequences per input (num_return_sequences): the first of each is streamed.
            if b % per == 0 {
                s.token(&TokenEvent { sequence: b / per, step, token, logprob });
            }
        }
        if step == 0 {
            s.timings.first_token_ms = s.elapsed_ms();
        }
        if step + 1 == plan.max_new_tokens || seqs.iter().all(Sequence::finished) {
            break;
        }
        match s.decode_logits(&next, plan.prompt_len + step)? {
            Some(r) => rows = r,
            None => break,
        }
    }
    s.timings.decode_ms = super::ms(decode_start);
    Ok(seqs)
}

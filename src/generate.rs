//! Greedy decoding over a built plan: encode the image, prefill the prompt into the KV cache,
//! then one-token steps until EOS or `max_new_tokens`, streaming each token as it comes.

use std::time::Instant;

use crate::backend::Executor;
use crate::error::{Error, Result};
use crate::models::blip2::Blip2Plan;

/// transformers' `max_length` when nothing sets a length: 20 tokens past the decoder input.
pub const DEFAULT_NEW_TOKENS: usize = 20;

#[derive(Debug, Clone, Default)]
pub struct GenerateOptions {
    /// How many tokens to generate at most. `None` is transformers' default: `max_length =
    /// input length + 20`, capped at the decoder's `max_position_embeddings`.
    pub max_new_tokens: Option<usize>,
    /// Generation stops for a sequence when it produces any of these (the token is kept).
    pub eos_token_ids: Vec<u32>,
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
    pub vision_ms: f64,
    pub qformer_ms: f64,
    pub prefill_ms: f64,
    /// All decode steps together.
    pub decode_ms: f64,
    pub decode_steps: usize,
    /// Pixels in to first token out.
    pub first_token_ms: f64,
    pub total_ms: f64,
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

/// Runs the plan: `pixels` holds `plan.batch` images, `input_ids` is one decoder input shared by
/// every image (image tokens, BOS, prompt).
pub fn generate(
    plan: &Blip2Plan,
    exec: &mut dyn Executor,
    pixels: &[f32],
    input_ids: &[u32],
    opts: &GenerateOptions,
    on_token: &mut dyn FnMut(&TokenEvent),
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
    let batch = plan.batch;
    let start = Instant::now();
    let mut t = Timings::default();

    // Image -> query embeddings.
    exec.write(plan.pixels, pixels)?;
    let s = Instant::now();
    exec.run(&plan.vision)?;
    t.vision_ms = ms(s);
    let s = Instant::now();
    exec.run(&plan.qformer)?;
    t.qformer_ms = ms(s);

    let mut seqs = vec![Sequence::default(); batch];
    let max_new_tokens = plan.max_new_tokens;

    // Prefill the whole input; logits of each item's last row.
    let s = Instant::now();
    let tokens: Vec<u32> = (0..batch).flat_map(|_| input_ids.iter().copied()).collect();
    exec.set_tokens(&tokens);
    exec.set_position(0);
    exec.run(&plan.prefill)?;
    // Greedy choice from each item's last row (the plan keeps only last rows unless it was
    // built with all prefill logits, for parity tests).
    let rows = plan.prefill_logit_rows;
    let mut picks = exec.greedy(plan.prefill_logits, rows)?;
    if rows != batch {
        picks = (0..batch).map(|b| picks[b * plan.prompt_len + plan.prompt_len - 1]).collect();
    }
    t.prefill_ms = ms(s);

    let decode_start = Instant::now();
    for step in 0..max_new_tokens {
        let mut next = vec![0u32; batch];
        for (b, seq) in seqs.iter_mut().enumerate() {
            if seq.stopped_by_eos {
                // Finished sequences keep feeding their EOS; their outputs are ignored.
                next[b] = *seq.tokens.last().unwrap_or(&0);
                continue;
            }
            let (token, logprob) = picks[b];
            seq.tokens.push(token);
            seq.logprobs.push(logprob);
            seq.stopped_by_eos = opts.eos_token_ids.contains(&token);
            next[b] = token;
            on_token(&TokenEvent { sequence: b, step, token, logprob });
        }
        if step == 0 {
            t.first_token_ms = ms(start);
        }
        if step + 1 == max_new_tokens || seqs.iter().all(|s| s.stopped_by_eos) {
            break;
        }
        // Feed the chosen tokens back: one decode step at position prompt_len + step.
        exec.set_tokens(&next);
        exec.set_position(plan.prompt_len + step);
        exec.run(&plan.decode)?;
        picks = exec.greedy(plan.decode_logits, batch)?;
        t.decode_steps += 1;
    }
    t.decode_ms = ms(decode_start);
    t.total_ms = ms(start);
    Ok((seqs, t))
}

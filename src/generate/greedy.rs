//! Greedy decoding (transformers' `_sample` without sampling): each sequence takes its most
//! likely token until EOS, a stop string or `max_new_tokens`; finished sequences keep feeding
//! their last token (their outputs are ignored).

use std::time::Instant;

use super::{Request, Sequence, Session, TokenEvent};
use crate::backend::Candidate;
use crate::error::Result;

pub(super) fn run(s: &mut Session<'_, '_>, req: &Request<'_>) -> Result<Vec<Sequence>> {
    let Request { inputs, prompts, opts } = *req;
    let plan = s.plan;
    let batch = plan.batch;
    let mut seqs = vec![Sequence::default(); batch];
    if !s.encode(inputs)? {
        return Ok(seqs);
    }
    let tokens = prompts.ids().to_vec();
    // MinNewTokensLengthLogitsProcessor: before min_new_tokens every EOS is -inf, so the pick is
    // the best non-EOS token among the 1 + n_eos best.
    let k = |step: usize| if step < opts.min_new_tokens { 1 + opts.eos_token_ids.len() } else { 1 };
    let Some(mut picks) = s.prefill(&tokens, k(0))? else { return Ok(seqs) };
    // transformers' `input_ids` of each sequence, for the stop strings.
    let mut history: Vec<Vec<u32>> = (0..batch).map(|b| prompts.row(b).to_vec()).collect();

    let decode_start = Instant::now();
    for step in 0..plan.max_new_tokens {
        let mut next = vec![0u32; batch];
        for (b, seq) in seqs.iter_mut().enumerate() {
            if seq.finished() {
                // Finished sequences keep feeding their last token; their outputs are ignored.
                next[b] = *seq.tokens.last().unwrap_or(&0);
                continue;
            }
            let allowed = |c: &&Candidate| step >= opts.min_new_tokens || !opts.eos_token_ids.contains(&c.token);
            let best = *picks[b].iter().find(allowed).unwrap_or(&picks[b][0]);
            seq.tokens.push(best.token);
            seq.logprobs.push(best.logprob);
            seq.stopped_by_eos = opts.eos_token_ids.contains(&best.token);
            history[b].push(best.token);
            seq.stopped_by_string = s.stops(&history[b]);
            next[b] = best.token;
            s.token(&TokenEvent { sequence: b, step, token: best.token, logprob: best.logprob });
        }
        if step == 0 {
            s.timings.first_token_ms = s.elapsed_ms();
        }
        if step + 1 == plan.max_new_tokens || seqs.iter().all(Sequence::finished) {
            break;
        }
        // Feed the chosen tokens back: one decode step at position prompt_len + step.
        match s.decode(&next, plan.prompt_len + step, k(step + 1))? {
            Some(p) => picks = p,
            None => break,
        }
    }
    s.timings.decode_ms = super::ms(decode_start);
    Ok(seqs)
}

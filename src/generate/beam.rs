//! Beam search as transformers 5.17's `GenerationMixin._beam_search` (docs: shared design note
//! generation.md §4): fixed `num_beams` running beams per input, `K = max(2, 1 + n_eos) *
//! num_beams` candidates a step, finished hypotheses scored `sum(logprobs) / gen_len ^
//! length_penalty`, and transformers' `early_stopping` heuristics.
//!
//! The plan runs `inputs x num_beams` sequences (each input's rows repeated `num_beams` times,
//! beam-major within an input, as transformers' `repeat_interleave`). Each step asks the
//! executor for the `K` best log-softmax entries of every beam's logit row (`Executor::top_k`:
//! on a GPU only ids and log-probs leave the device); the candidate merge over beams, the
//! finished-hypothesis bookkeeping and the stopping rules are host-side (a few dozen numbers a
//! step); the KV caches follow the surviving beams through `Executor::reorder_sequences`.
//! Scores are accumulated in f64 (transformers: f32); they agree to ~1e-6.

use std::cmp::Ordering;
use std::time::Instant;

use super::{EarlyStopping, GenerateOptions, Prompts, Sequence, Session, TokenEvent};
use crate::error::{Error, Result};

/// transformers' stand-in for "impossible" (`-1e9` added to masked scores).
const MASKED: f64 = -1.0e9;

/// A running beam or a finished hypothesis: generated tokens, their log-probs, the score (the
/// running sum for a beam, the length-penalized sum for a finished hypothesis).
#[derive(Debug, Clone)]
struct Hyp {
    tokens: Vec<u32>,
    logprobs: Vec<f64>,
    score: f64,
}

/// One continuation of one beam.
struct Cand {
    score: f64,
    beam: usize,
    token: u32,
    logprob: f64,
}

/// Ranks candidates as `torch.topk` over the flattened `[num_beams * vocab]` row: by score, ties
/// to the lower flat index (beam, then token).
fn by_rank(a: &Cand, b: &Cand) -> Ordering {
    b.score.total_cmp(&a.score).then(a.beam.cmp(&b.beam)).then(a.token.cmp(&b.token))
}

pub(super) fn run(
    s: &mut Session<'_, '_>,
    inputs: &[(&str, &[f32])],
    prompts: &Prompts,
    opts: &GenerateOptions,
) -> Result<Vec<Sequence>> {
    let plan = s.plan;
    let n = opts.num_beams;
    if n < 2 || plan.batch % n != 0 {
        return Err(Error::InvalidInput(format!(
            "beam search with {n} beams needs a plan of inputs x {n} sequences; this plan runs {}: build it with batch = images x num_beams",
            plan.batch
        )));
    }
    let items = plan.batch / n;
    let max_new = plan.max_new_tokens;
    let eos = &opts.eos_token_ids;
    let k = 2.max(1 + eos.len()) * n;
    let lp = opts.length_penalty;

    if !s.encode(inputs)? {
        return Ok(vec![Sequence::default(); items]);
    }
    // Every beam of an input starts from the same prompt; beams 1.. start at -1e9 so the first
    // step's candidates all come from beam 0.
    let start = |j: usize| Hyp { tokens: Vec::new(), logprobs: Vec::new(), score: if j == 0 { 0.0 } else { MASKED } };
    let mut running: Vec<Vec<Hyp>> = (0..items).map(|_| (0..n).map(start).collect()).collect();
    let mut finished: Vec<Vec<Hyp>> = vec![Vec::new(); items];
    let mut unsatisfied = vec![true; items];

    let tokens = prompts.ids().to_vec();
    let banned = |step: usize| if step < opts.min_new_tokens { eos.len() } else { 0 };
    let Some(mut picks) = s.prefill(&tokens, k + banned(0))? else { return Ok(finish(&finished, &running, opts)) };

    let decode_start = Instant::now();
    for step in 0..max_new {
        let gen_len = (step + 1) as f64;
        let mut next = vec![0u32; plan.batch];
        let mut from = vec![0usize; plan.batch];
        let mut all_hit = true;
        for b in 0..items {
            // (d) the K best continuations over all beams of this input.
            let mut cands: Vec<Cand> = Vec::with_capacity(n * k);
            for (j, beam) in running[b].iter().enumerate() {
                for c in &picks[b * n + j] {
                    // MinNewTokensLengthLogitsProcessor: EOS is -inf before min_new_tokens.
                    if step < opts.min_new_tokens && eos.contains(&c.token) {
                        continue;
                    }
                    cands.push(Cand { score: beam.score + c.logprob, beam: j, token: c.token, logprob: c.logprob });
                }
            }
            cands.sort_by(by_rank);
            cands.truncate(k);
            let hit: Vec<bool> = cands.iter().map(|c| eos.contains(&c.token) || step + 1 == max_new).collect();
            all_hit &= hit.iter().all(|&h| h);
            let extend = |c: &Cand, score: f64| {
                let src = &running[b][c.beam];
                let mut h = Hyp { tokens: src.tokens.clone(), logprobs: src.logprobs.clone(), score };
                h.tokens.push(c.token);
                h.logprobs.push(c.logprob);
                h
            };

            // (f) finished hypotheses: only hits among the first N candidates, while the input
            // can still improve (and, with early_stopping=True, is not full yet).
            let full = finished[b].len() == n;
            if unsatisfied[b] && !(opts.early_stopping == EarlyStopping::Done && full) {
                for (c, _) in cands.iter().zip(&hit).take(n).filter(|(_, &h)| h) {
                    finished[b].push(extend(c, c.score / gen_len.powf(lp)));
                }
                // Stable: an earlier hypothesis stays ahead of an equal newcomer, as in the
                // merged top-k over [finished, candidates].
                finished[b].sort_by(|x, y| y.score.total_cmp(&x.score));
                finished[b].truncate(n);
            }

            // (e) the next running beams: the N best candidates, hits pushed to the back.
            let mut order: Vec<usize> = (0..cands.len()).collect();
            let masked = |i: usize| cands[i].score + if hit[i] { MASKED } else { 0.0 };
            order.sort_by(|&x, &y| masked(y).total_cmp(&masked(x)).then(x.cmp(&y)));
            let new_running: Vec<Hyp> = order.iter().take(n).map(|&i| extend(&cands[i], masked(i))).collect();
            for (j, &i) in order.iter().take(n).enumerate() {
                from[b * n + j] = b * n + cands[i].beam;
                next[b * n + j] = cands[i].token;
            }
            running[b] = new_running;

            // The early-stop heuristic (sticky): can the best running beam still beat the worst
            // finished hypothesis once all N slots are full?
            if finished[b].len() == n {
                let best_len =
                    if opts.early_stopping == EarlyStopping::Never && lp > 0.0 { max_new as f64 } else { gen_len };
                let best = running[b][0].score / best_len.powf(lp);
                let worst = finished[b].iter().map(|h| h.score).fold(f64::INFINITY, f64::min);
                unsatisfied[b] &= best > worst;
            }
        }
        if step == 0 {
            s.timings.first_token_ms = s.elapsed_ms();
        }
        let all_full = finished.iter().all(|f| f.len() == n);
        if !unsatisfied.iter().any(|&u| u) || (opts.early_stopping == EarlyStopping::Done && all_full) || all_hit {
            break;
        }
        // The caches follow the surviving beams, then one step feeds each beam's new token.
        s.exec.reorder_sequences(&plan.kv.bufs, plan.kv.rows_per_seq, &from)?;
        match s.decode(&next, plan.prompt_len + step, k + banned(step + 1))? {
            Some(p) => picks = p,
            None => break,
        }
    }
    s.timings.decode_ms = super::ms(decode_start);
    let out = finish(&finished, &running, opts);
    // Beams are only known at the end: the best hypothesis of each input is reported then.
    for (i, seq) in out.iter().enumerate() {
        for (step, (&token, &logprob)) in seq.tokens.iter().zip(&seq.logprobs).enumerate() {
            s.token(&TokenEvent { sequence: i, step, token, logprob });
        }
    }
    Ok(out)
}

/// The returned hypotheses of each input: the best `num_return_sequences` finished ones, best
/// first. A run a hook stopped early may have none yet: its best running beam stands in.
fn finish(finished: &[Vec<Hyp>], running: &[Vec<Hyp>], opts: &GenerateOptions) -> Vec<Sequence> {
    let to_seq = |h: &Hyp| Sequence {
        stopped_by_eos: h.tokens.last().is_some_and(|t| opts.eos_token_ids.contains(t)),
        tokens: h.tokens.clone(),
        logprobs: h.logprobs.clone(),
        score: Some(h.score),
        alternatives: Vec::new(),
    };
    finished
        .iter()
        .zip(running)
        .map(|(fin, run)| {
            let pool = if fin.is_empty() { &run[..1] } else { &fin[..] };
            let mut returned = pool.iter().take(opts.num_return_sequences).map(to_seq);
            let mut best = returned.next().unwrap_or_default();
            best.alternatives = returned.collect();
            best
        })
        .collect()
}

//! Beam search as transformers 5.17's `GenerationMixin._beam_search` (docs/architecture.md#beam-search):
//! fixed `num_beams` running beams per input, `K = max(2, 1 + n_eos) *
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
//!
//! With logits processors that need the token history (repetition penalty, no-repeat n-grams)
//! or with sampling, each beam's whole logit row comes to the host: `log_softmax`, then the
//! processors (on the log-probs, as 5.17), then either the `K` best of each beam or — beam
//! sampling — `K` distinct draws from `softmax(running score + processed log-prob)` over all
//! beams x vocab (`torch.multinomial` without replacement), kept in draw order: only the first
//! `num_beams` drawn may finish. Recorded per-token log-probs are always the raw log-softmax.
//! A candidate completing a stop string finishes like an EOS candidate.

use std::cmp::Ordering;
use std::time::Instant;

use super::processors::{log_softmax, LogitsProcessorList};
use super::sample::{draw_distinct, Rng};
use super::{EarlyStopping, GenerateOptions, Request, Sequence, Session, TokenEvent};
use crate::backend::Candidate;
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
    /// A finished hypothesis that completed a stop string.
    stopped_by_string: bool,
}

/// One next token of one beam: `add` joins the beam's score (the processed log-prob), `logprob`
/// is recorded (the raw log-softmax).
#[derive(Clone, Copy)]
struct Pick {
    token: u32,
    add: f64,
    logprob: f64,
}

/// What a forward pass hands the merge: each beam's best few tokens (ranked on the device), or
/// each beam's processed and raw log-prob rows (host processors or sampling).
enum Scored {
    Ranked(Vec<Vec<Pick>>),
    Rows { processed: Vec<f32>, raw: Vec<f32>, vocab: usize },
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

pub(super) fn run(s: &mut Session<'_, '_>, req: &Request<'_>) -> Result<Vec<Sequence>> {
    let Request { inputs, prompts, opts } = *req;
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
    let host = opts.do_sample || opts.repetition_penalty != 1.0 || opts.no_repeat_ngram_size > 0;
    let processors = LogitsProcessorList::new(&opts.processor_settings(), plan.prompt_len)?;
    let seed = opts.sampling_seed();
    // Beam sampling: input `b` draws from its own stream.
    let mut rngs: Vec<Rng> = (0..items).map(|b| Rng::new(seed, b as u64)).collect();

    if !s.encode(inputs)? {
        return Ok(vec![Sequence::default(); items]);
    }
    // Every beam of an input starts from the same prompt; beams 1.. start at -1e9 so the first
    // step's candidates all come from beam 0.
    let start = |j: usize| Hyp {
        tokens: Vec::new(),
        logprobs: Vec::new(),
        score: if j == 0 { 0.0 } else { MASKED },
        stopped_by_string: false,
    };
    let mut running: Vec<Vec<Hyp>> = (0..items).map(|_| (0..n).map(start).collect()).collect();
    let mut finished: Vec<Vec<Hyp>> = vec![Vec::new(); items];
    let mut unsatisfied = vec![true; items];

    let tokens = prompts.ids().to_vec();
    let banned = |step: usize| if step < opts.min_new_tokens { eos.len() } else { 0 };
    // transformers' `input_ids` of beam `j` of input `b`: the decoder input, then its tokens.
    let history = |running: &[Vec<Hyp>], b: usize, j: usize, extra: Option<u32>| -> Vec<u32> {
        let mut h = prompts.row(b * n + j).to_vec();
        h.extend(&running[b][j].tokens);
        h.extend(extra);
        h
    };
    let first = if host {
        s.prefill_logits(&tokens)?.map(|rows| score_rows(rows, &running, &history, &processors))
    } else {
        s.prefill(&tokens, k + banned(0))?.map(|c| Ok(Scored::Ranked(ranked(c, 0, opts))))
    };
    let Some(scored) = first else { return Ok(finish(&finished, &running, opts)) };
    let mut scored = scored?;

    let decode_start = Instant::now();
    for step in 0..max_new {
        let gen_len = (step + 1) as f64;
        let mut next = vec![0u32; plan.batch];
        let mut from = vec![0usize; plan.batch];
        let mut all_hit = true;
        for b in 0..items {
            // (d) the K best (or, sampling, K drawn) continuations over all beams of this input.
            let cands = candidates(&scored, &running[b], b * n, k, opts.do_sample, &mut rngs[b])?;
            let by_string: Vec<bool> =
                cands.iter().map(|c| s.stops(&history(&running, b, c.beam, Some(c.token)))).collect();
            let hit: Vec<bool> = cands
                .iter()
                .zip(&by_string)
                .map(|(c, &st)| st || eos.contains(&c.token) || step + 1 == max_new)
                .collect();
            all_hit &= hit.iter().all(|&h| h);
            let extend = |c: &Cand, score: f64| {
                let src = &running[b][c.beam];
                let mut h =
                    Hyp { tokens: src.tokens.clone(), logprobs: src.logprobs.clone(), score, stopped_by_string: false };
                h.tokens.push(c.token);
                h.logprobs.push(c.logprob);
                h
            };

            // (f) finished hypotheses: only hits among the first N candidates, while the input
            // can still improve (and, with early_stopping=True, is not full yet).
            let full = finished[b].len() == n;
            if unsatisfied[b] && !(opts.early_stopping == EarlyStopping::Done && full) {
                for ((c, _), &st) in cands.iter().zip(&hit).zip(&by_string).take(n).filter(|((_, &h), _)| h) {
                    let mut h = extend(c, c.score / gen_len.powf(lp));
                    h.stopped_by_string = st;
                    finished[b].push(h);
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
        let step_out = if host {
            s.decode_logits(&next, plan.prompt_len + step)?
                .map(|rows| score_rows(rows, &running, &history, &processors))
        } else {
            s.decode(&next, plan.prompt_len + step, k + banned(step + 1))?
                .map(|c| Ok(Scored::Ranked(ranked(c, step + 1, opts))))
        };
        match step_out {
            Some(sc) => scored = sc?,
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

/// Device-ranked candidates as picks; before `min_new_tokens` EOS ids are dropped
/// (MinNewTokensLengthLogitsProcessor sets them to -inf), which is why `k + n_eos` were ranked.
fn ranked(cands: Vec<Vec<Candidate>>, step: usize, opts: &GenerateOptions) -> Vec<Vec<Pick>> {
    let banned = |t: u32| step < opts.min_new_tokens && opts.eos_token_ids.contains(&t);
    cands
        .into_iter()
        .map(|row| {
            row.into_iter()
                .filter(|c| !banned(c.token))
                .map(|c| Pick { token: c.token, add: c.logprob, logprob: c.logprob })
                .collect()
        })
        .collect()
}

/// A beam's token history: `(running, input, beam, extra token)` to its `input_ids`.
type History<'a> = dyn Fn(&[Vec<Hyp>], usize, usize, Option<u32>) -> Vec<u32> + 'a;

/// Host rows `[beams, vocab]`: raw log-softmax and the processors applied to it, each beam with
/// its own history.
fn score_rows(
    mut raw: Vec<f32>,
    running: &[Vec<Hyp>],
    history: &History<'_>,
    processors: &LogitsProcessorList,
) -> Result<Scored> {
    let n = running.first().map_or(1, Vec::len);
    let rows = running.len() * n;
    let vocab = raw.len() / rows.max(1);
    raw.chunks_mut(vocab.max(1)).for_each(log_softmax);
    let mut processed = raw.clone();
    for (r, row) in processed.chunks_mut(vocab.max(1)).enumerate() {
        processors.process_logits(&history(running, r / n, r % n, None), row)?;
    }
    Ok(Scored::Rows { processed, raw, vocab })
}

/// The `k` continuations of one input's beams (rows `row0..row0 + beams.len()`): the best by
/// score in `torch.topk` order, or `k` distinct draws from `softmax(score)` in draw order.
fn candidates(scored: &Scored, beams: &[Hyp], row0: usize, k: usize, sample: bool, rng: &mut Rng) -> Result<Vec<Cand>> {
    let mut cands: Vec<Cand> = match scored {
        Scored::Ranked(picks) => beams
            .iter()
            .enumerate()
            .flat_map(|(j, beam)| {
                picks[row0 + j].iter().map(move |p| Cand {
                    score: beam.score + p.add,
                    beam: j,
                    token: p.token,
                    logprob: p.logprob,
                })
            })
            .collect(),
        Scored::Rows { processed, raw, vocab } => {
            let v = *vocab;
            let cand = |j: usize, t: usize, score: f64| Cand {
                score,
                beam: j,
                token: t as u32,
                logprob: raw[(row0 + j) * v + t] as f64,
            };
            // The running score plus each processed log-prob, beam-major (torch's flat index).
            let acc = |j: usize, t: usize| beams[j].score + processed[(row0 + j) * v + t] as f64;
            if sample {
                let all: Vec<f64> = (0..beams.len() * v).map(|i| acc(i / v, i % v)).collect();
                let drawn = draw_distinct(&all, k, rng)?;
                return Ok(drawn.into_iter().map(|i| cand(i / v, i % v, all[i])).collect());
            }
            // The global top k lies within each beam's own top k.
            let mut out = Vec::with_capacity(beams.len() * k);
            for j in 0..beams.len() {
                let mut ids: Vec<usize> = (0..v).collect();
                let by = |a: &usize, b: &usize| acc(j, *b).total_cmp(&acc(j, *a)).then(a.cmp(b));
                if k < v {
                    ids.select_nth_unstable_by(k - 1, by);
                    ids.truncate(k);
                }
                out.extend(ids.into_iter().map(|t| cand(j, t, acc(j, t))));
            }
            out
        }
    };
    cands.sort_by(by_rank);
    cands.truncate(k);
    Ok(cands)
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
        stopped_by_string: h.stopped_by_string,
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

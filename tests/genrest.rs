//! The rest of transformers 5.17's `generate()` on the CPU executor: stop strings (greedy and
//! beam search) and beam search with logits processors against goldens
//! (scripts/fixtures_genrest.py on the tiny BLIP-2 fixture); beam sampling and several sampled
//! sequences per input, tested on their distributions (torch's RNG stream cannot be reproduced:
//! fixed seeds keep these tests deterministic, see tests/sampling.rs).

mod common;

use glimpse::generate::sample::{draw_distinct, Rng};
use glimpse::{Device, GenerateOptions, Model, Output};
use serde_json::Value;

/// As tests/beam.rs: per-token log-prob tolerance of the CPU executor against torch fp32.
const LOGPROB_ABS: f64 = 1e-4;

fn load() -> Model {
    Model::load(common::model_dir("blip2-opt-tiny"), Device::Cpu).expect("fixture model loads")
}

/// The golden's `generate()` options over the checkpoint's defaults.
fn options(model: &Model, o: &Value) -> GenerateOptions {
    let mut opts = model.default_options();
    opts.num_beams = o["num_beams"].as_u64().unwrap() as usize;
    opts.max_new_tokens = Some(o["max_new_tokens"].as_u64().unwrap() as usize);
    opts.eos_token_ids = common::ids(&o["eos_token_id"]);
    if let Some(v) = o.get("stop_strings") {
        opts.stop_strings = v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect();
    }
    if let Some(v) = o.get("repetition_penalty") {
        opts.repetition_penalty = v.as_f64().unwrap();
    }
    if let Some(v) = o.get("no_repeat_ngram_size") {
        opts.no_repeat_ngram_size = v.as_u64().unwrap() as usize;
    }
    if let Some(v) = o.get("min_new_tokens") {
        opts.min_new_tokens = v.as_u64().unwrap() as usize;
    }
    if let Some(v) = o.get("num_return_sequences") {
        opts.num_return_sequences = v.as_u64().unwrap() as usize;
    }
    opts
}

fn images(model: &Model, case: &Value) -> Vec<glimpse::image::PixelValues> {
    case["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| model.preprocess(&common::image(p.as_str().unwrap())).unwrap())
        .collect()
}

/// Every returned sequence of `out`, best first.
fn returned(out: &Output) -> Vec<(&[u32], Option<f64>)> {
    std::iter::once((&out.tokens[..], out.score))
        .chain(out.alternatives.iter().map(|a| (&a.tokens[..], a.score)))
        .collect()
}

/// Runs every golden case whose name starts with `prefix` (with `edit` applied to its options)
/// and checks tokens and `sequences_scores` (scaled by `score_scale`).
fn check_cases(prefix: &str, edit: &dyn Fn(&mut GenerateOptions), score_scale: f64) -> usize {
    let model = load();
    let g = common::golden_json("genrest_cases.json");
    let mut checked = 0;
    for case in g["cases"].as_array().unwrap().iter().filter(|c| c["name"].as_str().unwrap().starts_with(prefix)) {
        let name = case["name"].as_str().unwrap();
        let mut opts = options(&model, &case["options"]);
        edit(&mut opts);
        let imgs = images(&model, case);
        let outs = model.run(&imgs, case["prompt"].as_str(), &opts, &mut |_| {}).unwrap();
        assert_eq!(outs.len(), imgs.len(), "{name}: one output per image");
        let want: Vec<Vec<u32>> = case["sequences"].as_array().unwrap().iter().map(common::ids).collect();
        let scores = case["scores"].as_array().map(|s| common::floats(&Value::Array(s.clone())));
        let per = opts.num_return_sequences;
        for (i, out) in outs.iter().enumerate() {
            let got = returned(out);
            assert_eq!(got.len(), per, "{name} image {i}: returned sequences");
            for (r, (tokens, score)) in got.into_iter().enumerate() {
                let at = i * per + r;
                assert_eq!(tokens, &want[at][..], "{name} image {i} sequence {r}: tokens");
                match &scores {
                    None => assert!(score.is_none(), "{name}: greedy has no score"),
                    Some(w) => {
                        let got = score.unwrap() * score_scale;
                        let tol = LOGPROB_ABS * tokens.len() as f64 / (tokens.len() as f64).powf(opts.length_penalty);
                        assert!((got - w[at]).abs() <= tol, "{name} image {i} sequence {r}: score {got} vs {}", w[at]);
                    }
                }
            }
        }
        checked += 1;
    }
    checked
}

/// Stop strings ending inside the last token, spanning two and three tokens, on byte-level
/// tokens of a non-ASCII string, never matching, in a batch where one sequence stops first, with
/// an EOS that comes first, and in beam search: the tokens transformers generates, the
/// completing token kept.
#[test]
fn stop_strings_match_transformers() {
    assert_eq!(check_cases("stop_", &|_| {}, 1.0), 10);
}

/// The stop string is in the output text, at its end (or the sequence ran to its length).
#[test]
fn stop_string_ends_the_text() {
    let model = load();
    let img = model.preprocess(&common::image("odd_257x181.png")).unwrap();
    let opts = GenerateOptions { stop_strings: vec!["zo".into()], ..model.default_options() };
    let out = model.run(std::slice::from_ref(&img), None, &opts, &mut |_| {}).unwrap().remove(0);
    assert!(out.text.ends_with("zoo"), "{:?}", out.text);
    // Streaming sees exactly the returned tokens.
    let mut streamed = Vec::new();
    model.run(std::slice::from_ref(&img), None, &opts, &mut |e| streamed.push(e.token)).unwrap();
    assert_eq!(streamed, out.tokens);
    // Sampling stops the same way: a hot distribution, and every sequence that stopped short
    // ends its text with the stop string.
    for seed in 0..6 {
        let opts = GenerateOptions {
            do_sample: true,
            seed: Some(seed),
            temperature: 0.7,
            stop_strings: vec!["'s".into()],
            ..model.default_options()
        };
        let out = model.run(std::slice::from_ref(&img), None, &opts, &mut |_| {}).unwrap().remove(0);
        if out.tokens.len() < 20 && !out.tokens.ends_with(&[202]) {
            assert!(out.text.ends_with("'s"), "seed {seed}: {:?}", out.text);
        }
    }
}

/// Stop strings are matched in bytes on a byte-level vocabulary (any character can be
/// completed), and a caller without the tokenizer is told to resolve them.
#[test]
fn stop_strings_need_the_tokenizer() {
    let model = load();
    let img = common::image("odd_257x181.png");
    let opts = GenerateOptions { stop_strings: vec!["\u{1F600}\u{1F600}".into()], ..model.default_options() };
    // Byte-level vocabularies hold every byte, so even an emoji can be completed: it runs.
    assert!(model.caption(&img, &opts).is_ok());
    // Without the tokenizer the library asks for it instead of ignoring the stop strings.
    let bare = GenerateOptions { stop_strings: vec!["x".into()], ..Default::default() };
    let tiny = model.input_ids(None).unwrap();
    let px = model.preprocess(&img).unwrap();
    let gplan = model.family.plan(1, tiny.len(), 3, false).unwrap();
    let mut exec = model.executor(&gplan.graph).unwrap();
    let opts = GenerateOptions { max_new_tokens: Some(3), ..bare };
    let e = glimpse::generate::generate(&gplan, exec.as_mut(), &[("pixels", &px.data)], &tiny, &opts, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("need the tokenizer") && e.contains("StopStrings::new"), "{e}");
}

/// Repetition penalty (above and below 1), no-repeat n-grams, min_new_tokens, together, with
/// several returned hypotheses, with a text prompt, in a batch: the hypotheses and
/// `sequences_scores` of transformers' beam search, whose processors act on log-probs.
#[test]
fn beam_search_with_processors_matches_transformers() {
    assert_eq!(check_cases("bp_", &|_| {}, 1.0), 6);
}

/// Beam sampling over several steps with the processors: reproducible by seed, different seeds
/// explore, hypotheses come back best first, and a stop string finishes a hypothesis there.
#[test]
fn beam_sampling_runs_with_processors_and_stop_strings() {
    let model = load();
    let img = model.preprocess(&common::image("tall_83x311.png")).unwrap();
    let opts = |seed: u64| GenerateOptions {
        num_beams: 3,
        num_return_sequences: 3,
        do_sample: true,
        temperature: 1.3,
        repetition_penalty: 1.2,
        no_repeat_ngram_size: 2,
        max_new_tokens: Some(10),
        seed: Some(seed),
        stop_strings: vec!["zoo".into()],
        ..model.default_options()
    };
    let run = |seed: u64| model.run(std::slice::from_ref(&img), None, &opts(seed), &mut |_| {}).unwrap().remove(0);
    let mut seen = std::collections::BTreeSet::new();
    for seed in 0..5 {
        let (a, b) = (run(seed), run(seed));
        assert_eq!(returned(&a), returned(&b), "seed {seed}: reproducible");
        let got = returned(&a);
        assert_eq!(got.len(), 3);
        let scores: Vec<f64> = got.iter().map(|(_, s)| s.unwrap()).collect();
        assert!(scores.windows(2).all(|w| w[0] >= w[1]), "best first: {scores:?}");
        for (tokens, _) in &got {
            // no 2-gram repeats within the generated tokens (the prompt has none of them)
            let grams: Vec<_> = tokens.windows(2).collect();
            let mut uniq = grams.clone();
            uniq.sort();
            uniq.dedup();
            assert_eq!(uniq.len(), grams.len(), "seed {seed}: repeated 2-gram in {tokens:?}");
            // stopped by "zoo" (686) only at its end, or ran to EOS / the length
            if let Some(p) = tokens.iter().position(|&t| t == 686) {
                assert_eq!(p + 1, tokens.len(), "seed {seed}: tokens go on after the stop string: {tokens:?}");
            }
            seen.insert(tokens.to_vec());
        }
    }
    assert!(seen.len() >= 6, "5 seeds x 3 hypotheses gave {} distinct", seen.len());
}

/// torch.multinomial without replacement: the first draw follows p, the second p_j / (1 - p_i)
/// given the first (chi-square over the ordered pairs), and draws never repeat.
#[test]
fn distinct_draws_follow_sampling_without_replacement() {
    let p = [0.4, 0.3, 0.2, 0.1];
    let scores: Vec<f64> = p.iter().map(|x: &f64| x.ln() + 3.0).collect();
    const N: u64 = 20_000;
    let mut counts = vec![0u64; 16];
    let mut rng = Rng::new(7, 0);
    for _ in 0..N {
        let d = draw_distinct(&scores, 3, &mut rng).unwrap();
        assert!(d[0] != d[1] && d[1] != d[2] && d[0] != d[2], "{d:?}");
        counts[d[0] * 4 + d[1]] += 1;
    }
    let probs: Vec<f64> =
        (0..16).map(|c| if c / 4 == c % 4 { 0.0 } else { p[c / 4] * p[c % 4] / (1.0 - p[c / 4]) }).collect();
    let (chi, df) = common::chi_square(&counts, &probs);
    assert_eq!(df, 11);
    // 11 df: the 0.999 quantile.
    assert!(chi < 31.264, "chi-square {chi:.2} with 11 df");
    // Too few positive weights is torch's error, not a panic.
    let e = draw_distinct(&[0.0, f64::NEG_INFINITY], 2, &mut rng).unwrap_err().to_string();
    assert!(e.contains("only 1 have a non-zero probability"), "{e}");
}

/// Beam sampling with 2 beams and top_k 4 for one token: the 4 tokens are drawn without
/// replacement from softmax over them, the first 2 drawn finish, and the more likely of those is
/// returned; its frequency over seeds matches that law (chi-square), and the tokens are the
/// 4 best of beam search.
#[test]
fn beam_sampling_follows_its_distribution() {
    let model = load();
    let img = model.preprocess(&common::image("odd_257x181.png")).unwrap();
    let base = GenerateOptions { max_new_tokens: Some(1), ..model.default_options() };
    // The 4 best first tokens and their log-probs (beam search returns them all at length 1).
    let top = GenerateOptions { num_beams: 4, num_return_sequences: 4, ..base.clone() };
    let out = model.run(std::slice::from_ref(&img), None, &top, &mut |_| {}).unwrap().remove(0);
    let best: Vec<(u32, f64)> = returned(&out).iter().map(|(t, s)| (t[0], s.unwrap())).collect();
    let z: f64 = best.iter().map(|(_, l)| l.exp()).sum();
    let q: Vec<f64> = best.iter().map(|(_, l)| l.exp() / z).collect();
    // P(token i is the better of the first two drawn): q is sorted descending.
    let law: Vec<f64> =
        (0..4).map(|i| (i + 1..4).map(|j| q[i] * q[j] / (1.0 - q[i]) + q[j] * q[i] / (1.0 - q[j])).sum()).collect();
    assert!((law.iter().sum::<f64>() - 1.0).abs() < 1e-9);
    const N: u64 = 300;
    let mut counts = [0u64; 4];
    for seed in 0..N {
        let opts = GenerateOptions { num_beams: 2, do_sample: true, top_k: 4, seed: Some(seed), ..base.clone() };
        let out = model.run(std::slice::from_ref(&img), None, &opts, &mut |_| {}).unwrap().remove(0);
        let i = best.iter().position(|(t, _)| *t == out.tokens[0]).expect("a token of the top 4");
        counts[i] += 1;
        // Its score is its processed log-prob: top-k masks the others without renormalizing, so
        // it is the raw log-softmax value beam search gave it.
        assert!((out.score.unwrap() - best[i].1).abs() < 1e-5, "seed {seed}: {:?} vs {}", out.score, best[i].1);
    }
    // Merge categories too small for the chi-square approximation into their neighbour.
    let (mut c, mut p) = (counts.to_vec(), law.clone());
    while p.last().is_some_and(|&x| x * (N as f64) < 5.0) {
        let (lc, lp) = (c.pop().unwrap(), p.pop().unwrap());
        *c.last_mut().unwrap() += lc;
        *p.last_mut().unwrap() += lp;
    }
    let (chi, df) = common::chi_square(&c, &p);
    assert!(chi < common::critical_0_001(df), "counts {counts:?} vs law {law:?}: chi-square {chi:.2}, {df} df");
}

/// Several sampled sequences per input (`num_return_sequences` with `do_sample`): the input is
/// expanded, each row draws its own stream (row 0 is the one-sequence run of the same seed),
/// and every row's first token follows the model's distribution.
#[test]
fn several_sampled_sequences_per_input() {
    let model = load();
    let img = model.preprocess(&common::image("odd_257x181.png")).unwrap();
    let hot = GenerateOptions { do_sample: true, temperature: 1.5, top_k: 0, ..model.default_options() };
    let mut distinct = 0;
    for seed in 0..4 {
        let one = GenerateOptions { seed: Some(seed), ..hot.clone() };
        let three = GenerateOptions { num_return_sequences: 3, ..one.clone() };
        let outs = model.run(&[img.clone(), img.clone()], None, &three, &mut |_| {}).unwrap();
        assert_eq!(outs.len(), 2, "one output per image");
        let single = model.run(std::slice::from_ref(&img), None, &one, &mut |_| {}).unwrap().remove(0);
        assert_eq!(outs[0].tokens, single.tokens, "seed {seed}: row 0 draws stream 0");
        assert_eq!(outs[0].alternatives.len(), 2);
        let mut all: Vec<&[u32]> = returned(&outs[0]).iter().map(|(t, _)| *t).collect();
        all.extend(returned(&outs[1]).iter().map(|(t, _)| *t));
        all.sort();
        all.dedup();
        distinct += all.len();
    }
    assert!(distinct >= 4 * 5, "6 hot sequences per seed gave only {distinct} distinct in 4 seeds");

    // First tokens over seeds x rows against their probabilities (each drawn token's log-prob
    // is recorded; the tokens never drawn form one category with the remaining mass).
    const SEEDS: u64 = 150;
    let plain = GenerateOptions { temperature: 1.0, max_new_tokens: Some(1), num_return_sequences: 4, ..hot };
    let mut seen: std::collections::BTreeMap<u32, (u64, f64)> = Default::default();
    for seed in 0..SEEDS {
        let opts = GenerateOptions { seed: Some(seed), ..plain.clone() };
        let out = model.run(std::slice::from_ref(&img), None, &opts, &mut |_| {}).unwrap().remove(0);
        for s in std::iter::once(&out.tokens).chain(out.alternatives.iter().map(|a| &a.tokens)) {
            let e = seen.entry(s[0]).or_insert((0, 0.0));
            e.0 += 1;
        }
        // Alternatives carry no log-probs: the first sequence's token gets its probability.
        if let Some(e) = seen.get_mut(&out.tokens[0]) {
            e.1 = out.logprobs[0].exp();
        }
    }
    let n = (SEEDS * 4) as f64;
    let (mut counts, mut probs, mut rest_c, mut rest_p) = (Vec::new(), Vec::new(), 0u64, 1.0);
    for (_, &(c, p)) in seen.iter() {
        if p * n >= 5.0 {
            counts.push(c);
            probs.push(p);
            rest_p -= p;
        } else {
            rest_c += c;
        }
    }
    counts.push(rest_c);
    probs.push(rest_p.max(0.0));
    if rest_p * n < 5.0 {
        let (c, p) = (counts.pop().unwrap(), probs.pop().unwrap());
        *counts.last_mut().unwrap() += c;
        *probs.last_mut().unwrap() += p;
    }
    assert!(counts.len() >= 3, "too few categories: {seen:?}");
    let (chi, df) = common::chi_square(&counts, &probs);
    assert!(chi < common::critical_0_001(df), "{counts:?} vs {probs:?}: chi-square {chi:.2}, {df} df");
}

fn cli(args: &[&str]) -> std::process::Output {
    let model = common::model_dir("blip2-opt-tiny");
    let mut all = vec![args[0], "--model", model.to_str().unwrap(), "--device", "cpu"];
    all.extend_from_slice(&args[1..]);
    std::process::Command::new(env!("CARGO_BIN_EXE_glimpse")).args(&all).output().expect("run glimpse")
}

/// `--stop` (repeatable) stops where the golden stops; `--num-return-sequences` with
/// `--do-sample` lists every sample under `sequences`.
#[test]
fn cli_stop_and_sampled_sequences() {
    let img = common::image("odd_257x181.png");
    let img = img.to_str().unwrap();
    let out = cli(&["caption", img, "--stop", "xyz", "--stop", "epinge", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(common::ids(&v["tokens"]), vec![14, 700, 141, 8, 686, 532, 532], "as stop_across_two");
    let out = cli(&["caption", img, "--do-sample", "--seed", "3", "--num-return-sequences", "3", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let seqs = v["sequences"].as_array().unwrap();
    assert_eq!(seqs.len(), 3);
    assert_eq!(seqs[0]["tokens"], v["tokens"]);
    assert!(seqs.iter().all(|s| s["score"].is_null()), "samples have no beam score");
}

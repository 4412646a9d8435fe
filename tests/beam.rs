//! Beam search on the CPU executor against transformers 5.17 `generate(num_beams=...)` on the
//! tiny BLIP-2 fixture (goldens: scripts/fixtures_beam.py), plus the generation options' checks.

mod common;

use glimpse::generate::{expand_for_beams, EarlyStopping};
use glimpse::{Device, GenerateOptions, Model};
use serde_json::Value;

/// Per-token log-prob tolerance, as tests/blip2_parity.rs (CPU f32 logits vs torch fp32 logits
/// of the same fp16 weights; measured ~1e-5). A score is `sum(logprobs) / len ^ lp`, so its
/// unpenalized sum may drift by up to `len` times that; transformers also sums in f32 (~1e-6).
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
    if let Some(lp) = o.get("length_penalty") {
        opts.length_penalty = lp.as_f64().unwrap();
    }
    if let Some(es) = o.get("early_stopping") {
        opts.early_stopping = match es {
            Value::Bool(b) => b.to_string().parse().unwrap(),
            Value::String(s) => s.parse().unwrap(),
            other => panic!("early_stopping {other}"),
        };
    }
    if let Some(n) = o.get("num_return_sequences") {
        opts.num_return_sequences = n.as_u64().unwrap() as usize;
    }
    if let Some(n) = o.get("min_new_tokens") {
        opts.min_new_tokens = n.as_u64().unwrap() as usize;
    }
    opts
}

/// Every golden case: the same tokens for every returned hypothesis, in order, and the same
/// `sequences_scores`.
#[test]
fn beam_search_matches_transformers() {
    let model = load();
    let g = common::golden_json("beam_cases.json");
    let cases = g["cases"].as_array().unwrap();
    assert!(cases.len() >= 15);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let opts = options(&model, &case["options"]);
        let images: Vec<_> = case["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| model.preprocess(&common::image(p.as_str().unwrap())).unwrap())
            .collect();
        let outs = model.run(&images, case["prompt"].as_str(), &opts, &mut |_| {}).unwrap();
        assert_eq!(outs.len(), images.len(), "{name}: one output per image");
        let want_seqs: Vec<Vec<u32>> = case["sequences"].as_array().unwrap().iter().map(common::ids).collect();
        let want_scores = case["scores"].as_array().map(|s| s.iter().map(|x| x.as_f64().unwrap()).collect::<Vec<_>>());
        let per = opts.num_return_sequences;
        for (i, out) in outs.iter().enumerate() {
            let got: Vec<(&[u32], Option<f64>)> = std::iter::once((&out.tokens[..], out.score))
                .chain(out.alternatives.iter().map(|a| (&a.tokens[..], a.score)))
                .collect();
            assert_eq!(got.len(), per, "{name} image {i}: returned hypotheses");
            for (r, (tokens, score)) in got.into_iter().enumerate() {
                let at = i * per + r;
                assert_eq!(tokens, &want_seqs[at][..], "{name} image {i} hypothesis {r}: tokens");
                match &want_scores {
                    None => assert!(score.is_none(), "{name}: greedy has no score"),
                    Some(w) => {
                        let (got, want) = (score.unwrap(), w[at]);
                        let scale = (tokens.len() as f64).powf(opts.length_penalty);
                        let tol = LOGPROB_ABS * tokens.len() as f64 / scale;
                        assert!((got - want).abs() <= tol, "{name} image {i} hypothesis {r}: score {got} vs {want}");
                    }
                }
            }
        }
    }
}

/// The hypotheses' log-probs are the model's per-token log-probs, and the score is their sum
/// over the length penalty; on_token reports the best hypothesis once the search ends.
#[test]
fn beam_score_is_penalized_sum_and_tokens_are_reported() {
    let model = load();
    let px = model.preprocess(&common::image("tiny_13x9.png")).unwrap();
    let opts = GenerateOptions {
        num_beams: 3,
        max_new_tokens: Some(8),
        length_penalty: 2.0,
        eos_token_ids: vec![773],
        ..model.default_options()
    };
    let mut seen = Vec::new();
    let out = model.run(&[px], None, &opts, &mut |ev| seen.push((ev.sequence, ev.step, ev.token))).unwrap().remove(0);
    let sum: f64 = out.logprobs.iter().sum();
    let want = sum / (out.tokens.len() as f64).powf(2.0);
    assert!((out.score.unwrap() - want).abs() < 1e-9, "{:?} vs {want}", out.score);
    assert!(out.logprobs.iter().all(|&l| l < 0.0));
    let streamed: Vec<u32> = seen.iter().map(|s| s.2).collect();
    assert_eq!(streamed, out.tokens);
    assert!(seen.iter().enumerate().all(|(i, s)| s.0 == 0 && s.1 == i));
}

/// min_new_tokens on the greedy path: EOS cannot come before it (the golden case of the beam
/// path is in beam_cases.json); the first token after it may be EOS again.
#[test]
fn greedy_min_new_tokens_masks_eos() {
    let model = load();
    let image = common::image("tall_83x311.png");
    let base = GenerateOptions { max_new_tokens: Some(10), eos_token_ids: vec![382], ..model.default_options() };
    let free = model.caption(&image, &base).unwrap();
    assert_eq!(free.tokens, [382], "the fixture's first greedy token is 382");
    let held = model.caption(&image, &GenerateOptions { min_new_tokens: 3, ..base.clone() }).unwrap();
    assert!(held.tokens.len() > 3 && !held.tokens[..3].contains(&382), "{:?}", held.tokens);
}

#[test]
fn options_follow_transformers_validation() {
    let ok = GenerateOptions::default();
    assert_eq!((ok.num_beams, ok.top_k, ok.length_penalty, ok.early_stopping), (1, 50, 1.0, EarlyStopping::Heuristic));
    ok.validate().unwrap();
    let err = |o: GenerateOptions| o.validate().unwrap_err().to_string();
    let e = err(GenerateOptions { num_beams: 3, num_return_sequences: 4, ..ok.clone() });
    assert!(e.contains("num_return_sequences (4) has to be smaller or equal to num_beams (3)"), "{e}");
    let e = err(GenerateOptions { num_return_sequences: 2, ..ok.clone() });
    assert!(e.contains("greedy decoding returns one sequence"), "{e}");
    assert!(err(GenerateOptions { num_beams: 0, ..ok.clone() }).contains("num_beams is 0"));
    assert!(err(GenerateOptions { repetition_penalty: -1.0, ..ok.clone() }).contains("strictly positive"));
    let e = err(GenerateOptions { do_sample: true, temperature: 0.0, ..ok.clone() });
    assert!(e.contains("temperature"), "{e}");
    // transformers only warns about these: accepted and ignored.
    GenerateOptions { early_stopping: EarlyStopping::Done, length_penalty: 2.0, ..ok.clone() }.validate().unwrap();
    GenerateOptions { temperature: 0.0, top_p: 0.5, ..ok.clone() }.validate().unwrap();
    GenerateOptions { do_sample: true, num_return_sequences: 3, ..ok.clone() }.validate().unwrap();

    assert_eq!("never".parse::<EarlyStopping>().unwrap(), EarlyStopping::Never);
    assert_eq!("true".parse::<EarlyStopping>().unwrap(), EarlyStopping::Done);
    assert_eq!("false".parse::<EarlyStopping>().unwrap(), EarlyStopping::Heuristic);
    let e = "sometimes".parse::<EarlyStopping>().unwrap_err().to_string();
    assert!(e.contains("`sometimes`") && e.contains("never"), "{e}");
}

/// Every option runs now: beam sampling, the processors with beams, stop strings, several
/// sampled sequences (each checked against transformers or its distribution in tests/genrest.rs),
/// so `GenerateOptions::check_available` accepts them all.
#[test]
fn every_generation_option_runs() {
    let model = load();
    let image = common::image("tiny_13x9.png");
    let beams = GenerateOptions { num_beams: 2, max_new_tokens: Some(4), ..model.default_options() };
    for opts in [
        GenerateOptions { do_sample: true, seed: Some(1), ..beams.clone() },
        GenerateOptions { repetition_penalty: 1.2, ..beams.clone() },
        GenerateOptions { no_repeat_ngram_size: 2, ..beams.clone() },
        GenerateOptions { stop_strings: vec!["dog".into()], ..model.default_options() },
        GenerateOptions { do_sample: true, num_return_sequences: 2, seed: Some(1), ..model.default_options() },
        GenerateOptions { do_sample: true, seed: Some(1), ..model.default_options() },
        GenerateOptions { repetition_penalty: 1.2, no_repeat_ngram_size: 2, ..model.default_options() },
    ] {
        assert!(opts.check_available().is_ok());
        let out = model.caption(&image, &opts).unwrap();
        assert_eq!(out.alternatives.len(), opts.num_return_sequences - 1, "{opts:?}");
    }
}

#[test]
fn checkpoint_defaults_are_transformers_defaults() {
    let opts = load().default_options();
    assert_eq!(opts, GenerateOptions { eos_token_ids: vec![202], ..GenerateOptions::default() });
}

#[test]
fn inputs_repeat_per_beam() {
    let opts = GenerateOptions { num_beams: 3, ..GenerateOptions::default() };
    assert_eq!(
        expand_for_beams(&[1.0, 2.0, 3.0, 4.0], 2, &opts),
        [1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 3.0, 4.0, 3.0, 4.0, 3.0, 4.0]
    );
    assert_eq!(expand_for_beams(&[1.0, 2.0], 1, &GenerateOptions::default()), [1.0, 2.0]);
}

/// A plan whose batch is not images x beams is refused with the fix.
#[test]
fn beam_plan_must_hold_every_beam() {
    let model = load();
    let ids = model.input_ids(None).unwrap();
    let px = model.preprocess(&common::image("tiny_13x9.png")).unwrap();
    let plan = model.family.plan(1, ids.len(), 4, false).unwrap();
    let mut exec = model.executor(&plan.graph).unwrap();
    let opts = GenerateOptions { num_beams: 2, max_new_tokens: Some(4), ..model.default_options() };
    let e = glimpse::generate::generate(&plan, exec.as_mut(), &[("pixels", &px.data)], &ids, &opts, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("images x num_beams"), "{e}");
}

/// The stream never releases half a character (U+FFFD of an incomplete byte sequence), releases
/// CJK characters as soon as they are complete, and adds up to the final stripped text.
#[test]
fn streamer_never_splits_a_character() {
    let model = load();
    let tok = &model.tokenizer;
    let ids = tok.encode("a 漢字 ü b").unwrap();
    let partial = tok.decode(&ids[..ids.len() - 5], true).unwrap();
    assert!(partial.ends_with('\u{FFFD}'), "the fixture splits 漢 over byte tokens: {partial:?}");
    let mut streamer = glimpse::generate::stream::TextStreamer::new(tok);
    let chunks: Vec<String> = ids.iter().map(|&t| streamer.put(t).unwrap()).collect();
    assert!(chunks.iter().all(|c| !c.contains('\u{FFFD}')), "{chunks:?}");
    assert!(chunks.iter().any(|c| c.ends_with('漢')), "CJK is released at once: {chunks:?}");
    let text = chunks.concat() + &streamer.end().unwrap();
    assert_eq!(text, tok.decode_text(&ids).unwrap());
}

/// Streaming the greedy goldens gives each case's text.
#[test]
fn streamed_text_equals_the_final_text() {
    let model = load();
    let g = common::golden_json("blip2-opt-tiny.json");
    for case in g["cases"].as_array().unwrap() {
        let ids = common::ids(&case["generated_ids"]);
        let mut streamer = glimpse::generate::stream::TextStreamer::new(&model.tokenizer);
        let mut text: String = ids.iter().map(|&t| streamer.put(t).unwrap()).collect();
        text += &streamer.end().unwrap();
        assert_eq!(text, case["text"].as_str().unwrap(), "{}", case["name"]);
    }
}

fn cli(args: &[&str]) -> std::process::Output {
    let model = common::model_dir("blip2-opt-tiny");
    let mut all = vec![args[0], "--model", model.to_str().unwrap(), "--device", "cpu"];
    all.extend_from_slice(&args[1..]);
    std::process::Command::new(env!("CARGO_BIN_EXE_glimpse")).args(&all).output().expect("run glimpse")
}

/// --json with beams carries the best hypothesis's tokens and score, and every returned
/// hypothesis under `sequences`; plain output is the best text.
#[test]
fn cli_beam_flags_and_json() {
    let image = common::image("wide_301x97.png");
    let img = image.to_str().unwrap();
    let g = common::golden_json("beam_cases.json");
    let args = ["caption", img, "--num-beams", "5", "--max-new-tokens", "12", "--num-return-sequences", "3", "--json"];
    let out = cli(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let seqs = v["sequences"].as_array().unwrap();
    assert_eq!(seqs.len(), 3);
    assert_eq!(seqs[0]["tokens"], v["tokens"]);
    assert_eq!(seqs[0]["score"], v["score"]);
    assert!(seqs.windows(2).all(|w| w[0]["score"].as_f64() >= w[1]["score"].as_f64()));

    let g5 = g["cases"].as_array().unwrap().iter().find(|c| c["name"] == "b5").unwrap();
    let out = cli(&["caption", img, "--num-beams", "5", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(common::ids(&v["tokens"]), common::ids(&g5["sequences"][0]));
    assert!((v["score"].as_f64().unwrap() - g5["scores"][0].as_f64().unwrap()).abs() < 1e-3);
    assert!(v.get("sequences").is_none(), "one hypothesis: no sequences list");
}

#[test]
fn cli_stream_prints_the_caption() {
    let img = common::image("odd_257x181.png");
    let img = img.to_str().unwrap();
    let plain = cli(&["caption", img]);
    let streamed = cli(&["caption", img, "--stream"]);
    assert!(streamed.status.success(), "{}", String::from_utf8_lossy(&streamed.stderr));
    assert_eq!(streamed.stdout, plain.stdout);
    let two = cli(&["caption", img, img, "--stream"]);
    let plain_two = cli(&["caption", img, img]);
    assert_eq!(two.stdout, plain_two.stdout);
}

#[test]
fn cli_refuses_bad_combinations_clearly() {
    let img = common::image("odd_257x181.png");
    let img = img.to_str().unwrap();
    for (args, want) in [
        (vec!["caption", img, "--stream", "--json"], "cannot be combined with --json"),
        (vec!["caption", img, "--stream", "--num-beams", "2"], "--stream with --num-beams 2"),
        (vec!["caption", img, "--num-return-sequences", "2"], "greedy decoding returns one sequence"),
        (vec!["caption", img, "--num-beams", "2", "--num-return-sequences", "3"], "smaller or equal to num_beams"),
        (vec!["caption", img, "--early-stopping", "maybe"], "`maybe`"),
        (
            vec!["caption", img, "--do-sample", "--num-return-sequences", "2", "--stream"],
            "--stream with --num-return-sequences 2",
        ),
    ] {
        let out = cli(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    // Seeded sampling from the command line is reproducible.
    let sample = ["caption", img, "--do-sample", "--seed", "5", "--temperature", "1.5", "--top-p", "0.9", "--json"];
    let (a, b) = (cli(&sample), cli(&sample));
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    let tokens = |o: &std::process::Output| {
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["tokens"].clone()
    };
    assert_eq!(tokens(&a), tokens(&b));
    // transformers only warns about beam flags with one beam: accepted.
    let out = cli(&["caption", img, "--early-stopping", "true", "--length-penalty", "-0.5", "--max-new-tokens", "2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

//! glimpse's logits processors against transformers 5.17's (tests/fixtures/goldens/processors.json,
//! written by scripts/fixtures_processors.py): the same processor list, in generate's order, for
//! the same settings, and the same processed fp32 row.
//!
//! Tolerance: -inf, +inf and NaN positions must match exactly (a filtered token is a decision,
//! not a rounding). From raw logits (greedy / sampling entry) finite values must be bit-equal:
//! every processor is elementwise fp32 arithmetic glimpse reproduces exactly (penalty products,
//! temperature quotients) or masking. From log-probs (beam-search entry) they must be within 2
//! fp32 ulps of the row's scale (the largest finite magnitude of the input and expected rows):
//! the log-softmax is computed in f64 here and in vectorised fp32 by torch, which differ by about
//! one rounding of the log-sum-exp (measured: at most 0.3 ulp). Top-p and min-p decide from
//! softmax values; the generator keeps every cut at least 1e-5 (relative) away from a
//! probability, so those roundings cannot move a decision.

use std::path::Path;

use glimpse::generate::processors::{LogitsProcessorList, Processor, ProcessorSettings};
use serde_json::Value;

mod common;

fn f32_of(v: &Value) -> f32 {
    match v {
        Value::String(s) => match s.as_str() {
            "inf" => f32::INFINITY,
            "-inf" => f32::NEG_INFINITY,
            "nan" => f32::NAN,
            other => panic!("unknown float {other}"),
        },
        // Shortest decimals of fp32 values: through f64 then f32 is exact (the generator checks).
        v => v.as_f64().unwrap() as f32,
    }
}

fn row(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(f32_of).collect()
}

fn settings(v: &Value) -> ProcessorSettings {
    let u = |k: &str| v[k].as_u64().unwrap() as usize;
    let f = |k: &str| v[k].as_f64().unwrap();
    ProcessorSettings {
        do_sample: v["do_sample"].as_bool().unwrap(),
        num_beams: u("num_beams"),
        temperature: f("temperature"),
        top_k: u("top_k"),
        top_p: f("top_p"),
        min_p: v["min_p"].as_f64(),
        repetition_penalty: f("repetition_penalty"),
        no_repeat_ngram_size: u("no_repeat_ngram_size"),
        min_length: u("min_length"),
        min_new_tokens: v["min_new_tokens"].as_u64().map(|m| m as usize),
        remove_invalid_values: v["remove_invalid_values"].as_bool().unwrap(),
        eos_token_ids: v["eos_token_ids"].as_array().unwrap().iter().map(|e| e.as_u64().unwrap() as u32).collect(),
    }
}

fn goldens() -> Value {
    let path = common::fixtures().join("goldens/processors.json");
    serde_json::from_slice(&std::fs::read(Path::new(&path)).unwrap()).unwrap()
}

/// Every golden case: processor names and order, then the processed row.
#[test]
fn processors_match_transformers() {
    let g = goldens();
    let rows: Vec<Vec<f32>> = g["rows"].as_array().unwrap().iter().map(row).collect();
    let cases = g["cases"].as_array().unwrap();
    assert!(cases.len() >= 50, "{} cases", cases.len());
    let mut worst = 0f64;
    let mut filtered = 0;
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let history: Vec<u32> =
            case["history"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
        let prompt_len = case["prompt_len"].as_u64().unwrap() as usize;
        let list = LogitsProcessorList::new(&settings(&case["settings"]), prompt_len).unwrap();
        let names: Vec<&str> = list.processors().iter().map(Processor::name).collect();
        let want_names: Vec<&str> =
            case["processors"].as_array().unwrap().iter().map(|n| n.as_str().unwrap()).collect();
        assert_eq!(names, want_names, "{name}: processor list");

        let input = &rows[case["row"].as_u64().unwrap() as usize];
        let mut got = input.clone();
        match case["entry"].as_str().unwrap() {
            "logits" => list.process_logits(&history, &mut got).unwrap(),
            "log_probs" => list.process_log_probs(&history, &mut got).unwrap(),
            e => panic!("{name}: unknown entry {e}"),
        }
        let want = row(&case["expected"]);
        assert_eq!(got.len(), want.len(), "{name}");
        let scale = input.iter().chain(&want).filter(|v| v.is_finite()).fold(1f32, |m, v| m.max(v.abs()));
        let tol = if case["entry"] == "logits" { 0.0 } else { 2.0 * f32::EPSILON as f64 * scale as f64 };
        for (i, (&a, &b)) in got.iter().zip(&want).enumerate() {
            if !b.is_finite() {
                assert!(a == b || (a.is_nan() && b.is_nan()), "{name}: token {i}: got {a}, transformers {b}");
                filtered += usize::from(b == f32::NEG_INFINITY);
                continue;
            }
            let d = (a as f64 - b as f64).abs();
            assert!(d <= tol, "{name}: token {i}: got {a}, transformers {b} (|diff| {d:e} > {tol:e})");
            worst = worst.max(d / scale as f64);
        }
    }
    // The cases do filter: top-k/p, min-p, n-grams and min-length put thousands of ids at -inf.
    assert!(filtered > 3000, "{filtered} filtered ids");
    eprintln!("worst finite difference: {worst:e} of the row scale");
}

/// Settings transformers' constructors reject are refused with the value and the fix; the ones
/// it ignores (warpers without sampling) are ignored.
#[test]
fn invalid_settings_are_named() {
    let sample = ProcessorSettings { do_sample: true, ..Default::default() };
    for (s, needle) in [
        (ProcessorSettings { temperature: 0.0, ..sample.clone() }, "temperature 0"),
        (ProcessorSettings { temperature: -1.0, ..sample.clone() }, "temperature -1"),
        (ProcessorSettings { top_p: -0.5, ..sample.clone() }, "top_p -0.5"),
        (ProcessorSettings { min_p: Some(1.5), ..sample.clone() }, "min_p 1.5"),
        (ProcessorSettings { repetition_penalty: 0.0, ..Default::default() }, "repetition_penalty 0"),
    ] {
        let err = LogitsProcessorList::new(&s, 3).unwrap_err().to_string();
        assert!(err.contains(needle), "{err}");
    }
    // Greedy ignores the warpers, even invalid ones (transformers only builds them with do_sample).
    let greedy = ProcessorSettings { temperature: 0.0, top_p: -1.0, min_p: Some(7.0), ..Default::default() };
    assert!(LogitsProcessorList::new(&greedy, 3).unwrap().is_empty());
    // A history id outside the row is an error naming it, not a panic.
    let list =
        LogitsProcessorList::new(&ProcessorSettings { repetition_penalty: 1.2, ..Default::default() }, 1).unwrap();
    let err = list.process_logits(&[1, 99], &mut [0.0; 10]).unwrap_err().to_string();
    assert!(err.contains("token id 99") && err.contains("10-token"), "{err}");
}

/// BLIP-2's history is its whole decoder input: the image placeholder ids and BOS are penalised
/// like generated tokens (transformers passes `input_ids` with `inputs_embeds`), and OPT's BOS is
/// its EOS, so a repetition penalty also lowers EOS. min_new_tokens counts from the end of that
/// input (image placeholders included).
#[test]
fn blip2_history_includes_image_placeholders() {
    let model = glimpse::Model::load(common::model_dir("blip2-opt-tiny"), glimpse::Device::Cpu).unwrap();
    let ids = model.input_ids(None).unwrap();
    let image_token = ids[0];
    assert!(ids.len() > 2 && ids[..ids.len() - 1].iter().all(|&t| t == image_token));
    let bos = *ids.last().unwrap();
    let settings = ProcessorSettings {
        repetition_penalty: 2.0,
        min_new_tokens: Some(2),
        eos_token_ids: vec![bos],
        ..Default::default()
    };
    let list = LogitsProcessorList::new(&settings, ids.len()).unwrap();
    let vocab = image_token as usize + 5;
    let mut scores = vec![1.0f32; vocab];
    let mut history = ids.clone();
    list.process_logits(&history, &mut scores).unwrap();
    assert_eq!(scores[image_token as usize], 0.5);
    assert_eq!(scores[bos as usize], f32::NEG_INFINITY);
    // After two new tokens EOS is allowed again, still penalised as a prompt token.
    history.extend([7, 8]);
    let mut scores = vec![-1.0f32; vocab];
    list.process_logits(&history, &mut scores).unwrap();
    assert_eq!((scores[bos as usize], scores[7], scores[9]), (-2.0, -2.0, -1.0));
}

//! BLIP-2 on the CPU executor against transformers 5.17 (fp32 math on the same fp16-rounded
//! weights; goldens from scripts/make_fixtures.py): every stage, then greedy generation.

mod common;

use std::sync::Arc;

use glimpse::backend::cpu::CpuExecutor;
use glimpse::{Device, GenerateOptions, Model};

/// Stage tolerances, relative (||a - b|| / ||b||) and absolute. Both sides compute in f32 from
/// the same fp16 weights but sum in different orders (the `gemm` crate vs MKL/oneDNN), so each
/// element carries ~sqrt(K) * 2^-24 relative noise, which the layers compound mildly: measured
/// errors are ~1e-7..1e-6 relative. The bounds leave ~10x headroom while staying far below any
/// real bug (a wrong bias, scale or mask moves outputs by 1e-2 or more).
const STAGE_REL: f64 = 1e-5;
const STAGE_ABS: f64 = 1e-4;
/// Log-probabilities of the generated tokens (the bar; measured ~1e-5).
const LOGPROB_ABS: f64 = 1e-4;

struct Case {
    name: String,
    image: String,
    prompt: Option<String>,
    generated: Vec<u32>,
    logprobs: Vec<f64>,
    text: String,
}

fn cases(model: &str) -> Vec<Case> {
    let g = common::golden_json(&format!("{model}.json"));
    g["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            name: c["name"].as_str().unwrap().into(),
            image: c["image"].as_str().unwrap().into(),
            prompt: c["prompt"].as_str().map(String::from),
            generated: common::ids(&c["generated_ids"]),
            logprobs: common::floats(&c["logprobs"]),
            text: c["text"].as_str().unwrap().into(),
        })
        .collect()
}

fn load(model: &str) -> Model {
    Model::load(common::model_dir(model), Device::Cpu).expect("fixture model loads")
}

/// Vision, Q-Former, projection and full prefill logits of every case.
fn check_stages(model_name: &str) {
    let model = load(model_name);
    let errors = common::stage_errors(&model, model_name, |g| {
        Box::new(CpuExecutor::new(Arc::clone(model.family.weights()), &g.buffers))
    });
    assert!(!errors.is_empty());
    for (case, stage, max, rel) in errors {
        assert!(rel <= STAGE_REL && max <= STAGE_ABS, "{case}: {stage}: rel {rel:e} max abs {max:e}");
    }
}

/// Greedy tokens identical, log-probs within LOGPROB_ABS, same text.
fn check_generation(model: &Model, model_name: &str) {
    for case in cases(model_name) {
        let out = match &case.prompt {
            None => model.caption(&common::image(&case.image), &model.default_options()).unwrap(),
            Some(p) => {
                let px = model.preprocess(&common::image(&case.image)).unwrap();
                model.run(&[px], Some(p), &model.default_options(), &mut |_| {}).unwrap().remove(0)
            }
        };
        assert_eq!(out.tokens, case.generated, "{}: greedy tokens", case.name);
        for (i, (got, want)) in out.logprobs.iter().zip(&case.logprobs).enumerate() {
            assert!((got - want).abs() <= LOGPROB_ABS, "{} step {i}: logprob {got} vs {want}", case.name);
        }
        assert_eq!(out.text, case.text, "{}: text", case.name);
    }
}

#[test]
fn tiny_stages_match_transformers() {
    check_stages("blip2-opt-tiny");
}

#[test]
fn tiny_generation_matches_transformers() {
    let model = load("blip2-opt-tiny");
    let opts = model.default_options();
    assert_eq!((opts.max_new_tokens, opts.eos_token_ids.clone()), (None, vec![202]));
    check_generation(&model, "blip2-opt-tiny");
}

/// fp32 sharded checkpoint, project_in/out, untied lm_head, cross-attention every layer,
/// 8 queries (and transformers' flat masked_scatter when the projection width differs).
#[test]
fn proj_variant_matches_transformers() {
    check_stages("blip2-opt-tiny-proj");
    check_generation(&load("blip2-opt-tiny-proj"), "blip2-opt-tiny-proj");
}

#[test]
fn question_uses_blip2_template() {
    let model = load("blip2-opt-tiny");
    let case = cases("blip2-opt-tiny").into_iter().find(|c| c.prompt.is_some()).unwrap();
    let q = case.prompt.as_deref().unwrap().strip_prefix("Question: ").unwrap().strip_suffix(" Answer:").unwrap();
    let out = model.ask(&common::image(&case.image), q, &model.default_options()).unwrap();
    assert_eq!(out.tokens, case.generated);
}

#[test]
fn streaming_sees_every_token_in_order() {
    let model = load("blip2-opt-tiny");
    let case = &cases("blip2-opt-tiny")[0];
    let px = model.preprocess(&common::image(&case.image)).unwrap();
    let mut seen = Vec::new();
    let out = model.run(&[px], None, &model.default_options(), &mut |ev| seen.push((ev.step, ev.token))).unwrap();
    let tokens: Vec<u32> = seen.iter().map(|s| s.1).collect();
    assert_eq!(tokens, out[0].tokens);
    assert!(seen.iter().enumerate().all(|(i, s)| s.0 == i));
}

#[test]
fn batch_equals_one_by_one() {
    let model = load("blip2-opt-tiny");
    let all = cases("blip2-opt-tiny");
    let captions: Vec<&Case> = all.iter().filter(|c| c.prompt.is_none()).take(3).collect();
    let pixels: Vec<_> = captions.iter().map(|c| model.preprocess(&common::image(&c.image)).unwrap()).collect();
    let outs = model.run(&pixels, None, &model.default_options(), &mut |_| {}).unwrap();
    for (out, case) in outs.iter().zip(&captions) {
        assert_eq!(out.tokens, case.generated, "{} in a batch of 3", case.name);
    }
}

#[test]
fn threads_share_one_model() {
    let model = Arc::new(load("blip2-opt-tiny"));
    let all = cases("blip2-opt-tiny");
    let single: Vec<Vec<u32>> =
        all.iter().map(|c| model.caption(&common::image(&c.image), &model.default_options()).unwrap().tokens).collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let (model, all) = (Arc::clone(&model), &all);
                s.spawn(move || {
                    all.iter()
                        .skip(t)
                        .step_by(2)
                        .map(|c| {
                            (
                                c.name.clone(),
                                model.caption(&common::image(&c.image), &model.default_options()).unwrap().tokens,
                            )
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for h in handles {
            for (name, tokens) in h.join().unwrap() {
                let i = all.iter().position(|c| c.name == name).unwrap();
                assert_eq!(tokens, single[i], "{name} from a thread");
            }
        }
    });
}

#[test]
fn prompt_past_the_positions_is_an_error() {
    let model = load("blip2-opt-tiny");
    let opts = GenerateOptions { max_new_tokens: Some(200), ..model.default_options() };
    let err = model.caption(&common::image("wide_301x97.png"), &opts).unwrap_err().to_string();
    assert!(err.contains("exceeds the model's 128 positions"), "{err}");
    let long = "word ".repeat(200);
    let err = model.ask(&common::image("wide_301x97.png"), &long, &model.default_options()).unwrap_err().to_string();
    assert!(err.contains("positions"), "{err}");
}

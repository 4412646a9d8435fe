//! What fp16 activations cost, measured on the CPU: the reference executor with every buffer
//! rounded to fp16 after each op (`CpuExecutor::emulate_fp16`, what the CUDA executor stores)
//! against the transformers fp32 goldens. This checks, before any GPU run, that the tolerances
//! of tests/gpu_model.rs are met by a correct fp16 implementation, and measures whether keeping
//! the Q-Former in fp32 (as transformers does) would matter.

mod common;

use std::sync::Arc;

use glimpse::backend::cpu::CpuExecutor;
use glimpse::{Device, Model};

use common::{GPU_LOGPROB_ABS as LOGPROB_ABS, GPU_MARGIN as MARGIN, GPU_STAGE_REL as STAGE_REL};

fn executor(model: &Model, graph: &glimpse::graph::Graph, keep_qformer_f32: bool) -> CpuExecutor {
    let mut exec = CpuExecutor::new(Arc::clone(model.family.weights()), &graph.buffers);
    exec.emulate_fp16(|name| keep_qformer_f32 && name.starts_with("qformer."));
    exec
}

/// Worst relative error of each stage over every golden case.
fn stage_errors(name: &str, keep_qformer_f32: bool) -> Vec<(&'static str, f64)> {
    let model = Model::load(common::model_dir(name), Device::Cpu).unwrap();
    let mut worst: Vec<(&'static str, f64)> = Vec::new();
    for (_, stage, _, rel) in common::stage_errors(&model, name, |g| Box::new(executor(&model, g, keep_qformer_f32))) {
        match worst.iter_mut().find(|(s, _)| *s == stage) {
            Some(entry) => entry.1 = entry.1.max(rel),
            None => worst.push((stage, rel)),
        }
    }
    worst
}

#[test]
fn fp16_activations_meet_the_gpu_test_bars() {
    for name in ["blip2-opt-tiny", "blip2-opt-tiny-proj"] {
        let all_fp16 = stage_errors(name, false);
        let qformer_f32 = stage_errors(name, true);
        for ((stage, rel), (_, rel32)) in all_fp16.iter().zip(&qformer_f32) {
            println!("{name} {stage}: fp16 everywhere rel {rel:.2e}; Q-Former in fp32 rel {rel32:.2e}");
            assert!(*rel <= STAGE_REL, "{name} {stage}: fp16 emulation rel {rel:e} exceeds the GPU test bar");
        }
    }
}

#[test]
fn fp16_greedy_tokens_meet_the_gpu_test_bars() {
    for name in ["blip2-opt-tiny", "blip2-opt-tiny-proj"] {
        let model = Model::load(common::model_dir(name), Device::Cpu).unwrap();
        let g = common::golden_json(&format!("{name}.json"));
        let opts = model.default_options();
        let (mut compared, mut total, mut worst) = (0, 0, 0f64);
        for case in g["cases"].as_array().unwrap() {
            let px = model.preprocess(&common::image(case["image"].as_str().unwrap())).unwrap();
            let ids = model.input_ids(case["prompt"].as_str()).unwrap();
            let new_tokens = opts.new_tokens(ids.len(), model.family.max_positions()).unwrap();
            let plan = model.family.plan(1, ids.len(), new_tokens, false).unwrap();
            let mut exec = executor(&model, &plan.graph, false);
            let (seqs, _) =
                glimpse::generate::generate(&plan, &mut exec, &[("pixels", &px.data)], &ids, &opts, &mut |_| {})
                    .unwrap();
            let (want, margins, logprobs) = (
                common::ids(&case["generated_ids"]),
                common::floats(&case["top2_margin"]),
                common::floats(&case["logprobs"]),
            );
            total += want.len();
            for step in 0..want.len() {
                // The bar (common::GPU_MARGIN): tokens agree at every step whose reference margin
                // exceeds it. At the first smaller margin fp16 rounding may pick the runner-up
                // (margin 0.018 at step 3 of caption_exact_224x224, log-prob errors up to 0.025),
                // so that step's token is not asserted.
                if margins[step] < MARGIN {
                    break;
                }
                assert_eq!(seqs[0].tokens.get(step), Some(&want[step]), "{name} {}: step {step}", case["name"]);
                worst = worst.max((seqs[0].logprobs[step] - logprobs[step]).abs());
                compared += 1;
            }
        }
        println!(
            "{name}: fp16 emulation matched {compared} of {total} greedy steps (comparison stops at a margin < {MARGIN}); worst log-prob error {worst:.2e}"
        );
        assert!(worst <= LOGPROB_ABS, "{name}: log-prob error {worst:e} exceeds the GPU test bar");
    }
}

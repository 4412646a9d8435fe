//! BLIP-2 on the CUDA executor against the transformers goldens and the CPU executor, on the
//! tiny fixtures. The GPU tests are `#[ignore]`d (a plain `cargo test` lists them as ignored);
//! `cargo test -- --include-ignored` runs them, printing `SKIP <name>: <reason>` without a usable
//! GPU. The device-selection test runs everywhere.
//!
//! Tolerances: `common::GPU_*` (fp16 activations vs the fp32 goldens; the reasoning, and the CPU
//! emulation that checks a correct fp16 implementation meets them, are there and in
//! tests/fp16_emulation.rs).

mod common;

use glimpse::{Device, Model};

use common::{GPU_LOGPROB_ABS as LOGPROB_ABS, GPU_MARGIN as MARGIN, GPU_STAGE_REL as STAGE_REL};

/// Printed past libtest's capture (raw stderr), so skips show in every `cargo test` log.
fn skip(test: &str, reason: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIP {test}: {reason}");
}

fn gpu_model(test: &str, name: &str) -> Option<Model> {
    if let Some(reason) = glimpse::backend::cuda_unavailable_reason() {
        skip(test, &reason.to_string());
        return None;
    }
    Some(Model::load(common::model_dir(name), Device::Cuda).expect("fixture loads on the GPU"))
}

#[test]
#[ignore = "needs a CUDA GPU: cargo test -- --include-ignored (prints SKIP without one)"]
fn cuda_stages_match_goldens() {
    for name in ["blip2-opt-tiny", "blip2-opt-tiny-proj"] {
        let Some(model) = gpu_model("cuda_stages_match_goldens", name) else { return };
        let goldens = common::goldens(&format!("{name}.safetensors"));
        let g = common::golden_json(&format!("{name}.json"));
        for case in g["cases"].as_array().unwrap() {
            let case_name = case["name"].as_str().unwrap();
            let px = model.preprocess(&common::image(case["image"].as_str().unwrap())).unwrap();
            let ids = model.input_ids(case["prompt"].as_str()).unwrap();
            let plan = model.blip2.plan(1, ids.len(), 1, true).unwrap();
            let mut exec = model.executor(&plan.graph).unwrap();
            exec.write(plan.pixels, &px.data).unwrap();
            exec.run(&plan.vision).unwrap();
            exec.run(&plan.qformer).unwrap();
            if let Some(act) = case["activations"].as_str() {
                for (key, buf) in [("vision", plan.vision_out), ("qformer", plan.qformer_out), ("image_embeds", plan.image_embeds)] {
                    let (want, shape) = goldens.f32(&format!("{act}.{key}")).unwrap();
                    let got = exec.read(buf, shape[0]).unwrap();
                    let (max, rel) = common::errors(&got, &want);
                    println!("{name} {case_name} {key}: rel {rel:.2e} max {max:.2e}");
                    assert!(rel <= STAGE_REL, "{name} {case_name} {key}: rel {rel:e}");
                }
            }
            exec.set_tokens(&ids);
            exec.set_position(0);
            exec.run(&plan.prefill).unwrap();
            let (want, _) = goldens.f32(&format!("{case_name}.logits")).unwrap();
            let got = exec.read(plan.prefill_logits, ids.len()).unwrap();
            let (max, rel) = common::errors(&got, &want);
            println!("{name} {case_name} logits: rel {rel:.2e} max {max:.2e}");
            assert!(rel <= STAGE_REL, "{name} {case_name} logits: rel {rel:e}");
        }
    }
}

/// Greedy tokens on the GPU equal transformers' (and so the CPU's) wherever the reference
/// margin makes the choice unambiguous at fp16 precision.
fn check_tokens(test: &str, model: &Model, name: &str) {
    let g = common::golden_json(&format!("{name}.json"));
    for case in g["cases"].as_array().unwrap() {
        let px = model.preprocess(&common::image(case["image"].as_str().unwrap())).unwrap();
        let out = model.run(&[px], case["prompt"].as_str(), &model.default_options(), &mut |_| {}).unwrap().remove(0);
        assert!(out.device.starts_with("cuda"), "{test}: ran on {}", out.device);
        let want = common::ids(&case["generated_ids"]);
        let margins = common::floats(&case["top2_margin"]);
        let logprobs = common::floats(&case["logprobs"]);
        for step in 0..want.len() {
            assert_eq!(out.tokens.get(step), Some(&want[step]), "{test} {}: step {step}", case["name"]);
            assert!((out.logprobs[step] - logprobs[step]).abs() <= LOGPROB_ABS, "{test} {}: logprob step {step}", case["name"]);
            if margins[step] < MARGIN {
                println!("{test} {}: compared {} steps (step {step} has margin {:.3})", case["name"], step + 1, margins[step]);
                break;
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU: cargo test -- --include-ignored (prints SKIP without one)"]
fn cuda_greedy_tokens_match() {
    for name in ["blip2-opt-tiny", "blip2-opt-tiny-proj"] {
        let Some(model) = gpu_model("cuda_greedy_tokens_match", name) else { return };
        check_tokens("cuda_greedy_tokens_match", &model, name);
    }
}

/// The recorded decode graph replays exactly what direct launches compute.
#[test]
#[ignore = "needs a CUDA GPU: cargo test -- --include-ignored (prints SKIP without one)"]
fn cuda_graph_replay_equals_direct_launches() {
    let Some(model) = gpu_model("cuda_graph_replay_equals_direct_launches", "blip2-opt-tiny") else { return };
    let px = model.preprocess(&common::image("odd_257x181.png")).unwrap();
    let opts = model.default_options();
    let replayed = model.run(std::slice::from_ref(&px), None, &opts, &mut |_| {}).unwrap().remove(0);
    // A fresh model reads GLIMPSE_CUDA_GRAPH when it makes its executor.
    std::env::set_var("GLIMPSE_CUDA_GRAPH", "0");
    let direct_model = Model::load(common::model_dir("blip2-opt-tiny"), Device::Cuda).unwrap();
    let direct = direct_model.run(&[px], None, &opts, &mut |_| {}).unwrap().remove(0);
    std::env::remove_var("GLIMPSE_CUDA_GRAPH");
    assert_eq!(replayed.tokens, direct.tokens);
    assert_eq!(replayed.logprobs, direct.logprobs, "same kernels, same order: bitwise equal");
}

#[test]
#[ignore = "needs a CUDA GPU: cargo test -- --include-ignored (prints SKIP without one)"]
fn cuda_batch_equals_single() {
    let Some(model) = gpu_model("cuda_batch_equals_single", "blip2-opt-tiny") else { return };
    let imgs = ["wide_301x97.png", "tall_83x311.png", "odd_257x181.png"];
    let px: Vec<_> = imgs.iter().map(|i| model.preprocess(&common::image(i)).unwrap()).collect();
    let opts = model.default_options();
    let batch = model.run(&px, None, &opts, &mut |_| {}).unwrap();
    for (p, b) in px.iter().zip(&batch) {
        let single = model.run(std::slice::from_ref(p), None, &opts, &mut |_| {}).unwrap().remove(0);
        // Row blocking may differ between batch sizes (GEMV vs GEMM), so compare tokens.
        assert_eq!(single.tokens, b.tokens);
    }
}

/// On a machine without a usable GPU, asking for CUDA is a clear error and auto picks the CPU.
#[test]
fn device_selection_without_gpu() {
    let Some(reason) = glimpse::backend::cuda_unavailable_reason() else {
        skip("device_selection_without_gpu", "a GPU is present");
        return;
    };
    let err = Model::load(common::model_dir("blip2-opt-tiny"), Device::Cuda).err().expect("cuda must fail").to_string();
    assert_eq!(err, reason.to_string());
    assert!(err.contains("CUDA"), "{err}");
    let auto = Model::load(common::model_dir("blip2-opt-tiny"), Device::Auto).unwrap();
    assert_eq!(auto.backend_name(), "cpu");
}

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
        for (case, stage, max, rel) in common::stage_errors(&model, name, |g| model.executor(g).unwrap()) {
            println!("{name} {case} {stage}: rel {rel:.2e} max {max:.2e}");
            assert!(rel <= STAGE_REL, "{name} {case} {stage}: rel {rel:e}");
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
            assert!(
                (out.logprobs[step] - logprobs[step]).abs() <= LOGPROB_ABS,
                "{test} {}: logprob step {step}",
                case["name"]
            );
            if margins[step] < MARGIN {
                println!(
                    "{test} {}: compared {} steps (step {step} has margin {:.3})",
                    case["name"],
                    step + 1,
                    margins[step]
                );
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

/// A recording that fails (at begin_capture, or at end_capture) falls back to direct launches:
/// the run succeeds with exactly the tokens and log-probs of a normal run.
#[test]
#[ignore = "needs a CUDA GPU: cargo test -- --include-ignored (prints SKIP without one)"]
fn cuda_failed_recording_falls_back_to_direct_launches() {
    let Some(model) = gpu_model("cuda_failed_recording_falls_back_to_direct_launches", "blip2-opt-tiny") else {
        return;
    };
    let px = model.preprocess(&common::image("odd_257x181.png")).unwrap();
    let opts = model.default_options();
    let normal = model.run(std::slice::from_ref(&px), None, &opts, &mut |_| {}).unwrap().remove(0);
    assert!(normal.tokens.len() >= 3, "the decode step must run at least twice to be recorded");
    for fault in ["fail-begin", "fail-end"] {
        // A fresh model reads GLIMPSE_CUDA_GRAPH when it makes its executor (tests run with
        // --test-threads=1, so no other test sees the variable).
        std::env::set_var("GLIMPSE_CUDA_GRAPH", fault);
        let faulty = Model::load(common::model_dir("blip2-opt-tiny"), Device::Cuda).unwrap();
        let before = glimpse::backend::cuda::capture_fallbacks();
        let out = faulty.run(std::slice::from_ref(&px), None, &opts, &mut |_| {});
        std::env::remove_var("GLIMPSE_CUDA_GRAPH");
        let out = out.unwrap_or_else(|e| panic!("{fault}: recording failure must fall back, got error {e}")).remove(0);
        assert_eq!(glimpse::backend::cuda::capture_fallbacks(), before + 1, "{fault}: the failure path ran once");
        assert_eq!(out.tokens, normal.tokens, "{fault}");
        assert_eq!(out.logprobs, normal.logprobs, "{fault}: same kernels, same order: bitwise equal");
    }
}

/// Two threads, each driving its own executor of one model (each on its own stream), caption
/// concurrently, repeatedly, so one thread records its decode graph while the other launches,
/// allocates and frees: every result equals the sequential one bit for bit.
#[test]
#[ignore = "needs a CUDA GPU: cargo test -- --include-ignored (prints SKIP without one)"]
fn cuda_concurrent_executors_equal_sequential() {
    let Some(model) = gpu_model("cuda_concurrent_executors_equal_sequential", "blip2-opt-tiny") else { return };
    let opts = model.default_options();
    let ids = model.input_ids(None).unwrap();
    let caption = |image: &str| -> (Vec<u32>, Vec<f64>) {
        let px = model.preprocess(&common::image(image)).unwrap();
        let new_tokens = opts.new_tokens(ids.len(), model.family.max_positions()).unwrap();
        let plan = model.family.plan(1, ids.len(), new_tokens, false).unwrap();
        let mut exec = model.executor(&plan.graph).unwrap();
        let (mut seqs, _) =
            glimpse::generate::generate(&plan, exec.as_mut(), &[("pixels", &px.data)], &ids, &opts, &mut |_| {})
                .unwrap();
        let seq = seqs.remove(0);
        (seq.tokens, seq.logprobs)
    };
    let per_thread = [["odd_257x181.png", "tall_83x311.png"], ["wide_301x97.png", "exact_224x224.png"]];
    let sequential: Vec<Vec<_>> = per_thread.iter().map(|imgs| imgs.iter().map(|i| caption(i)).collect()).collect();
    for round in 0..3 {
        let concurrent: Vec<Vec<_>> = std::thread::scope(|s| {
            let handles: Vec<_> =
                per_thread.iter().map(|imgs| s.spawn(|| imgs.iter().map(|i| caption(i)).collect::<Vec<_>>())).collect();
            handles.into_iter().map(|h| h.join().expect("captioning thread panicked")).collect()
        });
        assert_eq!(concurrent, sequential, "round {round}: concurrent executors differ from sequential runs");
    }
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

/// Runs every op of every phase on `candidate` and on the CPU executor emulating fp16 storage,
/// in lockstep: before each op the candidate's buffers hold exactly the CPU's values, so a
/// failure names the first op that disagrees, not a phase where errors have piled up. Per op the
/// only legitimate difference is fp32 summation order plus one fp16 rounding of the output
/// (2^-11 relative), so 4e-3 relative is generous for a correct kernel and far below a wrong one.
/// Returns how many op outputs were compared.
fn lockstep(
    model: &Model,
    make_candidate: impl FnOnce(&glimpse::graph::Graph) -> Box<dyn glimpse::backend::Executor>,
) -> usize {
    let ids = model.input_ids(Some("Question: what is in the picture? Answer:")).unwrap();
    lockstep_ids(model, &ids, make_candidate)
}

/// One step of a lockstep run: a phase, the tokens and position it runs at, and the host inputs
/// written to both executors just before it (T5's per-step relative-position bias).
type LockstepStep<'a> = (&'a glimpse::graph::Phase, Vec<u32>, usize, Vec<(glimpse::graph::Buf, Vec<f32>)>);

/// The lockstep core: `setup` writes a request's inputs into the CPU executor, the candidate
/// starts from a copy of every CPU buffer (device memory starts undefined), then every op of
/// every step runs on both and each output is compared, the candidate's then overwritten with the
/// CPU's so the next op starts from the same values.
fn lockstep_steps(
    weights: &std::sync::Arc<glimpse::graph::WeightTable>,
    graph: &glimpse::graph::Graph,
    mut cand: Box<dyn glimpse::backend::Executor>,
    setup: impl FnOnce(&mut glimpse::backend::cpu::CpuExecutor),
    steps: &[LockstepStep<'_>],
) -> usize {
    use glimpse::backend::cpu::CpuExecutor;
    use glimpse::backend::Executor;
    use glimpse::graph::{Buf, Phase};
    const OP_REL: f64 = 4e-3;
    let mut cpu = CpuExecutor::new(std::sync::Arc::clone(weights), &graph.buffers);
    cpu.emulate_fp16(|_| false);
    let rows = |b: Buf| graph.buffers[b.0].rows;
    setup(&mut cpu);
    for i in 0..graph.buffers.len() {
        cand.write(Buf(i), &cpu.read(Buf(i), rows(Buf(i))).unwrap()).unwrap();
    }
    let mut checked = 0;
    for (phase, tokens, position, inputs) in steps {
        for exec in [&mut *cand as &mut dyn Executor, &mut cpu] {
            exec.set_tokens(tokens);
            exec.set_position(*position);
            for (buf, data) in inputs {
                exec.write(*buf, data).unwrap();
            }
        }
        for (i, op) in phase.ops.iter().enumerate() {
            let single = Phase { name: phase.name, ops: vec![op.clone()], replayable: false };
            cpu.run(&single).unwrap();
            cand.run(&single).unwrap_or_else(|e| panic!("{} op {i} ({}): {e}", phase.name, op.kind()));
            for out in op.outputs() {
                let want = cpu.read(out, rows(out)).unwrap();
                let got = cand.read(out, rows(out)).unwrap();
                let (max, rel) = common::errors(&got, &want);
                assert!(
                    rel <= OP_REL && got.iter().all(|v| v.is_finite()),
                    "{} op {i} ({}) `{}`: rel {rel:e}, max abs {max:e}",
                    phase.name,
                    op.kind(),
                    graph.buffers[out.0].name
                );
                cand.write(out, &want).unwrap();
                checked += 1;
            }
        }
    }
    checked
}

/// [`lockstep`] for one image and the request text: `ids` are the decoder's input (a chat
/// model's templated prompt) or, for an encoder-decoder, the encoder's; InstructBLIP's Q-Former
/// also reads `text`. Encoders, prefill and two decode steps.
fn lockstep_ids(
    model: &Model,
    ids: &[u32],
    make_candidate: impl FnOnce(&glimpse::graph::Graph) -> Box<dyn glimpse::backend::Executor>,
) -> usize {
    lockstep_request(model, ids, None, make_candidate)
}

fn lockstep_request(
    model: &Model,
    ids: &[u32],
    text: Option<&str>,
    make_candidate: impl FnOnce(&glimpse::graph::Graph) -> Box<dyn glimpse::backend::Executor>,
) -> usize {
    use glimpse::backend::Executor;
    let px = model.preprocess(&common::image("rgba_150x120.png")).unwrap();
    let new_tokens = 3;
    let text_in = text.and_then(|t| model.family.text_inputs(&[t]).unwrap());
    let plan = match &text_in {
        Some(t) => model
            .family
            .plan_for(&glimpse::generate::PlanShape {
                text_rows: t.rows,
                ..glimpse::generate::PlanShape::new(1, ids.len(), new_tokens)
            })
            .unwrap(),
        // Every frame of the image (one, except for image-splitting families).
        None => model
            .family
            .plan_for(&glimpse::generate::PlanShape {
                images: px.frames(),
                ..glimpse::generate::PlanShape::new(1, ids.len(), new_tokens)
            })
            .unwrap(),
    };
    let cand = make_candidate(&plan.graph);
    let setup = |cpu: &mut glimpse::backend::cpu::CpuExecutor| {
        cpu.write(plan.input("pixels").unwrap(), &px.data).unwrap();
        for (input, data) in text_in.iter().flat_map(|t| &t.inputs) {
            cpu.write(plan.input(input).unwrap(), data).unwrap();
        }
        if let Some(enc) = plan.encoder_input {
            cpu.write(enc.key_mask, &vec![0.0; ids.len()]).unwrap();
        }
        if let Some(mask) = plan.key_mask {
            cpu.write(mask, &vec![0.0; plan.capacity.max(1)]).unwrap();
        }
        plan.write_prompt_inputs(cpu, ids).unwrap();
    };
    let inputs = |phase: &str, position: usize| -> Vec<(glimpse::graph::Buf, Vec<f32>)> {
        plan.step_inputs.iter().filter(|s| s.phase == phase).map(|s| (s.buf, (s.fill)(position))).collect()
    };
    // An encoder-decoder encodes `ids` and decodes from its start token; a decoder-only model
    // prefills `ids`.
    let (encoder_tokens, prefill_tokens, first_decode) = match plan.encoder_input {
        Some(enc) => (ids.to_vec(), vec![enc.decoder_start], 1),
        None => (vec![], ids.to_vec(), ids.len()),
    };
    let mut steps: Vec<LockstepStep<'_>> =
        plan.encoders.iter().map(|p| (p, encoder_tokens.clone(), 0, inputs(p.name, 0))).collect();
    steps.push((&plan.prefill.phase, prefill_tokens, 0, inputs("prefill", 0)));
    for s in 0..new_tokens - 1 {
        let position = first_decode + s;
        steps.push((&plan.decode.phase, vec![5 + s as u32], position, inputs("decode", position)));
    }
    lockstep_steps(model.family.weights(), &plan.graph, cand, setup, &steps)
}

/// Every op of every phase on the GPU against the CPU, in lockstep (see `lockstep`).
#[test]
#[ignore = "needs a CUDA GPU: cargo test -- --include-ignored (prints SKIP without one)"]
fn cuda_every_op_matches_cpu_in_lockstep() {
    let Some(model) = gpu_model("cuda_every_op_matches_cpu_in_lockstep", "blip2-opt-tiny") else { return };
    let checked = lockstep(&model, |g| model.executor(g).unwrap());
    println!("lockstep: {checked} op outputs agree");
}

/// The lockstep harness itself, on any machine: the f32 CPU executor as the candidate must agree
/// with the fp16-storing one within the per-op bar (it differs by exactly one fp16 rounding).
#[test]
fn lockstep_harness_accepts_the_f32_reference() {
    let model = Model::load(common::model_dir("blip2-opt-tiny"), Device::Cpu).unwrap();
    let checked = lockstep(&model, |g| {
        Box::new(glimpse::backend::cpu::CpuExecutor::new(std::sync::Arc::clone(model.family.weights()), &g.buffers))
    });
    assert!(checked > 50, "{checked}");
}

/// LLaVA (CLIP tower, projector, LLaMA with GQA, RoPE, RMSNorm, SwiGLU) on the GPU against the
/// CPU, op by op, on both tiny fixtures (the variant: llama3 RoPE, biases, a layer list).
#[test]
#[ignore = "needs a CUDA GPU: cargo test -- --include-ignored (prints SKIP without one)"]
fn cuda_llava_matches_cpu_in_lockstep() {
    for name in ["llava-tiny", "llava-tiny-variant"] {
        let Some(model) = gpu_model("cuda_llava_matches_cpu_in_lockstep", name) else { return };
        let ids = model.chat_input_ids(1, "What is in the picture?").unwrap();
        let checked = lockstep_ids(&model, &ids, |g| model.executor(g).unwrap());
        println!("{name} lockstep: {checked} op outputs agree");
    }
}

/// SmolVLM (SigLIP tower without a class row, pixel shuffle, LLaMA with a tied head) on the GPU
/// against the CPU, op by op, over every frame of a split image; then greedy tokens.
#[test]
#[ignore = "needs a CUDA GPU: cargo test -- --include-ignored (prints SKIP without one)"]
fn cuda_smolvlm_matches_cpu() {
    let Some(model) = gpu_model("cuda_smolvlm_matches_cpu", "smolvlm-tiny") else { return };
    let image = common::image("rgba_150x120.png");
    let px = model.preprocess(&image).unwrap();
    assert!(px.frames() > 1, "a split image");
    let rendered = model.chat.as_ref().unwrap().user_prompt(1, "What is in the picture?").unwrap();
    let ids = model.input_ids_for(Some(&rendered), std::slice::from_ref(&px)).unwrap();
    let checked = lockstep_ids(&model, &ids, |g| model.executor(g).unwrap());
    println!("smolvlm-tiny lockstep: {checked} op outputs agree");
    let cpu = Model::load(common::model_dir("smolvlm-tiny"), Device::Cpu).unwrap();
    let opts = glimpse::GenerateOptions { max_new_tokens: Some(6), ..model.default_options() };
    let (gpu_out, cpu_out) = (
        model.ask_images(&[&image], "What is it?", &opts).unwrap(),
        cpu.ask_images(&[&image], "What is it?", &opts).unwrap(),
    );
    assert!(gpu_out.device.starts_with("cuda"), "ran on {}", gpu_out.device);
    for (step, (g, c)) in gpu_out.tokens.iter().zip(&cpu_out.tokens).enumerate() {
        assert!((gpu_out.logprobs[step] - cpu_out.logprobs[step]).abs() <= LOGPROB_ABS, "logprob step {step}");
        assert_eq!(g, c, "step {step}");
    }
}

/// IDEFICS (CLIP-style tower, Perceiver Resampler with qk layer norms, gated cross-attention
/// with per-token image masks; and without the resampler, blocks every 2 layers, vector gates)
/// on the GPU against the CPU, op by op; then greedy tokens of a two-image prompt.
#[test]
#[ignore = "needs a CUDA GPU: cargo test -- --include-ignored (prints SKIP without one)"]
fn cuda_idefics_matches_cpu() {
    for name in ["idefics-tiny", "idefics-tiny-plain"] {
        let Some(model) = gpu_model("cuda_idefics_matches_cpu", name) else { return };
        let px = model.preprocess(&common::image("rgba_150x120.png")).unwrap();
        // Text before the image sees no image; text after it sees it.
        let ids = model.input_ids_for(Some("User:<image>What is in the picture?"), std::slice::from_ref(&px)).unwrap();
        let checked = lockstep_ids(&model, &ids, |g| model.executor(g).unwrap());
        println!("{name} lockstep: {checked} op outputs agree");
        assert!(checked > 40, "{name}: only {checked} outputs compared");
        let cpu = Model::load(common::model_dir(name), Device::Cpu).unwrap();
        let images: Vec<_> = ["rgba_150x120.png", "odd_257x181.png"]
            .iter()
            .map(|n| model.preprocess(&common::image(n)).unwrap())
            .collect();
        let opts = glimpse::GenerateOptions { max_new_tokens: Some(6), ..model.default_options() };
        let prompt = glimpse::api::Prompt::Raw(Some("Look:<image>and<image>Which is darker?"));
        let request = glimpse::api::Request::new(&images, prompt, &opts);
        let (gpu_out, cpu_out) =
            (model.generate(&request, &mut |_| {}).unwrap(), cpu.generate(&request, &mut |_| {}).unwrap());
        assert!(gpu_out[0].device.starts_with("cuda"), "ran on {}", gpu_out[0].device);
        for (step, (g, c)) in gpu_out[0].tokens.iter().zip(&cpu_out[0].tokens).enumerate() {
            assert!(
                (gpu_out[0].logprobs[step] - cpu_out[0].logprobs[step]).abs() <= LOGPROB_ABS,
                "logprob step {step}"
            );
            assert_eq!(g, c, "{name} step {step}");
        }
    }
}

/// The encoder-decoder and instruction-aware families op by op: BLIP-2 Flan-T5 (T5 encoder with
/// relative-position bias, decoder with cross-attention), InstructBLIP with Vicuna (Q-Former over
/// the instruction) and with Flan-T5.
#[test]
#[ignore = "needs a CUDA GPU: cargo test -- --include-ignored (prints SKIP without one)"]
fn cuda_t5_and_instructblip_match_cpu_in_lockstep() {
    let question = "What is unusual about this image?";
    for name in ["blip2-flan-t5-tiny", "instructblip-tiny", "instructblip-flan-t5-tiny"] {
        let Some(model) = gpu_model("cuda_t5_and_instructblip_match_cpu_in_lockstep", name) else { return };
        let ids = model.input_ids(Some(question)).unwrap();
        let checked = lockstep_request(&model, &ids, Some(question), |g| model.executor(g).unwrap());
        println!("{name} lockstep: {checked} op outputs agree");
        assert!(checked > 30, "{name}: only {checked} outputs compared");
    }
}

/// CLIP's image and text towers op by op (the text tower with a padded batch: its key mask and
/// pooled rows).
#[test]
#[ignore = "needs a CUDA GPU: cargo test -- --include-ignored (prints SKIP without one)"]
fn cuda_clip_matches_cpu_in_lockstep() {
    use glimpse::api::EmbedModel;
    if let Some(reason) = glimpse::backend::cuda_unavailable_reason() {
        skip("cuda_clip_matches_cpu_in_lockstep", &reason.to_string());
        return;
    }
    let model = EmbedModel::load(common::model_dir("clip-tiny"), Device::Cuda).unwrap();
    let px: Vec<f32> = ["rgba_150x120.png", "odd_257x181.png"]
        .iter()
        .flat_map(|n| model.preprocess(&common::image(n)).unwrap().data)
        .collect();
    let images = model.family.image_plan(2).unwrap();
    let cand = model.executor(&images.graph).unwrap();
    let input = images.inputs[0].1;
    let checked = lockstep_steps(
        &model.family.core().weights,
        &images.graph,
        cand,
        |cpu| glimpse::backend::Executor::write(cpu, input, &px).unwrap(),
        &[(&images.phase, vec![], 0, vec![])],
    );
    // Two texts of different lengths, padded to the longer: the shorter's pad keys masked.
    let ids = [vec![5u32, 9, 11, 2], vec![7u32, 2]];
    let len = 4;
    let texts = model.family.text_plan(2, len).unwrap();
    let mut mask = vec![0.0f32; 2 * len];
    mask[len + 2..].fill(f32::MIN);
    let tokens: Vec<u32> = ids.iter().flat_map(|s| s.iter().copied().chain(std::iter::repeat(0)).take(len)).collect();
    let rows = model.family.pool_rows(&ids);
    let mut cand = model.executor(&texts.graph).unwrap();
    cand.set_row_indices(&rows);
    let key_mask = texts.inputs.iter().find(|(n, _)| *n == "key_mask").expect("text plans take a key mask").1;
    let checked_text = lockstep_steps(
        &model.family.core().weights,
        &texts.graph,
        cand,
        |cpu| {
            glimpse::backend::Executor::write(cpu, key_mask, &mask).unwrap();
            glimpse::backend::Executor::set_row_indices(cpu, &rows);
        },
        &[(&texts.phase, tokens, 0, vec![])],
    );
    println!("clip lockstep: {checked} image and {checked_text} text op outputs agree");
    assert!(checked > 10 && checked_text > 10);
}

/// LLaVA greedy tokens on the GPU equal transformers' where the reference margin is clear.
#[test]
#[ignore = "needs a CUDA GPU: cargo test -- --include-ignored (prints SKIP without one)"]
fn cuda_llava_greedy_tokens_match() {
    let Some(model) = gpu_model("cuda_llava_greedy_tokens_match", "llava-tiny") else { return };
    let cpu = Model::load(common::model_dir("llava-tiny"), Device::Cpu).unwrap();
    let image = common::image("rgba_150x120.png");
    let opts = glimpse::GenerateOptions { max_new_tokens: Some(8), ..model.default_options() };
    let (gpu_out, cpu_out) = (
        model.ask_images(&[&image], "What is it?", &opts).unwrap(),
        cpu.ask_images(&[&image], "What is it?", &opts).unwrap(),
    );
    assert!(gpu_out.device.starts_with("cuda"), "ran on {}", gpu_out.device);
    // Token equality needs a clear top-2 margin at fp16; report the first divergence otherwise.
    for (step, (g, c)) in gpu_out.tokens.iter().zip(&cpu_out.tokens).enumerate() {
        assert!((gpu_out.logprobs[step] - cpu_out.logprobs[step]).abs() <= LOGPROB_ABS, "logprob step {step}");
        assert_eq!(g, c, "step {step}");
    }
}

/// CLIP embeddings and zero-shot probabilities on the GPU against the CPU executor (fp16
/// activations: the stage bar of the BLIP-2 tests, relative to the largest magnitude).
#[test]
#[ignore = "needs a CUDA GPU: cargo test -- --include-ignored (prints SKIP without one)"]
fn cuda_clip_embeddings_match_cpu() {
    use glimpse::api::EmbedModel;
    if let Some(reason) = glimpse::backend::cuda_unavailable_reason() {
        skip("cuda_clip_embeddings_match_cpu", &reason.to_string());
        return;
    }
    let dir = common::model_dir("clip-tiny");
    let (gpu, cpu) = (EmbedModel::load(&dir, Device::Cuda).unwrap(), EmbedModel::load(&dir, Device::Cpu).unwrap());
    let names = ["rgba_150x120.png", "odd_257x181.png", "tiny_13x9.png"];
    let px: Vec<_> = names.iter().map(|n| cpu.preprocess(&common::image(n)).unwrap()).collect();
    let texts = ["a photo of a cat", "a dog", "red"];
    let flat = |v: Vec<Vec<f32>>| v.concat();
    for (what, got, want) in [
        ("image embeds", flat(gpu.embed_images(&px).unwrap()), flat(cpu.embed_images(&px).unwrap())),
        ("text embeds", flat(gpu.embed_texts(&texts).unwrap()), flat(cpu.embed_texts(&texts).unwrap())),
        ("probs", flat(gpu.classify(&px, &texts).unwrap()), flat(cpu.classify(&px, &texts).unwrap())),
    ] {
        let (max, rel) = common::errors(&got, &want);
        println!("clip {what}: rel {rel:.2e} max {max:.2e}");
        assert!(rel <= STAGE_REL, "{what}: rel {rel:e}");
    }
}

/// The LLaVA lockstep harness on any machine (f32 CPU candidate vs the fp16-storing CPU).
#[test]
fn lockstep_harness_accepts_the_f32_reference_on_llava() {
    let model = Model::load(common::model_dir("llava-tiny"), Device::Cpu).unwrap();
    let ids = model.chat_input_ids(1, "What is in the picture?").unwrap();
    let checked = lockstep_ids(&model, &ids, |g| {
        Box::new(glimpse::backend::cpu::CpuExecutor::new(std::sync::Arc::clone(model.family.weights()), &g.buffers))
    });
    assert!(checked > 50, "{checked}");
}

/// InstructBLIP (instruction-aware Q-Former with its CopyRows splits, LLaMA decoder with a key
/// mask) on the GPU against transformers' stages and the CPU's greedy run, on the tiny fixture:
/// the caption (empty instruction), a question, and a padded batch of two questions.
#[test]
#[ignore = "needs a CUDA GPU: cargo test -- --include-ignored (prints SKIP without one)"]
fn cuda_instructblip_matches_cpu() {
    instructblip_matches_cpu("cuda_instructblip_matches_cpu", "instructblip-tiny", "instructblip_tiny");
}

/// InstructBLIP Flan-T5: stages (T5 encoder output and first decoder logits included), then
/// caption, a question and a padded batch of two questions (encoder key mask) against the CPU.
#[test]
#[ignore = "needs a CUDA GPU: cargo test -- --include-ignored (prints SKIP without one)"]
fn cuda_instructblip_flan_t5_matches_cpu() {
    instructblip_matches_cpu(
        "cuda_instructblip_flan_t5_matches_cpu",
        "instructblip-flan-t5-tiny",
        "instructblip-flan-t5_tiny",
    );
}

fn instructblip_matches_cpu(test: &str, name: &str, golden: &str) {
    let Some(model) = gpu_model(test, name) else { return };
    for (case, stage, max, rel) in common::instructblip_stage_errors(&model, golden, |g| model.executor(g).unwrap()) {
        println!("{name} {case} {stage}: rel {rel:.2e} max {max:.2e}");
        assert!(rel <= STAGE_REL, "{name} {case} {stage}: rel {rel:e}");
    }
    let cpu = Model::load(common::model_dir(name), Device::Cpu).unwrap();
    let opts = glimpse::GenerateOptions { max_new_tokens: Some(8), ..model.default_options() };
    let (a, b) = (common::image("odd_257x181.png"), common::image("wide_301x97.png"));
    let questions = ["What is unusual about this image?", "Describe it."];
    let runs = [
        (vec![model.caption(&a, &opts).unwrap()], vec![cpu.caption(&a, &opts).unwrap()]),
        (vec![model.ask(&b, questions[0], &opts).unwrap()], vec![cpu.ask(&b, questions[0], &opts).unwrap()]),
        (model.ask_batch(&[&a, &b], &questions, &opts).unwrap(), cpu.ask_batch(&[&a, &b], &questions, &opts).unwrap()),
    ];
    for (i, (gpu_outs, cpu_outs)) in runs.iter().enumerate() {
        for (g, c) in gpu_outs.iter().zip(cpu_outs) {
            assert!(g.device.starts_with("cuda"), "ran on {}", g.device);
            // Token equality needs a clear top-2 margin at fp16; stop at the first divergence.
            for (step, (gt, ct)) in g.tokens.iter().zip(&c.tokens).enumerate() {
                assert!((g.logprobs[step] - c.logprobs[step]).abs() <= LOGPROB_ABS, "run {i} logprob step {step}");
                if gt != ct {
                    println!("run {i}: tokens diverge at step {step}");
                    break;
                }
            }
        }
    }
}

/// BLIP-2 Flan-T5 on the GPU against the fp16-emulating CPU executor, phase by phase on a batch
/// of two: the encoder output (T5 encoder with its host-written relative bias, fp32 residual
/// stream, cross-attention K/V), then four decoder steps teacher-forced with the CPU's argmax
/// (the decode step is recorded and replayed with the bias rewritten before each replay).
#[test]
#[ignore = "needs a CUDA GPU: cargo test -- --include-ignored (prints SKIP without one)"]
fn cuda_blip2_t5_matches_cpu() {
    use glimpse::backend::cpu::CpuExecutor;
    use glimpse::backend::Executor;
    let Some(model) = gpu_model("cuda_blip2_t5_matches_cpu", "blip2-flan-t5-tiny") else { return };
    let ids = model.input_ids(Some("Question: what is on the plate? Answer:")).unwrap();
    let images = ["tall_83x311.png", "rgba_150x120.png"];
    let pixels: Vec<f32> = images.iter().flat_map(|i| model.preprocess(&common::image(i)).unwrap().data).collect();
    let steps = 4;
    let plan = model.family.plan(2, ids.len(), steps, false).unwrap();
    let mut gpu = model.executor(&plan.graph).unwrap();
    let mut cpu = CpuExecutor::new(std::sync::Arc::clone(model.family.weights()), &plan.graph.buffers);
    cpu.emulate_fp16(|_| false);
    let run = |exec: &mut dyn Executor, phase: &glimpse::graph::Phase, position: usize| {
        for s in plan.step_inputs.iter().filter(|s| s.phase == phase.name) {
            exec.write(s.buf, &(s.fill)(position)).unwrap();
        }
        exec.set_position(position);
        exec.run(phase).unwrap();
    };
    for exec in [&mut *gpu as &mut dyn Executor, &mut cpu] {
        exec.write(plan.input("pixels").unwrap(), &pixels).unwrap();
        exec.write(plan.encoder_input.unwrap().key_mask, &vec![0.0; 2 * ids.len()]).unwrap();
        exec.set_tokens(&ids.repeat(2));
        for phase in &plan.encoders {
            run(exec, phase, 0);
        }
    }
    let enc = plan.output("encoder_out").unwrap();
    let rows = 2 * ids.len();
    let (_, rel) = common::errors(&gpu.read(enc, rows).unwrap(), &cpu.read(enc, rows).unwrap());
    assert!(rel <= STAGE_REL, "encoder output: rel {rel:e}");
    let mut tokens = vec![0u32; 2];
    for step in 0..steps {
        let s = if step == 0 { &plan.prefill } else { &plan.decode };
        for exec in [&mut *gpu as &mut dyn Executor, &mut cpu] {
            exec.set_tokens(&tokens);
            run(exec, &s.phase, step);
        }
        let (g, c) = (gpu.read(s.logits, 2).unwrap(), cpu.read(s.logits, 2).unwrap());
        let (_, rel) = common::errors(&g, &c);
        assert!(rel <= STAGE_REL, "decoder step {step}: logits rel {rel:e}");
        let vocab = c.len() / 2;
        tokens = c
            .chunks(vocab)
            .map(|row| row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i as u32))
            .collect();
    }
}

//! Shared helpers of the integration tests: fixture paths, goldens, error metrics, and (in
//! reference.rs) the f64 definitions of the ops that tests/cpu_ops.rs and tests/gpu_kernels.rs check.
#![allow(dead_code)]

use std::path::PathBuf;

use glimpse::weights::Checkpoint;

pub mod reference;

/// Bars for fp16 GPU results against the transformers fp32 goldens, shared by tests/gpu_model.rs
/// and tests/fp16_emulation.rs (which checks, on the CPU, that a correct fp16 implementation
/// meets them). The GPU stores activations in fp16: every op rounds its output to 2^-11
/// relative, and the ~15-25 roundings between pixels and logits compound to a few 1e-3; the
/// CPU emulation of exactly that measures <= 3.7e-3 on the fixtures (transformers' own fp16 run
/// is 1.7e-3 on the tiny synth model), so 1e-2 leaves ~3x headroom while a wrong index, mask or
/// epilogue moves outputs by O(1).
pub const GPU_STAGE_REL: f64 = 1e-2;
/// Logits are O(10), so fp16 errors are ~0.01-0.05: greedy tokens must agree at every step whose
/// reference top-2 margin exceeds this; after the first smaller margin, sequences may diverge.
pub const GPU_MARGIN: f64 = 0.1;
/// Log-prob of the chosen token; the fp16 emulation measures up to 0.025 on the fixtures.
pub const GPU_LOGPROB_ABS: f64 = 5e-2;

/// tests/fixtures of this checkout: `$GLIMPSE_FIXTURES` when set, else the path baked in at build
/// time, else `tests/fixtures` under the working directory (prebuilt test binaries run on a GPU
/// machine from a copy of the repository at another path).
pub fn fixtures() -> PathBuf {
    if let Some(dir) = std::env::var_os("GLIMPSE_FIXTURES") {
        return PathBuf::from(dir);
    }
    let built = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    if built.is_dir() {
        built
    } else {
        PathBuf::from("tests/fixtures")
    }
}

pub fn model_dir(name: &str) -> PathBuf {
    fixtures().join(name)
}

pub fn image(name: &str) -> PathBuf {
    fixtures().join("images").join(name)
}

/// A goldens safetensors file (float32 arrays written by scripts/make_fixtures.py).
pub fn goldens(file: &str) -> Checkpoint {
    Checkpoint::open_file(&fixtures().join("goldens").join(file)).expect("goldens file")
}

pub fn golden_json(file: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join("goldens").join(file)).expect("goldens json");
    serde_json::from_str(&text).expect("valid json")
}

/// (max |a - b|, ||a - b|| / ||b||).
pub fn errors(a: &[f32], b: &[f32]) -> (f64, f64) {
    assert_eq!(a.len(), b.len(), "lengths differ");
    let mut max = 0f64;
    let (mut num, mut den) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let d = (f64::from(x) - f64::from(y)).abs();
        max = max.max(d);
        num += d * d;
        den += f64::from(y) * f64::from(y);
    }
    (max, (num / den.max(f64::MIN_POSITIVE)).sqrt())
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().expect("array").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

pub fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array().expect("array").iter().map(|x| x.as_f64().expect("float")).collect()
}

/// Copies the folder `from` (recursively) into `to`.
pub fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A scratch folder removed at drop.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// One stage of one golden case: (case, stage, max abs error, relative error).
pub type StageError = (String, &'static str, f64, f64);

/// Runs every golden case of fixture model `name` on an executor made by `make` and measures
/// vision, Q-Former, projection (once per image) and full prefill logits (every case) against
/// the transformers goldens. Also checks the decoder input ids equal transformers'.
/// The decoder's additive key mask for an unpadded prompt (all zeros), written as generation
/// writes it on every request: device memory starts undefined (the simulated device fills it
/// with NaN), so a harness that runs phases by hand must write every input the plan reads.
pub fn write_no_padding_mask(exec: &mut Box<dyn glimpse::backend::Executor>, plan: &glimpse::generate::Plan) {
    if let Some(mask) = plan.key_mask {
        exec.write(mask, &vec![0.0; plan.batch * plan.capacity.max(1)]).unwrap();
    }
}

pub fn stage_errors(
    model: &glimpse::Model,
    name: &str,
    make: impl Fn(&glimpse::graph::Graph) -> Box<dyn glimpse::backend::Executor>,
) -> Vec<StageError> {
    let goldens = goldens(&format!("{name}.safetensors"));
    let g = golden_json(&format!("{name}.json"));
    let mut out = Vec::new();
    for case in g["cases"].as_array().expect("cases") {
        let case_name = case["name"].as_str().unwrap().to_string();
        let px = model.preprocess(&image(case["image"].as_str().unwrap())).unwrap();
        let ids = model.input_ids(case["prompt"].as_str()).unwrap();
        assert_eq!(ids, self::ids(&case["input_ids"]), "{case_name}: decoder input ids");
        let plan = model.family.plan(1, ids.len(), 1, true).unwrap();
        let mut exec = make(&plan.graph);
        exec.write(plan.input("pixels").unwrap(), &px.data).unwrap();
        write_no_padding_mask(&mut exec, &plan);
        for phase in &plan.encoders {
            exec.run(phase).unwrap();
        }
        if let Some(act) = case["activations"].as_str() {
            for (key, output) in
                [("vision", "vision_out"), ("qformer", "qformer_out"), ("image_embeds", "image_embeds")]
            {
                let buf = plan.output(output).unwrap();
                let (want, shape) = goldens.f32(&format!("{act}.{key}")).unwrap();
                let (max, rel) = errors(&exec.read(buf, shape[0]).unwrap(), &want);
                out.push((case_name.clone(), key, max, rel));
            }
        }
        exec.set_tokens(&ids);
        exec.set_position(0);
        exec.run(&plan.prefill.phase).unwrap();
        let (want, shape) = goldens.f32(&format!("{case_name}.logits")).unwrap();
        assert_eq!(shape[0], ids.len());
        let (max, rel) = errors(&exec.read(plan.prefill.logits, ids.len()).unwrap(), &want);
        out.push((case_name, "logits", max, rel));
    }
    out
}

/// InstructBLIP's stage errors on an executor made by `make`, for every golden case of
/// goldens/`golden`.*: vision output, Q-Former query rows, projector output, then for Vicuna
/// (`instructblip_tiny`) the last prefill logit rows, for Flan-T5 (`instructblip-flan-t5_tiny`)
/// the T5 encoder output and the first decoder step's logits. The Q-Former's inputs come from
/// the family's own tokenizer and embedding tables (checked against the goldens' ids), the
/// language model's from `Model::input_ids`.
pub fn instructblip_stage_errors(
    model: &glimpse::Model,
    golden: &str,
    make: impl Fn(&glimpse::graph::Graph) -> Box<dyn glimpse::backend::Executor>,
) -> Vec<StageError> {
    let goldens = goldens(&format!("{golden}.safetensors"));
    let g = golden_json(&format!("{golden}.json"));
    let mut out = Vec::new();
    for case in g["cases"].as_array().expect("cases") {
        let name = case["name"].as_str().unwrap().to_string();
        let text = case["text"].as_str().unwrap();
        let px = model.preprocess(&image(case["image"].as_str().unwrap())).unwrap();
        let ids = model.input_ids(Some(text)).unwrap();
        assert_eq!(ids, self::ids(&case["input_ids"]), "{name}: language model input ids");
        let text_in = model.family.text_inputs(&[text]).unwrap().expect("InstructBLIP reads the text");
        assert_eq!(text_in.rows, case["qformer_input_ids"].as_array().unwrap().len(), "{name}: Q-Former ids");
        let plan = model
            .family
            .plan_for(&glimpse::generate::PlanShape {
                text_rows: text_in.rows,
                all_prefill_logits: true,
                ..glimpse::generate::PlanShape::new(1, ids.len(), 1)
            })
            .unwrap();
        let mut exec = make(&plan.graph);
        exec.write(plan.input("pixels").unwrap(), &px.data).unwrap();
        for (input, data) in &text_in.inputs {
            exec.write(plan.input(input).unwrap(), data).unwrap();
        }
        // The T5 encoder embeds the prompt ids; its relative bias and (unpadded) key mask are
        // host-written inputs.
        if let Some(enc) = plan.encoder_input {
            exec.write(enc.key_mask, &vec![0.0; ids.len()]).unwrap();
        }
        write_no_padding_mask(&mut exec, &plan);
        exec.set_tokens(&ids);
        exec.set_position(0);
        let write_step = |exec: &mut Box<dyn glimpse::backend::Executor>, phase: &str| {
            for s in plan.step_inputs.iter().filter(|s| s.phase == phase) {
                exec.write(s.buf, &(s.fill)(0)).unwrap();
            }
        };
        for phase in &plan.encoders {
            write_step(&mut exec, phase.name);
            exec.run(phase).unwrap();
        }
        let encoder_decoder = plan.encoder_input.is_some();
        let stages: &[(&'static str, &str)] = if encoder_decoder {
            &[
                ("vision", "vision_out"),
                ("qformer", "qformer_out"),
                ("image_features", "image_embeds"),
                ("encoder", "encoder_out"),
            ]
        } else {
            &[("vision", "vision_out"), ("qformer", "qformer_out"), ("image_features", "image_embeds")]
        };
        for &(key, output) in stages {
            let (want, shape) = goldens.f32(&format!("{name}.{key}")).unwrap();
            let (max, rel) = errors(&exec.read(plan.output(output).unwrap(), shape[0]).unwrap(), &want);
            out.push((name.clone(), key, max, rel));
        }
        write_step(&mut exec, "prefill");
        if let Some(enc) = plan.encoder_input {
            exec.set_tokens(&[enc.decoder_start]);
            exec.run(&plan.prefill.phase).unwrap();
            let (want, _) = goldens.f32(&format!("{name}.first_logits")).unwrap();
            let (max, rel) = errors(&exec.read(plan.prefill.logits, 1).unwrap(), &want);
            out.push((name, "first_logits", max, rel));
        } else {
            exec.run(&plan.prefill.phase).unwrap();
            let (want, shape) = goldens.f32(&format!("{name}.logits")).unwrap();
            let all = exec.read(plan.prefill.logits, ids.len()).unwrap();
            let (max, rel) = errors(&all[(ids.len() - shape[0]) * shape[1]..], &want);
            out.push((name, "logits", max, rel));
        }
    }
    out
}

/// Pearson's chi-square of `counts` against `probs` (categories with probability 0 must have
/// count 0) and its degrees of freedom.
pub fn chi_square(counts: &[u64], probs: &[f64]) -> (f64, usize) {
    let n: u64 = counts.iter().sum();
    let mut chi = 0.0;
    let mut cats = 0;
    for (&c, &p) in counts.iter().zip(probs) {
        if p == 0.0 {
            assert_eq!(c, 0, "a token of probability 0 was drawn");
            continue;
        }
        let e = p * n as f64;
        assert!(e >= 5.0, "expected count {e} too small for the chi-square approximation");
        chi += (c as f64 - e).powi(2) / e;
        cats += 1;
    }
    (chi, cats - 1)
}

/// The 0.999 quantiles of the chi-square distribution (significance 0.001), by degrees of freedom.
pub fn critical_0_001(df: usize) -> f64 {
    [0.0, 10.828, 13.816, 16.266, 18.467, 20.515, 22.458, 24.322, 26.124, 27.877, 29.588][df]
}

/// Runs `cmd` to completion with stdout and stderr captured, killing it (and failing the test)
/// after `secs` seconds: for inputs that used to hang or grow without bound.
pub fn output_within(cmd: &mut std::process::Command, secs: u64) -> std::process::Output {
    use std::process::Stdio;
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while child.try_wait().expect("wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("wait");
            panic!("{cmd:?} ran past {secs} s: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().expect("wait")
}

//! The generic generation core: executor primitives (`top_k`, `reorder_sequences`) on the CPU
//! reference, the phase hooks `bench` times through, and the model registry.

mod common;

use std::path::Path;
use std::sync::Arc;

use glimpse::backend::cpu::CpuExecutor;
use glimpse::backend::{host_top_k, Executor};
use glimpse::generate::{generate_with, Hooks};
use glimpse::graph::{Graph, WeightTable};
use glimpse::{Device, Model};
use serde_json::{json, Value};

fn cpu_with(rows: usize, cols: usize, data: &[f32]) -> (CpuExecutor, glimpse::graph::Buf) {
    let mut g = Graph::new();
    let buf = g.buffer("x", rows, cols);
    let mut exec = CpuExecutor::new(Arc::new(WeightTable::default()), &g.buffers);
    exec.write(buf, data).unwrap();
    (exec, buf)
}

/// top_k ranks by logit (ties to the lower id), and each log-prob is the row's log-softmax.
#[test]
fn top_k_ranks_rows_with_log_softmax() {
    let rows = [0.5f32, 2.0, -1.0, 2.0, 1.0, /* row 2 */ 3.0, 0.0, 0.0, -2.0, 0.0];
    let (mut exec, buf) = cpu_with(2, 5, &rows);
    let got = exec.top_k(buf, 2, 3).unwrap();
    let ids: Vec<Vec<u32>> = got.iter().map(|r| r.iter().map(|c| c.token).collect()).collect();
    assert_eq!(ids, vec![vec![1, 3, 4], vec![0, 1, 2]]);
    for (r, row) in rows.chunks(5).enumerate() {
        let lse = row.iter().map(|&v| f64::from(v).exp()).sum::<f64>().ln();
        for c in &got[r] {
            assert!((c.logprob - (f64::from(row[c.token as usize]) - lse)).abs() < 1e-12, "{c:?}");
        }
    }
    // k = 1 is the greedy pick (first max), k beyond the vocabulary returns the whole row sorted.
    assert_eq!(exec.top_k(buf, 2, 1).unwrap().iter().map(|r| r[0].token).collect::<Vec<_>>(), vec![1, 0]);
    assert_eq!(host_top_k(&rows, 2, 99)[0].len(), 5);
    assert_eq!(host_top_k(&rows, 2, 99)[0][0], exec.top_k(buf, 1, 1).unwrap()[0][0]);
}

/// reorder_sequences copies whole sequences (repeats and drops allowed), and rejects a request
/// that does not match the buffer's sequences, naming the buffer.
#[test]
fn reorder_sequences_moves_whole_sequences() {
    // 3 sequences x 2 rows x 2 cols.
    let data: Vec<f32> = (0..12).map(|v| v as f32).collect();
    let (mut exec, buf) = cpu_with(6, 2, &data);
    exec.reorder_sequences(&[buf], 2, &[2, 0, 2]).unwrap();
    assert_eq!(exec.read(buf, 6).unwrap(), vec![8., 9., 10., 11., 0., 1., 2., 3., 8., 9., 10., 11.]);
    let err = exec.reorder_sequences(&[buf], 2, &[0, 1]).unwrap_err().to_string();
    assert!(err.contains("`x`") && err.contains("not 2 sequences"), "{err}");
    let err = exec.reorder_sequences(&[buf], 2, &[0, 1, 3]).unwrap_err().to_string();
    assert!(err.contains("source sequence 3"), "{err}");
}

/// The phase hook sees every phase of the real loop in order, and stopping after the prefill
/// returns without decoding: bench's stage timings go through this loop.
#[test]
fn phase_hook_reports_each_phase_and_can_stop() {
    let model = Model::load(common::model_dir("blip2-opt-tiny"), Device::Cpu).unwrap();
    let ids = model.input_ids(None).unwrap();
    let px = model.preprocess(&common::image("odd_257x181.png")).unwrap();
    let opts = glimpse::GenerateOptions { max_new_tokens: Some(4), ..Default::default() };
    let plan = model.family.plan(1, ids.len(), 4, false).unwrap();
    let mut exec = model.executor(&plan.graph).unwrap();
    let mut seen = Vec::new();
    let mut on_phase = |name: &str, ms: f64| {
        assert!(ms >= 0.0);
        seen.push(name.to_string());
        true
    };
    let mut tokens = 0;
    let mut on_token = |_: &glimpse::TokenEvent| tokens += 1;
    let (seqs, timings) = generate_with(
        &plan,
        exec.as_mut(),
        &[("pixels", &px.data)],
        &ids,
        &opts,
        &mut Hooks { on_token: &mut on_token, on_phase: Some(&mut on_phase) },
    )
    .unwrap();
    assert_eq!(seen, ["vision", "qformer", "prefill", "decode", "decode", "decode"]);
    assert_eq!((seqs[0].tokens.len(), tokens, timings.decode_steps), (4, 4, 3));
    // The hooked run decodes exactly as the plain one.
    let plain = model.run_ids(std::slice::from_ref(&px), &ids, &opts, &mut |_| {}).unwrap().0;
    assert_eq!(plain[0].tokens, seqs[0].tokens);
    assert_eq!(plain[0].logprobs, seqs[0].logprobs);

    let mut stop = |name: &str, _: f64| name != "prefill";
    let (seqs, timings) = generate_with(
        &plan,
        exec.as_mut(),
        &[("pixels", &px.data)],
        &ids,
        &opts,
        &mut Hooks { on_token: &mut |_| {}, on_phase: Some(&mut stop) },
    )
    .unwrap();
    assert!(seqs[0].tokens.is_empty());
    assert_eq!(timings.decode_steps, 0);
    // A missing input is named.
    let err = glimpse::generate::generate(&plan, exec.as_mut(), &[], &ids, &opts, &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("`pixels`"), "{err}");
}

/// A cancelled request stops before its next phase and returns what it generated: cancelling
/// from the first token's callback leaves exactly that token (greedy and sampled), and a flag
/// cancelled up front runs nothing.
#[test]
fn cancel_stops_the_request_at_the_next_phase() {
    let model = Model::load(common::model_dir("blip2-opt-tiny"), Device::Cpu).unwrap();
    let image = common::image("odd_257x181.png");
    let px = model.preprocess(&image).unwrap();
    for do_sample in [false, true] {
        let cancel = glimpse::Cancel::new();
        let opts = glimpse::GenerateOptions {
            max_new_tokens: Some(12),
            min_new_tokens: 12,
            do_sample,
            seed: Some(3),
            cancel: Some(cancel.clone()),
            ..model.default_options()
        };
        let mut seen = 0;
        let out = model
            .caption_pixels(&px, &opts, &mut |_| {
                seen += 1;
                cancel.cancel();
            })
            .unwrap();
        assert_eq!((out.tokens.len(), seen), (1, 1), "do_sample {do_sample}: {:?}", out.tokens);
        let full = model.caption_pixels(&px, &glimpse::GenerateOptions { cancel: None, ..opts }, &mut |_| {}).unwrap();
        assert_eq!(full.tokens.len(), 12);
        assert_eq!(full.tokens[0], out.tokens[0]);
    }
    let cancel = glimpse::Cancel::new();
    cancel.cancel();
    let opts = glimpse::GenerateOptions { cancel: Some(cancel), ..model.default_options() };
    let out = model.caption(&image, &opts).unwrap();
    assert!(out.tokens.is_empty(), "{:?}", out.tokens);
}

/// Timings keep their JSON shape: one `{phase}_ms` per encoder beside the decoder stages.
#[test]
fn timings_serialize_encoders_by_phase_name() {
    let model = Model::load(common::model_dir("blip2-opt-tiny"), Device::Cpu).unwrap();
    let opts = glimpse::GenerateOptions { max_new_tokens: Some(2), ..Default::default() };
    let out = model.caption(&common::image("odd_257x181.png"), &opts).unwrap();
    let v = serde_json::to_value(&out.timings).unwrap();
    for key in ["vision_ms", "qformer_ms", "prefill_ms", "decode_ms", "decode_steps", "first_token_ms", "total_ms"] {
        assert!(v.get(key).is_some(), "{key} missing from {v}");
    }
    assert!(out.timings.encoder_ms("vision") > 0.0);
}

fn parse_err(v: &Value) -> String {
    glimpse::models::ModelConfig::from_slice(&serde_json::to_vec(v).unwrap(), Path::new("config.json"))
        .unwrap_err()
        .to_string()
}

/// The registry: a known model_type parses through its family; a LLaMA language model in BLIP-2
/// is "not supported yet" naming its model_type; unknown model types list what runs.
#[test]
fn registry_routes_by_model_type() {
    assert!(glimpse::models::model_types()
        .any(|e| e.name == "blip-2" && e.architectures.contains(&"Blip2ForConditionalGeneration")));
    let text = std::fs::read_to_string(common::model_dir("blip2-opt-tiny").join("config.json")).unwrap();
    let mut cfg: Value = serde_json::from_str(&text).unwrap();
    cfg["text_config"] = json!({"model_type": "llama", "hidden_size": "not an OPT field"});
    let err = parse_err(&cfg);
    assert!(err.contains("`llama` is not supported yet"), "{err}");
    // T5 runs (BLIP-2 Flan-T5): its fields are read as T5's.
    cfg["text_config"] = json!({"model_type": "t5", "d_ff": "not a number"});
    let err = parse_err(&cfg);
    assert!(err.contains("`text_config.d_ff`"), "{err}");
    assert!(glimpse::models::model_types().any(|e| e.name == "llava"));
    let err = parse_err(&json!({"model_type": "idefics2", "architectures": ["Idefics2ForConditionalGeneration"]}));
    assert!(err.contains("model_type `idefics2`") && err.contains("blip-2 (OPT, Flan-T5)"), "{err}");
    // A text_config field of the wrong type is named with its section.
    let mut cfg: Value = serde_json::from_str(&text).unwrap();
    cfg["text_config"]["ffn_dim"] = json!("wide");
    assert!(parse_err(&cfg).contains("`text_config.ffn_dim`"), "{}", parse_err(&cfg));
}

//! BLIP-2 Flan-T5 (tests/fixtures/blip2-flan-t5-tiny) on the CPU executor against transformers
//! 5.17 (fp32 math on the same fp16-rounded weights; goldens from scripts/fixtures_t5.py): the
//! relative-position buckets, every stage, greedy and beam generation, and what fp16 activations
//! (the GPU's storage, emulated) cost.

mod common;

use std::sync::Arc;

use glimpse::backend::cpu::CpuExecutor;
use glimpse::backend::Executor;
use glimpse::models::t5::relative_position_bucket;
use glimpse::{Device, GenerateOptions, Model};

const NAME: &str = "blip2-flan-t5-tiny";
/// The BLIP-2 bars of tests/blip2_parity.rs: both sides compute in f32 from the same fp16
/// weights and differ only in summation order.
const STAGE_REL: f64 = 1e-5;
const STAGE_ABS: f64 = 1e-4;
const LOGPROB_ABS: f64 = 1e-4;

fn golden() -> serde_json::Value {
    common::golden_json(&format!("t5_{NAME}.json"))
}

fn load() -> Model {
    Model::load(common::model_dir(NAME), Device::Cpu).expect("fixture model loads")
}

#[test]
fn relative_position_buckets_match_transformers() {
    let b = &golden()["buckets"];
    let rel: Vec<i64> = b["relative_position"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
    for (key, bidirectional, nb, maxd) in [
        ("bi_32_128", true, 32, 128),
        ("causal_32_128", false, 32, 128),
        ("bi_8_20", true, 8, 20),
        ("causal_8_20", false, 8, 20),
    ] {
        let want = common::ids(&b[key]);
        for (r, w) in rel.iter().zip(want) {
            assert_eq!(relative_position_bucket(*r, bidirectional, nb, maxd) as u32, w, "{key}: relative position {r}");
        }
    }
    // docs/models/t5.md#relative-position-bias's tables: encoder n=91 is the last log bucket, decoder n=113 saturates.
    assert_eq!(relative_position_bucket(-91, true, 32, 128), 15);
    assert_eq!(relative_position_bucket(-90, true, 32, 128), 14);
    assert_eq!(relative_position_bucket(100, true, 32, 128), 31);
    assert_eq!(relative_position_bucket(-113, false, 32, 128), 31);
    assert_eq!(relative_position_bucket(5, false, 32, 128), 0);
}

#[test]
fn tokenizer_matches_transformers() {
    let model = load();
    for (text, want) in golden()["tokens"].as_object().unwrap() {
        assert_eq!(model.tokenizer.encode(text).unwrap(), common::ids(want), "{text:?}");
    }
}

/// Worst (max abs, relative) error of each stage over the golden cases, on `make`'s executor.
fn stage_errors(model: &Model, make: impl Fn(&glimpse::graph::Graph) -> CpuExecutor) -> Vec<(String, f64, f64)> {
    let goldens = common::goldens(&format!("t5_{NAME}.safetensors"));
    let mut out = Vec::new();
    for case in golden()["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let items = case["items"].as_array().unwrap();
        let batch = items.len();
        let pixels: Vec<f32> = items
            .iter()
            .flat_map(|it| model.preprocess(&common::image(it["image"].as_str().unwrap())).unwrap().data)
            .collect();
        let ids = model.input_ids(case["prompt"].as_str()).unwrap();
        assert_eq!(ids, common::ids(&case["input_ids"]), "{name}: encoder input ids");
        let plan = model.family.plan(batch, ids.len(), 1, false).unwrap();
        let mut exec = make(&plan.graph);
        exec.write(plan.input("pixels").unwrap(), &pixels).unwrap();
        exec.set_tokens(&ids.repeat(batch));
        exec.set_position(0);
        let write_step = |exec: &mut CpuExecutor, phase: &str, position: usize| {
            for s in plan.step_inputs.iter().filter(|s| s.phase == phase) {
                exec.write(s.buf, &(s.fill)(position)).unwrap();
            }
        };
        for phase in &plan.encoders {
            write_step(&mut exec, phase.name, 0);
            exec.run(phase).unwrap();
        }
        for (key, output) in [
            ("vision", "vision_out"),
            ("qformer", "qformer_out"),
            ("image_embeds", "image_embeds"),
            ("encoder", "encoder_out"),
        ] {
            let Ok((want, shape)) = goldens.f32(&format!("{name}.{key}")) else { continue };
            let (max, rel) = common::errors(&exec.read(plan.output(output).unwrap(), shape[0]).unwrap(), &want);
            out.push((format!("{name}.{key}"), max, rel));
        }
        write_step(&mut exec, "prefill", 0);
        exec.set_tokens(&vec![0; batch]);
        exec.run(&plan.prefill.phase).unwrap();
        let (want, _) = goldens.f32(&format!("{name}.first_logits")).unwrap();
        let (max, rel) = common::errors(&exec.read(plan.prefill.logits, batch).unwrap(), &want);
        out.push((format!("{name}.first_logits"), max, rel));
    }
    out
}

#[test]
fn stages_match_transformers() {
    let model = load();
    let errors = stage_errors(&model, |g| CpuExecutor::new(Arc::clone(model.family.weights()), &g.buffers));
    // 4 cases x (Q-Former, projection, encoder, first logits), plus vision for the first.
    assert_eq!(errors.len(), 17, "{errors:?}");
    for (stage, max, rel) in errors {
        assert!(rel <= STAGE_REL && max <= STAGE_ABS, "{stage}: rel {rel:e} max abs {max:e}");
    }
}

/// Greedy tokens identical, log-probs within LOGPROB_ABS, same text, for captions, a question
/// and a batch of two images (transformers' default of 20 new tokens, EOS `</s>`).
#[test]
fn generation_matches_transformers() {
    let model = load();
    let opts = model.default_options();
    assert_eq!((opts.max_new_tokens, opts.eos_token_ids.clone()), (None, vec![1]));
    for case in golden()["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let items = case["items"].as_array().unwrap();
        let pixels: Vec<_> =
            items.iter().map(|it| model.preprocess(&common::image(it["image"].as_str().unwrap())).unwrap()).collect();
        let outs = model.run(&pixels, case["prompt"].as_str(), &opts, &mut |_| {}).unwrap();
        for (b, (out, it)) in outs.iter().zip(items).enumerate() {
            assert_eq!(out.tokens, common::ids(&it["generated_ids"]), "{name}[{b}]: greedy tokens");
            for (i, (got, want)) in out.logprobs.iter().zip(common::floats(&it["logprobs"])).enumerate() {
                assert!((got - want).abs() <= LOGPROB_ABS, "{name}[{b}] step {i}: logprob {got} vs {want}");
            }
            assert_eq!(out.text, it["text"].as_str().unwrap(), "{name}[{b}]: text");
        }
    }
}

#[test]
fn ask_uses_the_blip2_question_template() {
    let model = load();
    let g = golden();
    let case = g["cases"].as_array().unwrap().iter().find(|c| c["name"] == "question_tall").unwrap();
    let item = &case["items"][0];
    let q = case["prompt"].as_str().unwrap().strip_prefix("Question: ").unwrap().strip_suffix(" Answer:").unwrap();
    let out = model.ask(&common::image(item["image"].as_str().unwrap()), q, &model.default_options()).unwrap();
    assert_eq!(out.tokens, common::ids(&item["generated_ids"]));
}

/// Questions of different lengths in one batch: the encoder inputs are left-padded and masked
/// (encoder self-attention and the decoder's cross-attention), which T5's relative positions
/// make equal to transformers' right padding; each row must give what its question gives alone
/// (the golden's question_tall answer among them), with its log-probs.
#[test]
fn padded_questions_answer_as_alone() {
    let model = load();
    let g = golden();
    let case = g["cases"].as_array().unwrap().iter().find(|c| c["name"] == "question_tall").unwrap();
    let item = &case["items"][0];
    let q = case["prompt"].as_str().unwrap().strip_prefix("Question: ").unwrap().strip_suffix(" Answer:").unwrap();
    let images = [common::image(item["image"].as_str().unwrap()), common::image("wide_301x97.png")];
    let questions = [q, "why?"];
    let ids: Vec<usize> =
        questions.iter().map(|q| model.input_ids(Some(&model.question_prompt(q))).unwrap().len()).collect();
    assert_ne!(ids[0], ids[1], "the questions must pad");
    let opts = model.default_options();
    let refs: Vec<&std::path::Path> = images.iter().map(|p| p.as_path()).collect();
    let batch = model.ask_batch(&refs, &questions, &opts).unwrap();
    assert_eq!(batch[0].tokens, common::ids(&item["generated_ids"]), "the golden answer in a padded batch");
    for (i, (image, q)) in images.iter().zip(questions).enumerate() {
        let alone = model.ask(image, q, &opts).unwrap();
        assert_eq!(batch[i].tokens, alone.tokens, "row {i}: tokens");
        for (a, b) in batch[i].logprobs.iter().zip(&alone.logprobs) {
            assert!((a - b).abs() <= 1e-9, "row {i}: logprob {a} vs {b} (masked keys weigh exactly 0)");
        }
    }
}

/// Beam search reorders the decoder's self-attention caches; the cross-attention keys and
/// values are shared by an input's beams. transformers: 3 beams on caption_wide.
#[test]
fn beam_search_matches_transformers() {
    let model = load();
    let g = golden();
    let case = g["cases"].as_array().unwrap().iter().find(|c| c["name"] == "caption_wide").unwrap();
    let opts = GenerateOptions { num_beams: 3, ..model.default_options() };
    let out = model.caption(&common::image(case["items"][0]["image"].as_str().unwrap()), &opts).unwrap();
    assert_eq!(out.tokens, common::ids(&case["beam3"]["generated_ids"]));
    let score = out.score.unwrap();
    let want = case["beam3"]["score"].as_f64().unwrap();
    assert!((score - want).abs() < 1e-4, "beam score {score} vs {want}");
}

/// fp16 activations (the CUDA executor's storage) emulated on the CPU, with the residual
/// streams in fp32 as the model declares them (transformers keeps `wo` in fp32 under fp16,
/// which makes the stream fp32; Flan-T5-XL overflows fp16 without it, which a tiny random model
/// cannot show). Measured relative errors against the fp32 goldens: vision 4.8e-4, Q-Former
/// 6.7e-4, projection 7.6e-4, encoder output 2.1e-3 (max abs 1.3e-2), first logits 1.9e-3 (max
/// abs 1.1e-2); the shared GPU bar (common::GPU_STAGE_REL, 1e-2) holds with ~5x headroom.
#[test]
fn fp16_emulation_stays_within_the_gpu_bar() {
    let model = load();
    let errors = stage_errors(&model, |g| {
        let mut exec = CpuExecutor::new(Arc::clone(model.family.weights()), &g.buffers);
        exec.emulate_fp16(|_| false);
        exec
    });
    let worst = errors.iter().map(|e| e.2).fold(0.0, f64::max);
    eprintln!("fp16 emulation: {errors:?}");
    assert!(worst <= common::GPU_STAGE_REL, "{errors:?}");
    // fp16 storage must change something: the emulation is really on.
    assert!(worst > 1e-5, "{errors:?}");
}

#[test]
fn info_describes_the_t5_decoder() {
    let model = load();
    let lines = model.family.describe().join("\n");
    assert!(lines.contains("T5 encoder-decoder"), "{lines}");
    assert!(lines.contains("2 encoder + 2 decoder layers, d_model 32, 3 heads x 16, ff 48 (gated gelu)"), "{lines}");
    assert!(lines.contains("8 buckets / max distance 20, head unscaled"), "{lines}");
}

/// The fixture's config.json with `edit` applied to its text_config, parsed.
fn text_config(
    edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
) -> glimpse::Result<glimpse::models::t5::T5Config> {
    let path = common::model_dir(NAME).join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(v["text_config"].as_object_mut().unwrap());
    let cfg = glimpse::models::ModelConfig::from_slice(v.to_string().as_bytes(), &path)?;
    match &cfg.get::<glimpse::models::blip2::Blip2Config>().expect("not BLIP-2").text_config {
        glimpse::models::language_model::TextConfig::T5(t) => Ok(t.clone()),
        other => panic!("parsed as {}", other.model_type()),
    }
}

/// transformers 5.17's T5Config rules (docs/models/t5.md#config, #lm-head): an explicit `dense_act_fn` beats
/// `feed_forward_proj` ("gated-gelu" alone means gelu_new); output scaling follows
/// `scale_decoder_outputs`, else `tie_word_embeddings != false`; the decoder starts from
/// `decoder_start_token_id`, else `bos_token_id`.
#[test]
fn t5_config_resolves_as_transformers() {
    let t = text_config(|_| {}).unwrap();
    assert_eq!(
        (t.act_name().as_str(), t.is_gated(), t.scale_outputs(), t.decoder_start()),
        ("gelu", true, false, Some(0))
    );
    let t = text_config(|c| drop(c.remove("dense_act_fn"))).unwrap();
    assert_eq!(t.act_name(), "gelu_new");
    let t = text_config(|c| {
        c.remove("scale_decoder_outputs");
        c.insert("feed_forward_proj".into(), "relu".into());
        c.remove("dense_act_fn");
    })
    .unwrap();
    assert_eq!((t.act_name().as_str(), t.is_gated(), t.scale_outputs()), ("relu", false, true));
    let t = text_config(|c| {
        c.remove("scale_decoder_outputs");
        c.insert("tie_word_embeddings".into(), false.into());
    })
    .unwrap();
    assert!(!t.scale_outputs());
    let t = text_config(|c| drop(c.remove("decoder_start_token_id"))).unwrap();
    assert_eq!(t.decoder_start(), Some(1));
}

#[test]
fn bad_t5_configs_name_the_field() {
    for (key, value, needle) in [
        ("feed_forward_proj", serde_json::json!("gated-gelu-x"), "text_config.feed_forward_proj"),
        ("dense_act_fn", serde_json::json!("swish"), "text_config.dense_act_fn"),
        ("relative_attention_num_buckets", serde_json::json!(2), "relative_attention_num_buckets"),
        ("d_kv", serde_json::json!(0), "text_config.d_kv"),
        ("eos_token_id", serde_json::json!(5000), "text_config.eos_token_id"),
    ] {
        let err = text_config(|c| drop(c.insert(key.into(), value.clone()))).unwrap_err().to_string();
        assert!(err.contains(needle), "{key}={value}: {err}");
    }
    let err = text_config(|c| {
        c.remove("decoder_start_token_id");
        c.remove("bos_token_id");
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("decoder_start_token_id"), "{err}");
}

//! LLaVA-1.5 on the CPU executor against transformers 5.17 (fp32 math on the same fp16 weights;
//! goldens from scripts/fixtures_llava.py): the CLIP vision tower's hidden states and pooled
//! output, pixels, prompt ids, features, projector output, logits, greedy tokens and log-probs.

mod common;

use std::sync::Arc;

use glimpse::backend::cpu::CpuExecutor;
use glimpse::backend::Executor;
use glimpse::graph::{Graph, Phase, WeightTable};
use glimpse::models::clip_vision::ClipVisionConfig;
use glimpse::models::clip_vision::{find_prefix, ClipVision, VisionRequest};
use glimpse::models::Loader;
use glimpse::weights::Checkpoint;

/// BLIP-2's bars (tests/blip2_parity.rs): f32 on both sides, different summation orders.
const STAGE_REL: f64 = 1e-5;
const STAGE_ABS: f64 = 1e-4;

fn vision_config(model: &str) -> ClipVisionConfig {
    let text = std::fs::read_to_string(common::model_dir(model).join("config.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    serde_json::from_value(v["vision_config"].clone()).unwrap()
}

fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    let (max, rel) = common::errors(got, want);
    assert!(rel <= STAGE_REL && max <= STAGE_ABS, "{what}: rel {rel:e} max abs {max:e}");
}

/// Every hidden state (0 = after pre_layrnorm) and the pooled CLS of CLIPVisionModel, from the
/// 5.17 save layout (`vision_tower.` without `vision_model.`).
#[test]
fn clip_vision_hidden_states_and_pooled_match_transformers() {
    let cfg = vision_config("llava-tiny");
    let ckpt = Checkpoint::open_dir(&common::model_dir("llava-tiny")).unwrap();
    let prefix = find_prefix(&ckpt, &["vision_tower.vision_model.", "vision_tower."]).expect("a vision tower");
    assert_eq!(prefix, "vision_tower.");
    let mut table = WeightTable::default();
    let tower =
        ClipVision::load(&cfg, &mut Loader { ckpt: &ckpt, table: &mut table }, prefix, cfg.num_hidden_layers, true)
            .unwrap();
    let goldens = common::goldens("llava_llava-tiny.safetensors");
    let (pixels, _) = goldens.f32("single.pixels").unwrap();
    let layers: Vec<usize> = (0..=cfg.num_hidden_layers).collect();
    let mut g = Graph::new();
    let px = g.buffer("pixels", 1, pixels.len());
    let req = VisionRequest { hidden_states: layers.clone(), skip_rows: 0, pooled: true };
    let out = tower.emit(&mut g, "vision", px, 1, &req).unwrap();
    let phase: Phase = g.take_phase("vision");
    let mut exec = CpuExecutor::new(Arc::new(table), &g.buffers);
    exec.write(px, &pixels).unwrap();
    exec.run(&phase).unwrap();
    for (&i, &buf) in layers.iter().zip(&out.hidden_states) {
        let (want, shape) = goldens.f32(&format!("single.hidden_states.{i}")).unwrap();
        assert_close(&format!("hidden_states[{i}]"), &exec.read(buf, shape[1]).unwrap(), &want);
    }
    let (want, _) = goldens.f32("single.pooled").unwrap();
    assert_close("pooler_output", &exec.read(out.pooled.unwrap(), 1).unwrap(), &want);
}

/// A tower loaded with fewer layers runs only those, drops CLS on request, and refuses a
/// request it cannot serve (the pooled output needs every layer).
#[test]
fn clip_vision_stops_early_and_skips_cls() {
    let cfg = vision_config("llava-tiny");
    let ckpt = Checkpoint::open_dir(&common::model_dir("llava-tiny")).unwrap();
    let mut table = WeightTable::default();
    let tower =
        ClipVision::load(&cfg, &mut Loader { ckpt: &ckpt, table: &mut table }, "vision_tower.", 2, false).unwrap();
    let goldens = common::goldens("llava_llava-tiny.safetensors");
    let (pixels, _) = goldens.f32("single.pixels").unwrap();
    let mut g = Graph::new();
    let px = g.buffer("pixels", 1, pixels.len());
    let pooled = VisionRequest { hidden_states: vec![2], skip_rows: 1, pooled: true };
    assert!(tower.emit(&mut g, "v", px, 1, &pooled).is_err());
    let req = VisionRequest { hidden_states: vec![2], skip_rows: 1, pooled: false };
    let out = tower.emit(&mut g, "vision", px, 1, &req).unwrap();
    let phase = g.take_phase("vision");
    assert_eq!(phase.ops.iter().filter(|op| op.kind() == "attention").count(), 2, "layers past 2 are not run");
    let mut exec = CpuExecutor::new(Arc::new(table), &g.buffers);
    exec.write(px, &pixels).unwrap();
    exec.run(&phase).unwrap();
    let tokens = cfg.num_positions();
    let (want, _) = goldens.f32("single.hidden_states.2").unwrap();
    let d = cfg.hidden_size;
    assert_close("hidden_states[2][1:]", &exec.read(out.hidden_states[0], tokens - 1).unwrap(), &want[d..]);
}

#[test]
fn hidden_state_indices_follow_python() {
    use glimpse::models::clip_vision::resolve_layer;
    assert_eq!(resolve_layer(-2, 24, "vision_feature_layer"), Ok(23));
    assert_eq!(resolve_layer(-1, 24, "f"), Ok(24));
    assert_eq!(resolve_layer(0, 24, "f"), Ok(0));
    assert_eq!(resolve_layer(-25, 24, "f"), Ok(0));
    assert!(resolve_layer(-26, 24, "f").unwrap_err().contains("`f` is -26"));
    assert!(resolve_layer(25, 24, "f").is_err());
}

// ---- the LLaVA family ------------------------------------------------------------------------

use glimpse::{Device, Model};

const LOGPROB_ABS: f64 = 1e-4;

fn load(model: &str) -> Model {
    Model::load(common::model_dir(model), Device::Cpu).expect("fixture model loads")
}

fn cases(model: &str) -> Vec<serde_json::Value> {
    common::golden_json(&format!("llava_{model}.json"))["cases"].as_array().unwrap().clone()
}

fn images(case: &serde_json::Value) -> Vec<std::path::PathBuf> {
    case["images"].as_array().unwrap().iter().map(|i| common::image(i.as_str().unwrap())).collect()
}

/// The chat template renders the goldens' prompt string, and the expanded, tokenized prompt is
/// transformers' input_ids (BOS, `▁` handling after special tokens, byte fallback).
#[test]
fn prompts_match_the_processor() {
    for name in ["llava-tiny", "llava-tiny-variant"] {
        let model = load(name);
        let chat = model.chat.as_ref().expect("a chat template");
        for case in cases(name) {
            let (n, text) = (case["images"].as_array().unwrap().len(), case["text"].as_str().unwrap());
            assert_eq!(chat.user_prompt(n, text).unwrap(), case["prompt"].as_str().unwrap(), "{name} prompt");
            assert_eq!(model.chat_input_ids(n, text).unwrap(), common::ids(&case["input_ids"]), "{name} ids");
        }
    }
}

fn check_tokens(tok: &glimpse::tokenizer::Tokenizer, g: &serde_json::Value, what: &str) {
    for e in g["encode"].as_array().unwrap() {
        let text = e["text"].as_str().unwrap();
        assert_eq!(tok.encode(text).unwrap(), common::ids(&e["ids"]), "{what}: encode {text:?}");
    }
    for d in g["decode"].as_array().unwrap() {
        assert_eq!(tok.decode(&common::ids(&d["ids"]), true).unwrap(), d["text"].as_str().unwrap(), "{what}");
    }
}

/// A llava folder: AutoTokenizer ignores the hub's LlamaTokenizer class (model_type llava) and
/// keeps tokenizer.json's legacy normalizer (`▁` after `<image>` before a newline).
#[test]
fn llava_tokenizer_is_tokenizer_json_as_is() {
    let g = common::golden_json("llava_tokens.json");
    check_tokens(&load("llava-tiny").tokenizer, &g["llava_auto"], "llava folder");
}

/// The same files under a llama model_type: 5.17's LlamaTokenizer rebuild (Metaspace "first",
/// no `▁` after special tokens, byte fallback).
#[test]
fn llama_tokenizer_follows_the_5_17_rebuild() {
    let dir = common::tempdir();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(common::model_dir("llava-tiny").join(f), dir.path().join(f)).unwrap();
    }
    std::fs::write(dir.path().join("config.json"), r#"{"model_type": "llama"}"#).unwrap();
    let tok = glimpse::tokenizer::Tokenizer::from_dir(dir.path()).unwrap();
    check_tokens(&tok, &common::golden_json("llava_tokens.json")["llama_class"], "LlamaTokenizer");
}

#[test]
fn pixels_match_clip_image_processor() {
    let model = load("llava-tiny");
    let goldens = common::goldens("llava_llava-tiny.safetensors");
    for case in cases("llava-tiny").iter().filter(|c| c["images"].as_array().unwrap().len() == 1) {
        let name = case["name"].as_str().unwrap();
        let px = model.preprocess(&images(case)[0]).unwrap();
        let (want, _) = goldens.f32(&format!("{name}.pixels")).unwrap();
        let (max, _) = common::errors(&px.data, &want);
        assert!(max <= 1e-6, "{name}: pixels differ by {max:e}");
    }
}

/// Features, projector output and the prefill logits of the text after the images, per case.
fn check_stages(name: &str) {
    let model = load(name);
    let goldens = common::goldens(&format!("llava_{name}.safetensors"));
    for case in cases(name) {
        let cname = case["name"].as_str().unwrap();
        let pixels: Vec<f32> = images(&case).iter().flat_map(|p| model.preprocess(p).unwrap().data).collect();
        let ids = common::ids(&case["input_ids"]);
        let n = case["images"].as_array().unwrap().len();
        let plan = model
            .family
            .plan_for(&glimpse::generate::PlanShape {
                images: n,
                sequences: 1,
                prompt_len: ids.len(),
                max_new_tokens: 1,
                text_rows: 0,
                all_prefill_logits: true,
            })
            .unwrap();
        let mut exec = CpuExecutor::new(Arc::clone(model.family.weights()), &plan.graph.buffers);
        exec.write(plan.input("pixels").unwrap(), &pixels).unwrap();
        for phase in &plan.encoders {
            exec.run(phase).unwrap();
        }
        for key in ["features", "image_features"] {
            let (want, shape) = goldens.f32(&format!("{cname}.{key}")).unwrap();
            let got = exec.read(plan.output(key).unwrap(), shape[0] * shape[1]).unwrap();
            assert_close(&format!("{name} {cname} {key}"), &got, &want);
        }
        exec.set_tokens(&ids);
        exec.set_position(0);
        exec.run(&plan.prefill.phase).unwrap();
        let (want, shape) = goldens.f32(&format!("{cname}.logits")).unwrap();
        let all = exec.read(plan.prefill.logits, ids.len()).unwrap();
        let tail = &all[(ids.len() - shape[0]) * shape[1]..];
        assert_close(&format!("{name} {cname} logits"), tail, &want);
    }
}

fn check_generation(name: &str) {
    let model = load(name);
    let opts = model.default_options();
    assert_eq!((opts.max_new_tokens, opts.eos_token_ids.clone()), (None, vec![2]), "generation_config.json");
    for case in cases(name) {
        let paths = images(&case);
        let refs: Vec<&std::path::Path> = paths.iter().map(|p| p.as_path()).collect();
        let opts = glimpse::GenerateOptions { max_new_tokens: Some(8), ..model.default_options() };
        let out = model.ask_images(&refs, case["text"].as_str().unwrap(), &opts).unwrap();
        let cname = case["name"].as_str().unwrap();
        assert_eq!(out.tokens, common::ids(&case["generated_ids"]), "{name} {cname}: greedy tokens");
        for (i, (got, want)) in out.logprobs.iter().zip(common::floats(&case["logprobs"])).enumerate() {
            assert!((got - want).abs() <= LOGPROB_ABS, "{name} {cname} step {i}: logprob {got} vs {want}");
        }
        assert_eq!(out.text, case["decoded"].as_str().unwrap(), "{name} {cname}: text");
    }
}

#[test]
fn tiny_stages_match_transformers() {
    check_stages("llava-tiny");
}

#[test]
fn tiny_generation_matches_transformers() {
    check_generation("llava-tiny");
}

/// vision_feature_layer [-1, 1] (concatenated), "full" strategy, llama3 RoPE, attention and MLP
/// biases, tied embeddings, projector without bias.
#[test]
fn variant_matches_transformers() {
    check_stages("llava-tiny-variant");
    check_generation("llava-tiny-variant");
}

/// `caption` on a chat model asks the documented instruction about the image.
#[test]
fn caption_uses_the_default_instruction() {
    let model = load("llava-tiny");
    let g = common::golden_json("llava_llava-tiny.json");
    assert_eq!(g["caption_instruction"].as_str().unwrap(), glimpse::chat::CAPTION_INSTRUCTION);
    let case = cases("llava-tiny").into_iter().find(|c| c["name"] == "caption").unwrap();
    let opts = glimpse::GenerateOptions { max_new_tokens: Some(8), ..model.default_options() };
    let out = model.caption(&images(&case)[0], &opts).unwrap();
    assert_eq!(out.tokens, common::ids(&case["generated_ids"]));
}

/// The hub layout (`vision_tower.vision_model.*`, as llava-hf checkpoints were saved by 4.36) and
/// the module-tree layout (`model.*`, `lm_head`) load to the same model as 5.17's saved layout.
#[test]
fn every_key_layout_loads_the_same_model() {
    let src = common::model_dir("llava-tiny");
    let ckpt = Checkpoint::open_dir(&src).unwrap();
    let case = cases("llava-tiny").into_iter().find(|c| c["name"] == "single").unwrap();
    let renames: [fn(&str) -> String; 2] = [
        |k| k.replacen("vision_tower.", "vision_tower.vision_model.", 1),
        |k| {
            if let Some(rest) = k.strip_prefix("language_model.model.") {
                format!("model.language_model.{rest}")
            } else if let Some(rest) = k.strip_prefix("language_model.") {
                rest.to_string()
            } else {
                format!("model.{k}")
            }
        },
    ];
    for rename in renames {
        let dir = common::tempdir();
        for f in std::fs::read_dir(&src).unwrap() {
            let f = f.unwrap().path();
            if f.extension().is_some_and(|e| e != "safetensors") {
                std::fs::copy(&f, dir.path().join(f.file_name().unwrap())).unwrap();
            }
        }
        let names: Vec<String> = ckpt.names().map(String::from).collect();
        let data: Vec<(String, Vec<u8>, Vec<usize>)> = names
            .iter()
            .map(|n| {
                let (info, bytes) = ckpt.raw_bytes(n).unwrap();
                (rename(n), bytes.to_vec(), info.shape.clone())
            })
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView)> = data
            .iter()
            .map(|(n, b, s)| {
                (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F16, s.clone(), b).unwrap())
            })
            .collect();
        safetensors::serialize_to_file(views, None, &dir.path().join("model.safetensors")).unwrap();
        let model = Model::load(dir.path(), Device::Cpu).unwrap();
        let opts = glimpse::GenerateOptions { max_new_tokens: Some(8), ..model.default_options() };
        let out = model.ask(&images(&case)[0], case["text"].as_str().unwrap(), &opts).unwrap();
        assert_eq!(out.tokens, common::ids(&case["generated_ids"]), "{:?}", rename("vision_tower.x"));
    }
}

#[test]
fn several_images_need_matching_tokens() {
    let model = load("llava-tiny");
    let px = model.preprocess(&common::image("odd_257x181.png")).unwrap();
    let ids = model.chat_input_ids(1, "hi").unwrap();
    let err = model.run_ids(&[px.clone(), px.clone(), px], &ids, &model.default_options(), &mut |_| {});
    // 3 images for 1 per sequence: 3 sequences; 2 images per prompt would not divide.
    assert!(err.is_ok());
    let two = model.chat_input_ids(2, "hi").unwrap();
    let px = model.preprocess(&common::image("odd_257x181.png")).unwrap();
    let err = model.run_ids(&[px.clone(), px.clone(), px], &two, &model.default_options(), &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("Image features and image tokens do not match"), "{err}");
}

#[test]
fn config_errors_name_the_field() {
    let text = std::fs::read_to_string(common::model_dir("llava-tiny").join("config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["vision_feature_layer"] = serde_json::json!(-5);
    let err = glimpse::models::ModelConfig::from_slice(v.to_string().as_bytes(), std::path::Path::new("config.json"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("`vision_feature_layer` is -5"), "{err}");
    v["vision_feature_layer"] = serde_json::json!(-2);
    v["text_config"]["rope_parameters"] = serde_json::json!({"rope_type": "dynamic", "factor": 2.0});
    let err = glimpse::models::ModelConfig::from_slice(v.to_string().as_bytes(), std::path::Path::new("config.json"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("rope_type") && err.contains("dynamic"), "{err}");
}

/// `glimpse ask --json` on a LLaVA folder: one image (chat template), then two with `--image`.
#[test]
fn cli_ask_single_and_several_images() {
    let bin = env!("CARGO_BIN_EXE_glimpse");
    let dir = common::model_dir("llava-tiny");
    for case in cases("llava-tiny").into_iter().filter(|c| c["name"] != "caption") {
        let imgs = images(&case);
        let mut cmd = std::process::Command::new(bin);
        cmd.args(["ask", "--device", "cpu", "--json", "--max-new-tokens", "8", "--model"]).arg(&dir);
        if imgs.len() == 1 {
            cmd.arg(&imgs[0]);
        } else {
            imgs.iter().for_each(|p| {
                cmd.arg("--image").arg(p);
            });
        }
        let out = cmd.arg(case["text"].as_str().unwrap()).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let rec: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(common::ids(&rec["tokens"]), common::ids(&case["generated_ids"]), "{}", case["name"]);
        assert_eq!(rec["text"], case["decoded"]);
    }
    // --image with IMAGE QUESTION positionals is a usage error.
    let out = std::process::Command::new(bin)
        .args(["ask", "--model"])
        .arg(&dir)
        .args(["--image", "a.png", "b.png", "question"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// A chat family generates with what its generation_config.json sets, as transformers does:
/// beams, length penalty, sampling settings, and an explicit max_length that counts the prompt.
#[test]
fn generation_config_steers_chat_models() {
    let dir = common::tempdir();
    for entry in std::fs::read_dir(common::model_dir("llava-tiny")).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
    }
    let ids_len = load("llava-tiny").chat_input_ids(1, "What is it?").unwrap().len();
    let gen = serde_json::json!({
        "eos_token_id": 2, "num_beams": 3, "length_penalty": 0.5, "early_stopping": "never",
        "temperature": 0.7, "top_k": 9, "max_length": ids_len + 4,
    });
    std::fs::write(dir.path().join("generation_config.json"), gen.to_string()).unwrap();
    let model = Model::load(dir.path(), glimpse::Device::Cpu).unwrap();
    let o = model.default_options();
    assert_eq!((o.num_beams, o.length_penalty, o.top_k, o.temperature), (3, 0.5, 9, 0.7));
    assert_eq!(o.early_stopping, glimpse::generate::EarlyStopping::Never);
    assert_eq!(o.eos_token_ids, vec![2]);
    // max_length counts the prompt: 4 new tokens at most, and the beam run honours it.
    assert_eq!(o.new_tokens(ids_len, 1 << 20).unwrap(), 4);
    let out = model.ask_images(&[&common::image("rgba_150x120.png")], "What is it?", &o).unwrap();
    assert!(!out.tokens.is_empty() && out.tokens.len() <= 4, "{:?}", out.tokens);
    assert!(out.score.is_some(), "beam search reports a score");
    // A prompt that reaches max_length is an error naming it.
    let e = o.new_tokens(ids_len + 4, 1 << 20).unwrap_err().to_string();
    assert!(e.contains("max_length"), "{e}");
}

//! InstructBLIP on the CPU executor against transformers 5.17 (fp32 math on the same fp16
//! weights): prompt and Q-Former ids, pixels, vision output, Q-Former query rows, projector
//! output, the language model's first logits, greedy tokens and log-probs for captioning,
//! questions and batches; with a Vicuna-style LLaMA decoder (scripts/fixtures_instructblip.py)
//! and with Flan-T5 ([`flan_t5`], scripts/fixtures_instructblip_t5.py).

mod common;

use std::sync::Arc;

use glimpse::backend::cpu::CpuExecutor;
use glimpse::backend::Executor;
use glimpse::models::instructblip::InstructBlip;
use glimpse::models::ModelConfig;
use glimpse::weights::Checkpoint;
use glimpse::{Device, GenerateOptions, Model};

/// BLIP-2's bars (tests/blip2_parity.rs): f32 on both sides, different summation orders.
const STAGE_REL: f64 = 1e-5;
const STAGE_ABS: f64 = 1e-4;
const LOGPROB_ABS: f64 = 1e-4;
const NAME: &str = "instructblip-tiny";

fn load() -> Model {
    Model::load(common::model_dir(NAME), Device::Cpu).expect("fixture model loads")
}

fn golden() -> serde_json::Value {
    common::golden_json("instructblip_tiny.json")
}

fn cases() -> Vec<serde_json::Value> {
    golden()["cases"].as_array().unwrap().clone()
}

fn family() -> InstructBlip {
    let dir = common::model_dir(NAME);
    let Some(cfg) = ModelConfig::load(&dir.join("config.json"))
        .unwrap()
        .get::<glimpse::models::instructblip::InstructBlipConfig>()
        .cloned()
    else {
        panic!("an InstructBLIP config")
    };
    InstructBlip::load(&cfg, &Checkpoint::open_dir(&dir).unwrap()).unwrap()
}

fn opts(model: &Model) -> GenerateOptions {
    GenerateOptions { max_new_tokens: Some(8), ..model.default_options() }
}

/// `num_query_tokens` `<image>` ids before BOS `</s>` and the prompt (LLM tokenizer), and the
/// Q-Former's `[CLS] .. [SEP]` WordPiece ids from qformer_tokenizer/, as InstructBlipProcessor.
#[test]
fn prompts_match_the_processor() {
    let (model, fam) = (load(), family());
    let g = golden();
    for case in cases() {
        let text = case["text"].as_str().unwrap();
        let ids = model.input_ids(Some(text)).unwrap();
        assert_eq!(ids, common::ids(&case["input_ids"]), "{text:?}: LLM ids");
        let nq = g["num_query_tokens"].as_u64().unwrap() as usize;
        assert!(ids[..nq].iter().all(|&t| t as u64 == g["image_token_index"].as_u64().unwrap()));
        assert_eq!(ids[nq], 2, "Vicuna's BOS is </s>");
        assert_eq!(fam.qformer_ids(text).unwrap(), common::ids(&case["qformer_input_ids"]), "{text:?}: Q-Former ids");
    }
    assert_eq!(model.question_prompt("What is it?"), "What is it?", "no template");
    for (text, want) in
        g["batch"]["texts"].as_array().unwrap().iter().zip(g["batch"]["qformer_input_ids"].as_array().unwrap())
    {
        // Left-padded with [PAD] 0: the processor hands the LLM tokenizer's padding_side over.
        let padded = common::ids(want);
        let got = fam.qformer_ids(text.as_str().unwrap()).unwrap();
        let pad = padded.len() - got.len();
        assert_eq!(got, padded[pad..], "batch Q-Former ids");
        assert!(padded[..pad].iter().all(|&t| t == 0));
    }
}

#[test]
fn pixels_match_blip_image_processor() {
    check_pixels(&load(), "instructblip_tiny", &cases());
}

/// BlipImageProcessor's pixels of each golden case (`{golden}.safetensors`, `{case}.pixels`).
fn check_pixels(model: &Model, golden: &str, cases: &[serde_json::Value]) {
    let goldens = common::goldens(&format!("{golden}.safetensors"));
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let px = model.preprocess(&common::image(case["image"].as_str().unwrap())).unwrap();
        let (want, _) = goldens.f32(&format!("{name}.pixels")).unwrap();
        let (max, _) = common::errors(&px.data, &want);
        assert!(max <= 1e-6, "{name}: pixels differ by {max:e}");
    }
}

#[test]
fn stages_match_transformers() {
    let model = load();
    let errors = common::instructblip_stage_errors(&model, "instructblip_tiny", |g| {
        Box::new(CpuExecutor::new(Arc::clone(model.family.weights()), &g.buffers))
    });
    assert_eq!(errors.len(), 4 * cases().len());
    for (case, stage, max, rel) in errors {
        assert!(rel <= STAGE_REL && max <= STAGE_ABS, "{case} {stage}: rel {rel:e} max abs {max:e}");
    }
}

/// The Q-Former of a padded batch: instructions of different lengths left-padded and masked,
/// positions counted from the first pad, give each image's query rows as transformers' batch.
#[test]
fn padded_instructions_match_transformers() {
    let (max, rel) = padded_qformer_errors(&family(), &golden()["batch"], "instructblip_tiny", "batch.qformer");
    assert!(rel <= STAGE_REL && max <= STAGE_ABS, "padded Q-Former: rel {rel:e} max abs {max:e}");
}

/// The Q-Former query rows of golden batch `b` (its instructions unpadded from its Q-Former
/// ids and mask, then padded by the family) against `{golden}.safetensors` tensor `key`.
fn padded_qformer_errors(fam: &InstructBlip, b: &serde_json::Value, golden: &str, key: &str) -> (f64, f64) {
    let ids: Vec<Vec<u32>> = b["qformer_input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .zip(b["qformer_attention_mask"].as_array().unwrap())
        .map(|(ids, mask)| {
            let keep = mask.as_array().unwrap().iter().map(|m| m.as_u64() == Some(1));
            common::ids(ids).into_iter().zip(keep).filter(|&(_, k)| k).map(|(id, _)| id).collect()
        })
        .collect();
    let text = fam.instruction_inputs(&ids).unwrap();
    let shape = glimpse::generate::PlanShape { text_rows: text.rows, ..glimpse::generate::PlanShape::new(2, 40, 1) };
    let plan = glimpse::models::Family::plan_for(fam, &shape).unwrap();
    let preprocess = Model::load(common::model_dir(NAME), Device::Cpu).unwrap();
    let px: Vec<f32> = b["images"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|i| preprocess.preprocess(&common::image(i.as_str().unwrap())).unwrap().data)
        .collect();
    let mut exec = CpuExecutor::new(Arc::clone(&fam.core.weights), &plan.graph.buffers);
    exec.write(plan.input("pixels").unwrap(), &px).unwrap();
    for (name, data) in &text.inputs {
        exec.write(plan.input(name).unwrap(), data).unwrap();
    }
    for phase in plan.encoders.iter().filter(|p| p.name != "encoder") {
        exec.run(phase).unwrap();
    }
    let (want, shape) = common::goldens(&format!("{golden}.safetensors")).f32(key).unwrap();
    let got = exec.read(plan.output("qformer_out").unwrap(), shape[0] * shape[1]).unwrap();
    common::errors(&got, &want)
}

fn check(out: &glimpse::api::Output, case: &serde_json::Value) {
    let name = case["name"].as_str().unwrap();
    assert_eq!(out.tokens, common::ids(&case["generated_ids"]), "{name}: greedy tokens");
    for (i, (got, want)) in out.logprobs.iter().zip(common::floats(&case["logprobs"])).enumerate() {
        assert!((got - want).abs() <= LOGPROB_ABS, "{name} step {i}: logprob {got} vs {want}");
    }
    assert_eq!(out.text, case["decoded"].as_str().unwrap(), "{name}: text");
}

/// `caption` is the empty instruction (transformers 5.17 cannot generate without a text), `ask`
/// sends the question verbatim to both the Q-Former and the LLM.
#[test]
fn generation_matches_transformers() {
    assert!(golden()["generate_without_text"].as_str().unwrap().contains("ones_like"));
    check_generation(&load(), &cases());
}

/// Each golden case through `caption` (the empty text) or `ask`: tokens, log-probs, text.
fn check_generation(model: &Model, cases: &[serde_json::Value]) {
    for case in cases {
        let image = common::image(case["image"].as_str().unwrap());
        let out = match case["text"].as_str().unwrap() {
            "" => model.caption(&image, &opts(model)).unwrap(),
            q => model.ask(&image, q, &opts(model)).unwrap(),
        };
        check(&out, case);
    }
}

/// Two images with questions of different lengths in one batch: each answer is transformers'
/// batched (and single) answer.
#[test]
fn batch_matches_transformers() {
    check_batch(&load(), &golden()["batch"]);
}

/// `ask_batch` over golden batch `b` (its images, and its `texts` or one `text` for all) gives
/// transformers' tokens and log-probs row by row.
fn check_batch(model: &Model, b: &serde_json::Value) {
    let paths: Vec<_> = b["images"].as_array().unwrap().iter().map(|i| common::image(i.as_str().unwrap())).collect();
    let refs: Vec<&std::path::Path> = paths.iter().map(|p| p.as_path()).collect();
    let texts: Vec<&str> = match b["texts"].as_array() {
        Some(t) => t.iter().map(|t| t.as_str().unwrap()).collect(),
        None => vec![b["text"].as_str().unwrap(); paths.len()],
    };
    let outs = model.ask_batch(&refs, &texts, &opts(model)).unwrap();
    for (i, out) in outs.iter().enumerate() {
        assert_eq!(out.tokens, common::ids(&b["generated_ids"][i]), "row {i}: greedy tokens");
        for (got, want) in out.logprobs.iter().zip(common::floats(&b["logprobs"][i])) {
            assert!((got - want).abs() <= LOGPROB_ABS, "row {i}: logprob {got} vs {want}");
        }
    }
}

/// Beam search repeats each sequence's Q-Former inputs per beam: 2 beams over the question.
#[test]
fn beam_search_runs_with_the_instruction() {
    let model = load();
    let case = &cases()[1];
    let o = GenerateOptions { num_beams: 2, ..opts(&model) };
    let out = model.ask(&common::image(case["image"].as_str().unwrap()), case["text"].as_str().unwrap(), &o).unwrap();
    assert!(!out.tokens.is_empty() && out.score.is_some());
}

/// transformers' generate() takes EOS from text_config (2) and 20 new tokens; generation_config.json
/// (the outer model's) is not read.
#[test]
fn defaults_come_from_text_config() {
    let o = load().default_options();
    assert_eq!((o.max_new_tokens, o.eos_token_ids, o.num_beams, o.do_sample), (None, vec![2], 1, false));
}

#[test]
fn token_ids_alone_are_refused() {
    let model = load();
    let px = model.preprocess(&common::image("odd_257x181.png")).unwrap();
    let ids = model.input_ids(Some("hi")).unwrap();
    let err = model.run_ids(&[px], &ids, &model.default_options(), &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("Q-Former reads the prompt text"), "{err}");
}

#[test]
fn instruction_past_the_qformer_positions_is_an_error() {
    let fam = family();
    let long = vec![vec![5u32; 49]];
    let err = fam.instruction_inputs(&long).unwrap_err().to_string();
    assert!(err.contains("49 Q-Former tokens") && err.contains("max_position_embeddings"), "{err}");
    let err = fam.instruction_inputs(&[vec![100_000]]).unwrap_err().to_string();
    assert!(err.contains("outside its vocabulary"), "{err}");
}

#[test]
fn missing_qformer_tokenizer_names_the_folder() {
    let dir = common::tempdir();
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "processor_config.json"] {
        std::fs::copy(common::model_dir(NAME).join(f), dir.path().join(f)).unwrap();
    }
    let model = Model::load(dir.path(), Device::Cpu).unwrap();
    let err = model.caption(&common::image("odd_257x181.png"), &opts(&model)).unwrap_err().to_string();
    assert!(err.contains("qformer_tokenizer"), "{err}");
}

fn config_error(edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(common::model_dir(NAME).join("config.json")).unwrap()).unwrap();
    edit(&mut v);
    ModelConfig::from_slice(v.to_string().as_bytes(), std::path::Path::new("config.json")).unwrap_err().to_string()
}

#[test]
fn config_errors_name_field_value_and_fix() {
    let e = config_error(|v| {
        v.as_object_mut().unwrap().remove("image_token_index");
    });
    assert!(e.contains("image_token_index") && e.contains("ignores the image"), "{e}");
    let e = config_error(|v| v["image_token_index"] = 9999.into());
    assert!(e.contains("`image_token_index` is 9999") && e.contains("vocab_size = 368"), "{e}");
    let e = config_error(|v| v["qformer_config"]["vocab_size"] = 0.into());
    assert!(e.contains("`qformer_config.vocab_size` is 0"), "{e}");
    let e = config_error(|v| v["qformer_config"]["num_attention_heads"] = 5.into());
    assert!(e.contains("qformer_config.hidden_size"), "{e}");
    let e = config_error(|v| v["text_config"]["num_key_value_heads"] = 3.into());
    assert!(e.contains("text_config.num_key_value_heads"), "{e}");
    let e = config_error(|v| v["use_decoder_only_language_model"] = false.into());
    assert!(e.contains("use_decoder_only_language_model"), "{e}");
    let e = config_error(|v| {
        v.as_object_mut().unwrap().remove("text_config");
    });
    assert!(e.contains("LLaMA"), "a missing text_config is OPT, which InstructBLIP does not run here: {e}");
}

/// InstructBLIP Flan-T5: the same image side, a T5 encoder-decoder as the language model.
mod flan_t5 {
    use super::*;

    const NAME: &str = "instructblip-flan-t5-tiny";
    const GOLDEN: &str = "instructblip-flan-t5_tiny";

    fn load() -> Model {
        Model::load(common::model_dir(NAME), Device::Cpu).expect("fixture model loads")
    }

    fn golden() -> serde_json::Value {
        common::golden_json(&format!("{GOLDEN}.json"))
    }

    fn cases() -> Vec<serde_json::Value> {
        golden()["cases"].as_array().unwrap().clone()
    }

    /// The encoder input as InstructBlipProcessor builds it with a T5 tokenizer: the
    /// placeholders, the prompt, `</s>` (no BOS); the Q-Former ids as for Vicuna.
    #[test]
    fn prompts_match_the_processor() {
        let model = load();
        let g = golden();
        let nq = g["num_query_tokens"].as_u64().unwrap() as usize;
        for case in cases() {
            let text = case["text"].as_str().unwrap();
            let ids = model.input_ids(Some(text)).unwrap();
            assert_eq!(ids, common::ids(&case["input_ids"]), "{text:?}: encoder ids");
            assert!(ids[..nq].iter().all(|&t| t as u64 == g["image_token_index"].as_u64().unwrap()));
            assert_eq!(ids.last(), Some(&1), "T5 appends </s>");
            let text_in = model.family.text_inputs(&[text]).unwrap().unwrap();
            assert_eq!(text_in.rows, common::ids(&case["qformer_input_ids"]).len(), "{text:?}: Q-Former ids");
        }
    }

    #[test]
    fn pixels_match_blip_image_processor() {
        check_pixels(&load(), GOLDEN, &cases());
    }

    /// Vision, Q-Former, projector, T5 encoder output and first decoder logits.
    #[test]
    fn stages_match_transformers() {
        let model = load();
        let errors = common::instructblip_stage_errors(&model, GOLDEN, |g| {
            Box::new(CpuExecutor::new(Arc::clone(model.family.weights()), &g.buffers))
        });
        assert_eq!(errors.len(), 5 * cases().len());
        for (case, stage, max, rel) in errors {
            assert!(rel <= STAGE_REL && max <= STAGE_ABS, "{case} {stage}: rel {rel:e} max abs {max:e}");
        }
    }

    /// Greedy tokens after the decoder start token (cut after `</s>`), log-probs and text.
    #[test]
    fn generation_matches_transformers() {
        check_generation(&load(), &cases());
    }

    /// Two images with one question, as one batch (every encoder input has one length).
    #[test]
    fn batch_matches_transformers() {
        check_batch(&load(), &golden()["batch"]);
    }

    fn family() -> InstructBlip {
        let dir = common::model_dir(NAME);
        let Some(cfg) = ModelConfig::load(&dir.join("config.json"))
            .unwrap()
            .get::<glimpse::models::instructblip::InstructBlipConfig>()
            .cloned()
        else {
            panic!("an InstructBLIP config")
        };
        InstructBlip::load(&cfg, &Checkpoint::open_dir(&dir).unwrap()).unwrap()
    }

    /// Instructions of different lengths padded on the RIGHT (the Flan-T5 tokenizer_config.json
    /// writes no padding_side, so the Q-Former tokenizer keeps BERT's) give transformers' rows.
    #[test]
    fn padded_instructions_match_transformers() {
        let (max, rel) = padded_qformer_errors(&family(), &golden()["padded_batch"], GOLDEN, "padded.qformer");
        assert!(rel <= STAGE_REL && max <= STAGE_ABS, "padded Q-Former: rel {rel:e} max abs {max:e}");
    }

    /// Questions of different lengths in one batch: the encoder inputs are padded and masked in
    /// the encoder's self-attention and the decoder's cross-attention, so each answer is
    /// transformers' batched (and single) answer.
    #[test]
    fn padded_batch_matches_transformers() {
        check_batch(&load(), &golden()["padded_batch"]);
    }

    /// Beam search repeats the Q-Former inputs and the encoder input per beam.
    #[test]
    fn beam_search_runs_with_the_instruction() {
        let model = load();
        let case = &cases()[2];
        let o = GenerateOptions { num_beams: 2, ..opts(&model) };
        let image = common::image(case["image"].as_str().unwrap());
        let out = model.ask(&image, case["text"].as_str().unwrap(), &o).unwrap();
        assert!(!out.tokens.is_empty() && out.score.is_some());
    }

    /// EOS `</s>` (1) from text_config, 20 new tokens, greedy; generation_config.json unread.
    #[test]
    fn defaults_come_from_text_config() {
        let o = load().default_options();
        assert_eq!((o.max_new_tokens, o.eos_token_ids, o.num_beams, o.do_sample), (None, vec![1], 1, false));
    }

    #[test]
    fn info_names_the_t5_language_model() {
        let lines = load().family.describe().join("\n");
        assert!(lines.contains("InstructBLIP") && lines.contains("T5 encoder-decoder"), "{lines}");
        assert!(
            lines.contains("2 encoder + 2 decoder layers, d_model 32, 3 heads x 16, ff 48 (gated gelu)"),
            "{lines}"
        );
    }

    fn config_error(edit: impl FnOnce(&mut serde_json::Value)) -> String {
        let path = common::model_dir(NAME).join("config.json");
        let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        edit(&mut v);
        ModelConfig::from_slice(v.to_string().as_bytes(), std::path::Path::new("config.json")).unwrap_err().to_string()
    }

    #[test]
    fn config_errors_name_field_value_and_fix() {
        let e = config_error(|v| v["use_decoder_only_language_model"] = true.into());
        assert!(e.contains("use_decoder_only_language_model") && e.contains("encoder-decoder"), "{e}");
        let e = config_error(|v| {
            v.as_object_mut().unwrap().remove("image_token_index");
        });
        assert!(e.contains("image_token_index") && e.contains("instructblip-flan-t5-xl"), "{e}");
        let e = config_error(|v| v["image_token_index"] = 5000.into());
        assert!(e.contains("`image_token_index` is 5000") && e.contains("vocab_size = 176"), "{e}");
        let e = config_error(|v| v["text_config"]["feed_forward_proj"] = "gated-gelu-x".into());
        assert!(e.contains("text_config.feed_forward_proj"), "{e}");
        let e = config_error(|v| v["text_config"]["model_type"] = "gpt2".into());
        assert!(e.contains("text_config.model_type") || e.contains("gpt2"), "{e}");
    }

    #[test]
    fn bad_padding_side_names_the_file() {
        let dir = common::tempdir();
        common::copy_dir(&common::model_dir(NAME), dir.path());
        let path = dir.path().join("tokenizer_config.json");
        let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        v["padding_side"] = "middle".into();
        std::fs::write(&path, v.to_string()).unwrap();
        let Err(err) = Model::load(dir.path(), Device::Cpu) else { panic!("a bad padding_side loads") };
        let err = err.to_string();
        assert!(
            err.contains("tokenizer_config.json") && err.contains("padding_side") && err.contains("middle"),
            "{err}"
        );
    }
}

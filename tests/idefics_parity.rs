//! IDEFICS on the CPU executor against transformers 5.17 (fp32 math on the same fp16 weights;
//! goldens from scripts/fixtures_idefics.py), for two models: `idefics-tiny` (Perceiver
//! Resampler with qk layer norms, a gated cross-attention block before every layer, float
//! alphas, qk layer norms) and `idefics-tiny-plain` (no resampler: every vision token a key;
//! blocks every 2 layers; vector alphas). Each runs three prompts: one image, two images
//! between texts, and three images (two consecutive) after text, ending past an EOS token.

mod common;

use std::sync::Arc;

use glimpse::api::{Device, Model, Prompt, Request};
use glimpse::backend::cpu::CpuExecutor;
use glimpse::backend::Executor;
use glimpse::image::PixelValues;
use glimpse::models::idefics::processor::{image_index, prompt_text, split_prompt, Item};

const MODELS: [&str; 2] = ["idefics-tiny", "idefics-tiny-plain"];
/// BLIP-2's and LLaVA's bars: f32 on both sides, different summation orders.
const STAGE_REL: f64 = 1e-5;
const STAGE_ABS: f64 = 1e-4;
const LOGPROB_ABS: f64 = 1e-4;

fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let (max, rel) = common::errors(got, want);
    assert!(rel <= STAGE_REL && max <= STAGE_ABS, "{what}: rel {rel:e} max abs {max:e}");
}

fn golden(name: &str) -> serde_json::Value {
    common::golden_json(&format!("{}.json", name.replace('-', "_")))
}

fn cases(name: &str) -> Vec<serde_json::Value> {
    golden(name)["cases"].as_array().unwrap().clone()
}

fn load(name: &str) -> Model {
    Model::load(common::model_dir(name), Device::Cpu).expect("fixture model loads")
}

/// The case's prompt items: texts, and the images (preprocessed by the model) in order.
fn items(model: &Model, case: &serde_json::Value) -> (Vec<Option<String>>, Vec<PixelValues>) {
    let (mut items, mut images) = (Vec::new(), Vec::new());
    for item in case["items"].as_array().unwrap() {
        match item {
            serde_json::Value::String(t) => items.push(Some(t.clone())),
            img => {
                images.push(model.preprocess(&common::image(img[1].as_str().unwrap())).unwrap());
                items.push(None);
            }
        }
    }
    (items, images)
}

/// The processor's text, input ids, per-token image index and pixel values.
#[test]
fn prompt_ids_and_pixels_match_the_processor() {
    for name in MODELS {
        let model = load(name);
        let goldens = common::goldens(&format!("{}.safetensors", name.replace('-', "_")));
        for case in cases(name) {
            let cname = case["name"].as_str().unwrap();
            let (texts, images) = items(&model, &case);
            let list: Vec<Item<'_>> = texts.iter().map(|t| t.as_deref().map_or(Item::Image, Item::Text)).collect();
            let text = prompt_text("<s>", &list);
            assert_eq!(text, case["text"].as_str().unwrap(), "{name} {cname}: prompt text");
            let ids = model.tokenizer.encode_plain(&text).unwrap();
            assert_eq!(ids, common::ids(&case["input_ids"]), "{name} {cname}: input ids");
            let image = model.tokenizer.token_to_id("<image>").unwrap();
            let index = image_index(&ids, image, Some(2), images.len());
            let want: Vec<i64> = case["image_index"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
            assert_eq!(index, want, "{name} {cname}: image index");
            let (want, _) = goldens.f32(&format!("{cname}.pixels")).unwrap();
            let got: Vec<f32> = images.iter().flat_map(|p| p.data.iter().copied()).collect();
            assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{name} {cname}: pixel values");
        }
    }
}

/// The vision tower's last hidden state, the resampler's output and the last prefill logit rows.
#[test]
fn stages_match_transformers() {
    for name in MODELS {
        let model = load(name);
        let goldens = common::goldens(&format!("{}.safetensors", name.replace('-', "_")));
        for case in cases(name) {
            let cname = case["name"].as_str().unwrap();
            let (pixels, shape) = goldens.f32(&format!("{cname}.pixels")).unwrap();
            let ids = common::ids(&case["input_ids"]);
            let plan = model
                .family
                .plan_for(&glimpse::generate::PlanShape {
                    images: shape[0],
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
            let mut stages = vec![("vision", "vision")];
            if goldens.contains(&format!("{cname}.resampler")) {
                stages.push(("resampler", "resampler"));
            }
            for (key, output) in stages {
                let (want, shape) = goldens.f32(&format!("{cname}.{key}")).unwrap();
                let got = exec.read(plan.output(output).unwrap(), shape[0] * shape[1]).unwrap();
                assert_close(&format!("{name} {cname} {key}"), &got, &want);
            }
            exec.write(plan.key_mask.unwrap(), &vec![0.0; plan.capacity]).unwrap();
            plan.write_prompt_inputs(&mut exec, &ids).unwrap();
            exec.set_left_padding(&[0]);
            exec.set_tokens(&ids);
            exec.set_position(0);
            exec.run(&plan.prefill.phase).unwrap();
            let (want, shape) = goldens.f32(&format!("{cname}.logits")).unwrap();
            let all = exec.read(plan.prefill.logits, ids.len()).unwrap();
            let tail = &all[(ids.len() - shape[0]) * shape[1]..];
            assert_close(&format!("{name} {cname} logits"), tail, &want);
        }
    }
}

/// Greedy generation through `Model::generate` with the processor's own text (`Prompt::Raw`,
/// `<image>` placeholders): transformers' 8 tokens, their log-probs and the text.
#[test]
fn generation_matches_transformers() {
    for name in MODELS {
        let model = load(name);
        for case in cases(name) {
            let cname = case["name"].as_str().unwrap();
            let (texts, images) = items(&model, &case);
            let raw: String = texts.iter().map(|t| t.as_deref().unwrap_or("<image>")).collect();
            let opts =
                glimpse::GenerateOptions { max_new_tokens: Some(8), min_new_tokens: 8, ..model.default_options() };
            let out = model.generate(&Request::new(&images, Prompt::Raw(Some(&raw)), &opts), &mut |_| {}).unwrap();
            assert_eq!(out.len(), 1, "{name} {cname}: one sequence for one prompt");
            assert_eq!(out[0].tokens, common::ids(&case["generated_ids"]), "{name} {cname}: greedy tokens");
            for (i, (got, want)) in out[0].logprobs.iter().zip(common::floats(&case["logprobs"])).enumerate() {
                assert!((got - want).abs() <= LOGPROB_ABS, "{name} {cname} step {i}: logprob {got} vs {want}");
            }
            assert_eq!(out[0].text, case["decoded"].as_str().unwrap(), "{name} {cname}: text");
        }
    }
}

/// `--prompt` splitting: the processor's list from one text with `<image>` placeholders.
#[test]
fn prompt_text_splits_at_image_placeholders() {
    let items = split_prompt("User:<image>Describe.\nAssistant:");
    assert_eq!(items, vec![Item::Text("User:"), Item::Image, Item::Text("Describe.\nAssistant:")]);
    assert_eq!(split_prompt("<image><image> x "), vec![Item::Image, Item::Image, Item::Text(" x ")]);
    assert_eq!(
        prompt_text("<s>", &split_prompt("<image><image> x ")),
        "<s><fake_token_around_image><image><fake_token_around_image><image><fake_token_around_image>x"
    );
}

fn cli_tokens(args: &[&std::ffi::OsStr]) -> Vec<u32> {
    let bin = env!("CARGO_BIN_EXE_glimpse");
    let flags = ["--device", "cpu", "--json", "--max-new-tokens", "8", "--min-new-tokens", "8"];
    let out = std::process::Command::new(bin).arg(args[0]).args(flags).args(&args[1..]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rec: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    common::ids(&rec["tokens"])
}

/// `glimpse ask --prompt` with two images gives transformers' tokens; `ask QUESTION` is the
/// model card's form (`User:`, the images, the question, `<end_of_utterance>`, `\nAssistant:`)
/// and `caption` the image alone, each equal to the same text given with `--prompt`.
#[test]
fn cli_prompt_question_and_caption() {
    use std::ffi::OsStr;
    let name = "idefics-tiny";
    let dir = common::model_dir(name);
    let case = cases(name).into_iter().find(|c| c["name"] == "two").unwrap();
    let mut raw = String::new();
    let mut args: Vec<std::ffi::OsString> = vec!["ask".into(), "--model".into(), dir.clone().into()];
    for item in case["items"].as_array().unwrap() {
        match item {
            serde_json::Value::String(t) => raw.push_str(t),
            img => {
                raw.push_str("<image>");
                args.extend(["--image".into(), common::image(img[1].as_str().unwrap()).into()]);
            }
        }
    }
    args.extend(["--prompt".into(), raw.into()]);
    let refs: Vec<&OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    assert_eq!(cli_tokens(&refs), common::ids(&case["generated_ids"]), "ask --prompt");

    let (img, dir) = (common::image("rgba_150x120.png"), dir.as_os_str());
    let question =
        cli_tokens(&[OsStr::new("ask"), OsStr::new("--model"), dir, img.as_os_str(), OsStr::new("What is this?")]);
    let spelled = "User:<image>What is this?<end_of_utterance>\nAssistant:";
    let prompt =
        [OsStr::new("ask"), OsStr::new("--model"), dir, img.as_os_str(), OsStr::new("--prompt"), OsStr::new(spelled)];
    assert_eq!(question, cli_tokens(&prompt), "ask QUESTION is the model card's prompt");
    let caption = cli_tokens(&[OsStr::new("caption"), OsStr::new("--model"), dir, img.as_os_str()]);
    let alone =
        [OsStr::new("ask"), OsStr::new("--model"), dir, img.as_os_str(), OsStr::new("--prompt"), OsStr::new("<image>")];
    assert_eq!(caption, cli_tokens(&alone), "caption is the image alone");
}

/// Bad inputs are clear errors: images and `<image>` placeholders that do not match, and a
/// config whose cross_layer_interval does not divide the layers.
#[test]
fn mismatches_are_clear_errors() {
    let model = load("idefics-tiny");
    let px = model.preprocess(&common::image("rgba_150x120.png")).unwrap();
    let images = vec![px.clone(), px];
    let opts = glimpse::GenerateOptions { max_new_tokens: Some(2), ..model.default_options() };
    let err = model
        .generate(&Request::new(&images, Prompt::Raw(Some("<image><image><image>three?")), &opts), &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("image tokens") && err.contains("2 images"), "{err}");

    let dir = common::tempdir();
    common::copy_dir(&common::model_dir("idefics-tiny-plain"), dir.path());
    let path = dir.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    cfg["cross_layer_interval"] = 3.into();
    std::fs::write(&path, cfg.to_string()).unwrap();
    let err = Model::load(dir.path(), Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("cross_layer_interval") && err.contains("num_hidden_layers (4)"), "{err}");
}

/// A tokenizer that lacks what IdeficsProcessor writes is refused at load, naming the token.
#[test]
fn a_tokenizer_without_the_image_tokens_is_a_clear_error() {
    let edit = |file: &str, from: &str, to: &str| {
        let dir = common::tempdir();
        common::copy_dir(&common::model_dir("idefics-tiny"), dir.path());
        let path = dir.path().join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(from), "{file} holds {from}");
        std::fs::write(&path, text.replace(from, to)).unwrap();
        Model::load(dir.path(), Device::Cpu).err().expect("refused").to_string()
    };
    let err = edit("tokenizer.json", "\"<fake_token_around_image>\"", "\"<fake>\"");
    assert!(err.contains("<fake_token_around_image>") && err.contains("own tokenizer"), "{err}");
    let err = edit("tokenizer_config.json", "\"bos_token\": \"<s>\"", "\"bos_token\": null");
    assert!(err.contains("bos_token"), "{err}");
}

//! CLIP on the CPU executor against transformers 5.17 (fp32 math on the same fp16-rounded
//! weights; goldens from scripts/fixtures_clip.py): token ids, pixels, projected features of both
//! towers, normalized embeddings, logits and zero-shot probabilities, the two EOS pooling rules,
//! single-tower folders, and the `embed` / `classify` commands.

mod common;

use std::path::PathBuf;
use std::process::Command;

use glimpse::{Device, EmbedModel, Model};
use serde_json::Value;

/// Relative (||a - b|| / ||b||) bound for features, embeddings and logits. Both sides compute in
/// f32 from the same fp16 weights and differ only in summation order (~1e-7 measured on BLIP-2's
/// towers); 1e-5 leaves headroom while a wrong mask, pooling row or scale moves results by 1e-2+.
const REL: f64 = 1e-5;
/// Probabilities are in [0, 1]: absolute bound.
const PROB_ABS: f64 = 1e-5;

fn model(name: &str) -> EmbedModel {
    EmbedModel::load(common::model_dir(name), Device::Cpu).expect("fixture model loads")
}

fn meta() -> Value {
    common::golden_json("clip_tiny.json")
}

fn golden(name: &str) -> (Vec<f32>, Vec<usize>) {
    common::goldens("clip_tiny.safetensors").f32(name).expect("golden tensor")
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect()
}

fn images() -> Vec<PathBuf> {
    strings(&meta()["images"]).iter().map(|n| common::image(n)).collect()
}

fn labels() -> Vec<String> {
    strings(&meta()["labels"])
}

fn flat(rows: &[Vec<f32>]) -> Vec<f32> {
    rows.concat()
}

fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    let (max, rel) = common::errors(got, want);
    assert!(rel <= REL, "{what}: rel {rel:e} (max abs {max:e})");
}

#[test]
fn token_ids_equal_transformers() {
    let m = model("clip-tiny");
    let g = meta();
    for case in g["tokens"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(m.text_ids(text).unwrap(), common::ids(&case["ids"]), "ids of {text:?}");
    }
    for (label, ids) in labels().iter().zip(g["label_ids"].as_array().unwrap()) {
        let want = common::ids(ids);
        let got = m.text_ids(label).unwrap();
        assert_eq!(got[..], want[..got.len()], "ids of label {label:?}");
        assert!(want[got.len()..].iter().all(|&t| t == g["eos_token_id"].as_u64().unwrap() as u32), "padding is EOS");
    }
}

#[test]
fn text_longer_than_the_positions_is_an_error_as_in_transformers() {
    let m = model("clip-tiny");
    let long = &meta()["long_text"];
    let err = m.text_ids(long["text"].as_str().unwrap()).unwrap_err().to_string();
    let n = long["ids_len"].as_u64().unwrap();
    assert!(err.contains(&format!("{n} tokens")) && err.contains("77"), "{err}");
    // The transformers side raised for the same text (recorded by the generator).
    assert!(long["error"].as_str().unwrap().contains("max_position_embeddings"));
}

#[test]
fn pixels_equal_transformers() {
    let m = model("clip-tiny");
    let (want, shape) = golden("pixels");
    let per = shape[1..].iter().product::<usize>();
    for (i, img) in images().iter().enumerate() {
        let px = m.preprocess(img).unwrap();
        assert_eq!(px.data, want[i * per..(i + 1) * per], "pixels of {}", img.display());
    }
}

#[test]
fn image_and_text_features_match_transformers() {
    let m = model("clip-tiny");
    let px: Vec<_> = images().iter().map(|p| m.preprocess(p).unwrap()).collect();
    assert_close("image_features", &flat(&m.image_features(&px).unwrap()), &golden("image_features").0);
    assert_close("image_embeds", &flat(&m.embed_images(&px).unwrap()), &golden("image_embeds").0);
    let labels = labels();
    let texts: Vec<&str> = labels.iter().map(String::as_str).collect();
    // One padded batch (labels of different lengths), as CLIPProcessor(padding=True) feeds it.
    assert_close("text_features", &flat(&m.text_features(&texts).unwrap()), &golden("text_features").0);
    assert_close("text_embeds", &flat(&m.embed_texts(&texts).unwrap()), &golden("text_embeds").0);
    // One at a time (no padding) gives the same embeddings.
    let (want, _) = golden("text_features");
    let dim = m.family.embed_dim();
    for (i, t) in texts.iter().enumerate() {
        assert_close(&format!("text {i} alone"), &m.text_features(&[t]).unwrap()[0], &want[i * dim..(i + 1) * dim]);
    }
    let (want, _) = golden("image_features");
    assert_close("image 1 alone", &m.image_features(&px[1..2]).unwrap()[0], &want[dim..2 * dim]);
}

#[test]
fn logits_and_zero_shot_probabilities_match_transformers() {
    let m = model("clip-tiny");
    let px: Vec<_> = images().iter().map(|p| m.preprocess(p).unwrap()).collect();
    let labels = labels();
    let texts: Vec<&str> = labels.iter().map(String::as_str).collect();
    let logits = m.logits(&m.embed_images(&px).unwrap(), &m.embed_texts(&texts).unwrap()).unwrap();
    assert_close("logits_per_image", &flat(&logits), &golden("logits_per_image").0);
    let probs = m.classify(&px, &texts).unwrap();
    let (want, _) = golden("probs");
    for (got, want) in flat(&probs).iter().zip(&want) {
        assert!((f64::from(*got) - f64::from(*want)).abs() <= PROB_ABS, "prob {got} vs {want}");
    }
}

/// Raw ids holding an id above EOS, and a sequence without EOS: the first-EOS rule (this config)
/// and the legacy `eos_token_id == 2` rule (argmax of ids) pool different rows.
#[test]
fn both_eos_pooling_rules_match_transformers() {
    let raw: Vec<Vec<u32>> = meta()["raw_ids"].as_array().unwrap().iter().map(common::ids).collect();
    let m = model("clip-tiny");
    assert_close("first eos", &flat(&m.text_id_features(&raw).unwrap()), &golden("raw_ids_first_eos").0);

    let dir = common::tempdir();
    let src = common::model_dir("clip-tiny");
    for entry in std::fs::read_dir(&src).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
    }
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg["text_config"]["eos_token_id"] = 2.into();
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let legacy = EmbedModel::load(dir.path(), Device::Cpu).unwrap();
    assert_close("legacy argmax", &flat(&legacy.text_id_features(&raw).unwrap()), &golden("raw_ids_legacy").0);
}

#[test]
fn single_tower_folders_embed_like_the_full_model() {
    let labels = labels();
    let texts: Vec<&str> = labels.iter().map(String::as_str).collect();
    let text = model("clip-tiny-text");
    assert_close("text tower folder", &flat(&text.text_features(&texts).unwrap()), &golden("text_features").0);
    let vision = model("clip-tiny-vision");
    let px: Vec<_> = images().iter().map(|p| vision.preprocess(p).unwrap()).collect();
    assert_close("vision tower folder", &flat(&vision.image_features(&px).unwrap()), &golden("image_features").0);

    let err = text.preprocess(&images()[0]).unwrap_err().to_string();
    assert!(err.contains("no vision tower"), "{err}");
    let err = vision.text_ids("a cat").unwrap_err().to_string();
    assert!(err.contains("no text tower"), "{err}");
    let e = vision.embed_images(&px).unwrap();
    let err = vision.logits(&e, &e).unwrap_err().to_string();
    assert!(err.contains("logit_scale") && err.contains("CLIPModel"), "{err}");
}

#[test]
fn generating_and_embedding_models_refuse_the_other_api() {
    let err =
        Model::load(common::model_dir("clip-tiny"), Device::Cpu).err().expect("CLIP does not caption").to_string();
    assert!(err.contains("CLIPModel") && err.contains("glimpse embed"), "{err}");
    let err = EmbedModel::load(common::model_dir("blip2-opt-tiny"), Device::Cpu)
        .err()
        .expect("BLIP-2 does not embed")
        .to_string();
    assert!(err.contains("Blip2ForConditionalGeneration") && err.contains("glimpse caption"), "{err}");
}

/// openai/clip-vit-large-patch14's config.json carries `text_config_dict`: transformers rebuilds
/// the text config from it alone (defaults for missing keys), overriding `text_config`.
#[test]
fn text_config_dict_replaces_text_config_with_defaults() {
    let json = r#"{"model_type": "clip", "projection_dim": 768,
        "text_config": {"eos_token_id": 2, "bos_token_id": 0, "hidden_size": 768, "num_attention_heads": 12},
        "text_config_dict": {"hidden_size": 768, "num_attention_heads": 12, "projection_dim": 768},
        "vision_config": {"hidden_size": 1024, "num_attention_heads": 16, "patch_size": 14}}"#;
    let cfg = glimpse::models::ModelConfig::from_slice(json.as_bytes(), std::path::Path::new("config.json")).unwrap();
    let Some(c) = cfg.get::<glimpse::models::clip::ClipConfig>().cloned() else { panic!("a CLIP config") };
    let t = c.text_config.unwrap();
    assert_eq!((t.eos_token_id, t.bos_token_id, t.hidden_size), (Some(49407), Some(49406), 768));
    assert_eq!(c.vision_config.unwrap().patch_size, 14);
    // Without the dict, text_config's own (legacy) eos 2 stays.
    let json = json.replace(r#""text_config_dict""#, r#""unused""#);
    let cfg = glimpse::models::ModelConfig::from_slice(json.as_bytes(), std::path::Path::new("config.json")).unwrap();
    let Some(c) = cfg.get::<glimpse::models::clip::ClipConfig>().cloned() else { panic!("a CLIP config") };
    assert_eq!(c.text_config.unwrap().eos_token_id, Some(2));
}

fn glimpse(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_glimpse")).args(args).output().expect("run glimpse");
    (out.status.code().unwrap_or(-1), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
}

fn records(stdout: &str) -> Vec<Value> {
    stdout.lines().map(|l| serde_json::from_str(l).expect("one JSON object per line")).collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

#[test]
fn cli_embed_images_and_texts_one_record_per_input_in_order() {
    let dir = common::model_dir("clip-tiny");
    let imgs = images();
    let missing = common::image("no_such_image.png");
    let mut args = vec!["embed", "--model", dir.to_str().unwrap(), "--device", "cpu", "--json", "--batch-size", "2"];
    let paths: Vec<String> = [&imgs[0], &missing, &imgs[1], &imgs[2]].iter().map(|p| p.display().to_string()).collect();
    args.extend(paths.iter().map(String::as_str));
    let (code, stdout, stderr) = glimpse(&args);
    assert_eq!(code, 1, "a failed image fails the run: {stderr}");
    let recs = records(&stdout);
    assert_eq!(recs.len(), 4);
    let (want, _) = golden("image_embeds");
    let dim = 24;
    for (rec, (k, path)) in recs.iter().zip(paths.iter().enumerate()) {
        assert_eq!(rec["image"].as_str().unwrap(), path);
        if k == 1 {
            assert!(rec["error"].as_str().is_some() && rec.get("embedding").is_none(), "{rec}");
            continue;
        }
        let i = if k == 0 { 0 } else { k - 1 };
        assert_close(&format!("cli image {i}"), &floats(&rec["embedding"]), &want[i * dim..(i + 1) * dim]);
    }

    let labels = labels();
    let long = "cat ".repeat(80);
    let mut args = vec!["embed", "--model", dir.to_str().unwrap(), "--device", "cpu", "--json"];
    for t in [&labels[0], &long, &labels[1], &labels[2]] {
        args.extend(["--text", t.as_str()]);
    }
    let (code, stdout, _) = glimpse(&args);
    assert_eq!(code, 1);
    let recs = records(&stdout);
    assert_eq!(recs.len(), 4);
    assert!(recs[1]["error"].as_str().unwrap().contains("77"), "{}", recs[1]);
    let (want, _) = golden("text_embeds");
    for (i, k) in [(0, 0), (1, 2), (2, 3)] {
        assert_eq!(recs[k]["text"].as_str().unwrap(), labels[i]);
        assert_close(&format!("cli text {i}"), &floats(&recs[k]["embedding"]), &want[i * dim..(i + 1) * dim]);
    }
}

#[test]
fn cli_classify_prints_labels_and_probabilities() {
    let dir = common::model_dir("clip-tiny");
    let imgs = images();
    let labels = labels();
    let mut args = vec!["classify", "--model", dir.to_str().unwrap(), "--device", "cpu", "--json"];
    let paths: Vec<String> = imgs.iter().map(|p| p.display().to_string()).collect();
    args.extend(paths.iter().map(String::as_str));
    for l in &labels {
        args.extend(["--label", l.as_str()]);
    }
    let (code, stdout, stderr) = glimpse(&args);
    assert_eq!(code, 0, "{stderr}");
    let recs = records(&stdout);
    let (want, _) = golden("probs");
    for (i, rec) in recs.iter().enumerate() {
        assert_eq!(strings(&rec["labels"]), labels, "labels in the order given");
        for (j, p) in floats(&rec["probs"]).iter().enumerate() {
            let w = want[i * labels.len() + j];
            assert!((f64::from(*p) - f64::from(w)).abs() <= PROB_ABS, "image {i} label {j}: {p} vs {w}");
        }
    }
    // Plain output: one line per image with the labels, best first.
    args.retain(|a| *a != "--json");
    let (code, stdout, _) = glimpse(&args);
    assert_eq!(code, 0);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), imgs.len());
    let best = (0..labels.len()).max_by(|&a, &b| want[a].total_cmp(&want[b])).unwrap();
    assert!(lines[0].contains(&format!("{}\t{} ", paths[0], labels[best])), "{}", lines[0]);

    let (code, _, stderr) = glimpse(&["classify", "--model", dir.to_str().unwrap(), "--device", "cpu", &paths[0]]);
    assert_eq!(code, 2, "no --label is a usage error: {stderr}");
}

/// Only the vocabulary and merges of tokenizer.json count (transformers 5.17 rebuilds the rest):
/// a file from an older converter without the normalizer and post-processor tokenizes the same.
#[test]
fn tokenizer_pipeline_is_rebuilt_from_vocab_and_merges() {
    let dir = common::tempdir();
    let src = common::model_dir("clip-tiny");
    for entry in std::fs::read_dir(&src).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
    }
    let mut tok: Value = serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer.json")).unwrap()).unwrap();
    for key in ["normalizer", "post_processor", "pre_tokenizer"] {
        tok[key] = Value::Null;
    }
    tok["model"]["end_of_word_suffix"] = Value::Null;
    std::fs::write(dir.path().join("tokenizer.json"), tok.to_string()).unwrap();
    let m = EmbedModel::load(dir.path(), Device::Cpu).unwrap();
    for case in meta()["tokens"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(m.text_ids(text).unwrap(), common::ids(&case["ids"]), "ids of {text:?}");
    }
}

//! Config fidelity with transformers 5.17: every field check of config.json (a table of mutated
//! copies of the tiny fixture's config), the image-processor file precedence, and how generation
//! defaults are resolved.

mod common;

use std::path::{Path, PathBuf};

use glimpse::config::{GenerationConfig, PreprocessorConfig};
use glimpse::image::ImageProcessor;
use glimpse::models::ModelConfig;
use glimpse::{Device, GenerateOptions, Model};
use serde_json::{json, Value};

fn fixture_config() -> Value {
    serde_json::from_slice(&std::fs::read(common::model_dir("blip2-opt-tiny").join("config.json")).unwrap()).unwrap()
}

/// The fixture config with the field at JSON pointer `field` set to `value`.
fn mutated(field: &str, value: Value) -> Value {
    let mut cfg = fixture_config();
    *cfg.pointer_mut(field).unwrap_or_else(|| panic!("{field} not in the fixture config")) = value;
    cfg
}

fn parse(cfg: &Value) -> glimpse::Result<ModelConfig> {
    ModelConfig::from_slice(&serde_json::to_vec(cfg).unwrap(), Path::new("config.json"))
}

fn parse_err(cfg: &Value) -> String {
    match parse(cfg) {
        Ok(_) => panic!("accepted: {cfg}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn fixture_config_is_valid() {
    let cfg = parse(&fixture_config()).unwrap().get::<glimpse::models::blip2::Blip2Config>().cloned().unwrap();
    assert_eq!(
        (cfg.vision_config.image_size, cfg.qformer_config.cross_attention_frequency, cfg.image_token()),
        (224, 2, 800)
    );
}

/// Each row: the field (JSON pointer), a bad value, and what the error must say. Every message
/// names the field and the value; none leaks Rust debug text.
#[test]
fn every_field_check_names_field_value_and_fix() {
    let rows: Vec<(&str, Value, &[&str])> = vec![
        ("/vision_config/hidden_size", json!(0), &["`vision_config.hidden_size` is 0", "at least 1"]),
        (
            "/vision_config/hidden_size",
            json!(175),
            &["`vision_config.hidden_size` is 175", "multiple of vision_config.num_attention_heads (2)"],
        ),
        ("/vision_config/num_attention_heads", json!(0), &["`vision_config.num_attention_heads` is 0"]),
        ("/vision_config/intermediate_size", json!(0), &["`vision_config.intermediate_size` is 0"]),
        (
            "/vision_config/image_size",
            json!(0),
            &["`vision_config.image_size` is 0", "multiple of vision_config.patch_size (14)"],
        ),
        ("/vision_config/image_size", json!(230), &["`vision_config.image_size` is 230", "patch_size (14)"]),
        ("/vision_config/patch_size", json!(0), &["`vision_config.patch_size` is 0"]),
        ("/vision_config/layer_norm_eps", json!(0.0), &["`vision_config.layer_norm_eps` is 0", "positive finite"]),
        ("/vision_config/layer_norm_eps", json!(-1e-6), &["`vision_config.layer_norm_eps` is -0.000001"]),
        (
            "/vision_config/hidden_act",
            json!("swish"),
            &["`vision_config.hidden_act` is `swish`", "implements only gelu"],
        ),
        (
            "/vision_config/hidden_act",
            json!("gleu"),
            &["`vision_config.hidden_act` is `gleu`", "not an activation transformers knows"],
        ),
        ("/qformer_config/hidden_size", json!(0), &["`qformer_config.hidden_size` is 0"]),
        (
            "/qformer_config/hidden_size",
            json!(129),
            &["`qformer_config.hidden_size` is 129", "num_attention_heads (2)"],
        ),
        ("/qformer_config/num_attention_heads", json!(0), &["`qformer_config.num_attention_heads` is 0"]),
        ("/qformer_config/intermediate_size", json!(0), &["`qformer_config.intermediate_size` is 0"]),
        (
            "/qformer_config/cross_attention_frequency",
            json!(0),
            &["`qformer_config.cross_attention_frequency` is 0", "at least 1"],
        ),
        ("/qformer_config/layer_norm_eps", json!(0.0), &["`qformer_config.layer_norm_eps` is 0"]),
        ("/qformer_config/hidden_act", json!("relu"), &["`qformer_config.hidden_act` is `relu`"]),
        ("/num_query_tokens", json!(0), &["`num_query_tokens` is 0"]),
        ("/text_config/vocab_size", json!(0), &["`text_config.vocab_size` is 0"]),
        ("/text_config/hidden_size", json!(161), &["`text_config.hidden_size` is 161", "num_attention_heads (2)"]),
        ("/text_config/num_attention_heads", json!(0), &["`text_config.num_attention_heads` is 0"]),
        ("/text_config/ffn_dim", json!(0), &["`text_config.ffn_dim` is 0"]),
        ("/text_config/max_position_embeddings", json!(0), &["`text_config.max_position_embeddings` is 0"]),
        ("/text_config/word_embed_proj_dim", json!(0), &["`text_config.word_embed_proj_dim` is 0"]),
        (
            "/text_config/activation_function",
            json!("gelu"),
            &["`text_config.activation_function` is `gelu`", "only relu"],
        ),
        ("/text_config/do_layer_norm_before", json!(false), &["`text_config.do_layer_norm_before` is false"]),
        ("/text_config/enable_bias", json!(false), &["`text_config.enable_bias` is false"]),
        (
            "/text_config/layer_norm_elementwise_affine",
            json!(false),
            &["`text_config.layer_norm_elementwise_affine` is false"],
        ),
        ("/text_config/_remove_final_layer_norm", json!(true), &["`text_config._remove_final_layer_norm` is true"]),
        ("/image_token_index", json!(808), &["`image_token_index` is 808", "text_config.vocab_size = 808"]),
        ("/image_token_index", Value::Null, &["no `image_token_index`", "add \"image_token_index\""]),
        ("/text_config/bos_token_id", json!(808), &["`text_config.bos_token_id` is 808", "vocabulary"]),
        ("/text_config/pad_token_id", json!(5000), &["`text_config.pad_token_id` is 5000"]),
        ("/text_config/eos_token_id", json!(808), &["`text_config.eos_token_id` is 808"]),
        ("/text_config/eos_token_id", json!([202, 9000]), &["`text_config.eos_token_id` is 9000"]),
        (
            "/use_decoder_only_language_model",
            json!(false),
            &["`use_decoder_only_language_model` is false", "encoder-decoder (T5)", "set it to true"],
        ),
        // Type errors name the field too.
        ("/vision_config/image_size", json!("224"), &["`vision_config.image_size`", "invalid type"]),
        ("/text_config/eos_token_id", json!(-1), &["`text_config.eos_token_id`", "-1", "token id"]),
        ("/text_config/eos_token_id", json!("x"), &["`text_config.eos_token_id`", "a token id"]),
        ("/qformer_config/num_hidden_layers", json!(-2), &["`qformer_config.num_hidden_layers`", "-2"]),
        (
            "/use_decoder_only_language_model",
            json!("yes"),
            &["`use_decoder_only_language_model` is \"yes\"", "true or false"],
        ),
        ("/model_type", json!(7), &["`model_type` is 7"]),
    ];
    for (field, value, needles) in rows {
        let err = parse_err(&mutated(field, value.clone()));
        for needle in needles {
            assert!(err.contains(needle), "{field} = {value}: `{err}` lacks `{needle}`");
        }
        for leak in ["Some(", "None", "SizeSpec", "{ "] {
            assert!(!err.contains(leak), "{field} = {value}: debug text in `{err}`");
        }
    }
}

#[test]
fn text_max_new_tokens_zero_is_rejected() {
    let mut cfg = fixture_config();
    cfg["text_config"]["max_new_tokens"] = json!(0);
    assert!(parse_err(&cfg).contains("`text_config.max_new_tokens` is 0"));
}

/// BLIP-2's encoder-decoder language model is T5 (tests/t5_parity.rs runs it); other
/// encoder-decoders are refused, and a T5 field of the wrong type is named with its section.
#[test]
fn encoder_decoder_language_model_must_be_t5() {
    let mut cfg = fixture_config();
    cfg["text_config"] = json!({"model_type": "mt5", "d_model": 32});
    cfg["use_decoder_only_language_model"] = json!(false);
    let err = parse_err(&cfg);
    assert!(err.contains("unsupported model") && err.contains("with T5 only"), "{err}");
    cfg["text_config"] = json!({"model_type": "t5", "d_model": "big"});
    let err = parse_err(&cfg);
    assert!(err.contains("`text_config.d_model`"), "{err}");
    // An OPT text config cannot be an encoder-decoder (transformers fails to build it too).
    let mut cfg = fixture_config();
    cfg["use_decoder_only_language_model"] = json!(false);
    assert!(parse_err(&cfg).contains("use_decoder_only_language_model"));
}

#[test]
fn other_model_types_and_non_configs() {
    assert!(parse_err(&json!({"model_type": "idefics2", "architectures": ["Idefics2ForConditionalGeneration"]}))
        .contains("model_type `idefics2`"));
    // LLaVA is a family now: missing parts take LlavaConfig's defaults (CLIP ViT-L/14-336, LLaMA).
    let llava = ModelConfig::from_slice(
        br#"{"model_type": "llava", "text_config": {"vocab_size": 32064}}"#,
        Path::new("config.json"),
    )
    .unwrap();
    assert!(
        matches!(llava.get::<glimpse::models::llava::LlavaConfig>(), Some(c) if c.vision_config.image_size == 336 && c.image_rows() == 576)
    );
    assert!(parse_err(&json!({"hidden_size": 4})).contains("no `model_type`"));
    assert!(parse_err(&json!([1, 2])).contains("not a JSON object"));
    let err =
        ModelConfig::from_slice(b"{\"model_type\": \"blip-2\",", Path::new("config.json")).unwrap_err().to_string();
    assert!(err.contains("config.json: invalid JSON"), "{err}");
}

/// transformers' Blip2Config sets the Q-Former's encoder width from the vision config, whatever
/// config.json says.
#[test]
fn qformer_encoder_hidden_size_follows_the_vision_model() {
    let cfg = parse(&mutated("/qformer_config/encoder_hidden_size", json!(999)))
        .unwrap()
        .get::<glimpse::models::blip2::Blip2Config>()
        .cloned()
        .unwrap();
    assert_eq!(cfg.qformer_config.encoder_hidden_size, 176);
}

/// A repeated key keeps its last value, as Python's json does.
#[test]
fn repeated_keys_keep_the_last_value() {
    let text = std::fs::read_to_string(common::model_dir("blip2-opt-tiny").join("config.json")).unwrap();
    let text = text.replacen("\"num_query_tokens\": 32,", "\"num_query_tokens\": 0, \"num_query_tokens\": 32,", 1);
    let cfg = ModelConfig::from_slice(text.as_bytes(), Path::new("config.json"))
        .unwrap()
        .get::<glimpse::models::blip2::Blip2Config>()
        .cloned()
        .unwrap();
    assert_eq!(cfg.num_query_tokens, 32);
}

// ---- Whole-model loads of mutated fixture folders -------------------------------------------

/// A copy of the tiny fixture folder in a temp dir (weights linked, not copied).
fn fixture_copy() -> tempfile::TempDir {
    let dir = common::tempdir();
    for entry in std::fs::read_dir(common::model_dir("blip2-opt-tiny")).unwrap() {
        let src = entry.unwrap().path();
        let dst = dir.path().join(src.file_name().unwrap());
        if src.extension().is_some_and(|e| e == "safetensors") {
            std::os::unix::fs::symlink(&src, &dst).unwrap();
        } else {
            std::fs::copy(&src, &dst).unwrap();
        }
    }
    dir
}

fn write_json(dir: &Path, name: &str, value: &Value) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_vec_pretty(value).unwrap()).unwrap();
    path
}

fn load_err(dir: &Path) -> String {
    match Model::load(dir, Device::Cpu) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// The issue's cases: these used to run (cross_attention_frequency 0 gave every image the same
/// caption) or fail as a tensor shape mismatch.
#[test]
fn absurd_configs_fail_at_load_with_field_errors() {
    for (field, value, needle) in [
        ("/qformer_config/cross_attention_frequency", json!(0), "`qformer_config.cross_attention_frequency` is 0"),
        ("/vision_config/image_size", json!(0), "`vision_config.image_size` is 0"),
        ("/use_decoder_only_language_model", json!(false), "`use_decoder_only_language_model` is false"),
        ("/text_config/eos_token_id", json!(808), "`text_config.eos_token_id` is 808"),
    ] {
        let dir = fixture_copy();
        write_json(dir.path(), "config.json", &mutated(field, value));
        let err = load_err(dir.path());
        assert!(err.contains(needle) && !err.contains("shape"), "{field}: {err}");
    }
}

// ---- Image processor: which file, and its checks ---------------------------------------------

fn blip_processor(size: u64) -> Value {
    json!({"image_processor_type": "BlipImageProcessor", "size": {"height": size, "width": size}, "resample": 3,
           "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_resize": true})
}

#[test]
fn processor_config_section_wins_over_preprocessor_config() {
    let dir = common::tempdir();
    write_json(dir.path(), "preprocessor_config.json", &blip_processor(100));
    let proc = write_json(
        dir.path(),
        "processor_config.json",
        &json!({"image_processor": blip_processor(200), "processor_class": "Blip2Processor"}),
    );
    let (cfg, from) = PreprocessorConfig::load_from_dir(dir.path()).unwrap();
    assert_eq!((from, cfg.size.height), (proc, Some(200)));
}

#[test]
fn preprocessor_config_is_used_when_processor_config_has_no_section() {
    for processor in
        [json!({"processor_class": "Blip2Processor", "num_query_tokens": 32}), json!({"image_processor": null})]
    {
        let dir = common::tempdir();
        let pre = write_json(dir.path(), "preprocessor_config.json", &blip_processor(100));
        write_json(dir.path(), "processor_config.json", &processor);
        let (cfg, from) = PreprocessorConfig::load_from_dir(dir.path()).unwrap();
        assert_eq!((from, cfg.size.height), (pre, Some(100)), "{processor}");
    }
}

#[test]
fn image_processor_missing_or_broken() {
    // Neither file has image-processor settings.
    let dir = common::tempdir();
    write_json(dir.path(), "processor_config.json", &json!({"processor_class": "Blip2Processor"}));
    let err = PreprocessorConfig::load_from_dir(dir.path()).unwrap_err().to_string();
    assert!(err.contains("preprocessor_config.json: file not found") && err.contains("image_processor"), "{err}");
    // transformers reads processor_config.json first and fails on bad JSON even when
    // preprocessor_config.json is fine.
    write_json(dir.path(), "preprocessor_config.json", &blip_processor(100));
    std::fs::write(dir.path().join("processor_config.json"), "{\"image_processor\": ").unwrap();
    let err = PreprocessorConfig::load_from_dir(dir.path()).unwrap_err().to_string();
    assert!(err.contains("processor_config.json: invalid JSON"), "{err}");
    // A section of the wrong shape names the field.
    write_json(dir.path(), "processor_config.json", &json!({"image_processor": {"size": {"height": "tall"}}}));
    let err = PreprocessorConfig::load_from_dir(dir.path()).unwrap_err().to_string();
    assert!(err.contains("processor_config.json: `image_processor.size.height`: invalid type"), "{err}");
}

#[test]
fn image_processor_field_checks() {
    let rows: Vec<(&str, Value, &str)> = vec![
        ("/size", json!({"height": 0, "width": 224}), "`size.height` is 0"),
        ("/size", json!({"height": 224, "width": 0}), "`size.width` is 0"),
        ("/size", json!({"shortest_edge": 0}), "`size.shortest_edge` is 0"),
        (
            "/size",
            json!({"width": 224}),
            "`size` is {\"width\": 224}: it needs \"height\" and \"width\", or \"shortest_edge\"",
        ),
        ("/image_std", json!([0.5, 0.0, 0.5]), "`image_std` is [0.5, 0.0, 0.5]: a zero standard deviation"),
        ("/image_mean", json!([0.5, 0.5]), "`image_mean` is [0.5, 0.5]: it needs one value per RGB channel"),
        ("/resample", json!(2), "`resample` is 2: only 3 (bicubic)"),
        ("/do_center_crop", json!(true), "`crop_size` is missing: do_center_crop needs crop_size"),
    ];
    for (field, value, needle) in rows {
        let mut cfg = blip_processor(224);
        cfg[&field[1..]] = value;
        let err =
            PreprocessorConfig::from_slice(&serde_json::to_vec(&cfg).unwrap(), Path::new("preprocessor_config.json"))
                .unwrap_err()
                .to_string();
        assert!(err.contains(needle) && !err.contains("Some("), "{field}: {err}");
    }
}

/// A processor size that does not match the vision model: a field error in JSON terms.
#[test]
fn processor_size_must_match_the_vision_model() {
    let dir = fixture_copy();
    write_json(dir.path(), "processor_config.json", &json!({"image_processor": blip_processor(384)}));
    let err = load_err(dir.path());
    assert!(
        err.contains("`size` is {\"height\": 384, \"width\": 384}, but the vision model takes 224x224")
            && !err.contains("Some("),
        "{err}"
    );
}

// ---- Generation defaults ----------------------------------------------------------------------

#[test]
fn new_tokens_resolve_as_transformers() {
    let default = GenerateOptions::default();
    // 20 new tokens past the input, capped at max_position_embeddings.
    assert_eq!(default.new_tokens(33, 128).unwrap(), 20);
    assert_eq!(default.new_tokens(120, 128).unwrap(), 8);
    let err = default.new_tokens(128, 128).unwrap_err().to_string();
    assert!(err.contains("fills the model's 128 positions"), "{err}");
    // An explicit count is kept (the plan reports one that does not fit).
    assert_eq!(GenerateOptions { max_new_tokens: Some(500), ..default.clone() }.new_tokens(33, 128).unwrap(), 500);
    let zero = GenerateOptions { max_new_tokens: Some(0), ..default };
    assert!(zero.validate().unwrap_err().to_string().contains("max_new_tokens is 0: it must be at least 1"));
    assert!(zero.new_tokens(33, 128).is_err());
}

/// BLIP-2's generate() ignores generation_config.json: EOS and length come from text_config.
#[test]
fn generation_config_json_does_not_steer_blip2() {
    let reference = Model::load(common::model_dir("blip2-opt-tiny"), Device::Cpu).unwrap();
    let opts = reference.default_options();
    assert_eq!((opts.max_new_tokens, opts.eos_token_ids.clone()), (None, vec![202]));
    let image = common::image("wide_301x97.png");
    let expected = reference.caption(&image, &opts).unwrap().tokens;

    let dir = fixture_copy();
    // max_length without max_new_tokens, another EOS: all ignored by BLIP-2's generate().
    write_json(dir.path(), "generation_config.json", &json!({"max_length": 3, "eos_token_id": 5, "bos_token_id": 2}));
    let model = Model::load(dir.path(), Device::Cpu).unwrap();
    assert_eq!(model.default_options().eos_token_ids, vec![202]);
    assert_eq!(model.caption(&image, &model.default_options()).unwrap().tokens, expected);
    write_json(dir.path(), "generation_config.json", &json!({"max_new_tokens": 2}));
    let model = Model::load(dir.path(), Device::Cpu).unwrap();
    assert_eq!(model.caption(&image, &model.default_options()).unwrap().tokens, expected);
}

#[test]
fn generation_config_json_errors_follow_transformers() {
    let path = Path::new("generation_config.json");
    // Not JSON: transformers falls back to a config made from config.json and loads the model.
    assert_eq!(GenerationConfig::from_slice(b"{not json", path).unwrap().max_new_tokens, None);
    // max_new_tokens 0: GenerationConfig.validate() raises, so loading fails.
    let err = GenerationConfig::from_slice(br#"{"max_new_tokens": 0}"#, path).unwrap_err().to_string();
    assert!(err.contains("`max_new_tokens` is 0"), "{err}");
    let err = GenerationConfig::from_slice(br#"{"max_new_tokens": -3}"#, path).unwrap_err().to_string();
    assert!(err.contains("`max_new_tokens`") && err.contains("-3"), "{err}");
    let dir = fixture_copy();
    std::fs::write(dir.path().join("generation_config.json"), "{oops").unwrap();
    Model::load(dir.path(), Device::Cpu).expect("a broken generation_config.json is ignored, as in transformers");
}

/// `max_new_tokens` in text_config reaches the language model's generation config.
#[test]
fn text_config_max_new_tokens_sets_the_default() {
    let dir = fixture_copy();
    let mut cfg = fixture_config();
    cfg["text_config"]["max_new_tokens"] = json!(3);
    write_json(dir.path(), "config.json", &cfg);
    let model = Model::load(dir.path(), Device::Cpu).unwrap();
    assert_eq!(model.default_options().max_new_tokens, Some(3));
    let out = model.caption(&common::image("wide_301x97.png"), &model.default_options()).unwrap();
    assert!((1..=3).contains(&out.tokens.len()), "{:?}", out.tokens);
}

/// By default a long decoder input gets only the positions that remain (transformers caps
/// max_length at max_position_embeddings); a full one is an error.
#[test]
fn default_length_is_capped_at_the_positions() {
    let model = Model::load(common::model_dir("blip2-opt-tiny"), Device::Cpu).unwrap();
    let px = model.preprocess(&common::image("wide_301x97.png")).unwrap();
    let opts = GenerateOptions { eos_token_ids: vec![], ..model.default_options() };
    let mut ids = model.input_ids(None).unwrap();
    ids.resize(120, 4);
    let (seqs, _, _) = model.run_ids(std::slice::from_ref(&px), &ids, &opts, &mut |_| {}).unwrap();
    assert_eq!(seqs[0].tokens.len(), 8);
    ids.resize(128, 4);
    let err = model.run_ids(&[px], &ids, &opts, &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("fills the model's 128 positions"), "{err}");
}

#[test]
fn zero_new_tokens_is_rejected_by_the_library() {
    let model = Model::load(common::model_dir("blip2-opt-tiny"), Device::Cpu).unwrap();
    let opts = GenerateOptions { max_new_tokens: Some(0), ..model.default_options() };
    for err in [
        model.caption(&common::image("wide_301x97.png"), &opts).unwrap_err(),
        model.ask(&common::image("wide_301x97.png"), "what?", &opts).unwrap_err(),
        model
            .run(&[model.preprocess(&common::image("wide_301x97.png")).unwrap()], None, &opts, &mut |_| {})
            .unwrap_err(),
    ] {
        assert!(err.to_string().contains("max_new_tokens is 0"), "{err}");
    }
}

/// The question goes into the template verbatim, as transformers formats it; whitespace-only
/// and empty questions are valid prompts there and here.
#[test]
fn question_is_kept_verbatim() {
    let model = Model::load(common::model_dir("blip2-opt-tiny"), Device::Cpu).unwrap();
    assert_eq!(model.question_prompt("  what is it? "), "Question:   what is it?  Answer:");
    assert_eq!(model.question_prompt(""), "Question:  Answer:");
    let padded = model.input_ids(Some(&model.question_prompt(" what? "))).unwrap();
    let trimmed = model.input_ids(Some(&model.question_prompt("what?"))).unwrap();
    assert_ne!(padded, trimmed, "the spaces reach the tokenizer");
    let image = common::image("wide_301x97.png");
    for q in ["", "   "] {
        let out = model.ask(&image, q, &model.default_options()).unwrap();
        let direct = model
            .run(
                &[model.preprocess(&image).unwrap()],
                Some(&format!("Question: {q} Answer:")),
                &model.default_options(),
                &mut |_| {},
            )
            .unwrap();
        assert_eq!(out.tokens, direct[0].tokens, "{q:?}");
    }
}

/// transformers' legacy size shorthands (`get_size_dict`), as openai/clip-vit-base-patch32's
/// preprocessor_config.json writes them: an integer `size` is the shortest edge for CLIP's
/// processor and a square for BLIP's, an integer `crop_size` a square, `[h, w]` a height and
/// width; each gives the same settings, and so the same pixels, as the mapping it stands for.
#[test]
fn legacy_integer_and_pair_sizes_mean_what_transformers_reads() {
    let path = Path::new("preprocessor_config.json");
    let parse = |v: &Value| PreprocessorConfig::from_slice(&serde_json::to_vec(v).unwrap(), path).unwrap();
    let clip = |size: Value, crop: Value, class: (&str, &str)| {
        json!({"crop_size": crop, "do_center_crop": true, "do_normalize": true, "do_resize": true,
               class.0: class.1, "image_mean": [0.48145466, 0.4578275, 0.40821073],
               "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": size})
    };
    let legacy = parse(&clip(json!(224), json!(224), ("feature_extractor_type", "CLIPFeatureExtractor")));
    let mapped = parse(&clip(
        json!({"shortest_edge": 224}),
        json!({"height": 224, "width": 224}),
        ("image_processor_type", "CLIPImageProcessor"),
    ));
    assert_eq!((&legacy.size, &legacy.crop_size), (&mapped.size, &mapped.crop_size));
    assert_eq!(legacy.size.shortest_edge, Some(224));

    // The same pixels from both, on an image that needs the resize and the crop.
    let img = image::RgbImage::from_fn(301, 197, |x, y| {
        image::Rgb([(x * 7 % 256) as u8, (y * 13 % 256) as u8, ((x + y) % 256) as u8])
    });
    let (a, b) = (ImageProcessor::new(legacy).preprocess(&img), ImageProcessor::new(mapped).preprocess(&img));
    assert_eq!((a.height, a.width), (224, 224));
    assert_eq!(a.data, b.data);

    // CLIPImageProcessorFast is the same class; LLaVA's processor resizes the shortest edge too.
    for class in ["CLIPImageProcessorFast", "LlavaImageProcessor"] {
        let cfg = parse(&clip(json!(336), json!(336), ("image_processor_type", class)));
        assert_eq!(cfg.size.shortest_edge, Some(336), "{class}");
    }
    // BLIP's processor squares an integer size; a pair is height then width.
    let blip = |size: Value| {
        json!({"image_processor_type": "BlipImageProcessor", "size": size, "resample": 3,
               "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_resize": true})
    };
    let square = parse(&blip(json!(384)));
    assert_eq!((square.size.height, square.size.width, square.size.shortest_edge), (Some(384), Some(384), None));
    let pair = parse(&blip(json!([240, 320])));
    assert_eq!((pair.size.height, pair.size.width), (Some(240), Some(320)));
    // The same shorthand inside processor_config.json's image_processor section.
    let section = serde_json::to_vec(&json!({"image_processor": blip(json!(384))})).unwrap();
    let from_section =
        PreprocessorConfig::from_processor_slice(&section, Path::new("processor_config.json")).unwrap().unwrap();
    assert_eq!(from_section.size, square.size);
    // Anything else is still an error naming the field.
    let bad = PreprocessorConfig::from_slice(&serde_json::to_vec(&blip(json!(-4))).unwrap(), path).unwrap_err();
    assert!(bad.to_string().contains("`size`"), "{bad}");
}

/// A copy of fixture `model` (files linked, config.json rewritten) whose `text_config` keeps
/// min_new_tokens 5, min_p 0.1 and max_new_tokens 7.
fn with_text_config_generation_fields(model: &str) -> tempfile::TempDir {
    let dir = common::tempdir();
    let src = common::model_dir(model);
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().is_some_and(|n| n != "config.json") {
            std::os::unix::fs::symlink(&path, dir.path().join(path.file_name().unwrap())).unwrap();
        }
    }
    let mut cfg: Value = serde_json::from_slice(&std::fs::read(src.join("config.json")).unwrap()).unwrap();
    cfg["text_config"]["min_new_tokens"] = json!(5);
    cfg["text_config"]["min_p"] = json!(0.1);
    cfg["text_config"]["max_new_tokens"] = json!(7);
    write_json(dir.path(), "config.json", &cfg);
    dir
}

/// InstructBLIP-Vicuna's language model generates with the generation settings its LLaMA
/// `text_config` keeps, as transformers 5.17's `language_model.generation_config` does (checked
/// there: `GenerationConfig.from_model_config(text_config)` gives min_new_tokens 5, min_p 0.1,
/// max_new_tokens 7 for this config).
#[test]
fn instructblip_text_config_generation_settings_are_the_defaults() {
    let dir = with_text_config_generation_fields("instructblip-tiny");
    let opts = Model::load(dir.path(), Device::Cpu).unwrap().default_options();
    assert_eq!((opts.min_new_tokens, opts.min_p, opts.max_new_tokens), (5, Some(0.1), Some(7)));
}

/// LLaVA generates with its generation_config.json when the folder has one, and then the
/// generation fields of `text_config` do not apply; without the file they do. Checked with
/// transformers 5.17 on this config: greedy generate() gives 20 new tokens with the fixture's
/// file (`_from_model_config: true`, no length), 7 without it (`text_config.max_new_tokens`).
#[test]
fn llava_text_config_generation_fields_apply_only_without_generation_config_json() {
    let dir = with_text_config_generation_fields("llava-tiny");
    let with_file = Model::load(dir.path(), Device::Cpu).unwrap().default_options();
    assert_eq!((with_file.min_new_tokens, with_file.min_p, with_file.max_new_tokens), (0, None, None));
    assert_eq!(with_file.eos_token_ids, vec![2], "the file's EOS");
    std::fs::remove_file(dir.path().join("generation_config.json")).unwrap();
    let without = Model::load(dir.path(), Device::Cpu).unwrap().default_options();
    assert_eq!((without.min_new_tokens, without.min_p, without.max_new_tokens), (5, Some(0.1), Some(7)));
}

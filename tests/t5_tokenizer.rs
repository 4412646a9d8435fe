//! T5 tokenizer parity with transformers 5.17 on a legacy-layout hub tokenizer.json
//! (tests/fixtures/t5-tokenizer-legacy, goldens/t5-tokenizer-legacy_tokens.json from
//! scripts/fixtures_t5_tokenizer.py): `T5Tokenizer` keeps the vocabulary and charsmap and
//! rebuilds the pipeline, so glimpse must too.

mod common;

use std::path::Path;

use glimpse::tokenizer::Tokenizer;
use serde_json::Value;

const NAME: &str = "t5-tokenizer-legacy";

fn golden() -> Value {
    common::golden_json(&format!("{NAME}_tokens.json"))
}

/// Ids with and without `</s>` and both decodes of every case equal transformers'.
fn check(tok: &Tokenizer, cases: &Value) {
    let cases = cases.as_array().unwrap();
    assert!(!cases.is_empty());
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let ids = common::ids(&case["ids"]);
        assert_eq!(tok.encode(text).unwrap(), ids, "encode {text:?}");
        assert_eq!(tok.encode_plain(text).unwrap(), common::ids(&case["plain_ids"]), "encode_plain {text:?}");
        assert_eq!(tok.decode(&ids, true).unwrap(), case["decoded"].as_str().unwrap(), "decode {text:?}");
        assert_eq!(tok.decode(&ids, false).unwrap(), case["raw"].as_str().unwrap(), "decode with specials {text:?}");
    }
}

/// A copy of the fixture folder with `edit` applied to its tokenizer_config.json.
fn with_config(edit: impl FnOnce(&mut Value)) -> tempfile::TempDir {
    let dir = common::tempdir();
    common::copy_dir(&common::model_dir(NAME), dir.path());
    let path = dir.path().join("tokenizer_config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&path, config.to_string()).unwrap();
    dir
}

/// Fails on the old behaviour (tokenizer.json's own pipeline): trailing spaces, whitespace-only
/// texts, and spaces before `<image>` / sentinels gave an extra `▁` (id 3) there.
#[test]
fn legacy_file_tokenizes_as_transformers() {
    let tok = Tokenizer::from_dir(&common::model_dir(NAME)).unwrap();
    let g = golden();
    assert!(g["cases"].as_array().unwrap().len() >= 20);
    check(&tok, &g["cases"]);
    assert_eq!(tok.vocab_size(), g["vocab_size"].as_u64().unwrap() as usize);
}

/// The goldens keep telling the two pipelines apart, and the file read as written (what glimpse
/// did before, and still does for other classes) gives the `legacy_ids` of Python's tokenizers.
#[test]
fn file_pipeline_differs_and_matches_legacy_ids() {
    let g = golden();
    let cases = g["cases"].as_array().unwrap();
    let differ = cases.iter().filter(|c| c["ids"] != c["legacy_ids"]).count();
    assert!(differ >= 3, "only {differ} cases tell the rebuilt pipeline from the file's");
    let file = tokenizers::Tokenizer::from_file(common::model_dir(NAME).join("tokenizer.json")).unwrap();
    for case in cases {
        let text = case["text"].as_str().unwrap();
        assert_eq!(file.encode(text, true).unwrap().get_ids(), common::ids(&case["legacy_ids"]), "{text:?}");
    }
}

/// `T5TokenizerFast` is an alias of the same class in 5.17.
#[test]
fn fast_class_name_is_rebuilt_too() {
    let dir = with_config(|c| c["tokenizer_class"] = "T5TokenizerFast".into());
    check(&Tokenizer::from_dir(dir.path()).unwrap(), &golden()["cases"]);
}

/// With `added_tokens_decoder` in tokenizer_config.json the added tokens and their flags come from
/// there (`<image>` not special: decoding keeps it), not from tokenizer.json.
#[test]
fn added_tokens_decoder_of_the_config_wins() {
    let variant = golden()["added_tokens_decoder_variant"].clone();
    let dir = with_config(|c| *c = variant["tokenizer_config"].clone());
    check(&Tokenizer::from_dir(dir.path()).unwrap(), &variant["cases"]);
}

/// A model type whose hub tokenizer class AutoTokenizer ignores loads tokenizer.json as written.
#[test]
fn hub_class_ignored_keeps_the_file_pipeline() {
    let dir = with_config(|_| {});
    std::fs::write(dir.path().join("config.json"), r#"{"model_type": "llava"}"#).unwrap();
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    let case = golden()["cases"].as_array().unwrap().iter().find(|c| c["ids"] != c["legacy_ids"]).unwrap().clone();
    assert_eq!(tok.encode(case["text"].as_str().unwrap()).unwrap(), common::ids(&case["legacy_ids"]));
}

/// T5Tokenizer named over a BPE tokenizer.json: an error naming the file, the model type and the fix.
#[test]
fn t5_class_over_bpe_file_is_an_error() {
    let dir = common::tempdir();
    let src: &Path = &common::model_dir("blip2-opt-tiny");
    std::fs::copy(src.join("tokenizer.json"), dir.path().join("tokenizer.json")).unwrap();
    std::fs::write(dir.path().join("tokenizer_config.json"), r#"{"tokenizer_class": "T5Tokenizer"}"#).unwrap();
    let err = Tokenizer::from_dir(dir.path()).err().expect("a BPE file under T5Tokenizer must fail").to_string();
    for want in ["tokenizer.json", "Unigram", "\"BPE\"", "tokenizer_class"] {
        assert!(err.contains(want), "{want:?} missing from: {err}");
    }
}

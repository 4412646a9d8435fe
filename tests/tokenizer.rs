//! Tokenizer parity with transformers (goldens in tests/fixtures/goldens/tokens.json), and the
//! vocab.json + merges.txt fallback.

mod common;

use glimpse::tokenizer::Tokenizer;

fn check_goldens(tok: &Tokenizer) {
    let g = common::golden_json("tokens.json");
    let encode = g["encode"].as_array().unwrap();
    assert!(encode.len() >= 10);
    for case in encode {
        let text = case["text"].as_str().unwrap();
        assert_eq!(tok.encode(text).unwrap(), common::ids(&case["ids"]), "encode {text:?}");
    }
    let decode = g["decode"].as_array().unwrap();
    assert!(decode.iter().any(|c| c["text"].as_str().unwrap().contains('\u{fffd}')), "goldens cover invalid UTF-8");
    for case in decode {
        let ids = common::ids(&case["ids"]);
        assert_eq!(tok.decode_text(&ids).unwrap(), case["text"].as_str().unwrap(), "decode {ids:?}");
        assert_eq!(tok.decode(&ids, true).unwrap(), case["decoded"].as_str().unwrap(), "decode unstripped {ids:?}");
        assert_eq!(tok.decode(&ids, false).unwrap(), case["raw"].as_str().unwrap(), "decode with specials {ids:?}");
    }
}

#[test]
fn tokenizer_json_matches_transformers() {
    check_goldens(&Tokenizer::from_dir(&common::model_dir("blip2-opt-tiny")).unwrap());
}

/// A GPT-2 style folder (vocab.json + merges.txt + tokenizer_config.json, no tokenizer.json)
/// made from the fixture's tokenizer.json gives the same ids.
#[test]
fn vocab_and_merges_fallback_matches() {
    let src = common::model_dir("blip2-opt-tiny");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer.json")).unwrap()).unwrap();
    let dir = common::tempdir();
    std::fs::write(dir.path().join("vocab.json"), json["model"]["vocab"].to_string()).unwrap();
    let merges: Vec<String> = json["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Array(pair) => format!("{} {}", pair[0].as_str().unwrap(), pair[1].as_str().unwrap()),
            other => panic!("merge {other}"),
        })
        .collect();
    std::fs::write(dir.path().join("merges.txt"), format!("#version: 0.2\n{}\n", merges.join("\n"))).unwrap();
    // OPT's slow-tokenizer config: BOS `</s>` added, `<image>` as an added special token.
    let image_id =
        json["added_tokens"].as_array().unwrap().iter().find(|t| t["content"] == "<image>").unwrap()["id"].clone();
    let config = serde_json::json!({
        "add_bos_token": true, "bos_token": "</s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
        "added_tokens_decoder": {
            "0": {"content": "<s>", "special": true}, "1": {"content": "<pad>", "special": true},
            "2": {"content": "</s>", "special": true}, "3": {"content": "<unk>", "special": true},
            image_id.to_string(): {"content": "<image>", "special": true}
        }
    });
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    let fallback = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(fallback.token_to_id("<image>").map(u64::from), image_id.as_u64());
    check_goldens(&fallback);
}

#[test]
fn missing_tokenizer_names_the_files() {
    let dir = common::tempdir();
    let err = Tokenizer::from_dir(dir.path()).err().expect("no tokenizer").to_string();
    assert!(err.contains("tokenizer.json") && err.contains("vocab.json"), "{err}");
}

#[test]
fn strip_matches_python() {
    assert_eq!(glimpse::tokenizer::py_strip("\u{1c} a b \n\t"), "a b");
}

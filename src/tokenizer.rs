//! Text side: the checkpoint's tokenizer (`tokenizer.json`, or GPT-2 style `vocab.json` +
//! `merges.txt`), encoding with its template (OPT prepends `</s>`), decoding as transformers'
//! `batch_decode(skip_special_tokens=True)` followed by `.strip()`.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;
use std::str::FromStr;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;

use tokenizers::{AddedToken, Tokenizer as HfTokenizer};

use crate::error::{Error, Result};

pub struct Tokenizer {
    inner: HfTokenizer,
    /// `clean_up_tokenization_spaces` from tokenizer_config.json (transformers 5 default: false).
    clean_up_spaces: bool,
    /// `pad_token` of tokenizer_config.json, when it is in the vocabulary.
    pad_id: Option<u32>,
    /// `bos_token` of tokenizer_config.json, when it is in the vocabulary.
    bos: Option<(String, u32)>,
    /// `eos_token` of tokenizer_config.json, when it is in the vocabulary.
    eos_id: Option<u32>,
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

/// A token given in tokenizer_config.json either as a string or as an AddedToken object.
fn token_content(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(m) => m.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    }
}

impl Tokenizer {
    /// Loads the tokenizer of an HF model folder.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let config_path = dir.join("tokenizer_config.json");
        let config: Value = if config_path.exists() { crate::json::read_json(&config_path)? } else { Value::Null };
        let clean_up_spaces = config.get("clean_up_tokenization_spaces").and_then(Value::as_bool).unwrap_or(false);

        let json = dir.join("tokenizer.json");
        let class = config.get("tokenizer_class").and_then(Value::as_str);
        let llama = matches!(class, Some("LlamaTokenizer" | "LlamaTokenizerFast")) && !hub_class_ignored(dir);
        let t5 = matches!(class, Some("T5Tokenizer" | "T5TokenizerFast")) && !hub_class_ignored(dir);
        let inner = if json.exists() && is_clip(&config) && !hub_class_ignored(dir) {
            clip_tokenizer(&json, &config)?
        } else if json.exists() && (llama || t5) {
            let spec: Value = crate::json::read_json(&json)?;
            let err = |e: String| Error::Tokenizer(format!("{}: {e}", json.display()));
            let spec = if t5 { t5_rebuild(spec, &config).map_err(err)? } else { llama_rebuild(spec, &config) };
            HfTokenizer::from_str(&spec.to_string()).map_err(|e| err(e.to_string()))?
        } else if json.exists() {
            HfTokenizer::from_bytes(crate::files::read(&json, crate::files::MAX_CONFIG_BYTES)?)
                .map_err(|e| Error::Tokenizer(format!("{}: {e}", json.display())))?
        } else {
            Self::from_vocab_merges(dir, &config)?
        };
        if inner.get_vocab_size(false) == 0 {
            let source = if json.exists() { json } else { dir.join("vocab.json") };
            return Err(Error::Tokenizer(format!(
                "{}: the tokenizer's vocabulary is empty: the model's text cannot be tokenized; restore the checkpoint's tokenizer files",
                source.display()
            )));
        }
        let special = |key: &str| {
            let content = config.get(key).and_then(token_content)?;
            inner.token_to_id(&content).map(|id| (content, id))
        };
        let (pad_id, bos, eos_id) =
            (special("pad_token").map(|t| t.1), special("bos_token"), special("eos_token").map(|t| t.1));
        Ok(Self { inner, clean_up_spaces, pad_id, bos, eos_id })
    }

    /// The padding token's id (tokenizer_config.json `pad_token`), if it has one.
    pub fn pad_token_id(&self) -> Option<u32> {
        self.pad_id
    }

    /// The beginning-of-sequence token's text (tokenizer_config.json `bos_token`), if it has one.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos.as_ref().map(|(t, _)| t.as_str())
    }

    /// The end-of-sequence token's id (tokenizer_config.json `eos_token`), if it has one.
    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// GPT-2 style byte-level BPE from `vocab.json` + `merges.txt`, with the special tokens and
    /// BOS behaviour (`add_bos_token`) of tokenizer_config.json.
    fn from_vocab_merges(dir: &Path, config: &Value) -> Result<HfTokenizer> {
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        for p in [&vocab, &merges] {
            if !p.exists() {
                return Err(Error::MissingFile {
                    path: dir.join("tokenizer.json"),
                    hint: format!(" (nor the fallback {})", p.display()),
                });
            }
            if crate::files::check_regular(p)?.len() > crate::files::MAX_CONFIG_BYTES {
                return Err(Error::Tokenizer(format!(
                    "{}: larger than {} MiB",
                    p.display(),
                    crate::files::MAX_CONFIG_BYTES >> 20
                )));
            }
        }
        let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
            .build()
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", vocab.display())))?;
        let mut tok = HfTokenizer::new(bpe);
        tok.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
        tok.with_decoder(Some(ByteLevel::default()));

        let mut specials: Vec<String> = ["bos_token", "eos_token", "unk_token", "pad_token"]
            .iter()
            .filter_map(|k| config.get(*k).and_then(token_content))
            .collect();
        if let Some(Value::Object(added)) = config.get("added_tokens_decoder") {
            specials.extend(added.values().filter_map(token_content));
        }
        let added: Vec<AddedToken> = specials.iter().map(|s| AddedToken::from(s.clone(), true)).collect();
        tok.add_special_tokens(&added);

        let add_bos = config.get("add_bos_token").and_then(Value::as_bool).unwrap_or(false);
        if let (true, Some(bos)) = (add_bos, config.get("bos_token").and_then(token_content)) {
            let id = tok
                .token_to_id(&bos)
                .ok_or_else(|| Error::Tokenizer(format!("bos_token `{bos}` is not in {}", vocab.display())))?;
            let template = TemplateProcessing::builder()
                .try_single(format!("{bos} $A"))
                .and_then(|b| b.try_pair(format!("{bos} $A {bos} $B")))
                .map_err(tok_err)?
                .special_tokens(vec![(bos.clone(), id)])
                .build()
                .map_err(tok_err)?;
            tok.with_post_processor(Some(template));
        }
        Ok(tok)
    }

    /// Token ids of `text` with the template's special tokens (for OPT: `</s>` first).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, true).map_err(tok_err)?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of `text` without the template's special tokens (`add_special_tokens=False`).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(tok_err)?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes like transformers' `decode(ids, skip_special_tokens)`: byte sequences that are
    /// not valid UTF-8 become U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let text = self.inner.decode(ids, skip_special_tokens).map_err(tok_err)?;
        Ok(if self.clean_up_spaces { clean_up_tokenization(&text) } else { text })
    }

    /// What BLIP-2 callers print: special tokens skipped, then Python's `str.strip()`.
    pub fn decode_text(&self, ids: &[u32]) -> Result<String> {
        Ok(py_strip(&self.decode(ids, true)?).to_string())
    }

    /// The `tokenizers` tokenizer underneath (transformers' `backend_tokenizer`): its vocabulary
    /// and decoder resolve stop strings (generate/stop.rs).
    pub fn backend(&self) -> &HfTokenizer {
        &self.inner
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// tokenizer_config.json names CLIP's tokenizer class (the fast name is an alias in 5.17).
fn is_clip(config: &Value) -> bool {
    matches!(config.get("tokenizer_class").and_then(Value::as_str), Some("CLIPTokenizer" | "CLIPTokenizerFast"))
}

/// transformers 5.17's `CLIPTokenizer`: only the vocabulary and merges come from tokenizer.json;
/// the class rebuilds everything else, so glimpse does too (a hub file written by an older
/// converter then still tokenizes as transformers does): NFC, whitespace runs to one space and
/// lowercasing (no ftfy, no html unescape), CLIP's split regex then byte-level, BPE with `</w>`
/// ending each word and unknown pieces as `unk_token`, `<|startoftext|> ... <|endoftext|>`
/// around every text. No truncation: a text past the model's positions is the model's error.
fn clip_tokenizer(json: &Path, config: &Value) -> Result<HfTokenizer> {
    let err = |msg: String| Error::Tokenizer(format!("{}: {msg}", json.display()));
    let mut v: Value = crate::json::read_json(json)?;
    let token = |key: &str, default: &str| config.get(key).and_then(token_content).unwrap_or_else(|| default.into());
    let (bos, eos, unk) = (
        token("bos_token", "<|startoftext|>"),
        token("eos_token", "<|endoftext|>"),
        token("unk_token", "<|endoftext|>"),
    );
    let id_of = |v: &Value, t: &str| -> Option<u64> {
        let in_vocab = v.pointer("/model/vocab").and_then(|m| m.get(t)).and_then(Value::as_u64);
        let added = v.get("added_tokens").and_then(Value::as_array).and_then(|a| {
            a.iter().find(|x| x.get("content").and_then(Value::as_str) == Some(t)).and_then(|x| x.get("id")?.as_u64())
        });
        added.or(in_vocab)
    };
    let (bos_id, eos_id) = match (id_of(&v, &bos), id_of(&v, &eos)) {
        (Some(b), Some(e)) => (b, e),
        _ => return Err(err(format!("the CLIP tokens `{bos}` and `{eos}` must both be in the vocabulary"))),
    };
    let model = v.get_mut("model").and_then(Value::as_object_mut).ok_or_else(|| err("no `model` object".into()))?;
    if model.get("type").and_then(Value::as_str) != Some("BPE") {
        return Err(err(format!(
            "CLIPTokenizer needs a BPE model, this file has {}",
            model.get("type").unwrap_or(&Value::Null)
        )));
    }
    for (k, val) in [
        ("dropout", Value::Null),
        ("unk_token", Value::String(unk)),
        ("continuing_subword_prefix", Value::String(String::new())),
        ("end_of_word_suffix", Value::String("</w>".into())),
        ("fuse_unk", Value::Bool(false)),
        ("byte_fallback", Value::Bool(false)),
        ("ignore_merges", Value::Bool(false)),
    ] {
        model.insert(k.into(), val);
    }
    let pipeline = serde_json::json!({
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"},
            {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
            {"type": "Lowercase"}]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": CLIP_SPLIT}, "behavior": "Removed", "invert": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]},
        "post_processor": {"type": "RobertaProcessing", "sep": [eos, eos_id], "cls": [bos, bos_id],
            "trim_offsets": false, "add_prefix_space": false},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "truncation": null,
        "padding": null,
    });
    let obj = v.as_object_mut().ok_or_else(|| err("not a JSON object".into()))?;
    for (k, val) in pipeline.as_object().into_iter().flatten() {
        obj.insert(k.clone(), val.clone());
    }
    let bytes = serde_json::to_vec(&v).map_err(|e| err(e.to_string()))?;
    HfTokenizer::from_bytes(bytes).map_err(|e| err(e.to_string()))
}

/// `CLIPTokenizer`'s pre-tokenizer regex (specials, contractions, letter runs, single digits,
/// other non-space runs).
const CLIP_SPLIT: &str = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// transformers 5.17's `MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS`: for these config.json model
/// types AutoTokenizer ignores tokenizer_config.json's `tokenizer_class` and loads tokenizer.json
/// as it is (`TokenizersBackend`); LLaVA checkpoints naming LlamaTokenizer are among them.
const HUB_CLASS_IGNORED: [&str; 45] = [
    "arctic",
    "camembertv2-base",
    "chameleon",
    "chatlm",
    "cohere_asr",
    "deepseek_ocr",
    "deepseek_ocr2",
    "deepseek_v2",
    "deepseek_v3",
    "deepseek_v32",
    "deepseek_v4",
    "deepseek_vl",
    "deepseek_vl_hybrid",
    "deepseek_vl_v2",
    "ernie4_5",
    "ernie4_5_moe",
    "fuyu",
    "h2ovl_chat",
    "hyperclovax",
    "hyperclovax_vlm",
    "internlm2",
    "jamba",
    "janus",
    "llava",
    "llava_next",
    "minicpm3",
    "minicpmv",
    "minimax_m2",
    "modernbert",
    "molmo",
    "molmo2",
    "nemotron",
    "nvfp4",
    "opencua",
    "openvla",
    "paddleocr_vl",
    "phi3",
    "phi3_v",
    "phimoe",
    "qwen2",
    "smolvlm",
    "step3_vl",
    "step3p5",
    "vipllava",
    "vision-encoder-decoder",
];

/// Whether the model folder's config.json `model_type` is in [`HUB_CLASS_IGNORED`].
fn hub_class_ignored(dir: &Path) -> bool {
    let Ok(bytes) = crate::files::read(&dir.join("config.json"), crate::files::MAX_CONFIG_BYTES) else { return false };
    let Ok(v) = serde_json::from_slice::<Value>(&bytes) else { return false };
    v.get("model_type").and_then(Value::as_str).is_some_and(|t| HUB_CLASS_IGNORED.contains(&t))
}

/// transformers 5.17's `LlamaTokenizer.__init__` applied to a tokenizer.json (docs/models/llama.md#tokenizer):
/// only the vocabulary, merges and added tokens are kept; the file's normalizer, pre-tokenizer and
/// decoder are replaced by Metaspace (`prepend_scheme` "first" unless `legacy` is true: "always";
/// "never" when `add_prefix_space` is false, without splitting), byte fallback and a decoder that
/// strips one leading space; BOS/EOS templates follow `add_bos_token` / `add_eos_token` when
/// tokenizer_config.json sets either.
fn llama_rebuild(mut spec: Value, config: &Value) -> Value {
    let add_prefix_space = config.get("add_prefix_space").and_then(Value::as_bool).unwrap_or(true);
    let legacy = config.get("legacy").and_then(Value::as_bool).unwrap_or(false);
    let scheme = match (add_prefix_space, legacy) {
        (false, _) => "never",
        (true, true) => "always",
        (true, false) => "first",
    };
    if let Some(model) = spec.get_mut("model").and_then(Value::as_object_mut) {
        model.insert("byte_fallback".into(), Value::Bool(true));
        model.insert("fuse_unk".into(), Value::Bool(true));
    }
    let mut decoders = vec![
        serde_json::json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        serde_json::json!({"type": "ByteFallback"}),
        serde_json::json!({"type": "Fuse"}),
    ];
    if add_prefix_space {
        decoders.push(serde_json::json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    spec["normalizer"] = Value::Null;
    spec["pre_tokenizer"] =
        serde_json::json!({"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": scheme, "split": false});
    spec["decoder"] = serde_json::json!({"type": "Sequence", "decoders": decoders});
    let (bos, eos) = (config.get("add_bos_token"), config.get("add_eos_token"));
    if bos.is_some() || eos.is_some() {
        let add_bos = bos.and_then(Value::as_bool).unwrap_or(true);
        let add_eos = eos.and_then(Value::as_bool).unwrap_or(false);
        let name = |key: &str, default: &str| config.get(key).and_then(token_content).unwrap_or(default.into());
        let (b, e) = (name("bos_token", "<s>"), name("eos_token", "</s>"));
        let id_of = |tok: &str| {
            spec["added_tokens"]
                .as_array()
                .and_then(|a| a.iter().find(|t| t["content"] == tok))
                .map(|t| t["id"].clone())
                .or_else(|| spec["model"]["vocab"].get(tok).cloned())
        };
        let special = |tok: &str, type_id: u32| serde_json::json!({"SpecialToken": {"id": tok, "type_id": type_id}});
        let seq = |id: &str, type_id: u32| serde_json::json!({"Sequence": {"id": id, "type_id": type_id}});
        let (mut single, mut pair) = (Vec::new(), Vec::new());
        let mut specials = serde_json::Map::new();
        for (tok, on) in [(&b, add_bos), (&e, add_eos)] {
            if let (true, Some(id)) = (on, id_of(tok)) {
                specials.insert(tok.clone(), serde_json::json!({"id": tok, "ids": [id], "tokens": [tok]}));
            }
        }
        for (type_id, part) in [(0u32, "A"), (1, "B")] {
            let out = if type_id == 0 { &mut single } else { &mut pair };
            if add_bos && specials.contains_key(&b) {
                out.push(special(&b, type_id));
            }
            out.push(seq(part, type_id));
            if add_eos && specials.contains_key(&e) {
                out.push(special(&e, type_id));
            }
        }
        let pair: Vec<Value> = single.iter().cloned().chain(pair).collect();
        spec["post_processor"] = serde_json::json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials});
    }
    spec
}

/// transformers 5.17's `T5Tokenizer.__init__` applied to a tokenizer.json (docs/models/t5.md#tokenizer): only
/// the Unigram vocabulary with its scores and the file's `Precompiled` charsmap are kept (hub
/// Flan-T5 files wrap it in a Sequence with `Replace(" {2,}")`, which is dropped, as are the file's
/// lone Metaspace pre-tokenizer, decoder and template). The class rebuilds `unk_id` 2 without byte
/// fallback, whitespace-split + Metaspace (so newlines, tabs and leading / trailing spaces only
/// separate words), a Metaspace decoder and `$A </s>` with the EOS token's id.
fn t5_rebuild(mut spec: Value, config: &Value) -> std::result::Result<Value, String> {
    let model = spec.get_mut("model").and_then(Value::as_object_mut).ok_or("no `model` object")?;
    if model.get("type").and_then(Value::as_str) != Some("Unigram") {
        return Err(format!(
            "T5Tokenizer needs a Unigram model, this file has {}; name another tokenizer_class in tokenizer_config.json",
            model.get("type").unwrap_or(&Value::Null)
        ));
    }
    let vocab = model.get_mut("vocab").map(Value::take).unwrap_or(Value::Null);
    let pieces = vocab.as_array().filter(|v| v.len() > 2).ok_or_else(|| {
        format!(
            "T5Tokenizer needs a Unigram vocab of at least 3 pieces (unk_id is 2), this file has {}",
            vocab.as_array().map_or(0, Vec::len)
        )
    })?;
    let mut added = t5_added_tokens(&spec, config);
    // Ids as the backend's `add_tokens` gives them: a piece's own id, else the next free one.
    let piece_ids: HashMap<&str, usize> =
        pieces.iter().enumerate().filter_map(|(i, p)| Some((p.get(0)?.as_str()?, i))).collect();
    let mut next = pieces.len();
    for tok in &mut added {
        let id = tok["content"].as_str().and_then(|c| piece_ids.get(c).copied()).unwrap_or_else(|| {
            next += 1;
            next - 1
        });
        tok["id"] = id.into();
    }
    let eos = config.get("eos_token").and_then(token_content).unwrap_or_else(|| "</s>".into());
    let eos_id = added.iter().find(|t| t["content"] == eos.as_str()).map(|t| t["id"].clone()).ok_or_else(|| {
        format!("the EOS token `{eos}` is neither a piece nor an added token; set eos_token in tokenizer_config.json")
    })?;
    let normalizer = match &spec["normalizer"] {
        Value::Object(n) if n.get("type").and_then(Value::as_str) == Some("Sequence") => {
            n.get("normalizers").and_then(Value::as_array).cloned().unwrap_or_default()
        }
        Value::Null => Vec::new(),
        other => vec![other.clone()],
    }
    .into_iter()
    .find(|n| n["type"] == "Precompiled" && n.get("precompiled_charsmap").is_some())
    .unwrap_or(Value::Null);
    let metaspace =
        serde_json::json!({"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "always", "split": true});
    let seq = |id: &str| serde_json::json!({"Sequence": {"id": id, "type_id": 0}});
    let end = serde_json::json!({"SpecialToken": {"id": "</s>", "type_id": 0}});
    Ok(serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "WhitespaceSplit"}, metaspace]},
        "post_processor": {"type": "TemplateProcessing", "single": [seq("A"), end], "pair": [seq("A"), end, seq("B"), end],
            "special_tokens": {"</s>": {"id": "</s>", "ids": [eos_id], "tokens": ["</s>"]}}},
        "decoder": metaspace,
        "model": {"type": "Unigram", "unk_id": 2, "vocab": vocab, "byte_fallback": false},
    }))
}

/// The added tokens a 5.17 `TokenizersBackend` class ends up with, in the order it adds them
/// (ids are assigned afterwards): tokenizer_config.json's `added_tokens_decoder` by id, or when the
/// config has none the tokenizer.json's `added_tokens`; then the named special tokens (T5's
/// defaults `</s>`, `<unk>`, `<pad>`) and the extra special tokens (the config's list, else
/// `<extra_id_0>`..`<extra_id_{extra_ids-1}>`) not already among them, as special unnormalized tokens.
fn t5_added_tokens(spec: &Value, config: &Value) -> Vec<Value> {
    let flags = |content: &str, v: &Value| {
        let flag = |k: &str, default: bool| v.get(k).and_then(Value::as_bool).unwrap_or(default);
        let special = flag("special", false);
        serde_json::json!({"id": 0, "content": content, "single_word": flag("single_word", false),
            "lstrip": flag("lstrip", false), "rstrip": flag("rstrip", false),
            "normalized": flag("normalized", !special), "special": special})
    };
    let mut added: Vec<(u64, Value)> = match config.get("added_tokens_decoder").and_then(Value::as_object) {
        Some(m) => m.iter().filter_map(|(id, v)| Some((id.parse().ok()?, flags(&token_content(v)?, v)))).collect(),
        None => spec["added_tokens"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| Some((v.get("id")?.as_u64()?, flags(v.get("content")?.as_str()?, v))))
            .collect(),
    };
    added.sort_by_key(|(id, _)| *id);
    let mut added: Vec<Value> = added.into_iter().map(|(_, v)| v).collect();
    let named = ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"];
    let defaults = |key: &str| match key {
        "eos_token" => Some("</s>".to_string()),
        "unk_token" => Some("<unk>".into()),
        "pad_token" => Some("<pad>".into()),
        _ => None,
    };
    let mut specials: Vec<(String, Value)> = named
        .iter()
        .filter_map(|k| match config.get(*k) {
            Some(v) => token_content(v).map(|c| (c, v.clone())),
            None => defaults(k).map(|c| (c, Value::Null)),
        })
        .collect();
    let listed = ["extra_special_tokens", "additional_special_tokens"]
        .iter()
        .find_map(|k| config.get(*k).and_then(Value::as_array));
    match listed {
        Some(list) => specials.extend(list.iter().filter_map(|v| Some((token_content(v)?, v.clone())))),
        None => {
            let n = config.get("extra_ids").and_then(Value::as_u64).unwrap_or(100);
            specials.extend((0..n).map(|i| (format!("<extra_id_{i}>"), Value::Null)));
        }
    }
    for (content, v) in specials {
        if !added.iter().any(|t| t["content"] == content.as_str()) {
            let mut tok = flags(&content, &v);
            tok["special"] = true.into();
            // A token named as a string becomes `AddedToken(content, special=True)`: unnormalized.
            if !v.is_object() {
                tok["normalized"] = false.into();
            }
            added.push(tok);
        }
    }
    added
}

/// Python's `str.strip()` with no argument: `str.isspace` also counts U+001C..U+001F.
pub fn py_strip(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}

/// transformers' `clean_up_tokenization`: removes spaces before punctuation and contractions.
fn clean_up_tokenization(s: &str) -> String {
    const RULES: [(&str, &str); 10] = [
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ];
    RULES.iter().fold(s.to_string(), |acc, (from, to)| acc.replace(from, to))
}

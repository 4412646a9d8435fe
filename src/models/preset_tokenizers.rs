//! Synthetic `tokenizer.json` files for `glimpse synth`, one builder per tokenizer kind the
//! families use (byte-level BPE for OPT, LLaMA's SentencePiece layout, BERT WordPiece for the
//! Q-Former, CLIP's BPE, T5's Unigram): real pipelines over made-up vocabularies whose special
//! ids sit where the real checkpoints have them.

use std::collections::HashSet;

use serde_json::{json, Value};

use crate::error::{Error, Result};

// ---------------------------------------------------------------------------------------------
// Tokenizer: byte-level BPE with OPT's special ids.

/// GPT-2's byte -> printable character map, in its order (printable bytes first).
fn byte_chars() -> Vec<char> {
    let mut bs: Vec<u32> = (u32::from(b'!')..=u32::from(b'~')).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    cs.into_iter().map(|c| char::from_u32(c).expect("valid char")).collect()
}

/// Whole words that get their own token (each through a chain of merges), so the VQA prompt
/// tokenizes to 8 tokens as with OPT's real tokenizer.
const WORDS: &[&str] = &[
    "Question",
    "ĠAnswer",
    "Ġwhat",
    "Ġis",
    "Ġthis",
    "Ġa",
    "Ġan",
    "Ġthe",
    "Ġof",
    "Ġon",
    "Ġin",
    "Ġwith",
    "Ġand",
    "Ġdog",
    "Ġcat",
    "Ġman",
    "Ġwoman",
    "Ġsitting",
    "Ġstanding",
    "Ġbeach",
    "Ġtable",
    "Ġpicture",
    "Ġphoto",
    "Ġred",
    "Ġblue",
    "Ġgreen",
    "Ġwhite",
    "Ġblack",
    "Ġpeople",
    "Ġstreet",
    "Ġcar",
    "Ġtree",
    "Ġwater",
    "Ġsky",
    "Ġhouse",
    "Ġtwo",
    "Ġcolor",
    "Ġhow",
    "Ġmany",
    "Ġwhere",
];

/// Appends to `vocab`, up to `n` entries: for each word (a list of base units) a chain of merges
/// joining its units left to right, then pseudo-words `fill(syllables)` that no merge produces.
fn grow_bpe(
    vocab: &mut Vec<String>,
    words: &[Vec<String>],
    n: usize,
    fill: impl Fn(&str) -> String,
) -> Result<Vec<(String, String)>> {
    let mut merges: Vec<(String, String)> = Vec::new();
    let mut seen: HashSet<String> = vocab.iter().cloned().collect();
    for units in words {
        let Some((first, rest)) = units.split_first() else { continue };
        let mut prefix = first.clone();
        for c in rest {
            let next = format!("{prefix}{c}");
            if seen.insert(next.clone()) {
                merges.push((prefix.clone(), c.clone()));
                vocab.push(next.clone());
            }
            prefix = next;
        }
    }
    let (consonants, vowels) = ("bdfgklmnprstvz", "aeiou");
    let syllables: Vec<String> =
        consonants.chars().flat_map(|c| vowels.chars().map(move |v| format!("{c}{v}"))).collect();
    let mut k = 0usize;
    while vocab.len() < n {
        // k -> syllables, shortest words first.
        let (mut rest, mut len, mut base) = (k, 1, syllables.len());
        while rest >= base {
            rest -= base;
            len += 1;
            base *= syllables.len();
        }
        let mut word = String::new();
        for _ in 0..len {
            word.push_str(&syllables[rest % syllables.len()]);
            rest /= syllables.len();
        }
        k += 1;
        let word = fill(&word);
        if seen.insert(word.clone()) {
            vocab.push(word);
        }
    }
    if vocab.len() > n {
        return Err(Error::InvalidInput(format!(
            "a synthetic vocabulary of {n} entries leaves no room for the {} base tokens: give the preset a larger vocabulary",
            vocab.len()
        )));
    }
    Ok(merges)
}

fn vocab_object(vocab: &[String]) -> serde_json::Map<String, Value> {
    vocab.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect()
}

fn merges_array(merges: &[(String, String)]) -> Vec<Value> {
    merges.iter().map(|(a, b)| json!([a, b])).collect()
}

pub(crate) fn added_token(id: u32, content: &str) -> Value {
    json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
           "normalized": false, "special": true})
}

/// A `TemplateProcessing` post-processor that puts special token `token` (id `id`) before the
/// sequence, and before each sequence of a pair (OPT's `</s>`, LLaMA's `<s>`).
fn leading_token_template(token: &str, id: u32) -> Value {
    json!({
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": token, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": token, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": token, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {token: {"id": token, "ids": [id], "tokens": [token]}}
    })
}

/// `tokenizer.json`: `image_token` BPE entries (ids 0..image_token), then `<image>` as a special
/// added token that takes id `image_token`, like the real BLIP-2 OPT tokenizer. `Ċ` ("\n") sits at
/// `eos`; entries no merge produces fill the vocabulary (pronounceable pseudo-words).
pub fn tokenizer_json(image_token: u32, eos: u32) -> Result<Value> {
    let n = image_token as usize;
    let mut vocab: Vec<String> = ["<s>", "<pad>", "</s>", "<unk>"].iter().map(|s| s.to_string()).collect();
    vocab.extend(byte_chars().into_iter().map(String::from));
    let words: Vec<Vec<String>> = WORDS.iter().map(|w| w.chars().map(String::from).collect()).collect();
    let merges = grow_bpe(&mut vocab, &words, n, |s| format!("Ġ{s}"))?;
    let newline = vocab.iter().position(|t| t == "Ċ").expect("byte token");
    if (4..n).contains(&(eos as usize)) {
        vocab.swap(newline, eos as usize);
    }
    let added = added_token;
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [added(0, "<s>"), added(1, "<pad>"), added(2, "</s>"), added(3, "<unk>"), added(image_token, "<image>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": leading_token_template("</s>", 2),
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab_object(&vocab),
            "merges": merges_array(&merges)
        }
    }))
}

/// A LLaMA (SentencePiece-style) `tokenizer.json` as llava-hf ships it: `<unk>` `<s>` `</s>`, 256
/// byte-fallback tokens, `▁` and printable ASCII, word pieces ([`WORDS`] with `▁`), pseudo-words up
/// to id `image_token`; then `<image>` and `<pad>` as added tokens at `image_token`, `+ 1`.
pub fn llama_tokenizer_json(image_token: u32) -> Result<Value> {
    let mut vocab: Vec<String> = ["<unk>", "<s>", "</s>"].iter().map(|s| s.to_string()).collect();
    vocab.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
    vocab.push("\u{2581}".into());
    vocab.extend((b'!'..=b'~').map(|b| char::from(b).to_string()));
    let words: Vec<Vec<String>> = WORDS
        .iter()
        .chain(&["USER", "ASSISTANT"])
        .map(|w| {
            std::iter::once("\u{2581}".to_string()).chain(w.trim_start_matches('Ġ').chars().map(String::from)).collect()
        })
        .collect();
    let merges = grow_bpe(&mut vocab, &words, image_token as usize, |s| format!("\u{2581}{s}"))?;
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": llama_special_tokens(image_token).map(|(id, t)| added_token(id, t)),
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u{2581}"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}]},
        "pre_tokenizer": null,
        "post_processor": leading_token_template("<s>", 1),
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab_object(&vocab),
            "merges": merges_array(&merges)
        }
    }))
}

/// The added tokens of [`llama_tokenizer_json`] by id: `<unk>` `<s>` `</s>`, then `<image>` at
/// `image_token` and `<pad>` after it.
pub(crate) fn llama_special_tokens(image_token: u32) -> [(u32, &'static str); 5] {
    [(0, "<unk>"), (1, "<s>"), (2, "</s>"), (image_token, "<image>"), (image_token + 1, "<pad>")]
}

/// `generation_config.json` of a synth checkpoint with [`llama_tokenizer_json`]'s ids: BOS `<s>`,
/// EOS `</s>`, padding `<pad>`.
pub(crate) fn llama_generation_config(image_token: u32) -> Value {
    json!({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": image_token + 1, "transformers_version": "5.17.0"})
}

/// The Q-Former's BERT WordPiece `tokenizer.json` (bert-base-uncased's pipeline) of `vocab_size`
/// entries: `[PAD]` `[UNK]` `[CLS]` `[SEP]` `[MASK]`, printable ASCII, `##` letters and digits, the
/// synthetic words lower-cased, `[unused{i}]` fillers, and `[DEC]` (the InstructBLIP conversion's
/// bos_token) as the last id.
pub fn bert_tokenizer_json(vocab_size: usize) -> Result<Value> {
    let specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];
    let mut vocab: Vec<String> = specials.iter().map(|s| s.to_string()).collect();
    vocab.extend((b'!'..=b'~').filter(|b| !b.is_ascii_uppercase()).map(|b| char::from(b).to_string()));
    vocab.extend((b'a'..=b'z').chain(b'0'..=b'9').map(|b| format!("##{}", char::from(b))));
    let mut seen: HashSet<String> = vocab.iter().cloned().collect();
    for w in WORDS.iter().map(|w| w.trim_start_matches('Ġ').to_lowercase()) {
        if w.chars().all(|c| c.is_ascii_alphabetic()) && seen.insert(w.clone()) {
            vocab.push(w);
        }
    }
    let dec = vocab_size.checked_sub(1).filter(|&d| d >= vocab.len()).ok_or_else(|| {
        Error::InvalidInput(format!(
            "qformer_config.vocab_size {vocab_size} is too small for the synthetic BERT tokenizer (at least {})",
            vocab.len() + 1
        ))
    })?;
    let fill = dec - vocab.len();
    vocab.extend((0..fill).map(|i| format!("[unused{i}]")));
    let mut added: Vec<Value> = (0..specials.len()).map(|i| added_token(i as u32, specials[i])).collect();
    added.push(added_token(dec as u32, "[DEC]"));
    let special = |t: &str, id: usize| json!({"id": t, "ids": [id], "tokens": [t]});
    let tok = |t: &str, ty: u32| json!({"SpecialToken": {"id": t, "type_id": ty}});
    let seq = |s: &str, ty: u32| json!({"Sequence": {"id": s, "type_id": ty}});
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true,
                       "strip_accents": null, "lowercase": true},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [tok("[CLS]", 0), seq("A", 0), tok("[SEP]", 0)],
            "pair": [tok("[CLS]", 0), seq("A", 0), tok("[SEP]", 0), seq("B", 1), tok("[SEP]", 1)],
            "special_tokens": {"[CLS]": special("[CLS]", 2), "[SEP]": special("[SEP]", 3)}
        },
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                  "max_input_chars_per_word": 100, "vocab": vocab_object(&vocab)}
    }))
}

/// A CLIP `tokenizer.json` of `vocab_size` entries: byte characters, the same with `</w>` (word
/// ends), word pieces, pseudo-words, then `<|startoftext|>` and `<|endoftext|>` as the last two ids.
pub fn clip_tokenizer_json(vocab_size: u32) -> Result<Value> {
    let n = vocab_size as usize;
    let mut vocab: Vec<String> = byte_chars().into_iter().map(String::from).collect();
    vocab.extend(byte_chars().into_iter().map(|c| format!("{c}</w>")));
    let words: Vec<Vec<String>> = WORDS
        .iter()
        .chain(&["photo", "cat", "dog", "diagram", "person"])
        .map(|w| {
            let chars: Vec<char> = w.trim_start_matches('Ġ').to_lowercase().chars().collect();
            let last = chars.len().saturating_sub(1);
            chars.iter().enumerate().map(|(i, c)| if i == last { format!("{c}</w>") } else { c.to_string() }).collect()
        })
        .collect();
    let merges = grow_bpe(&mut vocab, &words, n.saturating_sub(2), |s| format!("{s}</w>"))?;
    let (bos, eos) = (vocab_size - 2, vocab_size - 1);
    vocab.push("<|startoftext|>".into());
    vocab.push("<|endoftext|>".into());
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [added_token(bos, "<|startoftext|>"), added_token(eos, "<|endoftext|>")],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"}, {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "}, {"type": "Lowercase"}]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+"},
             "behavior": "Removed", "invert": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]},
        "post_processor": {"type": "RobertaProcessing", "sep": ["<|endoftext|>", eos], "cls": ["<|startoftext|>", bos],
                           "trim_offsets": false, "add_prefix_space": false},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": "<|endoftext|>", "continuing_subword_prefix": "",
            "end_of_word_suffix": "</w>", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab_object(&vocab),
            "merges": merges_array(&merges)
        }
    }))
}

/// A T5-style Unigram tokenizer.json as transformers 5.17's `T5Tokenizer` saves it (docs/models/t5.md): `<pad>` 0, `</s>` 1, `<unk>` 2, pieces, 100 `<extra_id_*>` (reversed) up to
/// `image_token`, then `<image>`; WhitespaceSplit + Metaspace, `$A </s>`. The pieces are
/// `▁`, the printable ASCII characters, `▁`-words of common English, then fillers
/// that never match text, so the ids of real Flan-T5 checkpoints' special tokens hold.
pub fn t5_tokenizer_json(image_token: u32) -> Value {
    const EXTRA: u32 = 100;
    const WORDS: &str = "the a an of in on at to is are what this that picture image photo question answer how many \
        where who why color man woman dog cat people standing sitting with and there it";
    let mut vocab: Vec<(String, f64)> = ["<pad>", "</s>", "<unk>"].iter().map(|t| (t.to_string(), 0.0)).collect();
    vocab.push(("\u{2581}".into(), -2.0));
    let mut seen: HashSet<String> = vocab.iter().map(|(p, _)| p.clone()).collect();
    let mut push = |piece: String, score: f64, vocab: &mut Vec<(String, f64)>| {
        if seen.insert(piece.clone()) {
            vocab.push((piece, score));
        }
    };
    for w in WORDS.split_whitespace() {
        push(format!("\u{2581}{w}"), -6.0, &mut vocab);
        let mut cap = w.to_string();
        cap[..1].make_ascii_uppercase();
        push(format!("\u{2581}{cap}"), -7.0, &mut vocab);
    }
    for c in (33u8..127).map(char::from) {
        push(c.to_string(), -10.0, &mut vocab);
        push(format!("\u{2581}{c}"), -11.0, &mut vocab);
    }
    let base = image_token.saturating_sub(EXTRA) as usize;
    let mut i = 0;
    while vocab.len() < base {
        push(format!("\u{2581}\u{e000}{i}"), -30.0, &mut vocab);
        i += 1;
    }
    let special = |id: usize, t: &str| {
        json!({"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
               "normalized": false, "special": true})
    };
    let mut added: Vec<Value> = ["<pad>", "</s>", "<unk>"].iter().enumerate().map(|(i, t)| special(i, t)).collect();
    for e in (0..EXTRA).rev() {
        let t = format!("<extra_id_{e}>");
        added.push(special(vocab.len(), &t));
        vocab.push((t, 0.0));
    }
    added.push(special(vocab.len(), "<image>"));
    let metaspace = json!({"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "always", "split": true});
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "WhitespaceSplit"}, metaspace]},
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}}],
            "special_tokens": {"</s>": {"id": "</s>", "ids": [1], "tokens": ["</s>"]}}},
        "decoder": metaspace,
        "model": {"type": "Unigram", "unk_id": 2, "vocab": vocab, "byte_fallback": false}
    })
}

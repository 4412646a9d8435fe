//! `glimpse synth` presets of SmolVLM: config.json as transformers 5.17 writes
//! HuggingFaceTB/SmolVLM-256M/500M-Instruct, and the folder's tokenizer, processor and
//! generation config around random weights.
//!
//! The synthetic tokenizer is a byte-level BPE (SmolLM2's kind) whose special tokens sit right
//! after `<image>` ([`SPECIALS`]); real checkpoints number them differently, which nothing here
//! depends on (the ids are read from the files).

use serde_json::{json, Value};

use super::Idefics3Config;
use crate::error::{Error, Result};
use crate::models::preset_tokenizers::{added_token, tokenizer_json};
use crate::models::presets::{llama_text_json, not_a_preset, vocab_u32, Widths};

/// The added tokens after `<image>` (id `image_token_id`), in id order from `image_token_id + 1`,
/// then the 36 `<row_r_col_c>` tokens (r, c in 1..=6).
const SPECIALS: [&str; 4] = ["<fake_token_around_image>", "<global-img>", "<end_of_utterance>", "<|im_start|>"];
const GRID: usize = 6;

fn special_id(image: u32, token: &str) -> u32 {
    image + 1 + SPECIALS.iter().position(|&s| s == token).expect("a listed special token") as u32
}

/// Every added token after `<image>`, with its id.
fn added_after_image(image: u32) -> Vec<(u32, String)> {
    let rows = (1..=GRID).flat_map(|r| (1..=GRID).map(move |c| format!("<row_{r}_col_{c}>")));
    SPECIALS.iter().map(|s| s.to_string()).chain(rows).enumerate().map(|(i, s)| (image + 1 + i as u32, s)).collect()
}

/// `config.json` of a SmolVLM preset. The 256M and 500M checkpoints store their own `lm_head`
/// (config.json's `tie_word_embeddings` is false, text_config's SmolLM2 value true, which the
/// composite model ignores): that head is what makes them 256M and 507M parameters. The tiny
/// preset ties it.
pub(super) fn smolvlm_json(name: &str) -> Result<Value> {
    // vision (hidden, intermediate, layers, heads, image, patch), scale factor, text (hidden,
    // intermediate, layers, heads, kv heads, vocab, image token, max positions)
    let ((vh, vi, vl, vn, vs, vp), scale, (th, ti, tl, tn, tkv, vocab, image, positions), tie) = match name {
        "smolvlm-256m" => ((768, 3072, 12, 12, 512, 16), 4, (576, 1536, 30, 9, 3, 49280, 49190, 8192), false),
        "smolvlm-500m" => ((768, 3072, 12, 12, 512, 16), 4, (960, 2560, 32, 15, 5, 49280, 49190, 8192), false),
        // HuggingFaceTB/SmolVLM-Instruct: SigLIP so400m at 384 px / patch 14 (27 x 27 patches, the
        // conv floors), SmolLM2-1.7B. Its image token is 49153, two below the vocabulary's end;
        // the synthetic tokenizer's 40 special tokens need room after it, so it sits at 49100.
        "smolvlm-2.2b" => ((1152, 4304, 27, 16, 384, 14), 3, (2048, 8192, 24, 32, 32, 49155, 49100, 16384), false),
        // tests/fixtures/smolvlm-tiny's towers; room for the synthetic tokenizer's base entries.
        "smolvlm-tiny" => ((32, 48, 2, 4, 32, 4), 2, (32, 64, 2, 4, 2, 1088, 1000, 2048), true),
        _ => return Err(not_a_preset(name)),
    };
    let rope_theta = if name == "smolvlm-2.2b" { 273768.0 } else { 100000.0 };
    let pad = 1;
    let mut text = llama_text_json(
        Widths { hidden: th, intermediate: ti, layers: tl, heads: tn },
        tkv,
        positions,
        vocab,
        pad,
        1e-5,
    );
    text["bos_token_id"] = json!(special_id(image, "<|im_start|>"));
    text["eos_token_id"] = json!(special_id(image, "<end_of_utterance>"));
    text["rope_parameters"] = json!({"rope_theta": rope_theta, "rope_type": "default"});
    text["tie_word_embeddings"] = json!(true);
    Ok(json!({
        "architectures": ["Idefics3ForConditionalGeneration"],
        "dtype": "float16",
        "glimpse_synth": { "preset": name, "note": "random weights made by `glimpse synth`; not a trained model" },
        "image_token_id": image,
        "model_type": "idefics3",
        "pad_token_id": pad,
        "scale_factor": scale,
        "text_config": text,
        "tie_word_embeddings": tie,
        "transformers_version": "5.17.0",
        "use_cache": true,
        "vision_config": {
            "attention_dropout": 0.0,
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_size": vh,
            "image_size": vs,
            "initializer_range": 0.02,
            "intermediate_size": vi,
            "layer_norm_eps": 1e-06,
            "model_type": "idefics3_vision",
            "num_attention_heads": vn,
            "num_channels": 3,
            "num_hidden_layers": vl,
            "patch_size": vp
        }
    }))
}

/// The folder's `tokenizer.json`: byte-level BPE up to `<image>`, then [`added_after_image`].
pub(super) fn tokenizer(cfg: &Idefics3Config) -> Result<Value> {
    let image = cfg.image_token_id;
    let last = image as usize + added_after_image(image).len();
    if last >= cfg.text_config.vocab_size {
        return Err(Error::InvalidInput(format!(
            "synth: image_token_id {image} leaves no room for SmolVLM's {} special tokens below the vocabulary size {}",
            added_after_image(image).len(),
            cfg.text_config.vocab_size
        )));
    }
    let newline_at = vocab_u32(4 + 256)?; // any base entry: the EOS is an added token here
    let mut tok = tokenizer_json(image, newline_at)?;
    let added = tok["added_tokens"].as_array_mut().expect("tokenizer_json lists added tokens");
    added.extend(added_after_image(image).iter().map(|(id, s)| added_token(*id, s)));
    // SmolLM2's tokenizer adds no special tokens: the chat template starts with `<|im_start|>`.
    tok["post_processor"] = Value::Null;
    Ok(tok)
}

/// tokenizer.json, tokenizer_config.json, processor_config.json and generation_config.json.
pub(super) fn files(cfg: &Idefics3Config) -> Result<Vec<(&'static str, Value)>> {
    let image = cfg.image_token_id;
    let (bos, eos) = (special_id(image, "<|im_start|>"), special_id(image, "<end_of_utterance>"));
    let tile = cfg.vision_config.image_size;
    Ok(vec![
        (
            "generation_config.json",
            json!({"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": 1, "transformers_version": "5.17.0"}),
        ),
        ("tokenizer.json", tokenizer(cfg)?),
        (
            "tokenizer_config.json",
            json!({"add_prefix_space": false, "bos_token": "<|im_start|>", "eos_token": "<end_of_utterance>",
                   "model_max_length": cfg.text_config.max_position_embeddings, "pad_token": "<pad>",
                   "processor_class": "Idefics3Processor", "tokenizer_class": "GPT2Tokenizer", "unk_token": "<unk>"}),
        ),
        (
            "processor_config.json",
            json!({
                "image_processor": {
                    "do_convert_rgb": true, "do_image_splitting": true, "do_normalize": true, "do_pad": true,
                    "do_rescale": true, "do_resize": true, "image_mean": [0.5, 0.5, 0.5],
                    "image_processor_type": "Idefics3ImageProcessor", "image_std": [0.5, 0.5, 0.5],
                    "max_image_size": {"longest_edge": tile}, "resample": 1,
                    "rescale_factor": 1.0f64 / 255.0, "size": {"longest_edge": 4 * tile}
                },
                "image_seq_len": cfg.image_seq_len(),
                "processor_class": "Idefics3Processor"
            }),
        ),
    ])
}

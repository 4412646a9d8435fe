//! `glimpse synth` presets of IDEFICS: config.json as transformers 5.17 writes
//! HuggingFaceM4/idefics-9b's layout (8,929,675,280 parameters as transformers counts them), a
//! tiny one, and the folder's tokenizer, image processor and generation config.
//!
//! The synthetic tokenizer is LLaMA-style with `<fake_token_around_image>` and `<image>` as the
//! two additional ids (`vocab_size`, `vocab_size + 1`), and `<unk>` as the pad token, as
//! idefics-9b's; nothing depends on those numbers (the ids are read from the files).

use serde_json::{json, Value};

use super::config::IdeficsConfig;
use super::processor::{FAKE_TOKEN, IMAGE_TOKEN};
use crate::config::{OPENAI_CLIP_MEAN, OPENAI_CLIP_STD};
use crate::error::{Error, Result};
use crate::models::preset_tokenizers::{added_token, llama_tokenizer_json};
use crate::models::presets::not_a_preset;

/// `config.json` of an IDEFICS preset.
pub(super) fn idefics_json(name: &str) -> Result<Value> {
    // vision (embed, intermediate, layers, heads, image, patch); resampler (latents, depth,
    // heads, head dim, qk norms); text (hidden, intermediate, layers, heads, vocab, interval,
    // qk norms, max positions)
    let (vision, perceiver, text) = match name {
        "idefics-9b" => {
            ((1280, 5120, 32, 16, 224, 14), (64, 6, 16, 96, false), (4096, 11008, 32, 32, 32000, 4, false, 2048))
        }
        // tests/fixtures/idefics-tiny's shapes; room for the synthetic tokenizer's base entries.
        "idefics-tiny" => ((32, 48, 2, 4, 30, 6), (6, 2, 2, 16, true), (64, 128, 2, 4, 1000, 1, true, 512)),
        _ => return Err(not_a_preset(name)),
    };
    let ((vd, vi, vl, vn, vs, vp), (lat, depth, rh, rhd, rqk), (h, i, l, n, vocab, interval, qk, positions)) =
        (vision, perceiver, text);
    Ok(json!({
        "additional_vocab_size": 2,
        "alpha_initializer": "zeros",
        "alpha_type": "float",
        "alphas_initializer_range": 0.0,
        "architectures": ["IdeficsForVisionText2Text"],
        "bos_token_id": 1,
        "cross_layer_interval": interval,
        "dropout": 0.0,
        "dtype": "float16",
        "eos_token_id": 2,
        "glimpse_synth": { "preset": name, "note": "random weights made by `glimpse synth`; not a trained model" },
        "hidden_act": "silu",
        "hidden_size": h,
        "intermediate_size": i,
        "max_position_embeddings": positions,
        "model_type": "idefics",
        "num_attention_heads": n,
        "num_hidden_layers": l,
        "pad_token_id": 0,
        "perceiver_config": {
            "model_type": "idefics_perciever",
            "qk_layer_norms_perceiver": rqk,
            "resampler_depth": depth,
            "resampler_head_dim": rhd,
            "resampler_n_heads": rh,
            "resampler_n_latents": lat,
            "use_resampler": true
        },
        "qk_layer_norms": qk,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "tie_word_embeddings": false,
        "transformers_version": "5.17.0",
        "use_cache": true,
        "use_resampler": true,
        "vision_config": {
            "attention_dropout": 0.0,
            "embed_dim": vd,
            "hidden_act": "gelu",
            "image_size": vs,
            "intermediate_size": vi,
            "layer_norm_eps": 1e-5,
            "model_type": "idefics_vision",
            "num_attention_heads": vn,
            "num_channels": 3,
            "num_hidden_layers": vl,
            "patch_size": vp
        },
        "vocab_size": vocab
    }))
}

/// The folder's `tokenizer.json`: LLaMA-style BPE up to `vocab_size`, then the fake-image and
/// image tokens as the two additional ids.
pub(super) fn tokenizer(cfg: &IdeficsConfig) -> Result<Value> {
    let base =
        u32::try_from(cfg.text.vocab_size).map_err(|_| Error::InvalidInput("synth: vocab_size too large".into()))?;
    if cfg.additional_vocab_size < 2 {
        return Err(Error::InvalidInput(format!(
            "synth: additional_vocab_size is {}, but the synthetic tokenizer puts {FAKE_TOKEN} and {IMAGE_TOKEN} in two additional ids",
            cfg.additional_vocab_size
        )));
    }
    let mut tok = llama_tokenizer_json(base)?;
    tok["added_tokens"] = json!([
        added_token(0, "<unk>"),
        added_token(1, "<s>"),
        added_token(2, "</s>"),
        added_token(base, FAKE_TOKEN),
        added_token(base + 1, IMAGE_TOKEN)
    ]);
    // IdeficsProcessor writes `<s>` into the text and tokenizes without special tokens.
    Ok(tok)
}

/// tokenizer.json, tokenizer_config.json, preprocessor_config.json and generation_config.json.
pub(super) fn files(cfg: &IdeficsConfig) -> Result<Vec<(&'static str, Value)>> {
    let tok = tokenizer(cfg)?;
    let added: serde_json::Map<String, Value> = tok["added_tokens"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            let mut entry = t.clone();
            let id = entry.as_object_mut().and_then(|o| o.remove("id")).unwrap_or_default();
            (id.to_string(), entry)
        })
        .collect();
    Ok(vec![
        (
            "generation_config.json",
            json!({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "transformers_version": "5.17.0"}),
        ),
        ("tokenizer.json", tok),
        (
            "tokenizer_config.json",
            json!({"add_bos_token": true, "add_eos_token": false, "added_tokens_decoder": added,
                   "bos_token": "<s>", "clean_up_tokenization_spaces": false, "eos_token": "</s>", "legacy": false,
                   "model_max_length": cfg.text.max_position_embeddings, "pad_token": "<unk>",
                   "processor_class": "IdeficsProcessor", "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>"}),
        ),
        (
            "preprocessor_config.json",
            json!({"image_mean": OPENAI_CLIP_MEAN, "image_num_channels": 3,
                   "image_processor_type": "IdeficsImageProcessor", "image_size": cfg.vision_config.image_size,
                   "image_std": OPENAI_CLIP_STD}),
        ),
    ])
}

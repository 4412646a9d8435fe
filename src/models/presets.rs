//! What the families' `glimpse synth` presets share: the processor and tokenizer files
//! transformers writes for the towers and decoders several families use. Each family's own
//! presets (names, dims, config.json) live in its file.

use serde_json::{json, Value};

use super::preset_tokenizers::t5_tokenizer_json;
use crate::error::{Error, Result};

/// CLIP's `logit_scale_init_value`, ln(1 / 0.07) rounded as transformers writes it: what synth
/// writes into CLIP presets and initialises `logit_scale` with.
pub const LOGIT_SCALE_INIT: f32 = 2.6592;

/// The error for a preset name a family does not offer (the registry checks names first).
pub(crate) fn not_a_preset(name: &str) -> Error {
    Error::InvalidInput(format!("unknown preset `{name}`"))
}

/// `BlipImageProcessor` of BLIP-2 and InstructBLIP: bicubic resize to `side` x `side`, CLIP's
/// mean and std.
pub(crate) fn blip_image_processor(side: usize) -> Value {
    json!({
        "do_convert_rgb": true,
        "do_normalize": true,
        "do_rescale": true,
        "do_resize": true,
        "image_mean": crate::config::OPENAI_CLIP_MEAN,
        "image_processor_type": "BlipImageProcessor",
        "image_std": crate::config::OPENAI_CLIP_STD,
        "resample": 3,
        "rescale_factor": 1.0f64 / 255.0,
        "size": {"height": side, "width": side}
    })
}

/// `vocab_size` as a token id bound, or an error naming it.
pub(crate) fn vocab_u32(vocab: usize) -> Result<u32> {
    u32::try_from(vocab).map_err(|_| Error::InvalidInput(format!("vocab_size {vocab} is too large")))
}

/// `text_config` of a Flan-T5 language model as the BLIP-2 / InstructBLIP conversions write it
/// (docs/models/t5.md): gated GELU with `dense_act_fn` "gelu" (erf), untied head, no output
/// scaling, decoder start 0, EOS 1.
pub(crate) fn t5_text_json(dm: usize, dkv: usize, dff: usize, tl: usize, tn: usize, vocab: usize) -> Value {
    json!({
        "bos_token_id": 1,
        "classifier_dropout": 0.0,
        "d_ff": dff,
        "d_kv": dkv,
        "d_model": dm,
        "decoder_start_token_id": 0,
        "dense_act_fn": "gelu",
        "dropout_rate": 0.1,
        "eos_token_id": 1,
        "feed_forward_proj": "gated-gelu",
        "initializer_factor": 1.0,
        "is_decoder": false,
        "is_gated_act": true,
        "layer_norm_epsilon": 1e-06,
        "model_type": "t5",
        "num_decoder_layers": tl,
        "num_heads": tn,
        "num_layers": tl,
        "pad_token_id": 0,
        "relative_attention_max_distance": 128,
        "relative_attention_num_buckets": 32,
        "scale_decoder_outputs": false,
        "tie_word_embeddings": false,
        "use_cache": true,
        "vocab_size": vocab
    })
}

/// A Flan-T5 language model's tokenizer and generation files (the T5 tokenizer with `<image>`,
/// `tokenizer_class` T5Tokenizer as 5.17 saves it, `<image>` at `image_token`) for a processor of
/// class `processor`.
pub(crate) fn t5_language_files(image_token: u32, processor: &str) -> Vec<(&'static str, Value)> {
    vec![
        (
            "generation_config.json",
            json!({"bos_token_id": 1, "decoder_start_token_id": 0, "eos_token_id": 1, "pad_token_id": 0,
                   "transformers_version": "5.17.0"}),
        ),
        ("tokenizer.json", t5_tokenizer_json(image_token)),
        (
            "tokenizer_config.json",
            json!({"backend": "tokenizers", "eos_token": "</s>", "extra_ids": 100, "pad_token": "<pad>",
                   "processor_class": processor, "tokenizer_class": "T5Tokenizer", "unk_token": "<unk>"}),
        ),
    ]
}

/// `CLIPImageProcessor` of CLIP and LLaVA-1.5: shortest edge to `side`, centre crop `side`.
pub(crate) fn clip_image_processor(side: usize) -> Value {
    json!({
        "crop_size": {"height": side, "width": side},
        "do_center_crop": true,
        "do_convert_rgb": true,
        "do_normalize": true,
        "do_rescale": true,
        "do_resize": true,
        "image_mean": crate::config::OPENAI_CLIP_MEAN,
        "image_processor_type": "CLIPImageProcessor",
        "image_std": crate::config::OPENAI_CLIP_STD,
        "resample": 3,
        "rescale_factor": 1.0f64 / 255.0,
        "size": {"shortest_edge": side}
    })
}

/// The widths of a decoder or tower preset: hidden, intermediate, layers, attention heads.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Widths {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
}

/// `text_config` of a LLaMA decoder as transformers 5.17 writes it (Vicuna, LLaMA-2): SiLU,
/// default RoPE, untied head, BOS 1, EOS 2, `pad` the pad id.
pub(crate) fn llama_text_json(
    w: Widths,
    kv_heads: usize,
    positions: usize,
    vocab: usize,
    pad: u32,
    rms_norm_eps: f64,
) -> Value {
    json!({
        "attention_bias": false,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "head_dim": w.hidden / w.heads,
        "hidden_act": "silu",
        "hidden_size": w.hidden,
        "initializer_range": 0.02,
        "intermediate_size": w.intermediate,
        "max_position_embeddings": positions,
        "mlp_bias": false,
        "model_type": "llama",
        "num_attention_heads": w.heads,
        "num_hidden_layers": w.layers,
        "num_key_value_heads": kv_heads,
        "pad_token_id": pad,
        "pretraining_tp": 1,
        "rms_norm_eps": rms_norm_eps,
        "rope_parameters": { "rope_theta": 10000.0, "rope_type": "default" },
        "tie_word_embeddings": false,
        "use_cache": true,
        "vocab_size": vocab
    })
}

/// `vision_config` of a CLIP vision tower (`CLIPVisionConfig` as 5.17 writes it): quick GELU,
/// `image` pixels in `patch` patches.
pub(crate) fn clip_vision_json(w: Widths, image: usize, patch: usize, projection_dim: usize) -> Value {
    json!({
        "attention_dropout": 0.0,
        "hidden_act": "quick_gelu",
        "hidden_size": w.hidden,
        "image_size": image,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": w.intermediate,
        "layer_norm_eps": 1e-05,
        "model_type": "clip_vision_model",
        "num_attention_heads": w.heads,
        "num_channels": 3,
        "num_hidden_layers": w.layers,
        "patch_size": patch,
        "projection_dim": projection_dim
    })
}

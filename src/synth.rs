//! `glimpse synth`: models of every family (BLIP-2 OPT, LLaVA-1.5, CLIP) with random weights at
//! real shapes, made in memory (for `glimpse bench`) or written as a Hugging Face checkpoint folder
//! that transformers loads (for scripts/hf_reference.py), so glimpse and transformers run
//! identical weights.
//!
//! Weights follow scripts/make_fixtures.py so activations stay O(1) and greedy text varies:
//! Linear/Conv weights N(0, (gain/sqrt(fan_in))^2) with gain 1 (vision, Q-Former, projection) or
//! 3 (OPT: with gain 1 the tied embedding dominates the residual stream and a random model
//! repeats its input token), every bias N(0, 0.1^2), LayerNorm weight 1 + N(0, 0.1^2), token
//! embeddings N(0, 0.25^2) (the EOS row x2, rows past the tokenizer x0.2), OPT positions N(0, 1),
//! vision positions N(0, 0.5^2), class embedding and query tokens N(0, 1). Everything is fp16.
//! At 32 OPT layers this keeps the residual stream below ~300 (checked with transformers).
//! LLaVA and CLIP follow the same rules by tensor name (gain 3 under `language_model.`, RMSNorm
//! weights as LayerNorm weights, CLIP token embeddings N(0, 0.25^2), position embeddings
//! N(0, 0.5^2)); CLIP's `logit_scale` is its init value 2.6592 (ln(1/0.07)).
//!
//! Values come from a counter-based generator: tensor `name` of seed `s`, chunk `c` always gets
//! the same numbers, whatever the thread count, so a preset and a seed name one model.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;
use serde_json::{json, Value};

use crate::config::{Blip2Config, ModelConfig};
use crate::error::{Error, Result};
use crate::weights::{Checkpoint, Weight};

/// Names accepted by [`preset`]: BLIP-2 OPT (`tiny` is tests/fixtures/blip2-opt-tiny's dims) and Flan-T5,
/// LLaVA-1.5, CLIP and InstructBLIP (Vicuna and Flan-T5), each family with a tiny variant for tests.
pub const PRESETS: [&str; 14] = [
    "tiny",
    "blip2-opt-2.7b",
    "blip2-opt-6.7b",
    "blip2-flan-t5-xl",
    "blip2-flan-t5-tiny",
    "llava-1.5-7b",
    "llava-1.5-13b",
    "llava-tiny",
    "clip-vit-large-patch14",
    "clip-tiny",
    "instructblip-vicuna-7b",
    "instructblip-tiny",
    "instructblip-flan-t5-xl",
    "instructblip-flan-t5-tiny",
];

/// The VQA prompt the bench and hf_reference.py time (tokenizes to 8 tokens + BOS, as with OPT).
pub const VQA_PROMPT: &str = "Question: what is this? Answer:";

/// Shapes of one preset.
struct Dims {
    /// hidden, intermediate, layers, heads
    vision: (usize, usize, usize, usize),
    /// hidden, intermediate, layers, heads, cross-attention frequency
    qformer: (usize, usize, usize, usize, usize),
    /// hidden, ffn, layers, heads, max positions
    text: (usize, usize, usize, usize, usize),
    /// Model vocabulary (embedding rows), a padded size larger than the tokenizer.
    vocab_size: usize,
    /// Id of `<image>`, = number of BPE vocabulary entries (as in the real OPT tokenizer).
    image_token: u32,
    /// EOS = the "\n" token ("Ċ"), as in BLIP-2 OPT's text_config.
    eos: u32,
    num_query_tokens: usize,
}

fn dims(name: &str) -> Result<Dims> {
    // EVA ViT-g and the Q-Former of every BLIP-2 OPT checkpoint.
    let vision = (1408, 6144, 39, 16);
    let qformer = (768, 3072, 12, 12, 2);
    let opt = |hidden, ffn| Dims {
        vision,
        qformer,
        text: (hidden, ffn, 32, 32, 2048),
        // Salesforce/blip2-opt-2.7b: text_config.vocab_size 50304, image_token_index 50265, eos 50118.
        vocab_size: 50304,
        image_token: 50265,
        eos: 50118,
        num_query_tokens: 32,
    };
    match name {
        // The dims of tests/fixtures/blip2-opt-tiny: head dims 88 / 64 / 80, 257 image tokens.
        "tiny" => Ok(Dims {
            vision: (176, 352, 2, 2),
            qformer: (128, 256, 4, 2, 2),
            text: (160, 320, 2, 2, 512),
            vocab_size: 1008,
            image_token: 1000,
            eos: 202,
            num_query_tokens: 32,
        }),
        "blip2-opt-2.7b" => Ok(opt(2560, 10240)),
        "blip2-opt-6.7b" => Ok(opt(4096, 16384)),
        _ => Err(unknown(name)),
    }
}

fn unknown(name: &str) -> Error {
    Error::InvalidInput(format!("unknown preset `{name}` (presets: {})", PRESETS.join(", ")))
}

/// `config.json` of a preset, as transformers 5.17 writes it for its class.
pub fn preset_json(name: &str) -> Result<Value> {
    match name {
        n if n.starts_with("llava-") => llava_json(n),
        n if n.starts_with("clip-") => clip_json(n),
        n if n.starts_with("instructblip-flan-t5-") => instructblip_t5_json(n),
        n if n.starts_with("instructblip-") => instructblip_json(n),
        n if n.starts_with("blip2-flan-t5-") => blip2_t5_json(n),
        n => blip2_json(n),
    }
}

/// `config.json` of a BLIP-2 preset (`Blip2ForConditionalGeneration`).
fn blip2_json(name: &str) -> Result<Value> {
    let d = dims(name)?;
    let (vh, vi, vl, vn) = d.vision;
    let (qh, qi, ql, qn, qf) = d.qformer;
    let (th, tf, tl, tn, tp) = d.text;
    Ok(json!({
        "architectures": ["Blip2ForConditionalGeneration"],
        "dtype": "float16",
        "glimpse_synth": { "preset": name, "note": "random weights made by `glimpse synth`; not a trained model" },
        "image_text_hidden_size": 256,
        "image_token_index": d.image_token,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "model_type": "blip-2",
        "num_query_tokens": d.num_query_tokens,
        "qformer_config": {
            "attention_probs_dropout_prob": 0.1,
            "cross_attention_frequency": qf,
            "encoder_hidden_size": vh,
            "hidden_act": "gelu",
            "hidden_dropout_prob": 0.1,
            "hidden_size": qh,
            "initializer_range": 0.02,
            "intermediate_size": qi,
            "layer_norm_eps": 1e-12,
            "max_position_embeddings": 512,
            "model_type": "blip_2_qformer",
            "num_attention_heads": qn,
            "num_hidden_layers": ql,
            "pad_token_id": 0,
            "use_qformer_text_input": false,
            "vocab_size": 30522
        },
        "text_config": {
            "_remove_final_layer_norm": false,
            "activation_function": "relu",
            "attention_dropout": 0.0,
            "bos_token_id": 2,
            "do_layer_norm_before": true,
            "dropout": 0.1,
            "enable_bias": true,
            "eos_token_id": d.eos,
            "ffn_dim": tf,
            "hidden_size": th,
            "init_std": 0.02,
            "layer_norm_elementwise_affine": true,
            "layerdrop": 0.0,
            "max_position_embeddings": tp,
            "model_type": "opt",
            "num_attention_heads": tn,
            "num_hidden_layers": tl,
            "pad_token_id": 1,
            "tie_word_embeddings": true,
            "use_cache": true,
            "vocab_size": d.vocab_size,
            "word_embed_proj_dim": th
        },
        "transformers_version": "5.17.0",
        "use_decoder_only_language_model": true,
        "vision_config": {
            "attention_dropout": 0.0,
            "hidden_act": "gelu",
            "hidden_size": vh,
            "image_size": 224,
            "initializer_range": 1e-10,
            "intermediate_size": vi,
            "layer_norm_eps": 1e-06,
            "model_type": "blip_2_vision_model",
            "num_attention_heads": vn,
            "num_hidden_layers": vl,
            "patch_size": 14,
            "qkv_bias": true
        }
    }))
}

/// `config.json` of a BLIP-2 Flan-T5 preset, as transformers 5.17 writes Salesforce/blip2-flan-t5-xl
/// (design/t5.md §1: gated GELU with `dense_act_fn` "gelu", untied head, no output scaling,
/// `<image>` = 32100). The tiny preset has tests/fixtures/blip2-flan-t5-tiny's T5 and 32100-token
/// vocabulary layout at small widths.
fn blip2_t5_json(name: &str) -> Result<Value> {
    // text: d_model, d_kv, d_ff, layers, heads; vocab, image token
    let (vision, qformer, (dm, dkv, dff, tl, tn), (vocab, image)) = match name {
        "blip2-flan-t5-xl" => ((1408, 6144, 39, 16), (768, 3072, 12, 12, 2), (2048, 64, 5120, 24, 32), (32128, 32100)),
        "blip2-flan-t5-tiny" => ((32, 64, 1, 2), (32, 64, 2, 2, 1), (32, 16, 48, 2, 3), (32128, 32100)),
        _ => return Err(unknown(name)),
    };
    let mut v = blip2_json("tiny")?;
    let (vh, vi, vl, vn) = vision;
    let (qh, qi, ql, qn, qf) = qformer;
    v["glimpse_synth"]["preset"] = json!(name);
    v["image_token_index"] = json!(image);
    v["is_encoder_decoder"] = json!(true);
    v["use_decoder_only_language_model"] = json!(false);
    for (key, value) in
        [("hidden_size", vh), ("intermediate_size", vi), ("num_hidden_layers", vl), ("num_attention_heads", vn)]
    {
        v["vision_config"][key] = json!(value);
    }
    for (key, value) in [
        ("hidden_size", qh),
        ("intermediate_size", qi),
        ("num_hidden_layers", ql),
        ("num_attention_heads", qn),
        ("cross_attention_frequency", qf),
        ("encoder_hidden_size", vh),
    ] {
        v["qformer_config"][key] = json!(value);
    }
    v["text_config"] = t5_text_json(dm, dkv, dff, tl, tn, vocab);
    Ok(v)
}

/// `text_config` of a Flan-T5 language model as the BLIP-2 / InstructBLIP conversions write it
/// (design/t5.md §1): gated GELU with `dense_act_fn` "gelu" (erf), untied head, no output
/// scaling, decoder start 0, EOS 1.
fn t5_text_json(dm: usize, dkv: usize, dff: usize, tl: usize, tn: usize, vocab: usize) -> Value {
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

/// `config.json` of an InstructBLIP Flan-T5 preset, as transformers 5.17 writes
/// Salesforce/instructblip-flan-t5-xl: InstructBLIP's vision encoder and Q-Former (the Vicuna
/// preset's, or the tiny one's), a Flan-T5-XL language model (blip2-flan-t5-xl's), `<image>` at
/// 32100 of the T5 tokenizer.
fn instructblip_t5_json(name: &str) -> Result<Value> {
    let (base, (dm, dkv, dff, tl, tn)) = match name {
        "instructblip-flan-t5-xl" => ("instructblip-vicuna-7b", (2048, 64, 5120, 24, 32)),
        "instructblip-flan-t5-tiny" => ("instructblip-tiny", (32, 16, 48, 2, 3)),
        _ => return Err(unknown(name)),
    };
    let mut v = instructblip_json(base)?;
    v["glimpse_synth"]["preset"] = json!(name);
    v["image_token_index"] = json!(32100);
    v["use_decoder_only_language_model"] = json!(false);
    v["text_config"] = t5_text_json(dm, dkv, dff, tl, tn, 32128);
    Ok(v)
}

/// `config.json` of a LLaVA-1.5 preset, as transformers 5.17 writes llava-hf/llava-1.5-*-hf:
/// CLIP ViT-L/14-336 (hidden state -2, CLS dropped), a GELU projector, a LLaMA-2 decoder.
fn llava_json(name: &str) -> Result<Value> {
    // vision (hidden, intermediate, layers, heads, image, patch), text (hidden, intermediate,
    // layers, heads, vocab, image token, max positions)
    let ((vh, vi, vl, vn, vs, vp), (th, ti, tl, tn, vocab, image, positions)) = match name {
        "llava-1.5-7b" => ((1024, 4096, 24, 16, 336, 14), (4096, 11008, 32, 32, 32064, 32000, 4096)),
        "llava-1.5-13b" => ((1024, 4096, 24, 16, 336, 14), (5120, 13824, 40, 40, 32064, 32000, 4096)),
        // tests/fixtures/llava-tiny's towers; room for the synthetic tokenizer's base entries.
        "llava-tiny" => ((32, 48, 3, 4, 24, 6), (32, 48, 2, 4, 1024, 1000, 512)),
        _ => return Err(unknown(name)),
    };
    let pad = image + 1;
    Ok(json!({
        "architectures": ["LlavaForConditionalGeneration"],
        "dtype": "float16",
        "glimpse_synth": { "preset": name, "note": "random weights made by `glimpse synth`; not a trained model" },
        "image_seq_length": (vs / vp) * (vs / vp),
        "image_token_index": image,
        "model_type": "llava",
        "multimodal_projector_bias": true,
        "pad_token_id": pad,
        "projector_hidden_act": "gelu",
        "text_config": {
            "attention_bias": false,
            "attention_dropout": 0.0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "head_dim": th / tn,
            "hidden_act": "silu",
            "hidden_size": th,
            "initializer_range": 0.02,
            "intermediate_size": ti,
            "max_position_embeddings": positions,
            "mlp_bias": false,
            "model_type": "llama",
            "num_attention_heads": tn,
            "num_hidden_layers": tl,
            "num_key_value_heads": tn,
            "pad_token_id": pad,
            "pretraining_tp": 1,
            "rms_norm_eps": 1e-05,
            "rope_parameters": { "rope_theta": 10000.0, "rope_type": "default" },
            "tie_word_embeddings": false,
            "use_cache": true,
            "vocab_size": vocab
        },
        "tie_word_embeddings": false,
        "transformers_version": "5.17.0",
        "vision_config": {
            "attention_dropout": 0.0,
            "hidden_act": "quick_gelu",
            "hidden_size": vh,
            "image_size": vs,
            "initializer_factor": 1.0,
            "initializer_range": 0.02,
            "intermediate_size": vi,
            "layer_norm_eps": 1e-05,
            "model_type": "clip_vision_model",
            "num_attention_heads": vn,
            "num_channels": 3,
            "num_hidden_layers": vl,
            "patch_size": vp,
            "projection_dim": 768
        },
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default"
    }))
}

/// `config.json` of an InstructBLIP preset, as transformers 5.17 writes
/// Salesforce/instructblip-vicuna-7b: BLIP-2's EVA ViT-g and Q-Former (with the instruction's
/// embeddings and text FFN, vocabulary 30523 with `[DEC]`), a Vicuna-7B (LLaMA) decoder. The
/// synthetic LLM tokenizer puts `<image>` at 32000 and `<pad>` at 32001 (the hub's are `[PAD]`
/// 32000, `<image>` 32001): same shapes, so the parameter count is the checkpoint's.
fn instructblip_json(name: &str) -> Result<Value> {
    // vision (hidden, intermediate, layers, heads, image, patch), qformer (hidden, intermediate,
    // layers, heads, vocab, positions), text (hidden, intermediate, layers, heads, kv heads,
    // vocab, image token, positions), query tokens
    let ((vh, vi, vl, vn, vs, vp), (qh, qi, ql, qn, qv, qp), (th, ti, tl, tn, tk, vocab, image, positions), nq) =
        match name {
            "instructblip-vicuna-7b" => (
                (1408, 6144, 39, 16, 224, 14),
                (768, 3072, 12, 12, 30523, 512),
                (4096, 11008, 32, 32, 32, 32002, 32000, 2048),
                32,
            ),
            // tests/fixtures/instructblip-tiny's towers; room for the synthetic tokenizers.
            "instructblip-tiny" => {
                ((32, 48, 2, 4, 24, 6), (32, 48, 3, 4, 400, 48), (32, 48, 2, 4, 2, 1024, 1000, 512), 4)
            }
            _ => return Err(unknown(name)),
        };
    Ok(json!({
        "architectures": ["InstructBlipForConditionalGeneration"],
        "dtype": "float16",
        "glimpse_synth": { "preset": name, "note": "random weights made by `glimpse synth`; not a trained model" },
        "image_token_index": image,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "model_type": "instructblip",
        "num_query_tokens": nq,
        "qformer_config": {
            "attention_probs_dropout_prob": 0.1,
            "cross_attention_frequency": 2,
            "encoder_hidden_size": vh,
            "hidden_act": "gelu",
            "hidden_dropout_prob": 0.1,
            "hidden_size": qh,
            "initializer_range": 0.02,
            "intermediate_size": qi,
            "layer_norm_eps": 1e-12,
            "max_position_embeddings": qp,
            "model_type": "instructblip_qformer",
            "num_attention_heads": qn,
            "num_hidden_layers": ql,
            "pad_token_id": 0,
            "vocab_size": qv
        },
        "text_config": {
            "attention_bias": false,
            "attention_dropout": 0.0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "head_dim": th / tn,
            "hidden_act": "silu",
            "hidden_size": th,
            "initializer_range": 0.02,
            "intermediate_size": ti,
            "max_position_embeddings": positions,
            "mlp_bias": false,
            "model_type": "llama",
            "num_attention_heads": tn,
            "num_hidden_layers": tl,
            "num_key_value_heads": tk,
            "pad_token_id": image + 1,
            "pretraining_tp": 1,
            "rms_norm_eps": 1e-06,
            "rope_parameters": { "rope_theta": 10000.0, "rope_type": "default" },
            "tie_word_embeddings": false,
            "use_cache": true,
            "vocab_size": vocab
        },
        "transformers_version": "5.17.0",
        "use_decoder_only_language_model": true,
        "vision_config": {
            "attention_dropout": 0.0,
            "hidden_act": "gelu",
            "hidden_size": vh,
            "image_size": vs,
            "initializer_range": 1e-10,
            "intermediate_size": vi,
            "layer_norm_eps": 1e-06,
            "model_type": "instructblip_vision_model",
            "num_attention_heads": vn,
            "num_hidden_layers": vl,
            "patch_size": vp,
            "qkv_bias": true
        }
    }))
}

/// CLIP's `logit_scale_init_value` (ln(1 / 0.07), rounded as transformers writes it).
const LOGIT_SCALE_INIT: f32 = 2.6592;

/// `config.json` of a CLIP preset (`CLIPModel`, as transformers 5.17 writes
/// openai/clip-vit-large-patch14: both towers, quick GELU, BOS/EOS the last two ids).
fn clip_json(name: &str) -> Result<Value> {
    // vision (hidden, intermediate, layers, heads, image, patch), text (hidden, intermediate,
    // layers, heads, vocab), projection
    let ((vh, vi, vl, vn, vs, vp), (th, ti, tl, tn, vocab), proj) = match name {
        "clip-vit-large-patch14" => ((1024, 4096, 24, 16, 224, 14), (768, 3072, 12, 12, 49408), 768),
        // tests/fixtures/clip-tiny's towers; room for the synthetic tokenizer's base entries.
        "clip-tiny" => ((48, 96, 2, 3, 32, 8), (32, 64, 2, 4, 1024), 24),
        _ => return Err(unknown(name)),
    };
    Ok(json!({
        "architectures": ["CLIPModel"],
        "dtype": "float16",
        "glimpse_synth": { "preset": name, "note": "random weights made by `glimpse synth`; not a trained model" },
        "initializer_factor": 1.0,
        "logit_scale_init_value": LOGIT_SCALE_INIT,
        "model_type": "clip",
        "projection_dim": proj,
        "text_config": {
            "attention_dropout": 0.0,
            "bos_token_id": vocab - 2,
            "eos_token_id": vocab - 1,
            "hidden_act": "quick_gelu",
            "hidden_size": th,
            "initializer_factor": 1.0,
            "initializer_range": 0.02,
            "intermediate_size": ti,
            "layer_norm_eps": 1e-05,
            "max_position_embeddings": 77,
            "model_type": "clip_text_model",
            "num_attention_heads": tn,
            "num_hidden_layers": tl,
            "pad_token_id": 1,
            "projection_dim": proj,
            "vocab_size": vocab
        },
        "transformers_version": "5.17.0",
        "vision_config": {
            "attention_dropout": 0.0,
            "hidden_act": "quick_gelu",
            "hidden_size": vh,
            "image_size": vs,
            "initializer_factor": 1.0,
            "initializer_range": 0.02,
            "intermediate_size": vi,
            "layer_norm_eps": 1e-05,
            "model_type": "clip_vision_model",
            "num_attention_heads": vn,
            "num_channels": 3,
            "num_hidden_layers": vl,
            "patch_size": vp,
            "projection_dim": proj
        }
    }))
}

/// The parsed, validated config of a preset (through the family registry, as config.json is).
pub fn preset(name: &str) -> Result<ModelConfig> {
    let value = preset_json(name)?;
    crate::models::parse_config(&value, Path::new("<synth preset>"))
}

/// How a tensor's values are drawn.
#[derive(Debug, Clone, Copy)]
enum Init {
    /// N(mean, std^2).
    Normal { mean: f32, std: f32 },
    /// Token embeddings N(0, std^2) with the EOS row scaled by 2 and rows from `pad_from` by 0.2.
    Embed { std: f32, cols: usize, eos: usize, pad_from: usize },
}

/// One tensor a family's `load` reads: name, shape, init.
struct Spec {
    name: String,
    shape: Vec<usize>,
    init: Init,
}

/// Every tensor the family's `load` reads for `cfg`, in load order: the model's own loader run on
/// a recording checkpoint, so this list cannot drift from the model (optional tensors stay
/// absent: a tied lm_head is not stored, as transformers writes tied checkpoints). LLaVA adds the
/// vision layers past `vision_feature_layer` and `post_layernorm`, which glimpse never runs but
/// transformers' `CLIPVisionModel` holds.
fn specs(cfg: &ModelConfig) -> Result<Vec<Spec>> {
    let recorder = Checkpoint::recording("<glimpse synth>");
    match cfg {
        ModelConfig::Blip2(c) if matches!(c.text_config, crate::config::TextConfig::T5(_)) => {
            // The untied Flan head is stored (Blip2T5 reads it only when present).
            let t = &c.text_config;
            recorder.f16("language_model.lm_head.weight", &[t.vocab_size(), t.hidden_size()])?;
            drop(crate::models::blip2_t5::Blip2T5::load(c, &recorder)?)
        }
        ModelConfig::Blip2(c) => drop(crate::models::blip2::Blip2::load(c, &recorder)?),
        ModelConfig::Clip(c) => {
            // Clip::load asks whether the projections exist before reading them (a bare tower has
            // none): declare them first. It then reads them itself, and the recorder refuses a
            // shape other than the one declared here.
            let p = c.projection_dim;
            if let Some(t) = &c.text_config {
                recorder.f16("text_projection.weight", &[p, t.hidden_size])?;
            }
            if let Some(v) = &c.vision_config {
                recorder.f16("visual_projection.weight", &[p, v.hidden_size])?;
            }
            crate::models::clip::Clip::load(c, &recorder)?;
        }
        ModelConfig::InstructBlip(c) => {
            if matches!(c.text_config, crate::config::TextConfig::T5(_)) {
                // The untied Flan head is stored, as for BLIP-2 Flan-T5.
                let t = &c.text_config;
                recorder.f16("language_model.lm_head.weight", &[t.vocab_size(), t.hidden_size()])?;
            }
            drop(crate::models::instructblip::InstructBlip::load(c, &recorder)?)
        }
        ModelConfig::Llava(c) => {
            crate::models::llava::Llava::load(c, &recorder)?;
            let v = &c.vision_config;
            let prefix = crate::models::clip_vision::find_prefix(&recorder, &crate::models::llava::VISION_PREFIXES)
                .ok_or_else(|| Error::InvalidInput("Llava::load read no vision tower".into()))?;
            let mut table = crate::graph::WeightTable::default();
            let mut ld = crate::models::Loader { ckpt: &recorder, table: &mut table };
            crate::models::clip_vision::ClipVision::load(v, &mut ld, prefix, v.num_hidden_layers, true)?;
        }
    }
    let ids = token_ids(cfg);
    recorder
        .requested()
        .into_iter()
        .map(|r| Ok(Spec { init: init_for(ids, &r.name, &r.shape)?, name: r.name, shape: r.shape }))
        .collect()
}

/// (EOS, image token) of a generating model's decoder: the embedding rows [`Init::Embed`] scales.
fn token_ids(cfg: &ModelConfig) -> (u32, u32) {
    let first = |e: Option<&crate::config::TokenIds>| e.and_then(|e| e.to_vec().first().copied()).unwrap_or(2);
    match cfg {
        ModelConfig::Blip2(c) => (first(c.text_config.eos_token_id()), c.image_token()),
        ModelConfig::Llava(c) => (first(c.text_config.eos_token_id.as_ref()), c.image_token_index),
        ModelConfig::InstructBlip(c) => (first(c.text_config.eos_token_id()), c.image_token()),
        ModelConfig::Clip(_) => (2, 0),
    }
}

/// How tensor `name` is drawn (the rules of the module comment), from its name and shape;
/// `(eos, image_token)` from [`token_ids`].
fn init_for((eos, image_token): (u32, u32), name: &str, shape: &[usize]) -> Result<Init> {
    let normal = |std: f32| Init::Normal { mean: 0.0, std };
    let leaf = name.rsplit('.').next().unwrap_or(name);
    Ok(match (leaf, shape) {
        ("bias", _) => normal(0.1),
        ("logit_scale", []) => Init::Normal { mean: LOGIT_SCALE_INIT, std: 0.0 },
        (_, [rows, cols]) if name.ends_with(".embed_tokens.weight") => {
            Init::Embed { std: 0.25, cols: *cols, eos: eos as usize, pad_from: (image_token as usize + 1).min(*rows) }
        }
        _ if name.ends_with(".token_embedding.weight") => normal(0.25),
        // T5 (unscaled input embeddings, as Flan's are O(1..10)); its relative bias table.
        _ if name.ends_with(".shared.weight") => normal(1.0),
        _ if name.ends_with(".relative_attention_bias.weight") => normal(0.5),
        _ if name.ends_with(".embed_positions.weight") => normal(1.0),
        _ if name.ends_with(".position_embedding.weight") => normal(0.5),
        ("class_embedding" | "query_tokens", _) => normal(1.0),
        ("position_embedding", _) => normal(0.5),
        // Every other 1-D weight is a LayerNorm's or RMSNorm's.
        ("weight", [_]) => Init::Normal { mean: 1.0, std: 0.1 },
        // Linear [out, in] and Conv2d [out, c, kh, kw]: gain / sqrt(fan_in).
        ("weight", [_, fan_in @ ..]) => {
            // T5 keeps gain 1: its pre-norm residual stream with unscaled attention grows fast.
            let t5 = name.starts_with("language_model.encoder.") || name.starts_with("language_model.decoder.");
            let gain = if name.starts_with("language_model.") && !t5 { 3.0 } else { 1.0 };
            normal(gain / (fan_in.iter().product::<usize>() as f32).sqrt())
        }
        _ => {
            return Err(Error::InvalidInput(format!(
                "glimpse synth has no initialisation rule for tensor `{name}` {shape:?}: add one to synth::init_for"
            )))
        }
    })
}

/// Parameters of the model `cfg` describes (tied lm_head counted once), from the config alone.
pub fn parameter_count(cfg: &ModelConfig) -> Result<usize> {
    Ok(specs(cfg)?.iter().map(|s| s.shape.iter().product::<usize>()).sum())
}

/// Parameters of each part: (vision tower, what joins the towers: Q-Former with query tokens and
/// projection, LLaVA's projector, CLIP's projections and logit scale; language model or text tower).
pub fn parameter_counts(cfg: &ModelConfig) -> Result<(usize, usize, usize)> {
    let (mut v, mut q, mut t) = (0, 0, 0);
    for s in specs(cfg)? {
        let n: usize = s.shape.iter().product();
        if ["vision_model.", "vision_tower."].iter().any(|p| s.name.starts_with(p)) {
            v += n;
        } else if ["language_model.", "text_model."].iter().any(|p| s.name.starts_with(p)) {
            t += n;
        } else {
            q += n;
        }
    }
    Ok((v, q, t))
}

// ---------------------------------------------------------------------------------------------
// Random numbers: splitmix64 for seeding, wyrand for the stream, Box-Muller for normals.

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

struct WyRand(u64);

impl WyRand {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let t = u128::from(self.0).wrapping_mul(u128::from(self.0 ^ 0xe703_7ed1_a0b4_28db));
        ((t >> 64) ^ t) as u64
    }
    /// Uniform in (0, 1].
    fn unit(&mut self) -> f32 {
        ((self.next() >> 40) as f32 + 1.0) * (1.0 / (1u64 << 24) as f32)
    }
    /// Two independent N(0, 1) values.
    fn normal2(&mut self) -> (f32, f32) {
        let (u1, u2) = (self.unit(), self.unit());
        let r = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (std::f32::consts::TAU * u2).sin_cos();
        (r * c, r * s)
    }
}

/// Elements per independently seeded chunk.
const CHUNK: usize = 1 << 16;

fn fill(data: &mut [f16], init: Init, seed: u64) {
    data.par_chunks_mut(CHUNK).enumerate().for_each_init(
        || vec![0f32; CHUNK],
        |buf, (c, out)| {
            let mut rng = WyRand(splitmix64(seed ^ splitmix64(c as u64)));
            let buf = &mut buf[..out.len()];
            for pair in buf.chunks_mut(2) {
                let (a, b) = rng.normal2();
                pair[0] = a;
                if pair.len() > 1 {
                    pair[1] = b;
                }
            }
            match init {
                Init::Normal { mean, std } => buf.iter_mut().for_each(|x| *x = mean + std * *x),
                Init::Embed { std, cols, eos, pad_from } => {
                    let first = c * CHUNK;
                    for (i, x) in buf.iter_mut().enumerate() {
                        let row = (first + i) / cols;
                        let scale = if row == eos {
                            2.0
                        } else if row >= pad_from {
                            0.2
                        } else {
                            1.0
                        };
                        *x *= std * scale;
                    }
                }
            }
            out.convert_from_f32_slice(buf);
        },
    );
}

/// `n` values ~N(0, 1), deterministic in `seed` (random pixels, ids and bench inputs).
pub fn random_normal(n: usize, seed: u64) -> Vec<f32> {
    let mut v = vec![f16::ZERO; n];
    fill(&mut v, Init::Normal { mean: 0.0, std: 1.0 }, splitmix64(seed));
    v.iter().map(|x| x.to_f32()).collect()
}

/// Random fp16 weights for every tensor the family's `load` reads (see [`specs`]), in memory.
/// Deterministic in (`cfg`, `seed`); generated in parallel (blip2-opt-2.7b: 3.7e9 values, 7.5 GB).
pub fn random_checkpoint(cfg: &ModelConfig, seed: u64) -> Result<Checkpoint> {
    let base = splitmix64(seed);
    let tensors: Vec<(String, Weight)> = specs(cfg)?
        .into_iter()
        .map(|s| {
            let n = s.shape.iter().product();
            let mut data = vec![f16::ZERO; n];
            fill(&mut data, s.init, splitmix64(base ^ fnv1a(&s.name)));
            (s.name, Weight::from_vec(s.shape, data))
        })
        .collect();
    Ok(Checkpoint::in_memory(&format!("<random weights, seed {seed}>"), tensors))
}

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

fn added_token(id: u32, content: &str) -> Value {
    json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
           "normalized": false, "special": true})
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
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "</s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "</s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "</s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"</s>": {"id": "</s>", "ids": [2], "tokens": ["</s>"]}}
        },
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
        "added_tokens": [added_token(0, "<unk>"), added_token(1, "<s>"), added_token(2, "</s>"),
                         added_token(image_token, "<image>"), added_token(image_token + 1, "<pad>")],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u{2581}"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}]},
        "pre_tokenizer": null,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
        },
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

/// `tokenizer.json` of a preset's family.
fn family_tokenizer_json(cfg: &ModelConfig) -> Result<Value> {
    match cfg {
        ModelConfig::Blip2(c) if matches!(c.text_config, crate::config::TextConfig::T5(_)) => {
            Ok(t5_tokenizer_json(c.image_token()))
        }
        ModelConfig::Blip2(c) => {
            let eos = c.text_config.eos_token_id().and_then(|e| e.to_vec().first().copied()).unwrap_or(2);
            tokenizer_json(c.image_token(), eos)
        }
        ModelConfig::Llava(c) => llama_tokenizer_json(c.image_token_index),
        ModelConfig::InstructBlip(c) if matches!(c.text_config, crate::config::TextConfig::T5(_)) => {
            Ok(t5_tokenizer_json(c.image_token()))
        }
        ModelConfig::InstructBlip(c) => {
            // Vicuna's conversion makes `</s>` the BOS the template inserts.
            let mut t = llama_tokenizer_json(c.image_token())?;
            let bos = json!({"SpecialToken": {"id": "</s>", "type_id": 0}});
            t["post_processor"]["single"][0] = bos.clone();
            t["post_processor"]["pair"][0] = bos;
            t["post_processor"]["pair"][2] = json!({"SpecialToken": {"id": "</s>", "type_id": 1}});
            t["post_processor"]["special_tokens"] = json!({"</s>": {"id": "</s>", "ids": [2], "tokens": ["</s>"]}});
            Ok(t)
        }
        ModelConfig::Clip(c) => {
            let vocab = c.text_config.as_ref().map_or(49408, |t| t.vocab_size);
            clip_tokenizer_json(
                u32::try_from(vocab).map_err(|_| Error::InvalidInput(format!("vocab_size {vocab} is too large")))?,
            )
        }
    }
}

/// A T5-style Unigram tokenizer.json as transformers 5.17's `T5Tokenizer` saves it (design/t5.md
/// §6): `<pad>` 0, `</s>` 1, `<unk>` 2, pieces, 100 `<extra_id_*>` (reversed) up to
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

/// The tokenizer of a preset, in memory (for `glimpse bench --preset`).
pub fn tokenizer(cfg: &ModelConfig) -> Result<tokenizers::Tokenizer> {
    family_tokenizer_json(cfg)?
        .to_string()
        .parse::<tokenizers::Tokenizer>()
        .map_err(|e| Error::Tokenizer(e.to_string()))
}

/// A Flan-T5 language model's tokenizer and generation files (the T5 tokenizer with `<image>`,
/// `tokenizer_class` T5Tokenizer as 5.17 saves it) for a processor of class `processor`.
fn t5_language_files(cfg: &ModelConfig, processor: &str) -> Result<Vec<(&'static str, Value)>> {
    Ok(vec![
        (
            "generation_config.json",
            json!({"bos_token_id": 1, "decoder_start_token_id": 0, "eos_token_id": 1, "pad_token_id": 0,
                   "transformers_version": "5.17.0"}),
        ),
        ("tokenizer.json", family_tokenizer_json(cfg)?),
        (
            "tokenizer_config.json",
            json!({"backend": "tokenizers", "eos_token": "</s>", "extra_ids": 100, "pad_token": "<pad>",
                   "processor_class": processor, "tokenizer_class": "T5Tokenizer", "unk_token": "<unk>"}),
        ),
    ])
}

fn tokenizer_config_json() -> Value {
    json!({
        "add_prefix_space": false,
        "backend": "tokenizers",
        "bos_token": "</s>",
        "eos_token": "</s>",
        "errors": "replace",
        "pad_token": "<pad>",
        "processor_class": "Blip2Processor",
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": "<unk>"
    })
}

fn processor_config_json(cfg: &Blip2Config) -> Value {
    let s = cfg.vision_config.image_size;
    json!({
        "image_processor": {
            "do_convert_rgb": true,
            "do_normalize": true,
            "do_rescale": true,
            "do_resize": true,
            "image_mean": crate::config::OPENAI_CLIP_MEAN,
            "image_processor_type": "BlipImageProcessor",
            "image_std": crate::config::OPENAI_CLIP_STD,
            "resample": 3,
            "rescale_factor": 1.0f64 / 255.0,
            "size": {"height": s, "width": s}
        },
        "num_query_tokens": cfg.num_query_tokens,
        "processor_class": "Blip2Processor"
    })
}

fn generation_config_json(cfg: &Blip2Config) -> Value {
    let eos = cfg.text_config.eos_token_id().map(|e| e.to_vec()).unwrap_or_default();
    json!({
        "bos_token_id": 2,
        "do_sample": false,
        "eos_token_id": eos.first(),
        "max_new_tokens": 20,
        "num_beams": 1,
        "pad_token_id": 1,
        "transformers_version": "5.17.0"
    })
}

/// `CLIPImageProcessor` of CLIP and LLaVA-1.5: shortest edge to `side`, centre crop `side`.
fn clip_image_processor(side: usize) -> Value {
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

/// The chat template llava-hf/llava-1.5-*-hf ship ("USER: <image>\n... ASSISTANT:").
const LLAVA_CHAT_TEMPLATE: &str = "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}";

/// Every file of a preset's folder but the weights: (file name, contents).
/// Every file of preset `name`'s folder but the weights, as (file name, text).
pub fn folder_files(name: &str, cfg: &ModelConfig, seed: u64) -> Result<Vec<(&'static str, String)>> {
    let mut config = preset_json(name)?;
    config["glimpse_synth"]["seed"] = json!(seed);
    let mut jsons: Vec<(&'static str, Value)> = vec![("config.json", config)];
    match cfg {
        ModelConfig::Blip2(c) if matches!(c.text_config, crate::config::TextConfig::T5(_)) => {
            jsons.extend(t5_language_files(cfg, "Blip2Processor")?);
            jsons.push(("processor_config.json", processor_config_json(c)));
        }
        ModelConfig::Blip2(c) => jsons.extend([
            ("generation_config.json", generation_config_json(c)),
            ("tokenizer.json", family_tokenizer_json(cfg)?),
            ("tokenizer_config.json", tokenizer_config_json()),
            ("processor_config.json", processor_config_json(c)),
        ]),
        ModelConfig::Llava(c) => {
            let (image, v) = (c.image_token_index, &c.vision_config);
            let special = |id: u32, t: &str| {
                (
                    id.to_string(),
                    json!({"content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true}),
                )
            };
            let added: serde_json::Map<String, Value> = [
                special(0, "<unk>"),
                special(1, "<s>"),
                special(2, "</s>"),
                special(image, "<image>"),
                special(image + 1, "<pad>"),
            ]
            .into_iter()
            .collect();
            jsons.extend([
                (
                    "generation_config.json",
                    json!({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": image + 1,
                    "transformers_version": "5.17.0"}),
                ),
                ("tokenizer.json", family_tokenizer_json(cfg)?),
                (
                    "tokenizer_config.json",
                    json!({
                    "add_bos_token": true, "add_eos_token": false, "added_tokens_decoder": added,
                    "bos_token": "<s>", "clean_up_tokenization_spaces": false, "eos_token": "</s>", "legacy": false,
                    "model_max_length": c.text_config.max_position_embeddings, "pad_token": "<pad>",
                    "padding_side": "left", "processor_class": "LlavaProcessor", "tokenizer_class": "LlamaTokenizer",
                    "unk_token": "<unk>"}),
                ),
                (
                    "processor_config.json",
                    json!({
                    "image_processor": clip_image_processor(v.image_size), "image_token": "<image>",
                    "num_additional_image_tokens": 1, "patch_size": v.patch_size, "processor_class": "LlavaProcessor",
                    "vision_feature_select_strategy": c.vision_feature_select_strategy}),
                ),
            ]);
        }
        ModelConfig::InstructBlip(c) => {
            let (image, s) = (c.image_token(), c.vision_config.image_size);
            if matches!(c.text_config, crate::config::TextConfig::T5(_)) {
                jsons.extend(t5_language_files(cfg, "InstructBlipProcessor")?);
            } else {
                let added: serde_json::Map<String, Value> =
                    [(0, "<unk>"), (1, "<s>"), (2, "</s>"), (image, "<image>"), (image + 1, "<pad>")]
                        .into_iter()
                        .map(|(id, t)| (id.to_string(), added_token(id, t)))
                        .collect();
                jsons.extend([
                    (
                        "generation_config.json",
                        json!({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": image + 1,
                        "transformers_version": "5.17.0"}),
                    ),
                    ("tokenizer.json", family_tokenizer_json(cfg)?),
                    (
                        "tokenizer_config.json",
                        json!({
                        "add_bos_token": true, "add_eos_token": false, "added_tokens_decoder": added,
                        "bos_token": "</s>", "clean_up_tokenization_spaces": false, "eos_token": "</s>", "legacy": false,
                        "model_max_length": 2048, "pad_token": "<pad>", "padding_side": "left",
                        "processor_class": "InstructBlipProcessor", "tokenizer_class": "LlamaTokenizer",
                        "truncation_side": "left", "unk_token": "</s>"}),
                    ),
                ]);
            }
            jsons.extend([
                (
                    "processor_config.json",
                    json!({"image_processor": {
                        "do_convert_rgb": true, "do_normalize": true, "do_rescale": true, "do_resize": true,
                        "image_mean": crate::config::OPENAI_CLIP_MEAN, "image_processor_type": "BlipImageProcessor",
                        "image_std": crate::config::OPENAI_CLIP_STD, "resample": 3, "rescale_factor": 1.0f64 / 255.0,
                        "size": {"height": s, "width": s}},
                    "num_query_tokens": c.num_query_tokens, "processor_class": "InstructBlipProcessor"}),
                ),
                ("qformer_tokenizer/tokenizer.json", bert_tokenizer_json(c.qformer_config.vocab_size)?),
                (
                    "qformer_tokenizer/tokenizer_config.json",
                    json!({
                    "backend": "tokenizers", "bos_token": "[DEC]", "cls_token": "[CLS]", "do_lower_case": true,
                    "mask_token": "[MASK]", "model_max_length": 512, "pad_token": "[PAD]",
                    "processor_class": "InstructBlipProcessor", "sep_token": "[SEP]", "strip_accents": null,
                    "tokenize_chinese_chars": true, "tokenizer_class": "BertTokenizer", "truncation_side": "left",
                    "unk_token": "[UNK]"}),
                ),
            ]);
        }
        ModelConfig::Clip(c) => {
            let side = c.vision_config.as_ref().map_or(224, |v| v.image_size);
            jsons.extend([
                ("tokenizer.json", family_tokenizer_json(cfg)?),
                (
                    "tokenizer_config.json",
                    json!({
                    "backend": "tokenizers", "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                    "model_max_length": 77, "pad_token": "<|endoftext|>", "processor_class": "CLIPProcessor",
                    "tokenizer_class": "CLIPTokenizer", "unk_token": "<|endoftext|>"}),
                ),
                (
                    "processor_config.json",
                    json!({"image_processor": clip_image_processor(side), "processor_class": "CLIPProcessor"}),
                ),
            ]);
        }
    }
    let mut files = Vec::new();
    for (file, value) in jsons {
        let path = Path::new(file);
        let mut text =
            serde_json::to_string_pretty(&value).map_err(|e| Error::Json { path: path.into(), msg: e.to_string() })?;
        text.push('\n');
        files.push((file, text));
    }
    if matches!(cfg, ModelConfig::Llava(_)) {
        files.push(("chat_template.jinja", LLAVA_CHAT_TEMPLATE.to_string()));
    }
    Ok(files)
}

/// A tensor of the checkpoint as a safetensors view, borrowed (no copy).
struct F16View<'a>(&'a Weight);

impl safetensors::View for F16View<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::F16
    }
    fn shape(&self) -> &[usize] {
        &self.0.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(bytemuck::cast_slice(self.0.as_slice()))
    }
    fn data_len(&self) -> usize {
        self.0.numel() * 2
    }
}

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, fsync, rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("partial");
    let written = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
        .map_err(|e| Error::io(&tmp, e));
    removing_on_error(written, &tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// `result`, with the temporary `tmp` removed when it failed (a full disk leaves no `.partial`).
fn removing_on_error<T>(result: Result<T>, tmp: &Path) -> Result<T> {
    if result.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    result
}

/// Writes preset `name` with random weights (`seed`) as an HF model folder: config.json,
/// model.safetensors (fp16, a tied lm_head not stored), tokenizer.json, tokenizer_config.json,
/// processor_config.json, and generation_config.json for generating families (chat_template.jinja
/// for LLaVA). `out` must be absent or empty.
pub fn write_folder(name: &str, out: &Path, seed: u64) -> Result<()> {
    let cfg = preset(name)?;
    if out.exists() {
        let mut entries = std::fs::read_dir(out).map_err(|e| Error::io(out, e))?;
        if entries.next().is_some() {
            return Err(Error::InvalidInput(format!(
                "{} is not empty; glimpse synth writes only into a new or empty folder",
                out.display()
            )));
        }
    }
    let files = folder_files(name, &cfg, seed)?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    for (file, text) in &files {
        let path = out.join(file);
        // InstructBLIP's Q-Former tokenizer lives in its own folder.
        if let Some(dir) = path.parent().filter(|d| *d != out) {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        write_atomic(&path, text.as_bytes())?;
    }

    let ckpt = random_checkpoint(&cfg, seed)?;
    let views: BTreeMap<&str, F16View> = ckpt.memory_tensors().map(|(n, w)| (n, F16View(w))).collect();
    let path = out.join("model.safetensors");
    let partial = out.join("model.safetensors.partial");
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let written = safetensors::serialize_to_file(views, Some(meta), &partial)
        .map_err(|e| Error::safetensors(&partial, format!("writing failed: {e}")));
    removing_on_error(written, &partial)?;
    std::fs::rename(&partial, &path).map_err(|e| Error::io(&path, e))?;
    Ok(())
}

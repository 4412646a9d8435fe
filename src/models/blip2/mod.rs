//! BLIP-2 (`Blip2ForConditionalGeneration`, transformers 5.17): EVA ViT vision encoder ->
//! Q-Former -> language projection, whose outputs replace the `<image>` embeddings of an OPT
//! decoder's input ([`opt`]) or feed a Flan-T5 encoder ([`t5`]). This file is the family: its
//! registry entry, the dispatch from the config to the model, and the synth presets.

pub mod config;
pub mod opt;
pub mod t5;
pub mod towers;

use serde_json::{json, Value};

pub use config::Blip2Config;
pub use opt::Blip2;
pub use t5::Blip2T5;

use crate::error::Result;
use crate::models::family::{FamilyConfig, Loaded, ModelConfig};
use crate::models::preset_tokenizers::{t5_tokenizer_json, tokenizer_json};
use crate::models::presets::{blip_image_processor, not_a_preset, t5_language_files, t5_text_json};
use crate::models::{FamilyEntry, ModelType};
use crate::weights::Checkpoint;

pub const FAMILY: FamilyEntry = FamilyEntry {
    model_types: &[ModelType {
        name: "blip-2",
        architectures: &["Blip2ForConditionalGeneration"],
        label: "blip-2 (OPT, Flan-T5)",
        parse: |v, p| Ok(ModelConfig::new(Blip2Config::from_value(v, p)?)),
    }],
    presets: &["tiny", "blip2-opt-2.7b", "blip2-opt-6.7b", "blip2-flan-t5-xl", "blip2-flan-t5-tiny"],
    preset_config: |name| match name {
        n if n.starts_with("blip2-flan-t5-") => blip2_t5_json(n),
        n => blip2_json(n),
    },
};

impl FamilyConfig for Blip2Config {
    fn architecture(&self) -> &str {
        "Blip2ForConditionalGeneration"
    }
    fn load(&self, ckpt: &Checkpoint) -> Result<Loaded> {
        Ok(Loaded::Generates(if self.text_config.is_t5() {
            Box::new(Blip2T5::load(self, ckpt)?)
        } else {
            Box::new(Blip2::load(self, ckpt)?)
        }))
    }
    fn record_tensors(&self, recorder: &Checkpoint) -> Result<()> {
        self.text_config.record_untied_head(recorder)?;
        self.load(recorder).map(drop)
    }
    fn synth_token_ids(&self) -> (u32, u32) {
        (self.text_config.first_eos().unwrap_or(2), self.image_token())
    }
    fn synth_tokenizer(&self) -> Result<Value> {
        if self.text_config.is_t5() {
            return Ok(t5_tokenizer_json(self.image_token()));
        }
        tokenizer_json(self.image_token(), self.text_config.first_eos().unwrap_or(2))
    }
    fn synth_files(&self) -> Result<Vec<(&'static str, Value)>> {
        let mut files = if self.text_config.is_t5() {
            t5_language_files(self.image_token(), "Blip2Processor")
        } else {
            vec![
                ("generation_config.json", generation_config_json(self)),
                ("tokenizer.json", self.synth_tokenizer()?),
                ("tokenizer_config.json", tokenizer_config_json()),
            ]
        };
        files.push(("processor_config.json", processor_config_json(self)));
        Ok(files)
    }
}

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

/// BLIP-2's VQA template (OPT and Flan-T5 alike), with the question verbatim: transformers
/// formats the string it is given, spaces and all, and an empty question is a valid prompt there too.
fn vqa_prompt(question: &str) -> String {
    format!("Question: {question} Answer:")
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
        _ => Err(not_a_preset(name)),
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
/// (docs/models/blip2-t5.md#config: gated GELU with `dense_act_fn` "gelu", untied head, no output scaling,
/// `<image>` = 32100). The tiny preset has tests/fixtures/blip2-flan-t5-tiny's T5 and 32100-token
/// vocabulary layout at small widths.
fn blip2_t5_json(name: &str) -> Result<Value> {
    // text: d_model, d_kv, d_ff, layers, heads; vocab, image token
    let (vision, qformer, (dm, dkv, dff, tl, tn), (vocab, image)) = match name {
        "blip2-flan-t5-xl" => ((1408, 6144, 39, 16), (768, 3072, 12, 12, 2), (2048, 64, 5120, 24, 32), (32128, 32100)),
        "blip2-flan-t5-tiny" => ((32, 64, 1, 2), (32, 64, 2, 2, 1), (32, 16, 48, 2, 3), (32128, 32100)),
        _ => return Err(not_a_preset(name)),
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
    json!({
        "image_processor": blip_image_processor(cfg.vision_config.image_size),
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

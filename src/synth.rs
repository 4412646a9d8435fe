//! `glimpse synth`: BLIP-2 OPT models with random weights at real shapes, made in memory (for
//! `glimpse bench`) or written as a Hugging Face checkpoint folder that transformers loads (for
//! scripts/hf_reference.py), so glimpse and transformers run identical weights.
//!
//! Weights follow scripts/make_fixtures.py so activations stay O(1) and greedy text varies:
//! Linear/Conv weights N(0, (gain/sqrt(fan_in))^2) with gain 1 (vision, Q-Former, projection) or
//! 3 (OPT: with gain 1 the tied embedding dominates the residual stream and a random model
//! repeats its input token), every bias N(0, 0.1^2), LayerNorm weight 1 + N(0, 0.1^2), token
//! embeddings N(0, 0.25^2) (the EOS row x2, rows past the tokenizer x0.2), OPT positions N(0, 1),
//! vision positions N(0, 0.5^2), class embedding and query tokens N(0, 1). Everything is fp16.
//! At 32 OPT layers this keeps the residual stream below ~300 (checked with transformers).
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

use crate::config::Blip2Config;
use crate::error::{Error, Result};
use crate::weights::{Checkpoint, Weight};

/// Names accepted by [`preset`].
pub const PRESETS: [&str; 3] = ["tiny", "blip2-opt-2.7b", "blip2-opt-6.7b"];

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
        _ => Err(Error::InvalidInput(format!("unknown preset `{name}` (presets: {})", PRESETS.join(", ")))),
    }
}

/// `config.json` of a preset, as transformers 5.17 writes it for `Blip2ForConditionalGeneration`.
pub fn preset_json(name: &str) -> Result<Value> {
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

/// The parsed, validated config of a preset.
pub fn preset(name: &str) -> Result<Blip2Config> {
    let value = preset_json(name)?;
    let origin = Path::new("<synth preset>");
    let cfg: Blip2Config =
        serde_json::from_value(value).map_err(|e| Error::Json { path: origin.to_path_buf(), msg: e.to_string() })?;
    cfg.validate(origin)?;
    Ok(cfg)
}

/// How a tensor's values are drawn.
#[derive(Debug, Clone, Copy)]
enum Init {
    /// N(mean, std^2).
    Normal { mean: f32, std: f32 },
    /// Token embeddings N(0, std^2) with the EOS row scaled by 2 and rows from `pad_from` by 0.2.
    Embed { std: f32, cols: usize, eos: usize, pad_from: usize },
}

/// One tensor a [`crate::models::blip2::Blip2`] reads: name, shape, init.
struct Spec {
    name: String,
    shape: Vec<usize>,
    init: Init,
}

/// Every tensor `Blip2::load` reads for `cfg`, in load order: the model's own loader run on a
/// recording checkpoint, so this list cannot drift from the model (optional tensors stay
/// absent: the tied lm_head is not stored, as transformers writes tied checkpoints).
fn specs(cfg: &Blip2Config) -> Result<Vec<Spec>> {
    let recorder = Checkpoint::recording("<glimpse synth>");
    crate::models::blip2::Blip2::load(cfg, &recorder)?;
    recorder
        .requested()
        .into_iter()
        .map(|r| Ok(Spec { init: init_for(cfg, &r.name, &r.shape)?, name: r.name, shape: r.shape }))
        .collect()
}

/// How tensor `name` is drawn (the rules of the module comment), from its name and shape.
fn init_for(cfg: &Blip2Config, name: &str, shape: &[usize]) -> Result<Init> {
    let normal = |std: f32| Init::Normal { mean: 0.0, std };
    let leaf = name.rsplit('.').next().unwrap_or(name);
    Ok(match (leaf, shape) {
        ("bias", _) => normal(0.1),
        (_, [rows, cols]) if name.ends_with(".embed_tokens.weight") => {
            let eos = cfg.text_config.eos_token_id().and_then(|e| e.to_vec().first().copied()).unwrap_or(2) as usize;
            Init::Embed { std: 0.25, cols: *cols, eos, pad_from: (cfg.image_token() as usize + 1).min(*rows) }
        }
        _ if name.ends_with(".embed_positions.weight") => normal(1.0),
        ("class_embedding" | "query_tokens", _) => normal(1.0),
        ("position_embedding", _) => normal(0.5),
        // Every 1-D weight of BLIP-2 is a LayerNorm's.
        ("weight", [_]) => Init::Normal { mean: 1.0, std: 0.1 },
        // Linear [out, in] and Conv2d [out, c, kh, kw]: gain / sqrt(fan_in).
        ("weight", [_, fan_in @ ..]) => {
            let gain = if name.starts_with("language_model.") { 3.0 } else { 1.0 };
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
pub fn parameter_count(cfg: &Blip2Config) -> Result<usize> {
    Ok(specs(cfg)?.iter().map(|s| s.shape.iter().product::<usize>()).sum())
}

/// Parameters of each part: (vision, Q-Former incl. query tokens and projection, OPT decoder).
pub fn parameter_counts(cfg: &Blip2Config) -> Result<(usize, usize, usize)> {
    let (mut v, mut q, mut t) = (0, 0, 0);
    for s in specs(cfg)? {
        let n: usize = s.shape.iter().product();
        if s.name.starts_with("vision_model.") {
            v += n;
        } else if s.name.starts_with("language_model.") {
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

/// Random fp16 weights for every tensor `Blip2::load` reads, in memory. Deterministic in
/// (`cfg`, `seed`); generated in parallel (blip2-opt-2.7b: 3.7e9 values, 7.5 GB).
pub fn random_checkpoint(cfg: &Blip2Config, seed: u64) -> Result<Checkpoint> {
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

/// `tokenizer.json`: `image_token` BPE entries (ids 0..image_token), then `<image>` as a special
/// added token that takes id `image_token`, like the real BLIP-2 OPT tokenizer. `Ċ` ("\n") sits at
/// `eos`; entries no merge produces fill the vocabulary (pronounceable pseudo-words).
pub fn tokenizer_json(image_token: u32, eos: u32) -> Result<Value> {
    let n = image_token as usize;
    let mut vocab: Vec<String> = ["<s>", "<pad>", "</s>", "<unk>"].iter().map(|s| s.to_string()).collect();
    vocab.extend(byte_chars().into_iter().map(String::from));
    let mut merges: Vec<(String, String)> = Vec::new();
    let mut seen: HashSet<String> = vocab.iter().cloned().collect();
    for word in WORDS {
        let chars: Vec<char> = word.chars().collect();
        let mut prefix = chars[0].to_string();
        for c in &chars[1..] {
            let next = format!("{prefix}{c}");
            if seen.insert(next.clone()) {
                merges.push((prefix.clone(), c.to_string()));
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
        let mut word = String::from("Ġ");
        for _ in 0..len {
            word.push_str(&syllables[rest % syllables.len()]);
            rest /= syllables.len();
        }
        k += 1;
        if seen.insert(word.clone()) {
            vocab.push(word);
        }
    }
    if vocab.len() > n {
        return Err(Error::InvalidInput(format!(
            "image_token_index {image_token} leaves no room for the {} base tokens",
            vocab.len()
        )));
    }
    let newline = vocab.iter().position(|t| t == "Ċ").expect("byte token");
    if (4..n).contains(&(eos as usize)) {
        vocab.swap(newline, eos as usize);
    }
    let vocab_map: serde_json::Map<String, Value> =
        vocab.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
    let added = |id: u32, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
               "normalized": false, "special": true})
    };
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
            "vocab": vocab_map,
            "merges": merges.iter().map(|(a, b)| json!([a, b])).collect::<Vec<_>>()
        }
    }))
}

/// The tokenizer of a preset, in memory (for `glimpse bench --preset`).
pub fn tokenizer(cfg: &Blip2Config) -> Result<tokenizers::Tokenizer> {
    let eos = cfg.text_config.eos_token_id().and_then(|e| e.to_vec().first().copied()).unwrap_or(2);
    let json = tokenizer_json(cfg.image_token(), eos)?;
    json.to_string().parse::<tokenizers::Tokenizer>().map_err(|e| Error::Tokenizer(e.to_string()))
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

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let mut text =
        serde_json::to_string_pretty(value).map_err(|e| Error::Json { path: path.into(), msg: e.to_string() })?;
    text.push('\n');
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

/// Writes preset `name` with random weights (`seed`) as an HF model folder: config.json,
/// generation_config.json, model.safetensors (fp16, tied lm_head not stored), tokenizer.json,
/// tokenizer_config.json, processor_config.json. `out` must be absent or empty.
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
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut config = preset_json(name)?;
    config["glimpse_synth"]["seed"] = json!(seed);
    write_json(&out.join("config.json"), &config)?;
    write_json(&out.join("generation_config.json"), &generation_config_json(&cfg))?;
    let eos = cfg.text_config.eos_token_id().and_then(|e| e.to_vec().first().copied()).unwrap_or(2);
    write_json(&out.join("tokenizer.json"), &tokenizer_json(cfg.image_token(), eos)?)?;
    write_json(&out.join("tokenizer_config.json"), &tokenizer_config_json())?;
    write_json(&out.join("processor_config.json"), &processor_config_json(&cfg))?;

    let ckpt = random_checkpoint(&cfg, seed)?;
    let views: BTreeMap<&str, F16View> = ckpt.memory_tensors().map(|(n, w)| (n, F16View(w))).collect();
    let path = out.join("model.safetensors");
    let partial = out.join("model.safetensors.partial");
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), &partial)
        .map_err(|e| Error::safetensors(&partial, format!("writing failed: {e}")))?;
    std::fs::rename(&partial, &path).map_err(|e| Error::io(&path, e))?;
    Ok(())
}

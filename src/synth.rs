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
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::models::ModelConfig;
use crate::weights::{Checkpoint, Weight};

pub use crate::models::preset_tokenizers::{
    bert_tokenizer_json, clip_tokenizer_json, llama_tokenizer_json, t5_tokenizer_json, tokenizer_json,
};

/// Every preset name, in registry order: each family offers its own (`tiny` is
/// tests/fixtures/blip2-opt-tiny's dims), each with a tiny variant for tests.
pub fn presets() -> Vec<&'static str> {
    crate::models::preset_names().collect()
}

/// The VQA prompt the bench and hf_reference.py time (tokenizes to 8 tokens + BOS, as with OPT).
pub const VQA_PROMPT: &str = "Question: what is this? Answer:";

/// `config.json` of a preset, as transformers 5.17 writes it for its class.
pub fn preset_json(name: &str) -> Result<Value> {
    crate::models::preset_config(name)
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
/// a recording checkpoint ([`crate::models::FamilyConfig::record_tensors`]), so this list cannot
/// drift from the model (optional tensors stay absent: a tied lm_head is not stored, as
/// transformers writes tied checkpoints).
fn specs(cfg: &ModelConfig) -> Result<Vec<Spec>> {
    let recorder = Checkpoint::recording("<glimpse synth>");
    cfg.family().record_tensors(&recorder)?;
    let ids = cfg.family().synth_token_ids();
    recorder
        .requested()
        .into_iter()
        .map(|r| Ok(Spec { init: init_for(ids, &r.name, &r.shape)?, name: r.name, shape: r.shape }))
        .collect()
}

/// How tensor `name` is drawn (the rules of the module comment), from its name and shape;
/// `(eos, image_token)` from [`crate::models::FamilyConfig::synth_token_ids`].
fn init_for((eos, image_token): (u32, u32), name: &str, shape: &[usize]) -> Result<Init> {
    let normal = |std: f32| Init::Normal { mean: 0.0, std };
    let leaf = name.rsplit('.').next().unwrap_or(name);
    Ok(match (leaf, shape) {
        ("bias", _) => normal(0.1),
        ("logit_scale", []) => Init::Normal { mean: crate::models::presets::LOGIT_SCALE_INIT, std: 0.0 },
        (_, [rows, cols]) if name.ends_with(".embed_tokens.weight") => {
            Init::Embed { std: 0.25, cols: *cols, eos: eos as usize, pad_from: (image_token as usize + 1).min(*rows) }
        }
        _ if name.ends_with(".token_embedding.weight") => normal(0.25),
        // T5 (unscaled input embeddings, as Flan's are O(1..10)); its relative bias table.
        _ if name.ends_with(".shared.weight") => normal(1.0),
        _ if name.ends_with(".relative_attention_bias.weight") => normal(0.5),
        _ if name.ends_with(".embed_positions.weight") => normal(1.0),
        _ if name.ends_with(".position_embedding.weight") => normal(0.5),
        ("class_embedding" | "query_tokens" | "latents", _) => normal(1.0),
        // IDEFICS' cross-attention gates: nonzero (transformers starts them at 0, which would
        // make the images irrelevant), tanh well inside its linear range.
        ("alpha_cross_attn" | "alpha_dense", _) => normal(0.5),
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

/// The tokenizer of a preset, in memory (for `glimpse bench --preset`).
pub fn tokenizer(cfg: &ModelConfig) -> Result<tokenizers::Tokenizer> {
    cfg.family()
        .synth_tokenizer()?
        .to_string()
        .parse::<tokenizers::Tokenizer>()
        .map_err(|e| Error::Tokenizer(e.to_string()))
}

/// Every file of preset `name`'s folder but the weights, as (file name, text).
pub fn folder_files(name: &str, cfg: &ModelConfig, seed: u64) -> Result<Vec<(&'static str, String)>> {
    let mut config = preset_json(name)?;
    config["glimpse_synth"]["seed"] = json!(seed);
    let mut jsons: Vec<(&'static str, Value)> = vec![("config.json", config)];
    jsons.extend(cfg.family().synth_files()?);
    let mut files = Vec::new();
    for (file, value) in jsons {
        let path = Path::new(file);
        let mut text =
            serde_json::to_string_pretty(&value).map_err(|e| Error::Json { path: path.into(), msg: e.to_string() })?;
        text.push('\n');
        files.push((file, text));
    }
    if let Some(template) = cfg.family().synth_chat_template() {
        files.push(("chat_template.jinja", template.to_string()));
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

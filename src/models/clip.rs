//! The CLIP family (transformers 5.17): `CLIPModel` (both towers), `CLIPTextModelWithProjection`
//! and `CLIPVisionModelWithProjection`. Each tower's pooled output goes through its bias-free
//! projection, then `Op::L2Normalize` into fp32 unit vectors on the device; `exp(logit_scale)`
//! and the image-text similarities are computed on the host by `api::EmbedModel` (a few
//! hundred floats per input, in f64).

use std::path::Path;

use super::clip_text::{self, ClipText};
use super::clip_vision::{self, ClipVision, VisionRequest};
use super::family::{EmbedPlan, Embedder, Loader};
use serde::Deserialize;
use serde_json::{json, Value};

use super::clip_text::ClipTextConfig;
use super::clip_vision::ClipVisionConfig;
use super::family::{FamilyConfig, Loaded, ModelConfig, ModelCore};
use super::preset_tokenizers::clip_tokenizer_json;
use super::presets::{clip_image_processor, clip_vision_json, not_a_preset, vocab_u32, Widths, LOGIT_SCALE_INIT};
use super::{FamilyEntry, ModelType};
use crate::config::{check_positive, field_error, PreprocessorConfig};
use crate::error::{Error, Result};
use crate::graph::{Activation, Buf, DType, Graph, Linear, Op, WeightTable};
use crate::json::{from_json_value, from_json_value_at};
use crate::weights::Checkpoint;

/// A CLIP checkpoint: `CLIPModel` (`model_type` "clip", both towers), or one tower with its
/// projection (`CLIPTextModelWithProjection`: "clip_text_model", `CLIPVisionModelWithProjection`:
/// "clip_vision_model", whose config.json is the tower's config itself).
#[derive(Debug, Clone)]
pub struct ClipConfig {
    pub text_config: Option<ClipTextConfig>,
    pub vision_config: Option<ClipVisionConfig>,
    /// Width of the projected embeddings (`CLIPConfig.projection_dim`, or the tower's own for a
    /// single-tower model).
    pub projection_dim: usize,
    /// `architectures[0]` of config.json, for messages (`CLIPModel` when absent).
    pub architecture: String,
}

impl ClipConfig {
    /// Parses config.json of any CLIP `model_type` as transformers 5.17 does. For "clip", a non-null
    /// `text_config_dict` (`vision_config_dict`) replaces `text_config` (`vision_config`) entirely,
    /// defaults included: openai's clip-vit-large-patch14 config.json has one, which is why its
    /// text tower gets eos 49407 although `text_config` says 2.
    pub fn from_value(value: &Value, path: &Path) -> Result<Self> {
        let model_type = value.get("model_type").and_then(Value::as_str).unwrap_or("clip");
        let architecture = value
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str)
            .unwrap_or(match model_type {
                "clip_text_model" => "CLIPTextModelWithProjection",
                "clip_vision_model" => "CLIPVisionModelWithProjection",
                _ => "CLIPModel",
            })
            .to_string();
        let section = |key: &str| -> Option<(&Value, String)> {
            let dict = format!("{key}_dict");
            match value.get(&dict).filter(|v| !v.is_null()) {
                Some(v) => Some((v, format!("{dict}."))),
                None => value.get(key).filter(|v| !v.is_null()).map(|v| (v, format!("{key}."))),
            }
        };
        let empty = Value::Object(Default::default());
        let cfg = match model_type {
            "clip" => {
                let (t, tp) = section("text_config").unwrap_or((&empty, "text_config.".into()));
                let (v, vp) = section("vision_config").unwrap_or((&empty, "vision_config.".into()));
                #[derive(Deserialize)]
                struct Top {
                    #[serde(default = "default_projection_dim")]
                    projection_dim: usize,
                }
                let top: Top = from_json_value(value, path)?;
                ClipConfig {
                    text_config: Some(from_json_value_at(t, path, &tp)?),
                    vision_config: Some(from_json_value_at(v, path, &vp)?),
                    projection_dim: top.projection_dim,
                    architecture,
                }
            }
            "clip_text_model" => {
                let t: ClipTextConfig = from_json_value(value, path)?;
                ClipConfig { projection_dim: t.projection_dim, text_config: Some(t), vision_config: None, architecture }
            }
            "clip_vision_model" => {
                let v: ClipVisionConfig = from_json_value(value, path)?;
                ClipConfig { projection_dim: v.projection_dim, vision_config: Some(v), text_config: None, architecture }
            }
            other => {
                return Err(Error::config(
                    path,
                    field_error("model_type", format!("`{other}`"), "not a CLIP model type"),
                ))
            }
        };
        cfg.check().map_err(|m| Error::config(path, m))?;
        Ok(cfg)
    }

    fn check(&self) -> Result<(), String> {
        let single = self.text_config.is_none() || self.vision_config.is_none();
        let (text, vision) = if single { ("", "") } else { ("text_config", "vision_config") };
        if let Some(t) = &self.text_config {
            t.check(if single { "text" } else { text }).map_err(|m| m.replace("`text.", "`"))?;
        }
        if let Some(v) = &self.vision_config {
            v.check(if single { "vision" } else { vision }).map_err(|m| m.replace("`vision.", "`"))?;
        }
        check_positive("projection_dim", self.projection_dim)
    }
}

fn default_projection_dim() -> usize {
    512
}

fn parse_clip(v: &Value, p: &Path) -> Result<ModelConfig> {
    Ok(ModelConfig::new(ClipConfig::from_value(v, p)?))
}

pub const FAMILY: FamilyEntry = FamilyEntry {
    model_types: &[
        ModelType { name: "clip", architectures: &["CLIPModel"], label: "clip", parse: parse_clip },
        ModelType {
            name: "clip_text_model",
            architectures: &["CLIPTextModelWithProjection"],
            label: "clip_text_model (with projection)",
            parse: parse_clip,
        },
        ModelType {
            name: "clip_vision_model",
            architectures: &["CLIPVisionModelWithProjection"],
            label: "clip_vision_model (with projection)",
            parse: parse_clip,
        },
    ],
    presets: &["clip-vit-large-patch14", "clip-tiny"],
    preset_config: clip_json,
};

impl FamilyConfig for ClipConfig {
    fn architecture(&self) -> &str {
        &self.architecture
    }
    fn embeds(&self) -> bool {
        true
    }
    fn load(&self, ckpt: &Checkpoint) -> Result<Loaded> {
        Ok(Loaded::Embeds(Box::new(Clip::load(self, ckpt)?)))
    }
    fn record_tensors(&self, recorder: &Checkpoint) -> Result<()> {
        // Clip::load asks whether the projections exist before reading them (a bare tower has
        // none): declare them first. It then reads them itself, and the recorder refuses a
        // shape other than the one declared here.
        let p = self.projection_dim;
        if let Some(t) = &self.text_config {
            recorder.f16("text_projection.weight", &[p, t.hidden_size])?;
        }
        if let Some(v) = &self.vision_config {
            recorder.f16("visual_projection.weight", &[p, v.hidden_size])?;
        }
        Clip::load(self, recorder).map(drop)
    }
    fn synth_tokenizer(&self) -> Result<Value> {
        clip_tokenizer_json(vocab_u32(self.text_config.as_ref().map_or(49408, |t| t.vocab_size))?)
    }
    fn synth_files(&self) -> Result<Vec<(&'static str, Value)>> {
        let side = self.vision_config.as_ref().map_or(224, |v| v.image_size);
        Ok(vec![
            ("tokenizer.json", self.synth_tokenizer()?),
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
        ])
    }
}

pub struct Clip {
    pub cfg: ClipConfig,
    pub core: ModelCore,
    text: Option<(ClipText, Linear)>,
    vision: Option<(ClipVision, Linear)>,
    /// `exp(logit_scale)` in f32 as torch computes it, from the checkpoint's own dtype (not the
    /// fp16 weight table: ln 100 in fp16 would scale logits by 100.03).
    logit_scale: Option<f32>,
}

impl Clip {
    pub fn load(cfg: &ClipConfig, ckpt: &Checkpoint) -> Result<Self> {
        let mut table = WeightTable::default();
        let mut ld = Loader { ckpt, table: &mut table };
        let p = cfg.projection_dim;
        let text = match &cfg.text_config {
            Some(t) => {
                let prefix = clip_text::find_prefix(ckpt, &["text_model.", ""]).unwrap_or("text_model.");
                let tower = ClipText::load(t, &mut ld, prefix)?;
                Some((tower, projection(&mut ld, cfg, "text_projection", t.hidden_size, p)?))
            }
            None => None,
        };
        let vision = match &cfg.vision_config {
            Some(v) => {
                let prefix = clip_vision::find_prefix(ckpt, &["vision_model.", ""]).unwrap_or("vision_model.");
                let tower = ClipVision::load(v, &mut ld, prefix, v.num_hidden_layers, true)?;
                Some((tower, projection(&mut ld, cfg, "visual_projection", v.hidden_size, p)?))
            }
            None => None,
        };
        let logit_scale = if text.is_some() && vision.is_some() {
            let (values, _) = ckpt.f32("logit_scale")?;
            let &[ln] = values.as_slice() else {
                return Err(Error::InvalidInput(format!(
                    "{}: `logit_scale` holds {} values, CLIPModel stores one",
                    ckpt.origin().display(),
                    values.len()
                )));
            };
            Some(ln.exp())
        } else {
            None
        };
        Ok(Self { cfg: cfg.clone(), core: ModelCore::new(cfg.clone(), table), text, vision, logit_scale })
    }
}

/// A tower's bias-free projection; a bare `CLIPTextModel` / `CLIPVisionModel` folder has none.
fn projection(ld: &mut Loader, cfg: &ClipConfig, name: &str, hidden: usize, p: usize) -> Result<Linear> {
    if !ld.ckpt.contains(&format!("{name}.weight")) {
        return Err(Error::Unsupported(format!(
            "{}: no `{name}.weight`: {} is a bare tower without projection; glimpse embeds with CLIPModel, CLIPTextModelWithProjection or CLIPVisionModelWithProjection checkpoints",
            ld.ckpt.origin().display(),
            cfg.architecture
        )));
    }
    ld.linear(name, hidden, p, false)
}

/// A tower's projection of its pooled rows, and their unit vectors (fp32, for the host).
fn project(g: &mut Graph, proj: &Linear, pooled: Buf, name: &str, batch: usize) -> (Buf, Buf) {
    let embeds = g.buffer(name, batch, proj.out_dim);
    super::layers::linear(g, proj, pooled, Activation::None, None, embeds, batch);
    let normalized = g.typed_buffer(format!("{name}_normalized"), batch, proj.out_dim, DType::F32);
    g.push(Op::L2Normalize { x: embeds, out: normalized, rows: batch });
    (embeds, normalized)
}

fn no_tower(cfg: &ClipConfig, which: &str) -> Error {
    Error::InvalidInput(format!(
        "{} has no {which} tower: embed {} with this model, or use a CLIPModel checkpoint",
        cfg.architecture,
        if which == "text" { "images" } else { "texts" }
    ))
}

fn check_batch(batch: usize, what: &str) -> Result<()> {
    if batch == 0 {
        return Err(Error::InvalidInput(format!("no {what} given")));
    }
    Ok(())
}

impl Embedder for Clip {
    fn core(&self) -> &ModelCore {
        &self.core
    }

    fn check_preprocessor(&self, pre: &PreprocessorConfig, path: &Path) -> Result<()> {
        self.image_size().map_or(Ok(()), |expected| super::family::check_square_input(pre, path, expected))
    }

    fn image_size(&self) -> Option<usize> {
        self.vision.as_ref().map(|(v, _)| v.cfg.image_size)
    }

    fn text_positions(&self) -> Option<usize> {
        self.text.as_ref().map(|(t, _)| t.cfg.max_position_embeddings)
    }

    fn embed_dim(&self) -> usize {
        self.cfg.projection_dim
    }

    fn logit_scale(&self) -> Option<f32> {
        self.logit_scale
    }

    fn image_plan(&self, batch: usize) -> Result<EmbedPlan> {
        let (tower, proj) = self.vision.as_ref().ok_or_else(|| no_tower(&self.cfg, "vision"))?;
        check_batch(batch, "images")?;
        let s = tower.cfg.image_size;
        let mut g = Graph::new();
        let pixels = g.buffer("pixels", batch, 3 * s * s);
        let out = tower.emit(&mut g, "vision", pixels, batch, &VisionRequest { pooled: true, ..Default::default() })?;
        let pooled =
            out.pooled.ok_or_else(|| Error::InvalidInput("the vision tower returned no pooled output".into()))?;
        let (embeds, normalized) = project(&mut g, proj, pooled, "image_embeds", batch);
        let phase = g.take_phase("vision");
        Ok(EmbedPlan { graph: g, phase, batch, inputs: vec![("pixels", pixels)], output: embeds, normalized })
    }

    fn text_plan(&self, batch: usize, len: usize) -> Result<EmbedPlan> {
        let (tower, proj) = self.text.as_ref().ok_or_else(|| no_tower(&self.cfg, "text"))?;
        check_batch(batch, "texts")?;
        let max = tower.cfg.max_position_embeddings;
        if len == 0 || len > max {
            return Err(Error::InvalidInput(format!(
                "a text of {len} tokens: the text model takes 1 to {max} (text_config.max_position_embeddings)"
            )));
        }
        let mut g = Graph::new();
        let key_mask = g.buffer("key_mask", batch, len);
        let pooled = tower.emit(&mut g, "text", batch, len, key_mask);
        let (embeds, normalized) = project(&mut g, proj, pooled, "text_embeds", batch);
        let phase = g.take_phase("text");
        Ok(EmbedPlan { graph: g, phase, batch, inputs: vec![("key_mask", key_mask)], output: embeds, normalized })
    }

    fn text_vocab(&self) -> Option<(usize, Option<u32>)> {
        self.cfg.text_config.as_ref().map(|t| (t.vocab_size, t.eos_token_id))
    }

    fn pool_rows(&self, ids: &[Vec<u32>]) -> Vec<usize> {
        // check() guarantees an eos id for a text tower; without one there is nothing to pool.
        let eos = self.text.as_ref().and_then(|(t, _)| t.cfg.eos_token_id).unwrap_or(2);
        clip_text::pool_rows(ids, eos)
    }

    fn describe(&self) -> Vec<String> {
        let mut lines = vec![format!(
            "family:     CLIP ({}), embeddings of width {}",
            self.cfg.architecture, self.cfg.projection_dim
        )];
        if let Some((v, _)) = &self.vision {
            let v = &v.cfg;
            lines.push(format!("vision:     {}, {}", v.describe_sizes(), v.hidden_act));
        }
        if let Some((t, _)) = &self.text {
            let t = &t.cfg;
            let rule = match t.eos_token_id {
                Some(2) => "largest id (legacy eos_token_id 2)".to_string(),
                Some(e) => format!("first eos {e}"),
                None => "none".to_string(),
            };
            lines.push(format!(
                "text:       {} layers, hidden {}, {} heads x {}, mlp {}, vocab {}, {} positions, pooled at {rule}",
                t.num_hidden_layers,
                t.hidden_size,
                t.num_attention_heads,
                t.head_dim(),
                t.intermediate_size,
                t.vocab_size,
                t.max_position_embeddings
            ));
        }
        if let Some(s) = self.logit_scale {
            lines.push(format!("logit scale: {s}"));
        }
        lines
    }
}

// ---------------------------------------------------------------------------------------------
// `glimpse synth` presets.

/// `config.json` of a CLIP preset (`CLIPModel`, as transformers 5.17 writes
/// openai/clip-vit-large-patch14: both towers, quick GELU, BOS/EOS the last two ids).
fn clip_json(name: &str) -> Result<Value> {
    // vision (hidden, intermediate, layers, heads, image, patch), text (hidden, intermediate,
    // layers, heads, vocab), projection
    let ((vh, vi, vl, vn, vs, vp), (th, ti, tl, tn, vocab), proj) = match name {
        "clip-vit-large-patch14" => ((1024, 4096, 24, 16, 224, 14), (768, 3072, 12, 12, 49408), 768),
        // tests/fixtures/clip-tiny's towers; room for the synthetic tokenizer's base entries.
        "clip-tiny" => ((48, 96, 2, 3, 32, 8), (32, 64, 2, 4, 1024), 24),
        _ => return Err(not_a_preset(name)),
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
        "vision_config": clip_vision_json(Widths { hidden: vh, intermediate: vi, layers: vl, heads: vn }, vs, vp, proj)
    }))
}

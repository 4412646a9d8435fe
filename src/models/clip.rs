//! The CLIP family (transformers 5.17): `CLIPModel` (both towers), `CLIPTextModelWithProjection`
//! and `CLIPVisionModelWithProjection`. Each tower's pooled output goes through its bias-free
//! projection, then `Op::L2Normalize` into fp32 unit vectors on the device; `exp(logit_scale)`
//! and the image-text similarities are computed on the host by `api::EmbedModel` (a few
//! hundred floats per input, in f64).

use std::path::Path;
use std::sync::Arc;

use super::clip_text::{self, ClipText};
use super::clip_vision::{self, ClipVision, VisionRequest};
use super::{EmbedPlan, Embedder, Loader};
use crate::config::{ClipConfig, ModelConfig, PreprocessorConfig};
use crate::error::{Error, Result};
use crate::graph::{Activation, Buf, DType, Graph, Linear, Op, WeightTable};
use crate::weights::Checkpoint;

pub struct Clip {
    pub cfg: ClipConfig,
    config: ModelConfig,
    pub weights: Arc<WeightTable>,
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
        Ok(Self {
            cfg: cfg.clone(),
            config: ModelConfig::Clip(cfg.clone()),
            weights: Arc::new(table),
            text,
            vision,
            logit_scale,
        })
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
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn weights(&self) -> &Arc<WeightTable> {
        &self.weights
    }

    fn check_preprocessor(&self, pre: &PreprocessorConfig, path: &Path) -> Result<()> {
        self.image_size().map_or(Ok(()), |expected| super::check_square_input(pre, path, expected))
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
            lines.push(format!(
                "vision:     {} layers, hidden {}, {} heads x {}, mlp {}, {}px / patch {} -> {} tokens, {}",
                v.num_hidden_layers,
                v.hidden_size,
                v.num_attention_heads,
                v.head_dim(),
                v.intermediate_size,
                v.image_size,
                v.patch_size,
                v.num_positions(),
                v.hidden_act
            ));
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

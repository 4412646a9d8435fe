//! CLIP's text tower (`CLIPTextTransformer`, transformers 5.17): token + learned position
//! embeddings, pre-norm encoder layers with causal (and padding-masked) self-attention and
//! quick_gelu MLPs, `final_layer_norm`, pooled at one row per text (the EOS position, see
//! [`pool_rows`]).

use super::clip_vision::{load_layers, ClipLayer, ClipLayerDims, LayerBufs};
use super::family::Loader;
use super::layers::{AttnCall, Keys, NormLayer};
use serde::Deserialize;

use crate::config::{check_activation, check_eps, check_heads, check_positive, check_token, field_error};
use crate::error::Result;
use crate::graph::{Buf, Graph, Op, RowSelect, W};
use crate::weights::Checkpoint;

/// `text_config` of CLIP (`CLIPTextConfig`, 5.17 defaults: ViT-B/32's text tower).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    pub projection_dim: usize,
    pub bos_token_id: Option<u32>,
    /// Decides the pooling rule: 2 is transformers' legacy value (pool at the largest id),
    /// anything else pools at the first occurrence of this id.
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            projection_dim: 512,
            bos_token_id: Some(49406),
            eos_token_id: Some(49407),
            pad_token_id: Some(1),
        }
    }
}

impl ClipTextConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// The encoder layers' shapes.
    pub(crate) fn layer_dims(&self) -> ClipLayerDims {
        let (h, heads) = (self.hidden_size, self.num_attention_heads);
        ClipLayerDims::new(h, heads, self.intermediate_size, self.layer_norm_eps, self.activation())
    }

    /// Checks every field the tower reads; `section` prefixes field names (`text_config`).
    pub fn check(&self, section: &str) -> Result<(), String> {
        check_positive(&format!("{section}.vocab_size"), self.vocab_size)?;
        check_heads(section, self.hidden_size, self.num_attention_heads)?;
        check_positive(&format!("{section}.intermediate_size"), self.intermediate_size)?;
        check_positive(&format!("{section}.num_hidden_layers"), self.num_hidden_layers)?;
        check_positive(&format!("{section}.max_position_embeddings"), self.max_position_embeddings)?;
        check_eps(&format!("{section}.layer_norm_eps"), self.layer_norm_eps)?;
        check_activation(&format!("{section}.hidden_act"), &self.hidden_act, &["quick_gelu", "gelu", "gelu_python"])?;
        match self.eos_token_id {
            None => Err(field_error(
                &format!("{section}.eos_token_id"),
                "missing",
                "CLIP pools each text at its EOS token: set it to the id of <|endoftext|>",
            )),
            // 2 is the legacy marker (pool at the largest id), not a token that must exist.
            Some(2) => Ok(()),
            Some(id) => check_token(&format!("{section}.eos_token_id"), id, self.vocab_size),
        }
    }

    /// The MLP activation (`check` has accepted the name).
    pub fn activation(&self) -> crate::graph::Activation {
        if self.hidden_act == "quick_gelu" {
            crate::graph::Activation::QuickGelu
        } else {
            crate::graph::Activation::Gelu
        }
    }
}

pub struct ClipText {
    pub cfg: ClipTextConfig,
    token_embedding: W,
    position_embedding: W,
    layers: Vec<ClipLayer>,
    final_layer_norm: NormLayer,
}

/// The first of `candidates` (key prefixes ending in `.`, or "") under which `ckpt` holds a CLIP
/// text tower: `text_model.` in CLIPModel and CLIPTextModelWithProjection, "" for a standalone
/// CLIPTextModel saved by 5.17.
pub fn find_prefix<'a>(ckpt: &Checkpoint, candidates: &[&'a str]) -> Option<&'a str> {
    candidates.iter().copied().find(|p| ckpt.contains(&format!("{p}embeddings.token_embedding.weight")))
}

/// The row CLIPTextTransformer pools each (padded) id sequence at: with `eos_token_id == 2` (the
/// legacy config value) the position of the largest id, else the first position holding
/// `eos_token_id`; both are torch's `argmax`, so ties and "not found" give the first position
/// (0 when no EOS is present).
pub fn pool_rows(ids: &[Vec<u32>], eos_token_id: u32) -> Vec<usize> {
    ids.iter()
        .map(|seq| {
            if eos_token_id == 2 {
                // First maximum, as torch.argmax (ids are compared as int32 there, all < 2^31).
                let max = seq.iter().copied().max().unwrap_or(0);
                seq.iter().position(|&t| t == max).unwrap_or(0)
            } else {
                seq.iter().position(|&t| t == eos_token_id).unwrap_or(0)
            }
        })
        .collect()
}

impl ClipText {
    /// Loads the tower under `prefix` (`text_model.` or "").
    pub fn load(cfg: &ClipTextConfig, ld: &mut Loader, prefix: &str) -> Result<Self> {
        let d = cfg.hidden_size;
        let e = format!("{prefix}embeddings");
        let token_embedding = ld.tensor(&format!("{e}.token_embedding.weight"), &[cfg.vocab_size, d])?;
        let position_embedding =
            ld.tensor(&format!("{e}.position_embedding.weight"), &[cfg.max_position_embeddings, d])?;
        let eps = cfg.layer_norm_eps;
        let layers = load_layers(ld, prefix, cfg.num_hidden_layers, &cfg.layer_dims())?;
        let final_layer_norm = ld.norm(&format!("{prefix}final_layer_norm"), d, eps)?.into();
        Ok(Self { cfg: cfg.clone(), token_embedding, position_embedding, layers, final_layer_norm })
    }

    /// Emits the tower for `batch` texts of `len` tokens each (the executor's tokens, sequence
    /// major) with the additive padding mask `key_mask` `[batch, len]`; returns the pooled
    /// `[batch, hidden]` rows (the executor's row indices, see [`pool_rows`]).
    pub fn emit(&self, g: &mut Graph, tag: &str, batch: usize, len: usize, key_mask: Buf) -> Buf {
        let c = &self.cfg;
        let (d, rows) = (c.hidden_size, batch * len);
        let x = g.buffer(format!("{tag}.residual"), rows, d);
        let h = g.buffer(format!("{tag}.normed"), rows, d);
        let mlp = g.buffer(format!("{tag}.mlp"), rows, c.intermediate_size);
        // x = token_embedding[ids] + position_embedding[0..len]
        g.push(Op::Embed { table: self.token_embedding, out: x });
        g.push(Op::AddPositions { table: self.position_embedding, offset: 0, x, batch, rows_per_batch: len });
        let call = AttnCall { key_mask: Some(key_mask), ..AttnCall::new(batch, len, Keys::Same).causal() };
        let bufs = LayerBufs { x, normed: h, mlp, rows };
        let mut scratch = None;
        for l in &self.layers {
            let s = *scratch.get_or_insert_with(|| l.scratch(g, tag, rows));
            // x += out_proj(causal, padding-masked attention of LN1(x)); x += fc2(act(fc1(LN2(x))))
            l.emit(g, &s, &bufs, &call);
        }
        // final_layer_norm is row-wise, so pooling first and normalizing the pooled rows is the
        // same numbers for a fraction of the work.
        let eos = g.buffer(format!("{tag}.eos"), batch, d);
        g.push(Op::SelectRows { x, out: eos, batch, rows_per_batch: len, select: RowSelect::Indexed });
        let pooled = g.buffer(format!("{tag}.pooled"), batch, d);
        self.final_layer_norm.emit(g, eos, None, pooled, batch);
        pooled
    }
}

#[cfg(test)]
mod tests {
    use super::pool_rows;

    #[test]
    fn pooling_rows_follow_transformers_argmax_rules() {
        let ids = vec![vec![49406, 5, 49407, 49407], vec![49406, 7, 8, 9], vec![0, 49500, 3, 49407]];
        // First occurrence of eos; none present: argmax of all-false is position 0.
        assert_eq!(pool_rows(&ids, 49407), vec![2, 0, 3]);
        // Legacy eos_token_id 2: position of the largest id, first one on ties.
        assert_eq!(pool_rows(&ids, 2), vec![2, 0, 1]);
    }
}

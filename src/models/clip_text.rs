//! CLIP's text tower (`CLIPTextTransformer`, transformers 5.17): token + learned position
//! embeddings, pre-norm encoder layers with causal (and padding-masked) self-attention and
//! quick_gelu MLPs, `final_layer_norm`, pooled at one row per text (the EOS position, see
//! [`pool_rows`]).

use super::clip_vision::{load_layers, ClipLayer, ClipLayerDims, LayerBufs};
use super::layers::{AttnCall, Keys, NormLayer};
use super::Loader;
use crate::config::ClipTextConfig;
use crate::graph::{Buf, Graph, Op, RowSelect, W};
use crate::weights::Checkpoint;
use crate::Result;

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
        let dims = ClipLayerDims {
            hidden: d,
            heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim(),
            intermediate: cfg.intermediate_size,
            eps,
            act: cfg.activation(),
        };
        let layers = load_layers(ld, prefix, cfg.num_hidden_layers, &dims)?;
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

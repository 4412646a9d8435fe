//! BLIP-2's Q-Former (`Blip2QFormerModel`, BERT-style post-norm): learned query tokens attend to
//! themselves and, every `cross_attention_frequency` layers, to the image embeddings.
//!
//! InstructBLIP's (`InstructBlipQFormerModel`, docs/models/instructblip.md#q-former) also reads the
//! instruction: `[queries ; word + position embeddings of its BERT tokens]` under one LayerNorm,
//! self-attention over both (padding-masked), cross-attention and `*_query` FFN on the query rows
//! only, a separate `intermediate`/`output` FFN on the text rows; the query rows come out.

use super::family::Loader;
use super::layers::{
    load_attention, load_mlp, post_norm, AttentionLayer, AttnCall, AttnScratch, AttnSpec, Keys, Mlp, NormLayer,
};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::graph::{Activation, Buf, Graph, Op, W};
use crate::weights::Weight;

/// `qformer_config` (BERT-style, post-norm).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct QFormerConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub cross_attention_frequency: usize,
    pub encoder_hidden_size: usize,
    pub layer_norm_eps: f64,
    pub hidden_act: String,
    /// Word and position embeddings of the instruction (InstructBLIP; BLIP-2 has no text input).
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
}

impl Default for QFormerConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            cross_attention_frequency: 2,
            encoder_hidden_size: 1408,
            layer_norm_eps: 1e-12,
            hidden_act: "gelu".into(),
            vocab_size: 30522,
            max_position_embeddings: 512,
        }
    }
}

impl QFormerConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
    /// transformers: `layer_idx % cross_attention_frequency == 0`.
    pub fn has_cross_attention(&self, layer: usize) -> bool {
        self.cross_attention_frequency != 0 && layer % self.cross_attention_frequency == 0
    }
}

/// query/key/value projections and output dense, then the post-norm, of one attention block.
struct AttentionBlock {
    attention: AttentionLayer,
    layer_norm: NormLayer,
}

impl AttentionBlock {
    fn load(ld: &mut Loader, cfg: &QFormerConfig, prefix: &str, kv_in: usize) -> Result<Self> {
        let names =
            ["attention.query", "attention.key", "attention.value", "output.dense"].map(|n| format!("{prefix}.{n}"));
        let (d, head_dim) = (cfg.hidden_size, cfg.head_dim());
        let spec = AttnSpec {
            kv_in,
            bias: true,
            scale: 1.0 / (head_dim as f32).sqrt(),
            ..AttnSpec::mha(names.each_ref().map(String::as_str), d, cfg.num_attention_heads, head_dim)
        };
        let attention = load_attention(ld, &spec)?;
        let layer_norm = ld.norm(&format!("{prefix}.output.LayerNorm"), d, cfg.layer_norm_eps)?.into();
        Ok(Self { attention, layer_norm })
    }

    /// The scratch of a cross-attention block: its own keys and values over the `kv_rows` image
    /// rows, the query and context buffers of the self-attention's `s`.
    fn cross_scratch(&self, g: &mut Graph, s: &AttnScratch, kv_rows: usize) -> AttnScratch {
        let kv_width = self.attention.kv_width();
        let k = g.buffer("qformer.cross_k", kv_rows, kv_width);
        AttnScratch { k, v: g.buffer("qformer.cross_v", kv_rows, kv_width), ..*s }
    }

    /// `out = LN(dense(MHA(q(x), k(keys), v(keys))) + x)`, the sum in `sum`.
    fn emit(&self, g: &mut Graph, s: &AttnScratch, x: Buf, call: &AttnCall, sum: Buf, out: Buf) {
        let rows = call.batch * call.q_len;
        post_norm(g, &self.layer_norm, x, sum, out, rows, |g, x, r| self.attention.emit(g, s, x, call, r));
    }
}

struct QFormerLayer {
    self_attention: AttentionBlock,
    cross_attention: Option<AttentionBlock>,
    /// intermediate_query -> GELU -> output_query, then its post-norm.
    ffn: Mlp,
    output_layer_norm: NormLayer,
    /// InstructBLIP: intermediate -> GELU -> output and its post-norm, for the instruction rows.
    text_ffn: Option<(Mlp, NormLayer)>,
}

pub struct QFormer {
    pub cfg: QFormerConfig,
    pub num_query_tokens: usize,
    query_tokens: W,
    layernorm: NormLayer,
    layers: Vec<QFormerLayer>,
}

impl QFormer {
    /// The `describe` line of BLIP-2's Q-Former.
    pub fn describe(&self) -> String {
        let q = &self.cfg;
        format!(
            "q-former:   {} layers, hidden {}, {} heads x {}, cross-attention every {} layers, {} queries",
            q.num_hidden_layers,
            q.hidden_size,
            q.num_attention_heads,
            q.head_dim(),
            q.cross_attention_frequency,
            self.num_query_tokens
        )
    }

    /// BLIP-2's Q-Former: `query_tokens` lives at the top level of the checkpoint, the rest
    /// under `prefix`.
    pub fn load(cfg: &QFormerConfig, num_query_tokens: usize, ld: &mut Loader, prefix: &str) -> Result<Self> {
        Self::load_with(cfg, num_query_tokens, ld, prefix, false)
    }

    /// InstructBLIP's: the LayerNorm is `embeddings.layernorm` and every layer has the text FFN
    /// (the word and position embeddings are read by [`Instruction::load`]).
    pub fn load_instruct(cfg: &QFormerConfig, num_query_tokens: usize, ld: &mut Loader, prefix: &str) -> Result<Self> {
        Self::load_with(cfg, num_query_tokens, ld, prefix, true)
    }

    fn load_with(
        cfg: &QFormerConfig,
        num_query_tokens: usize,
        ld: &mut Loader,
        prefix: &str,
        instruct: bool,
    ) -> Result<Self> {
        let (d, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        let query_tokens = ld.tensor("query_tokens", &[1, num_query_tokens, d])?;
        let norm_name = if instruct { "embeddings.layernorm" } else { "layernorm" };
        let layernorm = ld.norm(&format!("{prefix}.{norm_name}"), d, eps)?.into();
        let ffn = |ld: &mut Loader, l: &str, inter: &str, out: &str| -> Result<(Mlp, NormLayer)> {
            let mlp = load_mlp(
                ld,
                &format!("{l}.{inter}.dense"),
                &format!("{l}.{out}.dense"),
                d,
                cfg.intermediate_size,
                true,
                Activation::Gelu,
            )?;
            Ok((mlp, ld.norm(&format!("{l}.{out}.LayerNorm"), d, eps)?.into()))
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = format!("{prefix}.encoder.layer.{i}");
                let self_attention = AttentionBlock::load(ld, cfg, &format!("{l}.attention"), d)?;
                let cross_attention = if cfg.has_cross_attention(i) {
                    Some(AttentionBlock::load(ld, cfg, &format!("{l}.crossattention"), cfg.encoder_hidden_size)?)
                } else {
                    None
                };
                let (ffn_q, output_layer_norm) = ffn(ld, &l, "intermediate_query", "output_query")?;
                let text_ffn = if instruct { Some(ffn(ld, &l, "intermediate", "output")?) } else { None };
                Ok(QFormerLayer { self_attention, cross_attention, ffn: ffn_q, output_layer_norm, text_ffn })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { cfg: cfg.clone(), num_query_tokens, query_tokens, layernorm, layers })
    }

    /// Emits the Q-Former over `image` (`[batch * image_tokens, encoder_hidden]`); returns the
    /// query outputs `[batch * num_query_tokens, hidden]`.
    pub fn build(&self, g: &mut Graph, image: Buf, batch: usize, image_tokens: usize) -> Buf {
        let d = self.cfg.hidden_size;
        let nq = self.num_query_tokens;
        let rows = batch * nq;
        let queries = g.buffer("qformer.queries", rows, d);
        let x = g.buffer("qformer.hidden", rows, d);
        let h = g.buffer("qformer.attended", rows, d);
        let ffn = g.buffer("qformer.ffn", rows, self.cfg.intermediate_size);
        let dense = g.buffer("qformer.dense", rows, d);
        // Self- and cross-attention share the query and context buffers.
        let (mut self_scratch, mut cross_scratch) = (None, None);
        let self_call = AttnCall::new(batch, nq, Keys::Same);
        let cross_call = AttnCall::new(batch, nq, Keys::Cross { src: image, kv_len: image_tokens });

        // x = LayerNorm(query_tokens), one copy per image   [B*32, D]
        g.push(Op::Broadcast { table: self.query_tokens, out: queries, batch });
        self.layernorm.emit(g, queries, None, x, rows);
        for l in &self.layers {
            let s = *self_scratch.get_or_insert_with(|| l.self_attention.attention.scratch(g, "qformer", rows, rows));
            // h = LN(dense(SelfAttn(x)) + x)
            l.self_attention.emit(g, &s, x, &self_call, dense, h);
            if let Some(cross) = &l.cross_attention {
                let cs = *cross_scratch.get_or_insert_with(|| cross.cross_scratch(g, &s, batch * image_tokens));
                // h = LN(dense(CrossAttn(h, image)) + h)   (dense writes a scratch, LN back to h)
                cross.emit(g, &cs, h, &cross_call, dense, h);
            }
            // x = LN(output_query(GELU(intermediate_query(h))) + h)
            post_norm(g, &l.output_layer_norm, h, dense, x, rows, |g, h, r| l.ffn.emit(g, h, ffn, r, rows));
        }
        x
    }
}

/// Buffers of one InstructBLIP Q-Former run over `batch` sequences of `rows_per_seq` rows
/// (`num_query_tokens` queries, then the padded instruction).
pub struct InstructInputs {
    /// `[batch * rows_per_seq, hidden]` fp32: query tokens then word + position embeddings,
    /// before the embeddings' LayerNorm (written by the host, [`Instruction::embed`]).
    pub embeds: Buf,
    /// `[batch, rows_per_seq]` additive key mask: 0, or `f32::MIN` on instruction padding.
    pub key_mask: Buf,
    pub rows_per_seq: usize,
}

impl QFormer {
    /// Emits InstructBLIP's Q-Former over `image` (`[batch * image_tokens, encoder_hidden]`) and
    /// the instruction rows of `inp`; returns the query outputs `[batch * num_query_tokens, hidden]`.
    pub fn build_instruct(
        &self,
        g: &mut Graph,
        image: Buf,
        batch: usize,
        image_tokens: usize,
        inp: &InstructInputs,
    ) -> Buf {
        let (d, nq, t) = (self.cfg.hidden_size, self.num_query_tokens, inp.rows_per_seq);
        let text = t - nq;
        let rows = batch * t;
        let x = g.buffer("qformer.hidden", rows, d);
        let h = g.buffer("qformer.attended", rows, d);
        let dense = g.buffer("qformer.dense", rows, d);
        let ffn = g.buffer("qformer.ffn", rows, self.cfg.intermediate_size);
        let (hq, xq) =
            (g.buffer("qformer.query_attended", batch * nq, d), g.buffer("qformer.query_out", batch * nq, d));
        // At least one row: an instruction-free plan (never from the tokenizer, which adds
        // [CLS] and [SEP]) allocates no empty buffer.
        let t_buf = batch * text.max(1);
        let (ht, xt) = (g.buffer("qformer.text_attended", t_buf, d), g.buffer("qformer.text_out", t_buf, d));
        let (mut self_scratch, mut cross_scratch) = (None, None);
        let self_call = AttnCall { key_mask: Some(inp.key_mask), ..AttnCall::new(batch, t, Keys::Same) };
        let cross_call = AttnCall::new(batch, nq, Keys::Cross { src: image, kv_len: image_tokens });
        // Moves `n` rows per sequence from row `from` of `src` (`src_rows` per sequence) to row
        // `to` of `dst` (`dst_rows` per sequence).
        let copy =
            |g: &mut Graph, src: Buf, src_rows: usize, from: usize, dst: Buf, dst_rows: usize, to: usize, n: usize| {
                g.push(Op::CopyRows {
                    x: src,
                    x_rows_per_batch: src_rows,
                    x_start: from,
                    out: dst,
                    out_rows_per_batch: dst_rows,
                    out_start: to,
                    rows: n,
                    batch,
                })
            };

        // x = LayerNorm([queries ; word + position embeddings])   [B*(Nq+L), D]
        self.layernorm.emit(g, inp.embeds, None, x, rows);
        let last = self.layers.len().saturating_sub(1);
        for (i, l) in self.layers.iter().enumerate() {
            let s = *self_scratch.get_or_insert_with(|| l.self_attention.attention.scratch(g, "qformer", rows, rows));
            // h = LN(dense(SelfAttn(x, padding mask)) + x) over queries and instruction
            l.self_attention.emit(g, &s, x, &self_call, dense, h);
            // Query rows: h_q = LN(dense(CrossAttn(h_q, image)) + h_q), then the query FFN.
            copy(g, h, t, 0, hq, nq, 0, nq);
            if let Some(cross) = &l.cross_attention {
                let cs = *cross_scratch.get_or_insert_with(|| cross.cross_scratch(g, &s, batch * image_tokens));
                cross.emit(g, &cs, hq, &cross_call, dense, hq);
            }
            let q_rows = batch * nq;
            post_norm(g, &l.output_layer_norm, hq, dense, xq, q_rows, |g, h, r| l.ffn.emit(g, h, ffn, r, q_rows));
            // The last layer's instruction rows are discarded (transformers computes them).
            if i == last || text == 0 {
                continue;
            }
            copy(g, xq, nq, 0, x, t, 0, nq);
            // Instruction rows: x_t = LN(output(GELU(intermediate(h_t))) + h_t); no cross-attention.
            let (text_ffn, text_norm) = l.text_ffn.as_ref().expect("load_instruct loads the text FFN");
            let t_rows = batch * text;
            copy(g, h, t, nq, ht, text, 0, text);
            post_norm(g, text_norm, ht, dense, xt, t_rows, |g, h, r| text_ffn.emit(g, h, ffn, r, t_rows));
            copy(g, xt, text, 0, x, t, nq, text);
        }
        xq
    }
}

/// The host side of InstructBLIP's Q-Former input: the query tokens and the word and position
/// embeddings of the instruction (a table lookup and one add, done on the host so the encoders
/// need no token ids), fp16 weights widened to f32 as the graph reads them.
pub struct Instruction {
    hidden: usize,
    query_tokens: Weight,
    word_embeddings: Weight,
    position_embeddings: Weight,
    pad_token_id: u32,
}

impl Instruction {
    /// Reads `{prefix}.embeddings.word_embeddings` / `position_embeddings` and `query_tokens`.
    pub fn load(
        cfg: &QFormerConfig,
        num_query_tokens: usize,
        ckpt: &crate::weights::Checkpoint,
        prefix: &str,
    ) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            hidden: d,
            query_tokens: ckpt.f16("query_tokens", &[1, num_query_tokens, d])?,
            word_embeddings: ckpt.f16(&format!("{prefix}.embeddings.word_embeddings.weight"), &[cfg.vocab_size, d])?,
            position_embeddings: ckpt
                .f16(&format!("{prefix}.embeddings.position_embeddings.weight"), &[cfg.max_position_embeddings, d])?,
            pad_token_id: 0,
        })
    }

    /// The longest instruction the position table holds.
    pub fn max_len(&self) -> usize {
        self.position_embeddings.shape[0]
    }

    /// Rows per sequence for instructions of at most `longest` tokens.
    pub fn rows_per_seq(&self, longest: usize) -> usize {
        self.query_tokens.shape[1] + longest
    }

    /// The host data of [`InstructInputs`] for one tokenized instruction per sequence, padded to
    /// the longest with `[PAD]` (on the left when `pad_left`, else on the right) and masked
    /// there: `(embeds [B*(Nq+L), D], key_mask [B, Nq+L])`. The Q-Former's positions run from 0
    /// at the first row, pad or not (`position_ids = arange(L)`), as transformers 5.17 computes
    /// them, so left padding moves a shorter instruction's positions.
    pub fn embed(&self, ids: &[Vec<u32>], pad_left: bool) -> Result<(Vec<f32>, Vec<f32>)> {
        let d = self.hidden;
        let longest = ids.iter().map(Vec::len).max().unwrap_or(0);
        if longest > self.max_len() {
            return Err(Error::InvalidInput(format!(
                "the instruction is {longest} Q-Former tokens, more than its {} positions (qformer_config.max_position_embeddings; transformers fails on it too): shorten the prompt",
                self.max_len()
            )));
        }
        let vocab = self.word_embeddings.shape[0];
        let (queries, words, positions) =
            (self.query_tokens.as_slice(), self.word_embeddings.as_slice(), self.position_embeddings.as_slice());
        let t = self.rows_per_seq(longest);
        let (mut embeds, mut mask) = (Vec::with_capacity(ids.len() * t * d), Vec::with_capacity(ids.len() * t));
        for seq in ids {
            embeds.extend(queries.iter().map(|v| v.to_f32()));
            let pad = longest - seq.len();
            let first = if pad_left { pad } else { 0 };
            for j in 0..longest {
                let id = seq.get(j.wrapping_sub(first)).copied().unwrap_or(self.pad_token_id) as usize;
                if id >= vocab {
                    return Err(Error::InvalidInput(format!(
                        "Q-Former token id {id} is outside its vocabulary (qformer_config.vocab_size {vocab}): the qformer_tokenizer does not belong to this checkpoint"
                    )));
                }
                let (w, p) = (&words[id * d..(id + 1) * d], &positions[j * d..(j + 1) * d]);
                embeds.extend(w.iter().zip(p).map(|(w, p)| w.to_f32() + p.to_f32()));
            }
            mask.extend(std::iter::repeat_n(0.0, t - longest));
            mask.extend((0..longest).map(|j| if (first..first + seq.len()).contains(&j) { 0.0 } else { f32::MIN }));
        }
        Ok((embeds, mask))
    }
}

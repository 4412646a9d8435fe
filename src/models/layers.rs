//! Layer builders shared by every tower and decoder (ViT, Q-Former, OPT, CLIP, LLaMA, T5):
//! norms, multi-head / grouped-query attention (self, cross or over a KV cache), plain and gated
//! MLPs, pre- and post-norm residual blocks, and the KV cache. Models load their weights under
//! their Hugging Face names and describe a block by composing these; only this file constructs
//! [`graph::Attention`](crate::graph::Attention).

use std::sync::Arc;

use super::family::Loader;
use crate::error::Result;
use crate::graph::{self, Activation, Buf, Fused, Graph, KvLen, Linear, Norm, Op, View, W};

/// A normalisation layer's parameters.
#[derive(Debug, Clone, Copy)]
pub enum NormLayer {
    /// `nn.LayerNorm` (bias optional: `bias=False` layers store only the weight).
    LayerNorm { weight: W, bias: Option<W>, eps: f32 },
    /// HF Llama / T5 RMSNorm (no mean, no bias).
    RmsNorm { weight: W, eps: f32 },
}

impl From<Norm> for NormLayer {
    fn from(n: Norm) -> Self {
        NormLayer::LayerNorm { weight: n.weight, bias: Some(n.bias), eps: n.eps }
    }
}

impl NormLayer {
    /// `out = norm(x + residual)` over `rows` rows.
    pub fn emit(&self, g: &mut Graph, x: Buf, residual: Option<Buf>, out: Buf, rows: usize) {
        g.push(match *self {
            NormLayer::LayerNorm { weight, bias, eps } => Op::LayerNorm { x, residual, weight, bias, eps, out, rows },
            NormLayer::RmsNorm { weight, eps } => Op::RmsNorm { x, residual, weight, eps, out, rows },
        });
    }
}

/// `out = act(x · Wᵀ + b) + residual` for a loaded [`Linear`].
pub fn linear(
    g: &mut Graph,
    l: &Linear,
    x: impl Into<View>,
    act: Activation,
    residual: Option<Buf>,
    out: Buf,
    rows: usize,
) {
    g.linear(x, l.weight, l.bias, Fused::add(act, residual), out, rows);
}

/// Where a block body's last Linear writes: `out = body(..) + add`.
#[derive(Debug, Clone, Copy)]
pub struct Residual {
    pub add: Buf,
    pub out: Buf,
}

/// Pre-norm residual block: `x += body(norm(x))`, the add fused into the body's last Linear.
pub fn pre_norm(
    g: &mut Graph,
    norm: &NormLayer,
    x: Buf,
    normed: Buf,
    rows: usize,
    body: impl FnOnce(&mut Graph, Buf, Residual),
) {
    norm.emit(g, x, None, normed, rows);
    body(g, normed, Residual { add: x, out: x });
}

/// Post-norm residual block (BERT): `out = norm(body(x) + x)`; the body writes the sum to `sum`
/// (`out` may be `x`).
pub fn post_norm(
    g: &mut Graph,
    norm: &NormLayer,
    x: Buf,
    sum: Buf,
    out: Buf,
    rows: usize,
    body: impl FnOnce(&mut Graph, Buf, Residual),
) {
    body(g, x, Residual { add: x, out: sum });
    norm.emit(g, sum, None, out, rows);
}

/// `fc2(act(fc1(x)))`.
#[derive(Debug, Clone, Copy)]
pub struct Mlp {
    pub fc1: Linear,
    pub fc2: Linear,
    pub act: Activation,
}

impl Mlp {
    /// `hidden` is the `[rows, fc1.out_dim]` intermediate buffer.
    pub fn emit(&self, g: &mut Graph, x: Buf, hidden: Buf, r: Residual, rows: usize) {
        linear(g, &self.fc1, x, self.act, None, hidden, rows);
        linear(g, &self.fc2, hidden, Activation::None, Some(r.add), r.out, rows);
    }
}

/// `down(act(gate(x)) * up(x))` (Llama SiLU, T5 GELU-tanh).
#[derive(Debug, Clone, Copy)]
pub struct GatedMlp {
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
    pub act: Activation,
}

/// Intermediate buffers of a [`GatedMlp`], each `[rows, intermediate]`, three distinct buffers.
#[derive(Debug, Clone, Copy)]
pub struct GatedScratch {
    pub gate: Buf,
    pub up: Buf,
    pub hidden: Buf,
}

impl GatedMlp {
    pub fn emit(&self, g: &mut Graph, x: Buf, s: &GatedScratch, r: Residual, rows: usize) {
        self.emit_into(g, x, s, Some(r.add), r.out, rows);
    }

    /// `out = down(act(gate(x)) * up(x))` with no residual (IDEFICS gates it first).
    pub fn project(&self, g: &mut Graph, x: Buf, s: &GatedScratch, out: Buf, rows: usize) {
        self.emit_into(g, x, s, None, out, rows);
    }

    fn emit_into(&self, g: &mut Graph, x: Buf, s: &GatedScratch, add: Option<Buf>, out: Buf, rows: usize) {
        linear(g, &self.gate, x, Activation::None, None, s.gate, rows);
        linear(g, &self.up, x, Activation::None, None, s.up, rows);
        g.push(Op::GatedAct { gate: s.gate.into(), up: s.up.into(), act: self.act, out: s.hidden, rows });
        linear(g, &self.down, s.hidden, Activation::None, add, out, rows);
    }
}

/// The query/key/value projections of an attention layer.
#[derive(Debug, Clone, Copy)]
pub enum Qkv {
    /// One Linear whose output is `[q | k | v]` (`heads`, `kv_heads`, `kv_heads` head widths).
    Fused(Linear),
    Separate {
        q: Linear,
        k: Linear,
        v: Linear,
    },
}

/// Multi-head (or grouped-query, `kv_heads < heads`) attention with its output projection.
#[derive(Debug, Clone)]
pub struct AttentionLayer {
    pub qkv: Qkv,
    pub out: Linear,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Score scale, as the model's own code computes it (kept per model so its f32 rounding is).
    pub scale: f32,
    /// RoPE `inv_freq` applied to q and k after the projections (LLaMA); None for learned or
    /// absolute positions.
    pub rope: Option<Arc<[f32]>>,
    /// Norms over each head of the queries and keys after their projections (and RoPE).
    pub qk_norm: Option<HeadNorms>,
}

/// IDEFICS' `qk_layer_norms`: one norm over each `head_dim` slice of the queries and one of the
/// keys (RMSNorm in the decoder's cross-attention, LayerNorm in the Perceiver Resampler). Each
/// slice is one row of the `[rows * heads, head_dim]` reshape of the projection, normed there and
/// reshaped back (`Op::Convert` copies flat).
#[derive(Debug, Clone, Copy)]
pub struct HeadNorms {
    pub q: NormLayer,
    pub k: NormLayer,
}

/// Norms each `head_dim` slice of `rows` rows of `heads` heads in `x` (a whole buffer), in place.
fn norm_heads(g: &mut Graph, norm: &NormLayer, x: Buf, rows: usize, heads: usize, head_dim: usize) {
    let name = g.desc(x).name.clone();
    let (split, normed) = (
        g.buffer(format!("{name}.heads"), rows * heads, head_dim),
        g.buffer(format!("{name}.heads_normed"), rows * heads, head_dim),
    );
    g.push(Op::Convert { x, out: split, rows });
    norm.emit(g, split, None, normed, rows * heads);
    g.push(Op::Convert { x: normed, out: x, rows: rows * heads });
}

/// Buffers one attention layer writes. With [`Qkv::Fused`], `q`, `k` and `v` are the same
/// `[rows, (heads + 2 kv_heads) * head_dim]` buffer.
#[derive(Debug, Clone, Copy)]
pub struct AttnScratch {
    pub q: Buf,
    pub k: Buf,
    pub v: Buf,
    /// `[rows, heads * head_dim]` attention output, input of the output projection.
    pub ctx: Buf,
}

/// The keys and values a query attends to.
#[derive(Debug, Clone, Copy)]
pub enum Keys {
    /// The layer's own input rows, `q_len` per batch item.
    Same,
    /// Another buffer (cross-attention): `kv_len` rows per batch item of `src`.
    Cross { src: Buf, kv_len: usize },
    /// The layer's own rows appended to a KV cache, then attention over the cache (the
    /// executor's `position` says how many rows it already holds).
    Cache { k: Buf, v: Buf, capacity: usize },
    /// Keys and values projected earlier by [`AttentionLayer::project_kv`] (T5's cross-attention
    /// over the encoder output, computed once per request): `kv_len` rows per batch item.
    Projected { k: Buf, v: Buf, kv_len: usize },
}

/// How one attention call is laid out: `batch` items of `q_len` query rows.
#[derive(Debug, Clone, Copy)]
pub struct AttnCall {
    pub batch: usize,
    pub q_len: usize,
    pub keys: Keys,
    pub causal: bool,
    /// Additive per-key padding mask `[batch, >= keys]` (see `graph::Attention::key_mask`).
    pub key_mask: Option<Buf>,
    /// `key_mask` holds one row per query row (`[batch * q_len, >= keys]`, IDEFICS' image mask).
    pub mask_per_query: bool,
    /// Additive per-head bias `[heads * q_len, >= keys]` (T5 relative positions).
    pub head_bias: Option<Buf>,
}

impl AttnCall {
    pub fn new(batch: usize, q_len: usize, keys: Keys) -> Self {
        Self { batch, q_len, keys, causal: false, key_mask: None, mask_per_query: false, head_bias: None }
    }

    pub fn causal(self) -> Self {
        Self { causal: true, ..self }
    }
}

impl AttentionLayer {
    /// Width of the query / context rows.
    pub fn q_width(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Width of one of K or V.
    pub fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Allocates the buffers [`AttentionLayer::emit`] writes for `rows` query rows and `kv_rows`
    /// key rows: `{tag}.qkv` (fused) or `{tag}.q`/`.k`/`.v`, and `{tag}.context`.
    pub fn scratch(&self, g: &mut Graph, tag: &str, rows: usize, kv_rows: usize) -> AttnScratch {
        let ctx = g.buffer(format!("{tag}.context"), rows, self.q_width());
        match self.qkv {
            Qkv::Fused(_) => {
                let qkv = g.buffer(format!("{tag}.qkv"), rows, self.q_width() + 2 * self.kv_width());
                AttnScratch { q: qkv, k: qkv, v: qkv, ctx }
            }
            Qkv::Separate { .. } => AttnScratch {
                q: g.buffer(format!("{tag}.q"), rows, self.q_width()),
                k: g.buffer(format!("{tag}.k"), kv_rows, self.kv_width()),
                v: g.buffer(format!("{tag}.v"), kv_rows, self.kv_width()),
                ctx,
            },
        }
    }

    /// Emits the key and value projections of `src` (`rows` rows) into `k` and `v`, for later
    /// [`Keys::Projected`] calls (separate projections only).
    pub fn project_kv(&self, g: &mut Graph, src: Buf, k: Buf, v: Buf, rows: usize) {
        let Qkv::Separate { k: kp, v: vp, .. } = &self.qkv else {
            panic!("project_kv needs separate k/v projections (a fused qkv projects its own input)")
        };
        linear(g, kp, src, Activation::None, None, k, rows);
        linear(g, vp, src, Activation::None, None, v, rows);
        if let Some(n) = &self.qk_norm {
            norm_heads(g, &n.k, k, rows, self.kv_heads, self.head_dim);
        }
    }

    /// Emits `r.out = out_proj(attention(q(x), k(kv), v(kv))) + r.add`: projections, RoPE, KV
    /// cache append, attention, output projection.
    pub fn emit(&self, g: &mut Graph, s: &AttnScratch, x: Buf, call: &AttnCall, r: Residual) {
        self.attend(g, s, x, call);
        linear(g, &self.out, s.ctx, Activation::None, Some(r.add), r.out, call.batch * call.q_len);
    }

    /// Emits everything of [`AttentionLayer::emit`] but the output projection: the attention
    /// output is left in `s.ctx` (`[rows, heads * head_dim]`).
    pub fn attend(&self, g: &mut Graph, s: &AttnScratch, x: Buf, call: &AttnCall) {
        let rows = call.batch * call.q_len;
        let (kv_src, kv_len) = match call.keys {
            Keys::Same | Keys::Cache { .. } => (x, call.q_len),
            Keys::Cross { src, kv_len } | Keys::Projected { k: src, kv_len, .. } => (src, kv_len),
        };
        let kv_rows = call.batch * kv_len;
        let (q, k, v) = match &self.qkv {
            Qkv::Fused(p) => {
                assert!(
                    matches!(call.keys, Keys::Same | Keys::Cache { .. }),
                    "a fused qkv projects one input: no cross-attention"
                );
                linear(g, p, x, Activation::None, None, s.q, rows);
                let qw = self.q_width();
                (View { buf: s.q, col: 0 }, View { buf: s.q, col: qw }, View { buf: s.q, col: qw + self.kv_width() })
            }
            Qkv::Separate { q, k, v } => {
                linear(g, q, x, Activation::None, None, s.q, rows);
                if let Keys::Projected { k, v, .. } = call.keys {
                    (View::from(s.q), View::from(k), View::from(v))
                } else {
                    linear(g, k, kv_src, Activation::None, None, s.k, kv_rows);
                    linear(g, v, kv_src, Activation::None, None, s.v, kv_rows);
                    (View::from(s.q), View::from(s.k), View::from(s.v))
                }
            }
        };
        if let Some(inv_freq) = &self.rope {
            let (batch, rows_per_batch, head_dim) = (call.batch, call.q_len, self.head_dim);
            g.push(Op::Rope { x: q, batch, rows_per_batch, heads: self.heads, head_dim, inv_freq: inv_freq.clone() });
            g.push(Op::Rope {
                x: k,
                batch,
                rows_per_batch,
                heads: self.kv_heads,
                head_dim,
                inv_freq: inv_freq.clone(),
            });
        }
        if let Some(n) = &self.qk_norm {
            assert!(q.col == 0 && k.col == 0, "per-head norms need separate q/k projections");
            norm_heads(g, &n.q, q.buf, rows, self.heads, self.head_dim);
            if !matches!(call.keys, Keys::Projected { .. }) {
                norm_heads(g, &n.k, k.buf, kv_rows, self.kv_heads, self.head_dim);
            }
        }
        let (k, v, kv_len, kv_batch_stride) = match call.keys {
            Keys::Same | Keys::Cross { .. } | Keys::Projected { .. } => (k, v, KvLen::Fixed(kv_len), kv_len),
            Keys::Cache { k: cache_k, v: cache_v, capacity } => {
                g.push(Op::KvAppend {
                    k,
                    v,
                    cache_k,
                    cache_v,
                    batch: call.batch,
                    rows_per_batch: call.q_len,
                    capacity,
                });
                (View::from(cache_k), View::from(cache_v), KvLen::Cache, capacity)
            }
        };
        g.push(Op::Attention(graph::Attention {
            q,
            k,
            v,
            out: s.ctx,
            batch: call.batch,
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            q_len: call.q_len,
            kv_len,
            kv_batch_stride,
            causal: call.causal,
            scale: self.scale,
            key_mask: call.key_mask,
            mask_per_query: call.mask_per_query,
            head_bias: call.head_bias,
        }));
    }
}

/// Per-layer K and V caches `[batch * capacity, kv_width]`, shared by prefill and decode.
pub struct KvCache {
    pub layers: Vec<(Buf, Buf)>,
    pub batch: usize,
    pub capacity: usize,
}

impl KvCache {
    /// Buffers `{tag}.{i}.cache_k` / `.cache_v` for `layers` layers.
    pub fn new(g: &mut Graph, tag: &str, layers: usize, batch: usize, capacity: usize, kv_width: usize) -> Self {
        let layers = (0..layers)
            .map(|i| {
                let k = g.buffer(format!("{tag}.{i}.cache_k"), batch * capacity, kv_width);
                (k, g.buffer(format!("{tag}.{i}.cache_v"), batch * capacity, kv_width))
            })
            .collect();
        KvCache { layers, batch, capacity }
    }

    /// Every layer's K and V buffers as the generation loop sees them (beam search moves whole
    /// sequences of `capacity` rows).
    pub fn caches(&self) -> crate::generate::KvCaches {
        crate::generate::KvCaches {
            bufs: self.layers.iter().flat_map(|&(k, v)| [k, v]).collect(),
            rows_per_seq: self.capacity,
        }
    }

    /// The [`Keys`] of layer `i`.
    pub fn keys(&self, i: usize) -> Keys {
        let (k, v) = self.layers[i];
        Keys::Cache { k, v, capacity: self.capacity }
    }
}

/// Attention projection names (full tensor prefixes) and shapes, for [`load_attention`].
pub struct AttnSpec<'a> {
    /// `[q, k, v, out]` Linear prefixes, e.g. `{l}.self_attn.q_proj`.
    pub names: [&'a str; 4],
    /// Width of the query input (and of the output projection's output).
    pub q_in: usize,
    /// Width of the key/value input (`q_in` for self-attention).
    pub kv_in: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub bias: bool,
    pub scale: f32,
}

impl<'a> AttnSpec<'a> {
    /// Multi-head self-attention over `width`-wide rows: as many key/value heads as query heads,
    /// no biases, scores scaled by `head_dim ** -0.5` as transformers computes it (a Python
    /// float, rounded to f32). Struct-update the fields a model sets otherwise.
    pub fn mha(names: [&'a str; 4], width: usize, heads: usize, head_dim: usize) -> Self {
        Self {
            names,
            q_in: width,
            kv_in: width,
            heads,
            kv_heads: heads,
            head_dim,
            bias: false,
            scale: (head_dim as f64).powf(-0.5) as f32,
        }
    }
}

/// Loads separate q/k/v/out projections in that order.
pub fn load_attention(ld: &mut Loader, s: &AttnSpec) -> Result<AttentionLayer> {
    let [qn, kn, vn, on] = s.names;
    let (qw, kvw) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
    let q = ld.linear(qn, s.q_in, qw, s.bias)?;
    let k = ld.linear(kn, s.kv_in, kvw, s.bias)?;
    let v = ld.linear(vn, s.kv_in, kvw, s.bias)?;
    Ok(AttentionLayer {
        qkv: Qkv::Separate { q, k, v },
        out: ld.linear(on, qw, s.q_in, s.bias)?,
        heads: s.heads,
        kv_heads: s.kv_heads,
        head_dim: s.head_dim,
        scale: s.scale,
        rope: None,
        qk_norm: None,
    })
}

/// Loads `{fc1}` `[inter, dim]` and `{fc2}` `[dim, inter]`.
pub fn load_mlp(
    ld: &mut Loader,
    fc1: &str,
    fc2: &str,
    dim: usize,
    inter: usize,
    bias: bool,
    act: Activation,
) -> Result<Mlp> {
    Ok(Mlp { fc1: ld.linear(fc1, dim, inter, bias)?, fc2: ld.linear(fc2, inter, dim, bias)?, act })
}

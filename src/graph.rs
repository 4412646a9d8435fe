//! The minimal graph: a model is emitted once per phase (vision, Q-Former, prefill, decode step)
//! as a list of ops over buffers whose shapes are fixed when the graph is built. Executors
//! (`backend::cpu`, later `backend::cuda`) allocate every buffer once and run the ops; model code
//! says *what* is computed, executors say *how*.
//!
//! Two values change between runs of the same ops and live in the executor, not in the ops:
//! the token ids of the step and `position`, the number of tokens already in the KV cache.

use crate::weights::Weight;

/// A buffer of the graph: `rows x cols` f32 on the CPU, row-major; on the GPU fp16 or fp32 as
/// its [`DType`] says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Buf(pub usize);

/// A weight tensor of the model's [`WeightTable`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct W(pub usize);

/// Columns `[col, col + width)` of every row of a buffer (e.g. the K part of a fused qkv).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View {
    pub buf: Buf,
    pub col: usize,
}

impl From<Buf> for View {
    fn from(buf: Buf) -> View {
        View { buf, col: 0 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    None,
    Relu,
    /// Exact erf GELU: 0.5 x (1 + erf(x / sqrt 2)).
    Gelu,
    /// CLIP's x * sigmoid(1.702 x).
    QuickGelu,
    Silu,
    /// `gelu_pytorch_tanh` / `gelu_new`: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
    GeluTanh,
}

impl Activation {
    #[inline]
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Activation::None => x,
            Activation::Relu => x.max(0.0),
            // f32 erf, as torch's CPU kernel computes it (both within ~1 ulp of exact).
            Activation::Gelu => 0.5 * x * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2)),
            Activation::QuickGelu => x / (1.0 + (-1.702 * x).exp()),
            Activation::Silu => x / (1.0 + (-x).exp()),
            // torch's CPU kernel's inner value u = kBeta * (x + 0.044715 x³), kBeta =
            // sqrt(2) * (2/sqrt(pi)) * 0.5, all in f32; then 0.5 x (1 + tanh u) written as the
            // identical x / (1 + exp(-2u)): one f32 exp instead of libm's tanhf (a fifth of SigLIP's
            // time on the CPU), within a few ulps of the exact value everywhere and with no
            // cancellation where tanh u is near -1.
            Activation::GeluTanh => {
                const BETA: f32 = std::f32::consts::SQRT_2 * std::f32::consts::FRAC_2_SQRT_PI * 0.5;
                let u = BETA * (x + 0.044715 * x * x * x);
                x / (1.0 + (-2.0 * u).exp())
            }
        }
    }
}

/// How many keys each query row sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvLen {
    /// A fixed number of keys per batch item (encoder self/cross attention).
    Fixed(usize),
    /// The KV cache: `position + q_len` keys, where `position` is the executor's current value.
    Cache,
}

/// Additive attention masks are clamped to this value on both executors before they are added
/// to the scores. HF fills masked keys with `finfo(float32).min`: a score plus that rounds back
/// to it, so a row whose keys are all masked gets equal scores and averages V (transformers'
/// eager result), while partly masked rows give those keys weight 0. The clamp keeps this true
/// in the CUDA kernels' log2 domain, where `finfo.min * log2(e)` would overflow to -inf (and a
/// fully masked row would come out as 0); `-inf` masks follow the same rule instead of NaN.
pub const ATTN_MASK_FLOOR: f32 = -1e30;

/// Multi-head attention over row-major buffers. Batch item `b`, head `h`, row `i` of Q is at
/// row `b * q_len + i`, columns `q.col + h * head_dim ..`; K/V rows at `b * kv_batch_stride + j`.
/// Models build it through `models::layers` (BLIP-2: `kv_heads = heads`, no mask, no bias).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Attention {
    pub q: View,
    pub k: View,
    pub v: View,
    pub out: Buf,
    pub batch: usize,
    pub heads: usize,
    /// K/V heads (`heads % kv_heads == 0`): query head `h` reads kv head `h / (heads / kv_heads)`
    /// (transformers' `repeat_kv`, i.e. `repeat_interleave`). K/V rows are `kv_heads * head_dim`
    /// wide. Equal to `heads` for plain multi-head attention.
    pub kv_heads: usize,
    pub head_dim: usize,
    pub q_len: usize,
    pub kv_len: KvLen,
    /// Rows between batch items in K and V (kv length, or the cache capacity).
    pub kv_batch_stride: usize,
    /// Query row i (absolute position `position + i`) sees keys `0..=position + i` only.
    pub causal: bool,
    pub scale: f32,
    /// Additive per-key mask `[batch, >= kv_len]` written by the host (HF padding masks: 0 or
    /// `finfo.min`), clamped to [`ATTN_MASK_FLOOR`] then added to every query's scores of batch b.
    /// An fp16 buffer holds 0 / finfo.min (as -inf) / -inf masks exactly after the clamp; make it
    /// [`DType::F32`] for arbitrary float masks.
    pub key_mask: Option<Buf>,
    /// `key_mask` holds one row per query row, `[batch * q_len, >= kv_len]` at row
    /// `b * q_len + i`, instead of one per batch item (IDEFICS' `image_attention_mask`: each
    /// text token sees the keys of its own image only).
    pub mask_per_query: bool,
    /// Additive per-head bias `[heads * q_len, >= kv_len]`: element (h, i, j) at row
    /// `h * q_len + i`, column j, shared by every batch item (T5 relative positions; written
    /// by the host for the current position).
    pub head_bias: Option<Buf>,
}

/// How RoPE frequencies are scaled (transformers 5.17 `ROPE_INIT_FUNCTIONS`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    Default,
    /// `inv_freq / factor`.
    Linear {
        factor: f64,
    },
    /// `_compute_llama3_parameters`.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// transformers 5.17 `inv_freq` for RoPE over `dim` rotated dims (even), bit-exact: the exponent
/// `f32(2i) / f32(dim)` in f32, `base ** e` in f64 rounded to f32, the reciprocal in f32
/// (docs/models/llama.md#rope). Scaling follows the fp32 torch expressions: a python scalar divided by
/// a tensor is `tensor.reciprocal() * scalar`, comparisons cast the scalar to f32.
pub fn rope_inv_freq(dim: usize, base: f64, scaling: RopeScaling) -> Vec<f32> {
    let inv: Vec<f32> = (0..dim / 2)
        .map(|i| {
            let e = (2 * i) as f32 / dim as f32;
            1.0f32 / base.powf(f64::from(e)) as f32
        })
        .collect();
    match scaling {
        RopeScaling::Default => inv,
        RopeScaling::Linear { factor } => inv.iter().map(|&f| f / factor as f32).collect(),
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings: l } => {
            let (low_wl, high_wl) = ((l / low_freq_factor) as f32, (l / high_freq_factor) as f32);
            let two_pi = (2.0 * std::f64::consts::PI) as f32;
            let (factor32, low32) = (factor as f32, low_freq_factor as f32);
            let span = (high_freq_factor - low_freq_factor) as f32;
            inv.iter()
                .map(|&f| {
                    let wavelen = (1.0 / f) * two_pi;
                    let selected = if wavelen > low_wl { f / factor32 } else { f };
                    let smooth = ((1.0 / wavelen) * l as f32 - low32) / span;
                    let smoothed = (1.0 - smooth) * selected / factor32 + smooth * selected;
                    // torch's `~(w < high) * ~(w > low)`, kept literally (NaN-faithful).
                    #[allow(clippy::neg_cmp_op_on_partial_ord)]
                    let medium = !(wavelen < high_wl) && !(wavelen > low_wl);
                    if medium {
                        smoothed
                    } else {
                        selected
                    }
                })
                .collect()
        }
    }
}

/// Which rows a [`Op::SelectRows`] copies from each sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowSelect {
    /// Rows `skip..` of every sequence (e.g. `skip = 1` drops CLS): `rows_per_batch - skip` rows out.
    Skip(usize),
    /// Row `i` of every sequence, one row out per sequence (CLIP's pooled CLS row, `i = 0`).
    Row(usize),
    /// One row per sequence, at the index the host set with `Executor::set_row_indices` (CLIP
    /// text pooling at the EOS position).
    Indexed,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// `out[b*T + 0] = cls + pos[0]`, `out[b*T + 1 + p] = conv(pixels[b], patch p) + bias + pos[1+p]`:
    /// a `patch x patch` stride-`patch` Conv2d on `[B, 3*H*W]` pixels, flattened row-major, with
    /// `T = P + 1` rows per image. Without a class token (SigLIP) `T = P` and
    /// `out[b*P + p] = conv(pixels[b], patch p) + bias + pos[p]`.
    PatchEmbed {
        pixels: Buf,
        weight: W,
        bias: W,
        class: Option<W>,
        positions: W,
        out: Buf,
        batch: usize,
        image_size: usize,
        patch: usize,
    },
    /// `out = act(x · Wᵀ + bias) + residual` over `rows` rows; `residual` may be `out` itself.
    Linear { x: View, weight: W, bias: Option<W>, act: Activation, residual: Option<Buf>, out: Buf, rows: usize },
    /// `out = LayerNorm(x + residual) * w (+ b)` over `rows` rows.
    LayerNorm { x: Buf, residual: Option<Buf>, weight: W, bias: Option<W>, eps: f32, out: Buf, rows: usize },
    /// HF Llama / T5 RMSNorm of `s = x + residual`: statistics in fp32, `s * rsqrt(mean(s²) + eps)`
    /// cast to the activation dtype, then times the weight (no mean, no bias).
    RmsNorm { x: Buf, residual: Option<Buf>, weight: W, eps: f32, out: Buf, rows: usize },
    /// `out[r, c] = act(gate[r, c]) * up[r, c]` for `c < cols(out)`: a gated MLP (SiLU: Llama,
    /// GELU / GELU-tanh: T5). Gate and up are column views, so they may be two Linear outputs or
    /// the two halves of one fused `[rows, 2I]` buffer (gate at column 0, up at column I).
    GatedAct { gate: View, up: View, act: Activation, out: Buf, rows: usize },
    /// Rotary embeddings in place on `heads` heads of `head_dim` starting at column `x.col`
    /// (HF `rotate_half`: dim j pairs with j + rot/2, rot = 2 * inv_freq.len() <= head_dim; dims
    /// past rot are untouched). Row i of sequence b has position `max(position - pad[b] + i, 0)`
    /// (`Executor::set_left_padding`; HF's `cumsum(mask) - 1` for left-padded batches).
    Rope {
        x: View,
        batch: usize,
        rows_per_batch: usize,
        heads: usize,
        head_dim: usize,
        inv_freq: std::sync::Arc<[f32]>,
    },
    /// Multi-head / grouped-query attention with optional masks (see [`Attention`]).
    Attention(Attention),
    /// Copies selected rows of each sequence of `x` into consecutive rows of `out`.
    SelectRows { x: Buf, out: Buf, batch: usize, rows_per_batch: usize, select: RowSelect },
    /// `cache[b * capacity + position + i] = src[b * rows_per_batch + i]` for K and V.
    KvAppend { k: View, v: View, cache_k: Buf, cache_v: Buf, batch: usize, rows_per_batch: usize, capacity: usize },
    /// `out[r] = table[tokens[r]]` for every token of the step.
    Embed { table: W, out: Buf },
    /// Rows whose token is `token` are overwritten, in order, by consecutive values of `src`
    /// taken as one flat array (transformers' `masked_scatter`).
    ScatterTokens { src: Buf, token: u32, out: Buf, batch: usize, rows_per_batch: usize },
    /// `x[b * rows_per_batch + i] += table[max(position - pad[b] + i, 0) + offset]` (OPT's learned
    /// positions; pads from `Executor::set_left_padding`, HF's `cumsum(mask) - 1`).
    AddPositions { table: W, offset: usize, x: Buf, batch: usize, rows_per_batch: usize },
    /// `out[b] = x[b * rows_per_batch + rows_per_batch - 1]`: the last row of each batch item.
    LastRows { x: Buf, out: Buf, batch: usize, rows_per_batch: usize },
    /// `out[b * n + i] = table[i]`: a parameter (e.g. query tokens) repeated for each batch item.
    Broadcast { table: W, out: Buf, batch: usize },
    /// `out[b * out_rows_per_batch + out_start + i] = x[b * x_rows_per_batch + x_start + i]` for
    /// `i < rows`, `b < batch` (equal widths, `x != out`): a block of each sequence's rows moved
    /// (InstructBLIP's Q-Former splits its query and instruction rows and joins them again).
    CopyRows {
        x: Buf,
        x_rows_per_batch: usize,
        x_start: usize,
        out: Buf,
        out_rows_per_batch: usize,
        out_start: usize,
        rows: usize,
        batch: usize,
    },
    /// `out[r] = x[r]` for `rows` rows of equal width, converted to `out`'s [`DType`] (e.g. an
    /// fp16 embedding into an fp32 residual stream, or an fp32 stream back to fp16). The copy is
    /// flat: `out` may be as wide as a whole number of rows of `x` or a divisor of its width, so
    /// the first `rows * cols(x)` values are the same rows read another way (a reshape, as
    /// `[rows, heads * d]` <-> `[rows * heads, d]` around per-head norms).
    Convert { x: Buf, out: Buf, rows: usize },
    /// Idefics3's pixel shuffle: each of `batch` images' `side x side` grid of `x` rows
    /// (row-major) becomes `(side / scale)²` rows of `scale² * cols(x)` columns in `out`: out row
    /// `(Y, X)` is the `scale x scale` block of rows `(Y*scale + a, X*scale + c)` laid side by
    /// side, `a` major. Every value moves, none changes: `out` holds `x` with its rows permuted.
    PixelShuffle { x: Buf, out: Buf, batch: usize, side: usize, scale: usize },
    /// IDEFICS' gated residual: `out[r, c] += tanh(alpha[c]) * x[r, c]` (`alpha` one value for
    /// every column, or one per column) for each row `r < rows`, or with a `mask` only for the
    /// rows whose additive attention mask row `mask[r]` holds a 0 (a key it may see:
    /// transformers' `cross_attention_gate`); other rows are left as they are (their
    /// cross-attention output is zeroed). fp16 devices round as PyTorch does in fp16:
    /// `half(out + half(half(tanh(alpha)) * x))`.
    GatedAdd { x: Buf, alpha: W, mask: Option<Buf>, out: Buf, rows: usize },
    /// `out[r] = x[r] / ||x[r]||₂` for `rows` rows (CLIPModel's unit embeddings: transformers'
    /// `_get_vector_norm` division, no epsilon, so a zero row is NaN as there). Sums of squares
    /// in f64 on the CPU, fp32 on the GPU; `out` may be [`DType::F32`] so the unit vectors keep
    /// more than fp16's 11 bits.
    L2Normalize { x: Buf, out: Buf, rows: usize },
}

impl Op {
    /// The buffers the op writes (its outputs; in place for residuals and positions).
    pub fn outputs(&self) -> Vec<Buf> {
        match *self {
            Op::PatchEmbed { out, .. }
            | Op::Linear { out, .. }
            | Op::LayerNorm { out, .. }
            | Op::RmsNorm { out, .. }
            | Op::GatedAct { out, .. }
            | Op::SelectRows { out, .. }
            | Op::Embed { out, .. }
            | Op::ScatterTokens { out, .. }
            | Op::LastRows { out, .. }
            | Op::Broadcast { out, .. }
            | Op::CopyRows { out, .. }
            | Op::Convert { out, .. }
            | Op::PixelShuffle { out, .. }
            | Op::L2Normalize { out, .. } => vec![out],
            Op::GatedAdd { out, .. } => vec![out],
            Op::Attention(ref a) => vec![a.out],
            Op::Rope { x, .. } => vec![x.buf],
            Op::AddPositions { x, .. } => vec![x],
            Op::KvAppend { cache_k, cache_v, .. } => vec![cache_k, cache_v],
        }
    }

    /// The buffers the op reads (views by their buffer; in-place outputs included).
    pub fn inputs(&self) -> Vec<Buf> {
        match *self {
            Op::PatchEmbed { pixels, .. } => vec![pixels],
            Op::Linear { x, residual, .. } => [Some(x.buf), residual].into_iter().flatten().collect(),
            Op::LayerNorm { x, residual, .. } | Op::RmsNorm { x, residual, .. } => {
                [Some(x), residual].into_iter().flatten().collect()
            }
            Op::GatedAct { gate, up, .. } => vec![gate.buf, up.buf],
            Op::Rope { x, .. } => vec![x.buf],
            Op::Attention(ref a) => {
                [Some(a.q.buf), Some(a.k.buf), Some(a.v.buf), a.key_mask, a.head_bias].into_iter().flatten().collect()
            }
            Op::SelectRows { x, .. }
            | Op::LastRows { x, .. }
            | Op::Convert { x, .. }
            | Op::CopyRows { x, .. }
            | Op::PixelShuffle { x, .. }
            | Op::L2Normalize { x, .. } => {
                vec![x]
            }
            Op::KvAppend { k, v, .. } => vec![k.buf, v.buf],
            Op::Embed { .. } | Op::Broadcast { .. } => vec![],
            Op::ScatterTokens { src, out, .. } => vec![src, out],
            Op::AddPositions { x, .. } => vec![x],
            Op::GatedAdd { x, mask, out, .. } => [Some(x), mask, Some(out)].into_iter().flatten().collect(),
        }
    }

    /// The weights the op reads.
    pub fn weights(&self) -> Vec<W> {
        match *self {
            Op::PatchEmbed { weight, bias, class, positions, .. } => {
                [Some(weight), Some(bias), class, Some(positions)].into_iter().flatten().collect()
            }
            Op::Linear { weight, bias, .. } => [Some(weight), bias].into_iter().flatten().collect(),
            Op::LayerNorm { weight, bias, .. } => [Some(weight), bias].into_iter().flatten().collect(),
            Op::RmsNorm { weight, .. } => vec![weight],
            Op::GatedAdd { alpha, .. } => vec![alpha],
            Op::Embed { table, .. } | Op::AddPositions { table, .. } | Op::Broadcast { table, .. } => vec![table],
            Op::GatedAct { .. }
            | Op::Rope { .. }
            | Op::Attention(_)
            | Op::SelectRows { .. }
            | Op::KvAppend { .. }
            | Op::ScatterTokens { .. }
            | Op::LastRows { .. }
            | Op::CopyRows { .. }
            | Op::Convert { .. }
            | Op::PixelShuffle { .. }
            | Op::L2Normalize { .. } => vec![],
        }
    }

    /// A short name for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Op::PatchEmbed { .. } => "patch_embed",
            Op::Linear { .. } => "linear",
            Op::LayerNorm { .. } => "layer_norm",
            Op::RmsNorm { .. } => "rms_norm",
            Op::GatedAct { .. } => "gated_act",
            Op::Rope { .. } => "rope",
            Op::Attention(_) => "attention",
            Op::SelectRows { .. } => "select_rows",
            Op::KvAppend { .. } => "kv_append",
            Op::Embed { .. } => "embed",
            Op::ScatterTokens { .. } => "scatter_tokens",
            Op::AddPositions { .. } => "add_positions",
            Op::LastRows { .. } => "last_rows",
            Op::CopyRows { .. } => "copy_rows",
            Op::Broadcast { .. } => "broadcast",
            Op::Convert { .. } => "convert",
            Op::PixelShuffle { .. } => "pixel_shuffle",
            Op::L2Normalize { .. } => "l2_normalize",
            Op::GatedAdd { .. } => "gated_add",
        }
    }
}

/// How a device that stores activations in fp16 (the CUDA executor, the CPU executor's fp16
/// emulation) holds a buffer. The CPU reference computes and stores everything in f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DType {
    /// fp16: every activation unless a model says otherwise.
    #[default]
    F16,
    /// fp32, where transformers keeps activations in fp32 and measurement (the fp16 emulation)
    /// shows fp16 is not enough, e.g. a residual stream that would overflow fp16. Which ops
    /// accept fp32 operands is `backend::check_dtypes` (shared by both executors).
    F32,
}

#[derive(Debug, Clone)]
pub struct BufferDesc {
    pub name: String,
    pub rows: usize,
    pub cols: usize,
    pub dtype: DType,
}

/// The ops of one phase.
#[derive(Debug, Clone, Default)]
pub struct Phase {
    pub name: &'static str,
    pub ops: Vec<Op>,
    /// The ops read everything that changes between runs (tokens, position) from executor
    /// state, so an executor may record them once and replay them (a CUDA graph).
    pub replayable: bool,
}

/// Buffers shared by every phase of a model instance, and the phases' ops being built.
#[derive(Debug, Clone, Default)]
pub struct Graph {
    pub buffers: Vec<BufferDesc>,
    pub ops: Vec<Op>,
}

impl Graph {
    pub fn new() -> Self {
        Self::default()
    }

    /// An fp16 activation buffer (see [`DType`]).
    pub fn buffer(&mut self, name: impl Into<String>, rows: usize, cols: usize) -> Buf {
        self.typed_buffer(name, rows, cols, DType::F16)
    }

    /// A buffer held in `dtype` on fp16 devices.
    pub fn typed_buffer(&mut self, name: impl Into<String>, rows: usize, cols: usize, dtype: DType) -> Buf {
        self.buffers.push(BufferDesc { name: name.into(), rows, cols, dtype });
        Buf(self.buffers.len() - 1)
    }

    pub fn desc(&self, b: Buf) -> &BufferDesc {
        &self.buffers[b.0]
    }

    pub fn push(&mut self, op: Op) {
        self.ops.push(op);
    }

    /// Ends the current phase: returns its ops, keeps the buffers for the next phase.
    pub fn take_phase(&mut self, name: &'static str) -> Phase {
        Phase { name, ops: std::mem::take(&mut self.ops), replayable: false }
    }

    /// `out = act(x · Wᵀ + b) + residual` over `rows` rows ([`Fused`]: the activation and
    /// residual applied to the product).
    pub fn linear(&mut self, x: impl Into<View>, weight: W, bias: Option<W>, then: Fused, out: Buf, rows: usize) {
        let Fused { act, residual } = then;
        self.push(Op::Linear { x: x.into(), weight, bias, act, residual, out, rows });
    }
}

/// What a Linear applies after its product and bias: an activation, then a residual add.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fused {
    pub act: Activation,
    pub residual: Option<Buf>,
}

impl Fused {
    /// The bare product (plus bias).
    pub const NONE: Fused = Fused { act: Activation::None, residual: None };

    pub fn act(act: Activation) -> Self {
        Self { act, residual: None }
    }

    /// `act(..) + residual`.
    pub fn add(act: Activation, residual: Option<Buf>) -> Self {
        Self { act, residual }
    }
}

/// A LayerNorm's parameters as `Loader::norm` reads them (`models::layers::NormLayer` emits it).
#[derive(Debug, Clone, Copy)]
pub struct Norm {
    pub weight: W,
    pub bias: W,
    pub eps: f32,
}

/// A Linear's parameters (PyTorch layout: weight `[out, in]`).
#[derive(Debug, Clone, Copy)]
pub struct Linear {
    pub weight: W,
    pub bias: Option<W>,
    pub in_dim: usize,
    pub out_dim: usize,
}

/// The weights a model's graph refers to, loaded once (fp16, zero-copy where possible).
#[derive(Debug, Default, Clone)]
pub struct WeightTable {
    pub names: Vec<String>,
    pub weights: Vec<Weight>,
}

impl WeightTable {
    pub fn add(&mut self, name: impl Into<String>, w: Weight) -> W {
        self.names.push(name.into());
        self.weights.push(w);
        W(self.weights.len() - 1)
    }

    pub fn get(&self, w: W) -> &Weight {
        &self.weights[w.0]
    }

    pub fn len(&self) -> usize {
        self.weights.len()
    }

    pub fn is_empty(&self) -> bool {
        self.weights.is_empty()
    }

    /// Parameters (elements) in the table.
    pub fn parameters(&self) -> usize {
        self.weights.iter().map(|w| w.numel()).sum()
    }
}

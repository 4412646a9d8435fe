//! Executors of the graph. The CPU executor is the reference every kernel is checked against;
//! the CUDA backend runs the same ops with glimpse's own kernels.

pub mod cpu;
pub mod cuda;
mod shape;

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::graph::{Attention, Buf, BufferDesc, DType, Graph, KvLen, Op, Phase, RowSelect, View, WeightTable};

pub use crate::graph::Activation;
pub use shape::{GemmDims, NormShape};

/// Runs the phases of a graph over buffers it allocated once.
pub trait Executor: Send {
    /// Token ids of the next run (one per row of the embedded sequence).
    fn set_tokens(&mut self, tokens: &[u32]);
    /// Tokens already in the KV cache; the next run's first row sits at this position.
    fn set_position(&mut self, position: usize);
    fn position(&self) -> usize;
    /// Left padding of each sequence (HF `generate` pads prompts on the left): RoPE gives row i
    /// of sequence b the position `max(position - pads[b] + i, 0)`, HF's `cumsum(mask) - 1`.
    /// Empty (the default state) means no padding.
    fn set_left_padding(&mut self, pads: &[usize]);
    /// The row each sequence contributes to a `SelectRows { select: Indexed }` op (e.g. the EOS
    /// position for CLIP text pooling).
    fn set_row_indices(&mut self, rows: &[usize]);
    /// Writes the first `data.len() / cols` rows of `buf`.
    fn write(&mut self, buf: Buf, data: &[f32]) -> Result<()>;
    /// Reads the first `rows` rows of `buf` as f32.
    fn read(&mut self, buf: Buf, rows: usize) -> Result<Vec<f32>>;
    fn run(&mut self, phase: &Phase) -> Result<()>;
    /// Waits until all submitted work is done (for timing); the CPU executor is synchronous.
    fn synchronize(&mut self) -> Result<()> {
        Ok(())
    }
    /// Runs `phase` and returns how long it took in ms: wall clock around a synchronous run by
    /// default; device events around the phase's kernels on a GPU.
    fn run_timed(&mut self, phase: &Phase) -> Result<f64> {
        self.synchronize()?;
        let start = std::time::Instant::now();
        self.run(phase)?;
        self.synchronize()?;
        Ok(start.elapsed().as_secs_f64() * 1e3)
    }
    /// The `k` most likely tokens of each of the first `rows` rows of `logits` (`[rows, vocab]`),
    /// best first, with their log-softmax values (natural log, over the raw fp32-widened
    /// logits): greedy decoding is `k = 1`, beam search takes `2 * num_beams`, sampling takes
    /// its top-k window (or the whole vocabulary). Equal logits rank by lower id, so `k = 1` is
    /// torch's argmax (first max). The default reads the rows and ranks them on the host;
    /// executors on a device override it so only ids and log-probs leave the device.
    fn top_k(&mut self, logits: Buf, rows: usize, k: usize) -> Result<Vec<Vec<Candidate>>> {
        let all = self.read(logits, rows)?;
        Ok(host_top_k(&all, rows, k))
    }
    /// Reorders whole sequences of the given buffers (KV caches, typically): afterwards
    /// sequence `b` (rows `b * rows_per_seq ..`) of each buffer holds what sequence `from[b]`
    /// held before. `from` may repeat and drop sequences (beam search keeps the best beams),
    /// and has one entry per sequence the buffers hold.
    fn reorder_sequences(&mut self, bufs: &[Buf], rows_per_seq: usize, from: &[usize]) -> Result<()>;
    /// A short name for messages and JSON output ("cpu", "cuda").
    fn device_name(&self) -> String;
}

/// One ranked token of a logit row: its id and log-probability.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub token: u32,
    pub logprob: f64,
}

/// [`Executor::top_k`] over rows already on the host: log-softmax of each row (in f64, as
/// [`cpu::ops::log_prob`]) and its `k` best ids, ties to the lower id.
pub fn host_top_k(all: &[f32], rows: usize, k: usize) -> Vec<Vec<Candidate>> {
    let vocab = all.len() / rows.max(1);
    all.chunks(vocab.max(1))
        .take(rows)
        .map(|row| {
            if k == 1 {
                // The common greedy case without a sort: first max, as torch.argmax.
                let t = cpu::ops::argmax(row);
                return vec![Candidate { token: t as u32, logprob: cpu::ops::log_prob(row, t) }];
            }
            // Ranked with total_cmp (NaN above every number, as torch.topk); ties to the lower id.
            let rank = |a: &usize, b: &usize| row[*b].total_cmp(&row[*a]).then(a.cmp(b));
            let mut ids: Vec<usize> = (0..row.len()).collect();
            let k = k.min(row.len());
            if k < ids.len() {
                ids.select_nth_unstable_by(k, rank);
                ids.truncate(k);
            }
            ids.sort_by(rank);
            // The log-sum-exp once per row, computed exactly as `log_prob` does.
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = row.iter().map(|&l| (l as f64 - max).exp()).sum::<f64>().ln() + max;
            ids.into_iter().map(|t| Candidate { token: t as u32, logprob: row[t] as f64 - lse }).collect()
        })
        .collect()
}

/// Checks a [`Executor::reorder_sequences`] request against the buffers' shapes.
pub fn validate_reorder(descs: &[BufferDesc], bufs: &[Buf], rows_per_seq: usize, from: &[usize]) -> Result<()> {
    for &b in bufs {
        let d = descs.get(b.0).ok_or_else(|| invalid(format!("reorder_sequences: buffer {} does not exist", b.0)))?;
        let seqs = d.rows.checked_div(rows_per_seq).unwrap_or(0);
        if rows_per_seq == 0 || d.rows % rows_per_seq != 0 || seqs != from.len() {
            return Err(invalid(format!(
                "reorder_sequences: buffer `{}` has {} rows, not {} sequences of {rows_per_seq} rows: pass one source index per sequence",
                d.name,
                d.rows,
                from.len()
            )));
        }
        if let Some(i) = from.iter().find(|&&i| i >= seqs) {
            return Err(invalid(format!(
                "reorder_sequences: source sequence {i} of buffer `{}` is outside its {seqs} sequences",
                d.name
            )));
        }
    }
    Ok(())
}

/// Where a model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    Cpu,
    Cuda,
    /// CUDA when a usable GPU and the CUDA executor are present, else the CPU.
    #[default]
    Auto,
}

impl std::str::FromStr for Device {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda),
            "auto" => Ok(Device::Auto),
            _ => Err(Error::InvalidInput(format!("unknown device `{s}` (cpu, cuda or auto)"))),
        }
    }
}

/// Where a model's graphs run: the CPU reference, or one GPU with the weights uploaded once.
#[derive(Clone)]
pub enum Backend {
    Cpu,
    Cuda(Arc<cuda::CudaWeights>),
}

impl Backend {
    /// Opens the backend for `device`: `Cuda` fails with the reason when no GPU can be used;
    /// `Auto` falls back to the CPU (callers report `name()`; [`auto_fallback_reason`] says
    /// why, e.g. a GPU is present but the weights do not fit in its memory).
    /// The CPU backend fails here, at load, when `GLIMPSE_CPU_ISA` names no usable path.
    pub fn new(device: Device, weights: &WeightTable) -> Result<Self> {
        match device {
            Device::Cpu => Self::cpu(),
            Device::Cuda => Self::cuda(weights),
            Device::Auto => Self::cuda(weights).or_else(|e| {
                *AUTO_FALLBACK.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                Self::cpu()
            }),
        }
    }

    fn cpu() -> Result<Self> {
        cpu::gemm::selected().map_err(Error::InvalidInput)?;
        Ok(Backend::Cpu)
    }

    fn cuda(weights: &WeightTable) -> Result<Self> {
        if let Some(i) = weights.weights.iter().position(|w| w.quantized().is_some()) {
            let format = weights.weights[i].quantized().map_or("", |q| q.format.name());
            return Err(Error::Unsupported(format!(
                "the CUDA executor does not run quantized weights yet (`{}` is {format}): run on the CPU (--device cpu) or load without --quantize",
                weights.names[i]
            )));
        }
        let dev = Arc::new(cuda::CudaDevice::new(0)?);
        Ok(Backend::Cuda(Arc::new(cuda::CudaWeights::upload(dev, weights)?)))
    }

    /// An executor for `graph`, with every buffer allocated.
    pub fn executor(&self, weights: &Arc<WeightTable>, graph: &Graph) -> Result<Box<dyn Executor>> {
        Ok(match self {
            Backend::Cpu => {
                cpu::gemm::selected().map_err(Error::InvalidInput)?;
                Box::new(cpu::CpuExecutor::new(Arc::clone(weights), &graph.buffers))
            }
            Backend::Cuda(w) => Box::new(cuda::CudaExecutor::new(Arc::clone(w), Arc::clone(weights), &graph.buffers)?),
        })
    }

    pub fn is_cuda(&self) -> bool {
        matches!(self, Backend::Cuda(_))
    }

    /// "cpu" or "cuda:<device name>".
    pub fn name(&self) -> String {
        match self {
            Backend::Cpu => "cpu".into(),
            Backend::Cuda(w) => format!("cuda:{}", w.dev.name()),
        }
    }
}

/// Refuses, before any weight is quantized, a quantized load onto the CUDA executor (its
/// kernels read fp16 weights only, for now); `Auto` runs a quantized model on the CPU.
pub fn check_quantized_device(device: Device, format: crate::quant::Quantize) -> Result<()> {
    if device == Device::Cuda {
        return Err(Error::Unsupported(format!(
            "--quantize {format} runs on the CPU executor only for now (the CUDA kernels read fp16 weights): use --device cpu (or auto), or load without --quantize"
        )));
    }
    Ok(())
}

/// Why the latest `Device::Auto` backend in this process fell back to the CPU.
static AUTO_FALLBACK: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// Why the most recent `--device auto` load in this process ran on the CPU (None if none did).
pub fn auto_fallback_reason() -> Option<String> {
    AUTO_FALLBACK.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Convenience for benchmarks: a backend for `device` and an executor for `graph` on it.
pub fn new_executor(device: Device, weights: Arc<WeightTable>, graph: &Graph) -> Result<Box<dyn Executor>> {
    Backend::new(device, &weights)?.executor(&weights, graph)
}

/// Why CUDA cannot be used here, or None when it can (without uploading anything).
pub fn cuda_unavailable_reason() -> Option<Error> {
    cuda::probe().err().map(Error::from)
}

/// The run state ops are checked against before a run.
#[derive(Debug, Clone, Copy)]
pub struct RunState<'a> {
    pub tokens: &'a [u32],
    pub position: usize,
    pub pads: &'a [usize],
    pub row_indices: &'a [usize],
}

fn invalid(msg: String) -> Error {
    Error::InvalidInput(msg)
}

/// The run-time checks both executors make before running an op (the CUDA executor for the
/// whole phase before it launches or replays anything, since a recorded graph cannot check):
/// token ids inside the vocabulary, positions inside the table, KV capacity, mask and bias
/// shapes, row indices, view bounds of the new ops.
pub fn validate_op(op: &Op, st: &RunState<'_>, weights: &WeightTable, descs: &[BufferDesc]) -> Result<()> {
    check_dtypes(op, descs)?;
    let cols = |b: Buf| descs[b.0].cols;
    let rows_of = |b: Buf| descs[b.0].rows;
    // A buffer as messages name it: `name` [rows, cols].
    let shown = |b: Buf| format!("`{}` [{}, {}]", descs[b.0].name, rows_of(b), cols(b));
    let view_fits = |what: &str, v: View, rows: usize, width: usize| -> Result<()> {
        let d = &descs[v.buf.0];
        if v.col + width > d.cols || rows > d.rows {
            return Err(invalid(format!(
                "{what}: columns {}..{} of {rows} rows do not fit buffer {}",
                v.col,
                v.col + width,
                shown(v.buf)
            )));
        }
        Ok(())
    };
    match op {
        Op::Embed { table, .. } => {
            let vocab = weights.get(*table).shape[0];
            if let Some(t) = st.tokens.iter().find(|&&t| t as usize >= vocab) {
                return Err(invalid(format!("token id {t} is outside the vocabulary ({vocab})")));
            }
        }
        Op::AddPositions { table, offset, rows_per_batch, .. } => {
            let max_pos = weights.get(*table).shape[0];
            if st.position + rows_per_batch + offset > max_pos {
                return Err(invalid(format!(
                    "sequence of {} tokens exceeds the model's {} positions",
                    st.position + rows_per_batch,
                    max_pos.saturating_sub(*offset)
                )));
            }
        }
        Op::KvAppend { rows_per_batch, capacity, .. } if st.position + rows_per_batch > *capacity => {
            return Err(invalid(format!(
                "KV cache full: {} + {rows_per_batch} tokens exceed its {capacity} positions",
                st.position
            )));
        }
        Op::GatedAct { gate, up, out, rows, .. } => {
            let width = cols(*out);
            view_fits("gated_act gate", *gate, *rows, width)?;
            view_fits("gated_act up", *up, *rows, width)?;
        }
        Op::Rope { x, batch, rows_per_batch, heads, head_dim, inv_freq } => {
            if inv_freq.is_empty() || 2 * inv_freq.len() > *head_dim {
                return Err(invalid(format!(
                    "rope: {} frequencies rotate {} dims, outside 2..={head_dim} (the head dim)",
                    inv_freq.len(),
                    2 * inv_freq.len()
                )));
            }
            view_fits("rope", *x, batch * rows_per_batch, heads * head_dim)?;
            if !st.pads.is_empty() && st.pads.len() < *batch {
                return Err(invalid(format!(
                    "left padding given for {} sequences, the graph runs {batch}: call set_left_padding with one value per sequence",
                    st.pads.len()
                )));
            }
        }
        Op::Attention(a) => validate_attention(a, st, descs)?,
        Op::CopyRows { x, x_rows_per_batch, x_start, out, out_rows_per_batch, out_start, rows, batch }
            if x == out
                || cols(*x) != cols(*out)
                || x_start + rows > *x_rows_per_batch
                || out_start + rows > *out_rows_per_batch
                || rows_of(*x) < batch * x_rows_per_batch
                || rows_of(*out) < batch * out_rows_per_batch =>
        {
            return Err(invalid(format!(
                "copy_rows: rows {x_start}..{} of {x_rows_per_batch} per sequence of {} -> rows {out_start}.. of {out_rows_per_batch} of {} for {batch} sequences do not fit (or the buffers are one)",
                x_start + rows,
                shown(*x),
                shown(*out)
            )));
        }
        Op::SelectRows { x, out, batch, rows_per_batch, select } => {
            let out_rows = match *select {
                RowSelect::Skip(skip) => {
                    if skip >= *rows_per_batch {
                        return Err(invalid(format!(
                            "select_rows: skipping {skip} of {rows_per_batch} rows leaves none"
                        )));
                    }
                    batch * (rows_per_batch - skip)
                }
                RowSelect::Row(i) => {
                    if i >= *rows_per_batch {
                        return Err(invalid(format!(
                            "select_rows: row {i} is outside the sequence's {rows_per_batch} rows"
                        )));
                    }
                    *batch
                }
                RowSelect::Indexed => {
                    if st.row_indices.len() < *batch {
                        return Err(invalid(format!(
                            "select_rows: {} row indices set for {batch} sequences: call set_row_indices with one per sequence",
                            st.row_indices.len()
                        )));
                    }
                    if let Some(i) = st.row_indices[..*batch].iter().find(|&&i| i >= *rows_per_batch) {
                        return Err(invalid(format!(
                            "select_rows: row index {i} is outside the sequence's {rows_per_batch} rows"
                        )));
                    }
                    *batch
                }
            };
            if cols(*x) != cols(*out) || rows_of(*x) < batch * rows_per_batch || rows_of(*out) < out_rows {
                return Err(invalid(format!(
                    "select_rows: {} -> {} cannot hold {batch} x {rows_per_batch} -> {out_rows} rows",
                    shown(*x),
                    shown(*out)
                )));
            }
        }
        Op::PixelShuffle { x, out, batch, side, scale } => {
            let grid = if *scale > 0 && side % scale == 0 { side / scale } else { 0 };
            if grid == 0
                || cols(*out) != cols(*x) * scale * scale
                || rows_of(*x) < batch * side * side
                || rows_of(*out) < batch * grid * grid
            {
                return Err(invalid(format!(
                    "pixel_shuffle: {batch} grids of {side}x{side} rows of {} by scale {scale} cannot map to {} (the side must be a positive multiple of the scale, and the output {} columns wide)",
                    shown(*x),
                    shown(*out),
                    cols(*x) * scale * scale
                )));
            }
        }
        Op::L2Normalize { x, out, rows } if cols(*x) != cols(*out) || rows_of(*x) < *rows || rows_of(*out) < *rows => {
            return Err(invalid(format!("{}: {} -> {} cannot map {rows} rows", op.kind(), shown(*x), shown(*out))));
        }
        Op::Convert { x, out, rows } => {
            let (n, (wx, wo)) = (rows * cols(*x), (cols(*x), cols(*out)));
            let reshapes = wx == wo || (wo > 0 && (wx % wo == 0 || wo % wx == 0));
            if !reshapes || rows_of(*x) < *rows || rows_of(*out) * wo < n {
                return Err(invalid(format!(
                    "convert: {} -> {} cannot map {rows} rows (the widths must be equal or one divide the other, and both buffers hold {n} values)",
                    shown(*x),
                    shown(*out)
                )));
            }
        }
        Op::GatedAdd { x, alpha, mask, out, rows } => {
            let width = cols(*out);
            let alphas = weights.get(*alpha).numel();
            let short_mask = mask.is_some_and(|m| rows_of(m) < *rows);
            if cols(*x) != width
                || rows_of(*x) < *rows
                || rows_of(*out) < *rows
                || short_mask
                || (alphas != 1 && alphas != width)
            {
                return Err(invalid(format!(
                    "gated_add: {} += tanh(alpha of {alphas}) * {} over {rows} rows{} does not fit (equal widths, alpha 1 or {width} values, mask rows >= {rows})",
                    shown(*out),
                    shown(*x),
                    mask.map(|m| format!(" masked by {}", shown(m))).unwrap_or_default()
                )));
            }
        }
        _ => {}
    }
    Ok(())
}

/// Which operands may be fp32 buffers ([`DType::F32`]), the same rule on both executors: a
/// Linear may write an fp32 output with an fp32 residual (its input stays fp16: the tensor-core
/// operand); a norm may read an fp32 input and residual (its output is fp16); `Convert` goes
/// either way; an attention key mask may be fp32. Every other operand is fp16. Streams enter and
/// leave fp32 through these ops; `L2Normalize` may write fp32 unit vectors.
pub fn check_dtypes(op: &Op, descs: &[BufferDesc]) -> Result<()> {
    let dt = |b: Buf| descs[b.0].dtype;
    let (fp32_ok, must_match): (Vec<Buf>, Vec<Buf>) = match *op {
        Op::Convert { x, out, .. } => (vec![x, out], vec![]),
        // Unit vectors the host reads back may stay fp32.
        Op::L2Normalize { out, .. } => (vec![out], vec![]),
        Op::Linear { residual, out, .. } => {
            let stream: Vec<Buf> = [Some(out), residual].into_iter().flatten().collect();
            (stream.clone(), stream)
        }
        Op::LayerNorm { x, residual, .. } | Op::RmsNorm { x, residual, .. } => {
            let stream: Vec<Buf> = [Some(x), residual].into_iter().flatten().collect();
            (stream.clone(), stream)
        }
        // Arbitrary float masks stay exact in an fp32 buffer (fp16 holds 0 / finfo.min / -inf
        // exactly after the clamp, other values rounded).
        Op::Attention(ref a) => (a.key_mask.into_iter().collect(), vec![]),
        _ => (vec![], vec![]),
    };
    if let Some(&b) = must_match.iter().find(|&&b| dt(b) != dt(must_match[0])) {
        return Err(invalid(format!(
            "{}: `{}` is {:?} but `{}` is {:?}: an op's residual stream operands share one dtype",
            op.kind(),
            descs[b.0].name,
            dt(b),
            descs[must_match[0].0].name,
            dt(must_match[0])
        )));
    }
    let operands = op.inputs().into_iter().chain(op.outputs());
    if let Some(b) = operands.filter(|b| !fp32_ok.contains(b)).find(|&b| dt(b) == DType::F32) {
        return Err(invalid(format!(
            "{}: buffer `{}` is fp32 but this operand must be fp16 (fp32 buffers are a Linear's output and residual, a norm's input and residual, an attention key mask, Convert's operands and L2Normalize's output): convert it first",
            op.kind(),
            descs[b.0].name
        )));
    }
    Ok(())
}

fn validate_attention(a: &Attention, st: &RunState<'_>, descs: &[BufferDesc]) -> Result<()> {
    let kv_len = match a.kv_len {
        KvLen::Fixed(n) => n,
        KvLen::Cache => st.position + a.q_len,
    };
    if kv_len > a.kv_batch_stride && matches!(a.kv_len, KvLen::Cache) {
        return Err(invalid(format!(
            "KV cache full: attention over {kv_len} keys exceeds its {} positions",
            a.kv_batch_stride
        )));
    }
    if a.kv_heads == 0 || a.heads % a.kv_heads != 0 {
        return Err(invalid(format!(
            "attention: {} query heads cannot share {} kv heads (needs heads % kv_heads == 0)",
            a.heads, a.kv_heads
        )));
    }
    // Over a KV cache, masks span the whole capacity (the decode kernel's launch depends only on it).
    let keys = if matches!(a.kv_len, KvLen::Cache) { a.kv_batch_stride } else { kv_len };
    let check = |what: &str, b: Buf, rows: usize| -> Result<()> {
        let d = &descs[b.0];
        if d.rows < rows || d.cols < keys {
            return Err(invalid(format!(
                "attention {what} `{}` is [{}, {}] but this run needs [{rows}, {keys}] (rows x keys)",
                d.name, d.rows, d.cols
            )));
        }
        Ok(())
    };
    if let Some(m) = a.key_mask {
        check("key mask", m, if a.mask_per_query { a.batch * a.q_len } else { a.batch })?;
    }
    if let Some(b) = a.head_bias {
        check("head bias", b, a.heads * a.q_len)?;
    }
    Ok(())
}

/// RoPE position of row `i` of sequence `b`: `max(position - pads[b] + i, 0)`.
pub fn rope_position(position: usize, pads: &[usize], b: usize, i: usize) -> usize {
    (position + i).saturating_sub(pads.get(b).copied().unwrap_or(0))
}

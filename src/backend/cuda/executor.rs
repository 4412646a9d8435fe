//! The CUDA executor: runs graph phases with glimpse's kernels over fp16 device buffers.
//!
//! - Weights are uploaded once per model ([`CudaWeights`], pinned staging with overlapped
//!   copies) and shared by every executor of that model.
//! - Every graph buffer is carved from one arena when the executor is made; scratch space
//!   (im2col, patch GEMM output, split-KV workspace) is allocated on first use.
//! - Token ids, start positions and KV lengths live in device memory and are refreshed before
//!   each run, so a replayable phase (the decode step) is recorded once as a CUDA graph on its
//!   second run and replayed from then on. `GLIMPSE_CUDA_GRAPH=0` turns recording off.
//! - Greedy argmax and the chosen token's log-prob are computed on the device: only token ids
//!   and one float per sequence cross the bus.
//! - `GLIMPSE_CUDA_SYNC=1` synchronises after every op so a kernel fault names its op.
//! - Each executor launches on a stream of its own (`CudaDevice::with_new_stream`), so
//!   executors driven from different threads neither interleave nor get captured into each
//!   other's graphs; recording holds the device's capture lock (see `memory::CaptureLock`).
//! - `GLIMPSE_CUDA_GRAPH=0` turns recording off; `fail-begin` / `fail-end` (tests) make it fail
//!   at that point, to exercise the fallback to direct launches.
//!
//! Activations are fp16 throughout (the Q-Former too: transformers keeps it in fp32, glimpse
//! does not; the GPU parity tests state the tolerance this costs).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::sys;
use cudarc::driver::CudaGraph;
use half::f16;

use super::{
    decode_workspace_len, AttnDims, AttnMask, AttnViews, CudaDevice, DevSlice, Epilogue, GemmDims, GpuError, HeadsView,
    ImageDims, KvRows, LinearArgs, NormInput, NormShape, Residual, RopeDims, RowsView, SeqDims, SeqIndices, SumOut,
};
use crate::backend::{validate_op, Candidate, Executor, RunState};
use crate::error::{Error, Result};
use crate::graph::{Attention, Buf, BufferDesc, DType, KvLen, Op, Phase, RowSelect, View, WeightTable};

/// Recordings that failed and fell back to direct launches, process-wide (for tests and logs).
static CAPTURE_FALLBACKS: AtomicUsize = AtomicUsize::new(0);

/// How many CUDA graph recordings have failed (and run launch by launch instead) in this process.
pub fn capture_fallbacks() -> usize {
    CAPTURE_FALLBACKS.load(Ordering::Relaxed)
}

/// Where a test makes recording fail (`GLIMPSE_CUDA_GRAPH=fail-begin` / `fail-end`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GraphFault {
    Begin,
    End,
}

/// Bytes of each pinned staging buffer used while uploading weights.
const STAGING_BYTES: usize = 32 << 20;

/// A model's weights on one GPU, uploaded once.
pub struct CudaWeights {
    pub dev: Arc<CudaDevice>,
    weights: Vec<DevSlice<f16>>,
    /// Seconds spent uploading.
    pub upload_seconds: f64,
    pub bytes: usize,
}

impl CudaWeights {
    /// Uploads every tensor of `table` (index = `W`) through two pinned staging buffers so the
    /// host-side copy out of the memory map overlaps the previous chunk's DMA.
    pub fn upload(dev: Arc<CudaDevice>, table: &WeightTable) -> Result<Self> {
        let start = Instant::now();
        let total: usize = table.weights.iter().map(|w| w.numel()).sum();
        let arena = dev.arena(total * 2 + table.len() * super::ARENA_ALIGN)?;
        let mut stager = Stager::new(&dev)?;
        let mut weights = Vec::with_capacity(table.len());
        for w in &table.weights {
            let dst = arena.alloc::<f16>(w.numel())?;
            stager.copy(&dev, w.as_slice(), &dst)?;
            weights.push(dst);
        }
        stager.finish(&dev)?;
        Ok(Self { dev, weights, upload_seconds: start.elapsed().as_secs_f64(), bytes: total * 2 })
    }
}

/// Two page-locked host buffers; chunk i is staged in buffer i % 2 once that buffer's previous
/// DMA has completed (tracked with an event), then copied to the device asynchronously.
struct Stager {
    bufs: [PinnedBuf; 2],
    events: [Option<cudarc::driver::CudaEvent>; 2],
    next: usize,
}

/// Page-locked host memory from cuMemHostAlloc, freed on drop.
struct PinnedBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the pointer is owned (freed once in Drop) and only used by the thread holding the Stager.
unsafe impl Send for PinnedBuf {}

impl PinnedBuf {
    fn new(dev: &CudaDevice, len: usize) -> Result<Self> {
        dev.context().bind_to_thread().map_err(GpuError::from)?;
        // SAFETY: a plain page-locked allocation of `len` bytes; the context is current.
        let ptr = unsafe { cudarc::driver::result::malloc_host(len, 0) }.map_err(GpuError::from)? as *mut u8;
        Ok(Self { ptr, len })
    }
}

impl Drop for PinnedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from cuMemHostAlloc and is freed exactly once; Stager::finish (or
        // the synchronize in Stager's Drop) guarantees no DMA still reads it.
        unsafe {
            let _ = cudarc::driver::result::free_host(self.ptr as *mut std::ffi::c_void);
        }
    }
}

impl Stager {
    fn new(dev: &CudaDevice) -> Result<Self> {
        Ok(Self {
            bufs: [PinnedBuf::new(dev, STAGING_BYTES)?, PinnedBuf::new(dev, STAGING_BYTES)?],
            events: [None, None],
            next: 0,
        })
    }

    fn copy(&mut self, dev: &CudaDevice, src: &[f16], dst: &DevSlice<f16>) -> Result<()> {
        let bytes: &[u8] = bytemuck::cast_slice(src);
        let per_chunk = STAGING_BYTES;
        for (i, chunk) in bytes.chunks(per_chunk).enumerate() {
            let slot = self.next % 2;
            self.next += 1;
            if let Some(ev) = self.events[slot].take() {
                ev.synchronize().map_err(GpuError::from)?;
            }
            let pinned = &mut self.bufs[slot];
            assert!(chunk.len() <= pinned.len, "chunks are at most STAGING_BYTES");
            // SAFETY: the slot's previous DMA has completed (event synchronised above), so the
            // host may overwrite it; chunk.len() <= STAGING_BYTES = pinned.len.
            let staged = unsafe {
                std::ptr::copy_nonoverlapping(chunk.as_ptr(), pinned.ptr, chunk.len());
                std::slice::from_raw_parts(pinned.ptr, chunk.len())
            };
            let dst_ptr = dst.ptr() + (i * per_chunk) as u64;
            // SAFETY: the destination range [dst_ptr, dst_ptr + chunk.len()) lies inside `dst`
            // (same total byte length as `src`); the staged bytes stay untouched until the event
            // recorded below has completed.
            unsafe { cudarc::driver::result::memcpy_htod_async(dst_ptr, staged, dev.stream().cu_stream()) }
                .map_err(GpuError::from)?;
            self.events[slot] = Some(dev.stream().record_event(None).map_err(GpuError::from)?);
        }
        Ok(())
    }

    fn finish(&mut self, dev: &CudaDevice) -> Result<()> {
        dev.synchronize()?;
        self.events = [None, None];
        Ok(())
    }
}

impl Drop for Stager {
    fn drop(&mut self) {
        for ev in self.events.iter().flatten() {
            let _ = ev.synchronize();
        }
    }
}

/// Scratch allocated on first use (never while a CUDA graph is being recorded: the phase runs
/// once directly before it is recorded).
#[derive(Default)]
struct Scratch {
    im2col: Option<DevSlice<f16>>,
    patches: Option<DevSlice<f16>>,
    decode_ws: Option<DevSlice<f32>>,
    /// A column-view Linear input copied to contiguous rows.
    linear_in: Option<DevSlice<f16>>,
    /// An fp16 key-mask buffer widened to the fp32 mask the attention kernels read.
    mask_f32: Option<DevSlice<f32>>,
}

fn ensure<T: super::DeviceScalar>(dev: &CudaDevice, slot: &mut Option<DevSlice<T>>, len: usize) -> Result<DevSlice<T>> {
    if slot.as_ref().is_none_or(|s| s.len() < len) {
        *slot = Some(dev.alloc::<T>(len)?);
    }
    Ok(slot.as_ref().and_then(|s| s.slice(0, len)).expect("allocated above"))
}

pub struct CudaExecutor {
    /// This executor's handle of the GPU: its own stream, so executors on other threads never
    /// enqueue into (or get captured into) this one's work.
    dev: Arc<CudaDevice>,
    weights: Arc<CudaWeights>,
    host: Arc<WeightTable>,
    descs: Vec<BufferDesc>,
    bufs: Vec<DevSlice<f16>>,
    /// Token ids of the current run (capacity: the largest buffer's rows).
    ids: DevSlice<i32>,
    /// Per sequence: start position of the run, and KV length after it (position + 1 for decode).
    pos: DevSlice<i32>,
    kv_len: DevSlice<i32>,
    /// Per sequence: RoPE / learned position of the run's first row, `position - left_pad[b]`
    /// (signed).
    rope_start: DevSlice<i32>,
    /// RoPE frequency tables uploaded once, keyed by the address of the op's `Arc<[f32]>` (the
    /// Arc is kept so the address cannot be reused by another table).
    freqs: HashMap<usize, (Arc<[f32]>, DevSlice<f32>)>,
    argmax_idx: DevSlice<i32>,
    argmax_logprob: DevSlice<f32>,
    /// Beam search's candidates (`top_k` with 1 < k <= TOPK_MAX): max_rows * TOPK_MAX each.
    topk_idx: DevSlice<i32>,
    topk_logprob: DevSlice<f32>,
    /// `reorder_sequences`' sequence indices (3 * max_rows) and its scratch (grown on demand to
    /// the moved sequences of the largest buffer; kept between steps).
    reorder_idx: DevSlice<i32>,
    reorder_scratch: Option<DevSlice<f16>>,
    /// `GLIMPSE_BEAM_OPS=host`: the previous beam-search paths (top-k over logits read back to the
    /// host; reorder through a whole-buffer temporary and a sync), for comparison and bisection.
    beam_ops_on_host: bool,
    scratch: Scratch,
    tokens: Vec<u32>,
    position: usize,
    pads: Vec<usize>,
    row_indices: Vec<usize>,
    /// Device copies of `tokens` / `position` are stale.
    dirty: bool,
    /// Per replayable phase: how often it ran, and its recorded graph.
    runs: HashMap<&'static str, usize>,
    graphs: HashMap<&'static str, CudaGraph>,
    use_graphs: bool,
    /// Test hook (`GLIMPSE_CUDA_GRAPH=fail-begin|fail-end`): recording fails at that point.
    graph_fault: Option<GraphFault>,
    /// `GLIMPSE_CUDA_SYNC=1`: synchronise after every op (bring-up and debugging; no graphs).
    sync_each_op: bool,
}

// SAFETY: CudaGraph is not Sync and holds raw driver handles; an executor is used by one thread
// at a time (`&mut self` everywhere) and may move between threads, which the driver allows for
// graph execs as long as calls are not concurrent.
unsafe impl Send for CudaExecutor {}

/// The most candidates per row `top_k` ranks on the device (beam search asks for
/// `max(2, 1 + n_eos) * num_beams + n_eos`); more fall back to the host.
const TOPK_MAX: usize = 64;

impl CudaExecutor {
    /// [`Executor::reorder_sequences`] by the gather kernel (kernels/reorder.cu).
    fn gather_sequences(&mut self, bufs: &[Buf], rows_per_seq: usize, from: &[usize]) -> Result<()> {
        let moved: Vec<usize> = (0..from.len()).filter(|&t| from[t] != t).collect();
        if moved.is_empty() {
            return Ok(());
        }
        let count = moved.len();
        let sources: Vec<usize> = moved.iter().map(|&t| from[t]).collect();
        let slots: Vec<usize> = (0..count).collect();
        let dev = self.dev.clone();
        let idx = |i: usize| self.reorder_idx.slice(i * count, count).expect("3 * max_rows indices");
        let (src_seq, slot_seq, dst_seq) = (idx(0), idx(1), idx(2));
        let as_i32 = |v: &[usize]| v.iter().map(|&x| x as i32).collect::<Vec<i32>>();
        dev.copy_to_device(&as_i32(&sources), &src_seq)?;
        dev.copy_to_device(&as_i32(&slots), &slot_seq)?;
        dev.copy_to_device(&as_i32(&moved), &dst_seq)?;
        for &b in bufs {
            // fp16 slots: an fp32 buffer has two per element.
            let len = rows_per_seq * self.cols(b) * self.slots(b);
            if self.reorder_scratch.as_ref().is_none_or(|s| s.len() < count * len) {
                // Earlier gathers may still read the smaller one: let them finish, then free it.
                dev.synchronize()?;
                self.reorder_scratch = None;
                self.reorder_scratch = Some(dev.alloc::<f16>(count * len)?);
            }
            let scratch = self.reorder_scratch.as_ref().expect("allocated above");
            let buf = &self.bufs[b.0];
            let (sources, slots, moved) = (
                SeqIndices { dev: &src_seq, host: &sources },
                SeqIndices { dev: &slot_seq, host: &slots },
                SeqIndices { dev: &dst_seq, host: &moved },
            );
            dev.gather_sequences(buf, scratch, len, sources, slots)?;
            dev.gather_sequences(scratch, buf, len, slots, moved)?;
        }
        Ok(())
    }

    /// Allocates every graph buffer (one arena) plus the small device-resident run state.
    pub fn new(weights: Arc<CudaWeights>, host: Arc<WeightTable>, buffers: &[BufferDesc]) -> Result<Self> {
        let dev = Arc::new(weights.dev.with_new_stream()?);
        // fp32 buffers take two fp16 slots per element (`f32_buf` views them as f32).
        let slots = |d: &BufferDesc| (d.rows * d.cols).max(1) * if d.dtype == DType::F32 { 2 } else { 1 };
        let elems: usize = buffers.iter().map(slots).sum();
        let arena = dev.arena(elems * 2 + buffers.len() * super::ARENA_ALIGN)?;
        let bufs = buffers.iter().map(|d| arena.alloc::<f16>(slots(d))).collect::<std::result::Result<Vec<_>, _>>()?;
        let max_rows = buffers.iter().map(|d| d.rows).max().unwrap_or(1).max(1);
        let sync_each_op = std::env::var("GLIMPSE_CUDA_SYNC").is_ok_and(|v| v == "1");
        let graph_setting = std::env::var("GLIMPSE_CUDA_GRAPH").unwrap_or_default();
        let graph_fault = match graph_setting.as_str() {
            "fail-begin" => Some(GraphFault::Begin),
            "fail-end" => Some(GraphFault::End),
            _ => None,
        };
        Ok(Self {
            ids: dev.alloc::<i32>(max_rows)?,
            pos: dev.alloc::<i32>(max_rows)?,
            kv_len: dev.alloc::<i32>(max_rows)?,
            rope_start: dev.alloc::<i32>(max_rows)?,
            freqs: HashMap::new(),
            argmax_idx: dev.alloc::<i32>(max_rows)?,
            argmax_logprob: dev.alloc::<f32>(max_rows)?,
            topk_idx: dev.alloc::<i32>(max_rows * TOPK_MAX)?,
            topk_logprob: dev.alloc::<f32>(max_rows * TOPK_MAX)?,
            reorder_idx: dev.alloc::<i32>(3 * max_rows)?,
            reorder_scratch: None,
            beam_ops_on_host: std::env::var("GLIMPSE_BEAM_OPS").is_ok_and(|v| v == "host"),
            dev,
            weights,
            host,
            descs: buffers.to_vec(),
            bufs,
            scratch: Scratch::default(),
            tokens: Vec::new(),
            position: 0,
            pads: Vec::new(),
            row_indices: Vec::new(),
            dirty: true,
            runs: HashMap::new(),
            graphs: HashMap::new(),
            use_graphs: graph_setting != "0" && !sync_each_op,
            graph_fault,
            sync_each_op,
        })
    }

    fn dev(&self) -> &CudaDevice {
        &self.dev
    }

    fn w(&self, w: crate::graph::W) -> &DevSlice<f16> {
        &self.weights.weights[w.0]
    }

    fn cols(&self, b: Buf) -> usize {
        self.descs[b.0].cols
    }

    fn is_f32(&self, b: Buf) -> bool {
        self.descs[b.0].dtype == DType::F32
    }

    /// An fp32 buffer's elements (`backend::check_dtypes` decides where the graph has them).
    fn f32_buf(&self, b: Buf) -> DevSlice<f32> {
        self.bufs[b.0].reinterpret::<f32>().expect("fp32 buffers hold an even number of fp16 slots")
    }

    /// fp16 slots per element of buffer `b` (2 for an fp32 buffer): what byte-level copies scale by.
    fn slots(&self, b: Buf) -> usize {
        if self.is_f32(b) {
            2
        } else {
            1
        }
    }

    fn unsupported(&self, what: String) -> Error {
        Error::Gpu(format!("CUDA executor: {what}"))
    }

    /// Copies tokens and positions to the device (never during graph recording). Every row of
    /// the position, KV-length and RoPE-start arrays is written, not just the running phase's
    /// batch: the state is written once per change, and a later phase may have a larger batch
    /// than the one that consumed the change (an image tower over fewer images than the
    /// decoder's sequences, or one op at a time), whose rows would otherwise keep stale values.
    fn sync_state(&mut self) -> Result<()> {
        if !self.dirty {
            return Ok(());
        }
        let dev = self.dev.clone();
        if !self.tokens.is_empty() {
            let ids: Vec<i32> = self.tokens.iter().map(|&t| t as i32).collect();
            let dst = self
                .ids
                .slice(0, ids.len())
                .ok_or_else(|| self.unsupported(format!("{} tokens exceed the id buffer", ids.len())))?;
            dev.copy_to_device(&ids, &dst)?;
        }
        let n = self.pos.len();
        let pos = vec![self.position as i32; n];
        dev.copy_to_device(&pos, &self.pos.slice(0, n).expect("n <= len"))?;
        let kv = vec![self.position as i32 + 1; n];
        dev.copy_to_device(&kv, &self.kv_len.slice(0, n).expect("n <= len"))?;
        let start: Vec<i32> =
            (0..n).map(|b| self.position as i32 - self.pads.get(b).copied().unwrap_or(0) as i32).collect();
        dev.copy_to_device(&start, &self.rope_start.slice(0, n).expect("n <= len"))?;
        self.dirty = false;
        Ok(())
    }

    /// Host-side checks that depend on the run's state (`backend::validate_op`, shared with the
    /// CPU executor), done for the whole phase before anything is launched or replayed since
    /// recorded graphs cannot check anything; then uploads RoPE tables not yet on the device
    /// (never during a recording: a phase runs directly before it is recorded).
    fn prepare(&mut self, phase: &Phase) -> Result<()> {
        let st = RunState {
            tokens: &self.tokens,
            position: self.position,
            pads: &self.pads,
            row_indices: &self.row_indices,
        };
        phase.ops.iter().try_for_each(|op| validate_op(op, &st, &self.host, &self.descs))?;
        for op in &phase.ops {
            if let Op::Rope { ref inv_freq, .. } = *op {
                let key = inv_freq.as_ptr() as usize;
                if !self.freqs.contains_key(&key) {
                    let dev_table = self.dev.upload(inv_freq)?;
                    self.freqs.insert(key, (inv_freq.clone(), dev_table));
                }
            }
        }
        Ok(())
    }

    fn heads(&self, v: View, batch_rows: usize) -> HeadsView<'_> {
        let cols = self.cols(v.buf);
        HeadsView { buf: &self.bufs[v.buf.0], offset: v.col, batch_stride: batch_rows * cols, row_stride: cols }
    }

    fn launch(&mut self, op: &Op) -> Result<()> {
        let dev = self.dev.clone();
        match *op {
            Op::PatchEmbed { pixels, weight, bias, class, positions, out, batch, image_size, patch } => {
                let side = image_size / patch;
                let (p, kdim, dim) = (side * side, 3 * patch * patch, self.cols(out));
                let cols = ensure(&dev, &mut self.scratch.im2col, batch * p * kdim)?;
                let patches = ensure(&dev, &mut self.scratch.patches, batch * p * dim)?;
                let image = ImageDims { batch, channels: 3, height: image_size, width: image_size };
                dev.patch_im2col(&self.bufs[pixels.0], &cols, image, patch)?;
                let epilogue = Epilogue { bias: Some(self.w(bias)), ..Epilogue::default() };
                let dims = GemmDims { m: batch * p, n: dim, k: kdim };
                dev.gemm(LinearArgs { x: &cols, w: self.w(weight), epilogue, y: &patches, dims })?;
                let dims = SeqDims { batch, seq: p, dim };
                let cls = class.map(|c| self.w(c));
                dev.vit_embed(&patches, cls, self.w(positions), &self.bufs[out.0], dims)?;
            }
            Op::PixelShuffle { x, out, batch, side, scale } => {
                // For each image and grid row y = Y*scale + a: its `side / scale` blocks of
                // `scale` rows land `scale²` rows apart, at row `a * scale` of out row (Y, 0..):
                // one strided 2-D copy per grid row.
                let (dim, grid) = (self.cols(x), side / scale);
                let width = scale * dim;
                for b in 0..batch {
                    for y in 0..side {
                        let (big, a) = (y / scale, y % scale);
                        let src_row = b * side * side + y * side;
                        let dst_row = (b * grid * grid + big * grid) * scale * scale + a * scale;
                        dev.copy_rows(
                            RowsView { buf: &self.bufs[x.0], offset: src_row * dim, row_stride: width },
                            RowsView { buf: &self.bufs[out.0], offset: dst_row * dim, row_stride: scale * width },
                            grid,
                            width,
                        )?;
                    }
                }
            }
            Op::Linear { x, weight, bias, act, residual, out, rows } => {
                let shape = &self.host.get(weight).shape;
                let (n, k) = (shape[0], shape[1]);
                // A column view (e.g. a slice of a fused buffer) is first copied to contiguous rows.
                let input = if x.col != 0 || self.cols(x.buf) != k {
                    let tmp = ensure(&dev, &mut self.scratch.linear_in, rows * k)?;
                    dev.copy_rows(self.rows_view(x), RowsView { buf: &tmp, offset: 0, row_stride: k }, rows, k)?;
                    tmp
                } else {
                    self.bufs[x.buf.0].clone()
                };
                let (w, bias, dims) = (self.w(weight), bias.map(|b| self.w(b)), GemmDims { m: rows, n, k });
                if self.is_f32(out) {
                    // An fp32 stream (its residual is fp32 too: `check_dtypes`).
                    let r32 = residual.filter(|&r| r != out).map(|r| self.f32_buf(r));
                    let res = match (residual, &r32) {
                        (None, _) => Residual::None,
                        (Some(_), Some(r)) => Residual::Add(r),
                        (Some(_), None) => Residual::InPlace,
                    };
                    let epilogue = Epilogue { bias, act, residual: res };
                    dev.linear(LinearArgs { x: &input, w, epilogue, y: &self.f32_buf(out), dims })?;
                } else {
                    let res = match residual {
                        None => Residual::None,
                        Some(r) if r == out => Residual::InPlace,
                        Some(r) => Residual::Add(&self.bufs[r.0]),
                    };
                    let epilogue = Epilogue { bias, act, residual: res };
                    dev.linear(LinearArgs { x: &input, w, epilogue, y: &self.bufs[out.0], dims })?;
                }
            }
            Op::LayerNorm { x, residual, weight, bias, eps, out, rows } => {
                let (w, b, y) = (self.w(weight), bias.map(|b| self.w(b)), &self.bufs[out.0]);
                let shape = NormShape { rows, dim: self.cols(out), eps };
                if self.is_f32(x) {
                    let (x, res) = (self.f32_buf(x), residual.map(|r| self.f32_buf(r)));
                    let input = NormInput { x: &x, residual: res.as_ref(), sum_out: SumOut::None };
                    dev.layernorm(input, w, b, y, shape)?;
                } else {
                    let res = residual.map(|r| &self.bufs[r.0]);
                    let input = NormInput { x: &self.bufs[x.0], residual: res, sum_out: SumOut::None };
                    dev.layernorm(input, w, b, y, shape)?;
                }
            }
            Op::RmsNorm { x, residual, weight, eps, out, rows } => {
                let (w, y) = (self.w(weight), &self.bufs[out.0]);
                let shape = NormShape { rows, dim: self.cols(out), eps };
                if self.is_f32(x) {
                    let (x, res) = (self.f32_buf(x), residual.map(|r| self.f32_buf(r)));
                    let input = NormInput { x: &x, residual: res.as_ref(), sum_out: SumOut::None };
                    dev.rmsnorm(input, w, y, shape)?;
                } else {
                    let res = residual.map(|r| &self.bufs[r.0]);
                    let input = NormInput { x: &self.bufs[x.0], residual: res, sum_out: SumOut::None };
                    dev.rmsnorm(input, w, y, shape)?;
                }
            }
            Op::Convert { x, out, rows } => {
                let n = rows * self.cols(x);
                let slice = |s: DevSlice<f32>| s.slice(0, n).expect("validated: rows fit both buffers");
                match (self.is_f32(x), self.is_f32(out)) {
                    (false, true) => dev.cast_f16_f32(&self.bufs[x.0], &slice(self.f32_buf(out)), n)?,
                    (true, false) => dev.cast_f32_f16(&slice(self.f32_buf(x)), &self.bufs[out.0], n)?,
                    _ if x == out => {}
                    _ => {
                        let k = n * self.slots(x);
                        let whole = |buf| RowsView { buf, offset: 0, row_stride: k };
                        dev.copy_rows(whole(&self.bufs[x.0]), whole(&self.bufs[out.0]), 1, k)?;
                    }
                }
            }
            Op::L2Normalize { x, out, rows } => {
                let dim = self.cols(out);
                if self.is_f32(out) {
                    dev.l2_normalize(&self.bufs[x.0], &self.f32_buf(out), rows, dim)?;
                } else {
                    dev.l2_normalize(&self.bufs[x.0], &self.bufs[out.0], rows, dim)?;
                }
            }
            Op::GatedAdd { x, alpha, mask, out, rows } => {
                let mask = mask.map(|m| (self.rows_view(View::from(m)), self.cols(m)));
                dev.gated_add(&self.bufs[x.0], self.w(alpha), mask, &self.bufs[out.0], rows, self.cols(out))?;
            }
            Op::GatedAct { gate, up, act, out, rows } => {
                let (g, u) = (self.rows_view(gate), self.rows_view(up));
                dev.gated_act(g, u, act, &self.bufs[out.0], rows, self.cols(out))?;
            }
            Op::Rope { x, batch, rows_per_batch, heads, head_dim, ref inv_freq } => {
                let table = &self.freqs.get(&(inv_freq.as_ptr() as usize)).expect("uploaded by prepare").1;
                let dims = RopeDims { batch, seq: rows_per_batch, heads, head_dim };
                dev.rope(self.rows_view(x), table, &self.rope_start, dims)?;
            }
            Op::Attention(ref a) => self.attention(a)?,
            Op::SelectRows { x, out, batch, rows_per_batch, select } => {
                let dim = self.cols(x);
                for b in 0..batch {
                    let (first, n, to) = match select {
                        RowSelect::Skip(skip) => (skip, rows_per_batch - skip, b * (rows_per_batch - skip)),
                        RowSelect::Row(i) => (i, 1, b),
                        RowSelect::Indexed => (self.row_indices[b], 1, b),
                    };
                    dev.copy_rows(
                        RowsView { buf: &self.bufs[x.0], offset: (b * rows_per_batch + first) * dim, row_stride: dim },
                        RowsView { buf: &self.bufs[out.0], offset: to * dim, row_stride: dim },
                        n,
                        dim,
                    )?;
                }
            }
            Op::KvAppend { k, v, cache_k, cache_v, batch, rows_per_batch, capacity } => {
                let width = self.cols(cache_k);
                if rows_per_batch == 1 {
                    let (kn, vn) = (
                        self.bufs[k.buf.0].slice(k.col, self.bufs[k.buf.0].len() - k.col),
                        self.bufs[v.buf.0].slice(v.col, self.bufs[v.buf.0].len() - v.col),
                    );
                    let (kn, vn) = (kn.expect("col inside buffer"), vn.expect("col inside buffer"));
                    dev.kv_append(
                        KvRows { k: &kn, v: &vn, row_stride: self.cols(k.buf) },
                        &self.bufs[cache_k.0],
                        &self.bufs[cache_v.0],
                        &self.pos,
                        SeqDims { batch, seq: capacity, dim: width },
                    )?;
                } else {
                    // Prefill: each sequence's rows (whole buffers or column views) copied at the
                    // host-known position.
                    for (src, cache) in [(k, cache_k), (v, cache_v)] {
                        let stride = self.cols(src.buf);
                        for b in 0..batch {
                            let from = b * rows_per_batch * stride + src.col;
                            let to = (b * capacity + self.position) * width;
                            dev.copy_rows(
                                RowsView { buf: &self.bufs[src.buf.0], offset: from, row_stride: stride },
                                RowsView { buf: &self.bufs[cache.0], offset: to, row_stride: width },
                                rows_per_batch,
                                width,
                            )?;
                        }
                    }
                }
            }
            Op::Embed { table, out } => {
                dev.embed_rows(&self.ids, self.w(table), &self.bufs[out.0], self.tokens.len(), self.cols(out))?;
            }
            Op::ScatterTokens { src, token, out, batch, rows_per_batch } => {
                let dim = self.cols(out);
                let per_seq: Vec<usize> =
                    self.tokens.chunks(rows_per_batch).map(|s| s.iter().filter(|&&t| t == token).count()).collect();
                let n_img = per_seq.first().copied().unwrap_or(0);
                if per_seq.iter().any(|&n| n != n_img) || batch * n_img * dim > self.bufs[src.0].len() {
                    let provided = self.bufs[src.0].len() / dim.max(1);
                    return Err(Error::InvalidInput(format!(
                        "the prompts hold {per_seq:?} image tokens (id {token}) per sequence but the images provide \
                         {provided} query embeddings in all ({batch} sequences): every prompt needs the same number, \
                         at most the image's; remove image tokens from the prompt text"
                    )));
                }
                if n_img > 0 {
                    dev.image_scatter(
                        &self.ids,
                        &self.bufs[out.0],
                        &self.bufs[src.0],
                        SeqDims { batch, seq: rows_per_batch, dim },
                        n_img,
                        token as i32,
                    )?;
                }
            }
            Op::AddPositions { table, offset, x, batch, rows_per_batch } => {
                // Same per-sequence starts as RoPE: left-padded rows get HF's cumsum(mask) - 1.
                dev.add_positions(
                    &self.bufs[x.0],
                    self.w(table),
                    &self.rope_start,
                    SeqDims { batch, seq: rows_per_batch, dim: self.cols(x) },
                    offset as i32,
                )?;
            }
            Op::LastRows { x, out, batch, rows_per_batch } => {
                let dim = self.cols(x);
                for b in 0..batch {
                    let from = self.bufs[x.0].slice((b * rows_per_batch + rows_per_batch - 1) * dim, dim);
                    let to = self.bufs[out.0].slice(b * dim, dim);
                    match (from, to) {
                        (Some(from), Some(to)) => dev.copy_device(&from, &to)?,
                        _ => return Err(self.unsupported("last-row copy outside its buffers".into())),
                    }
                }
            }
            Op::CopyRows { x, x_rows_per_batch, x_start, out, out_rows_per_batch, out_start, rows, batch } => {
                // One 2D copy: a sequence's block of rows is contiguous on both sides.
                let dim = self.cols(x) * self.slots(x);
                dev.copy_rows(
                    RowsView { buf: &self.bufs[x.0], offset: x_start * dim, row_stride: x_rows_per_batch * dim },
                    RowsView { buf: &self.bufs[out.0], offset: out_start * dim, row_stride: out_rows_per_batch * dim },
                    batch,
                    rows * dim,
                )?;
            }
            Op::Broadcast { table, out, batch } => {
                let t = self.w(table).clone();
                for b in 0..batch {
                    let to = self.bufs[out.0]
                        .slice(b * t.len(), t.len())
                        .ok_or_else(|| self.unsupported("broadcast outside its buffer".into()))?;
                    dev.copy_device(&t, &to)?;
                }
            }
        }
        Ok(())
    }

    fn rows_view(&self, v: View) -> RowsView<'_> {
        RowsView { buf: &self.bufs[v.buf.0], offset: v.col, row_stride: self.cols(v.buf) }
    }

    fn attention(&mut self, a: &Attention) -> Result<()> {
        let dev = self.dev.clone();
        // The kernels read an fp32 key mask: an fp32 mask buffer is used as it is, an fp16 one
        // is widened into scratch first.
        let mask32 = match a.key_mask {
            Some(m) if self.is_f32(m) => Some((self.f32_buf(m), self.cols(m))),
            Some(m) => {
                let n = self.bufs[m.0].len();
                let m32 = ensure(&dev, &mut self.scratch.mask_f32, n)?;
                dev.cast_f16_f32(&self.bufs[m.0], &m32, n)?;
                Some((m32, self.cols(m)))
            }
            None => None,
        };
        let decode = matches!(a.kv_len, KvLen::Cache) && a.q_len == 1;
        let ws = if decode {
            let ws_len = decode_workspace_len(a.batch, a.heads, a.head_dim, a.kv_batch_stride);
            Some(ensure(&dev, &mut self.scratch.decode_ws, ws_len)?)
        } else {
            None
        };
        let extra = AttnMask {
            additive: mask32.as_ref().map(|(m, stride)| (m, *stride)),
            bias: a.head_bias.map(|b| (&self.bufs[b.0], self.cols(b))),
            kv_heads: Some(a.kv_heads),
            per_query: a.mask_per_query,
            ..AttnMask::default()
        };
        let (q, k, v) =
            (self.heads(a.q, a.q_len), self.heads(a.k, a.kv_batch_stride), self.heads(a.v, a.kv_batch_stride));
        let o = self.heads(View::from(a.out), a.q_len);
        let dims = |q_len, kv_len| AttnDims {
            batch: a.batch,
            heads: a.heads,
            q_len,
            kv_len,
            head_dim: a.head_dim,
            scale: a.scale,
        };
        match a.kv_len {
            // One new token against the cache: split-KV decode, KV length read on the device.
            KvLen::Cache if a.q_len == 1 => {
                let ws = ws.expect("allocated for decode above");
                let (q, k, v, o) = (
                    self.heads(a.q, 1),
                    self.heads(a.k, a.kv_batch_stride),
                    self.heads(a.v, a.kv_batch_stride),
                    self.heads(View::from(a.out), 1),
                );
                dev.decode_attention(AttnViews { q, k, v, o }, &self.kv_len, &ws, dims(1, a.kv_batch_stride), extra)?;
            }
            kv => {
                let skv = match kv {
                    KvLen::Fixed(n) => n,
                    KvLen::Cache => self.position + a.q_len,
                };
                let mask = AttnMask { causal: a.causal.then_some(self.position as i32), ..extra };
                dev.attention(AttnViews { q, k, v, o }, dims(a.q_len, skv), mask)?;
            }
        }
        Ok(())
    }

    fn run_direct(&mut self, phase: &Phase) -> Result<()> {
        for (i, op) in phase.ops.iter().enumerate() {
            self.launch(op)?;
            if self.sync_each_op {
                // Kernel faults surface at the next synchronisation; here that names the op.
                self.dev()
                    .synchronize()
                    .map_err(|e| Error::Gpu(format!("{} op {i} ({}): {e}", phase.name, op.kind())))?;
            }
        }
        Ok(())
    }

    /// Records `phase` into a CUDA graph; on any failure (beginning the capture, a launch inside
    /// it, ending it) recording is turned off for good and the phase runs directly. Recording
    /// holds the device's capture lock, so other threads' allocations, frees and context
    /// synchronisations (which could invalidate the capture) wait for it.
    fn record(&mut self, phase: &Phase) -> Result<()> {
        let dev = self.dev.clone();
        let fault = self.graph_fault;
        let recorded = dev.capturing(|| -> std::result::Result<CudaGraph, String> {
            let stream = dev.stream();
            if fault == Some(GraphFault::Begin) {
                return Err("begin_capture: simulated failure (GLIMPSE_CUDA_GRAPH=fail-begin)".into());
            }
            stream
                .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                .map_err(|e| format!("begin_capture: {e:?}"))?;
            // Always end the capture, even after a failed launch, so the stream leaves capture mode.
            let launched = self.run_direct(phase);
            let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
            match (launched, graph) {
                (Err(e), _) => Err(format!("launch while recording: {e}")),
                (Ok(()), Err(e)) => Err(format!("end_capture: {e:?}")),
                (Ok(()), Ok(None)) => Err("end_capture: empty graph".into()),
                (Ok(()), Ok(Some(_))) if fault == Some(GraphFault::End) => {
                    Err("end_capture: simulated failure (GLIMPSE_CUDA_GRAPH=fail-end)".into())
                }
                (Ok(()), Ok(Some(graph))) => Ok(graph),
            }
        });
        match recorded {
            Ok(graph) => {
                self.graphs.insert(phase.name, graph);
                Ok(())
            }
            Err(why) => {
                self.use_graphs = false;
                CAPTURE_FALLBACKS.fetch_add(1, Ordering::Relaxed);
                eprintln!(
                    "glimpse: CUDA graph recording of `{}` failed ({why}); running it launch by launch",
                    phase.name
                );
                self.run_direct(phase)
            }
        }
    }

    /// Launches a validated phase whose state is on the device: replayable phases are run
    /// directly once (allocating scratch), recorded on their second run and replayed after.
    fn launch_phase(&mut self, phase: &Phase) -> Result<()> {
        if !(phase.replayable && self.use_graphs) {
            return self.run_direct(phase);
        }
        let runs = {
            let count = self.runs.entry(phase.name).or_insert(0);
            *count += 1;
            *count
        };
        if let Some(graph) = self.graphs.get(phase.name) {
            graph.launch().map_err(GpuError::from)?;
            return Ok(());
        }
        // First run: direct (allocates scratch); second: record, then replay from now on.
        if runs == 1 {
            self.run_direct(phase)
        } else {
            self.record(phase)?;
            match self.graphs.get(phase.name) {
                Some(graph) => graph.launch().map_err(|e| GpuError::from(e).into()),
                None => Ok(()), // recording failed and the phase already ran directly
            }
        }
    }
}

impl Executor for CudaExecutor {
    fn set_tokens(&mut self, tokens: &[u32]) {
        self.tokens = tokens.to_vec();
        self.dirty = true;
    }

    fn set_position(&mut self, position: usize) {
        self.position = position;
        self.dirty = true;
    }

    fn position(&self) -> usize {
        self.position
    }

    fn set_left_padding(&mut self, pads: &[usize]) {
        self.pads = pads.to_vec();
        self.dirty = true;
    }

    fn set_row_indices(&mut self, rows: &[usize]) {
        self.row_indices = rows.to_vec();
    }

    fn write(&mut self, buf: Buf, data: &[f32]) -> Result<()> {
        let dst = self.bufs[buf.0].slice(0, data.len()).ok_or_else(|| {
            Error::InvalidInput(format!("{} values do not fit buffer `{}`", data.len(), self.descs[buf.0].name))
        })?;
        if self.is_f32(buf) {
            let dst = self.f32_buf(buf).slice(0, data.len()).expect("an fp32 buffer holds as many f32 as its f16 view");
            self.dev().copy_to_device(data, &dst)?;
            return Ok(());
        }
        let halves: Vec<f16> = data.iter().map(|&v| f16::from_f32(v)).collect();
        self.dev().copy_to_device(&halves, &dst)?;
        Ok(())
    }

    fn read(&mut self, buf: Buf, rows: usize) -> Result<Vec<f32>> {
        let n = rows * self.cols(buf);
        let src = self.bufs[buf.0].slice(0, n).ok_or_else(|| {
            Error::InvalidInput(format!("buffer `{}` has fewer than {rows} rows", self.descs[buf.0].name))
        })?;
        if self.is_f32(buf) {
            let src = self.f32_buf(buf).slice(0, n).expect("checked above on the f16 view");
            return Ok(self.dev().download(&src)?);
        }
        Ok(self.dev().download(&src)?.into_iter().map(f16::to_f32).collect())
    }

    fn run(&mut self, phase: &Phase) -> Result<()> {
        self.prepare(phase)?;
        self.sync_state()?;
        self.launch_phase(phase)
    }

    /// CUDA events around the phase's launches (host-side checks and the token/position
    /// uploads happen before the first event).
    fn run_timed(&mut self, phase: &Phase) -> Result<f64> {
        self.prepare(phase)?;
        self.sync_state()?;
        let stream = self.dev().stream().clone();
        let timing = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = stream.record_event(timing).map_err(GpuError::from)?;
        self.launch_phase(phase)?;
        let end = stream.record_event(timing).map_err(GpuError::from)?;
        end.synchronize().map_err(GpuError::from)?;
        Ok(f64::from(start.elapsed_ms(&end).map_err(GpuError::from)?))
    }
    fn synchronize(&mut self) -> Result<()> {
        Ok(self.dev().synchronize()?)
    }

    /// `k = 1` (greedy) runs the argmax kernel so only ids and log-probs leave the device.
    /// Larger `k` (beam search, sampling) downloads the rows and ranks them on the host for
    /// now: correct, but it moves `rows x vocab` halves per step.
    fn top_k(&mut self, logits: Buf, rows: usize, k: usize) -> Result<Vec<Vec<Candidate>>> {
        let vocab = self.cols(logits);
        if k != 1 {
            if self.beam_ops_on_host || k > TOPK_MAX || k > vocab {
                let all = self.read(logits, rows)?;
                return Ok(crate::backend::host_top_k(&all, rows, k));
            }
            // Log-softmax and the k best per row on the device: 8 bytes per candidate come back.
            let dev = self.dev.clone();
            let (idx, lp) = (&self.topk_idx, &self.topk_logprob);
            if self.is_f32(logits) {
                dev.top_k_logprobs(&self.f32_buf(logits), idx, lp, rows, vocab, k)?;
            } else {
                dev.top_k_logprobs(&self.bufs[logits.0], idx, lp, rows, vocab, k)?;
            }
            let n = rows * k;
            let ids = dev.download(&self.topk_idx.slice(0, n).expect("rows <= max rows, k <= TOPK_MAX"))?;
            let lps = dev.download(&self.topk_logprob.slice(0, n).expect("rows <= max rows, k <= TOPK_MAX"))?;
            return Ok(ids
                .chunks(k)
                .zip(lps.chunks(k))
                .map(|(i, l)| {
                    i.iter().zip(l).map(|(&t, &p)| Candidate { token: t as u32, logprob: f64::from(p) }).collect()
                })
                .collect());
        }
        let dev = self.dev.clone();
        if self.is_f32(logits) {
            dev.argmax(&self.f32_buf(logits), &self.argmax_idx, &self.argmax_logprob, rows, vocab)?;
        } else {
            dev.argmax(&self.bufs[logits.0], &self.argmax_idx, &self.argmax_logprob, rows, vocab)?;
        }
        let idx = dev.download(&self.argmax_idx.slice(0, rows).expect("rows <= max rows"))?;
        let lp = dev.download(&self.argmax_logprob.slice(0, rows).expect("rows <= max rows"))?;
        Ok(idx.into_iter().zip(lp).map(|(i, l)| vec![Candidate { token: i as u32, logprob: f64::from(l) }]).collect())
    }

    /// Device-to-device gather of the sequences that move (`from[to] != to`): into a persistent
    /// scratch and back, two kernel launches per buffer, no allocation or sync after the first
    /// step. `GLIMPSE_BEAM_OPS=host` keeps the previous whole-buffer temporary path.
    fn reorder_sequences(&mut self, bufs: &[Buf], rows_per_seq: usize, from: &[usize]) -> Result<()> {
        crate::backend::validate_reorder(&self.descs, bufs, rows_per_seq, from)?;
        if !self.beam_ops_on_host {
            return self.gather_sequences(bufs, rows_per_seq, from);
        }
        let dev = self.dev.clone();
        for &b in bufs {
            // Copied as fp16 slots: an fp32 buffer has two per element.
            let cols = self.cols(b) * self.slots(b);
            let len = self.descs[b.0].rows * cols;
            let tmp = dev.alloc::<f16>(len.max(1))?;
            let whole = |buf| RowsView { buf, offset: 0, row_stride: len };
            dev.copy_rows(whole(&self.bufs[b.0]), whole(&tmp), 1, len)?;
            for (to, &src) in from.iter().enumerate() {
                let n = rows_per_seq * cols;
                let seq = |buf, i: usize| RowsView { buf, offset: i * n, row_stride: n };
                dev.copy_rows(seq(&tmp, src), seq(&self.bufs[b.0], to), 1, n)?;
            }
            // The temporary is freed on drop: let the copies out of it finish first.
            dev.synchronize()?;
        }
        Ok(())
    }

    fn device_name(&self) -> String {
        format!("cuda:{}", self.dev().name())
    }
}

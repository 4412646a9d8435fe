//! kernels/attention.cu: flash-style prefill/encoder attention and split-KV decode attention.

use half::f16;

use super::*;
use crate::backend::cuda::error::{bad, GpuResult};
use crate::backend::cuda::memory::DevSlice;
use crate::backend::cuda::CudaDevice;

/// `[batch, rows, heads, head_dim]` view into a buffer: head `h` of row `i` of batch `b` starts
/// at element `offset + b*batch_stride + i*row_stride + h*head_dim`. A column slice of a fused
/// qkv buffer `[S, 3*H*d]` is `offset = part*H*d, row_stride = 3*H*d`.
#[derive(Clone, Copy, Debug)]
pub struct HeadsView<'a> {
    pub buf: &'a DevSlice<f16>,
    pub offset: usize,
    pub batch_stride: usize,
    pub row_stride: usize,
}

/// The four operands of an attention launch, each a [`HeadsView`]: queries, keys, values and the
/// output. For [`CudaDevice::decode_attention`] `k` and `v` are the KV caches `[B, max_len,
/// kv_heads, d]` and `q` / `o` hold one row per sequence.
#[derive(Clone, Copy, Debug)]
pub struct AttnViews<'a> {
    pub q: HeadsView<'a>,
    pub k: HeadsView<'a>,
    pub v: HeadsView<'a>,
    pub o: HeadsView<'a>,
}

/// The sizes of one attention launch and its score scale: `batch` sequences of `q_len` query
/// rows against `kv_len` key rows, `heads` query heads of `head_dim`, scores `scale * q·k`.
/// Decode attention takes `q_len = 1` and `kv_len` = the cache capacity (`max_len`; the
/// live lengths are in device memory).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnDims {
    pub batch: usize,
    pub heads: usize,
    pub q_len: usize,
    pub kv_len: usize,
    pub head_dim: usize,
    pub scale: f32,
}

/// Attention masking options (combinable).
#[derive(Clone, Copy, Debug, Default)]
pub struct AttnMask<'a> {
    /// Causal with offset: query i attends keys j <= i + offset (prefill after a cache: offset =
    /// number of cached keys). Ignored by decode attention (the new token sees the whole cache).
    pub causal: Option<i32>,
    /// Per-batch number of valid keys (prefill only).
    pub kv_valid: Option<&'a DevSlice<i32>>,
    /// Additive fp32 per-key mask `[B, stride]` and its stride.
    pub additive: Option<(&'a DevSlice<f32>, usize)>,
    /// The additive mask holds one row per query row, `[B * sq, stride]` (prefill kernel only;
    /// with one query row per batch item the two layouts are the same).
    pub per_query: bool,
    /// Additive fp16 per-head bias `[H * sq, stride]` (decode: `[H, stride]`) and its stride.
    pub bias: Option<(&'a DevSlice<f16>, usize)>,
    /// Grouped-query attention: K/V hold this many heads (`heads % kv_heads == 0`); None = heads.
    pub kv_heads: Option<usize>,
}

impl AttnMask<'_> {
    /// Query heads per K/V head, checked.
    fn kv_group(&self, kernel: &'static str, heads: usize) -> GpuResult<usize> {
        let kv = self.kv_heads.unwrap_or(heads);
        if kv == 0 || heads % kv != 0 {
            return Err(bad(kernel, format!("{heads} heads cannot share {kv} kv heads")));
        }
        Ok(heads / kv)
    }
}

kernel_params! {
    struct AttnParams = 176 bytes {
        q: u64,
        k: u64,
        v: u64,
        o: u64,
        mask: u64,
        kv_valid: u64,
        bias: u64,
        q_bs: i64,
        q_rs: i64,
        k_bs: i64,
        k_rs: i64,
        v_bs: i64,
        v_rs: i64,
        o_bs: i64,
        o_rs: i64,
        mask_stride: i64,
        bias_stride: i64,
        mask_qstride: i64,
        heads: i32,
        sq: i32,
        skv: i32,
        d: i32,
        causal: i32,
        kv_offset: i32,
        scale: f32,
        kv_group: i32,
    }
}

kernel_params! {
    struct DecodeAttnParams = 160 bytes {
        q: u64,
        k_cache: u64,
        v_cache: u64,
        kv_len: u64,
        mask: u64,
        bias: u64,
        partial: u64,
        o: u64,
        q_bs: i64,
        k_bs: i64,
        k_rs: i64,
        v_bs: i64,
        v_rs: i64,
        o_bs: i64,
        mask_stride: i64,
        bias_stride: i64,
        heads: i32,
        d: i32,
        max_len: i32,
        chunk: i32,
        nsplit: i32,
        scale: f32,
        kv_group: i32,
        pad_: i32,
    }
}

const DECODE_CHUNK: usize = 256;

fn padded_head_dim(kernel: &'static str, d: usize) -> GpuResult<usize> {
    if d == 0 || d % 8 != 0 || d > 128 {
        return Err(bad(kernel, format!("head_dim {d} unsupported (needs d % 8 == 0, d <= 128)")));
    }
    Ok(padded_dim(d))
}

/// The head dim of the kernel instance that runs `d` (64, 96 or 128).
fn padded_dim(d: usize) -> usize {
    match d {
        0..=64 => 64,
        65..=96 => 96,
        _ => 128,
    }
}

/// fp32 elements of workspace `decode_attention` needs for these shapes.
pub fn decode_workspace_len(batch: usize, heads: usize, head_dim: usize, max_len: usize) -> usize {
    batch * heads * max_len.div_ceil(DECODE_CHUNK).max(1) * (padded_dim(head_dim) + 2)
}

/// Checks an optional `[rows, stride]` operand (an additive mask or bias) covers `keys` keys in
/// each of `rows` rows; returns (pointer, stride), (0, 0) when absent.
fn strided_rows<T: DeviceScalar>(
    kernel: &'static str,
    what: &str,
    operand: Option<(&DevSlice<T>, usize)>,
    rows: usize,
    keys: usize,
) -> GpuResult<(u64, usize)> {
    let Some((buf, stride)) = operand else { return Ok((0, 0)) };
    if stride < keys {
        return Err(bad(kernel, format!("{what} stride {stride} < {keys} keys")));
    }
    need(kernel, what, buf, (rows - 1) * stride + keys)?;
    Ok((buf.ptr(), stride))
}

impl HeadsView<'_> {
    /// Checks that rows `0..rows` of batches `0..batch`, heads `0..heads` fit in the buffer and
    /// the 16-byte-load alignment rules hold. Returns the device address of element (0, 0, 0).
    fn check(
        &self,
        kernel: &'static str,
        what: &str,
        batch: usize,
        rows: usize,
        heads: usize,
        d: usize,
    ) -> GpuResult<u64> {
        let last = self.offset + (batch - 1) * self.batch_stride + (rows - 1) * self.row_stride + heads * d;
        need(kernel, what, self.buf, last)?;
        if self.batch_stride % 8 != 0 || self.row_stride % 8 != 0 {
            return Err(bad(kernel, format!("{what}: strides must be multiples of 8 elements")));
        }
        let ptr = self.buf.ptr_at(self.offset);
        if ptr % 16 != 0 {
            return Err(bad(kernel, format!("{what}: base pointer not 16-byte aligned")));
        }
        Ok(ptr)
    }
    fn byte_range(&self, batch: usize, rows: usize, heads: usize, d: usize) -> (u64, u64) {
        let start = self.buf.ptr_at(self.offset);
        let last = (batch - 1) * self.batch_stride + (rows - 1) * self.row_stride + heads * d;
        (start, start + 2 * last as u64)
    }
}

impl CudaDevice {
    /// Flash-style attention, O[b,i,h,:] = softmax(scale * q·k + mask) · v. Head dims with
    /// d % 8 == 0 and d <= 128 (64, 80, 88, 128, ...).
    pub fn attention(&self, views: AttnViews<'_>, dims: AttnDims, mask: AttnMask<'_>) -> GpuResult<()> {
        const K: &str = "attention";
        let AttnViews { q, k, v, o } = views;
        let AttnDims { batch, heads, q_len: sq, kv_len: skv, head_dim, scale } = dims;
        if batch == 0 || heads == 0 || sq == 0 || skv == 0 {
            return Err(bad(K, "empty shape"));
        }
        let dp = padded_head_dim(K, head_dim)?;
        let group = mask.kv_group(K, heads)?;
        let kvh = heads / group;
        let qp = q.check(K, "q", batch, sq, heads, head_dim)?;
        let kp = k.check(K, "k", batch, skv, kvh, head_dim)?;
        let vp = v.check(K, "v", batch, skv, kvh, head_dim)?;
        let op = o.check(K, "o", batch, sq, heads, head_dim)?;
        let orange = o.byte_range(batch, sq, heads, head_dim);
        let (bias_ptr, bias_stride) = strided_rows(K, "bias", mask.bias, heads * sq, skv)?;
        let mask_rows = if mask.per_query { batch * sq } else { batch };
        let (mask_ptr, mask_stride) = strided_rows(K, "mask", mask.additive, mask_rows, skv)?;
        // Elements between batch items and between query rows of the mask (0: shared by every row).
        let (mask_bs, mask_qs) = if mask.per_query { (sq * mask_stride, mask_stride) } else { (mask_stride, 0) };
        let kv_valid = match mask.kv_valid {
            Some(kv) => {
                need(K, "kv_valid", kv, batch)?;
                kv.ptr()
            }
            None => 0,
        };
        // Blocks read every input (the mask and kv_valid too) while other blocks write o.
        let reads = [
            ("q", Some(q.byte_range(batch, sq, heads, head_dim))),
            ("k", Some(k.byte_range(batch, skv, kvh, head_dim))),
            ("v", Some(v.byte_range(batch, skv, kvh, head_dim))),
            ("mask", mask.additive.map(|(m, _)| m.range())),
            ("kv_valid", mask.kv_valid.map(|kv| kv.range())),
            ("bias", mask.bias.map(|(b, _)| b.range())),
        ];
        written_apart(K, "o", orange, &reads)?;
        let p = AttnParams {
            q: qp,
            k: kp,
            v: vp,
            o: op,
            mask: mask_ptr,
            kv_valid,
            bias: bias_ptr,
            q_bs: q.batch_stride as i64,
            q_rs: q.row_stride as i64,
            k_bs: k.batch_stride as i64,
            k_rs: k.row_stride as i64,
            v_bs: v.batch_stride as i64,
            v_rs: v.row_stride as i64,
            o_bs: o.batch_stride as i64,
            o_rs: o.row_stride as i64,
            mask_stride: mask_bs as i64,
            bias_stride: bias_stride as i64,
            mask_qstride: mask_qs as i64,
            heads: to_i32(K, "heads", heads)?,
            sq: to_i32(K, "sq", sq)?,
            skv: to_i32(K, "skv", skv)?,
            d: head_dim as i32,
            causal: mask.causal.is_some() as i32,
            kv_offset: mask.causal.unwrap_or(0),
            scale,
            kv_group: group as i32,
        };
        let name = match dp {
            64 => "attn_fwd_d64",
            96 => "attn_fwd_d96",
            _ => "attn_fwd_d128",
        };
        let q_blocks = to_i32(K, "q blocks", sq.div_ceil(16))? as u32;
        let cfg = blocks_of((q_blocks, grid_yz(K, "heads", heads)?, grid_yz(K, "batch", batch)?), 128);
        // SAFETY: every (batch, row, head) row the grid reads or writes lies inside q/k/v/o
        // (HeadsView::check; k/v with heads / kv_group heads, the most a query head's
        // h / kv_group reaches); the bias holds (H*sq - 1)*stride + skv halves; d % 8 == 0, strides % 8 == 0 and base pointers 16-byte aligned for
        // the 16-byte loads; d <= padded dim of the chosen instance; o is disjoint from q, k, v;
        // mask holds (B-1)*stride + skv floats and kv_valid B ints (values clamped on device);
        // grid (ceil(sq/16), heads, batch) within limits, 128 threads as compiled.
        unsafe { self.launch("attention", name, cfg, &[&p]) }
    }

    /// Split-KV decode attention for one new token per sequence against a KV cache
    /// `[B, max_len, H, d]` whose current lengths `kv_len[b]` live in device memory; the launch
    /// depends only on `max_len`, so it can be captured in a CUDA graph. `workspace` needs
    /// [`decode_workspace_len`] floats. Masks: `additive` (stride >= max_len), `bias` (`[H, stride]`) and `kv_heads` are used.
    /// `views.k` / `views.v` are the caches; `dims.kv_len` is `max_len` and `dims.q_len` is 1.
    pub fn decode_attention(
        &self,
        views: AttnViews<'_>,
        kv_len: &DevSlice<i32>,
        workspace: &DevSlice<f32>,
        dims: AttnDims,
        mask: AttnMask<'_>,
    ) -> GpuResult<()> {
        const K: &str = "decode_attention";
        let AttnViews { q, k: k_cache, v: v_cache, o } = views;
        let AttnDims { batch, heads, q_len, kv_len: max_len, head_dim, scale } = dims;
        if batch == 0 || heads == 0 || max_len == 0 {
            return Err(bad(K, "empty shape"));
        }
        if q_len != 1 {
            return Err(bad(K, format!("q_len = {q_len}: decode attention takes one query row per sequence")));
        }
        let dp = padded_head_dim(K, head_dim)?;
        let group = mask.kv_group(K, heads)?;
        let kvh = heads / group;
        let qp = q.check(K, "q", batch, 1, heads, head_dim)?;
        let kp = k_cache.check(K, "k_cache", batch, max_len, kvh, head_dim)?;
        let vp = v_cache.check(K, "v_cache", batch, max_len, kvh, head_dim)?;
        let op = o.check(K, "o", batch, 1, heads, head_dim)?;
        need(K, "kv_len", kv_len, batch)?;
        let nsplit = max_len.div_ceil(DECODE_CHUNK);
        need(K, "workspace", workspace, decode_workspace_len(batch, heads, head_dim, max_len))?;
        let orange = o.byte_range(batch, 1, heads, head_dim);
        let (bias_ptr, bias_stride) = strided_rows(K, "bias", mask.bias, heads, max_len)?;
        let (mask_ptr, mask_stride) = strided_rows(K, "mask", mask.additive, batch, max_len)?;
        // The split kernel writes the workspace and the combine kernel o while other blocks
        // read every input (and the combine reads the workspace).
        let reads = [
            ("q", Some(q.byte_range(batch, 1, heads, head_dim))),
            ("k_cache", Some(k_cache.byte_range(batch, max_len, kvh, head_dim))),
            ("v_cache", Some(v_cache.byte_range(batch, max_len, kvh, head_dim))),
            ("kv_len", Some(kv_len.range())),
            ("mask", mask.additive.map(|(m, _)| m.range())),
            ("bias", mask.bias.map(|(b, _)| b.range())),
        ];
        written_apart(K, "workspace", workspace.range(), &reads)?;
        written_apart(K, "o", orange, &reads)?;
        written_apart(K, "o", orange, &[("workspace", Some(workspace.range()))])?;
        let p = DecodeAttnParams {
            q: qp,
            k_cache: kp,
            v_cache: vp,
            kv_len: kv_len.ptr(),
            mask: mask_ptr,
            bias: bias_ptr,
            partial: workspace.ptr(),
            o: op,
            q_bs: q.batch_stride as i64,
            k_bs: k_cache.batch_stride as i64,
            k_rs: k_cache.row_stride as i64,
            v_bs: v_cache.batch_stride as i64,
            v_rs: v_cache.row_stride as i64,
            o_bs: o.batch_stride as i64,
            mask_stride: mask_stride as i64,
            bias_stride: bias_stride as i64,
            heads: to_i32(K, "heads", heads)?,
            d: head_dim as i32,
            max_len: to_i32(K, "max_len", max_len)?,
            chunk: DECODE_CHUNK as i32,
            nsplit: nsplit as i32,
            scale,
            kv_group: group as i32,
            pad_: 0,
        };
        let name = match dp {
            64 => "attn_decode_split_d64",
            96 => "attn_decode_split_d96",
            _ => "attn_decode_split_d128",
        };
        let gh = grid_yz(K, "heads", heads)?;
        let gb = grid_yz(K, "batch", batch)?;
        let cfg = blocks_of((nsplit as u32, gh, gb), 128);
        let cfg_c = blocks_of((gh, gb, 1), 128);
        let dp_i = dp as i32;
        // SAFETY: q/o rows for every (b, h) and cache rows 0..max_len of heads / kv_group kv heads
        // lie inside their buffers (HeadsView::check), the bias holds (H-1)*stride + max_len halves with 16-byte alignment and d % 8 == 0; kv_len has B ints (clamped to
        // [0, max_len] on device); workspace holds B*H*nsplit*(dp+2) floats and is disjoint from
        // all inputs and o; o is disjoint from q, caches, workspace; nsplit*chunk >= max_len;
        // grids (nsplit, H, B) and (H, B) within limits; the combine reads the workspace the
        // split kernel wrote earlier on the same stream, with the same padded dim.
        unsafe {
            self.launch("attention", name, cfg, &[&p])?;
            self.launch("attention", "attn_decode_combine", cfg_c, &[&p, &dp_i])
        }
    }
}

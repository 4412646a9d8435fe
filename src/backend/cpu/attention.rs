//! Softmax attention ([`crate::graph::Op::Attention`]) on the CPU: per (batch item, head)
//! `O = softmax(scale · Q Kᵀ + bias + mask) V`, in f32, like torch's eager path (the row max
//! subtracted, keys hidden by causality or a mask at [`ATTN_MASK_FLOOR`] weigh exactly 0).
//!
//! Blocked for the cache: per task (a batch item's head, or part of its query rows) Kᵀ is packed
//! once into [`KEYS`]-key panels; the query rows go in blocks of [`BLOCK_ROWS`], whose scores (an
//! L2-sized buffer) come from a register tile of [`SCORE_ROWS`] rows x 32 keys, then the softmax,
//! then P·V by a [`PV_ROWS`]-row tile reading V in place. Microkernels per CPU path, as in
//! `gemm.rs` (`GLIMPSE_CPU_ISA`): AVX-512 (with DQ, for the softmax), AVX2 + FMA, and portable.
//!
//! **Batching stays exact on every path:** a query row's output depends only on its q row, the
//! keys and values it sees and its masks, not on the other rows, the batch, or how many masked
//! keys (left padding) come before its own. Every score and output sums in channel or key order
//! in one accumulator, masked keys weigh exactly 0 (adding +0 changes no sum), and the softmax
//! adds its exponentials in 2^-40 fixed point: an integer sum, the same in any order.
//! tests/cpu_attention.rs checks this to the bit on each path.

use rayon::prelude::*;

use super::gemm::Isa;
use crate::graph::ATTN_MASK_FLOOR;

/// A per-head additive score bias (T5's relative position bias): row `h * q_len + i` holds the
/// values added to query row i's scores of head h, for every batch item.
#[derive(Debug, Clone, Copy)]
pub struct HeadBias<'a> {
    pub values: &'a [f32],
    pub stride: usize,
}

/// What [`attention_ex`] adds to plain attention: grouped K/V heads and additive masks.
#[derive(Debug, Clone, Copy)]
pub struct AttnExtras<'a> {
    /// Query head h reads K/V head `h / (heads / kv_heads)`.
    pub kv_heads: usize,
    pub mask: Option<KeyMask<'a>>,
    pub bias: Option<HeadBias<'a>>,
}

/// Shapes and strides of one attention call on row-major buffers (see `graph::Attention`).
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub batch: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub q_len: usize,
    /// Keys each batch item sees (for causal attention: before masking).
    pub kv_len: usize,
    /// Row strides (buffer widths) and first columns of Q, K, V.
    pub q_stride: usize,
    pub q_col: usize,
    pub kv_stride: usize,
    pub k_col: usize,
    pub v_col: usize,
    /// Rows between batch items in K/V.
    pub kv_batch_stride: usize,
    /// `Some(position)`: query row i sees keys `0..=position + i`.
    pub causal_from: Option<usize>,
    pub scale: f32,
}

/// An additive per-key mask: batch item `b` adds `values[b * stride + j]` to every score of key
/// `j` (HF padding masks: 0 or `finfo.min`), clamped to [`ATTN_MASK_FLOOR`] first.
#[derive(Debug, Clone, Copy)]
pub struct KeyMask<'a> {
    pub values: &'a [f32],
    pub stride: usize,
    /// One row per query row (`b * q_len + i`) instead of one per batch item.
    pub per_query: bool,
}

/// Softmax attention; `out` is `[batch * q_len, heads * head_dim]`. Keys hidden by causality
/// weigh 0; the softmax is f32 with the row max subtracted, like torch's eager path.
pub fn attention(q: &[f32], k: &[f32], v: &[f32], s: &AttnShape, mask: Option<KeyMask<'_>>, out: &mut [f32]) {
    attention_ex(q, k, v, s, &AttnExtras { kv_heads: s.heads, mask, bias: None }, out);
}

/// [`attention`] with grouped K/V heads (K/V rows hold `kv_heads * head_dim` columns from
/// `k_col` / `v_col`) and an optional per-head bias added (unclamped, like T5's position bias)
/// before the clamped key mask. Runs on the path `GLIMPSE_CPU_ISA` selects.
pub fn attention_ex(q: &[f32], k: &[f32], v: &[f32], s: &AttnShape, ex: &AttnExtras<'_>, out: &mut [f32]) {
    // An unusable `GLIMPSE_CPU_ISA` fails the executor at load; here it only means the reference.
    attention_path(super::gemm::selected().unwrap_or(Isa::Portable), q, k, v, s, ex, out);
}

/// [`attention_ex`] on the CPU path `isa`: the blocked kernels on `avx512` where the CPU also
/// has AVX-512DQ, the reference otherwise.
pub fn attention_path(isa: Isa, q: &[f32], k: &[f32], v: &[f32], s: &AttnShape, ex: &AttnExtras<'_>, out: &mut [f32]) {
    check_bounds(q, k, v, s, ex, out);
    blocked(Kernels::for_isa(isa), q, k, v, s, ex, out);
}

/// Every element the call reads or writes lies inside its slice.
fn check_bounds(q: &[f32], k: &[f32], v: &[f32], s: &AttnShape, ex: &AttnExtras<'_>, out: &[f32]) {
    let width = s.heads * s.head_dim;
    assert!(ex.kv_heads > 0 && s.heads % ex.kv_heads == 0, "attention: heads % kv_heads != 0");
    let kv_width = ex.kv_heads * s.head_dim;
    let (lq, lkv) = (s.q_len, s.kv_len);
    assert!(s.batch > 0 && lq > 0 && lkv > 0 && s.head_dim > 0, "attention: empty shape");
    assert!(q.len() >= ((s.batch * lq) - 1) * s.q_stride + s.q_col + width, "attention: q too short");
    let last_kv = |col: usize| ((s.batch - 1) * s.kv_batch_stride + lkv - 1) * s.kv_stride + col + kv_width;
    assert!(k.len() >= last_kv(s.k_col), "attention: k too short");
    assert!(v.len() >= last_kv(s.v_col), "attention: v too short");
    assert!(out.len() >= s.batch * lq * width, "attention: out too short");
    if let Some(hb) = ex.bias {
        assert!(
            hb.stride >= lkv && hb.values.len() >= (s.heads * lq - 1) * hb.stride + lkv,
            "attention: bias too short"
        );
    }
    if let Some(m) = ex.mask {
        let rows = if m.per_query { s.batch * lq } else { s.batch };
        assert!(m.stride >= lkv && m.values.len() >= (rows - 1) * m.stride + lkv, "attention: mask too short");
    }
}

/// Where one (batch item, head) reads: the first element of its Q, K and V columns.
struct HeadOrigin {
    q0: usize,
    k0: usize,
    v0: usize,
}

impl HeadOrigin {
    fn new(s: &AttnShape, kv_heads: usize, b: usize, h: usize) -> Self {
        let kvh = h / (s.heads / kv_heads);
        let kv = b * s.kv_batch_stride * s.kv_stride + kvh * s.head_dim;
        HeadOrigin { q0: b * s.q_len * s.q_stride + s.q_col + h * s.head_dim, k0: kv + s.k_col, v0: kv + s.v_col }
    }
}

/// Adds query row `i`'s head bias and clamped key mask to its scores `row` (keys `0..row.len()`)
/// of batch item `b`, head `h`.
fn add_bias_and_mask(row: &mut [f32], s: &AttnShape, ex: &AttnExtras<'_>, b: usize, h: usize, i: usize) {
    let n = row.len();
    if let Some(hb) = ex.bias {
        let brow = &hb.values[(h * s.q_len + i) * hb.stride..][..n];
        row.iter_mut().zip(brow).for_each(|(sc, &bv)| *sc += bv);
    }
    if let Some(m) = ex.mask {
        let mask_row = if m.per_query { b * s.q_len + i } else { b };
        let km = &m.values[mask_row * m.stride..][..n];
        row.iter_mut().zip(km).for_each(|(sc, &mv)| *sc += mv.max(ATTN_MASK_FLOOR));
    }
}

/// Keys query row `i` sees.
fn visible_keys(s: &AttnShape, i: usize) -> usize {
    s.causal_from.map_or(s.kv_len, |p| (p + i + 1).min(s.kv_len))
}

/// Copies per-task outputs (`rows` query rows of one head, `[rows, head_dim]`) into `out`.
fn scatter(s: &AttnShape, out: &mut [f32], b: usize, h: usize, first_row: usize, o: &[f32]) {
    let (d, width) = (s.head_dim, s.heads * s.head_dim);
    for (r, row) in o.chunks_exact(d).enumerate() {
        out[(b * s.q_len + first_row + r) * width + h * d..][..d].copy_from_slice(row);
    }
}

/// Keys per packed Kᵀ panel: the AVX-512 score tile's two 16-lane vectors.
const KEYS: usize = 32;
/// Query rows per score tile (AVX-512: 16 zmm accumulators, 8 rows x 32 keys).
const SCORE_ROWS: usize = 8;
/// Query rows per P·V tile (AVX-512: 24 zmm accumulators, 6 rows x 64 columns).
const PV_ROWS: usize = 6;
/// Output columns per P·V pass.
const PV_COLS: usize = 64;
/// Query rows per block: a block's scores are `BLOCK_ROWS x keys` floats (192 KiB at 1024 keys,
/// in L2); a multiple of 24 (both tiles' row counts divide it), so their spare rows stay inside
/// the buffers.
const BLOCK_ROWS: usize = 48;
const _: () = assert!(BLOCK_ROWS % (SCORE_ROWS * PV_ROWS / 2) == 0 && SCORE_ROWS * PV_ROWS / 2 == 24);
/// The softmax sums `e * 2^40` truncated to integers: exact in any order, and for up to 2^22
/// keys (each e <= 1) the sum fits an i64. The truncation loses under `keys * 2^-40` of a sum
/// that is at least 1 (the row max's own term), far below f32's half ulp.
const SUM_ONE: f64 = (1u64 << 40) as f64;
const MAX_KEYS: usize = 1 << 22;

/// The blocked attention (module docs) on `isa`'s kernels; the caller checked the bounds.
fn blocked(isa: Kernels, q: &[f32], k: &[f32], v: &[f32], s: &AttnShape, ex: &AttnExtras<'_>, out: &mut [f32]) {
    assert!(s.kv_len <= MAX_KEYS, "attention: more than {MAX_KEYS} keys");
    // Tasks: (batch item, head) pairs, each split into chunks of whole query blocks when there
    // are too few pairs to keep every thread busy.
    let pairs = s.batch * s.heads;
    let blocks = s.q_len.div_ceil(BLOCK_ROWS);
    let want = 2 * rayon::current_num_threads();
    let chunks = if pairs >= want { 1 } else { want.div_ceil(pairs).min(blocks) };
    let rows_per_chunk = blocks.div_ceil(chunks) * BLOCK_ROWS;
    let chunks = s.q_len.div_ceil(rows_per_chunk);
    let results: Vec<Vec<f32>> = (0..pairs * chunks)
        .into_par_iter()
        .map(|t| {
            let (bh, c) = (t / chunks, t % chunks);
            let rows = c * rows_per_chunk..((c + 1) * rows_per_chunk).min(s.q_len);
            HeadTask { q, k, v, s, ex, b: bh / s.heads, h: bh % s.heads }.rows(isa, rows)
        })
        .collect();
    for (t, o) in results.iter().enumerate() {
        let bh = t / chunks;
        scatter(s, out, bh / s.heads, bh % s.heads, (t % chunks) * rows_per_chunk, o);
    }
}

/// One (batch item, head) of an attention call.
struct HeadTask<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    s: &'a AttnShape,
    ex: &'a AttnExtras<'a>,
    b: usize,
    h: usize,
}

impl HeadTask<'_> {
    /// The outputs `[rows.len(), head_dim]` of query rows `rows`.
    fn rows(&self, isa: Kernels, rows: std::ops::Range<usize>) -> Vec<f32> {
        let (s, d) = (self.s, self.s.head_dim);
        let at = HeadOrigin::new(s, self.ex.kv_heads, self.b, self.h);
        // Keys any of these rows sees, and Kᵀ packed in panels [panel][channel][KEYS] (keys past
        // them zero).
        let seen = visible_keys(s, rows.end - 1);
        let ld = seen.div_ceil(KEYS) * KEYS;
        let mut kt = vec![0f32; ld * d];
        for j in 0..seen {
            let krow = &self.k[at.k0 + j * s.kv_stride..][..d];
            let panel = &mut kt[(j / KEYS) * d * KEYS..][..d * KEYS];
            for (c, &x) in krow.iter().enumerate() {
                panel[c * KEYS + j % KEYS] = x;
            }
        }
        // Block buffers: one row for a single query row (decode), else whole tiles of both
        // kinds (a multiple of 24 rows, at most BLOCK_ROWS).
        let block_rows = match rows.len() {
            1 => 1,
            n => n.min(BLOCK_ROWS).next_multiple_of(SCORE_ROWS * PV_ROWS / 2),
        };
        let mut q_block = vec![0f32; block_rows * d];
        let mut scores = vec![0f32; block_rows * ld];
        let mut o_block = vec![0f32; block_rows * d];
        let mut o = vec![0f32; rows.len() * d];
        for first in rows.clone().step_by(BLOCK_ROWS) {
            let n = (rows.end - first).min(BLOCK_ROWS);
            let block_seen = visible_keys(s, first + n - 1);
            for r in 0..n {
                q_block[r * d..][..d].copy_from_slice(&self.q[at.q0 + (first + r) * s.q_stride..][..d]);
            }
            // Scores [n, ld]: tiles of SCORE_ROWS rows (one row alone: a 1-row tile); rows past
            // n are scratch.
            for tile in (0..n).step_by(SCORE_ROWS) {
                let tile_rows = if n == 1 { 1 } else { SCORE_ROWS };
                let args = ScoreArgs {
                    a: &q_block[tile * d..][..tile_rows * d],
                    d,
                    kt: &kt[..block_seen.div_ceil(KEYS) * KEYS * d],
                    scale: s.scale,
                };
                isa.scores(args, &mut scores[tile * ld..][..tile_rows * ld], ld);
            }
            for r in 0..n {
                let i = first + r;
                let row = &mut scores[r * ld..][..block_seen];
                let visible = visible_keys(s, i);
                add_bias_and_mask(&mut row[..visible], s, self.ex, self.b, self.h, i);
                isa.softmax(row, visible);
            }
            // O = P · V over the keys the block sees, in column passes of PV_COLS.
            for tile in (0..n).step_by(PV_ROWS) {
                let tile_rows = if n == 1 { 1 } else { PV_ROWS };
                for c0 in (0..d).step_by(PV_COLS) {
                    let args = PvArgs {
                        p: &scores[tile * ld..][..(tile_rows - 1) * ld + block_seen],
                        ldp: ld,
                        v: &self.v[at.v0 + c0..],
                        ldv: s.kv_stride,
                        keys: block_seen,
                        cols: (d - c0).min(PV_COLS),
                    };
                    isa.pv(args, &mut o_block[tile * d + c0..][..(tile_rows - 1) * d + (d - c0).min(PV_COLS)], d);
                }
            }
            o[(first - rows.start) * d..][..n * d].copy_from_slice(&o_block[..n * d]);
        }
        o
    }
}

/// `c[r][p * KEYS + j] = scale * sum_ch a[r][ch] * kt[p][ch][j]` for the rows of `a` (row
/// stride d) and every panel of `kt`: one accumulator per score, summed in channel order.
struct ScoreArgs<'a> {
    a: &'a [f32],
    d: usize,
    kt: &'a [f32],
    scale: f32,
}

/// `o[r][c] = sum_j p[r][j] * v[j][c]` (j < keys, in key order, one accumulator per output) for
/// the rows of `p` and columns `c < cols <= PV_COLS`; V rows are `ldv` apart, read in place.
struct PvArgs<'a> {
    p: &'a [f32],
    ldp: usize,
    v: &'a [f32],
    ldv: usize,
    keys: usize,
    cols: usize,
}

/// The microkernels of one CPU path. Every path sums each score and output in one accumulator
/// in a fixed order, so each is exact under batching; `avx512` and `avx2` both fuse every
/// multiply-add and agree to the bit on the products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernels {
    Avx512,
    Avx2,
    Portable,
}

impl Kernels {
    /// The kernels for `isa` on this CPU (AVX-512 also needs DQ for the softmax's integer sum).
    fn for_isa(isa: Isa) -> Kernels {
        #[cfg(target_arch = "x86_64")]
        {
            let has = |f: &str| match f {
                "avx512" => std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512dq"),
                _ => std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma"),
            };
            match isa {
                Isa::Avx512 if has("avx512") => return Kernels::Avx512,
                Isa::Avx512 | Isa::Avx2 if has("avx2") => return Kernels::Avx2,
                _ => {}
            }
        }
        let _ = isa;
        Kernels::Portable
    }

    fn scores(self, args: ScoreArgs<'_>, c: &mut [f32], ldc: usize) {
        let rows = args.a.len() / args.d;
        let panels = args.kt.len() / (args.d * KEYS);
        assert!(args.a.len() == rows * args.d && args.kt.len() == panels * args.d * KEYS);
        assert!(rows >= 1 && ldc >= panels * KEYS && c.len() >= (rows - 1) * ldc + panels * KEYS);
        match self {
            // SAFETY (both): the features were detected in `for_isa`; the kernels read and write
            // inside the slices just asserted.
            #[cfg(target_arch = "x86_64")]
            Kernels::Avx512 => unsafe {
                match rows {
                    1 => x86::scores_avx512::<1>(&args, c, ldc),
                    SCORE_ROWS => x86::scores_avx512::<SCORE_ROWS>(&args, c, ldc),
                    _ => unreachable!("score tiles hold 1 or {SCORE_ROWS} rows"),
                }
            },
            #[cfg(target_arch = "x86_64")]
            Kernels::Avx2 => unsafe { x86::scores_avx2(&args, c, ldc) },
            _ => scores_portable(&args, c, ldc),
        }
    }

    fn pv(self, args: PvArgs<'_>, o: &mut [f32], ldo: usize) {
        let rows = (args.p.len() - args.keys) / args.ldp + 1;
        assert!(args.cols >= 1 && args.cols <= PV_COLS && args.ldp >= args.keys);
        assert!(args.keys >= 1 && args.v.len() >= (args.keys - 1) * args.ldv + args.cols);
        assert!(o.len() >= (rows - 1) * ldo + args.cols);
        match self {
            // SAFETY (both): as in `scores`.
            #[cfg(target_arch = "x86_64")]
            Kernels::Avx512 => unsafe {
                match rows {
                    1 => x86::pv_avx512::<1>(&args, o, ldo),
                    PV_ROWS => x86::pv_avx512::<PV_ROWS>(&args, o, ldo),
                    _ => unreachable!("P·V tiles hold 1 or {PV_ROWS} rows"),
                }
            },
            #[cfg(target_arch = "x86_64")]
            Kernels::Avx2 => unsafe { x86::pv_avx2(&args, rows, o, ldo) },
            _ => pv_portable(&args, rows, o, ldo),
        }
    }

    /// Softmax of `row[..visible]` in place: max subtracted, f32 exponentials, their sum in
    /// fixed point ([`SUM_ONE`]), each divided by it; `row[visible..]` becomes 0.
    fn softmax(self, row: &mut [f32], visible: usize) {
        let (live, hidden) = row.split_at_mut(visible);
        hidden.fill(0.0);
        match self {
            // SAFETY: AVX-512F and DQ were detected in `for_isa`.
            #[cfg(target_arch = "x86_64")]
            Kernels::Avx512 => unsafe { x86::softmax_avx512(live) },
            _ => {
                let max = live.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0i64;
                for x in live.iter_mut() {
                    *x = (*x - max).exp();
                    sum += (f64::from(*x) * SUM_ONE) as i64;
                }
                let total = (sum as f64 / SUM_ONE) as f32;
                live.iter_mut().for_each(|x| *x /= total);
            }
        }
    }
}

fn scores_portable(args: &ScoreArgs<'_>, c: &mut [f32], ldc: usize) {
    let d = args.d;
    for (p, panel) in args.kt.chunks_exact(d * KEYS).enumerate() {
        for (r, a) in args.a.chunks_exact(d).enumerate() {
            let mut acc = [0f32; KEYS];
            for (&x, kc) in a.iter().zip(panel.chunks_exact(KEYS)) {
                acc.iter_mut().zip(kc).for_each(|(s, &kv)| *s += x * kv);
            }
            let dst = &mut c[r * ldc + p * KEYS..][..KEYS];
            dst.iter_mut().zip(&acc).for_each(|(o, &s)| *o = s * args.scale);
        }
    }
}

fn pv_portable(args: &PvArgs<'_>, rows: usize, o: &mut [f32], ldo: usize) {
    for r in 0..rows {
        let mut acc = [0f32; PV_COLS];
        let p = &args.p[r * args.ldp..][..args.keys];
        for (j, &pj) in p.iter().enumerate() {
            let vj = &args.v[j * args.ldv..][..args.cols];
            acc.iter_mut().zip(vj).for_each(|(a, &x)| *a += pj * x);
        }
        o[r * ldo..][..args.cols].copy_from_slice(&acc[..args.cols]);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{PvArgs, ScoreArgs, KEYS, PV_COLS, SUM_ONE};
    use crate::backend::cpu::vmath::x86::exp;

    /// The AVX-512 score tile: R rows x 32 keys in 2R zmm accumulators; per channel two loads of
    /// the panel and one broadcast per row.
    ///
    /// # Safety
    /// AVX-512F; `Kernels::scores`' asserts (R rows of a, c rows of ldc >= every panel's keys).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn scores_avx512<const R: usize>(args: &ScoreArgs<'_>, c: &mut [f32], ldc: usize) {
        let (d, a) = (args.d, args.a.as_ptr());
        let scale = _mm512_set1_ps(args.scale);
        for (p, panel) in args.kt.chunks_exact(d * KEYS).enumerate() {
            let bp = panel.as_ptr();
            let mut acc = [[_mm512_setzero_ps(); 2]; R];
            for ch in 0..d {
                // SAFETY: ch < d: inside the panel's d * KEYS floats and a's R rows of d.
                let (b0, b1) = unsafe { (_mm512_loadu_ps(bp.add(ch * KEYS)), _mm512_loadu_ps(bp.add(ch * KEYS + 16))) };
                for (r, acc_row) in acc.iter_mut().enumerate() {
                    let x = _mm512_set1_ps(unsafe { *a.add(r * d + ch) });
                    acc_row[0] = _mm512_fmadd_ps(x, b0, acc_row[0]);
                    acc_row[1] = _mm512_fmadd_ps(x, b1, acc_row[1]);
                }
            }
            for (r, acc_row) in acc.iter().enumerate() {
                // SAFETY: row r < R of c, columns p * KEYS + 32 <= ldc.
                unsafe {
                    let dst = c.as_mut_ptr().add(r * ldc + p * KEYS);
                    _mm512_storeu_ps(dst, _mm512_mul_ps(acc_row[0], scale));
                    _mm512_storeu_ps(dst.add(16), _mm512_mul_ps(acc_row[1], scale));
                }
            }
        }
    }

    /// The AVX-512 P·V tile: R rows x 64 columns in 4R zmm accumulators; per key four masked
    /// loads of V's row and one broadcast per row.
    ///
    /// # Safety
    /// AVX-512F; `Kernels::pv`'s asserts.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn pv_avx512<const R: usize>(args: &PvArgs<'_>, o: &mut [f32], ldo: usize) {
        let lanes = |t: usize| -> __mmask16 { ((1u32 << args.cols.saturating_sub(16 * t).min(16)) - 1) as u16 };
        let masks = [lanes(0), lanes(1), lanes(2), lanes(3)];
        let (p, v) = (args.p.as_ptr(), args.v.as_ptr());
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        for j in 0..args.keys {
            let row = v.wrapping_add(j * args.ldv);
            let mut vj = [_mm512_setzero_ps(); 4];
            for (t, x) in vj.iter_mut().enumerate() {
                // SAFETY: row j < keys of V; lanes past `cols` are masked off and not read.
                *x = unsafe { _mm512_maskz_loadu_ps(masks[t], row.wrapping_add(16 * t)) };
            }
            for (r, acc_row) in acc.iter_mut().enumerate() {
                // SAFETY: row r < R of p, key j < keys <= ldp.
                let x = _mm512_set1_ps(unsafe { *p.add(r * args.ldp + j) });
                for (a, &vv) in acc_row.iter_mut().zip(&vj) {
                    *a = _mm512_fmadd_ps(x, vv, *a);
                }
            }
        }
        for (r, acc_row) in acc.iter().enumerate() {
            for (t, &a) in acc_row.iter().enumerate() {
                // SAFETY: row r of o, columns < cols (the rest masked off).
                unsafe { _mm512_mask_storeu_ps(o.as_mut_ptr().wrapping_add(r * ldo + 16 * t), masks[t], a) };
            }
        }
    }

    /// Lane mask of the first `n` (<= 8) of 8 lanes, for `_mm256_maskload_ps`.
    #[target_feature(enable = "avx2")]
    fn lanes8(n: usize) -> __m256i {
        _mm256_cmpgt_epi32(_mm256_set1_epi32(n.min(8) as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
    }

    /// The AVX2 score tile: per panel, rows in groups of 4 x 16 keys (8 ymm accumulators), the
    /// same fused channel-order sums as the AVX-512 tile.
    ///
    /// # Safety
    /// AVX2 and FMA; `Kernels::scores`' asserts.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn scores_avx2(args: &ScoreArgs<'_>, c: &mut [f32], ldc: usize) {
        let (d, a) = (args.d, args.a.as_ptr());
        let rows = args.a.len() / d;
        let scale = _mm256_set1_ps(args.scale);
        for (p, panel) in args.kt.chunks_exact(d * KEYS).enumerate() {
            for half in [0, 16] {
                for r0 in (0..rows).step_by(4) {
                    let n = (rows - r0).min(4);
                    let mut acc = [[_mm256_setzero_ps(); 2]; 4];
                    for ch in 0..d {
                        // SAFETY: ch < d, inside the panel; rows r0 + r < rows of a.
                        let bp = unsafe { panel.as_ptr().add(ch * KEYS + half) };
                        let (b0, b1) = unsafe { (_mm256_loadu_ps(bp), _mm256_loadu_ps(bp.add(8))) };
                        for (r, acc_row) in acc.iter_mut().enumerate().take(n) {
                            let x = _mm256_set1_ps(unsafe { *a.add((r0 + r) * d + ch) });
                            acc_row[0] = _mm256_fmadd_ps(x, b0, acc_row[0]);
                            acc_row[1] = _mm256_fmadd_ps(x, b1, acc_row[1]);
                        }
                    }
                    for (r, acc_row) in acc.iter().enumerate().take(n) {
                        // SAFETY: row r0 + r < rows of c, columns p * KEYS + half + 16 <= ldc.
                        unsafe {
                            let dst = c.as_mut_ptr().add((r0 + r) * ldc + p * KEYS + half);
                            _mm256_storeu_ps(dst, _mm256_mul_ps(acc_row[0], scale));
                            _mm256_storeu_ps(dst.add(8), _mm256_mul_ps(acc_row[1], scale));
                        }
                    }
                }
            }
        }
    }

    /// The AVX2 P·V tile: rows in pairs x 32 columns (8 ymm accumulators, 4 masked loads of V's
    /// row per key).
    ///
    /// # Safety
    /// AVX2 and FMA; `Kernels::pv`'s asserts.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn pv_avx2(args: &PvArgs<'_>, rows: usize, o: &mut [f32], ldo: usize) {
        let (p, v) = (args.p.as_ptr(), args.v.as_ptr());
        for c0 in (0..args.cols).step_by(PV_COLS / 2) {
            let masks = [0, 1, 2, 3].map(|t| lanes8(args.cols.saturating_sub(c0 + 8 * t)));
            for r0 in (0..rows).step_by(2) {
                let n = (rows - r0).min(2);
                let mut acc = [[_mm256_setzero_ps(); 4]; 2];
                for j in 0..args.keys {
                    let row = v.wrapping_add(j * args.ldv + c0);
                    let mut vj = [_mm256_setzero_ps(); 4];
                    for (t, x) in vj.iter_mut().enumerate() {
                        // SAFETY: row j < keys of V; masked lanes (columns >= cols) not read.
                        *x = unsafe { _mm256_maskload_ps(row.wrapping_add(8 * t), masks[t]) };
                    }
                    for (r, acc_row) in acc.iter_mut().enumerate().take(n) {
                        // SAFETY: row r0 + r < rows of p, key j < keys <= ldp.
                        let x = _mm256_set1_ps(unsafe { *p.add((r0 + r) * args.ldp + j) });
                        for (a, &vv) in acc_row.iter_mut().zip(&vj) {
                            *a = _mm256_fmadd_ps(x, vv, *a);
                        }
                    }
                }
                for (r, acc_row) in acc.iter().enumerate().take(n) {
                    for (t, &a) in acc_row.iter().enumerate() {
                        let dst = o.as_mut_ptr().wrapping_add((r0 + r) * ldo + c0 + 8 * t);
                        // SAFETY: row r0 + r of o, columns < cols (the rest masked off).
                        unsafe { _mm256_maskstore_ps(dst, masks[t], a) };
                    }
                }
            }
        }
    }

    /// `Kernels::softmax` on AVX-512: the max and exponentials 16 lanes at a time, the
    /// exponentials' fixed-point sum in 8 i64 lanes.
    ///
    /// # Safety
    /// AVX-512F and AVX-512DQ.
    #[target_feature(enable = "avx512f,avx512dq")]
    pub(super) unsafe fn softmax_avx512(live: &mut [f32]) {
        let lanes = |n: usize| -> __mmask16 { ((1u32 << n.min(16)) - 1) as u16 };
        let mut maxv = _mm512_set1_ps(f32::NEG_INFINITY);
        for chunk in live.chunks(16) {
            let m = lanes(chunk.len());
            // SAFETY: the mask covers the chunk's lanes only.
            let x = unsafe { _mm512_maskz_loadu_ps(m, chunk.as_ptr()) };
            maxv = _mm512_mask_max_ps(maxv, m, maxv, x);
        }
        let max = _mm512_set1_ps(_mm512_reduce_max_ps(maxv));
        let one = _mm512_set1_pd(SUM_ONE);
        let mut sum = _mm512_setzero_si512();
        for chunk in live.chunks_mut(16) {
            let m = lanes(chunk.len());
            // SAFETY: masked to the chunk's lanes.
            let e =
                _mm512_maskz_mov_ps(m, exp(_mm512_sub_ps(unsafe { _mm512_maskz_loadu_ps(m, chunk.as_ptr()) }, max)));
            unsafe { _mm512_mask_storeu_ps(chunk.as_mut_ptr(), m, e) };
            let lo = _mm512_cvtps_pd(_mm512_castps512_ps256(e));
            let hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(e))));
            sum = _mm512_add_epi64(sum, _mm512_cvttpd_epi64(_mm512_mul_pd(lo, one)));
            sum = _mm512_add_epi64(sum, _mm512_cvttpd_epi64(_mm512_mul_pd(hi, one)));
        }
        let total = _mm512_set1_ps((_mm512_reduce_add_epi64(sum) as f64 / SUM_ONE) as f32);
        for chunk in live.chunks_mut(16) {
            let m = lanes(chunk.len());
            // SAFETY: masked to the chunk's lanes.
            unsafe {
                let e = _mm512_maskz_loadu_ps(m, chunk.as_ptr());
                _mm512_mask_storeu_ps(chunk.as_mut_ptr(), m, _mm512_div_ps(e, total));
            }
        }
    }
}

//! The GEMM behind [`super::ops::linear`] above the GEMV rows: `t = x · wᵀ` with f32 activations,
//! fp16 weights widened to f32 once per packed panel, and f32 accumulation on every path.
//!
//! Three paths, picked once at run time from the CPU's features ([`Isa::detect`]) or forced with
//! `GLIMPSE_CPU_ISA` (so CI can test each on one machine):
//! - `avx512`: a register-blocked AVX-512 microkernel (MR x NR = 14 x 32 f32 tile, 28 zmm
//!   accumulators, one broadcast of x and two loads of w per k step) over packed panels;
//! - `avx2`: the same tiles with an AVX2/FMA microkernel (3 rows x 32 columns at a time, 12 ymm
//!   accumulators), for CPUs without AVX-512;
//! - `portable`: the same blocking and packing with a plain-Rust microkernel, for CPUs with
//!   neither (and as a second implementation of the packing the tests check).
//!
//! The blocking (BLIS order): x is packed once per call into MR-row tiles `[k][MR]`; each task
//! owns a block of rows x a block of output features; per KC slice of k it widens and transposes
//! its weight rows into NR-column panels `[KC][NR]` (L2-sized), then runs every row tile (packed
//! x, L1) against every panel. Products land in per-task blocks the caller's epilogue consumes.
//!
//! **A row's result does not depend on the other rows of the call** (their number, its place
//! among them, the tiles and blocks it falls in): every output is summed in one accumulator in k
//! order within each KC slice (an FMA per step on `avx512` and `avx2`, which therefore agree to
//! the bit; a product then a sum on `portable`), and the slices are added in k order. So a
//! prompt's rows come out of a batched, left-padded prefill exactly as they do alone
//! (tests/batch_exact.rs). The `avx2` path used to be the `gemm` crate, whose blocking and
//! kernels change with the row count (a row of a 4-row call differed from the row alone).

use std::cell::RefCell;
use std::ops::Range;
use std::sync::OnceLock;

use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use crate::backend::GemmDims;

/// Rows of x per microkernel tile (broadcast operand).
pub(super) const MR: usize = 14;
/// Output features per microkernel tile: two 16-lane vectors.
pub(super) const NR: usize = 32;
/// k per packed slice: a row tile of packed x (KC * MR * 4 = 14 KiB) stays in L1.
pub(super) const KC: usize = 256;
/// Row tiles per task block: bounds a task's product block, and lets big batches split by rows.
const TILES_PER_ROW_BLOCK: usize = 24;
/// Most weight panels per task: KC * NR * 4 * 16 = 512 KiB of packed weights, in a core's L2.
const MAX_PANELS_PER_BLOCK: usize = 16;

/// Environment variable that forces a GEMM path (`avx512`, `avx2`, `portable`).
pub const ISA_ENV: &str = "GLIMPSE_CPU_ISA";

/// An instruction-set path of the GEMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2,
    Portable,
}

impl Isa {
    pub const ALL: [Isa; 3] = [Isa::Avx512, Isa::Avx2, Isa::Portable];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Portable => "portable",
        }
    }

    /// Whether this CPU can run the path (`avx2` runs anywhere: without AVX2 + FMA its tiles
    /// take the portable microkernel, but detection only picks it when they are present).
    pub fn available(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => std::is_x86_feature_detected!("avx512f"),
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx512 => false,
            Isa::Avx2 | Isa::Portable => true,
        }
    }

    /// The fastest path this CPU has.
    pub fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if Isa::Avx512.available() {
                return Isa::Avx512;
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }

    /// The path `GLIMPSE_CPU_ISA`'s value (`None`: unset) asks for: detection when unset, an
    /// error for an unknown name or a path this CPU lacks.
    pub fn from_env_value(value: Option<&str>) -> Result<Isa, String> {
        let Some(v) = value else { return Ok(Isa::detect()) };
        let names = Isa::ALL.map(Isa::name).join(", ");
        let isa = Isa::ALL
            .into_iter()
            .find(|i| i.name() == v)
            .ok_or_else(|| format!("{ISA_ENV}={v}: unknown CPU path (expected one of {names})"))?;
        if !isa.available() {
            return Err(format!("{ISA_ENV}={v}: this CPU lacks the instructions the path needs"));
        }
        Ok(isa)
    }
}

/// The path every [`matmul`] call takes: `GLIMPSE_CPU_ISA` if set, else detection; read once.
pub fn selected() -> Result<Isa, String> {
    static SELECTED: OnceLock<Result<Isa, String>> = OnceLock::new();
    SELECTED.get_or_init(|| Isa::from_env_value(std::env::var(ISA_ENV).ok().as_deref())).clone()
}

/// `epilogue(out_segment, acc, cols)` for every output row r and column block `cols`, where
/// `out_segment` is `out[r, cols]` (`out` is `[m, n]` row-major) and `acc[c]` is
/// `sum_k x[r, k] * w[cols.start + c, k]` accumulated in f32. The epilogue runs in parallel, once
/// per (row, column block).
pub fn matmul<E>(isa: Isa, x: &[f32], w: &[f16], dims: GemmDims, out: &mut [f32], epilogue: E)
where
    E: Fn(&mut [f32], &[f32], Range<usize>) + Sync,
{
    matmul_rows(isa, x, w, dims, out, epilogue)
}

/// The weight operand of [`matmul_rows`]: `[n, k]` rows (PyTorch Linear layout) that are widened
/// to f32 a panel or a block at a time, never as a whole: fp16 weights, or weights quantized at
/// load (`super::qgemm`).
pub trait WeightRows: Sync {
    /// Elements held (`n * k`).
    fn elements(&self) -> usize;
    /// Packs weight rows `rows` (at most NR; columns past them zero), k slice `k0..k0 + kc`
    /// (`kc = panel.len() / NR`), as the panel `[kc][NR]`:
    /// `panel[kk * NR + j] = f32(w[rows.start + j, k0 + kk])`.
    fn pack_panel(&self, isa: Isa, k: usize, rows: Range<usize>, k0: usize, panel: &mut [f32]);
}

impl WeightRows for [f16] {
    fn elements(&self) -> usize {
        self.len()
    }
    fn pack_panel(&self, isa: Isa, k: usize, rows: Range<usize>, k0: usize, panel: &mut [f32]) {
        pack_w_panel(isa, self, k, rows, k0, panel)
    }
}

/// [`matmul`] over any [`WeightRows`].
pub fn matmul_rows<W, E>(isa: Isa, x: &[f32], w: &W, dims: GemmDims, out: &mut [f32], epilogue: E)
where
    W: WeightRows + ?Sized,
    E: Fn(&mut [f32], &[f32], Range<usize>) + Sync,
{
    let GemmDims { m, n, k } = dims;
    assert!(m > 0 && n > 0 && k > 0, "matmul: empty shape");
    assert!(isa.available(), "matmul: the {} path needs instructions this CPU lacks", isa.name());
    assert!(x.len() >= m * k && w.elements() == n * k && out.len() >= m * n, "matmul: buffer sizes");
    packed_matmul(isa, x, w, dims, &mut out[..m * n], &epilogue)
}

thread_local! {
    /// Packed-x scratch of the calling thread, reused across calls (a batch's x is tens of MB:
    /// fresh pages each call would cost page faults). Taken out while in use, so a nested call
    /// on the same thread (rayon work stealing) just allocates its own.
    static PACKED_X: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Packed-weight panels of one task, per worker thread (at most 512 KiB), reused likewise.
    static PACKED_W: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// One task's product block, per worker thread, reused likewise.
    static BLOCK_PRODUCT: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on a thread-local scratch of at least `len` floats (contents unspecified).
fn with_scratch<R>(
    key: &'static std::thread::LocalKey<RefCell<Vec<f32>>>,
    len: usize,
    f: impl FnOnce(&mut [f32]) -> R,
) -> R {
    let mut buf = key.with(|c| std::mem::take(&mut *c.borrow_mut()));
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    let r = f(&mut buf[..len]);
    key.with(|c| *c.borrow_mut() = buf);
    r
}

/// `out` (`[m, n]` row-major) shared by tasks that each write their own block of it.
#[derive(Clone, Copy)]
struct SharedOut {
    ptr: *mut f32,
    n: usize,
}

// SAFETY: tasks only touch disjoint blocks (see `row_segment`), from any thread.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// Row `r`, columns `cols`, of `out`.
    ///
    /// # Safety
    /// `r < m`, `cols.end <= n`, and no other live reference overlaps the segment: each task
    /// asks only for rows and columns of its own block, and blocks partition `out`.
    unsafe fn row_segment<'a>(self, r: usize, cols: Range<usize>) -> &'a mut [f32] {
        // SAFETY: in bounds and unaliased by the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(r * self.n + cols.start), cols.len()) }
    }
}

/// Every path: see the module comment for the blocking. Each task applies
/// the epilogue to its block of `out` straight from its product, while it is in cache.
fn packed_matmul<W, E>(isa: Isa, x: &[f32], w: &W, dims: GemmDims, out: &mut [f32], epilogue: &E)
where
    W: WeightRows + ?Sized,
    E: Fn(&mut [f32], &[f32], Range<usize>) + Sync,
{
    let GemmDims { m, n, k } = dims;
    let row_tiles = m.div_ceil(MR);
    let panels = n.div_ceil(NR);
    // Column blocks: a multiple of the thread count where there are enough panels, so the last
    // round of tasks is not one thread's alone.
    let threads = rayon::current_num_threads().max(1);
    let target_blocks = threads * panels.div_ceil(threads * MAX_PANELS_PER_BLOCK);
    let panels_per_block = panels.div_ceil(target_blocks.min(panels));
    let col_blocks = panels.div_ceil(panels_per_block);
    let row_blocks = row_tiles.div_ceil(TILES_PER_ROW_BLOCK);
    let rows_per_block = TILES_PER_ROW_BLOCK * MR;
    let shared = SharedOut { ptr: out.as_mut_ptr(), n };
    with_scratch(&PACKED_X, row_tiles * k * MR, |packed_x| {
        pack_x(x, m, k, packed_x);
        let packed_x: &[f32] = packed_x;
        (0..row_blocks * col_blocks).into_par_iter().for_each(|task| {
            let (rb, cb) = (task / col_blocks, task % col_blocks);
            let rows = rb * rows_per_block..((rb + 1) * rows_per_block).min(m);
            let cols = cb * panels_per_block * NR..((cb + 1) * panels_per_block * NR).min(n);
            with_scratch(&BLOCK_PRODUCT, rows.len() * cols.len(), |t| {
                with_scratch(&PACKED_W, panels_per_block * KC * NR, |panel_buf| {
                    block_product(isa, packed_x, w, k, (rows.clone(), cols.clone()), panel_buf, t)
                });
                for (r, acc) in rows.clone().zip(t.chunks_exact(cols.len())) {
                    // SAFETY: r < m and cols.end <= n; (rows, cols) is this task's block, and the
                    // tasks' blocks partition out.
                    let out_segment = unsafe { shared.row_segment(r, cols.clone()) };
                    epilogue(out_segment, acc, cols.clone());
                }
            })
        });
    })
}

/// Packs x (`[m, k]`) into row tiles `[m.div_ceil(MR)][k][MR]`, rows past `m` zero.
fn pack_x(x: &[f32], m: usize, k: usize, packed: &mut [f32]) {
    // Below this many floats a rayon round trip costs more than the copy.
    const PARALLEL_FROM: usize = 1 << 16;
    let min_tiles = if packed.len() < PARALLEL_FROM { usize::MAX } else { 1 };
    packed.par_chunks_mut(k * MR).with_min_len(min_tiles).enumerate().for_each(|(tile, dst)| {
        let rows = MR.min(m - tile * MR);
        for (kk, group) in dst.chunks_exact_mut(MR).enumerate() {
            for (r, v) in group.iter_mut().enumerate() {
                *v = if r < rows { x[(tile * MR + r) * k + kk] } else { 0.0 };
            }
        }
    });
}

/// One task: the product block `rows x cols` of `x · wᵀ` into `t`, row-major (every element is
/// written).
fn block_product<W: WeightRows + ?Sized>(
    isa: Isa,
    packed_x: &[f32],
    w: &W,
    k: usize,
    (rows, cols): (Range<usize>, Range<usize>),
    panel_buf: &mut [f32],
    t: &mut [f32],
) {
    let width = cols.len();
    let panels = width.div_ceil(NR);
    for k0 in (0..k).step_by(KC) {
        let kc = KC.min(k - k0);
        let packed_w = &mut panel_buf[..panels * kc * NR];
        for (p, panel) in packed_w.chunks_exact_mut(kc * NR).enumerate() {
            let j0 = cols.start + p * NR;
            w.pack_panel(isa, k, j0..(j0 + NR).min(cols.end), k0, panel);
        }
        for tile_row in (rows.start..rows.end).step_by(MR) {
            let tile_rows = MR.min(rows.end - tile_row);
            let tile = &packed_x[(tile_row / MR * k + k0) * MR..][..kc * MR];
            for (p, panel) in packed_w.chunks_exact(kc * NR).enumerate() {
                let c0 = (tile_row - rows.start) * width + p * NR;
                let cols_here = NR.min(width - p * NR);
                let dst = &mut t[c0..c0 + (tile_rows - 1) * width + cols_here];
                let tile_args =
                    TileArgs { kc, a: tile, b: panel, c: dst, ldc: width, cols: cols_here, accumulate: k0 > 0 };
                run_tile(isa, tile_rows, tile_args);
            }
        }
    }
}

/// Operands of one microkernel call: `c[r * ldc + j] (+)= sum_kk a[kk * MR + r] * b[kk * NR + j]`
/// for the call's rows and `j < cols`, `kk < kc`.
struct TileArgs<'a> {
    kc: usize,
    a: &'a [f32],
    b: &'a [f32],
    c: &'a mut [f32],
    ldc: usize,
    cols: usize,
    accumulate: bool,
}

/// Calls the microkernel instantiated for `rows` (1..=MR) rows.
fn run_tile(isa: Isa, rows: usize, args: TileArgs<'_>) {
    assert!(args.a.len() >= args.kc * MR && args.b.len() >= args.kc * NR && args.cols <= NR, "tile: operands");
    assert!((1..=MR).contains(&rows) && args.c.len() >= (rows - 1) * args.ldc + args.cols, "tile: output");
    macro_rules! by_rows {
        ($kernel:ident, $($r:literal)*) => {
            match rows {
                $($r => $kernel::<$r>(args),)*
                _ => unreachable!("tile rows checked above"),
            }
        };
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            // SAFETY: `Isa::Avx512` is only chosen where `available()` holds (detection, the
            // environment check, tests); the operand extents the kernel touches are asserted
            // above.
            unsafe { by_rows!(tile_avx512, 1 2 3 4 5 6 7 8 9 10 11 12 13 14) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if avx2_fma() => {
            // SAFETY: AVX2 and FMA were detected just above; operand extents asserted above.
            unsafe { by_rows!(tile_avx2, 1 2 3 4 5 6 7 8 9 10 11 12 13 14) }
        }
        _ => by_rows!(tile_portable, 1 2 3 4 5 6 7 8 9 10 11 12 13 14),
    }
}

fn tile_portable<const ROWS: usize>(args: TileArgs<'_>) {
    let mut acc = [[0f32; NR]; ROWS];
    for kk in 0..args.kc {
        let b = &args.b[kk * NR..][..NR];
        for (r, acc_row) in acc.iter_mut().enumerate() {
            let a = args.a[kk * MR + r];
            acc_row.iter_mut().zip(b).for_each(|(s, &bv)| *s += a * bv);
        }
    }
    for (r, acc_row) in acc.iter().enumerate() {
        let c = &mut args.c[r * args.ldc..][..args.cols];
        for (o, &v) in c.iter_mut().zip(acc_row) {
            *o = if args.accumulate { *o + v } else { v };
        }
    }
}

/// The AVX-512 microkernel: a ROWS x 32 tile in 2 * ROWS zmm accumulators; per k step two loads
/// of the panel and one broadcast of x per row, each feeding two FMAs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_avx512<const ROWS: usize>(args: TileArgs<'_>) {
    use std::arch::x86_64::*;
    let (ap, bp) = (args.a.as_ptr(), args.b.as_ptr());
    let mut acc = [[_mm512_setzero_ps(); 2]; ROWS];
    for kk in 0..args.kc {
        // SAFETY: kk < kc, and a holds kc * MR, b kc * NR floats (asserted in run_tile).
        let (b0, b1) = unsafe { (_mm512_loadu_ps(bp.add(kk * NR)), _mm512_loadu_ps(bp.add(kk * NR + 16))) };
        for (r, acc_row) in acc.iter_mut().enumerate() {
            // SAFETY: as above, r < ROWS <= MR.
            let a = _mm512_set1_ps(unsafe { *ap.add(kk * MR + r) });
            acc_row[0] = _mm512_fmadd_ps(a, b0, acc_row[0]);
            acc_row[1] = _mm512_fmadd_ps(a, b1, acc_row[1]);
        }
    }
    // Lanes at or past `cols` are masked off: masked loads and stores do not touch them.
    let lane_mask = |from: usize| -> __mmask16 { ((1u32 << args.cols.saturating_sub(from).min(16)) - 1) as u16 };
    let masks = [lane_mask(0), lane_mask(16)];
    let cp = args.c.as_mut_ptr();
    for (r, acc_row) in acc.iter().enumerate() {
        for (half, (&mask, &v)) in masks.iter().zip(acc_row).enumerate() {
            // wrapping_add: the address of a fully masked half may lie past the end of c.
            let dst = cp.wrapping_add(r * args.ldc + half * 16);
            // SAFETY: the unmasked lanes are row r < ROWS, columns < cols, inside c (asserted
            // c.len() >= (ROWS - 1) * ldc + cols in run_tile); masked lanes are not accessed.
            unsafe {
                let v = if args.accumulate { _mm512_add_ps(_mm512_maskz_loadu_ps(mask, dst), v) } else { v };
                _mm512_mask_storeu_ps(dst, mask, v);
            }
        }
    }
}

/// Whether the CPU has what [`tile_avx2`] is compiled for (cached by the standard library).
#[cfg(target_arch = "x86_64")]
fn avx2_fma() -> bool {
    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
}

/// The AVX2 microkernel: a ROWS x 32 tile, 3 rows at a time in 12 ymm accumulators (16
/// registers in all, with the 4 loads of the panel per k step); each output is one FMA chain in
/// k order, as in [`tile_avx512`], so the two paths give the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2<const ROWS: usize>(mut args: TileArgs<'_>) {
    let mut r0 = 0;
    while r0 < ROWS {
        // SAFETY (each call): the features are this function's; extents as asserted in run_tile.
        match ROWS - r0 {
            1 => unsafe { tile_avx2_rows::<1>(&mut args, r0) },
            2 => unsafe { tile_avx2_rows::<2>(&mut args, r0) },
            _ => unsafe { tile_avx2_rows::<3>(&mut args, r0) },
        }
        r0 += 3;
    }
}

/// Rows `r0..r0 + G` of [`tile_avx2`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn tile_avx2_rows<const G: usize>(args: &mut TileArgs<'_>, r0: usize) {
    use std::arch::x86_64::*;
    let (ap, bp) = (args.a.as_ptr(), args.b.as_ptr());
    let mut acc = [[_mm256_setzero_ps(); 4]; G];
    for kk in 0..args.kc {
        // SAFETY: kk < kc, and a holds kc * MR, b kc * NR floats (asserted in run_tile).
        let b = unsafe { [0, 8, 16, 24].map(|o| _mm256_loadu_ps(bp.add(kk * NR + o))) };
        for (r, acc_row) in acc.iter_mut().enumerate() {
            // SAFETY: as above, r0 + r < ROWS <= MR.
            let a = _mm256_set1_ps(unsafe { *ap.add(kk * MR + r0 + r) });
            for (s, &bv) in acc_row.iter_mut().zip(&b) {
                *s = _mm256_fmadd_ps(a, bv, *s);
            }
        }
    }
    for (r, acc_row) in acc.iter().enumerate() {
        let mut lanes = [0f32; NR];
        for (q, v) in acc_row.iter().enumerate() {
            // SAFETY: lanes holds 32 floats, q * 8 + 8 <= 32.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr().add(q * 8), *v) };
        }
        let c = &mut args.c[(r0 + r) * args.ldc..][..args.cols];
        for (o, &v) in c.iter_mut().zip(&lanes) {
            *o = if args.accumulate { *o + v } else { v };
        }
    }
}

/// Packs weight rows `rows` (at most NR; columns past them zero), k slice `k0..k0 + kc`, as the
/// panel `[kc][NR]`: `panel[kk * NR + j] = f32(w[(rows.start + j) * k + k0 + kk])`.
fn pack_w_panel(isa: Isa, w: &[f16], k: usize, rows: Range<usize>, k0: usize, panel: &mut [f32]) {
    let kc = panel.len() / NR;
    assert!(rows.len() <= NR && k0 + kc <= k && rows.end * k <= w.len(), "pack_w_panel: shapes");
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 {
        // SAFETY: Avx512 is only selected when the CPU has it; extents asserted above.
        return unsafe { pack_w_panel_avx512(w, k, rows, k0, panel) };
    }
    let _ = isa;
    pack_w_scalar(w, k, rows, k0, 0..kc, panel);
}

/// The scalar packing of panel rows `kks` (k offsets within the slice) for all NR columns: each
/// weight row's stretch widened at once (the `half` crate's slice conversion, F16C where the CPU
/// has it), then scattered into its column.
fn pack_w_scalar(w: &[f16], k: usize, rows: Range<usize>, k0: usize, kks: Range<usize>, panel: &mut [f32]) {
    let mut row = [0f32; KC];
    let row = &mut row[..kks.len()];
    for j in 0..NR {
        if j < rows.len() {
            let start = (rows.start + j) * k + k0;
            w[start + kks.start..start + kks.end].convert_to_f32_slice(row);
        } else {
            row.fill(0.0);
        }
        for (kk, &v) in kks.clone().zip(row.iter()) {
            panel[kk * NR + j] = v;
        }
    }
}

/// [`pack_w_panel`] with 16 x 16 blocks widened (F16C in AVX-512) and transposed in registers;
/// the k remainder (< 16) and half-panels with fewer than 16 rows go through the scalar packing.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_w_panel_avx512(w: &[f16], k: usize, rows: Range<usize>, k0: usize, panel: &mut [f32]) {
    use std::arch::x86_64::*;
    let kc = panel.len() / NR;
    let full_k = kc - kc % 16;
    if rows.len() < NR {
        return pack_w_scalar(w, k, rows, k0, 0..kc, panel);
    }
    for half in 0..2 {
        let row0 = rows.start + half * 16;
        for kb in (0..full_k).step_by(16) {
            let mut v = [_mm512_setzero_ps(); 16];
            for (i, vi) in v.iter_mut().enumerate() {
                let src = &w[(row0 + i) * k + k0 + kb..][..16];
                // SAFETY: src holds 16 f16 (32 bytes); loadu has no alignment requirement.
                *vi = _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(src.as_ptr() as *const __m256i) });
            }
            let t = transpose16(v);
            for (c, tc) in t.iter().enumerate() {
                let dst = &mut panel[(kb + c) * NR + half * 16..][..16];
                // SAFETY: dst holds 16 floats.
                unsafe { _mm512_storeu_ps(dst.as_mut_ptr(), *tc) };
            }
        }
    }
    pack_w_scalar(w, k, rows, k0, full_k..kc, panel);
}

/// Transposes a 16 x 16 f32 block held as 16 rows: out[c] lane r = rows[r] lane c.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) fn transpose16(r: [std::arch::x86_64::__m512; 16]) -> [std::arch::x86_64::__m512; 16] {
    use std::arch::x86_64::*;
    // Pairs of rows interleaved within each 128-bit lane: t[2i] = (r[2i], r[2i+1]) columns
    // 4L, 4L+1 of lane L; t[2i+1] the columns 4L+2, 4L+3.
    let mut t = [_mm512_setzero_ps(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    // u[4g + c], lane L: column 4L + c of rows 4g..4g+4.
    let mut u = [_mm512_setzero_ps(); 16];
    for g in 0..4 {
        let (a0, a1, b0, b1) = (t[4 * g], t[4 * g + 1], t[4 * g + 2], t[4 * g + 3]);
        u[4 * g] = _mm512_shuffle_ps::<0x44>(a0, b0);
        u[4 * g + 1] = _mm512_shuffle_ps::<0xEE>(a0, b0);
        u[4 * g + 2] = _mm512_shuffle_ps::<0x44>(a1, b1);
        u[4 * g + 3] = _mm512_shuffle_ps::<0xEE>(a1, b1);
    }
    // v[c] = columns (c, 8+c) of rows 0..8 by lane; v[4+c] columns (4+c, 12+c); v[8..] rows 8..16.
    let mut v = [_mm512_setzero_ps(); 16];
    for c in 0..4 {
        (v[c], v[4 + c]) = even_odd_lanes(u[c], u[4 + c]);
        (v[8 + c], v[12 + c]) = even_odd_lanes(u[8 + c], u[12 + c]);
    }
    let mut out = [_mm512_setzero_ps(); 16];
    for c in 0..4 {
        (out[c], out[8 + c]) = even_odd_lanes(v[c], v[8 + c]);
        (out[4 + c], out[12 + c]) = even_odd_lanes(v[4 + c], v[12 + c]);
    }
    out
}

/// The even 128-bit lanes of `a` then of `b`, and the odd ones likewise: (a0 a2 b0 b2, a1 a3 b1 b3).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn even_odd_lanes(
    a: std::arch::x86_64::__m512,
    b: std::arch::x86_64::__m512,
) -> (std::arch::x86_64::__m512, std::arch::x86_64::__m512) {
    use std::arch::x86_64::*;
    (_mm512_shuffle_f32x4::<0x88>(a, b), _mm512_shuffle_f32x4::<0xDD>(a, b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::accuracy::{self, full_mantissa_normal};

    /// See [`accuracy::worst_error_ratio`]: x and the widened w are exact, k products a sum.
    fn worst_error_ratio(x: &[f32], w: &[f16], out: &[f32], dims: GemmDims) -> f64 {
        let k = dims.k;
        accuracy::worst_error_ratio(x, out, dims, k, |j| w[j * k..][..k].iter().map(|v| v.to_f64()).collect())
    }

    #[test]
    fn every_available_path_matches_f64_reference() {
        // Awkward shapes: k = 1, m just above the GEMV rows, m / n / k off the 14 x 32 tile and
        // the 256 k slice, several column blocks, more rows than one row block, large k.
        let gemv_rows = super::super::simd::MAX_ROWS;
        let shapes = [
            (gemv_rows + 1, 33, 1),
            (gemv_rows + 1, 7, 3),
            (MR, NR, 16),
            (MR + 1, NR - 1, 17),
            (29, 97, 255),
            (33, 88, 300),
            (257, 64, 88),
            (TILES_PER_ROW_BLOCK * MR + 3, 40, 20),
            (9, 35 * NR + 5, 40),
            (6, 40, 2 * KC + 37),
        ];
        for isa in Isa::ALL {
            if !isa.available() {
                println!("skipping the {} path: this CPU lacks its instructions", isa.name());
                continue;
            }
            for (seed, &(m, n, k)) in shapes.iter().enumerate() {
                let dims = GemmDims { m, n, k };
                let x = full_mantissa_normal(m * k, 3 * seed as u64 + 1);
                let w: Vec<f16> =
                    crate::synth::random_normal(n * k, 3 * seed as u64 + 2).into_iter().map(f16::from_f32).collect();
                let mut out = vec![f32::NAN; m * n];
                matmul(isa, &x, &w, dims, &mut out, |o, acc, _| o.copy_from_slice(acc));
                let ratio = worst_error_ratio(&x, &w, &out, dims);
                assert!(ratio <= 1.0, "{} {dims:?}: error {ratio} x the f32 summation bound", isa.name());
            }
        }
    }

    #[test]
    fn epilogue_sees_each_output_once() {
        let dims = GemmDims { m: 31, n: 70, k: 5 };
        let x = crate::synth::random_normal(dims.m * dims.k, 11);
        let w: Vec<f16> = crate::synth::random_normal(dims.n * dims.k, 12).into_iter().map(f16::from_f32).collect();
        for isa in Isa::ALL.into_iter().filter(|i| i.available()) {
            let mut out = vec![0f32; dims.m * dims.n];
            matmul(isa, &x, &w, dims, &mut out, |o, _, _| o.iter_mut().for_each(|v| *v += 1.0));
            assert!(out.iter().all(|&v| v == 1.0), "{}: some output visited other than once", isa.name());
        }
    }

    #[test]
    fn isa_from_environment_value() {
        let detected = Isa::from_env_value(None).unwrap();
        assert_eq!(detected, Isa::detect());
        assert!(detected.available(), "detection picked {}, which this CPU cannot run", detected.name());
        assert_eq!(Isa::from_env_value(Some("avx2")), Ok(Isa::Avx2));
        assert_eq!(Isa::from_env_value(Some("portable")), Ok(Isa::Portable));
        let avx512 = Isa::from_env_value(Some("avx512"));
        assert_eq!(avx512.is_ok(), Isa::Avx512.available(), "{avx512:?}");
        for bad in ["", "AVX2", "sse", "avx-512"] {
            let err = Isa::from_env_value(Some(bad)).unwrap_err();
            assert!(err.contains(ISA_ENV) && err.contains("avx512, avx2, portable"), "{bad:?}: {err}");
        }
    }
}

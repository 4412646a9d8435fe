//! The reference CPU ops against naive f64 definitions, on fresh random data each run (seed
//! printed), at shapes that take every code path: the GEMV path (rows <= 4) and the blocked GEMM
//! path (rows > 4, N spanning several weight blocks), fused bias/activation/accumulate,
//! LayerNorm with a residual, attention with causal offsets, strides, batch and additive key
//! masks (transformers' `finfo.min` semantics). The definitions are tests/common/reference.rs,
//! shared with tests/gpu_kernels.rs.
//!
//! Tolerance: f32 results vs f64 sums of the same f16-rounded inputs; an f32 dot product of
//! length K carries <= ~K * 2^-24 relative error of the sum of |terms| (far less on average), so
//! 1e-5 relative to that magnitude (K <= 1408 here) bounds it with margin.

mod common;

use std::sync::Arc;

use common::reference::{self as refs, Attn, Rows, NONE};
use glimpse::backend::cpu::ops::{self, AttnExtras, AttnShape, HeadBias, KeyMask};
use glimpse::backend::cpu::CpuExecutor;
use glimpse::backend::{Executor, GemmDims, NormShape};
use glimpse::graph::{
    rope_inv_freq, Activation, Attention, Graph, KvLen, Op, Phase, RopeScaling, RowSelect, View, WeightTable, W,
};
use glimpse::weights::Weight;
use half::f16;

struct Rng(u64);
impl Rng {
    fn new(test: &str) -> Self {
        let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
        println!("{test}: seed {seed}");
        Rng(seed)
    }
    fn uni(&mut self) -> f32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn f32s(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.uni()).collect()
    }
    fn f16s(&mut self, n: usize) -> Vec<f16> {
        (0..n).map(|_| f16::from_f32(self.uni())).collect()
    }
}

fn close(what: &str, got: &[f32], want: &[f64], magnitude: &[f64]) {
    for (i, ((&g, &w), &m)) in got.iter().zip(want).zip(magnitude).enumerate() {
        assert!((f64::from(g) - w).abs() <= 1e-5 * m.max(1.0), "{what}[{i}]: {g} vs {w}");
    }
}

#[test]
fn linear_matches_definition() {
    let mut rng = Rng::new("linear");
    for &(rows, k, n) in &[(1, 64, 37), (3, 176, 600), (4, 88, 5), (5, 176, 1100), (33, 160, 808), (257, 100, 30)] {
        for act in refs::ACTIVATIONS {
            for accumulate in [false, true] {
                let (x, w, b) = (rng.f32s(rows * k), rng.f16s(n * k), rng.f16s(n));
                let mut out = rng.f32s(rows * n);
                let before = out.clone();
                ops::linear(&x, &w, Some(&b), act, &mut out, accumulate, GemmDims { m: rows, n, k }).unwrap();
                let want = refs::linear(&x, &w, Some(&b), act, accumulate.then_some(&before[..]), (rows, n, k));
                let mag: Vec<f64> = refs::linear_abs(&x, &w, Some(&b), (rows, n, k))
                    .iter()
                    .zip(&before)
                    .map(|(m, r)| m + f64::from(*r).abs())
                    .collect();
                close(&format!("linear {rows}x{k}x{n} {act:?} acc={accumulate}"), &out, &want, &mag);
            }
        }
    }
}

#[test]
fn layer_norm_matches_definition() {
    let mut rng = Rng::new("layer_norm");
    for &(rows, dim) in &[(1, 1), (3, 176), (7, 1408), (2, 33)] {
        let (x, r, w, b) = (rng.f32s(rows * dim), rng.f32s(rows * dim), rng.f16s(dim), rng.f16s(dim));
        for residual in [None, Some(&r[..])] {
            let mut out = vec![f32::NAN; rows * dim];
            ops::layer_norm(&x, residual, &w, Some(&b), &mut out, NormShape { rows, dim, eps: 1e-5 });
            let want = refs::layer_norm(&f32_sum(&x, residual), &w, Some(&b), 1e-5, dim);
            close(&format!("layer_norm {rows}x{dim}"), &out, &want, &vec![4.0; rows * dim]);
        }
    }
}

/// The reference's description of the attention `ops::attention_ex` runs with `s` and `ex`.
fn attn<'a>(s: &AttnShape, ex: &AttnExtras<'a>) -> Attn<'a> {
    Attn {
        batch: s.batch,
        heads: s.heads,
        kv_heads: ex.kv_heads,
        head_dim: s.head_dim,
        q_len: s.q_len,
        kv_len: s.kv_len,
        q: Rows { stride: s.q_stride, col: s.q_col, batch_stride: s.q_len },
        k: Rows { stride: s.kv_stride, col: s.k_col, batch_stride: s.kv_batch_stride },
        v: Rows { stride: s.kv_stride, col: s.v_col, batch_stride: s.kv_batch_stride },
        scale: f64::from(s.scale),
        causal: s.causal_from.map(|p| p as i64),
        kv_valid: None,
        key_mask: ex.mask.map(|m| (m.values, m.stride)),
        mask_per_query: ex.mask.is_some_and(|m| m.per_query),
        head_bias: ex.bias.map(|b| (b.values, b.stride)),
    }
}

/// [`attn`] of plain multi-head attention (`ops::attention`) with an optional key mask.
fn attention_ref(q: &[f32], k: &[f32], v: &[f32], s: &AttnShape, mask: Option<KeyMask<'_>>) -> Vec<f64> {
    refs::attention(q, k, v, &attn(s, &AttnExtras { kv_heads: s.heads, mask, bias: None }))
}

/// `x + residual` as the CPU ops form it (in f32).
fn f32_sum(x: &[f32], residual: Option<&[f32]>) -> Vec<f32> {
    residual.map_or_else(|| x.to_vec(), |r| x.iter().zip(r).map(|(a, b)| a + b).collect())
}

/// A self-attention shape over contiguous `[batch * len, heads * d]` q, k, v.
fn plain_shape(batch: usize, heads: usize, d: usize, len: usize, causal_from: Option<usize>) -> AttnShape {
    AttnShape {
        batch,
        heads,
        head_dim: d,
        q_len: len,
        kv_len: len,
        q_stride: heads * d,
        q_col: 0,
        kv_stride: heads * d,
        k_col: 0,
        v_col: 0,
        kv_batch_stride: len,
        causal_from,
        scale: (d as f32).powf(-0.5),
    }
}

#[test]
fn attention_matches_definition() {
    let mut rng = Rng::new("attention");
    // (batch, heads, head_dim, q_len, kv_len, causal position)
    for &(batch, heads, d, q_len, kv_len, causal) in
        &[(2, 2, 88, 257, 257, None), (1, 2, 64, 32, 257, None), (2, 2, 80, 5, 9, Some(4)), (3, 1, 80, 1, 12, Some(11))]
    {
        // Q is a column slice of a wider buffer (a fused qkv) to exercise strides.
        let width = heads * d;
        let q_stride = 3 * width;
        let kv_batch_stride = kv_len + 3; // cache capacity larger than what is used
        let q = rng.f32s(batch * q_len * q_stride);
        let k = rng.f32s(batch * kv_batch_stride * width);
        let v = rng.f32s(batch * kv_batch_stride * width);
        let shape = AttnShape {
            batch,
            heads,
            head_dim: d,
            q_len,
            kv_len,
            q_stride,
            q_col: width,
            kv_stride: width,
            k_col: 0,
            v_col: 0,
            kv_batch_stride,
            causal_from: causal,
            scale: (d as f32).powf(-0.5),
        };
        let mut out = vec![f32::NAN; batch * q_len * width];
        ops::attention(&q, &k, &v, &shape, None, &mut out);
        let want = attention_ref(&q, &k, &v, &shape, None);
        close(
            &format!("attention b{batch} h{heads} d{d} q{q_len} kv{kv_len} {causal:?}"),
            &out,
            &want,
            &vec![1.0; want.len()],
        );
    }
}

/// HF padding masks hold `finfo(float32).min` on masked keys. transformers' eager attention
/// adds them to the scores, where they absorb the score: a row whose keys are all masked gets
/// equal scores and returns the mean of V; partly masked rows give masked keys weight 0.
#[test]
fn attention_key_mask_follows_transformers() {
    let mut rng = Rng::new("attention_key_mask");
    let (batch, heads, d, len, stride) = (4, 3, 80, 11, 13);
    let shape = plain_shape(batch, heads, d, len, None);
    let width = heads * d;
    let (q, k, v) = (rng.f32s(batch * len * width), rng.f32s(batch * len * width), rng.f32s(batch * len * width));
    let min = f32::MIN; // torch.finfo(torch.float32).min
    let mut mask = vec![0f32; batch * stride];
    for (j, m) in mask.iter_mut().enumerate() {
        let (b, j) = (j / stride, j % stride);
        *m = match b {
            0 => min, // every key masked
            1 => {
                if j % 3 == 0 {
                    min
                } else {
                    0.0
                }
            } // left/right padding-like holes
            2 => {
                if j < 4 {
                    f32::NEG_INFINITY
                } else {
                    rng.uni()
                }
            } // -inf plus a soft bias
            _ => 2.0 * rng.uni(), // additive bias only
        };
    }
    let km = KeyMask { values: &mask, stride, per_query: false };
    let mut out = vec![f32::NAN; batch * len * width];
    ops::attention(&q, &k, &v, &shape, Some(km), &mut out);
    close(
        "attention with finfo.min / -inf / additive key masks",
        &out,
        &attention_ref(&q, &k, &v, &shape, Some(km)),
        &vec![1.0; out.len()],
    );

    // The fully masked item is the mean of its V rows (what transformers returns), not 0 or NaN.
    for i in 0..len {
        for c in 0..width {
            let mean = (0..len).map(|j| f64::from(v[j * width + c])).sum::<f64>() / len as f64;
            let got = f64::from(out[i * width + c]);
            assert!((got - mean).abs() <= 1e-5, "fully masked row {i} col {c}: {got} vs mean of V {mean}");
        }
    }
    // Masked keys of a partly masked row get no weight: changing their V changes nothing.
    let mut v2 = v.clone();
    for j in (0..len).step_by(3) {
        v2[(len + j) * width..][..width].iter_mut().for_each(|x| *x += 100.0);
    }
    let mut out2 = vec![f32::NAN; out.len()];
    ops::attention(&q, &k, &v2, &shape, Some(km), &mut out2);
    assert_eq!(
        out[len * width..2 * len * width],
        out2[len * width..2 * len * width],
        "finfo.min keys must get weight 0"
    );

    // Causal and key masks combine: a causal row whose visible keys are all masked averages them.
    let shape = plain_shape(1, heads, d, len, Some(0));
    let all_min = vec![min; len];
    let mut out = vec![f32::NAN; len * width];
    ops::attention(
        &q[..len * width],
        &k[..len * width],
        &v[..len * width],
        &shape,
        Some(KeyMask { values: &all_min, stride: len, per_query: false }),
        &mut out,
    );
    for i in 0..len {
        let mean = (0..=i).map(|j| f64::from(v[j * width])).sum::<f64>() / (i + 1) as f64;
        assert!((f64::from(out[i * width]) - mean).abs() <= 1e-5, "causal row {i}: {} vs {mean}", out[i * width]);
    }
}

/// One mask row per query row (IDEFICS' image mask): each row of each batch item sees one block
/// of keys, every key, or none (all finfo.min: transformers' mean of V).
#[test]
fn attention_per_query_mask_follows_transformers() {
    let mut rng = Rng::new("attention_per_query_mask");
    let (batch, heads, d, len) = (2, 3, 8, 11);
    let width = heads * d;
    let (q, k, v) = (rng.f32s(batch * len * width), rng.f32s(batch * len * width), rng.f32s(batch * len * width));
    let shape = plain_shape(batch, heads, d, len, None);
    let mask: Vec<f32> = (0..batch * len)
        .flat_map(|row| {
            let block = (row * 7 + 2) % 5; // 0..2: keys 4*block.., 3: none, 4: every key
            (0..len).map(move |j| if block == 4 || j / 4 == block { 0.0 } else { f32::MIN })
        })
        .collect();
    let km = KeyMask { values: &mask, stride: len, per_query: true };
    let mut out = vec![f32::NAN; batch * len * width];
    ops::attention(&q, &k, &v, &shape, Some(km), &mut out);
    close("attention with per-query masks", &out, &attention_ref(&q, &k, &v, &shape, Some(km)), &vec![1.0; out.len()]);
    // A row's own mask decides: the keys another row sees do not move it.
    let row = (0..batch * len).find(|&r| (r * 7 + 2) % 5 == 0).expect("a row seeing block 0");
    let (b, i) = (row / len, row % len);
    let mut v2 = v.clone();
    v2[(b * len + 8) * width..][..width].iter_mut().for_each(|x| *x += 100.0);
    let mut out2 = vec![f32::NAN; out.len()];
    ops::attention(&q, &k, &v2, &shape, Some(km), &mut out2);
    assert_eq!(out[row * width..][..width], out2[row * width..][..width], "row {i} of item {b} must not see key 8");
}

/// IDEFICS' gated residual through the executor: `out += tanh(alpha) * x` on the rows whose mask
/// row holds a 0, one alpha or one per column; other rows unchanged; shapes validated.
#[test]
fn gated_add_follows_transformers() {
    let mut rng = Rng::new("gated_add");
    let (rows, cols, keys) = (9, 12, 5);
    for nalpha in [1, cols] {
        let alpha = rng.f16s(nalpha);
        let mut g = Graph::new();
        let (x, mask, out) = (g.buffer("x", rows, cols), g.buffer("mask", rows, keys), g.buffer("out", rows, cols));
        g.push(Op::GatedAdd { x, alpha: W(0), mask: Some(mask), out, rows });
        let p = phase(&mut g);
        let mut ex = CpuExecutor::new(weight_table(vec![("alpha", vec![nalpha], alpha.clone())]), &g.buffers);
        let (xv, ov) = (rng.f32s(rows * cols), rng.f32s(rows * cols));
        let mv: Vec<f32> =
            (0..rows * keys).map(|i| if i / keys % 3 != 0 && i % keys == 2 { 0.0 } else { f32::MIN }).collect();
        ex.write(x, &xv).unwrap();
        ex.write(out, &ov).unwrap();
        ex.write(mask, &mv).unwrap();
        ex.run(&p).unwrap();
        let got = ex.read(out, rows).unwrap();
        let want: Vec<f64> = (0..rows * cols)
            .map(|i| {
                let (r, c) = (i / cols, i % cols);
                let a = f64::from(alpha[if nalpha == 1 { 0 } else { c }].to_f32());
                f64::from(ov[i]) + if r % 3 != 0 { a.tanh() * f64::from(xv[i]) } else { 0.0 }
            })
            .collect();
        close(&format!("gated_add alpha x{nalpha}"), &got, &want, &vec![1.0; want.len()]);
        assert!((0..rows).step_by(3).all(|r| got[r * cols..][..cols] == ov[r * cols..][..cols]), "ungated rows kept");
    }
    // Without a mask every row is added (the gated MLP of IDEFICS' cross-attention layers).
    let mut g = Graph::new();
    let (x, out) = (g.buffer("x", rows, cols), g.buffer("out", rows, cols));
    g.push(Op::GatedAdd { x, alpha: W(0), mask: None, out, rows });
    let p = phase(&mut g);
    let alpha = rng.f16s(1);
    let mut ex = CpuExecutor::new(weight_table(vec![("alpha", vec![1], alpha.clone())]), &g.buffers);
    let (xv, ov) = (rng.f32s(rows * cols), rng.f32s(rows * cols));
    ex.write(x, &xv).unwrap();
    ex.write(out, &ov).unwrap();
    ex.run(&p).unwrap();
    let t = f64::from(alpha[0].to_f32()).tanh();
    let want: Vec<f64> = ov.iter().zip(&xv).map(|(&o, &x)| f64::from(o) + t * f64::from(x)).collect();
    close("gated_add without a mask", &ex.read(out, rows).unwrap(), &want, &vec![1.0; want.len()]);
    // An alpha of neither 1 nor `cols` values is refused before anything runs.
    let mut g = Graph::new();
    let (x, mask, out) = (g.buffer("x", rows, cols), g.buffer("mask", rows, keys), g.buffer("out", rows, cols));
    g.push(Op::GatedAdd { x, alpha: W(0), mask: Some(mask), out, rows });
    let p = phase(&mut g);
    let mut ex = CpuExecutor::new(weight_table(vec![("alpha", vec![3], rng.f16s(3))]), &g.buffers);
    let err = ex.run(&p).unwrap_err().to_string();
    assert!(err.contains("gated_add") && err.contains("alpha of 3"), "{err}");
}

#[test]
fn patch_embed_is_a_strided_conv() {
    let mut rng = Rng::new("patch_embed");
    let (size, patch, dim) = (28, 14, 5);
    let px = rng.f32s(3 * size * size);
    let (w, b) = (rng.f16s(dim * 3 * patch * patch), rng.f16s(dim));
    let side = size / patch;
    let mut out = vec![f32::NAN; side * side * dim];
    ops::patch_embed(&px, size, patch, &w, &b, dim, &mut out).unwrap();
    let cols = refs::im2col(&px, (1, 3, size, size), patch);
    let dims = (side * side, dim, 3 * patch * patch);
    let want = refs::linear(&cols, &w, Some(&b), Activation::None, NONE, dims);
    let mag = refs::linear_abs(&cols, &w, Some(&b), dims);
    close("patch_embed", &out, &want, &mag);
}

#[test]
fn argmax_ties_and_log_prob() {
    assert_eq!(ops::argmax(&[1.0, 3.0, 3.0, -1.0]), 1, "ties go to the lowest index, as torch.argmax");
    let logits = [0.5f32, -1.0, 2.0];
    assert!((ops::log_prob(&logits, 2) - refs::log_softmax(&logits, 2)).abs() < 1e-12);
}

#[test]
fn norms_without_bias_match_definition() {
    let mut rng = Rng::new("norms_without_bias");
    for &(rows, dim) in &[(1, 1), (3, 176), (5, 4096), (2, 33)] {
        let (x, r, w) = (rng.f32s(rows * dim), rng.f32s(rows * dim), rng.f16s(dim));
        for residual in [None, Some(&r[..])] {
            let (mut ln, mut rms) = (vec![f32::NAN; rows * dim], vec![f32::NAN; rows * dim]);
            ops::layer_norm(&x, residual, &w, None, &mut ln, NormShape { rows, dim, eps: 1e-5 });
            ops::rms_norm(&x, residual, &w, &mut rms, NormShape { rows, dim, eps: 1e-6 });
            let s = f32_sum(&x, residual);
            let (want_ln, want_rms) = (refs::layer_norm(&s, &w, NONE, 1e-5, dim), refs::rms_norm(&s, &w, 1e-6, dim));
            close(&format!("layer_norm (no bias) {rows}x{dim}"), &ln, &want_ln, &vec![4.0; rows * dim]);
            close(&format!("rms_norm {rows}x{dim}"), &rms, &want_rms, &vec![4.0; rows * dim]);
        }
    }
}

/// CLIP's unit embeddings: each row over its norm, to f32 rounding (the op sums in f64 and rounds
/// once, so 1 ulp of the unit value is the bound); a zero row is NaN, as in transformers.
#[test]
fn l2_normalize_matches_definition() {
    let mut rng = Rng::new("l2_normalize");
    for &(rows, dim) in &[(1, 1), (3, 768), (2, 33), (32, 512)] {
        let x: Vec<f32> = rng.f32s(rows * dim).iter().map(|v| v * 40.0).collect();
        let mut out = vec![f32::NAN; rows * dim];
        ops::l2_normalize(&x, rows, dim, &mut out);
        let want = refs::l2_normalize(&x, dim);
        for (i, (&g, &w)) in out.iter().zip(&want).enumerate() {
            assert!(
                (f64::from(g) - w).abs() <= f64::from(f32::EPSILON) * w.abs().max(1e-30),
                "{rows}x{dim}[{i}]: {g} vs {w}"
            );
        }
    }
    let mut out = vec![0.0f32; 4];
    ops::l2_normalize(&[0.0; 4], 1, 4, &mut out);
    assert!(out.iter().all(|v| v.is_nan()), "a zero row divides 0 by 0, as transformers does: {out:?}");
}

/// transformers 5.17's inv_freq: the exponent in f32, the power in f64 rounded to f32, the
/// reciprocal in f32 (docs/models/llama.md#rope); linear divides by the factor; llama3 keeps high
/// frequencies, divides low ones by the factor and interpolates the band between.
#[test]
fn rope_inv_freq_follows_transformers() {
    for &(dim, base) in &[(128usize, 1e4f64), (128, 5e5), (64, 1e4), (96, 1e6)] {
        let inv = rope_inv_freq(dim, base, RopeScaling::Default);
        assert_eq!(inv.len(), dim / 2);
        for (i, &f) in inv.iter().enumerate() {
            // The exponent is an f32 (`arange(0, d, 2, dtype=float32) / d`); the rest rounds twice.
            let exact = base.powf(-f64::from((2 * i) as f32 / dim as f32));
            assert!(((f64::from(f) - exact) / exact).abs() < 1.5e-7, "d{dim} base {base} i{i}: {f} vs {exact}");
        }
        let lin = rope_inv_freq(dim, base, RopeScaling::Linear { factor: 4.0 });
        assert!(lin.iter().zip(&inv).all(|(l, f)| *l == f / 4.0), "linear scaling divides by the factor");
        let (factor, lo, hi, l) = (8.0, 1.0, 4.0, 8192.0);
        let l3 = rope_inv_freq(
            dim,
            base,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor: lo,
                high_freq_factor: hi,
                original_max_position_embeddings: l,
            },
        );
        for (i, (&got, &f)) in l3.iter().zip(&inv).enumerate() {
            let f = f64::from(f);
            let wavelen = 2.0 * std::f64::consts::PI / f;
            let want = if wavelen < l / hi {
                f
            } else if wavelen > l / lo {
                f / factor
            } else {
                let smooth = (l / wavelen - lo) / (hi - lo);
                (1.0 - smooth) * f / factor + smooth * f
            };
            assert!(((f64::from(got) - want) / want).abs() < 1e-6, "llama3 d{dim} base {base} i{i}: {got} vs {want}");
        }
    }
}

fn weight_table(ws: Vec<(&str, Vec<usize>, Vec<f16>)>) -> Arc<WeightTable> {
    let mut t = WeightTable::default();
    for (name, shape, data) in ws {
        t.add(name, Weight::from_vec(shape, data));
    }
    Arc::new(t)
}

fn phase(g: &mut Graph) -> Phase {
    g.take_phase("test")
}

/// Gated MLP on a fused `[rows, 2I]` buffer (gate columns 0..I, up columns I..2I) and on two
/// separate buffers, for SiLU, GELU and GELU-tanh.
#[test]
fn gated_act_matches_definition() {
    let mut rng = Rng::new("gated_act");
    let (rows, inter) = (7, 45);
    for act in [Activation::Silu, Activation::Gelu, Activation::GeluTanh] {
        let mut g = Graph::new();
        let fused = g.buffer("fused", rows, 2 * inter);
        let up = g.buffer("up", rows, inter);
        let (out1, out2) = (g.buffer("out1", rows, inter), g.buffer("out2", rows, inter));
        g.push(Op::GatedAct {
            gate: View { buf: fused, col: 0 },
            up: View { buf: fused, col: inter },
            act,
            out: out1,
            rows,
        });
        g.push(Op::GatedAct { gate: View { buf: fused, col: 0 }, up: up.into(), act, out: out2, rows });
        let p = phase(&mut g);
        let mut ex = CpuExecutor::new(weight_table(vec![]), &g.buffers);
        let (xf, xu) = (rng.f32s(rows * 2 * inter), rng.f32s(rows * inter));
        ex.write(fused, &xf).unwrap();
        ex.write(up, &xu).unwrap();
        ex.run(&p).unwrap();
        let (o1, o2) = (ex.read(out1, rows).unwrap(), ex.read(out2, rows).unwrap());
        let gate = refs::columns(&xf, 2 * inter, 0, inter);
        let w1 = refs::gated(act, &gate, &refs::columns(&xf, 2 * inter, inter, inter));
        let w2 = refs::gated(act, &gate, &xu);
        close(&format!("gated {act:?} fused"), &o1, &w1, &vec![1.0; w1.len()]);
        close(&format!("gated {act:?} separate"), &o2, &w2, &vec![1.0; w2.len()]);
    }
}

/// RoPE on the q and k column views of a fused qkv buffer, two sequences with left padding,
/// prefill then a decode step: f64 rotation of the f32 angle `f32(position) * inv_freq`.
#[test]
fn rope_matches_definition_with_left_padding() {
    let mut rng = Rng::new("rope");
    let (batch, seq, heads, kv_heads, d) = (2, 6, 4, 2, 16);
    let (qw, kw) = (heads * d, kv_heads * d);
    let cols = qw + 2 * kw;
    // Partial rotary (12 of 16 dims) exercises the untouched tail; llama3 the scaled table.
    let scaling = RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 64.0,
    };
    let inv: Arc<[f32]> = rope_inv_freq(12, 500.0, scaling).into();
    let pads = [0usize, 3];
    for (position, rows) in [(0usize, seq), (9, 1)] {
        let mut g = Graph::new();
        let qkv = g.buffer("qkv", batch * rows, cols);
        g.push(Op::Rope {
            x: View { buf: qkv, col: 0 },
            batch,
            rows_per_batch: rows,
            heads,
            head_dim: d,
            inv_freq: inv.clone(),
        });
        g.push(Op::Rope {
            x: View { buf: qkv, col: qw },
            batch,
            rows_per_batch: rows,
            heads: kv_heads,
            head_dim: d,
            inv_freq: inv.clone(),
        });
        let p = phase(&mut g);
        let mut ex = CpuExecutor::new(weight_table(vec![]), &g.buffers);
        let x = rng.f32s(batch * rows * cols);
        ex.write(qkv, &x).unwrap();
        ex.set_position(position);
        ex.set_left_padding(&pads);
        ex.run(&p).unwrap();
        let got = ex.read(qkv, batch * rows).unwrap();
        let pos = refs::left_padded_positions(&pads, position, rows);
        let q_done = refs::rope(&x, cols, 0, heads, d, &pos, &inv);
        let want = refs::rope(&q_done, cols, qw, kv_heads, d, &pos, &inv);
        close(&format!("rope at position {position}"), &got, &want, &vec![1.0; want.len()]);
        // The V columns and the unrotated tail dims are untouched.
        for r in 0..batch * rows {
            assert_eq!(got[r * cols + qw + kw..(r + 1) * cols], x[r * cols + qw + kw..(r + 1) * cols]);
            assert_eq!(got[r * cols + 12..r * cols + 16], x[r * cols + 12..r * cols + 16]);
        }
    }
}

/// Grouped-query attention with a padding mask and a per-head bias, directly and through the
/// executor (prefill writes a cache of kv_heads * head_dim columns from column views, then a
/// decode step reads it).
#[test]
fn grouped_query_attention_with_mask_and_bias_matches_definition() {
    let mut rng = Rng::new("gqa");
    for &(batch, heads, kv_heads, d, q_len, kv_len, causal) in &[
        (2, 8, 2, 64, 5, 9, Some(4)),
        (1, 6, 3, 80, 7, 7, None),
        (3, 4, 1, 32, 1, 12, Some(11)),
        (2, 4, 4, 16, 3, 3, Some(0)),
    ] {
        let (width, kv_width) = (heads * d, kv_heads * d);
        let kv_batch_stride = kv_len + 2;
        let q = rng.f32s(batch * q_len * width);
        let k = rng.f32s(batch * kv_batch_stride * kv_width);
        let v = rng.f32s(batch * kv_batch_stride * kv_width);
        let mask: Vec<f32> = (0..batch * (kv_len + 1)).map(|i| if i % 4 == 1 { f32::MIN } else { 0.0 }).collect();
        let bias_stride = kv_len + 3;
        let bias = rng.f32s(heads * q_len * bias_stride);
        let shape = AttnShape {
            batch,
            heads,
            head_dim: d,
            q_len,
            kv_len,
            q_stride: width,
            q_col: 0,
            kv_stride: kv_width,
            k_col: 0,
            v_col: 0,
            kv_batch_stride,
            causal_from: causal,
            scale: 0.3,
        };
        let extras = AttnExtras {
            kv_heads,
            mask: Some(KeyMask { values: &mask, stride: kv_len + 1, per_query: false }),
            bias: Some(HeadBias { values: &bias, stride: bias_stride }),
        };
        let mut out = vec![f32::NAN; batch * q_len * width];
        ops::attention_ex(&q, &k, &v, &shape, &extras, &mut out);
        let want = refs::attention(&q, &k, &v, &attn(&shape, &extras));
        close(
            &format!("gqa b{batch} h{heads}/{kv_heads} d{d} q{q_len} kv{kv_len}"),
            &out,
            &want,
            &vec![1.0; want.len()],
        );
    }

    // Through the executor: fused qkv [rows, (H + 2 Hkv) d], prefill appends K/V column views.
    let (batch, heads, kv_heads, d, seq, cap) = (2, 4, 2, 16, 5, 8);
    let (width, kv_width) = (heads * d, kv_heads * d);
    let cols = width + 2 * kv_width;
    let mut g = Graph::new();
    let qkv = g.buffer("qkv", batch * seq, cols);
    let (ck, cv) = (g.buffer("cache_k", batch * cap, kv_width), g.buffer("cache_v", batch * cap, kv_width));
    let mask = g.buffer("mask", batch, cap);
    let bias = g.buffer("bias", heads * seq, cap);
    let out = g.buffer("out", batch * seq, width);
    let step = |g: &mut Graph, rows: usize| {
        g.push(Op::KvAppend {
            k: View { buf: qkv, col: width },
            v: View { buf: qkv, col: width + kv_width },
            cache_k: ck,
            cache_v: cv,
            batch,
            rows_per_batch: rows,
            capacity: cap,
        });
        let a = Attention {
            q: qkv.into(),
            k: ck.into(),
            v: cv.into(),
            out,
            batch,
            heads,
            kv_heads,
            head_dim: d,
            q_len: rows,
            kv_len: KvLen::Cache,
            kv_batch_stride: cap,
            causal: true,
            scale: 0.25,
            key_mask: Some(mask),
            mask_per_query: false,
            head_bias: Some(bias),
        };
        g.push(Op::Attention(a));
        g.take_phase("step")
    };
    let (prefill, decode) = (step(&mut g, seq), step(&mut g, 1));
    let mut ex = CpuExecutor::new(weight_table(vec![]), &g.buffers);
    // Left padding: sequence 1 has two pad keys.
    let m = refs::left_padding_mask(&[0, 2], cap);
    ex.write(mask, &m).unwrap();
    let bias_vals = rng.f32s(heads * seq * cap);
    ex.write(bias, &bias_vals).unwrap();
    let x = rng.f32s(batch * seq * cols);
    ex.write(qkv, &x).unwrap();
    ex.run(&prefill).unwrap();
    let got = ex.read(out, batch * seq).unwrap();
    let shape = AttnShape {
        batch,
        heads,
        head_dim: d,
        q_len: seq,
        kv_len: seq,
        q_stride: cols,
        q_col: 0,
        kv_stride: cols,
        k_col: width,
        v_col: width + kv_width,
        kv_batch_stride: seq,
        causal_from: Some(0),
        scale: 0.25,
    };
    let extras = AttnExtras {
        kv_heads,
        mask: Some(KeyMask { values: &m, stride: cap, per_query: false }),
        bias: Some(HeadBias { values: &bias_vals, stride: cap }),
    };
    close("gqa executor prefill", &got, &refs::attention(&x, &x, &x, &attn(&shape, &extras)), &vec![1.0; got.len()]);

    // Decode: one new row per sequence at position seq; its bias row is row h * 1 + 0.
    ex.set_position(seq);
    let x1 = rng.f32s(batch * cols);
    ex.write(qkv, &x1).unwrap();
    ex.run(&decode).unwrap();
    let got = ex.read(out, batch).unwrap();
    let kc = ex.read(ck, batch * cap).unwrap();
    let vc = ex.read(cv, batch * cap).unwrap();
    for b in 0..batch {
        assert_eq!(
            kc[(b * cap + seq) * kv_width..][..kv_width],
            x1[b * cols + width..][..kv_width],
            "decode K row of sequence {b}"
        );
    }
    let shape = AttnShape {
        batch,
        heads,
        head_dim: d,
        q_len: 1,
        kv_len: seq + 1,
        q_stride: cols,
        q_col: 0,
        kv_stride: kv_width,
        k_col: 0,
        v_col: 0,
        kv_batch_stride: cap,
        causal_from: Some(seq),
        scale: 0.25,
    };
    let extras = AttnExtras {
        kv_heads,
        mask: Some(KeyMask { values: &m, stride: cap, per_query: false }),
        bias: Some(HeadBias { values: &bias_vals, stride: cap }),
    };
    let want = refs::attention(&x1, &kc, &vc, &attn(&shape, &extras));
    close("gqa executor decode", &got, &want, &vec![1.0; got.len()]);
}

/// CopyRows: a block of each sequence's rows out of one layout and into another (InstructBLIP's
/// query / instruction split); blocks past a sequence and a copy onto itself are errors.
#[test]
fn copy_rows_moves_blocks_and_validates() {
    let (batch, seq, dim) = (3, 7, 4);
    let mut g = Graph::new();
    let x = g.buffer("x", batch * seq, dim);
    let queries = g.buffer("queries", batch * 2, dim);
    let back = g.buffer("back", batch * seq, dim);
    let copy = |x, xr, xs, out, or, os, rows| Op::CopyRows {
        x,
        x_rows_per_batch: xr,
        x_start: xs,
        out,
        out_rows_per_batch: or,
        out_start: os,
        rows,
        batch,
    };
    g.push(copy(x, seq, 1, queries, 2, 0, 2)); // rows 1..3 of each sequence
    g.push(copy(queries, 2, 0, back, seq, 4, 2)); // to rows 4..6 of each sequence
    let p = phase(&mut g);
    let mut ex = CpuExecutor::new(weight_table(vec![]), &g.buffers);
    let data: Vec<f32> = (0..batch * seq * dim).map(|i| i as f32).collect();
    ex.write(x, &data).unwrap();
    ex.run(&p).unwrap();
    let picked = (0..batch).flat_map(|b| (1..3).map(move |i| Some(b * seq + i)));
    assert_eq!(refs::f64s(&ex.read(queries, batch * 2).unwrap()), refs::select_rows(&data, dim, picked));
    let placed = (0..batch).flat_map(|b| (0..seq).map(move |i| (4..6).contains(&i).then_some(b * seq + i - 3)));
    assert_eq!(refs::f64s(&ex.read(back, batch * seq).unwrap()), refs::select_rows(&data, dim, placed));

    for bad in [copy(x, seq, 6, queries, 2, 0, 2), copy(x, seq, 0, x, seq, 1, 2)] {
        let mut g = Graph::new();
        let (x2, q2) = (g.buffer("x", batch * seq, dim), g.buffer("queries", batch * 2, dim));
        assert_eq!((x2, q2), (x, queries));
        g.push(bad);
        let p = phase(&mut g);
        let mut ex = CpuExecutor::new(weight_table(vec![]), &g.buffers);
        let err = ex.run(&p).unwrap_err().to_string();
        assert!(err.contains("copy_rows") && err.contains("do not fit"), "{err}");
    }
}

/// SelectRows: drop CLS, pool per-sequence rows; bad indices and shapes are errors.
#[test]
fn select_rows_and_run_time_validation() {
    let (batch, seq, dim) = (3, 5, 4);
    let mut g = Graph::new();
    let x = g.buffer("x", batch * seq, dim);
    let tail = g.buffer("tail", batch * (seq - 1), dim);
    let pooled = g.buffer("pooled", batch, dim);
    g.push(Op::SelectRows { x, out: tail, batch, rows_per_batch: seq, select: RowSelect::Skip(1) });
    g.push(Op::SelectRows { x, out: pooled, batch, rows_per_batch: seq, select: RowSelect::Indexed });
    let p = phase(&mut g);
    let mut ex = CpuExecutor::new(weight_table(vec![]), &g.buffers);
    let data: Vec<f32> = (0..batch * seq * dim).map(|i| i as f32).collect();
    ex.write(x, &data).unwrap();
    let err = ex.run(&p).unwrap_err().to_string();
    assert!(err.contains("set_row_indices"), "{err}");
    ex.set_row_indices(&[4, 0, 5]);
    let err = ex.run(&p).unwrap_err().to_string();
    assert!(err.contains("row index 5"), "{err}");
    ex.set_row_indices(&[4, 0, 2]);
    ex.run(&p).unwrap();
    let skip = (0..batch).flat_map(|b| (1..seq).map(move |i| Some(b * seq + i)));
    assert_eq!(refs::f64s(&ex.read(tail, batch * (seq - 1)).unwrap()), refs::select_rows(&data, dim, skip));
    let indexed = [4, 0, 2].into_iter().enumerate().map(|(b, idx)| Some(b * seq + idx));
    assert_eq!(refs::f64s(&ex.read(pooled, batch).unwrap()), refs::select_rows(&data, dim, indexed));

    // A fixed row of every sequence (CLIP's pooled CLS), and one past the sequence is an error.
    let mut g = Graph::new();
    let x = g.buffer("x", batch * seq, dim);
    let row = g.buffer("row", batch, dim);
    g.push(Op::SelectRows { x, out: row, batch, rows_per_batch: seq, select: RowSelect::Row(3) });
    let p = phase(&mut g);
    let mut ex = CpuExecutor::new(weight_table(vec![]), &g.buffers);
    ex.write(x, &data).unwrap();
    ex.run(&p).unwrap();
    let r = ex.read(row, batch).unwrap();
    for b in 0..batch {
        assert_eq!(r[b * dim..][..dim], data[(b * seq + 3) * dim..][..dim]);
    }
    let mut g = Graph::new();
    let x = g.buffer("x", batch * seq, dim);
    let row = g.buffer("row", batch, dim);
    g.push(Op::SelectRows { x, out: row, batch, rows_per_batch: seq, select: RowSelect::Row(seq) });
    let p = phase(&mut g);
    let mut ex = CpuExecutor::new(weight_table(vec![]), &g.buffers);
    let err = ex.run(&p).unwrap_err().to_string();
    assert!(err.contains("row 5 is outside"), "{err}");

    // kv_heads that do not divide heads, and a mask narrower than the keys, are errors.
    let mut g = Graph::new();
    let q = g.buffer("q", 4, 6 * 8);
    let mask = g.buffer("mask", 1, 3);
    let out = g.buffer("o", 4, 6 * 8);
    let a = Attention {
        q: q.into(),
        k: q.into(),
        v: q.into(),
        out,
        batch: 1,
        heads: 6,
        kv_heads: 4,
        head_dim: 8,
        q_len: 4,
        kv_len: KvLen::Fixed(4),
        kv_batch_stride: 4,
        causal: false,
        scale: 1.0,
        key_mask: None,
        mask_per_query: false,
        head_bias: None,
    };
    g.push(Op::Attention(a));
    let bad_heads = phase(&mut g);
    g.push(Op::Attention(Attention { kv_heads: 6, key_mask: Some(mask), ..a }));
    let bad_mask = phase(&mut g);
    let mut ex = CpuExecutor::new(weight_table(vec![]), &g.buffers);
    let err = ex.run(&bad_heads).unwrap_err().to_string();
    assert!(err.contains("6 query heads cannot share 4 kv heads"), "{err}");
    let err = ex.run(&bad_mask).unwrap_err().to_string();
    assert!(err.contains("key mask `mask` is [1, 3]"), "{err}");
}

/// LayerNorm without bias and RMSNorm as graph ops (fused residual), on the executor.
#[test]
fn norm_ops_run_on_the_executor() {
    let mut rng = Rng::new("norm_ops");
    let (rows, dim) = (3, 40);
    let w = rng.f16s(dim);
    let weights = weight_table(vec![("w", vec![dim], w.clone())]);
    let mut g = Graph::new();
    let (x, r, ln, rms) =
        (g.buffer("x", rows, dim), g.buffer("r", rows, dim), g.buffer("ln", rows, dim), g.buffer("rms", rows, dim));
    let wid = glimpse::graph::W(0);
    g.push(Op::LayerNorm { x, residual: Some(r), weight: wid, bias: None, eps: 1e-5, out: ln, rows });
    g.push(Op::RmsNorm { x, residual: Some(r), weight: wid, eps: 1e-6, out: rms, rows });
    let p = phase(&mut g);
    let mut ex = CpuExecutor::new(weights, &g.buffers);
    let (xv, rv) = (rng.f32s(rows * dim), rng.f32s(rows * dim));
    ex.write(x, &xv).unwrap();
    ex.write(r, &rv).unwrap();
    ex.run(&p).unwrap();
    let (mut want_ln, mut want_rms) = (vec![f32::NAN; rows * dim], vec![f32::NAN; rows * dim]);
    ops::layer_norm(&xv, Some(&rv), &w, None, &mut want_ln, NormShape { rows, dim, eps: 1e-5 });
    ops::rms_norm(&xv, Some(&rv), &w, &mut want_rms, NormShape { rows, dim, eps: 1e-6 });
    assert_eq!(ex.read(ln, rows).unwrap(), want_ln);
    assert_eq!(ex.read(rms, rows).unwrap(), want_rms);
}

/// `x.permute(0, 2, 1, 3)` of a contiguous 4-d tensor, made contiguous again.
fn swap_middle(x: &[f32], [n0, n1, n2, n3]: [usize; 4]) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for a in 0..n0 {
        for c in 0..n2 {
            for b in 0..n1 {
                out.extend_from_slice(&x[((a * n1 + b) * n2 + c) * n3..][..n3]);
            }
        }
    }
    out
}

/// Idefics3Connector.pixel_shuffle written as transformers writes it (view, permute, reshape,
/// permute, reshape) against the executor's row permutation, for several grids and scales.
#[test]
fn pixel_shuffle_follows_transformers() {
    let mut rng = Rng::new("pixel_shuffle");
    for (batch, side, scale, dim) in [(1, 4, 2, 3), (3, 6, 3, 5), (2, 8, 4, 2), (2, 6, 2, 7), (1, 5, 1, 4)] {
        let x: Vec<f32> = rng.f32s(batch * side * side * dim);
        // x.view(b, h, w/s, d*s).permute(0, 2, 1, 3) -> [b, w/s, h, d*s]
        let t = swap_middle(&x, [batch, side, side / scale, dim * scale]);
        // .reshape(b, w/s, h/s, d*s²).permute(0, 2, 1, 3) -> [b, h/s, w/s, d*s²]
        let want = swap_middle(&t, [batch, side / scale, side / scale, dim * scale * scale]);
        let mut got = vec![f32::NAN; x.len()];
        ops::pixel_shuffle(&x, &mut got, dim, batch, side, scale);
        assert_eq!(got, want, "batch {batch}, side {side}, scale {scale}, dim {dim}");
    }
}

/// `gelu_pytorch_tanh` in f32: torch's f32 inner value u = kBeta (x + 0.044715 x³), then
/// 0.5 x (1 + tanh u) computed as the identical x / (1 + exp(-2u)), within 4 ulps of that value
/// taken exactly (f64) over [-20, 20], including the far negative side where 1 + tanh u cancels
/// in torch's own form. (u's own f32 rounding is torch's too: it moves both results alike, by up
/// to ~100 ulps where |u| is large.)
#[test]
fn gelu_tanh_is_within_a_few_ulps() {
    const BETA: f32 = std::f32::consts::SQRT_2 * std::f32::consts::FRAC_2_SQRT_PI * 0.5;
    let exact = |x: f32| {
        let u = BETA * (x + 0.044715 * x * x * x);
        x as f64 / (1.0 + (-2.0 * u as f64).exp())
    };
    let mut worst = 0.0f64;
    for i in -200_000..=200_000 {
        let x = i as f32 * 1e-4; // [-20, 20] in steps of 1e-4
        let (got, want) = (Activation::GeluTanh.apply(x) as f64, exact(x));
        // Relative to the value; below f32's normal range (1.2e-38, far under fp16's smallest
        // subnormal) an absolute floor.
        let ulp = (want.abs() * f32::EPSILON as f64).max(f32::MIN_POSITIVE as f64);
        worst = worst.max((got - want).abs() / ulp);
    }
    assert!(worst <= 4.0, "worst error {worst} ulps");
    assert!(Activation::GeluTanh.apply(f32::NAN).is_nan());
    assert_eq!(Activation::GeluTanh.apply(f32::INFINITY), f32::INFINITY);
    assert_eq!(Activation::GeluTanh.apply(-100.0), 0.0);
}

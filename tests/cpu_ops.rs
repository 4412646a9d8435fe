//! The reference CPU ops against naive f64 definitions, on fresh random data each run (seed
//! printed), at shapes that take every code path: the GEMV path (rows <= 4) and the blocked GEMM
//! path (rows > 4, N spanning several weight blocks), fused bias/activation/accumulate,
//! LayerNorm with a residual, attention with causal offsets, strides, batch and additive key
//! masks (transformers' `finfo.min` semantics).
//!
//! Tolerance: f32 results vs f64 sums of the same f16-rounded inputs; an f32 dot product of
//! length K carries <= ~K * 2^-24 relative error of the sum of |terms| (far less on average), so
//! 1e-5 relative to that magnitude (K <= 1408 here) bounds it with margin.

use glimpse::backend::cpu::ops::{self, AttnShape, KeyMask};
use glimpse::graph::{Activation, ATTN_MASK_FLOOR};
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

fn act64(a: Activation, x: f64) -> f64 {
    match a {
        Activation::None => x,
        Activation::Relu => x.max(0.0),
        Activation::Gelu => 0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2)),
        Activation::QuickGelu => x / (1.0 + (-1.702 * x).exp()),
        Activation::Silu => x / (1.0 + (-x).exp()),
    }
}

#[test]
fn linear_matches_definition() {
    let mut rng = Rng::new("linear");
    for &(rows, k, n) in &[(1, 64, 37), (3, 176, 600), (4, 88, 5), (5, 176, 1100), (33, 160, 808), (257, 100, 30)] {
        for act in [Activation::None, Activation::Relu, Activation::Gelu, Activation::QuickGelu, Activation::Silu] {
            for accumulate in [false, true] {
                let (x, w, b) = (rng.f32s(rows * k), rng.f16s(n * k), rng.f16s(n));
                let mut out = rng.f32s(rows * n);
                let before = out.clone();
                ops::linear(&x, rows, k, &w, n, Some(&b), act, &mut out, accumulate);
                let (mut want, mut mag) = (vec![0f64; rows * n], vec![0f64; rows * n]);
                for r in 0..rows {
                    for j in 0..n {
                        let (mut s, mut m) = (b[j].to_f64(), b[j].to_f64().abs());
                        for kk in 0..k {
                            let t = f64::from(x[r * k + kk]) * w[j * k + kk].to_f64();
                            s += t;
                            m += t.abs();
                        }
                        want[r * n + j] = act64(act, s) + if accumulate { f64::from(before[r * n + j]) } else { 0.0 };
                        mag[r * n + j] = m + f64::from(before[r * n + j]).abs();
                    }
                }
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
            ops::layer_norm(&x, residual, &w, &b, 1e-5, rows, dim, &mut out);
            let mut want = vec![0f64; rows * dim];
            for row in 0..rows {
                let s: Vec<f64> = (0..dim).map(|i| f64::from(x[row * dim + i] + residual.map_or(0.0, |r| r[row * dim + i]))).collect();
                let mean = s.iter().sum::<f64>() / dim as f64;
                let var = s.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / dim as f64;
                for i in 0..dim {
                    want[row * dim + i] = (s[i] - mean) / (var + 1e-5).sqrt() * w[i].to_f64() + b[i].to_f64();
                }
            }
            close(&format!("layer_norm {rows}x{dim}"), &out, &want, &vec![4.0; rows * dim]);
        }
    }
}

/// f64 attention over the same strided layout as `ops::attention`, with transformers' eager
/// semantics for an additive key mask (clamped to `ATTN_MASK_FLOOR`, see graph.rs).
fn attention_ref(q: &[f32], k: &[f32], v: &[f32], s: &AttnShape, mask: Option<KeyMask<'_>>) -> Vec<f64> {
    let (d, width) = (s.head_dim, s.heads * s.head_dim);
    let mut want = vec![0f64; s.batch * s.q_len * width];
    for b in 0..s.batch {
        for h in 0..s.heads {
            for i in 0..s.q_len {
                let visible = s.causal_from.map_or(s.kv_len, |p| (p + i + 1).min(s.kv_len));
                let qrow = &q[(b * s.q_len + i) * s.q_stride + s.q_col + h * d..][..d];
                let scores: Vec<f64> = (0..visible)
                    .map(|j| {
                        let krow = &k[(b * s.kv_batch_stride + j) * s.kv_stride + s.k_col + h * d..][..d];
                        let dot = qrow.iter().zip(krow).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum::<f64>();
                        let add = mask.map_or(0.0, |m| f64::from(m.values[b * m.stride + j].max(ATTN_MASK_FLOOR)));
                        dot * f64::from(s.scale) + add
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = scores.iter().map(|x| (x - max).exp()).sum();
                for c in 0..d {
                    want[(b * s.q_len + i) * width + h * d + c] = (0..visible)
                        .map(|j| (scores[j] - max).exp() / z * f64::from(v[(b * s.kv_batch_stride + j) * s.kv_stride + s.v_col + h * d + c]))
                        .sum();
                }
            }
        }
    }
    want
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
        close(&format!("attention b{batch} h{heads} d{d} q{q_len} kv{kv_len} {causal:?}"), &out, &want, &vec![1.0; want.len()]);
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
            0 => min,                                       // every key masked
            1 => if j % 3 == 0 { min } else { 0.0 },        // left/right padding-like holes
            2 => if j < 4 { f32::NEG_INFINITY } else { rng.uni() }, // -inf plus a soft bias
            _ => 2.0 * rng.uni(),                           // additive bias only
        };
    }
    let km = KeyMask { values: &mask, stride };
    let mut out = vec![f32::NAN; batch * len * width];
    ops::attention(&q, &k, &v, &shape, Some(km), &mut out);
    close("attention with finfo.min / -inf / additive key masks", &out, &attention_ref(&q, &k, &v, &shape, Some(km)), &vec![1.0; out.len()]);

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
    assert_eq!(out[len * width..2 * len * width], out2[len * width..2 * len * width], "finfo.min keys must get weight 0");

    // Causal and key masks combine: a causal row whose visible keys are all masked averages them.
    let shape = plain_shape(1, heads, d, len, Some(0));
    let all_min = vec![min; len];
    let mut out = vec![f32::NAN; len * width];
    ops::attention(&q[..len * width], &k[..len * width], &v[..len * width], &shape, Some(KeyMask { values: &all_min, stride: len }), &mut out);
    for i in 0..len {
        let mean = (0..=i).map(|j| f64::from(v[j * width])).sum::<f64>() / (i + 1) as f64;
        assert!((f64::from(out[i * width]) - mean).abs() <= 1e-5, "causal row {i}: {} vs {mean}", out[i * width]);
    }
}

#[test]
fn patch_embed_is_a_strided_conv() {
    let mut rng = Rng::new("patch_embed");
    let (size, patch, dim) = (28, 14, 5);
    let px = rng.f32s(3 * size * size);
    let (w, b) = (rng.f16s(dim * 3 * patch * patch), rng.f16s(dim));
    let side = size / patch;
    let mut out = vec![f32::NAN; side * side * dim];
    ops::patch_embed(&px, size, patch, &w, &b, dim, &mut out);
    let mut want = vec![0f64; out.len()];
    let mut mag = vec![0f64; out.len()];
    for py in 0..side {
        for pxx in 0..side {
            for o in 0..dim {
                let mut s = b[o].to_f64();
                let mut m = s.abs();
                for c in 0..3 {
                    for ky in 0..patch {
                        for kx in 0..patch {
                            let t = f64::from(px[c * size * size + (py * patch + ky) * size + pxx * patch + kx])
                                * w[((o * 3 + c) * patch + ky) * patch + kx].to_f64();
                            s += t;
                            m += t.abs();
                        }
                    }
                }
                want[(py * side + pxx) * dim + o] = s;
                mag[(py * side + pxx) * dim + o] = m;
            }
        }
    }
    close("patch_embed", &out, &want, &mag);
}

#[test]
fn argmax_ties_and_log_prob() {
    assert_eq!(ops::argmax(&[1.0, 3.0, 3.0, -1.0]), 1, "ties go to the lowest index, as torch.argmax");
    let logits = [0.5f32, -1.0, 2.0];
    let lse = logits.iter().map(|&l| f64::from(l).exp()).sum::<f64>().ln();
    assert!((ops::log_prob(&logits, 2) - (2.0 - lse)).abs() < 1e-12);
}

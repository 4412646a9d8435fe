//! The reference CPU ops against naive f64 definitions, on fresh random data each run (seed
//! printed), at shapes that take every code path: the GEMV path (rows <= 4) and the blocked GEMM
//! path (rows > 4, N spanning several weight blocks), fused bias/activation/accumulate,
//! LayerNorm with a residual, attention with causal offsets, strides and batch.
//!
//! Tolerance: f32 results vs f64 sums of the same f16-rounded inputs; an f32 dot product of
//! length K carries <= ~K * 2^-24 relative error of the sum of |terms| (far less on average), so
//! 1e-5 relative to that magnitude (K <= 1408 here) bounds it with margin.

use glimpse::backend::cpu::ops::{self, AttnShape};
use glimpse::graph::Activation;
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
        ops::attention(&q, &k, &v, &shape, &mut out);
        let mut want = vec![0f64; out.len()];
        for b in 0..batch {
            for h in 0..heads {
                for i in 0..q_len {
                    let visible = causal.map_or(kv_len, |p| (p + i + 1).min(kv_len));
                    let qrow = &q[(b * q_len + i) * q_stride + width + h * d..][..d];
                    let scores: Vec<f64> = (0..visible)
                        .map(|j| {
                            let krow = &k[(b * kv_batch_stride + j) * width + h * d..][..d];
                            qrow.iter().zip(krow).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum::<f64>() / (d as f64).sqrt()
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                    for c in 0..d {
                        want[(b * q_len + i) * width + h * d + c] = (0..visible)
                            .map(|j| (scores[j] - max).exp() / z * f64::from(v[(b * kv_batch_stride + j) * width + h * d + c]))
                            .sum();
                    }
                }
            }
        }
        close(&format!("attention b{batch} h{heads} d{d} q{q_len} kv{kv_len} {causal:?}"), &out, &want, &vec![1.0; want.len()]);
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

//! The CPU attention on every path this machine has (`ops::attention_path`: the blocked AVX-512
//! kernels and the reference), against the naive f64 definition of tests/common/reference.rs,
//! on fresh random data each run (seed printed), at shapes that take every branch of the blocked
//! kernels: 1 and many query rows, query blocks split across tasks, key counts that are not a
//! multiple of the 32-key panel, head sizes that are not a multiple of 16 and above the 64-column
//! P·V pass, grouped K/V heads, causal offsets, per-key and per-query masks and a head bias.
//! Then the property the executor's exact batching rests on: a query row's output, to the bit,
//! does not depend on masked keys (left padding) placed before its keys.
//!
//! Tolerance: as tests/cpu_ops.rs, 1e-5 absolute on outputs of magnitude <= 1 (averages of V
//! rows in [-1, 1]): f32 dot products of length <= 128 and softmax sums over <= 1030 keys carry
//! errors of a few 1e-7.

mod common;

use common::reference::{self as refs, Attn, Rows};
use glimpse::backend::cpu::gemm::Isa;
use glimpse::backend::cpu::ops::{self, AttnExtras, AttnShape, HeadBias, KeyMask};

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
}

fn paths() -> Vec<Isa> {
    Isa::ALL.into_iter().filter(|i| i.available()).collect()
}

/// One call's shape: (batch, heads, kv_heads, head_dim, q_len, kv_len, causal position).
type Case = (usize, usize, usize, usize, usize, usize, Option<usize>);

fn shape(&(batch, heads, kv_heads, d, q_len, kv_len, causal): &Case, kv_batch_stride: usize) -> AttnShape {
    // Q is a column slice of a wider buffer (a fused qkv); K and V share one buffer too.
    let (width, kv_width) = (heads * d, kv_heads * d);
    AttnShape {
        batch,
        heads,
        head_dim: d,
        q_len,
        kv_len,
        q_stride: width + 2 * kv_width,
        q_col: 0,
        kv_stride: 2 * kv_width + 3,
        k_col: 0,
        v_col: kv_width + 3,
        kv_batch_stride,
        causal_from: causal,
        scale: (d as f32).powf(-0.5),
    }
}

fn describe<'a>(s: &AttnShape, ex: &AttnExtras<'a>) -> Attn<'a> {
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

fn run(isa: Isa, q: &[f32], k: &[f32], v: &[f32], s: &AttnShape, ex: &AttnExtras<'_>) -> Vec<f32> {
    let mut out = vec![f32::NAN; s.batch * s.q_len * s.heads * s.head_dim];
    ops::attention_path(isa, q, k, v, s, ex, &mut out);
    out
}

#[test]
fn every_path_matches_definition() {
    let mut rng = Rng::new("every_path_matches_definition");
    let cases: [Case; 9] = [
        (1, 12, 12, 64, 1024, 1024, None), // SigLIP's 1024 patches: query blocks split into tasks
        (2, 2, 2, 88, 257, 257, None),     // head size 88: a 64- and a 24-column P·V pass
        (1, 2, 2, 128, 49, 1030, None),    // a block and one row; 1030 keys: a 6-key last panel
        (2, 4, 2, 80, 33, 33, Some(0)),    // causal prefill, grouped K/V
        (3, 8, 2, 64, 1, 37, Some(36)),    // one decode row per item
        (2, 4, 4, 16, 3, 7, Some(4)),      // a chunk of rows after cached keys
        (1, 3, 1, 8, 130, 130, Some(0)),   // three causal blocks, multi-query
        (2, 2, 1, 72, 96, 5, None),        // cross-attention: many rows, few keys
        (1, 1, 1, 1, 2, 1, None),          // the smallest shape
    ];
    for case in cases {
        let (batch, heads, kv_heads, d, q_len, kv_len, _) = case;
        let kv_batch_stride = kv_len + 2;
        let s = shape(&case, kv_batch_stride);
        let q = rng.f32s(batch * q_len * s.q_stride);
        let kv = rng.f32s(batch * kv_batch_stride * s.kv_stride);
        let mask_stride = kv_len + 1;
        let key_mask: Vec<f32> = (0..batch * mask_stride)
            .map(|i| match i % 5 {
                1 => f32::MIN,
                2 => f32::NEG_INFINITY,
                3 => rng.uni(),
                _ => 0.0,
            })
            .collect();
        let query_mask: Vec<f32> =
            (0..batch * q_len * mask_stride).map(|i| if i % 7 == 3 { f32::MIN } else { rng.uni() }).collect();
        let bias_stride = kv_len + 3;
        let bias = rng.f32s(heads * q_len * bias_stride);
        let variants = [
            ("plain", AttnExtras { kv_heads, mask: None, bias: None }),
            (
                "key mask + bias",
                AttnExtras {
                    kv_heads,
                    mask: Some(KeyMask { values: &key_mask, stride: mask_stride, per_query: false }),
                    bias: Some(HeadBias { values: &bias, stride: bias_stride }),
                },
            ),
            (
                "per-query mask",
                AttnExtras {
                    kv_heads,
                    mask: Some(KeyMask { values: &query_mask, stride: mask_stride, per_query: true }),
                    bias: None,
                },
            ),
        ];
        for (what, ex) in &variants {
            let want = refs::attention(&q, &kv, &kv, &describe(&s, ex));
            for isa in paths() {
                let got = run(isa, &q, &kv, &kv, &s, ex);
                for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (f64::from(g) - w).abs() <= 1e-5,
                        "{} {what} {case:?} out[{i}] (row {}, column {}): {g} vs {w}",
                        isa.name(),
                        i / (heads * d),
                        i % (heads * d),
                    );
                }
            }
        }
    }
}

/// A batch item's keys after `pad` masked keys (left padding, `finfo.min` in the mask) give its
/// query rows the same bits as the item alone, on every path: for encoder-style attention (all
/// keys, queries not padded) and for a causal prefill (queries padded too; row `pad + i` sees
/// keys up to `pad + i`).
#[test]
fn left_padding_changes_no_bit() {
    let mut rng = Rng::new("left_padding_changes_no_bit");
    for &(heads, d, len, pad, causal) in
        &[(12, 64, 1024, 7, false), (4, 88, 57, 40, false), (4, 80, 33, 9, true), (2, 64, 70, 33, true)]
    {
        let width = heads * d;
        let alone_q = rng.f32s(len * width);
        let (alone_k, alone_v) = (rng.f32s(len * width), rng.f32s(len * width));
        let full = pad + len;
        // Padding rows hold other random values: a masked key must not count, whatever it is.
        let padded = |x: &[f32], rng: &mut Rng| [rng.f32s(pad * width), x.to_vec()].concat();
        let (pk, pv) = (padded(&alone_k, &mut rng), padded(&alone_v, &mut rng));
        let pq = if causal { padded(&alone_q, &mut rng) } else { alone_q.clone() };
        let mask: Vec<f32> = (0..full).map(|j| if j < pad { f32::MIN } else { 0.0 }).collect();
        let q_len_padded = if causal { full } else { len };
        let s = |q_len: usize, kv_len: usize| AttnShape {
            batch: 1,
            heads,
            head_dim: d,
            q_len,
            kv_len,
            q_stride: width,
            q_col: 0,
            kv_stride: width,
            k_col: 0,
            v_col: 0,
            kv_batch_stride: kv_len,
            causal_from: causal.then_some(0),
            scale: 0.125,
        };
        for isa in paths() {
            let plain = AttnExtras { kv_heads: heads, mask: None, bias: None };
            let alone = run(isa, &alone_q, &alone_k, &alone_v, &s(len, len), &plain);
            let masked = AttnExtras {
                kv_heads: heads,
                mask: Some(KeyMask { values: &mask, stride: full, per_query: false }),
                bias: None,
            };
            let batched = run(isa, &pq, &pk, &pv, &s(q_len_padded, full), &masked);
            let rows = &batched[(q_len_padded - len) * width..];
            let diff = alone.iter().zip(rows).position(|(a, b)| a.to_bits() != b.to_bits());
            assert_eq!(
                diff,
                None,
                "{} h{heads} d{d} len {len} pad {pad} causal {causal}: first differing value",
                isa.name()
            );
        }
    }
}

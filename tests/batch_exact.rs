//! A batched answer equals the answer given alone, to the bit, on the CPU executor (issue 29):
//! a Linear row's result does not depend on how many other rows share the call. The executor
//! decides between the GEMV and the GEMM per sequence (`ops::LinearPath::for_step`: a decode
//! step's one row per sequence takes the GEMV however many sequences share it, every prefill
//! row the GEMM), and each path computes a row without reference to the others. Checked on
//! fresh random inputs (seed printed) for fp16, int8 and int4 weights:
//!
//! - each path directly, on every CPU path this machine has (`avx512`, `avx2`, `portable`);
//! - the executor's Linear on the path `GLIMPSE_CPU_ISA` selects (the default here;
//!   tests/batch_exact_avx2.rs forces `avx2` in its own process), decode and padded prefill;
//! - whole models: blip2-opt-tiny greedy captions and left-padded questions over 8 images, a
//!   3-beam search over 3 (9 sequences), and blip2-flan-t5-tiny captions, batched against alone.

mod common;
#[path = "batch_exact/shared.rs"]
mod shared;

use glimpse::backend::cpu::gemm::Isa;
use glimpse::backend::cpu::ops::{self, LinearPath, LinearWeight};
use glimpse::backend::GemmDims;
use glimpse::graph::Activation;
use shared::{format_name, weight, Rng, FORMATS, SHAPES};

/// `rows` rows of x through `ops::linear_path` on `isa` and `path` (bias, GELU, residual).
#[allow(clippy::too_many_arguments)]
fn op(
    isa: Isa,
    path: LinearPath,
    w: &glimpse::weights::Weight,
    bias: &[half::f16],
    x: &[f32],
    res: &[f32],
) -> Vec<u32> {
    let (n, k) = (w.shape[0], w.shape[1]);
    let rows = x.len() / k;
    let wl = match w.quantized() {
        Some(q) => LinearWeight::Quant(q),
        None => LinearWeight::F16(w.as_slice()),
    };
    let mut out = res.to_vec();
    ops::linear_path(isa, path, x, wl, Some(bias), Activation::Gelu, &mut out, true, GemmDims { m: rows, n, k });
    out.iter().map(|v| v.to_bits()).collect()
}

/// Both paths on every CPU path: the rows of a call of 8 (or 1 to 16) rows equal, bit for bit,
/// the same rows computed one per call, on the same path.
#[test]
fn each_path_computes_a_row_without_the_others() {
    let mut rng = Rng::fresh("each_path_computes_a_row_without_the_others");
    for isa in Isa::ALL {
        if !isa.available() {
            println!("skipping the {} path: this CPU lacks its instructions", isa.name());
            continue;
        }
        for format in FORMATS {
            for (n, k) in SHAPES {
                let w = weight(format, n, k, &mut rng);
                let bias = rng.f16s(n);
                let (x, res) = (rng.f32s(16 * k), rng.f32s(16 * n));
                for path in [LinearPath::Gemv, LinearPath::Gemm] {
                    let alone: Vec<Vec<u32>> =
                        (0..16).map(|r| op(isa, path, &w, &bias, &x[r * k..][..k], &res[r * n..][..n])).collect();
                    for rows in [2, 3, 4, 5, 7, 8, 9, 13, 14, 15, 16] {
                        let got = op(isa, path, &w, &bias, &x[..rows * k], &res[..rows * n]);
                        for (r, want) in alone.iter().enumerate().take(rows) {
                            assert_eq!(
                                &got[r * n..][..n],
                                &want[..],
                                "{} {} {path:?} [{n}, {k}]: row {r} of {rows} differs from the row alone",
                                isa.name(),
                                format_name(format)
                            );
                        }
                    }
                    // And the row's place in the call: rows 3.. of the 16 as a call of their own.
                    let tail = op(isa, path, &w, &bias, &x[3 * k..], &res[3 * n..]);
                    assert_eq!(&tail[..], &alone[3..].concat()[..], "{} {path:?}: shifted rows", isa.name());
                }
            }
        }
    }
}

/// The `avx2` and `avx512` GEMMs run the same tiles with one FMA chain per output in k order:
/// the same bits (so an AVX2 machine's prefill is an AVX-512 machine's).
#[test]
fn avx2_and_avx512_gemms_agree_to_the_bit() {
    if !(Isa::Avx512.available() && std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")) {
        println!("skipped: this CPU lacks AVX-512 or AVX2 + FMA");
        return;
    }
    let mut rng = Rng::fresh("avx2_and_avx512_gemms_agree_to_the_bit");
    for format in FORMATS {
        for (n, k) in SHAPES {
            let w = weight(format, n, k, &mut rng);
            let bias = rng.f16s(n);
            for rows in [1, 5, 14, 33] {
                let (x, res) = (rng.f32s(rows * k), rng.f32s(rows * n));
                let [a, b] = [Isa::Avx2, Isa::Avx512].map(|isa| op(isa, LinearPath::Gemm, &w, &bias, &x, &res));
                assert_eq!(a, b, "{} [{n}, {k}] {rows} rows", format_name(format));
            }
        }
    }
}

#[test]
fn the_rule_is_per_sequence() {
    // No sequences (encoders, direct callers): the call's rows decide, as before.
    assert_eq!(LinearPath::for_step(4, 0, 0), LinearPath::Gemv);
    assert_eq!(LinearPath::for_step(5, 0, 9), LinearPath::Gemm);
    // A decode step: one row per sequence, however many sequences.
    for seqs in [1, 4, 5, 8, 64] {
        assert_eq!(LinearPath::for_step(seqs, seqs, 3), LinearPath::Gemv, "{seqs} sequences");
    }
    // Prefill (position 0), of any length, alone or batched: the GEMM.
    for (rows, seqs) in [(1, 1), (3, 1), (8, 8), (40, 8)] {
        assert_eq!(LinearPath::for_step(rows, seqs, 0), LinearPath::Gemm, "{rows} rows of {seqs}");
    }
    // Rows that are not one per sequence in a later step: the GEMM.
    assert_eq!(LinearPath::for_step(16, 8, 3), LinearPath::Gemm);
}

#[test]
fn decode_step_rows_equal_rows_alone() {
    shared::decode_step_rows_equal_rows_alone("decode_step_rows_equal_rows_alone");
}

#[test]
fn prefill_rows_equal_rows_alone() {
    shared::prefill_rows_equal_rows_alone("prefill_rows_equal_rows_alone");
}

#[test]
fn blip2_opt_batched_answers_equal_answers_alone() {
    shared::batched_answers_equal_answers_alone("blip2-opt-tiny", true);
}

#[test]
fn blip2_flan_t5_batched_captions_equal_captions_alone() {
    shared::batched_answers_equal_answers_alone("blip2-flan-t5-tiny", false);
}

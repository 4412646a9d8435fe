//! Test helpers shared by the fp16 and quantized GEMM tests: inputs that expose rounding, and
//! the worst error of a product measured against the bound any f32 summation must stay within.

use crate::backend::GemmDims;

/// Max |got - exact| / bound over `out` `[m, n]`, with the exact product `x [m, k] · wᵀ` in f64
/// and the bound gamma * sum_k |x w| (gamma = t u / (1 - t u), u = 2^-24, t = `bound_terms`):
/// the worst-case error of any f32 summation of t exact products, FMA or not, in any order.
/// `weight_row(j)` is row j of w (k values), exact in f64.
pub(super) fn worst_error_ratio(
    x: &[f32],
    out: &[f32],
    dims: GemmDims,
    bound_terms: usize,
    weight_row: impl Fn(usize) -> Vec<f64>,
) -> f64 {
    let GemmDims { m, n, k } = dims;
    let u = f64::from(f32::EPSILON) / 2.0;
    let gamma = bound_terms as f64 * u / (1.0 - bound_terms as f64 * u);
    let mut worst = 0f64;
    for j in 0..n {
        let row = weight_row(j);
        for r in 0..m {
            let terms = (0..k).map(|kk| f64::from(x[r * k + kk]) * row[kk]);
            let (exact, mag) = terms.fold((0.0, 0.0), |(s, a), t| (s + t, a + t.abs()));
            let got = f64::from(out[r * n + j]);
            assert!(got.is_finite(), "({r}, {j}) not written");
            worst = worst.max((got - exact).abs() / (gamma * mag).max(f64::MIN_POSITIVE));
        }
    }
    worst
}

/// ~N(0, 1) values with full f32 mantissas (synth's draws are fp16 values, whose products
/// with fp16 weights would be exact in f32 and hide FMA-vs-separate rounding).
pub(super) fn full_mantissa_normal(len: usize, seed: u64) -> Vec<f32> {
    let (a, b) = (crate::synth::random_normal(len, seed), crate::synth::random_normal(len, seed + 1000));
    a.iter().zip(&b).map(|(a, b)| a + b * 1e-3).collect()
}

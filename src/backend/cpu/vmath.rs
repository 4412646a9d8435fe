//! Vector math for the CPU ops: `e^x` on 16 lanes (AVX-512) and the Linear epilogue
//! `out (+)= act(acc + bias)` built on it.
//!
//! The exp-based activations (SiLU, QuickGELU, `gelu_pytorch_tanh`) spend most of their scalar
//! time in libm's `expf`: on the `avx512` path the epilogue evaluates the same formulas as
//! [`Activation::apply`], operation for operation in f32, with the vector `exp` (within 2 ulps,
//! libm's within 1) in place of libm's. Every other activation, and every other path, is
//! [`Activation::apply`] itself. An element's value depends only on that element, so batching
//! stays exact.

use crate::backend::cpu::gemm::Isa;
use crate::graph::Activation;

/// `out[j] = act(acc[j] + bias[j])`, or `out[j] += ...` with `accumulate`, on the CPU path
/// `isa`.
pub fn epilogue(isa: Isa, act: Activation, out: &mut [f32], acc: &[f32], bias: &[f32], accumulate: bool) {
    assert!(acc.len() == out.len() && bias.len() == out.len(), "epilogue: lengths");
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512
        && matches!(act, Activation::Silu | Activation::QuickGelu | Activation::GeluTanh)
        && std::is_x86_feature_detected!("avx512f")
    {
        // SAFETY: AVX-512F detected just above; the lengths were asserted.
        return unsafe { x86::epilogue_avx512(act, out, acc, bias, accumulate) };
    }
    let _ = isa;
    // One loop per activation, so each is compiled with its formula inlined (a match per
    // element was 5% of the tiny preset's bench profile).
    match act {
        Activation::None => scalar(out, acc, bias, accumulate, |x| Activation::None.apply(x)),
        Activation::Relu => scalar(out, acc, bias, accumulate, |x| Activation::Relu.apply(x)),
        Activation::Gelu => scalar(out, acc, bias, accumulate, |x| Activation::Gelu.apply(x)),
        Activation::QuickGelu => scalar(out, acc, bias, accumulate, |x| Activation::QuickGelu.apply(x)),
        Activation::Silu => scalar(out, acc, bias, accumulate, |x| Activation::Silu.apply(x)),
        Activation::GeluTanh => scalar(out, acc, bias, accumulate, |x| Activation::GeluTanh.apply(x)),
    }
}

#[inline(always)]
fn scalar(out: &mut [f32], acc: &[f32], bias: &[f32], accumulate: bool, act: impl Fn(f32) -> f32) {
    for (o, (&a, &b)) in out.iter_mut().zip(acc.iter().zip(bias)) {
        let v = act(a + b);
        *o = if accumulate { *o + v } else { v };
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use std::arch::x86_64::*;

    use crate::graph::Activation;

    /// `e^x` per lane, within 2 ulps of the exact value where it is a normal f32, 1 at x = 0,
    /// exactly 0 below -120 (-inf included) and +inf above 100: Cody-Waite reduction
    /// x = n ln2 + r, |r| <= ln2/2, Cephes' polynomial for e^r, then e^r * 2^n by `vscalefps`
    /// (which also rounds results past f32's range to 0 or inf).
    #[target_feature(enable = "avx512f")]
    pub(in crate::backend::cpu) fn exp(x: __m512) -> __m512 {
        let x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-120.0)), _mm512_set1_ps(100.0));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
            x,
            _mm512_set1_ps(std::f32::consts::LOG2_E),
        ));
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm512_set1_ps(1.987_569_1e-4);
        for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0)));
        _mm512_scalef_ps(p, n)
    }

    /// One of the exp-based activations on 16 lanes, the operations of `Activation::apply` in
    /// the same order (no fused multiply-adds), with [`exp`].
    #[target_feature(enable = "avx512f")]
    fn activation(act: Activation, x: __m512) -> __m512 {
        let one = _mm512_set1_ps(1.0);
        let sigmoid_of = |t: __m512| _mm512_div_ps(x, _mm512_add_ps(one, exp(t)));
        match act {
            Activation::Silu => sigmoid_of(_mm512_sub_ps(_mm512_setzero_ps(), x)),
            Activation::QuickGelu => sigmoid_of(_mm512_mul_ps(_mm512_set1_ps(-1.702), x)),
            Activation::GeluTanh => {
                const BETA: f32 = std::f32::consts::SQRT_2 * std::f32::consts::FRAC_2_SQRT_PI * 0.5;
                let cube = _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715), x), x), x);
                let u = _mm512_mul_ps(_mm512_set1_ps(BETA), _mm512_add_ps(x, cube));
                sigmoid_of(_mm512_mul_ps(_mm512_set1_ps(-2.0), u))
            }
            _ => unreachable!("not an exp-based activation"),
        }
    }

    /// [`super::epilogue`] for the exp-based activations, 16 lanes at a time.
    ///
    /// # Safety
    /// AVX-512F; `acc`, `bias` and `out` of one length.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn epilogue_avx512(
        act: Activation,
        out: &mut [f32],
        acc: &[f32],
        bias: &[f32],
        accumulate: bool,
    ) {
        for j in (0..out.len()).step_by(16) {
            let m: __mmask16 = ((1u32 << (out.len() - j).min(16)) - 1) as u16;
            // SAFETY: lanes j.. j + 16 masked to the slices' common length.
            unsafe {
                let x = _mm512_add_ps(
                    _mm512_maskz_loadu_ps(m, acc.as_ptr().add(j)),
                    _mm512_maskz_loadu_ps(m, bias.as_ptr().add(j)),
                );
                let mut v = activation(act, x);
                let dst = out.as_mut_ptr().add(j);
                if accumulate {
                    v = _mm512_add_ps(_mm512_maskz_loadu_ps(m, dst), v);
                }
                _mm512_mask_storeu_ps(dst, m, v);
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use std::arch::x86_64::*;

        use crate::graph::Activation;

        /// Units in the last place between `got` and the exact `want`, at want's magnitude.
        fn ulps(got: f32, want: f64) -> f64 {
            let w = (want as f32).abs();
            let ulp = f64::from(f32::from_bits(w.to_bits() + 1) - w)
                .max(f64::from(f32::MIN_POSITIVE) * f64::from(f32::EPSILON));
            (f64::from(got) - want).abs() / ulp
        }

        /// `f` of 16 lanes of `xs` at a time.
        fn lanes(xs: &[f32], f: impl Fn(__m512) -> __m512) -> Vec<f32> {
            xs.chunks(16)
                .flat_map(|chunk| {
                    let mut x = [0f32; 16];
                    x[..chunk.len()].copy_from_slice(chunk);
                    let mut y = [0f32; 16];
                    // SAFETY: 16-float arrays; callers checked AVX-512F.
                    unsafe { _mm512_storeu_ps(y.as_mut_ptr(), f(_mm512_loadu_ps(x.as_ptr()))) };
                    y.into_iter().take(chunk.len())
                })
                .collect()
        }

        #[test]
        fn exp_is_within_2_ulps_and_exact_at_the_ends() {
            if !std::is_x86_feature_detected!("avx512f") {
                println!("skipped: this CPU has no AVX-512F");
                return;
            }
            // Every 997th f32 from -87.3 (below it e^x is subnormal) to 88.7, plus the
            // reduction's boundaries (half-integer multiples of ln 2).
            let mut xs: Vec<f32> = (0..87.3f32.to_bits()).step_by(997).map(|b| -f32::from_bits(b)).collect();
            xs.extend((0..88.7f32.to_bits()).step_by(997).map(f32::from_bits));
            xs.extend((-125..128).map(|n| (n as f32 + 0.5) * std::f32::consts::LN_2));
            // SAFETY: AVX-512F detected above.
            let got = lanes(&xs, |x| unsafe { super::exp(x) });
            let (worst, at) = xs
                .iter()
                .zip(&got)
                .map(|(&x, &g)| (ulps(g, f64::from(x).exp()), x))
                .fold((0.0, 0.0), |a, b| if b.0 > a.0 { b } else { a });
            println!("{} values, worst {worst:.2} ulps at x = {at}", xs.len());
            assert!(worst <= 2.0, "e^{at} is {worst} ulps off");
            let ends = [0.0, f32::NEG_INFINITY, f32::MIN, -120.0, -1e6, -104.0, 89.0, 1e6, f32::INFINITY];
            // SAFETY: as above.
            let got = lanes(&ends, |x| unsafe { super::exp(x) });
            assert_eq!(got, [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, f32::INFINITY, f32::INFINITY, f32::INFINITY]);
        }

        /// `act(x)` with its f32 exponent argument (computed as `Activation::apply` does) and the
        /// rest exact, in f64.
        fn exact(act: Activation, x: f32) -> f64 {
            const BETA: f32 = std::f32::consts::SQRT_2 * std::f32::consts::FRAC_2_SQRT_PI * 0.5;
            let t = match act {
                Activation::Silu => -x,
                Activation::QuickGelu => -1.702 * x,
                _ => -2.0 * (BETA * (x + 0.044715 * x * x * x)),
            };
            f64::from(x) / (1.0 + f64::from(t).exp())
        }

        #[test]
        fn activations_are_within_4_ulps_and_keep_the_scalar_edges() {
            if !std::is_x86_feature_detected!("avx512f") {
                println!("skipped: this CPU has no AVX-512F");
                return;
            }
            let mut xs: Vec<f32> = (-200_000..=200_000).map(|i| i as f32 * 1e-4).collect(); // [-20, 20]
            xs.extend([-100.0, 100.0, -1e30, 1e30, f32::INFINITY, f32::NEG_INFINITY, 0.0, f32::NAN]);
            for act in [Activation::Silu, Activation::QuickGelu, Activation::GeluTanh] {
                let bias = vec![0f32; xs.len()];
                let mut got = vec![0f32; xs.len()];
                super::super::epilogue(crate::backend::cpu::gemm::Isa::Avx512, act, &mut got, &xs, &bias, false);
                let mut worst = (0f64, 0f32);
                for (&x, &g) in xs.iter().zip(&got) {
                    let scalar = act.apply(x);
                    if scalar.is_nan() {
                        assert!(g.is_nan(), "{act:?}({x}): {g} vs NaN");
                    } else if scalar.is_infinite() || scalar == 0.0 {
                        assert_eq!(g, scalar, "{act:?}({x})");
                    } else {
                        let u = ulps(g, exact(act, x));
                        if u > worst.0 {
                            worst = (u, x);
                        }
                    }
                }
                println!("{act:?}: worst {:.2} ulps at x = {}", worst.0, worst.1);
                assert!(worst.0 <= 4.0, "{act:?}({}) is {} ulps off", worst.1, worst.0);
            }
        }
    }
}

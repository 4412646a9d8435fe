//! Fused fp16-weight dot products for the decode path: each weight row is converted and
//! multiplied in registers (F16C + FMA on x86-64 when the CPU has them, detected at run time),
//! instead of being widened into a scratch row first. A plain loop serves other CPUs.

use half::f16;

/// Most rows of x one call handles (the GEMV path's limit).
pub const MAX_ROWS: usize = 4;

/// `out[r] = sum_k xs[r][k] * w[k]` for each of the `xs.len() <= MAX_ROWS` rows.
pub fn dot_rows(xs: &[&[f32]], w: &[f16]) -> [f32; MAX_ROWS] {
    assert!(xs.len() <= MAX_ROWS && xs.iter().all(|x| x.len() == w.len()), "dot_rows: shapes");
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
        {
            // SAFETY: the three features the function is compiled for were detected just above;
            // the slice lengths it relies on were asserted at entry.
            return unsafe { dot_rows_avx2(xs, w) };
        }
    }
    dot_rows_portable(xs, w)
}

fn dot_rows_portable(xs: &[&[f32]], w: &[f16]) -> [f32; MAX_ROWS] {
    let mut out = [0f32; MAX_ROWS];
    let mut wrow = [0f32; 64];
    for (c, chunk) in w.chunks(64).enumerate() {
        for (d, s) in wrow.iter_mut().zip(chunk) {
            *d = s.to_f32();
        }
        for (r, x) in xs.iter().enumerate() {
            let xc = &x[c * 64..c * 64 + chunk.len()];
            out[r] += xc.iter().zip(&wrow[..chunk.len()]).map(|(a, b)| a * b).sum::<f32>();
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_rows_avx2(xs: &[&[f32]], w: &[f16]) -> [f32; MAX_ROWS] {
    use std::arch::x86_64::*;
    let k = w.len();
    let rows = xs.len();
    // Two accumulators per row: enough independent FMA chains to hide latency even for 1 row.
    let mut acc = [[_mm256_setzero_ps(); 2]; MAX_ROWS];
    let wp = w.as_ptr() as *const __m128i;
    let mut i = 0;
    while i + 16 <= k {
        // SAFETY (whole loop): i + 16 <= k = w.len() = every x's length, so the 16-element
        // loads at offset i stay in bounds; loadu has no alignment requirement.
        let w0 = _mm256_cvtph_ps(_mm_loadu_si128(wp.add(i / 8)));
        let w1 = _mm256_cvtph_ps(_mm_loadu_si128(wp.add(i / 8 + 1)));
        for r in 0..rows {
            let xp = xs[r].as_ptr().add(i);
            acc[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(xp), w0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(8)), w1, acc[r][1]);
        }
        i += 16;
    }
    let mut out = [0f32; MAX_ROWS];
    for r in 0..rows {
        let v = _mm256_add_ps(acc[r][0], acc[r][1]);
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), v);
        out[r] = lanes.iter().sum::<f32>();
        for j in i..k {
            out[r] += xs[r][j] * w[j].to_f32();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simd_equals_portable() {
        let mut s = 7u64;
        let mut next = || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        for k in [1, 7, 15, 16, 17, 88, 1408, 2571] {
            let w: Vec<f16> = (0..k).map(|_| f16::from_f32(next())).collect();
            let xs: Vec<Vec<f32>> = (0..MAX_ROWS).map(|_| (0..k).map(|_| next()).collect()).collect();
            for rows in 1..=MAX_ROWS {
                let refs: Vec<&[f32]> = xs[..rows].iter().map(|x| x.as_slice()).collect();
                let (a, b) = (dot_rows(&refs, &w), dot_rows_portable(&refs, &w));
                for r in 0..rows {
                    let exact: f64 = xs[r].iter().zip(&w).map(|(x, w)| f64::from(*x) * w.to_f64()).sum();
                    let mag: f64 = xs[r].iter().zip(&w).map(|(x, w)| (f64::from(*x) * w.to_f64()).abs()).sum();
                    for got in [a[r], b[r]] {
                        assert!(
                            (f64::from(got) - exact).abs() <= 1e-6 * mag.max(1.0),
                            "k={k} rows={rows}: {got} vs {exact}"
                        );
                    }
                }
            }
        }
    }
}

// LayerNorm and RMSNorm over the last dimension, one block per row, with an optional fused
// residual add (pre-norm residual streams), and the L2 normalisation of embeddings.
//
//   layernorm:  s = half(x + r)        (r optional; s = x when r is null; with in_f32, x, r and
//                                       sum_out are fp32 and s = x + r in fp32, unrounded)
//               sum_out = s            (optional: writes the updated residual stream)
//               y = (s - mean(s)) / sqrt(var(s) + eps) * w + b      (biased variance, fp32)
//   rmsnorm:    s as above;  y = half(s * rsqrt(mean(s^2) + eps)) * w   (Llama: normalise in
//               fp32, cast to half, then multiply by the weight; the product of two halves is
//               exact in fp32, so rounding it once equals the fp16 multiply PyTorch does)
//
// The residual sum is rounded to fp16 before normalising because that is what the reference
// computes (h = x + r is an fp16 tensor). Statistics are two-pass (mean, then sum of squared
// deviations) in fp32, which avoids the cancellation of E[x^2] - E[x]^2.
//
// Implementation: the row (<= a few K elements) is re-read from global memory in each pass; after
// the first pass it is an L1 hit. Each thread always touches the same element indices in every
// pass, so a sum_out that aliases x (in-place stream update) is read back by the thread that
// wrote it. Scalar fp16 accesses: any dim, no alignment needs; these kernels are a small share of
// the runtime (one row = a few KB).
//
// SAFETY preconditions (checked by the Rust launchers `layernorm` / `rmsnorm`):
//   - x, y (and r, sum_out when non-null) have >= rows*dim elements, rows contiguous (stride dim);
//     w (and b for layernorm; b may be null = no bias) have >= dim elements;
//   - y must not overlap x, r, sum_out, w, b; sum_out may alias x exactly (or be disjoint from
//     it) and must be disjoint from r (a thread re-reads r only when sum_out is null);
//   - grid = rows, block = a multiple of 32 threads <= 1024.
//   l2norm (L2Params): x has >= rows*dim fp16 elements, y >= rows*dim of fp16 or fp32 (out_f32),
//   y disjoint from x; same grid and block rule.
#include "common.cuh"

struct NormParams {
    const __half* x;    // [rows, dim]
    const __half* r;    // [rows, dim] or nullptr
    const __half* w;    // [dim]
    const __half* b;    // [dim] or nullptr
    __half* y;          // [rows, dim]
    __half* sum_out;    // [rows, dim] or nullptr (may alias x)
    int rows, dim;
    float eps;
    int in_f32;  // 1: x, r and sum_out hold fp32 (an fp32 residual stream); y is always fp16
};
static_assert(sizeof(NormParams) == 64, "NormParams layout is mirrored in Rust");

// Loads element i of the residual sum; when sum_out is set, pass 0 stores it and later passes
// read it back (same thread, same index).
__device__ __forceinline__ float load_sum(const NormParams& p, size_t base, int i, bool first) {
    if (!first && p.sum_out) return load_act(p.sum_out, base + i, p.in_f32);
    float s = load_act(p.x, base + i, p.in_f32);
    // fp16 streams round the sum (the reference's h = x + r is an fp16 tensor); fp32 keep it.
    if (p.r) s = p.in_f32 ? s + load_act(p.r, base + i, 1) : __half2float(__float2half_rn(s + __half2float(p.r[base + i])));
    if (first && p.sum_out) store_act(p.sum_out, base + i, s, p.in_f32);
    return s;
}

extern "C" __global__ void __launch_bounds__(1024) layernorm_f16(NormParams p) {
    __shared__ float scratch[32];
    const size_t base = (size_t)blockIdx.x * p.dim;
    float s = 0.f;
    for (int i = threadIdx.x; i < p.dim; i += blockDim.x) s += load_sum(p, base, i, true);
    const float mean = block_sum(s, scratch) / p.dim;
    float q = 0.f;
    for (int i = threadIdx.x; i < p.dim; i += blockDim.x) {
        const float d = load_sum(p, base, i, false) - mean;
        q += d * d;
    }
    const float rstd = rsqrtf(block_sum(q, scratch) / p.dim + p.eps);
    for (int i = threadIdx.x; i < p.dim; i += blockDim.x) {
        float v = (load_sum(p, base, i, false) - mean) * rstd * __half2float(p.w[i]);
        if (p.b) v += __half2float(p.b[i]);
        p.y[base + i] = __float2half_rn(v);
    }
}

extern "C" __global__ void __launch_bounds__(1024) rmsnorm_f16(NormParams p) {
    __shared__ float scratch[32];
    const size_t base = (size_t)blockIdx.x * p.dim;
    float q = 0.f;
    for (int i = threadIdx.x; i < p.dim; i += blockDim.x) {
        const float v = load_sum(p, base, i, true);
        q += v * v;
    }
    const float rstd = rsqrtf(block_sum(q, scratch) / p.dim + p.eps);
    for (int i = threadIdx.x; i < p.dim; i += blockDim.x) {
        const __half normed = __float2half_rn(load_sum(p, base, i, false) * rstd);
        p.y[base + i] = __float2half_rn(__half2float(normed) * __half2float(p.w[i]));
    }
}

//   l2norm:     y = x / sqrt(sum(x^2))  per row (CLIP's unit embeddings: a division, no epsilon,
//               as transformers' `x / x.norm(...)`; a zero row gives NaN there and here). The
//               sum of squares is fp32; y is fp16 or fp32 (out_f32) so unit vectors the host
//               reads can keep fp32 precision.
struct L2Params {
    const __half* x;  // [rows, dim]
    __half* y;        // [rows, dim], fp32 elements when out_f32
    int rows, dim;
    int out_f32;
    int pad;
};
static_assert(sizeof(L2Params) == 32, "L2Params layout is mirrored in Rust");

extern "C" __global__ void __launch_bounds__(1024) l2norm_f16(L2Params p) {
    __shared__ float scratch[32];
    const size_t base = (size_t)blockIdx.x * p.dim;
    float q = 0.f;
    for (int i = threadIdx.x; i < p.dim; i += blockDim.x) {
        const float v = __half2float(p.x[base + i]);
        q += v * v;
    }
    const float norm = sqrtf(block_sum(q, scratch));
    for (int i = threadIdx.x; i < p.dim; i += blockDim.x) {
        store_act(p.y, base + i, __half2float(p.x[base + i]) / norm, p.out_f32);
    }
}

// Greedy sampling on device: per row of logits [rows, vocab] (fp16 or fp32),
//   idx[r]     = argmax_j logits[r, j]      (ties -> lowest index, NaN counts as the maximum and
//                                            the first NaN wins, like torch.argmax)
//   logprob[r] = logits[r, idx] - logsumexp_j logits[r, j]     (fp32, log_softmax of the choice)
// so the host reads 8 bytes per row instead of the logits.
//
// One block (1024 threads) per row: each thread scans a strided slice keeping (max, argmax) and an
// online logsumexp (running max m and sum of exp(x - m)), then block reductions merge them.
// Built without fast math: expf/logf are the accurate versions (the log-prob goes to the host).
//
// SAFETY preconditions (checked by the Rust launcher `argmax`): logits has >= rows*vocab
// elements (row stride vocab), 1 <= vocab < 2^31; idx and logprob have >= rows elements and do
// not overlap logits; grid = rows, block = 1024.
#include <math_constants.h>

#include "common.cuh"

// Is (va, ia) a better argmax candidate than (vb, ib)?
__device__ __forceinline__ bool better(float va, int ia, float vb, int ib) {
    const bool na = isnan(va), nb = isnan(vb);
    if (na || nb) return na && (!nb || ia < ib);
    return va > vb || (va == vb && ia < ib);
}

// Online logsumexp merge of (m1, s1) and (m2, s2); s = sum exp(x - m).
__device__ __forceinline__ void lse_merge(float& m1, float& s1, float m2, float s2) {
    if (m2 == -CUDART_INF_F) return;
    if (m1 == -CUDART_INF_F) { m1 = m2; s1 = s2; return; }
    const float mx = fmaxf(m1, m2);
    s1 = s1 * expf(m1 - mx) + s2 * expf(m2 - mx);
    m1 = mx;
}

// Merges (best value, best index, running max, running sum of exp) across the 32 lanes of a warp:
// every lane ends with the warp's argmax (ties -> lowest index) and its log-sum-exp state.
__device__ __forceinline__ void warp_reduce(float& bv, int& bi, float& m, float& s) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        const float om = __shfl_xor_sync(0xffffffffu, m, o);
        const float os = __shfl_xor_sync(0xffffffffu, s, o);
        if (better(ov, oi, bv, bi)) { bv = ov; bi = oi; }
        lse_merge(m, s, om, os);
    }
}

template <typename T>
__device__ __forceinline__ void argmax_body(const T* __restrict__ logits, int vocab, int* __restrict__ idx,
                                            float* __restrict__ logprob) {
    __shared__ float s_v[32], s_m[32], s_s[32];
    __shared__ int s_i[32];
    const int r = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const T* row = logits + (size_t)r * vocab;

    float bv = -CUDART_INF_F, m = -CUDART_INF_F, s = 0.f;
    int bi = 0x7fffffff;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        const float x = to_f32(row[j]);
        if (better(x, j, bv, bi)) { bv = x; bi = j; }
        if (!isnan(x)) lse_merge(m, s, x, 1.f);
    }
    warp_reduce(bv, bi, m, s);
    if (lane == 0) { s_v[warp] = bv; s_i[warp] = bi; s_m[warp] = m; s_s[warp] = s; }
    __syncthreads();
    if (warp == 0) {
        const int nw = blockDim.x >> 5;
        bv = lane < nw ? s_v[lane] : -CUDART_INF_F;
        bi = lane < nw ? s_i[lane] : 0x7fffffff;
        m = lane < nw ? s_m[lane] : -CUDART_INF_F;
        s = lane < nw ? s_s[lane] : 0.f;
        warp_reduce(bv, bi, m, s);
        if (lane == 0) {
            idx[r] = bi == 0x7fffffff ? 0 : bi;
            logprob[r] = bv - (m + logf(s));  // NaN row -> NaN, all -inf row -> NaN
        }
    }
}

extern "C" __global__ void __launch_bounds__(1024) argmax_f16(const __half* logits, int vocab, int* idx, float* logprob) {
    argmax_body<__half>(logits, vocab, idx, logprob);
}
extern "C" __global__ void __launch_bounds__(1024) argmax_f32(const float* logits, int vocab, int* idx, float* logprob) {
    argmax_body<float>(logits, vocab, idx, logprob);
}

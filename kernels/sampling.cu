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

// Beam search's candidates on device: per row of logits [rows, vocab] (fp16 or fp32), the k best
// entries in torch.topk order (value descending, ties -> lowest index, NaN above everything) with
// their log_softmax values, so the host reads 8 bytes per candidate instead of the logits:
//   idx[r*k + t]     = t-th best index of row r
//   logprob[r*k + t] = logits[r, idx] - logsumexp_j logits[r, j]      (fp32)
//
// One block (1024 threads) per row. Pass 0 is argmax_body's: the best entry and the row's online
// logsumexp. Pass t > 0 takes the best entry strictly after pick t-1 in that total order, so no
// exclusion list is kept (no per-thread arrays: nothing to spill); k passes read the row k times,
// from L2 for any real vocabulary.
//
// SAFETY preconditions (checked by the Rust launcher `top_k_logprobs`): logits has >= rows*vocab
// elements (row stride vocab), 1 <= k <= vocab < 2^31; idx and logprob have >= rows*k elements and
// do not overlap logits or each other; grid = rows, block = 1024.
template <typename T>
__device__ __forceinline__ void topk_body(const T* __restrict__ logits, int vocab, int k, int* __restrict__ idx,
                                          float* __restrict__ logprob) {
    __shared__ float s_v[32], s_m[32], s_s[32];
    __shared__ int s_i[32];
    __shared__ float s_pick_v, s_lse;
    __shared__ int s_pick_i;
    const int r = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const T* row = logits + (size_t)r * vocab;
    for (int t = 0; t < k; ++t) {
        const float pv = t == 0 ? 0.f : s_pick_v;
        const int pi = t == 0 ? -1 : s_pick_i;
        float bv = -CUDART_INF_F, m = -CUDART_INF_F, s = 0.f;
        int bi = 0x7fffffff;
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
            const float x = to_f32(row[j]);
            if (t == 0) {
                if (!isnan(x)) lse_merge(m, s, x, 1.f);
            } else if (!better(pv, pi, x, j)) {
                continue;  // at or before the previous pick
            }
            if (better(x, j, bv, bi)) { bv = x; bi = j; }
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
                if (t == 0) s_lse = m + logf(s);  // all -inf row -> NaN log-probs, as argmax
                // -inf entries rank by index like any tie, so k <= vocab always finds one.
                if (bi == 0x7fffffff) bi = 0;
                s_pick_v = to_f32(row[bi]);
                s_pick_i = bi;
                idx[(size_t)r * k + t] = bi;
                logprob[(size_t)r * k + t] = s_pick_v - s_lse;
            }
        }
        __syncthreads();
    }
}

extern "C" __global__ void __launch_bounds__(1024) topk_f16(const __half* logits, int vocab, int k, int* idx, float* logprob) {
    topk_body<__half>(logits, vocab, k, idx, logprob);
}
extern "C" __global__ void __launch_bounds__(1024) topk_f32(const float* logits, int vocab, int k, int* idx, float* logprob) {
    topk_body<float>(logits, vocab, k, idx, logprob);
}

// Attention kernels (fp16 in/out, fp32 softmax and accumulation, online softmax: no S x S matrix
// is ever materialised).
//
// 1. attn_fwd_d{64,96,128}: flash-attention style prefill / encoder / cross attention.
//      O[b, i, h, :] = softmax_j(scale * Q[b,i,h,:]·K[b,j,h,:] + mask) · V[b, j, h, :]
//    Mask modes (combinable): causal with offset (query i sees keys j <= i + kv_offset), a
//    per-batch valid key count kv_valid[b] (keys j >= kv_valid[b] are masked) and an additive
//    fp32 per-key mask[b, j] (HF-style padding mask: 0 or a large negative number), or one mask
//    row per query row, mask[b, i, j] (mask_qstride = its row stride; IDEFICS' image mask).
//    Additive mask values are clamped to MASK_FLOOR first (graph::ATTN_MASK_FLOOR on the Rust
//    side): HF fills masked keys with finfo(float32).min, which times log2(e) would overflow to
//    -inf; clamped, a score plus the floor rounds to the floor, so a row whose keys are all
//    masked that way averages V over them exactly as transformers' eager attention does, and
//    partly masked rows give those keys weight 0. -inf mask values take the same rule.
//    An optional fp16 per-head bias [H*Sq, bias_stride] (T5 relative positions) adds
//    bias[(h*Sq + i)*bias_stride + j] to score (i, j) of head h unclamped, in every batch item.
//    Grouped-query attention: query head h reads K/V head h / kv_group (repeat_interleave).
//    Rows with no key at all (kv_valid = 0, or causal offsets hiding every key) get O = 0
//    (PyTorch would give NaN; callers never read them).
//    Tiling (CUDA cores; a tensor-core version is future work): a block = 4 warps handles
//    16 queries (4 per warp) of one (batch, head); K/V tiles of 32 keys are staged in shared
//    memory (K rows padded by 8 halves so each lane's 16-byte reads of "its" key row hit distinct
//    bank groups). For a query, lane l scores key tile0 + l (full dot product over d from smem,
//    q broadcast from smem), the warp does the online-softmax update with shuffles, then
//    accumulates P·V with lane l owning output dims l, l+32, l+64, l+96 (coalesced V reads).
//    Head dims: templated on the padded dim (64, 96, 128); the real d (64, 80, 88, 128, ...) is
//    a runtime value <= the padded one, the tail is zero-filled in smem.
//
// 2. attn_decode_split_d{64,96,128} + attn_decode_combine: split-KV decode attention for one
//    new token per sequence against the KV cache, whose current length is read from device
//    memory (kv_len[b]) so the same launch can be captured in a CUDA graph and replayed while
//    the cache grows. Grid (nsplit, H, B): split s handles cache rows [s*chunk, (s+1)*chunk)
//    clipped to kv_len[b] (empty splits write l = 0), writes unnormalised (m, l, o[d]) to a fp32
//    workspace; the combine kernel (grid (H, B)) merges the splits with the usual max-rescaling.
//    Launch parameters depend only on max_len, never on the current length.
//
// Scores are kept in the log2 domain (q pre-multiplied by scale*log2(e), the mask by log2(e)),
// and exponentials use exp2f (fast math: ex2.approx) as flash-attention does; arguments are
// max-subtracted (<= 0), output fp16.
//
// SAFETY preconditions (checked by the Rust launchers `attention` / `decode_attention`):
//   - head h of row i of batch b lives at ptr + b*batch_stride + i*row_stride + h*d (elements);
//     every such row, for i < Sq (q, o) / i < Skv (k, v) (decode: max_len), h < H, lies inside
//     its buffer; d % 8 == 0, d <= padded dim; all strides % 8 == 0 and q/k/v (and o) base
//     pointers 16-byte aligned (16-byte vector loads);
//   - k/v rows hold kv_heads = heads / kv_group heads (kv_group >= 1 divides heads);
//   - bias (nullable) has >= (H*Sq - 1)*bias_stride + Skv halves, bias_stride >= Skv (decode:
//     H rows, stride >= max_len);
//   - o must not overlap q, k, v; mask (nullable) has >= (B-1)*mask_stride +
//     (Sq-1)*mask_qstride + Skv floats, rows of >= Skv keys (decode: B rows of >= max_len); kv_valid / kv_len have >= B ints, values are
//     clamped to [0, Skv] / [0, max_len] on device, so bad values cannot read out of bounds;
//   - decode workspace has >= B*H*nsplit*(DP+2) floats, nsplit*chunk >= max_len;
//   - grids: prefill (ceil(Sq/16), H, B) x 128 threads; decode split (nsplit, H, B) x 128;
//     combine (H, B) x 128.
#include <math_constants.h>

#include "common.cuh"

constexpr float LOG2E = 1.4426950408889634f;
// Additive masks are clamped to this before scaling (mirrors graph::ATTN_MASK_FLOOR).
constexpr float MASK_FLOOR = -1e30f;

__device__ __forceinline__ float mask_log2(const float* mask, long long i) {
    return fmaxf(mask[i], MASK_FLOOR) * LOG2E;
}

struct AttnParams {
    const __half* q;
    const __half* k;
    const __half* v;
    __half* o;
    const float* mask;    // [B, mask_stride] additive, or nullptr
    const int* kv_valid;  // [B] or nullptr
    const __half* bias;   // [H*sq, bias_stride] additive per head, or nullptr
    long long q_bs, q_rs;  // batch / row strides in elements (head stride = d)
    long long k_bs, k_rs;
    long long v_bs, v_rs;
    long long o_bs, o_rs;
    long long mask_stride, bias_stride;
    long long mask_qstride;  // mask elements between query rows (0: one row per batch item)
    int heads, sq, skv, d;
    int causal, kv_offset;
    float scale;
    int kv_group;  // query heads per K/V head (1 = multi-head attention)
};
static_assert(sizeof(AttnParams) == 176, "AttnParams layout is mirrored in Rust");

constexpr int ATT_WARPS = 4;
constexpr int ATT_QPW = 4;                     // queries per warp
constexpr int ATT_BQ = ATT_WARPS * ATT_QPW;    // queries per block
constexpr int ATT_BKV = 32;                    // keys per smem tile (one per lane)

// Dot product of a float q row (smem, broadcast) with a half k row (smem or global), DP wide.
template <int DP>
__device__ __forceinline__ float dot_qk(const float* q, const __half* k) {
    float s = 0.f;
#pragma unroll
    for (int c = 0; c < DP / 8; ++c) {
        float kf[8];
        unpack8(*reinterpret_cast<const uint4*>(k + c * 8), kf);
        const float4 q0 = *reinterpret_cast<const float4*>(q + c * 8);
        const float4 q1 = *reinterpret_cast<const float4*>(q + c * 8 + 4);
        s = fmaf(q0.x, kf[0], s); s = fmaf(q0.y, kf[1], s);
        s = fmaf(q0.z, kf[2], s); s = fmaf(q0.w, kf[3], s);
        s = fmaf(q1.x, kf[4], s); s = fmaf(q1.y, kf[5], s);
        s = fmaf(q1.z, kf[6], s); s = fmaf(q1.w, kf[7], s);
    }
    return s;
}

template <int DP>
__device__ __forceinline__ void attn_fwd_body(const AttnParams& p) {
    constexpr int KPAD = DP + 8;
    constexpr int E = DP / 32;  // output dims per lane
    __shared__ __align__(16) float qs[ATT_BQ][DP];
    __shared__ __align__(16) __half ks[ATT_BKV][KPAD];
    __shared__ __align__(16) __half vs[ATT_BKV][DP];

    const int b = blockIdx.z, h = blockIdx.y;
    const int q0 = blockIdx.x * ATT_BQ;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int dch = p.d >> 3;  // real 16-byte chunks per head row
    const long long kvh = h / p.kv_group;  // the K/V head this query head reads

    // Stage this block's queries, pre-scaled into the log2 domain; zero tail dims and rows.
    const float qscale = p.scale * LOG2E;
    for (int c = tid; c < ATT_BQ * (DP / 8); c += blockDim.x) {
        const int r = c / (DP / 8), ch = c % (DP / 8);
        float f[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        if (q0 + r < p.sq && ch < dch)
            unpack8(ldg16(p.q + b * p.q_bs + (long long)(q0 + r) * p.q_rs + (long long)h * p.d + ch * 8), f);
#pragma unroll
        for (int i = 0; i < 8; ++i) qs[r][ch * 8 + i] = f[i] * qscale;
    }

    // Keys this block can see at all.
    int kv_end = p.skv;
    if (p.kv_valid) kv_end = min(kv_end, max(p.kv_valid[b], 0));
    if (p.causal) kv_end = min(kv_end, max(q0 + ATT_BQ - 1 + p.kv_offset + 1, 0));

    float m[ATT_QPW], l[ATT_QPW], o[ATT_QPW][E];
#pragma unroll
    for (int qi = 0; qi < ATT_QPW; ++qi) {
        m[qi] = -CUDART_INF_F;
        l[qi] = 0.f;
#pragma unroll
        for (int e = 0; e < E; ++e) o[qi][e] = 0.f;
    }

    // Bias row of this warp's first query (rows past sq are never dereferenced: the qi loop breaks).
    const __half* bias_w = p.bias ? p.bias + ((long long)h * p.sq + q0 + warp * ATT_QPW) * p.bias_stride : nullptr;

    for (int kv0 = 0; kv0 < kv_end; kv0 += ATT_BKV) {
        __syncthreads();  // previous tile fully consumed (and qs written, first time)
        for (int c = tid; c < ATT_BKV * (DP / 8); c += blockDim.x) {
            const int r = c / (DP / 8), ch = c % (DP / 8);
            uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
            if (kv0 + r < kv_end && ch < dch) {
                kv = ldg16(p.k + b * p.k_bs + (long long)(kv0 + r) * p.k_rs + kvh * p.d + ch * 8);
                vv = ldg16(p.v + b * p.v_bs + (long long)(kv0 + r) * p.v_rs + kvh * p.d + ch * 8);
            }
            *reinterpret_cast<uint4*>(&ks[r][ch * 8]) = kv;
            *reinterpret_cast<uint4*>(&vs[r][ch * 8]) = vv;
        }
        __syncthreads();

        const int j = kv0 + lane;
        const bool masked = p.mask && j < kv_end;
#pragma unroll
        for (int qi = 0; qi < ATT_QPW; ++qi) {
            const int qr = warp * ATT_QPW + qi;
            const int i = q0 + qr;
            if (i >= p.sq) break;  // warp-uniform
            float s = dot_qk<DP>(qs[qr], ks[lane]);
            // Key j of query row i's mask row (mask_qstride 0: one row per batch item).
            if (masked) s += mask_log2(p.mask, b * p.mask_stride + i * p.mask_qstride + j);
            if (bias_w && j < kv_end) s += __half2float(bias_w[qi * p.bias_stride + j]) * LOG2E;
            const bool valid = j < kv_end && (!p.causal || j <= i + p.kv_offset);
            s = valid ? s : -CUDART_INF_F;
            const float m_new = fmaxf(m[qi], warp_max(s));
            if (m_new == -CUDART_INF_F) continue;  // nothing visible yet (warp-uniform)
            const float pr = exp2f(s - m_new);     // 0 for masked keys
            const float corr = exp2f(m[qi] - m_new);  // 0 when m was -inf
            l[qi] = l[qi] * corr + warp_sum(pr);
            m[qi] = m_new;
#pragma unroll
            for (int e = 0; e < E; ++e) o[qi][e] *= corr;
#pragma unroll 8
            for (int jj = 0; jj < ATT_BKV; ++jj) {
                const float pj = __shfl_sync(0xffffffffu, pr, jj);
#pragma unroll
                for (int e = 0; e < E; ++e) o[qi][e] = fmaf(pj, __half2float(vs[jj][lane + 32 * e]), o[qi][e]);
            }
        }
    }

#pragma unroll
    for (int qi = 0; qi < ATT_QPW; ++qi) {
        const int i = q0 + warp * ATT_QPW + qi;
        if (i >= p.sq) break;
        const float inv = l[qi] > 0.f ? 1.f / l[qi] : 0.f;
        __half* orow = p.o + b * p.o_bs + (long long)i * p.o_rs + (long long)h * p.d;
#pragma unroll
        for (int e = 0; e < E; ++e) {
            const int dd = lane + 32 * e;
            if (dd < p.d) orow[dd] = __float2half_rn(o[qi][e] * inv);
        }
    }
}

#define GLIMPSE_ATTN_ENTRY(DP) \
    extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32) attn_fwd_d##DP(AttnParams p) { attn_fwd_body<DP>(p); }
GLIMPSE_ATTN_ENTRY(64)
GLIMPSE_ATTN_ENTRY(96)
GLIMPSE_ATTN_ENTRY(128)

// ---------------------------------------------------------------------------------------------
// Split-KV decode attention.
struct DecodeAttnParams {
    const __half* q;        // [B, H, d] (batch stride q_bs)
    const __half* k_cache;  // [B, max_len, H, d] (strides k_bs, k_rs)
    const __half* v_cache;
    const int* kv_len;      // [B] current lengths (device memory)
    const float* mask;      // [B, mask_stride] additive or nullptr
    const __half* bias;     // [H, bias_stride] additive per head (the one query row), or nullptr
    float* partial;         // [B, H, nsplit, DP + 2] workspace: m, l, o[DP]
    __half* o;              // [B, H, d] (batch stride o_bs)
    long long q_bs, k_bs, k_rs, v_bs, v_rs, o_bs, mask_stride, bias_stride;
    int heads, d, max_len, chunk, nsplit;
    float scale;
    int kv_group, pad_;
};
static_assert(sizeof(DecodeAttnParams) == 160, "DecodeAttnParams layout is mirrored in Rust");

template <int DP>
__device__ __forceinline__ void attn_decode_split_body(const DecodeAttnParams& p) {
    constexpr int E = DP / 32;
    __shared__ __align__(16) float qs[DP];
    __shared__ float wm[ATT_WARPS], wl[ATT_WARPS];
    __shared__ float wo[ATT_WARPS][DP];

    const int split = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int len = min(max(p.kv_len[b], 0), p.max_len);
    const int k_begin = split * p.chunk, k_end = min(k_begin + p.chunk, len);

    const float qscale = p.scale * LOG2E;
    for (int dd = tid; dd < DP; dd += blockDim.x)
        qs[dd] = dd < p.d ? __half2float(p.q[b * p.q_bs + (long long)h * p.d + dd]) * qscale : 0.f;
    __syncthreads();

    float m = -CUDART_INF_F, l = 0.f, o[E];
#pragma unroll
    for (int e = 0; e < E; ++e) o[e] = 0.f;

    const int dch = p.d >> 3;
    for (int t0 = k_begin + warp * 32; t0 < k_end; t0 += ATT_WARPS * 32) {
        const int j = t0 + lane;
        float s = -CUDART_INF_F;
        if (j < k_end) {
            const __half* krow = p.k_cache + b * p.k_bs + (long long)j * p.k_rs + (long long)(h / p.kv_group) * p.d;
            s = 0.f;
            for (int c = 0; c < dch; ++c) {
                float kf[8];
                unpack8(ldg16(krow + c * 8), kf);
#pragma unroll
                for (int i = 0; i < 8; ++i) s = fmaf(qs[c * 8 + i], kf[i], s);
            }
            if (p.mask) s += mask_log2(p.mask, b * p.mask_stride + j);
            if (p.bias) s += __half2float(p.bias[(long long)h * p.bias_stride + j]) * LOG2E;
        }
        const float m_new = fmaxf(m, warp_max(s));
        if (m_new == -CUDART_INF_F) continue;
        const float pr = exp2f(s - m_new);
        const float corr = exp2f(m - m_new);
        l = l * corr + warp_sum(pr);
        m = m_new;
#pragma unroll
        for (int e = 0; e < E; ++e) o[e] *= corr;
        const int nk = min(32, k_end - t0);
        for (int jj = 0; jj < nk; ++jj) {
            const float pj = __shfl_sync(0xffffffffu, pr, jj);
            const __half* vrow = p.v_cache + b * p.v_bs + (long long)(t0 + jj) * p.v_rs + (long long)(h / p.kv_group) * p.d;
#pragma unroll
            for (int e = 0; e < E; ++e) {
                const int dd = lane + 32 * e;
                if (dd < p.d) o[e] = fmaf(pj, __half2float(vrow[dd]), o[e]);
            }
        }
    }

    // Merge the 4 warps of this block, then write the split's unnormalised partial.
    if (lane == 0) { wm[warp] = m; wl[warp] = l; }
#pragma unroll
    for (int e = 0; e < E; ++e) wo[warp][lane + 32 * e] = o[e];
    __syncthreads();
    float* out = p.partial + (((long long)b * p.heads + h) * p.nsplit + split) * (DP + 2);
    float mb = -CUDART_INF_F;
#pragma unroll
    for (int w = 0; w < ATT_WARPS; ++w) mb = fmaxf(mb, wm[w]);
    for (int dd = tid; dd < DP + 1; dd += blockDim.x) {
        float acc = 0.f;
        if (mb != -CUDART_INF_F) {
#pragma unroll
            for (int w = 0; w < ATT_WARPS; ++w) {
                const float f = exp2f(wm[w] - mb);  // 0 for empty warps (wm = -inf)
                acc += f * (dd < DP ? wo[w][dd] : wl[w]);
            }
        }
        if (dd < DP) out[2 + dd] = acc; else out[1] = acc;
    }
    if (tid == 0) out[0] = mb;
}

#define GLIMPSE_DECODE_ENTRY(DP)                                                     \
    extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)                     \
        attn_decode_split_d##DP(DecodeAttnParams p) { attn_decode_split_body<DP>(p); }
GLIMPSE_DECODE_ENTRY(64)
GLIMPSE_DECODE_ENTRY(96)
GLIMPSE_DECODE_ENTRY(128)

// Combine: grid (H, B), 128 threads; thread dd < d produces O[b, h, dd]. `dp` = padded dim of
// the split kernel that wrote the workspace (64, 96 or 128).
extern "C" __global__ void __launch_bounds__(128) attn_decode_combine(DecodeAttnParams p, int dp) {
    const int h = blockIdx.x, b = blockIdx.y;
    const float* part = p.partial + ((long long)b * p.heads + h) * p.nsplit * (dp + 2);
    float mb = -CUDART_INF_F;
    for (int s = 0; s < p.nsplit; ++s) mb = fmaxf(mb, part[s * (dp + 2)]);
    for (int dd = threadIdx.x; dd < p.d; dd += blockDim.x) {
        float acc = 0.f, l = 0.f;
        if (mb != -CUDART_INF_F) {
            for (int s = 0; s < p.nsplit; ++s) {
                const float* ps = part + s * (dp + 2);
                const float f = exp2f(ps[0] - mb);
                l += f * ps[1];
                acc += f * ps[2 + dd];
            }
        }
        p.o[b * p.o_bs + (long long)h * p.d + dd] = __float2half_rn(l > 0.f ? acc / l : 0.f);
    }
}

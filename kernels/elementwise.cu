// Elementwise / gather / scatter kernels for BLIP-2 (and friends). All fp16 results are computed
// in fp32 and rounded once, which equals the single fp16 op PyTorch performs for an add.
//
// SAFETY preconditions common to all: every index computed from the grid is bounds-checked
// against the element counts passed in; indices read from device memory (token ids, positions,
// KV positions) are range-checked on device and out-of-range rows are written as zeros (gathers)
// or skipped (scatters/appends) instead of being read/written out of bounds. The Rust launchers
// check that each buffer holds at least the element counts passed here, and that outputs do not
// overlap inputs (except the documented in-place cases).
#include "common.cuh"

// Token embedding gather: out[t, :] = table[ids[t], :]. ids [T] int32 on device, table
// [vocab, D], out [T, D]. Ids outside [0, vocab) give a zero row (the host validates ids before
// launching; this only keeps a bad id from reading out of bounds). Grid (T), block 256.
extern "C" __global__ void embed_rows(const int* __restrict__ ids, const __half* __restrict__ table,
                                      __half* __restrict__ out, int T, int D, int vocab) {
    const int t = blockIdx.x;
    if (t >= T) return;
    const int id = ids[t];
    const bool ok = id >= 0 && id < vocab;
    for (int i = threadIdx.x; i < D; i += blockDim.x)
        out[(size_t)t * D + i] = ok ? table[(size_t)id * D + i] : __float2half_rn(0.f);
}

// Learned positions (OPT): x[b, i, :] += table[max(start[b] + i, 0) + offset, :] for i < S, with
// the signed start position start[b] = position - left_pad[b] read from device memory so a
// captured decode step can be replayed as the position advances (pad rows clamp to 0, real rows
// get HF's cumsum(mask) - 1). x [B, S, D] in place, table [npos, D]. Rows whose position falls
// outside [0, npos) are left unchanged (the host checks positions first). Grid (B*S), block 256.
extern "C" __global__ void add_positions(__half* __restrict__ x, const __half* __restrict__ table,
                                         const int* __restrict__ pos, int S, int D, int npos,
                                         int offset) {
    const int r = blockIdx.x, b = r / S, i = r % S;
    const int p = max(pos[b] + i, 0) + offset;
    if (p < 0 || p >= npos) return;
    for (int j = threadIdx.x; j < D; j += blockDim.x) {
        const size_t e = (size_t)r * D + j;
        x[e] = __float2half_rn(__half2float(x[e]) + __half2float(table[(size_t)p * D + j]));
    }
}

// Image-embedding scatter: for each sequence b, the k-th position t with ids[b, t] == image_token
// gets embeds[b, t, :] = image_embeds[b, k, :] (k = 0, 1, ...; positions beyond n_img image tokens
// are left untouched). ids [B, S], embeds [B, S, D] (in place), image_embeds [B, n_img, D].
// Grid (B), block 32 (one warp walks the sequence in order, ballot + popc give each image token
// its rank; the same warp then copies the rows). image_embeds must not overlap embeds.
extern "C" __global__ void image_scatter(const int* __restrict__ ids, __half* __restrict__ embeds,
                                         const __half* __restrict__ image_embeds, int S, int D,
                                         int n_img, int image_token) {
    const int b = blockIdx.x, lane = threadIdx.x & 31;
    int base = 0;  // image tokens seen before this 32-token chunk
    for (int t0 = 0; t0 < S; t0 += 32) {
        const int t = t0 + lane;
        const bool is_img = t < S && ids[(size_t)b * S + t] == image_token;
        const unsigned mask = __ballot_sync(0xffffffffu, is_img);
        // Copy the rows of this chunk one after another with the whole warp (coalesced).
        unsigned rem = mask;
        while (rem) {
            const int src_lane = __ffs(rem) - 1;
            rem &= rem - 1;
            const int k = base + __popc(mask & ((1u << src_lane) - 1u));
            if (k >= n_img) break;
            __half* dst = embeds + ((size_t)b * S + t0 + src_lane) * D;
            const __half* src = image_embeds + ((size_t)b * n_img + k) * D;
            for (int i = lane; i < D; i += 32) dst[i] = src[i];
        }
        base += __popc(mask);
    }
}

// Patch im2col for a kernel = stride = `patch` conv (ViT patch embedding), so the conv becomes
// GEMM(out = im2col(pixels) · W[D, C*patch*patch]^T + bias):
//   out[b*P + py*PW + px, c*patch*patch + kh*patch + kw] = pixels[b, c, py*patch + kh, px*patch + kw]
// which is PyTorch's Conv2d weight flatten order [out, c, kh, kw]; P = PH*PW patches in row-major
// order (matches flatten(2) of the conv output). pixels [B, C, H, W] fp32 or fp16, out fp16
// [B*P, C*patch*patch]. PH = H / patch, PW = W / patch (floor, like Conv2d). One thread per output
// element, grid-stride loop over B*P*C*patch*patch elements.
template <typename T>
__device__ __forceinline__ void im2col_body(const T* __restrict__ px, __half* __restrict__ out,
                                            int B, int C, int H, int W, int patch) {
    const int PH = H / patch, PW = W / patch, P = PH * PW;
    const int cols = C * patch * patch;
    const long long total = (long long)B * P * cols;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < total;
         e += (long long)gridDim.x * blockDim.x) {
        const int col = (int)(e % cols);
        const long long row = e / cols;
        const int p = (int)(row % P), b = (int)(row / P);
        const int c = col / (patch * patch), kh = (col / patch) % patch, kw = col % patch;
        const int y = (p / PW) * patch + kh, x = (p % PW) * patch + kw;
        out[e] = __float2half_rn(to_f32(px[(((size_t)b * C + c) * H + y) * W + x]));
    }
}
extern "C" __global__ void patch_im2col_f32(const float* px, __half* out, int B, int C, int H, int W, int patch) {
    im2col_body<float>(px, out, B, C, H, W, patch);
}
extern "C" __global__ void patch_im2col_f16(const __half* px, __half* out, int B, int C, int H, int W, int patch) {
    im2col_body<__half>(px, out, B, C, H, W, patch);
}

// ViT embeddings with C = 1 class token: out[b, 0, :] = cls[:] + pos[0, :];
// out[b, C + p, :] = patches[b, p, :] + pos[C + p, :]. C = 0 (SigLIP): no class row, cls unused
// (may be null). patches [B, P, D] (the patch-embedding GEMM output), cls [D], pos [P + C, D],
// out [B, P + C, D]. Grid-stride over B*(P+C)*D. out must not overlap the inputs.
extern "C" __global__ void vit_embed(const __half* __restrict__ patches, const __half* __restrict__ cls,
                                     const __half* __restrict__ pos, __half* __restrict__ out, int B,
                                     int P, int D, int C) {
    const int T = P + C;
    const long long total = (long long)B * T * D;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < total;
         e += (long long)gridDim.x * blockDim.x) {
        const int i = (int)(e % D);
        const long long r = e / D;
        const int t = (int)(r % T), b = (int)(r / T);
        const float a = t < C ? __half2float(cls[i]) : __half2float(patches[((size_t)b * P + t - C) * D + i]);
        out[e] = __float2half_rn(a + __half2float(pos[(size_t)t * D + i]));
    }
}

// y[i] = a[i] + b[i], n elements. y may alias a or b exactly (each element is read then written
// by one thread).
extern "C" __global__ void add_f16(const __half* a, const __half* b, __half* y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        y[i] = __float2half_rn(__half2float(a[i]) + __half2float(b[i]));
}

// Casts, n elements, round-to-nearest-even (f32 -> f16 overflow gives +-inf, like PyTorch).
extern "C" __global__ void cast_f32_f16(const float* __restrict__ x, __half* __restrict__ y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        y[i] = __float2half_rn(x[i]);
}
extern "C" __global__ void cast_f16_f32(const __half* __restrict__ x, float* __restrict__ y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        y[i] = __half2float(x[i]);
}

// KV-cache append for one new token per sequence at the position read from device memory:
//   k_cache[b, pos[b], :] = k_new[b, :], v_cache[b, pos[b], :] = v_new[b, :]   (row = H*d halves)
// k_new/v_new rows have stride new_rs (elements; e.g. columns of a fused qkv buffer), caches are
// [B, max_len, row] contiguous. Sequences with pos[b] outside [0, max_len) are skipped.
// Grid (B), block 256. Caches must not overlap k_new / v_new.
extern "C" __global__ void kv_append(const __half* __restrict__ k_new, const __half* __restrict__ v_new,
                                     long long new_rs, __half* __restrict__ k_cache,
                                     __half* __restrict__ v_cache, const int* __restrict__ pos,
                                     int max_len, int row) {
    const int b = blockIdx.x;
    const int p = pos[b];
    if (p < 0 || p >= max_len) return;
    const size_t dst = ((size_t)b * max_len + p) * row;
    for (int i = threadIdx.x; i < row; i += blockDim.x) {
        k_cache[dst + i] = k_new[b * new_rs + i];
        v_cache[dst + i] = v_new[b * new_rs + i];
    }
}

// x[i] += delta for i < n (advance device-resident positions / KV lengths between graph replays).
extern "C" __global__ void add_i32(int* x, int delta, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += delta;
}

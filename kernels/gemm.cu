// Tensor-core GEMM with fused epilogue:
//
//     Y[M, N] = act(X[M, K] · W[N, K]^T + bias[N]) (+ residual[M, N])
//
// X, W, Y, residual row-major and contiguous (row stride = K for X and W, N for Y/residual);
// W in PyTorch Linear layout [out, in]. fp16 in/out, fp32 accumulation (mma.sync m16n8k16).
//
// Tiling (Ampere-style, also what runs on Hopper until a wgmma path exists):
//   - block tile BM x BN x BK(32); warps laid out WARPS_M x WARPS_N, each owning a
//     (BM/WARPS_M) x (BN/WARPS_N) warp tile of m16n8 accumulators;
//   - STAGES-deep cp.async pipeline in dynamic shared memory; A and B tiles are stored as
//     [rows][32 halves] (64-byte rows) with the 16-byte chunk index XOR-swizzled by
//     (row >> 1) & 3, so each 8-row ldmatrix phase hits 8 distinct 16-byte bank groups and the
//     tile needs no padding;
//   - fragments loaded with ldmatrix.x4 (A: two k-halves of one m16 tile; B: two n8 tiles);
//   - epilogue straight from registers: bias, activation, residual, fp16 store (half2 when N is
//     even and pointers are 4-byte aligned, else scalar), or fp32 residual and store when the
//     output buffer is kept in fp32 (p.out_f32).
//
// Two tile configs (static switch, chosen by the launcher):
//   "l": 128x128, 8 warps (2x4, warp tile 64x32), 4 stages, 64 KiB smem (needs the
//        MAX_DYNAMIC_SHARED_SIZE attribute, set by the Rust launcher) - large M*N;
//   "s": 64x64, 4 warps (2x2, warp tile 32x32), 4 stages, 32 KiB smem - when the "l" grid would
//        not fill the GPU (BLIP-2 vision M=257, Q-Former M=32, small prefills).
//
// Ragged shapes: any M, N >= 1 and any K >= 1.
//   - vec path (p.vec = 1): K % 8 == 0 and X, W 16-byte aligned -> 16-byte cp.async with
//     zero-fill (src-size 0) for rows >= M / N and k-chunks >= K.
//   - scalar path (p.vec = 0): any K / alignment (e.g. the ViT patch embedding, K = 3*14*14 =
//     588): each 16-byte smem chunk is assembled from 8 predicated 2-byte loads. Slower, same
//     pipeline structure (the loads are synchronous, so only the smem double-use ordering
//     matters, which the per-iteration __syncthreads already provides).
//
// SAFETY preconditions (checked by the Rust launcher, src/backend/cuda/ops/gemm.rs `gemm`):
//   - x has >= M*K elements, w >= N*K, y >= M*N, bias (if non-null) >= N,
//     residual (if non-null) >= M*N;
//   - p.vec = 1 only if K % 8 == 0 and x, w are 16-byte aligned;
//   - p.pair = 1 only if N is even, y, bias, residual are 4-byte aligned and p.out_f32 = 0;
//   - p.out_f32 = 1: y and residual are fp32 arrays (4-byte aligned) of >= M*N floats;
//   - y must not overlap x, w or bias; residual may alias y exactly (in-place residual add:
//     every element is read then written by the same thread), but must not partially overlap;
//   - grid = (ceil(N/BN), ceil(M/BM)), block = WARPS_M*WARPS_N*32, dynamic smem = SMEM bytes.
#include "common.cuh"

struct GemmParams {
    const __half* x;         // [M, K]
    const __half* w;         // [N, K]
    const __half* bias;      // [N] or nullptr
    const __half* residual;  // [M, N] or nullptr; may alias y
    __half* y;               // [M, N]
    int m, n, k;
    int vec;   // 1: 16-byte cp.async loads (K % 8 == 0, x/w 16B aligned)
    int pair;  // 1: half2 epilogue (N even, y/bias/residual 4B aligned)
    int out_f32;  // 1: y and residual hold fp32 (an fp32 residual stream); pair must be 0
};
static_assert(sizeof(GemmParams) == 64, "GemmParams layout is mirrored in Rust");

template <int BM_, int BN_, int WARPS_M_, int WARPS_N_, int STAGES_>
struct GemmCfg {
    static constexpr int BM = BM_, BN = BN_, BK = 32;
    static constexpr int WARPS_M = WARPS_M_, WARPS_N = WARPS_N_, STAGES = STAGES_;
    static constexpr int THREADS = WARPS_M * WARPS_N * 32;
    static constexpr int WTM = BM / WARPS_M, WTN = BN / WARPS_N;
    static constexpr int MT = WTM / 16, NT = WTN / 8;
    static constexpr int A_STAGE = BM * BK, B_STAGE = BN * BK;  // halves
    static constexpr int SMEM = STAGES * (A_STAGE + B_STAGE) * 2;  // bytes
    static_assert(NT % 2 == 0, "B fragments are loaded two n8 tiles at a time");
    static_assert(BM % (WARPS_M * 16) == 0 && BN % (WARPS_N * 16) == 0, "warp tiling");
};

using CfgL = GemmCfg<128, 128, 2, 4, 4>;
using CfgS = GemmCfg<64, 64, 2, 2, 4>;

// Offset (in halves) of 16-byte chunk `ch` (0..3) of row `r` in a [rows][32] swizzled tile.
__device__ __forceinline__ int swz(int r, int ch) { return r * 32 + ((ch ^ ((r >> 1) & 3)) << 3); }

// Copies rows [row0, row0+ROWS) x k-chunk [k0, k0+32) of src[rows_total, K] into a tile.
template <int ROWS, int THREADS>
__device__ __forceinline__ void load_tile(__half* tile, const __half* __restrict__ src, int row0,
                                          int rows_total, int k0, int K, bool vec) {
    static_assert((ROWS * 4) % THREADS == 0, "whole chunks per thread");
#pragma unroll
    for (int it = 0; it < ROWS * 4 / THREADS; ++it) {
        const int c = it * THREADS + threadIdx.x;
        const int r = c >> 2, ch = c & 3;
        const int gr = row0 + r, gk = k0 + ch * 8;
        __half* dst = tile + swz(r, ch);
        if (vec) {
            const bool ok = gr < rows_total && gk < K;  // K % 8 == 0: whole chunk in or out
            const __half* s = ok ? src + (size_t)gr * K + gk : src;
            cp_async16(smem_u32(dst), s, ok ? 16 : 0);
        } else {
            __align__(16) __half h[8];
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const bool ok = gr < rows_total && gk + i < K;
                h[i] = ok ? src[(size_t)gr * K + gk + i] : __float2half(0.f);
            }
            *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(h);
        }
    }
}

template <class C, int ACT>
__device__ __forceinline__ void gemm_body(const GemmParams& p) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    __half* sA = reinterpret_cast<__half*>(smem_raw);
    __half* sB = sA + C::STAGES * C::A_STAGE;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp / C::WARPS_N, wn = warp % C::WARPS_N;
    const int m0 = blockIdx.y * C::BM, n0 = blockIdx.x * C::BN;
    const bool vec = p.vec != 0;
    const int ktiles = (p.k + C::BK - 1) / C::BK;

    float acc[C::MT][C::NT][4];
#pragma unroll
    for (int i = 0; i < C::MT; ++i)
#pragma unroll
        for (int j = 0; j < C::NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

    // Prologue: STAGES-1 tiles in flight (empty commit groups keep the group count uniform).
#pragma unroll
    for (int s = 0; s < C::STAGES - 1; ++s) {
        if (s < ktiles) {
            load_tile<C::BM, C::THREADS>(sA + s * C::A_STAGE, p.x, m0, p.m, s * C::BK, p.k, vec);
            load_tile<C::BN, C::THREADS>(sB + s * C::B_STAGE, p.w, n0, p.n, s * C::BK, p.k, vec);
        }
        cp_async_commit();
    }

    for (int kt = 0; kt < ktiles; ++kt) {
        // Tile kt has landed once at most STAGES-2 newer groups are pending; the barrier also
        // guarantees every warp is done with the stage we are about to overwrite (kt-1's).
        cp_async_wait<C::STAGES - 2>();
        __syncthreads();
        {
            const int pf = kt + C::STAGES - 1;
            if (pf < ktiles) {
                const int st = pf % C::STAGES;
                load_tile<C::BM, C::THREADS>(sA + st * C::A_STAGE, p.x, m0, p.m, pf * C::BK, p.k, vec);
                load_tile<C::BN, C::THREADS>(sB + st * C::B_STAGE, p.w, n0, p.n, pf * C::BK, p.k, vec);
            }
            cp_async_commit();
        }
        const __half* a = sA + (kt % C::STAGES) * C::A_STAGE;
        const __half* b = sB + (kt % C::STAGES) * C::B_STAGE;
#pragma unroll
        for (int kk = 0; kk < C::BK / 16; ++kk) {
            uint32_t af[C::MT][4], bf[C::NT][2];
#pragma unroll
            for (int i = 0; i < C::MT; ++i) {
                const int r = wm * C::WTM + i * 16 + (lane & 15);
                ldmatrix_x4(af[i], smem_u32(a + swz(r, kk * 2 + (lane >> 4))));
            }
#pragma unroll
            for (int j = 0; j < C::NT / 2; ++j) {
                const int r = wn * C::WTN + j * 16 + (lane & 7) + ((lane >> 4) << 3);
                uint32_t t[4];
                ldmatrix_x4(t, smem_u32(b + swz(r, kk * 2 + ((lane >> 3) & 1))));
                bf[2 * j][0] = t[0];
                bf[2 * j][1] = t[1];
                bf[2 * j + 1][0] = t[2];
                bf[2 * j + 1][1] = t[3];
            }
#pragma unroll
            for (int i = 0; i < C::MT; ++i)
#pragma unroll
                for (int j = 0; j < C::NT; ++j) mma_16816(acc[i][j], af[i], bf[j]);
        }
    }
    cp_async_wait<0>();  // drain (only empty groups can remain) before the block exits

    // Epilogue. Accumulator layout of m16n8: e0,e1 -> (row g, cols 2t,2t+1); e2,e3 -> row g+8.
    const int g = lane >> 2, t4 = lane & 3;
#pragma unroll
    for (int i = 0; i < C::MT; ++i) {
#pragma unroll
        for (int j = 0; j < C::NT; ++j) {
            const int col = n0 + wn * C::WTN + j * 8 + 2 * t4;
            if (col >= p.n) continue;
            const bool has2 = col + 1 < p.n;
            float b0 = 0.f, b1 = 0.f;
            if (p.bias) {
                b0 = __half2float(p.bias[col]);
                if (has2) b1 = __half2float(p.bias[col + 1]);
            }
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                const int row = m0 + wm * C::WTM + i * 16 + g + hf * 8;
                if (row >= p.m) continue;
                float v0 = act_static<ACT>(acc[i][j][2 * hf] + b0);
                float v1 = act_static<ACT>(acc[i][j][2 * hf + 1] + b1);
                const size_t off = (size_t)row * p.n + col;
                if (p.pair && has2) {
                    if (p.residual) {
                        float2 r = __half22float2(*reinterpret_cast<const __half2*>(p.residual + off));
                        v0 += r.x;
                        v1 += r.y;
                    }
                    *reinterpret_cast<__half2*>(p.y + off) = __floats2half2_rn(v0, v1);
                } else {
                    if (p.residual) v0 += load_act(p.residual, off, p.out_f32);
                    store_act(p.y, off, v0, p.out_f32);
                    if (has2) {
                        if (p.residual) v1 += load_act(p.residual, off + 1, p.out_f32);
                        store_act(p.y, off + 1, v1, p.out_f32);
                    }
                }
            }
        }
    }
}

#define GLIMPSE_GEMM_ENTRY(cfg, CFG, actname, ACT)                                     \
    extern "C" __global__ void __launch_bounds__(CFG::THREADS)                        \
        gemm_##cfg##_##actname(GemmParams p) {                                        \
        gemm_body<CFG, ACT>(p);                                                       \
    }

#define GLIMPSE_GEMM_ALL_ACTS(cfg, CFG)                     \
    GLIMPSE_GEMM_ENTRY(cfg, CFG, none, ACT_NONE)           \
    GLIMPSE_GEMM_ENTRY(cfg, CFG, relu, ACT_RELU)           \
    GLIMPSE_GEMM_ENTRY(cfg, CFG, gelu, ACT_GELU)           \
    GLIMPSE_GEMM_ENTRY(cfg, CFG, quick_gelu, ACT_QUICK_GELU) \
    GLIMPSE_GEMM_ENTRY(cfg, CFG, silu, ACT_SILU)           \
    GLIMPSE_GEMM_ENTRY(cfg, CFG, gelu_tanh, ACT_GELU_TANH)

// gemm_l_{none,relu,gelu,quick_gelu,silu}: 128x128 tiles, 256 threads, 65536 B dynamic smem.
GLIMPSE_GEMM_ALL_ACTS(l, CfgL)
// gemm_s_{none,relu,gelu,quick_gelu,silu}: 64x64 tiles, 128 threads, 32768 B dynamic smem.
GLIMPSE_GEMM_ALL_ACTS(s, CfgS)

// Decode GEMV: a few activation rows (M = 1..8) against a Linear weight, with the GEMM epilogue:
//
//     Y[M, N] = act(X[M, K] · W[N, K]^T + bias[N]) (+ residual[M, N])
//
// This is the decode-speed kernel: its runtime is the time to stream W once from HBM.
//   - every weight byte is loaded exactly once per launch (16-byte ld.global.nc with
//     L1::no_allocate) and used for all M rows while in registers; X rows (<= 8 x K halves) are
//     re-read through L1/L2 with __ldg;
//   - each output column n is owned by T consecutive threads (T = threads_per_row in
//     {32, 64, 128, 256}, block = 256 threads, so 256/T columns per block). The T threads split
//     K between them (in-block split-K): thread j reads 16-byte chunks j, j+T, j+2T, ...,
//     4 chunks in flight per thread (unrolled) to cover HBM latency; partial sums are reduced
//     with warp shuffles, then across the T/32 warps of a column through shared memory. No
//     workspace and no second kernel, so it is also CUDA-graph friendly.
//   - T heuristic (Rust launcher `gemv_threads_per_row`): T = next_pow2(ceil(K/8 / 8)) clamped
//     to [32, 256] (about 4-8 chunks per thread), then doubled while the grid has fewer than
//     2 blocks per SM and T < 256 (small N: split K further rather than idle SMs).
//     2560x10240 (N=10240, K=2560): T=64; 10240 -> 2560 (K=10240): T=256; 2560x2560: T=64.
//
// SAFETY preconditions (checked by the Rust launcher `gemv`):
//   - 1 <= M <= 8 (entry point gemv_m{M}), K % 8 == 0, K >= 8;
//   - x, w 16-byte aligned, x has >= M*K elements (row stride K), w >= N*K;
//   - y >= M*N elements (fp32 ones, 4-byte aligned, when out_f32; the residual likewise);
//     bias (nullable) >= N; residual (nullable) >= M*N and either exactly y
//     (in-place, each element read then written by one thread) or disjoint from y;
//   - threads_per_row in {32, 64, 128, 256}; block = 256 threads; grid = ceil(N / (256/T)).
#include "common.cuh"

struct GemvParams {
    const __half* x;         // [M, K]
    const __half* w;         // [N, K]
    const __half* bias;      // [N] or nullptr
    const __half* residual;  // [M, N] or nullptr; may alias y
    __half* y;               // [M, N]
    int n, k;
    int act;              // ActCode
    int threads_per_row;  // T
    int out_f32;          // 1: y and residual hold fp32 (an fp32 residual stream)
    int pad_;             // keeps sizeof a multiple of 8 (mirrored by the Rust #[repr(C)] struct)
};
static_assert(sizeof(GemvParams) == 64, "GemvParams layout is mirrored in Rust");

constexpr int GEMV_THREADS = 256;
constexpr int GEMV_UNROLL = 4;

template <int M>
__device__ __forceinline__ void gemv_body(const GemvParams& p) {
    __shared__ float red[GEMV_THREADS / 32][M];
    const int T = p.threads_per_row;
    const int rows_per_block = GEMV_THREADS / T;
    const int tid = threadIdx.x;
    const int col_in_block = tid / T, j = tid % T;
    const int n = blockIdx.x * rows_per_block + col_in_block;
    const int kc = p.k >> 3;  // 16-byte chunks per row

    float acc[M];
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m] = 0.f;

    if (n < p.n) {
        const __half* wrow = p.w + (size_t)n * p.k;
        for (int c0 = j; c0 < kc; c0 += T * GEMV_UNROLL) {
            uint4 wv[GEMV_UNROLL];
#pragma unroll
            for (int u = 0; u < GEMV_UNROLL; ++u) {
                const int c = c0 + u * T;
                wv[u] = c < kc ? ldg16_stream(wrow + (size_t)c * 8) : make_uint4(0, 0, 0, 0);
            }
#pragma unroll
            for (int u = 0; u < GEMV_UNROLL; ++u) {
                const int c = c0 + u * T;
                if (c < kc) {
                    float wf[8];
                    unpack8(wv[u], wf);
#pragma unroll
                    for (int m = 0; m < M; ++m) {
                        float xf[8];
                        unpack8(ldg16(p.x + (size_t)m * p.k + (size_t)c * 8), xf);
#pragma unroll
                        for (int i = 0; i < 8; ++i) acc[m] = fmaf(wf[i], xf[i], acc[m]);
                    }
                }
            }
        }
    }

    // Reduce the T partial sums of each column: shuffles within the warp, then smem across the
    // T/32 warps that share the column.
    const int warp = tid >> 5, lane = tid & 31;
#pragma unroll
    for (int m = 0; m < M; ++m) {
        const float s = warp_sum(acc[m]);
        if (lane == 0) red[warp][m] = s;
    }
    __syncthreads();
    if (n < p.n && j < M) {
        const int m = j;
        const int w0 = (col_in_block * T) >> 5, nw = T >> 5;
        float s = 0.f;
        for (int w = 0; w < nw; ++w) {
            // m is a runtime index into a [.][M] array: fine in shared memory.
            s += red[w0 + w][m];
        }
        if (p.bias) s += __half2float(p.bias[n]);
        s = apply_act(p.act, s);
        const size_t off = (size_t)m * p.n + n;
        if (p.residual) s += load_act(p.residual, off, p.out_f32);
        store_act(p.y, off, s, p.out_f32);
    }
}

#define GLIMPSE_GEMV_ENTRY(M) \
    extern "C" __global__ void __launch_bounds__(GEMV_THREADS, 1) gemv_m##M(GemvParams p) { gemv_body<M>(p); }

GLIMPSE_GEMV_ENTRY(1)
GLIMPSE_GEMV_ENTRY(2)
GLIMPSE_GEMV_ENTRY(3)
GLIMPSE_GEMV_ENTRY(4)
GLIMPSE_GEMV_ENTRY(5)
GLIMPSE_GEMV_ENTRY(6)
GLIMPSE_GEMV_ENTRY(7)
GLIMPSE_GEMV_ENTRY(8)

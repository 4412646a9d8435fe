// PTX probe: one warp runs common.cuh's inline-PTX wrappers (cp_async16 with partial and zero
// fills, ldmatrix_x4, mma_16816) on fixed inputs and writes every register they produce, so a
// test can hold a real card and the simulated device (sim/glimpse_sim.h) to the same answers,
// computed independently on the host from the PTX ISA's definitions (tests/gpu_kernels.rs
// `ptx_wrappers_match_the_isa`). Not used by any model.
//
//   a      [16][16] fp16, row-major: the A tile (m16 x k16)
//   b      [8][16]  fp16: B^T, i.e. row n holds column n of the k16 x n8 B tile
//   c      [16][8]  fp32: the accumulator C
//   d      [16][8]  fp32 out: A*B + C from mma.sync.m16n8k16 (laid out back in row-major)
//   frag   [32][6]  u32 out: per lane, ldmatrix_x4's four A registers, then the two B registers
//   copied [32][8]  fp16 out: lane l's 16-byte cp.async of src + 8l with src-size (l % 18 > 16 ? 16 : l % 18)
//   src    [32*8 + 8] fp16 (the last chunk is only read by full copies)
// SAFETY preconditions (checked by the Rust launcher `ptx_probe`): the lengths above, every
// pointer 16-byte aligned, grid 1, block 32.
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(32) ptx_probe(const __half* a, const __half* b, const float* c, float* d,
                                                          uint32_t* frag, __half* copied, const __half* src) {
    __shared__ __align__(16) __half sa[16][16];
    __shared__ __align__(16) __half sb[8][16];
    __shared__ __align__(16) __half sc[32][8];
    const int lane = threadIdx.x;

    // A: 32 chunks of 16 bytes, one per lane; B: 16 chunks; probe copies with src-size 0..16.
    cp_async16(smem_u32(&sa[lane >> 1][(lane & 1) * 8]), a + lane * 8, 16);
    if (lane < 16) cp_async16(smem_u32(&sb[lane >> 1][(lane & 1) * 8]), b + lane * 8, 16);
    const int n = lane % 18 > 16 ? 16 : lane % 18;
    cp_async16(smem_u32(&sc[lane][0]), n > 0 ? src + lane * 8 : src, n);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();

    for (int i = 0; i < 8; ++i) copied[lane * 8 + i] = sc[lane][i];

    // A fragments: lanes 0-15 address rows 0-15 of columns 0-7, lanes 16-31 columns 8-15.
    uint32_t af[4];
    ldmatrix_x4(af, smem_u32(&sa[lane & 15][(lane >> 4) * 8]));
    // B fragments: matrices 0/1 = B^T rows 0-7 at k 0-7 / 8-15 (2/3 repeat them).
    uint32_t bt[4];
    ldmatrix_x4(bt, smem_u32(&sb[lane & 7][((lane >> 3) & 1) * 8]));
    const uint32_t bf[2] = {bt[0], bt[1]};
    for (int i = 0; i < 4; ++i) frag[lane * 6 + i] = af[i];
    frag[lane * 6 + 4] = bf[0];
    frag[lane * 6 + 5] = bf[1];

    // C/D fragments: d[0..1] = (row g, cols 2t, 2t+1), d[2..3] = (row g+8, same cols).
    const int g = lane >> 2, t = lane & 3;
    float acc[4] = {c[g * 8 + 2 * t], c[g * 8 + 2 * t + 1], c[(g + 8) * 8 + 2 * t], c[(g + 8) * 8 + 2 * t + 1]};
    mma_16816(acc, af, bf);
    d[g * 8 + 2 * t] = acc[0];
    d[g * 8 + 2 * t + 1] = acc[1];
    d[(g + 8) * 8 + 2 * t] = acc[2];
    d[(g + 8) * 8 + 2 * t + 1] = acc[3];
}

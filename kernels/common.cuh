// Shared device helpers for glimpse kernels: reductions, vector loads, half helpers, activation
// epilogues and the sm_80+ PTX wrappers (cp.async, ldmatrix, mma.sync).
//
// Conventions used by every kernel file:
//   - fp16 (`__half`) storage, fp32 accumulation.
//   - row-major tensors; Linear weights in PyTorch layout W[N, K] (out, in).
//   - `extern "C"` entry points; templates are instantiated behind them with static switches.
#pragma once

#include <cuda_fp16.h>
#include <stdint.h>

#define GLIMPSE_DEVICE __device__ __forceinline__

// Activation codes shared with the Rust side (src/backend/cuda: Activation as i32).
enum ActCode : int {
    ACT_NONE = 0,
    ACT_RELU = 1,
    ACT_GELU = 2,        // exact erf GELU, 0.5*x*(1+erf(x/sqrt(2))) (PyTorch nn.GELU())
    ACT_QUICK_GELU = 3,  // x * sigmoid(1.702 x) (CLIP)
    ACT_SILU = 4,        // x * sigmoid(x) (Llama MLP)
    ACT_GELU_TANH = 5,   // gelu_pytorch_tanh: 0.5x(1+tanh(sqrt(2/pi)(x+0.044715x^3)))
};

// Applies the activation in fp32. Kept exact (erff, expf) so results match PyTorch's fp32
// activation followed by one rounding to fp16; the files using it are built without fast math.
GLIMPSE_DEVICE float apply_act(int act, float x) {
    switch (act) {
        case ACT_RELU: return x > 0.f ? x : 0.f;
        case ACT_GELU: return 0.5f * x * (1.f + erff(x * 0.70710678118654752f));
        case ACT_QUICK_GELU: return x / (1.f + expf(-1.702f * x));
        case ACT_SILU: return x / (1.f + expf(-x));
        case ACT_GELU_TANH: {
            // PyTorch's kBeta = sqrt(2) * (2/sqrt(pi)) * 0.5 and inner expression, in fp32.
            const float kBeta = 0.7978845608028654f;
            return 0.5f * x * (1.f + tanhf(kBeta * (x + 0.044715f * x * x * x)));
        }
        default: return x;
    }
}

template <int ACT>
GLIMPSE_DEVICE float act_static(float x) { return apply_act(ACT, x); }

// ---------------------------------------------------------------------------------------------
// Reductions
GLIMPSE_DEVICE float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

GLIMPSE_DEVICE float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Block-wide sum; every thread gets the result. `scratch` must hold 32 floats. Must be called by
// all threads of the block (contains __syncthreads). Safe to call repeatedly with the same scratch.
GLIMPSE_DEVICE float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nwarps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();  // protect scratch from a previous call still being read
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < nwarps ? scratch[lane] : 0.f;
    return warp_sum(t);
}

// ---------------------------------------------------------------------------------------------
// Vector loads / half helpers
GLIMPSE_DEVICE uint4 ldg16(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

// Unpacks 8 halves (one uint4) to fp32.
GLIMPSE_DEVICE void unpack8(const uint4& v, float* f) {
    const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        float2 t = __half22float2(h[i]);
        f[2 * i] = t.x;
        f[2 * i + 1] = t.y;
    }
}

GLIMPSE_DEVICE uint32_t pack_half2(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
}

// Loads as float from either fp16 or fp32 storage (templated kernels over input dtype).
GLIMPSE_DEVICE float to_f32(__half v) { return __half2float(v); }
GLIMPSE_DEVICE float to_f32(float v) { return v; }

// ---------------------------------------------------------------------------------------------
// sm_80+ PTX wrappers. On the simulated device (sim/glimpse_sim.h: kernels compiled as host C++)
// each instruction is the simulator's implementation of its PTX ISA definition.
#ifdef GLIMPSE_SIM
GLIMPSE_DEVICE uint4 ldg16_stream(const void* p) { return gsim::ptx_ld_global_nc_v4(p); }
GLIMPSE_DEVICE uint32_t smem_u32(const void* p) { return __cvta_generic_to_shared(p); }
GLIMPSE_DEVICE void cp_async16(uint32_t dst, const void* src, int src_bytes) {
    gsim::ptx_cp_async_cg16(dst, src, src_bytes);
}
GLIMPSE_DEVICE void cp_async_commit() { gsim::ptx_cp_async_commit(); }
template <int N>
GLIMPSE_DEVICE void cp_async_wait() { gsim::ptx_cp_async_wait(N); }
GLIMPSE_DEVICE void ldmatrix_x4(uint32_t* r, uint32_t addr) { gsim::ptx_ldmatrix_x4(r, addr); }
GLIMPSE_DEVICE void mma_16816(float* d, const uint32_t* a, const uint32_t* b) { gsim::ptx_mma_16816_f32(d, a, b); }
#else
// Streaming 16-byte load that does not allocate in L1 (weights read once per launch).
GLIMPSE_DEVICE uint4 ldg16_stream(const void* p) {
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return r;
}

GLIMPSE_DEVICE uint32_t smem_u32(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async global->shared copy; `src_bytes` < 16 zero-fills the rest (0 = pure zero fill,
// the source is not read but must still be a valid address, callers pass the tensor base).
GLIMPSE_DEVICE void cp_async16(uint32_t dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(src_bytes));
}
GLIMPSE_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
GLIMPSE_DEVICE void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

GLIMPSE_DEVICE void ldmatrix_x4(uint32_t* r, uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// D = A(16x16, row) * B(16x8, col) + D, fp16 inputs, fp32 accumulators.
GLIMPSE_DEVICE void mma_16816(float* d, const uint32_t* a, const uint32_t* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

#endif  // GLIMPSE_SIM

// Element `off` of an activation buffer held as fp16, or as fp32 when `f32` is set (a buffer the
// graph keeps in fp32, e.g. a residual stream: `graph::DType::F32`). Kernels take such buffers
// as `__half*` plus a flag so one entry point serves both (the flag is uniform per launch).
GLIMPSE_DEVICE float load_act(const __half* p, size_t off, int f32) {
    return f32 ? reinterpret_cast<const float*>(p)[off] : __half2float(p[off]);
}
GLIMPSE_DEVICE void store_act(__half* p, size_t off, float v, int f32) {
    if (f32) {
        reinterpret_cast<float*>(p)[off] = v;
    } else {
        p[off] = __float2half_rn(v);
    }
}

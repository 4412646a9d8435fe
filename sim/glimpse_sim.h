// The simulated device, kernel side: what `kernels/*.cu` see when they are compiled as host C++
// (g++ -include sim/glimpse_sim.h) instead of by nvcc. docs/simulated-device.md explains the whole
// simulation; this header gives the kernels
//   - CUDA's keywords (`__global__`, `__shared__`, `__launch_bounds__`, ...) and builtin
//     variables (`threadIdx`, `blockIdx`, `blockDim`, `gridDim`) of the current simulated thread;
//   - `__half` / `__half2` with CUDA's round-to-nearest-even conversions, bit for bit;
//   - the math functions and integer intrinsics the kernels call;
//   - the warp operations (`__shfl*_sync`, `__ballot_sync`, `__any/__all_sync`, `__syncwarp`) and
//     `__syncthreads`, which are the only points where a simulated thread yields to another;
//   - the PTX instructions behind common.cuh's inline-asm wrappers (`ldmatrix`, `mma.sync`,
//     `cp.async`), implemented from the PTX ISA's definitions (fragment layouts, commit/wait
//     groups), used by common.cuh's `#ifdef GLIMPSE_SIM` branch.
//
// Every CUDA thread is a fiber run by sim/runtime.cpp; `__shared__` variables are `thread_local`
// (one copy per OS thread, which runs one block at a time), so a block's threads share them and
// the runtime can poison them (NaN bytes) at the start of every block.
#pragma once

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#define GLIMPSE_SIM 1

// ---------------------------------------------------------------------------------------------
// Keywords
#define __device__
#define __host__
#define __global__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// A block-scope `thread_local` is static storage, one copy per OS thread; `extern __shared__`
// arrays (dynamic shared memory) are defined by the generated registration unit.
#define __shared__ thread_local
#define __constant__ const

// The registry generator (sim/gen_registry.py) preprocesses each kernel file with GSIM_SCAN to
// find its entry points, launch bounds and dynamic shared arrays by these markers.
#ifdef GSIM_SCAN
#undef __global__
#undef __launch_bounds__
#undef __shared__
#define __global__ GSIM_GLOBAL_MARK
#define __launch_bounds__(...) GSIM_LB_MARK(__VA_ARGS__)
#define __shared__ GSIM_SHARED_MARK
#endif

// ---------------------------------------------------------------------------------------------
// Vector types
struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x, y, z;
};
struct alignas(16) uint4 {
    unsigned int x, y, z, w;
};
struct alignas(8) uint2 {
    unsigned int x, y;
};
struct alignas(16) int4 {
    int x, y, z, w;
};
struct alignas(8) int2 {
    int x, y;
};
struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return int4{x, y, z, w}; }
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

// ---------------------------------------------------------------------------------------------
// The runtime interface (implemented by sim/runtime.cpp, reached through a table so the kernel
// library has no link-time dependency on the driver library that loads it).
namespace gsim {

// One pending cp.async copy of a thread: `bytes` (<= 16) snapshot bytes, zero-filled to 16.
struct AsyncCopy {
    unsigned char* dst;
    unsigned char data[16];
    unsigned group;  // commit-group number (uncommitted copies carry the next group's number)
};
constexpr int kMaxAsyncCopies = 64;

// What a simulated CUDA thread carries (one per fiber).
struct Thread {
    uint3 tid;
    uint3 bid;
    dim3 bdim;
    dim3 gdim;
    unsigned lane;
    unsigned warp;
    unsigned committed_groups;  // cp.async groups committed so far
    int npending;               // pending cp.async copies
    AsyncCopy pending[kMaxAsyncCopies];
};

// Everything a warp operation deposits and reads: one row of up to kWarpWords 32-bit words per
// lane, plus the set of lanes that took part.
constexpr int kWarpWords = 10;
struct WarpView {
    unsigned participants;
    uint32_t words[32][kWarpWords];
    float mma_d[32][4];  // mma.sync: each lane's D fragment, computed once by the runtime
};

enum WarpOpKind : int {
    WOP_SYNCWARP = 1,
    WOP_SHFL,
    WOP_SHFL_UP,
    WOP_SHFL_DOWN,
    WOP_SHFL_XOR,
    WOP_BALLOT,
    WOP_ANY,
    WOP_ALL,
    WOP_LDMATRIX_X4,
    WOP_MMA_16816,
    WOP_COUNT
};

struct Api {
    Thread* (*self)();
    void (*syncthreads)();
    // Deposits `n` words for this lane, waits for every non-exited lane of `mask`, and returns
    // the warp's view (valid until this lane's next warp operation).
    const WarpView* (*warp_op)(int kind, unsigned mask, const uint32_t* words, int n);
    // Shared-memory window: generic pointer <-> 32-bit shared address (errors abort the launch).
    uint32_t (*to_shared)(const void* p);
    unsigned char* (*from_shared)(uint32_t addr, unsigned bytes);
    // Aborts the launch with a message (a kernel-visible error, like a trap).
    [[noreturn]] void (*fail)(const char* what);
    // Checks that [p, p+bytes) is global (device) memory the program may read.
    void (*check_global)(const void* p, unsigned bytes, const char* what);
};
extern const Api* api;

inline Thread* self() { return api->self(); }

}  // namespace gsim

// Builtin variables of the running thread.
#define threadIdx (::gsim::self()->tid)
#define blockIdx (::gsim::self()->bid)
#define blockDim (::gsim::self()->bdim)
#define gridDim (::gsim::self()->gdim)
constexpr int warpSize = 32;

inline void __syncthreads() { gsim::api->syncthreads(); }

// ---------------------------------------------------------------------------------------------
// fp16: storage type with CUDA's conversions (round to nearest even; NaN -> 0x7fff as cvt.rn.f16.f32
// gives; overflow -> inf; subnormals kept).
namespace gsim {
inline uint16_t f32_to_f16_bits(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u;
    const uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return 0x7fffu;               // NaN (canonical, as the hardware)
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // rounds to >= 65520: inf
    if (ax >= 0x38800000u) {                             // normal half
        const uint32_t mant = ax & 0x7fffffu;
        const uint32_t exp = (ax >> 23) - 127 + 15;
        uint32_t h = (exp << 10) | (mant >> 13);
        const uint32_t rem = mant & 0x1fffu;
        if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // carries into exp correctly
        return (uint16_t)(sign | h);
    }
    if (ax < 0x33000000u) return (uint16_t)sign;  // below half the smallest subnormal: +-0
    // Subnormal half: value = m * 2^-24 with m = round(ax_value * 2^24).
    const uint32_t exp = ax >> 23;                 // biased f32 exponent, 102..112
    const uint32_t mant = (ax & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - exp;              // 14..24: bits dropped from the 24-bit mantissa
    uint32_t h = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u);
    const uint32_t halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (h & 1u))) ++h;
    return (uint16_t)(sign | h);
}

inline float f16_bits_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    uint32_t x;
    if (exp == 0x1f) {
        x = sign | 0x7f800000u | (mant << 13);
    } else if (exp != 0) {
        x = sign | ((exp - 15 + 127) << 23) | (mant << 13);
    } else if (mant == 0) {
        x = sign;
    } else {
        int e = -1;
        do {
            mant <<= 1;
            ++e;
        } while (!(mant & 0x400u));
        x = sign | ((uint32_t)(127 - 15 - e) << 23) | ((mant & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &x, 4);
    return f;
}
}  // namespace gsim

struct __half {
    unsigned short __x;
    __half() = default;
    __half(float f) : __x(gsim::f32_to_f16_bits(f)) {}
    __half(double f) : __x(gsim::f32_to_f16_bits((float)f)) {}
    __half(int i) : __x(gsim::f32_to_f16_bits((float)i)) {}
    operator float() const { return gsim::f16_bits_to_f32(__x); }
};
struct alignas(4) __half2 {
    __half x, y;
};
typedef __half half;
typedef __half2 half2;
static_assert(sizeof(__half) == 2 && sizeof(__half2) == 4, "fp16 storage sizes");

inline __half __float2half_rn(float f) {
    __half h;
    h.__x = gsim::f32_to_f16_bits(f);
    return h;
}
inline __half __float2half(float f) { return __float2half_rn(f); }
inline float __half2float(__half h) { return gsim::f16_bits_to_f32(h.__x); }
inline __half2 __floats2half2_rn(float a, float b) { return __half2{__float2half_rn(a), __float2half_rn(b)}; }
inline __half2 __float2half2_rn(float a) { return __floats2half2_rn(a, a); }
inline float2 __half22float2(__half2 h) { return float2{__half2float(h.x), __half2float(h.y)}; }
inline float __low2float(__half2 h) { return __half2float(h.x); }
inline float __high2float(__half2 h) { return __half2float(h.y); }
inline __half __ushort_as_half(unsigned short v) {
    __half h;
    h.__x = v;
    return h;
}
inline unsigned short __half_as_ushort(__half h) { return h.__x; }

// ---------------------------------------------------------------------------------------------
// Math (the accurate libm functions; nvcc's fast-math approximations are not simulated).
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
namespace gsim {
template <typename To, typename From>
inline To bits_as(From v) {
    static_assert(sizeof(To) == sizeof(From), "same size");
    To r;
    memcpy(&r, &v, sizeof r);
    return r;
}
}  // namespace gsim
inline float __int_as_float(int v) { return gsim::bits_as<float>(v); }
inline int __float_as_int(float f) { return gsim::bits_as<int>(f); }
inline unsigned __float_as_uint(float f) { return gsim::bits_as<unsigned>(f); }
inline float __uint_as_float(unsigned v) { return gsim::bits_as<float>(v); }
using std::isinf;
using std::isnan;
using std::isfinite;
// CUDA's integer min/max overloads (device code calls unqualified min/max).
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }

inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline int __ffsll(long long v) { return __builtin_ffsll(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz((unsigned)v); }
inline unsigned __brev(unsigned v) {
    v = ((v >> 1) & 0x55555555u) | ((v & 0x55555555u) << 1);
    v = ((v >> 2) & 0x33333333u) | ((v & 0x33333333u) << 2);
    v = ((v >> 4) & 0x0f0f0f0fu) | ((v & 0x0f0f0f0fu) << 4);
    v = ((v >> 8) & 0x00ff00ffu) | ((v & 0x00ff00ffu) << 8);
    return (v >> 16) | (v << 16);
}

// ---------------------------------------------------------------------------------------------
// Loads through the read-only path: plain loads here (global memory is host memory).
template <typename T>
inline T __ldg(const T* p) {
    gsim::api->check_global(p, sizeof(T), "__ldg");
    return *p;
}
inline uint32_t __cvta_generic_to_shared(const void* p) { return gsim::api->to_shared(p); }

// ---------------------------------------------------------------------------------------------
// Warp operations. Each deposits this lane's operand, meets the other lanes of `mask`, and reads
// the operands it needs from the warp's view. Reading a lane that did not take part (not in the
// mask, exited, or past the end of a partial warp) gives all-ones bits: a NaN, or -1.
namespace gsim {
constexpr uint32_t kPoison = 0xffffffffu;

template <typename T>
inline uint32_t to_word(T v) {
    static_assert(sizeof(T) == 4, "32-bit warp operand");
    uint32_t w;
    memcpy(&w, &v, 4);
    return w;
}
template <typename T>
inline T from_word(uint32_t w) {
    T v;
    memcpy(&v, &w, 4);
    return v;
}

template <typename T>
inline T shfl_from(int kind, unsigned mask, T var, int arg, int width) {
    static_assert(sizeof(T) == 4 || sizeof(T) == 8, "__shfl*_sync takes 4- or 8-byte values");
    constexpr int n = sizeof(T) / 4;
    uint32_t in[2] = {0, 0};
    memcpy(in, &var, sizeof(T));
    const WarpView* v = api->warp_op(kind, mask, in, n);
    const int lane = (int)self()->lane;
    if (width < 1 || width > 32 || (width & (width - 1))) api->fail("shfl width must be a power of two <= 32");
    const int seg = lane & ~(width - 1);  // first lane of this lane's segment
    int src;
    switch (kind) {
        case WOP_SHFL: src = seg + (arg & (width - 1)); break;
        case WOP_SHFL_UP: src = (lane - seg) >= arg ? lane - arg : lane; break;
        case WOP_SHFL_DOWN: src = (lane - seg) + arg < width ? lane + arg : lane; break;
        default: {  // XOR: a source outside the segment leaves the value unchanged
            const int s = lane ^ arg;
            src = (s >= seg && s < seg + width) ? s : lane;
        }
    }
    uint32_t out[2] = {kPoison, kPoison};
    if (src >= 0 && src < 32 && ((v->participants >> src) & 1u)) memcpy(out, v->words[src], 4 * n);
    T r;
    memcpy(&r, out, sizeof(T));
    return r;
}
}  // namespace gsim

template <typename T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32) {
    return gsim::shfl_from(gsim::WOP_SHFL, mask, var, src_lane, width);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
    return gsim::shfl_from(gsim::WOP_SHFL_UP, mask, var, (int)delta, width);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
    return gsim::shfl_from(gsim::WOP_SHFL_DOWN, mask, var, (int)delta, width);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
    return gsim::shfl_from(gsim::WOP_SHFL_XOR, mask, var, lane_mask, width);
}
namespace gsim {
// A vote: the lanes that took part, and among them those whose predicate is true.
inline unsigned vote(int kind, unsigned mask, int pred, unsigned* participants) {
    const uint32_t in = pred != 0;
    const WarpView* v = api->warp_op(kind, mask, &in, 1);
    unsigned yes = 0;
    for (int l = 0; l < 32; ++l)
        if (((v->participants >> l) & 1u) && v->words[l][0]) yes |= 1u << l;
    *participants = v->participants;
    return yes;
}
}  // namespace gsim
inline unsigned __ballot_sync(unsigned mask, int pred) {
    unsigned took_part;
    return gsim::vote(gsim::WOP_BALLOT, mask, pred, &took_part);
}
inline int __any_sync(unsigned mask, int pred) {
    unsigned took_part;
    return gsim::vote(gsim::WOP_ANY, mask, pred, &took_part) != 0;
}
inline int __all_sync(unsigned mask, int pred) {
    unsigned took_part;
    return gsim::vote(gsim::WOP_ALL, mask, pred, &took_part) == took_part;
}
inline void __syncwarp(unsigned mask = 0xffffffffu) { gsim::api->warp_op(gsim::WOP_SYNCWARP, mask, nullptr, 0); }

// ---------------------------------------------------------------------------------------------
// The PTX instructions behind common.cuh's wrappers (PTX ISA 8.x, "Warp-level matrix
// instructions" and "Data movement: cp.async").
namespace gsim {

// ld.global.nc.v4.u32: a 16-byte global load (must be 16-byte aligned).
inline uint4 ptx_ld_global_nc_v4(const void* p) {
    if ((uintptr_t)p & 15u) api->fail("ld.global.nc.v4.u32: address is not 16-byte aligned");
    api->check_global(p, 16, "ld.global.nc.v4.u32");
    uint4 r;
    memcpy(&r, p, 16);
    return r;
}

// cp.async.cg.shared.global [dst], [src], 16, src_bytes: reads src_bytes (<= 16) bytes now and
// zero-fills the rest; the 16 bytes land in shared memory only when a cp.async.wait_group retires
// their group. Until then the destination holds NaN bytes, so reading a stage early shows up.
inline void ptx_cp_async_cg16(uint32_t dst_addr, const void* src, int src_bytes) {
    Thread* t = self();
    if (src_bytes < 0 || src_bytes > 16) api->fail("cp.async: src-size must be 0..16");
    if ((dst_addr & 15u) || ((uintptr_t)src & 15u)) api->fail("cp.async 16: addresses must be 16-byte aligned");
    if (t->npending >= kMaxAsyncCopies) api->fail("cp.async: too many copies pending without a wait_group");
    unsigned char* dst = api->from_shared(dst_addr, 16);
    AsyncCopy& c = t->pending[t->npending++];
    c.dst = dst;
    c.group = t->committed_groups;
    memset(c.data, 0, 16);
    if (src_bytes > 0) {
        api->check_global(src, (unsigned)src_bytes, "cp.async source");
        memcpy(c.data, src, (size_t)src_bytes);
    }
    memset(dst, 0xff, 16);
}

inline void ptx_cp_async_commit() { ++self()->committed_groups; }

// cp.async.wait_group N: every committed group but the newest N has landed.
inline void ptx_cp_async_wait(int n) {
    Thread* t = self();
    const unsigned limit = t->committed_groups >= (unsigned)n ? t->committed_groups - (unsigned)n : 0u;
    int keep = 0;
    for (int i = 0; i < t->npending; ++i) {
        AsyncCopy& c = t->pending[i];
        if (c.group < limit) {
            memcpy(c.dst, c.data, 16);
        } else {
            t->pending[keep++] = c;
        }
    }
    t->npending = keep;
}

// ldmatrix.sync.aligned.m8n8.x4.shared.b16: lanes 8m..8m+7 give the row addresses of matrix m;
// lane l receives, for each matrix m, the two b16 elements (row l/4, columns 2(l%4), 2(l%4)+1).
inline void ptx_ldmatrix_x4(uint32_t* r, uint32_t addr) {
    if (addr & 15u) api->fail("ldmatrix: row address must be 16-byte aligned");
    uint32_t row[4];
    memcpy(row, api->from_shared(addr, 16), 16);  // this lane's row, read by this lane
    const WarpView* v = api->warp_op(WOP_LDMATRIX_X4, 0xffffffffu, row, 4);
    if (v->participants != 0xffffffffu) api->fail("ldmatrix.sync.aligned: every lane of the warp must execute it");
    const unsigned lane = self()->lane;
    for (int m = 0; m < 4; ++m) r[m] = v->words[m * 8 + lane / 4][lane % 4];
}

// mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32: D = A(16x16) * B(16x8) + C. Each lane
// deposits its A, B and C fragments; the runtime (sim/runtime.cpp, `mma_16816`) assembles the
// matrices from the ISA's fragment layouts, computes D once for the warp, and each lane takes its
// D fragment.
inline void ptx_mma_16816_f32(float* d, const uint32_t* a, const uint32_t* b) {
    uint32_t in[10] = {a[0], a[1], a[2], a[3], b[0], b[1]};
    memcpy(in + 6, d, 16);
    const WarpView* v = api->warp_op(WOP_MMA_16816, 0xffffffffu, in, 10);
    if (v->participants != 0xffffffffu) api->fail("mma.sync.aligned: every lane of the warp must execute it");
    memcpy(d, v->mma_d[self()->lane], 16);
}
}  // namespace gsim

// Beam search's KV-cache reorder as a gather: each buffer holds `seqs` sequences of `len` 16-bit
// slots (an fp32 buffer counts two slots per element); for i < count,
//   dst[dst_seq[i]*len + e] = src[src_seq[i]*len + e]      for every e < len.
// The executor runs it twice per buffer over only the sequences that move (from[to] != to):
// cache -> a persistent scratch (src_seq = from[moved], dst_seq = 0..count), then scratch ->
// cache (src_seq = 0..count, dst_seq = moved). No allocation, no whole-buffer copy, no host sync.
// `_u128` moves 8 slots per thread (launcher: len % 8 == 0 and 16-byte aligned bases), `_u16` one.
//
// SAFETY preconditions (checked by the Rust launcher `gather_sequences`): src_seq and dst_seq hold
// `count` ints, each in range for its buffer (src/dst hold >= (index+1)*len slots); src and dst do
// not overlap; dst_seq has no duplicates; grid-stride loop over count*len (any grid size).
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void gather_body(const T* __restrict__ src, T* __restrict__ dst, const int* __restrict__ src_seq,
                                            const int* __restrict__ dst_seq, int count, long long len) {
    const long long total = (long long)count * len;
    for (long long g = blockIdx.x * (long long)blockDim.x + threadIdx.x; g < total; g += (long long)gridDim.x * blockDim.x) {
        const int i = (int)(g / len);
        const long long e = g - (long long)i * len;
        dst[(long long)dst_seq[i] * len + e] = src[(long long)src_seq[i] * len + e];
    }
}

extern "C" __global__ void gather_seqs_u16(const unsigned short* src, unsigned short* dst, const int* src_seq,
                                           const int* dst_seq, int count, long long len) {
    gather_body<unsigned short>(src, dst, src_seq, dst_seq, count, len);
}
extern "C" __global__ void gather_seqs_u128(const uint4* src, uint4* dst, const int* src_seq, const int* dst_seq,
                                            int count, long long len) {
    gather_body<uint4>(src, dst, src_seq, dst_seq, count, len);
}

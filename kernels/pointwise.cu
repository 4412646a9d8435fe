// Pointwise kernels that need exact libm math (this file is built WITHOUT fast math: erff,
// tanhf, expf, sinf and cosf are the accurate versions, not the __sinf-style intrinsics whose
// error grows with the argument): gated activations and rotary embeddings.
//
// 1. gated_act_f16:  out[r, c] = half(half(act(gate[r, c])) * up[r, c])  for r < rows, c < cols.
//    The activation output is an fp16 tensor in PyTorch before the multiply, hence the inner
//    rounding; the product of two halves is exact in fp32, so one more rounding equals the fp16
//    multiply. gate / up are column views (row strides gate_rs / up_rs): two Linear outputs or
//    the halves of one fused [rows, 2I] buffer.
//
// 2. rope_f16: HF rotate_half RoPE in place on `heads` heads of `head_dim` at x + row*row_stride
//    (+ h*head_dim). For j < nfreq (rot = 2*nfreq <= head_dim): with
//      pos   = max(start[b] + i, 0)         (start[b] = position - left_pad[b], device memory,
//                                            so a captured decode step replays as it advances)
//      angle = float(pos) * inv_freq[j]     (fp32 product, as transformers)
//      c, s  = half(cosf(angle)), half(sinf(angle))   (cos/sin in fp32, cast to the activation
//                                                      dtype: HF's cos.to(x.dtype))
//      x_j       <- half(half(x_j c) - half(x_{j+nfreq} s))
//      x_{j+nfreq} <- half(half(x_{j+nfreq} c) + half(x_j s))
//    which is q*cos + rotate_half(q)*sin evaluated op by op in fp16 like PyTorch does.
//    Precision: for positions < 2^24 the float conversion is exact; the fp32 product matches
//    transformers bit for bit; accurate cosf/sinf are within 1-2 fp32 ulp of torch's, so after
//    the fp16 cast the factors agree except at rare rounding ties (one fp16 ulp).
//    Each thread owns one (row, head, j) pair and reads and writes only x_j and x_{j+nfreq}, so
//    the in-place update has no races.
//
// 3. gated_add_f16: IDEFICS' gated residual. For each row r < rows (with a mask: each row whose
//    mask row, mask_cols halves at r*mask_stride of an additive attention mask, holds a 0):
//      out[r, c] = half(out[r, c] + half(half(tanhf(alpha[c or 0])) * x[r, c]))
//    which is `residual + tanh(alpha) * hidden` evaluated op by op in fp16 like PyTorch; rows
//    with no visible key are left unchanged (transformers zeroes their cross-attention output).
//    One warp per row: the mask scan is reduced with __any_sync, so the skip is warp-uniform.
//
// SAFETY preconditions (checked by the Rust launchers in src/backend/cuda/ops/pointwise.rs):
//   - gated: gate/up/out rows r < rows hold cols elements at r*stride (gate_rs, up_rs >= cols;
//     out contiguous [rows, cols]); out does not overlap gate or up;
//   - rope: rows b*seq + i < batch*seq of x hold heads*head_dim elements at row*row_stride;
//     2*nfreq <= head_dim; inv_freq has nfreq floats; start has batch ints;
//   - gated_add: x and out contiguous [rows, cols], out does not overlap x or mask; mask
//     (nullable) rows r < rows hold mask_cols halves at r*mask_stride; alpha holds nalpha (1 or cols) halves;
//     blockDim.x a multiple of 32;
//   - grid-stride loops: any grid size.
#include "common.cuh"

struct GatedParams {
    const __half* gate;
    const __half* up;
    __half* out;
    long long gate_rs, up_rs;
    int rows, cols, act, pad_;
};
static_assert(sizeof(GatedParams) == 56, "GatedParams layout is mirrored in Rust");

extern "C" __global__ void gated_act_f16(GatedParams p) {
    const long long total = (long long)p.rows * p.cols;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < total;
         e += (long long)gridDim.x * blockDim.x) {
        const long long r = e / p.cols;
        const int c = (int)(e % p.cols);
        const float g = __half2float(p.gate[r * p.gate_rs + c]);
        const float a = __half2float(__float2half_rn(apply_act(p.act, g)));
        p.out[e] = __float2half_rn(a * __half2float(p.up[r * p.up_rs + c]));
    }
}

struct RopeParams {
    __half* x;
    const float* inv_freq;
    const int* start;
    long long row_stride;
    int batch, seq, heads, head_dim, nfreq, pad_;
};
static_assert(sizeof(RopeParams) == 56, "RopeParams layout is mirrored in Rust");

extern "C" __global__ void rope_f16(RopeParams p) {
    const long long total = (long long)p.batch * p.seq * p.heads * p.nfreq;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < total;
         e += (long long)gridDim.x * blockDim.x) {
        const int j = (int)(e % p.nfreq);
        const long long rh = e / p.nfreq;
        const int h = (int)(rh % p.heads);
        const long long row = rh / p.heads;
        const int b = (int)(row / p.seq), i = (int)(row % p.seq);
        const int pos = max(p.start[b] + i, 0);
        const float angle = (float)pos * p.inv_freq[j];
        const float c = __half2float(__float2half_rn(cosf(angle)));
        const float s = __half2float(__float2half_rn(sinf(angle)));
        __half* head = p.x + row * p.row_stride + (long long)h * p.head_dim;
        const float a = __half2float(head[j]), bb = __half2float(head[j + p.nfreq]);
        const float ac = __half2float(__float2half_rn(a * c)), bs = __half2float(__float2half_rn(bb * s));
        const float bc = __half2float(__float2half_rn(bb * c)), as = __half2float(__float2half_rn(a * s));
        head[j] = __float2half_rn(ac - bs);
        head[j + p.nfreq] = __float2half_rn(bc + as);
    }
}

struct GatedAddParams {
    const __half* x;
    const __half* alpha;
    const __half* mask;
    __half* out;
    long long mask_stride;
    int rows, cols, nalpha, mask_cols;
};
static_assert(sizeof(GatedAddParams) == 56, "GatedAddParams layout is mirrored in Rust");

extern "C" __global__ void gated_add_f16(GatedAddParams p) {
    const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    for (long long r = (long long)blockIdx.x * warps + (threadIdx.x >> 5); r < p.rows;
         r += (long long)gridDim.x * warps) {
        if (p.mask) {
            int visible = 0;
            for (int j = lane; j < p.mask_cols; j += 32) visible |= __half2float(p.mask[r * p.mask_stride + j]) == 0.f;
            if (!__any_sync(0xffffffffu, visible)) continue;  // warp-uniform: no image for this row
        }
        for (int c = lane; c < p.cols; c += 32) {
            const float gate = __half2float(__float2half_rn(tanhf(__half2float(p.alpha[p.nalpha == 1 ? 0 : c]))));
            const float add = __half2float(__float2half_rn(gate * __half2float(p.x[r * p.cols + c])));
            __half* o = p.out + r * p.cols + c;
            *o = __float2half_rn(__half2float(*o) + add);
        }
    }
}

// Optimiser kernels of the trainer: fused Adam, EMA and the per-tensor Σx² of the global gradient
// norm. CPU twins: backend::cpu::optim (`adam_update`, `ema_update`) and `Cpu::sum_squares`.
//
// Adam and EMA perform exactly the host formulas' sequence of IEEE f32 operations (each rounded
// to nearest, none contracted into an FMA), so the CUDA update is bit-identical to the CPU one for
// the same inputs and constants. All outputs are fresh buffers (the Backend is functional).
#include "common.cuh"

// Round-to-nearest f32 arithmetic that the compiler may not fuse (NVRTC contracts a*b+c into an
// FMA by default, which would round once instead of twice and differ from the host).
#ifdef SRSDE_NVRTC
__device__ __forceinline__ float rn_add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float rn_sub(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ float rn_mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float rn_div(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ float rn_sqrt(float a) { return __fsqrt_rn(a); }
#else  // the CPU kernel emulator: plain C++ float ops are IEEE and not contracted there
__device__ __forceinline__ float rn_add(float a, float b) { volatile float r = a + b; return r; }
__device__ __forceinline__ float rn_sub(float a, float b) { volatile float r = a - b; return r; }
__device__ __forceinline__ float rn_mul(float a, float b) { volatile float r = a * b; return r; }
__device__ __forceinline__ float rn_div(float a, float b) { volatile float r = a / b; return r; }
__device__ __forceinline__ float rn_sqrt(float a) { return sqrtf(a); }
#endif

// One torch single-tensor Adam step, out of place. With the host-computed f32 constants
// w1 = 1−β1, b2 = β2, w2 = 1−β2, bc2_sqrt = √(1−β2^step), step_size = lr/(1−β1^step):
//   g ← g·grad_scale; m ← m + w1·(g − m); v ← v·b2 + (w2·g)·g;
//   p ← p − step_size · (m / (√v / bc2_sqrt + eps)).
extern "C" __global__ void optim_adam(const float* __restrict__ p, const float* __restrict__ g,
                                      const float* __restrict__ m, const float* __restrict__ v,
                                      float* __restrict__ p_out, float* __restrict__ m_out,
                                      float* __restrict__ v_out, i64 n, float grad_scale, float w1, float b2,
                                      float w2, float bc2_sqrt, float eps, float step_size) {
    GRID_STRIDE(i, n) {
        const float gi = rn_mul(g[i], grad_scale);
        const float mi = rn_add(m[i], rn_mul(w1, rn_sub(gi, m[i])));
        const float vi = rn_add(rn_mul(v[i], b2), rn_mul(rn_mul(w2, gi), gi));
        const float denom = rn_add(rn_div(rn_sqrt(vi), bc2_sqrt), eps);
        p_out[i] = rn_sub(p[i], rn_mul(step_size, rn_div(mi, denom)));
        m_out[i] = mi;
        v_out[i] = vi;
    }
}

// EMA of the weights, out of place: out = s − k·(s − p) with k = 1 − decay (rounded on the host).
extern "C" __global__ void optim_ema(const float* __restrict__ shadow, const float* __restrict__ p,
                                     float* __restrict__ out, i64 n, float k) {
    GRID_STRIDE(i, n) out[i] = rn_sub(shadow[i], rn_mul(k, rn_sub(shadow[i], p[i])));
}

// Σx² of up to OPTIM_LIST_MAX tensors per launch, passed by value (pointer and length tables; the
// Rust twin is `SumsqList` in src/backend/cuda/optim.rs). Grid (parts, count): block (b, t) sums
// the squares of its grid-strided share of tensor t in double and writes
// partial[t·parts + b]; every block writes its slot (0 when it has no elements), so
// optim_sumsq_finish may read all of them. Deterministic: no atomics.
#define OPTIM_LIST_MAX 64
struct SumsqList {
    const float* ptr[OPTIM_LIST_MAX];
    i64 len[OPTIM_LIST_MAX];
};

extern "C" __global__ void optim_sumsq_partial(SumsqList list, double* __restrict__ partial) {
    __shared__ double scratch[32];
    const int t = blockIdx.y;
    const float* x = list.ptr[t];
    const i64 len = list.len[t];
    double acc = 0.0;
    for (i64 j = (i64)blockIdx.x * blockDim.x + threadIdx.x; j < len; j += (i64)gridDim.x * blockDim.x) {
        const double v = (double)x[j];
        acc += v * v;
    }
    acc = block_sum_d(acc, scratch);
    if (threadIdx.x == 0) partial[(i64)t * gridDim.x + blockIdx.x] = acc;
}

// out[r] = Σ_j partial[r·parts + j], one block per tensor, kept in double.
extern "C" __global__ void optim_sumsq_finish(const double* __restrict__ partial, double* __restrict__ out,
                                              int parts) {
    __shared__ double scratch[32];
    const double* row = partial + (i64)blockIdx.x * parts;
    double acc = 0.0;
    for (int j = threadIdx.x; j < parts; j += blockDim.x) acc += row[j];
    acc = block_sum_d(acc, scratch);
    if (threadIdx.x == 0) out[blockIdx.x] = acc;
}

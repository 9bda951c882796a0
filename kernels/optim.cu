// Optimiser kernels of the trainer: fused Adam and EMA (per tensor, and over lists of tensors in
// one launch) and the per-tensor Σx² of the global gradient norm. CPU twins: backend::cpu::optim
// (`adam_update`, `ema_update`) and `Cpu::sum_squares`.
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

// One torch single-tensor Adam step of one element, out of place. With the host-computed f32
// constants w1 = 1−β1, b2 = β2, w2 = 1−β2, bc2_sqrt = √(1−β2^step), step_size = lr/(1−β1^step):
//   g ← g·grad_scale; m ← m + w1·(g − m); v ← v·b2 + (w2·g)·g;
//   p ← p − step_size · (m / (√v / bc2_sqrt + eps)).
// Shared by the per-tensor and the multi-tensor kernel, so both round identically.
struct AdamConsts {
    float grad_scale, w1, b2, w2, bc2_sqrt, eps, step_size;
};

__device__ __forceinline__ void adam_element(const float p, const float g, const float m, const float v,
                                             float* p_out, float* m_out, float* v_out, const AdamConsts& c) {
    const float gi = rn_mul(g, c.grad_scale);
    const float mi = rn_add(m, rn_mul(c.w1, rn_sub(gi, m)));
    const float vi = rn_add(rn_mul(v, c.b2), rn_mul(rn_mul(c.w2, gi), gi));
    const float denom = rn_add(rn_div(rn_sqrt(vi), c.bc2_sqrt), c.eps);
    *p_out = rn_sub(p, rn_mul(c.step_size, rn_div(mi, denom)));
    *m_out = mi;
    *v_out = vi;
}

// EMA of one weight, out of place: s − k·(s − p) with k = 1 − decay (rounded on the host).
__device__ __forceinline__ float ema_element(const float s, const float p, const float k) {
    return rn_sub(s, rn_mul(k, rn_sub(s, p)));
}

// Adam over one tensor of n elements.
extern "C" __global__ void optim_adam(const float* __restrict__ p, const float* __restrict__ g,
                                      const float* __restrict__ m, const float* __restrict__ v,
                                      float* __restrict__ p_out, float* __restrict__ m_out,
                                      float* __restrict__ v_out, i64 n, float grad_scale, float w1, float b2,
                                      float w2, float bc2_sqrt, float eps, float step_size) {
    const AdamConsts c{grad_scale, w1, b2, w2, bc2_sqrt, eps, step_size};
    GRID_STRIDE(i, n) adam_element(p[i], g[i], m[i], v[i], &p_out[i], &m_out[i], &v_out[i], c);
}

// EMA over one tensor of n elements.
extern "C" __global__ void optim_ema(const float* __restrict__ shadow, const float* __restrict__ p,
                                     float* __restrict__ out, i64 n, float k) {
    GRID_STRIDE(i, n) out[i] = ema_element(shadow[i], p[i], k);
}

// ---- multi-tensor Adam and EMA ----------------------------------------------------------------
// One launch updates a list of tensors, passed by value as pointer tables plus `start`, the
// prefix sums of their lengths: tensor t owns elements [start[t], start[t+1]) of the launch's
// concatenated index space and start[count] is the total. A grid-stride loop runs over that
// space; each thread keeps a cursor on its current tensor, which only moves forward because the
// thread's index only grows (empty tensors are stepped over). The list sizes keep every
// launch's parameters under the portable 4 KiB limit. Rust twins: `AdamList` / `EmaList` in
// src/backend/cuda/optim.rs.
#define OPTIM_ADAM_LIST_MAX 48
struct AdamList {
    const float* p[OPTIM_ADAM_LIST_MAX];
    const float* g[OPTIM_ADAM_LIST_MAX];
    const float* m[OPTIM_ADAM_LIST_MAX];
    const float* v[OPTIM_ADAM_LIST_MAX];
    float* p_out[OPTIM_ADAM_LIST_MAX];
    float* m_out[OPTIM_ADAM_LIST_MAX];
    float* v_out[OPTIM_ADAM_LIST_MAX];
    i64 start[OPTIM_ADAM_LIST_MAX + 1];
};

#define OPTIM_EMA_LIST_MAX 112
struct EmaList {
    const float* shadow[OPTIM_EMA_LIST_MAX];
    const float* p[OPTIM_EMA_LIST_MAX];
    float* out[OPTIM_EMA_LIST_MAX];
    i64 start[OPTIM_EMA_LIST_MAX + 1];
};

extern "C" __global__ void optim_adam_many(AdamList list, int count, float grad_scale, float w1, float b2,
                                           float w2, float bc2_sqrt, float eps, float step_size) {
    const AdamConsts c{grad_scale, w1, b2, w2, bc2_sqrt, eps, step_size};
    const i64 total = list.start[count];
    int t = 0;
    GRID_STRIDE(i, total) {
        while (i >= list.start[t + 1]) ++t;  // i < total = start[count], so t stays < count
        const i64 j = i - list.start[t];
        adam_element(list.p[t][j], list.g[t][j], list.m[t][j], list.v[t][j], &list.p_out[t][j],
                     &list.m_out[t][j], &list.v_out[t][j], c);
    }
}

extern "C" __global__ void optim_ema_many(EmaList list, int count, float k) {
    const i64 total = list.start[count];
    int t = 0;
    GRID_STRIDE(i, total) {
        while (i >= list.start[t + 1]) ++t;
        const i64 j = i - list.start[t];
        list.out[t][j] = ema_element(list.shadow[t][j], list.p[t][j], k);
    }
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

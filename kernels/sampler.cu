// Fused predictor–corrector sampler updates for CUDA-graph replay (src/backend/cuda/graph.rs).
//
// A captured sampler step is replayed unchanged for every time step, so nothing that changes per
// step may be a launch argument: each kernel reads the step index i from a device counter, the
// per-step scalars from row i of a device table (`StepRow`), and derives the Philox offset of its
// noise from i (`NoiseDraw`). `sampler_end_step` advances the counter at the end of the step.
//
// CPU twins: the generic updates in src/sample (ReverseDiffusion / EulerMaruyama / Langevin),
// i.e. the eager chain scale_per_sample → randn → axpby / sum_squares_per_sample → add. Every
// kernel reproduces that chain operation by operation (same f32 roundings, same FMA as the compiled
// ew_axpby, same reduction split and order as reduce_sumsq_partial + reduce_row_sum_d, the same
// f64 step-size formula as Langevin::step_sizes), so graph and eager samplers give the same bits.
#include "common.cuh"
#include "rng.cuh"

typedef unsigned long long u64;

// One row per time step (src/backend/cuda/graph.rs `StepRow`, #[repr(C)], 32 bytes).
struct StepRow {
    float label;          // the network's time input: σ(t_i) (VE) or 999·t_i (VP/subVP)
    float score_scale1;   // 1/label when the graph applies the network's scale_by_sigma, else 1
    float score_scale2;   // −1/std(t_i) for noise-predicting networks, else 1
    float pred_a;         // predictor: x̄ = a·x + b·s, x = x̄ + σ·z
    float pred_b;
    float pred_sigma;
    double langevin_alpha;  // α of ε = 2α(r‖z‖/‖s‖)²
};

// The noise of one draw (src/backend/cuda/graph.rs `NoiseDrawC`, #[repr(C)], 48 bytes). Element j
// of image n in draw `draw` of step i is normal(seed, off + local) with
//   off = base + (i·draws_per_step + draw)·draw_size,
//   per-image streams: seed = seeds[n], local = j;   one stream: seed = seeds[0], local = n·per + j,
// which is what NoiseStream::next hands the eager sampler.
struct NoiseDraw {
    const u64* seeds;
    u64 base;
    u64 draws_per_step;
    u64 draw;
    u64 draw_size;
    int per_image;
    int pad_;
};

// Status words (int[4]) the host reads once after a run.
#define SAMPLER_STATUS_BAD_EPS 0   // 1 once a Langevin step size was not finite
#define SAMPLER_STATUS_BAD_STEP 1  // the first step at which that happened
#define SAMPLER_STATUS_OVERRUN 2   // 1 if a step ran past the end of the table

__device__ __forceinline__ u64 sampler_step_index(const u64* step, i64 n_rows) {
    u64 i = *step;
    return i < (u64)n_rows ? i : (u64)(n_rows - 1);
}

__device__ __forceinline__ float sampler_noise(const NoiseDraw& d, u64 i, i64 n, i64 j, i64 per) {
    const u64 off = d.base + (i * d.draws_per_step + d.draw) * d.draw_size;
    const u64 seed = d.per_image ? d.seeds[n] : d.seeds[0];
    const u64 local = d.per_image ? (u64)j : (u64)(n * per + j);
    return philox_normal(seed, off + local);
}

// s = h·scale1·scale2, each product rounded (a factor of 1 is exact): the eager score is the
// network output times 1/σ (scale_by_sigma) or times −1/std(t), one ew_scale_per_sample each.
__device__ __forceinline__ float sampler_score(float h, const StepRow& r) {
    return __fmul_rn(__fmul_rn(h, r.score_scale1), r.score_scale2);
}

// Start of a step: the network's time input labels[b] = rows[i].label for the whole batch.
extern "C" __global__ void sampler_begin_step(const u64* __restrict__ step, const StepRow* __restrict__ rows,
                                              i64 n_rows, float* __restrict__ labels, i64 batch,
                                              int* __restrict__ status) {
    const bool over = *step >= (u64)n_rows;
    const u64 i = sampler_step_index(step, n_rows);
    GRID_STRIDE(b, batch) labels[b] = rows[i].label;
    if (over && blockIdx.x == 0 && threadIdx.x == 0) status[SAMPLER_STATUS_OVERRUN] = 1;
}

// End of a step: i += 1 (one thread; launched with one block).
extern "C" __global__ void sampler_end_step(u64* __restrict__ step) {
    if (blockIdx.x == 0 && threadIdx.x == 0) *step += 1;
}

// Langevin, part 1. Grid (parts, N), 256 threads: block b of image n writes the partial sums
// Σ s² to partial[n·parts + b] and Σ z² to partial[N·parts + n·parts + b] over its strided share
// of the image — the split and order of reduce_sumsq_partial, so the norms equal the eager ones.
extern "C" __global__ void langevin_partials(const float* __restrict__ h, const StepRow* __restrict__ rows,
                                             i64 n_rows, const u64* __restrict__ step, NoiseDraw d, i64 per,
                                             double* __restrict__ partial) {
    __shared__ double scratch[32];
    const i64 n = blockIdx.y;
    const u64 i = sampler_step_index(step, n_rows);
    const StepRow r = rows[i];
    const float* row = h + n * per;
    double acc_s = 0.0, acc_z = 0.0;
    for (i64 j = (i64)blockIdx.x * blockDim.x + threadIdx.x; j < per; j += (i64)gridDim.x * blockDim.x) {
        const float s = sampler_score(row[j], r);
        const float z = sampler_noise(d, i, n, j, per);
        acc_s += (double)s * (double)s;
        acc_z += (double)z * (double)z;
    }
    acc_s = block_sum_d(acc_s, scratch);
    acc_z = block_sum_d(acc_z, scratch);
    if (threadIdx.x == 0) {
        const i64 parts = gridDim.x, total = (i64)gridDim.y * parts;
        partial[n * parts + blockIdx.x] = acc_s;
        partial[total + n * parts + blockIdx.x] = acc_z;
    }
}

// Σ of one row of partials as reduce_row_sum_d computes it (same loop and block tree; the caller
// runs 256 threads like it), rounded to f32 as its output is.
__device__ __forceinline__ float sampler_row_sum(const double* row, i64 len, double* scratch) {
    double acc = 0.0;
    for (i64 j = threadIdx.x; j < len; j += blockDim.x) acc += row[j];
    return (float)block_sum_d(acc, scratch);
}

// Langevin, part 2. Grid (blocks, N), 256 threads. Every block first derives its image's step size
// from the partials exactly as Langevin::step_sizes does on the host (f64): per image
// ε = 2α(r·√Σz² / √Σs²)², or with `batch_norm` the same with the batch means of the norms; then
// x̄ = x + ε·s and x = x̄ + √(2ε)·z (ε and √(2ε) rounded to f32), written over x in place.
// A non-finite ε (zero score) is recorded in the status words; the host reports it as an error.
extern "C" __global__ void langevin_update(float* x, const float* __restrict__ h, const StepRow* __restrict__ rows,
                                           i64 n_rows, const u64* __restrict__ step, NoiseDraw d, i64 per,
                                           const double* __restrict__ partial, i64 parts, double snr,
                                           int batch_norm, int* __restrict__ status) {
    __shared__ double scratch[32];
    const i64 n = blockIdx.y, batch = gridDim.y, total = batch * parts;
    const u64 i = sampler_step_index(step, n_rows);
    const StepRow r = rows[i];
    double g, zn;  // ‖s‖ and ‖z‖
    if (batch_norm) {
        double gs = 0.0, zs = 0.0;
        for (i64 m = 0; m < batch; ++m) {
            gs += sqrt((double)sampler_row_sum(partial + m * parts, parts, scratch));
            zs += sqrt((double)sampler_row_sum(partial + total + m * parts, parts, scratch));
        }
        g = gs / (double)batch;
        zn = zs / (double)batch;
    } else {
        g = sqrt((double)sampler_row_sum(partial + n * parts, parts, scratch));
        zn = sqrt((double)sampler_row_sum(partial + total + n * parts, parts, scratch));
    }
    const double q = snr * zn / g;
    const double eps = 2.0 * r.langevin_alpha * (q * q);
    const bool finite = fabs(eps) <= 1.7976931348623157e308;  // false for ±∞ and NaN
    if (!finite && blockIdx.x == 0 && threadIdx.x == 0) {
        if (status[SAMPLER_STATUS_BAD_EPS] == 0) status[SAMPLER_STATUS_BAD_STEP] = (int)i;
        status[SAMPLER_STATUS_BAD_EPS] = 1;
    }
    const float eps_f = (float)eps;
    const float noise_scale = (float)sqrt(2.0 * eps);
    const float* hrow = h + n * per;
    float* xrow = x + n * per;
    for (i64 j = (i64)blockIdx.x * blockDim.x + threadIdx.x; j < per; j += (i64)gridDim.x * blockDim.x) {
        const float s = sampler_score(hrow[j], r);
        const float z = sampler_noise(d, i, n, j, per);
        const float x_mean = xrow[j] + __fmul_rn(s, eps_f);
        xrow[j] = x_mean + __fmul_rn(z, noise_scale);
    }
}

// Predictor (reverse diffusion or Euler–Maruyama, both x̄ = a·x + b·s, x = x̄ + σ·z with the
// coefficients of step i): x̄ to x_mean, x over x in place. The arithmetic is that of two ew_axpby
// launches as compiled: fma(α, a, β·b), i.e. x̄ = fma(a, x, b·s) and x = fma(1, x̄, σ·z) = x̄ + σ·z.
extern "C" __global__ void predictor_update(float* x, float* __restrict__ x_mean, const float* __restrict__ h,
                                            const StepRow* __restrict__ rows, i64 n_rows,
                                            const u64* __restrict__ step, NoiseDraw d, i64 per, i64 total) {
    const u64 i = sampler_step_index(step, n_rows);
    const StepRow r = rows[i];
    GRID_STRIDE(k, total) {
        const i64 n = k / per, j = k - n * per;
        const float s = sampler_score(h[k], r);
        const float z = sampler_noise(d, i, n, j, per);
        const float xm = fmaf(r.pred_a, x[k], __fmul_rn(r.pred_b, s));
        x_mean[k] = xm;
        x[k] = xm + __fmul_rn(r.pred_sigma, z);
    }
}

// ---- fast samplers (src/sample/fast/graph.rs) ---------------------------------------------------
//
// One captured stage per network evaluation: fast_prepare (Heun churn, the network input α·point),
// the network, fast_update (the denoiser D and the solver's update). Row i of a `FastRow` table
// (src/sample/fast/plan.rs `Stage`) says what stage i does. CPU twin: the eager solvers in
// src/sample/fast/mod.rs, i.e. the chains of ew_affine / ew_axpby / rng_normal they launch; every
// line below is one of those launches as NVRTC compiles it (ew_affine = fma(scale, x, shift),
// ew_axpby = fma(α, a, β·b)), so graph and eager fast samplers give the same bits.

// src/backend/cuda/graph.rs `FastRow` (#[repr(C)], 88 bytes).
struct FastRow {
    u64 pre_draw;    // noise draw of the Heun churn before the evaluation
    u64 post_draw;   // noise draw of the DPM churn after the update
    float in_scale;  // α: the network sees α·point (FAST_IN_AFFINE), else point itself
    float in_shift;  // 0, ew_affine's shift
    float d_coef;    // σ̂²·α: D = point + d_coef·s
    float c0;        // DPM: e^{−κh}; Euler: r; Heun: the factor of the Euler point
    float c1;        // Euler: 1 − r; Heun: the factor of D
    float w[3];      // DPM weights of D (w[0], this stage's) and the history
    float pre_std;   // Heun churn std
    float post_std;  // DPM churn std
    int kind;        // FAST_*
    int flags;       // FAST_IN_AFFINE | FAST_PRE_NOISE | FAST_POST_NOISE | FAST_COMMIT
    int d_slot;      // denoiser buffer this stage writes
    int n_terms;     // DPM: terms of the combination (1..3)
    int slot[3];     // DPM: buffer of term q (slot[0] = d_slot)
    int pad_;
};
static_assert(sizeof(FastRow) == 88, "FastRow must match src/backend/cuda/graph.rs");

#define FAST_FINAL 0
#define FAST_DPM 1
#define FAST_EULER 2
#define FAST_HEUN 3
#define FAST_IN_AFFINE 1
#define FAST_PRE_NOISE 2
#define FAST_POST_NOISE 4
#define FAST_COMMIT 8

// Noise of draw `draw` (counted from the first draw after the prior): `d` has draws_per_step = 1
// and draw = 0, so sampler_noise's offset is base + draw·draw_size, as NoiseStream::next hands it.
__device__ __forceinline__ float fast_noise(const NoiseDraw& d, u64 draw, i64 k, i64 per) {
    const i64 n = k / per, j = k - n * per;
    return sampler_noise(d, draw, n, j, per);
}

// Before the evaluation of stage i: Heun's churn x̂ = x̂ + std·z (ew_axpby(1, x̂, std, z); x̂ and
// point hold the same values here) written to both, then the network input xnet = α·point + 0
// (ew_affine) or a copy of point when α = 1 (the eager sampler passes x̂ itself).
extern "C" __global__ void fast_prepare(const u64* __restrict__ step, const FastRow* __restrict__ rows,
                                        i64 n_rows, float* __restrict__ xh, float* __restrict__ point,
                                        float* __restrict__ xnet, NoiseDraw d, i64 per, i64 total) {
    const u64 i = sampler_step_index(step, n_rows);
    const FastRow r = rows[i];
    GRID_STRIDE(k, total) {
        float p = point[k];
        if (r.flags & FAST_PRE_NOISE) {
            p = fmaf(1.0f, xh[k], __fmul_rn(r.pre_std, fast_noise(d, r.pre_draw, k, per)));
            xh[k] = p;
            point[k] = p;
        }
        xnet[k] = (r.flags & FAST_IN_AFFINE) ? fmaf(r.in_scale, p, r.in_shift) : p;
    }
}

// After the evaluation of stage i, from the raw network output h: the score s (sampler_score with
// score row i), D = point + d_coef·s into buffer d_slot, then the update of the row's kind:
//   DPM:   x̂' = fma(e^{−κh}, x̂, w0·D), + w_q·D_q for the history, + std·z when churning;
//   Euler: point = fma(r, x̂, (1 − r)·D), and x̂ = point for an Euler-only step;
//   Heun:  x̂' = fma(1, fma(½, x̂, c0·point), c1·D);
// x̂' goes to x̂ and point. Each element reads only its own index of every buffer.
extern "C" __global__ void fast_update(const u64* __restrict__ step, const FastRow* __restrict__ rows,
                                       const StepRow* __restrict__ srows, i64 n_rows, float* __restrict__ xh,
                                       float* __restrict__ point, const float* __restrict__ h, float* d0,
                                       float* d1, float* d2, NoiseDraw d, i64 per, i64 total) {
    const u64 i = sampler_step_index(step, n_rows);
    const FastRow r = rows[i];
    const StepRow sr = srows[i];
    float* ds[3] = {d0, d1, d2};
    float* dout = ds[r.d_slot];
    GRID_STRIDE(k, total) {
        const float s = sampler_score(h[k], sr);
        const float den = fmaf(1.0f, point[k], __fmul_rn(r.d_coef, s));
        dout[k] = den;
        if (r.kind == FAST_DPM) {
            float next = fmaf(r.c0, xh[k], __fmul_rn(r.w[0], den));
            for (int q = 1; q < r.n_terms; ++q) next = fmaf(1.0f, next, __fmul_rn(r.w[q], ds[r.slot[q]][k]));
            if (r.flags & FAST_POST_NOISE)
                next = fmaf(1.0f, next, __fmul_rn(r.post_std, fast_noise(d, r.post_draw, k, per)));
            xh[k] = next;
            point[k] = next;
        } else if (r.kind == FAST_EULER) {
            const float xe = fmaf(r.c0, xh[k], __fmul_rn(r.c1, den));
            point[k] = xe;
            if (r.flags & FAST_COMMIT) xh[k] = xe;
        } else if (r.kind == FAST_HEUN) {
            const float half = fmaf(0.5f, xh[k], __fmul_rn(r.c0, point[k]));
            const float next = fmaf(1.0f, half, __fmul_rn(r.c1, den));
            xh[k] = next;
            point[k] = next;
        }
    }
}

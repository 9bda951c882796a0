// Reductions. Partial sums are accumulated in double (cheap here, and it keeps the result at
// f32 rounding whatever the length). CPU twins: sum_spatial, sum_squares_per_sample.
#include "common.cuh"

// One block per row: out[r] = Σ_j x[r·len + j]. Used for sum_spatial ([N·C] rows of H·W).
extern "C" __global__ void reduce_row_sum(const float* __restrict__ x, float* __restrict__ out, i64 len) {
    __shared__ double scratch[32];
    const float* row = x + (i64)blockIdx.x * len;
    double acc = 0.0;
    for (i64 j = threadIdx.x; j < len; j += blockDim.x) acc += (double)row[j];
    acc = block_sum_d(acc, scratch);
    if (threadIdx.x == 0) out[blockIdx.x] = (float)acc;
}

// Partial sums of squares: block b of sample n (gridDim = (parts, N)) writes
// partial[n·parts + b] = Σ over its strided share of x[n, :]². A second launch of
// reduce_row_sum_d over [N, parts] finishes the sum, so large samples use the whole chip.
extern "C" __global__ void reduce_sumsq_partial(const float* __restrict__ x, double* __restrict__ partial,
                                                i64 per) {
    __shared__ double scratch[32];
    const float* row = x + (i64)blockIdx.y * per;
    double acc = 0.0;
    for (i64 j = (i64)blockIdx.x * blockDim.x + threadIdx.x; j < per; j += (i64)gridDim.x * blockDim.x) {
        float v = row[j];
        acc += (double)v * (double)v;
    }
    acc = block_sum_d(acc, scratch);
    if (threadIdx.x == 0) partial[(i64)blockIdx.y * gridDim.x + blockIdx.x] = acc;
}

// out[r] = Σ_j partial[r·len + j] (double partials → f32 result), one block per row.
extern "C" __global__ void reduce_row_sum_d(const double* __restrict__ partial, float* __restrict__ out,
                                            i64 len) {
    __shared__ double scratch[32];
    const double* row = partial + (i64)blockIdx.x * len;
    double acc = 0.0;
    for (i64 j = threadIdx.x; j < len; j += blockDim.x) acc += row[j];
    acc = block_sum_d(acc, scratch);
    if (threadIdx.x == 0) out[blockIdx.x] = (float)acc;
}

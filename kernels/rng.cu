// Random draws: element i of a draw is the Philox value at index offset + i (see rng.cuh).
// CPU twins: randn, rand_uniform, dropout_mask.
#include "common.cuh"
#include "rng.cuh"

extern "C" __global__ void rng_normal(float* __restrict__ out, i64 n, unsigned long long seed,
                                      unsigned long long offset) {
    GRID_STRIDE(i, n) out[i] = philox_normal(seed, offset + (unsigned long long)i);
}

extern "C" __global__ void rng_uniform(float* __restrict__ out, i64 n, unsigned long long seed,
                                       unsigned long long offset) {
    GRID_STRIDE(i, n) out[i] = philox_uniform(seed, offset + (unsigned long long)i);
}

// Inverted dropout: 0 where uniform < p (compared in double, as the exact p), else `keep_scale`.
extern "C" __global__ void rng_dropout_mask(float* __restrict__ out, i64 n, double p, float keep_scale,
                                            unsigned long long seed, unsigned long long offset) {
    GRID_STRIDE(i, n) {
        float u = philox_uniform(seed, offset + (unsigned long long)i);
        out[i] = ((double)u < p) ? 0.0f : keep_scale;
    }
}

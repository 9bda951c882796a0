// Noise-level embeddings. CPU twins: fourier_embedding, sinusoidal_embedding.
#include "common.cuh"

// e[n, m] = sin(2π·ln σ[n]·W[m]), e[n, M + m] = cos(…), evaluated in double like the CPU twin:
// the phase reaches ~10³, so an f32 phase would carry errors of ~10⁻⁴.
extern "C" __global__ void embed_fourier(const float* __restrict__ sigma, const float* __restrict__ w,
                                         float* __restrict__ out, int N, int M) {
    GRID_STRIDE(i, (i64)N * M) {
        const int n = (int)(i / M), m = (int)(i % M);
        const double phase = 6.283185307179586 * log((double)sigma[n]) * (double)w[m];
        out[(i64)n * 2 * M + m] = (float)sin(phase);
        out[(i64)n * 2 * M + M + m] = (float)cos(phase);
    }
}

// DDPM sinusoidal embedding in f32 step by step, like score_sde's get_timestep_embedding:
// ω_k = exp(k·step) (step = −ln(max_positions)/(h−1) rounded to f32 by the caller), then
// sin/cos(t·ω_k). exp and sin/cos go through double and round once, so they agree with a
// correctly rounded f32 libm (the phase t·ω reaches ~10³ and would amplify a 1-ulp difference in ω).
extern "C" __global__ void embed_sinusoidal(const float* __restrict__ t, float* __restrict__ out, int N,
                                            int half, float step) {
    GRID_STRIDE(i, (i64)N * half) {
        const int n = (int)(i / half), k = (int)(i % half);
        const float omega = (float)exp((double)__fmul_rn((float)k, step));
        const float arg = __fmul_rn(t[n], omega);
        out[(i64)n * 2 * half + k] = (float)sin((double)arg);
        out[(i64)n * 2 * half + half + k] = (float)cos((double)arg);
    }
}

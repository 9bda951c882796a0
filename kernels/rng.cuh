// Philox4x32-10, exactly as src/rng.rs: element i uses counter (i_lo, i_hi, 0, 0) and key
// (seed_lo, seed_hi); word 0 gives a uniform, words 0 and 1 a Box–Muller normal in f32.
#pragma once

struct Philox4 {
    unsigned int v[4];
};

__device__ __forceinline__ Philox4 philox4x32_10(unsigned long long index, unsigned long long seed) {
    unsigned int c0 = (unsigned int)index, c1 = (unsigned int)(index >> 32), c2 = 0u, c3 = 0u;
    unsigned int k0 = (unsigned int)seed, k1 = (unsigned int)(seed >> 32);
#pragma unroll
    for (int r = 0; r < 10; ++r) {
        unsigned int lo0 = 0xD2511F53u * c0, hi0 = __umulhi(0xD2511F53u, c0);
        unsigned int lo1 = 0xCD9E8D57u * c2, hi1 = __umulhi(0xCD9E8D57u, c2);
        unsigned int n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
        c0 = n0;
        c1 = lo1;
        c2 = n2;
        c3 = lo0;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    Philox4 out;
    out.v[0] = c0;
    out.v[1] = c1;
    out.v[2] = c2;
    out.v[3] = c3;
    return out;
}

// Uniform in [0, 1) with 24 random bits (exact in f32).
__device__ __forceinline__ float philox_uniform(unsigned long long seed, unsigned long long index) {
    return (float)(philox4x32_10(index, seed).v[0] >> 8) * (1.0f / 16777216.0f);
}

// Standard normal by Box–Muller, the same f32 operations as rng::normal.
__device__ __forceinline__ float philox_normal(unsigned long long seed, unsigned long long index) {
    Philox4 w = philox4x32_10(index, seed);
    // (w0 + 1) / 2^32 rounded once to f32, as uniform_open0 does in f64.
    float u1 = (float)(((double)w.v[0] + 1.0) * (1.0 / 4294967296.0));
    float u2 = (float)(w.v[1] >> 8) * (1.0f / 16777216.0f);
    float r = sqrtf(__fmul_rn(-2.0f, logf(u1)));
    return __fmul_rn(r, cosf(__fmul_rn(6.28318530717958647692f, u2)));
}

// GroupNorm (+ optional fused SiLU), one block per (sample, group). Statistics in double with two
// passes (mean, then centred squares) like the CPU twin `group_norm`; biased variance, eps inside
// the square root; y = x·a + b per channel with a = rstd·γ, b = β − mean·a.
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(512) gn_forward(const float* __restrict__ x,
                                                             const float* __restrict__ gamma,
                                                             const float* __restrict__ beta,
                                                             float* __restrict__ out, int C, int groups,
                                                             i64 hw, double eps, int silu) {
    __shared__ double scratch[32];
    const int g = blockIdx.x % groups;
    const int cg = C / groups;
    const i64 len = (i64)cg * hw;
    const i64 base = (i64)blockIdx.x * len;  // groups are contiguous in NCHW
    const float* xs = x + base;

    double s = 0.0;
    for (i64 j = threadIdx.x; j < len; j += blockDim.x) s += (double)xs[j];
    const double mean = block_sum_d(s, scratch) / (double)len;
    double q = 0.0;
    for (i64 j = threadIdx.x; j < len; j += blockDim.x) {
        double d = (double)xs[j] - mean;
        q += d * d;
    }
    const double var = block_sum_d(q, scratch) / (double)len;
    const double rstd = 1.0 / sqrt(var + eps);

    for (int j = 0; j < cg; ++j) {
        const int c = g * cg + j;
        const double ad = rstd * (double)gamma[c];
        const float a = (float)ad, b = (float)((double)beta[c] - mean * ad);
        const float* xc = xs + (i64)j * hw;
        float* yc = out + base + (i64)j * hw;
        for (i64 p = threadIdx.x; p < hw; p += blockDim.x) {
            float z = xc[p] * a + b;
            yc[p] = silu ? z * sigmoidf_(z) : z;
        }
    }
}

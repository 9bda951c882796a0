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

// ---- backward ------------------------------------------------------------------------------------
// With x̂ = (x − mean)·rstd, z = x̂·γ + β, dz = dy·SiLU'(z) (or dy without SiLU):
//   dx = rstd·(dz·γ − mean(dz·γ) − x̂·mean(dz·γ·x̂)) over the group, dγ = Σ dz·x̂, dβ = Σ dz.
// gn_backward: one block per (sample, group); recomputes the statistics exactly as gn_forward,
// takes the per-channel sums Σ dz and Σ dz·x̂ (in double; the group means follow from them and γ),
// writes dx and the per-(sample, channel) partial sums; gn_backward_params adds those over the
// batch in order (deterministic). CPU twin: group_norm_backward.

__device__ __forceinline__ float gn_dz(float dy, float xhat, float gam, float bet, int silu) {
    if (!silu) return dy;
    const float z = xhat * gam + bet;
    const float s = sigmoidf_(z);
    return dy * s * (1.0f + z * (1.0f - s));
}

extern "C" __global__ void __launch_bounds__(512) gn_backward(const float* __restrict__ x,
                                                              const float* __restrict__ gamma,
                                                              const float* __restrict__ beta,
                                                              const float* __restrict__ dy,
                                                              float* __restrict__ dx,
                                                              double* __restrict__ part_dgamma,
                                                              double* __restrict__ part_dbeta, int C,
                                                              int groups, i64 hw, double eps, int silu) {
    __shared__ double scratch[32];
    const int g = blockIdx.x % groups;
    const int cg = C / groups;
    const i64 len = (i64)cg * hw;
    const i64 base = (i64)blockIdx.x * len;
    const float* xs = x + base;
    const float* dys = dy + base;

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
    const float meanf = (float)mean, rstdf = (float)rstd;

    // Per channel: Σ dz and Σ dz·x̂; the group sums of dz·γ and dz·γ·x̂ follow.
    double sum_g = 0.0, sum_gx = 0.0;
    for (int j = 0; j < cg; ++j) {
        const int c = g * cg + j;
        const float gam = gamma[c], bet = beta[c];
        const float* xc = xs + (i64)j * hw;
        const float* dc = dys + (i64)j * hw;
        double sd = 0.0, sdx = 0.0;
        for (i64 p = threadIdx.x; p < hw; p += blockDim.x) {
            const float xhat = (xc[p] - meanf) * rstdf;
            const float dz = gn_dz(dc[p], xhat, gam, bet, silu);
            sd += (double)dz;
            sdx += (double)dz * (double)xhat;
        }
        sd = block_sum_d(sd, scratch);
        sdx = block_sum_d(sdx, scratch);
        sum_g += sd * (double)gam;
        sum_gx += sdx * (double)gam;
        if (threadIdx.x == 0) {
            const i64 nc = (i64)(blockIdx.x / groups) * C + c;
            part_dbeta[nc] = sd;
            part_dgamma[nc] = sdx;
        }
    }
    const float mg = (float)(sum_g / (double)len), mgx = (float)(sum_gx / (double)len);

    for (int j = 0; j < cg; ++j) {
        const int c = g * cg + j;
        const float gam = gamma[c], bet = beta[c];
        const float* xc = xs + (i64)j * hw;
        const float* dc = dys + (i64)j * hw;
        float* out = dx + base + (i64)j * hw;
        for (i64 p = threadIdx.x; p < hw; p += blockDim.x) {
            const float xhat = (xc[p] - meanf) * rstdf;
            const float dz = gn_dz(dc[p], xhat, gam, bet, silu);
            out[p] = rstdf * (dz * gam - mg - xhat * mgx);
        }
    }
}

// dgamma[c] = Σ_n part_dgamma[n·C + c], dbeta likewise, n in order.
extern "C" __global__ void gn_backward_params(const double* __restrict__ part_dgamma,
                                              const double* __restrict__ part_dbeta,
                                              float* __restrict__ dgamma, float* __restrict__ dbeta, int N,
                                              int C) {
    GRID_STRIDE(c, C) {
        double sg = 0.0, sb = 0.0;
        for (int n = 0; n < N; ++n) {
            sg += part_dgamma[(i64)n * C + c];
            sb += part_dbeta[(i64)n * C + c];
        }
        dgamma[c] = (float)sg;
        dbeta[c] = (float)sb;
    }
}

// ---- forward, split over many blocks (what the backend launches) --------------------------------
// gn_forward above gives one block a whole (sample, group): at batch 1 that is 32 blocks for the
// whole device, each streaming the group three times. The split version:
//   gn_stats: grid (N·groups, chunks); each block sums x and x² (f64) over its slice of a group;
//   gn_apply: grid (N·C, ⌈HW / GN_APPLY_SPAN⌉); each block folds its group's partials into
//             mean and variance (E[x²] − mean², in f64), then writes y = x·a + b (+ SiLU) with
//             float4 loads when H·W is a multiple of 4.
// Same statistics as the CPU twin up to f64 rounding (the CPU centres before squaring).
#define GN_APPLY_SPAN 4096

extern "C" __global__ void __launch_bounds__(256) gn_stats(const float* __restrict__ x,
                                                           double* __restrict__ part, i64 len,
                                                           int chunks) {
    __shared__ double scratch[32];
    const i64 per = (len + chunks - 1) / chunks;
    const i64 lo = min((i64)blockIdx.y * per, len), hi = min(lo + per, len);
    const float* xs = x + (i64)blockIdx.x * len;
    double s = 0.0, q = 0.0;
    for (i64 j = lo + threadIdx.x; j < hi; j += blockDim.x) {
        const double v = (double)xs[j];
        s += v;
        q += v * v;
    }
    s = block_sum_d(s, scratch);
    q = block_sum_d(q, scratch);
    if (threadIdx.x == 0) {
        double* dst = part + ((i64)blockIdx.x * chunks + blockIdx.y) * 2;
        dst[0] = s;
        dst[1] = q;
    }
}

extern "C" __global__ void __launch_bounds__(256) gn_apply(const float* __restrict__ x,
                                                           const double* __restrict__ part,
                                                           const float* __restrict__ gamma,
                                                           const float* __restrict__ beta,
                                                           float* __restrict__ out, int C, int groups,
                                                           i64 hw, int chunks, double eps, int silu) {
    __shared__ float ab[2];
    const int nc = blockIdx.x, c = nc % C, n = nc / C, cg = C / groups;
    if (threadIdx.x == 0) {
        const double* pp = part + ((i64)n * groups + c / cg) * chunks * 2;
        double s = 0.0, q = 0.0;
        for (int i = 0; i < chunks; ++i) {
            s += pp[2 * i];
            q += pp[2 * i + 1];
        }
        const double len = (double)cg * (double)hw;
        const double mean = s / len;
        const double var = fmax(q / len - mean * mean, 0.0);
        const double a = (double)gamma[c] / sqrt(var + eps);
        ab[0] = (float)a;
        ab[1] = (float)((double)beta[c] - mean * a);
    }
    __syncthreads();
    const float a = ab[0], b = ab[1];
    const i64 lo = (i64)blockIdx.y * GN_APPLY_SPAN, hi = min(lo + GN_APPLY_SPAN, hw);
    const float* xc = x + (i64)nc * hw;
    float* yc = out + (i64)nc * hw;
    if ((hw & 3) == 0) {
        for (i64 j = lo + 4 * threadIdx.x; j < hi; j += 4 * blockDim.x) {
            float4 v = *reinterpret_cast<const float4*>(xc + j);
            float z[4] = {v.x * a + b, v.y * a + b, v.z * a + b, v.w * a + b};
            if (silu)
                for (int e = 0; e < 4; ++e) z[e] = z[e] * sigmoidf_(z[e]);
            *reinterpret_cast<float4*>(yc + j) = float4{z[0], z[1], z[2], z[3]};
        }
    } else {
        for (i64 j = lo + threadIdx.x; j < hi; j += blockDim.x) {
            const float z = xc[j] * a + b;
            yc[j] = silu ? z * sigmoidf_(z) : z;
        }
    }
}

// ---- backward, split over many blocks (what the backend launches for large groups) -------------
// gn_backward streams a whole group from one block four times (x) and twice (dy): once a group
// no longer stays in cache that is ~7× the tensor in DRAM traffic, and at batch 1 only 32 blocks
// run. The split version works on "units": one warp's slice of one channel, elements
// [s·span, min(hw, (s+1)·span)) of channel nc = n·C + c, numbered u = nc·spans + s, so a
// (sample, group)'s units are contiguous (ng = nc / cg). Every pass is one warp per unit (no block
// barriers; blocks of GN_BWD_WARPS warps), float4 loads when H·W is a multiple of 4 (span is):
//   gn_bwd_xsums  reads x       → per unit (Σx, Σx²)
//   gn_bwd_fold_x               → per (sample, group) mean, rstd   (E[x²] − mean², as gn_apply)
//   gn_bwd_dsums  reads x, dy   → per unit (Σdz, Σdz·x̂)
//   gn_bwd_fold_d               → per (sample, channel) Σdz, Σdz·x̂ (gn_backward_params adds them
//                                 over the batch) and the group means of dz·γ and dz·γ·x̂
//   gn_bwd_dx     reads x, dy   → dx, same per-element formulas as gn_backward
// Partial sums in f64, folded in a fixed order: deterministic, no atomics. gn_bwd_dsums walks the
// units backwards so that its first loads hit the tail of x that gn_bwd_xsums left in L2, and
// gn_bwd_dx walks forwards from what gn_bwd_dsums touched last.
// gstat holds four floats per (sample, group): mean, rstd, mean(dz·γ), mean(dz·γ·x̂).

// The unit (or (sample, group) for the folds) of the calling warp, −1 past the end.
__device__ __forceinline__ i64 gn_bwd_warp_item(i64 items, int reverse) {
    const i64 w = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (w >= items) return -1;
    return reverse ? items - 1 - w : w;
}

extern "C" __global__ void __launch_bounds__(256) gn_bwd_xsums(const float* __restrict__ x,
                                                               double* __restrict__ part, i64 hw,
                                                               int span, int spans, i64 units) {
    const i64 u = gn_bwd_warp_item(units, 0);
    if (u < 0) return;  // whole warps only
    const int lane = threadIdx.x & 31;
    const i64 nc = u / spans, lo = (u % spans) * span, hi = min(lo + span, hw);
    const float* xc = x + nc * hw;
    double s = 0.0, q = 0.0;
    if ((hw & 3) == 0) {
#pragma unroll 4
        for (i64 j = lo + 4 * lane; j < hi; j += 128) {
            const float4 v = *reinterpret_cast<const float4*>(xc + j);
            const double a = v.x, b = v.y, c = v.z, d = v.w;
            s += (a + b) + (c + d);
            q += (a * a + b * b) + (c * c + d * d);
        }
    } else {
        for (i64 j = lo + lane; j < hi; j += 32) {
            const double v = xc[j];
            s += v;
            q += v * v;
        }
    }
    s = warp_sum_d(s);
    q = warp_sum_d(q);
    if (lane == 0) {
        part[2 * u] = s;
        part[2 * u + 1] = q;
    }
}

// One warp per (sample, group): `per` = cg·spans units, `len` = cg·hw elements.
extern "C" __global__ void __launch_bounds__(256) gn_bwd_fold_x(const double* __restrict__ part,
                                                                float* __restrict__ gstat, i64 ngroups,
                                                                i64 per, double len, double eps) {
    const i64 ng = gn_bwd_warp_item(ngroups, 0);
    if (ng < 0) return;
    const int lane = threadIdx.x & 31;
    const double* p = part + ng * per * 2;
    double s = 0.0, q = 0.0;
    for (i64 i = lane; i < per; i += 32) {
        s += p[2 * i];
        q += p[2 * i + 1];
    }
    s = warp_sum_d(s);
    q = warp_sum_d(q);
    if (lane == 0) {
        const double mean = s / len;
        const double var = fmax(q / len - mean * mean, 0.0);
        gstat[4 * ng] = (float)mean;
        gstat[4 * ng + 1] = (float)(1.0 / sqrt(var + eps));
    }
}

extern "C" __global__ void __launch_bounds__(256) gn_bwd_dsums(
    const float* __restrict__ x, const float* __restrict__ dy, const float* __restrict__ gstat,
    const float* __restrict__ gamma, const float* __restrict__ beta, double* __restrict__ part, int C,
    int cg, i64 hw, int span, int spans, i64 units, int silu) {
    const i64 u = gn_bwd_warp_item(units, 1);
    if (u < 0) return;
    const int lane = threadIdx.x & 31;
    const i64 nc = u / spans, lo = (u % spans) * span, hi = min(lo + span, hw);
    const int c = (int)(nc % C);
    const float* st = gstat + 4 * (nc / cg);
    const float meanf = st[0], rstdf = st[1], gam = gamma[c], bet = beta[c];
    const float* xc = x + nc * hw;
    const float* dc = dy + nc * hw;
    double sd = 0.0, sdx = 0.0;
    if ((hw & 3) == 0) {
#pragma unroll 4
        for (i64 j = lo + 4 * lane; j < hi; j += 128) {
            const float4 xv = *reinterpret_cast<const float4*>(xc + j);
            const float4 dv = *reinterpret_cast<const float4*>(dc + j);
            const float xs[4] = {xv.x, xv.y, xv.z, xv.w}, ds[4] = {dv.x, dv.y, dv.z, dv.w};
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float xhat = (xs[e] - meanf) * rstdf;
                const float dz = gn_dz(ds[e], xhat, gam, bet, silu);
                sd += (double)dz;
                sdx += (double)dz * (double)xhat;
            }
        }
    } else {
        for (i64 j = lo + lane; j < hi; j += 32) {
            const float xhat = (xc[j] - meanf) * rstdf;
            const float dz = gn_dz(dc[j], xhat, gam, bet, silu);
            sd += (double)dz;
            sdx += (double)dz * (double)xhat;
        }
    }
    sd = warp_sum_d(sd);
    sdx = warp_sum_d(sdx);
    if (lane == 0) {
        part[2 * u] = sd;
        part[2 * u + 1] = sdx;
    }
}

// One warp per (sample, group): per channel the sums over its spans (→ part_dbeta/part_dgamma at
// n·C + c, as gn_backward writes them), then the group means of dz·γ and dz·γ·x̂.
extern "C" __global__ void __launch_bounds__(256) gn_bwd_fold_d(
    const double* __restrict__ part, const float* __restrict__ gamma, float* __restrict__ gstat,
    double* __restrict__ part_dgamma, double* __restrict__ part_dbeta, int C, int cg, int spans,
    i64 ngroups, double len) {
    const i64 ng = gn_bwd_warp_item(ngroups, 0);
    if (ng < 0) return;
    const int lane = threadIdx.x & 31;
    double sum_g = 0.0, sum_gx = 0.0;
    for (int j = 0; j < cg; ++j) {
        const i64 nc = ng * cg + j;
        const double* p = part + nc * spans * 2;
        double sd = 0.0, sdx = 0.0;
        for (int s = lane; s < spans; s += 32) {
            sd += p[2 * s];
            sdx += p[2 * s + 1];
        }
        sd = warp_sum_d(sd);
        sdx = warp_sum_d(sdx);
        const double gam = (double)gamma[nc % C];
        sum_g += sd * gam;
        sum_gx += sdx * gam;
        if (lane == 0) {
            part_dbeta[nc] = sd;
            part_dgamma[nc] = sdx;
        }
    }
    if (lane == 0) {
        gstat[4 * ng + 2] = (float)(sum_g / len);
        gstat[4 * ng + 3] = (float)(sum_gx / len);
    }
}

extern "C" __global__ void __launch_bounds__(256) gn_bwd_dx(
    const float* __restrict__ x, const float* __restrict__ dy, const float* __restrict__ gstat,
    const float* __restrict__ gamma, const float* __restrict__ beta, float* __restrict__ dx, int C, int cg,
    i64 hw, int span, int spans, i64 units, int silu) {
    const i64 u = gn_bwd_warp_item(units, 0);
    if (u < 0) return;
    const int lane = threadIdx.x & 31;
    const i64 nc = u / spans, lo = (u % spans) * span, hi = min(lo + span, hw);
    const int c = (int)(nc % C);
    const float* st = gstat + 4 * (nc / cg);
    const float meanf = st[0], rstdf = st[1], mg = st[2], mgx = st[3];
    const float gam = gamma[c], bet = beta[c];
    const float* xc = x + nc * hw;
    const float* dc = dy + nc * hw;
    float* out = dx + nc * hw;
    if ((hw & 3) == 0) {
#pragma unroll 4
        for (i64 j = lo + 4 * lane; j < hi; j += 128) {
            const float4 xv = *reinterpret_cast<const float4*>(xc + j);
            const float4 dv = *reinterpret_cast<const float4*>(dc + j);
            const float xs[4] = {xv.x, xv.y, xv.z, xv.w}, ds[4] = {dv.x, dv.y, dv.z, dv.w};
            float r[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float xhat = (xs[e] - meanf) * rstdf;
                const float dz = gn_dz(ds[e], xhat, gam, bet, silu);
                r[e] = rstdf * (dz * gam - mg - xhat * mgx);
            }
            *reinterpret_cast<float4*>(out + j) = float4{r[0], r[1], r[2], r[3]};
        }
    } else {
        for (i64 j = lo + lane; j < hi; j += 32) {
            const float xhat = (xc[j] - meanf) * rstdf;
            const float dz = gn_dz(dc[j], xhat, gam, bet, silu);
            out[j] = rstdf * (dz * gam - mg - xhat * mgx);
        }
    }
}

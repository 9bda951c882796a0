// StyleGAN2 upfirdn2d on every channel: upsample by zero insertion (up), pad by pad0/pad1 on both
// axes (negative pads crop), correlate with the flipped kernel (a true convolution), keep every
// `down`-th sample. The taps travel by value in the launch parameters. CPU twins: upfirdn2d and
// upfirdn2d_backward.
#include "common.cuh"

#define FIR_MAX_TAPS 64

struct FirTaps {
    float taps[FIR_MAX_TAPS];  // row-major kh × kw
    int kh, kw;
};

struct FirGeom {
    int H, W, OH, OW;
    int up, down, pad0, pad1;
};

// Launch shape (both directions): grid.x over the pixels of one plane, grid.y over the N·C planes
// (a grid-stride loop over planes beyond 65,535); the taps are staged in shared memory. The common
// (up, down) pairs are compiled with constant factors so that the zero-insertion and decimation
// tests are shifts; the generic entry points take them from FirGeom.

// out[nc, oy, ox] = Σ_{ky,kx} p[oy·down + ky, ox·down + kx] · taps[kh−1−ky, kw−1−kx],
// p[y, x] = u[y − pad0, x − pad0], u[iy·up, ix·up] = x[iy, ix] (zero elsewhere).
template <int UP, int DOWN>  // 0: the factor comes from g
__device__ __forceinline__ void fir_forward_body(const float* __restrict__ x, float* __restrict__ out,
                                                 i64 planes, const FirGeom& g, const FirTaps& f) {
    __shared__ float taps[FIR_MAX_TAPS];
    for (int i = threadIdx.x; i < f.kh * f.kw; i += blockDim.x) taps[i] = f.taps[i];
    __syncthreads();
    const int up = UP ? UP : g.up, down = DOWN ? DOWN : g.down;
    const int ohw = g.OH * g.OW, hw = g.H * g.W;
    for (i64 nc = blockIdx.y; nc < planes; nc += gridDim.y) {
        const float* xp = x + nc * hw;
        float* op = out + nc * ohw;
        for (int p = blockIdx.x * blockDim.x + threadIdx.x; p < ohw; p += gridDim.x * blockDim.x) {
            const int oy = p / g.OW, ox = p - oy * g.OW;
            float acc = 0.0f;
            for (int ky = 0; ky < f.kh; ++ky) {
                const int uy = oy * down + ky - g.pad0;
                if (uy < 0 || uy % up != 0) continue;
                const int iy = uy / up;
                if (iy >= g.H) continue;
                for (int kx = 0; kx < f.kw; ++kx) {
                    const int ux = ox * down + kx - g.pad0;
                    if (ux < 0 || ux % up != 0) continue;
                    const int ix = ux / up;
                    if (ix >= g.W) continue;
                    acc = fmaf(xp[iy * g.W + ix], taps[(f.kh - 1 - ky) * f.kw + (f.kw - 1 - kx)], acc);
                }
            }
            op[p] = acc;
        }
    }
}

// The adjoint: dx[nc, iy, ix] = Σ over (ky, kx) with iy·up + pad0 − ky = oy·down (0 ≤ oy < OH),
// likewise for x, of dy[nc, oy, ox] · taps[kh−1−ky, kw−1−kx]. A gather: no atomics.
template <int UP, int DOWN>
__device__ __forceinline__ void fir_backward_body(const float* __restrict__ dy, float* __restrict__ dx,
                                                  i64 planes, const FirGeom& g, const FirTaps& f) {
    __shared__ float taps[FIR_MAX_TAPS];
    for (int i = threadIdx.x; i < f.kh * f.kw; i += blockDim.x) taps[i] = f.taps[i];
    __syncthreads();
    const int up = UP ? UP : g.up, down = DOWN ? DOWN : g.down;
    const int ohw = g.OH * g.OW, hw = g.H * g.W;
    for (i64 nc = blockIdx.y; nc < planes; nc += gridDim.y) {
        const float* dp = dy + nc * ohw;
        float* xp = dx + nc * hw;
        for (int p = blockIdx.x * blockDim.x + threadIdx.x; p < hw; p += gridDim.x * blockDim.x) {
            const int iy = p / g.W, ix = p - iy * g.W;
            float acc = 0.0f;
            for (int ky = 0; ky < f.kh; ++ky) {
                const int ty = iy * up + g.pad0 - ky;
                if (ty < 0 || ty % down != 0) continue;
                const int oy = ty / down;
                if (oy >= g.OH) continue;
                for (int kx = 0; kx < f.kw; ++kx) {
                    const int tx = ix * up + g.pad0 - kx;
                    if (tx < 0 || tx % down != 0) continue;
                    const int ox = tx / down;
                    if (ox >= g.OW) continue;
                    acc = fmaf(dp[oy * g.OW + ox], taps[(f.kh - 1 - ky) * f.kw + (f.kw - 1 - kx)], acc);
                }
            }
            xp[p] = acc;
        }
    }
}

// Entry points (written out: build.rs finds kernels by their `extern "C" __global__` lines).
extern "C" __global__ void __launch_bounds__(256) fir_forward(const float* __restrict__ a, float* __restrict__ b,
                                                     i64 planes, FirGeom g, FirTaps f) {
    fir_forward_body<0, 0>(a, b, planes, g, f);
}
extern "C" __global__ void __launch_bounds__(256) fir_forward_up2(const float* __restrict__ a, float* __restrict__ b,
                                                     i64 planes, FirGeom g, FirTaps f) {
    fir_forward_body<2, 1>(a, b, planes, g, f);
}
extern "C" __global__ void __launch_bounds__(256) fir_forward_down2(const float* __restrict__ a, float* __restrict__ b,
                                                     i64 planes, FirGeom g, FirTaps f) {
    fir_forward_body<1, 2>(a, b, planes, g, f);
}
extern "C" __global__ void __launch_bounds__(256) fir_forward_same(const float* __restrict__ a, float* __restrict__ b,
                                                     i64 planes, FirGeom g, FirTaps f) {
    fir_forward_body<1, 1>(a, b, planes, g, f);
}
extern "C" __global__ void __launch_bounds__(256) fir_backward(const float* __restrict__ a, float* __restrict__ b,
                                                     i64 planes, FirGeom g, FirTaps f) {
    fir_backward_body<0, 0>(a, b, planes, g, f);
}
extern "C" __global__ void __launch_bounds__(256) fir_backward_up2(const float* __restrict__ a, float* __restrict__ b,
                                                     i64 planes, FirGeom g, FirTaps f) {
    fir_backward_body<2, 1>(a, b, planes, g, f);
}
extern "C" __global__ void __launch_bounds__(256) fir_backward_down2(const float* __restrict__ a, float* __restrict__ b,
                                                     i64 planes, FirGeom g, FirTaps f) {
    fir_backward_body<1, 2>(a, b, planes, g, f);
}
extern "C" __global__ void __launch_bounds__(256) fir_backward_same(const float* __restrict__ a, float* __restrict__ b,
                                                     i64 planes, FirGeom g, FirTaps f) {
    fir_backward_body<1, 1>(a, b, planes, g, f);
}

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

// out[nc, oy, ox] = Σ_{ky,kx} p[oy·down + ky, ox·down + kx] · taps[kh−1−ky, kw−1−kx],
// p[y, x] = u[y − pad0, x − pad0], u[iy·up, ix·up] = x[iy, ix] (zero elsewhere).
extern "C" __global__ void fir_forward(const float* __restrict__ x, float* __restrict__ out, i64 total,
                                       FirGeom g, FirTaps f) {
    GRID_STRIDE(i, total) {
        const int ox = (int)(i % g.OW);
        const i64 r = i / g.OW;
        const int oy = (int)(r % g.OH);
        const i64 nc = r / g.OH;
        const float* xp = x + nc * g.H * g.W;
        float acc = 0.0f;
        for (int ky = 0; ky < f.kh; ++ky) {
            const int uy = oy * g.down + ky - g.pad0;
            if (uy < 0 || uy % g.up != 0) continue;
            const int iy = uy / g.up;
            if (iy >= g.H) continue;
            for (int kx = 0; kx < f.kw; ++kx) {
                const int ux = ox * g.down + kx - g.pad0;
                if (ux < 0 || ux % g.up != 0) continue;
                const int ix = ux / g.up;
                if (ix >= g.W) continue;
                acc = fmaf(xp[iy * g.W + ix], f.taps[(f.kh - 1 - ky) * f.kw + (f.kw - 1 - kx)], acc);
            }
        }
        out[i] = acc;
    }
}

// The adjoint: dx[nc, iy, ix] = Σ over (ky, kx) with iy·up + pad0 − ky = oy·down (0 ≤ oy < OH),
// likewise for x, of dy[nc, oy, ox] · taps[kh−1−ky, kw−1−kx]. A gather: no atomics.
extern "C" __global__ void fir_backward(const float* __restrict__ dy, float* __restrict__ dx, i64 total,
                                        FirGeom g, FirTaps f) {
    GRID_STRIDE(i, total) {
        const int ix = (int)(i % g.W);
        const i64 r = i / g.W;
        const int iy = (int)(r % g.H);
        const i64 nc = r / g.H;
        const float* dp = dy + nc * g.OH * g.OW;
        float acc = 0.0f;
        for (int ky = 0; ky < f.kh; ++ky) {
            const int ty = iy * g.up + g.pad0 - ky;
            if (ty < 0 || ty % g.down != 0) continue;
            const int oy = ty / g.down;
            if (oy >= g.OH) continue;
            for (int kx = 0; kx < f.kw; ++kx) {
                const int tx = ix * g.up + g.pad0 - kx;
                if (tx < 0 || tx % g.down != 0) continue;
                const int ox = tx / g.down;
                if (ox >= g.OW) continue;
                acc = fmaf(dp[oy * g.OW + ox], f.taps[(f.kh - 1 - ky) * f.kw + (f.kw - 1 - kx)], acc);
            }
        }
        dx[i] = acc;
    }
}

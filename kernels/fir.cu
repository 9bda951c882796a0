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
// (up, down) pairs are compiled with constant factors; the generic entry points take them from
// FirGeom. Any grid is correct (both loops are grid-stride loops).
//
// Forward:
//   out[nc, oy, ox] = Σ_{ky,kx} p[oy·down + ky, ox·down + kx] · taps[kh−1−ky, kw−1−kx],
//   p[y, x] = u[y − pad0, x − pad0], u[iy·up, ix·up] = x[iy, ix] (zero elsewhere).
// Backward (the adjoint, a gather: no atomics):
//   dx[nc, iy, ix] = Σ over (ky, kx) with iy·up + pad0 − ky = oy·down (0 ≤ oy < OH), likewise
//   for x, of dy[nc, oy, ox] · taps[kh−1−ky, kw−1−kx].
//
// Both are one polyphase correlation per axis, which is what the kernels compute:
//   dst[o] = Σ_k src[(o·A + B + k) / Q] · t[k]   over the k in [0, K) for which Q divides
//            o·A + B + k and the quotient lies inside src,
// forward:  src x,  dst out, A = down, Q = up,   B = −pad0,          t[k] = taps[K−1−k];
// backward: src dy, dst dx,  A = up,   Q = down, B = pad0 − K + 1,   t[k] = taps[k]
// (backward: k = K−1−ky). Only the k ≡ −(o·A + B) (mod Q) contribute — one tap in Q — and
// consecutive contributing taps read consecutive source samples, so the kernels start at the
// first contributing tap and step by Q instead of testing every tap.

// One direction as that correlation; the axes share A and Q, B differs when kh ≠ kw.
struct FirPass {
    int SH, SW, DH, DW;  // source and destination plane
    int a, q;            // A and Q where the template leaves them 0
    int by, bx;          // B per axis
    int kh, kw;
};

__device__ __forceinline__ FirPass fir_forward_pass(const FirGeom& g, const FirTaps& f) {
    return FirPass{g.H, g.W, g.OH, g.OW, g.down, g.up, -g.pad0, -g.pad0, f.kh, f.kw};
}

__device__ __forceinline__ FirPass fir_backward_pass(const FirGeom& g, const FirTaps& f) {
    return FirPass{g.OH, g.OW, g.H, g.W, g.up, g.down, g.pad0 - f.kh + 1, g.pad0 - f.kw + 1, f.kh, f.kw};
}

// v mod q in [0, q) for any sign of v (C's % keeps the sign of v).
__device__ __forceinline__ int fir_mod(int v, int q) {
    const int r = v % q;
    return r < 0 ? r + q : r;
}

// t (row-major kh × kw) into shared memory, reversed for the forward so that both directions
// index it as t[ky·kw + kx]. Contains __syncthreads: every thread calls it.
__device__ __forceinline__ void fir_stage_taps(float* t, const FirTaps& f, bool flip) {
    const int n = f.kh * f.kw;
    for (int i = threadIdx.x; i < n; i += blockDim.x) t[i] = f.taps[flip ? n - 1 - i : i];
    __syncthreads();
}

// Any geometry: one destination pixel per thread, visiting only the contributing taps. The sum
// runs over ky, then kx, ascending (for the forward the order of the reference formula).
template <int A_, int Q_>  // 0: the factor comes from P
__device__ __forceinline__ void fir_generic(const float* __restrict__ src, float* __restrict__ dst,
                                            i64 planes, const FirPass& P, const float* t) {
    const int A = A_ ? A_ : P.a, Q = Q_ ? Q_ : P.q;
    const int shw = P.SH * P.SW, dhw = P.DH * P.DW;
    for (i64 nc = blockIdx.y; nc < planes; nc += gridDim.y) {
        const float* sp = src + nc * shw;
        float* dp = dst + nc * dhw;
        for (int p = blockIdx.x * blockDim.x + threadIdx.x; p < dhw; p += gridDim.x * blockDim.x) {
            const int oy = (int)((unsigned)p / (unsigned)P.DW), ox = p - oy * P.DW;
            const int ny = oy * A + P.by, nx = ox * A + P.bx;
            // first contributing tap and its source sample (an exact division), then skip the
            // taps whose sample lies before the plane
            int ky0 = fir_mod(-ny, Q), iy0 = (ny + ky0) / Q;
            int kx0 = fir_mod(-nx, Q), ix0 = (nx + kx0) / Q;
            if (iy0 < 0) {
                ky0 -= iy0 * Q;
                iy0 = 0;
            }
            if (ix0 < 0) {
                kx0 -= ix0 * Q;
                ix0 = 0;
            }
            float acc = 0.0f;
            for (int ky = ky0, iy = iy0; ky < P.kh && iy < P.SH; ky += Q, ++iy) {
                const float* row = sp + iy * P.SW;
                const float* trow = t + ky * P.kw;
                for (int kx = kx0, ix = ix0; kx < P.kw && ix < P.SW; kx += Q, ++ix)
                    acc = fmaf(row[ix], trow[kx], acc);
            }
            dp[p] = acc;
        }
    }
}

// Constant factors and a constant KH × KW: each thread computes a run of FIR_RUN destination
// pixels down one column, which share their source rows: a window of M rows, each read once
// (NX samples into registers) for the whole run. Lanes of a warp take consecutive columns, so
// every load and store is coalesced. A run starts at a multiple of FIR_RUN, so with FIR_RUN·A a
// multiple of Q every run sees the same tap pattern along y: SY = (−B_y) mod Q, a template
// parameter, makes the row → (pixel, ky) pairing constant. Along x the phase is per thread.
// The sum per pixel runs over ky, then kx, ascending, like fir_generic.
#define FIR_RUN 4
template <int A, int Q, int KH, int KW, int SY>
__device__ __forceinline__ void fir_tiled(const float* __restrict__ src, float* __restrict__ dst,
                                          i64 planes, const FirPass& P, const float* t) {
    constexpr int R = FIR_RUN;
    static_assert((R * A) % Q == 0 && SY >= 0 && SY < Q, "every run must see the same y phase");
    constexpr int M = ((R - 1) * A + KH - 1 - SY) / Q + 1;  // rows: r·A + ky = SY + Q·m
    constexpr int NX = (KW + Q - 1) / Q;                    // contributing columns, at most
    const int shw = P.SH * P.SW, dhw = P.DH * P.DW;
    const unsigned items = (unsigned)((P.DH + R - 1) / R) * (unsigned)P.DW;
    for (i64 nc = blockIdx.y; nc < planes; nc += gridDim.y) {
        const float* sp = src + nc * shw;
        float* dp = dst + nc * dhw;
        for (unsigned it = blockIdx.x * blockDim.x + threadIdx.x; it < items; it += gridDim.x * blockDim.x) {
            const int run = (int)(it / (unsigned)P.DW), ox = (int)it - run * P.DW, oy0 = run * R;
            // this column's first contributing tap and sample, and which of its NX taps count
            const int nx = ox * A + P.bx;
            const int kx0 = fir_mod(-nx, Q), ix0 = (nx + kx0) / Q;
            bool col_ok[NX];
#pragma unroll
            for (int i = 0; i < NX; ++i)
                col_ok[i] = (KW % Q == 0 || kx0 + Q * i < KW) && (unsigned)(ix0 + i) < (unsigned)P.SW;
            float tk[KH][NX];  // this column's taps, in registers
#pragma unroll
            for (int ky = 0; ky < KH; ++ky)
#pragma unroll
                for (int i = 0; i < NX; ++i)
                    tk[ky][i] = KW % Q == 0 || kx0 + Q * i < KW ? t[ky * KW + kx0 + Q * i] : 0.0f;
            const int iy0 = (oy0 * A + P.by + SY) / Q;  // exact: Q divides oy0·A and B_y + SY
            float acc[R];
#pragma unroll
            for (int r = 0; r < R; ++r) acc[r] = 0.0f;
#pragma unroll
            for (int m = 0; m < M; ++m) {
                const int iy = iy0 + m;
                if ((unsigned)iy >= (unsigned)P.SH) continue;
                float w[NX];
#pragma unroll
                for (int i = 0; i < NX; ++i) w[i] = col_ok[i] ? sp[iy * P.SW + ix0 + i] : 0.0f;
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    const int ky = Q * m + SY - r * A;  // the tap row pairing row m with pixel r
                    if (ky < 0 || ky >= KH) continue;
#pragma unroll
                    for (int i = 0; i < NX; ++i)
                        if (col_ok[i]) acc[r] = fmaf(w[i], tk[ky][i], acc[r]);
                }
            }
#pragma unroll
            for (int r = 0; r < R; ++r)
                if (oy0 + r < P.DH) dp[(oy0 + r) * P.DW + ox] = acc[r];
        }
    }
}

// fir_tiled for one constant KH × KW, choosing the y phase (Q ≤ 2 here); false if the taps
// have another shape.
template <int A, int Q, int KH, int KW>
__device__ __forceinline__ bool fir_try_tiled(const float* __restrict__ src, float* __restrict__ dst,
                                              i64 planes, const FirPass& P, const float* t) {
    static_assert(Q == 1 || Q == 2, "one y phase per Q below");
    if (P.kh != KH || P.kw != KW) return false;
    if (fir_mod(-P.by, Q) == 0)
        fir_tiled<A, Q, KH, KW, 0>(src, dst, planes, P, t);
    else
        fir_tiled<A, Q, KH, KW, Q - 1>(src, dst, planes, P, t);
    return true;
}

// The tiled body for the FIRs the models use (4×4 [1,3,3,1], 2×2 box) when the factors are
// constants; the generic one otherwise.
template <int A, int Q>
__device__ __forceinline__ void fir_run(const float* __restrict__ src, float* __restrict__ dst, i64 planes,
                                        const FirPass& P, const float* t) {
    if constexpr (A > 0 && Q > 0) {
        if (fir_try_tiled<A, Q, 4, 4>(src, dst, planes, P, t)) return;
        if (fir_try_tiled<A, Q, 2, 2>(src, dst, planes, P, t)) return;
    }
    fir_generic<A, Q>(src, dst, planes, P, t);
}

template <int UP, int DOWN>  // 0: the factor comes from g
__device__ __forceinline__ void fir_forward_body(const float* __restrict__ x, float* __restrict__ out,
                                                 i64 planes, const FirGeom& g, const FirTaps& f) {
    __shared__ float taps[FIR_MAX_TAPS];
    fir_stage_taps(taps, f, true);
    fir_run<DOWN, UP>(x, out, planes, fir_forward_pass(g, f), taps);
}

template <int UP, int DOWN>
__device__ __forceinline__ void fir_backward_body(const float* __restrict__ dy, float* __restrict__ dx,
                                                  i64 planes, const FirGeom& g, const FirTaps& f) {
    __shared__ float taps[FIR_MAX_TAPS];
    fir_stage_taps(taps, f, false);
    fir_run<UP, DOWN>(dy, dx, planes, fir_backward_pass(g, f), taps);
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

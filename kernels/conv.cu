// Convolution and dense layers as one implicit GEMM:  C[m, p] = Σ_k A[m, k] · B[k, p] + bias[m]
//   m: output channel (M = O), p: output pixel over the batch (P = N·OH·OW),
//   k: (input channel, ky, kx) (K = C·KH·KW),
//   A[m, k] = w[m·a_sm + k·a_sk]            (OIHW conv weights: a_sm = K, a_sk = 1;
//                                             NIN weights stored (in, out): a_sm = 1, a_sk = O),
//   B[k, p] = x[n, c, oy·s − pad + ky, ox·s − pad + kx] (0 outside the image),
//   out[n, m, oy, ox] = C[m, p].
// Linear layers are the 1×1 case with H = W = 1. CPU twins: conv2d, nin, linear.
//
// Kernels (same arguments):
//   conv_f32                 SIMT f32, 128×128×8 tiles, 8×8 outputs per thread (the exact path);
//   conv_tf32, conv_tf32_n64 WMMA m16n16k8 TF32, f32 accumulate, 128×128 / 128×64 tiles, K tile 16;
//   conv_bf16, conv_bf16_n64 WMMA m16n16k16 bf16, f32 accumulate, 128×128 / 128×64 tiles, K tile 32.
// All use 256 threads, two shared-memory stages (the next K tile is loaded into registers while the
// tensor cores work on the current one; one barrier per K tile) and split-K over blockIdx.z: block
// z sums k in [z·k_chunk, (z+1)·k_chunk) and writes out + z·numel; with gridDim.z > 1 the caller
// passes a workspace and no bias, and conv_splitk_reduce_epi adds the partials and the bias.
//
// The im2col gather walks each thread's k sequence (an arithmetic progression) incrementally, so the
// inner loop has no integer division (see ColWalker).
#include "common.cuh"
#include "mma.cuh"

struct ConvGeom {
    int N, C, H, W;      // input
    int O, OH, OW;       // output
    int KH, KW, stride, pad;
    int k_chunk;           // K range per blockIdx.z (split-K); a multiple of every kernel's K tile
    long long a_sm, a_sk;  // weight strides of A[m, k]
};

#define CONV_THREADS 256

// Offset of out[n, 0, oy, ox] for output pixel p (p < P).
__device__ __forceinline__ long long out_offset(const ConvGeom& g, long long p) {
    const long long ohw = (long long)g.OH * g.OW;
    const long long n = p / ohw;
    return n * g.O * ohw + (p - n * ohw);
}

// One thread's column of B: a fixed output pixel, k = k_first, k_first + step, ... Each advance
// adds the precomputed (channel, ky, kx) decomposition of `step` with one carry per digit.
struct ColWalker {
    const float* xp;  // x + n·C·H·W of the pixel's sample
    int iy0, ix0;     // input origin of the receptive field
    bool pvalid;
    int k, c_off, ky, kx;          // current k = c·KH·KW + ky·KW + kx, c_off = c·H·W
    int s_coff, s_ky, s_kx, step;  // the step, decomposed the same way

    __device__ __forceinline__ void init(const float* x, const ConvGeom& g, long long p, long long P,
                                         int k_first, int step_) {
        pvalid = p < P;
        if (!pvalid) p = 0;
        const int ohw = g.OH * g.OW, hw = g.H * g.W, khw = g.KH * g.KW;
        const int n = (int)(p / ohw);
        const int r = (int)(p - (long long)n * ohw);
        const int oy = r / g.OW, ox = r - oy * g.OW;
        iy0 = oy * g.stride - g.pad;
        ix0 = ox * g.stride - g.pad;
        xp = x + (long long)n * g.C * hw;
        k = k_first;
        int c = k / khw, rk = k - c * khw;
        ky = rk / g.KW;
        kx = rk - ky * g.KW;
        c_off = c * hw;
        step = step_;
        int sc = step / khw, rs = step - sc * khw;
        s_ky = rs / g.KW;
        s_kx = rs - s_ky * g.KW;
        s_coff = sc * hw;
    }
    // B[k, p] for the current k (0 past `kend` or outside the image), then advance.
    __device__ __forceinline__ float next(const ConvGeom& g, int kend) {
        const int iy = iy0 + ky, ix = ix0 + kx;
        const bool ok = pvalid && k < kend && (unsigned)iy < (unsigned)g.H && (unsigned)ix < (unsigned)g.W;
        const float v = ok ? __ldg(xp + c_off + iy * g.W + ix) : 0.0f;
        k += step;
        c_off += s_coff;
        kx += s_kx;
        ky += s_ky;
        if (kx >= g.KW) { kx -= g.KW; ++ky; }
        if (ky >= g.KH) { ky -= g.KH; c_off += g.H * g.W; }
        return v;
    }
};

// One thread's share of a BM×BK tile of A. Conv weights (a_sk = 1) are read along k (a warp reads
// whole rows), NIN weights (a_sm = 1) along m; element i is (m_first + i·dm, k_first + i·dk).
template <int BM, int BK>
struct RowWalker {
    static_assert(CONV_THREADS % BM == 0 && CONV_THREADS % BK == 0, "loader mapping");
    const float* w;
    int m, k, dm, dk;  // tile-relative coordinates of element 0 and the per-element steps
    int a_sm, a_sk;    // weight strides (a layer's weights hold fewer than 2^31 elements)

    __device__ __forceinline__ void init(const float* w_, const ConvGeom& g, int t) {
        w = w_;
        a_sm = (int)g.a_sm;
        a_sk = (int)g.a_sk;
        if (g.a_sk == 1) {
            m = t / BK; k = t % BK; dm = CONV_THREADS / BK; dk = 0;
        } else {
            m = t % BM; k = t / BM; dm = 0; dk = CONV_THREADS / BM;
        }
    }
    // Loads elements 0..E-1 of the tile at (m0, k0) into r.
    template <int E>
    __device__ __forceinline__ void fetch(float (&r)[E], int m0, int k0, int M, int kend) const {
        const int mm = m0 + m, kk = k0 + k;
        const float* base = w + (mm * a_sm + kk * a_sk);
        const int step = dm * a_sm + dk * a_sk;
#pragma unroll
        for (int i = 0; i < E; ++i)
            r[i] = (mm + i * dm < M && kk + i * dk < kend) ? __ldg(base + i * step) : 0.0f;
    }
};

// ---- split-K reduction ---------------------------------------------------------------------------

// A residual block's epilogue fused into the output write: v = conv + bias[m] (+ cb[n·M + m]),
// then alpha·v + beta·res[i] when res is given (the CPU twin composes conv2d, add_channel_bias
// and axpby — Backend::conv2d_fused).
struct ConvEpi {
    const float* cb;   // [N, M] or null
    const float* res;  // like the output, or null
    float alpha, beta;
};

__device__ __forceinline__ float conv_epi(const ConvEpi& e, float v, long long n, int m, int M, long long i) {
    if (e.cb) v += e.cb[n * M + m];
    if (e.res) v = e.alpha * v + e.beta * e.res[i];
    return v;
}

// Split-K reduction (every GEMM kernel's): out[i] = epi(Σ_z ws[z·numel + i] + bias[m]), m = (i / ohw)
// mod O; the plain GEMMs pass an empty epilogue.
extern "C" __global__ void conv_splitk_reduce_epi(const float* __restrict__ ws, const float* __restrict__ bias,
                                                  float* __restrict__ out, long long numel, int splits, int O,
                                                  long long ohw, ConvEpi e) {
    GRID_STRIDE(i, numel) {
        float s = 0.0f;
        for (int z = 0; z < splits; ++z) s += ws[(long long)z * numel + i];
        const long long nm = i / ohw;
        const int m = (int)(nm % O);
        if (bias) s += bias[m];
        out[i] = conv_epi(e, s, nm / O, m, O, i);
    }
}

// ---- SIMT f32 ------------------------------------------------------------------------------------
// 128×128 tile, K tile 8, 16×16 threads each owning rows {ty·4 + i, 64 + ty·4 + i} and columns
// {tx·4 + j, 64 + tx·4 + j} (i, j < 4), read from shared memory as float4.

#define F_BM 128
#define F_BN 128
#define F_BK 8
#define F_LD (F_BM + 4)

extern "C" __global__ void __launch_bounds__(CONV_THREADS) conv_f32(const float* __restrict__ x,
                                                                    const float* __restrict__ w,
                                                                    const float* __restrict__ bias,
                                                                    float* __restrict__ out, ConvGeom g) {
    __shared__ __align__(16) float As[2][F_BK][F_LD];  // [k][m]
    __shared__ __align__(16) float Bs[2][F_BK][F_LD];  // [k][p]
    constexpr int EA = F_BM * F_BK / CONV_THREADS, EB = F_BK * F_BN / CONV_THREADS;
    const int M = g.O, K = g.C * g.KH * g.KW;
    const long long P = (long long)g.N * g.OH * g.OW;
    const int t = threadIdx.x;
    const int m0 = blockIdx.y * F_BM;
    const long long p0 = (long long)blockIdx.x * F_BN;
    const int kb = blockIdx.z * g.k_chunk;
    const int kend = min(K, kb + g.k_chunk);
    const int ntiles = kend > kb ? (kend - kb + F_BK - 1) / F_BK : 0;

    RowWalker<F_BM, F_BK> aw;
    aw.init(w, g, t);
    ColWalker bw;
    bw.init(x, g, p0 + t % F_BN, P, kb + t / F_BN, CONV_THREADS / F_BN);
    float ra[EA], rb[EB];
    auto fetch = [&](int k0) {
        aw.fetch(ra, m0, k0, M, kend);
#pragma unroll
        for (int i = 0; i < EB; ++i) rb[i] = bw.next(g, kend);
    };
    auto stash = [&](int s) {
#pragma unroll
        for (int i = 0; i < EA; ++i) As[s][aw.k + i * aw.dk][aw.m + i * aw.dm] = ra[i];
#pragma unroll
        for (int i = 0; i < EB; ++i) Bs[s][t / F_BN + i * (CONV_THREADS / F_BN)][t % F_BN] = rb[i];
    };

    const int tx = t % 16, ty = t / 16;
    float acc[8][8] = {};
    if (ntiles > 0) {
        fetch(kb);
        stash(0);
    }
    __syncthreads();
    for (int tile = 0; tile < ntiles; ++tile) {
        const int s = tile & 1;
        const bool more = tile + 1 < ntiles;
        if (more) fetch(kb + (tile + 1) * F_BK);
#pragma unroll
        for (int kk = 0; kk < F_BK; ++kk) {
            const float4 a0 = *reinterpret_cast<const float4*>(&As[s][kk][ty * 4]);
            const float4 a1 = *reinterpret_cast<const float4*>(&As[s][kk][64 + ty * 4]);
            const float4 b0 = *reinterpret_cast<const float4*>(&Bs[s][kk][tx * 4]);
            const float4 b1 = *reinterpret_cast<const float4*>(&Bs[s][kk][64 + tx * 4]);
            const float av[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
            const float bv[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
            for (int i = 0; i < 8; ++i)
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
        }
        if (more) stash(s ^ 1);
        __syncthreads();
    }

    float* dst = out + (long long)blockIdx.z * ((long long)g.N * M * g.OH * g.OW);
    const long long ohw = (long long)g.OH * g.OW;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        const long long p = p0 + (j < 4 ? tx * 4 + j : 64 + tx * 4 + j - 4);
        if (p >= P) continue;
        const long long off = out_offset(g, p);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const int m = m0 + (i < 4 ? ty * 4 + i : 64 + ty * 4 + i - 4);
            if (m >= M) continue;
            float v = acc[i][j];
            if (bias) v += bias[m];
            dst[off + (long long)m * ohw] = v;
        }
    }
}

#ifndef SRSDE_NO_WMMA
// build.rs defines SRSDE_NO_WMMA when the CUDA headers for WMMA (mma.h and crt/mma.h, from the
// nvidia-cuda-runtime and nvidia-cuda-crt wheels) are missing; then only conv_f32 exists.
#include <mma.h>
#include <cuda_bf16.h>
using namespace nvcuda;

// ---- tensor cores (WMMA) -------------------------------------------------------------------------
// 8 warps over a 128×BN tile: for BN = 128 a 2×4 warp grid of 64×32 pieces (4×2 fragments),
// for BN = 64 a 4×2 grid of 32×32 pieces (2×2 fragments). Operands are converted (bf16) or rounded
// (TF32) when staged into shared memory; accumulation is f32.

template <typename E>
struct TcTraits;

template <>
struct TcTraits<float> {  // TF32: the tile is stored as f32 holding TF32-rounded values
    static constexpr int BK = 16, KSTEP = 8, PAD = 4;
    typedef wmma::precision::tf32 FragT;
    static __device__ __forceinline__ float conv(float v) { return wmma::__float_to_tf32(v); }
};

template <>
struct TcTraits<__nv_bfloat16> {
    static constexpr int BK = 32, KSTEP = 16, PAD = 8;
    typedef __nv_bfloat16 FragT;
    static __device__ __forceinline__ __nv_bfloat16 conv(float v) { return __float2bfloat16_rn(v); }
};

#define T_BM 128
#define EPI_LD 20  // per-warp 16×16 epilogue staging row stride (floats)

template <typename E, int BN>
__device__ __forceinline__ void conv_tc(const float* __restrict__ x, const float* __restrict__ w,
                                        const float* __restrict__ bias, float* __restrict__ out,
                                        const ConvGeom& g) {
    typedef TcTraits<E> Tr;
    constexpr int BM = T_BM, BK = Tr::BK, KSTEP = Tr::KSTEP;
    constexpr int WARPS_M = BN == 128 ? 2 : 4, WARPS_N = 8 / WARPS_M;
    constexpr int WTM = BM / WARPS_M, WTN = BN / WARPS_N, FM = WTM / 16, FN = WTN / 16;
    constexpr int A_LD = BK + Tr::PAD, B_LD = BN + Tr::PAD;
    constexpr int STAGE = BM * A_LD + BK * B_LD;  // elements of E per stage: A[BM][A_LD], B[BK][B_LD]
    constexpr int TILE_BYTES = 2 * STAGE * (int)sizeof(E);
    constexpr int EPI_BYTES = 8 * 16 * EPI_LD * (int)sizeof(float);
    constexpr int SMEM = TILE_BYTES > EPI_BYTES ? TILE_BYTES : EPI_BYTES;
    constexpr int EA = BM * BK / CONV_THREADS, EB = BK * BN / CONV_THREADS;
    constexpr int B_ROWS = CONV_THREADS / BN;  // k rows covered by one pass of the B loader
    static_assert((STAGE * sizeof(E)) % 32 == 0, "WMMA pointers need 32-byte alignment");
    __shared__ __align__(128) unsigned char smem[SMEM];
    E* const tiles = reinterpret_cast<E*>(smem);

    const int M = g.O, K = g.C * g.KH * g.KW;
    const long long P = (long long)g.N * g.OH * g.OW;
    const int t = threadIdx.x, warp = t / 32, lane = t % 32;
    const int wm = warp / WARPS_N, wn = warp % WARPS_N;
    const int m0 = blockIdx.y * BM;
    const long long p0 = (long long)blockIdx.x * BN;
    const int kb = blockIdx.z * g.k_chunk;
    const int kend = min(K, kb + g.k_chunk);
    const int ntiles = kend > kb ? (kend - kb + BK - 1) / BK : 0;

    RowWalker<BM, BK> aw;
    aw.init(w, g, t);
    ColWalker bw;
    bw.init(x, g, p0 + t % BN, P, kb + t / BN, B_ROWS);
    float ra[EA], rb[EB];
    auto fetch = [&](int k0) {
        aw.fetch(ra, m0, k0, M, kend);
#pragma unroll
        for (int i = 0; i < EB; ++i) rb[i] = bw.next(g, kend);
    };
    auto stash = [&](int s) {
        E* As = tiles + s * STAGE;
        E* Bs = As + BM * A_LD;
#pragma unroll
        for (int i = 0; i < EA; ++i) As[(aw.m + i * aw.dm) * A_LD + aw.k + i * aw.dk] = Tr::conv(ra[i]);
#pragma unroll
        for (int i = 0; i < EB; ++i) Bs[(t / BN + i * B_ROWS) * B_LD + t % BN] = Tr::conv(rb[i]);
    };

    wmma::fragment<wmma::accumulator, 16, 16, KSTEP, float> acc[FM][FN];
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

    if (ntiles > 0) {
        fetch(kb);
        stash(0);
    }
    __syncthreads();
    for (int tile = 0; tile < ntiles; ++tile) {
        const int s = tile & 1;
        const bool more = tile + 1 < ntiles;
        if (more) fetch(kb + (tile + 1) * BK);  // in flight while the tensor cores work
        const E* As = tiles + s * STAGE;
        const E* Bs = As + BM * A_LD;
#pragma unroll
        for (int kk = 0; kk < BK; kk += KSTEP) {
            wmma::fragment<wmma::matrix_a, 16, 16, KSTEP, typename Tr::FragT, wmma::row_major> fa[FM];
            wmma::fragment<wmma::matrix_b, 16, 16, KSTEP, typename Tr::FragT, wmma::row_major> fb[FN];
#pragma unroll
            for (int i = 0; i < FM; ++i) wmma::load_matrix_sync(fa[i], As + (wm * WTM + i * 16) * A_LD + kk, A_LD);
#pragma unroll
            for (int j = 0; j < FN; ++j) wmma::load_matrix_sync(fb[j], Bs + kk * B_LD + wn * WTN + j * 16, B_LD);
#pragma unroll
            for (int i = 0; i < FM; ++i)
#pragma unroll
                for (int j = 0; j < FN; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
        }
        if (more) stash(s ^ 1);  // the other stage was last read before the previous barrier
        __syncthreads();
    }

    // Epilogue: each warp passes its fragments one at a time through a private 16×16 staging
    // area (reusing the tile memory after the last barrier) and writes them with the bias;
    // lane owns column lane % 16, rows lane / 16 + 2·r, so 16 lanes write 16 adjacent pixels.
    float* stg = reinterpret_cast<float*>(smem) + warp * 16 * EPI_LD;
    float* dst = out + (long long)blockIdx.z * ((long long)g.N * M * g.OH * g.OW);
    const long long ohw = (long long)g.OH * g.OW;
    const int col = lane % 16, half = lane / 16;
    long long poff[FN];
    bool pok[FN];
#pragma unroll
    for (int j = 0; j < FN; ++j) {
        const long long p = p0 + wn * WTN + j * 16 + col;
        pok[j] = p < P;
        poff[j] = pok[j] ? out_offset(g, p) : 0;
    }
#pragma unroll
    for (int i = 0; i < FM; ++i) {
#pragma unroll
        for (int j = 0; j < FN; ++j) {
            wmma::store_matrix_sync(stg, acc[i][j], EPI_LD, wmma::mem_row_major);
            __syncwarp();
            if (pok[j]) {
#pragma unroll
                for (int r = 0; r < 8; ++r) {
                    const int row = 2 * r + half;
                    const int m = m0 + wm * WTM + i * 16 + row;
                    if (m < M) {
                        float v = stg[row * EPI_LD + col];
                        if (bias) v += bias[m];
                        dst[poff[j] + (long long)m * ohw] = v;
                    }
                }
            }
            __syncwarp();
        }
    }
}

// One entry point per (precision, tile width); build.rs lists kernels by these declarations.
extern "C" __global__ void __launch_bounds__(CONV_THREADS) conv_tf32(const float* __restrict__ x,
    const float* __restrict__ w, const float* __restrict__ bias, float* __restrict__ out, ConvGeom g) {
    conv_tc<float, 128>(x, w, bias, out, g);
}

extern "C" __global__ void __launch_bounds__(CONV_THREADS) conv_tf32_n64(const float* __restrict__ x,
    const float* __restrict__ w, const float* __restrict__ bias, float* __restrict__ out, ConvGeom g) {
    conv_tc<float, 64>(x, w, bias, out, g);
}

extern "C" __global__ void __launch_bounds__(CONV_THREADS) conv_bf16(const float* __restrict__ x,
    const float* __restrict__ w, const float* __restrict__ bias, float* __restrict__ out, ConvGeom g) {
    conv_tc<__nv_bfloat16, 128>(x, w, bias, out, g);
}

extern "C" __global__ void __launch_bounds__(CONV_THREADS) conv_bf16_n64(const float* __restrict__ x,
    const float* __restrict__ w, const float* __restrict__ bias, float* __restrict__ out, ConvGeom g) {
    conv_tc<__nv_bfloat16, 64>(x, w, bias, out, g);
}
#endif  // SRSDE_NO_WMMA

// ---- bf16 tensor cores, asynchronous pipeline (mma.sync m16n8k16) -------------------------------
// conv_bf16_mma (128×128 tiles) and conv_bf16_mma_n64 (128×64): the fast bf16 path. Two changes
// from conv_bf16 make the operand loads cheap enough to keep the tensor cores busy:
//  * K is walked in the order (ky, kx, c) instead of (c, ky, kx), in tiles of 32 channels at one
//    filter tap. Within a tile a thread's pixel and tap are fixed, so each B element is one load
//    at base + c·H·W, with one bounds check per tile instead of a digit walk per element;
//  * the weights are repacked once (conv_pack_bf16, cached by the host) into bf16
//    wp[m][tap][c] (m padded to the 128-row tile, c to the 32-channel tile, zeros outside), so an
//    A tile is 16-byte cp.async copies with no bounds checks.
// Operands stream through MMA_STAGES shared-memory stages with cp.async (A as bf16, B as f32
// zero-filled outside the image, rounded to bf16 when the fragments are built); A fragments come
// from ldmatrix, B fragments from 64-bit loads of (k, k+1) pairs stored side by side.
// Split-K over blockIdx.z counts K tiles: block z takes tiles [z·tiles_per_split, …); then the
// caller passes a null epilogue and conv_splitk_reduce_epi applies it.
// CPU twins: conv2d / nin (with bf16-rounded operands).

#define MMA_BK 32
#define MMA_STAGES 4
// Channels every NHWC copy is padded to (conv_to_nhwc_bf16's cp): a multiple of every K tile.
#define NHWC_CPAD 64

// BK: channels per K tile (32, or 64 for the NHWC _k64 kernels), STAGES pipeline stages.
template <int BN, bool NHWC, int BK_ = MMA_BK, int STAGES_ = MMA_STAGES>
struct MmaTile {
    static constexpr int BM = 128, BK = BK_, STAGES = STAGES_;
    static constexpr int WARPS_M = BN == 128 ? 2 : 4, WARPS_N = 8 / WARPS_M;
    static constexpr int WTM = BM / WARPS_M, WTN = BN / WARPS_N;  // warp tile 64×32 or 32×32
    static constexpr int MI = WTM / 16, NI = WTN / 8;             // m16 × n8 fragments per warp
    static constexpr int LDN = BN + 4;  // pixel stride of a B k-pair row (≡ 4 mod 16: conflict-free)
    // bf16 per A row (and NHWC B row) in shared memory: BK + 8, i.e. 80- or 144-byte rows, which
    // keep ldmatrix conflict-free.
    static constexpr int A_LD = BK + 8;
    static constexpr int CHUNKS = BK / 8;                  // 16-byte chunks per row
    static constexpr int A_WORDS = BM * A_LD / 2;          // 32-bit words of one A stage
    // One B stage: NCHW f32 [k pair][pixel][2], or NHWC bf16 [pixel][A_LD] like A.
    static constexpr int B_WORDS = NHWC ? BN * A_LD / 2 : BK / 2 * LDN * 2;
    static constexpr int STAGE_WORDS = A_WORDS + B_WORDS;
    static constexpr int SMEM_BYTES = STAGES * STAGE_WORDS * 4;
    static constexpr int B_ROWS = CONV_THREADS / BN, EB = BK / B_ROWS;  // NCHW B loader: k rows per pass
    static constexpr int A_CHUNKS = BM * CHUNKS / CONV_THREADS;         // per thread
    static constexpr int B_CHUNKS = BN * CHUNKS / CONV_THREADS;         // NHWC B loader, per thread
    static constexpr int PIX_STEP = CONV_THREADS / CHUNKS;              // NHWC: pixel rows per pass
    static_assert(NI % 2 == 0, "B fragments are loaded two n8 blocks at a time");
    static_assert(NHWC || BK == MMA_BK, "the NCHW loader walks 32-channel tiles");
};

// The pipelined implicit GEMM shared by both input layouts. NHWC = false: B comes from the f32
// NCHW input x; NHWC = true: from xh, the input as bf16 [N][H][W][cp] (channels padded to the
// 32-channel tile with zeros, conv_to_nhwc_bf16), so a B tile is 16-byte copies of 8 channels of
// one pixel, one bounds check per pixel and tap, and B fragments come from ldmatrix like A's.
template <int BN, bool NHWC, int BK = MMA_BK, int STAGES = MMA_STAGES>
__device__ __forceinline__ void conv_mma_body(const float* __restrict__ x, const unsigned* __restrict__ xh,
                                              const unsigned* __restrict__ wp, const float* __restrict__ bias,
                                              float* __restrict__ out, const ConvGeom& g, int tiles_per_split,
                                              const ConvEpi& epi) {
    typedef MmaTile<BN, NHWC, BK, STAGES> T;
    extern __shared__ float S[];
    unsigned* const smem = reinterpret_cast<unsigned*>(S);

    const int t = threadIdx.x, warp = t >> 5, lane = t & 31;
    const int wm = warp / T::WARPS_N, wn = warp % T::WARPS_N;
    const int M = g.O, KHW = g.KH * g.KW, HW = g.H * g.W;
    const int cp = (g.C + T::BK - 1) / T::BK * T::BK, ctiles = cp / T::BK;
    const long long P = (long long)g.N * g.OH * g.OW;
    const int m0 = blockIdx.y * T::BM;
    const long long p0 = (long long)blockIdx.x * BN;
    const int tb = blockIdx.z * tiles_per_split;
    const int ntiles = max(min(KHW * ctiles, tb + tiles_per_split) - tb, 0);
    const int ohw = g.OH * g.OW;

    // NCHW B loader: this thread's pixel (column t % BN) and k rows t / BN + i·B_ROWS of every tile.
    // NHWC B loader: pixel rows t / CHUNKS + i·PIX_STEP of the tile, channel chunk t % CHUNKS.
    const int cs = (g.C + NHWC_CPAD - 1) / NHWC_CPAD * NHWC_CPAD;  // xh's channel stride
    constexpr int NPIX = NHWC ? T::B_CHUNKS : 1;
    int iy0[NPIX], ix0[NPIX];
    const float* xn = x;
    const unsigned* xhn[NPIX];
    const int bcol = t % BN, brow0 = t / BN;
#pragma unroll
    for (int i = 0; i < NPIX; ++i) {
        long long pb = p0 + (NHWC ? t / T::CHUNKS + i * T::PIX_STEP : bcol);
        const bool pvalid = pb < P;
        if (!pvalid) pb = 0;
        const int nb = (int)(pb / ohw), rb = (int)(pb - (long long)nb * ohw);
        const int oy = rb / g.OW, ox = rb - oy * g.OW;
        // An invalid pixel gets an origin far outside the image, so every tap is out of bounds.
        iy0[i] = pvalid ? oy * g.stride - g.pad : -(1 << 28);
        ix0[i] = ox * g.stride - g.pad;
        if (NHWC)
            xhn[i] = xh + (long long)nb * HW * (cs / 2) + (t % T::CHUNKS) * 4;
        else
            xn = x + (long long)nb * g.C * HW;
    }

    auto load_tile = [&](int stage, int tile) {
        const int tap = tile / ctiles, c0 = (tile - tap * ctiles) * T::BK;
        unsigned* As = smem + stage * T::STAGE_WORDS;
        // A: 128 rows × CHUNKS chunks of 8 bf16; chunks t, t + 256, ….
#pragma unroll
        for (int i = 0; i < T::A_CHUNKS; ++i) {
            const int chunk = t + i * CONV_THREADS, row = chunk / T::CHUNKS, c8 = chunk % T::CHUNKS;
            const long long e = ((long long)(m0 + row) * KHW + tap) * cp + c0 + c8 * 8;  // bf16 index
            cp_async16(As + row * (T::A_LD / 2) + c8 * 4, wp + e / 2);
        }
        const int ky = tap / g.KW, kx = tap - ky * g.KW;
        if constexpr (NHWC) {
            unsigned* Bs = As + T::A_WORDS;
#pragma unroll
            for (int i = 0; i < NPIX; ++i) {
                const int iy = iy0[i] + ky, ix = ix0[i] + kx;
                const bool inside = (unsigned)iy < (unsigned)g.H && (unsigned)ix < (unsigned)g.W;
                const unsigned* src = inside ? xhn[i] + ((long long)iy * g.W + ix) * (cs / 2) + c0 / 2 : xh;
                const int row = t / T::CHUNKS + i * T::PIX_STEP;
                cp_async16_zfill(Bs + row * (T::A_LD / 2) + (t % T::CHUNKS) * 4, src, inside);
            }
        } else {
            float* Bs = reinterpret_cast<float*>(As + T::A_WORDS);
            const int iy = iy0[0] + ky, ix = ix0[0] + kx;
            const bool inside = (unsigned)iy < (unsigned)g.H && (unsigned)ix < (unsigned)g.W;
            const float* base = inside ? xn + iy * g.W + ix : x;
#pragma unroll
            for (int i = 0; i < T::EB; ++i) {
                const int k = brow0 + i * T::B_ROWS, c = c0 + k;
                const bool ok = inside && c < g.C;
                cp_async4(Bs + ((k >> 1) * T::LDN + bcol) * 2 + (k & 1), ok ? base + c * HW : x, ok);
            }
        }
    };

    float acc[T::MI][T::NI][4];
#pragma unroll
    for (int i = 0; i < T::MI; ++i)
#pragma unroll
        for (int j = 0; j < T::NI; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.0f;

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < ntiles) load_tile(s, tb + s);
        cp_async_commit();  // empty groups keep the count uniform
    }
    for (int tile = 0; tile < ntiles; ++tile) {
        cp_async_wait<STAGES - 2>();  // tile `tile` has landed (for this thread) ...
        __syncthreads();              // ... for every thread; stage (tile − 1) is free again
        const int next = tile + STAGES - 1;
        if (next < ntiles) load_tile(next % STAGES, tb + next);
        cp_async_commit();
        const unsigned* As = smem + (tile % STAGES) * T::STAGE_WORDS;
#pragma unroll
        for (int kk = 0; kk < T::BK; kk += 16) {
            unsigned af[T::MI][4], bfr[T::NI][2];
#pragma unroll
            for (int mi = 0; mi < T::MI; ++mi) {
                const int row = wm * T::WTM + mi * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
                const int col = kk + (lane >> 4) * 8;
                ldmatrix_x4(af[mi], As + row * (T::A_LD / 2) + col / 2);
            }
            if constexpr (NHWC) {
                // Matrices (n block ni, k 0–7), (ni, k 8–15), (ni + 1, k 0–7), (ni + 1, k 8–15):
                // rows are pixels with k contiguous, i.e. exactly the column fragments of B.
                const unsigned* Bs = As + T::A_WORDS;
#pragma unroll
                for (int ni = 0; ni < T::NI; ni += 2) {
                    const int n = wn * T::WTN + (ni + (lane >> 4)) * 8 + (lane & 7);
                    const int k = kk + ((lane >> 3) & 1) * 8;
                    unsigned r[4];
                    ldmatrix_x4(r, Bs + n * (T::A_LD / 2) + k / 2);
                    bfr[ni][0] = r[0];
                    bfr[ni][1] = r[1];
                    bfr[ni + 1][0] = r[2];
                    bfr[ni + 1][1] = r[3];
                }
            } else {
                const float* Bs = reinterpret_cast<const float*>(As + T::A_WORDS);
#pragma unroll
                for (int ni = 0; ni < T::NI; ++ni) {
                    const int n = wn * T::WTN + ni * 8 + (lane >> 2);
                    const int kp = kk / 2 + (lane & 3);
                    const float2 v0 = *reinterpret_cast<const float2*>(Bs + (kp * T::LDN + n) * 2);
                    const float2 v1 = *reinterpret_cast<const float2*>(Bs + ((kp + 4) * T::LDN + n) * 2);
                    bfr[ni][0] = pack_bf16x2(v0.x, v0.y);
                    bfr[ni][1] = pack_bf16x2(v1.x, v1.y);
                }
            }
#pragma unroll
            for (int mi = 0; mi < T::MI; ++mi)
#pragma unroll
                for (int ni = 0; ni < T::NI; ++ni) mma_bf16_16816(acc[mi][ni], af[mi], bfr[ni]);
        }
    }
    cp_async_wait<0>();

    // Epilogue straight from the accumulators: lane (g, q) holds rows g and g + 8 of each m16
    // fragment at pixels 2q, 2q + 1 of each n8 fragment.
    const int g8 = lane >> 2, q4 = lane & 3;
    float* dst = out + (long long)blockIdx.z * (P * M);
    const long long ohw_l = ohw;
    long long poff[T::NI][2];
    int pn[T::NI][2];  // the pixel's sample
    bool pok[T::NI][2];
#pragma unroll
    for (int ni = 0; ni < T::NI; ++ni)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const long long p = p0 + wn * T::WTN + ni * 8 + q4 * 2 + j;
            pok[ni][j] = p < P;
            pn[ni][j] = pok[ni][j] ? (int)(p / ohw) : 0;
            poff[ni][j] = pok[ni][j] ? out_offset(g, p) : 0;
        }
#pragma unroll
    for (int mi = 0; mi < T::MI; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int m = m0 + wm * T::WTM + mi * 16 + g8 + h * 8;
            if (m >= M) continue;
            const float bv = bias ? bias[m] : 0.0f;
#pragma unroll
            for (int ni = 0; ni < T::NI; ++ni)
#pragma unroll
                for (int j = 0; j < 2; ++j)
                    if (pok[ni][j]) {
                        const long long i = poff[ni][j] + m * ohw_l;
                        dst[i] = conv_epi(epi, acc[mi][ni][h * 2 + j] + bv, pn[ni][j], m, M, i);
                    }
        }
}

// Dynamic shared memory: MmaTile<128, false>::SMEM_BYTES (108,544) / MmaTile<64, false> (75,776);
// the host raises the kernels' limit above the default 48 KB once at start-up.
extern "C" __global__ void __launch_bounds__(CONV_THREADS, 2) conv_bf16_mma(const float* __restrict__ x,
    const unsigned* __restrict__ wp, const float* __restrict__ bias, float* __restrict__ out, ConvGeom g,
    int tiles_per_split, ConvEpi epi) {
    conv_mma_body<128, false>(x, nullptr, wp, bias, out, g, tiles_per_split, epi);
}

extern "C" __global__ void __launch_bounds__(CONV_THREADS, 2) conv_bf16_mma_n64(const float* __restrict__ x,
    const unsigned* __restrict__ wp, const float* __restrict__ bias, float* __restrict__ out, ConvGeom g,
    int tiles_per_split, ConvEpi epi) {
    conv_mma_body<64, false>(x, nullptr, wp, bias, out, g, tiles_per_split, epi);
}

// The same GEMM reading xh (bf16 NHWC, conv_to_nhwc_bf16). Shared memory: MmaTile<128, true>
// (81,920 bytes) / MmaTile<64, true> (61,440).
extern "C" __global__ void __launch_bounds__(CONV_THREADS, 2) conv_bf16_nhwc(const unsigned* __restrict__ xh,
    const unsigned* __restrict__ wp, const float* __restrict__ bias, float* __restrict__ out, ConvGeom g,
    int tiles_per_split, ConvEpi epi) {
    conv_mma_body<128, true>(nullptr, xh, wp, bias, out, g, tiles_per_split, epi);
}

extern "C" __global__ void __launch_bounds__(CONV_THREADS, 2) conv_bf16_nhwc_n64(const unsigned* __restrict__ xh,
    const unsigned* __restrict__ wp, const float* __restrict__ bias, float* __restrict__ out, ConvGeom g,
    int tiles_per_split, ConvEpi epi) {
    conv_mma_body<64, true>(nullptr, xh, wp, bias, out, g, tiles_per_split, epi);
}

// The same with 64-channel K tiles in three stages (half the barriers per FLOP; weights packed
// with 64-channel padding). Shared memory: MmaTile<128, true, 64, 3> (110,592 bytes) /
// MmaTile<64, true, 64, 3> (82,944).
extern "C" __global__ void __launch_bounds__(CONV_THREADS, 2) conv_bf16_nhwc_k64(const unsigned* __restrict__ xh,
    const unsigned* __restrict__ wp, const float* __restrict__ bias, float* __restrict__ out, ConvGeom g,
    int tiles_per_split, ConvEpi epi) {
    conv_mma_body<128, true, 64, 3>(nullptr, xh, wp, bias, out, g, tiles_per_split, epi);
}

extern "C" __global__ void __launch_bounds__(CONV_THREADS, 2) conv_bf16_nhwc_k64_n64(const unsigned* __restrict__ xh,
    const unsigned* __restrict__ wp, const float* __restrict__ bias, float* __restrict__ out, ConvGeom g,
    int tiles_per_split, ConvEpi epi) {
    conv_mma_body<64, true, 64, 3>(nullptr, xh, wp, bias, out, g, tiles_per_split, epi);
}

// xh[n][p][c] (bf16 pairs along c) = x[n][c][p] for c < C, 0 for C ≤ c < cp (the padding the
// NHWC convs' K tiles read; the host pads cp to NHWC_CPAD). Grid (⌈HW/32⌉ · ⌈cp/64⌉, N), 256 threads: each block
// moves 64 channels × 32 pixels through shared memory so reads (along p) and writes (along c)
// are both coalesced. CPU twin: the layout change alone (the conv's twin is conv2d).
extern "C" __global__ void __launch_bounds__(256) conv_to_nhwc_bf16(const float* __restrict__ x,
                                                                   unsigned* __restrict__ xh, int C, int cp,
                                                                   long long HW) {
    __shared__ float tile[64][33];
    const int ptiles = (int)((HW + 31) / 32);
    const int c0 = (int)(blockIdx.x / ptiles) * 64;
    const long long p0 = (long long)(blockIdx.x % ptiles) * 32;
    const int n = blockIdx.y;
    const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
    for (int ci = ty; ci < 64; ci += 8) {
        const int c = c0 + ci;
        const long long p = p0 + tx;
        tile[ci][tx] = (c < C && p < HW) ? x[((long long)n * C + c) * HW + p] : 0.0f;
    }
    __syncthreads();
    for (int pi = ty; pi < 32; pi += 8) {
        const long long p = p0 + pi;
        const int c = c0 + 2 * tx;
        if (p < HW && c < cp) xh[(((long long)n * HW + p) * cp + c) / 2] = pack_bf16x2(tile[2 * tx][pi], tile[2 * tx + 1][pi]);
    }
}

// wp[m][tap][c] (bf16 pairs along c) = A[m, c·KHW + tap] for m < M, c < C, else 0, where
// A[m, k] = w[m·a_sm + k·a_sk] as in ConvGeom; mp, cp: M and C rounded up to the tiles.
extern "C" __global__ void conv_pack_bf16(const float* __restrict__ w, unsigned* __restrict__ wp, int M,
                                          int mp, int khw, int C, int cp, long long a_sm, long long a_sk) {
    const long long pairs = (long long)mp * khw * cp / 2;
    GRID_STRIDE(i, pairs) {
        const int c = (int)(i % (cp / 2)) * 2;
        const long long r = i / (cp / 2);
        const int tap = (int)(r % khw), m = (int)(r / khw);
        float v[2];
#pragma unroll
        for (int j = 0; j < 2; ++j)
            v[j] = (m < M && c + j < C) ? w[m * a_sm + ((long long)(c + j) * khw + tap) * a_sk] : 0.0f;
        wp[i] = pack_bf16x2(v[0], v[1]);
    }
}

// ---- weight gradient: bf16 tensor cores, asynchronous pipeline ------------------------------------
// conv_dw_bf16_mma (BN = 128 channels per block) / conv_dw_bf16_mma_n64 (BN = 64):
//   D[m, (tap, c)] = Σ_p dy[n, m, p] · x[n, c, oy·s − pad + ky, ox·s − pad + kx]
// over the output pixels p of this block's slice [z·k_chunk, (z+1)·k_chunk) (g.k_chunk counts
// pixels here, a multiple of 32). Block (x, y) covers output channels y·128 … and the channels
// c0 … c0 + BN − 1 of one filter tap (x = tap·ctiles + channel tile). The partial sums go to
// ws[z][m][c·KHW + tap] (OIHW order); conv_dw_reduce (conv_bwd.cu) adds the slices in order.
// Both operands stream as f32 through DW_STAGES cp.async stages, stored [row][pixel] so that a
// fragment register (two consecutive pixels) is one 64-bit load, rounded to bf16 there.
// CPU twin: conv2d_backward's dw (with bf16-rounded operands).
#define DW_STAGES 4
#define DW_BP 32  // pixels per pipeline step
#define DW_LDP 40 // floats per smem row: 32 + 8 (≡ 8 mod 32: conflict-free 64-bit fragment loads)

template <int BN>
struct DwMmaTile {
    static constexpr int BM = 128, WARPS_M = 2, WARPS_N = 4;
    static constexpr int WTM = BM / WARPS_M, WTN = BN / WARPS_N;  // 64×32 or 64×16
    static constexpr int MI = WTM / 16, NI = WTN / 8;
    static constexpr int A_FLOATS = BM * DW_LDP, B_FLOATS = BN * DW_LDP;
    static constexpr int STAGE = A_FLOATS + B_FLOATS;
    static constexpr int SMEM_BYTES = DW_STAGES * STAGE * 4;
};

// A warp's weight-gradient fragments (rows m_w…, columns c_w… of one filter tap) into the block's
// workspace slice ws[z][m][c·KHW + tap] (OIHW order), skipping m ≥ M and c ≥ C. Both dw kernels.
template <typename T>
__device__ __forceinline__ void dw_store_tile(const float (&acc)[T::MI][T::NI][4], float* __restrict__ ws, int M,
                                              int C, int KHW, int tap, int m_w, int c_w, int lane) {
    const int g8 = lane >> 2, q4 = lane & 3;
    const long long K = (long long)C * KHW;
    float* dst = ws + (long long)blockIdx.z * M * K;
#pragma unroll
    for (int mi = 0; mi < T::MI; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int m = m_w + mi * 16 + g8 + 8 * h;
            if (m >= M) continue;
#pragma unroll
            for (int ni = 0; ni < T::NI; ++ni)
#pragma unroll
                for (int j = 0; j < 2; ++j) {
                    const int c = c_w + ni * 8 + 2 * q4 + j;
                    if (c < C) dst[m * K + (long long)c * KHW + tap] = acc[mi][ni][2 * h + j];
                }
        }
}

template <int BN>
__device__ __forceinline__ void conv_dw_mma_body(const float* __restrict__ x, const float* __restrict__ dy,
                                                 float* __restrict__ ws, const ConvGeom& g) {
    typedef DwMmaTile<BN> T;
    extern __shared__ float S[];
    const int t = threadIdx.x, warp = t >> 5, lane = t & 31;
    const int wm = warp / T::WARPS_N, wn = warp % T::WARPS_N;
    const int M = g.O, C = g.C, KHW = g.KH * g.KW, HW = g.H * g.W, OHW = g.OH * g.OW;
    const int ctiles = (C + BN - 1) / BN;
    const int tap = blockIdx.x / ctiles, c0 = (blockIdx.x - tap * ctiles) * BN;
    const int ky = tap / g.KW, kx = tap - ky * g.KW;
    const int m0 = blockIdx.y * T::BM;
    const long long P = (long long)g.N * OHW;
    const long long pb = (long long)blockIdx.z * g.k_chunk, pe = min(P, pb + g.k_chunk);
    const int nsteps = pe > pb ? (int)((pe - pb + DW_BP - 1) / DW_BP) : 0;

    // Loader: pixel column t % 32 of each step; A rows (channels m) and B rows (channels c)
    // t / 32 + 8·i.
    const int pcol = t & 31, r0 = t >> 5;
    auto load_step = [&](int stage, int step) {
        float* As = S + stage * T::STAGE;
        float* Bs = As + T::A_FLOATS;
        long long p = pb + (long long)step * DW_BP + pcol;
        const bool pv = p < pe;
        if (!pv) p = 0;
        const int n = (int)(p / OHW), r = (int)(p - (long long)n * OHW);
        const int oy = r / g.OW, ox = r - oy * g.OW;
        const float* dyp = dy + (long long)n * M * OHW + r;
#pragma unroll
        for (int i = 0; i < T::BM / 8; ++i) {
            const int row = r0 + 8 * i, m = m0 + row;
            const bool ok = pv && m < M;
            cp_async4(As + row * DW_LDP + pcol, ok ? dyp + (long long)m * OHW : dy, ok);
        }
        const int iy = oy * g.stride - g.pad + ky, ix = ox * g.stride - g.pad + kx;
        const bool inside = pv && (unsigned)iy < (unsigned)g.H && (unsigned)ix < (unsigned)g.W;
        const float* xp = inside ? x + (long long)n * C * HW + iy * g.W + ix : x;
#pragma unroll
        for (int i = 0; i < BN / 8; ++i) {
            const int row = r0 + 8 * i, c = c0 + row;
            const bool ok = inside && c < C;
            cp_async4(Bs + row * DW_LDP + pcol, ok ? xp + (long long)c * HW : x, ok);
        }
    };

    float acc[T::MI][T::NI][4];
#pragma unroll
    for (int i = 0; i < T::MI; ++i)
#pragma unroll
        for (int j = 0; j < T::NI; ++j)
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.0f;

#pragma unroll
    for (int s = 0; s < DW_STAGES - 1; ++s) {
        if (s < nsteps) load_step(s, s);
        cp_async_commit();
    }
    const int g8 = lane >> 2, q4 = lane & 3;
    for (int step = 0; step < nsteps; ++step) {
        cp_async_wait<DW_STAGES - 2>();
        __syncthreads();
        const int next = step + DW_STAGES - 1;
        if (next < nsteps) load_step(next % DW_STAGES, next);
        cp_async_commit();
        const float* As = S + (step % DW_STAGES) * T::STAGE;
        const float* Bs = As + T::A_FLOATS;
#pragma unroll
        for (int kk = 0; kk < DW_BP; kk += 16) {
            unsigned af[T::MI][4], bfr[T::NI][2];
#pragma unroll
            for (int mi = 0; mi < T::MI; ++mi) {
                const float* a = As + (wm * T::WTM + mi * 16 + g8) * DW_LDP + kk + 2 * q4;
                const float2 v0 = *reinterpret_cast<const float2*>(a);
                const float2 v1 = *reinterpret_cast<const float2*>(a + 8 * DW_LDP);
                const float2 v2 = *reinterpret_cast<const float2*>(a + 8);
                const float2 v3 = *reinterpret_cast<const float2*>(a + 8 * DW_LDP + 8);
                af[mi][0] = pack_bf16x2(v0.x, v0.y);
                af[mi][1] = pack_bf16x2(v1.x, v1.y);
                af[mi][2] = pack_bf16x2(v2.x, v2.y);
                af[mi][3] = pack_bf16x2(v3.x, v3.y);
            }
#pragma unroll
            for (int ni = 0; ni < T::NI; ++ni) {
                const float* b = Bs + (wn * T::WTN + ni * 8 + g8) * DW_LDP + kk + 2 * q4;
                const float2 v0 = *reinterpret_cast<const float2*>(b);
                const float2 v1 = *reinterpret_cast<const float2*>(b + 8);
                bfr[ni][0] = pack_bf16x2(v0.x, v0.y);
                bfr[ni][1] = pack_bf16x2(v1.x, v1.y);
            }
#pragma unroll
            for (int mi = 0; mi < T::MI; ++mi)
#pragma unroll
                for (int ni = 0; ni < T::NI; ++ni) mma_bf16_16816(acc[mi][ni], af[mi], bfr[ni]);
        }
    }
    cp_async_wait<0>();
    dw_store_tile<T>(acc, ws, M, C, KHW, tap, m0 + wm * T::WTM, c0 + wn * T::WTN, lane);
}

// Dynamic shared memory: DwMmaTile<128>::SMEM_BYTES (163,840) / DwMmaTile<64>::SMEM_BYTES
// (122,880); one block per multiprocessor.
extern "C" __global__ void __launch_bounds__(256, 1) conv_dw_bf16_mma(const float* __restrict__ x,
    const float* __restrict__ dy, float* __restrict__ ws, ConvGeom g) {
    conv_dw_mma_body<128>(x, dy, ws, g);
}

extern "C" __global__ void __launch_bounds__(256, 1) conv_dw_bf16_mma_n64(const float* __restrict__ x,
    const float* __restrict__ dy, float* __restrict__ ws, ConvGeom g) {
    conv_dw_mma_body<64>(x, dy, ws, g);
}

// conv_dw_nhwc (BN = 128 channels per block) / conv_dw_nhwc_n64 (BN = 64): the same weight
// gradient, grid and workspace as conv_dw_bf16_mma, reading bf16 NHWC copies of both operands
// (conv_to_nhwc_bf16): xh [N][H][W][cpx] and dyh [N][OH][OW][cpo], channels zero-padded to
// multiples of NHWC_CPAD. A pipeline step is 32 pixels: the dy rows (128 output channels) and the x rows
// (BN input channels at this tap) of those pixels, each a run of 16-byte copies with one bounds
// check per pixel; both are stored [pixel][channel], so the fragments (pairs of consecutive
// pixels) come from ldmatrix.trans. Two blocks per multiprocessor. CPU twin: conv2d_backward's dw.
#define DWN_BP 32  // pixels per pipeline step

template <int BN>
struct DwNhwcTile {
    static constexpr int BM = 128, WARPS_M = 2, WARPS_N = 4;
    static constexpr int WTM = BM / WARPS_M, WTN = BN / WARPS_N;  // 64×32 or 64×16
    static constexpr int MI = WTM / 16, NI = WTN / 8;
    static constexpr int A_LD = BM + 8, B_LD = BN + 8;  // bf16 per pixel row (≡ 4 words mod 32)
    static constexpr int A_WORDS = DWN_BP * A_LD / 2, B_WORDS = DWN_BP * B_LD / 2;
    static constexpr int STAGE_WORDS = A_WORDS + B_WORDS;
    static constexpr int SMEM_BYTES = DW_STAGES * STAGE_WORDS * 4;
    static constexpr int A_CHUNKS = DWN_BP * BM / 8 / 256, B_CHUNKS = DWN_BP * BN / 8 / 256;  // per thread
    static_assert(NI % 2 == 0, "B fragments are loaded two n8 blocks at a time");
};

template <int BN>
__device__ __forceinline__ void conv_dw_nhwc_body(const unsigned* __restrict__ xh, const unsigned* __restrict__ dyh,
                                                  float* __restrict__ ws, const ConvGeom& g) {
    typedef DwNhwcTile<BN> T;
    extern __shared__ float S[];
    unsigned* const smem = reinterpret_cast<unsigned*>(S);
    const int t = threadIdx.x, warp = t >> 5, lane = t & 31;
    const int wm = warp / T::WARPS_N, wn = warp % T::WARPS_N;
    const int M = g.O, C = g.C, KHW = g.KH * g.KW, OHW = g.OH * g.OW;
    const int cpx = (C + NHWC_CPAD - 1) / NHWC_CPAD * NHWC_CPAD, cpo = (M + NHWC_CPAD - 1) / NHWC_CPAD * NHWC_CPAD;
    const int ctiles = (C + BN - 1) / BN;
    const int tap = blockIdx.x / ctiles, c0 = (blockIdx.x - tap * ctiles) * BN;
    const int ky = tap / g.KW, kx = tap - ky * g.KW;
    const int m0 = blockIdx.y * T::BM;
    const long long P = (long long)g.N * OHW;
    const long long pb = (long long)blockIdx.z * g.k_chunk, pe = min(P, pb + g.k_chunk);
    const int nsteps = pe > pb ? (int)((pe - pb + DWN_BP - 1) / DWN_BP) : 0;

    // Each B chunk's pixel as (sample, oy, ox), advanced by DWN_BP pixels per step with carries
    // instead of divided out every step (load_step sees steps 0, 1, 2, … in order).
    int bn_[T::B_CHUNKS], boy[T::B_CHUNKS], box[T::B_CHUNKS];
#pragma unroll
    for (int i = 0; i < T::B_CHUNKS; ++i) {
        const long long p = min(pb + (t + i * 256) / (BN / 8), P - 1);
        bn_[i] = (int)(p / OHW);
        const int r = (int)(p - (long long)bn_[i] * OHW);
        boy[i] = r / g.OW;
        box[i] = r - boy[i] * g.OW;
    }
    auto load_step = [&](int stage, int step) {
        unsigned* As = smem + stage * T::STAGE_WORDS;
        unsigned* Bs = As + T::A_WORDS;
        const long long p_step = pb + (long long)step * DWN_BP;
        // A: dy of 32 pixels × 128 output channels, 16 chunks of 8 channels per pixel.
#pragma unroll
        for (int i = 0; i < T::A_CHUNKS; ++i) {
            const int chunk = t + i * 256, row = chunk >> 4, m8 = (chunk & 15) * 8;
            const long long p = p_step + row;
            const bool ok = p < pe && m0 + m8 < cpo;
            const unsigned* src = ok ? dyh + (p * cpo + m0 + m8) / 2 : dyh;
            cp_async16_zfill(As + row * (T::A_LD / 2) + m8 / 2, src, ok);
        }
        // B: x at this tap for the same pixels, BN / 8 chunks per pixel.
#pragma unroll
        for (int i = 0; i < T::B_CHUNKS; ++i) {
            const int chunk = t + i * 256, row = chunk / (BN / 8), c8 = (chunk % (BN / 8)) * 8;
            const long long p = p_step + row;
            bool ok = p < pe && c0 + c8 < cpx;
            const unsigned* src = xh;
            if (ok) {
                const int iy = boy[i] * g.stride - g.pad + ky, ix = box[i] * g.stride - g.pad + kx;
                ok = (unsigned)iy < (unsigned)g.H && (unsigned)ix < (unsigned)g.W;
                src = xh + ((((long long)bn_[i] * g.H + iy) * g.W + ix) * cpx + c0 + c8) / 2;
            }
            cp_async16_zfill(Bs + row * (T::B_LD / 2) + c8 / 2, ok ? src : xh, ok);
            // Advance to the same row of the next step.
            box[i] += DWN_BP;
            while (box[i] >= g.OW) {
                box[i] -= g.OW;
                if (++boy[i] == g.OH) {
                    boy[i] = 0;
                    ++bn_[i];
                }
            }
        }
    };

    float acc[T::MI][T::NI][4];
#pragma unroll
    for (int i = 0; i < T::MI; ++i)
#pragma unroll
        for (int j = 0; j < T::NI; ++j)
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.0f;

#pragma unroll
    for (int s = 0; s < DW_STAGES - 1; ++s) {
        if (s < nsteps) load_step(s, s);
        cp_async_commit();
    }
    for (int step = 0; step < nsteps; ++step) {
        cp_async_wait<DW_STAGES - 2>();
        __syncthreads();
        const int next = step + DW_STAGES - 1;
        if (next < nsteps) load_step(next % DW_STAGES, next);
        cp_async_commit();
        const unsigned* As = smem + (step % DW_STAGES) * T::STAGE_WORDS;
        const unsigned* Bs = As + T::A_WORDS;
#pragma unroll
        for (int kk = 0; kk < DWN_BP; kk += 16) {
            unsigned af[T::MI][4], bfr[T::NI][2];
            // Rows of the stored matrices are pixels (k): lane l addresses pixel
            // kk + l % 8 (+ 8 for the second k half) at channel offset (+ 8 for the second m8 / n8).
#pragma unroll
            for (int mi = 0; mi < T::MI; ++mi) {
                const int k = kk + (lane & 7) + ((lane >> 4) & 1) * 8;
                const int m = wm * T::WTM + mi * 16 + ((lane >> 3) & 1) * 8;
                ldmatrix_x4_trans(af[mi], As + k * (T::A_LD / 2) + m / 2);
            }
#pragma unroll
            for (int ni = 0; ni < T::NI; ni += 2) {
                const int k = kk + (lane & 7) + ((lane >> 3) & 1) * 8;
                const int n = wn * T::WTN + (ni + (lane >> 4)) * 8;
                unsigned r[4];
                ldmatrix_x4_trans(r, Bs + k * (T::B_LD / 2) + n / 2);
                bfr[ni][0] = r[0];
                bfr[ni][1] = r[1];
                bfr[ni + 1][0] = r[2];
                bfr[ni + 1][1] = r[3];
            }
#pragma unroll
            for (int mi = 0; mi < T::MI; ++mi)
#pragma unroll
                for (int ni = 0; ni < T::NI; ++ni) mma_bf16_16816(acc[mi][ni], af[mi], bfr[ni]);
        }
    }
    cp_async_wait<0>();
    dw_store_tile<T>(acc, ws, M, C, KHW, tap, m0 + wm * T::WTM, c0 + wn * T::WTN, lane);
}

// Dynamic shared memory: DwNhwcTile<128>::SMEM_BYTES (69,632) / DwNhwcTile<64> (53,248).
extern "C" __global__ void __launch_bounds__(256, 2) conv_dw_nhwc(const unsigned* __restrict__ xh,
    const unsigned* __restrict__ dyh, float* __restrict__ ws, ConvGeom g) {
    conv_dw_nhwc_body<128>(xh, dyh, ws, g);
}

extern "C" __global__ void __launch_bounds__(256, 2) conv_dw_nhwc_n64(const unsigned* __restrict__ xh,
    const unsigned* __restrict__ dyh, float* __restrict__ ws, ConvGeom g) {
    conv_dw_nhwc_body<64>(xh, dyh, ws, g);
}

// ---- dense layers --------------------------------------------------------------------------------
// linear_warp: y[n, o] = Σ_i x[n, i]·w[o, i] + b[o] (PyTorch Linear), one warp per output: the
// lanes stride over i (coalesced rows of x and w), then a shuffle tree. These layers are tiny
// (the time-embedding MLP and each res-block's projection of it) — a GEMM tile would be almost
// all padding, and at batch 1 their latency adds up. Exact f32. CPU twin: linear.
extern "C" __global__ void __launch_bounds__(256) linear_warp(const float* __restrict__ x,
                                                              const float* __restrict__ w,
                                                              const float* __restrict__ b,
                                                              float* __restrict__ y, int N, int I, int O) {
    const long long warps = (long long)N * O;
    const int lane = threadIdx.x & 31;
    for (long long wi = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5; wi < warps;
         wi += ((long long)gridDim.x * blockDim.x) >> 5) {
        const int n = (int)(wi / O), o = (int)(wi - (long long)n * O);
        const float* xr = x + (long long)n * I;
        const float* wr = w + (long long)o * I;
        float s = 0.0f;
        for (int i = lane; i < I; i += 32) s = fmaf(xr[i], wr[i], s);
        s = warp_sum(s);
        if (lane == 0) y[wi] = s + (b ? b[o] : 0.0f);
    }
}

// conv_to_nhwc_bf16_wide: the same xh as conv_to_nhwc_bf16 (bit for bit), shaped for bandwidth.
// Each block moves 64 channels × 128 pixels: float4 loads along p (a warp reads 4 channels × 32
// pixels: four 128-byte runs), a pixel-major shared tile padded to 65 floats per pixel (the
// transposing scalar writes and the 8-channel reads both hit 32 distinct banks), and 16-byte
// stores of 8 bf16 channels (a warp writes 8 pixels × 32 channels, whole 32-byte sectors).
// Launch: grid (⌈HW/128⌉ · cp/64, N), 256 threads, no dynamic shared memory. Requires HW % 4 == 0,
// cp % 64 == 0, C ≤ cp, x and xh 16-byte aligned; a partial last pixel tile is handled.
// With csum non-null the block also writes its tile's channel sums (f32, pixels in order within
// each quarter, then the quarters in order) to csum[(n·⌈HW/128⌉ + pixel tile)·cp + c]: the
// backward passes dy through here and takes the bias gradient from these sums (conv_db_partial
// over ⌈HW/128⌉·N rows of cp) instead of reading dy once more.
extern "C" __global__ void __launch_bounds__(256) conv_to_nhwc_bf16_wide(const float* __restrict__ x,
                                                                        unsigned* __restrict__ xh, int C,
                                                                        int cp, long long HW,
                                                                        float* __restrict__ csum) {
    __shared__ float tile[128][65];  // [pixel][channel]
    __shared__ float quarter[4][64];
    const long long ptiles = (HW + 127) / 128;
    const int c0 = (int)(blockIdx.x / ptiles) * 64;
    const long long p0 = (long long)(blockIdx.x % ptiles) * 128;
    const int n = blockIdx.y;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    // Load: 16 channel quads × 4 pixel octets of float4s, one (quad, octet) per warp and pass.
#pragma unroll
    for (int pass = 0; pass < 8; ++pass) {
        const int wt = pass * 8 + warp;
        const int ci = (wt >> 2) * 4 + (lane >> 3), pi = ((wt & 3) * 8 + (lane & 7)) * 4;
        const int c = c0 + ci;
        const long long p = p0 + pi;
        float4 v = {0.0f, 0.0f, 0.0f, 0.0f};
        if (c < C && p < HW) v = *reinterpret_cast<const float4*>(x + ((long long)n * C + c) * HW + p);
        tile[pi][ci] = v.x;
        tile[pi + 1][ci] = v.y;
        tile[pi + 2][ci] = v.z;
        tile[pi + 3][ci] = v.w;
    }
    __syncthreads();
    // Store: 16 pixel octets × 2 halves (4 chunks of 8 channels), one (octet, half) per warp and
    // pass, one 16-byte chunk per thread.
#pragma unroll
    for (int pass = 0; pass < 4; ++pass) {
        const int wt = pass * 8 + warp;
        const int pi = (wt >> 1) * 8 + (lane & 7), k = (wt & 1) * 4 + (lane >> 3);
        const long long p = p0 + pi;
        if (p < HW) {
            const float* t = &tile[pi][8 * k];
            uint4 o;
            o.x = pack_bf16x2(t[0], t[1]);
            o.y = pack_bf16x2(t[2], t[3]);
            o.z = pack_bf16x2(t[4], t[5]);
            o.w = pack_bf16x2(t[6], t[7]);
            reinterpret_cast<uint4*>(xh)[(((long long)n * HW + p) * cp + c0 + 8 * k) / 8] = o;
        }
    }
    if (csum) {
        // Thread (q, ci) adds pixels 32q … 32q+31 of channel ci (a warp reads one pixel row:
        // 32 distinct banks); the padded tile holds zeros past HW and C.
        const int ci = threadIdx.x & 63, q = threadIdx.x >> 6;
        float s = 0.0f;
        for (int pi = 32 * q; pi < 32 * q + 32; ++pi) s += tile[pi][ci];
        quarter[q][ci] = s;
        __syncthreads();
        if (threadIdx.x < 64)
            csum[((long long)n * ptiles + blockIdx.x % ptiles) * cp + c0 + ci] =
                ((quarter[0][ci] + quarter[1][ci]) + quarter[2][ci]) + quarter[3][ci];
    }
}

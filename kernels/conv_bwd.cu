// Backward of conv2d / nin / linear (CPU twins: conv2d_backward, nin_backward, linear_backward).
//
// dx is a forward convolution of dy (launched through Backend::conv2d, so it uses the forward
// GEMM kernels): with flipped, transposed weights w'[c, o, KH−1−ky, KW−1−kx] = w[o, c, ky, kx]
// (conv_bwd_flip_weights) and, for stride > 1 or pad > K−1, dy dilated by the stride and padded
// by K−1−pad into a [N, O, H+KH−1, W+KW−1] buffer (conv_bwd_dilate_pad), convolved with pad 0.
//
// dw is an implicit GEMM that reduces over the output pixels:
//   D[m, k] = Σ_p A[m, p] · B[p, k],   m: output channel (M = O), k = (c, ky, kx) (K = C·KH·KW),
//   p: output pixel over the batch (P = N·OH·OW), A[m, p] = dy[n, m, oy, ox],
//   B[p, k] = x[n, c, oy·s − pad + ky, ox·s − pad + kx] (0 outside the image),
//   dw[m·o_sm + k·o_sk] = D[m, k]   (OIHW conv weights: o_sm = K, o_sk = 1; NIN (in, out): 1, O).
// P is huge (batch × pixels) and M×K small, so P is split over blockIdx.z: block z sums
// p in [z·p_chunk, (z+1)·p_chunk) and writes its partial D to a workspace slice; conv_dw_reduce
// then adds the slices in a fixed order (deterministic, no atomics).
//   conv_dw_f32            SIMT f32, 128×128 tile, 8 pixels per step (the exact path);
//   conv_dw_tf32/_bf16     WMMA TF32 (m16n16k8) / bf16 (m16n16k16), f32 accumulate, 128×128
//                          tile, 16 / 32 pixels per step.
// All use 256 threads and two shared-memory stages (the next tile is fetched into registers
// while the current one is multiplied). db = Σ over n and pixels of dy: conv_db_partial +
// conv_db_finish, in double, fixed order.
#include "common.cuh"

struct DwGeom {
    int N, C, H, W;  // input x
    int O, OH, OW;   // dy
    int KH, KW, stride, pad;
    int p_chunk;            // pixels per blockIdx.z; a multiple of every kernel's pixel step (32)
    long long o_sm, o_sk;   // output strides of D[m, k]
};

#define DW_THREADS 256
#define DW_BM 128  // output channels per block
#define DW_BN 128  // k = (c, ky, kx) per block

// The block's k columns, decomposed once: koff = c·H·W + ky·W + kx, and ky, kx (ky = −1 << 20
// past K so that every bounds test fails).
struct DwCols {
    int koff[DW_BN], ky[DW_BN], kx[DW_BN];
};

__device__ __forceinline__ void dw_cols_init(DwCols& cols, const DwGeom& g, int k0) {
    const int K = g.C * g.KH * g.KW, khw = g.KH * g.KW;
    for (int j = threadIdx.x; j < DW_BN; j += blockDim.x) {
        const int k = k0 + j;
        if (k < K) {
            const int c = k / khw, r = k - c * khw, ky = r / g.KW, kx = r - ky * g.KW;
            cols.koff[j] = c * g.H * g.W + ky * g.W + kx;
            cols.ky[j] = ky;
            cols.kx[j] = kx;
        } else {
            cols.koff[j] = 0;
            cols.ky[j] = -(1 << 20);
            cols.kx[j] = 0;
        }
    }
}

// One output pixel p as the loaders see it: dy row base and the receptive field's origin.
struct DwPix {
    long long dy_off;  // offset of dy[n, 0, oy, ox]
    long long x_off;   // offset of x[n, 0, iy0, ix0] (may point outside the sample; only
                       // in-bounds taps are read)
    int iy0, ix0;
    bool ok;
};

__device__ __forceinline__ DwPix dw_pix(const DwGeom& g, long long p, long long pend) {
    DwPix r;
    r.ok = p < pend;
    if (!r.ok) p = 0;
    const long long ohw = (long long)g.OH * g.OW;
    const long long n = p / ohw;
    const int rem = (int)(p - n * ohw);
    const int oy = rem / g.OW, ox = rem - oy * g.OW;
    r.iy0 = oy * g.stride - g.pad;
    r.ix0 = ox * g.stride - g.pad;
    r.dy_off = n * g.O * ohw + rem;
    r.x_off = n * g.C * (long long)g.H * g.W + (long long)r.iy0 * g.W + r.ix0;
    return r;
}

// B[p, k] for the block's column j.
__device__ __forceinline__ float dw_load_x(const float* __restrict__ x, const DwGeom& g, const DwCols& cols,
                                           const DwPix& px, int j) {
    const int iy = px.iy0 + cols.ky[j], ix = px.ix0 + cols.kx[j];
    const bool in = px.ok && (unsigned)iy < (unsigned)g.H && (unsigned)ix < (unsigned)g.W;
    return in ? __ldg(x + px.x_off + cols.koff[j]) : 0.0f;
}

// A[m, p].
__device__ __forceinline__ float dw_load_dy(const float* __restrict__ dy, const DwGeom& g, const DwPix& px, int m) {
    const long long ohw = (long long)g.OH * g.OW;
    return (px.ok && m < g.O) ? __ldg(dy + px.dy_off + m * ohw) : 0.0f;
}

// ---- workspace reduction -------------------------------------------------------------------------

// out[m·o_sm + k·o_sk] = Σ_z ws[z·M·K + m·K + k], z in order.
extern "C" __global__ void conv_dw_reduce(const float* __restrict__ ws, float* __restrict__ out, int M, int K,
                                          int splits, long long o_sm, long long o_sk) {
    const long long mk = (long long)M * K;
    GRID_STRIDE(i, mk) {
        float s = 0.0f;
        for (int z = 0; z < splits; ++z) s += ws[(long long)z * mk + i];
        const long long m = i / K, k = i - m * K;
        out[m * o_sm + k * o_sk] = s;
    }
}

// ---- SIMT f32 ------------------------------------------------------------------------------------
// Thread (tx, ty) = (t % 16, t / 16) owns rows {ty·4 + i, 64 + ty·4 + i} and columns
// {tx·4 + j, 64 + tx·4 + j}; the loaders give thread t pixel t % 8 of the step and rows / columns
// t / 8 + 32·i, so a warp reads 8 consecutive pixels of 4 rows.

#define DWF_BK 8
#define DWF_LD (DW_BM + 4)

extern "C" __global__ void __launch_bounds__(DW_THREADS) conv_dw_f32(const float* __restrict__ x,
                                                                     const float* __restrict__ dy,
                                                                     float* __restrict__ out, DwGeom g) {
    __shared__ __align__(16) float As[2][DWF_BK][DWF_LD];  // [p][m]
    __shared__ __align__(16) float Bs[2][DWF_BK][DWF_LD];  // [p][k]
    __shared__ DwCols cols;
    constexpr int E = DWF_BK * DW_BM / DW_THREADS, ROWS = DW_THREADS / DWF_BK;
    const int M = g.O, K = g.C * g.KH * g.KW;
    const long long P = (long long)g.N * g.OH * g.OW;
    const int t = threadIdx.x;
    const int k0 = blockIdx.x * DW_BN, m0 = blockIdx.y * DW_BM;
    const long long pb = (long long)blockIdx.z * g.p_chunk;
    const long long pe = min(P, pb + g.p_chunk);
    const int ntiles = pe > pb ? (int)((pe - pb + DWF_BK - 1) / DWF_BK) : 0;
    dw_cols_init(cols, g, k0);
    __syncthreads();

    const int lp = t % DWF_BK, lr = t / DWF_BK;
    float ra[E], rb[E];
    auto fetch = [&](long long p0) {
        const DwPix px = dw_pix(g, p0 + lp, pe);
#pragma unroll
        for (int i = 0; i < E; ++i) {
            ra[i] = dw_load_dy(dy, g, px, m0 + lr + i * ROWS);
            rb[i] = dw_load_x(x, g, cols, px, lr + i * ROWS);
        }
    };
    auto stash = [&](int s) {
#pragma unroll
        for (int i = 0; i < E; ++i) {
            As[s][lp][lr + i * ROWS] = ra[i];
            Bs[s][lp][lr + i * ROWS] = rb[i];
        }
    };

    const int tx = t % 16, ty = t / 16;
    float acc[8][8] = {};
    if (ntiles > 0) {
        fetch(pb);
        stash(0);
    }
    __syncthreads();
    for (int tile = 0; tile < ntiles; ++tile) {
        const int s = tile & 1;
        const bool more = tile + 1 < ntiles;
        if (more) fetch(pb + (long long)(tile + 1) * DWF_BK);
#pragma unroll
        for (int kk = 0; kk < DWF_BK; ++kk) {
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

    float* dst = out + (long long)blockIdx.z * ((long long)M * K);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const int m = m0 + (i < 4 ? ty * 4 + i : 64 + ty * 4 + i - 4);
        if (m >= M) continue;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const int k = k0 + (j < 4 ? tx * 4 + j : 64 + tx * 4 + j - 4);
            if (k < K) dst[m * g.o_sm + k * g.o_sk] = acc[i][j];
        }
    }
}

#ifndef SRSDE_NO_WMMA
#include <mma.h>
#include <cuda_bf16.h>

// ---- tensor cores (WMMA) -------------------------------------------------------------------------
// 8 warps in a 2×4 grid of 64×32 pieces (4×2 fragments). A (dy) is staged [m][p], B (im2col x)
// [p][k], both row-major; operands are rounded to TF32 or converted to bf16 when staged.

template <typename E>
struct DwTc;

template <>
struct DwTc<float> {
    static constexpr int BK = 16, KSTEP = 8, PAD = 4;
    typedef nvcuda::wmma::precision::tf32 FragT;
    static __device__ __forceinline__ float conv(float v) { return nvcuda::wmma::__float_to_tf32(v); }
};

template <>
struct DwTc<__nv_bfloat16> {
    static constexpr int BK = 32, KSTEP = 16, PAD = 8;
    typedef __nv_bfloat16 FragT;
    static __device__ __forceinline__ __nv_bfloat16 conv(float v) { return __float2bfloat16_rn(v); }
};

#define DW_EPI_LD 20  // per-warp 16×16 epilogue staging row stride (floats)

template <typename E>
__device__ __forceinline__ void conv_dw_tc(const float* __restrict__ x, const float* __restrict__ dy,
                                           float* __restrict__ out, const DwGeom& g) {
    namespace wmma = nvcuda::wmma;
    typedef DwTc<E> Tr;
    constexpr int BM = DW_BM, BN = DW_BN, BK = Tr::BK, KSTEP = Tr::KSTEP;
    constexpr int WARPS_N = 4, WTM = BM / 2, WTN = BN / WARPS_N, FM = WTM / 16, FN = WTN / 16;
    constexpr int A_LD = BK + Tr::PAD, B_LD = BN + Tr::PAD;
    constexpr int STAGE = BM * A_LD + BK * B_LD;  // A[BM][A_LD], then B[BK][B_LD]
    constexpr int TILE_BYTES = 2 * STAGE * (int)sizeof(E);
    constexpr int EPI_BYTES = 8 * 16 * DW_EPI_LD * (int)sizeof(float);
    constexpr int SMEM = TILE_BYTES > EPI_BYTES ? TILE_BYTES : EPI_BYTES;
    constexpr int E_PER = BM * BK / DW_THREADS, ROWS = DW_THREADS / BK;
    static_assert(BM == BN, "one loader mapping for A and B");
    static_assert((STAGE * sizeof(E)) % 32 == 0 && (BM * A_LD * sizeof(E)) % 32 == 0, "WMMA alignment");
    __shared__ __align__(128) unsigned char smem[SMEM];
    __shared__ DwCols cols;
    E* const tiles = reinterpret_cast<E*>(smem);

    const int M = g.O, K = g.C * g.KH * g.KW;
    const long long P = (long long)g.N * g.OH * g.OW;
    const int t = threadIdx.x, warp = t / 32, lane = t % 32;
    const int wm = warp / WARPS_N, wn = warp % WARPS_N;
    const int k0 = blockIdx.x * BN, m0 = blockIdx.y * BM;
    const long long pb = (long long)blockIdx.z * g.p_chunk;
    const long long pe = min(P, pb + g.p_chunk);
    const int ntiles = pe > pb ? (int)((pe - pb + BK - 1) / BK) : 0;
    dw_cols_init(cols, g, k0);
    __syncthreads();

    // Thread t loads pixel t % BK of the step for rows / columns t / BK + ROWS·i.
    const int lp = t % BK, lr = t / BK;
    float ra[E_PER], rb[E_PER];
    auto fetch = [&](long long p0) {
        const DwPix px = dw_pix(g, p0 + lp, pe);
#pragma unroll
        for (int i = 0; i < E_PER; ++i) {
            ra[i] = dw_load_dy(dy, g, px, m0 + lr + i * ROWS);
            rb[i] = dw_load_x(x, g, cols, px, lr + i * ROWS);
        }
    };
    auto stash = [&](int s) {
        E* As = tiles + s * STAGE;
        E* Bs = As + BM * A_LD;
#pragma unroll
        for (int i = 0; i < E_PER; ++i) {
            As[(lr + i * ROWS) * A_LD + lp] = Tr::conv(ra[i]);
            Bs[lp * B_LD + lr + i * ROWS] = Tr::conv(rb[i]);
        }
    };

    wmma::fragment<wmma::accumulator, 16, 16, KSTEP, float> acc[FM][FN];
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

    if (ntiles > 0) {
        fetch(pb);
        stash(0);
    }
    __syncthreads();
    for (int tile = 0; tile < ntiles; ++tile) {
        const int s = tile & 1;
        const bool more = tile + 1 < ntiles;
        if (more) fetch(pb + (long long)(tile + 1) * BK);
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
        if (more) stash(s ^ 1);
        __syncthreads();
    }

    // Epilogue through a per-warp 16×16 staging area (the tile memory, free after the last
    // barrier); lane owns column lane % 16 and rows lane / 16 + 2·r.
    float* stg = reinterpret_cast<float*>(smem) + warp * 16 * DW_EPI_LD;
    float* dst = out + (long long)blockIdx.z * ((long long)M * K);
    const int col = lane % 16, half = lane / 16;
#pragma unroll
    for (int i = 0; i < FM; ++i) {
#pragma unroll
        for (int j = 0; j < FN; ++j) {
            wmma::store_matrix_sync(stg, acc[i][j], DW_EPI_LD, wmma::mem_row_major);
            __syncwarp();
            const int k = k0 + wn * WTN + j * 16 + col;
            if (k < K) {
#pragma unroll
                for (int r = 0; r < 8; ++r) {
                    const int row = 2 * r + half;
                    const int m = m0 + wm * WTM + i * 16 + row;
                    if (m < M) dst[m * g.o_sm + k * g.o_sk] = stg[row * DW_EPI_LD + col];
                }
            }
            __syncwarp();
        }
    }
}

extern "C" __global__ void __launch_bounds__(DW_THREADS) conv_dw_tf32(const float* __restrict__ x,
    const float* __restrict__ dy, float* __restrict__ out, DwGeom g) {
    conv_dw_tc<float>(x, dy, out, g);
}

extern "C" __global__ void __launch_bounds__(DW_THREADS) conv_dw_bf16(const float* __restrict__ x,
    const float* __restrict__ dy, float* __restrict__ out, DwGeom g) {
    conv_dw_tc<__nv_bfloat16>(x, dy, out, g);
}
#endif  // SRSDE_NO_WMMA

// ---- bias gradient -------------------------------------------------------------------------------

// partial[o·parts + b] = Σ over block b's share of the N·hw values dy[n, o, :] (in double);
// grid (parts, O). Block b strides over the positions of each sample's plane in turn (no
// division per element), four at a time with float4 loads when hw % 4 == 0, into two
// independent accumulators (the loads of a plane stay in flight together); planes of fewer than
// 4·blockDim positions are walked as one flat range over (n, position) instead.
extern "C" __global__ void conv_db_partial(const float* __restrict__ dy, double* __restrict__ partial, int N,
                                           int O, long long hw) {
    __shared__ double scratch[32];
    const int o = blockIdx.y;
    const long long start = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    double acc0 = 0.0, acc1 = 0.0;
    if (hw < 4LL * blockDim.x) {
        // Small planes (e.g. dense layers, hw = 1): the threads span samples and positions together.
        const long long total = (long long)N * hw;
        for (long long j = start; j < total; j += stride) {
            const long long n = j / hw, r = j - n * hw;
            acc0 += (double)__ldg(dy + (n * O + o) * hw + r);
        }
    } else if ((hw & 3) == 0) {
        const long long hw4 = hw >> 2;
        for (int n = 0; n < N; ++n) {
            const float4* plane = reinterpret_cast<const float4*>(dy + ((long long)n * O + o) * hw);
            for (long long r = start; r < hw4; r += stride) {
                const float4 v = __ldg(plane + r);
                acc0 += (double)v.x + (double)v.y;
                acc1 += (double)v.z + (double)v.w;
            }
        }
    } else {
        for (int n = 0; n < N; ++n) {
            const float* plane = dy + ((long long)n * O + o) * hw;
            for (long long r = start; r < hw; r += stride) acc0 += (double)__ldg(plane + r);
        }
    }
    const double acc = block_sum_d(acc0 + acc1, scratch);
    if (threadIdx.x == 0) partial[(long long)o * gridDim.x + blockIdx.x] = acc;
}

// db[o] = Σ_b partial[o·parts + b], b in order.
extern "C" __global__ void conv_db_finish(const double* __restrict__ partial, float* __restrict__ db, int O,
                                          int parts) {
    GRID_STRIDE(o, O) {
        double s = 0.0;
        for (int b = 0; b < parts; ++b) s += partial[o * parts + b];
        db[o] = (float)s;
    }
}

// ---- dx helpers ----------------------------------------------------------------------------------

// wt[c, o, KH−1−ky, KW−1−kx] = w[o, c, ky, kx] (the weights of the transposed convolution).
extern "C" __global__ void conv_bwd_flip_weights(const float* __restrict__ w, float* __restrict__ wt, int O,
                                                 int C, int KH, int KW) {
    const long long total = (long long)O * C * KH * KW;
    GRID_STRIDE(i, total) {
        const int kx = (int)(i % KW);
        long long r = i / KW;
        const int ky = (int)(r % KH);
        r /= KH;
        const int c = (int)(r % C);
        const int o = (int)(r / C);
        wt[(((long long)c * O + o) * KH + (KH - 1 - ky)) * KW + (KW - 1 - kx)] = w[i];
    }
}

// out[r, y, x] (r over N·O rows of DH×DW) = dy[r, (y − off_y)/s, (x − off_x)/s] where both
// differences are non-negative multiples of s and the quotients lie inside OH×OW; else 0.
extern "C" __global__ void conv_bwd_dilate_pad(const float* __restrict__ dy, float* __restrict__ out,
                                               long long total, int OH, int OW, int DH, int DW, int s,
                                               int off_y, int off_x) {
    GRID_STRIDE(i, total) {
        const int xx = (int)(i % DW);
        const long long r2 = i / DW;
        const int yy = (int)(r2 % DH);
        const long long row = r2 / DH;
        const int uy = yy - off_y, ux = xx - off_x;
        float v = 0.0f;
        if (uy >= 0 && ux >= 0 && uy % s == 0 && ux % s == 0) {
            const int oy = uy / s, ox = ux / s;
            if (oy < OH && ox < OW) v = dy[(row * OH + oy) * OW + ox];
        }
        out[i] = v;
    }
}

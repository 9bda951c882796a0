// Convolution and dense layers as one implicit GEMM:  C[m, p] = Σ_k A[m, k] · B[k, p] + bias[m]
//   m: output channel (M = O), p: output pixel over the batch (P = N·OH·OW),
//   k: (input channel, ky, kx) (K = C·KH·KW),
//   A[m, k] = w[m·a_sm + k·a_sk]            (OIHW conv weights: a_sm = K, a_sk = 1;
//                                             NIN weights stored (in, out): a_sm = 1, a_sk = O),
//   B[k, p] = x[n, c, oy·s − pad + ky, ox·s − pad + kx] (0 outside the image),
//   out[n, m, oy, ox] = C[m, p].
// Linear layers are the 1×1 case with H = W = 1. CPU twins: conv2d, nin, linear.
//
// Three kernels with the same arguments:
//   conv_f32   SIMT f32, 64×64×16 tiles, 4×4 outputs per thread (the exact reference path);
//   conv_tf32  WMMA m16n16k8 TF32 tensor cores, f32 accumulate, 64×64×32 tiles, 4 warps;
//   conv_bf16  WMMA m16n16k16 bf16 tensor cores, f32 accumulate, same tiling.
#include "common.cuh"

struct ConvGeom {
    int N, C, H, W;      // input
    int O, OH, OW;       // output
    int KH, KW, stride, pad;
    long long a_sm, a_sk;  // weight strides of A[m, k]
};

// Decomposes an output pixel index p into the input-space origin of its receptive field.
struct PixelOrigin {
    bool valid;
    int n, iy0, ix0;
    long long out_off;  // offset of out[n, 0, oy, ox]
};

__device__ __forceinline__ PixelOrigin pixel_origin(const ConvGeom& g, long long p, long long P) {
    PixelOrigin o;
    o.valid = p < P;
    if (!o.valid) p = 0;
    const int ohw = g.OH * g.OW;
    o.n = (int)(p / ohw);
    int r = (int)(p - (long long)o.n * ohw);
    int oy = r / g.OW, ox = r - oy * g.OW;
    o.iy0 = oy * g.stride - g.pad;
    o.ix0 = ox * g.stride - g.pad;
    o.out_off = (long long)o.n * g.O * ohw + r;
    return o;
}

// B[k, p] for a pixel with origin `o`.
__device__ __forceinline__ float load_b(const float* __restrict__ x, const ConvGeom& g,
                                        const PixelOrigin& o, int k, int K) {
    if (!o.valid || k >= K) return 0.0f;
    const int khw = g.KH * g.KW;
    int c = k / khw;
    int r = k - c * khw;
    int ky = r / g.KW, kx = r - ky * g.KW;
    int iy = o.iy0 + ky, ix = o.ix0 + kx;
    if (iy < 0 || iy >= g.H || ix < 0 || ix >= g.W) return 0.0f;
    return __ldg(&x[(((long long)o.n * g.C + c) * g.H + iy) * g.W + ix]);
}

__device__ __forceinline__ float load_a(const float* __restrict__ w, const ConvGeom& g, int m, int k,
                                        int M, int K) {
    if (m >= M || k >= K) return 0.0f;
    return __ldg(&w[(long long)m * g.a_sm + (long long)k * g.a_sk]);
}

// ---- SIMT f32 ----------------------------------------------------------------------------------

#define F_BM 64
#define F_BN 64
#define F_BK 16

extern "C" __global__ void __launch_bounds__(256) conv_f32(const float* __restrict__ x,
                                                           const float* __restrict__ w,
                                                           const float* __restrict__ bias,
                                                           float* __restrict__ out, ConvGeom g) {
    __shared__ __align__(16) float As[F_BK][F_BM];
    __shared__ __align__(16) float Bs[F_BK][F_BN];
    const int M = g.O, K = g.C * g.KH * g.KW;
    const long long P = (long long)g.N * g.OH * g.OW;
    const int t = threadIdx.x;
    const int m0 = blockIdx.y * F_BM;
    const long long p0 = (long long)blockIdx.x * F_BN;

    // Loader roles: A by (row a_m + 16·i, column a_k); B by (row b_k + 4·i, pixel b_p).
    const int a_k = t % F_BK, a_m = t / F_BK;
    const int b_p = t % F_BN, b_k = t / F_BN;
    const PixelOrigin org = pixel_origin(g, p0 + b_p, P);

    // Compute roles: 4 output channels × 4 pixels per thread.
    const int tx = t % 16, ty = t / 16;
    float acc[4][4] = {};

    for (int k0 = 0; k0 < K; k0 += F_BK) {
#pragma unroll
        for (int i = 0; i < 4; ++i) As[a_k][a_m + 16 * i] = load_a(w, g, m0 + a_m + 16 * i, k0 + a_k, M, K);
#pragma unroll
        for (int i = 0; i < 4; ++i) Bs[b_k + 4 * i][b_p] = load_b(x, g, org, k0 + b_k + 4 * i, K);
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < F_BK; ++kk) {
            float4 a = *reinterpret_cast<const float4*>(&As[kk][ty * 4]);
            float4 b = *reinterpret_cast<const float4*>(&Bs[kk][tx * 4]);
            float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
        }
        __syncthreads();
    }

    const long long ohw = (long long)g.OH * g.OW;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        PixelOrigin o = pixel_origin(g, p0 + tx * 4 + j, P);
        if (!o.valid) continue;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            int m = m0 + ty * 4 + i;
            if (m >= M) continue;
            float v = acc[i][j];
            if (bias) v += bias[m];
            out[o.out_off + (long long)m * ohw] = v;
        }
    }
}

#ifndef SRSDE_NO_WMMA
// build.rs defines SRSDE_NO_WMMA when the CUDA headers for WMMA (mma.h and crt/mma.h, from the
// nvidia-cuda-runtime and nvidia-cuda-crt wheels) are missing; then only conv_f32 exists.
#include <mma.h>
#include <cuda_bf16.h>
using namespace nvcuda;

// ---- tensor cores (WMMA) -----------------------------------------------------------------------
// 128 threads = 4 warps in a 2×2 grid; each warp owns a 32×32 piece (2×2 fragments of 16×16).
// Global loads for the next K tile are issued into registers before the current tile's MMAs.

#define T_BM 64
#define T_BN 64
#define T_BK 32
#define C_LD (T_BN + 4)  // f32 epilogue staging row stride

template <typename E>
struct TcTraits;

template <>
struct TcTraits<float> {  // TF32: the tile is stored as f32 holding TF32-rounded values
    static constexpr int KSTEP = 8;
    static constexpr int A_LD = T_BK + 4;
    static constexpr int B_LD = T_BN + 4;
    typedef wmma::precision::tf32 FragT;
    static __device__ __forceinline__ float conv(float v) { return wmma::__float_to_tf32(v); }
};

template <>
struct TcTraits<__nv_bfloat16> {
    static constexpr int KSTEP = 16;
    static constexpr int A_LD = T_BK + 8;
    static constexpr int B_LD = T_BN + 8;
    typedef __nv_bfloat16 FragT;
    static __device__ __forceinline__ __nv_bfloat16 conv(float v) { return __float2bfloat16_rn(v); }
};

template <typename E>
__device__ __forceinline__ void conv_tc(const float* __restrict__ x, const float* __restrict__ w,
                                        const float* __restrict__ bias, float* __restrict__ out,
                                        const ConvGeom& g) {
    typedef TcTraits<E> Tr;
    constexpr int A_LD = Tr::A_LD, B_LD = Tr::B_LD, KSTEP = Tr::KSTEP;
    constexpr int A_BYTES = T_BM * A_LD * sizeof(E), B_BYTES = T_BK * B_LD * sizeof(E);
    constexpr int C_BYTES = T_BM * C_LD * sizeof(float);
    constexpr int SMEM = (A_BYTES + B_BYTES) > C_BYTES ? (A_BYTES + B_BYTES) : C_BYTES;
    __shared__ __align__(128) unsigned char smem[SMEM];
    E* As = reinterpret_cast<E*>(smem);            // [T_BM][A_LD]  row-major A tile (m, k)
    E* Bs = reinterpret_cast<E*>(smem + A_BYTES);  // [T_BK][B_LD]  row-major B tile (k, p)
    float* Cs = reinterpret_cast<float*>(smem);    // [T_BM][C_LD]  epilogue, reuses the tiles

    const int M = g.O, K = g.C * g.KH * g.KW;
    const long long P = (long long)g.N * g.OH * g.OW;
    const int t = threadIdx.x, warp = t / 32;
    const int wm = warp / 2, wn = warp % 2;
    const int m0 = blockIdx.y * T_BM;
    const long long p0 = (long long)blockIdx.x * T_BN;

    // Loader roles: A by (rows a_m + 4·i, column a_k), B by (rows b_k + 2·i, pixel b_p).
    const int a_k = t % T_BK, a_m = t / T_BK;
    const int b_p = t % T_BN, b_k = t / T_BN;
    const PixelOrigin org = pixel_origin(g, p0 + b_p, P);
    float ra[16], rb[16];

    auto fetch = [&](int k0) {
#pragma unroll
        for (int i = 0; i < 16; ++i) ra[i] = load_a(w, g, m0 + a_m + 4 * i, k0 + a_k, M, K);
#pragma unroll
        for (int i = 0; i < 16; ++i) rb[i] = load_b(x, g, org, k0 + b_k + 2 * i, K);
    };
    auto stash = [&]() {
#pragma unroll
        for (int i = 0; i < 16; ++i) As[(a_m + 4 * i) * A_LD + a_k] = Tr::conv(ra[i]);
#pragma unroll
        for (int i = 0; i < 16; ++i) Bs[(b_k + 2 * i) * B_LD + b_p] = Tr::conv(rb[i]);
    };

    wmma::fragment<wmma::accumulator, 16, 16, KSTEP, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

    fetch(0);
    stash();
    __syncthreads();
    for (int k0 = 0; k0 < K; k0 += T_BK) {
        const bool more = k0 + T_BK < K;
        if (more) fetch(k0 + T_BK);
#pragma unroll
        for (int kk = 0; kk < T_BK; kk += KSTEP) {
            wmma::fragment<wmma::matrix_a, 16, 16, KSTEP, typename Tr::FragT, wmma::row_major> fa[2];
            wmma::fragment<wmma::matrix_b, 16, 16, KSTEP, typename Tr::FragT, wmma::row_major> fb[2];
#pragma unroll
            for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], As + (wm * 32 + i * 16) * A_LD + kk, A_LD);
#pragma unroll
            for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], Bs + kk * B_LD + wn * 32 + j * 16, B_LD);
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
        }
        __syncthreads();
        if (more) {
            stash();
            __syncthreads();
        }
    }

    // Epilogue: stage the 64×64 tile in shared memory, then write it with the bias, pixel-contiguous.
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
            wmma::store_matrix_sync(Cs + (wm * 32 + i * 16) * C_LD + wn * 32 + j * 16, acc[i][j], C_LD,
                                    wmma::mem_row_major);
    __syncthreads();
    const long long ohw = (long long)g.OH * g.OW;
    const int e_p = t % T_BN, e_m = t / T_BN;
    PixelOrigin o = pixel_origin(g, p0 + e_p, P);
    if (o.valid) {
        for (int mm = e_m; mm < T_BM; mm += 128 / T_BN) {
            int m = m0 + mm;
            if (m >= M) break;
            float v = Cs[mm * C_LD + e_p];
            if (bias) v += bias[m];
            out[o.out_off + (long long)m * ohw] = v;
        }
    }
}

extern "C" __global__ void __launch_bounds__(128) conv_tf32(const float* __restrict__ x,
                                                            const float* __restrict__ w,
                                                            const float* __restrict__ bias,
                                                            float* __restrict__ out, ConvGeom g) {
    conv_tc<float>(x, w, bias, out, g);
}

extern "C" __global__ void __launch_bounds__(128) conv_bf16(const float* __restrict__ x,
                                                            const float* __restrict__ w,
                                                            const float* __restrict__ bias,
                                                            float* __restrict__ out, ConvGeom g) {
    conv_tc<__nv_bfloat16>(x, w, bias, out, g);
}
#endif  // SRSDE_NO_WMMA

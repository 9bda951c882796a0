// CPU emulation of the CUDA subset used by kernels/*.cu; see run.sh.
// CPU emulation of the CUDA subset our kernels use: one block at a time, one OS thread per CUDA
// thread, real barriers for __syncthreads and warp shuffles; WMMA emulated per whole tile.
#pragma once
#include <thread>
#include <barrier>
#include <vector>
#include <cmath>
#include <cstring>
#include <cstdint>
#include <functional>
#include <algorithm>
#include <cstdio>
#include <memory>
using std::min; using std::max;
struct dim3 { unsigned x = 1, y = 1, z = 1; };
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 gridDim, blockDim;
inline std::barrier<>* g_block_bar;
inline std::vector<std::unique_ptr<std::barrier<>>> g_warp_bars;
inline float g_xchg_f[1024]; inline double g_xchg_d[1024];
alignas(128) inline unsigned char g_dyn_smem[1 << 20];
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __syncthreads() g_block_bar->arrive_and_wait()
template <class T> inline T __ldg(const T* p) { return *p; }
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((uint64_t)a * b) >> 32); }
inline float __int_as_float(int v) { float f; memcpy(&f, &v, 4); return f; }
inline float __int_as_float(unsigned v) { float f; memcpy(&f, &v, 4); return f; }
inline int lane_id() { return threadIdx.x & 31; }
inline std::barrier<>& warp_bar() { return *g_warp_bars[threadIdx.x / 32]; }
inline void __syncwarp(unsigned = 0xffffffffu) { warp_bar().arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int o) {
    g_xchg_f[threadIdx.x] = v; warp_bar().arrive_and_wait();
    float r = g_xchg_f[(threadIdx.x & ~31u) | (lane_id() ^ o)]; warp_bar().arrive_and_wait(); return r;
}
inline double __shfl_xor_sync(unsigned, double v, int o) {
    g_xchg_d[threadIdx.x] = v; warp_bar().arrive_and_wait();
    double r = g_xchg_d[(threadIdx.x & ~31u) | (lane_id() ^ o)]; warp_bar().arrive_and_wait(); return r;
}
// ---- bf16 / tf32 / wmma -------------------------------------------------------------------
struct __nv_bfloat16 { uint16_t b; operator float() const { uint32_t u = (uint32_t)b << 16; float f; memcpy(&f, &u, 4); return f; } };
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u; memcpy(&u, &f, 4); uint32_t r = u + 0x7FFF + ((u >> 16) & 1); __nv_bfloat16 h; h.b = (uint16_t)(r >> 16); return h;
}
namespace nvcuda { namespace wmma {
struct matrix_a {}; struct matrix_b {}; struct accumulator {}; struct row_major {}; struct col_major {};
namespace precision { struct tf32 {}; }
enum layout_t { mem_row_major, mem_col_major };
inline float __float_to_tf32(float f) { // round to nearest, ties away, 10 mantissa bits
    uint32_t u; memcpy(&u, &f, 4); u = (u + 0x1000u) & 0xFFFFE000u; float r; memcpy(&r, &u, 4); return r; }
template <class Use, int M, int N, int K, class T = void, class L = void> struct fragment;
template <int M, int N, int K, class T, class L> struct fragment<matrix_a, M, N, K, T, L> { float t[M * K]; };
template <int M, int N, int K, class T, class L> struct fragment<matrix_b, M, N, K, T, L> { float t[K * N]; };
template <int M, int N, int K, class T> struct fragment<accumulator, M, N, K, T, void> { float t[M * N]; };
template <int M, int N, int K, class T> inline void fill_fragment(fragment<accumulator, M, N, K, T>& f, float v) { for (auto& x : f.t) x = v; }
template <class E> inline float tof(const E& e) { return (float)e; }
template <int M, int N, int K, class T, class E> inline void load_matrix_sync(fragment<matrix_a, M, N, K, T, row_major>& f, const E* p, unsigned ld) {
    for (int i = 0; i < M; ++i) for (int k = 0; k < K; ++k) f.t[i * K + k] = tof(p[i * ld + k]); }
template <int M, int N, int K, class T, class E> inline void load_matrix_sync(fragment<matrix_b, M, N, K, T, row_major>& f, const E* p, unsigned ld) {
    for (int k = 0; k < K; ++k) for (int j = 0; j < N; ++j) f.t[k * N + j] = tof(p[k * ld + j]); }
template <int M, int N, int K, class T, class TA, class TB> inline void mma_sync(fragment<accumulator, M, N, K, float>& d,
    const fragment<matrix_a, M, N, K, TA, row_major>& a, const fragment<matrix_b, M, N, K, TB, row_major>& b, const fragment<accumulator, M, N, K, T>& c) {
    float tmp[M * N];
    for (int i = 0; i < M; ++i) for (int j = 0; j < N; ++j) { double s = c.t[i * N + j]; for (int k = 0; k < K; ++k) s += (double)a.t[i * K + k] * b.t[k * N + j]; tmp[i * N + j] = (float)s; }
    memcpy(d.t, tmp, sizeof tmp);
    warp_bar().arrive_and_wait();  // collective
}
template <int M, int N, int K, class T> inline void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, T>& f, unsigned ld, layout_t) {
    warp_bar().arrive_and_wait();
    if (lane_id() == 0) for (int i = 0; i < M; ++i) for (int j = 0; j < N; ++j) p[i * ld + j] = f.t[i * N + j];
    warp_bar().arrive_and_wait();
}
}}
// ---- launcher ------------------------------------------------------------------------------
inline void launch(dim3 grid, dim3 block, std::function<void()> body) {
    gridDim = grid; blockDim = block;
    unsigned nt = block.x;
    for (unsigned bz = 0; bz < grid.z; ++bz) for (unsigned by = 0; by < grid.y; ++by) for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::barrier<> bar(nt); g_block_bar = &bar;
        g_warp_bars.clear();
        for (unsigned w = 0; w < (nt + 31) / 32; ++w) g_warp_bars.emplace_back(new std::barrier<>(std::min(32u, nt - 32 * w)));
        std::vector<std::thread> ts;
        for (unsigned t = 0; t < nt; ++t) ts.emplace_back([=] { threadIdx = dim3{t, 0, 0}; blockIdx = dim3{bx, by, bz}; body(); });
        for (auto& th : ts) th.join();
    }
}
// ---- kernels/mma.cuh (cp.async, ldmatrix, mma.sync m16n8k16 bf16) ---------------------------
struct float2 { float x, y; };
inline uint16_t bf16_bits(float f) { return __float2bfloat16_rn(f).b; }
inline float bf16_val(uint16_t b) { uint32_t u = (uint32_t)b << 16; float f; memcpy(&f, &u, 4); return f; }
inline unsigned pack_bf16x2(float lo, float hi) { return (unsigned)bf16_bits(lo) | ((unsigned)bf16_bits(hi) << 16); }
// Copies happen at once; the pipeline's waits and barriers still order them like on the GPU.
inline void cp_async4(void* dst, const void* src, bool valid) { if (valid) memcpy(dst, src, 4); else memset(dst, 0, 4); }
inline void cp_async16(void* dst, const void* src) {
    if ((uintptr_t)dst % 16 || (uintptr_t)src % 16) { fprintf(stderr, "cp_async16: misaligned\n"); abort(); }
    memcpy(dst, src, 16); }
inline void cp_async16_zfill(void* dst, const void* src, bool valid) {
    if ((uintptr_t)dst % 16 || (valid && (uintptr_t)src % 16)) { fprintf(stderr, "cp_async16_zfill: misaligned\n"); abort(); }
    if (valid) memcpy(dst, src, 16); else memset(dst, 0, 16); }
inline void cp_async_commit() {}
template <int N> inline void cp_async_wait() {}
inline const void* g_xchg_p[1024]; inline unsigned g_xchg_u[1024][6];
inline void ldmatrix_x4(unsigned (&r)[4], const void* p) {
    if ((uintptr_t)p % 16) { fprintf(stderr, "ldmatrix: misaligned row\n"); abort(); }
    const unsigned base = threadIdx.x & ~31u, l = lane_id();
    g_xchg_p[threadIdx.x] = p; warp_bar().arrive_and_wait();
    for (int j = 0; j < 4; ++j) { unsigned v; memcpy(&v, (const unsigned char*)g_xchg_p[base + j * 8 + l / 4] + 4 * (l % 4), 4); r[j] = v; }
    warp_bar().arrive_and_wait();
}
inline void ldmatrix_x4_trans(unsigned (&r)[4], const void* p) {
    if ((uintptr_t)p % 16) { fprintf(stderr, "ldmatrix.trans: misaligned row\n"); abort(); }
    const unsigned base = threadIdx.x & ~31u, l = lane_id();
    g_xchg_p[threadIdx.x] = p; warp_bar().arrive_and_wait();
    for (int j = 0; j < 4; ++j) {
        uint16_t lo, hi;  // elements (row 2q, col g) and (row 2q + 1, col g) of matrix j
        memcpy(&lo, (const unsigned char*)g_xchg_p[base + j * 8 + 2 * (l % 4)] + 2 * (l / 4), 2);
        memcpy(&hi, (const unsigned char*)g_xchg_p[base + j * 8 + 2 * (l % 4) + 1] + 2 * (l / 4), 2);
        r[j] = (unsigned)lo | ((unsigned)hi << 16); }
    warp_bar().arrive_and_wait();
}
inline void mma_bf16_16816(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    const unsigned base = threadIdx.x & ~31u, l = lane_id();
    for (int j = 0; j < 4; ++j) g_xchg_u[threadIdx.x][j] = a[j];
    g_xchg_u[threadIdx.x][4] = b[0]; g_xchg_u[threadIdx.x][5] = b[1];
    warp_bar().arrive_and_wait();
    float A[16][16], B[16][8];
    for (unsigned ln = 0; ln < 32; ++ln) {
        const unsigned* u = g_xchg_u[base + ln]; const int g = ln / 4, t = ln % 4;
        auto lo = [](unsigned v) { return bf16_val((uint16_t)(v & 0xFFFF)); };
        auto hi = [](unsigned v) { return bf16_val((uint16_t)(v >> 16)); };
        A[g][2 * t] = lo(u[0]); A[g][2 * t + 1] = hi(u[0]);
        A[g + 8][2 * t] = lo(u[1]); A[g + 8][2 * t + 1] = hi(u[1]);
        A[g][2 * t + 8] = lo(u[2]); A[g][2 * t + 9] = hi(u[2]);
        A[g + 8][2 * t + 8] = lo(u[3]); A[g + 8][2 * t + 9] = hi(u[3]);
        B[2 * t][g] = lo(u[4]); B[2 * t + 1][g] = hi(u[4]);
        B[2 * t + 8][g] = lo(u[5]); B[2 * t + 9][g] = hi(u[5]);
    }
    warp_bar().arrive_and_wait();
    const int g = l / 4, t = l % 4;
    for (int i = 0; i < 4; ++i) {
        const int row = g + (i / 2) * 8, col = 2 * t + (i % 2);
        double s = d[i]; for (int k = 0; k < 16; ++k) s += (double)A[row][k] * B[k][col]; d[i] = (float)s; }
}

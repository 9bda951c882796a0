// Elementwise and layout kernels. CPU twins: the same-named Backend methods of backend/cpu.
// All tensors are contiguous f32; n counts elements. Launched with a grid-stride loop: a 1-D grid
// of 256-thread blocks, any number of blocks (the host caps it at 65536).
//
// These kernels are bound by DRAM bandwidth, so they move 16-byte float4s whenever every pointer
// is 16-byte aligned (a uniform branch; the scalar loop otherwise and for an n % 4 tail), and the
// row-indexed ones keep their row index incrementally (RowWalk) instead of a 64-bit division per
// element. Each output element is still the same single f32 expression as the scalar form.
#include "common.cuh"

__device__ __forceinline__ bool aligned16(const void* p) { return ((unsigned long long)p & 15) == 0; }

// out[i] = f(a[i]) over [0, n).
template <class F>
__device__ __forceinline__ void map1(const float* __restrict__ a, float* __restrict__ out, i64 n, F f) {
    i64 done = 0;
    if (aligned16(a) && aligned16(out)) {
        const float4* a4 = reinterpret_cast<const float4*>(a);
        float4* o4 = reinterpret_cast<float4*>(out);
        GRID_STRIDE(i, n / 4) {
            float4 v = a4[i];
            v.x = f(v.x), v.y = f(v.y), v.z = f(v.z), v.w = f(v.w);
            o4[i] = v;
        }
        done = n / 4 * 4;
    }
    GRID_STRIDE(i, n - done) out[done + i] = f(a[done + i]);
}

// out[i] = f(a[i], b[i]) over [0, n).
template <class F>
__device__ __forceinline__ void map2(const float* __restrict__ a, const float* __restrict__ b,
                                     float* __restrict__ out, i64 n, F f) {
    i64 done = 0;
    if (aligned16(a) && aligned16(b) && aligned16(out)) {
        const float4* a4 = reinterpret_cast<const float4*>(a);
        const float4* b4 = reinterpret_cast<const float4*>(b);
        float4* o4 = reinterpret_cast<float4*>(out);
        GRID_STRIDE(i, n / 4) {
            float4 u = a4[i];
            const float4 v = b4[i];
            u.x = f(u.x, v.x), u.y = f(u.y, v.y), u.z = f(u.z, v.z), u.w = f(u.w, v.w);
            o4[i] = u;
        }
        done = n / 4 * 4;
    }
    GRID_STRIDE(i, n - done) out[done + i] = f(a[done + i], b[done + i]);
}

// This thread's grid-stride indices i = first, first + step, … as (row, col) = (i / len, i % len)
// without a division per index: step = dq·len + dr is split once, then each step adds dq rows and
// dr columns with one carry. Requires len > 0.
struct RowWalk {
    i64 i, step, row, col, len, dq, dr;
    __device__ RowWalk(i64 len_)
        : i((i64)blockIdx.x * blockDim.x + threadIdx.x), step((i64)gridDim.x * blockDim.x), row(i / len_),
          col(i % len_), len(len_), dq(step / len_), dr(step % len_) {}
    __device__ void next() {
        i += step, row += dq, col += dr;
        if (col >= len) col -= len, ++row;
    }
};

// out[i] = f(x[i], s[i / len]) over [0, n): s holds one value per row of len elements.
template <class F>
__device__ __forceinline__ void map_rows(const float* __restrict__ x, const float* __restrict__ s,
                                         float* __restrict__ out, i64 n, i64 len, F f) {
    if (len <= 0) return;
    if (((n | len) & 3) == 0 && aligned16(x) && aligned16(out)) {  // a row is whole float4s
        const float4* x4 = reinterpret_cast<const float4*>(x);
        float4* o4 = reinterpret_cast<float4*>(out);
        for (RowWalk w(len / 4); w.i < n / 4; w.next()) {
            float4 v = x4[w.i];
            const float sv = s[w.row];
            v.x = f(v.x, sv), v.y = f(v.y, sv), v.z = f(v.z, sv), v.w = f(v.w, sv);
            o4[w.i] = v;
        }
    } else {
        for (RowWalk w(len); w.i < n; w.next()) out[w.i] = f(x[w.i], s[w.row]);
    }
}

extern "C" __global__ void ew_add(const float* __restrict__ a, const float* __restrict__ b,
                                  float* __restrict__ out, i64 n) {
    map2(a, b, out, n, [](float u, float v) { return u + v; });
}

extern "C" __global__ void ew_axpby(float alpha, const float* __restrict__ a, float beta,
                                    const float* __restrict__ b, float* __restrict__ out, i64 n) {
    map2(a, b, out, n, [=](float u, float v) { return alpha * u + beta * v; });
}

extern "C" __global__ void ew_mul(const float* __restrict__ a, const float* __restrict__ b,
                                  float* __restrict__ out, i64 n) {
    map2(a, b, out, n, [](float u, float v) { return u * v; });
}

extern "C" __global__ void ew_affine(const float* __restrict__ x, float scale, float shift,
                                     float* __restrict__ out, i64 n) {
    map1(x, out, n, [=](float v) { return scale * v + shift; });
}

// out[i] = x[i] · s[i / per]: a per-sample scalar, `per` elements per sample.
extern "C" __global__ void ew_scale_per_sample(const float* __restrict__ x, const float* __restrict__ s,
                                               float* __restrict__ out, i64 n, i64 per) {
    map_rows(x, s, out, n, per, [](float v, float sv) { return v * sv; });
}

extern "C" __global__ void ew_silu(const float* __restrict__ x, float* __restrict__ out, i64 n) {
    map1(x, out, n, [](float v) { return v * sigmoidf_(v); });
}

// d/dx [x·σ(x)] = σ(x)·(1 + x·(1 − σ(x))).
extern "C" __global__ void ew_silu_backward(const float* __restrict__ x, const float* __restrict__ dy,
                                            float* __restrict__ out, i64 n) {
    map2(x, dy, out, n, [](float v, float d) {
        const float s = sigmoidf_(v);
        return d * (s * (1.0f + v * (1.0f - s)));
    });
}

// x[N,C,HW] + b[N,C]: element i belongs to row i / hw of b.
extern "C" __global__ void ew_add_channel_bias(const float* __restrict__ x, const float* __restrict__ b,
                                               float* __restrict__ out, i64 n, i64 hw) {
    map_rows(x, b, out, n, hw, [](float v, float bv) { return v + bv; });
}

// Copy `rows` rows of `row_len` elements: dst[r·dst_stride + dst_off + j] = src[r·src_stride + src_off + j].
// Concatenation and slicing along channels of NCHW tensors are both this (one row per sample).
// T = float4 when every length, stride and offset is a multiple of 4 (and the pointers aligned).
template <class T>
__device__ __forceinline__ void copy_rows_as(const float* __restrict__ src, float* __restrict__ dst, i64 rows,
                                             i64 row_len, i64 src_stride, i64 src_off, i64 dst_stride,
                                             i64 dst_off) {
    constexpr int W = sizeof(T) / sizeof(float);
    const T* s = reinterpret_cast<const T*>(src);
    T* d = reinterpret_cast<T*>(dst);
    const i64 len = row_len / W, ss = src_stride / W, so = src_off / W, ds = dst_stride / W, doff = dst_off / W;
    for (RowWalk w(len); w.i < rows * len; w.next()) d[w.row * ds + doff + w.col] = s[w.row * ss + so + w.col];
}

extern "C" __global__ void ew_copy_rows(const float* __restrict__ src, float* __restrict__ dst, i64 rows,
                                        i64 row_len, i64 src_stride, i64 src_off, i64 dst_stride,
                                        i64 dst_off) {
    if (row_len <= 0) return;
    if (((row_len | src_stride | src_off | dst_stride | dst_off) & 3) == 0 && aligned16(src) && aligned16(dst))
        copy_rows_as<float4>(src, dst, rows, row_len, src_stride, src_off, dst_stride, dst_off);
    else
        copy_rows_as<float>(src, dst, rows, row_len, src_stride, src_off, dst_stride, dst_off);
}

// out[n, 2c + k, p] = (k == 0 ? x : y)[n, c, p] for x, y [N, C, HW].
extern "C" __global__ void ew_interleave(const float* __restrict__ x, const float* __restrict__ y,
                                         float* __restrict__ out, i64 n_total, i64 c, i64 hw) {
    GRID_STRIDE(i, n_total) {
        i64 p = i % hw;
        i64 rest = i / hw;      // n·2C + ch
        i64 ch = rest % (2 * c);
        i64 n = rest / (2 * c);
        const float* src = (ch & 1) ? y : x;
        out[i] = src[(n * c + (ch >> 1)) * hw + p];
    }
}

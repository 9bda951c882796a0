// Elementwise and layout kernels. CPU twins: the same-named Backend methods of backend/cpu.
// All tensors are contiguous f32; n counts elements. Launched with a grid-stride loop.
#include "common.cuh"

extern "C" __global__ void ew_add(const float* __restrict__ a, const float* __restrict__ b,
                                  float* __restrict__ out, i64 n) {
    GRID_STRIDE(i, n) out[i] = a[i] + b[i];
}

extern "C" __global__ void ew_axpby(float alpha, const float* __restrict__ a, float beta,
                                    const float* __restrict__ b, float* __restrict__ out, i64 n) {
    GRID_STRIDE(i, n) out[i] = alpha * a[i] + beta * b[i];
}

extern "C" __global__ void ew_mul(const float* __restrict__ a, const float* __restrict__ b,
                                  float* __restrict__ out, i64 n) {
    GRID_STRIDE(i, n) out[i] = a[i] * b[i];
}

extern "C" __global__ void ew_affine(const float* __restrict__ x, float scale, float shift,
                                     float* __restrict__ out, i64 n) {
    GRID_STRIDE(i, n) out[i] = scale * x[i] + shift;
}

// out[i] = x[i] · s[i / per]: a per-sample scalar, `per` elements per sample.
extern "C" __global__ void ew_scale_per_sample(const float* __restrict__ x, const float* __restrict__ s,
                                               float* __restrict__ out, i64 n, i64 per) {
    GRID_STRIDE(i, n) out[i] = x[i] * s[i / per];
}

extern "C" __global__ void ew_silu(const float* __restrict__ x, float* __restrict__ out, i64 n) {
    GRID_STRIDE(i, n) {
        float v = x[i];
        out[i] = v * sigmoidf_(v);
    }
}

// d/dx [x·σ(x)] = σ(x)·(1 + x·(1 − σ(x))).
extern "C" __global__ void ew_silu_backward(const float* __restrict__ x, const float* __restrict__ dy,
                                            float* __restrict__ out, i64 n) {
    GRID_STRIDE(i, n) {
        float v = x[i];
        float s = sigmoidf_(v);
        out[i] = dy[i] * (s * (1.0f + v * (1.0f - s)));
    }
}

// x[N,C,HW] + b[N,C]: element i belongs to row i / hw of b.
extern "C" __global__ void ew_add_channel_bias(const float* __restrict__ x, const float* __restrict__ b,
                                               float* __restrict__ out, i64 n, i64 hw) {
    GRID_STRIDE(i, n) out[i] = x[i] + b[i / hw];
}

// Copy `rows` rows of `row_len` elements: dst[r·dst_stride + dst_off + j] = src[r·src_stride + src_off + j].
// Concatenation and slicing along channels of NCHW tensors are both this (one row per sample).
extern "C" __global__ void ew_copy_rows(const float* __restrict__ src, float* __restrict__ dst, i64 rows,
                                        i64 row_len, i64 src_stride, i64 src_off, i64 dst_stride,
                                        i64 dst_off) {
    GRID_STRIDE(i, rows * row_len) {
        i64 r = i / row_len, j = i - r * row_len;
        dst[r * dst_stride + dst_off + j] = src[r * src_stride + src_off + j];
    }
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

// Fused spatial self-attention for small L = H·W (score_sde's AttnBlockpp core):
//   S = Qᵀ K / √C, P = softmax over keys, out = V Pᵀ, per sample, q/k/v/out [N, C, L].
// One block per (TQ queries, sample); the TQ × L score rows stay in shared memory (dynamic,
// TQ·(L+1) floats plus the 4 KB query chunk within the default 48 KB, so L ≤ 703). CPU twin: attention.
#include "common.cuh"

#define TQ 16
#define QCHUNK 64

// The forward for TQ queries per block: attn_forward (16), attn_forward_q4 / _q2 (4 / 2, for
// small batches, where 16-query blocks would leave most multiprocessors idle: batch 1 at 16×16
// is 16 blocks).
template <int TQF>
__device__ __forceinline__ void attn_forward_body(const float* __restrict__ q, const float* __restrict__ k,
                                                  const float* __restrict__ v, float* __restrict__ out, int C,
                                                  int L, float scale, float* S) {
    // S: the dynamic shared memory, [TQF][L + 1]; the +1 keeps the P reads of phase 3 conflict-free
    __shared__ float Qs[QCHUNK][TQF];
    const int tid = threadIdx.x, nthreads = blockDim.x;
    const int i0 = blockIdx.x * TQF;
    const i64 base = (i64)blockIdx.y * C * L;
    const int ld = L + 1;

    // Phase 1: scores. Thread owns key j; the TQF query columns are staged in shared memory.
    for (int jb = 0; jb < L; jb += nthreads) {
        const int j = jb + tid;
        float acc[TQF];
#pragma unroll
        for (int ii = 0; ii < TQF; ++ii) acc[ii] = 0.0f;
        for (int c0 = 0; c0 < C; c0 += QCHUNK) {
            __syncthreads();
            for (int idx = tid; idx < QCHUNK * TQF; idx += nthreads) {
                int cc = idx / TQF, ii = idx % TQF;
                Qs[cc][ii] = (c0 + cc < C && i0 + ii < L) ? q[base + (i64)(c0 + cc) * L + i0 + ii] : 0.0f;
            }
            __syncthreads();
            if (j < L) {
                const int cn = min(QCHUNK, C - c0);
                for (int cc = 0; cc < cn; ++cc) {
                    const float kv = __ldg(&k[base + (i64)(c0 + cc) * L + j]);
#pragma unroll
                    for (int ii = 0; ii < TQF; ++ii) acc[ii] = fmaf(Qs[cc][ii], kv, acc[ii]);
                }
            }
        }
        if (j < L) {
#pragma unroll
            for (int ii = 0; ii < TQF; ++ii) S[ii * ld + j] = acc[ii] * scale;
        }
    }
    __syncthreads();

    // Phase 2: row softmax (max-subtracted), one warp per row.
    const int lane = tid & 31, warp = tid >> 5, nwarps = nthreads >> 5;
    for (int ii = warp; ii < TQF; ii += nwarps) {
        float* row = S + ii * ld;
        float m = __int_as_float(0xff800000);  // -inf
        for (int j = lane; j < L; j += 32) m = fmaxf(m, row[j]);
        m = warp_max(m);
        float sum = 0.0f;
        for (int j = lane; j < L; j += 32) {
            float e = expf(row[j] - m);
            row[j] = e;
            sum += e;
        }
        const float inv = 1.0f / warp_sum(sum);
        for (int j = lane; j < L; j += 32) row[j] *= inv;
    }
    __syncthreads();

    // Phase 3: out[c, i0 + ii] = Σ_j P[ii][j] · v[c, j].
    const int ii = tid % TQF;
    if (i0 + ii < L) {
        const float* pr = S + ii * ld;
        for (int c = tid / TQF; c < C; c += nthreads / TQF) {
            const float* vr = v + base + (i64)c * L;
            float acc = 0.0f;
            for (int j = 0; j < L; ++j) acc = fmaf(pr[j], __ldg(&vr[j]), acc);
            out[base + (i64)c * L + i0 + ii] = acc;
        }
    }
}

extern "C" __global__ void __launch_bounds__(256) attn_forward(const float* __restrict__ q,
                                                               const float* __restrict__ k,
                                                               const float* __restrict__ v,
                                                               float* __restrict__ out, int C, int L,
                                                               float scale) {
    extern __shared__ float S[];
    attn_forward_body<16>(q, k, v, out, C, L, scale, S);
}

extern "C" __global__ void __launch_bounds__(256) attn_forward_q2(const float* __restrict__ q,
                                                                  const float* __restrict__ k,
                                                                  const float* __restrict__ v,
                                                                  float* __restrict__ out, int C, int L,
                                                                  float scale) {
    extern __shared__ float S[];
    attn_forward_body<2>(q, k, v, out, C, L, scale, S);
}

extern "C" __global__ void __launch_bounds__(256) attn_forward_q4(const float* __restrict__ q,
                                                                  const float* __restrict__ k,
                                                                  const float* __restrict__ v,
                                                                  float* __restrict__ out, int C, int L,
                                                                  float scale) {
    extern __shared__ float S[];
    attn_forward_body<4>(q, k, v, out, C, L, scale, S);
}

// ---- backward ------------------------------------------------------------------------------------
// With P = softmax rows of S = QᵀK/√C and dO the output gradient (all [C, L] per sample):
//   dV = dO·P, dP = dOᵀ·V, dS = P ⊙ (dP − rowsum(dP ⊙ P)), dQ = K·dSᵀ/√C, dK = Q·dS/√C.
// attn_bwd_scores recomputes P and forms dS for TQ query rows per block (both row blocks in
// shared memory: 2·TQ·(L+1) floats plus the 4 KB chunk, so L ≤ 350 in 48 KB) and writes P and
// dS to [N, L, L] workspaces; attn_bwd_gemm then forms dV, dQ and dK as batched products.
// CPU twin: attention_backward.

// rows[ii][j] = scale · Σ_c a[c, i0 + ii] · b[c, j] for the block's TQ rows (a, b: one sample).
__device__ __forceinline__ void attn_bwd_rowdots(const float* __restrict__ a, const float* __restrict__ b,
                                                 float* rows, float (*As)[TQ], int C, int L, int i0,
                                                 float scale) {
    const int tid = threadIdx.x, nthreads = blockDim.x, ld = L + 1;
    for (int jb = 0; jb < L; jb += nthreads) {
        const int j = jb + tid;
        float acc[TQ];
#pragma unroll
        for (int ii = 0; ii < TQ; ++ii) acc[ii] = 0.0f;
        for (int c0 = 0; c0 < C; c0 += QCHUNK) {
            __syncthreads();
            for (int idx = tid; idx < QCHUNK * TQ; idx += nthreads) {
                int cc = idx / TQ, ii = idx % TQ;
                As[cc][ii] = (c0 + cc < C && i0 + ii < L) ? a[(i64)(c0 + cc) * L + i0 + ii] : 0.0f;
            }
            __syncthreads();
            if (j < L) {
                const int cn = min(QCHUNK, C - c0);
                for (int cc = 0; cc < cn; ++cc) {
                    const float bv = __ldg(&b[(i64)(c0 + cc) * L + j]);
#pragma unroll
                    for (int ii = 0; ii < TQ; ++ii) acc[ii] = fmaf(As[cc][ii], bv, acc[ii]);
                }
            }
        }
        if (j < L) {
#pragma unroll
            for (int ii = 0; ii < TQ; ++ii) rows[ii * ld + j] = acc[ii] * scale;
        }
    }
    __syncthreads();
}

extern "C" __global__ void __launch_bounds__(256) attn_bwd_scores(const float* __restrict__ q,
                                                                  const float* __restrict__ k,
                                                                  const float* __restrict__ v,
                                                                  const float* __restrict__ dout,
                                                                  float* __restrict__ p_ws,
                                                                  float* __restrict__ ds_ws, int C, int L,
                                                                  float scale) {
    extern __shared__ float S[];  // [TQ][L + 1] probabilities, then [TQ][L + 1] dP
    __shared__ float Cs[QCHUNK][TQ];
    const int tid = threadIdx.x;
    const int i0 = blockIdx.x * TQ;
    const i64 base = (i64)blockIdx.y * C * L;
    const int ld = L + 1;
    float* Pr = S;
    float* Dr = S + TQ * ld;

    attn_bwd_rowdots(q + base, k + base, Pr, Cs, C, L, i0, scale);
    attn_bwd_rowdots(dout + base, v + base, Dr, Cs, C, L, i0, 1.0f);

    // Softmax of each score row (as attn_forward), then dS = P ⊙ (dP − Σ_j dP·P); one warp per row.
    const int lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
    for (int ii = warp; ii < TQ; ii += nwarps) {
        float* row = Pr + ii * ld;
        float* drow = Dr + ii * ld;
        float m = __int_as_float(0xff800000);  // -inf
        for (int j = lane; j < L; j += 32) m = fmaxf(m, row[j]);
        m = warp_max(m);
        float sum = 0.0f;
        for (int j = lane; j < L; j += 32) {
            float e = expf(row[j] - m);
            row[j] = e;
            sum += e;
        }
        const float inv = 1.0f / warp_sum(sum);
        float dot = 0.0f;
        for (int j = lane; j < L; j += 32) {
            row[j] *= inv;
            dot = fmaf(row[j], drow[j], dot);
        }
        dot = warp_sum(dot);
        if (i0 + ii < L) {
            const i64 off = ((i64)blockIdx.y * L + i0 + ii) * L;
            for (int j = lane; j < L; j += 32) {
                p_ws[off + j] = row[j];
                ds_ws[off + j] = row[j] * (drow[j] - dot);
            }
        }
    }
}

// out[n, c, x] = scale · Σ_y in[n, c, y] · M[y, x] with M[y, x] = mat[n, y, x], or mat[n, x, y]
// when `trans`; in/out [N, C, L], mat [N, L, L]. 64×64 output tiles, 16-wide y steps, 4×4 per
// thread. dV = (dO, P), dK = (Q, dS)·scale, dQ = (K, dSᵀ)·scale.
#define AG_T 64
#define AG_K 16
extern "C" __global__ void __launch_bounds__(256) attn_bwd_gemm(const float* __restrict__ in,
                                                                const float* __restrict__ mat,
                                                                float* __restrict__ out, int C, int L,
                                                                float scale, int trans) {
    __shared__ float Is[AG_K][AG_T + 1];  // [y][c]
    __shared__ float Ms[AG_K][AG_T + 4];  // [y][x]
    const int t = threadIdx.x, tx = t % 16, ty = t / 16;
    const int x0 = blockIdx.x * AG_T, c0 = blockIdx.y * AG_T;
    const float* inp = in + (i64)blockIdx.z * C * L;
    const float* mp = mat + (i64)blockIdx.z * L * L;
    float acc[4][4] = {};
    for (int y0 = 0; y0 < L; y0 += AG_K) {
        // in[c, y]: y fastest across threads.
        for (int idx = t; idx < AG_K * AG_T; idx += 256) {
            const int yy = idx % AG_K, cc = idx / AG_K;
            const int y = y0 + yy, c = c0 + cc;
            Is[yy][cc] = (y < L && c < C) ? inp[(i64)c * L + y] : 0.0f;
        }
        for (int idx = t; idx < AG_K * AG_T; idx += 256) {
            int yy, xx;
            if (trans) {  // mat[x, y]: y fastest
                yy = idx % AG_K;
                xx = idx / AG_K;
            } else {  // mat[y, x]: x fastest
                xx = idx % AG_T;
                yy = idx / AG_T;
            }
            const int y = y0 + yy, xg = x0 + xx;
            float v = 0.0f;
            if (y < L && xg < L) v = trans ? mp[(i64)xg * L + y] : mp[(i64)y * L + xg];
            Ms[yy][xx] = v;
        }
        __syncthreads();
#pragma unroll
        for (int yy = 0; yy < AG_K; ++yy) {
            float a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) a[i] = Is[yy][ty * 4 + i];
#pragma unroll
            for (int j = 0; j < 4; ++j) b[j] = Ms[yy][tx * 4 + j];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }
    float* op = out + (i64)blockIdx.z * C * L;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int c = c0 + ty * 4 + i;
        if (c >= C) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int xg = x0 + tx * 4 + j;
            if (xg < L) op[(i64)c * L + xg] = acc[i][j] * scale;
        }
    }
}

// Fused spatial self-attention for small L = H·W (score_sde's AttnBlockpp core):
//   S = Qᵀ K / √C, P = softmax over keys, out = V Pᵀ, per sample, q/k/v/out [N, C, L].
// One block per (TQ queries, sample); the TQ × L score rows stay in shared memory (dynamic,
// TQ·(L+1) floats plus the 4 KB query chunk within the default 48 KB, so L ≤ 703). CPU twin: attention.
#include "common.cuh"

#define TQ 16
#define QCHUNK 64

extern "C" __global__ void __launch_bounds__(256) attn_forward(const float* __restrict__ q,
                                                               const float* __restrict__ k,
                                                               const float* __restrict__ v,
                                                               float* __restrict__ out, int C, int L,
                                                               float scale) {
    extern __shared__ float S[];  // [TQ][L + 1]; the +1 keeps the P reads of phase 3 conflict-free
    __shared__ float Qs[QCHUNK][TQ];
    const int tid = threadIdx.x, nthreads = blockDim.x;
    const int i0 = blockIdx.x * TQ;
    const i64 base = (i64)blockIdx.y * C * L;
    const int ld = L + 1;

    // Phase 1: scores. Thread owns key j; the TQ query columns are staged in shared memory.
    for (int jb = 0; jb < L; jb += nthreads) {
        const int j = jb + tid;
        float acc[TQ];
#pragma unroll
        for (int ii = 0; ii < TQ; ++ii) acc[ii] = 0.0f;
        for (int c0 = 0; c0 < C; c0 += QCHUNK) {
            __syncthreads();
            for (int idx = tid; idx < QCHUNK * TQ; idx += nthreads) {
                int cc = idx / TQ, ii = idx % TQ;
                Qs[cc][ii] = (c0 + cc < C && i0 + ii < L) ? q[base + (i64)(c0 + cc) * L + i0 + ii] : 0.0f;
            }
            __syncthreads();
            if (j < L) {
                const int cn = min(QCHUNK, C - c0);
                for (int cc = 0; cc < cn; ++cc) {
                    const float kv = __ldg(&k[base + (i64)(c0 + cc) * L + j]);
#pragma unroll
                    for (int ii = 0; ii < TQ; ++ii) acc[ii] = fmaf(Qs[cc][ii], kv, acc[ii]);
                }
            }
        }
        if (j < L) {
#pragma unroll
            for (int ii = 0; ii < TQ; ++ii) S[ii * ld + j] = acc[ii] * scale;
        }
    }
    __syncthreads();

    // Phase 2: row softmax (max-subtracted), one warp per row.
    const int lane = tid & 31, warp = tid >> 5, nwarps = nthreads >> 5;
    for (int ii = warp; ii < TQ; ii += nwarps) {
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
    const int ii = tid % TQ;
    if (i0 + ii < L) {
        const float* pr = S + ii * ld;
        for (int c = tid / TQ; c < C; c += nthreads / TQ) {
            const float* vr = v + base + (i64)c * L;
            float acc = 0.0f;
            for (int j = 0; j < L; ++j) acc = fmaf(pr[j], __ldg(&vr[j]), acc);
            out[base + (i64)c * L + i0 + ii] = acc;
        }
    }
}

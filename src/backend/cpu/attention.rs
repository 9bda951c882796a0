//! Spatial self-attention over L = H·W positions, per sample: S = Qᵀ K / √C (L × L), P = softmax
//! rows, out = V Pᵀ. Queries are processed in blocks so the score matrix is at most
//! `QUERY_BLOCK_ELEMS` elements whatever the resolution.
use rayon::prelude::*;

use super::float::CpuFloat;
use super::matmul::{gemm, Mat, Par};

const QUERY_BLOCK_ELEMS: usize = 1 << 22;

fn query_block(l: usize) -> usize {
    (QUERY_BLOCK_ELEMS / l.max(1)).clamp(1, l.max(1))
}

/// Row-wise softmax, in place, on a [rows, l] block (max-subtracted).
fn softmax_rows<T: CpuFloat>(s: &mut [T], l: usize) {
    s.par_chunks_mut(l).for_each(|row| {
        let m = row.iter().fold(row[0], |a, &b| a.max(b));
        let mut sum = 0.0f64;
        for v in row.iter_mut() {
            *v = (*v - m).exp();
            sum += v.to_f64();
        }
        let inv = T::from_f64(1.0 / sum);
        row.iter_mut().for_each(|v| *v *= inv);
    });
}

/// P for queries [i0, i0+bq) of one sample (q, k: [C, L] slices at `base`).
#[allow(clippy::too_many_arguments)] // a BLAS-style argument list reads best here
fn probs<T: CpuFloat>(
    q: &[T],
    k: &[T],
    base: usize,
    c: usize,
    l: usize,
    i0: usize,
    bq: usize,
    s: &mut Vec<T>,
) {
    let scale = T::from_f64(1.0 / (c as f64).sqrt());
    s.resize(bq * l, T::ZERO);
    gemm(
        s,
        0,
        l,
        Mat::rm_t(q, base + i0, bq, c, l),
        Mat::rm(k, base, c, l, l),
        scale,
        false,
        Par::Pool,
    );
    softmax_rows(s, l);
}

pub(crate) fn attention<T: CpuFloat>(q: &[T], k: &[T], v: &[T], n: usize, c: usize, l: usize) -> Vec<T> {
    let mut out = vec![T::ZERO; n * c * l];
    if l == 0 || c == 0 {
        return out;
    }
    let bq = query_block(l);
    let mut s = Vec::new();
    for img in 0..n {
        let base = img * c * l;
        for i0 in (0..l).step_by(bq) {
            let b = bq.min(l - i0);
            probs(q, k, base, c, l, i0, b, &mut s);
            // out[:, i0..i0+b] = V · Pᵀ
            gemm(
                &mut out,
                base + i0,
                l,
                Mat::rm(v, base, c, l, l),
                Mat::rm_t(&s, 0, l, b, l),
                T::ONE,
                false,
                Par::Pool,
            );
        }
    }
    out
}

/// (dq, dk, dv): dV = dO·P, dP = dOᵀ·V, dS = P ⊙ (dP − rowsum(dP ⊙ P)), dQ = K·dSᵀ/√C,
/// dK = Q·dS/√C.
pub(crate) fn attention_backward<T: CpuFloat>(
    q: &[T],
    k: &[T],
    v: &[T],
    dout: &[T],
    n: usize,
    c: usize,
    l: usize,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let (mut dq, mut dk, mut dv) = (
        vec![T::ZERO; n * c * l],
        vec![T::ZERO; n * c * l],
        vec![T::ZERO; n * c * l],
    );
    if l == 0 || c == 0 {
        return (dq, dk, dv);
    }
    let scale = T::from_f64(1.0 / (c as f64).sqrt());
    let bq = query_block(l);
    let (mut p, mut dp) = (Vec::new(), Vec::new());
    for img in 0..n {
        let base = img * c * l;
        for i0 in (0..l).step_by(bq) {
            let b = bq.min(l - i0);
            let acc = i0 > 0;
            probs(q, k, base, c, l, i0, b, &mut p);
            let dout_blk = Mat::rm(dout, base + i0, c, b, l);
            gemm(
                &mut dv,
                base,
                l,
                dout_blk,
                Mat::rm(&p, 0, b, l, l),
                T::ONE,
                acc,
                Par::Pool,
            );
            dp.resize(b * l, T::ZERO);
            let dout_t = Mat::rm_t(dout, base + i0, b, c, l);
            gemm(
                &mut dp,
                0,
                l,
                dout_t,
                Mat::rm(v, base, c, l, l),
                T::ONE,
                false,
                Par::Pool,
            );
            dp.par_chunks_mut(l).zip(p.par_chunks(l)).for_each(|(dpr, pr)| {
                let dot: f64 = dpr.iter().zip(pr).map(|(a, b)| (*a * *b).to_f64()).sum();
                let dot = T::from_f64(dot);
                for (d, &pv) in dpr.iter_mut().zip(pr) {
                    *d = pv * (*d - dot);
                }
            });
            gemm(
                &mut dq,
                base + i0,
                l,
                Mat::rm(k, base, c, l, l),
                Mat::rm_t(&dp, 0, l, b, l),
                scale,
                false,
                Par::Pool,
            );
            let q_blk = Mat::rm(q, base + i0, c, b, l);
            gemm(
                &mut dk,
                base,
                l,
                q_blk,
                Mat::rm(&dp, 0, b, l, l),
                scale,
                acc,
                Par::Pool,
            );
        }
    }
    (dq, dk, dv)
}

//! Spatial self-attention over L = H·W positions, per sample: S = Qᵀ K / √C (L × L), P = softmax
//! rows, out = V Pᵀ. Queries are processed in blocks so the score matrix is at most
//! `QUERY_BLOCK_ELEMS` elements whatever the resolution.
use std::sync::Mutex;
use std::time::Instant;

use rayon::prelude::*;

use super::float::CpuFloat;
use super::matmul::{gemm, Mat, Par};
use super::profile;
use super::simd::{dot_f64, sum_f64, vectorized};

const QUERY_BLOCK_ELEMS: usize = 1 << 22;

/// What the profile splits an attention call into: the thread-seconds of its matrix products and
/// of all its per-sample work, summed over the tasks (only while the profile is on).
#[derive(Default)]
struct GemmClock {
    on: bool,
    /// (GEMM seconds, task seconds).
    secs: Mutex<(f64, f64)>,
}

impl GemmClock {
    fn new() -> Self {
        GemmClock {
            on: profile::is_enabled(),
            secs: Mutex::new((0.0, 0.0)),
        }
    }

    /// Runs `f` (one sample's work), adding its time and the time of the products it ran under
    /// [`GemmClock::gemm`] to the totals.
    fn task<R>(&self, f: impl FnOnce(&mut f64) -> R) -> R {
        let mut gemm = 0.0;
        let started = self.on.then(Instant::now);
        let r = f(&mut gemm);
        if let Some(t) = started {
            let mut s = self.secs.lock().unwrap_or_else(|e| e.into_inner());
            s.0 += gemm;
            s.1 += t.elapsed().as_secs_f64();
        }
        r
    }

    /// Runs one matrix product of a task, adding its time to the task's `gemm` seconds.
    fn gemm(&self, gemm: &mut f64, f: impl FnOnce()) {
        let started = self.on.then(Instant::now);
        f();
        if let Some(t) = started {
            *gemm += t.elapsed().as_secs_f64();
        }
    }

    /// Records the products' share of the wall time since `started` as "gemm attention" (the
    /// rest stays with the calling op's scope: softmax, scratch, the tasks' overhead).
    fn record(&self, started: Instant, flops: f64) {
        let (gemm, busy) = *self.secs.lock().unwrap_or_else(|e| e.into_inner());
        profile::record_shares(started, busy, &[("gemm attention", gemm, flops)]);
    }
}

fn query_block(l: usize) -> usize {
    (QUERY_BLOCK_ELEMS / l.max(1)).clamp(1, l.max(1))
}

/// Row-wise softmax, in place, on a [rows, l] block (max-subtracted): vector loops (the branch-free
/// exp, lane sums in f64), rows in tasks of several.
fn softmax_rows<T: CpuFloat>(s: &mut [T], l: usize) {
    s.par_chunks_mut(l).with_min_len(ROWS_PER_TASK).for_each(|row| {
        vectorized(
            #[inline(always)]
            || {
                let m = row.iter().fold(row[0], |a, &b| a.max(b));
                for v in row.iter_mut() {
                    *v = (*v - m).exp_fast();
                }
                let inv = T::from_f64(1.0 / sum_f64(row, |v| v.to_f64()));
                for v in row.iter_mut() {
                    *v *= inv;
                }
            },
        )
    });
}

/// Score rows per parallel task (a row of L = 256 is too little work for one).
const ROWS_PER_TASK: usize = 16;

/// P for queries [i0, i0+bq) of one sample (q, k: [C, L] slices at `base`); the product's time
/// goes to `gemm` on `clock`.
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
    par: Par,
    (clock, gemm_secs): (&GemmClock, &mut f64),
) {
    let scale = T::from_f64(1.0 / (c as f64).sqrt());
    s.resize(bq * l, T::ZERO);
    clock.gemm(gemm_secs, || {
        gemm(
            s,
            0,
            l,
            Mat::rm_t(q, base + i0, bq, c, l),
            Mat::rm(k, base, c, l, l),
            scale,
            false,
            par,
        )
    });
    softmax_rows(s, l);
}

/// How the samples share the threads: one sample per task with serial products when there
/// are at least as many samples as threads (the products at L = 256 are too small to split
/// well), else one sample after another with the products split.
fn per_sample(n: usize) -> Par {
    if n >= rayon::current_num_threads() {
        Par::Serial
    } else {
        Par::Pool
    }
}

pub(crate) fn attention<T: CpuFloat>(q: &[T], k: &[T], v: &[T], n: usize, c: usize, l: usize) -> Vec<T> {
    let mut out = vec![T::ZERO; n * c * l];
    if l == 0 || c == 0 {
        return out;
    }
    let (started, clock) = (Instant::now(), GemmClock::new());
    let bq = query_block(l);
    let par = per_sample(n);
    let one = |img: usize, out_img: &mut [T], s: &mut Vec<T>| {
        clock.task(|g| {
            let base = img * c * l;
            for i0 in (0..l).step_by(bq) {
                let b = bq.min(l - i0);
                probs(q, k, base, c, l, i0, b, s, par, (&clock, g));
                // out[:, i0..i0+b] = V · Pᵀ
                clock.gemm(g, || {
                    gemm(
                        out_img,
                        i0,
                        l,
                        Mat::rm(v, base, c, l, l),
                        Mat::rm_t(s, 0, l, b, l),
                        T::ONE,
                        false,
                        par,
                    )
                });
            }
        })
    };
    if par == Par::Serial {
        out.par_chunks_mut(c * l)
            .enumerate()
            .for_each_init(Vec::new, |s, (img, o)| one(img, o, s));
    } else {
        let mut s = Vec::new();
        for (img, o) in out.chunks_mut(c * l).enumerate() {
            one(img, o, &mut s);
        }
    }
    // Sᵀ = QᵀK and V·Pᵀ: 2·C·L² multiply-adds a sample.
    clock.record(started, 4.0 * (n * c * l * l) as f64);
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
    let (started, clock) = (Instant::now(), GemmClock::new());
    let bq = query_block(l);
    let par = per_sample(n);
    let one = |img: usize, (dq, dk, dv): (&mut [T], &mut [T], &mut [T]), (p, dp): &mut (Vec<T>, Vec<T>)| {
        clock.task(|g| {
            let base = img * c * l;
            for i0 in (0..l).step_by(bq) {
                let b = bq.min(l - i0);
                let acc = i0 > 0;
                probs(q, k, base, c, l, i0, b, p, par, (&clock, g));
                let dout_blk = Mat::rm(dout, base + i0, c, b, l);
                clock.gemm(g, || {
                    gemm(dv, 0, l, dout_blk, Mat::rm(p, 0, b, l, l), T::ONE, acc, par)
                });
                dp.resize(b * l, T::ZERO);
                let dout_t = Mat::rm_t(dout, base + i0, b, c, l);
                clock.gemm(g, || {
                    gemm(dp, 0, l, dout_t, Mat::rm(v, base, c, l, l), T::ONE, false, par)
                });
                dp.par_chunks_mut(l)
                    .zip(p.par_chunks(l))
                    .with_min_len(ROWS_PER_TASK)
                    .for_each(|(dpr, pr)| {
                        vectorized(
                            #[inline(always)]
                            || {
                                let dot = T::from_f64(dot_f64(dpr, pr));
                                for (d, &pv) in dpr.iter_mut().zip(pr) {
                                    *d = pv * (*d - dot);
                                }
                            },
                        )
                    });
                clock.gemm(g, || {
                    gemm(
                        dq,
                        i0,
                        l,
                        Mat::rm(k, base, c, l, l),
                        Mat::rm_t(dp, 0, l, b, l),
                        scale,
                        false,
                        par,
                    )
                });
                let q_blk = Mat::rm(q, base + i0, c, b, l);
                clock.gemm(g, || {
                    gemm(dk, 0, l, q_blk, Mat::rm(dp, 0, b, l, l), scale, acc, par)
                });
            }
        })
    };
    let per = c * l;
    if par == Par::Serial {
        dq.par_chunks_mut(per)
            .zip(dk.par_chunks_mut(per))
            .zip(dv.par_chunks_mut(per))
            .enumerate()
            .for_each_init(
                || (Vec::new(), Vec::new()),
                |scratch, (img, ((a, b), d))| one(img, (a, b, d), scratch),
            );
    } else {
        let mut scratch = (Vec::new(), Vec::new());
        for (img, ((a, b), d)) in dq
            .chunks_mut(per)
            .zip(dk.chunks_mut(per))
            .zip(dv.chunks_mut(per))
            .enumerate()
        {
            one(img, (a, b, d), &mut scratch);
        }
    }
    // The recomputed QᵀK, dV, dP, dQ and dK: 2·C·L² multiply-adds each a sample.
    clock.record(started, 10.0 * (n * c * l * l) as f64);
    (dq, dk, dv)
}

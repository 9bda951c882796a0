//! StyleGAN2 `upfirdn2d` and its exact adjoint. With U the zero-inserted input (U[u] = x[u/up] when
//! up divides u, else 0; length H·up) the output along one axis is
//!   out[o] = Σ_t f[k−1−t] · U[o·down + t − pad0],   t = 0..k,
//! i.e. pad (negative = crop), convolve with the flipped kernel, keep every `down`-th sample — the
//! same index arithmetic as score_sde's `upfirdn2d_native`. Both directions walk the same tap
//! lists, so the backward is the transpose of the forward by construction.
//!
//! The models' FIR kernels are outer products (k·kᵀ of [1,3,3,1]): such a kernel runs as two 1-D
//! passes — along rows into a scratch plane, then whole rows combined down the columns — with
//! kh + kw taps per output instead of kh·kw ([`separable`]).
use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::float::CpuFloat;
use super::simd::vectorized;
use super::written_once;
use crate::backend::UpFirDn;

/// For each output index along one axis: the (filter tap index, input index) pairs that
/// contribute, with the filter tap already flipped.
fn taps(n_in: usize, n_out: usize, k: usize, geom: UpFirDn) -> Vec<Vec<(usize, usize)>> {
    (0..n_out)
        .map(|o| {
            (0..k)
                .filter_map(|t| {
                    let u = (o * geom.down + t) as isize - geom.pad0;
                    if u < 0 || !(u as usize).is_multiple_of(geom.up) || u as usize / geom.up >= n_in {
                        return None;
                    }
                    Some((k - 1 - t, u as usize / geom.up))
                })
                .collect()
        })
        .collect()
}

/// Geometry of one call: planes of h×w in, oh×ow out.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FirGeom {
    pub planes: usize,
    pub h: usize,
    pub w: usize,
    pub oh: usize,
    pub ow: usize,
}

/// (column factor a[kh], row factor b[kw]) with f[i·kw + j] = a[i]·b[j] to within rounding, when
/// the kernel is an outer product.
fn separable<T: CpuFloat>(f: &[T], kh: usize, kw: usize) -> Option<(Vec<T>, Vec<T>)> {
    let (mut i0, mut j0, mut big) = (0, 0, 0.0f64);
    for i in 0..kh {
        for j in 0..kw {
            let v = f[i * kw + j].to_f64().abs();
            if v > big {
                (i0, j0, big) = (i, j, v);
            }
        }
    }
    if big == 0.0 || !big.is_finite() {
        return None;
    }
    let a: Vec<f64> = (0..kh).map(|i| f[i * kw + j0].to_f64()).collect();
    let b: Vec<f64> = (0..kw)
        .map(|j| f[i0 * kw + j].to_f64() / f[i0 * kw + j0].to_f64())
        .collect();
    for i in 0..kh {
        for j in 0..kw {
            if (a[i] * b[j] - f[i * kw + j].to_f64()).abs() > 1e-6 * big {
                return None;
            }
        }
    }
    let conv = |v: Vec<f64>| v.into_iter().map(T::from_f64).collect();
    Some((conv(a), conv(b)))
}

pub(crate) fn upfirdn2d<T: CpuFloat>(
    g: &FirGeom,
    x: &[T],
    f: &[T],
    kh: usize,
    kw: usize,
    geom: UpFirDn,
) -> Vec<T> {
    let (ty, tx) = (taps(g.h, g.oh, kh, geom), taps(g.w, g.ow, kw, geom));
    let n = g.planes * g.oh * g.ow;
    if n == 0 || g.h * g.w == 0 {
        return vec![T::ZERO; n];
    }
    match separable(f, kh, kw) {
        // The output is written once, row by row: no zero-filled buffer first (an extra pass
        // over memory as large as the output, most of this op's time at 128×128).
        Some((a, b)) => written_once(n, |out| forward_separable(g, x, &a, &b, &ty, &tx, out)),
        None => {
            let mut out = vec![T::ZERO; n];
            forward_direct(g, x, f, kw, &ty, &tx, &mut out);
            out
        }
    }
}

type TapLists = [Vec<(usize, usize)>];

/// The forward with a kernel a ⊗ b, as two 1-D passes. The row pass (a gather per row, the costly
/// one) runs on whichever of the input's and the output's rows are fewer: rows first,
/// rows[iy][ox] = Σ b·x[iy][ix], then out[oy] = Σ a·rows[iy] (up-sampling, same size); or, when
/// the output has fewer rows (down-sampling), columns first, cols[oy] = Σ a·x[iy] over whole rows,
/// then out[oy][ox] = Σ b·cols[oy][ix].
fn forward_separable<T: CpuFloat>(
    g: &FirGeom,
    x: &[T],
    a: &[T],
    b: &[T],
    ty: &TapLists,
    tx: &TapLists,
    out: &mut [MaybeUninit<T>],
) {
    let across = Gather::new(tx);
    let columns_first = g.oh < g.h;
    out.par_chunks_mut(g.oh * g.ow)
        .zip(x.par_chunks(g.h * g.w))
        .for_each_init(
            || (Vec::new(), Vec::new()),
            |(rows, tmp), (y, xp)| {
                vectorized(
                    #[inline(always)]
                    || {
                        // Both passes write their rows whole, straight into the destination.
                        if columns_first {
                            rows.resize(g.oh * g.w, T::ZERO);
                            for (crow, tl) in rows.chunks_mut(g.w).zip(ty) {
                                column_sum(a, tl, xp, g.w, as_uninit(crow));
                            }
                            for (yrow, crow) in y.chunks_mut(g.ow).zip(rows.chunks(g.w)) {
                                across.row(b, crow, yrow, tmp);
                            }
                            return;
                        }
                        rows.resize(g.h * g.ow, T::ZERO);
                        for (xrow, hrow) in xp.chunks(g.w).zip(rows.chunks_mut(g.ow)) {
                            across.row(b, xrow, as_uninit(hrow), tmp);
                        }
                        for (yrow, tl) in y.chunks_mut(g.ow).zip(ty) {
                            column_sum(a, tl, rows, g.ow, yrow);
                        }
                    },
                )
            },
        );
}

/// dst = Σ over `taps` (weight index, row index) of w[tap]·src row, rows `width` long: one output
/// row of a column pass, summed from zero in list order.
#[inline(always)]
fn column_sum<T: CpuFloat>(
    w: &[T],
    taps: &[(usize, usize)],
    src: &[T],
    width: usize,
    dst: &mut [MaybeUninit<T>],
) {
    let mut terms = Terms::new();
    for &(t, r) in taps {
        terms.push(w[t], &src[r * width..][..width]);
    }
    terms.sum_into(dst);
}

/// The models' kernels have 4 taps, so an output sums at most 4 terms in every pass; up to this
/// many run as one unrolled loop ([`Terms::sum_into`]).
const UNROLLED_TERMS: usize = 4;

/// The (weight, source) terms of a weighted sum of slices, dst[i] = Σ w·src[i].
struct Terms<'s, T> {
    terms: [(T, &'s [T]); UNROLLED_TERMS],
    len: usize,
    /// Terms beyond the unrolled ones (no model has them).
    more: Vec<(T, &'s [T])>,
}

impl<'s, T: CpuFloat> Terms<'s, T> {
    #[inline(always)]
    fn new() -> Self {
        Terms {
            terms: [(T::ZERO, &[][..]); UNROLLED_TERMS],
            len: 0,
            more: Vec::new(),
        }
    }

    #[inline(always)]
    fn push(&mut self, w: T, src: &'s [T]) {
        if self.len < UNROLLED_TERMS {
            self.terms[self.len] = (w, src);
        } else {
            self.more.push((w, src));
        }
        self.len += 1;
    }

    /// dst[i] = Σ w·src[i] over the terms, summed from zero in push order (so bitwise the plain
    /// per-output sum) and written once: one pass over dst, the sum in registers, instead of a
    /// zero fill and a read-modify-write pass per term.
    #[inline(always)]
    fn sum_into(&self, dst: &mut [MaybeUninit<T>]) {
        match self.len {
            0 => dst.fill(MaybeUninit::new(T::ZERO)),
            1 => self.sum_n::<1>(dst),
            2 => self.sum_n::<2>(dst),
            3 => self.sum_n::<3>(dst),
            4 => self.sum_n::<4>(dst),
            _ => {
                for (i, d) in dst.iter_mut().enumerate() {
                    let all = self.terms.iter().chain(&self.more);
                    d.write(all.fold(T::ZERO, |acc, &(w, s)| acc + w * s[i]));
                }
            }
        }
    }

    #[inline(always)]
    fn sum_n<const N: usize>(&self, dst: &mut [MaybeUninit<T>]) {
        let len = dst.len();
        let w: [T; N] = std::array::from_fn(|t| self.terms[t].0);
        let src: [&[T]; N] = std::array::from_fn(|t| &self.terms[t].1[..len]);
        for (i, d) in dst.iter_mut().enumerate() {
            let mut acc = T::ZERO;
            for t in 0..N {
                // SAFETY: i < len, and every src[t] is exactly len long (sliced above). Indexed
                // unchecked because LLVM does not vectorize the loop with N bounds checks in it.
                acc += w[t] * unsafe { *src[t].get_unchecked(i) };
            }
            d.write(acc);
        }
    }
}

/// `s` as a slice to write into: what the summing helpers take, for buffers already initialised.
#[inline(always)]
fn as_uninit<T: Copy>(s: &mut [T]) -> &mut [MaybeUninit<T>] {
    // SAFETY: MaybeUninit<T> has T's layout, and the helpers only ever write initialised values
    // through it, so `s` stays initialised.
    unsafe { &mut *(s as *mut [T] as *mut [MaybeUninit<T>]) }
}

/// For each input index, the (tap, output index) pairs of the outputs that read it, in output
/// order (the order in which a scatter would add them).
fn transpose_lists(lists: &TapLists, n_in: usize) -> Vec<Vec<(usize, usize)>> {
    let mut transposed = vec![Vec::new(); n_in];
    for (o, tl) in lists.iter().enumerate() {
        for &(t, i) in tl {
            transposed[i].push((t, o));
        }
    }
    transposed
}

/// The period (in outputs) and stride (in inputs per period) of a tap-list array's regular
/// interior, found from the lists themselves: the smallest p ≤ 4 with lists[o + p] = lists[o]
/// shifted by a constant, at the middle of the axis.
fn geom_period(lists: &TapLists) -> (usize, usize) {
    let mid = lists.len() / 2;
    for p in 1..=4 {
        if mid + p >= lists.len() || lists[mid].is_empty() {
            break;
        }
        let (l0, l1) = (&lists[mid], &lists[mid + p]);
        if l0.len() == l1.len() && l1[0].1 >= l0[0].1 {
            let s = l1[0].1 - l0[0].1;
            if l0.iter().zip(l1).all(|(u, v)| u.0 == v.0 && v.1 == u.1 + s) {
                return (p, s);
            }
        }
    }
    (1, 0)
}

/// (phase, m range, the taps as (tap, input index at m = 0, may be negative)).
type Run = (usize, std::ops::Range<usize>, Vec<(usize, isize)>);

/// One axis of a separable pass as gathers, out[o] = Σ over lists[o] of w[tap]·src[index], with
/// the axis' regular interior run as vector loops: outputs o = phase + period·m whose lists are
/// the same taps at inputs advancing by `stride` per m. Each output still sums its taps in list
/// order starting from zero, so the result is bitwise that of the plain per-output sum.
struct Gather<'a> {
    lists: &'a TapLists,
    period: usize,
    stride: usize,
    runs: Vec<Run>,
    /// Outputs outside every run: summed one by one.
    edges: Vec<usize>,
}

impl<'a> Gather<'a> {
    fn new(lists: &'a TapLists) -> Self {
        let (period, stride) = geom_period(lists);
        let n = lists.len();
        let mut covered = vec![false; n];
        let mut runs = Vec::new();
        if stride > 0 {
            for phase in 0..period.min(n) {
                let count = (n - phase).div_ceil(period);
                let m_ref = count / 2;
                let reference = &lists[phase + period * m_ref];
                if reference.is_empty() {
                    continue;
                }
                let matches = |m: usize| {
                    let l = &lists[phase + period * m];
                    l.len() == reference.len()
                        && l.iter().zip(reference).all(|(u, v)| {
                            u.0 == v.0
                                && u.1 as isize
                                    == v.1 as isize + (m as isize - m_ref as isize) * stride as isize
                        })
                };
                let (mut lo, mut hi) = (m_ref, m_ref + 1);
                while lo > 0 && matches(lo - 1) {
                    lo -= 1;
                }
                while hi < count && matches(hi) {
                    hi += 1;
                }
                for m in lo..hi {
                    covered[phase + period * m] = true;
                }
                let taps = reference
                    .iter()
                    .map(|&(t, i)| (t, i as isize - (m_ref * stride) as isize))
                    .collect();
                runs.push((phase, lo..hi, taps));
            }
        }
        let edges = (0..n).filter(|&o| !covered[o]).collect();
        Gather {
            lists,
            period,
            stride,
            runs,
            edges,
        }
    }

    /// dst = the pass over one row `src`; `tmp` is scratch.
    #[inline(always)]
    fn row<T: CpuFloat>(&self, w: &[T], src: &[T], dst: &mut [MaybeUninit<T>], tmp: &mut Vec<T>) {
        for &o in &self.edges {
            dst[o].write(
                self.lists[o]
                    .iter()
                    .fold(T::ZERO, |acc, &(t, i)| acc + w[t] * src[i]),
            );
        }
        // With a stride s > 1 the row is first split into its s phases (src[j·s + r] at
        // r·plen + j), so that every tap reads a contiguous slice.
        let s = self.stride.max(1);
        let plen = src.len().div_ceil(s);
        let runs_start = if s > 1 { s * plen } else { 0 };
        tmp.clear();
        tmp.resize(runs_start, T::ZERO);
        if s == 2 {
            // The common case (×2 down), as a loop LLVM vectorizes (a stride-2 load group).
            let (even, odd) = tmp.split_at_mut(plen);
            let pairs = src.len() / 2;
            for ((e, o), pair) in even
                .iter_mut()
                .zip(odd.iter_mut())
                .zip(src.chunks_exact(2))
                .take(pairs)
            {
                *e = pair[0];
                *o = pair[1];
            }
            if src.len() % 2 == 1 {
                even[pairs] = src[src.len() - 1];
            }
        } else if s > 1 {
            for (j, chunk) in src.chunks(s).enumerate() {
                for (r, &v) in chunk.iter().enumerate() {
                    tmp[r * plen + j] = v;
                }
            }
        }
        // Each run's sums: straight into dst when its outputs are consecutive (period 1), else
        // into a block of scratch per run (in run order), spread over dst after.
        let blocks_len = if self.period > 1 {
            self.runs.iter().map(|r| r.1.len()).sum()
        } else {
            0
        };
        tmp.resize(runs_start + blocks_len, T::ZERO);
        let (split, blocks) = tmp.split_at_mut(runs_start);
        let mut rest = &mut blocks[..];
        for (_, ms, taps) in &self.runs {
            let mut terms = Terms::new();
            for &(t, i0) in taps {
                let first = (i0 + (ms.start * s) as isize) as usize;
                let slice = if s == 1 {
                    &src[first..first + ms.len()]
                } else {
                    let start = (first % s) * plen + first / s;
                    &split[start..start + ms.len()]
                };
                terms.push(w[t], slice);
            }
            if self.period == 1 {
                terms.sum_into(&mut dst[ms.clone()]);
            } else {
                let (block, tail) = std::mem::take(&mut rest).split_at_mut(ms.len());
                terms.sum_into(as_uninit(block));
                rest = tail;
            }
        }
        if self.period > 1 {
            self.spread(blocks, dst);
        }
    }

    /// Writes the runs' blocks (laid out by `row`, in run order) to their outputs
    /// o = phase + period·m. The two phases of period 2 (×2 up-sampling and its adjoint) are
    /// interleaved where both have sums, in a loop LLVM vectorizes; the rest go one by one.
    #[inline(always)]
    fn spread<T: CpuFloat>(&self, blocks: &[T], dst: &mut [MaybeUninit<T>]) {
        let p = self.period;
        let mut both = 0..0;
        if let [(0, r0, _), (1, r1, _)] = &self.runs[..] {
            if p == 2 {
                both = r0.start.max(r1.start)..r0.end.min(r1.end);
            }
            if !both.is_empty() {
                let n = both.len();
                let b0 = &blocks[both.start - r0.start..][..n];
                let b1 = &blocks[r0.len() + both.start - r1.start..][..n];
                let pairs = dst[2 * both.start..2 * both.end].chunks_exact_mut(2);
                for ((pair, &e), &o) in pairs.zip(b0).zip(b1) {
                    pair[0].write(e);
                    pair[1].write(o);
                }
            }
        }
        let mut start = 0;
        for (phase, ms, _) in &self.runs {
            let block = &blocks[start..][..ms.len()];
            start += ms.len();
            let (before, after) = if both.is_empty() {
                (ms.clone(), 0..0)
            } else {
                (ms.start..both.start.max(ms.start), both.end.min(ms.end)..ms.end)
            };
            for m in before.chain(after) {
                dst[phase + p * m].write(block[m - ms.start]);
            }
        }
    }
}

/// The forward with any kernel: every output pixel sums its kh·kw taps.
fn forward_direct<T: CpuFloat>(
    g: &FirGeom,
    x: &[T],
    f: &[T],
    kw: usize,
    ty: &TapLists,
    tx: &TapLists,
    out: &mut [T],
) {
    out.par_chunks_mut(g.oh * g.ow)
        .zip(x.par_chunks(g.h * g.w))
        .for_each(|(y, xp)| {
            for (oy, row) in y.chunks_mut(g.ow).enumerate() {
                for (ox, o) in row.iter_mut().enumerate() {
                    let mut acc = T::ZERO;
                    for &(fy, iy) in &ty[oy] {
                        for &(fx, ix) in &tx[ox] {
                            acc += f[fy * kw + fx] * xp[iy * g.w + ix];
                        }
                    }
                    *o = acc;
                }
            }
        });
}

/// dx[i] = Σ over the outputs o that read input i of f(tap)·dy[o].
pub(crate) fn upfirdn2d_backward<T: CpuFloat>(
    g: &FirGeom,
    dy: &[T],
    f: &[T],
    kh: usize,
    kw: usize,
    geom: UpFirDn,
) -> Vec<T> {
    let (ty, tx) = (taps(g.h, g.oh, kh, geom), taps(g.w, g.ow, kw, geom));
    let n = g.planes * g.h * g.w;
    if n == 0 || g.oh * g.ow == 0 {
        return vec![T::ZERO; n];
    }
    match separable(f, kh, kw) {
        // Written row by row, as the forward.
        Some((a, b)) => written_once(n, |dx| backward_separable(g, dy, &a, &b, &ty, &tx, dx)),
        None => {
            let mut dx = vec![T::ZERO; n];
            backward_direct(g, dy, f, kw, &ty, &tx, &mut dx);
            dx
        }
    }
}

/// The separable forward's adjoint: its two passes transposed, each a gather with the transposed
/// tap lists (for each input, the outputs that read it, in output order: the order in which a
/// scatter would add them). As in the forward, the row pass runs on the fewer rows: dY's when it
/// has fewer rows than dx (the adjoint of down-sampling), else dx's.
fn backward_separable<T: CpuFloat>(
    g: &FirGeom,
    dy: &[T],
    a: &[T],
    b: &[T],
    ty: &TapLists,
    tx: &TapLists,
    dx: &mut [MaybeUninit<T>],
) {
    let across_t = transpose_lists(tx, g.w);
    let across = Gather::new(&across_t);
    let down_t = transpose_lists(ty, g.h);
    let rows_first = g.oh < g.h;
    dx.par_chunks_mut(g.h * g.w)
        .zip(dy.par_chunks(g.oh * g.ow))
        .for_each_init(
            || (Vec::new(), Vec::new()),
            |(rows, tmp), (xp, yp)| {
                vectorized(
                    #[inline(always)]
                    || {
                        if rows_first {
                            // rows[oy] = the row adjoint of dY's row oy (w wide); then each dx row
                            // gathers the rows that its column taps read.
                            rows.resize(g.oh * g.w, T::ZERO);
                            for (yrow, hrow) in yp.chunks(g.ow).zip(rows.chunks_mut(g.w)) {
                                across.row(b, yrow, as_uninit(hrow), tmp);
                            }
                            for (xrow, tl) in xp.chunks_mut(g.w).zip(&down_t) {
                                column_sum(a, tl, rows, g.w, xrow);
                            }
                            return;
                        }
                        rows.resize(g.h * g.ow, T::ZERO);
                        for (hrow, tl) in rows.chunks_mut(g.ow).zip(&down_t) {
                            column_sum(a, tl, yp, g.ow, as_uninit(hrow));
                        }
                        for (xrow, hrow) in xp.chunks_mut(g.w).zip(rows.chunks(g.ow)) {
                            across.row(b, hrow, xrow, tmp);
                        }
                    },
                )
            },
        );
}

/// The direct forward's adjoint.
fn backward_direct<T: CpuFloat>(
    g: &FirGeom,
    dy: &[T],
    f: &[T],
    kw: usize,
    ty: &TapLists,
    tx: &TapLists,
    dx: &mut [T],
) {
    dx.par_chunks_mut(g.h * g.w)
        .zip(dy.par_chunks(g.oh * g.ow))
        .for_each(|(xp, yp)| {
            for (oy, row) in yp.chunks(g.ow).enumerate() {
                for (ox, &d) in row.iter().enumerate() {
                    for &(fy, iy) in &ty[oy] {
                        for &(fx, ix) in &tx[ox] {
                            xp[iy * g.w + ix] += f[fy * kw + fx] * d;
                        }
                    }
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(a: &[f64], b: &[f64]) -> f64 {
        let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
        let den: f64 = b.iter().map(|y| y * y).sum();
        (num / den.max(1e-300)).sqrt()
    }

    #[test]
    fn the_separable_passes_match_the_direct_sum() {
        let k1 = [1.0, 3.0, 3.0, 1.0];
        let f: Vec<f64> = (0..16).map(|i| k1[i / 4] * k1[i % 4] / 64.0).collect();
        assert!(separable(&f, 4, 4).is_some());
        let mut skew = f.clone();
        skew[5] += 0.01;
        assert!(
            separable(&skew, 4, 4).is_none(),
            "a kernel that is not an outer product"
        );
        // Upsampling ×2, downsampling ×2 and a plain blur, on odd sizes.
        // Widths of 9 (mostly edges) and 40 (a long regular interior, the vector loops).
        for ((up, down, pad0, pad1), (h, w)) in [(2, 1, 2, 1), (1, 2, 1, 1), (1, 1, 2, 1), (1, 1, 2, 2)]
            .into_iter()
            .flat_map(|geom| [(geom, (7, 9)), (geom, (6, 40))])
        {
            let geom = UpFirDn { up, down, pad0, pad1 };
            let (oh, ow) = (geom.out_size(h, 4), geom.out_size(w, 4));
            let g = FirGeom {
                planes: 3,
                h,
                w,
                oh,
                ow,
            };
            let x: Vec<f64> = (0..3 * h * w)
                .map(|i| ((i * 37 % 101) as f64 / 50.0) - 1.0)
                .collect();
            let dy: Vec<f64> = (0..3 * oh * ow)
                .map(|i| ((i * 53 % 97) as f64 / 48.0) - 1.0)
                .collect();
            let (ty, tx) = (taps(h, oh, 4, geom), taps(w, ow, 4, geom));
            let (a, b) = separable(&f, 4, 4).unwrap();
            let (mut fast, mut slow) = (vec![0.0; 3 * oh * ow], vec![0.0; 3 * oh * ow]);
            let fast_out = written_once(3 * oh * ow, |out| {
                forward_separable(&g, &x, &a, &b, &ty, &tx, out)
            });
            fast.copy_from_slice(&fast_out);
            forward_direct(&g, &x, &f, 4, &ty, &tx, &mut slow);
            assert!(rel(&fast, &slow) < 1e-14, "forward up {up} down {down}");
            let fast = written_once(3 * h * w, |dx| backward_separable(&g, &dy, &a, &b, &ty, &tx, dx));
            let mut slow = vec![0.0; 3 * h * w];
            backward_direct(&g, &dy, &f, 4, &ty, &tx, &mut slow);
            assert!(rel(&fast, &slow) < 1e-14, "backward up {up} down {down}");
        }
    }

    #[test]
    fn the_gathered_rows_are_bitwise_the_plain_per_output_sums() {
        // The models' 4 taps (the unrolled sums) and 6 (more terms than are unrolled).
        for b in [
            &[0.125f32, 0.375, 0.375, 0.125][..],
            &[0.05, 0.1, 0.35, 0.3, 0.15, 0.05],
        ] {
            rows_match_plain_sums(b);
        }
    }

    fn rows_match_plain_sums(b: &[f32]) {
        let k = b.len();
        for geom in [
            UpFirDn {
                up: 2,
                down: 1,
                pad0: 2,
                pad1: 1,
            },
            UpFirDn {
                up: 1,
                down: 2,
                pad0: 1,
                pad1: 1,
            },
            UpFirDn {
                up: 1,
                down: 1,
                pad0: 2,
                pad1: 2,
            },
        ] {
            for w in [3, 16, 33, 128] {
                let ow = geom.out_size(w, k);
                let src: Vec<f32> = (0..w).map(|i| ((i * 7919 % 211) as f32 / 37.0).sin()).collect();
                let lists = taps(w, ow, k, geom);
                let plain: Vec<f32> = lists
                    .iter()
                    .map(|l| l.iter().fold(0.0f32, |acc, &(t, i)| acc + b[t] * src[i]))
                    .collect();
                let (mut fast, mut tmp) = (vec![f32::NAN; ow], Vec::new());
                Gather::new(&lists).row(b, &src, as_uninit(&mut fast), &mut tmp);
                assert_eq!(fast, plain, "{geom:?} width {w}, {k} taps");
            }
        }
    }
}

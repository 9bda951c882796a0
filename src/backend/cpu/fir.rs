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
use rayon::prelude::*;

use super::float::CpuFloat;
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
    let mut out = vec![T::ZERO; g.planes * g.oh * g.ow];
    if out.is_empty() || g.h * g.w == 0 {
        return out;
    }
    match separable(f, kh, kw) {
        Some((a, b)) => forward_separable(g, x, &a, &b, &ty, &tx, &mut out),
        None => forward_direct(g, x, f, kw, &ty, &tx, &mut out),
    }
    out
}

type TapLists = [Vec<(usize, usize)>];

/// The forward with a kernel a ⊗ b: rows[iy][ox] = Σ b·x[iy][ix], then out[oy] = Σ a·rows[iy]
/// (whole rows).
fn forward_separable<T: CpuFloat>(
    g: &FirGeom,
    x: &[T],
    a: &[T],
    b: &[T],
    ty: &TapLists,
    tx: &TapLists,
    out: &mut [T],
) {
    out.par_chunks_mut(g.oh * g.ow)
        .zip(x.par_chunks(g.h * g.w))
        .for_each_init(Vec::new, |rows, (y, xp)| {
            rows.resize(g.h * g.ow, T::ZERO);
            for (xrow, hrow) in xp.chunks(g.w).zip(rows.chunks_mut(g.ow)) {
                for (o, tl) in hrow.iter_mut().zip(tx) {
                    *o = tl.iter().fold(T::ZERO, |acc, &(fx, ix)| acc + b[fx] * xrow[ix]);
                }
            }
            for (yrow, tl) in y.chunks_mut(g.ow).zip(ty) {
                for &(fy, iy) in tl {
                    let (w, src) = (a[fy], &rows[iy * g.ow..][..g.ow]);
                    for (o, &v) in yrow.iter_mut().zip(src) {
                        *o += w * v;
                    }
                }
            }
        });
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
    let mut dx = vec![T::ZERO; g.planes * g.h * g.w];
    if dx.is_empty() || g.oh * g.ow == 0 {
        return dx;
    }
    match separable(f, kh, kw) {
        Some((a, b)) => backward_separable(g, dy, &a, &b, &ty, &tx, &mut dx),
        None => backward_direct(g, dy, f, kw, &ty, &tx, &mut dx),
    }
    dx
}

/// The separable forward's adjoint: its two passes transposed, in reverse order.
fn backward_separable<T: CpuFloat>(
    g: &FirGeom,
    dy: &[T],
    a: &[T],
    b: &[T],
    ty: &TapLists,
    tx: &TapLists,
    dx: &mut [T],
) {
    dx.par_chunks_mut(g.h * g.w)
        .zip(dy.par_chunks(g.oh * g.ow))
        .for_each_init(Vec::new, |rows, (xp, yp)| {
            rows.clear();
            rows.resize(g.h * g.ow, T::ZERO);
            for (yrow, tl) in yp.chunks(g.ow).zip(ty) {
                for &(fy, iy) in tl {
                    let w = a[fy];
                    for (r, &d) in rows[iy * g.ow..][..g.ow].iter_mut().zip(yrow) {
                        *r += w * d;
                    }
                }
            }
            for (xrow, hrow) in xp.chunks_mut(g.w).zip(rows.chunks(g.ow)) {
                for (&d, tl) in hrow.iter().zip(tx) {
                    for &(fx, ix) in tl {
                        xrow[ix] += b[fx] * d;
                    }
                }
            }
        });
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
        for (up, down, pad0, pad1) in [(2, 1, 2, 1), (1, 2, 1, 1), (1, 1, 2, 1)] {
            let geom = UpFirDn { up, down, pad0, pad1 };
            let (h, w) = (7, 9);
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
            forward_separable(&g, &x, &a, &b, &ty, &tx, &mut fast);
            forward_direct(&g, &x, &f, 4, &ty, &tx, &mut slow);
            assert!(rel(&fast, &slow) < 1e-14, "forward up {up} down {down}");
            let (mut fast, mut slow) = (vec![0.0; 3 * h * w], vec![0.0; 3 * h * w]);
            backward_separable(&g, &dy, &a, &b, &ty, &tx, &mut fast);
            backward_direct(&g, &dy, &f, 4, &ty, &tx, &mut slow);
            assert!(rel(&fast, &slow) < 1e-14, "backward up {up} down {down}");
        }
    }
}

//! StyleGAN2 `upfirdn2d` and its exact adjoint. With U the zero-inserted input (U[u] = x[u/up] when
//! up divides u, else 0; length H·up) the output along one axis is
//!   out[o] = Σ_t f[k−1−t] · U[o·down + t − pad0],   t = 0..k,
//! i.e. pad (negative = crop), convolve with the flipped kernel, keep every `down`-th sample — the
//! same index arithmetic as score_sde's `upfirdn2d_native`. Both directions walk the same tap
//! lists, so the backward is the transpose of the forward by construction.
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
    out
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
    dx
}

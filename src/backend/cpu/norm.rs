//! GroupNorm (+ optional fused SiLU), forward and backward. Statistics take two passes (mean, then
//! centred squares); every sum (these, and the backward's dγ and dβ) runs in blocks in the element
//! type, the blocks added in f64 (`simd::block_sum`). Variance is biased (as PyTorch), eps inside
//! the sqrt; the backward's elementwise work runs in the element type.
use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::conv::SharedMut;
use super::float::CpuFloat;
use super::simd::{block_sum, vectorized};
use super::{written_once, written_once_each};
use std::borrow::Cow;

/// Shape of one GroupNorm call: x [n, c, hw] split into `groups` groups of c/groups channels.
#[derive(Clone, Copy, Debug)]
pub(crate) struct NormGeom {
    pub c: usize,
    pub hw: usize,
    pub groups: usize,
    pub eps: f64,
    pub silu: bool,
}

impl NormGeom {
    fn group_len(&self) -> usize {
        self.c / self.groups * self.hw
    }
}

/// Where a GroupNorm's input channels live: the parts of a channel concatenation, each
/// [N, C_i, HW] (one part: a plain tensor). A group that lies inside one part is read in place;
/// one that straddles two is gathered into a copy (same values, so the same results as the
/// concatenated tensor's).
pub(crate) struct ChannelParts<'a, T> {
    parts: Vec<(&'a [T], usize)>,
    hw: usize,
}

impl<'a, T: CpuFloat> ChannelParts<'a, T> {
    /// `parts`: (data, channels) of each part, in channel order.
    pub fn new(parts: Vec<(&'a [T], usize)>, hw: usize) -> Self {
        ChannelParts { parts, hw }
    }

    /// (part, its first channel, channels, offset in the group) of each run of the channels
    /// c0..c0 + cg of the concatenation inside one part.
    fn runs(&self, c0: usize, cg: usize) -> impl Iterator<Item = (usize, usize, usize, usize)> + '_ {
        let mut start = 0;
        self.parts.iter().enumerate().filter_map(move |(i, &(_, c))| {
            let (lo, hi) = (start.max(c0), (start + c).min(c0 + cg));
            let run = (lo < hi).then(|| (i, lo - start, hi - lo, (lo - c0) * self.hw));
            start += c;
            run
        })
    }

    /// Image img's channels c0..c0 + cg as one slice.
    fn group(&self, img: usize, c0: usize, cg: usize) -> Cow<'a, [T]> {
        let hw = self.hw;
        let mut runs = self.runs(c0, cg).peekable();
        let first = runs.next().expect("a group inside the concatenation");
        if runs.peek().is_none() {
            let (i, pc0, n, _) = first;
            let (x, c) = self.parts[i];
            return Cow::Borrowed(&x[(img * c + pc0) * hw..][..n * hw]);
        }
        let mut out = Vec::with_capacity(cg * hw);
        for (i, pc0, n, _) in std::iter::once(first).chain(runs) {
            let (x, c) = self.parts[i];
            out.extend_from_slice(&x[(img * c + pc0) * hw..][..n * hw]);
        }
        Cow::Owned(out)
    }
}

/// (mean, 1/sqrt(var + eps)) of one group's elements: two passes (mean, then centred squares),
/// each summed in blocks (`simd::block_sum`) over 16 f32 lanes and the block sums added in f64
/// (so a long group keeps f64 accuracy while the inner loop runs at the f32 vector width).
#[inline(always)]
fn stats<T: CpuFloat>(xs: &[T], eps: f64) -> (f64, f64) {
    let m = xs.len().max(1) as f64;
    let mean = block_sum(xs, |v| v) / m;
    let mean_t = T::from_f64(mean);
    let var = block_sum(xs, |v| {
        let d = v - mean_t;
        d * d
    }) / m;
    (mean, 1.0 / (var + eps).sqrt())
}

/// Each (sample, group)'s (mean, rstd), in order: what a recorded forward keeps for the backward
/// (`Backend::NormSaved` of the CPU), so the backward does not compute the statistics again.
pub(crate) type GroupStats = Vec<(f64, f64)>;

pub(crate) fn group_norm<T: CpuFloat>(
    g: &NormGeom,
    x: &[T],
    gamma: &[T],
    beta: &[T],
) -> (Vec<T>, GroupStats) {
    group_norm_parts(g, &ChannelParts::new(vec![(x, g.c)], g.hw), gamma, beta)
}

/// [`group_norm`] of the channel concatenation of `x`'s parts, without building it.
pub(crate) fn group_norm_parts<T: CpuFloat>(
    g: &NormGeom,
    x: &ChannelParts<'_, T>,
    gamma: &[T],
    beta: &[T],
) -> (Vec<T>, GroupStats) {
    let total = x.parts.iter().map(|p| p.0.len()).sum::<usize>();
    let len = g.group_len();
    if len == 0 {
        return (vec![T::ZERO; total], Vec::new());
    }
    let cg = g.c / g.groups;
    let mut stats_of_groups = Vec::new();
    // Every group's every channel plane is written below.
    let out = written_once(total, |out| {
        stats_of_groups = out
            .par_chunks_mut(len)
            .enumerate()
            .map(|(idx, y)| {
                let xs = x.group(idx / g.groups, (idx % g.groups) * cg, cg);
                let xs = &xs[..];
                vectorized(
                    #[inline(always)]
                    || {
                        let (mean, rstd) = stats(xs, g.eps);
                        let c0 = (idx % g.groups) * cg;
                        for (j, (yc, xc)) in y.chunks_mut(g.hw).zip(xs.chunks(g.hw)).enumerate() {
                            // y = x·a + b (one FMA) with a = rstd·γ, b = β − mean·rstd·γ.
                            let a = rstd * gamma[c0 + j].to_f64();
                            let (a, b) = (T::from_f64(a), T::from_f64(beta[c0 + j].to_f64() - mean * a));
                            if g.silu {
                                for (o, &v) in yc.iter_mut().zip(xc) {
                                    let z = v.mul_add(a, b);
                                    o.write(z * z.sigmoid());
                                }
                            } else {
                                for (o, &v) in yc.iter_mut().zip(xc) {
                                    o.write(v.mul_add(a, b));
                                }
                            }
                        }
                        (mean, rstd)
                    },
                )
            })
            .collect();
    });
    (out, stats_of_groups)
}

/// (dx, dγ, dβ). With z the affine output and dz = dy·SiLU'(z) (or dy), g = dz·γ:
/// dx = rstd·(g − mean(g) − x̂·mean(g·x̂)), dγ = Σ dz·x̂, dβ = Σ dz (and so Σ g = γ·dβ,
/// Σ g·x̂ = γ·dγ per channel).
/// `saved`: the forward's [`GroupStats`] (None: computed here).
pub(crate) fn group_norm_backward<T: CpuFloat>(
    g: &NormGeom,
    x: &[T],
    gamma: &[T],
    beta: &[T],
    dy: &[T],
    saved: Option<&[(f64, f64)]>,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let parts = ChannelParts::new(vec![(x, g.c)], g.hw);
    let (mut dx, dgamma, dbeta) = group_norm_parts_backward(g, &parts, gamma, beta, dy, saved);
    (dx.pop().expect("one part"), dgamma, dbeta)
}

/// [`group_norm_backward`] of the channel concatenation of `x`'s parts: dx comes back as one
/// tensor per part (no concatenated gradient to slice).
pub(crate) fn group_norm_parts_backward<T: CpuFloat>(
    g: &NormGeom,
    x: &ChannelParts<'_, T>,
    gamma: &[T],
    beta: &[T],
    dy: &[T],
    saved: Option<&[(f64, f64)]>,
) -> (Vec<Vec<T>>, Vec<T>, Vec<T>) {
    let len = g.group_len();
    if len == 0 {
        let dx = x.parts.iter().map(|p| vec![T::ZERO; p.0.len()]).collect();
        return (dx, vec![T::ZERO; g.c], vec![T::ZERO; g.c]);
    }
    let cg = g.c / g.groups;
    let n_groups = dy.len() / len;
    let lens: Vec<usize> = x.parts.iter().map(|p| p.0.len()).collect();
    // Each group's dx covers its channel planes, and the groups cover every channel of every part.
    let (dx, partial) = written_once_each(&lens, |bufs| {
        let dests: Vec<SharedMut<MaybeUninit<T>>> = bufs.iter_mut().map(|b| SharedMut::new(b)).collect();
        // Per (sample, group): the per-channel partial sums of dγ and dβ.
        (0..n_groups)
            .into_par_iter()
            .map(|idx| {
                let (img, c0) = (idx / g.groups, (idx % g.groups) * cg);
                let xs = x.group(img, c0, cg);
                let dys = &dy[idx * len..][..len];
                let runs: Vec<_> = x.runs(c0, cg).collect();
                // The group's dx straight into its part, or through a copy when it straddles two.
                let mut scratch = Vec::new();
                let dxs: &mut [MaybeUninit<T>] = if let [(i, pc0, _, _)] = runs[..] {
                    let c = x.parts[i].1;
                    // SAFETY: channels pc0..pc0 + cg of image img of part i belong to this group
                    // alone, so no other task writes them.
                    unsafe { std::slice::from_raw_parts_mut(dests[i].get().add((img * c + pc0) * g.hw), len) }
                } else {
                    scratch.resize(len, MaybeUninit::uninit());
                    &mut scratch
                };
                let sums = vectorized(
                    #[inline(always)]
                    || {
                        let stats_of_group = saved.map_or_else(|| stats(&xs, g.eps), |st| st[idx]);
                        group_backward(g, cg, c0, stats_of_group, gamma, beta, dxs, &xs, dys)
                    },
                );
                if runs.len() > 1 {
                    for (i, pc0, n, off) in runs {
                        let c = x.parts[i].1;
                        // SAFETY: as above, for this run of the group's channels.
                        let dst = unsafe {
                            std::slice::from_raw_parts_mut(
                                dests[i].get().add((img * c + pc0) * g.hw),
                                n * g.hw,
                            )
                        };
                        dst.copy_from_slice(&scratch[off..][..n * g.hw]);
                    }
                }
                sums
            })
            .collect::<Vec<(Vec<f64>, Vec<f64>)>>()
    });
    let (mut dgamma, mut dbeta) = (vec![0.0f64; g.c], vec![0.0f64; g.c]);
    for (idx, (dg, db)) in partial.iter().enumerate() {
        let c0 = (idx % g.groups) * cg;
        for j in 0..cg {
            dgamma[c0 + j] += dg[j];
            dbeta[c0 + j] += db[j];
        }
    }
    let conv = |v: Vec<f64>| v.into_iter().map(T::from_f64).collect::<Vec<T>>();
    (dx, conv(dgamma), conv(dbeta))
}

/// One (sample, group) of the backward: writes dx, returns the group's channels' (dγ, dβ).
/// The elementwise work runs in T (f32 in use), the sums in f64 over fixed lanes.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn group_backward<T: CpuFloat>(
    g: &NormGeom,
    cg: usize,
    c0: usize,
    (mean, rstd): (f64, f64),
    gamma: &[T],
    beta: &[T],
    dxs: &mut [MaybeUninit<T>],
    xs: &[T],
    dys: &[T],
) -> (Vec<f64>, Vec<f64>) {
    let (mean_t, rstd_t) = (T::from_f64(mean), T::from_f64(rstd));
    let (mut dgam, mut dbet) = (vec![0.0; cg], vec![0.0; cg]);
    let (mut sum_g, mut sum_gx) = (0.0f64, 0.0f64);
    // dz and dz·x̂ of one channel plane, summed after the elementwise loop: a loop with a
    // reduction inside does not vectorize, two plain ones do.
    let (mut dzs, mut dzx) = (vec![T::ZERO; g.hw], vec![T::ZERO; g.hw]);
    for j in 0..cg {
        let (gam, bet) = (gamma[c0 + j], beta[c0 + j]);
        let range = j * g.hw..(j + 1) * g.hw;
        let (dxc, xc, dyc) = (&mut dxs[range.clone()], &xs[range.clone()], &dys[range]);
        // dx holds g = dz·γ until the last pass.
        for ((((d, &xv), &dyv), dz_out), dzx_out) in
            dxc.iter_mut().zip(xc).zip(dyc).zip(&mut dzs).zip(&mut dzx)
        {
            let (dz, xhat) = dz_xhat(xv, dyv, mean_t, rstd_t, gam, bet, g.silu);
            d.write(dz * gam);
            *dz_out = dz;
            *dzx_out = dz * xhat;
        }
        dgam[j] = block_sum(&dzx, |v| v);
        dbet[j] = block_sum(&dzs, |v| v);
        sum_g += gam.to_f64() * dbet[j];
        sum_gx += gam.to_f64() * dgam[j];
    }
    // SAFETY: the loop above wrote every element of dxs (all cg channel planes of hw).
    let dxs = unsafe { &mut *(dxs as *mut [MaybeUninit<T>] as *mut [T]) };
    let m = xs.len() as f64;
    let (mg, mgx) = (T::from_f64(sum_g / m), T::from_f64(sum_gx / m));
    for (d, &xv) in dxs.iter_mut().zip(xs) {
        let xhat = (xv - mean_t) * rstd_t;
        *d = rstd_t * (-xhat).mul_add(mgx, *d - mg);
    }
    (dgam, dbet)
}

/// (dz, x̂) of one element: x̂ = (x − mean)·rstd, dz = dy·SiLU'(x̂·γ + β) (or dy without SiLU).
#[inline(always)]
fn dz_xhat<T: CpuFloat>(xv: T, dyv: T, mean: T, rstd: T, gam: T, bet: T, silu: bool) -> (T, T) {
    let xhat = (xv - mean) * rstd;
    let mut dz = dyv;
    if silu {
        let z = xhat.mul_add(gam, bet);
        let s = z.sigmoid();
        dz = dz * s * z.mul_add(T::ONE - s, T::ONE);
    }
    (dz, xhat)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The statistics of a long group far from zero (f32 block sums, f64 across blocks) against
    /// f64 two-pass sums: the mean and 1/σ stay far below f32 precision of the activations.
    #[test]
    fn f32_block_statistics_keep_f64_accuracy() {
        for (n, offset) in [(65_536 + 7, 100.0f32), (4099, -3.0), (5, 0.5)] {
            let xs: Vec<f32> = (0..n)
                .map(|i| offset + ((i * 7919 % 1000) as f32 / 500.0 - 1.0))
                .collect();
            let (mean, rstd) = stats(&xs, 1e-6);
            let m64 = xs.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
            let var64 = xs.iter().map(|&v| (v as f64 - m64).powi(2)).sum::<f64>() / n as f64;
            let r64 = 1.0 / (var64 + 1e-6).sqrt();
            assert!(((mean - m64) / m64).abs() < 1e-6, "n {n}: mean {mean} vs {m64}");
            assert!(((rstd - r64) / r64).abs() < 1e-5, "n {n}: rstd {rstd} vs {r64}");
        }
    }
}

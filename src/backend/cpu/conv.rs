//! Dense layers: `linear`, `nin` (per-pixel linear) and `conv2d`, forward and backward, all as
//! matrix products through `gemm`. Convolutions lower to im2col over tiles of output positions so
//! the column buffer stays small (a few MB) however large the image is.
use rayon::prelude::*;

use super::float::CpuFloat;
use super::matmul::{gemm, gemm_unchecked, Mat, Par};
use super::profile;
use crate::backend::shapes;

/// A raw pointer that parallel tasks share to write disjoint parts of one output buffer.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut<T>(*mut T);
// SAFETY: users only write disjoint index sets from different tasks (stated at each use).
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}
impl<T> SharedMut<T> {
    pub fn new(s: &mut [T]) -> Self {
        SharedMut(s.as_mut_ptr())
    }
    pub fn get(&self) -> *mut T {
        self.0
    }
}

// ---- linear ----------------------------------------------------------------------------------

/// x[N,I] · w[O,I]ᵀ + b → [N,O].
pub(crate) fn linear<T: CpuFloat>(x: &[T], w: &[T], b: Option<&[T]>, n: usize, i: usize, o: usize) -> Vec<T> {
    let _prof = profile::scope("gemm nin/linear", 2.0 * (n * i * o) as f64);
    let mut out = vec![T::ZERO; n * o];
    if let Some(b) = b {
        out.chunks_mut(o.max(1)).for_each(|row| row.copy_from_slice(b));
    }
    gemm(
        &mut out,
        0,
        o,
        Mat::rm(x, 0, n, i, i),
        Mat::rm_t(w, 0, i, o, i),
        T::ONE,
        b.is_some(),
        Par::Pool,
    );
    out
}

/// (dx [N,I], dw [O,I], db [O]) of `linear`.
pub(crate) fn linear_backward<T: CpuFloat>(
    x: &[T],
    w: &[T],
    dy: &[T],
    n: usize,
    i: usize,
    o: usize,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let _prof = profile::scope("gemm nin/linear", 4.0 * (n * i * o) as f64);
    let mut dx = vec![T::ZERO; n * i];
    gemm(
        &mut dx,
        0,
        i,
        Mat::rm(dy, 0, n, o, o),
        Mat::rm(w, 0, o, i, i),
        T::ONE,
        false,
        Par::Pool,
    );
    let mut dw = vec![T::ZERO; o * i];
    gemm(
        &mut dw,
        0,
        i,
        Mat::rm_t(dy, 0, o, n, o),
        Mat::rm(x, 0, n, i, i),
        T::ONE,
        false,
        Par::Pool,
    );
    let mut db = vec![T::ZERO; o];
    for row in dy.chunks(o.max(1)) {
        for (d, &v) in db.iter_mut().zip(row) {
            *d += v;
        }
    }
    (dx, dw, db)
}

// ---- NIN -------------------------------------------------------------------------------------

/// y[n,o,p] = Σ_c x[n,c,p]·w[c,o] + b[o]; x [N,C,P], w [C,O].
pub(crate) fn nin<T: CpuFloat>(x: &[T], w: &[T], b: &[T], n: usize, c: usize, o: usize, p: usize) -> Vec<T> {
    let _prof = profile::scope("gemm nin/linear", 2.0 * (n * c * o * p) as f64);
    let mut out = vec![T::ZERO; n * o * p];
    for img in 0..n {
        let y = &mut out[img * o * p..][..o * p];
        for (oc, row) in y.chunks_mut(p.max(1)).enumerate() {
            row.fill(b[oc]);
        }
        let xs = Mat::rm(x, img * c * p, c, p, p);
        gemm(y, 0, p, Mat::rm_t(w, 0, o, c, o), xs, T::ONE, true, Par::Pool);
    }
    out
}

/// (dx [N,C,P], dw [C,O], db [O]) of `nin`.
pub(crate) fn nin_backward<T: CpuFloat>(
    x: &[T],
    w: &[T],
    dy: &[T],
    n: usize,
    c: usize,
    o: usize,
    p: usize,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let _prof = profile::scope("gemm nin/linear", 4.0 * (n * c * o * p) as f64);
    let mut dx = vec![T::ZERO; n * c * p];
    let mut dw = vec![T::ZERO; c * o];
    for img in 0..n {
        let dys = Mat::rm(dy, img * o * p, o, p, p);
        gemm(
            &mut dx,
            img * c * p,
            p,
            Mat::rm(w, 0, c, o, o),
            dys,
            T::ONE,
            false,
            Par::Pool,
        );
        let xs = Mat::rm(x, img * c * p, c, p, p);
        let dyt = Mat::rm_t(dy, img * o * p, p, o, p);
        gemm(&mut dw, 0, o, xs, dyt, T::ONE, img > 0, Par::Pool);
    }
    let db = channel_sums(dy, n, o, p);
    (dx, dw, db)
}

/// Σ over batch and positions of a [N,C,P] tensor → [C].
pub(crate) fn channel_sums<T: CpuFloat>(y: &[T], n: usize, c: usize, p: usize) -> Vec<T> {
    (0..c)
        .into_par_iter()
        .map(|ch| {
            let mut acc = 0.0f64;
            for img in 0..n {
                acc += y[(img * c + ch) * p..][..p]
                    .iter()
                    .map(|v| v.to_f64())
                    .sum::<f64>();
            }
            T::from_f64(acc)
        })
        .collect()
}

// ---- conv2d ----------------------------------------------------------------------------------

/// The geometry of one conv2d: input [n,c,h,w], weight [o,c,kh,kw], output [n,o,oh,ow], as the
/// shared [`shapes::conv2d`] check validates it (so both backends accept the same calls).
pub(crate) type ConvGeom = shapes::Conv2d;

impl ConvGeom {
    /// Rows of the column matrix: one per (input channel, tap).
    pub fn k(&self) -> usize {
        self.c * self.kh * self.kw
    }
    /// Output positions per image.
    pub fn p(&self) -> usize {
        self.oh * self.ow
    }
    /// 1×1, stride 1, no padding: the input itself is the column matrix.
    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0
    }
    /// For column-matrix row r: (input channel, ky, kx).
    fn tap(&self, r: usize) -> (usize, usize, usize) {
        (r / (self.kh * self.kw), (r / self.kw) % self.kh, r % self.kw)
    }
    /// The range of output columns [lo, hi) within [ox0, ox1) whose input column ox·s + kx − pad
    /// lies inside the image.
    fn valid_ox(&self, kx: usize, ox0: usize, ox1: usize) -> (usize, usize) {
        let s = self.stride;
        // ox·s + kx ≥ pad  and  ox·s + kx < w + pad
        let lo = self.pad.saturating_sub(kx).div_ceil(s);
        let hi = (self.w + self.pad).saturating_sub(kx).div_ceil(s);
        let lo = lo.clamp(ox0, ox1);
        (lo, hi.clamp(lo, ox1))
    }
}

/// Column-matrix row r over output positions [q0, q1) of one image: dst[q − q0] is the input pixel
/// that tap r sees at output position q (0 in the padding).
fn im2col_row<T: CpuFloat>(g: &ConvGeom, x_img: &[T], r: usize, q0: usize, q1: usize, dst: &mut [T]) {
    let (c, ky, kx) = g.tap(r);
    let plane = &x_img[c * g.h * g.w..][..g.h * g.w];
    let mut q = q0;
    while q < q1 {
        let (oy, ox0) = (q / g.ow, q % g.ow);
        let ox1 = g.ow.min(ox0 + (q1 - q));
        let seg = &mut dst[q - q0..][..ox1 - ox0];
        let iy = (oy * g.stride + ky) as isize - g.pad as isize;
        if iy < 0 || iy >= g.h as isize {
            seg.fill(T::ZERO);
        } else {
            let row = &plane[iy as usize * g.w..][..g.w];
            let (lo, hi) = g.valid_ox(kx, ox0, ox1);
            seg[..lo - ox0].fill(T::ZERO);
            seg[hi - ox0..].fill(T::ZERO);
            let mid = &mut seg[lo - ox0..hi - ox0];
            if g.stride == 1 {
                let ix0 = lo + kx - g.pad;
                mid.copy_from_slice(&row[ix0..ix0 + mid.len()]);
            } else {
                for (j, d) in mid.iter_mut().enumerate() {
                    *d = row[(lo + j) * g.stride + kx - g.pad];
                }
            }
        }
        q += ox1 - ox0;
    }
}

/// The adjoint of `im2col_row`: add src[q − q0] into the input pixel that tap r sees.
fn col2im_row<T: CpuFloat>(g: &ConvGeom, plane: &mut [T], r: usize, q0: usize, q1: usize, src: &[T]) {
    let (_, ky, kx) = g.tap(r);
    let mut q = q0;
    while q < q1 {
        let (oy, ox0) = (q / g.ow, q % g.ow);
        let ox1 = g.ow.min(ox0 + (q1 - q));
        let iy = (oy * g.stride + ky) as isize - g.pad as isize;
        if iy >= 0 && iy < g.h as isize {
            let row = &mut plane[iy as usize * g.w..][..g.w];
            let (lo, hi) = g.valid_ox(kx, ox0, ox1);
            let seg = &src[q - q0 + lo - ox0..][..hi - lo];
            for (j, &v) in seg.iter().enumerate() {
                row[(lo + j) * g.stride + kx - g.pad] += v;
            }
        }
        q += ox1 - ox0;
    }
}

/// Fill the column matrix [K, q1−q0] of one image.
fn im2col<T: CpuFloat>(g: &ConvGeom, x_img: &[T], q0: usize, q1: usize, col: &mut [T], par: Par) {
    let nt = q1 - q0;
    match par {
        Par::Pool => col
            .par_chunks_mut(nt)
            .enumerate()
            .for_each(|(r, dst)| im2col_row(g, x_img, r, q0, q1, dst)),
        Par::Serial => col
            .chunks_mut(nt)
            .enumerate()
            .for_each(|(r, dst)| im2col_row(g, x_img, r, q0, q1, dst)),
    }
}

/// Output positions per column tile: the column tile holds about `bytes` bytes.
fn tile_positions<T>(k: usize, p: usize, bytes: usize) -> usize {
    (bytes / (k.max(1) * std::mem::size_of::<T>())).clamp(16, p.max(16))
}

/// Column tiles of about this size stay in a core's L2 cache (2 MB here) while gemm consumes them;
/// measured on the 2-core AVX-512 machine, 2–4 MB tiles run a 128-channel 3×3 conv at 128×128
/// about 10 % faster than 0.25–1 MB tiles and 2× faster than one big gemm split over the pool.
const FORWARD_TILE_BYTES: usize = 2 << 20;
/// Backward tiles are processed one at a time with gemm using every thread: make them larger.
const BACKWARD_TILE_BYTES: usize = 16 << 20;
/// Smallest block of output channels worth a task of its own.
const MIN_CHANNEL_BLOCK: usize = 16;

/// conv2d forward: out[n,o,q] = Σ_r w[o,r]·col_n[r,q] + b[o].
///
/// The work is (image, tile of output positions) tasks. With enough tasks to feed every thread,
/// tasks run in parallel, each doing its own im2col and a single-threaded gemm (the column tile
/// never leaves that core's cache). With few tasks (small images), tasks run in turn: im2col is
/// split over the pool, then the gemm is split into blocks of output channels, one per task —
/// gemm's own threading is about half as fast on these shapes.
pub(crate) fn conv2d<T: CpuFloat>(g: &ConvGeom, x: &[T], w: &[T], b: Option<&[T]>) -> Vec<T> {
    let (k, p, o) = (g.k(), g.p(), g.o);
    let img_in = g.c * g.h * g.w;
    // The column tiles are built inside the GEMM tasks (in cache), so this kind includes im2col.
    let _prof = profile::scope("gemm conv forward", 2.0 * (g.n * o * k * p) as f64);
    let mut out = vec![T::ZERO; g.n * o * p];
    if out.is_empty() {
        return out;
    }
    let threads = rayon::current_num_threads();
    let tile = tile_positions::<T>(k, p, FORWARD_TILE_BYTES);
    let tiles = p.div_ceil(tile);
    let out_ptr = SharedMut::new(&mut out);
    // One task: output channels [o0, o1) of (image, tile), from a ready column tile `rhs`.
    let block = |img: usize, q0: usize, nt: usize, o0: usize, o1: usize, rhs: Mat<'_, T>| {
        // SAFETY: the caller hands each (img, tile, channel block) to exactly one task, so the
        // rows out[img, o0..o1, q0..q0+nt] are written by this call only.
        let dst = unsafe { out_ptr.get().add((img * o + o0) * p + q0) };
        if let Some(b) = b {
            for (r, &bv) in b[o0..o1].iter().enumerate() {
                // SAFETY: as above; r·p + nt ≤ (o1 − o0)·p.
                unsafe { std::slice::from_raw_parts_mut(dst.add(r * p), nt).fill(bv) };
            }
        }
        let wmat = Mat::rm(w, o0 * k, o1 - o0, k, k);
        // SAFETY: as above.
        unsafe { gemm_unchecked(dst, p, wmat, rhs, T::ONE, b.is_some(), Par::Serial) };
    };
    let column_tile = |img: usize, q0: usize, q1: usize, col: &mut Vec<T>, par: Par| {
        let x_img = &x[img * img_in..][..img_in];
        if g.pointwise() {
            return;
        }
        col.resize(k * (q1 - q0), T::ZERO);
        im2col(g, x_img, q0, q1, col, par);
    };
    if threads > 1 && g.n * tiles < 2 * threads {
        let blocks = (2 * threads).min(o.div_ceil(MIN_CHANNEL_BLOCK)).max(1);
        let per = o.div_ceil(blocks);
        let mut col = Vec::new();
        for img in 0..g.n {
            for q0 in (0..p).step_by(tile) {
                let q1 = (q0 + tile).min(p);
                column_tile(img, q0, q1, &mut col, Par::Pool);
                let rhs = column_matrix(g, x, img, q0, q1 - q0, &col);
                (0..o.div_ceil(per)).into_par_iter().for_each(|bi| {
                    block(img, q0, q1 - q0, bi * per, ((bi + 1) * per).min(o), rhs);
                });
            }
        }
    } else {
        (0..g.n * tiles)
            .into_par_iter()
            .for_each_init(Vec::new, |col, task| {
                let (img, t) = (task / tiles, task % tiles);
                let (q0, q1) = (t * tile, ((t + 1) * tile).min(p));
                column_tile(img, q0, q1, col, Par::Serial);
                block(img, q0, q1 - q0, 0, o, column_matrix(g, x, img, q0, q1 - q0, col));
            });
    }
    out
}

/// The column matrix [K, nt] of (image, positions q0..q0+nt): the filled tile `col`, or for
/// pointwise convs the input itself.
fn column_matrix<'a, T>(
    g: &ConvGeom,
    x: &'a [T],
    img: usize,
    q0: usize,
    nt: usize,
    col: &'a [T],
) -> Mat<'a, T> {
    if g.pointwise() {
        Mat::rm(x, img * g.c * g.h * g.w + q0, g.k(), nt, g.p())
    } else {
        Mat::rm(col, 0, g.k(), nt, nt)
    }
}

/// (dx, dw, db) of conv2d. Per tile: dw += dy_tile · col_tileᵀ, dcol = wᵀ · dy_tile, then dcol is
/// scattered back into dx (col2im), parallel over input channels so no two threads add into the
/// same pixel.
pub(crate) fn conv2d_backward<T: CpuFloat>(
    g: &ConvGeom,
    x: &[T],
    w: &[T],
    dy: &[T],
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let (k, p, o) = (g.k(), g.p(), g.o);
    let (img_in, hw) = (g.c * g.h * g.w, g.h * g.w);
    let mut dx = vec![T::ZERO; g.n * img_in];
    let mut dw = vec![T::ZERO; o * k];
    let db = {
        let _prof = profile::scope("conv bias-grad", 0.0);
        channel_sums(dy, g.n, o, p)
    };
    if p == 0 {
        return (dx, dw, db);
    }
    let tile = tile_positions::<T>(k, p, BACKWARD_TILE_BYTES);
    let (mut col, mut dcol) = (Vec::new(), Vec::new());
    let mut first = true;
    for img in 0..g.n {
        let x_img = &x[img * img_in..][..img_in];
        for q0 in (0..p).step_by(tile) {
            let q1 = (q0 + tile).min(p);
            let nt = q1 - q0;
            let dy_t = Mat::rm(dy, img * o * p + q0, o, nt, p);
            let col_t = if g.pointwise() {
                Mat::rm_t(x_img, q0, nt, k, p)
            } else {
                let _prof = profile::scope("conv backward im2col", 0.0);
                col.resize(k * nt, T::ZERO);
                im2col(g, x_img, q0, q1, &mut col, Par::Pool);
                Mat::rm_t(&col, 0, nt, k, nt)
            };
            let tile_flops = 2.0 * (o * k * nt) as f64;
            {
                let _prof = profile::scope("gemm conv weight-grad", tile_flops);
                gemm(&mut dw, 0, k, dy_t, col_t, T::ONE, !first, Par::Pool);
            }
            first = false;
            let wt = Mat::rm_t(w, 0, k, o, k);
            if g.pointwise() {
                let _prof = profile::scope("gemm conv input-grad", tile_flops);
                gemm(&mut dx, img * img_in + q0, p, wt, dy_t, T::ONE, false, Par::Pool);
            } else if hw > 0 {
                dcol.resize(k * nt, T::ZERO);
                {
                    let _prof = profile::scope("gemm conv input-grad", tile_flops);
                    gemm(&mut dcol, 0, nt, wt, dy_t, T::ONE, false, Par::Pool);
                }
                let _prof = profile::scope("conv backward col2im", 0.0);
                let taps = g.kh * g.kw;
                dx[img * img_in..][..img_in]
                    .par_chunks_mut(hw)
                    .enumerate()
                    .for_each(|(c, plane)| {
                        for r in c * taps..(c + 1) * taps {
                            col2im_row(g, plane, r, q0, q1, &dcol[r * nt..][..nt]);
                        }
                    });
            }
        }
    }
    (dx, dw, db)
}

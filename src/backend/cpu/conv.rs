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
            if g.stride == 1 {
                // Contiguous in both: a plain slice add the compiler vectorises.
                let ix0 = lo + kx - g.pad;
                for (d, &v) in row[ix0..ix0 + seg.len()].iter_mut().zip(seg) {
                    *d += v;
                }
            } else {
                for (j, &v) in seg.iter().enumerate() {
                    row[(lo + j) * g.stride + kx - g.pad] += v;
                }
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
/// scattered back into dx (col2im). With a batch that feeds every thread, one image per task
/// ([`conv2d_backward_images`]); else image by image, each tile's products split over the pool and
/// col2im parallel over input channels so no two threads add into the same pixel.
pub(crate) fn conv2d_backward<T: CpuFloat>(
    g: &ConvGeom,
    x: &[T],
    w: &[T],
    dy: &[T],
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let (k, p, o) = (g.k(), g.p(), g.o);
    let img_in = g.c * g.h * g.w;
    let mut dx = vec![T::ZERO; g.n * img_in];
    let mut dw = vec![T::ZERO; o * k];
    let db = {
        let _prof = profile::scope("conv bias-grad", 0.0);
        channel_sums(dy, g.n, o, p)
    };
    if p == 0 {
        return (dx, dw, db);
    }
    if backward_per_image(g.n) {
        conv2d_backward_images(g, x, w, dy, &mut dx, &mut dw);
    } else {
        conv2d_backward_tiles(g, x, w, dy, &mut dx, &mut dw);
    }
    (dx, dw, db)
}

/// The conv backward one image at a time, each tile's GEMMs split over the pool (small batches).
fn conv2d_backward_tiles<T: CpuFloat>(g: &ConvGeom, x: &[T], w: &[T], dy: &[T], dx: &mut [T], dw: &mut [T]) {
    let (k, p, o) = (g.k(), g.p(), g.o);
    let (img_in, hw) = (g.c * g.h * g.w, g.h * g.w);
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
                gemm(dw, 0, k, dy_t, col_t, T::ONE, !first, Par::Pool);
            }
            first = false;
            let wt = Mat::rm_t(w, 0, k, o, k);
            if g.pointwise() {
                let _prof = profile::scope("gemm conv input-grad", tile_flops);
                gemm(dx, img * img_in + q0, p, wt, dy_t, T::ONE, false, Par::Pool);
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
}

/// `SRSDE_CPU_CONV_BACKWARD`: `images` (the default) runs the conv backward one image per task when
/// the batch can feed every thread; `tiles` keeps every image on the whole pool in turn (the
/// earlier route, for A/B benchmarks). Read once.
fn backward_per_image(n: usize) -> bool {
    static IMAGES: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let images =
        *IMAGES.get_or_init(|| std::env::var("SRSDE_CPU_CONV_BACKWARD").map_or(true, |v| v != "tiles"));
    images && rayon::current_num_threads() > 1 && n >= rayon::current_num_threads()
}

/// The conv backward with one image per task: each task builds its column tiles (sized for one
/// core's L2), runs dW_img += dY·colᵀ and dcol = Wᵀ·dY with single-threaded GEMMs, and scatters dcol
/// into its own image of dx. The small per-image products are about twice as fast on one core each
/// as split over the pool, and nothing waits on a barrier between tiles. dW is the sum of the
/// per-image dW in image order, so the result does not depend on the thread count.
fn conv2d_backward_images<T: CpuFloat>(g: &ConvGeom, x: &[T], w: &[T], dy: &[T], dx: &mut [T], dw: &mut [T]) {
    let (k, p, o) = (g.k(), g.p(), g.o);
    let (img_in, hw) = (g.c * g.h * g.w, g.h * g.w);
    let tile = tile_positions::<T>(k, p, FORWARD_TILE_BYTES);
    // With the profile on, each task clocks its parts (thread-seconds) and the caller's wall time is
    // shared out in proportion: [im2col, weight-grad GEMM, input-grad GEMM, col2im].
    let prof = profile::is_enabled();
    let started = std::time::Instant::now();
    let clock = |on: bool| on.then(std::time::Instant::now);
    let lap = |t: Option<std::time::Instant>, acc: &mut f64| {
        if let Some(t) = t {
            *acc += t.elapsed().as_secs_f64();
        }
    };
    let per_image: Vec<(Vec<T>, [f64; 4])> = dx
        .par_chunks_mut(img_in.max(1))
        .enumerate()
        .map(|(img, dx_img)| {
            let x_img = &x[img * img_in..][..img_in];
            let mut dw_img = vec![T::ZERO; o * k];
            let mut parts = [0.0f64; 4];
            let (mut col, mut dcol) = (Vec::new(), Vec::new());
            for q0 in (0..p).step_by(tile) {
                let q1 = (q0 + tile).min(p);
                let nt = q1 - q0;
                let dy_t = Mat::rm(dy, img * o * p + q0, o, nt, p);
                let t = clock(prof);
                let col_t = if g.pointwise() {
                    Mat::rm_t(x_img, q0, nt, k, p)
                } else {
                    col.resize(k * nt, T::ZERO);
                    im2col(g, x_img, q0, q1, &mut col, Par::Serial);
                    Mat::rm_t(&col, 0, nt, k, nt)
                };
                lap(t, &mut parts[0]);
                let t = clock(prof);
                gemm(&mut dw_img, 0, k, dy_t, col_t, T::ONE, q0 > 0, Par::Serial);
                lap(t, &mut parts[1]);
                let wt = Mat::rm_t(w, 0, k, o, k);
                let t = clock(prof);
                if g.pointwise() {
                    gemm(dx_img, q0, p, wt, dy_t, T::ONE, false, Par::Serial);
                    lap(t, &mut parts[2]);
                } else if hw > 0 {
                    dcol.resize(k * nt, T::ZERO);
                    gemm(&mut dcol, 0, nt, wt, dy_t, T::ONE, false, Par::Serial);
                    lap(t, &mut parts[2]);
                    let t = clock(prof);
                    let taps = g.kh * g.kw;
                    for (c, plane) in dx_img.chunks_mut(hw).enumerate() {
                        for r in c * taps..(c + 1) * taps {
                            col2im_row(g, plane, r, q0, q1, &dcol[r * nt..][..nt]);
                        }
                    }
                    lap(t, &mut parts[3]);
                }
            }
            (dw_img, parts)
        })
        .collect();
    for (dw_img, _) in &per_image {
        for (d, &v) in dw.iter_mut().zip(dw_img) {
            *d += v;
        }
    }
    if prof {
        let wall = started.elapsed().as_secs_f64();
        let mut parts = [0.0f64; 4];
        for (_, p) in &per_image {
            for (a, b) in parts.iter_mut().zip(p) {
                *a += b;
            }
        }
        let busy: f64 = parts.iter().sum::<f64>().max(1e-12);
        let gemm_flops = 2.0 * (g.n * o * k * p) as f64;
        let names = [
            ("conv backward im2col", 0.0),
            ("gemm conv weight-grad", gemm_flops),
            ("gemm conv input-grad", gemm_flops),
            ("conv backward col2im", 0.0),
        ];
        for ((name, flops), part) in names.into_iter().zip(parts) {
            profile::record(name, wall * part / busy, flops);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct f64 conv backward: dx[n,c,iy,ix] += w[o,c,ky,kx]·dy[n,o,oy,ox], dw += x·dy.
    fn reference(g: &ConvGeom, x: &[f32], w: &[f32], dy: &[f32]) -> (Vec<f64>, Vec<f64>) {
        let (mut dx, mut dw) = (vec![0.0; x.len()], vec![0.0; w.len()]);
        for n in 0..g.n {
            for o in 0..g.o {
                for oy in 0..g.oh {
                    for ox in 0..g.ow {
                        let d = dy[((n * g.o + o) * g.oh + oy) * g.ow + ox] as f64;
                        for c in 0..g.c {
                            for ky in 0..g.kh {
                                for kx in 0..g.kw {
                                    let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                                    let ix = (ox * g.stride + kx) as isize - g.pad as isize;
                                    if iy < 0 || ix < 0 || iy >= g.h as isize || ix >= g.w as isize {
                                        continue;
                                    }
                                    let xi = ((n * g.c + c) * g.h + iy as usize) * g.w + ix as usize;
                                    let wi = ((o * g.c + c) * g.kh + ky) * g.kw + kx;
                                    dx[xi] += w[wi] as f64 * d;
                                    dw[wi] += x[xi] as f64 * d;
                                }
                            }
                        }
                    }
                }
            }
        }
        (dx, dw)
    }

    fn rel(a: &[f32], b: &[f64]) -> f64 {
        let num: f64 = a.iter().zip(b).map(|(&a, &b)| (a as f64 - b).powi(2)).sum();
        let den: f64 = b.iter().map(|b| b * b).sum();
        (num / den.max(1e-30)).sqrt()
    }

    #[test]
    fn both_backward_routes_match_a_direct_reference() {
        let mut seed = 1u64;
        let mut rnd = |len: usize| -> Vec<f32> {
            (0..len)
                .map(|_| {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
                })
                .collect()
        };
        // 3×3 pad 1, 3×3 stride 2, 1×1 pointwise, 1×1 stride 2; batch 3 (odd, more than the threads).
        for (k, stride, pad) in [(3, 1, 1), (3, 2, 1), (1, 1, 0), (1, 2, 0)] {
            let g = shapes::conv2d("test", &[3, 5, 11, 9], &[7, 5, k, k], stride, pad).unwrap();
            let (x, w, dy) = (rnd(3 * 5 * 11 * 9), rnd(7 * 5 * k * k), rnd(3 * 7 * g.oh * g.ow));
            let (want_dx, want_dw) = reference(&g, &x, &w, &dy);
            let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
            // Both routes accumulate into zeroed buffers.
            let (mut dx, mut dw) = (vec![0.0; x.len()], vec![0.0; w.len()]);
            pool.install(|| conv2d_backward_tiles(&g, &x, &w, &dy, &mut dx, &mut dw));
            let (mut dx2, mut dw2) = (vec![0.0; x.len()], vec![0.0; w.len()]);
            pool.install(|| conv2d_backward_images(&g, &x, &w, &dy, &mut dx2, &mut dw2));
            for (name, got, want) in [
                ("dx", &dx, &want_dx),
                ("dw", &dw, &want_dw),
                ("dx images", &dx2, &want_dx),
                ("dw images", &dw2, &want_dw),
            ] {
                let e = rel(got, want);
                assert!(e < 1e-5, "k {k} stride {stride}: {name} rel err {e}");
            }
        }
    }
}

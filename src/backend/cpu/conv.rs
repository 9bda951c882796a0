//! Dense layers: `linear`, `nin` (per-pixel linear) and `conv2d`, forward and backward, all as
//! matrix products through `gemm`. Convolutions lower to im2col over tiles of output positions so
//! the column buffer stays small (a few MB) however large the image is.
use rayon::prelude::*;

use super::amx;
use super::float::CpuFloat;
use super::matmul::{gemm, gemm_unchecked, Mat, Par};
use super::profile;
use super::sgemm;
use super::simd::{block_sum, vectorized};
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
    /// A buffer not yet written (its users write every element before anything reads it).
    pub fn uninit(s: &mut [std::mem::MaybeUninit<T>]) -> Self {
        SharedMut(s.as_mut_ptr() as *mut T)
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

/// Whether a batch of `n` small products runs one image per task (serial GEMMs) rather than
/// image by image with each product split over the pool: per-image tasks when the batch feeds
/// every thread (the NIN products at 16×16 are ~2 MFLOP, too small to split well).
fn images_in_parallel(n: usize) -> bool {
    let threads = rayon::current_num_threads();
    threads > 1 && n >= threads
}

/// `f(img, par)` for every image of a batch of `n`, the results in image order: one image per
/// task with serial products when the batch feeds every thread, else image by image with each
/// product split over the pool (see [`images_in_parallel`]).
fn over_images<R: Send>(n: usize, f: impl Fn(usize, Par) -> R + Sync) -> Vec<R> {
    if images_in_parallel(n) {
        (0..n).into_par_iter().map(|img| f(img, Par::Serial)).collect()
    } else {
        (0..n).map(|img| f(img, Par::Pool)).collect()
    }
}

/// The per-image parts of a weight gradient (each `len` long) added up in image order, onto
/// zeros: the same sum whatever the number of threads that computed the parts.
fn sum_in_image_order<'a, T: CpuFloat>(len: usize, parts: impl IntoIterator<Item = &'a [T]>) -> Vec<T> {
    let mut total = vec![T::ZERO; len];
    for part in parts {
        for (d, &v) in total.iter_mut().zip(part) {
            *d += v;
        }
    }
    total
}

/// y[n,o,p] = Σ_c x[n,c,p]·w[c,o] + b[o]; x [N,C,P], w [C,O].
pub(crate) fn nin<T: CpuFloat>(x: &[T], w: &[T], b: &[T], n: usize, c: usize, o: usize, p: usize) -> Vec<T> {
    let _prof = profile::scope("gemm nin/linear", 2.0 * (n * c * o * p) as f64);
    per_image_outputs(n, o * p, |img, y, par| {
        for (oc, row) in y.chunks_mut(p.max(1)).enumerate() {
            row.fill(b[oc]);
        }
        let xs = Mat::rm(x, img * c * p, c, p, p);
        gemm(y, 0, p, Mat::rm_t(w, 0, o, c, o), xs, T::ONE, true, par);
    })
}

/// A batch's output [N, len], image img's part written whole by `one(img, part, par)` (which
/// must write every element before reading any: the part starts uninitialised, NaN in test
/// builds): one image per task when the batch feeds every thread (serial products), else image
/// by image on the pool.
fn per_image_outputs<T: CpuFloat>(n: usize, len: usize, one: impl Fn(usize, &mut [T], Par) + Sync) -> Vec<T> {
    if len == 0 {
        return Vec::new();
    }
    super::written_once(n * len, |out| {
        // SAFETY: `one` writes each element of its part before it reads it (its contract above).
        let out = unsafe { &mut *(out as *mut [std::mem::MaybeUninit<T>] as *mut [T]) };
        if images_in_parallel(n) {
            out.par_chunks_mut(len)
                .enumerate()
                .for_each(|(img, y)| one(img, y, Par::Serial));
        } else {
            for (img, y) in out.chunks_mut(len).enumerate() {
                one(img, y, Par::Pool);
            }
        }
    })
}

/// (dx [N,C,P], dw [C,O], db [O]) of `nin`. dx_img = W·dY_img; dW = Σ_img X_img·dY_imgᵀ with
/// dY_img transposed first (so both products read B along contiguous rows, the layout of the
/// f32 kernels), the images' dW summed in image order.
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
    let db = channel_sums(dy, n, o, p);
    if c * p == 0 || o == 0 {
        return (dx, vec![T::ZERO; c * o], db);
    }
    // Image img's dx (written whole) and its dW [C, O].
    let one = |img: usize, dx_img: &mut [T], par: Par| -> Vec<T> {
        let dys = Mat::rm(dy, img * o * p, o, p, p);
        gemm(dx_img, 0, p, Mat::rm(w, 0, c, o, o), dys, T::ONE, false, par);
        let mut dyt = vec![T::ZERO; p * o];
        transpose(&dy[img * o * p..][..o * p], o, p, &mut dyt);
        let mut dw_img = vec![T::ZERO; c * o];
        let xs = Mat::rm(x, img * c * p, c, p, p);
        gemm(
            &mut dw_img,
            0,
            o,
            xs,
            Mat::rm(&dyt, 0, p, o, o),
            T::ONE,
            false,
            par,
        );
        dw_img
    };
    let per_image: Vec<Vec<T>> = if images_in_parallel(n) {
        dx.par_chunks_mut(c * p)
            .enumerate()
            .map(|(img, dx_img)| one(img, dx_img, Par::Serial))
            .collect()
    } else {
        dx.chunks_mut(c * p)
            .enumerate()
            .map(|(img, dx_img)| one(img, dx_img, Par::Pool))
            .collect()
    };
    let dw = sum_in_image_order(c * o, per_image.iter().map(Vec::as_slice));
    (dx, dw, db)
}

/// A 1×1 conv (weight [O, ΣC_i] row-major, bias [O]) of the channel concatenation of `parts`
/// (each (x [N, C_i, P], C_i)), without building it: per image the output rows start at the bias
/// and each part adds its product with its columns of W (one GEMM per part over the same rows).
pub(crate) fn pointwise_parts<T: CpuFloat>(
    parts: &[(&[T], usize)],
    w: &[T],
    b: &[T],
    n: usize,
    o: usize,
    p: usize,
) -> Vec<T> {
    let ctot: usize = parts.iter().map(|part| part.1).sum();
    let _prof = profile::scope("gemm conv forward", 2.0 * (n * ctot * o * p) as f64);
    let one = |img: usize, y: &mut [T], par: Par| {
        for (oc, row) in y.chunks_mut(p.max(1)).enumerate() {
            row.fill(b[oc]);
        }
        let mut c0 = 0;
        for &(x, c) in parts {
            if c > 0 {
                let xs = Mat::rm(x, img * c * p, c, p, p);
                gemm(y, 0, p, Mat::rm(w, c0, o, c, ctot), xs, T::ONE, true, par);
            }
            c0 += c;
        }
    };
    per_image_outputs(n, o * p, one)
}

/// (dx of each part, dw [O, ΣC_i], db [O]) of [`pointwise_parts`]: each part's dx = W_iᵀ·dY
/// written whole (no concatenated gradient to slice), then dWᵀ = X·dYᵀ per part into its rows
/// (dY transposed first, as [`nin_backward`]), the images' dW summed in image order.
pub(crate) fn pointwise_parts_backward<T: CpuFloat>(
    parts: &[(&[T], usize)],
    w: &[T],
    dy: &[T],
    n: usize,
    o: usize,
    p: usize,
) -> (Vec<Vec<T>>, Vec<T>, Vec<T>) {
    let ctot: usize = parts.iter().map(|part| part.1).sum();
    let flops = 2.0 * (n * ctot * o * p) as f64;
    let db = {
        let _prof = profile::scope("conv bias-grad", 0.0);
        channel_sums(dy, n, o, p)
    };
    if ctot * p == 0 || o == 0 {
        let dx = parts.iter().map(|&(_, c)| vec![T::ZERO; n * c * p]).collect();
        return (dx, vec![T::ZERO; o * ctot], db);
    }
    let lens: Vec<usize> = parts.iter().map(|&(_, c)| n * c * p).collect();
    // Each part's dx is written whole by its per-image products (accumulate = false, which never
    // read the destination): no zero-fill first.
    let (dx, ()) = super::written_once_each(&lens, |bufs| {
        let _prof = profile::scope("gemm conv input-grad", flops);
        let dests: Vec<SharedMut<T>> = bufs.iter_mut().map(|b| SharedMut::uninit(b)).collect();
        over_images(n, |img, par| {
            let dys = Mat::rm(dy, img * o * p, o, p, p);
            let mut c0 = 0;
            for (i, &(_, c)) in parts.iter().enumerate() {
                if c > 0 {
                    // SAFETY: image img's planes of part i are written by this call only, and
                    // whole (a product that does not accumulate reads nothing there first; in
                    // test builds they start NaN, so an element it missed fails the checks).
                    let dx_img =
                        unsafe { std::slice::from_raw_parts_mut(dests[i].get().add(img * c * p), c * p) };
                    gemm(
                        dx_img,
                        0,
                        p,
                        Mat::rm_t(w, c0, c, o, ctot),
                        dys,
                        T::ONE,
                        false,
                        par,
                    );
                }
                c0 += c;
            }
        });
    });
    let _prof = profile::scope("gemm conv weight-grad", flops);
    // Image img's dWᵀ [ΣC_i, O].
    let one = |img: usize, par: Par| -> Vec<T> {
        let mut dyt = vec![T::ZERO; p * o];
        transpose(&dy[img * o * p..][..o * p], o, p, &mut dyt);
        let mut dwt = vec![T::ZERO; ctot * o];
        let mut c0 = 0;
        for &(x, c) in parts {
            if c > 0 {
                let xs = Mat::rm(x, img * c * p, c, p, p);
                gemm(
                    &mut dwt,
                    c0 * o,
                    o,
                    xs,
                    Mat::rm(&dyt, 0, p, o, o),
                    T::ONE,
                    false,
                    par,
                );
            }
            c0 += c;
        }
        dwt
    };
    let per_image = over_images(n, one);
    let dwt = sum_in_image_order(ctot * o, per_image.iter().map(Vec::as_slice));
    let mut dw = vec![T::ZERO; o * ctot];
    transpose(&dwt, ctot, o, &mut dw);
    (dx, dw, db)
}

/// Σ over batch and positions of a [N,C,P] tensor → [C].
pub(crate) fn channel_sums<T: CpuFloat>(y: &[T], n: usize, c: usize, p: usize) -> Vec<T> {
    (0..c)
        .into_par_iter()
        .map(|ch| {
            let mut acc = 0.0f64;
            for img in 0..n {
                let plane = &y[(img * c + ch) * p..][..p];
                acc += vectorized(
                    #[inline(always)]
                    || block_sum(plane, |v| v),
                );
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

/// Columns per panel of a column tile: the f32 kernels (`sgemm`) read B in panels of
/// [`sgemm::PANEL`] columns, each panel's K rows contiguous, so that a strip of B is one sequential
/// block (a plain [K, nt] tile walks K rows nt·4 bytes apart: a new page per row, which the
/// prefetchers do not follow). Without those kernels (f64, or no AVX2), one panel of all nt.
fn panel_width<T: 'static>(nt: usize) -> usize {
    if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>() && sgemm::isa() != sgemm::Isa::None {
        sgemm::PANEL
    } else {
        nt.max(1)
    }
}

/// Elements of a column tile of `nt` positions in panels of `pw`: every panel is K × pw (the
/// last one padded).
fn tile_len(k: usize, nt: usize, pw: usize) -> usize {
    nt.div_ceil(pw) * k * pw
}

/// Fill the column tile of one image for positions [q0, q1), in panels of `pw` columns:
/// panel j holds positions q0 + j·pw .. (+pw) as K rows of pw (see [`panel_width`]).
fn im2col<T: CpuFloat>(g: &ConvGeom, x_img: &[T], q0: usize, q1: usize, pw: usize, col: &mut [T], par: Par) {
    let (k, nt) = (g.k(), q1 - q0);
    let len = tile_len(k, nt, pw);
    if pw >= nt {
        let rows = col[..len].chunks_mut(pw).enumerate();
        let fill = |(r, row): (usize, &mut [T])| im2col_row(g, x_img, r, q0, q1, &mut row[..nt]);
        match par {
            Par::Pool => col[..len].par_chunks_mut(pw).enumerate().for_each(fill),
            Par::Serial => rows.for_each(fill),
        }
        return;
    }
    // Each row of the tile is gathered whole into `line` (in L1: the gather walks the image's
    // rows in long runs), then dealt out to the panels.
    let col = SharedMut::new(&mut col[..len]);
    let row = |line: &mut Vec<T>, r: usize| {
        line.resize(nt, T::ZERO);
        im2col_row(g, x_img, r, q0, q1, line);
        for (j, part) in line.chunks(pw).enumerate() {
            // SAFETY: row r of panel j is written by this call only; it lies inside col[..len].
            unsafe {
                let dst = col.get().add(j * k * pw + r * pw);
                std::ptr::copy_nonoverlapping(part.as_ptr(), dst, part.len());
            }
        }
    };
    match par {
        Par::Pool => (0..k).into_par_iter().for_each_init(Vec::new, row),
        Par::Serial => {
            let mut line = Vec::new();
            (0..k).for_each(|r| row(&mut line, r));
        }
    }
}

/// The B operand of a convolution's GEMMs for positions q0..q0+nt of one image: the input
/// itself (pointwise convs; rows P apart) or a column tile in panels.
#[derive(Clone, Copy)]
enum Cols<'a, T> {
    Input { x: &'a [T], off: usize, ld: usize },
    Panels { col: &'a [T], pw: usize },
}

impl<'a, T> Cols<'a, T> {
    /// (first position, B matrix [k, width]) of each panel over `nt` positions.
    fn panels(self, k: usize, nt: usize) -> impl Iterator<Item = (usize, Mat<'a, T>)> {
        let pw = match self {
            Cols::Input { .. } => nt.max(1),
            Cols::Panels { pw, .. } => pw,
        };
        (0..nt).step_by(pw).enumerate().map(move |(j, qa)| {
            let w = pw.min(nt - qa);
            let m = match self {
                Cols::Input { x, off, ld } => Mat::rm(x, off + qa, k, w, ld),
                Cols::Panels { col, pw } => Mat::rm(col, j * k * pw, k, w, pw),
            };
            (qa, m)
        })
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

/// What the forward conv adds to its product before writing it: a residual block's epilogue
/// ([`crate::backend::ConvEpilogue`] as slices).
#[derive(Clone, Copy, Default)]
pub(crate) struct Epilogue<'a, T> {
    /// [N, O]: added per sample and output channel.
    pub chan_bias: Option<&'a [T]>,
    /// (r, alpha, beta), r shaped like the output: out = alpha·(conv + biases) + beta·r.
    pub residual: Option<(&'a [T], T, T)>,
}

/// conv2d forward: out[n,o,q] = alpha·(Σ_r w[o,r]·col_n[r,q] + b[o] + cb[n,o]) + beta·res[n,o,q]
/// (see [`Epilogue`]; alpha = 1, beta = 0 without a residual).
///
/// The epilogue costs no pass of its own: each output row is first filled with alpha·(b + cb) +
/// beta·res, then the GEMM adds alpha·(W·col) onto it.
///
/// The work is (image, tile of output positions) tasks. With enough tasks to feed every thread,
/// tasks run in parallel, each doing its own im2col and a single-threaded gemm (the column tile
/// never leaves that core's cache). With few tasks (small images), tasks run in turn: im2col is
/// split over the pool, then the gemm is split into blocks of output channels, one per task —
/// gemm's own threading is about half as fast on these shapes.
pub(crate) fn conv2d<T: CpuFloat>(
    g: &ConvGeom,
    x: &[T],
    w: &[T],
    b: Option<&[T]>,
    epi: Epilogue<'_, T>,
    tiles: bool,
) -> Vec<T> {
    // The column tiles are built inside the GEMM tasks (in cache), so this kind includes im2col.
    conv2d_profiled("gemm conv forward", g, x, w, b, epi, tiles)
}

/// [`conv2d`], its time and FLOPs counted under the profile kind `kind`.
fn conv2d_profiled<T: CpuFloat>(
    kind: &'static str,
    g: &ConvGeom,
    x: &[T],
    w: &[T],
    b: Option<&[T]>,
    epi: Epilogue<'_, T>,
    tiles: bool,
) -> Vec<T> {
    let (k, p, o) = (g.k(), g.p(), g.o);
    let _prof = profile::scope(kind, 2.0 * (g.n * o * k * p) as f64);
    let len = g.n * o * p;
    let prefilled = b.is_some() || epi.chan_bias.is_some() || epi.residual.is_some();
    // Every output element is written once before anything reads it (with an epilogue: by its
    // task's `prefill`, then accumulated into; without: by the products, which then overwrite;
    // every (image, output channel, position) belongs to exactly one task), so the buffer needs
    // no zero-fill pass first (at 128×128 that pass costs as much memory traffic as the output).
    super::written_once(len, |out| {
        if len > 0 {
            conv2d_into(g, x, w, b, epi, prefilled, tiles, SharedMut::uninit(out));
        }
    })
}

/// The body of [`conv2d_profiled`]: writes every output element through `out_ptr`, which
/// holds no values yet.
#[allow(clippy::too_many_arguments)] // the conv's operands, its epilogue and its route
fn conv2d_into<T: CpuFloat>(
    g: &ConvGeom,
    x: &[T],
    w: &[T],
    b: Option<&[T]>,
    epi: Epilogue<'_, T>,
    prefilled: bool,
    amx_tiles: bool,
    out_ptr: SharedMut<T>,
) {
    let (k, p, o) = (g.k(), g.p(), g.o);
    let img_in = g.c * g.h * g.w;
    let threads = rayon::current_num_threads();
    let tile = tile_positions::<T>(k, p, FORWARD_TILE_BYTES);
    let tiles = p.div_ceil(tile);
    let (alpha, beta) = epi.residual.map_or((T::ONE, T::ZERO), |(_, a, b)| (a, b));
    // The epilogue's part of output channels [o0, o1) of (image, positions q0..q0+nt), written
    // before the product is added.
    let prefill = |img: usize, q0: usize, nt: usize, o0: usize, o1: usize| {
        // SAFETY: the caller hands each (img, tile, channel block) to exactly one task, so the
        // rows out[img, o0..o1, q0..q0+nt] are written by this call only.
        let dst = unsafe { out_ptr.get().add((img * o + o0) * p + q0) };
        if prefilled {
            for oc in o0..o1 {
                let mut bias = b.map_or(T::ZERO, |b| b[oc]);
                if let Some(cb) = epi.chan_bias {
                    bias += cb[img * o + oc];
                }
                // SAFETY: as above; (oc − o0)·p + nt ≤ (o1 − o0)·p.
                let row = unsafe { std::slice::from_raw_parts_mut(dst.add((oc - o0) * p), nt) };
                match epi.residual {
                    None => row.fill(bias),
                    Some((res, _, _)) => {
                        let bias = alpha * bias;
                        let res = &res[(img * o + oc) * p + q0..][..nt];
                        for (d, &r) in row.iter_mut().zip(res) {
                            *d = bias + beta * r;
                        }
                    }
                }
            }
        }
    };
    let on_tiles = tiles_apply::<T>(g, amx_tiles);
    if on_tiles || direct_applies::<T>(g) {
        conv2d_direct(g, x, w, alpha, &prefill, prefilled, on_tiles, out_ptr);
        return;
    }
    // One task: output channels [o0, o1) of (image, tile), from a ready column tile `cols`.
    let block = |img: usize, q0: usize, nt: usize, o0: usize, o1: usize, cols: Cols<'_, T>| {
        prefill(img, q0, nt, o0, o1);
        // SAFETY: as in `prefill`.
        let dst = unsafe { out_ptr.get().add((img * o + o0) * p + q0) };
        let wmat = Mat::rm(w, o0 * k, o1 - o0, k, k);
        for (qa, rhs) in cols.panels(k, nt) {
            // SAFETY: as above; qa + width ≤ nt.
            unsafe { gemm_unchecked(dst.add(qa), p, wmat, rhs, alpha, prefilled, Par::Serial) };
        }
    };
    let column_tile = |img: usize, q0: usize, q1: usize, col: &mut Vec<T>, par: Par| {
        let x_img = &x[img * img_in..][..img_in];
        if g.pointwise() {
            return;
        }
        let pw = panel_width::<T>(q1 - q0);
        col.resize(tile_len(k, q1 - q0, pw), T::ZERO);
        im2col(g, x_img, q0, q1, pw, col, par);
    };
    if threads > 1 && g.n * tiles < 2 * threads {
        let blocks = (2 * threads).min(o.div_ceil(MIN_CHANNEL_BLOCK)).max(1);
        let per = o.div_ceil(blocks);
        let mut col = Vec::new();
        for img in 0..g.n {
            for q0 in (0..p).step_by(tile) {
                let q1 = (q0 + tile).min(p);
                column_tile(img, q0, q1, &mut col, Par::Pool);
                let cols = column_matrix(g, x, img, q0, q1 - q0, &col);
                (0..o.div_ceil(per)).into_par_iter().for_each(|bi| {
                    block(img, q0, q1 - q0, bi * per, ((bi + 1) * per).min(o), cols);
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
}

/// Whether [`conv2d_direct`] runs this conv: f32 with the `sgemm` kernels, stride 1, a kernel
/// wider than 1 (pointwise convs read the input directly already), unless
/// `SRSDE_CPU_CONV_DIRECT=0` (A/B benchmarks). Read once.
fn direct_applies<T: 'static>(g: &ConvGeom) -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let on = *ON.get_or_init(|| std::env::var("SRSDE_CPU_CONV_DIRECT").map_or(true, |v| v != "0"));
    on && std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
        && sgemm::isa() != sgemm::Isa::None
        && g.stride == 1
        && !g.pointwise()
}

/// `s` as the f32 slice it is: for the paths that run only when T is f32 (the AMX route).
/// Panics for any other T.
fn as_f32<T: 'static>(s: &[T]) -> &[f32] {
    assert!(
        std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>(),
        "an f32-only path called with another element type"
    );
    // SAFETY: T is f32 (checked above): same layout, same length.
    unsafe { std::slice::from_raw_parts(s.as_ptr() as *const f32, s.len()) }
}

/// Whether a conv runs on the AMX tiles: asked for (`tiles`, the backend's bf16 setting), f32, and
/// a shape the tiles take. Independent of the f32 kernels' instruction set (`SRSDE_CPU_GEMM`).
fn tiles_apply<T: 'static>(g: &ConvGeom, tiles: bool) -> bool {
    tiles && std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>() && amx::applies(g)
}

/// From this output width on, [`conv2d_direct`] computes each output row in pieces written
/// straight into the output; narrower images would give the kernels strips too narrow to keep
/// their accumulators busy (16×16: 158 vs 202 GFLOP/s), so their panels run across rows.
const ROW_PANELS_MIN_WIDTH: usize = 32;

/// Bytes of the padded input slab a direct-conv task gathers.
const DIRECT_SLAB_BYTES: usize = 256 << 10;

/// A stride-1 convolution without im2col. A task (image, band of output rows, block of output
/// channels) copies the input rows its band reads into a zero-padded slab, each row `wp` = w +
/// 2·pad wide. In the slab's own coordinates q′ = row·wp + column, the input that tap (c, ky, kx)
/// sees at output q′ is slab[c·plane + ky·wp + kx + q′]: every tap's B row is one contiguous run of
/// the slab, so the `sgemm` kernels read B straight from it through a table of K row offsets —
/// one copy of the input instead of im2col's k·k. The product covers q′ in panels of
/// `sgemm::PANEL`, kw − 1 columns per row of which fall outside the output and are dropped when
/// the panel's result is added into the (prefilled) output rows.
#[allow(clippy::too_many_arguments)]
fn conv2d_direct<T: CpuFloat>(
    g: &ConvGeom,
    x: &[T],
    w: &[T],
    alpha: T,
    prefill: &(dyn Fn(usize, usize, usize, usize, usize) + Sync),
    prefilled: bool,
    on_tiles: bool,
    out: SharedMut<T>,
) {
    let (k, o) = (g.k(), g.o);
    let wp = g.w + 2 * g.pad;
    let threads = rayon::current_num_threads();
    // Output rows per band: a slab of about DIRECT_SLAB_BYTES, and enough tasks for the threads.
    let fit = (DIRECT_SLAB_BYTES / (4 * g.c * wp).max(1))
        .saturating_sub(g.kh - 1)
        .max(1);
    let mut band = fit.min(g.oh).max(1);
    while band > 1 && g.n * g.oh.div_ceil(band) < 2 * threads {
        band = band.div_ceil(2);
    }
    let bands = g.oh.div_ceil(band);
    let oblocks = if g.n * bands < 2 * threads {
        (2 * threads)
            .div_ceil(g.n * bands)
            .min(o.div_ceil(MIN_CHANNEL_BLOCK))
            .max(1)
    } else {
        1
    };
    let mut per = o.div_ceil(oblocks);
    if on_tiles {
        // The tiles take output channels 16 at a time.
        per = per.next_multiple_of(16);
    }
    let oblocks = o.div_ceil(per);
    let slab_rows = band + g.kh - 1;
    let plane = slab_rows * wp;
    let img_in = g.c * g.h * g.w;
    let tile_weights = on_tiles.then(|| amx::ConvWeights::new(g, as_f32(w), alpha.to_f32()));
    (0..g.n * bands * oblocks).into_par_iter().for_each_init(
        || {
            (
                Vec::<f32>::new(),
                Vec::<usize>::new(),
                Vec::<f32>::new(),
                Vec::<u16>::new(),
            )
        },
        |(slab, boff, tmp, pair_slab), task| {
            let (img, rest) = (task / (bands * oblocks), task % (bands * oblocks));
            let (bi, ob) = (rest / oblocks, rest % oblocks);
            let (oy0, oy1) = (bi * band, ((bi + 1) * band).min(g.oh));
            let (o0, o1) = (ob * per, ((ob + 1) * per).min(o));
            let rows = oy1 - oy0;
            if let Some(wts) = &tile_weights {
                let pair_plane =
                    amx::fill_pair_slab(g, &as_f32(x)[img * img_in..][..img_in], oy0, rows, pair_slab);
                prefill(img, oy0 * g.ow, rows * g.ow, o0, o1);
                // SAFETY: on_tiles checked the CPU, the permission and the shape; the task owns
                // rows oy0..oy1 of channels o0..o1 (multiples of 16: per is) of image img.
                unsafe {
                    amx::conv_band(
                        g,
                        wts,
                        pair_slab,
                        pair_plane,
                        rows,
                        (o0, o1),
                        out.get().add(img * o * g.p() + oy0 * g.ow) as *mut f32,
                        g.p(),
                        prefilled,
                    )
                };
                return;
            }
            fill_slab(g, &x[img * img_in..][..img_in], oy0, rows, plane, slab);
            tap_offsets(g, plane, boff);
            prefill(img, oy0 * g.ow, rows * g.ow, o0, o1);
            if g.ow >= ROW_PANELS_MIN_WIDTH {
                // Each output row in pieces of at most PANEL columns, straight into the (prefilled)
                // output: out[img, o0..o1, oy, col0..] (+)= alpha·W·B.
                for sr in 0..rows {
                    for col0 in (0..g.ow).step_by(sgemm::PANEL) {
                        let nw = sgemm::PANEL.min(g.ow - col0);
                        let at = (img * o + o0) * g.p() + (oy0 + sr) * g.ow + col0;
                        let product = sgemm::Product {
                            m: o1 - o0,
                            n: nw,
                            k,
                            a: w[o0 * k..].as_ptr() as *const f32,
                            rsa: k,
                            csa: 1,
                            aoff: std::ptr::null(),
                            b: slab[sr * wp + col0..].as_ptr(),
                            ldb: 0,
                            boff: boff.as_ptr(),
                            c: out.get().wrapping_add(at) as *mut f32,
                            ldc: g.p(),
                            alpha: alpha.to_f32(),
                            accumulate: prefilled,
                        };
                        // SAFETY: A is w's rows o0..o1 (k each); every B row read lies in the slab
                        // (tap offsets < c·plane + (kh−1)·wp + kw, plus sr·wp + col0 + nw ≤ rows·wp);
                        // C is columns col0..col0+nw of output row oy0+sr of channels o0..o1 of img,
                        // which this task alone writes (T is f32: direct_applies checked).
                        let done = unsafe { sgemm::run(&product) };
                        debug_assert!(done, "direct_applies checked the kernels");
                    }
                }
            } else {
                // Narrow images: panels of PANEL slab positions across rows (the kw − 1
                // out-of-image columns per row computed and dropped), through `tmp`.
                tmp.resize(per * sgemm::PANEL, 0.0);
                let span = rows * wp;
                for q0 in (0..span).step_by(sgemm::PANEL) {
                    let nw = sgemm::PANEL.min(span - q0);
                    let product = sgemm::Product {
                        m: o1 - o0,
                        n: nw,
                        k,
                        a: w[o0 * k..].as_ptr() as *const f32,
                        rsa: k,
                        csa: 1,
                        aoff: std::ptr::null(),
                        b: slab[q0..].as_ptr(),
                        ldb: 0,
                        boff: boff.as_ptr(),
                        c: tmp.as_mut_ptr(),
                        ldc: sgemm::PANEL,
                        alpha: 1.0,
                        accumulate: false,
                    };
                    // SAFETY: A is w's rows o0..o1 (k each); every B row read lies in the slab
                    // (offsets < c·plane + (kh−1)·wp + kw, plus q0 + nw ≤ rows·wp, within the slack);
                    // tmp holds (o1 − o0) rows of PANEL.
                    let done = unsafe { sgemm::run(&product) };
                    debug_assert!(done, "direct_applies checked the kernels");
                    // Add the panel's valid columns into out[img, o0..o1, ...].
                    let mut j = 0;
                    while j < nw {
                        let (sr, col) = ((q0 + j) / wp, (q0 + j) % wp);
                        let run = (wp - col).min(nw - j);
                        let valid = g.ow.saturating_sub(col).min(run);
                        if valid > 0 {
                            let at = (oy0 + sr) * g.ow + col;
                            for oc in o0..o1 {
                                let src = &tmp[(oc - o0) * sgemm::PANEL + j..][..valid];
                                // SAFETY: this task owns rows o0..o1 of the band oy0..oy1 of img.
                                let dst = unsafe {
                                    std::slice::from_raw_parts_mut(
                                        out.get().add((img * o + oc) * g.p() + at),
                                        valid,
                                    )
                                };
                                if prefilled {
                                    for (d, &v) in dst.iter_mut().zip(src) {
                                        *d += alpha * T::from_f32(v);
                                    }
                                } else {
                                    // The first write of these elements (0 + x, as a zeroed
                                    // output would have given).
                                    for (d, &v) in dst.iter_mut().zip(src) {
                                        *d = T::ZERO + alpha * T::from_f32(v);
                                    }
                                }
                            }
                        }
                        j += run;
                    }
                }
            }
        },
    );
}

/// The padded input rows oy0 − pad .. oy0 + rows − 1 − pad + kh − 1 of every channel of one image,
/// each w + 2·pad wide, channel planes `plane` apart (+ kw of slack for the dropped columns of
/// the last row): the slab of [`conv2d_direct`] and [`weight_grad_direct`]. Every element is
/// written once (padding, rows past the band's and the slack as zeros), so the buffer is reused
/// without being cleared first.
fn fill_slab<T: CpuFloat>(
    g: &ConvGeom,
    x_img: &[T],
    oy0: usize,
    rows: usize,
    plane: usize,
    slab: &mut Vec<f32>,
) {
    let wp = g.w + 2 * g.pad;
    slab.resize(g.c * plane + g.kw, 0.0);
    for (c, pl) in slab.chunks_exact_mut(plane).take(g.c).enumerate() {
        for (sr, row) in pl.chunks_exact_mut(wp).enumerate() {
            let iy = (oy0 + sr) as isize - g.pad as isize;
            if sr >= rows + g.kh - 1 || iy < 0 || iy >= g.h as isize {
                row.fill(0.0);
                continue;
            }
            padded_row(row, g.pad, &x_img[(c * g.h + iy as usize) * g.w..][..g.w], |v| {
                v.to_f32()
            });
        }
    }
    slab[g.c * plane..].fill(0.0);
}

/// One zero-padded slab row: `pad` zeros, `src` converted by `convert`, zeros to the row's end
/// (the f32 slabs here, the bf16 ones of the AMX route).
#[inline(always)]
pub(crate) fn padded_row<S: Copy, D: Copy + Default>(
    row: &mut [D],
    pad: usize,
    src: &[S],
    convert: impl Fn(S) -> D,
) {
    let (left, rest) = row.split_at_mut(pad);
    let (mid, right) = rest.split_at_mut(src.len());
    left.fill(D::default());
    for (d, &v) in mid.iter_mut().zip(src) {
        *d = convert(v);
    }
    right.fill(D::default());
}

/// Where each tap (c, ky, kx), in the weights' order, starts in a slab: c·plane + ky·wp + kx.
fn tap_offsets(g: &ConvGeom, plane: usize, offsets: &mut Vec<usize>) {
    let wp = g.w + 2 * g.pad;
    offsets.clear();
    for c in 0..g.c {
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                offsets.push(c * plane + ky * wp + kx);
            }
        }
    }
}

/// [dWᵀ; dbᵀ] [K + 1, O] (+)= Σ_q col[k, q]·dy[o, q] for one image of a stride-1 conv, without
/// im2col: in the slab of [`conv2d_direct`], row k of the column matrix is the slab run that starts
/// at tap k's offset, so the `sgemm` kernels read A (K rows) through the tap offsets and B = dy
/// transposed into slab coordinates ([span, O], zero rows at the dropped columns). Row K of A is
/// a run of ones after the slab: its product with dY is the bias gradient, in the same GEMM.
/// Bands of output rows as in the forward; `par` = Pool splits the K + 1 rows over the pool.
fn weight_grad_direct<T: CpuFloat>(
    g: &ConvGeom,
    x_img: &[T],
    dy_img: &[T],
    dwb_t: &mut [T],
    accumulate: bool,
    par: Par,
) {
    let (k, o) = (g.k(), g.o);
    let wp = g.w + 2 * g.pad;
    let band = (DIRECT_SLAB_BYTES / (4 * g.c.max(o) * wp).max(1))
        .saturating_sub(g.kh - 1)
        .clamp(1, g.oh.max(1));
    let plane = (band + g.kh - 1) * wp;
    let (mut slab, mut taps, mut dyp) = (Vec::new(), Vec::new(), Vec::<f32>::new());
    let c_ptr = SharedMut::new(dwb_t);
    for (bi, oy0) in (0..g.oh).step_by(band).enumerate() {
        let rows = band.min(g.oh - oy0);
        fill_slab(g, x_img, oy0, rows, plane, &mut slab);
        tap_offsets(g, plane, &mut taps);
        let span = rows * wp;
        // The bias row: `span` ones after the slab and its slack.
        taps.push(slab.len());
        slab.resize(slab.len() + span, 1.0);
        // Position-major dY: row (sr, col) of dyp holds the O channels' values there, the
        // dropped columns ow..wp of each slab row zeros; every element written once.
        dyp.resize(span * o, 0.0);
        for sr in 0..rows {
            let row = &mut dyp[sr * wp * o..][..wp * o];
            // SAFETY: T is f32 (direct_applies checked); the source is channels 0..o of output
            // row oy0 + sr of this image (ow each, p apart), the destination its ow·o values.
            unsafe {
                sgemm::transpose(
                    dy_img[(oy0 + sr) * g.ow..].as_ptr() as *const f32,
                    g.p(),
                    o,
                    g.ow,
                    row.as_mut_ptr(),
                    o,
                );
            }
            row[g.ow * o..].fill(0.0);
        }
        let product = |m0: usize, m1: usize| sgemm::Product {
            m: m1 - m0,
            n: o,
            k: span,
            a: slab.as_ptr(),
            rsa: 0,
            csa: 1,
            aoff: taps[m0..].as_ptr(),
            b: dyp.as_ptr(),
            ldb: o,
            boff: std::ptr::null(),
            c: c_ptr.get().wrapping_add(m0 * o) as *mut f32,
            ldc: o,
            alpha: 1.0,
            accumulate: accumulate || bi > 0,
        };
        let threads = rayon::current_num_threads();
        let parts = if par == Par::Pool {
            (2 * threads).min((k + 1).div_ceil(24)).max(1)
        } else {
            1
        };
        let per = (k + 1).div_ceil(parts);
        // SAFETY: A's rows are slab runs of `span` from the tap offsets (inside the slab with its
        // slack, as in conv2d_direct; the ones run is `span` long); B is dyp [span, O]; each part
        // writes rows m0..m1 of [dWᵀ; dbᵀ] (T is f32: direct_applies checked).
        let run = |m0: usize| unsafe {
            let done = sgemm::run(&product(m0, (m0 + per).min(k + 1)));
            debug_assert!(done, "direct_applies checked the kernels");
        };
        if parts > 1 {
            (0..k + 1).into_par_iter().step_by(per).for_each(run);
        } else {
            run(0);
        }
    }
}

/// (dW, db) of a stride-1 conv on the AMX tiles ([`amx::weight_grad_image`], bf16 operands): one
/// image per task when the batch feeds every thread, the images' parts added in image order.
fn weight_bias_grad_tiles<T: CpuFloat>(g: &ConvGeom, x: &[T], dy: &[T]) -> (Vec<T>, Vec<T>) {
    let (c, o, p, taps) = (g.c, g.o, g.p(), g.kh * g.kw);
    let img_in = c * g.h * g.w;
    let (x, dy) = (as_f32(x), as_f32(dy));
    let parts = over_images(g.n, |img, _| {
        let (mut acc, mut db) = (vec![0.0f32; taps * o * c], vec![0.0f64; o]);
        let mut bufs = amx::WeightGradBuffers::default();
        // SAFETY: the caller checked tiles_apply (amx::applies(g) on a backend that has the
        // tiles, so amx::available()); acc and db have the lengths weight_grad_image wants.
        unsafe {
            amx::weight_grad_image(
                g,
                &x[img * img_in..][..img_in],
                &dy[img * o * p..][..o * p],
                &mut acc,
                &mut db,
                &mut bufs,
            )
        };
        (acc, db)
    });
    // [tap][O][C] per image → dW [O, C, kh, kw], summed in image order.
    let mut dw = vec![T::ZERO; o * c * taps];
    let mut db = vec![0.0f64; o];
    for (acc, dbi) in &parts {
        for t in 0..taps {
            for oc in 0..o {
                for ic in 0..c {
                    dw[(oc * c + ic) * taps + t] += T::from_f32(acc[(t * o + oc) * c + ic]);
                }
            }
        }
        for (d, v) in db.iter_mut().zip(dbi) {
            *d += v;
        }
    }
    (dw, db.into_iter().map(T::from_f64).collect())
}

/// (dW, db) of a stride-1 conv through [`weight_grad_direct`]: one image per task when the batch
/// feeds every thread (each image's [K + 1, O] summed in image order), else image by image on the
/// whole pool.
fn weight_bias_grad_direct<T: CpuFloat>(g: &ConvGeom, x: &[T], dy: &[T], tiles: bool) -> (Vec<T>, Vec<T>) {
    let (k, o, p) = (g.k(), g.o, g.p());
    let img_in = g.c * g.h * g.w;
    let _prof = profile::scope("gemm conv weight-grad", 2.0 * (g.n * o * k * p) as f64);
    if tiles_apply::<T>(g, tiles) {
        return weight_bias_grad_tiles(g, x, dy);
    }
    let one = |img: usize, dwb_t: &mut [T], accumulate: bool, par: Par| {
        let (x_img, dy_img) = (&x[img * img_in..][..img_in], &dy[img * o * p..][..o * p]);
        weight_grad_direct(g, x_img, dy_img, dwb_t, accumulate, par)
    };
    let dwb_t = if backward_per_image(g.n) {
        let per_image: Vec<Vec<T>> = (0..g.n)
            .into_par_iter()
            .map(|img| {
                let mut part = vec![T::ZERO; (k + 1) * o];
                one(img, &mut part, false, Par::Serial);
                part
            })
            .collect();
        sum_in_image_order((k + 1) * o, per_image.iter().map(Vec::as_slice))
    } else {
        let mut dwb_t = vec![T::ZERO; (k + 1) * o];
        for img in 0..g.n {
            one(img, &mut dwb_t, img > 0, Par::Pool);
        }
        dwb_t
    };
    let mut dw = vec![T::ZERO; o * k];
    transpose(&dwb_t[..k * o], k, o, &mut dw);
    (dw, dwb_t[k * o..].to_vec())
}

/// The columns of (image, positions q0..q0+nt): the filled tile `col`, or for pointwise convs
/// the input itself.
fn column_matrix<'a, T: 'static>(
    g: &ConvGeom,
    x: &'a [T],
    img: usize,
    q0: usize,
    nt: usize,
    col: &'a [T],
) -> Cols<'a, T> {
    if g.pointwise() {
        Cols::Input {
            x,
            off: img * g.c * g.h * g.w + q0,
            ld: g.p(),
        }
    } else {
        Cols::Panels {
            col,
            pw: panel_width::<T>(nt),
        }
    }
}

/// (dx, dw, db) of conv2d.
///
/// dx, for stride-1 convs wider than 1×1, is itself a forward convolution: dy convolved with the
/// flipped, transposed kernel (padding k − 1 − pad) — see [`input_grad_as_conv`]; it runs on the
/// forward's path and writes dx directly. Their dW and db come from one GEMM over the input slab
/// ([`weight_bias_grad_direct`]) when the f32 kernels run them. Otherwise dW = Σ_tiles dy_tile ·
/// col_tileᵀ over column tiles built as in the forward, db is a channel sum, and dx of other convs
/// (1×1: one product per tile; stride 2: dcol = wᵀ · dy_tile scattered back by col2im). With a
/// batch that feeds every thread, one image per task ([`conv2d_backward_images`]); else image by
/// image, each tile's products split over the pool and col2im parallel over input channels so no
/// two threads add into the same pixel.
pub(crate) fn conv2d_backward<T: CpuFloat>(
    g: &ConvGeom,
    x: &[T],
    w: &[T],
    dy: &[T],
    tiles: bool,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let (k, p, o) = (g.k(), g.p(), g.o);
    let img_in = g.c * g.h * g.w;
    let as_conv = input_grad_by_conv(g);
    if p > 0 && as_conv && (direct_applies::<T>(g) || tiles_apply::<T>(g, tiles)) {
        // dx as a forward conv; dW and db from one GEMM over the slab: no im2col.
        let dx = input_grad_as_conv(g, w, dy, tiles);
        let (dw, db) = weight_bias_grad_direct(g, x, dy, tiles);
        return (dx, dw, db);
    }
    let mut dw = vec![T::ZERO; o * k];
    let db = {
        let _prof = profile::scope("conv bias-grad", 0.0);
        channel_sums(dy, g.n, o, p)
    };
    if p == 0 {
        return (vec![T::ZERO; g.n * img_in], dw, db);
    }
    let backward = |dx_scatter: Option<&mut [T]>, dw: &mut [T]| {
        if backward_per_image(g.n) {
            conv2d_backward_images(g, x, w, dy, dx_scatter, dw);
        } else {
            conv2d_backward_tiles(g, x, w, dy, dx_scatter, dw);
        }
    };
    let dx = if as_conv {
        let dx = input_grad_as_conv(g, w, dy, tiles);
        backward(None, &mut dw);
        dx
    } else if g.pointwise() {
        // A pointwise conv's dx is written whole by its per-tile products (accumulate = false,
        // which never read the destination): no zero-fill first.
        super::written_once(g.n * img_in, |buf| {
            // SAFETY: the products only write these elements (in test builds written_once has
            // NaN-poisoned them, so an element they missed fails the checks).
            let buf = unsafe { &mut *(buf as *mut [std::mem::MaybeUninit<T>] as *mut [T]) };
            backward(Some(buf), &mut dw);
        })
    } else {
        // col2im adds into dx.
        let mut dx = vec![T::ZERO; g.n * img_in];
        backward(Some(&mut dx), &mut dw);
        dx
    };
    (dx, dw, db)
}

/// Whether dx is computed as a forward conv ([`input_grad_as_conv`]): stride 1 with a kernel
/// wider than 1 (pointwise convs are one GEMM already), square, and pad < kernel, unless
/// `SRSDE_CPU_CONV_INPUT_GRAD=col2im` asks for the GEMM + col2im route (A/B benchmarks). Read once.
fn input_grad_by_conv(g: &ConvGeom) -> bool {
    static BY_CONV: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let on =
        *BY_CONV.get_or_init(|| std::env::var("SRSDE_CPU_CONV_INPUT_GRAD").map_or(true, |v| v != "col2im"));
    on && g.stride == 1 && !g.pointwise() && g.kh == g.kw && g.pad < g.kh
}

/// dx of a stride-1 conv as the forward conv dx = conv(dy, w′, pad k − 1 − pad) with
/// w′[c, o, ky, kx] = w[o, c, kh − 1 − ky, kw − 1 − kx]: every output pixel of the forward that
/// an input pixel fed, weighted by the tap that fed it. Same products as Wᵀ·dY + col2im, but the
/// columns are gathered (im2col, a copy) instead of scattered (col2im, a read-add-write of 9×
/// the image), and the forward's tiled, parallel GEMM path runs it.
fn input_grad_as_conv<T: CpuFloat>(g: &ConvGeom, w: &[T], dy: &[T], tiles: bool) -> Vec<T> {
    let (kh, kw, taps) = (g.kh, g.kw, g.kh * g.kw);
    let mut flipped = vec![T::ZERO; w.len()];
    for o in 0..g.o {
        for c in 0..g.c {
            let src = &w[(o * g.c + c) * taps..][..taps];
            let dst = &mut flipped[(c * g.o + o) * taps..][..taps];
            for ky in 0..kh {
                for kx in 0..kw {
                    dst[ky * kw + kx] = src[(kh - 1 - ky) * kw + (kw - 1 - kx)];
                }
            }
        }
    }
    let gt = ConvGeom {
        n: g.n,
        c: g.o,
        h: g.oh,
        w: g.ow,
        o: g.c,
        kh,
        kw,
        stride: 1,
        pad: kh - 1 - g.pad,
        oh: g.h,
        ow: g.w,
    };
    debug_assert_eq!(
        (gt.oh, gt.ow),
        (g.oh + 2 * gt.pad + 1 - kh, g.ow + 2 * gt.pad + 1 - kw)
    );
    conv2d_profiled(
        "gemm conv input-grad",
        &gt,
        dy,
        &flipped,
        None,
        Epilogue::default(),
        tiles,
    )
}

/// The conv backward one image at a time, each tile's GEMMs and col2im split over the pool (small
/// batches). `dx`: where dcol is scattered, None when dx is computed elsewhere.
fn conv2d_backward_tiles<T: CpuFloat>(
    g: &ConvGeom,
    x: &[T],
    w: &[T],
    dy: &[T],
    mut dx: Option<&mut [T]>,
    dw: &mut [T],
) {
    let img_in = g.c * g.h * g.w;
    let tile = tile_positions::<T>(g.k(), g.p(), BACKWARD_TILE_BYTES);
    let started = std::time::Instant::now();
    let mut parts = [0.0f64; 4];
    let mut dw_t = vec![T::ZERO; dw.len()];
    for img in 0..g.n {
        // dWᵀ accumulates over the whole batch in image order.
        let dx_img = dx.as_deref_mut().map(|dx| &mut dx[img * img_in..][..img_in]);
        backward_one_image(
            g,
            x,
            w,
            dy,
            img,
            dx_img,
            &mut dw_t,
            img > 0,
            tile,
            Par::Pool,
            &mut parts,
        );
    }
    transpose(&dw_t, g.k(), g.o, dw);
    record_backward_parts(g, started, parts);
}

/// `SRSDE_CPU_CONV_BACKWARD`: `images` (the default) runs the conv backward one image per task when
/// the batch can feed every thread; `tiles` keeps every image on the whole pool in turn (the
/// earlier route, for A/B benchmarks). Read once.
fn backward_per_image(n: usize) -> bool {
    static IMAGES: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let images =
        *IMAGES.get_or_init(|| std::env::var("SRSDE_CPU_CONV_BACKWARD").map_or(true, |v| v != "tiles"));
    images && images_in_parallel(n)
}

/// The conv backward with one image per task: each task builds its column tiles (sized for one
/// core's L2), runs dW_img += dY·colᵀ (and, with `dx`, dcol = Wᵀ·dY) with single-threaded GEMMs,
/// and scatters dcol into its own image of dx. The small per-image products are about twice as
/// fast on one core each as split over the pool, and nothing waits on a barrier between tiles. dW
/// is the sum of the per-image dW in image order.
fn conv2d_backward_images<T: CpuFloat>(
    g: &ConvGeom,
    x: &[T],
    w: &[T],
    dy: &[T],
    dx: Option<&mut [T]>,
    dw: &mut [T],
) {
    let img_in = g.c * g.h * g.w;
    let tile = tile_positions::<T>(g.k(), g.p(), FORWARD_TILE_BYTES);
    let started = std::time::Instant::now();
    let one = |img: usize, dx_img: Option<&mut [T]>| {
        let mut dw_img = vec![T::ZERO; dw.len()];
        let mut parts = [0.0f64; 4];
        backward_one_image(
            g,
            x,
            w,
            dy,
            img,
            dx_img,
            &mut dw_img,
            false,
            tile,
            Par::Serial,
            &mut parts,
        );
        (dw_img, parts)
    };
    let per_image: Vec<(Vec<T>, [f64; 4])> = match dx {
        Some(dx) => dx
            .par_chunks_mut(img_in.max(1))
            .enumerate()
            .map(|(img, dx_img)| one(img, Some(dx_img)))
            .collect(),
        None => (0..g.n).into_par_iter().map(|img| one(img, None)).collect(),
    };
    let mut parts = [0.0f64; 4];
    for (_, p) in &per_image {
        for (a, b) in parts.iter_mut().zip(p) {
            *a += b;
        }
    }
    let dw_t = sum_in_image_order(dw.len(), per_image.iter().map(|(dw_img, _)| dw_img.as_slice()));
    transpose(&dw_t, g.k(), g.o, dw);
    record_backward_parts(g, started, parts);
}

/// Image `img`'s share of the conv backward, tile by tile: dWᵀ [K, O] += col·dYᵀ (`accumulate`:
/// onto what `dw_t` holds already; else the first tile overwrites it) and, with `dx_img`, dcol =
/// Wᵀ·dY scattered into it. The weight gradient is computed transposed so that both GEMM operands
/// are read along contiguous rows (col's rows, and dY's tile transposed once per tile, O values a
/// row), the layout of the f32 kernels (`sgemm`). `par`: Pool splits each product and col2im over the pool, Serial keeps everything on
/// this thread. With the profile on, `parts` gathers this call's seconds of [im2col, weight-grad
/// GEMM, input-grad GEMM, col2im].
#[allow(clippy::too_many_arguments)]
fn backward_one_image<T: CpuFloat>(
    g: &ConvGeom,
    x: &[T],
    w: &[T],
    dy: &[T],
    img: usize,
    mut dx_img: Option<&mut [T]>,
    dw_t: &mut [T],
    accumulate: bool,
    tile: usize,
    par: Par,
    parts: &mut [f64; 4],
) {
    let (k, p, o) = (g.k(), g.p(), g.o);
    let (img_in, hw) = (g.c * g.h * g.w, g.h * g.w);
    let x_img = &x[img * img_in..][..img_in];
    let prof = profile::is_enabled();
    let mut timed = |part: usize, f: &mut dyn FnMut()| {
        let t = prof.then(std::time::Instant::now);
        f();
        if let Some(t) = t {
            parts[part] += t.elapsed().as_secs_f64();
        }
    };
    let (mut col, mut dcol, mut dyt) = (Vec::new(), Vec::new(), Vec::new());
    for q0 in (0..p).step_by(tile) {
        let q1 = (q0 + tile).min(p);
        let nt = q1 - q0;
        let dy_t = Mat::rm(dy, img * o * p + q0, o, nt, p);
        timed(1, &mut || {
            dyt.resize(nt * o, T::ZERO);
            transpose_strided(&dy[img * o * p + q0..], p, o, nt, &mut dyt, o);
        });
        let pw = panel_width::<T>(nt);
        if !g.pointwise() {
            timed(0, &mut || {
                col.resize(tile_len(k, nt, pw), T::ZERO);
                im2col(g, x_img, q0, q1, pw, &mut col, par);
            });
        }
        let cols = if g.pointwise() {
            Cols::Input {
                x: x_img,
                off: q0,
                ld: p,
            }
        } else {
            Cols::Panels { col: &col, pw }
        };
        timed(1, &mut || {
            for (qa, col_m) in cols.panels(k, nt) {
                let dyt_m = Mat::rm(&dyt, qa * o, col_m.cols, o, o);
                gemm(dw_t, 0, o, col_m, dyt_m, T::ONE, accumulate || q0 + qa > 0, par);
            }
        });
        let Some(dx_img) = dx_img.as_deref_mut() else {
            continue;
        };
        let wt = Mat::rm_t(w, 0, k, o, k);
        if g.pointwise() {
            timed(2, &mut || gemm(dx_img, q0, p, wt, dy_t, T::ONE, false, par));
        } else if hw > 0 {
            timed(2, &mut || {
                dcol.resize(k * nt, T::ZERO);
                gemm(&mut dcol, 0, nt, wt, dy_t, T::ONE, false, par);
            });
            let taps = g.kh * g.kw;
            let scatter = |(c, plane): (usize, &mut [T])| {
                for r in c * taps..(c + 1) * taps {
                    col2im_row(g, plane, r, q0, q1, &dcol[r * nt..][..nt]);
                }
            };
            timed(3, &mut || match par {
                // Parallel over input channels: no two threads add into the same pixel.
                Par::Pool => dx_img.par_chunks_mut(hw).enumerate().for_each(scatter),
                Par::Serial => dx_img.chunks_mut(hw).enumerate().for_each(scatter),
            });
        }
    }
}

/// dst [cols, rows] = srcᵀ for src [rows, cols].
fn transpose<T: CpuFloat>(src: &[T], rows: usize, cols: usize, dst: &mut [T]) {
    transpose_strided(src, cols, rows, cols, dst, rows);
}

/// dst[j·ld_dst + i] = src[i·ld_src + j] for i < rows, j < cols (f32 in 8×8 AVX blocks, see
/// `sgemm::transpose`; a copy, the same bits on every route).
fn transpose_strided<T: CpuFloat>(
    src: &[T],
    ld_src: usize,
    rows: usize,
    cols: usize,
    dst: &mut [T],
    ld_dst: usize,
) {
    if rows == 0 || cols == 0 {
        return;
    }
    assert!(
        (rows - 1) * ld_src + cols <= src.len() && (cols - 1) * ld_dst + rows <= dst.len(),
        "transpose: out of bounds"
    );
    if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>() {
        // SAFETY: T is f32; every index is inside the slices (checked above), distinct borrows.
        unsafe {
            sgemm::transpose(
                src.as_ptr() as *const f32,
                ld_src,
                rows,
                cols,
                dst.as_mut_ptr() as *mut f32,
                ld_dst,
            )
        };
        return;
    }
    for i in 0..rows {
        for j in 0..cols {
            dst[j * ld_dst + i] = src[i * ld_src + j];
        }
    }
}

/// Shares the wall time since `started` out among the backward's parts in proportion to their
/// measured (thread-)seconds, so the profile's rows add up to the caller's wall time.
fn record_backward_parts(g: &ConvGeom, started: std::time::Instant, parts: [f64; 4]) {
    let gemm_flops = 2.0 * (g.n * g.o * g.k() * g.p()) as f64;
    let input_grad_flops = if parts[2] > 0.0 { gemm_flops } else { 0.0 };
    profile::record_shares(
        started,
        parts.iter().sum(),
        &[
            ("conv backward im2col", parts[0], 0.0),
            ("gemm conv weight-grad", parts[1], gemm_flops),
            ("gemm conv input-grad", parts[2], input_grad_flops),
            ("conv backward col2im", parts[3], 0.0),
        ],
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `len` values in [−0.5, 0.5) from a 64-bit LCG (the same stream every run).
    fn uniform(seed: &mut u64, len: usize) -> Vec<f64> {
        (0..len)
            .map(|_| {
                *seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((*seed >> 40) as f64 / (1u64 << 24) as f64) - 0.5
            })
            .collect()
    }

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

    /// NIN forward and backward in f32 (per-image tasks, the f32 kernels, dY transposed in AVX
    /// blocks) against the same ops in f64, at an attention block's size and at batch 1 (the
    /// pool-split route).
    #[test]
    fn nin_in_f32_matches_f64() {
        let mut seed = 5u64;
        let mut rnd = |len: usize| uniform(&mut seed, len);
        let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for (n, c, o, p) in [(4, 64, 64, 256), (1, 24, 40, 100), (3, 9, 13, 37)] {
            let (x, w, b, dy) = (rnd(n * c * p), rnd(c * o), rnd(o), rnd(n * o * p));
            // The f64 run on the f32-rounded inputs: the reference.
            let r = |v: &[f64]| f32s(v).iter().map(|&x| x as f64).collect::<Vec<f64>>();
            let (x64, w64, b64, dy64) = (r(&x), r(&w), r(&b), r(&dy));
            let y64 = pool.install(|| nin(&x64, &w64, &b64, n, c, o, p));
            let (dx64, dw64, db64) = pool.install(|| nin_backward(&x64, &w64, &dy64, n, c, o, p));
            let y = pool.install(|| nin(&f32s(&x), &f32s(&w), &f32s(&b), n, c, o, p));
            let (dx, dw, db) = pool.install(|| nin_backward(&f32s(&x), &f32s(&w), &f32s(&dy), n, c, o, p));
            for (name, got, want) in [
                ("y", &y, &y64),
                ("dx", &dx, &dx64),
                ("dw", &dw, &dw64),
                ("db", &db, &db64),
            ] {
                let e = rel(got, want);
                assert!(e < 1e-5, "nin {n}×{c}→{o}×{p}: {name} rel err {e}");
            }
        }
    }

    #[test]
    fn both_backward_routes_match_a_direct_reference() {
        let mut seed = 1u64;
        let mut rnd =
            |len: usize| -> Vec<f32> { uniform(&mut seed, len).into_iter().map(|v| v as f32).collect() };
        // 3×3 pad 1, 3×3 stride 2, 1×1 pointwise, 1×1 stride 2, 3×3 unpadded (a smaller output);
        // batch 3 (odd, more than the threads); then a 3×3 conv whose weight gradient takes two
        // bands of rows.
        for (k, stride, pad, c, o, h, w_) in [
            (3, 1, 1, 5, 7, 11, 9),
            (3, 2, 1, 5, 7, 11, 9),
            (1, 1, 0, 5, 7, 11, 9),
            (1, 2, 0, 5, 7, 11, 9),
            (3, 1, 0, 5, 7, 11, 9),
            (3, 1, 1, 16, 16, 70, 64),
        ] {
            let g = shapes::conv2d("test", &[3, c, h, w_], &[o, c, k, k], stride, pad).unwrap();
            let (x, w, dy) = (rnd(3 * c * h * w_), rnd(o * c * k * k), rnd(3 * o * g.oh * g.ow));
            let (want_dx, want_dw) = reference(&g, &x, &w, &dy);
            let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
            // Both routes accumulate into zeroed buffers.
            let (mut dx, mut dw) = (vec![0.0; x.len()], vec![0.0; w.len()]);
            pool.install(|| conv2d_backward_tiles(&g, &x, &w, &dy, Some(&mut dx), &mut dw));
            let (mut dx2, mut dw2) = (vec![0.0; x.len()], vec![0.0; w.len()]);
            pool.install(|| conv2d_backward_images(&g, &x, &w, &dy, Some(&mut dx2), &mut dw2));
            // The public entry: dx as a forward conv of dy for stride 1, else by col2im.
            let (dx3, dw3, db3) = pool.install(|| conv2d_backward(&g, &x, &w, &dy, false));
            assert_eq!(input_grad_by_conv(&g), k == 3 && stride == 1);
            // db = Σ over images and positions of dY (on the direct route, a row of the GEMM).
            let p = g.oh * g.ow;
            let bias_ref = |n: usize| -> Vec<f64> {
                (0..o)
                    .map(|oc| {
                        (0..n)
                            .flat_map(|i| &dy[(i * o + oc) * p..][..p])
                            .map(|&v| v as f64)
                            .sum()
                    })
                    .collect()
            };
            let e = rel(&db3, &bias_ref(3));
            assert!(e < 1e-5, "k {k} stride {stride}: db rel err {e}");
            // Batch 1 takes the pool-split route.
            let g1 = ConvGeom { n: 1, ..g };
            let img_in = c * h * w_;
            let (dx1, dw1, db1) =
                pool.install(|| conv2d_backward(&g1, &x[..img_in], &w, &dy[..o * p], false));
            let (want_dx1, want_dw1) = reference(&g1, &x[..img_in], &w, &dy[..o * p]);
            assert!(
                rel(&dx1, &want_dx1) < 1e-5 && rel(&dw1, &want_dw1) < 1e-5 && rel(&db1, &bias_ref(1)) < 1e-5,
                "batch 1, k {k} stride {stride}"
            );
            for (name, got, want) in [
                ("dx", &dx, &want_dx),
                ("dw", &dw, &want_dw),
                ("dx images", &dx2, &want_dx),
                ("dw images", &dw2, &want_dw),
                ("dx entry", &dx3, &want_dx),
                ("dw entry", &dw3, &want_dw),
            ] {
                let e = rel(got, want);
                assert!(e < 1e-5, "k {k} stride {stride}: {name} rel err {e}");
            }
        }
    }

    #[test]
    fn the_epilogue_matches_the_separate_ops() {
        let mut seed = 7u64;
        let mut rnd =
            |len: usize| -> Vec<f32> { uniform(&mut seed, len).into_iter().map(|v| v as f32).collect() };
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        // Batch 1 (channel-block route) and batch 3 (tile route); 3×3 and 1×1.
        for (n, k, pad) in [(1, 3, 1), (3, 3, 1), (3, 1, 0)] {
            let g = shapes::conv2d("test", &[n, 5, 11, 9], &[7, 5, k, k], 1, pad).unwrap();
            let (x, w, b) = (rnd(n * 5 * 11 * 9), rnd(7 * 5 * k * k), rnd(7));
            let (cb, res) = (rnd(n * 7), rnd(n * 7 * g.oh * g.ow));
            let (alpha, beta) = (0.7f32, -1.3f32);
            let plain = pool.install(|| conv2d(&g, &x, &w, Some(&b), Epilogue::default(), false));
            let p = g.oh * g.ow;
            let want: Vec<f64> = (0..plain.len())
                .map(|i| {
                    let (img, oc) = (i / (7 * p), (i / p) % 7);
                    alpha as f64 * (plain[i] as f64 + cb[img * 7 + oc] as f64) + beta as f64 * res[i] as f64
                })
                .collect();
            let epi = Epilogue {
                chan_bias: Some(&cb),
                residual: Some((&res, alpha, beta)),
            };
            let fused = pool.install(|| conv2d(&g, &x, &w, Some(&b), epi, false));
            assert!(rel(&fused, &want) < 1e-6, "n {n} k {k}: {}", rel(&fused, &want));
            // Channel bias alone, no conv bias.
            let plain = pool.install(|| conv2d(&g, &x, &w, None, Epilogue::default(), false));
            let epi = Epilogue {
                chan_bias: Some(&cb),
                residual: None,
            };
            let fused = pool.install(|| conv2d(&g, &x, &w, None, epi, false));
            let want: Vec<f64> = (0..plain.len())
                .map(|i| plain[i] as f64 + cb[(i / (7 * p)) * 7 + (i / p) % 7] as f64)
                .collect();
            assert!(rel(&fused, &want) < 1e-6, "n {n} k {k}, channel bias only");
        }
    }

    /// The forward on every route (direct for stride 1, im2col panels for stride 2, the input
    /// itself for 1×1; tile and channel-block task splits) against a direct f64 sum.
    #[test]
    fn the_forward_matches_a_direct_sum() {
        let mut seed = 11u64;
        let mut rnd =
            |len: usize| -> Vec<f32> { uniform(&mut seed, len).into_iter().map(|v| v as f32).collect() };
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for (n, c, h, w, o, k, stride, pad) in [
            (3, 5, 11, 9, 7, 3, 1, 1),
            (1, 5, 11, 9, 7, 3, 1, 1),
            (2, 4, 13, 10, 20, 3, 1, 0),
            (1, 3, 40, 37, 5, 3, 1, 1),
            (2, 5, 11, 9, 7, 3, 2, 1),
            (2, 5, 11, 9, 7, 1, 1, 0),
        ] {
            let g = shapes::conv2d("test", &[n, c, h, w], &[o, c, k, k], stride, pad).unwrap();
            let (x, wt, b) = (rnd(n * c * h * w), rnd(o * c * k * k), rnd(o));
            let got = pool.install(|| conv2d(&g, &x, &wt, Some(&b), Epilogue::default(), false));
            let mut want = vec![0.0f64; got.len()];
            for img in 0..n {
                for oc in 0..o {
                    for oy in 0..g.oh {
                        for ox in 0..g.ow {
                            let mut acc = b[oc] as f64;
                            for ci in 0..c {
                                for ky in 0..k {
                                    for kx in 0..k {
                                        let iy = (oy * stride + ky) as isize - pad as isize;
                                        let ix = (ox * stride + kx) as isize - pad as isize;
                                        if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                            continue;
                                        }
                                        acc += wt[((oc * c + ci) * k + ky) * k + kx] as f64
                                            * x[((img * c + ci) * h + iy as usize) * w + ix as usize] as f64;
                                    }
                                }
                            }
                            want[((img * o + oc) * g.oh + oy) * g.ow + ox] = acc;
                        }
                    }
                }
            }
            let e = rel(&got, &want);
            assert!(
                e < 1e-6,
                "n {n} c {c} {h}x{w} o {o} k {k} stride {stride} pad {pad}: rel err {e}"
            );
        }
    }
}

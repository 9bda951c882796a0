//! The f32 GEMM kernels of the convolutions: C = alpha·A·B (+ C), where B's rows are contiguous
//! (a column tile, an input image, a transposed dY tile) and A is read one element at a time (any
//! strides), broadcast across a row of B.
//!
//! Why our own: the convolutions' products are short and wide (16–128 output channels, thousands
//! of positions), and their B operand is already laid out the way a register-blocked kernel reads
//! it, so `gemm`'s packing of B is a second copy of the column tile; and `gemm` runs its AVX2
//! kernels on AVX-512 CPUs unless built with nightly Rust. Here each call sweeps B in strips of
//! `NV` vectors (16 lanes on AVX-512, 8 on AVX2) and, for each strip, every block of `R` rows of A:
//! R·NV accumulators stay in registers for the whole inner dimension, each step loads NV vectors of
//! B once and broadcasts R scalars of A. The strip stays in L1/L2 while the row blocks reuse it.
//! Strips narrower than a vector are masked (AVX-512) or copied through a padded buffer (AVX2).
//!
//! `SRSDE_CPU_GEMM=crate` sends every product to `gemm` instead (A/B benchmarks); CPUs with
//! neither AVX-512F nor AVX2+FMA always use `gemm`.
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;
use std::sync::OnceLock;

/// Columns per panel of the convolutions' column tiles (three AVX-512 vectors, six AVX2 ones).
pub(crate) const PANEL: usize = 48;

/// The instruction set the kernels run with.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Isa {
    Avx512,
    Avx2,
    /// No kernel here: the caller uses `gemm`.
    None,
}

/// The kernels' instruction set on this CPU (after `SRSDE_CPU_GEMM`).
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let choice = std::env::var("SRSDE_CPU_GEMM").unwrap_or_default();
        detect(&choice)
    })
}

fn detect(choice: &str) -> Isa {
    if choice == "crate" {
        return Isa::None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        if choice != "avx2" && is_x86_feature_detected!("avx512f") {
            return Isa::Avx512;
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return Isa::Avx2;
        }
    }
    Isa::None
}

/// One product: C[m×n] (row stride `ldc`) = alpha·A·B, plus C's old value when `accumulate`;
/// A (m×k) element (i, p) at `a[i·rsa + p·csa]` (or `a[aoff[i] + p·csa]` when `aoff` is not
/// null), B (k×n) row p at `b[p·ldb ..][..n]`, or at
/// `b[boff[p] ..][..n]` when `boff` is not null (the direct convolution's rows: one input row
/// shifted by each tap, see `conv`).
#[derive(Clone, Copy)]
pub(crate) struct Product {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: *const f32,
    pub rsa: usize,
    pub csa: usize,
    /// Null, or m offsets of A's rows (then `rsa` is unused).
    pub aoff: *const usize,
    pub b: *const f32,
    pub ldb: usize,
    /// Null, or k offsets of B's rows (then `ldb` is unused).
    pub boff: *const usize,
    pub c: *mut f32,
    pub ldc: usize,
    pub alpha: f32,
    pub accumulate: bool,
}

/// Row i of A (its element 0).
#[inline(always)]
unsafe fn a_row(p: &Product, i: usize) -> *const f32 {
    if p.aoff.is_null() {
        p.a.add(i * p.rsa)
    } else {
        p.a.add(*p.aoff.add(i))
    }
}

/// Row kk of B (from the column `b` points at).
#[inline(always)]
unsafe fn b_row(p: &Product, b: *const f32, kk: usize) -> *const f32 {
    if p.boff.is_null() {
        b.add(kk * p.ldb)
    } else {
        b.add(*p.boff.add(kk))
    }
}

// SAFETY: a Product is handed to tasks that write disjoint column ranges of C (see `run_split`).
unsafe impl Send for Product {}
unsafe impl Sync for Product {}

impl Product {
    /// The columns [n0, n0 + n) of this product.
    fn columns(&self, n0: usize, n: usize) -> Product {
        // SAFETY (of later use): the offsets stay inside B's and C's rows.
        Product {
            n,
            b: self.b.wrapping_add(n0),
            c: self.c.wrapping_add(n0),
            ..*self
        }
    }
}

/// Runs `p` with this CPU's kernel; false (nothing done) when there is none.
///
/// # Safety
/// Every element of A, B and C that the product names must be valid (C for writes, and not
/// touched by another thread meanwhile).
pub(crate) unsafe fn run(p: &Product) -> bool {
    if p.m == 0 || p.n == 0 {
        return isa() != Isa::None;
    }
    match isa() {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => avx512::product(p),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => avx2::product(p),
        _ => return false,
    }
    true
}

/// [`run`] with the columns split into about `2·threads` parts on rayon's pool.
///
/// # Safety
/// As [`run`].
pub(crate) unsafe fn run_split(p: &Product) -> bool {
    if isa() == Isa::None {
        return false;
    }
    let threads = rayon::current_num_threads();
    // Parts of at least 64 columns, in whole 64-column units so strips are not split.
    let units = p.n.div_ceil(64);
    let parts = (2 * threads).min(units).max(1);
    if parts == 1 || p.m * p.k < 4096 {
        return run(p);
    }
    let per = units.div_ceil(parts) * 64;
    rayon::scope(|s| {
        for n0 in (0..p.n).step_by(per) {
            let part = p.columns(n0, per.min(p.n - n0));
            // SAFETY: each part writes its own columns of C.
            s.spawn(move |_| unsafe {
                run(&part);
            });
        }
    });
    true
}

/// dst[j·ld_dst + i] = src[i·ld_src + j] for i < rows, j < cols: dY's channel rows turned into the
/// position-major rows that the weight gradient's B operand reads. 8×8 blocks through AVX
/// registers where this CPU has the kernels, the edges (and other CPUs) one element at a time.
/// A copy: the same bits on every route.
///
/// # Safety
/// src[i·ld_src + j] readable and dst[j·ld_dst + i] writable for every i < rows, j < cols, and
/// the two not overlapping.
pub(crate) unsafe fn transpose(
    src: *const f32,
    ld_src: usize,
    rows: usize,
    cols: usize,
    dst: *mut f32,
    ld_dst: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if isa() != Isa::None {
        return transpose_avx(src, ld_src, rows, cols, dst, ld_dst);
    }
    transpose_scalar(src, ld_src, 0..rows, 0..cols, dst, ld_dst);
}

#[inline(always)]
unsafe fn transpose_scalar(
    src: *const f32,
    ld_src: usize,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    dst: *mut f32,
    ld_dst: usize,
) {
    for i in rows {
        for j in cols.clone() {
            *dst.add(j * ld_dst + i) = *src.add(i * ld_src + j);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn transpose_avx(
    src: *const f32,
    ld_src: usize,
    rows: usize,
    cols: usize,
    dst: *mut f32,
    ld_dst: usize,
) {
    let (r8, c8) = (rows / 8 * 8, cols / 8 * 8);
    for i0 in (0..r8).step_by(8) {
        for j0 in (0..c8).step_by(8) {
            let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(src.add((i0 + i) * ld_src + j0)));
            // Pairs of rows interleaved, then pairs of pairs, then the 128-bit halves swapped.
            let t: [__m256; 8] = std::array::from_fn(|i| {
                let (a, b) = (r[i / 2 * 2], r[i / 2 * 2 + 1]);
                if i % 2 == 0 {
                    _mm256_unpacklo_ps(a, b)
                } else {
                    _mm256_unpackhi_ps(a, b)
                }
            });
            let u = [
                _mm256_shuffle_ps::<0x44>(t[0], t[2]),
                _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
                _mm256_shuffle_ps::<0x44>(t[1], t[3]),
                _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
                _mm256_shuffle_ps::<0x44>(t[4], t[6]),
                _mm256_shuffle_ps::<0xEE>(t[4], t[6]),
                _mm256_shuffle_ps::<0x44>(t[5], t[7]),
                _mm256_shuffle_ps::<0xEE>(t[5], t[7]),
            ];
            for j in 0..4 {
                _mm256_storeu_ps(
                    dst.add((j0 + j) * ld_dst + i0),
                    _mm256_permute2f128_ps::<0x20>(u[j], u[j + 4]),
                );
                _mm256_storeu_ps(
                    dst.add((j0 + j + 4) * ld_dst + i0),
                    _mm256_permute2f128_ps::<0x31>(u[j], u[j + 4]),
                );
            }
        }
        transpose_scalar(src, ld_src, i0..i0 + 8, c8..cols, dst, ld_dst);
    }
    transpose_scalar(src, ld_src, r8..rows, 0..cols, dst, ld_dst);
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;

    /// Rows per block for strips of NV vectors: R·NV ≤ 24 accumulators of the 32 registers.
    const fn rows(nv: usize) -> usize {
        24 / nv
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn product(p: &Product) {
        // Strips as wide as the product needs, up to 3 vectors (48 columns).
        match p.n {
            0..=16 => strips::<1>(p, rows_nv1),
            17..=32 => strips::<2>(p, rows_nv2),
            _ => strips::<3>(p, rows_nv3),
        }
    }

    type Rows<const NV: usize> = unsafe fn(usize, &Product, usize, *const f32, *mut f32, &[__mmask16; NV]);

    #[inline(always)]
    unsafe fn strips<const NV: usize>(p: &Product, by_rows: Rows<NV>) {
        let width = 16 * NV;
        for n0 in (0..p.n).step_by(width) {
            let nw = width.min(p.n - n0);
            let masks: [__mmask16; NV] = std::array::from_fn(|v| {
                let lanes = nw.saturating_sub(16 * v).min(16);
                ((1u32 << lanes) - 1) as __mmask16
            });
            let (b, c) = (p.b.add(n0), p.c.add(n0));
            let mut m0 = 0;
            while m0 < p.m {
                let c = c.add(m0 * p.ldc);
                let left = p.m - m0;
                let r = rows(NV).min(left);
                by_rows(r, p, m0, b, c, &masks);
                m0 += r;
            }
        }
    }

    /// Dispatchers of a block of `r` rows to the kernel with R = r (a const, so the
    /// accumulators are registers), one per strip width.
    macro_rules! row_dispatch {
        ($name:ident, $nv:literal, $($n:literal)*) => {
            #[inline(always)]
            unsafe fn $name(r: usize, p: &Product, m0: usize, b: *const f32, c: *mut f32, masks: &[__mmask16; $nv]) {
                match r {
                    $($n => tile::<$n, $nv>(p, m0, b, c, masks),)*
                    _ => unreachable!("row block of {r}"),
                }
            }
        };
    }
    row_dispatch!(rows_nv1, 1, 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24);
    row_dispatch!(rows_nv2, 2, 1 2 3 4 5 6 7 8 9 10 11 12);
    row_dispatch!(rows_nv3, 3, 1 2 3 4 5 6 7 8);

    #[inline(always)]
    unsafe fn tile<const R: usize, const NV: usize>(
        p: &Product,
        m0: usize,
        b: *const f32,
        c: *mut f32,
        masks: &[__mmask16; NV],
    ) {
        let mut acc = [[_mm512_setzero_ps(); NV]; R];
        let rowp: [*const f32; R] = std::array::from_fn(|r| a_row(p, m0 + r));
        let mut off = 0;
        for kk in 0..p.k {
            let bp = b_row(p, b, kk);
            let bv: [__m512; NV] = std::array::from_fn(|v| _mm512_maskz_loadu_ps(masks[v], bp.add(16 * v)));
            for (row, &ap) in acc.iter_mut().zip(&rowp) {
                let av = _mm512_set1_ps(*ap.add(off));
                for v in 0..NV {
                    row[v] = _mm512_fmadd_ps(av, bv[v], row[v]);
                }
            }
            off += p.csa;
        }
        let alpha = _mm512_set1_ps(p.alpha);
        for (r, row) in acc.iter().enumerate() {
            for (v, &sum) in row.iter().enumerate() {
                let cp = c.add(r * p.ldc + 16 * v);
                let mut out = _mm512_mul_ps(sum, alpha);
                if p.accumulate {
                    out = _mm512_add_ps(_mm512_maskz_loadu_ps(masks[v], cp), out);
                }
                _mm512_mask_storeu_ps(cp, masks[v], out);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;

    /// Rows per block for strips of NV vectors: R·NV ≤ 12 accumulators of the 16 registers.
    const fn rows(nv: usize) -> usize {
        12 / nv
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn product(p: &Product) {
        match p.n {
            0..=8 => strips::<1>(p, rows_nv1),
            _ => strips::<2>(p, rows_nv2),
        }
    }

    #[inline(always)]
    unsafe fn strips<const NV: usize>(p: &Product, by_rows: Rows) {
        let width = 8 * NV;
        // A strip narrower than `width` is copied into zero-padded rows (AVX2 has no cheap
        // masked loads), computed in full and stored through a buffer.
        let mut b_pad: Vec<f32> = Vec::new();
        let mut c_pad: Vec<f32> = Vec::new();
        for n0 in (0..p.n).step_by(width) {
            let nw = width.min(p.n - n0);
            let mut b = p.b.add(n0);
            // The padded copy is a plain strip: rows `width` apart, no offset table.
            let mut strip = *p;
            if nw < width {
                b_pad.clear();
                b_pad.resize(p.k * width, 0.0);
                for kk in 0..p.k {
                    std::ptr::copy_nonoverlapping(b_row(p, b, kk), b_pad.as_mut_ptr().add(kk * width), nw);
                }
                b = b_pad.as_ptr();
                strip.ldb = width;
                strip.boff = std::ptr::null();
            }
            let p = &strip;
            let mut m0 = 0;
            while m0 < p.m {
                let r = rows(NV).min(p.m - m0);
                let c = p.c.add(n0 + m0 * p.ldc);
                if nw == width {
                    by_rows(r, p, m0, b, c, p.ldc, p.accumulate);
                } else {
                    c_pad.clear();
                    c_pad.resize(r * width, 0.0);
                    if p.accumulate {
                        for i in 0..r {
                            std::ptr::copy_nonoverlapping(
                                c.add(i * p.ldc),
                                c_pad.as_mut_ptr().add(i * width),
                                nw,
                            );
                        }
                    }
                    by_rows(r, p, m0, b, c_pad.as_mut_ptr(), width, p.accumulate);
                    for i in 0..r {
                        std::ptr::copy_nonoverlapping(c_pad.as_ptr().add(i * width), c.add(i * p.ldc), nw);
                    }
                }
                m0 += r;
            }
        }
    }

    macro_rules! row_dispatch {
        ($name:ident, $nv:literal, $($n:literal)*) => {
            #[allow(clippy::too_many_arguments)]
            #[inline(always)]
            unsafe fn $name(r: usize, p: &Product, m0: usize, b: *const f32, c: *mut f32, ldc: usize, accumulate: bool) {
                match r {
                    $($n => tile::<$n, $nv>(p, m0, b, c, ldc, accumulate),)*
                    _ => unreachable!("row block of {r}"),
                }
            }
        };
    }
    row_dispatch!(rows_nv1, 1, 1 2 3 4 5 6 7 8 9 10 11 12);
    row_dispatch!(rows_nv2, 2, 1 2 3 4 5 6);

    type Rows = unsafe fn(usize, &Product, usize, *const f32, *mut f32, usize, bool);

    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn tile<const R: usize, const NV: usize>(
        p: &Product,
        m0: usize,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
    ) {
        let mut acc = [[_mm256_setzero_ps(); NV]; R];
        let rowp: [*const f32; R] = std::array::from_fn(|r| a_row(p, m0 + r));
        let mut off = 0;
        for kk in 0..p.k {
            let bp = b_row(p, b, kk);
            let bv: [__m256; NV] = std::array::from_fn(|v| _mm256_loadu_ps(bp.add(8 * v)));
            for (row, &ap) in acc.iter_mut().zip(&rowp) {
                let av = _mm256_broadcast_ss(&*ap.add(off));
                for v in 0..NV {
                    row[v] = _mm256_fmadd_ps(av, bv[v], row[v]);
                }
            }
            off += p.csa;
        }
        let alpha = _mm256_set1_ps(p.alpha);
        for (r, row) in acc.iter().enumerate() {
            for (v, &sum) in row.iter().enumerate() {
                let cp = c.add(r * ldc + 8 * v);
                let mut out = _mm256_mul_ps(sum, alpha);
                if accumulate {
                    out = _mm256_add_ps(_mm256_loadu_ps(cp), out);
                }
                _mm256_storeu_ps(cp, out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every ISA this CPU has, against an f64 reference, over shapes that hit every row-block
    /// size and strip width, both strides of A, alpha and accumulate.
    #[test]
    fn kernels_match_a_reference_product() {
        let mut isas = vec![detect("")];
        if isas[0] == Isa::Avx512 {
            isas.push(detect("avx2"));
        }
        if isas[0] == Isa::None {
            println!("skipped: this CPU has neither AVX-512F nor AVX2+FMA");
            return;
        }
        let mut seed = 3u64;
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
        for &isa in &isas {
            for (m, n, k) in [
                (1, 1, 1),
                (3, 5, 7),
                (16, 300, 144),
                (25, 17, 9),
                (13, 33, 20),
                (24, 16, 50),
                (7, 49, 3),
            ] {
                for a_transposed in [false, true] {
                    for (alpha, accumulate) in [(1.0f32, false), (0.7, true)] {
                        let (a, b) = (rnd(m * k), rnd(k * (n + 3)));
                        let c0 = rnd(m * (n + 2));
                        let (rsa, csa) = if a_transposed { (1, m) } else { (k, 1) };
                        let mut c = c0.clone();
                        let p = Product {
                            m,
                            n,
                            k,
                            a: a.as_ptr(),
                            rsa,
                            csa,
                            aoff: std::ptr::null(),
                            b: b.as_ptr(),
                            ldb: n + 3,
                            boff: std::ptr::null(),
                            c: c.as_mut_ptr(),
                            ldc: n + 2,
                            alpha,
                            accumulate,
                        };
                        unsafe {
                            match isa {
                                Isa::Avx512 => avx512::product(&p),
                                Isa::Avx2 => avx2::product(&p),
                                Isa::None => unreachable!(),
                            }
                        }
                        for i in 0..m {
                            for j in 0..n + 2 {
                                let got = c[i * (n + 2) + j] as f64;
                                if j >= n {
                                    assert_eq!(
                                        got,
                                        c0[i * (n + 2) + j] as f64,
                                        "{isa:?}: column {j} past n written"
                                    );
                                    continue;
                                }
                                let dot: f64 = (0..k)
                                    .map(|p| a[i * rsa + p * csa] as f64 * b[p * (n + 3) + j] as f64)
                                    .sum();
                                let want = alpha as f64 * dot
                                    + if accumulate {
                                        c0[i * (n + 2) + j] as f64
                                    } else {
                                        0.0
                                    };
                                assert!(
                                    (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                                    "{isa:?} m {m} n {n} k {k} at ({i},{j}): {got} vs {want}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// The transpose moves every element where it belongs, over shapes with and without 8×8
    /// blocks and edges, on this CPU's route and the scalar one.
    #[test]
    fn transpose_puts_every_element_in_place() {
        for (rows, cols) in [(1, 1), (8, 8), (16, 128), (13, 21), (3, 40), (64, 7)] {
            let (ld_src, ld_dst) = (cols + 3, rows + 2);
            let src: Vec<f32> = (0..rows * ld_src).map(|v| v as f32).collect();
            let mut dst = vec![-1.0f32; cols * ld_dst];
            let mut plain = dst.clone();
            unsafe {
                transpose(src.as_ptr(), ld_src, rows, cols, dst.as_mut_ptr(), ld_dst);
                transpose_scalar(src.as_ptr(), ld_src, 0..rows, 0..cols, plain.as_mut_ptr(), ld_dst);
            }
            for j in 0..cols {
                for i in 0..ld_dst {
                    let want = if i < rows { src[i * ld_src + j] } else { -1.0 };
                    assert_eq!(dst[j * ld_dst + i], want, "{rows}×{cols} at ({j},{i})");
                }
            }
            assert_eq!(dst, plain);
        }
    }

    /// B's rows through an offset table (rows out of order and overlapping).
    #[test]
    fn offset_rows_are_read_where_the_table_says() {
        let mut isas = vec![detect("")];
        if isas[0] == Isa::Avx512 {
            isas.push(detect("avx2"));
        }
        if isas[0] == Isa::None {
            println!("skipped: this CPU has neither AVX-512F nor AVX2+FMA");
            return;
        }
        let (m, n, k) = (10, 37, 6);
        let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 - 3.0).collect();
        let b: Vec<f32> = (0..200).map(|i| (i % 11) as f32 * 0.5).collect();
        let boff: Vec<usize> = vec![90, 3, 47, 3, 120, 0];
        for &isa in &isas {
            let mut c = vec![0.0f32; m * n];
            let p = Product {
                m,
                n,
                k,
                a: a.as_ptr(),
                rsa: k,
                csa: 1,
                aoff: std::ptr::null(),
                b: b.as_ptr(),
                ldb: 0,
                boff: boff.as_ptr(),
                c: c.as_mut_ptr(),
                ldc: n,
                alpha: 1.0,
                accumulate: false,
            };
            unsafe {
                match isa {
                    Isa::Avx512 => avx512::product(&p),
                    Isa::Avx2 => avx2::product(&p),
                    Isa::None => unreachable!(),
                }
            }
            for i in 0..m {
                for j in 0..n {
                    let want: f32 = (0..k).map(|kk| a[i * k + kk] * b[boff[kk] + j]).sum();
                    assert_eq!(c[i * n + j], want, "{isa:?} ({i},{j})");
                }
            }
        }
    }
}

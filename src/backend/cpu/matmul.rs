//! A bounds-checked front for the `gemm` crate's strided matrix product.
use gemm::Parallelism;

use super::float::CpuFloat;
use super::sgemm;

/// A strided matrix view into a slice: element (i, j) is `data[off + i·rs + j·cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a, T> {
    pub data: &'a [T],
    pub off: usize,
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a, T> Mat<'a, T> {
    /// Row-major `rows × cols` matrix starting at `off` with row stride `rs`.
    pub fn rm(data: &'a [T], off: usize, rows: usize, cols: usize, rs: usize) -> Self {
        Mat {
            data,
            off,
            rows,
            cols,
            rs,
            cs: 1,
        }
    }
    /// The transpose of a row-major `cols × rows` matrix (same memory, strides swapped).
    pub fn rm_t(data: &'a [T], off: usize, rows: usize, cols: usize, stored_rs: usize) -> Self {
        Mat {
            data,
            off,
            rows,
            cols,
            rs: 1,
            cs: stored_rs,
        }
    }
    fn last(&self) -> usize {
        self.off + (self.rows - 1) * self.rs + (self.cols - 1) * self.cs
    }
}

/// Whether the product may use the thread pool. Inside an already parallel loop use `Serial`, so
/// the two cores are not oversubscribed by nested splitting.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Par {
    Serial,
    Pool,
}

/// dst[m×n] (row-major at `dst_off`, row stride `dst_rs`) = (accumulate ? dst : 0) + alpha·lhs·rhs.
/// Dimensions and bounds are checked here (internal invariants: callers validated user shapes).
#[allow(clippy::too_many_arguments)] // BLAS-style
pub(crate) fn gemm<T: CpuFloat>(
    dst: &mut [T],
    dst_off: usize,
    dst_rs: usize,
    lhs: Mat<'_, T>,
    rhs: Mat<'_, T>,
    alpha: T,
    accumulate: bool,
    par: Par,
) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert_eq!(rhs.rows, k, "gemm: inner dimensions");
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        dst_off + (m - 1) * dst_rs + n <= dst.len(),
        "gemm: dst out of bounds"
    );
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                dst[dst_off + i * dst_rs..][..n].fill(T::ZERO);
            }
        }
        return;
    }
    assert!(
        lhs.last() < lhs.data.len() && rhs.last() < rhs.data.len(),
        "gemm: operand out of bounds"
    );
    // SAFETY: every index the kernel touches lies inside the slices (checked above); dst is
    // exclusively borrowed and does not alias the shared operands.
    unsafe {
        gemm_unchecked(
            dst.as_mut_ptr().add(dst_off),
            dst_rs,
            lhs,
            rhs,
            alpha,
            accumulate,
            par,
        )
    }
}

/// `gemm` into a raw destination, for parallel loops whose tasks write disjoint strided blocks of
/// one output.
///
/// # Safety
/// `dst` must be valid for writes at `i·dst_rs + j` for i < lhs.rows, j < rhs.cols, no other
/// thread may touch those elements meanwhile, and the operands must be in bounds (see `gemm`).
pub(crate) unsafe fn gemm_unchecked<T: CpuFloat>(
    dst: *mut T,
    dst_rs: usize,
    lhs: Mat<'_, T>,
    rhs: Mat<'_, T>,
    alpha: T,
    accumulate: bool,
    par: Par,
) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    debug_assert_eq!(rhs.rows, k);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    *dst.add(i * dst_rs + j) = T::ZERO;
                }
            }
        }
        return;
    }
    debug_assert!(lhs.last() < lhs.data.len() && rhs.last() < rhs.data.len());
    if rhs.cs == 1 && std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>() {
        // f32 with B's rows contiguous: the crate's own kernels (cpu::sgemm), when this CPU has them.
        let product = sgemm::Product {
            m,
            n,
            k,
            a: lhs.data.as_ptr().add(lhs.off) as *const f32,
            rsa: lhs.rs,
            csa: lhs.cs,
            aoff: std::ptr::null(),
            b: rhs.data.as_ptr().add(rhs.off) as *const f32,
            ldb: rhs.rs,
            boff: std::ptr::null(),
            c: dst as *mut f32,
            ldc: dst_rs,
            alpha: alpha.to_f32(),
            accumulate,
        };
        let done = match par {
            Par::Serial => sgemm::run(&product),
            Par::Pool => sgemm::run_split(&product),
        };
        if done {
            return;
        }
    }
    let parallelism = match par {
        Par::Serial => Parallelism::None,
        Par::Pool => Parallelism::Rayon(0),
    };
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs.data.as_ptr().add(lhs.off),
        lhs.cs as isize,
        lhs.rs as isize,
        rhs.data.as_ptr().add(rhs.off),
        rhs.cs as isize,
        rhs.rs as isize,
        T::ONE,
        alpha,
        false,
        false,
        false,
        parallelism,
    );
}

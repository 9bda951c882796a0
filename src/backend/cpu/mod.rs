//! The CPU reference backend, generic over the element type (f32 for use, f64 for gradient checks).
//!
//! Layout: every tensor is a contiguous row-major (NCHW) `Arc<Vec<T>>`; ops never mutate their
//! inputs and always allocate a fresh output, so cloning a tensor is a reference-count bump.
//!
//! Algorithms:
//! - Elementwise ops and reductions run on rayon over large chunks (serially when small).
//! - `linear`, `nin`, `conv2d` and `attention` are matrix products through the `gemm` crate.
//!   conv2d lowers to im2col over *tiles* of output positions (about 1 MB of columns each), so the
//!   column buffer never grows with the image; 1×1 stride-1 convs use the input directly. When
//!   there are enough (image, tile) tasks every core runs whole tasks with a serial gemm (the
//!   tile stays in its L2); otherwise tasks run in turn and gemm itself splits over the pool.
//!   The backward computes dW = dY·colᵀ and dcol = Wᵀ·dY per tile and scatters dcol back (col2im):
//!   one image per task with single-threaded GEMMs when the batch feeds every thread (per-image dW
//!   summed in image order), else image by image on the pool.
//!   `SRSDE_CPU_PROFILE=1` (or `bench --train --device cpu`) times every op (`cpu::profile`).
//! - GroupNorm statistics are two-pass (blocks of 1024 summed in the element type, the blocks in
//!   f64; biased variance, eps inside the sqrt), with SiLU optionally fused into the same pass.
//! - Attention computes softmax(QᵀK/√C) over blocks of queries (bounded score matrix).
//! - `upfirdn2d` precomputes per-axis tap lists (zero-insert, pad/crop, flipped FIR, decimate);
//!   its backward scatters along the same lists, so it is the exact adjoint.
//! - Random numbers come from `crate::rng` (Philox), element i at counter offset + i.
mod amx;
mod attention;
mod conv;
mod fir;
mod float;
mod matmul;
mod norm;
pub mod optim;
pub mod profile;
pub mod sgemm;
pub mod simd;

use std::marker::PhantomData;
use std::mem::MaybeUninit;
use std::sync::Arc;

use rayon::prelude::*;

use self::fir::FirGeom;
pub use self::float::CpuFloat;
use self::norm::NormGeom;
use super::shapes::{self, expect_shape};
use super::{AdamStep, AdamUpdate, Backend, ConvEpilogue, Fir, Grads3, PartsGrads, UpFirDn};
use crate::error::{Error, Result};
use crate::rng;
use crate::tensor::{same_shape, Tensor};

/// The CPU backend computing in `T` (f32 or f64).
pub struct Cpu<T> {
    /// `None`: rayon's global pool.
    pool: Option<Arc<rayon::ThreadPool>>,
    /// The convolutions run on AMX tiles in bf16 ([`Cpu::with_bf16_tiles`]).
    tiles: bool,
    _elem: PhantomData<fn() -> T>,
}

/// The production CPU backend.
pub type CpuF32 = Cpu<f32>;

impl<T> Clone for Cpu<T> {
    fn clone(&self) -> Self {
        Cpu {
            pool: self.pool.clone(),
            tiles: self.tiles,
            _elem: PhantomData,
        }
    }
}

impl<T: CpuFloat> Default for Cpu<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// Asks glibc's allocator to keep freed buffers for reuse. Every op allocates its output, and a
/// training step frees and allocates hundreds of MB of activations; by default glibc serves
/// buffers above 128 KB–32 MB with fresh `mmap`s and trims freed heap memory, so every step
/// page-faults its buffers in again (measured: ve-res batch 4, 880 → 680 ms a step, with the
/// direct convolution writing its output in the GEMM loop). With a 32 MB mmap threshold and a
/// 1 GB trim threshold, freed buffers are reused from the heap. Process-wide, once;
/// `SRSDE_CPU_MALLOC=default` leaves glibc's settings alone (A/B benchmarks).
pub fn keep_freed_memory() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var("SRSDE_CPU_MALLOC").is_ok_and(|v| v == "default") {
            return;
        }
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt only changes allocator parameters; it is called before the backend
        // allocates its first buffer and is safe to call at any time.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        }
    });
}

/// Stack of rayon's global pool's threads, which run the whole command under [`on_worker`]: the
/// main thread's 8 MiB rather than the 2 MiB rayon gives its workers by default.
const WORKER_STACK_BYTES: usize = 8 << 20;

/// Runs `f` on a worker thread of rayon's global pool and returns its result. Called from a
/// thread outside the pool (a program's main thread), every parallel op of the CPU backend would
/// hand its work to the pool and put the caller to sleep until a worker finished it: two thread
/// wake-ups per op, tens of µs each, paid by a training step's hundreds of short ops. On a worker,
/// an op starts its work on the calling thread at once and the other workers steal from it
/// (measured: a GroupNorm of 65k elements 42 → 20 µs a call). Builds the global pool first
/// (threads as rayon's default, `RAYON_NUM_THREADS` honoured) where nothing has built it yet.
/// `SRSDE_CPU_ON_WORKER=0` runs `f` on the calling thread instead (A/B benchmarks).
pub fn on_worker<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() || std::env::var("SRSDE_CPU_ON_WORKER").is_ok_and(|v| v == "0")
    {
        return f();
    }
    // An error means the global pool exists already (built by an earlier call or by rayon's
    // first use); it is used as it is.
    let _ = rayon::ThreadPoolBuilder::new()
        .stack_size(WORKER_STACK_BYTES)
        .build_global();
    rayon::scope(|_| f())
}

impl<T: CpuFloat> Cpu<T> {
    /// A backend running on rayon's global thread pool.
    pub fn new() -> Self {
        keep_freed_memory();
        Cpu {
            pool: None,
            tiles: false,
            _elem: PhantomData,
        }
    }

    /// A backend with its own pool of `threads` threads (e.g. to measure scaling).
    pub fn with_threads(threads: usize) -> Result<Self> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map_err(|e| Error::Backend(format!("cpu thread pool: {e}")))?;
        keep_freed_memory();
        Ok(Cpu {
            pool: Some(Arc::new(pool)),
            tiles: false,
            _elem: PhantomData,
        })
    }

    /// This backend with its convolutions on AMX tiles in bf16 (`on`), or in f32: bf16 operands
    /// and f32 accumulation, as the CUDA backend's bf16 GEMMs — `--precision bf16` on the CPU.
    /// Only the convolutions whose channels and widths are multiples of 16 move; every other op
    /// stays f32. An error on a CPU (or OS) without AMX-BF16, or for the f64 backend.
    pub fn with_bf16_tiles(mut self, on: bool) -> Result<Self> {
        if on && T::NAME != "f32" {
            return Err(Error::Backend(
                "bf16 tiles: the f64 CPU backend computes in f64 only".into(),
            ));
        }
        if on && !amx::available() {
            return Err(Error::Backend(
                "--precision bf16 on the CPU runs the convolutions on AMX tiles, which this CPU (or OS) \
                 does not offer (Intel Xeon Sapphire Rapids or later, Linux 5.16 or later); use f32"
                    .into(),
            ));
        }
        self.tiles = on;
        Ok(self)
    }

    /// Whether this CPU can run [`Cpu::with_bf16_tiles`].
    pub fn bf16_tiles_available() -> bool {
        amx::available()
    }

    /// Threads this backend computes with.
    pub fn threads(&self) -> usize {
        self.pool
            .as_ref()
            .map_or_else(rayon::current_num_threads, |p| p.current_num_threads())
    }

    /// Run `f` inside this backend's pool.
    fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match &self.pool {
            Some(pool) => pool.install(f),
            None => f(),
        }
    }

    /// acc[i] = f(acc[i], b[i]) in acc's own buffer when nothing else holds it, else
    /// `fresh(acc, b)` (a new tensor, same values): the autograd's gradient accumulation.
    fn update_in_place(
        &self,
        op: &'static str,
        acc: Tensor<Self>,
        b: &Tensor<Self>,
        f: impl Fn(T, T) -> T + Sync + Send,
        fresh: impl FnOnce(&Tensor<Self>, &Tensor<Self>) -> Result<Tensor<Self>>,
    ) -> Result<Tensor<Self>> {
        same_shape(op, acc.shape(), b.shape())?;
        let shape = acc.shape().to_vec();
        let mut buf = acc.into_buf();
        let Some(acc) = Arc::get_mut(&mut buf) else {
            return fresh(&Tensor::from_buf(shape, buf), b);
        };
        let y = data(op, b)?;
        if acc.len() != y.len() {
            return Err(Error::shape(
                op,
                format!("buffer of {} elements for shape {shape:?}", acc.len()),
            ));
        }
        let run = |(o, y): (&mut [T], &[T])| {
            simd::vectorized(
                #[inline(always)]
                || {
                    for (o, &v) in o.iter_mut().zip(y) {
                        *o = f(*o, v);
                    }
                },
            )
        };
        if acc.len() < PAR_MIN {
            run((&mut acc[..], y));
        } else {
            self.run(|| acc.par_chunks_mut(CHUNK).zip(y.par_chunks(CHUNK)).for_each(run));
        }
        Ok(Tensor::from_buf(shape, buf))
    }

    fn wrap(shape: &[usize], data: Vec<T>) -> Tensor<Self> {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Tensor::from_buf(shape.to_vec(), Arc::new(data))
    }
}

/// The elements of `x`, checking that the buffer matches the shape.
/// A tensor's elements to update in place: its buffer, copied into the tensor first when other
/// tensors share it (they keep the old values).
fn unshared<T: CpuFloat>(x: &mut Tensor<Cpu<T>>) -> &mut [T] {
    Arc::make_mut(x.buf_mut()).as_mut_slice()
}

fn data<'a, T: CpuFloat>(op: &'static str, x: &'a Tensor<Cpu<T>>) -> Result<&'a [T]> {
    let d = x.buf().as_slice();
    if d.len() != x.numel() {
        return Err(Error::shape(
            op,
            format!("buffer of {} elements for shape {:?}", d.len(), x.shape()),
        ));
    }
    Ok(d)
}

/// A buffer of `n` elements filled by `fill`, which must write every one of them, without
/// zero-filling it first: for an op that overwrites its whole output, a zeroed allocation is an
/// extra pass over memory as large as the output (glibc's calloc clears reused memory), which at
/// 128×128 costs about as much as the op itself.
///
/// Builds with debug assertions (the tests) fill the buffer with NaN first, so an element that
/// `fill` misses shows up as a NaN in the op's checks instead of as stale memory.
pub(crate) fn written_once<T: CpuFloat>(n: usize, fill: impl FnOnce(&mut [MaybeUninit<T>])) -> Vec<T> {
    let mut out = Vec::with_capacity(n);
    poison_in_debug(&mut out.spare_capacity_mut()[..n]);
    fill(&mut out.spare_capacity_mut()[..n]);
    // SAFETY: `fill` wrote all n elements (its contract: every caller writes its whole output).
    unsafe { out.set_len(n) };
    out
}

/// [`written_once`] for an op with one output per length in `lens` (and a value of its own).
pub(crate) fn written_once_each<T: CpuFloat, R>(
    lens: &[usize],
    fill: impl FnOnce(&mut [&mut [MaybeUninit<T>]]) -> R,
) -> (Vec<Vec<T>>, R) {
    let mut outs: Vec<Vec<T>> = lens.iter().map(|&n| Vec::with_capacity(n)).collect();
    let mut bufs: Vec<&mut [MaybeUninit<T>]> = outs
        .iter_mut()
        .zip(lens)
        .map(|(out, &n)| {
            let buf = &mut out.spare_capacity_mut()[..n];
            poison_in_debug(buf);
            buf
        })
        .collect();
    let r = fill(&mut bufs);
    drop(bufs);
    for (out, &n) in outs.iter_mut().zip(lens) {
        // SAFETY: `fill` wrote all n elements of each (its contract).
        unsafe { out.set_len(n) };
    }
    (outs, r)
}

/// [`written_once`] for an op with three outputs of `n` elements each.
pub(crate) fn written_once3<T: CpuFloat>(
    n: usize,
    fill: impl FnOnce(&mut [MaybeUninit<T>], &mut [MaybeUninit<T>], &mut [MaybeUninit<T>]),
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let (outs, ()) = written_once_each(&[n; 3], |bufs| match bufs {
        [a, b, c] => fill(a, b, c),
        _ => unreachable!("three lengths, three buffers"),
    });
    let [a, b, c]: [Vec<T>; 3] = outs.try_into().unwrap_or_else(|_| unreachable!("three outputs"));
    (a, b, c)
}

/// NaN into every element, in builds with debug assertions (else nothing).
fn poison_in_debug<T: CpuFloat>(buf: &mut [MaybeUninit<T>]) {
    if cfg!(debug_assertions) {
        for v in buf {
            v.write(T::from_f64(f64::NAN));
        }
    }
}

/// dst = src (equal lengths).
fn copy_into<T: Copy>(dst: &mut [MaybeUninit<T>], src: &[T]) {
    assert_eq!(dst.len(), src.len());
    for (d, &v) in dst.iter_mut().zip(src) {
        d.write(v);
    }
}

/// One chunk of [`Cpu::adam_update_many`]'s outputs (p′, m′, v′) with its inputs ((p, g), (m, v)).
type ChunkOfAdam<'a, T> = (
    (
        (
            (&'a mut [MaybeUninit<T>], &'a mut [MaybeUninit<T>]),
            &'a mut [MaybeUninit<T>],
        ),
        (&'a [T], &'a [T]),
    ),
    (&'a [T], &'a [T]),
);

/// Below this many elements elementwise loops stay on the calling thread.
const PAR_MIN: usize = 1 << 14;
const CHUNK: usize = 1 << 12;

fn map1<T: CpuFloat>(a: &[T], f: impl Fn(T) -> T + Sync + Send) -> Vec<T> {
    let run = |(o, a): (&mut [MaybeUninit<T>], &[T])| {
        simd::vectorized(
            #[inline(always)]
            || {
                for (o, &v) in o.iter_mut().zip(a) {
                    o.write(f(v));
                }
            },
        )
    };
    written_once(a.len(), |out| {
        if a.len() < PAR_MIN {
            run((out, a));
        } else {
            out.par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK)).for_each(run);
        }
    })
}

/// out[i] = f(a[i], b[i]); `b` is as long as `a` (checked by the callers).
fn map2<T: CpuFloat>(a: &[T], b: &[T], f: impl Fn(T, T) -> T + Sync + Send) -> Vec<T> {
    assert_eq!(a.len(), b.len(), "map2 operands");
    type Chunks<'a, T> = ((&'a mut [MaybeUninit<T>], &'a [T]), &'a [T]);
    let run = |((o, a), b): Chunks<'_, T>| {
        simd::vectorized(
            #[inline(always)]
            || {
                for ((o, &x), &y) in o.iter_mut().zip(a).zip(b) {
                    o.write(f(x, y));
                }
            },
        )
    };
    written_once(a.len(), |out| {
        if a.len() < PAR_MIN {
            run(((out, a), b));
        } else {
            out.par_chunks_mut(CHUNK)
                .zip(a.par_chunks(CHUNK))
                .zip(b.par_chunks(CHUNK))
                .for_each(run);
        }
    })
}

/// out[i] = f(i) for i < n.
fn generate<T: CpuFloat>(n: usize, f: impl Fn(u64) -> T + Sync + Send) -> Vec<T> {
    if n < PAR_MIN {
        (0..n as u64).map(f).collect()
    } else {
        (0..n)
            .into_par_iter()
            .with_min_len(CHUNK)
            .map(|i| f(i as u64))
            .collect()
    }
}

fn check_len(op: &'static str, shape: &[usize], len: usize) -> Result<()> {
    let n: usize = shape.iter().product();
    if n != len {
        return Err(Error::shape(op, format!("{len} values for shape {shape:?}")));
    }
    Ok(())
}

/// Validate an upfirdn2d call and return its geometry.
fn fir_geom(op: &'static str, x_shape: &[usize], fir: &Fir, geom: UpFirDn) -> Result<FirGeom> {
    let g = shapes::upfirdn2d(op, x_shape, fir, geom)?;
    Ok(FirGeom {
        planes: g.n * g.c,
        h: g.h,
        w: g.w,
        oh: g.oh,
        ow: g.ow,
    })
}

fn grads<T: CpuFloat>(
    (dx, dw, db): (Vec<T>, Vec<T>, Vec<T>),
    sx: &[usize],
    sw: &[usize],
    sb: &[usize],
) -> Grads3<Cpu<T>> {
    Grads3 {
        dx: Cpu::wrap(sx, dx),
        dw: Cpu::wrap(sw, dw),
        db: Cpu::wrap(sb, db),
    }
}

impl<T: CpuFloat> Backend for Cpu<T> {
    type Buf = Arc<Vec<T>>;

    fn name(&self) -> String {
        let t = self.threads();
        let kind = if T::NAME != "f32" {
            ", f64"
        } else if self.tiles {
            ", convolutions on AMX tiles"
        } else {
            ""
        };
        format!("cpu ({t} thread{}{kind})", if t == 1 { "" } else { "s" })
    }
    fn precision_name(&self) -> &'static str {
        if self.tiles {
            "bf16"
        } else {
            "f32"
        }
    }
    fn is_cpu(&self) -> bool {
        true
    }

    // ---- memory -------------------------------------------------------------------------------
    fn zeros(&self, shape: &[usize]) -> Result<Tensor<Self>> {
        Ok(Self::wrap(shape, vec![T::ZERO; shape.iter().product()]))
    }
    fn from_f32(&self, shape: &[usize], data: &[f32]) -> Result<Tensor<Self>> {
        check_len("from_f32", shape, data.len())?;
        Ok(Self::wrap(shape, data.iter().map(|&v| T::from_f32(v)).collect()))
    }
    fn from_f64(&self, shape: &[usize], data: &[f64]) -> Result<Tensor<Self>> {
        check_len("from_f64", shape, data.len())?;
        Ok(Self::wrap(shape, data.iter().map(|&v| T::from_f64(v)).collect()))
    }
    fn to_f32(&self, x: &Tensor<Self>) -> Result<Vec<f32>> {
        Ok(data("to_f32", x)?.iter().map(|v| v.to_f32()).collect())
    }
    fn to_f64(&self, x: &Tensor<Self>) -> Result<Vec<f64>> {
        Ok(data("to_f64", x)?.iter().map(|v| v.to_f64()).collect())
    }

    // ---- elementwise --------------------------------------------------------------------------
    fn add(&self, a: &Tensor<Self>, b: &Tensor<Self>) -> Result<Tensor<Self>> {
        let _prof = profile::scope("add", 0.0);
        same_shape("add", a.shape(), b.shape())?;
        let (x, y) = (data("add", a)?, data("add", b)?);
        Ok(Self::wrap(a.shape(), self.run(|| map2(x, y, |p, q| p + q))))
    }
    /// In place when `acc`'s buffer is not shared (no allocation, no fresh pages).
    fn add_into(&self, acc: Tensor<Self>, b: &Tensor<Self>) -> Result<Tensor<Self>> {
        let _prof = profile::scope("add", 0.0);
        self.update_in_place("add", acc, b, |o, v| o + v, |a, b| self.add(a, b))
    }
    /// In place when `acc`'s buffer is not shared; `axpby`'s arithmetic.
    fn axpby_into(&self, alpha: f64, acc: Tensor<Self>, beta: f64, b: &Tensor<Self>) -> Result<Tensor<Self>> {
        let _prof = profile::scope("axpby", 0.0);
        let (al, be) = (T::from_f64(alpha), T::from_f64(beta));
        self.update_in_place(
            "axpby",
            acc,
            b,
            move |o, v| al * o + be * v,
            |a, b| self.axpby(alpha, a, beta, b),
        )
    }
    fn axpby(&self, alpha: f64, a: &Tensor<Self>, beta: f64, b: &Tensor<Self>) -> Result<Tensor<Self>> {
        let _prof = profile::scope("axpby", 0.0);
        same_shape("axpby", a.shape(), b.shape())?;
        let (x, y) = (data("axpby", a)?, data("axpby", b)?);
        let (al, be) = (T::from_f64(alpha), T::from_f64(beta));
        Ok(Self::wrap(
            a.shape(),
            self.run(|| map2(x, y, |p, q| al * p + be * q)),
        ))
    }
    fn mul(&self, a: &Tensor<Self>, b: &Tensor<Self>) -> Result<Tensor<Self>> {
        let _prof = profile::scope("mul", 0.0);
        same_shape("mul", a.shape(), b.shape())?;
        let (x, y) = (data("mul", a)?, data("mul", b)?);
        Ok(Self::wrap(a.shape(), self.run(|| map2(x, y, |p, q| p * q))))
    }
    fn affine(&self, x: &Tensor<Self>, scale: f64, shift: f64) -> Result<Tensor<Self>> {
        let _prof = profile::scope("affine", 0.0);
        let xs = data("affine", x)?;
        let (s, t) = (T::from_f64(scale), T::from_f64(shift));
        Ok(Self::wrap(x.shape(), self.run(|| map1(xs, |v| s * v + t))))
    }
    fn scale_per_sample(&self, x: &Tensor<Self>, s: &Tensor<Self>) -> Result<Tensor<Self>> {
        let _prof = profile::scope("scale_per_sample", 0.0);
        let op = "scale_per_sample";
        let n = shapes::scale_per_sample(op, x.shape(), s.shape())?;
        let (xs, ss) = (data(op, x)?, data(op, s)?);
        let per = xs.len().checked_div(n).unwrap_or(0);
        let out = self.run(|| {
            let mut out = xs.to_vec();
            if per > 0 {
                out.par_chunks_mut(per)
                    .zip(ss)
                    .for_each(|(o, &f)| o.iter_mut().for_each(|v| *v *= f));
            }
            out
        });
        Ok(Self::wrap(x.shape(), out))
    }
    fn silu(&self, x: &Tensor<Self>) -> Result<Tensor<Self>> {
        let _prof = profile::scope("silu", 0.0);
        let xs = data("silu", x)?;
        Ok(Self::wrap(x.shape(), self.run(|| map1(xs, |v| v * v.sigmoid()))))
    }
    fn silu_backward(&self, x: &Tensor<Self>, dy: &Tensor<Self>) -> Result<Tensor<Self>> {
        let _prof = profile::scope("silu_backward", 0.0);
        same_shape("silu_backward", x.shape(), dy.shape())?;
        let (xs, ds) = (data("silu_backward", x)?, data("silu_backward", dy)?);
        let f = |v: T, d: T| {
            let s = v.sigmoid();
            d * s * v.mul_add(T::ONE - s, T::ONE)
        };
        Ok(Self::wrap(x.shape(), self.run(|| map2(xs, ds, f))))
    }
    fn add_channel_bias(&self, x: &Tensor<Self>, b: &Tensor<Self>) -> Result<Tensor<Self>> {
        let _prof = profile::scope("add_channel_bias", 0.0);
        let op = "add_channel_bias";
        let (_, _, h, w) = shapes::channel_bias(op, x.shape(), b.shape())?;
        let (xs, bs) = (data(op, x)?, data(op, b)?);
        let hw = h * w;
        let out = self.run(|| {
            let mut out = xs.to_vec();
            if hw > 0 {
                out.par_chunks_mut(hw)
                    .zip(bs)
                    .for_each(|(o, &bv)| o.iter_mut().for_each(|v| *v += bv));
            }
            out
        });
        Ok(Self::wrap(x.shape(), out))
    }
    fn sum_spatial(&self, x: &Tensor<Self>) -> Result<Tensor<Self>> {
        let _prof = profile::scope("sum_spatial", 0.0);
        let (n, c, h, w) = x.dims4("sum_spatial")?;
        let xs = data("sum_spatial", x)?;
        let hw = h * w;
        let out = self.run(|| {
            (0..n * c)
                .into_par_iter()
                .map(|i| {
                    T::from_f64(simd::vectorized(
                        #[inline(always)]
                        || simd::block_sum(&xs[i * hw..(i + 1) * hw], |v| v),
                    ))
                })
                .collect()
        });
        Ok(Self::wrap(&[n, c], out))
    }
    fn sum_squares_per_sample(&self, x: &Tensor<Self>) -> Result<Tensor<Self>> {
        let _prof = profile::scope("sum_squares_per_sample", 0.0);
        let op = "sum_squares_per_sample";
        let n = shapes::batch(op, x.shape())?;
        let xs = data(op, x)?;
        let per = xs.len().checked_div(n).unwrap_or(0);
        let out = self.run(|| {
            (0..n)
                .into_par_iter()
                .map(|i| {
                    let s: f64 = xs[i * per..(i + 1) * per]
                        .iter()
                        .map(|v| v.to_f64() * v.to_f64())
                        .sum();
                    T::from_f64(s)
                })
                .collect()
        });
        Ok(Self::wrap(&[n], out))
    }

    // ---- layout -------------------------------------------------------------------------------
    fn concat_channels(&self, xs: &[&Tensor<Self>]) -> Result<Tensor<Self>> {
        let _prof = profile::scope("concat_channels", 0.0);
        let op = "concat_channels";
        let (n, ctot, h, w) = shapes::concat_channels(op, xs.iter().map(|x| x.shape()))?;
        let chans = xs
            .iter()
            .map(|x| Ok((data(op, x)?, x.shape()[1])))
            .collect::<Result<Vec<_>>>()?;
        let hw = h * w;
        // Every image's channels are the inputs' channels, in order: all written.
        let out = written_once(n * ctot * hw, |out| {
            self.run(|| {
                out.par_chunks_mut((ctot * hw).max(1))
                    .enumerate()
                    .for_each(|(img, o)| {
                        let mut at = 0;
                        for &(d, c) in &chans {
                            copy_into(&mut o[at..at + c * hw], &d[img * c * hw..(img + 1) * c * hw]);
                            at += c * hw;
                        }
                    })
            })
        });
        Ok(Self::wrap(&[n, ctot, h, w], out))
    }
    fn slice_channels(&self, x: &Tensor<Self>, start: usize, len: usize) -> Result<Tensor<Self>> {
        let _prof = profile::scope("slice_channels", 0.0);
        let op = "slice_channels";
        let (n, c, h, w) = shapes::slice_channels(op, x.shape(), start, len)?;
        let xs = data(op, x)?;
        let hw = h * w;
        let out = written_once(n * len * hw, |out| {
            self.run(|| {
                out.par_chunks_mut((len * hw).max(1))
                    .enumerate()
                    .for_each(|(img, o)| {
                        copy_into(o, &xs[(img * c + start) * hw..(img * c + start + len) * hw])
                    })
            })
        });
        Ok(Self::wrap(&[n, len, h, w], out))
    }
    fn interleave_channels(&self, x: &Tensor<Self>, y: &Tensor<Self>) -> Result<Tensor<Self>> {
        let _prof = profile::scope("interleave_channels", 0.0);
        let op = "interleave_channels";
        let (n, c, h, w) = x.dims4(op)?;
        same_shape(op, x.shape(), y.shape())?;
        let (xs, ys) = (data(op, x)?, data(op, y)?);
        let hw = h * w;
        let mut out = Vec::with_capacity(2 * xs.len());
        for img in 0..n {
            for ch in 0..c {
                let at = (img * c + ch) * hw;
                out.extend_from_slice(&xs[at..at + hw]);
                out.extend_from_slice(&ys[at..at + hw]);
            }
        }
        Ok(Self::wrap(&[n, 2 * c, h, w], out))
    }

    // ---- dense layers -------------------------------------------------------------------------
    fn linear(&self, x: &Tensor<Self>, w: &Tensor<Self>, b: Option<&Tensor<Self>>) -> Result<Tensor<Self>> {
        let _prof = profile::scope("linear", 0.0);
        let op = "linear";
        let (n, i, o) = shapes::linear(op, x.shape(), w.shape(), b.map(|b| b.shape()))?;
        let bs = b.map(|b| data(op, b)).transpose()?;
        let (xs, ws) = (data(op, x)?, data(op, w)?);
        Ok(Self::wrap(
            &[n, o],
            self.run(|| conv::linear(xs, ws, bs, n, i, o)),
        ))
    }
    fn linear_backward(&self, x: &Tensor<Self>, w: &Tensor<Self>, dy: &Tensor<Self>) -> Result<Grads3<Self>> {
        let _prof = profile::scope("linear_backward", 0.0);
        let op = "linear_backward";
        let (n, i, o) = shapes::linear(op, x.shape(), w.shape(), None)?;
        expect_shape(op, "dy", dy.shape(), &[n, o])?;
        let (xs, ws, ds) = (data(op, x)?, data(op, w)?, data(op, dy)?);
        let g = self.run(|| conv::linear_backward(xs, ws, ds, n, i, o));
        Ok(grads(g, &[n, i], &[o, i], &[o]))
    }
    fn nin(&self, x: &Tensor<Self>, w: &Tensor<Self>, b: &Tensor<Self>) -> Result<Tensor<Self>> {
        let _prof = profile::scope("nin", 0.0);
        let op = "nin";
        let (n, c, h, wd, o) = shapes::nin(op, x.shape(), w.shape(), Some(b.shape()))?;
        let (xs, ws, bs) = (data(op, x)?, data(op, w)?, data(op, b)?);
        Ok(Self::wrap(
            &[n, o, h, wd],
            self.run(|| conv::nin(xs, ws, bs, n, c, o, h * wd)),
        ))
    }
    fn nin_backward(&self, x: &Tensor<Self>, w: &Tensor<Self>, dy: &Tensor<Self>) -> Result<Grads3<Self>> {
        let _prof = profile::scope("nin_backward", 0.0);
        let op = "nin_backward";
        let (n, c, h, wd, o) = shapes::nin(op, x.shape(), w.shape(), None)?;
        expect_shape(op, "dy", dy.shape(), &[n, o, h, wd])?;
        let (xs, ws, ds) = (data(op, x)?, data(op, w)?, data(op, dy)?);
        let g = self.run(|| conv::nin_backward(xs, ws, ds, n, c, o, h * wd));
        Ok(grads(g, x.shape(), w.shape(), &[o]))
    }
    fn conv2d(
        &self,
        x: &Tensor<Self>,
        w: &Tensor<Self>,
        b: Option<&Tensor<Self>>,
        stride: usize,
        pad: usize,
    ) -> Result<Tensor<Self>> {
        let _prof = profile::scope("conv2d", 0.0);
        let op = "conv2d";
        let g = shapes::conv2d(op, x.shape(), w.shape(), stride, pad)?;
        if let Some(b) = b {
            expect_shape(op, "bias", b.shape(), &[g.o])?;
        }
        let bs = b.map(|b| data(op, b)).transpose()?;
        let (xs, ws) = (data(op, x)?, data(op, w)?);
        Ok(Self::wrap(
            &[g.n, g.o, g.oh, g.ow],
            self.run(|| conv::conv2d(&g, xs, ws, bs, conv::Epilogue::default(), self.tiles)),
        ))
    }
    /// The epilogue goes into the GEMM's output rows before the product is added (one pass over
    /// the output instead of three).
    fn conv2d_fused(
        &self,
        x: &Tensor<Self>,
        w: &Tensor<Self>,
        b: Option<&Tensor<Self>>,
        stride: usize,
        pad: usize,
        epi: &ConvEpilogue<Self>,
    ) -> Result<Tensor<Self>> {
        let _prof = profile::scope("conv2d_fused", 0.0);
        let op = "conv2d_fused";
        let g = shapes::conv2d(op, x.shape(), w.shape(), stride, pad)?;
        let out_shape = [g.n, g.o, g.oh, g.ow];
        if let Some(b) = b {
            expect_shape(op, "bias", b.shape(), &[g.o])?;
        }
        if let Some(cb) = epi.channel_bias {
            expect_shape(op, "channel bias", cb.shape(), &out_shape[..2])?;
        }
        if let Some((r, _, _)) = epi.residual {
            expect_shape(op, "residual", r.shape(), &out_shape)?;
        }
        let bs = b.map(|b| data(op, b)).transpose()?;
        let cbs = epi.channel_bias.map(|cb| data(op, cb)).transpose()?;
        let res = epi
            .residual
            .map(|(r, a, be)| data(op, r).map(|r| (r, T::from_f64(a), T::from_f64(be))))
            .transpose()?;
        let (xs, ws) = (data(op, x)?, data(op, w)?);
        let epilogue = conv::Epilogue {
            chan_bias: cbs,
            residual: res,
        };
        Ok(Self::wrap(
            &out_shape,
            self.run(|| conv::conv2d(&g, xs, ws, bs, epilogue, self.tiles)),
        ))
    }
    type ConvSaved = Tensor<Self>;
    fn conv2d_fused_saving(
        &self,
        x: &Tensor<Self>,
        w: &Tensor<Self>,
        b: Option<&Tensor<Self>>,
        stride: usize,
        pad: usize,
        epi: &ConvEpilogue<Self>,
    ) -> Result<(Tensor<Self>, Tensor<Self>)> {
        let _prof = profile::scope("conv2d_fused_saving", 0.0);
        Ok((self.conv2d_fused(x, w, b, stride, pad, epi)?, x.clone()))
    }
    fn conv2d_backward_saved(
        &self,
        x: &Tensor<Self>,
        w: &Tensor<Self>,
        dy: &Tensor<Self>,
        stride: usize,
        pad: usize,
    ) -> Result<Grads3<Self>> {
        let _prof = profile::scope("conv2d_backward_saved", 0.0);
        self.conv2d_backward(x, w, dy, stride, pad)
    }
    fn conv2d_backward(
        &self,
        x: &Tensor<Self>,
        w: &Tensor<Self>,
        dy: &Tensor<Self>,
        stride: usize,
        pad: usize,
    ) -> Result<Grads3<Self>> {
        let _prof = profile::scope("conv2d_backward", 0.0);
        let op = "conv2d_backward";
        let g = shapes::conv2d(op, x.shape(), w.shape(), stride, pad)?;
        expect_shape(op, "dy", dy.shape(), &[g.n, g.o, g.oh, g.ow])?;
        let (xs, ws, ds) = (data(op, x)?, data(op, w)?, data(op, dy)?);
        let gr = self.run(|| conv::conv2d_backward(&g, xs, ws, ds, self.tiles));
        Ok(grads(gr, x.shape(), w.shape(), &[g.o]))
    }

    // ---- normalisation ------------------------------------------------------------------------
    fn group_norm(
        &self,
        x: &Tensor<Self>,
        gamma: &Tensor<Self>,
        beta: &Tensor<Self>,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> Result<Tensor<Self>> {
        let _prof = profile::scope("group_norm", 0.0);
        let g = norm_geom("group_norm", x.shape(), gamma, beta, groups, eps, silu)?;
        let (xs, gs, bs) = (
            data("group_norm", x)?,
            data("group_norm", gamma)?,
            data("group_norm", beta)?,
        );
        Ok(Self::wrap(
            x.shape(),
            self.run(|| norm::group_norm(&g, xs, gs, bs).0),
        ))
    }
    /// Each (sample, group)'s (mean, rstd) from the forward.
    type NormSaved = Arc<norm::GroupStats>;
    fn group_norm_saving(
        &self,
        x: &Tensor<Self>,
        gamma: &Tensor<Self>,
        beta: &Tensor<Self>,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> Result<(Tensor<Self>, Arc<norm::GroupStats>)> {
        let _prof = profile::scope("group_norm", 0.0);
        let g = norm_geom("group_norm", x.shape(), gamma, beta, groups, eps, silu)?;
        let (xs, gs, bs) = (
            data("group_norm", x)?,
            data("group_norm", gamma)?,
            data("group_norm", beta)?,
        );
        let (y, stats) = self.run(|| norm::group_norm(&g, xs, gs, bs));
        Ok((Self::wrap(x.shape(), y), Arc::new(stats)))
    }
    fn group_norm_backward_saved(
        &self,
        x: &Tensor<Self>,
        saved: &Arc<norm::GroupStats>,
        gamma: &Tensor<Self>,
        beta: &Tensor<Self>,
        dy: &Tensor<Self>,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> Result<Grads3<Self>> {
        let _prof = profile::scope("group_norm_backward", 0.0);
        let op = "group_norm_backward";
        let g = norm_geom(op, x.shape(), gamma, beta, groups, eps, silu)?;
        same_shape(op, x.shape(), dy.shape())?;
        check_saved_stats(op, saved, x.shape(), groups)?;
        let (xs, gs, bs, ds) = (data(op, x)?, data(op, gamma)?, data(op, beta)?, data(op, dy)?);
        let gr = self.run(|| norm::group_norm_backward(&g, xs, gs, bs, ds, Some(saved)));
        Ok(grads(gr, x.shape(), gamma.shape(), beta.shape()))
    }
    fn group_norm_backward(
        &self,
        x: &Tensor<Self>,
        gamma: &Tensor<Self>,
        beta: &Tensor<Self>,
        dy: &Tensor<Self>,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> Result<Grads3<Self>> {
        let _prof = profile::scope("group_norm_backward", 0.0);
        let op = "group_norm_backward";
        let g = norm_geom(op, x.shape(), gamma, beta, groups, eps, silu)?;
        same_shape(op, x.shape(), dy.shape())?;
        let (xs, gs, bs, ds) = (data(op, x)?, data(op, gamma)?, data(op, beta)?, data(op, dy)?);
        let gr = self.run(|| norm::group_norm_backward(&g, xs, gs, bs, ds, None));
        Ok(grads(gr, x.shape(), gamma.shape(), beta.shape()))
    }

    // ---- a channel concatenation read in place -------------------------------------------------
    fn reads_channel_parts(&self) -> bool {
        true
    }
    fn group_norm_parts_saving(
        &self,
        parts: &[&Tensor<Self>],
        gamma: &Tensor<Self>,
        beta: &Tensor<Self>,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> Result<(Tensor<Self>, Arc<norm::GroupStats>)> {
        let _prof = profile::scope("group_norm", 0.0);
        let op = "group_norm_parts";
        let (shape, xp) = channel_parts(op, parts)?;
        let g = norm_geom(op, &shape, gamma, beta, groups, eps, silu)?;
        let (gs, bs) = (data(op, gamma)?, data(op, beta)?);
        let (y, stats) = self.run(|| norm::group_norm_parts(&g, &xp, gs, bs));
        Ok((Self::wrap(&shape, y), Arc::new(stats)))
    }
    fn group_norm_parts_backward_saved(
        &self,
        parts: &[&Tensor<Self>],
        saved: &Arc<norm::GroupStats>,
        gamma: &Tensor<Self>,
        beta: &Tensor<Self>,
        dy: &Tensor<Self>,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> Result<PartsGrads<Self>> {
        let _prof = profile::scope("group_norm_backward", 0.0);
        let op = "group_norm_parts_backward";
        let (shape, xp) = channel_parts(op, parts)?;
        let g = norm_geom(op, &shape, gamma, beta, groups, eps, silu)?;
        same_shape(op, &shape, dy.shape())?;
        check_saved_stats(op, saved, &shape, groups)?;
        let (gs, bs, ds) = (data(op, gamma)?, data(op, beta)?, data(op, dy)?);
        let (dx, dg, db) = self.run(|| norm::group_norm_parts_backward(&g, &xp, gs, bs, ds, Some(saved)));
        let dx = dx
            .into_iter()
            .zip(parts)
            .map(|(d, p)| Self::wrap(p.shape(), d))
            .collect();
        Ok(PartsGrads {
            dx,
            dw: Self::wrap(gamma.shape(), dg),
            db: Self::wrap(beta.shape(), db),
        })
    }
    fn conv1x1_parts(
        &self,
        parts: &[&Tensor<Self>],
        w: &Tensor<Self>,
        b: &Tensor<Self>,
    ) -> Result<Tensor<Self>> {
        let _prof = profile::scope("conv2d", 0.0);
        let op = "conv1x1_parts";
        let (g, xs) = conv1x1_parts_geom(op, parts, w)?;
        expect_shape(op, "bias", b.shape(), &[g.o])?;
        let (ws, bs) = (data(op, w)?, data(op, b)?);
        Ok(Self::wrap(
            &[g.n, g.o, g.oh, g.ow],
            self.run(|| conv::pointwise_parts(&xs, ws, bs, g.n, g.o, g.p())),
        ))
    }
    fn conv1x1_parts_backward(
        &self,
        parts: &[&Tensor<Self>],
        w: &Tensor<Self>,
        dy: &Tensor<Self>,
    ) -> Result<PartsGrads<Self>> {
        let _prof = profile::scope("conv2d_backward", 0.0);
        let op = "conv1x1_parts_backward";
        let (g, xs) = conv1x1_parts_geom(op, parts, w)?;
        expect_shape(op, "dy", dy.shape(), &[g.n, g.o, g.oh, g.ow])?;
        let (ws, ds) = (data(op, w)?, data(op, dy)?);
        let (dx, dw, db) = self.run(|| conv::pointwise_parts_backward(&xs, ws, ds, g.n, g.o, g.p()));
        let dx = dx
            .into_iter()
            .zip(parts)
            .map(|(d, p)| Self::wrap(p.shape(), d))
            .collect();
        Ok(PartsGrads {
            dx,
            dw: Self::wrap(w.shape(), dw),
            db: Self::wrap(&[g.o], db),
        })
    }

    // ---- attention ----------------------------------------------------------------------------
    fn attention(&self, q: &Tensor<Self>, k: &Tensor<Self>, v: &Tensor<Self>) -> Result<Tensor<Self>> {
        let _prof = profile::scope("attention", 0.0);
        let op = "attention";
        let (n, c, h, w) = shapes::attention(op, q.shape(), &[k.shape(), v.shape()])?;
        let (qs, ks, vs) = (data(op, q)?, data(op, k)?, data(op, v)?);
        Ok(Self::wrap(
            q.shape(),
            self.run(|| attention::attention(qs, ks, vs, n, c, h * w)),
        ))
    }
    fn attention_backward(
        &self,
        q: &Tensor<Self>,
        k: &Tensor<Self>,
        v: &Tensor<Self>,
        dy: &Tensor<Self>,
    ) -> Result<(Tensor<Self>, Tensor<Self>, Tensor<Self>)> {
        let _prof = profile::scope("attention_backward", 0.0);
        let op = "attention_backward";
        let (n, c, h, w) = shapes::attention(op, q.shape(), &[k.shape(), v.shape(), dy.shape()])?;
        let (qs, ks, vs, ds) = (data(op, q)?, data(op, k)?, data(op, v)?, data(op, dy)?);
        let (dq, dk, dv) = self.run(|| attention::attention_backward(qs, ks, vs, ds, n, c, h * w));
        Ok((
            Self::wrap(q.shape(), dq),
            Self::wrap(q.shape(), dk),
            Self::wrap(q.shape(), dv),
        ))
    }

    // ---- FIR resampling -----------------------------------------------------------------------
    fn upfirdn2d(&self, x: &Tensor<Self>, fir: &Fir, geom: UpFirDn) -> Result<Tensor<Self>> {
        let _prof = profile::scope("upfirdn2d", 0.0);
        let g = fir_geom("upfirdn2d", x.shape(), fir, geom)?;
        let xs = data("upfirdn2d", x)?;
        let f: Vec<T> = fir.taps.iter().map(|&v| T::from_f32(v)).collect();
        let out = self.run(|| fir::upfirdn2d(&g, xs, &f, fir.kh, fir.kw, geom));
        Ok(Self::wrap(&[x.shape()[0], x.shape()[1], g.oh, g.ow], out))
    }
    fn upfirdn2d_backward(
        &self,
        dy: &Tensor<Self>,
        x_shape: &[usize],
        fir: &Fir,
        geom: UpFirDn,
    ) -> Result<Tensor<Self>> {
        let _prof = profile::scope("upfirdn2d_backward", 0.0);
        let op = "upfirdn2d_backward";
        let g = fir_geom(op, x_shape, fir, geom)?;
        expect_shape(op, "dy", dy.shape(), &[x_shape[0], x_shape[1], g.oh, g.ow])?;
        let ds = data(op, dy)?;
        let f: Vec<T> = fir.taps.iter().map(|&v| T::from_f32(v)).collect();
        let dx = self.run(|| fir::upfirdn2d_backward(&g, ds, &f, fir.kh, fir.kw, geom));
        Ok(Self::wrap(x_shape, dx))
    }

    // ---- embeddings ---------------------------------------------------------------------------
    /// Computed in f64 and rounded once: the phase 2π·ln σ·W reaches ~10³ rad, where an f32
    /// product would already be off by ~10⁻⁴.
    fn fourier_embedding(&self, sigma: &Tensor<Self>, w: &Tensor<Self>) -> Result<Tensor<Self>> {
        let _prof = profile::scope("fourier_embedding", 0.0);
        let op = "fourier_embedding";
        let (n, m) = shapes::fourier_embedding(op, sigma.shape(), w.shape())?;
        let (ss, ws) = (data(op, sigma)?, data(op, w)?);
        let mut out = Vec::with_capacity(n * 2 * m);
        for &s in ss {
            let ls = s.to_f64().ln();
            let phase = |wv: &T| std::f64::consts::TAU * ls * wv.to_f64();
            out.extend(ws.iter().map(|wv| T::from_f64(phase(wv).sin())));
            out.extend(ws.iter().map(|wv| T::from_f64(phase(wv).cos())));
        }
        Ok(Self::wrap(&[n, 2 * m], out))
    }
    /// Computed in `T` step by step like score_sde's `get_timestep_embedding` (which is float32
    /// in the original), so the f32 backend reproduces the reference rounding.
    fn sinusoidal_embedding(&self, t: &Tensor<Self>, dim: usize, max_positions: f64) -> Result<Tensor<Self>> {
        let _prof = profile::scope("sinusoidal_embedding", 0.0);
        let op = "sinusoidal_embedding";
        let n = shapes::sinusoidal_embedding(op, t.shape(), dim)?;
        let h = dim / 2;
        let step = T::from_f64(-(max_positions.ln() / (h - 1) as f64));
        let omega: Vec<T> = (0..h).map(|k| (T::from_usize(k) * step).exp()).collect();
        let mut out = Vec::with_capacity(n * dim);
        for &tv in data(op, t)? {
            out.extend(omega.iter().map(|&w| (tv * w).sin()));
            out.extend(omega.iter().map(|&w| (tv * w).cos()));
        }
        Ok(Self::wrap(&[n, dim], out))
    }

    // ---- randomness ---------------------------------------------------------------------------
    fn randn(&self, shape: &[usize], seed: u64, offset: u64) -> Result<Tensor<Self>> {
        let _prof = profile::scope("randn", 0.0);
        let n = shape.iter().product();
        // Chunks of CHUNK draws in parallel, each with the Philox rounds vectorized; the same
        // bits as rng::normal element by element.
        let mut draws = vec![0.0f32; n];
        self.run(|| {
            draws.par_chunks_mut(CHUNK).enumerate().for_each(|(i, chunk)| {
                simd::vectorized(
                    #[inline(always)]
                    || rng::fill_normal_lanes(chunk, seed, offset.wrapping_add((i * CHUNK) as u64)),
                )
            })
        });
        // For f32 the map is the identity and the collect reuses the buffer.
        Ok(Self::wrap(shape, draws.into_iter().map(T::from_f32).collect()))
    }
    fn rand_uniform(&self, shape: &[usize], seed: u64, offset: u64) -> Result<Tensor<Self>> {
        let _prof = profile::scope("rand_uniform", 0.0);
        let n = shape.iter().product();
        let out = self.run(|| generate(n, |i| T::from_f32(rng::uniform(seed, offset.wrapping_add(i)))));
        Ok(Self::wrap(shape, out))
    }
    fn dropout_mask(&self, shape: &[usize], p: f64, seed: u64, offset: u64) -> Result<Tensor<Self>> {
        let _prof = profile::scope("dropout_mask", 0.0);
        shapes::dropout_probability(p)?;
        let n = shape.iter().product();
        let keep = T::from_f64(1.0 / (1.0 - p));
        let out = self.run(|| {
            generate(n, |i| {
                if (rng::uniform(seed, offset.wrapping_add(i)) as f64) < p {
                    T::ZERO
                } else {
                    keep
                }
            })
        });
        Ok(Self::wrap(shape, out))
    }

    // ---- optimiser ----------------------------------------------------------------------------
    fn adam_update(
        &self,
        p: &Tensor<Self>,
        g: &Tensor<Self>,
        m: &Tensor<Self>,
        v: &Tensor<Self>,
        hp: &AdamStep,
    ) -> Result<(Tensor<Self>, Tensor<Self>, Tensor<Self>)> {
        let mut one = self.adam_update_many(&[p], &[g], &[m], &[v], hp)?;
        Ok(one.pop().expect("one update for one parameter"))
    }
    /// All parameters in one parallel pass (tensors, and chunks of the large ones, as tasks):
    /// each output element written once from the inputs, vectorized; elementwise, so the bits are
    /// those of the host loop whatever the chunking.
    fn adam_update_many(
        &self,
        params: &[&Tensor<Self>],
        grads: &[&Tensor<Self>],
        m: &[&Tensor<Self>],
        v: &[&Tensor<Self>],
        hp: &AdamStep,
    ) -> Result<Vec<AdamUpdate<Self>>> {
        let _prof = profile::scope("adam_update", 0.0);
        let op = "adam_update";
        super::validate_list_lengths("adam_update_many", &[params.len(), grads.len(), m.len(), v.len()])?;
        let mut inputs = Vec::with_capacity(params.len());
        for i in 0..params.len() {
            hp.validate(params[i].shape(), grads[i].shape(), m[i].shape(), v[i].shape())?;
            inputs.push((
                data(op, params[i])?,
                data(op, grads[i])?,
                data(op, m[i])?,
                data(op, v[i])?,
            ));
        }
        let c = optim::AdamConsts::<T>::new(hp.lr, hp.beta1, hp.beta2, hp.eps, hp.step);
        let scale = T::from_f64(hp.grad_scale);
        let update = |(p, g, mm, vv): (&[T], &[T], &[T], &[T])| {
            written_once3(p.len(), |p2, m2, v2| {
                let chunk = |((((p2, m2), v2), (p, g)), (mm, vv)): ChunkOfAdam<T>| {
                    simd::vectorized(
                        #[inline(always)]
                        || optim::adam_update_into((p, g, mm, vv), p2, m2, v2, scale, &c),
                    )
                };
                p2.par_chunks_mut(CHUNK)
                    .zip(m2.par_chunks_mut(CHUNK))
                    .zip(v2.par_chunks_mut(CHUNK))
                    .zip(p.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
                    .zip(mm.par_chunks(CHUNK).zip(vv.par_chunks(CHUNK)))
                    .for_each(chunk);
            })
        };
        let updated: Vec<(Vec<T>, Vec<T>, Vec<T>)> =
            self.run(|| inputs.par_iter().map(|&i| update(i)).collect());
        Ok(updated
            .into_iter()
            .zip(params)
            .map(|((p2, m2, v2), p)| {
                (
                    Self::wrap(p.shape(), p2),
                    Self::wrap(p.shape(), m2),
                    Self::wrap(p.shape(), v2),
                )
            })
            .collect())
    }
    /// In place, Adam and the EMA in one pass over every parameter (chunks of all tensors in one
    /// parallel loop): each element of p, g, m, v and the shadow read once and p, m, v and the
    /// shadow written back where they were, instead of three fresh outputs for Adam and one for
    /// the EMA. A buffer that another tensor shares is copied first (that tensor keeps its
    /// values). Same per-element functions as the two list ops, so the same bits.
    fn adam_ema_update_many(
        &self,
        params: &mut [&mut Tensor<Self>],
        grads: &[&Tensor<Self>],
        m: &mut [&mut Tensor<Self>],
        v: &mut [&mut Tensor<Self>],
        shadows: &mut [&mut Tensor<Self>],
        hp: &AdamStep,
        decay: f64,
    ) -> Result<()> {
        let _prof = profile::scope("adam_ema_update", 0.0);
        let op = "adam_ema_update_many";
        let n = params.len();
        super::validate_list_lengths(op, &[n, grads.len(), m.len(), v.len(), shadows.len()])?;
        // Everything checked before any tensor changes (`data` checks each buffer's length).
        let mut gs = Vec::with_capacity(n);
        for i in 0..n {
            hp.validate(params[i].shape(), grads[i].shape(), m[i].shape(), v[i].shape())?;
            super::validate_ema(shadows[i].shape(), params[i].shape(), decay)?;
            for t in [&*params[i], &*m[i], &*v[i], &*shadows[i]] {
                data(op, t)?;
            }
            gs.push(data(op, grads[i])?);
        }
        let c = optim::AdamConsts::<T>::new(hp.lr, hp.beta1, hp.beta2, hp.eps, hp.step);
        let (scale, k) = (T::from_f64(hp.grad_scale), T::from_f64(1.0 - decay));
        // Every tensor's buffer made unshared (Arc::make_mut copies a shared one into the tensor,
        // leaving the other holders theirs), cut into the chunks of one parallel loop.
        let mut chunks = Vec::new();
        for ((((p, mm), vv), sh), g) in params
            .iter_mut()
            .zip(m.iter_mut())
            .zip(v.iter_mut())
            .zip(shadows.iter_mut())
            .zip(&gs)
        {
            let (p, mm, vv, sh) = (unshared(p), unshared(mm), unshared(vv), unshared(sh));
            chunks.extend(
                p.chunks_mut(CHUNK)
                    .zip(g.chunks(CHUNK))
                    .zip(mm.chunks_mut(CHUNK))
                    .zip(vv.chunks_mut(CHUNK))
                    .zip(sh.chunks_mut(CHUNK)),
            );
        }
        self.run(|| {
            chunks.into_par_iter().for_each(|((((p, g), mm), vv), sh)| {
                simd::vectorized(
                    #[inline(always)]
                    || optim::adam_ema_update_in_place(p, g, mm, vv, sh, scale, &c, k),
                )
            })
        });
        Ok(())
    }
    fn ema_update(&self, shadow: &Tensor<Self>, p: &Tensor<Self>, decay: f64) -> Result<Tensor<Self>> {
        let mut one = self.ema_update_many(&[shadow], &[p], decay)?;
        Ok(one.pop().expect("one shadow for one parameter"))
    }
    /// All shadows in one parallel pass, as [`Cpu::adam_update_many`].
    fn ema_update_many(
        &self,
        shadows: &[&Tensor<Self>],
        params: &[&Tensor<Self>],
        decay: f64,
    ) -> Result<Vec<Tensor<Self>>> {
        let _prof = profile::scope("ema_update", 0.0);
        let op = "ema_update";
        super::validate_list_lengths("ema_update_many", &[shadows.len(), params.len()])?;
        let mut inputs = Vec::with_capacity(shadows.len());
        for (s, p) in shadows.iter().zip(params) {
            super::validate_ema(s.shape(), p.shape(), decay)?;
            inputs.push((data(op, s)?, data(op, p)?));
        }
        let k = T::from_f64(1.0 - decay);
        let update = |(s, p): (&[T], &[T])| {
            written_once(s.len(), |out| {
                out.par_chunks_mut(CHUNK)
                    .zip(s.par_chunks(CHUNK).zip(p.par_chunks(CHUNK)))
                    .for_each(|(o, (s, p))| {
                        simd::vectorized(
                            #[inline(always)]
                            || optim::ema_update_into(s, p, o, k),
                        )
                    })
            })
        };
        let updated: Vec<Vec<T>> = self.run(|| inputs.par_iter().map(|&i| update(i)).collect());
        Ok(updated
            .into_iter()
            .zip(shadows)
            .map(|(out, s)| Self::wrap(s.shape(), out))
            .collect())
    }
    fn squared_norms(&self, xs: &[&Tensor<Self>]) -> Result<Vec<f64>> {
        let _prof = profile::scope("squared_norms", 0.0);
        let slices = xs
            .iter()
            .map(|x| data("squared_norms", x))
            .collect::<Result<Vec<_>>>()?;
        // One tensor per task; each sums over fixed lanes, as the host reference does.
        Ok(self.run(|| slices.par_iter().map(|s| optim::squared_norm(s)).collect()))
    }
    fn scale_many(&self, xs: &[&Tensor<Self>], scales: &[f64]) -> Result<Vec<Tensor<Self>>> {
        let _prof = profile::scope("scale_many", 0.0);
        super::validate_list_lengths("scale_many", &[xs.len(), scales.len()])?;
        let slices = xs
            .iter()
            .map(|x| data("scale_many", x))
            .collect::<Result<Vec<_>>>()?;
        // One tensor per task (parameter gradients are small), each through `affine`'s loop.
        let scaled: Vec<Vec<T>> = self.run(|| {
            slices
                .par_iter()
                .zip(scales)
                .map(|(xs, &s)| {
                    let s = T::from_f64(s);
                    map1(xs, move |v| s * v + T::ZERO)
                })
                .collect()
        });
        Ok(scaled
            .into_iter()
            .zip(xs)
            .map(|(data, x)| Self::wrap(x.shape(), data))
            .collect())
    }
}

/// Each part's data and channel count, in order.
fn parts_data<'a, T: CpuFloat>(
    op: &'static str,
    parts: &[&'a Tensor<Cpu<T>>],
) -> Result<Vec<(&'a [T], usize)>> {
    parts.iter().map(|p| Ok((data(op, p)?, p.shape()[1]))).collect()
}

/// The shape of the channel concatenation of `parts` (checked as `concat_channels` checks it)
/// and the parts as a GroupNorm reads them.
fn channel_parts<'a, T: CpuFloat>(
    op: &'static str,
    parts: &[&'a Tensor<Cpu<T>>],
) -> Result<(Vec<usize>, norm::ChannelParts<'a, T>)> {
    let (n, c, h, w) = shapes::concat_channels(op, parts.iter().map(|x| x.shape()))?;
    Ok((
        vec![n, c, h, w],
        norm::ChannelParts::new(parts_data(op, parts)?, h * w),
    ))
}

/// The geometry of a 1×1 conv of the channel concatenation of `parts`, and the parts' data.
#[allow(clippy::type_complexity)]
fn conv1x1_parts_geom<'a, T: CpuFloat>(
    op: &'static str,
    parts: &[&'a Tensor<Cpu<T>>],
    w: &Tensor<Cpu<T>>,
) -> Result<(shapes::Conv2d, Vec<(&'a [T], usize)>)> {
    let (n, c, h, wd) = shapes::concat_channels(op, parts.iter().map(|x| x.shape()))?;
    let g = shapes::conv2d(op, &[n, c, h, wd], w.shape(), 1, 0)?;
    if g.kh != 1 || g.kw != 1 {
        return Err(Error::shape(op, format!("weight {:?} is not 1×1", w.shape())));
    }
    Ok((g, parts_data(op, parts)?))
}

/// The geometry of a GroupNorm of an input of shape `x_shape` (a tensor, or the concatenation of
/// parts), checked against γ, β and the group count.
fn norm_geom<T: CpuFloat>(
    op: &'static str,
    x_shape: &[usize],
    gamma: &Tensor<Cpu<T>>,
    beta: &Tensor<Cpu<T>>,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<NormGeom> {
    let (_, c, h, w) = shapes::group_norm(op, x_shape, gamma.shape(), beta.shape(), groups)?;
    Ok(NormGeom {
        c,
        hw: h * w,
        groups,
        eps,
        silu,
    })
}

/// A backward's saved statistics must be the forward's: one (mean, rstd) per (sample, group).
fn check_saved_stats(
    op: &'static str,
    saved: &norm::GroupStats,
    x_shape: &[usize],
    groups: usize,
) -> Result<()> {
    let want = x_shape[0] * groups;
    if saved.len() != want {
        return Err(Error::shape(
            op,
            format!("{} saved group statistics for {want} groups", saved.len()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `on_worker` runs its closure on a pool thread (which the backend's ops then start their
    /// parallel work on) and hands back the result; called on a worker, it runs in place.
    #[test]
    fn on_worker_runs_on_a_pool_thread() {
        assert_eq!(
            rayon::current_thread_index(),
            None,
            "the test thread is outside the pool"
        );
        let (outer, inner, y) = on_worker(|| {
            let outer = rayon::current_thread_index();
            let inner = on_worker(|| (std::thread::current().id(), rayon::current_thread_index()));
            assert_eq!(inner.0, std::thread::current().id(), "nested call runs in place");
            let x = CpuF32::new().randn(&[2, 3, 4, 4], 1, 0).unwrap();
            (outer, inner.1, CpuF32::new().silu(&x).unwrap().shape().to_vec())
        });
        assert!(
            outer.is_some() && outer == inner,
            "ran on worker {outer:?}, nested {inner:?}"
        );
        assert_eq!(y, [2, 3, 4, 4]);
    }

    #[test]
    fn add_into_reuses_an_unshared_buffer_and_leaves_a_shared_one_alone() {
        let be = CpuF32::new();
        for n in [7, 3 * PAR_MIN + 5] {
            let a = be.randn(&[n], 1, 0).unwrap();
            let b = be.randn(&[n], 2, 0).unwrap();
            let want = be.to_f32(&be.add(&a, &b).unwrap()).unwrap();
            // Shared (a is still held): a new buffer, a untouched.
            let before = be.to_f32(&a).unwrap();
            let shared = be.add_into(a.clone(), &b).unwrap();
            assert_eq!(be.to_f32(&shared).unwrap(), want);
            assert_eq!(
                be.to_f32(&a).unwrap(),
                before,
                "a shared accumulator is not written"
            );
            // Unshared: the same storage, the same bits as add.
            let ptr = a.buf().as_ptr();
            let summed = be.add_into(a, &b).unwrap();
            assert_eq!(summed.buf().as_ptr(), ptr, "in place");
            assert_eq!(be.to_f32(&summed).unwrap(), want);
        }
        let (x, y) = (be.zeros(&[2, 3]).unwrap(), be.zeros(&[3, 2]).unwrap());
        assert!(be.add_into(x, &y).is_err(), "shapes must match");
    }

    #[test]
    fn a_backward_refuses_statistics_saved_for_another_batch() {
        let be = CpuF32::new();
        let (gamma, beta) = (be.randn(&[8], 1, 0).unwrap(), be.randn(&[8], 1, 1).unwrap());
        let x2 = be.randn(&[2, 8, 4, 4], 1, 2).unwrap();
        let x3 = be.randn(&[3, 8, 4, 4], 1, 3).unwrap();
        let (_, saved2) = be.group_norm_saving(&x2, &gamma, &beta, 4, 1e-6, true).unwrap();
        let (_, saved3) = be.group_norm_saving(&x3, &gamma, &beta, 4, 1e-6, true).unwrap();
        let err = be
            .group_norm_backward_saved(&x3, &saved2, &gamma, &beta, &x3, 4, 1e-6, true)
            .err()
            .expect("8 statistics for 12 groups")
            .to_string();
        assert!(
            err.contains("group_norm_backward") && err.contains("8 saved group statistics for 12 groups"),
            "{err}"
        );
        assert!(be
            .group_norm_backward_saved(&x3, &saved3, &gamma, &beta, &x3, 4, 1e-6, true)
            .is_ok());
        let parts = [&x3, &x3];
        let (gamma16, beta16) = (be.randn(&[16], 1, 4).unwrap(), be.randn(&[16], 1, 5).unwrap());
        let dy = be.randn(&[3, 16, 4, 4], 1, 6).unwrap();
        let err = be
            .group_norm_parts_backward_saved(&parts, &saved3, &gamma16, &beta16, &dy, 8, 1e-6, true)
            .err()
            .expect("12 statistics for 24 groups")
            .to_string();
        assert!(
            err.contains("group_norm_parts_backward") && err.contains("for 24 groups"),
            "{err}"
        );
    }

    #[test]
    fn an_element_a_written_once_fill_misses_is_nan_in_test_builds() {
        let v: Vec<f32> = written_once(5, |out| {
            for (i, o) in out.iter_mut().enumerate().take(4) {
                o.write(i as f32);
            }
        });
        assert_eq!(&v[..4], &[0.0, 1.0, 2.0, 3.0]);
        if cfg!(debug_assertions) {
            assert!(v[4].is_nan(), "the missed element reads as poison");
        } else {
            println!("skipped the poison check: built without debug assertions (no poisoning)");
        }
    }
}

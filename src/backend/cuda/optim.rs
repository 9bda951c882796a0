//! Optimiser ops of the CUDA backend (kernels/optim.cu): fused Adam and EMA updates, per
//! parameter or over a list of parameters in a few launches (up to [`ADAM_LIST_MAX`] /
//! [`EMA_LIST_MAX`] tensors each), and the per-tensor Σx² of the global gradient norm in a few
//! launches with a single download. CPU twins: `backend::cpu::optim` and the CPU backend's `squared_norms`.
//!
//! The Adam and EMA kernels perform the host formulas' exact sequence of rounded f32 operations
//! with the constants rounded on the host by the same code (`AdamConsts`), so a CUDA step gives
//! the CPU step's bits for the same inputs; [`selftest_rows`] checks that on the device.
use cudarc::driver::result;

use super::selftest::SelftestRow;
use super::{drv, ptr, raw, Arg, Cuda, Precision, BLOCK};
use crate::backend::cpu::optim::AdamConsts;
use crate::backend::cpu::Cpu;
use crate::backend::{validate_ema, validate_list_lengths, AdamStep, AdamUpdate, Backend};
use crate::check::rel_err;
use crate::error::{Error, Result};
use crate::rng;
use crate::tensor::Tensor;

/// Tensors per `optim_sumsq_partial` launch (kernels/optim.cu `OPTIM_LIST_MAX`).
const LIST_MAX: usize = 64;
/// Blocks per tensor in `optim_sumsq_partial` (each writes one partial sum).
const SUMSQ_PARTS: usize = 32;

/// Tensors per `optim_adam_many` launch (kernels/optim.cu `OPTIM_ADAM_LIST_MAX`).
const ADAM_LIST_MAX: usize = 48;
/// Tensors per `optim_ema_many` launch (kernels/optim.cu `OPTIM_EMA_LIST_MAX`).
const EMA_LIST_MAX: usize = 112;

/// kernels/optim.cu `AdamList`: the tensors of one `optim_adam_many` launch, by value. Tensor t
/// owns elements `start[t]..start[t + 1]` of the launch's concatenated index space.
#[repr(C)]
#[derive(Clone, Copy)]
struct AdamList {
    p: [u64; ADAM_LIST_MAX],
    g: [u64; ADAM_LIST_MAX],
    m: [u64; ADAM_LIST_MAX],
    v: [u64; ADAM_LIST_MAX],
    p_out: [u64; ADAM_LIST_MAX],
    m_out: [u64; ADAM_LIST_MAX],
    v_out: [u64; ADAM_LIST_MAX],
    start: [i64; ADAM_LIST_MAX + 1],
}

/// kernels/optim.cu `EmaList`, laid out as [`AdamList`].
#[repr(C)]
#[derive(Clone, Copy)]
struct EmaList {
    shadow: [u64; EMA_LIST_MAX],
    p: [u64; EMA_LIST_MAX],
    out: [u64; EMA_LIST_MAX],
    start: [i64; EMA_LIST_MAX + 1],
}

/// Kernel parameters must fit the portable 4 KiB (the lists plus the scalar arguments).
const _: () = assert!(std::mem::size_of::<AdamList>() + 4 * 8 <= 4096);
const _: () = assert!(std::mem::size_of::<EmaList>() + 4 * 2 <= 4096);

/// kernels/optim.cu `SumsqList`: device pointers and lengths, passed by value (1 KiB).
#[repr(C)]
#[derive(Clone, Copy)]
struct SumsqList {
    ptr: [u64; LIST_MAX],
    len: [i64; LIST_MAX],
}

fn check_buf(op: &'static str, x: &Tensor<Cuda>) -> Result<()> {
    if x.buf().len() != x.numel() {
        return Err(Error::shape(
            op,
            format!("buffer of {} elements for shape {:?}", x.buf().len(), x.shape()),
        ));
    }
    Ok(())
}

pub(super) fn adam_update(
    b: &Cuda,
    p: &Tensor<Cuda>,
    g: &Tensor<Cuda>,
    m: &Tensor<Cuda>,
    v: &Tensor<Cuda>,
    hp: &AdamStep,
) -> Result<(Tensor<Cuda>, Tensor<Cuda>, Tensor<Cuda>)> {
    let op = "adam_update";
    hp.validate(p.shape(), g.shape(), m.shape(), v.shape())?;
    for t in [p, g, m, v] {
        check_buf(op, t)?;
    }
    let c = AdamConsts::<f32>::new(hp.lr, hp.beta1, hp.beta2, hp.eps, hp.step);
    let (p2, m2, v2) = (b.out(p.shape())?, b.out(p.shape())?, b.out(p.shape())?);
    let n = p.numel();
    b.launch_n(
        "optim_adam",
        n,
        vec![
            ptr(p),
            ptr(g),
            ptr(m),
            ptr(v),
            ptr(&p2),
            ptr(&m2),
            ptr(&v2),
            Arg::I64(n as i64),
            Arg::F32(hp.grad_scale as f32),
            Arg::F32(c.w1),
            Arg::F32(c.b2),
            Arg::F32(c.w2),
            Arg::F32(c.bc2_sqrt),
            Arg::F32(c.eps),
            Arg::F32(c.step_size),
        ],
    )?;
    Ok((p2, m2, v2))
}

pub(super) fn ema_update(
    b: &Cuda,
    shadow: &Tensor<Cuda>,
    p: &Tensor<Cuda>,
    decay: f64,
) -> Result<Tensor<Cuda>> {
    let op = "ema_update";
    validate_ema(shadow.shape(), p.shape(), decay)?;
    check_buf(op, shadow)?;
    check_buf(op, p)?;
    let out = b.out(shadow.shape())?;
    let n = shadow.numel();
    b.launch_n(
        "optim_ema",
        n,
        vec![
            ptr(shadow),
            ptr(p),
            ptr(&out),
            Arg::I64(n as i64),
            Arg::F32((1.0 - decay) as f32),
        ],
    )?;
    Ok(out)
}

/// Adam over lists of parameters (see [`Backend::adam_update_many`]): everything is validated
/// before the first launch, then `optim_adam_many` runs once per [`ADAM_LIST_MAX`] tensors.
/// Same constants and per-element arithmetic as [`adam_update`], so the same bits.
pub(super) fn adam_update_many(
    b: &Cuda,
    p: &[&Tensor<Cuda>],
    g: &[&Tensor<Cuda>],
    m: &[&Tensor<Cuda>],
    v: &[&Tensor<Cuda>],
    hp: &AdamStep,
) -> Result<Vec<AdamUpdate<Cuda>>> {
    let op = "adam_update_many";
    validate_list_lengths(op, &[p.len(), g.len(), m.len(), v.len()])?;
    for i in 0..p.len() {
        hp.validate(p[i].shape(), g[i].shape(), m[i].shape(), v[i].shape())?;
        for t in [p[i], g[i], m[i], v[i]] {
            check_buf(op, t)?;
        }
    }
    let c = AdamConsts::<f32>::new(hp.lr, hp.beta1, hp.beta2, hp.eps, hp.step);
    let mut outs = Vec::with_capacity(p.len());
    for base in (0..p.len()).step_by(ADAM_LIST_MAX) {
        let count = ADAM_LIST_MAX.min(p.len() - base);
        let mut list = AdamList {
            p: [0; ADAM_LIST_MAX],
            g: [0; ADAM_LIST_MAX],
            m: [0; ADAM_LIST_MAX],
            v: [0; ADAM_LIST_MAX],
            p_out: [0; ADAM_LIST_MAX],
            m_out: [0; ADAM_LIST_MAX],
            v_out: [0; ADAM_LIST_MAX],
            start: [0; ADAM_LIST_MAX + 1],
        };
        for j in 0..count {
            let i = base + j;
            let shape = p[i].shape();
            let (p2, m2, v2) = (b.out(shape)?, b.out(shape)?, b.out(shape)?);
            list.p[j] = p[i].buf().device_ptr();
            list.g[j] = g[i].buf().device_ptr();
            list.m[j] = m[i].buf().device_ptr();
            list.v[j] = v[i].buf().device_ptr();
            list.p_out[j] = p2.buf().device_ptr();
            list.m_out[j] = m2.buf().device_ptr();
            list.v_out[j] = v2.buf().device_ptr();
            list.start[j + 1] = list.start[j] + p[i].numel() as i64;
            outs.push((p2, m2, v2));
        }
        b.launch_n(
            "optim_adam_many",
            list.start[count] as usize,
            vec![
                raw(&list),
                Arg::I32(count as i32),
                Arg::F32(hp.grad_scale as f32),
                Arg::F32(c.w1),
                Arg::F32(c.b2),
                Arg::F32(c.w2),
                Arg::F32(c.bc2_sqrt),
                Arg::F32(c.eps),
                Arg::F32(c.step_size),
            ],
        )?;
    }
    Ok(outs)
}

/// EMA over lists of tensors (see [`Backend::ema_update_many`]): validated first, then
/// `optim_ema_many` once per [`EMA_LIST_MAX`] tensors; the bits of [`ema_update`].
pub(super) fn ema_update_many(
    b: &Cuda,
    shadows: &[&Tensor<Cuda>],
    p: &[&Tensor<Cuda>],
    decay: f64,
) -> Result<Vec<Tensor<Cuda>>> {
    let op = "ema_update_many";
    validate_list_lengths(op, &[shadows.len(), p.len()])?;
    for (s, q) in shadows.iter().zip(p) {
        validate_ema(s.shape(), q.shape(), decay)?;
        check_buf(op, s)?;
        check_buf(op, q)?;
    }
    let k = (1.0 - decay) as f32;
    let mut outs = Vec::with_capacity(p.len());
    for base in (0..p.len()).step_by(EMA_LIST_MAX) {
        let count = EMA_LIST_MAX.min(p.len() - base);
        let mut list = EmaList {
            shadow: [0; EMA_LIST_MAX],
            p: [0; EMA_LIST_MAX],
            out: [0; EMA_LIST_MAX],
            start: [0; EMA_LIST_MAX + 1],
        };
        for j in 0..count {
            let i = base + j;
            let out = b.out(shadows[i].shape())?;
            list.shadow[j] = shadows[i].buf().device_ptr();
            list.p[j] = p[i].buf().device_ptr();
            list.out[j] = out.buf().device_ptr();
            list.start[j + 1] = list.start[j] + shadows[i].numel() as i64;
            outs.push(out);
        }
        b.launch_n(
            "optim_ema_many",
            list.start[count] as usize,
            vec![raw(&list), Arg::I32(count as i32), Arg::F32(k)],
        )?;
    }
    Ok(outs)
}

/// Σx² per tensor: `optim_sumsq_partial` over up to [`LIST_MAX`] tensors per launch writes
/// SUMSQ_PARTS double partials per tensor, `optim_sumsq_finish` adds each tensor's partials, and
/// one copy brings the sums to the host (the only synchronisation).
pub(super) fn squared_norms(b: &Cuda, xs: &[&Tensor<Cuda>]) -> Result<Vec<f64>> {
    let op = "squared_norms";
    let count = xs.len();
    if count == 0 {
        return Ok(Vec::new());
    }
    for x in xs {
        check_buf(op, x)?;
    }
    // Buffers count f32-sized elements: a double takes two.
    let partial = b.alloc(count * SUMSQ_PARTS * 2)?;
    let sums = b.alloc(count * 2)?;
    for (ci, chunk) in xs.chunks(LIST_MAX).enumerate() {
        let mut list = SumsqList {
            ptr: [0; LIST_MAX],
            len: [0; LIST_MAX],
        };
        for (j, x) in chunk.iter().enumerate() {
            list.ptr[j] = x.buf().device_ptr();
            list.len[j] = x.numel() as i64;
        }
        let offset = (ci * LIST_MAX * SUMSQ_PARTS * std::mem::size_of::<f64>()) as u64;
        b.launch(
            "optim_sumsq_partial",
            (SUMSQ_PARTS as u32, chunk.len() as u32, 1),
            BLOCK,
            0,
            vec![raw(&list), Arg::Ptr(partial.device_ptr() + offset)],
        )?;
    }
    let rows = u32::try_from(count).map_err(|_| Error::shape(op, format!("{count} tensors")))?;
    b.launch(
        "optim_sumsq_finish",
        (rows, 1, 1),
        32,
        0,
        vec![
            Arg::Ptr(partial.device_ptr()),
            Arg::Ptr(sums.device_ptr()),
            Arg::I32(SUMSQ_PARTS as i32),
        ],
    )?;
    let mut host = vec![0f64; count];
    b.bind()?;
    // SAFETY: `sums` holds `count` doubles; `host` outlives the synchronisation below.
    drv("cuMemcpyDtoHAsync", unsafe {
        result::memcpy_dtoh_async(&mut host, sums.device_ptr(), b.inner.stream.cu_stream())
    })?;
    b.synchronize()?;
    Ok(host)
}

// ---- device check --------------------------------------------------------------------------

/// Relative-error bound of the optimiser rows. The kernels are designed to be bit-identical to
/// the CPU backend (Adam, EMA) or to differ only by f64 summation order (norms).
const BOUND: f64 = 1e-6;

/// Normal(0, s) draws under `seed`, or |draw| when `abs` (second moments are non-negative).
fn draw(n: usize, s: f32, abs: bool, seed: u64) -> Vec<f32> {
    (0..n as u64)
        .map(|i| {
            let v = s * rng::normal(seed, i);
            if abs {
                v.abs()
            } else {
                v
            }
        })
        .collect()
}

fn row(op: &str, shape: String, got: Result<(f64, usize)>) -> SelftestRow {
    let (rel, error) = match got {
        Ok((e, 0)) => (e, None),
        Ok((e, diff)) => (e, Some(format!("{diff} elements differ from the CPU bits"))),
        Err(e) => (f64::INFINITY, Some(format!("{e}"))),
    };
    SelftestRow {
        op: op.to_string(),
        shape,
        precision: Precision::F32,
        rel_err: rel,
        bound: BOUND,
        // Differing bits within the bound are reported but pass: the contract is the bound.
        pass: rel <= BOUND,
        error,
    }
}

/// Relative error and the number of elements whose bits differ.
fn compare(got: &[f32], want: &[f32]) -> (f64, usize) {
    let diff = if got.len() == want.len() {
        got.iter()
            .zip(want)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count()
    } else {
        got.len().max(want.len())
    };
    (rel_err(got, want), diff)
}

fn adam_on<B: Backend>(be: &B, shape: &[usize], h: &[Vec<f32>; 4], hp: &AdamStep) -> Result<[Vec<f32>; 3]> {
    let t = h
        .iter()
        .map(|d| be.from_f32(shape, d))
        .collect::<Result<Vec<_>>>()?;
    let (p, m, v) = be.adam_update(&t[0], &t[1], &t[2], &t[3], hp)?;
    Ok([be.to_f32(&p)?, be.to_f32(&m)?, be.to_f32(&v)?])
}

fn ema_on<B: Backend>(be: &B, shape: &[usize], shadow: &[f32], p: &[f32], decay: f64) -> Result<Vec<f32>> {
    let out = be.ema_update(&be.from_f32(shape, shadow)?, &be.from_f32(shape, p)?, decay)?;
    be.to_f32(&out)
}

fn norms_on<B: Backend>(be: &B, host: &[Vec<f32>]) -> Result<Vec<f64>> {
    let t = host
        .iter()
        .map(|d| be.from_f32(&[d.len()], d))
        .collect::<Result<Vec<_>>>()?;
    be.squared_norms(&t.iter().collect::<Vec<_>>())
}

/// Tensor sizes of the list-op rows: 130 tensors, so three Adam lists and two EMA lists; empty
/// tensors first, last and in a row (at a list boundary), one of 300 007 elements (many blocks'
/// worth) among small ones. Grids too small for their list are covered by the CPU emulator
/// (scripts/kernel_emu/test_optim_many.cpp).
fn list_sizes() -> Vec<usize> {
    (0..130)
        .map(|i| match i {
            0 | 47 | 48 | 129 => 0,
            5 => 1,
            20 => 300_007,
            _ => (i * 131 + 7) % 4099,
        })
        .collect()
}

/// `adam_update_many` and one `adam_update` per tensor on the same device tensors, every output
/// kind (p', m', v') concatenated over the tensors: [(list, per-tensor); 3].
fn adam_many_vs_single(
    dev: &Cuda,
    host: &[[Vec<f32>; 4]],
    hp: &AdamStep,
) -> Result<[(Vec<f32>, Vec<f32>); 3]> {
    let t = host
        .iter()
        .map(|h| {
            h.iter()
                .map(|d| dev.from_f32(&[d.len()], d))
                .collect::<Result<Vec<_>>>()
        })
        .collect::<Result<Vec<_>>>()?;
    let list = |k: usize| t.iter().map(|x| &x[k]).collect::<Vec<_>>();
    let many = dev.adam_update_many(&list(0), &list(1), &list(2), &list(3), hp)?;
    if many.len() != t.len() {
        return Err(Error::Backend(format!(
            "{} updates for {} tensors",
            many.len(),
            t.len()
        )));
    }
    let mut out: [(Vec<f32>, Vec<f32>); 3] = Default::default();
    for (x, (p2, m2, v2)) in t.iter().zip(&many) {
        let (p1, m1, v1) = dev.adam_update(&x[0], &x[1], &x[2], &x[3], hp)?;
        for (k, (got, want)) in [(p2, &p1), (m2, &m1), (v2, &v1)].into_iter().enumerate() {
            out[k].0.extend(dev.to_f32(got)?);
            out[k].1.extend(dev.to_f32(want)?);
        }
    }
    Ok(out)
}

/// `ema_update_many` and one `ema_update` per tensor, each concatenated: (list, per-tensor).
fn ema_many_vs_single(dev: &Cuda, host: &[[Vec<f32>; 2]], decay: f64) -> Result<(Vec<f32>, Vec<f32>)> {
    let t = host
        .iter()
        .map(|[s, p]| Ok([dev.from_f32(&[s.len()], s)?, dev.from_f32(&[p.len()], p)?]))
        .collect::<Result<Vec<_>>>()?;
    let shadows: Vec<_> = t.iter().map(|x| &x[0]).collect();
    let params: Vec<_> = t.iter().map(|x| &x[1]).collect();
    let many = dev.ema_update_many(&shadows, &params, decay)?;
    if many.len() != t.len() {
        return Err(Error::Backend(format!(
            "{} results for {} tensors",
            many.len(),
            t.len()
        )));
    }
    let (mut got, mut want) = (Vec::new(), Vec::new());
    for (x, s2) in t.iter().zip(&many) {
        got.extend(dev.to_f32(s2)?);
        want.extend(dev.to_f32(&dev.ema_update(&x[0], &x[1], decay)?)?);
    }
    Ok((got, want))
}

/// Both results, or the first error (named by side).
fn both<T>(got: Result<T>, want: Result<T>) -> Result<(T, T)> {
    match (got, want) {
        (Ok(g), Ok(w)) => Ok((g, w)),
        (Err(e), _) => Err(Error::Backend(format!("cuda: {e}"))),
        (_, Err(e)) => Err(Error::Backend(format!("reference: {e}"))),
    }
}

/// The optimiser kernels against the CPU backend on fresh random tensors, with NaN-poisoned
/// outputs (an element a kernel forgets to write makes the error infinite): Adam (p', m', v'
/// each a row) at a first, a middle and a late step with clip scales, EMA at the first and a late
/// decay, the list ops (`adam_update_many`, `ema_update_many`) against the per-tensor ones on
/// 130 tensors (bitwise), and the per-tensor squared norms of 70 tensors (more than one launch's list, an empty
/// one included; worst per-tensor relative error). Bound 1e-6 relative; a row also notes when
/// the bits differ from the CPU's (the kernels are built to match them). Meant to join
/// `selftest::selftest`'s rows (`srsde-fast selftest`).
pub fn selftest_rows(cuda: &Cuda, seed: u64) -> Result<Vec<SelftestRow>> {
    let cpu = Cpu::<f32>::new();
    let dev = cuda.with_precision(Precision::F32).with_poison(true);
    let mut rows = Vec::new();
    let mut s = seed.wrapping_mul(7919);
    let mut next_seed = || {
        s = s.wrapping_add(1);
        s
    };

    for (shape, step, grad_scale) in [
        (vec![37usize], 1u64, 1.0f64),
        (vec![64, 3, 3, 3], 7, 0.3),
        (vec![300_007], 2_400_000, 0.05),
    ] {
        let n: usize = shape.iter().product();
        let host = [
            draw(n, 0.1, false, next_seed()),
            draw(n, 1.0, false, next_seed()),
            draw(n, 0.05, false, next_seed()),
            draw(n, 0.01, true, next_seed()),
        ];
        let hp = AdamStep {
            lr: 2e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            step,
            grad_scale,
        };
        let r = both(
            adam_on(&dev, &shape, &host, &hp),
            adam_on(&cpu, &shape, &host, &hp),
        );
        for (k, what) in ["p", "m", "v"].iter().enumerate() {
            let cmp = match &r {
                Ok((g, w)) => Ok(compare(&g[k], &w[k])),
                Err(e) => Err(Error::Backend(e.to_string())),
            };
            rows.push(row(
                &format!("adam_update {what}'"),
                format!("{shape:?} step {step} scale {grad_scale}"),
                cmp,
            ));
        }
        // A failed launch leaves the context unusable: report what we have.
        if r.as_ref().is_err_and(|e| e.to_string().contains("CUDA_ERROR")) {
            return Ok(rows);
        }
    }

    for (shape, decay) in [(vec![129usize], 2.0 / 11.0), (vec![256, 128, 3, 3], 0.9999)] {
        let n: usize = shape.iter().product();
        let (sh, ph) = (draw(n, 1.0, false, next_seed()), draw(n, 1.0, false, next_seed()));
        let r = both(
            ema_on(&dev, &shape, &sh, &ph, decay),
            ema_on(&cpu, &shape, &sh, &ph, decay),
        )
        .map(|(g, w)| compare(&g, &w));
        rows.push(row("ema_update", format!("{shape:?} decay {decay:.4}"), r));
    }

    // The list ops against the per-tensor ops on the device, bitwise (130 tensors, several lists).
    let sizes = list_sizes();
    let total: usize = sizes.iter().sum();
    let hp = AdamStep {
        lr: 2e-4,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        step: 11,
        grad_scale: 0.7,
    };
    let host: Vec<[Vec<f32>; 4]> = sizes
        .iter()
        .map(|&n| {
            [
                draw(n, 0.1, false, next_seed()),
                draw(n, 1.0, false, next_seed()),
                draw(n, 0.05, false, next_seed()),
                draw(n, 0.01, true, next_seed()),
            ]
        })
        .collect();
    let r = adam_many_vs_single(&dev, &host, &hp);
    for (k, what) in ["p", "m", "v"].iter().enumerate() {
        let cmp = match &r {
            Ok(out) => Ok(compare(&out[k].0, &out[k].1)),
            Err(e) => Err(Error::Backend(e.to_string())),
        };
        rows.push(row(
            &format!("adam_update_many {what}' vs per-tensor"),
            format!("{} tensors, {total} elements", sizes.len()),
            cmp,
        ));
    }
    if r.as_ref().is_err_and(|e| e.to_string().contains("CUDA_ERROR")) {
        return Ok(rows);
    }
    let host: Vec<[Vec<f32>; 2]> = sizes
        .iter()
        .map(|&n| [draw(n, 1.0, false, next_seed()), draw(n, 1.0, false, next_seed())])
        .collect();
    let r = ema_many_vs_single(&dev, &host, 0.9999).map(|(g, w)| compare(&g, &w));
    let failed_launch = r.as_ref().is_err_and(|e| e.to_string().contains("CUDA_ERROR"));
    rows.push(row(
        "ema_update_many vs per-tensor",
        format!("{} tensors, {total} elements, decay 0.9999", sizes.len()),
        r,
    ));
    if failed_launch {
        return Ok(rows);
    }

    // Sizes from empty to larger than one block's share; 70 tensors span two launches.
    let sizes: Vec<usize> = (0..70)
        .map(|i| match i {
            0 => 0,
            1 => 1,
            5 => 590_000,
            _ => (i * 997) % 20_000 + 3,
        })
        .collect();
    let host: Vec<Vec<f32>> = sizes.iter().map(|&n| draw(n, 0.3, false, next_seed())).collect();
    let r = both(norms_on(&dev, &host), norms_on(&cpu, &host)).and_then(|(g, w)| {
        if g.len() != w.len() {
            return Err(Error::Backend(format!(
                "{} sums for {} tensors",
                g.len(),
                w.len()
            )));
        }
        // Worst tensor, so a small tensor's error is not hidden by a large one's.
        let worst = g.iter().zip(&w).fold(0.0f64, |m, (a, b)| {
            let e = if *b == 0.0 { a.abs() } else { (a - b).abs() / b };
            if e.is_nan() {
                f64::INFINITY
            } else {
                m.max(e)
            }
        });
        Ok((worst, 0))
    });
    rows.push(row(
        "squared_norms",
        format!("{} tensors of 0..590000 elements", sizes.len()),
        r,
    ));
    Ok(rows)
}

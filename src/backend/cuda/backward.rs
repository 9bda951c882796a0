//! Backward (training) ops of the CUDA backend. Kernels: kernels/conv_bwd.cu and the backward
//! families in kernels/norm.cu and kernels/attention.cu; CPU twins: the `*_backward` methods of
//! `backend::cpu::Cpu`.
//!
//! - conv2d: dx is a forward convolution of dy through `Backend::conv2d` (so it runs on the
//!   forward GEMM kernels at the handle's precision) with flipped, transposed weights; for
//!   stride 1 with pad ≤ K−1 directly (pad K−1−pad), otherwise after dilating dy by the stride and
//!   padding it into an [N, O, H+KH−1, W+KW−1] buffer (pad 0), which also covers the rows/columns a
//!   strided forward never reached. dw is an implicit GEMM reducing over the N·OH·OW output pixels,
//!   split over pixels across blocks into a workspace that a second kernel adds up in a fixed
//!   order (reproducible: no float atomics); db is a per-channel sum in double. Large bf16 products
//!   read NHWC bf16 copies (see `weight_grad_mma`), dy's copy shared with the dx conv.
//! - nin: dx is a 1×1 convolution whose OIHW weight is the NIN weight as stored (in, out) read as
//!   [C, O, 1, 1]; dw the same weight-gradient GEMM writing the (in, out) layout.
//! - linear (tiny): dx through `nin` in f32, dw through the weight-gradient GEMM in f32.
//! - group_norm: groups of ≥ 4096 elements are split over warps (statistics of x, then Σdz and
//!   Σdz·x̂, then dx, with fixed-order folds in between); smaller groups take one block per (sample,
//!   group). Both leave per-(sample, channel) sums that a last kernel adds over the batch for dγ, dβ.
//! - attention: one kernel recomputes the softmax rows and forms dS = P ⊙ (dP − rowsum(dP ⊙ P))
//!   into [N, L, L] workspaces; three batched products give dV, dQ, dK. Always f32.
use std::sync::Arc;

use super::{grid_for, ptr, raw, to_i32, Arg, ConvInput, Cuda, CudaBuf, GnStats, Precision, BLOCK};
use crate::backend::shapes::{self, expect_shape};
use crate::backend::{Backend, Grads3};
use crate::error::{Error, Result};
use crate::tensor::{same_shape, Tensor};

/// kernels/conv_bwd.cu `DwGeom`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct DwGeom {
    n: i32,
    c: i32,
    h: i32,
    w: i32,
    o: i32,
    oh: i32,
    ow: i32,
    kh: i32,
    kw: i32,
    stride: i32,
    pad: i32,
    /// Output pixels per `blockIdx.z` part; a multiple of [`DW_P_ALIGN`].
    p_chunk: i32,
    /// Output strides of D[m, k].
    o_sm: i64,
    o_sk: i64,
}

/// Output channels (M) and k = (c, ky, kx) (K) per block of the weight-gradient kernels.
const DW_TILE: usize = 128;
/// The pixel range of a part is a multiple of every kernel's pixel step (8, 16, 32).
const DW_P_ALIGN: usize = 32;
/// Fewest pixels worth a part of their own.
const DW_MIN_SPLIT_P: usize = 1024;
const DW_MAX_SPLITS: usize = 128;
/// Largest L = H·W of the attention backward: two score-row blocks 2·16·(L+1) floats plus the
/// 4 KB channel chunk in the default 48 KB of shared memory.
const ATTENTION_BACKWARD_MAX_L: usize = 350;
const ATTN_TQ: usize = 16;
const ATTN_GEMM_TILE: usize = 64;

/// (parts, pixels per part) for an M×K weight gradient reducing over P pixels on `sms`
/// multiprocessors: about two blocks per multiprocessor, every part non-empty.
fn dw_plan(m: usize, k: usize, p: usize, sms: usize) -> (usize, usize) {
    let tiles = (m.div_ceil(DW_TILE) * k.div_ceil(DW_TILE)).max(1);
    let want = (2 * sms).div_ceil(tiles);
    let splits = want.min(p / DW_MIN_SPLIT_P).clamp(1, DW_MAX_SPLITS);
    let chunk = (p.div_ceil(splits).div_ceil(DW_P_ALIGN) * DW_P_ALIGN).max(DW_P_ALIGN);
    (p.div_ceil(chunk).max(1), chunk)
}

fn dw_kernel(p: Precision) -> &'static str {
    match p {
        Precision::F32 => "conv_dw_f32",
        Precision::Tf32 => "conv_dw_tf32",
        Precision::Bf16 => "conv_dw_bf16",
    }
}

/// x as the weight gradient reads it: the f32 tensor, or the bf16 NHWC copy its forward kept.
#[derive(Clone, Copy)]
enum DwInput<'a> {
    F32(&'a Tensor<Cuda>),
    Nhwc(&'a Arc<CudaBuf>),
}

/// Whether the weight gradient over `c` input channels runs on the pipelined bf16 kernels.
fn dw_uses_mma(b: &Cuda, precision: Precision, c: usize) -> bool {
    precision == Precision::Bf16 && c >= super::MMA_MIN_CHANNELS && b.has_kernels(&super::DW_MMA_KERNELS)
}

/// Whether that weight gradient, over `p` output pixels, reads NHWC copies of x and dy — so a
/// forward that made x's copy may keep it for the backward (`Backend::conv2d_fused_saving`).
pub(super) fn dw_reads_nhwc(b: &Cuda, precision: Precision, c: usize, p: usize) -> bool {
    dw_uses_mma(b, precision, c) && p >= b.nhwc_min_pixels && b.has_kernels(&super::DW_NHWC_KERNELS)
}

/// dw[m·o_sm + k·o_sk] = Σ_p dy[m, p] · im2col(x)[k, p] for the convolution geometry `g` with the
/// output strides `g.o_sm`, `g.o_sk` of dw (`p_chunk` is set here), into a new tensor of `shape`.
fn weight_grad(
    b: &Cuda,
    op: &'static str,
    precision: Precision,
    x: DwInput,
    dy: &Tensor<Cuda>,
    mut g: DwGeom,
    shape: &[usize],
) -> Result<Tensor<Cuda>> {
    let out = b.out(shape)?;
    if out.numel() == 0 {
        return Ok(out);
    }
    let m = g.o as usize;
    let k = g.c as usize * g.kh as usize * g.kw as usize;
    let p = g.n as usize * g.oh as usize * g.ow as usize;
    super::check_gemm_offsets(op, g.c as usize * g.h as usize * g.w as usize, m * k)?;
    let (grid_x, grid_y) = (k.div_ceil(DW_TILE), m.div_ceil(DW_TILE));
    if grid_y > 65535 {
        return Err(Error::shape(op, format!("{m} output channels are too many")));
    }
    if dw_uses_mma(b, precision, g.c as usize) {
        return weight_grad_mma(b, op, x, dy, &g, out);
    }
    let DwInput::F32(x) = x else {
        return Err(Error::Backend(format!(
            "{op}: an NHWC copy of x reached the {precision:?} weight gradient, which reads f32"
        )));
    };
    let (splits, chunk) = dw_plan(m, k, p, b.inner.sm_count);
    g.p_chunk = to_i32(op, chunk)?;
    let (o_sm, o_sk) = (g.o_sm, g.o_sk);
    let grid = (to_i32(op, grid_x)? as u32, grid_y as u32, splits as u32);
    let kernel = dw_kernel(precision);
    if splits == 1 {
        b.launch(kernel, grid, 256, 0, vec![ptr(x), ptr(dy), ptr(&out), raw(&g)])?;
        return Ok(out);
    }
    // Each part writes its whole M×K slice, so the workspace needs no poisoning; it returns to
    // the pool when dropped, safely since every later user queues on the same stream.
    let ws_len = splits * m * k;
    let ws = b.inner.pool.alloc(ws_len * 4, ws_len)?;
    g.o_sm = k as i64;
    g.o_sk = 1;
    b.launch(
        kernel,
        grid,
        256,
        0,
        vec![ptr(x), ptr(dy), Arg::Ptr(ws.device_ptr()), raw(&g)],
    )?;
    dw_reduce(b, &ws, &out, m, k, splits, o_sm, o_sk)?;
    Ok(out)
}

/// `conv_dw_reduce`: out[m·o_sm + k·o_sk] = Σ of the `splits` M×K slices in `ws`, in order.
#[allow(clippy::too_many_arguments)] // the GEMM's sizes and the output strides
fn dw_reduce(
    b: &Cuda,
    ws: &CudaBuf,
    out: &Tensor<Cuda>,
    m: usize,
    k: usize,
    splits: usize,
    o_sm: i64,
    o_sk: i64,
) -> Result<()> {
    b.launch_n(
        "conv_dw_reduce",
        m * k,
        vec![
            Arg::Ptr(ws.device_ptr()),
            ptr(out),
            Arg::I32(m as i32),
            Arg::I32(k as i32),
            Arg::I32(splits as i32),
            Arg::I64(o_sm),
            Arg::I64(o_sk),
        ],
    )
}

/// The weight gradient on the pipelined bf16 kernel (kernels/conv.cu `conv_dw_bf16_mma*`):
/// blocks over (filter tap × channel tile, output-channel tile), the pixels split into slices so
/// that about two waves of blocks run (one block per multiprocessor), each slice ≥ 128 pixels;
/// the slices' partial sums are added in order by `conv_dw_reduce`.
fn weight_grad_mma(
    b: &Cuda,
    op: &'static str,
    x: DwInput,
    dy: &Tensor<Cuda>,
    g: &DwGeom,
    out: Tensor<Cuda>,
) -> Result<Tensor<Cuda>> {
    let (m, c, khw) = (g.o as usize, g.c as usize, (g.kh * g.kw) as usize);
    let k = c * khw;
    let p = g.n as usize * g.oh as usize * g.ow as usize;
    // Large products read bf16 NHWC copies of x and dy (16-byte copies, ldmatrix fragments, two
    // blocks per multiprocessor); the copies return to the pool when dropped (same stream).
    // (A copy kept by the forward is read whatever this handle's threshold says.)
    let nhwc = matches!(x, DwInput::Nhwc(_)) || dw_reads_nhwc(b, Precision::Bf16, c, p);
    let kernels = if nhwc {
        &super::DW_NHWC_KERNELS
    } else {
        &super::DW_MMA_KERNELS
    };
    let ((kernel, smem), bn) = if c > 64 {
        (kernels[0], 128)
    } else {
        (kernels[1], 64)
    };
    let col_blocks = khw * c.div_ceil(bn);
    let blocks = col_blocks * m.div_ceil(128);
    // At most two full waves of resident blocks: rounding the split count up left a nearly empty
    // third wave — on the H200 the weight gradients of a ve-paper batch-64 step took 161 ms that
    // way and 118 ms this way.
    let per_sm = if nhwc { 2 } else { 1 };
    let want = (2 * per_sm * b.inner.sm_count) / blocks.max(1);
    let splits = want.min(p.div_ceil(128)).clamp(1, 4096);
    let chunk = p.div_ceil(splits).div_ceil(32) * 32;
    let splits = p.div_ceil(chunk);
    let cg = super::ConvGeom {
        n: g.n,
        c: g.c,
        h: g.h,
        w: g.w,
        o: g.o,
        oh: g.oh,
        ow: g.ow,
        kh: g.kh,
        kw: g.kw,
        stride: g.stride,
        pad: g.pad,
        k_chunk: to_i32(op, chunk)?,
        a_sm: 0,
        a_sk: 0,
    };
    let ws_len = splits * m * k;
    let ws = b.inner.pool.alloc(ws_len * 4, ws_len)?;
    let grid = (
        to_i32(op, col_blocks)? as u32,
        m.div_ceil(128) as u32,
        splits as u32,
    );
    // The operands: NHWC copies (held until after the launch) or x and dy themselves.
    let copies = if nhwc {
        let n = g.n as usize;
        let xh = match x {
            DwInput::Nhwc(kept) => kept.clone(),
            DwInput::F32(x) => b.nhwc_input(x, n, c, g.h as usize * g.w as usize)?,
        };
        Some((xh, b.nhwc_input(dy, n, m, g.oh as usize * g.ow as usize)?))
    } else {
        None
    };
    let (xa, dya) = match (&copies, x) {
        (Some((xh, dyh)), _) => (Arg::Ptr(xh.device_ptr()), Arg::Ptr(dyh.device_ptr())),
        (None, DwInput::F32(x)) => (ptr(x), ptr(dy)),
        (None, DwInput::Nhwc(_)) => unreachable!("an NHWC copy always takes the NHWC kernels"),
    };
    b.launch(
        kernel,
        grid,
        256,
        smem as u32,
        vec![xa, dya, Arg::Ptr(ws.device_ptr()), raw(&cg)],
    )?;
    dw_reduce(b, &ws, &out, m, k, splits, g.o_sm, g.o_sk)?;
    Ok(out)
}

/// db[o] = Σ over n and the hw positions of dy [N, O, hw], in double and in a fixed order.
fn bias_grad(
    b: &Cuda,
    op: &'static str,
    dy: &Tensor<Cuda>,
    n: usize,
    o: usize,
    hw: usize,
) -> Result<Tensor<Cuda>> {
    let db = b.out(&[o])?;
    if o == 0 {
        return Ok(db);
    }
    if o > 65535 {
        return Err(Error::shape(op, format!("{o} output channels are too many")));
    }
    // dy's NHWC copy, made for this op's GEMMs, carries its channel sums per 128-pixel tile:
    // add those rows up instead of reading dy again (when its channels need no padding).
    if o.is_multiple_of(super::NHWC_CPAD) {
        if let Some(sums) = b.nhwc_channel_sums(dy, n, o, hw) {
            let rows = n * hw.div_ceil(super::NHWC_WIDE_TILE);
            bias_sum(b, op, Arg::Ptr(sums.device_ptr()), rows, o, 1, &db)?;
            return Ok(db);
        }
    }
    bias_sum(b, op, ptr(dy), n, o, hw, &db)?;
    Ok(db)
}

/// db[o] = Σ over n and hw of src [n, o, hw] (`conv_db_partial` + `conv_db_finish`).
fn bias_sum(
    b: &Cuda,
    op: &'static str,
    src: Arg,
    n: usize,
    o: usize,
    hw: usize,
    db: &Tensor<Cuda>,
) -> Result<()> {
    // About eight blocks per multiprocessor, each striding over every sample's plane four
    // positions per thread at a time (a part wider than a plane would idle).
    // (The kernel walks planes under 4·BLOCK positions as one flat range over n and position.)
    let span = if hw < 4 * BLOCK as usize { n * hw } else { hw };
    let parts = (8 * b.inner.sm_count)
        .div_ceil(o)
        .min(span.div_ceil(4 * BLOCK as usize))
        .clamp(1, 64);
    let partial = b.inner.pool.alloc(o * parts * 8, o * parts * 2)?;
    b.launch(
        "conv_db_partial",
        (parts as u32, o as u32, 1),
        BLOCK,
        0,
        vec![
            src,
            Arg::Ptr(partial.device_ptr()),
            Arg::I32(to_i32(op, n)?),
            Arg::I32(o as i32),
            Arg::I64(hw as i64),
        ],
    )?;
    b.launch_n(
        "conv_db_finish",
        o,
        vec![
            Arg::Ptr(partial.device_ptr()),
            ptr(db),
            Arg::I32(o as i32),
            Arg::I32(parts as i32),
        ],
    )
}

/// How dx of a convolution is taken as a forward convolution of dy with the flipped weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DxRoute {
    /// conv2d(dy, w', stride 1, pad) directly.
    Direct { pad: usize },
    /// Dilate dy by the stride into a [DH, DW] buffer with dy[oy, ox] at
    /// (off_y + s·oy, off_x + s·ox) (offsets may be negative: cropped), then conv2d pad 0.
    Dilated {
        dh: usize,
        dw: usize,
        off_y: isize,
        off_x: isize,
    },
}

fn dx_route(g: &shapes::Conv2d) -> DxRoute {
    if g.stride == 1 && g.kh == g.kw && g.pad < g.kh {
        return DxRoute::Direct {
            pad: g.kh - 1 - g.pad,
        };
    }
    DxRoute::Dilated {
        dh: g.h + g.kh - 1,
        dw: g.w + g.kw - 1,
        off_y: g.kh as isize - 1 - g.pad as isize,
        off_x: g.kw as isize - 1 - g.pad as isize,
    }
}

/// dx of `conv2d` for validated geometry `g`.
fn conv_input_grad(
    b: &Cuda,
    op: &'static str,
    w: &Tensor<Cuda>,
    dy: &Tensor<Cuda>,
    g: &shapes::Conv2d,
) -> Result<Tensor<Cuda>> {
    if g.n * g.c * g.h * g.w == 0 || dy.numel() == 0 {
        return b.zeros(&[g.n, g.c, g.h, g.w]);
    }
    let wt = b.out(&[g.c, g.o, g.kh, g.kw])?;
    b.launch_n(
        "conv_bwd_flip_weights",
        wt.numel(),
        vec![
            ptr(w),
            ptr(&wt),
            Arg::I32(to_i32(op, g.o)?),
            Arg::I32(to_i32(op, g.c)?),
            Arg::I32(to_i32(op, g.kh)?),
            Arg::I32(to_i32(op, g.kw)?),
        ],
    )?;
    match dx_route(g) {
        DxRoute::Direct { pad } => b.conv2d(dy, &wt, None, 1, pad),
        DxRoute::Dilated { dh, dw, off_y, off_x } => {
            let dyd = b.out(&[g.n, g.o, dh, dw])?;
            let total = dyd.numel();
            b.launch(
                "conv_bwd_dilate_pad",
                (grid_for(total), 1, 1),
                BLOCK,
                0,
                vec![
                    ptr(dy),
                    ptr(&dyd),
                    Arg::I64(total as i64),
                    Arg::I32(to_i32(op, g.oh)?),
                    Arg::I32(to_i32(op, g.ow)?),
                    Arg::I32(to_i32(op, dh)?),
                    Arg::I32(to_i32(op, dw)?),
                    Arg::I32(to_i32(op, g.stride)?),
                    Arg::I32(off_y as i32),
                    Arg::I32(off_x as i32),
                ],
            )?;
            b.conv2d(&dyd, &wt, None, 1, 0)
        }
    }
}

pub(super) fn linear_backward(
    b: &Cuda,
    x: &Tensor<Cuda>,
    w: &Tensor<Cuda>,
    dy: &Tensor<Cuda>,
) -> Result<Grads3<Cuda>> {
    let op = "linear_backward";
    let (n, i, o) = shapes::linear(op, x.shape(), w.shape(), None)?;
    expect_shape(op, "dy", dy.shape(), &[n, o])?;
    // These layers are tiny (the time-embedding MLP): always f32.
    let f32b = b.with_precision(Precision::F32);
    // dx[n, i] = Σ_o dy[n, o]·w[o, i]: a NIN over [N, O, 1, 1] whose (in, out) weight is w as stored.
    let dx = if n * i == 0 {
        b.zeros(&[n, i])?
    } else {
        let zero_bias = b.zeros(&[i])?;
        f32b.nin(&dy.reshape(&[n, o, 1, 1])?, w, &zero_bias)?
            .reshape(&[n, i])?
    };
    let g = DwGeom {
        n: to_i32(op, n)?,
        c: to_i32(op, i)?,
        h: 1,
        w: 1,
        o: to_i32(op, o)?,
        oh: 1,
        ow: 1,
        kh: 1,
        kw: 1,
        stride: 1,
        pad: 0,
        p_chunk: 0,
        o_sm: i as i64,
        o_sk: 1,
    };
    let dw = weight_grad(b, op, Precision::F32, DwInput::F32(x), dy, g, &[o, i])?;
    let db = bias_grad(b, op, dy, n, o, 1)?;
    Ok(Grads3 { dx, dw, db })
}

pub(super) fn nin_backward(
    b: &Cuda,
    x: &Tensor<Cuda>,
    w: &Tensor<Cuda>,
    dy: &Tensor<Cuda>,
) -> Result<Grads3<Cuda>> {
    let op = "nin_backward";
    let b = &b.with_shared_nhwc();
    let (n, c, h, wd, o) = shapes::nin(op, x.shape(), w.shape(), None)?;
    expect_shape(op, "dy", dy.shape(), &[n, o, h, wd])?;
    // dx[n, c, p] = Σ_o w[c, o]·dy[n, o, p]: a 1×1 convolution whose OIHW weight [C, O, 1, 1] is
    // the NIN weight exactly as stored.
    let dx = if x.numel() == 0 || dy.numel() == 0 {
        b.zeros(x.shape())?
    } else {
        b.conv2d(dy, &w.reshape(&[c, o, 1, 1])?, None, 1, 0)?
    };
    let g = DwGeom {
        n: to_i32(op, n)?,
        c: to_i32(op, c)?,
        h: to_i32(op, h)?,
        w: to_i32(op, wd)?,
        o: to_i32(op, o)?,
        oh: to_i32(op, h)?,
        ow: to_i32(op, wd)?,
        kh: 1,
        kw: 1,
        stride: 1,
        pad: 0,
        p_chunk: 0,
        o_sm: 1,
        o_sk: o as i64,
    };
    let dw = weight_grad(b, op, b.precision(), DwInput::F32(x), dy, g, &[c, o])?;
    let db = bias_grad(b, op, dy, n, o, h * wd)?;
    Ok(Grads3 { dx, dw, db })
}

/// conv2d's gradients from x itself or the NHWC copy its forward kept.
pub(super) fn conv2d_backward_from(
    b: &Cuda,
    x: &ConvInput,
    w: &Tensor<Cuda>,
    dy: &Tensor<Cuda>,
    stride: usize,
    pad: usize,
) -> Result<Grads3<Cuda>> {
    let op = "conv2d_backward";
    // dy's NHWC copy serves both the input-gradient conv and the weight gradient.
    let b = &b.with_shared_nhwc();
    let g = shapes::conv2d(op, x.shape(), w.shape(), stride, pad)?;
    expect_shape(op, "dy", dy.shape(), &[g.n, g.o, g.oh, g.ow])?;
    let dx = conv_input_grad(b, op, w, dy, &g)?;
    let dg = DwGeom {
        n: to_i32(op, g.n)?,
        c: to_i32(op, g.c)?,
        h: to_i32(op, g.h)?,
        w: to_i32(op, g.w)?,
        o: to_i32(op, g.o)?,
        oh: to_i32(op, g.oh)?,
        ow: to_i32(op, g.ow)?,
        kh: to_i32(op, g.kh)?,
        kw: to_i32(op, g.kw)?,
        stride: to_i32(op, g.stride)?,
        pad: to_i32(op, g.pad)?,
        p_chunk: 0,
        o_sm: (g.c * g.kh * g.kw) as i64,
        o_sk: 1,
    };
    let xin = match x {
        ConvInput::Tensor(x) => DwInput::F32(x),
        ConvInput::Nhwc { copy, .. } => DwInput::Nhwc(copy),
    };
    let dw = weight_grad(b, op, b.precision(), xin, dy, dg, w.shape())?;
    let db = bias_grad(b, op, dy, g.n, g.o, g.oh * g.ow)?;
    Ok(Grads3 { dx, dw, db })
}

/// Warps per block of the split GroupNorm backward kernels (kernels/norm.cu `gn_bwd_*`): one
/// warp per unit (a slice of one channel).
const GN_BWD_WARPS: usize = 8;
/// Largest and smallest unit span in elements; multiples of 128 (one float4 per lane).
const GN_BWD_MAX_SPAN: usize = 2048;
const GN_BWD_MIN_SPAN: usize = 128;
/// Below this group length the single-block `gn_backward` keeps: its block re-reads a group
/// that small (≤ 16 KB of x, the same of dy) from cache, so it moves the tensors once, in one
/// launch. Larger groups fall out of cache between its four passes.
const GN_BWD_SINGLE_MAX_GROUP: usize = 4096;

/// How `group_norm_backward` runs: `None` for the single-block kernel, else the split kernels
/// with this many elements per unit. Units shrink (down to 128 elements) until there are about
/// four blocks per multiprocessor, so a batch-1 128×128 layer still fills the device.
fn gn_backward_span(n: usize, c: usize, hw: usize, groups: usize, sms: usize) -> Option<usize> {
    if c / groups * hw < GN_BWD_SINGLE_MAX_GROUP {
        return None;
    }
    let target_units = 4 * sms * GN_BWD_WARPS;
    let mut span = GN_BWD_MAX_SPAN;
    while span > GN_BWD_MIN_SPAN && n * c * hw.div_ceil(span) < target_units {
        span /= 2;
    }
    Some(span)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn group_norm_backward(
    b: &Cuda,
    x: &Tensor<Cuda>,
    stats: Option<&GnStats>,
    gamma: &Tensor<Cuda>,
    beta: &Tensor<Cuda>,
    dy: &Tensor<Cuda>,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Grads3<Cuda>> {
    let op = "group_norm_backward";
    let (n, c, h, w) = shapes::group_norm(op, x.shape(), gamma.shape(), beta.shape(), groups)?;
    same_shape(op, x.shape(), dy.shape())?;
    if x.numel() == 0 {
        return Ok(Grads3 {
            dx: b.zeros(x.shape())?,
            dw: b.zeros(&[c])?,
            db: b.zeros(&[c])?,
        });
    }
    let dx = b.out(x.shape())?;
    let (dgamma, dbeta) = (b.out(&[c])?, b.out(&[c])?);
    let hw = h * w;
    // Per-(sample, channel) partial sums of dγ and dβ, every one written by either path.
    let part_g = b.inner.pool.alloc(n * c * 8, n * c * 2)?;
    let part_b = b.inner.pool.alloc(n * c * 8, n * c * 2)?;
    let parts = (part_g.device_ptr(), part_b.device_ptr());
    match gn_backward_span(n, c, hw, groups, b.inner.sm_count) {
        Some(span) => gn_backward_split(
            b,
            op,
            [x, gamma, beta, dy, &dx],
            stats,
            parts,
            (n, c, hw, groups),
            span,
            eps,
            silu,
        )?,
        None => {
            b.launch(
                "gn_backward",
                (to_i32(op, n * groups)? as u32, 1, 1),
                256,
                0,
                vec![
                    ptr(x),
                    ptr(gamma),
                    ptr(beta),
                    ptr(dy),
                    ptr(&dx),
                    Arg::Ptr(parts.0),
                    Arg::Ptr(parts.1),
                    Arg::I32(to_i32(op, c)?),
                    Arg::I32(to_i32(op, groups)?),
                    Arg::I64(hw as i64),
                    Arg::F64(eps),
                    Arg::I32(silu as i32),
                ],
            )?;
        }
    }
    b.launch_n(
        "gn_backward_params",
        c,
        vec![
            Arg::Ptr(parts.0),
            Arg::Ptr(parts.1),
            ptr(&dgamma),
            ptr(&dbeta),
            Arg::I32(to_i32(op, n)?),
            Arg::I32(to_i32(op, c)?),
        ],
    )?;
    Ok(Grads3 {
        dx,
        dw: dgamma,
        db: dbeta,
    })
}

/// The split backward (kernels/norm.cu, "backward, split over many blocks"): x is read three
/// times and dy twice, each pass spread over `span`-element units, one warp each; writes dx and
/// the per-(sample, channel) partials `parts` = (Σ dz·x̂, Σ dz).
#[allow(clippy::too_many_arguments)]
fn gn_backward_split(
    b: &Cuda,
    op: &'static str,
    [x, gamma, beta, dy, dx]: [&Tensor<Cuda>; 5],
    stats: Option<&GnStats>,
    parts: (u64, u64),
    (n, c, hw, groups): (usize, usize, usize, usize),
    span: usize,
    eps: f64,
    silu: bool,
) -> Result<()> {
    let cg = c / groups;
    let spans = hw.div_ceil(span);
    let units = n * c * spans;
    let ngroups = n * groups;
    let len = (cg * hw) as f64;
    // (Σx, Σx²) and later (Σdz, Σdz·x̂) per unit, f64; the four per-group floats of `gstat`
    // (mean, rstd, mean(dz·γ), mean(dz·γ·x̂)).
    let part_buf = b.inner.pool.alloc(units * 16, units * 4)?;
    let gstat_buf = b.inner.pool.alloc(ngroups * 16, ngroups * 4)?;
    let (part, gstat) = (part_buf.device_ptr(), gstat_buf.device_ptr());
    let unit_grid = (to_i32(op, units.div_ceil(GN_BWD_WARPS))? as u32, 1, 1);
    let group_grid = (to_i32(op, ngroups.div_ceil(GN_BWD_WARPS))? as u32, 1, 1);
    let threads = (32 * GN_BWD_WARPS) as u32;
    let (c32, cg32, span32, spans32) = (
        to_i32(op, c)?,
        to_i32(op, cg)?,
        to_i32(op, span)?,
        to_i32(op, spans)?,
    );
    let (hw64, units64, ngroups64) = (hw as i64, units as i64, ngroups as i64);
    // gn_bwd_dsums (into `part`) and gn_bwd_dx (into dx) take the same arguments.
    let pass_args = |out: Arg| {
        vec![
            ptr(x),
            ptr(dy),
            Arg::Ptr(gstat),
            ptr(gamma),
            ptr(beta),
            out,
            Arg::I32(c32),
            Arg::I32(cg32),
            Arg::I64(hw64),
            Arg::I32(span32),
            Arg::I32(spans32),
            Arg::I64(units64),
            Arg::I32(silu as i32),
        ]
    };
    // The statistics: from the partials the forward kept (same [group][slice][2] layout, so
    // gn_bwd_fold_x folds them too), else from a pass over x.
    let (sums, per) = match stats {
        Some(s) if s.part.len() == ngroups * s.chunks * 4 => (s.part.device_ptr(), s.chunks),
        _ => {
            let xsums = vec![
                ptr(x),
                Arg::Ptr(part),
                Arg::I64(hw64),
                Arg::I32(span32),
                Arg::I32(spans32),
                Arg::I64(units64),
            ];
            b.launch("gn_bwd_xsums", unit_grid, threads, 0, xsums)?;
            (part, cg * spans)
        }
    };
    let fold_x = vec![
        Arg::Ptr(sums),
        Arg::Ptr(gstat),
        Arg::I64(ngroups64),
        Arg::I64(per as i64),
        Arg::F64(len),
        Arg::F64(eps),
    ];
    b.launch("gn_bwd_fold_x", group_grid, threads, 0, fold_x)?;
    b.launch("gn_bwd_dsums", unit_grid, threads, 0, pass_args(Arg::Ptr(part)))?;
    let fold_d = vec![
        Arg::Ptr(part),
        ptr(gamma),
        Arg::Ptr(gstat),
        Arg::Ptr(parts.0),
        Arg::Ptr(parts.1),
        Arg::I32(c32),
        Arg::I32(cg32),
        Arg::I32(spans32),
        Arg::I64(ngroups64),
        Arg::F64(len),
    ];
    b.launch("gn_bwd_fold_d", group_grid, threads, 0, fold_d)?;
    b.launch("gn_bwd_dx", unit_grid, threads, 0, pass_args(ptr(dx)))?;
    Ok(())
}

#[cfg(test)]
mod gn_backward_plan_tests {
    use super::*;

    const H100_SMS: usize = 132;

    #[test]
    fn small_groups_keep_the_single_kernel() {
        // 16×16 with 8 channels per group: 2048-element groups, re-read from cache.
        assert_eq!(gn_backward_span(64, 256, 256, 32, H100_SMS), None);
        assert_eq!(gn_backward_span(3, 12, 35, 4, H100_SMS), None);
    }

    #[test]
    fn large_groups_split_and_fill_the_device_at_any_batch() {
        for n in [1, 2, 8, 64] {
            let (c, hw) = (128, 128 * 128);
            let span = gn_backward_span(n, c, hw, 32, H100_SMS).expect("65536-element groups split");
            assert!((GN_BWD_MIN_SPAN..=GN_BWD_MAX_SPAN).contains(&span) && span.is_multiple_of(128));
            let blocks = (n * c * hw.div_ceil(span)).div_ceil(GN_BWD_WARPS);
            assert!(blocks >= 2 * H100_SMS, "batch {n}: {blocks} blocks");
        }
        // Large batches keep the longest units (fewest partial sums).
        assert_eq!(
            gn_backward_span(64, 128, 128 * 128, 32, H100_SMS),
            Some(GN_BWD_MAX_SPAN)
        );
    }
}

pub(super) fn attention_backward(
    b: &Cuda,
    q: &Tensor<Cuda>,
    k: &Tensor<Cuda>,
    v: &Tensor<Cuda>,
    dy: &Tensor<Cuda>,
) -> Result<(Tensor<Cuda>, Tensor<Cuda>, Tensor<Cuda>)> {
    let op = "attention_backward";
    let (n, c, h, w) = shapes::attention(op, q.shape(), &[k.shape(), v.shape(), dy.shape()])?;
    let l = h * w;
    if l > ATTENTION_BACKWARD_MAX_L {
        return Err(Error::Backend(format!(
            "attention backward over L = {l} positions exceeds the CUDA kernel's limit of \
             {ATTENTION_BACKWARD_MAX_L}"
        )));
    }
    if q.numel() == 0 {
        return Ok((b.zeros(q.shape())?, b.zeros(q.shape())?, b.zeros(q.shape())?));
    }
    if n > 65535 {
        return Err(Error::shape(op, format!("batch {n} is too large")));
    }
    let (dq, dk, dv) = (b.out(q.shape())?, b.out(q.shape())?, b.out(q.shape())?);
    let (c32, l32) = (to_i32(op, c)?, to_i32(op, l)?);
    let scale = (1.0 / (c as f64).sqrt()) as f32;
    // P and dS, [N, L, L] each; every row of both is written by attn_bwd_scores.
    let nll = n * l * l;
    let p_ws = b.inner.pool.alloc(nll * 4, nll)?;
    let ds_ws = b.inner.pool.alloc(nll * 4, nll)?;
    let smem = (2 * ATTN_TQ * (l + 1) * 4) as u32;
    b.launch(
        "attn_bwd_scores",
        (l.div_ceil(ATTN_TQ) as u32, n as u32, 1),
        256,
        smem,
        vec![
            ptr(q),
            ptr(k),
            ptr(v),
            ptr(dy),
            Arg::Ptr(p_ws.device_ptr()),
            Arg::Ptr(ds_ws.device_ptr()),
            Arg::I32(c32),
            Arg::I32(l32),
            Arg::F32(scale),
        ],
    )?;
    let grid = (
        l.div_ceil(ATTN_GEMM_TILE) as u32,
        to_i32(op, c.div_ceil(ATTN_GEMM_TILE))? as u32,
        n as u32,
    );
    // (input, matrix, output, scale, transposed): dV = dO·P, dQ = K·dSᵀ/√C, dK = Q·dS/√C.
    let products = [
        (dy, p_ws.device_ptr(), &dv, 1.0f32, 0),
        (k, ds_ws.device_ptr(), &dq, scale, 1),
        (q, ds_ws.device_ptr(), &dk, scale, 0),
    ];
    for (input, mat, out, s, trans) in products {
        b.launch(
            "attn_bwd_gemm",
            grid,
            256,
            0,
            vec![
                ptr(input),
                Arg::Ptr(mat),
                ptr(out),
                Arg::I32(c32),
                Arg::I32(l32),
                Arg::F32(s),
                Arg::I32(trans),
            ],
        )?;
    }
    Ok((dq, dk, dv))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::Cpu;

    #[test]
    fn dw_plan_covers_p_with_nonempty_aligned_parts() {
        for &(m, k) in &[
            (3, 1152),
            (128, 54),
            (128, 1152),
            (256, 2304),
            (512, 4608),
            (1, 1),
        ] {
            for &p in &[0, 1, 31, 1000, 4096, 65536, 64 * 128 * 128] {
                let (splits, chunk) = dw_plan(m, k, p, 132);
                let what = format!("m{m} k{k} p{p}: {splits} × {chunk}");
                assert!((1..=DW_MAX_SPLITS).contains(&splits), "{what}");
                assert_eq!(chunk % DW_P_ALIGN, 0, "{what}");
                assert!(splits * chunk >= p, "{what}");
                assert!(p == 0 || (splits - 1) * chunk < p, "{what}: an empty part");
            }
        }
        // Batch 64 at 128×128, 128 → 128 channels: 9 tiles, so the pixels are split.
        let (splits, _) = dw_plan(128, 1152, 64 * 128 * 128, 132);
        assert!(splits >= 16, "{splits}");
        // A small layer is not split into slivers.
        assert_eq!(dw_plan(256, 2304, 256, 132).0, 1);
    }

    /// The dx route, carried out on the host (dilate/pad and flip as the kernels do) followed by
    /// the CPU backend's forward conv2d, equals the CPU backend's conv2d_backward dx, for the
    /// network's geometries and odd ones (stride 2 with (H+2p−K) % s ≠ 0, pad > K−1, 5×5 / 3).
    #[test]
    fn dx_route_equals_the_cpu_backward() {
        let cpu = Cpu::<f64>::new();
        let cases = [
            (2, 3, 9, 9, 4, 3, 3, 1, 1),
            (1, 3, 10, 9, 5, 3, 3, 2, 0),
            (2, 5, 11, 13, 7, 3, 3, 2, 1),
            (1, 4, 9, 9, 6, 5, 5, 3, 2),
            (1, 3, 6, 7, 2, 1, 1, 1, 1),
            (1, 3, 6, 7, 2, 1, 1, 1, 0),
            (1, 2, 7, 8, 3, 3, 1, 1, 1),
            (1, 2, 8, 7, 3, 2, 3, 2, 1),
        ];
        for (ci, &(n, c, h, w, o, kh, kw, s, p)) in cases.iter().enumerate() {
            let g = shapes::conv2d("t", &[n, c, h, w], &[o, c, kh, kw], s, p).unwrap();
            let draw = |len: usize, seed: u64| -> Vec<f64> {
                (0..len as u64)
                    .map(|i| crate::rng::normal(seed, i) as f64)
                    .collect()
            };
            let x = draw(n * c * h * w, 10 + ci as u64);
            let wv = draw(o * c * kh * kw, 20 + ci as u64);
            let dy = draw(n * o * g.oh * g.ow, 30 + ci as u64);
            let xt = cpu.from_f64(&[n, c, h, w], &x).unwrap();
            let wt = cpu.from_f64(&[o, c, kh, kw], &wv).unwrap();
            let dyt = cpu.from_f64(&[n, o, g.oh, g.ow], &dy).unwrap();
            let want = cpu
                .to_f64(&cpu.conv2d_backward(&xt, &wt, &dyt, s, p).unwrap().dx)
                .unwrap();

            // conv_bwd_flip_weights
            let mut flipped = vec![0.0; wv.len()];
            for oo in 0..o {
                for cc in 0..c {
                    for ky in 0..kh {
                        for kx in 0..kw {
                            flipped[((cc * o + oo) * kh + kh - 1 - ky) * kw + kw - 1 - kx] =
                                wv[((oo * c + cc) * kh + ky) * kw + kx];
                        }
                    }
                }
            }
            let fw = cpu.from_f64(&[c, o, kh, kw], &flipped).unwrap();
            let got = match dx_route(&g) {
                DxRoute::Direct { pad } => cpu.conv2d(&dyt, &fw, None, 1, pad).unwrap(),
                DxRoute::Dilated { dh, dw, off_y, off_x } => {
                    // conv_bwd_dilate_pad
                    let mut d = vec![0.0; n * o * dh * dw];
                    for r in 0..n * o {
                        for y in 0..dh {
                            for xx in 0..dw {
                                let (uy, ux) = (y as isize - off_y, xx as isize - off_x);
                                let si = s as isize;
                                if uy < 0 || ux < 0 || uy % si != 0 || ux % si != 0 {
                                    continue;
                                }
                                let (oy, ox) = ((uy / si) as usize, (ux / si) as usize);
                                if oy < g.oh && ox < g.ow {
                                    d[(r * dh + y) * dw + xx] = dy[(r * g.oh + oy) * g.ow + ox];
                                }
                            }
                        }
                    }
                    let dt = cpu.from_f64(&[n, o, dh, dw], &d).unwrap();
                    cpu.conv2d(&dt, &fw, None, 1, 0).unwrap()
                }
            };
            assert_eq!(got.shape(), &[n, c, h, w], "case {ci}");
            let e = crate::check::rel_err_f64(&cpu.to_f64(&got).unwrap(), &want);
            assert!(e < 1e-12, "case {ci} {:?}: rel err {e}", dx_route(&g));
        }
    }
}

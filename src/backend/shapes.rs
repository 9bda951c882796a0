//! Shape validation shared by every backend.
//!
//! Each function checks the shapes of one op's inputs and returns the dimensions the op computes
//! with (or its output shape), or `Error::Shape` naming the op. The backends call these before
//! touching any data, so the CPU and CUDA backends accept and reject exactly the same inputs and
//! report them with the same messages. Backend-specific limits (32-bit kernel offsets, the fused
//! attention kernel's length bound, ...) stay in the backend that has them.
use super::{Fir, UpFirDn};
use crate::error::{Error, Result};
use crate::tensor::same_shape;

/// The 4 dimensions of an NCHW shape.
pub(crate) fn dims4(op: &'static str, x: &[usize]) -> Result<(usize, usize, usize, usize)> {
    match *x {
        [n, c, h, w] => Ok((n, c, h, w)),
        _ => Err(Error::shape(op, format!("expected NCHW, got {x:?}"))),
    }
}

/// The 2 dimensions of a matrix shape.
pub(crate) fn dims2(op: &'static str, x: &[usize]) -> Result<(usize, usize)> {
    match *x {
        [a, b] => Ok((a, b)),
        _ => Err(Error::shape(op, format!("expected 2-d, got {x:?}"))),
    }
}

/// The length of a 1-d shape.
pub(crate) fn dims1(op: &'static str, x: &[usize]) -> Result<usize> {
    match *x {
        [n] => Ok(n),
        _ => Err(Error::shape(op, format!("expected 1-d, got {x:?}"))),
    }
}

/// `got` must equal `want`; `what` names the argument in the error.
pub(crate) fn expect_shape(op: &'static str, what: &str, got: &[usize], want: &[usize]) -> Result<()> {
    if got != want {
        return Err(Error::shape(
            op,
            format!("{what} has shape {got:?}, expected {want:?}"),
        ));
    }
    Ok(())
}

/// Size of dim 0 of a per-sample op's input (an error for a scalar).
pub(crate) fn batch(op: &'static str, x: &[usize]) -> Result<usize> {
    x.first()
        .copied()
        .ok_or_else(|| Error::shape(op, "x is a scalar"))
}

/// `scale_per_sample`: x [N, ...] and s [N]; returns N.
pub(crate) fn scale_per_sample(op: &'static str, x: &[usize], s: &[usize]) -> Result<usize> {
    let n = batch(op, x)?;
    expect_shape(op, "s", s, &[n])?;
    Ok(n)
}

/// `add_channel_bias`: x [N,C,H,W] and b [N,C]; returns x's dims.
pub(crate) fn channel_bias(
    op: &'static str,
    x: &[usize],
    b: &[usize],
) -> Result<(usize, usize, usize, usize)> {
    let (n, c, h, w) = dims4(op, x)?;
    expect_shape(op, "bias", b, &[n, c])?;
    Ok((n, c, h, w))
}

/// `concat_channels`: NCHW inputs agreeing in N, H and W; returns the output's (N, ΣC, H, W).
pub(crate) fn concat_channels<'a>(
    op: &'static str,
    xs: impl IntoIterator<Item = &'a [usize]>,
) -> Result<(usize, usize, usize, usize)> {
    let mut xs = xs.into_iter();
    let first = xs.next().ok_or_else(|| Error::shape(op, "no inputs"))?;
    let (n, c0, h, w) = dims4(op, first)?;
    let mut ctot = c0;
    for x in xs {
        let (nx, cx, hx, wx) = dims4(op, x)?;
        if (nx, hx, wx) != (n, h, w) {
            return Err(Error::shape(op, format!("{x:?} vs {first:?}")));
        }
        ctot += cx;
    }
    Ok((n, ctot, h, w))
}

/// `slice_channels`: channels [start, start+len) must lie inside x; returns x's dims.
pub(crate) fn slice_channels(
    op: &'static str,
    x: &[usize],
    start: usize,
    len: usize,
) -> Result<(usize, usize, usize, usize)> {
    let (n, c, h, w) = dims4(op, x)?;
    if start.checked_add(len).is_none_or(|end| end > c) {
        return Err(Error::shape(
            op,
            format!("channels [{start}, {start}+{len}) of {x:?}"),
        ));
    }
    Ok((n, c, h, w))
}

/// `linear`: x [N,I], w [O,I], optional bias [O]; returns (N, I, O).
pub(crate) fn linear(
    op: &'static str,
    x: &[usize],
    w: &[usize],
    b: Option<&[usize]>,
) -> Result<(usize, usize, usize)> {
    let (n, i) = dims2(op, x)?;
    let (o, wi) = dims2(op, w)?;
    if wi != i {
        return Err(Error::shape(op, format!("x {x:?} · w {w:?}ᵀ")));
    }
    if let Some(b) = b {
        expect_shape(op, "bias", b, &[o])?;
    }
    Ok((n, i, o))
}

/// `nin`: x [N,C,H,W], w stored (in, out) = [C,O], optional bias [O]; returns (N, C, H, W, O).
pub(crate) fn nin(
    op: &'static str,
    x: &[usize],
    w: &[usize],
    b: Option<&[usize]>,
) -> Result<(usize, usize, usize, usize, usize)> {
    let (n, c, h, wd) = dims4(op, x)?;
    let (wc, o) = dims2(op, w)?;
    if wc != c {
        return Err(Error::shape(op, format!("x {x:?} with weight (in, out) {w:?}")));
    }
    if let Some(b) = b {
        expect_shape(op, "bias", b, &[o])?;
    }
    Ok((n, c, h, wd, o))
}

/// The dimensions of a validated `conv2d`: input NCHW, weight OIHW, output (N, O, OH, OW).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Conv2d {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub o: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: usize,
    pub oh: usize,
    pub ow: usize,
}

/// `conv2d`: x NCHW, w OIHW with matching C, positive stride and kernel no larger than the
/// padded input.
pub(crate) fn conv2d(
    op: &'static str,
    x: &[usize],
    wt: &[usize],
    stride: usize,
    pad: usize,
) -> Result<Conv2d> {
    let &[n, c, h, w] = x else {
        return Err(Error::shape(op, format!("input must be NCHW, got {x:?}")));
    };
    let &[o, ci, kh, kw] = wt else {
        return Err(Error::shape(op, format!("weight must be OIHW, got {wt:?}")));
    };
    if ci != c {
        return Err(Error::shape(
            op,
            format!("input {x:?} has {c} channels, weight {wt:?} expects {ci}"),
        ));
    }
    if stride == 0 || kh == 0 || kw == 0 {
        return Err(Error::shape(
            op,
            format!("stride {stride} / kernel {kh}x{kw} must be positive"),
        ));
    }
    if h + 2 * pad < kh || w + 2 * pad < kw {
        return Err(Error::shape(
            op,
            format!("kernel {kh}x{kw} larger than padded input {x:?} pad {pad}"),
        ));
    }
    let (oh, ow) = ((h + 2 * pad - kh) / stride + 1, (w + 2 * pad - kw) / stride + 1);
    Ok(Conv2d {
        n,
        c,
        h,
        w,
        o,
        kh,
        kw,
        stride,
        pad,
        oh,
        ow,
    })
}

/// `group_norm`: x NCHW with C divisible by `groups`, gamma and beta [C]; returns x's dims.
pub(crate) fn group_norm(
    op: &'static str,
    x: &[usize],
    gamma: &[usize],
    beta: &[usize],
    groups: usize,
) -> Result<(usize, usize, usize, usize)> {
    let (n, c, h, w) = dims4(op, x)?;
    if groups == 0 || c % groups != 0 {
        return Err(Error::shape(
            op,
            format!("{c} channels do not split into {groups} groups"),
        ));
    }
    expect_shape(op, "gamma", gamma, &[c])?;
    expect_shape(op, "beta", beta, &[c])?;
    Ok((n, c, h, w))
}

/// `attention` (and its backward): q NCHW and every other tensor of q's shape; returns q's dims.
pub(crate) fn attention(
    op: &'static str,
    q: &[usize],
    others: &[&[usize]],
) -> Result<(usize, usize, usize, usize)> {
    let dims = dims4(op, q)?;
    for t in others {
        same_shape(op, q, t)?;
    }
    Ok(dims)
}

/// The dimensions of a validated `upfirdn2d`: input (N, C, H, W), output (N, C, OH, OW).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct UpFirDn2d {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub oh: usize,
    pub ow: usize,
}

/// `upfirdn2d`: x NCHW, a non-empty FIR whose taps fill kh×kw, positive up/down, and a padded
/// input at least as large as the FIR.
pub(crate) fn upfirdn2d(op: &'static str, x: &[usize], fir: &Fir, geom: UpFirDn) -> Result<UpFirDn2d> {
    let &[n, c, h, w] = x else {
        return Err(Error::shape(op, format!("expected NCHW, got {x:?}")));
    };
    if fir.kh == 0 || fir.kw == 0 || fir.taps.len() != fir.kh * fir.kw {
        return Err(Error::shape(
            op,
            format!("FIR {}x{} with {} taps", fir.kh, fir.kw, fir.taps.len()),
        ));
    }
    if geom.up == 0 || geom.down == 0 {
        return Err(Error::shape(
            op,
            format!("up {} / down {} must be positive", geom.up, geom.down),
        ));
    }
    let span = |len: usize, k: usize| (len * geom.up) as isize + geom.pad0 + geom.pad1 - k as isize;
    if span(h, fir.kh) < 0 || span(w, fir.kw) < 0 {
        return Err(Error::shape(
            op,
            format!(
                "{x:?} with {geom:?} is smaller than the {}x{} FIR",
                fir.kh, fir.kw
            ),
        ));
    }
    Ok(UpFirDn2d {
        n,
        c,
        h,
        w,
        oh: geom.out_size(h, fir.kh),
        ow: geom.out_size(w, fir.kw),
    })
}

/// `fourier_embedding`: sigma [N] and w [M]; returns (N, M).
pub(crate) fn fourier_embedding(op: &'static str, sigma: &[usize], w: &[usize]) -> Result<(usize, usize)> {
    Ok((dims1(op, sigma)?, dims1(op, w)?))
}

/// `sinusoidal_embedding`: t [N] and an even `dim` of at least 4; returns N.
pub(crate) fn sinusoidal_embedding(op: &'static str, t: &[usize], dim: usize) -> Result<usize> {
    let n = dims1(op, t)?;
    if !dim.is_multiple_of(2) || dim < 4 {
        return Err(Error::shape(op, format!("dim {dim} must be even and at least 4")));
    }
    Ok(n)
}

/// `dropout_mask`: the drop probability must lie in [0, 1).
pub(crate) fn dropout_probability(p: f64) -> Result<()> {
    if !(0.0..1.0).contains(&p) {
        return Err(Error::Config(format!(
            "dropout probability {p} must lie in [0, 1)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conv2d_output_size_and_rejections() {
        let g = conv2d("t", &[2, 3, 8, 8], &[4, 3, 3, 3], 2, 1).unwrap();
        assert_eq!((g.n, g.o, g.oh, g.ow), (2, 4, 4, 4));
        assert!(conv2d("t", &[2, 3, 8, 8], &[4, 2, 3, 3], 1, 1).is_err());
        assert!(conv2d("t", &[2, 3, 8, 8], &[4, 3, 3, 3], 0, 1).is_err());
        assert!(conv2d("t", &[2, 3, 2, 2], &[4, 3, 5, 5], 1, 1).is_err());
        assert!(conv2d("t", &[3, 8, 8], &[4, 3, 3, 3], 1, 1).is_err());
    }

    #[test]
    fn errors_name_the_op() {
        let e = group_norm("gn_op", &[1, 6, 2, 2], &[6], &[6], 4).unwrap_err();
        assert!(e.to_string().contains("gn_op"), "{e}");
        let e = slice_channels("slice_op", &[1, 4, 2, 2], 3, 2).unwrap_err();
        assert!(e.to_string().contains("slice_op"), "{e}");
    }

    #[test]
    fn concat_sums_channels_and_checks_the_rest() {
        let a: &[usize] = &[2, 3, 4, 4];
        let b: &[usize] = &[2, 5, 4, 4];
        assert_eq!(concat_channels("t", [a, b]).unwrap(), (2, 8, 4, 4));
        assert!(concat_channels("t", [a, &[2, 5, 4, 3][..]]).is_err());
        assert!(concat_channels("t", std::iter::empty()).is_err());
    }
}

//! The CPU backend against naive reference loops (f64), its backward ops against central finite
//! differences (f64), closed forms for the embeddings, f32-vs-f64 agreement, and shape errors.
use proptest::prelude::*;
use srsde_fast::backend::cpu::Cpu;
use srsde_fast::backend::{channel_counts, Backend, Fir, UpFirDn};
use srsde_fast::check::rel_err_f64;
use srsde_fast::error::Error;
use srsde_fast::rng;
use srsde_fast::tensor::Tensor;

type B64 = Cpu<f64>;
type T64 = Tensor<B64>;

fn b64() -> B64 {
    Cpu::<f64>::new()
}

/// Uniform values in [−1, 1) from the crate's counter RNG (deterministic per seed).
fn rnd(n: usize, seed: u64) -> Vec<f64> {
    (0..n as u64)
        .map(|i| 2.0 * rng::uniform(seed, i) as f64 - 1.0)
        .collect()
}

fn t(shape: &[usize], seed: u64) -> T64 {
    b64().from_f64(shape, &rnd(shape.iter().product(), seed)).unwrap()
}

fn vals(x: &T64) -> Vec<f64> {
    b64().to_f64(x).unwrap()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// x + h·v
fn shifted(x: &T64, v: &[f64], h: f64) -> T64 {
    let d: Vec<f64> = vals(x).iter().zip(v).map(|(a, b)| a + h * b).collect();
    b64().from_f64(x.shape(), &d).unwrap()
}

/// Check the analytic gradients of L(inputs) = <fwd(inputs), r> against central differences, one
/// input at a time along a random direction. `bwd(inputs, r)` returns one gradient per input.
fn check_grad(
    name: &str,
    inputs: &[T64],
    fwd: impl Fn(&[T64]) -> T64,
    bwd: impl Fn(&[T64], &T64) -> Vec<T64>,
    seed: u64,
) {
    let y = fwd(inputs);
    let r = t(y.shape(), seed ^ 0xAA);
    let grads = bwd(inputs, &r);
    assert_eq!(grads.len(), inputs.len(), "{name}: one gradient per input");
    let h = 1e-5;
    for (i, g) in grads.iter().enumerate() {
        assert_eq!(g.shape(), inputs[i].shape(), "{name}: gradient {i} shape");
        let v = rnd(inputs[i].numel(), seed * 31 + i as u64 + 7);
        let eval = |sign: f64| {
            let mut xs = inputs.to_vec();
            xs[i] = shifted(&inputs[i], &v, sign * h);
            dot(&vals(&fwd(&xs)), &vals(&r))
        };
        let fd = (eval(1.0) - eval(-1.0)) / (2.0 * h);
        let an = dot(&vals(g), &v);
        let err = (fd - an).abs() / fd.abs().max(an.abs()).max(1e-12);
        assert!(
            err < 1e-6,
            "{name}: input {i}: analytic {an} vs finite difference {fd} (rel {err:.2e})"
        );
    }
}

// ---- naive reference implementations (f64, written independently of the backend) -----------

fn conv_ref(
    x: &[f64],
    xs: [usize; 4],
    w: &[f64],
    ws: [usize; 4],
    b: Option<&[f64]>,
    s: usize,
    p: usize,
) -> Vec<f64> {
    let [n, c, h, wd] = xs;
    let [o, _, kh, kw] = ws;
    let (oh, ow) = ((h + 2 * p - kh) / s + 1, (wd + 2 * p - kw) / s + 1);
    let mut out = vec![0.0; n * o * oh * ow];
    for img in 0..n {
        for oc in 0..o {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut acc = b.map_or(0.0, |b| b[oc]);
                    for ic in 0..c {
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let iy = (oy * s + ky) as isize - p as isize;
                                let ix = (ox * s + kx) as isize - p as isize;
                                if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < wd {
                                    acc += x[((img * c + ic) * h + iy as usize) * wd + ix as usize]
                                        * w[((oc * c + ic) * kh + ky) * kw + kx];
                                }
                            }
                        }
                    }
                    out[((img * o + oc) * oh + oy) * ow + ox] = acc;
                }
            }
        }
    }
    out
}

/// upfirdn2d done literally as upfirdn2d_native: zero-insert, pad, crop, flip, correlate, decimate.
fn upfirdn_ref(
    x: &[f64],
    xs: [usize; 4],
    f: &[f64],
    kh: usize,
    kw: usize,
    g: UpFirDn,
) -> (Vec<f64>, usize, usize) {
    let [n, c, h, w] = xs;
    let (uh, uw) = (h * g.up, w * g.up);
    let (ph, pw) = (
        (uh as isize + g.pad0 + g.pad1) as usize,
        (uw as isize + g.pad0 + g.pad1) as usize,
    );
    let (oh, ow) = ((ph - kh) / g.down + 1, (pw - kw) / g.down + 1);
    let mut out = Vec::new();
    for plane in 0..n * c {
        let xp = &x[plane * h * w..][..h * w];
        let mut up = vec![0.0; uh * uw];
        for i in 0..h {
            for j in 0..w {
                up[i * g.up * uw + j * g.up] = xp[i * w + j];
            }
        }
        // padded[py][px] = up[py − pad0][px − pad0] (negative pads crop)
        let padded = |py: usize, px: usize| {
            let (uy, ux) = (py as isize - g.pad0, px as isize - g.pad0);
            if uy < 0 || ux < 0 || uy >= uh as isize || ux >= uw as isize {
                0.0
            } else {
                up[uy as usize * uw + ux as usize]
            }
        };
        let full_h = ph - kh + 1;
        let full_w = pw - kw + 1;
        for oy in (0..full_h).step_by(g.down) {
            for ox in (0..full_w).step_by(g.down) {
                let mut acc = 0.0;
                for ky in 0..kh {
                    for kx in 0..kw {
                        acc += f[(kh - 1 - ky) * kw + (kw - 1 - kx)] * padded(oy + ky, ox + kx);
                    }
                }
                out.push(acc);
            }
        }
    }
    (out, oh, ow)
}

fn group_norm_ref(
    x: &[f64],
    xs: [usize; 4],
    gamma: &[f64],
    beta: &[f64],
    groups: usize,
    eps: f64,
    silu: bool,
) -> Vec<f64> {
    let [n, c, h, w] = xs;
    let len = c / groups * h * w;
    let mut out = vec![0.0; x.len()];
    for ng in 0..n * groups {
        let seg = &x[ng * len..][..len];
        let mean = seg.iter().sum::<f64>() / len as f64;
        let var = seg.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / len as f64;
        for (j, v) in seg.iter().enumerate() {
            let ch = (ng % groups) * (c / groups) + j / (h * w);
            let z = (v - mean) / (var + eps).sqrt() * gamma[ch] + beta[ch];
            out[ng * len + j] = if silu { z / (1.0 + (-z).exp()) } else { z };
        }
    }
    out
}

fn attention_ref(q: &[f64], k: &[f64], v: &[f64], n: usize, c: usize, l: usize) -> Vec<f64> {
    let mut out = vec![0.0; n * c * l];
    for img in 0..n {
        let at = |a: &[f64], ch: usize, p: usize| a[(img * c + ch) * l + p];
        for i in 0..l {
            let s: Vec<f64> = (0..l)
                .map(|j| (0..c).map(|ch| at(q, ch, i) * at(k, ch, j)).sum::<f64>() / (c as f64).sqrt())
                .collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for ch in 0..c {
                out[(img * c + ch) * l + i] = (0..l).map(|j| e[j] / z * at(v, ch, j)).sum();
            }
        }
    }
    out
}

fn assert_close(name: &str, got: &[f64], want: &[f64], tol: f64) {
    let e = rel_err_f64(got, want);
    assert!(e < tol, "{name}: rel err {e:.3e} (tol {tol:.0e})");
}

/// The three FIR geometries of the models: FIR-downsample, FIR-upsample (gain 4), blur.
fn model_firs() -> Vec<(&'static str, Fir, UpFirDn)> {
    vec![
        (
            "down",
            Fir::separable(&[1.0, 3.0, 3.0, 1.0], 1.0),
            UpFirDn {
                up: 1,
                down: 2,
                pad0: 1,
                pad1: 1,
            },
        ),
        (
            "up",
            Fir::separable(&[1.0, 3.0, 3.0, 1.0], 4.0),
            UpFirDn {
                up: 2,
                down: 1,
                pad0: 2,
                pad1: 1,
            },
        ),
        (
            "blur",
            Fir::separable(&[1.0, 3.0, 3.0, 1.0], 1.0),
            UpFirDn {
                up: 1,
                down: 1,
                pad0: 2,
                pad1: 2,
            },
        ),
    ]
}

// ---- forward against references --------------------------------------------------------------

#[test]
fn conv2d_forward_matches_direct_loop() {
    let b = b64();
    for (i, &(xs, ws, s, p, bias)) in [
        ([1, 3, 8, 8], [4, 3, 3, 3], 1, 1, true),
        ([2, 5, 7, 9], [3, 5, 3, 3], 2, 1, true),
        ([2, 4, 9, 7], [6, 4, 3, 3], 2, 0, false),
        ([1, 6, 5, 5], [2, 6, 1, 1], 1, 0, true),
        ([2, 3, 6, 5], [4, 3, 1, 1], 2, 0, true),
        ([1, 2, 11, 13], [3, 2, 3, 3], 1, 0, false),
        ([1, 2, 4, 4], [3, 2, 1, 1], 1, 1, true),
    ]
    .iter()
    .enumerate()
    {
        let (x, w, bb) = (
            t(&xs, 10 + i as u64),
            t(&ws, 20 + i as u64),
            t(&[ws[0]], 30 + i as u64),
        );
        let y = b.conv2d(&x, &w, bias.then_some(&bb), s, p).unwrap();
        let bv = vals(&bb);
        let want = conv_ref(&vals(&x), xs, &vals(&w), ws, bias.then_some(&bv[..]), s, p);
        assert_close(
            &format!("conv2d {xs:?} {ws:?} s{s} p{p}"),
            &vals(&y),
            &want,
            1e-13,
        );
    }
}

#[test]
fn conv2d_forward_large_tiles_match_direct_loop() {
    // Large enough to be split into several column tiles (and parallel tasks).
    let b = b64();
    let (xs, ws) = ([2, 16, 40, 36], [8, 16, 3, 3]);
    let (x, w, bb) = (t(&xs, 1), t(&ws, 2), t(&[8], 3));
    for (s, p) in [(1, 1), (2, 1)] {
        let y = b.conv2d(&x, &w, Some(&bb), s, p).unwrap();
        let want = conv_ref(&vals(&x), xs, &vals(&w), ws, Some(&vals(&bb)), s, p);
        assert_close("conv2d tiled", &vals(&y), &want, 1e-13);
    }
}

#[test]
fn linear_and_nin_match_loops() {
    let b = b64();
    let (x, w, bb) = (t(&[3, 5], 1), t(&[4, 5], 2), t(&[4], 3));
    let (xv, wv, bv) = (vals(&x), vals(&w), vals(&bb));
    let y = vals(&b.linear(&x, &w, Some(&bb)).unwrap());
    let want: Vec<f64> = (0..3)
        .flat_map(|n| {
            let (xv, wv, bv) = (&xv, &wv, &bv);
            (0..4).map(move |o| bv[o] + (0..5).map(|i| xv[n * 5 + i] * wv[o * 5 + i]).sum::<f64>())
        })
        .collect();
    assert_close("linear", &y, &want, 1e-14);
    let y0 = vals(&b.linear(&x, &w, None).unwrap());
    let want0: Vec<f64> = want.iter().enumerate().map(|(i, v)| v - bv[i % 4]).collect();
    assert_close("linear no bias", &y0, &want0, 1e-14);

    let (x, w, bb) = (t(&[2, 3, 4, 5], 4), t(&[3, 6], 5), t(&[6], 6));
    let (xv, wv, bv) = (vals(&x), vals(&w), vals(&bb));
    let y = vals(&b.nin(&x, &w, &bb).unwrap());
    let mut want = vec![0.0; 2 * 6 * 20];
    for n in 0..2 {
        for o in 0..6 {
            for p in 0..20 {
                want[(n * 6 + o) * 20 + p] = bv[o]
                    + (0..3)
                        .map(|c| xv[(n * 3 + c) * 20 + p] * wv[c * 6 + o])
                        .sum::<f64>();
            }
        }
    }
    assert_close("nin", &y, &want, 1e-14);
}

#[test]
fn group_norm_matches_loop() {
    let b = b64();
    for &(shape, groups, silu) in &[
        ([2, 8, 5, 3], 4, false),
        ([1, 6, 4, 4], 3, true),
        ([2, 4, 1, 1], 2, true),
    ] {
        let (x, g, be) = (t(&shape, 1), t(&[shape[1]], 2), t(&[shape[1]], 3));
        // A non-zero mean and a larger scale, as real activations have.
        let x = b.affine(&x, 3.0, 0.7).unwrap();
        let y = b.group_norm(&x, &g, &be, groups, 1e-6, silu).unwrap();
        let want = group_norm_ref(&vals(&x), shape, &vals(&g), &vals(&be), groups, 1e-6, silu);
        assert_close("group_norm", &vals(&y), &want, 1e-13);
    }
}

#[test]
fn attention_matches_loop() {
    let b = b64();
    for &shape in &[[1, 4, 3, 3], [2, 8, 4, 2], [1, 3, 1, 1]] {
        let (q, k, v) = (t(&shape, 1), t(&shape, 2), t(&shape, 3));
        let q = b.affine(&q, 4.0, 0.0).unwrap(); // peaked softmax
        let y = b.attention(&q, &k, &v).unwrap();
        let want = attention_ref(
            &vals(&q),
            &vals(&k),
            &vals(&v),
            shape[0],
            shape[1],
            shape[2] * shape[3],
        );
        assert_close("attention", &vals(&y), &want, 1e-13);
    }
}

#[test]
fn upfirdn2d_matches_native_algorithm() {
    let b = b64();
    let mut cases = model_firs();
    let asym = Fir {
        taps: vec![1.0, -2.0, 0.5, 3.0, 0.25, -1.0],
        kh: 2,
        kw: 3,
    };
    cases.push((
        "asym up3 down2",
        asym.clone(),
        UpFirDn {
            up: 3,
            down: 2,
            pad0: 1,
            pad1: 2,
        },
    ));
    cases.push((
        "asym crop",
        asym,
        UpFirDn {
            up: 1,
            down: 1,
            pad0: -1,
            pad1: 1,
        },
    ));
    for (name, fir, geom) in cases {
        for shape in [[1, 2, 8, 8], [2, 1, 5, 7]] {
            let x = t(&shape, 3);
            let y = b.upfirdn2d(&x, &fir, geom).unwrap();
            let f: Vec<f64> = fir.taps.iter().map(|&v| v as f64).collect();
            let (want, oh, ow) = upfirdn_ref(&vals(&x), shape, &f, fir.kh, fir.kw, geom);
            assert_eq!(y.shape(), &[shape[0], shape[1], oh, ow], "{name}");
            assert_close(name, &vals(&y), &want, 1e-14);
        }
    }
}

#[test]
fn upfirdn2d_known_small_cases() {
    let b = b64();
    // Full 2-d convolution (kernel flipped, not correlated) of [[1,2],[3,4]] with itself.
    let x = b.from_f64(&[1, 1, 2, 2], &[1.0, 2.0, 3.0, 4.0]).unwrap();
    let fir = Fir {
        taps: vec![1.0, 2.0, 3.0, 4.0],
        kh: 2,
        kw: 2,
    };
    let y = b
        .upfirdn2d(
            &x,
            &fir,
            UpFirDn {
                up: 1,
                down: 1,
                pad0: 1,
                pad1: 1,
            },
        )
        .unwrap();
    assert_eq!(y.shape(), &[1, 1, 3, 3]);
    assert_eq!(vals(&y), vec![1.0, 4.0, 4.0, 6.0, 20.0, 16.0, 9.0, 24.0, 16.0]);
    // Zero-order hold: up 2 with a [1, 1] row filter; the zero rows come from the vertical padding.
    let x = b.from_f64(&[1, 1, 1, 2], &[5.0, 7.0]).unwrap();
    let fir = Fir {
        taps: vec![1.0, 1.0],
        kh: 1,
        kw: 2,
    };
    let y = b
        .upfirdn2d(
            &x,
            &fir,
            UpFirDn {
                up: 2,
                down: 1,
                pad0: 1,
                pad1: 0,
            },
        )
        .unwrap();
    assert_eq!(y.shape(), &[1, 1, 3, 4]);
    assert_eq!(
        vals(&y),
        vec![0.0, 0.0, 0.0, 0.0, 5.0, 5.0, 7.0, 7.0, 0.0, 0.0, 0.0, 0.0]
    );
    // Crop one row/column (negative pad) then keep every second sample.
    let x = b
        .from_f64(&[1, 1, 4, 4], &(0..16).map(|v| v as f64).collect::<Vec<_>>())
        .unwrap();
    let fir = Fir {
        taps: vec![2.0],
        kh: 1,
        kw: 1,
    };
    let y = b
        .upfirdn2d(
            &x,
            &fir,
            UpFirDn {
                up: 1,
                down: 2,
                pad0: -1,
                pad1: 0,
            },
        )
        .unwrap();
    assert_eq!(vals(&y), vec![10.0, 14.0, 26.0, 30.0]);
    // The [1,3,3,1]/8 FIR downsample of a constant image is that constant inside; at the border the
    // padding zero replaces a weight-1 tap, so each axis keeps 7/8.
    let x = b.from_f64(&[1, 1, 8, 8], &[1.0; 64]).unwrap();
    let (_, fir, geom) = model_firs().remove(0);
    let y = vals(&b.upfirdn2d(&x, &fir, geom).unwrap());
    assert_eq!(y.len(), 16);
    assert!(
        (y[5] - 1.0).abs() < 1e-7 && (y[0] - 0.875 * 0.875).abs() < 1e-7,
        "{y:?}"
    );
}

#[test]
fn embeddings_match_closed_forms() {
    let b = b64();
    let sig = [0.01, 0.7, 348.0];
    let w = [0.3, -1.7, 16.2, 40.0];
    let e = vals(
        &b.fourier_embedding(&b.from_f64(&[3], &sig).unwrap(), &b.from_f64(&[4], &w).unwrap())
            .unwrap(),
    );
    let mut want = Vec::new();
    for s in sig {
        want.extend(
            w.iter()
                .map(|wv| (2.0 * std::f64::consts::PI * s.ln() * wv).sin()),
        );
        want.extend(
            w.iter()
                .map(|wv| (2.0 * std::f64::consts::PI * s.ln() * wv).cos()),
        );
    }
    assert_close("fourier", &e, &want, 1e-14);

    let ts = [0.0, 1.5, 999.0];
    let dim = 8;
    let e = vals(
        &b.sinusoidal_embedding(&b.from_f64(&[3], &ts).unwrap(), dim, 10000.0)
            .unwrap(),
    );
    let mut want = Vec::new();
    for tv in ts {
        let om: Vec<f64> = (0..4)
            .map(|k| (-(k as f64) * 10000f64.ln() / 3.0).exp())
            .collect();
        want.extend(om.iter().map(|o| (tv * o).sin()));
        want.extend(om.iter().map(|o| (tv * o).cos()));
    }
    assert_close("sinusoidal", &e, &want, 1e-13);
    // ω_{h−1} is exactly 1/max_positions.
    assert!((want[8 + 3] - (1.5f64 / 10000.0).sin()).abs() < 1e-15);
}

#[test]
fn random_ops_follow_the_counter_rng() {
    let b = b64();
    let z = vals(&b.randn(&[3, 5], 42, 100).unwrap());
    for (i, v) in z.iter().enumerate() {
        assert_eq!(*v, rng::normal(42, 100 + i as u64) as f64);
    }
    let u = vals(&b.rand_uniform(&[7], 9, 3).unwrap());
    assert_eq!(u[2], rng::uniform(9, 5) as f64);
    // Large draws take the parallel path; offsets must still line up.
    let big = Cpu::<f32>::new().randn(&[1 << 16], 5, 0).unwrap();
    let big = Cpu::<f32>::new().to_f32(&big).unwrap();
    let shifted = Cpu::<f32>::new()
        .to_f32(&Cpu::<f32>::new().randn(&[10], 5, 60000).unwrap())
        .unwrap();
    assert_eq!(&big[60000..60010], &shifted[..]);
    let m = vals(&b.dropout_mask(&[20000], 0.25, 3, 0).unwrap());
    let dropped = m.iter().filter(|&&v| v == 0.0).count() as f64 / m.len() as f64;
    assert!(m.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-12));
    assert!((dropped - 0.25).abs() < 0.02, "dropped fraction {dropped}");
    assert!(b.dropout_mask(&[2], 1.0, 0, 0).is_err());
}

// ---- backward against finite differences ----------------------------------------------------

#[test]
fn grad_linear_and_nin() {
    let b = b64();
    check_grad(
        "linear",
        &[t(&[3, 5], 1), t(&[4, 5], 2), t(&[4], 3)],
        |v| b.linear(&v[0], &v[1], Some(&v[2])).unwrap(),
        |v, dy| {
            let g = b.linear_backward(&v[0], &v[1], dy).unwrap();
            vec![g.dx, g.dw, g.db]
        },
        1,
    );
    check_grad(
        "nin",
        &[t(&[2, 3, 4, 5], 4), t(&[3, 6], 5), t(&[6], 6)],
        |v| b.nin(&v[0], &v[1], &v[2]).unwrap(),
        |v, dy| {
            let g = b.nin_backward(&v[0], &v[1], dy).unwrap();
            vec![g.dx, g.dw, g.db]
        },
        2,
    );
}

fn grad_conv(xs: [usize; 4], ws: [usize; 4], s: usize, p: usize, seed: u64) {
    let b = b64();
    check_grad(
        &format!("conv2d {xs:?} {ws:?} s{s} p{p}"),
        &[t(&xs, seed), t(&ws, seed + 1), t(&[ws[0]], seed + 2)],
        |v| b.conv2d(&v[0], &v[1], Some(&v[2]), s, p).unwrap(),
        |v, dy| {
            let g = b.conv2d_backward(&v[0], &v[1], dy, s, p).unwrap();
            vec![g.dx, g.dw, g.db]
        },
        seed,
    );
}

#[test]
fn grad_conv2d() {
    grad_conv([2, 3, 6, 5], [4, 3, 3, 3], 1, 1, 1);
    grad_conv([2, 3, 7, 6], [4, 3, 3, 3], 2, 1, 2);
    grad_conv([1, 3, 7, 7], [2, 3, 3, 3], 1, 0, 3);
    grad_conv([1, 3, 8, 7], [2, 3, 3, 3], 2, 0, 4);
    grad_conv([2, 4, 5, 5], [3, 4, 1, 1], 1, 0, 5);
    grad_conv([1, 4, 6, 6], [3, 4, 1, 1], 2, 0, 6);
}

#[test]
fn grad_conv2d_multi_tile() {
    // Big enough for several backward column tiles per image would need MBs; this at least has
    // many channels and an odd size.
    grad_conv([1, 12, 13, 11], [5, 12, 3, 3], 1, 1, 7);
}

#[test]
fn grad_group_norm() {
    let b = b64();
    for silu in [false, true] {
        let x = b.affine(&t(&[2, 6, 3, 4], 1), 2.0, 0.5).unwrap();
        check_grad(
            &format!("group_norm silu={silu}"),
            &[x, t(&[6], 2), t(&[6], 3)],
            |v| b.group_norm(&v[0], &v[1], &v[2], 3, 1e-5, silu).unwrap(),
            |v, dy| {
                let g = b
                    .group_norm_backward(&v[0], &v[1], &v[2], dy, 3, 1e-5, silu)
                    .unwrap();
                vec![g.dx, g.dw, g.db]
            },
            11,
        );
    }
}

#[test]
fn grad_silu_attention_and_fir() {
    let b = b64();
    check_grad(
        "silu",
        &[b.affine(&t(&[2, 3, 4, 4], 1), 4.0, 0.0).unwrap()],
        |v| b.silu(&v[0]).unwrap(),
        |v, dy| vec![b.silu_backward(&v[0], dy).unwrap()],
        1,
    );
    for shape in [[2, 4, 3, 2], [1, 5, 4, 4]] {
        check_grad(
            "attention",
            &[t(&shape, 1), t(&shape, 2), t(&shape, 3)],
            |v| b.attention(&v[0], &v[1], &v[2]).unwrap(),
            |v, dy| {
                let (dq, dk, dv) = b.attention_backward(&v[0], &v[1], &v[2], dy).unwrap();
                vec![dq, dk, dv]
            },
            2,
        );
    }
    for (name, fir, geom) in model_firs() {
        for shape in [[2, 3, 8, 8], [1, 2, 7, 5]] {
            check_grad(
                &format!("upfirdn2d {name} {shape:?}"),
                &[t(&shape, 5)],
                |v| b.upfirdn2d(&v[0], &fir, geom).unwrap(),
                |v, dy| vec![b.upfirdn2d_backward(dy, v[0].shape(), &fir, geom).unwrap()],
                3,
            );
        }
    }
}

#[test]
fn grad_small_ops_are_adjoint_pairs() {
    let b = b64();
    // add_channel_bias: d/dx = dy, d/db = sum_spatial(dy).
    check_grad(
        "add_channel_bias",
        &[t(&[2, 3, 4, 5], 1), t(&[2, 3], 2)],
        |v| b.add_channel_bias(&v[0], &v[1]).unwrap(),
        |_, dy| vec![dy.clone(), b.sum_spatial(dy).unwrap()],
        1,
    );
    // scale_per_sample: d/dx = scale_per_sample(dy, s), d/ds[n] = Σ x[n]·dy[n].
    check_grad(
        "scale_per_sample",
        &[t(&[3, 2, 4, 4], 3), t(&[3], 4)],
        |v| b.scale_per_sample(&v[0], &v[1]).unwrap(),
        |v, dy| {
            let prod = b.mul(&v[0], dy).unwrap();
            let per: Vec<f64> = vals(&b.sum_spatial(&prod).unwrap())
                .chunks(2)
                .map(|c| c.iter().sum())
                .collect();
            vec![
                b.scale_per_sample(dy, &v[1]).unwrap(),
                b.from_f64(&[3], &per).unwrap(),
            ]
        },
        2,
    );
    // sum_squares_per_sample: d/dx = 2·x·dy[n].
    check_grad(
        "sum_squares_per_sample",
        &[t(&[3, 2, 3, 3], 5)],
        |v| b.sum_squares_per_sample(&v[0]).unwrap(),
        |v, dy| {
            vec![b
                .affine(&b.scale_per_sample(&v[0], dy).unwrap(), 2.0, 0.0)
                .unwrap()]
        },
        3,
    );
    // concat / slice: the gradient of a concat is the slices of dy.
    check_grad(
        "concat_channels",
        &[t(&[2, 3, 4, 4], 6), t(&[2, 2, 4, 4], 7)],
        |v| b.concat_channels(&[&v[0], &v[1]]).unwrap(),
        |_, dy| {
            vec![
                b.slice_channels(dy, 0, 3).unwrap(),
                b.slice_channels(dy, 3, 2).unwrap(),
            ]
        },
        4,
    );
    // axpby / mul / affine elementwise derivatives.
    check_grad(
        "axpby",
        &[t(&[2, 3, 4, 4], 8), t(&[2, 3, 4, 4], 9)],
        |v| b.axpby(0.3, &v[0], -1.7, &v[1]).unwrap(),
        |_, dy| vec![b.affine(dy, 0.3, 0.0).unwrap(), b.affine(dy, -1.7, 0.0).unwrap()],
        5,
    );
    check_grad(
        "mul",
        &[t(&[2, 3, 4, 4], 10), t(&[2, 3, 4, 4], 11)],
        |v| b.mul(&v[0], &v[1]).unwrap(),
        |v, dy| vec![b.mul(dy, &v[1]).unwrap(), b.mul(dy, &v[0]).unwrap()],
        6,
    );
}

#[test]
fn layout_ops() {
    let b = b64();
    let (x, y) = (t(&[2, 3, 2, 2], 1), t(&[2, 3, 2, 2], 2));
    let z = b.interleave_channels(&x, &y).unwrap();
    assert_eq!(z.shape(), &[2, 6, 2, 2]);
    let (xv, yv, zv) = (vals(&x), vals(&y), vals(&z));
    for n in 0..2 {
        for c in 0..3 {
            assert_eq!(&zv[(n * 6 + 2 * c) * 4..][..4], &xv[(n * 3 + c) * 4..][..4]);
            assert_eq!(&zv[(n * 6 + 2 * c + 1) * 4..][..4], &yv[(n * 3 + c) * 4..][..4]);
        }
    }
    let cat = b.concat_channels(&[&x, &z]).unwrap();
    assert_eq!(cat.shape(), &[2, 9, 2, 2]);
    assert_eq!(vals(&b.slice_channels(&cat, 3, 6).unwrap()), zv);
    assert_eq!(vals(&b.slice_channels(&cat, 0, 3).unwrap()), xv);
}

// ---- f32 vs f64 ------------------------------------------------------------------------------

#[test]
fn f32_agrees_with_f64() {
    let (b, s) = (b64(), Cpu::<f32>::new());
    let up = |x: &T64| s.from_f64(x.shape(), &vals(x)).unwrap();
    let cmp = |name: &str, a: Tensor<Cpu<f32>>, r: T64, tol: f64| {
        let a: Vec<f64> = s.to_f64(&a).unwrap();
        assert_close(&format!("f32 vs f64 {name}"), &a, &vals(&r), tol);
    };
    let (x, w, bias) = (t(&[2, 32, 20, 20], 1), t(&[16, 32, 3, 3], 2), t(&[16], 3));
    for (st, p) in [(1, 1), (2, 1), (2, 0)] {
        cmp(
            "conv2d",
            s.conv2d(&up(&x), &up(&w), Some(&up(&bias)), st, p).unwrap(),
            b.conv2d(&x, &w, Some(&bias), st, p).unwrap(),
            1e-5,
        );
    }
    let (g, be) = (t(&[32], 4), t(&[32], 5));
    cmp(
        "group_norm",
        s.group_norm(&up(&x), &up(&g), &up(&be), 8, 1e-6, true).unwrap(),
        b.group_norm(&x, &g, &be, 8, 1e-6, true).unwrap(),
        1e-5,
    );
    let (q, k, v) = (t(&[1, 16, 8, 8], 6), t(&[1, 16, 8, 8], 7), t(&[1, 16, 8, 8], 8));
    cmp(
        "attention",
        s.attention(&up(&q), &up(&k), &up(&v)).unwrap(),
        b.attention(&q, &k, &v).unwrap(),
        1e-5,
    );
    let (nw, nb) = (t(&[32, 8], 9), t(&[8], 10));
    cmp(
        "nin",
        s.nin(&up(&x), &up(&nw), &up(&nb)).unwrap(),
        b.nin(&x, &nw, &nb).unwrap(),
        1e-5,
    );
    let (lx, lw) = (t(&[3, 64], 11), t(&[40, 64], 12));
    cmp(
        "linear",
        s.linear(&up(&lx), &up(&lw), None).unwrap(),
        b.linear(&lx, &lw, None).unwrap(),
        1e-5,
    );
    for (name, fir, geom) in model_firs() {
        cmp(
            name,
            s.upfirdn2d(&up(&x), &fir, geom).unwrap(),
            b.upfirdn2d(&x, &fir, geom).unwrap(),
            1e-6,
        );
    }
    cmp("silu", s.silu(&up(&x)).unwrap(), b.silu(&x).unwrap(), 1e-6);
    let sig = b.from_f64(&[3], &[0.01, 1.3, 348.0]).unwrap();
    let fw = b.affine(&t(&[64], 13), 16.0, 0.0).unwrap();
    cmp(
        "fourier",
        s.fourier_embedding(&up(&sig), &up(&fw)).unwrap(),
        b.fourier_embedding(&sig, &fw).unwrap(),
        1e-5,
    );
    let ts = b.from_f64(&[3], &[0.0, 0.37, 2.9]).unwrap();
    cmp(
        "sinusoidal",
        s.sinusoidal_embedding(&up(&ts), 128, 10000.0).unwrap(),
        b.sinusoidal_embedding(&ts, 128, 10000.0).unwrap(),
        1e-5,
    );
}

// ---- errors ----------------------------------------------------------------------------------

fn shape_err<T>(r: srsde_fast::Result<T>, op: &str) {
    match r {
        Err(Error::Shape { op: o, .. }) => assert_eq!(o, op),
        Err(e) => panic!("{op}: expected a shape error, got {e}"),
        Ok(_) => panic!("{op}: expected a shape error, got Ok"),
    }
}

#[test]
fn bad_shapes_are_errors_not_panics() {
    let b = b64();
    let (x, w) = (t(&[1, 3, 4, 4], 1), t(&[2, 4, 3, 3], 2));
    shape_err(b.conv2d(&x, &w, None, 1, 1), "conv2d");
    shape_err(b.conv2d(&x, &t(&[2, 3, 3, 3], 3), None, 0, 1), "conv2d");
    shape_err(b.conv2d(&x, &t(&[2, 3, 7, 7], 3), None, 1, 1), "conv2d");
    shape_err(
        b.conv2d(&x, &t(&[2, 3, 3, 3], 3), Some(&t(&[3], 4)), 1, 1),
        "conv2d",
    );
    shape_err(
        b.conv2d_backward(&x, &t(&[2, 3, 3, 3], 3), &t(&[1, 2, 3, 3], 4), 1, 1),
        "conv2d_backward",
    );
    shape_err(b.add(&x, &t(&[1, 3, 4, 5], 3)), "add");
    shape_err(b.linear(&t(&[2, 3], 1), &t(&[4, 5], 1), None), "linear");
    shape_err(b.nin(&x, &t(&[4, 2], 1), &t(&[2], 1)), "nin");
    shape_err(
        b.group_norm(&x, &t(&[3], 1), &t(&[3], 1), 2, 1e-6, false),
        "group_norm",
    );
    shape_err(
        b.group_norm(&x, &t(&[4], 1), &t(&[3], 1), 3, 1e-6, false),
        "group_norm",
    );
    shape_err(b.attention(&x, &x, &t(&[1, 3, 2, 8], 1)), "attention");
    shape_err(b.slice_channels(&x, 2, 2), "slice_channels");
    shape_err(b.concat_channels(&[&x, &t(&[1, 3, 4, 5], 1)]), "concat_channels");
    shape_err(
        b.interleave_channels(&x, &t(&[1, 2, 4, 4], 1)),
        "interleave_channels",
    );
    shape_err(b.scale_per_sample(&x, &t(&[2], 1)), "scale_per_sample");
    shape_err(b.add_channel_bias(&x, &t(&[3], 1)), "add_channel_bias");
    shape_err(b.sum_spatial(&t(&[3, 4], 1)), "sum_spatial");
    let fir = Fir::separable(&[1.0, 3.0, 3.0, 1.0], 1.0);
    shape_err(
        b.upfirdn2d(
            &t(&[1, 1, 1, 1], 1),
            &fir,
            UpFirDn {
                up: 1,
                down: 1,
                pad0: 0,
                pad1: 0,
            },
        ),
        "upfirdn2d",
    );
    shape_err(
        b.upfirdn2d(
            &x,
            &Fir {
                taps: vec![1.0; 3],
                kh: 2,
                kw: 2,
            },
            UpFirDn {
                up: 1,
                down: 1,
                pad0: 1,
                pad1: 1,
            },
        ),
        "upfirdn2d",
    );
    shape_err(
        b.upfirdn2d_backward(
            &x,
            &[1, 3, 4, 4],
            &fir,
            UpFirDn {
                up: 1,
                down: 2,
                pad0: 1,
                pad1: 1,
            },
        ),
        "upfirdn2d_backward",
    );
    shape_err(
        b.fourier_embedding(&t(&[2, 1], 1), &t(&[4], 1)),
        "fourier_embedding",
    );
    shape_err(
        b.sinusoidal_embedding(&t(&[2], 1), 7, 10000.0),
        "sinusoidal_embedding",
    );
    shape_err(b.from_f64(&[2, 2], &[1.0; 3]), "from_f64");
}

#[test]
fn empty_tensors_do_not_panic() {
    let b = b64();
    let fir = Fir::separable(&[1.0, 3.0, 3.0, 1.0], 1.0);
    let blur = UpFirDn {
        up: 1,
        down: 1,
        pad0: 2,
        pad1: 2,
    };
    let x = t(&[1, 2, 0, 3], 1);
    let y = b.upfirdn2d(&x, &fir, blur).unwrap();
    assert_eq!(y.shape(), &[1, 2, 1, 4]);
    assert!(vals(&y).iter().all(|&v| v == 0.0));
    assert_eq!(
        b.upfirdn2d_backward(&y, x.shape(), &fir, blur).unwrap().shape(),
        x.shape()
    );
    // A kernel wider than a zero-width input is a shape error, not a panic.
    assert!(b
        .conv2d(&t(&[1, 2, 1, 0], 3), &t(&[3, 2, 1, 1], 2), None, 1, 0)
        .is_err());
    let x = t(&[2, 0, 4, 4], 4);
    let y = b
        .conv2d(&x, &t(&[3, 0, 3, 3], 5), Some(&t(&[3], 6)), 1, 1)
        .unwrap();
    assert_eq!(y.shape(), &[2, 3, 4, 4]);
    let g = b.conv2d_backward(&x, &t(&[3, 0, 3, 3], 5), &y, 1, 1).unwrap();
    assert_eq!(g.dx.shape(), x.shape());
    let x0 = t(&[1, 4, 0, 0], 7);
    let g = b
        .conv2d_backward(
            &t(&[1, 2, 0, 1], 7),
            &t(&[3, 2, 1, 1], 8),
            &t(&[1, 3, 2, 3], 9),
            1,
            1,
        )
        .unwrap();
    assert_eq!(g.dx.shape(), &[1, 2, 0, 1]);
    assert_eq!(
        b.group_norm(&x0, &t(&[4], 1), &t(&[4], 2), 2, 1e-6, true)
            .unwrap()
            .shape(),
        x0.shape()
    );
    assert_eq!(b.sum_spatial(&x0).unwrap().shape(), &[1, 4]);
    assert_eq!(b.attention(&x0, &x0, &x0).unwrap().shape(), x0.shape());
}

#[test]
fn name_reports_threads() {
    assert!(Cpu::<f32>::new().name().starts_with("cpu ("));
    assert_eq!(Cpu::<f32>::with_threads(1).unwrap().name(), "cpu (1 thread)");
    // A private pool gives the same numbers as the global one.
    let (one, glob) = (Cpu::<f32>::with_threads(1).unwrap(), Cpu::<f32>::new());
    let x = one.randn(&[1, 8, 33, 31], 1, 0).unwrap();
    let w = one.randn(&[4, 8, 3, 3], 1, 99999).unwrap();
    let a = one.to_f32(&one.conv2d(&x, &w, None, 1, 1).unwrap()).unwrap();
    let (x2, w2) = (
        glob.from_f32(&[1, 8, 33, 31], &one.to_f32(&x).unwrap()).unwrap(),
        glob.from_f32(&[4, 8, 3, 3], &one.to_f32(&w).unwrap()).unwrap(),
    );
    let b = glob.to_f32(&glob.conv2d(&x2, &w2, None, 1, 1).unwrap()).unwrap();
    assert!(srsde_fast::check::rel_err(&a, &b) < 1e-6);
}

// ---- property test over random small conv shapes ----------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]
    #[test]
    fn conv2d_random_shapes(n in 1usize..3, c in 1usize..5, o in 1usize..5, h in 3usize..9, w in 3usize..9,
                            k in prop::sample::select(vec![1usize, 3]), s in 1usize..3, p in 0usize..2, seed in 0u64..1000) {
        let b = b64();
        let (xs, ws) = ([n, c, h, w], [o, c, k, k]);
        let (x, wt, bias) = (t(&xs, seed), t(&ws, seed + 1), t(&[o], seed + 2));
        let y = b.conv2d(&x, &wt, Some(&bias), s, p).unwrap();
        let want = conv_ref(&vals(&x), xs, &vals(&wt), ws, Some(&vals(&bias)), s, p);
        prop_assert!(rel_err_f64(&vals(&y), &want) < 1e-13);
        grad_conv(xs, ws, s, p, seed);
    }
}

// ---- timing (run with --ignored --nocapture) -------------------------------------------------

#[test]
#[ignore]
fn conv2d_throughput() {
    let b = Cpu::<f32>::new();
    for &(c, o, hw, s) in &[
        (128, 128, 128, 1),
        (256, 128, 128, 1),
        (128, 256, 64, 1),
        (256, 256, 32, 1),
        (256, 256, 16, 1),
        (256, 256, 8, 1),
        (128, 128, 128, 2),
        (256, 256, 4, 1),
    ] {
        let x = b.randn(&[1, c, hw, hw], 1, 0).unwrap();
        let w = b.randn(&[o, c, 3, 3], 2, 0).unwrap();
        let bias = b.zeros(&[o]).unwrap();
        let _ = b.conv2d(&x, &w, Some(&bias), s, 1).unwrap();
        let reps = (1e10 / (2.0 * (o * c * 9 * hw * hw) as f64)).clamp(3.0, 100.0) as usize;
        // The machine is shared: report the best wall time and also the process CPU time per
        // call, which (divided by the 2 cores) estimates the undisturbed wall time.
        let mut dt = f64::INFINITY;
        let cpu0 = process_cpu_seconds();
        for _ in 0..reps {
            let t0 = std::time::Instant::now();
            let _ = b.conv2d(&x, &w, Some(&bias), s, 1).unwrap();
            dt = dt.min(t0.elapsed().as_secs_f64());
        }
        let cpu = (process_cpu_seconds() - cpu0) / reps as f64;
        let flop = 2.0 * (o * c * 9) as f64 * ((hw / s) * (hw / s)) as f64;
        let threads = b.threads() as f64;
        println!(
            "conv2d [1,{c},{hw},{hw}] x [{o},{c},3,3] s{s}: best {:.2} ms = {:.1} GFLOP/s; \
             CPU {:.2} ms/call = {:.1} GFLOP/s over {threads} cores",
            dt * 1e3,
            flop / dt / 1e9,
            cpu * 1e3,
            flop / (cpu / threads) / 1e9
        );
    }
}

/// User + system CPU seconds of this process (Linux /proc; 0 elsewhere).
fn process_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    if f.len() < 13 {
        return 0.0;
    }
    (f[11] + f[12]) / 100.0
}

#[test]
#[ignore]
fn upfirdn2d_throughput() {
    let b = Cpu::<f32>::new();
    for (name, fir, geom) in model_firs() {
        for &(c, hw) in &[(128, 128), (256, 64), (256, 16)] {
            let x = b.randn(&[1, c, hw, hw], 1, 0).unwrap();
            let mut dt = f64::INFINITY;
            for _ in 0..10 {
                let t0 = std::time::Instant::now();
                let _ = b.upfirdn2d(&x, &fir, geom).unwrap();
                dt = dt.min(t0.elapsed().as_secs_f64());
            }
            println!("upfirdn2d {name} [1,{c},{hw},{hw}]: best {:.2} ms", dt * 1e3);
        }
    }
}

/// `scale_many` is `affine(x, s, 0)` of each tensor, bit for bit (f32, the sign of zero too),
/// and rejects lists of different lengths.
#[test]
fn scale_many_is_affine_of_each() {
    let be = Cpu::<f32>::new();
    let mut first = rnd(1000, 41);
    first[3] = -0.0;
    let xs = [
        be.from_f64(&[10, 100], &first).unwrap(),
        be.from_f64(&[7], &rnd(7, 42)).unwrap(),
        be.from_f64(&[0], &[]).unwrap(),
    ];
    let refs: Vec<_> = xs.iter().collect();
    let scales = [std::f64::consts::FRAC_1_SQRT_2, -3.0, 2.0];
    let got = be.scale_many(&refs, &scales).unwrap();
    assert_eq!(got.len(), 3);
    for ((x, &s), y) in xs.iter().zip(&scales).zip(&got) {
        assert_eq!(y.shape(), x.shape());
        let want: Vec<u32> = be
            .to_f32(&be.affine(x, s, 0.0).unwrap())
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect();
        let bits: Vec<u32> = be.to_f32(y).unwrap().iter().map(|v| v.to_bits()).collect();
        assert_eq!(bits, want);
    }
    assert!(be.scale_many(&refs, &scales[..2]).is_err());
}

/// `axpby_into` is `axpby`, bit for bit, whether it reuses the accumulator's buffer (nothing else
/// holds it) or not (a clone is alive).
#[test]
fn axpby_into_is_axpby_in_place_or_not() {
    let be = Cpu::<f32>::new();
    let shape = [3, 5, 70, 70];
    let n = shape.iter().product();
    let (acc, b) = (
        be.from_f64(&shape, &rnd(n, 43)).unwrap(),
        be.from_f64(&shape, &rnd(n, 44)).unwrap(),
    );
    let bits = |t: &Tensor<Cpu<f32>>| {
        be.to_f32(t)
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect::<Vec<u32>>()
    };
    let want = bits(&be.axpby(0.7, &acc, -1.3, &b).unwrap());
    let held = acc.clone();
    assert_eq!(
        bits(&be.axpby_into(0.7, acc, -1.3, &b).unwrap()),
        want,
        "shared buffer"
    );
    assert_eq!(
        bits(&be.axpby_into(0.7, held, -1.3, &b).unwrap()),
        want,
        "own buffer"
    );
    assert!(be.axpby_into(1.0, be.zeros(&[2]).unwrap(), 1.0, &b).is_err());
}

/// The ops that read a channel concatenation's parts in place (the U-Net's up path: GroupNorm_0
/// and the 1×1 shortcut over [features, skip]) against concatenating first, forward and
/// backward, in f64 and f32 (every route): GroupNorm bit for bit (each group is read, in place or
/// gathered, as the same values), the 1×1 conv to rounding (its sum over channels is split at the
/// part boundary). Parts whose boundary falls inside a group, and three parts.
#[test]
fn channel_parts_ops_match_the_concatenation() {
    use srsde_fast::backend::cpu::CpuF32;
    fn check<B: Backend>(be: &B, tol: f64) {
        let f = |shape: &[usize], seed: u64| be.from_f64(shape, &rnd(shape.iter().product(), seed)).unwrap();
        let v = |x: &Tensor<B>| be.to_f64(x).unwrap();
        let bits = |x: &Tensor<B>| -> Vec<u64> { v(x).iter().map(|a| a.to_bits()).collect() };
        assert!(be.reads_channel_parts());
        for (case, channels) in [vec![8usize, 8], vec![6, 10], vec![3, 4, 5]].iter().enumerate() {
            let (n, h, w, groups) = (3usize, 5usize, 7usize, 4usize);
            let parts: Vec<Tensor<B>> = channels
                .iter()
                .enumerate()
                .map(|(i, &c)| f(&[n, c, h, w], 10 * case as u64 + i as u64))
                .collect();
            let refs: Vec<&Tensor<B>> = parts.iter().collect();
            let cat = be.concat_channels(&refs).unwrap();
            let ctot: usize = channels.iter().sum();
            let (gamma, beta) = (f(&[ctot], 91), f(&[ctot], 92));
            let dy = f(&[n, ctot, h, w], 93);

            let (y, st) = be
                .group_norm_parts_saving(&refs, &gamma, &beta, groups, 1e-6, true)
                .unwrap();
            let (y_ref, st_ref) = be
                .group_norm_saving(&cat, &gamma, &beta, groups, 1e-6, true)
                .unwrap();
            assert_eq!(bits(&y), bits(&y_ref), "case {case}: group_norm forward");
            let pg = be
                .group_norm_parts_backward_saved(&refs, &st, &gamma, &beta, &dy, groups, 1e-6, true)
                .unwrap();
            let (dxs, dg, db) = (pg.dx, pg.dw, pg.db);
            let gr = be
                .group_norm_backward_saved(&cat, &st_ref, &gamma, &beta, &dy, groups, 1e-6, true)
                .unwrap();
            assert_eq!(bits(&dg), bits(&gr.dw), "case {case}: dγ");
            assert_eq!(bits(&db), bits(&gr.db), "case {case}: dβ");
            let want = be.split_channels(&gr.dx, &channel_counts(&refs)).unwrap();
            for (i, (got, want)) in dxs.iter().zip(&want).enumerate() {
                assert_eq!(got.shape(), parts[i].shape());
                assert_eq!(bits(got), bits(want), "case {case}: group_norm dx of part {i}");
            }

            let o = 5;
            let (wt, b) = (f(&[o, ctot, 1, 1], 94), f(&[o], 95));
            let y = be.conv1x1_parts(&refs, &wt, &b).unwrap();
            let y_ref = be.conv2d(&cat, &wt, Some(&b), 1, 0).unwrap();
            assert_eq!(y.shape(), y_ref.shape());
            assert_close(&format!("case {case}: conv1x1 forward"), &v(&y), &v(&y_ref), tol);
            let dy = f(&[n, o, h, w], 96);
            let pg = be.conv1x1_parts_backward(&refs, &wt, &dy).unwrap();
            let (dxs, dw, db) = (pg.dx, pg.dw, pg.db);
            let gr = be.conv2d_backward(&cat, &wt, &dy, 1, 0).unwrap();
            assert_close(&format!("case {case}: conv1x1 dw"), &v(&dw), &v(&gr.dw), tol);
            assert_eq!(dw.shape(), gr.dw.shape());
            assert_close(&format!("case {case}: conv1x1 db"), &v(&db), &v(&gr.db), tol);
            let want = be.split_channels(&gr.dx, &channel_counts(&refs)).unwrap();
            for (i, (got, want)) in dxs.iter().zip(&want).enumerate() {
                assert_eq!(got.shape(), parts[i].shape());
                assert_close(
                    &format!("case {case}: conv1x1 dx of part {i}"),
                    &v(got),
                    &v(want),
                    tol,
                );
            }
        }
        // Parts that do not line up are refused.
        let (a, c) = (f(&[2, 4, 5, 5], 1), f(&[2, 4, 5, 6], 2));
        let (g4, b4) = (f(&[8], 3), f(&[8], 4));
        assert!(be
            .group_norm_parts_saving(&[&a, &c], &g4, &b4, 2, 1e-6, true)
            .is_err());
        assert!(be
            .conv1x1_parts(&[&a, &c], &f(&[3, 8, 1, 1], 5), &f(&[3], 6))
            .is_err());
    }
    check(&b64(), 1e-13);
    check(&CpuF32::new(), 1e-6);
}

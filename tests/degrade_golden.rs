//! The LR synthesis against TensorFlow 2.21's own output (../shared/golden/degrade_metrics.safetensors,
//! NHWC in [0,1]): `hr → lr16` (antialiased bilinear), `lr16 → lr_up128` (antialiased bicubic) and
//! `sr → sr16`, for each of the three images (face, white noise, smooth).
mod common;

use common::Golden;
use srsde_fast::check::rel_err;
use srsde_fast::io::degrade::{make_lr, make_lr_chw, resize_antialias, ResizeKernel};

/// TF computes in f32 too; only the order of a few additions (or FMA) may differ.
const BOUND: f64 = 1e-5;

/// Image `i` of an NHWC golden batch as (data, h, w, c).
fn image(g: &Golden, name: &str, i: usize) -> (Vec<f32>, usize, usize, usize) {
    let (shape, vals) = g.get(name);
    let (h, w, c) = (shape[1], shape[2], shape[3]);
    let n = h * w * c;
    (
        vals[i * n..(i + 1) * n].iter().map(|&v| v as f32).collect(),
        h,
        w,
        c,
    )
}

fn check(src: &str, dst: &str, kernel: ResizeKernel) {
    let g = Golden::load("degrade_metrics.safetensors");
    for i in 0..g.get(src).0[0] {
        let (x, h, w, c) = image(&g, src, i);
        let (want, oh, ow, _) = image(&g, dst, i);
        let got = resize_antialias(&x, h, w, c, oh, ow, kernel);
        let err = rel_err(&got, &want);
        let max_abs = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        println!("{src}[{i}] → {dst}: rel err {err:.3e}, max |Δ| {max_abs:.3e}");
        assert!(err <= BOUND, "{src}[{i}] → {dst}: rel err {err:.3e} > {BOUND:e}");
    }
}

#[test]
fn hr_to_lr16_matches_tf_bilinear_antialias() {
    check("hr", "lr16", ResizeKernel::Triangle);
}

#[test]
fn lr16_to_128_matches_tf_bicubic_antialias() {
    check("lr16", "lr_up128", ResizeKernel::KeysCubic);
}

#[test]
fn sr_to_sr16_matches_tf() {
    check("sr", "sr16", ResizeKernel::Triangle);
}

#[test]
fn make_lr_is_the_full_pipeline_in_both_layouts() {
    let g = Golden::load("degrade_metrics.safetensors");
    for i in 0..3 {
        let (hr, h, w, c) = image(&g, "hr", i);
        let (lr_want, ..) = image(&g, "lr16", i);
        let (up_want, ..) = image(&g, "lr_up128", i);
        let (lr, guide) = make_lr(&hr, h, w);
        assert!(rel_err(&lr, &lr_want) <= BOUND);
        assert!(rel_err(&guide, &up_want) <= BOUND);

        // The CHW version gives the same numbers, transposed.
        let to_chw = |v: &[f32], h: usize, w: usize| {
            let mut out = vec![0.0f32; v.len()];
            for p in 0..h * w {
                for k in 0..c {
                    out[k * h * w + p] = v[p * c + k];
                }
            }
            out
        };
        let (lr_chw, guide_chw) = make_lr_chw(&to_chw(&hr, h, w), h, w);
        assert_eq!(lr_chw, to_chw(&lr, 16, 16));
        assert_eq!(guide_chw, to_chw(&guide, h, w));
    }
}

#[test]
fn the_guide_overshoots_like_tf_no_clamping() {
    // TF does not clamp the bicubic guide: where its output leaves [0,1], ours must leave it at the same
    // pixels. At least one golden image has such pixels, else this test would check nothing.
    let g = Golden::load("degrade_metrics.safetensors");
    let mut seen = 0;
    for i in 0..3 {
        let (up_want, ..) = image(&g, "lr_up128", i);
        let (hr, h, w, _) = image(&g, "hr", i);
        let (_, guide) = make_lr(&hr, h, w);
        let outside =
            |v: &[f32]| -> Vec<usize> { (0..v.len()).filter(|&k| !(0.0..=1.0).contains(&v[k])).collect() };
        let want = outside(&up_want);
        println!("image {i}: {} guide values outside [0,1]", want.len());
        assert_eq!(outside(&guide), want, "image {i}");
        seen += want.len();
    }
    assert!(seen > 0, "no golden guide leaves [0,1]");
}

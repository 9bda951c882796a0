//! PSNR, SSIM and LR consistency against scikit-image / TF references in
//! ../shared/golden/degrade_metrics.safetensors, plus properties that must hold for any input.
mod common;

use common::Golden;
use proptest::prelude::*;
use srsde_fast::check::rel_err;
use srsde_fast::eval::metrics::{consistency, psnr, ssim, FloatImage, ImageU8, Layout};
use srsde_fast::io::degrade::ResizeKernel;

const N: usize = 3;
const HR: usize = 128;
const LR: usize = 16;

fn u8_image(g: &Golden, name: &str, i: usize) -> ImageU8 {
    let (shape, v) = g.get(name);
    assert_eq!(shape, &[N, HR, HR, 3]);
    let per = HR * HR * 3;
    ImageU8::new(HR, HR, 3, v[i * per..][..per].iter().map(|&x| x as u8).collect()).unwrap()
}

fn f32_image(g: &Golden, name: &str, i: usize, size: usize) -> Vec<f32> {
    let per = size * size * 3;
    g.host(name).data[i * per..][..per].to_vec()
}

fn hwc(data: &[f32], size: usize) -> FloatImage<'_> {
    FloatImage {
        data,
        channels: 3,
        height: size,
        width: size,
        layout: Layout::Hwc,
    }
}

#[test]
fn psnr_and_ssim_match_scikit_image() {
    let g = Golden::load("degrade_metrics.safetensors");
    let (want_psnr, want_ssim) = (&g.get("psnr").1, &g.get("ssim").1);
    for i in 0..N {
        let (hr, sr) = (u8_image(&g, "hr_u8", i), u8_image(&g, "sr_u8", i));
        let (p, s) = (psnr(&hr, &sr).unwrap(), ssim(&hr, &sr).unwrap());
        eprintln!(
            "image {i}: psnr {p:.6} (golden {:.6}), ssim {s:.8} (golden {:.8})",
            want_psnr[i], want_ssim[i]
        );
        assert!((p - want_psnr[i]).abs() < 1e-3, "psnr {p} vs {}", want_psnr[i]);
        assert!((s - want_ssim[i]).abs() < 1e-3, "ssim {s} vs {}", want_ssim[i]);
        // Symmetric in its arguments.
        assert!((ssim(&sr, &hr).unwrap() - s).abs() < 1e-12);
    }
}

#[test]
fn consistency_matches_the_reference() {
    let g = Golden::load("degrade_metrics.safetensors");
    for (i, &want) in g.get("consistency").1.iter().enumerate() {
        let sr = f32_image(&g, "sr", i, HR);
        let lr = f32_image(&g, "lr16", i, LR);
        // The resize inside the metric reproduces the reference's sr16 ...
        let sr16 = hwc(&sr, HR).resized(LR, LR, ResizeKernel::Triangle).unwrap();
        let e16 = rel_err(&sr16, &f32_image(&g, "sr16", i, LR));
        // ... and the metric its value.
        let c = consistency(hwc(&sr, HR), hwc(&lr, LR)).unwrap();
        let rel = (c - want).abs() / want.abs();
        eprintln!(
            "image {i}: sr16 rel err {e16:.2e}, consistency {c:.6} (golden {:.6}), rel {rel:.2e}",
            want
        );
        assert!(e16 < 1e-5, "sr16 rel err {e16}");
        assert!(rel < 1e-3, "consistency {c} vs {want}");
    }
}

#[test]
fn consistency_of_a_clean_upsample_is_small_and_layout_free() {
    // The HR image shrunk by the metric is exactly how its LR was made: consistency ~0 (rounding).
    let g = Golden::load("degrade_metrics.safetensors");
    let hr = f32_image(&g, "hr", 0, HR);
    let lr = f32_image(&g, "lr16", 0, LR);
    let c_hr = consistency(hwc(&hr, HR), hwc(&lr, LR)).unwrap();
    assert!(c_hr < 1e-6, "consistency(HR, LR(HR)) = {c_hr}");

    // The same images in CHW give the same value.
    let to_chw = |v: &[f32], s: usize| {
        let mut out = vec![0.0; v.len()];
        for p in 0..s * s {
            for k in 0..3 {
                out[k * s * s + p] = v[p * 3 + k];
            }
        }
        out
    };
    let sr = f32_image(&g, "sr", 1, HR);
    let lr1 = f32_image(&g, "lr16", 1, LR);
    let (sr_c, lr_c) = (to_chw(&sr, HR), to_chw(&lr1, LR));
    let chw = |d, s| FloatImage {
        data: d,
        channels: 3,
        height: s,
        width: s,
        layout: Layout::Chw,
    };
    let a = consistency(hwc(&sr, HR), hwc(&lr1, LR)).unwrap();
    let b = consistency(chw(&sr_c, HR), chw(&lr_c, LR)).unwrap();
    assert!((a - b).abs() <= 1e-9 * a.abs(), "{a} vs {b}");
    // Mixed layouts or sizes are rejected, not misread.
    assert!(consistency(hwc(&sr, HR), chw(&lr_c, LR)).is_err());
    assert!(consistency(hwc(&sr[1..], HR), hwc(&lr1, LR)).is_err());
}

#[test]
fn golden_u8_images_are_rounded_floats() {
    // sr_u8 is what ImageU8::from_hwc_f32 makes of sr (so the eval pipeline quantises alike).
    let g = Golden::load("degrade_metrics.safetensors");
    for i in 0..N {
        let sr = f32_image(&g, "sr", i, HR);
        let q = ImageU8::from_hwc_f32(HR, HR, 3, &sr).unwrap();
        let want = u8_image(&g, "sr_u8", i);
        let off = q.data.iter().zip(&want.data).filter(|(a, b)| a != b).count();
        assert!(off == 0, "image {i}: {off} of {} values differ", q.data.len());
    }
}

fn arb_pair() -> impl Strategy<Value = (usize, usize, Vec<u8>, Vec<u8>)> {
    (11usize..24, 11usize..24).prop_flat_map(|(h, w)| {
        let n = h * w * 3;
        (
            Just(h),
            Just(w),
            proptest::collection::vec(any::<u8>(), n),
            proptest::collection::vec(any::<u8>(), n),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn metric_properties((h, w, a, b) in arb_pair()) {
        let x = ImageU8::new(h, w, 3, a).unwrap();
        let y = ImageU8::new(h, w, 3, b).unwrap();
        let s = ssim(&x, &y).unwrap();
        prop_assert!(s.is_finite() && (-1.0 - 1e-12..=1.0 + 1e-12).contains(&s), "ssim {}", s);
        prop_assert!((s - ssim(&y, &x).unwrap()).abs() < 1e-12);
        prop_assert!((ssim(&x, &x).unwrap() - 1.0).abs() < 1e-12);
        let p = psnr(&x, &y).unwrap();
        prop_assert_eq!(p.to_bits(), psnr(&y, &x).unwrap().to_bits());
        if x == y {
            prop_assert_eq!(p, f64::INFINITY);
        } else {
            // At worst every value is off by 255: PSNR 0 dB.
            prop_assert!(p.is_finite() && p >= 0.0, "psnr {}", p);
        }
        prop_assert_eq!(psnr(&x, &x).unwrap(), f64::INFINITY);
    }
}

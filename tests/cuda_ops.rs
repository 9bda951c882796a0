//! The CUDA backend against the CPU backend. Without a GPU only the error path runs; the op checks
//! print "skipped: no CUDA device" and return.
use srsde_fast::backend::cuda::{self, selftest, Cuda, Precision};
use srsde_fast::backend::Backend;
use srsde_fast::Error;

fn device() -> Option<Cuda> {
    if !cuda::cuda_available() {
        println!("skipped: no CUDA device");
        return None;
    }
    Some(Cuda::new(0).expect("a CUDA device is present, so the backend must open"))
}

#[test]
fn new_without_gpu_is_an_error_not_a_panic() {
    if cuda::cuda_available() {
        println!("skipped: a CUDA device is present");
        return;
    }
    match Cuda::new(0) {
        Err(Error::Backend(msg)) => assert!(!msg.is_empty()),
        Err(e) => panic!("expected Error::Backend, got {e}"),
        Ok(_) => panic!("Cuda::new succeeded without a device"),
    }
    assert!(cuda::device_name(0).is_err());
}

#[test]
fn kernels_are_embedded_when_nvrtc_was_found() {
    // Without NVRTC at build time the table is empty and says why; with it, every module has a
    // CUBIN, a PTX of ISA ≤ 9.0 and at least one kernel.
    match cuda::built_without_kernels() {
        Some(why) => {
            assert!(cuda::embedded_kernels().is_empty());
            println!("built without kernels: {why}");
        }
        None => {
            let mods = cuda::embedded_kernels();
            assert!(mods.len() >= 8, "{mods:?}");
            for (name, cubin, ptx, n) in mods {
                assert!(cubin > 1000 && ptx > 1000 && n > 0, "{name}: {cubin} {ptx} {n}");
            }
        }
    }
}

#[test]
fn every_op_matches_the_cpu_backend() {
    let Some(dev) = device() else { return };
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_secs());
    let rows = selftest::selftest(&dev, seed).expect("selftest runs");
    println!("seed {seed}\n{}", selftest::header());
    for r in &rows {
        println!("{r}");
    }
    assert!(rows.len() > 50);
    let failed: Vec<_> = rows.iter().filter(|r| !r.pass).collect();
    assert!(
        failed.is_empty(),
        "{} of {} CUDA ops failed",
        failed.len(),
        rows.len()
    );
}

#[test]
fn allocator_reuses_memory_in_steady_state() {
    let Some(dev) = device() else { return };
    let x = dev.randn(&[2, 64, 32, 32], 1, 0).unwrap();
    for _ in 0..3 {
        let y = dev.silu(&x).unwrap();
        drop(dev.add(&y, &x).unwrap());
    }
    dev.synchronize().unwrap();
    let before = dev.pool_stats().device_allocs;
    for _ in 0..10 {
        let y = dev.silu(&x).unwrap();
        drop(dev.add(&y, &x).unwrap());
    }
    dev.synchronize().unwrap();
    assert_eq!(
        dev.pool_stats().device_allocs,
        before,
        "steady-state ops must not call cuMemAlloc"
    );
}

#[test]
fn precision_names_round_trip() {
    for p in Precision::ALL {
        assert_eq!(p.as_str().parse::<Precision>().unwrap(), p);
    }
    assert!("fp8".parse::<Precision>().is_err());
}

#[test]
fn backend_works_from_other_threads() {
    let Some(dev) = device() else { return };
    let x = dev.randn(&[3, 4, 5, 6], 11, 0).unwrap();
    let handles: Vec<_> = (0..2)
        .map(|i| {
            let (dev, x) = (dev.clone(), x.clone());
            std::thread::spawn(move || {
                let z = dev.zeros(&[7]).unwrap();
                let y = dev.affine(&x, 2.0, i as f64).unwrap();
                (dev.to_f32(&y).unwrap(), dev.to_f32(&z).unwrap())
            })
        })
        .collect();
    let xs = dev.to_f32(&x).unwrap();
    for (i, h) in handles.into_iter().enumerate() {
        let (y, z) = h.join().expect("no panic on another thread");
        assert!(z.iter().all(|&v| v == 0.0));
        for (a, b) in y.iter().zip(&xs) {
            assert_eq!(*a, 2.0 * b + i as f32);
        }
    }
}

#[test]
fn op_bench_times_every_row() {
    let Some(dev) = device() else { return };
    let rows = srsde_fast::backend::cuda::bench::op_bench(&dev, 1).expect("bench runs");
    println!("{}", srsde_fast::backend::cuda::bench::header());
    for r in &rows {
        println!("{r}");
        assert!(r.ms.is_finite() && r.ms > 0.0 && r.rate > 0.0, "{r}");
    }
    assert!(rows.len() >= 10);
}

/// The training ops reduce without float atomics (split workspaces added in a fixed order), so
/// two runs on the same inputs give bitwise equal gradients at every precision.
#[test]
fn backward_ops_are_bitwise_reproducible() {
    let Some(dev) = device() else { return };
    let bits = |d: &Cuda, t: &srsde_fast::tensor::Tensor<Cuda>| -> Vec<u32> {
        d.to_f32(t).unwrap().iter().map(|v| v.to_bits()).collect()
    };
    for p in Precision::ALL {
        if !dev.supports(p) {
            continue;
        }
        let d = dev.with_precision(p);
        let x = d.randn(&[8, 64, 33, 33], 1, 0).unwrap();
        let w = d
            .affine(&d.randn(&[96, 64, 3, 3], 2, 0).unwrap(), 0.04, 0.0)
            .unwrap();
        let dy = d.randn(&[8, 96, 16, 16], 3, 0).unwrap(); // stride 2, pad 0: (33 − 3) / 2 + 1
        let a = d.conv2d_backward(&x, &w, &dy, 2, 0).unwrap();
        let b = d.conv2d_backward(&x, &w, &dy, 2, 0).unwrap();
        assert!(bits(&d, &a.dx) == bits(&d, &b.dx), "{p}: conv dx");
        assert!(bits(&d, &a.dw) == bits(&d, &b.dw), "{p}: conv dw");
        assert!(bits(&d, &a.db) == bits(&d, &b.db), "{p}: conv db");
    }
    let x = dev.randn(&[4, 128, 16, 16], 4, 0).unwrap();
    let g = dev.affine(&dev.randn(&[128], 5, 0).unwrap(), 0.2, 1.0).unwrap();
    let be = dev.randn(&[128], 6, 0).unwrap();
    let dy = dev.randn(&[4, 128, 16, 16], 7, 0).unwrap();
    let a = dev.group_norm_backward(&x, &g, &be, &dy, 32, 1e-6, true).unwrap();
    let b = dev.group_norm_backward(&x, &g, &be, &dy, 32, 1e-6, true).unwrap();
    assert!(bits(&dev, &a.dw) == bits(&dev, &b.dw) && bits(&dev, &a.db) == bits(&dev, &b.db));
    let (q1, k1, v1) = dev.attention_backward(&x, &dy, &x, &dy).unwrap();
    let (q2, k2, v2) = dev.attention_backward(&x, &dy, &x, &dy).unwrap();
    assert!(bits(&dev, &q1) == bits(&dev, &q2) && bits(&dev, &k1) == bits(&dev, &k2));
    assert!(bits(&dev, &v1) == bits(&dev, &v2));
}

/// Bad shapes are errors naming the op, never panics or launches.
#[test]
fn backward_ops_reject_bad_shapes() {
    let Some(dev) = device() else { return };
    let x = dev.zeros(&[2, 4, 8, 8]).unwrap();
    let w = dev.zeros(&[5, 4, 3, 3]).unwrap();
    let shape_err = |r: srsde_fast::Result<()>| matches!(r, Err(Error::Shape { .. }));
    let wrong_dy = dev.zeros(&[2, 5, 7, 8]).unwrap();
    assert!(shape_err(
        dev.conv2d_backward(&x, &w, &wrong_dy, 1, 1).map(|_| ())
    ));
    let nin_w = dev.zeros(&[3, 6]).unwrap(); // expects 4 input channels
    let dy = dev.zeros(&[2, 6, 8, 8]).unwrap();
    assert!(shape_err(dev.nin_backward(&x, &nin_w, &dy).map(|_| ())));
    let g = dev.zeros(&[4]).unwrap();
    assert!(shape_err(
        dev.group_norm_backward(&x, &g, &g, &x, 3, 1e-6, false)
            .map(|_| ())
    ));
    let lin_x = dev.zeros(&[3, 7]).unwrap();
    let lin_w = dev.zeros(&[5, 7]).unwrap();
    assert!(shape_err(dev.linear_backward(&lin_x, &lin_w, &lin_x).map(|_| ())));
    assert!(shape_err(dev.attention_backward(&x, &x, &x, &dy).map(|_| ())));
}

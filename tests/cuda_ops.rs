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

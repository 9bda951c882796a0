//! The CPU per-op profile's accounting of attention, in a test binary of its own: the profile is
//! process-wide, so no other test may run attention while this one reads the table.
use srsde_fast::backend::cpu::{profile, CpuF32};
use srsde_fast::backend::Backend;

/// The profile books attention's matrix products as "gemm attention" with their FLOPs (4·C·L² a
/// sample forward, 10·C·L² backward), with one sample (products split over the pool) and with
/// several (a sample per task), and turning the profile on changes no output bit.
#[test]
fn attention_products_count_as_gemm() {
    let be = CpuF32::new();
    let bits = |t: &srsde_fast::tensor::Tensor<CpuF32>| -> Vec<u32> {
        be.to_f32(t).unwrap().iter().map(|x| x.to_bits()).collect()
    };
    for n in [1usize, 4] {
        let (c, h, w) = (8usize, 4usize, 4usize);
        let l = h * w;
        let shape = [n, c, h, w];
        let [q, k, v, d] = [1u64, 2, 3, 4].map(|s| be.randn(&shape, s, 0).unwrap());
        let run = || {
            let out = be.attention(&q, &k, &v).unwrap();
            let (dq, dk, dv) = be.attention_backward(&q, &k, &v, &d).unwrap();
            [out, dq, dk, dv].iter().map(bits).collect::<Vec<_>>()
        };
        let plain = run();
        profile::enable(true);
        let _ = profile::take();
        let profiled = run();
        let table = profile::take();
        profile::enable(false);
        assert_eq!(profiled, plain, "n {n}: the profile changed the results");
        let gemm = table.get("gemm attention").copied().unwrap_or_default();
        assert_eq!(gemm.calls, 2, "n {n}: {table:?}");
        assert_eq!(gemm.flops, (14 * n * c * l * l) as f64, "n {n}");
        assert!(gemm.self_s > 0.0, "n {n}: {gemm:?}");
        let rest = table.get("attention").copied().unwrap_or_default();
        assert_eq!(rest.calls, 1, "n {n}: the forward op itself: {table:?}");
    }
}

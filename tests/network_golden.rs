//! The score networks against the original implementation (../shared/golden/ncsnpp_*_nf16):
//! score output, every captured activation, the DSM loss and every parameter gradient, all within
//! 1e-4 norm-wise relative error.
mod common;

use std::collections::{BTreeMap, HashMap};

use common::Golden;
use srsde_fast::autograd::Graph;
use srsde_fast::backend::cpu::CpuF32;
use srsde_fast::backend::Backend;
use srsde_fast::check::rel_err;
use srsde_fast::model::ncsnpp::{param_specs, Forward};
use srsde_fast::model::{Ncsnpp, NetConfig, ScoreModel, SdeKind};
use srsde_fast::tensor::HostTensor;

const TOL: f64 = 1e-4;

fn norm(v: &[f32]) -> f64 {
    v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt()
}

fn load(golden: &Golden) -> (NetConfig, BTreeMap<String, HostTensor>) {
    let cfg = NetConfig::from_json(
        &golden.metadata["config"],
        golden.metadata.get("data").map(|s| s.as_str()),
    )
    .expect("golden config parses");
    let mut w = BTreeMap::new();
    for name in golden.names_with_prefix("param.") {
        let key = name.trim_start_matches("param.").to_string();
        if key != "sigmas" {
            w.insert(key, golden.host(&name));
        }
    }
    (cfg, w)
}

fn check_network(file: &str) {
    let golden = Golden::load(file);
    let (cfg, weights) = load(&golden);
    let be = CpuF32::new();
    let net = Ncsnpp::from_weights(&be, cfg.clone(), &weights, file).expect("weights load");
    let trainable: usize = param_specs(&cfg)
        .iter()
        .filter(|s| s.2)
        .map(|s| s.1.iter().product::<usize>())
        .sum();
    assert_eq!(
        trainable.to_string(),
        golden.metadata["n_params"],
        "trainable parameter count"
    );
    assert_eq!(
        net.num_params(),
        trainable
            + cfg.model.nf
                * (cfg.model.embedding_type == srsde_fast::model::config::EmbeddingType::Fourier) as usize
    );

    let xt = golden.host("input.xt").to_device(&be).unwrap();
    let y = golden.host("input.y").to_device(&be).unwrap();
    let z = golden.host("input.z").to_device(&be).unwrap();
    let input = be.interleave_channels(&xt, &y).unwrap(); // what score_var feeds the net
    let want_input = golden.host("input.net_input");
    assert!(
        rel_err(&be.to_f32(&input).unwrap(), &want_input.data) < 1e-7,
        "interleave"
    );

    // The score through the library's ScoreModel (σ(t) labels for VE, 999·t and −h/std for VP).
    let model = ScoreModel::new(net);
    let t: Vec<f64> = golden.get("input.t").1.clone();
    let n = t.len();
    let std: Vec<f64> = t.iter().map(|&t| model.sde.marginal_std(t)).collect();

    // Training graph: forward with activation capture, loss, backward.
    let g = Graph::training(&be);
    let mut acts: HashMap<usize, Vec<f32>> = HashMap::new();
    let mut cap = |i: usize, v: &srsde_fast::tensor::Tensor<CpuF32>| {
        acts.insert(i, be.to_f32(v).unwrap());
    };
    let score = model
        .score_var(
            &g,
            &xt,
            &y,
            &t,
            Forward {
                capture: Some(&mut cap),
                ..Default::default()
            },
        )
        .expect("forward");
    let got = be.to_f32(&score.value).unwrap();
    let e = rel_err(&got, &golden.host("output.score").data);
    println!("{file}: score rel err {e:.2e}");
    assert!(e < TOL, "score rel err {e}");

    let mut worst = 0f64;
    for name in golden.names_with_prefix("act.all_modules.") {
        let idx: usize = name.rsplit('.').next().unwrap().parse().unwrap();
        let got = acts
            .get(&idx)
            .unwrap_or_else(|| panic!("module {idx} not captured"));
        let e = rel_err(got, &golden.host(&name).data);
        worst = worst.max(e);
        assert!(e < TOL, "{name}: rel err {e}");
    }
    println!("{file}: worst activation rel err {worst:.2e}");

    // DSM loss: per sample reduce((s·std + z)²); VE 0.5·sum, VP mean; then batch mean.
    let stdt = be.from_f64(&[n], &std).unwrap();
    let r = g
        .add(&g.scale_per_sample(&score, &stdt).unwrap(), &g.constant(z))
        .unwrap();
    let per_sample = g.sum_squares_per_sample(&r).unwrap();
    let elems = (3 * 128 * 128) as f64;
    let factor = match cfg.sde() {
        SdeKind::Ve => 0.5,
        _ => 1.0 / elems,
    } / n as f64;
    let loss: f64 = be.to_f64(&per_sample.value).unwrap().iter().sum::<f64>() * factor;
    let want_loss = golden.get("output.loss").1[0];
    let e = ((loss - want_loss) / want_loss).abs();
    println!("{file}: loss {loss} vs {want_loss} (rel {e:.2e})");
    assert!(e < TOL, "loss rel err {e}");

    let seed = be.from_f64(&[n], &vec![factor; n]).unwrap();
    let grads = g.backward(&per_sample, seed).expect("backward");
    let mut worst = 0f64;
    let mut count = 0;
    for (name, _, trainable) in param_specs(&cfg) {
        if !trainable {
            assert!(
                !grads.by_name.contains_key(&name),
                "{name} is frozen but got a gradient"
            );
            continue;
        }
        let want = golden.host(&format!("grad.{name}"));
        let got = be
            .to_f32(
                grads
                    .by_name
                    .get(&name)
                    .unwrap_or_else(|| panic!("no gradient for {name}")),
            )
            .unwrap();
        if name.ends_with("NIN_1.b") {
            // The attention key bias adds q·b to every logit of a row, which softmax ignores: its
            // true gradient is exactly 0 and both sides hold only rounding noise. Check that it is
            // negligible next to the query bias gradient instead of comparing noise with noise.
            let scale = norm(
                &be.to_f32(&grads.by_name[&name.replace("NIN_1.b", "NIN_0.b")])
                    .unwrap(),
            );
            assert!(
                norm(&got) <= 1e-4 * scale && norm(&want.data) <= 1e-4 * scale,
                "{name} not ~0"
            );
            count += 1;
            continue;
        }
        let e = rel_err(&got, &want.data);
        worst = worst.max(e);
        count += 1;
        assert!(e < TOL, "grad.{name}: rel err {e}");
    }
    assert_eq!(
        count,
        golden.names_with_prefix("grad.").len(),
        "every golden gradient checked"
    );
    println!("{file}: {count} gradients, worst rel err {worst:.2e}");
}

#[test]
fn ve_ncsnpp_nf16_matches_reference() {
    check_network("ncsnpp_ve_nf16.safetensors");
}

#[test]
fn vp_ddpmpp_nf16_matches_reference() {
    check_network("ncsnpp_vp_nf16.safetensors");
}

#[test]
fn inference_graph_matches_training_graph() {
    let golden = Golden::load("ncsnpp_ve_nf16.safetensors");
    let (cfg, weights) = load(&golden);
    let be = CpuF32::new();
    let net = Ncsnpp::from_weights(&be, cfg, &weights, "golden").unwrap();
    let input = golden.host("input.net_input").to_device(&be).unwrap();
    let labels = be.from_f32(&[2], &[0.5, 3.0]).unwrap();
    let a = {
        let g = Graph::inference(&be);
        net.forward(&g, &g.constant(input.clone()), &labels, Forward::default())
            .unwrap()
    };
    let g = Graph::training(&be);
    let b = net
        .forward(&g, &g.constant(input), &labels, Forward::default())
        .unwrap();
    assert_eq!(be.to_f32(&a.value).unwrap(), be.to_f32(&b.value).unwrap());
    assert!(!a.tracked() && b.tracked());
}

#[test]
fn param_specs_match_reference_names_and_shapes() {
    for file in ["ncsnpp_ve_nf16.safetensors", "ncsnpp_vp_nf16.safetensors"] {
        let golden = Golden::load(file);
        let (cfg, weights) = load(&golden);
        let specs = param_specs(&cfg);
        assert_eq!(
            specs.len(),
            weights.len(),
            "{file}: every golden param is in the model and vice versa"
        );
        for (name, shape, _) in specs {
            assert_eq!(weights[&name].shape, shape, "{file}: {name}");
        }
    }
}

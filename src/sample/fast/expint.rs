//! Coefficients of the exponential integrator (DPM-Solver++, Lu et al. 2022) in λ = −ln σ̂.
//!
//! Along the ODE of [`super::schedule`], with κ = 1 for the ODE (κ = 1 + churn for the stochastic
//! family, see [`super::FastConfig::churn`]), one step of length h in λ is exactly
//!
//! x̂(λ+h) = e^{−κh}·x̂(λ) + κ·∫₀ʰ e^{−κ(h−u)} D(λ+u) du  (+ noise when churned).
//!
//! The multistep solvers replace D by the polynomial through the last q denoiser values (at nodes
//! u_j = λ_{i−j} − λ_i ≤ 0) and integrate it exactly; with v = κu this is a sum of
//! I_k(H) = ∫₀ᴴ e^{−(H−v)} v^k dv over the Lagrange basis, H = κh. Order q of accuracy for q
//! nodes; q = 1 is DDIM / DPM-Solver++(1).

/// φ_m(z) = Σ_{n≥0} zⁿ/(n+m)! (φ₀ = e^z, φ₁ = (e^z − 1)/z, …), accurate for small |z| too.
pub fn phi(m: usize, z: f64) -> f64 {
    if z.abs() < 1.0 {
        // Series: 1/m! · Σ zⁿ · m!/(n+m)!; 40 terms reach f64 precision for |z| < 1.
        let mut term = 1.0 / factorial(m);
        let mut sum = term;
        for n in 1..40 {
            term *= z / (n + m) as f64;
            sum += term;
        }
        sum
    } else {
        // φ_{k+1}(z) = (φ_k(z) − 1/k!)/z, stable for |z| ≥ 1.
        let mut p = z.exp();
        for k in 0..m {
            p = (p - 1.0 / factorial(k)) / z;
        }
        p
    }
}

fn factorial(k: usize) -> f64 {
    (1..=k).map(|i| i as f64).product()
}

/// I_k(H) = ∫₀ᴴ e^{−(H−v)} v^k dv = k!·H^{k+1}·φ_{k+1}(−H).
pub fn exp_moment(k: usize, h: f64) -> f64 {
    factorial(k) * h.powi(k as i32 + 1) * phi(k + 1, -h)
}

/// Weights w_j with ∫₀ᴴ e^{−(H−v)} P(v) dv = Σ_j w_j·P(ν_j) for every polynomial P of degree
/// < `nodes.len()` (the nodes must be distinct).
pub fn exp_weights(h: f64, nodes: &[f64]) -> Vec<f64> {
    let moments: Vec<f64> = (0..nodes.len()).map(|k| exp_moment(k, h)).collect();
    (0..nodes.len())
        .map(|j| {
            // Coefficients (ascending powers) of the Lagrange basis polynomial of node j.
            let mut coef = vec![1.0];
            for (m, &nu) in nodes.iter().enumerate() {
                if m == j {
                    continue;
                }
                let scale = 1.0 / (nodes[j] - nu);
                let mut next = vec![0.0; coef.len() + 1];
                for (k, &c) in coef.iter().enumerate() {
                    next[k + 1] += c * scale;
                    next[k] -= c * nu * scale;
                }
                coef = next;
            }
            coef.iter().zip(&moments).map(|(c, m)| c * m).sum()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phi_series_and_recursion_agree() {
        for m in 0..4 {
            for &z in &[-0.999_999, -1.0, -1.000_001, 0.999_999, 1.0] {
                let (a, b) = (phi(m, z), phi(m, z * (1.0 + 1e-12)));
                assert!((a / b - 1.0).abs() < 1e-9, "φ_{m}({z}): {a} vs {b}");
            }
        }
        assert!((phi(1, -2.0) - (1.0 - (-2.0f64).exp()) / 2.0).abs() < 1e-15);
        assert!((phi(2, 1e-8) - 0.5).abs() < 1e-8);
    }

    /// ∫₀ᴴ e^{−(H−v)} f(v) dv by composite Simpson.
    fn quad(h: f64, f: impl Fn(f64) -> f64) -> f64 {
        let n = 20_000;
        let dv = h / n as f64;
        let g = |v: f64| (-(h - v)).exp() * f(v);
        let mut s = g(0.0) + g(h);
        for i in 1..n {
            s += g(i as f64 * dv) * if i % 2 == 1 { 4.0 } else { 2.0 };
        }
        s * dv / 3.0
    }

    #[test]
    fn weights_integrate_polynomials_exactly() {
        for &h in &[1e-3, 0.3, 2.5] {
            let nodes = [0.0, -0.7 * h, -1.9 * h];
            for q in 1..=3 {
                let w = exp_weights(h, &nodes[..q]);
                let sum: f64 = w.iter().sum();
                assert!((sum + (-h).exp_m1()).abs() < 1e-14, "Σw = 1 − e^{{−H}}");
                // Each monomial up to degree q−1.
                for d in 0..q {
                    let p = |v: f64| (v / h).powi(d as i32);
                    let got: f64 = w.iter().zip(&nodes).map(|(w, &nu)| w * p(nu)).sum();
                    let want = quad(h, p);
                    assert!(
                        (got - want).abs() < 1e-10 * want.abs().max(1e-3),
                        "H {h} q {q} deg {d}"
                    );
                }
            }
        }
    }
}

//! Numerical comparison used by tests, `selftest` and golden checks.

/// Norm-wise relative error ‖a − b‖₂ / ‖b‖₂ (b is the reference). Infinite when lengths differ or
/// either side holds a NaN/inf, so a NaN never passes a bound.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    rel_err_f64(
        &a.iter().map(|&v| v as f64).collect::<Vec<_>>(),
        &b.iter().map(|&v| v as f64).collect::<Vec<_>>(),
    )
}

/// `rel_err` in double precision.
pub fn rel_err_f64(a: &[f64], b: &[f64]) -> f64 {
    if a.len() != b.len() || a.iter().chain(b).any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        num += (x - y) * (x - y);
        den += y * y;
    }
    if den == 0.0 {
        return if num == 0.0 { 0.0 } else { f64::INFINITY };
    }
    (num / den).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn nan_never_passes() {
        assert!(rel_err(&[f32::NAN], &[1.0]) > 1e30);
        assert!(rel_err(&[1.0], &[f32::NAN]) > 1e30);
        assert!(rel_err(&[1.0, 2.0], &[1.0]) > 1e30);
        assert_eq!(rel_err(&[3.0, 4.0], &[3.0, 4.0]), 0.0);
        assert!((rel_err(&[3.0, 4.1], &[3.0, 4.0]) - 0.02).abs() < 1e-6);
    }
}

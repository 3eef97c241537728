//! BYOL's regression loss. Grill et al., "Bootstrap Your Own Latent: A New Approach to
//! Self-Supervised Learning", NeurIPS 2020.
//!
//! The online branch's prediction `p` regresses the target branch's projection `z` of the other
//! view; both normalised, the squared distance is
//!
//! ```text
//! ℓ = ‖p̄ − sg(z̄)‖² = 2 − 2 cos(p, sg(z)),   L = mean over the batch
//! ```
//!
//! The method symmetrises it over the two views (`ℓ(p1, z2) + ℓ(p2, z1)`).

use candle_core::{Result, Tensor};

use super::common::{expect_float_matrix, expect_same_shape, row_cosine};

/// BYOL's `mean(2 − 2 cos(p, sg(z)))` for predictions `p` and targets `z`, both `[N, D]`;
/// `z` is detached here.
pub fn byol(p: &Tensor, z: &Tensor) -> Result<Tensor> {
    expect_float_matrix("p", p)?;
    expect_same_shape("p", p, "z", z)?;
    row_cosine(p, &z.detach())?.affine(-2.0, 2.0)?.mean_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::loss::testing::*;
    use candle_core::Var;

    fn example() -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
        (vec![vec![1.0, 2.0, -0.5], vec![0.3, -0.7, 0.2]], vec![vec![0.5, 1.0, 0.5], vec![-0.3, -0.2, 0.9]])
    }

    #[test]
    fn equals_the_squared_distance_of_unit_vectors() -> Result<()> {
        let (p, z) = example();
        let expected: f64 = p
            .iter()
            .zip(&z)
            .map(|(a, b)| {
                let (a, b) = (normalize(a), normalize(b));
                a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum::<f64>()
            })
            .sum::<f64>()
            / p.len() as f64;
        let loss = byol(&matrix(&p), &matrix(&z))?.to_scalar::<f64>()?;
        assert!((loss - expected).abs() < 1e-12, "{loss} vs {expected}");
        // Hand values: identical directions give 0, opposite ones 4.
        let aligned = byol(&matrix(&[vec![1.0, 1.0]]), &matrix(&[vec![3.0, 3.0]]))?.to_scalar::<f64>()?;
        let opposite = byol(&matrix(&[vec![1.0, 0.0]]), &matrix(&[vec![-2.0, 0.0]]))?.to_scalar::<f64>()?;
        assert!(aligned.abs() < 1e-12 && (opposite - 4.0).abs() < 1e-12);
        Ok(())
    }

    #[test]
    fn gradient_matches_finite_differences_and_stops_at_the_target() -> Result<()> {
        let (p, z) = example();
        assert_gradients_match_finite_differences(&[matrix(&p), matrix(&z)], &[0], |x| byol(&x[0], &x[1]));
        let (p, z) = (Var::from_tensor(&matrix(&p))?, Var::from_tensor(&matrix(&z))?);
        let grads = byol(p.as_tensor(), z.as_tensor())?.backward()?;
        assert!(grads.get(p.as_tensor()).is_some());
        assert!(grads.get(z.as_tensor()).is_none());
        Ok(())
    }
}

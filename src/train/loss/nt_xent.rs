//! NT-Xent (normalised temperature-scaled cross entropy), SimCLR's InfoNCE with in-batch
//! negatives. Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning of
//! Visual Representations", ICML 2020.
//!
//! With the 2N normalised views `z` of a batch (view-major: `z_i` and `z_{i+N}` are the two views
//! of sample i) and `s(a, b) = a·b / τ`:
//!
//! ```text
//! ℓ_i = −log( e^{s(z_i, z_p(i))} / Σ_{k≠i} e^{s(z_i, z_k)} ),   L = (1/2N) Σ_i ℓ_i
//! ```
//!
//! where `p(i)` is the other view of the same sample; the 2N − 2 other views are negatives.

use candle_core::{Result, Tensor};

use super::info_nce;
use crate::train::pairs::Contrast;

/// SimCLR's NT-Xent of two views `z1`, `z2` (`[N, D]` projections, normalised here) at
/// `temperature` τ; the mean over all 2N views.
pub fn nt_xent(z1: &Tensor, z2: &Tensor, temperature: f64) -> Result<Tensor> {
    info_nce(&Contrast::in_batch(z1, z2)?, temperature)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::loss::testing::*;
    use candle_core::{DType, Device, Var};

    /// NT-Xent by plain loops over the definition.
    fn reference(z1: &[Vec<f64>], z2: &[Vec<f64>], temperature: f64) -> f64 {
        let views: Vec<&Vec<f64>> = z1.iter().chain(z2).collect();
        let n = z1.len();
        let mut total = 0.0;
        for i in 0..2 * n {
            let positive = (i + n) % (2 * n);
            let s = |k: usize| cosine(views[i], views[k]) / temperature;
            let denominator: f64 = (0..2 * n).filter(|&k| k != i).map(|k| s(k).exp()).sum();
            total += -(s(positive).exp() / denominator).ln();
        }
        total / (2 * n) as f64
    }

    #[test]
    fn matches_the_definition() -> Result<()> {
        let (z1, z2) = two_view_example();
        for temperature in [0.1, 0.5, 1.0] {
            let loss = nt_xent(&matrix(&z1), &matrix(&z2), temperature)?.to_scalar::<f64>()?;
            let expected = reference(&z1, &z2, temperature);
            assert!((loss - expected).abs() < 1e-10, "τ {temperature}: {loss} vs {expected}");
        }
        Ok(())
    }

    #[test]
    fn f32_agrees_with_f64() -> Result<()> {
        let (z1, z2) = two_view_example();
        let loss32 = nt_xent(&matrix(&z1).to_dtype(DType::F32)?, &matrix(&z2).to_dtype(DType::F32)?, 0.1)?;
        let expected = reference(&z1, &z2, 0.1);
        assert!((loss32.to_scalar::<f32>()? as f64 - expected).abs() < 1e-4);
        Ok(())
    }

    #[test]
    fn aligned_orthogonal_pairs_reach_the_analytic_value() -> Result<()> {
        // z1 = z2 = one-hot: the positive has cosine 1, the 2N−2 negatives cosine 0, so
        // ℓ = log(1 + (2N−2) e^{−1/τ}), which goes to 0 as τ shrinks.
        let n = 4;
        let one_hot = Tensor::eye(n, DType::F64, &Device::Cpu)?;
        for temperature in [1.0, 0.5, 0.1, 0.01] {
            let loss = nt_xent(&one_hot, &one_hot, temperature)?.to_scalar::<f64>()?;
            let analytic = (1.0 + (2 * n - 2) as f64 * (-1.0 / temperature).exp()).ln();
            assert!((loss - analytic).abs() < 1e-12, "τ {temperature}: {loss} vs {analytic}");
        }
        let tiny = nt_xent(&one_hot, &one_hot, 0.01)?.to_scalar::<f64>()?;
        assert!(tiny < 1e-40);
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences() {
        let (z1, z2) = two_view_example();
        assert_gradients_match_finite_differences(&[matrix(&z1), matrix(&z2)], &[0, 1], |x| nt_xent(&x[0], &x[1], 0.2));
    }

    #[test]
    fn gradients_reach_both_views_in_f32() -> Result<()> {
        let (z1, z2) = two_view_example();
        let z1 = Var::from_tensor(&matrix(&z1).to_dtype(DType::F32)?)?;
        let z2 = Var::from_tensor(&matrix(&z2).to_dtype(DType::F32)?)?;
        let grads = nt_xent(z1.as_tensor(), z2.as_tensor(), 0.1)?.backward()?;
        for var in [&z1, &z2] {
            let grad = grads.get(var.as_tensor()).expect("gradient").abs()?.sum_all()?;
            assert!(grad.to_scalar::<f32>()? > 0.0);
        }
        Ok(())
    }

    #[test]
    fn rejects_views_of_different_shapes() {
        let a = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        let b = Tensor::zeros((3, 3), DType::F32, &Device::Cpu).unwrap();
        let err = nt_xent(&a, &b, 0.1).unwrap_err().to_string();
        assert!(err.contains("same shape"), "{err}");
    }
}

//! Supervised contrastive loss, `L^sup_out`. Khosla, Teterwak, Wang, Sarna, Tian, Isola,
//! Maschinot, Liu, Krishnan, "Supervised Contrastive Learning", NeurIPS 2020.
//!
//! With all M views of a batch stacked and normalised, `s(a, b) = a·b / τ`, and `P(i)` the views
//! other than i that share i's label:
//!
//! ```text
//! ℓ_i = −(1/|P(i)|) Σ_{p∈P(i)} log( e^{s(z_i, z_p)} / Σ_{a≠i} e^{s(z_i, z_a)} )
//! L   = mean of ℓ_i over the anchors with |P(i)| > 0
//! ```
//!
//! Anchors without a positive are skipped. With instance labels ([`crate::train::pairs::view_labels`])
//! the only positive is the other view and SupCon equals NT-Xent.

use candle_core::{bail, DType, Result, Tensor};

use super::common::{expect_float_matrix, expect_positive, l2_normalize, weighted_positive_log_likelihood};
use crate::train::pairs::label_positive_mask;

/// SupCon's `L_out` of `features` `[M, D]` (normalised here) with `labels` `[M]` (any integer dtype;
/// a sample's label repeated for each of its views). Returns 0 when no anchor has a positive.
pub fn supcon(features: &Tensor, labels: &Tensor, temperature: f64) -> Result<Tensor> {
    let (views, _) = expect_float_matrix("features", features)?;
    if labels.dims() != [views] {
        bail!("labels must have shape [{views}] (one per feature row), got {:?}", labels.dims())
    }
    expect_positive("temperature", temperature)?;
    supcon_with_positives(features, &label_positive_mask(labels)?, temperature)
}

/// SupCon's `L_out` with the positives given as a `[M, M]` mask (KCL samples them); every other
/// view is in the denominator.
pub fn supcon_with_positives(features: &Tensor, positives: &Tensor, temperature: f64) -> Result<Tensor> {
    let (views, _) = expect_float_matrix("features", features)?;
    expect_positive("temperature", temperature)?;
    let z = l2_normalize(features)?;
    let logits = (z.matmul(&z.t()?)? / temperature)?;
    weighted_positive_log_likelihood(&logits, positives, &off_diagonal(views, z.device())?)
}

/// `[n, n]` F32: 1 off the diagonal, 0 on it (every view but the anchor itself).
pub fn off_diagonal(n: usize, device: &candle_core::Device) -> Result<Tensor> {
    Tensor::ones((n, n), DType::F32, device)? - Tensor::eye(n, DType::F32, device)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::loss::nt_xent;
    use crate::train::loss::testing::*;
    use crate::train::pairs::view_labels;
    use candle_core::{Device, Var};

    fn reference(features: &[Vec<f64>], labels: &[u32], temperature: f64) -> f64 {
        let m = features.len();
        let s = |i: usize, j: usize| cosine(&features[i], &features[j]) / temperature;
        let (mut total, mut anchors) = (0.0, 0);
        for i in 0..m {
            let positives: Vec<usize> = (0..m).filter(|&p| p != i && labels[p] == labels[i]).collect();
            if positives.is_empty() {
                continue;
            }
            let denominator: f64 = (0..m).filter(|&a| a != i).map(|a| s(i, a).exp()).sum();
            let sum: f64 = positives.iter().map(|&p| (s(i, p).exp() / denominator).ln()).sum();
            total += -sum / positives.len() as f64;
            anchors += 1;
        }
        total / anchors as f64
    }

    fn features() -> Vec<Vec<f64>> {
        six_features()
    }

    // Label 7 has three views, 2 has two, 5 only one (an anchor without positives).
    const LABELS: [u32; 6] = [7, 2, 7, 5, 2, 7];

    #[test]
    fn matches_the_definition_and_skips_anchors_without_positives() -> Result<()> {
        let f = features();
        let labels = Tensor::new(&LABELS, &Device::Cpu)?;
        let loss = supcon(&matrix(&f), &labels, 0.1)?.to_scalar::<f64>()?;
        let expected = reference(&f, &LABELS, 0.1);
        assert!(loss.is_finite() && (loss - expected).abs() < 1e-10, "{loss} vs {expected}");
        let labels64 = labels.to_dtype(DType::I64)?;
        let loss32 = supcon(&matrix(&f).to_dtype(DType::F32)?, &labels64, 0.1)?.to_scalar::<f32>()?;
        assert!((loss32 as f64 - expected).abs() < 1e-4);
        Ok(())
    }

    #[test]
    fn equals_nt_xent_under_instance_labels() -> Result<()> {
        let f = features();
        let (z1, z2) = (matrix(&f[..3]), matrix(&f[3..]));
        let labels = view_labels(3, 2, &Device::Cpu)?;
        for temperature in [0.1, 0.5] {
            let sup = supcon(&Tensor::cat(&[&z1, &z2], 0)?, &labels, temperature)?.to_scalar::<f64>()?;
            let simclr = nt_xent(&z1, &z2, temperature)?.to_scalar::<f64>()?;
            assert!((sup - simclr).abs() < 1e-10, "{sup} vs {simclr}");
        }
        Ok(())
    }

    #[test]
    fn no_positives_gives_zero_not_nan() -> Result<()> {
        let labels = Tensor::new(&[0u32, 1, 2, 3, 4, 5], &Device::Cpu)?;
        let loss = supcon(&matrix(&features()), &labels, 0.1)?.to_scalar::<f64>()?;
        assert_eq!(loss, 0.0);
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences() {
        let labels = Tensor::new(&LABELS, &Device::Cpu).unwrap();
        assert_gradients_match_finite_differences(&[matrix(&features())], &[0], |x| supcon(&x[0], &labels, 0.3));
    }

    #[test]
    fn gradient_flows_in_f32() -> Result<()> {
        let var = Var::from_tensor(&matrix(&features()).to_dtype(DType::F32)?)?;
        let labels = Tensor::new(&LABELS, &Device::Cpu)?;
        let grads = supcon(var.as_tensor(), &labels, 0.1)?.backward()?;
        let grad = grads.get(var.as_tensor()).expect("gradient").abs()?.sum_all()?;
        assert!(grad.to_scalar::<f32>()? > 0.0);
        Ok(())
    }
}

//! Hybrid contrastive + cross-entropy loss. Wang, Xu, Wang, Fan, Xu & Tan, "Contrastive Learning
//! based Hybrid Networks for Long-Tailed Image Classification", CVPR 2021.
//!
//! One encoder, two branches: supervised contrastive learning shapes the features, a linear
//! classifier on the same features learns the decision. The weight moves from the first to the
//! second as training progresses (the paper's parabolic decay, `t` the fraction of training done):
//!
//! ```text
//! α(t) = 1 − t²
//! L    = α(t) · L_SupCon + (1 − α(t)) · L_CE
//! ```

use candle_core::{bail, Result, Tensor};

use super::common::cross_entropy;

/// The contrastive branch's weight after `progress` (0 → 1) of training.
pub fn contrastive_weight(progress: f64) -> f64 {
    1.0 - progress.clamp(0.0, 1.0).powi(2)
}

/// `α(t) · contrastive + (1 − α(t)) · CE(class_logits, labels)`.
pub fn hybrid(contrastive: &Tensor, class_logits: &Tensor, labels: &Tensor, progress: f64) -> Result<Tensor> {
    if !progress.is_finite() {
        bail!("training progress must be finite, got {progress}")
    }
    let alpha = contrastive_weight(progress);
    contrastive.affine(alpha, 0.0)? + cross_entropy(class_logits, labels)?.affine(1.0 - alpha, 0.0)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::loss::testing::*;
    use candle_core::Device;

    #[test]
    fn weight_decays_as_a_parabola() {
        assert_eq!(contrastive_weight(0.0), 1.0);
        assert_eq!(contrastive_weight(0.5), 0.75);
        assert_eq!(contrastive_weight(1.0), 0.0);
    }

    #[test]
    fn mixes_the_two_losses_and_cross_entropy_is_the_textbook_one() -> Result<()> {
        let logits = vec![vec![1.0, 2.0, 0.5], vec![-1.0, 0.0, 3.0]];
        let labels = Tensor::new(&[1u32, 0], &Device::Cpu)?;
        // −log softmax of the true class, by hand.
        let ce = ((log_sum_exp(&logits[0]) - 2.0) + (log_sum_exp(&logits[1]) + 1.0)) / 2.0;
        let contrastive = Tensor::new(3.0f64, &Device::Cpu)?;
        let loss = hybrid(&contrastive, &matrix(&logits), &labels, 0.5)?.to_scalar::<f64>()?;
        assert!((loss - (0.75 * 3.0 + 0.25 * ce)).abs() < 1e-12, "{loss}");
        assert_gradients_match_finite_differences(&[matrix(&logits)], &[0], |x| cross_entropy(&x[0], &labels));
        Ok(())
    }
}

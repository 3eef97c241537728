//! Max-margin contrastive loss. Shah, Sra, Chellappa, Cherian, "Max-Margin Contrastive
//! Learning", AAAI 2022.
//!
//! MMCL replaces InfoNCE's softmax by a margin: an anchor's positive must be closer to it than
//! each negative by `m`, and only the negatives inside the margin (MMCL's support vectors) push.
//! With cosines `s`, the positive centre's cosine `s⁺_a` and the active negatives
//! `V_a = {n : m − s⁺_a + s(a, n) > 0}`:
//!
//! ```text
//! ℓ_a = (1/max(1, |V_a|)) Σ_{n ∈ V_a} (m − s⁺_a + s(a, n)),   L = mean over the anchors
//! ```
//!
//! MMCL weighs its support vectors by solving an SVM per anchor; this is that SVM's hinge with
//! equal weights on the active negatives, which keeps the step closed-form. No temperature.

use candle_core::{bail, Result, Tensor, D};

use crate::train::pairs::Contrast;

/// The max-margin loss of `contrast` at `margin` (a cosine gap in (0, 2]).
pub fn hinge(contrast: &Contrast, margin: f64) -> Result<Tensor> {
    if !(margin > 0.0 && margin <= 2.0) {
        bail!("the hinge loss's margin is a cosine gap in (0, 2], got {margin}")
    }
    let scores = contrast.scores()?;
    let (positive, has_positive) = scores.positive_cosine()?;
    let violation = scores.cosines.broadcast_sub(&positive.unsqueeze(1)?)?.affine(1.0, margin)?;
    let active = (violation.gt(0.0)?.to_dtype(violation.dtype())? * scores.negatives()?)?.detach();
    let per_anchor = ((&violation * &active)?.sum(D::Minus1)? / active.sum(D::Minus1)?.maximum(1.0)?)?;
    (per_anchor * &has_positive)?.sum_all()?.div(&has_positive.sum_all()?.maximum(1.0)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::loss::testing::*;

    fn reference(z1: &[Vec<f64>], z2: &[Vec<f64>], margin: f64) -> f64 {
        let n = z1.len();
        let views: Vec<&Vec<f64>> = z1.iter().chain(z2).collect();
        let mut total = 0.0;
        for i in 0..2 * n {
            let positive = cosine(views[i], views[(i + n) % (2 * n)]);
            let active: Vec<f64> = (0..2 * n)
                .filter(|&k| k != i && k != (i + n) % (2 * n))
                .map(|k| margin - positive + cosine(views[i], views[k]))
                .filter(|&v| v > 0.0)
                .collect();
            total += active.iter().sum::<f64>() / active.len().max(1) as f64;
        }
        total / (2 * n) as f64
    }

    #[test]
    fn matches_the_definition() -> Result<()> {
        let (z1, z2) = two_view_example();
        // Margin 0.1 leaves some negatives outside it on this example, 2 none.
        for margin in [0.1, 0.5, 2.0] {
            let value = hinge(&in_batch(&z1, &z2), margin)?.to_scalar::<f64>()?;
            let expected = reference(&z1, &z2, margin);
            assert!((value - expected).abs() < 1e-12, "m {margin}: {value} vs {expected}");
        }
        Ok(())
    }

    #[test]
    fn separated_pairs_cost_nothing() -> Result<()> {
        // Positives identical, negatives orthogonal: every gap is 1 > m = 0.5.
        let one_hot = Tensor::eye(3, candle_core::DType::F64, &candle_core::Device::Cpu)?;
        assert_eq!(hinge(&pair(&one_hot, &one_hot), 0.5)?.to_scalar::<f64>()?, 0.0);
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences() {
        let (z1, z2) = two_view_example();
        assert_gradients_match_finite_differences(&[matrix(&z1), matrix(&z2)], &[0, 1], |x| {
            hinge(&pair(&x[0], &x[1]), 0.5)
        });
    }

    #[test]
    fn rejects_a_margin_out_of_range() {
        let (z1, z2) = two_view_example();
        let err = hinge(&in_batch(&z1, &z2), 0.0).unwrap_err().to_string();
        assert!(err.contains("margin"), "{err}");
    }
}

//! Debiased contrastive loss. Chuang, Robinson, Lin, Torralba, Jegelka, "Debiased Contrastive
//! Learning", NeurIPS 2020.
//!
//! In-batch negatives of an unlabelled batch include same-class samples with probability τ⁺
//! (the class prior). The loss corrects the negative sum for them. Over the 2N normalised views,
//! with `s(a, b) = a·b / τ`, `p(i)` the other view of view i and `Q = 2N − 2` negatives:
//!
//! ```text
//! Ng_i = max( (Σ_{k∉{i,p(i)}} e^{s(z_i,z_k)} − Q τ⁺ e^{s(z_i,z_p(i))}) / (1 − τ⁺),  Q e^{−1/τ} )
//! ℓ_i  = −log( e^{s(z_i,z_p(i))} / (e^{s(z_i,z_p(i))} + Ng_i) ),   L = (1/2N) Σ_i ℓ_i
//! ```
//!
//! The floor `Q e^{−1/τ}` is the smallest value the true negative sum can take (all cosines −1).
//! τ⁺ = 0 gives back NT-Xent.

use candle_core::{bail, Result, Tensor, D};

use super::common::expect_positive;
use crate::train::pairs::Contrast;

/// The debiased loss over any [`Contrast`] at `temperature` τ with class prior `class_prior` τ⁺ ∈
/// [0, 1); `Q` is each anchor's own count of negatives. Where an anchor has several or soft
/// positives, `e^{s⁺}` is their weighted mean. [`super::info_nce`] calls it for a contrast that
/// carries a class prior (the `debiased` pair strategy).
pub fn debiased_info_nce(contrast: &Contrast, temperature: f64, class_prior: f64) -> Result<Tensor> {
    expect_positive("temperature", temperature)?;
    if !(0.0..1.0).contains(&class_prior) {
        bail!("the debiased loss's class prior tau_plus is a probability in [0, 1), got {class_prior}")
    }
    let scores = contrast.scores()?;
    let negatives = scores.negatives()?;
    let negative_count = negatives.sum(D::Minus1)?;
    // Every term is scaled by e^{−1/τ} (cosines ≤ 1, so exponents ≤ 0): nothing overflows, and
    // the common factor cancels in the ratio.
    let shifted_logits = ((&scores.cosines - 1.0)? / temperature)?;
    let exp = shifted_logits.exp()?;
    let positive_total = scores.positives.sum(D::Minus1)?;
    let has_positive = positive_total.gt(0.0)?.to_dtype(exp.dtype())?;
    let positive_total = positive_total.maximum(1e-30)?;
    let positive_logit = ((&shifted_logits * &scores.positives)?.sum(D::Minus1)? / &positive_total)?;
    let positive_exp = ((&exp * &scores.positives)?.sum(D::Minus1)? / &positive_total)?;
    let negative_sum = (&exp * &negatives)?.sum(D::Minus1)?;
    let corrected =
        ((negative_sum - (&positive_exp * &negative_count)?.affine(class_prior, 0.0)?)? / (1.0 - class_prior))?;
    // Q e^{−1/τ}, scaled by e^{−1/τ}
    let floor = negative_count.affine((-2.0 / temperature).exp(), 0.0)?;
    let estimated_negatives = corrected.maximum(&floor)?;
    let per_anchor = (((positive_exp + estimated_negatives)?.log()? - positive_logit)? * &has_positive)?;
    per_anchor.sum_all()?.div(&has_positive.sum_all()?.maximum(1.0)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::loss::nt_xent;
    use crate::train::loss::testing::*;
    use candle_core::DType;

    /// Chuang et al.'s formula by loops, without the e^{−1/τ} rescaling.
    fn reference(z1: &[Vec<f64>], z2: &[Vec<f64>], temperature: f64, tau_plus: f64) -> f64 {
        let n = z1.len();
        let views: Vec<&Vec<f64>> = z1.iter().chain(z2).collect();
        let q = (2 * n - 2) as f64;
        let mut total = 0.0;
        for i in 0..2 * n {
            let p = (i + n) % (2 * n);
            let e = |k: usize| (cosine(views[i], views[k]) / temperature).exp();
            let negative_sum: f64 = (0..2 * n).filter(|&k| k != i && k != p).map(e).sum();
            let ng = ((negative_sum - q * tau_plus * e(p)) / (1.0 - tau_plus)).max(q * (-1.0 / temperature).exp());
            total += -(e(p) / (e(p) + ng)).ln();
        }
        total / (2 * n) as f64
    }

    #[test]
    fn matches_the_definition_with_and_without_the_floor() -> Result<()> {
        let (z1, z2) = two_view_example();
        // At τ 0.5 (checked by hand on this example) τ⁺ 0.05 keeps every anchor's corrected sum
        // above the floor, τ⁺ 0.1 floors 4 of the 6 anchors, τ⁺ 0.9 floors all of them.
        for (temperature, tau_plus) in [(0.5, 0.05), (0.5, 0.1), (0.5, 0.9), (0.1, 0.1)] {
            let value =
                debiased_info_nce(&pair(&matrix(&z1), &matrix(&z2)), temperature, tau_plus)?.to_scalar::<f64>()?;
            let expected = reference(&z1, &z2, temperature, tau_plus);
            assert!((value - expected).abs() < 1e-10, "τ {temperature} τ⁺ {tau_plus}: {value} vs {expected}");
        }
        let value32 =
            debiased_info_nce(&pair(&matrix(&z1).to_dtype(DType::F32)?, &matrix(&z2).to_dtype(DType::F32)?), 0.1, 0.1)?;
        assert!((value32.to_scalar::<f32>()? as f64 - reference(&z1, &z2, 0.1, 0.1)).abs() < 1e-4);
        Ok(())
    }

    #[test]
    fn zero_class_prior_is_nt_xent() -> Result<()> {
        let (z1, z2) = two_view_example();
        let (a, b) = (matrix(&z1), matrix(&z2));
        let debiased = debiased_info_nce(&pair(&a, &b), 0.2, 0.0)?.to_scalar::<f64>()?;
        let plain = nt_xent(&a, &b, 0.2)?.to_scalar::<f64>()?;
        assert!((debiased - plain).abs() < 1e-10);
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences() {
        let (z1, z2) = two_view_example();
        assert_gradients_match_finite_differences(&[matrix(&z1), matrix(&z2)], &[0, 1], |x| {
            debiased_info_nce(&pair(&x[0], &x[1]), 0.5, 0.05)
        });
        // Floored anchors: their negatives drop out of the gradient, the positive stays.
        assert_gradients_match_finite_differences(&[matrix(&z1), matrix(&z2)], &[0, 1], |x| {
            debiased_info_nce(&pair(&x[0], &x[1]), 0.5, 0.9)
        });
    }

    #[test]
    fn rejects_a_class_prior_of_one() {
        let (z1, z2) = two_view_example();
        let err = debiased_info_nce(&pair(&matrix(&z1), &matrix(&z2)), 0.5, 1.0).unwrap_err().to_string();
        assert!(err.contains("tau_plus"), "{err}");
    }
}

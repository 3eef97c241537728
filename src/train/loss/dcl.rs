//! Decoupled contrastive loss (DCL) and its weighted form (DCLW). Yeh, Hong, Hsu, Liu, Chen,
//! LeCun, "Decoupled Contrastive Learning", ECCV 2022.
//!
//! NT-Xent with the positive removed from the denominator, which removes the
//! negative-positive coupling that makes InfoNCE need large batches. With `p(i)` the other view
//! of view i and `s(a, b) = a·b / τ` over the 2N normalised views:
//!
//! ```text
//! ℓ_i = −w_i s(z_i, z_p(i)) + log Σ_{k∉{i, p(i)}} e^{s(z_i, z_k)},   L = (1/2N) Σ_i ℓ_i
//! ```
//!
//! DCL uses `w_i = 1`. DCLW weights easy positives down with a von Mises–Fisher weight over the
//! N pairs, `w_i = 2 − N · softmax_j(cos(z1_j, z2_j)/σ)_i` (σ 0.5), without gradient.

use candle_core::{Result, Tensor, D};

use super::common::{expect_positive, log_sum_exp_rows, MASKED_LOGIT};
use crate::train::pairs::Contrast;

/// DCL over `contrast` at `temperature`: InfoNCE whose denominators hold the negatives only;
/// mean over the anchors that have a positive.
pub fn dcl(contrast: &Contrast, temperature: f64) -> Result<Tensor> {
    decoupled(contrast, temperature, None)
}

/// DCLW: DCL whose positive terms carry the von Mises–Fisher weight at width `sigma` (0.5 in the
/// paper), `w_a = 2 − A · softmax_a(cos(a, a⁺)/σ)` over the A anchors (`a⁺` the positive
/// centre). With SimCLR's 2N anchors, whose two views share a cosine, it is the paper's softmax
/// over the N pairs.
pub fn dclw(contrast: &Contrast, temperature: f64, sigma: f64) -> Result<Tensor> {
    expect_positive("sigma", sigma)?;
    let scores = contrast.scores()?;
    let (cosine, _) = scores.positive_cosine()?;
    let softmax = candle_nn::ops::softmax(&(cosine.detach() / sigma)?, 0)?;
    let weight = softmax.affine(-(contrast.anchor_count() as f64), 2.0)?;
    decoupled(contrast, temperature, Some(&weight))
}

fn decoupled(contrast: &Contrast, temperature: f64, positive_weight: Option<&Tensor>) -> Result<Tensor> {
    expect_positive("temperature", temperature)?;
    let scores = contrast.scores()?;
    let logits = (&scores.cosines / temperature)?;
    let (mut positive_logit, has_positive) = scores.positive_cosine()?;
    positive_logit = (positive_logit / temperature)?;
    if let Some(weight) = positive_weight {
        positive_logit = (positive_logit * weight)?;
    }
    let left_out = (1.0 - scores.negatives()?)?;
    let negatives_only = (logits + (left_out * MASKED_LOGIT)?)?;
    let per_anchor = ((log_sum_exp_rows(&negatives_only)? - positive_logit)? * &has_positive)?;
    per_anchor.sum(D::Minus1)?.div(&has_positive.sum_all()?.maximum(1.0)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::loss::testing::*;
    use candle_core::{DType, Var};

    fn reference(z1: &[Vec<f64>], z2: &[Vec<f64>], temperature: f64, sigma: Option<f64>) -> f64 {
        let n = z1.len();
        let views: Vec<&Vec<f64>> = z1.iter().chain(z2).collect();
        let weights: Vec<f64> = match sigma {
            None => vec![1.0; n],
            Some(sigma) => {
                let e: Vec<f64> = (0..n).map(|i| (cosine(&z1[i], &z2[i]) / sigma).exp()).collect();
                let total: f64 = e.iter().sum();
                e.iter().map(|x| 2.0 - n as f64 * x / total).collect()
            }
        };
        let mut sum = 0.0;
        for i in 0..2 * n {
            let p = (i + n) % (2 * n);
            let s = |k: usize| cosine(views[i], views[k]) / temperature;
            let negatives: f64 = (0..2 * n).filter(|&k| k != i && k != p).map(|k| s(k).exp()).sum();
            sum += -weights[i % n] * s(p) + negatives.ln();
        }
        sum / (2 * n) as f64
    }

    #[test]
    fn matches_the_definition() -> Result<()> {
        let (z1, z2) = two_view_example();
        let dcl_value = dcl(&in_batch(&z1, &z2), 0.1)?.to_scalar::<f64>()?;
        assert!((dcl_value - reference(&z1, &z2, 0.1, None)).abs() < 1e-10);
        let dclw_value = dclw(&in_batch(&z1, &z2), 0.1, 0.5)?.to_scalar::<f64>()?;
        assert!((dclw_value - reference(&z1, &z2, 0.1, Some(0.5))).abs() < 1e-10);
        let f32_value = dcl(&pair(&matrix(&z1).to_dtype(DType::F32)?, &matrix(&z2).to_dtype(DType::F32)?), 0.1)?;
        assert!((f32_value.to_scalar::<f32>()? as f64 - reference(&z1, &z2, 0.1, None)).abs() < 1e-4);
        Ok(())
    }

    #[test]
    fn aligned_orthogonal_pairs_reach_the_analytic_value() -> Result<()> {
        // Positive cosine 1, 2N − 2 negatives of cosine 0: ℓ = −1/τ + log(2N − 2).
        let one_hot = Tensor::eye(3, DType::F64, &candle_core::Device::Cpu)?;
        let value = dcl(&pair(&one_hot, &one_hot), 0.5)?.to_scalar::<f64>()?;
        assert!((value - (-2.0 + 4f64.ln())).abs() < 1e-12);
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences() {
        let (z1, z2) = two_view_example();
        let inputs = [matrix(&z1), matrix(&z2)];
        assert_gradients_match_finite_differences(&inputs, &[0, 1], |x| dcl(&pair(&x[0], &x[1]), 0.2));
    }

    #[test]
    fn dclw_weight_carries_no_gradient() -> Result<()> {
        // With the weights frozen, DCLW's gradient equals that of decoupled() given those weights
        // as constants.
        let (z1, z2) = two_view_example();
        let (a, b) = (matrix(&z1), matrix(&z2));
        let e: Vec<f64> = (0..3).map(|i| (cosine(&z1[i], &z2[i]) / 0.5).exp()).collect();
        let total: f64 = e.iter().sum();
        let w: Vec<f64> = (0..6).map(|i| 2.0 - 3.0 * e[i % 3] / total).collect();
        let weight = Tensor::new(w.as_slice(), a.device())?;
        assert_gradients_match_finite_differences(&[a.clone(), b.clone()], &[0, 1], |x| {
            decoupled(&pair(&x[0], &x[1]), 0.2, Some(&weight))
        });
        let (va, vb) = (Var::from_tensor(&a)?, Var::from_tensor(&b)?);
        let dclw_grad = dclw(&pair(va.as_tensor(), vb.as_tensor()), 0.2, 0.5)?.backward()?;
        let frozen_grad = decoupled(&pair(va.as_tensor(), vb.as_tensor()), 0.2, Some(&weight))?.backward()?;
        let difference = (dclw_grad.get(va.as_tensor()).unwrap() - frozen_grad.get(va.as_tensor()).unwrap())?
            .abs()?
            .sum_all()?
            .to_scalar::<f64>()?;
        assert!(difference < 1e-12, "{difference}");
        Ok(())
    }
}

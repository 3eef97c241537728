//! Parametric contrastive loss, PaCo. Cui, Zhong, Liu, Yu & Jia, "Parametric Contrastive
//! Learning", ICCV 2021.
//!
//! SupCon on a long-tailed set pulls head classes hardest (an anchor has as many positives as its
//! class has views in the batch). PaCo adds a set of learnable class centres — a linear
//! classifier on the encoder's features whose logits `w_c·h_i` enter every anchor's softmax —
//! and down-weights the sample positives by `α`, so the centre (weight `β`) dominates each
//! anchor's pull whatever its class's size:
//!
//! ```text
//! ℓ_i = −Σ_{p ∈ P(i) ∪ {c_{y_i}}} w_p log( e^{s_ip} / ( Σ_c e^{w_c·h_i} + Σ_{a≠i} e^{z_i·z_a/τ} ) ) / Σ_p w_p
//! ```
//!
//! with `s_ip = z_i·z_p/τ` (normalised projections) for a sample and `w_c·h_i` for a centre,
//! `w_p = α` for samples of the anchor's class and `β` for its centre. Paper defaults: α = 0.05
//! on ImageNet-LT (0.02 on CIFAR), β = 1, τ = 0.2. The balanced-softmax prior the paper adds to
//! the centre logits serves its classifier, which nobody serves here (the embedding is the
//! encoder's output), and is left out.

use candle_core::{bail, Result, Tensor};

use super::common::{expect_float_matrix, expect_positive, l2_normalize, one_hot, weighted_positive_log_likelihood};
use super::supcon::off_diagonal;
use crate::train::pairs::label_positive_mask;

/// PaCo of `features` `[M, D]` (normalised here) with the class logits `[M, C]` of the same rows
/// and `labels` `[M]`; `alpha` weighs the sample positives and `beta` the class centre.
pub fn paco(
    features: &Tensor,
    class_logits: &Tensor,
    labels: &Tensor,
    temperature: f64,
    alpha: f64,
    beta: f64,
) -> Result<Tensor> {
    let (views, _) = expect_float_matrix("features", features)?;
    let (rows, classes) = expect_float_matrix("class logits", class_logits)?;
    if rows != views || labels.dims() != [views] {
        bail!("features, class logits and labels need one row each, got {views}, {rows} and {:?}", labels.dims())
    }
    expect_positive("temperature", temperature)?;
    if !(alpha >= 0.0 && beta > 0.0 && alpha.is_finite() && beta.is_finite()) {
        bail!("PaCo's weights must be alpha >= 0 and beta > 0, got {alpha} and {beta}")
    }
    let z = l2_normalize(features)?;
    let logits = Tensor::cat(&[class_logits.to_dtype(z.dtype())?, (z.matmul(&z.t()?)? / temperature)?], 1)?;
    let positives = Tensor::cat(
        &[(one_hot(labels, classes, z.dtype())? * beta)?, (label_positive_mask(labels)?.to_dtype(z.dtype())? * alpha)?],
        1,
    )?;
    let denominator = Tensor::cat(
        &[
            Tensor::ones((views, classes), z.dtype(), z.device())?,
            off_diagonal(views, z.device())?.to_dtype(z.dtype())?,
        ],
        1,
    )?;
    weighted_positive_log_likelihood(&logits, &positives, &denominator)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::loss::supcon;
    use crate::train::loss::testing::*;
    use candle_core::Device;

    /// The paper's formula written out per anchor.
    fn reference(features: &[Vec<f64>], logits: &[Vec<f64>], labels: &[u32], t: f64, alpha: f64, beta: f64) -> f64 {
        let m = features.len();
        let s = |i: usize, j: usize| cosine(&features[i], &features[j]) / t;
        let mut total = 0.0;
        for i in 0..m {
            let mut terms: Vec<f64> = logits[i].clone();
            terms.extend((0..m).filter(|&a| a != i).map(|a| s(i, a)));
            let log_denominator = log_sum_exp(&terms);
            let mut weighted = beta * (logits[i][labels[i] as usize] - log_denominator);
            let mut weights = beta;
            for p in (0..m).filter(|&p| p != i && labels[p] == labels[i]) {
                weighted += alpha * (s(i, p) - log_denominator);
                weights += alpha;
            }
            total -= weighted / weights;
        }
        total / m as f64
    }

    fn example() -> (Vec<Vec<f64>>, Vec<Vec<f64>>, [u32; 5]) {
        let features = six_features()[..5].to_vec();
        let logits = vec![vec![0.3, -1.2], vec![2.0, 0.1], vec![-0.4, 0.5], vec![1.1, 1.0], vec![0.0, -0.7]];
        (features, logits, [0, 1, 0, 0, 1])
    }

    #[test]
    fn matches_the_paper_and_its_gradient() -> Result<()> {
        let (features, logits, labels) = example();
        let (z, l, y) = (matrix(&features), matrix(&logits), Tensor::new(&labels, &Device::Cpu)?);
        for (alpha, beta) in [(0.05, 1.0), (1.0, 0.5)] {
            let loss = paco(&z, &l, &y, 0.2, alpha, beta)?.to_scalar::<f64>()?;
            let expected = reference(&features, &logits, &labels, 0.2, alpha, beta);
            assert!((loss - expected).abs() < 1e-10, "α {alpha}, β {beta}: {loss} vs {expected}");
        }
        assert_gradients_match_finite_differences(&[z, l], &[0, 1], |x| paco(&x[0], &x[1], &y, 0.2, 0.05, 1.0));
        Ok(())
    }

    #[test]
    fn centres_out_of_reach_leave_supcon() -> Result<()> {
        // Class logits far below every similarity add nothing to the denominator; with β tiny the
        // centre's own term vanishes too, and what is left is SupCon.
        let (features, _, labels) = example();
        let (z, y) = (matrix(&features), Tensor::new(&labels, &Device::Cpu)?);
        let far = Tensor::full(-1e4f64, (5, 2), &Device::Cpu)?;
        let loss = paco(&z, &far, &y, 0.2, 1.0, 1e-12)?.to_scalar::<f64>()?;
        let expected = supcon(&z, &y, 0.2)?.to_scalar::<f64>()?;
        assert!((loss - expected).abs() < 1e-6, "{loss} vs {expected}");
        Ok(())
    }
}

//! SwAV's swapped prediction with Sinkhorn–Knopp codes. Caron, Misra, Mairal, Goyal, Bojanowski,
//! Joulin, "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments",
//! NeurIPS 2020.
//!
//! Scores `S = z Cᵀ` (`[B, K]`) compare normalised projections with K normalised prototypes. The
//! codes solve an entropy-regularised equipartition problem by Sinkhorn–Knopp, without gradient:
//!
//! ```text
//! Q = exp(Sᵀ/ε) ([K, B]);  repeat: rows ← rows / (K · row sum);  columns ← columns / (B · column sum)
//! codes = (B · Q)ᵀ          each sample's code sums to 1, each prototype receives B/K in total
//! ```
//!
//! Each view then predicts the other view's code from its own scores (ε 0.05, 3 iterations, τ 0.1):
//!
//! ```text
//! L = −½ mean_b Σ_k [ q_a log softmax(s_b/τ) + q_b log softmax(s_a/τ) ]
//! ```

use candle_core::{bail, Result, Tensor, D};

use super::common::{expect_float_matrix, expect_positive, expect_same_shape, log_sum_exp_rows};

/// SwAV's codes for `scores` `[B, K]` (prototype scores of one view): `iterations` rounds of
/// Sinkhorn–Knopp at regularisation `epsilon`. Returns `[B, K]`, non-negative, each row summing to
/// 1. The input is detached: codes are targets.
pub fn sinkhorn_knopp(scores: &Tensor, epsilon: f64, iterations: usize) -> Result<Tensor> {
    let (batch, prototypes) = expect_float_matrix("scores", scores)?;
    expect_positive("epsilon", epsilon)?;
    if iterations == 0 {
        bail!("sinkhorn_knopp needs at least one iteration to produce codes that sum to 1")
    }
    let scores = scores.detach();
    // Subtracting the global max rescales Q by a constant, which the normalisation removes; it
    // keeps exp() from overflowing at ε = 0.05.
    let shifted = scores.broadcast_sub(&scores.max_keepdim(0)?.max_keepdim(1)?)?;
    let mut q = (shifted / epsilon)?.exp()?.t()?;
    q = q.broadcast_div(&q.sum_all()?)?;
    for _ in 0..iterations {
        q = (q.broadcast_div(&q.sum_keepdim(1)?)? / prototypes as f64)?;
        q = (q.broadcast_div(&q.sum_keepdim(0)?)? / batch as f64)?;
    }
    (q * batch as f64)?.t()?.contiguous()
}

/// SwAV's swapped prediction: view a's `scores_a` `[B, K]` predict view b's codes `codes_b` and vice
/// versa, at `temperature` τ. The codes are detached here.
pub fn swapped_prediction(
    scores_a: &Tensor,
    scores_b: &Tensor,
    codes_a: &Tensor,
    codes_b: &Tensor,
    temperature: f64,
) -> Result<Tensor> {
    expect_float_matrix("scores_a", scores_a)?;
    expect_same_shape("scores_a", scores_a, "scores_b", scores_b)?;
    expect_same_shape("scores_a", scores_a, "codes_a", codes_a)?;
    expect_same_shape("scores_a", scores_a, "codes_b", codes_b)?;
    expect_positive("temperature", temperature)?;
    let a_predicts_b = cross_entropy_with_soft_targets(&codes_b.detach(), scores_a, temperature)?;
    let b_predicts_a = cross_entropy_with_soft_targets(&codes_a.detach(), scores_b, temperature)?;
    ((a_predicts_b + b_predicts_a)? * 0.5)?.mean_all()
}

/// Per-sample `−Σ_k targets_k log softmax(scores/τ)_k`, shape `[B]`.
fn cross_entropy_with_soft_targets(targets: &Tensor, scores: &Tensor, temperature: f64) -> Result<Tensor> {
    let logits = (scores / temperature)?;
    let log_probabilities = logits.broadcast_sub(&log_sum_exp_rows(&logits)?.unsqueeze(1)?)?;
    (targets * log_probabilities)?.sum(D::Minus1)?.neg()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::loss::testing::*;
    use candle_core::{DType, Device, Var};

    /// Sinkhorn–Knopp by loops over a `[B][K]` table, written straight from the SwAV paper.
    #[allow(clippy::needless_range_loop)] // indices mirror the formula
    fn reference_codes(scores: &[Vec<f64>], epsilon: f64, iterations: usize) -> Vec<Vec<f64>> {
        let (b, k) = (scores.len(), scores[0].len());
        let mut q: Vec<Vec<f64>> = scores.iter().map(|row| row.iter().map(|s| (s / epsilon).exp()).collect()).collect();
        let total: f64 = q.iter().flatten().sum();
        q.iter_mut().flatten().for_each(|v| *v /= total);
        for _ in 0..iterations {
            for prototype in 0..k {
                let sum: f64 = (0..b).map(|i| q[i][prototype]).sum();
                (0..b).for_each(|i| q[i][prototype] /= sum * k as f64);
            }
            for row in q.iter_mut() {
                let sum: f64 = row.iter().sum();
                row.iter_mut().for_each(|v| *v /= sum * b as f64);
            }
        }
        q.iter().map(|row| row.iter().map(|v| v * b as f64).collect()).collect()
    }

    fn scores() -> Vec<Vec<f64>> {
        vec![
            vec![0.9, 0.1, -0.3, 0.2],
            vec![0.8, 0.3, -0.1, 0.0],
            vec![-0.2, 0.7, 0.4, -0.5],
            vec![0.1, -0.4, 0.95, 0.3],
            vec![0.5, 0.5, -0.6, 0.6],
            vec![0.85, -0.1, 0.2, 0.1],
        ]
    }

    #[test]
    fn codes_match_the_reference_loops() -> Result<()> {
        let s = scores();
        for (epsilon, iterations) in [(0.05, 3), (0.5, 1), (1.0, 10)] {
            let codes = sinkhorn_knopp(&matrix(&s), epsilon, iterations)?.to_vec2::<f64>()?;
            let expected = reference_codes(&s, epsilon, iterations);
            for (row, expected_row) in codes.iter().zip(&expected) {
                for (v, e) in row.iter().zip(expected_row) {
                    assert!((v - e).abs() < 1e-10, "ε {epsilon}: {v} vs {e}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn codes_are_distributions_with_equal_prototype_mass() -> Result<()> {
        let (b, k) = (6, 4);
        let tensor_scores = matrix(&scores()).to_dtype(DType::F32)?;
        // Rows are exact after any number of iterations (the column step comes last); the
        // prototypes' equal share of B/K is only reached as the iterations converge.
        for iterations in [1, 3, 500] {
            let codes = sinkhorn_knopp(&tensor_scores, 0.05, iterations)?.to_vec2::<f32>()?;
            for row in &codes {
                assert!(row.iter().all(|&v| v >= 0.0));
                assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            }
            if iterations == 500 {
                for prototype in 0..k {
                    let mass: f32 = codes.iter().map(|row| row[prototype]).sum();
                    let target = b as f32 / k as f32;
                    assert!((mass - target).abs() < 1e-3, "prototype {prototype}: {mass} vs {target}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn large_scores_stay_finite() -> Result<()> {
        // exp(1/0.05) alone is fine, but a score of 100 at ε 0.05 would overflow without the shift.
        let s = matrix(&[vec![100.0, 0.0], vec![0.0, 100.0]]).to_dtype(DType::F32)?;
        let codes = sinkhorn_knopp(&s, 0.05, 3)?.to_vec2::<f32>()?;
        assert!(codes.iter().flatten().all(|v| v.is_finite()));
        Ok(())
    }

    #[test]
    fn codes_carry_no_gradient() -> Result<()> {
        let s = Var::from_tensor(&matrix(&scores()))?;
        let grads = sinkhorn_knopp(s.as_tensor(), 0.05, 3)?.sqr()?.sum_all()?.backward()?;
        assert!(grads.get(s.as_tensor()).is_none());
        Ok(())
    }

    fn reference_swapped(sa: &[Vec<f64>], sb: &[Vec<f64>], qa: &[Vec<f64>], qb: &[Vec<f64>], t: f64) -> f64 {
        let log_softmax = |row: &[f64], j: usize| {
            let scaled: Vec<f64> = row.iter().map(|s| s / t).collect();
            scaled[j] - log_sum_exp(&scaled)
        };
        let mut total = 0.0;
        for i in 0..sa.len() {
            for k in 0..sa[0].len() {
                total += qa[i][k] * log_softmax(&sb[i], k) + qb[i][k] * log_softmax(&sa[i], k);
            }
        }
        -0.5 * total / sa.len() as f64
    }

    fn two_views() -> Vec<Vec<Vec<f64>>> {
        let sa = vec![vec![0.9, 0.1, -0.3], vec![-0.2, 0.7, 0.4]];
        let sb = vec![vec![0.6, 0.3, -0.1], vec![0.1, 0.8, 0.2]];
        let qa = vec![vec![0.7, 0.2, 0.1], vec![0.1, 0.6, 0.3]];
        let qb = vec![vec![0.5, 0.4, 0.1], vec![0.2, 0.2, 0.6]];
        vec![sa, sb, qa, qb]
    }

    #[test]
    fn swapped_prediction_matches_the_definition() -> Result<()> {
        let v = two_views();
        let t: Vec<Tensor> = v.iter().map(|m| matrix(m)).collect();
        let loss = swapped_prediction(&t[0], &t[1], &t[2], &t[3], 0.1)?.to_scalar::<f64>()?;
        let expected = reference_swapped(&v[0], &v[1], &v[2], &v[3], 0.1);
        assert!((loss - expected).abs() < 1e-10, "{loss} vs {expected}");
        Ok(())
    }

    #[test]
    fn swapped_prediction_gradients_match_and_stop_at_the_codes() -> Result<()> {
        let t: Vec<Tensor> = two_views().iter().map(|m| matrix(m)).collect();
        assert_gradients_match_finite_differences(&t, &[0, 1], |x| swapped_prediction(&x[0], &x[1], &x[2], &x[3], 0.2));
        let vars: Vec<Var> = t.iter().map(|m| Var::from_tensor(m).unwrap()).collect();
        let v: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
        let grads = swapped_prediction(v[0], v[1], v[2], v[3], 0.2)?.backward()?;
        assert!(grads.get(v[0]).is_some() && grads.get(v[1]).is_some());
        assert!(grads.get(v[2]).is_none() && grads.get(v[3]).is_none());
        Ok(())
    }

    #[test]
    fn rejects_zero_iterations() {
        let s = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        assert!(sinkhorn_knopp(&s, 0.05, 0).unwrap_err().to_string().contains("iteration"));
    }
}

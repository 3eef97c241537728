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
//!
//! With multi-crop (§3.2), V views of which the first G (the global crops) compute codes, every
//! other view predicts each of those codes (the reference code's `main_swav.py`):
//!
//! ```text
//! L = −1/G Σ_{i<G} 1/(V−1) Σ_{v≠i} mean_b Σ_k q_i log softmax(s_v/τ)
//! ```
//!
//! which is the two-view formula above when V = G = 2.

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

/// SwAV's swapped prediction over V views' `scores` (each `[B, K]`): `codes[i]` is view i's code
/// (the first G ≤ V views compute codes, G ≥ 1, V ≥ 2), and every other view predicts it at
/// `temperature` τ. The codes are detached here.
pub fn swapped_prediction(scores: &[Tensor], codes: &[Tensor], temperature: f64) -> Result<Tensor> {
    let (Some(first), true) = (scores.first(), scores.len() >= 2) else {
        bail!("swapped_prediction needs at least two views, got {}", scores.len())
    };
    if codes.is_empty() || codes.len() > scores.len() {
        bail!("swapped_prediction needs codes for 1 to {} views, got {}", scores.len(), codes.len())
    }
    expect_float_matrix("scores[0]", first)?;
    for (i, tensor) in scores.iter().enumerate().skip(1) {
        expect_same_shape("scores[0]", first, &format!("scores[{i}]"), tensor)?;
    }
    for (i, tensor) in codes.iter().enumerate() {
        expect_same_shape("scores[0]", first, &format!("codes[{i}]"), tensor)?;
    }
    expect_positive("temperature", temperature)?;
    let mut terms = Vec::with_capacity(codes.len() * (scores.len() - 1));
    for (i, code) in codes.iter().enumerate() {
        let code = code.detach();
        for (_, view_scores) in scores.iter().enumerate().filter(|(v, _)| *v != i) {
            terms.push(cross_entropy_with_soft_targets(&code, view_scores, temperature)?.mean_all()?);
        }
    }
    let count = terms.len() as f64;
    Tensor::stack(&terms, 0)?.sum_all()? / count
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
        let loss = swapped_prediction(&t[..2], &t[2..], 0.1)?.to_scalar::<f64>()?;
        let expected = reference_swapped(&v[0], &v[1], &v[2], &v[3], 0.1);
        assert!((loss - expected).abs() < 1e-10, "{loss} vs {expected}");
        Ok(())
    }

    /// Multi-crop's loss as the reference code (`main_swav.py`) loops over it: for each view that
    /// computes a code, minus the mean over samples of every other view's cross-entropy against
    /// it, divided by V − 1; then the mean over the code views.
    fn reference_multi_crop(scores: &[Table], codes: &[Table], t: f64) -> f64 {
        let views = scores.len();
        let mut loss = 0.0;
        for (i, q) in codes.iter().enumerate() {
            let mut subloss = 0.0;
            for (_, s) in scores.iter().enumerate().filter(|(v, _)| *v != i) {
                let mut total = 0.0;
                for (row, q_row) in s.iter().zip(q) {
                    let scaled: Vec<f64> = row.iter().map(|x| x / t).collect();
                    let normaliser = log_sum_exp(&scaled);
                    total += q_row.iter().zip(&scaled).map(|(q, x)| q * (x - normaliser)).sum::<f64>();
                }
                subloss -= total / s.len() as f64;
            }
            loss += subloss / (views - 1) as f64;
        }
        loss / codes.len() as f64
    }

    /// One view's `[B][K]` scores or codes.
    type Table = Vec<Vec<f64>>;

    /// Two global views with codes and two local crops without: 2 × 3 prediction terms.
    fn multi_crop_views() -> (Vec<Table>, Vec<Table>) {
        let v = two_views();
        let local_a = vec![vec![0.2, -0.5, 0.9], vec![0.4, 0.4, -0.3]];
        let local_b = vec![vec![-0.7, 0.2, 0.1], vec![0.3, -0.2, 0.8]];
        (vec![v[0].clone(), v[1].clone(), local_a, local_b], vec![v[2].clone(), v[3].clone()])
    }

    #[test]
    fn multi_crop_matches_the_reference_loops() -> Result<()> {
        let (scores, codes) = multi_crop_views();
        let s: Vec<Tensor> = scores.iter().map(|m| matrix(m)).collect();
        let q: Vec<Tensor> = codes.iter().map(|m| matrix(m)).collect();
        for temperature in [0.1, 0.5] {
            let loss = swapped_prediction(&s, &q, temperature)?.to_scalar::<f64>()?;
            let expected = reference_multi_crop(&scores, &codes, temperature);
            assert!((loss - expected).abs() < 1e-10, "τ {temperature}: {loss} vs {expected}");
        }
        // The reference loops are the two-view formula when there are two views.
        let two = reference_multi_crop(&scores[..2], &codes, 0.1);
        let v = two_views();
        assert!((two - reference_swapped(&v[0], &v[1], &v[2], &v[3], 0.1)).abs() < 1e-12);
        Ok(())
    }

    #[test]
    fn swapped_prediction_gradients_match_and_stop_at_the_codes() -> Result<()> {
        let (scores, codes) = multi_crop_views();
        let t: Vec<Tensor> = scores.iter().chain(&codes).map(|m| matrix(m)).collect();
        assert_gradients_match_finite_differences(&t, &[0, 1, 2, 3], |x| swapped_prediction(&x[..4], &x[4..], 0.2));
        let vars: Vec<Var> = t.iter().map(|m| Var::from_tensor(m).unwrap()).collect();
        let v: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let grads = swapped_prediction(&v[..4], &v[4..], 0.2)?.backward()?;
        assert!(v[..4].iter().all(|s| grads.get(s).is_some()));
        assert!(v[4..].iter().all(|q| grads.get(q).is_none()));
        Ok(())
    }

    #[test]
    fn refuses_one_view_and_codes_of_views_that_do_not_exist() {
        let s = Tensor::zeros((2, 3), DType::F64, &Device::Cpu).unwrap();
        let one = swapped_prediction(std::slice::from_ref(&s), std::slice::from_ref(&s), 0.1).unwrap_err();
        assert!(one.to_string().contains("at least two views"), "{one}");
        let views = [s.clone(), s.clone()];
        let too_many = swapped_prediction(&views, &[s.clone(), s.clone(), s.clone()], 0.1).unwrap_err();
        assert!(too_many.to_string().contains("codes for 1 to 2 views"), "{too_many}");
        let other = Tensor::zeros((2, 4), DType::F64, &Device::Cpu).unwrap();
        let mismatch = swapped_prediction(&[s.clone(), other], &[s], 0.1).unwrap_err();
        assert!(mismatch.to_string().contains("same shape"), "{mismatch}");
    }

    #[test]
    fn rejects_zero_iterations() {
        let s = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        assert!(sinkhorn_knopp(&s, 0.05, 0).unwrap_err().to_string().contains("iteration"));
    }
}

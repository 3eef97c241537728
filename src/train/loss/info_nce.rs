//! MoCo's InfoNCE with a queue of negatives. He, Fan, Wu, Xie, Girshick, "Momentum Contrast for
//! Unsupervised Visual Representation Learning", CVPR 2020.
//!
//! With the normalised query `q` (online encoder), its key `k⁺` (momentum encoder, no gradient)
//! and the K queued keys `k_j` (negatives from earlier batches):
//!
//! ```text
//! ℓ = −log( e^{q·k⁺/τ} / (e^{q·k⁺/τ} + Σ_{j=1..K} e^{q·k_j/τ}) ),   L = mean over the N queries
//! ```
//!
//! [`info_nce_in_batch`] is the MoCo v3 form (Chen, Xie, He, ICCV 2021): the other queries' keys
//! of the same batch are the negatives, `ℓ_i = −log( e^{q_i·k_i/τ} / Σ_j e^{q_i·k_j/τ} )`.

use candle_core::{bail, Result, Tensor};

use super::common::{expect_float_matrix, expect_positive, expect_same_shape, weighted_positive_log_likelihood};
use crate::train::pairs::Contrast;

/// InfoNCE over any [`Contrast`], with `s = cos / τ`, positive weights `P` and denominator
/// weights `W` (the form SimCLR, MoCo and every pair strategy share):
///
/// ```text
/// ℓ_a = −Σ_c P_ac ( s_ac − log Σ_j W_aj e^{s_aj} ) / Σ_c P_ac,   L = mean over the anchors
/// ```
///
/// With one-hot positives this is `−log(e^{s⁺} / Σ_j e^{s_j})`. When the contrast carries a class
/// prior (the `debiased` strategy) the negative sum is Chuang et al.'s estimate instead
/// ([`super::debiased::debiased_info_nce`]).
pub fn info_nce(contrast: &Contrast, temperature: f64) -> Result<Tensor> {
    expect_positive("temperature", temperature)?;
    if let Some(prior) = contrast.class_prior {
        return super::debiased::debiased_info_nce(contrast, temperature, prior);
    }
    let scores = contrast.scores()?;
    weighted_positive_log_likelihood(&(scores.cosines / temperature)?, &scores.positives, &scores.denominator)
}

/// MoCo's InfoNCE: queries `q` `[N, D]` (normalised here, gradient flows), keys `k` `[N, D]`
/// (normalised and detached here), `queue` `[K, D]` of already-normalised negatives (detached here).
pub fn info_nce_with_queue(q: &Tensor, k: &Tensor, queue: &Tensor, temperature: f64) -> Result<Tensor> {
    info_nce(&Contrast::with_queue(q, k, queue)?, temperature)
}

/// [`info_nce_with_queue`] with only the queue keys that `selected` (`[N, K]`, 1 or 0 per query
/// and key) marks as negatives of each query: HCSC's instance selection leaves out keys that
/// likely share the query's cluster.
pub fn info_nce_with_selected_queue(
    q: &Tensor,
    k: &Tensor,
    queue: &Tensor,
    selected: &Tensor,
    temperature: f64,
) -> Result<Tensor> {
    let mut contrast = Contrast::with_queue(q, k, queue)?;
    let (rows, keys) = (contrast.anchor_count(), queue.dims()[0]);
    if selected.dims() != [rows, keys] {
        bail!("a [{rows}, {keys}] selection expected, got {:?}", selected.dims())
    }
    let own_key = contrast.denominator.narrow(1, 0, rows)?;
    contrast.denominator = Tensor::cat(&[&own_key, &selected.to_dtype(own_key.dtype())?], 1)?;
    info_nce(&contrast, temperature)
}

/// In-batch InfoNCE (MoCo v3): query i's positive is key i, the other N − 1 keys are its
/// negatives. `q` `[N, D]` normalised here with gradient, `k` `[N, D]` normalised and detached here
/// (momentum-encoder keys). MoCo v3 symmetrises over the two views and scales by 2τ; the method
/// does that.
pub fn info_nce_in_batch(q: &Tensor, k: &Tensor, temperature: f64) -> Result<Tensor> {
    let (batch, _) = expect_float_matrix("q", q)?;
    expect_same_shape("q", q, "k", k)?;
    let anchors = super::l2_normalize(q)?;
    let keys = super::l2_normalize(&k.detach())?;
    let own_key = Tensor::eye(batch, anchors.dtype(), anchors.device())?;
    let all = own_key.ones_like()?;
    info_nce(&Contrast::new(anchors, keys, own_key, all), temperature)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::loss::testing::*;
    use crate::train::pairs::Denominator;
    use candle_core::{DType, Var};

    fn reference_queue(q: &[Vec<f64>], k: &[Vec<f64>], queue: &[Vec<f64>], temperature: f64) -> f64 {
        let mut total = 0.0;
        for (qi, ki) in q.iter().zip(k) {
            let positive = (cosine(qi, ki) / temperature).exp();
            // The queue is already normalised: a plain dot product with the unit query.
            let negatives: f64 = queue.iter().map(|kj| (dot(&normalize(qi), kj) / temperature).exp()).sum();
            total += -(positive / (positive + negatives)).ln();
        }
        total / q.len() as f64
    }

    fn reference_in_batch(q: &[Vec<f64>], k: &[Vec<f64>], temperature: f64) -> f64 {
        let mut total = 0.0;
        for (i, qi) in q.iter().enumerate() {
            let all: f64 = k.iter().map(|kj| (cosine(qi, kj) / temperature).exp()).sum();
            total += -((cosine(qi, &k[i]) / temperature).exp() / all).ln();
        }
        total / q.len() as f64
    }

    fn example() -> (Rows, Rows, Rows) {
        let q = vec![vec![1.0, 0.3, -0.2], vec![-0.4, 0.9, 0.5]];
        let k = vec![vec![0.8, 0.5, 0.1], vec![-0.1, 1.2, 0.2]];
        let queue = [vec![1.0, 1.0, 0.0], vec![0.0, -1.0, 2.0], vec![-3.0, 0.5, 0.5], vec![0.2, 0.2, -1.0]]
            .iter()
            .map(|v| normalize(v))
            .collect();
        (q, k, queue)
    }

    #[test]
    fn queue_loss_matches_the_definition() -> Result<()> {
        let (q, k, queue) = example();
        for temperature in [0.07, 0.2, 1.0] {
            let loss = info_nce_with_queue(&matrix(&q), &matrix(&k), &matrix(&queue), temperature)?;
            let expected = reference_queue(&q, &k, &queue, temperature);
            assert!((loss.to_scalar::<f64>()? - expected).abs() < 1e-10);
        }
        let loss32 = info_nce_with_queue(
            &matrix(&q).to_dtype(DType::F32)?,
            &matrix(&k).to_dtype(DType::F32)?,
            &matrix(&queue).to_dtype(DType::F32)?,
            0.2,
        )?;
        assert!((loss32.to_scalar::<f32>()? as f64 - reference_queue(&q, &k, &queue, 0.2)).abs() < 1e-5);
        Ok(())
    }

    #[test]
    fn a_selection_leaves_the_unselected_keys_out_of_the_denominator() -> Result<()> {
        let (q, k, queue) = example();
        let (qt, kt) = (matrix(&q), matrix(&k));
        let all = Tensor::ones((q.len(), queue.len()), DType::F64, qt.device())?;
        let full = info_nce_with_queue(&qt, &kt, &matrix(&queue), 0.2)?.to_scalar::<f64>()?;
        let selected = info_nce_with_selected_queue(&qt, &kt, &matrix(&queue), &all, 0.2)?.to_scalar::<f64>()?;
        assert!((full - selected).abs() < 1e-12, "selecting every key is MoCo's loss");
        // Dropping the last key for every query is a queue without it.
        let mut without_last = vec![1.0; queue.len()];
        *without_last.last_mut().unwrap() = 0.0;
        let mask = Tensor::new(vec![without_last; q.len()], qt.device())?;
        let shorter = info_nce_with_queue(&qt, &kt, &matrix(&queue[..queue.len() - 1]), 0.2)?.to_scalar::<f64>()?;
        let masked = info_nce_with_selected_queue(&qt, &kt, &matrix(&queue), &mask, 0.2)?.to_scalar::<f64>()?;
        assert!((shorter - masked).abs() < 1e-12, "{shorter} vs {masked}");
        Ok(())
    }

    #[test]
    fn in_batch_loss_matches_the_definition() -> Result<()> {
        let (q, k, _) = example();
        let loss = info_nce_in_batch(&matrix(&q), &matrix(&k), 0.2)?.to_scalar::<f64>()?;
        assert!((loss - reference_in_batch(&q, &k, 0.2)).abs() < 1e-10);
        Ok(())
    }

    #[test]
    fn query_gradients_match_finite_differences() {
        let (q, k, queue) = example();
        let inputs = [matrix(&q), matrix(&k), matrix(&queue)];
        assert_gradients_match_finite_differences(&inputs, &[0], |x| info_nce_with_queue(&x[0], &x[1], &x[2], 0.2));
        assert_gradients_match_finite_differences(&inputs, &[0], |x| info_nce_in_batch(&x[0], &x[1], 0.2));
    }

    #[test]
    fn keys_and_queue_receive_no_gradient() -> Result<()> {
        let (q, k, queue) = example();
        let (q, k, queue) =
            (Var::from_tensor(&matrix(&q))?, Var::from_tensor(&matrix(&k))?, Var::from_tensor(&matrix(&queue))?);
        let grads = info_nce_with_queue(q.as_tensor(), k.as_tensor(), queue.as_tensor(), 0.2)?.backward()?;
        assert!(grads.get(q.as_tensor()).is_some());
        assert!(grads.get(k.as_tensor()).is_none());
        assert!(grads.get(queue.as_tensor()).is_none());
        let grads = info_nce_in_batch(q.as_tensor(), k.as_tensor(), 0.2)?.backward()?;
        assert!(grads.get(k.as_tensor()).is_none());
        Ok(())
    }

    #[test]
    fn rejects_a_queue_of_another_dimension() {
        let (q, k, _) = example();
        let queue = matrix(&[vec![1.0, 0.0]]);
        let err = info_nce_with_queue(&matrix(&q), &matrix(&k), &queue, 0.2).unwrap_err().to_string();
        assert!(err.contains("dimension 3"), "{err}");
    }

    /// The general form by loops: anchors against shared candidates with soft positives and a
    /// denominator mask, plus private candidates per anchor.
    fn reference_general(
        anchors: &[Vec<f64>],
        candidates: &[Vec<f64>],
        positives: &[Vec<f64>],
        denominator: &[Vec<f64>],
        private: &[Vec<Vec<f64>>],
        private_positives: &[Vec<f64>],
        temperature: f64,
    ) -> f64 {
        let mut total = 0.0;
        for (a, anchor) in anchors.iter().enumerate() {
            let s = |v: &Vec<f64>| cosine(anchor, v) / temperature;
            let mut terms: Vec<(f64, f64, f64)> =
                (0..candidates.len()).map(|c| (s(&candidates[c]), positives[a][c], denominator[a][c])).collect();
            terms.extend(private[a].iter().zip(&private_positives[a]).map(|(v, &p)| (s(v), p, 1.0)));
            let log_denominator: f64 = terms.iter().filter(|t| t.2 > 0.0).map(|t| t.0.exp()).sum::<f64>().ln();
            let weight: f64 = terms.iter().map(|t| t.1).sum();
            total -= terms.iter().map(|t| t.1 * (t.0 - log_denominator)).sum::<f64>() / weight;
        }
        total / anchors.len() as f64
    }

    /// CMC's two-view loss, `½ (L(V₁, V₂) + L(V₂, V₁))` with each direction's negatives from the
    /// other view only, is InfoNCE over the cross-view contrast; both views get the gradient.
    #[test]
    fn the_cross_view_contrast_is_cmc_in_both_directions() -> Result<()> {
        let (z1, z2, _) = example();
        let expected = (reference_in_batch(&z1, &z2, 0.2) + reference_in_batch(&z2, &z1, 0.2)) / 2.0;
        let loss = |x: &[Tensor]| info_nce(&Contrast::in_batch_views(x, Denominator::OtherViews)?, 0.2);
        let value = loss(&[matrix(&z1), matrix(&z2)])?.to_scalar::<f64>()?;
        assert!((value - expected).abs() < 1e-12, "{value} vs {expected}");
        assert_gradients_match_finite_differences(&[matrix(&z1), matrix(&z2)], &[0, 1], loss);
        Ok(())
    }

    #[test]
    fn the_general_form_matches_plain_loops_and_its_gradient() -> Result<()> {
        let anchors = vec![vec![1.0, 0.3, -0.2], vec![-0.4, 0.9, 0.5]];
        let candidates = vec![vec![0.8, 0.1, 0.0], vec![0.0, 1.0, 0.2], vec![0.3, -0.5, 0.6]];
        let positives = vec![vec![0.7, 0.0, 0.3], vec![0.0, 1.0, 0.0]];
        let denominator = vec![vec![1.0, 0.0, 1.0], vec![1.0, 1.0, 1.0]];
        let private = vec![vec![vec![0.2, 0.2, 0.9]], vec![vec![-0.6, 0.6, 0.1]]];
        let private_positives = vec![vec![0.0], vec![1.0]];
        let expected =
            reference_general(&anchors, &candidates, &positives, &denominator, &private, &private_positives, 0.3);
        let build = |a: &Tensor| -> Result<Contrast> {
            let normalize = |rows: &[Vec<f64>]| super::super::l2_normalize(&matrix(rows));
            let mut contrast = Contrast::new(
                super::super::l2_normalize(a)?,
                normalize(&candidates)?,
                matrix(&positives),
                matrix(&denominator),
            );
            let own: Vec<Tensor> = private.iter().map(|rows| normalize(rows)).collect::<Result<_>>()?;
            contrast.add_private(Tensor::stack(&own, 0)?, matrix(&private_positives))?;
            Ok(contrast)
        };
        let value = info_nce(&build(&matrix(&anchors))?, 0.3)?.to_scalar::<f64>()?;
        assert!((value - expected).abs() < 1e-12, "{value} vs {expected}");
        assert_gradients_match_finite_differences(&[matrix(&anchors)], &[0], |x| info_nce(&build(&x[0])?, 0.3));
        Ok(())
    }
}

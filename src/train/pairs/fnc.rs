//! False-negative cancellation, FNC (Huynh, Kornblith, Walter, Maire, Khademi, "Boosting
//! Contrastive Self-Supervised Learning with False Negative Cancellation", WACV 2022).
//!
//! Among an anchor's negatives some show the same kind of object. Each image gets `S` extra
//! "support" views; a negative `n` of anchor `a` (of image i) scores the mean similarity to i's
//! support views, and the `k` highest-scoring negatives are taken for false negatives:
//!
//! ```text
//! score(a, n) = (1/S) Σ_s cos(v_{i,s}, n),   F(a) = top-k_n score(a, n)
//! ```
//!
//! Elimination leaves `F(a)` out of the anchor's denominator; attraction also counts them as
//! positives. The paper finds attraction the stronger of the two at ImageNet scale and uses 8
//! support views and k = 10 for batches of 4,096; the defaults here, 2 views and k = 5, suit
//! batches of 256 with ~50 same-class views per anchor, and elimination is the default since an
//! early encoder's mistakes attracted are harder to undo than mistakes ignored.

use candle_core::{bail, DType, Result, Tensor};

use super::Contrast;

/// Marks each anchor's `count` likeliest false negatives, removing them from its denominator or,
/// with `attract`, making them positives.
pub fn cancel_false_negatives(contrast: &mut Contrast, count: usize, attract: bool) -> Result<()> {
    let Some(support) = &contrast.support else { bail!("FNC needs support views, and this contrast has none") };
    let (a, c) = (contrast.anchor_count(), contrast.candidates.dims()[0]);
    let dtype = contrast.candidates.dtype();
    // [A, S, D] x [D, C] -> [A, S, C], mean over the support views.
    let candidates = contrast.candidates.detach().t()?.contiguous()?;
    let scores = support.to_dtype(dtype)?.broadcast_matmul(&candidates)?.mean(1)?;
    let scores = scores.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let negatives = contrast.negatives()?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let mut marked = vec![0f32; a * c];
    for (row, (score, negative)) in scores.iter().zip(&negatives).enumerate() {
        let mut columns: Vec<usize> = (0..c).filter(|&j| negative[j] > 0.0).collect();
        let k = count.min(columns.len());
        if k == 0 {
            continue;
        }
        columns.select_nth_unstable_by(k - 1, |x, y| score[*y].total_cmp(&score[*x]));
        for &j in &columns[..k] {
            marked[row * c + j] = 1.0;
        }
    }
    let marked =
        Tensor::from_vec(marked, (a, c), contrast.candidates.device())?.to_dtype(contrast.positives.dtype())?;
    if attract {
        contrast.positives = (&contrast.positives + &marked)?;
    } else {
        contrast.denominator = (&contrast.denominator * (1.0 - &marked)?)?;
    }
    Ok(())
}

/// The support tensor `[R·N, S, D]` of `views` (S tensors `[N, D]`, one per support view of the
/// N images): unit rows, detached, repeated for the `repeats` anchors each image has in the
/// contrast (view-major, as [`Contrast::in_batch`] stacks them).
pub fn support_of_anchors(views: &[Tensor], repeats: usize) -> Result<Tensor> {
    let rows: Vec<Tensor> =
        views.iter().map(|v| contrastive_kernels::l2_normalize(&v.detach())).collect::<Result<_>>()?;
    let per_image = Tensor::stack(&rows, 1)?;
    Tensor::cat(&vec![per_image; repeats], 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Two anchors against a queue of four keys; anchor 0's support views look like key 2,
    /// anchor 1's like key 3; key 0 comes second for both.
    fn example() -> Result<Contrast> {
        let q = Tensor::new(&[[1.0f64, 0.0, 0.0], [0.0, 1.0, 0.0]], &Device::Cpu)?;
        let queue =
            Tensor::new(&[[0.0f64, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.6, 0.0, 0.8], [0.0, 0.6, 0.8]], &Device::Cpu)?;
        let mut c = Contrast::with_queue(&q, &q, &queue)?;
        let support =
            Tensor::new(&[[[0.6f64, 0.0, 0.8], [0.8, 0.0, 0.6]], [[0.0, 0.6, 0.8], [0.0, 0.8, 0.6]]], &Device::Cpu)?;
        c.support = Some(support);
        Ok(c)
    }

    #[test]
    fn eliminates_the_negatives_most_like_the_support_views() -> Result<()> {
        let mut c = example()?;
        cancel_false_negatives(&mut c, 1, false)?;
        // Scores of anchor 0 over the queue: 0.7, −0.7, 0.98, 0.56 → key 2 (column 4).
        // Anchor 1: 0.7, 0, 0.56, 0.98 → key 3 (column 5).
        assert_eq!(c.denominator.to_vec2::<f64>()?, vec![vec![1., 0., 1., 1., 0., 1.], vec![0., 1., 1., 1., 1., 0.]]);
        assert_eq!(c.positives.to_vec2::<f64>()?, vec![vec![1., 0., 0., 0., 0., 0.], vec![0., 1., 0., 0., 0., 0.]]);
        Ok(())
    }

    #[test]
    fn attracts_them_as_positives_and_keeps_them_in_the_denominator() -> Result<()> {
        let mut c = example()?;
        cancel_false_negatives(&mut c, 2, true)?;
        assert_eq!(c.positives.to_vec2::<f64>()?, vec![vec![1., 0., 1., 0., 1., 0.], vec![0., 1., 1., 0., 0., 1.]]);
        assert_eq!(c.denominator.sum_all()?.to_scalar::<f64>()?, 10.0);
        Ok(())
    }

    #[test]
    fn refuses_a_contrast_without_support_views() -> Result<()> {
        let mut c = example()?;
        c.support = None;
        let err = cancel_false_negatives(&mut c, 1, false).unwrap_err().to_string();
        assert!(err.contains("support views"), "{err}");
        Ok(())
    }
}

//! Feature-space hard pairs (Zhu, Zhao, Liu, Sun, Chen, "Improving Contrastive Learning by
//! Visualizing Feature Transformation", ICCV 2021).
//!
//! Positive extrapolation pushes each anchor `a` and its positive `p` apart, making the positive
//! harder; negative interpolation mixes every pure negative `n` (a queue key, never anyone's
//! positive) with another one `n_π`, making the negatives more diverse. One coefficient per anchor
//! and per negative, as in the paper's formulas (the authors' code can also draw one per
//! dimension, which on 300-step runs here left MoCo v2 below its random init):
//!
//! ```text
//! â = λ a + (1 − λ) p,   p̂ = λ p + (1 − λ) a,   λ ~ Beta(α⁺, α⁺) + 1        (α⁺ = 2)
//! n̂ = μ n + (1 − μ) n_π,                        μ ~ Beta(α⁻, α⁻), π random   (α⁻ = 1.6)
//! ```
//!
//! `â` keeps the anchor's gradient; `p̂` replaces the positive for that anchor only and, like every
//! key, carries none. All are normalised again. In-batch methods (SimCLR) have no pure
//! negatives: there only the positives are extrapolated.

use candle_core::{DType, Result, Tensor};
use rand::Rng;
use rand_distr::{Beta, Distribution};

use super::Contrast;
use contrastive_kernels::l2_normalize;

/// Extrapolates each anchor and its positive with `Beta(positive_alpha)` + 1 coefficients and
/// interpolates the pure negatives with `Beta(negative_alpha)` ones.
pub fn transform_features(
    contrast: &mut Contrast,
    positive_alpha: f64,
    negative_alpha: f64,
    rng: &mut impl Rng,
) -> Result<()> {
    let (a, c) = (contrast.anchor_count(), contrast.candidates.dims()[0]);
    let dtype = contrast.anchors.dtype();
    let device = contrast.anchors.device().clone();
    let draw = |rng: &mut dyn rand::RngCore, alpha: f64, count: usize, shift: f64| -> Result<Vec<f64>> {
        let beta = Beta::new(alpha, alpha).map_err(|e| candle_core::Error::Msg(format!("Beta({alpha}): {e}")))?;
        Ok((0..count).map(|_| beta.sample(rng) + shift).collect())
    };

    // The candidates that are nobody's positive but someone's negative (queue keys).
    let positive_count = contrast.positives.to_dtype(DType::F32)?.sum(0)?.to_vec1::<f32>()?;
    let negative_count = contrast.negatives()?.to_dtype(DType::F32)?.sum(0)?.to_vec1::<f32>()?;
    let never_positive: Vec<u32> =
        (0..c).filter(|&j| positive_count[j] == 0.0 && negative_count[j] > 0.0).map(|j| j as u32).collect();

    // Positive extrapolation.
    let positive = contrast.positive_centres()?.to_dtype(dtype)?;
    let lambda = Tensor::from_vec(draw(rng, positive_alpha, a, 1.0)?, (a, 1), &device)?.to_dtype(dtype)?;
    let rest = (1.0 - &lambda)?;
    let anchor = contrast.anchors.clone();
    contrast.anchors = l2_normalize(&(anchor.broadcast_mul(&lambda)? + positive.broadcast_mul(&rest)?)?)?;
    let harder = l2_normalize(&(positive.broadcast_mul(&lambda)? + anchor.detach().broadcast_mul(&rest)?)?)?;
    contrast.replace_positives(&harder)?;

    // Negative interpolation.
    if never_positive.len() >= 2 {
        let count = never_positive.len();
        let mut order = never_positive.clone();
        for i in (1..count).rev() {
            order.swap(i, rng.random_range(0..=i));
        }
        let mu = Tensor::from_vec(draw(rng, negative_alpha, count, 0.0)?, (count, 1), &device)?.to_dtype(dtype)?;
        let candidates = contrast.candidates.to_dtype(dtype)?;
        let own = candidates.index_select(&Tensor::new(never_positive.clone(), &device)?, 0)?;
        let partner = candidates.index_select(&Tensor::new(order, &device)?, 0)?;
        let mixed = l2_normalize(&(own.broadcast_mul(&mu)? + partner.broadcast_mul(&(1.0 - &mu)?)?)?)?;
        // Scatter the mixed rows back in place of the originals.
        let mut source: Vec<u32> = (0..c as u32).collect();
        for (k, &column) in never_positive.iter().enumerate() {
            source[column as usize] = (c + k) as u32;
        }
        let all = Tensor::cat(&[&candidates, &mixed.detach()], 0)?;
        contrast.candidates = all.index_select(&Tensor::new(source, &device)?, 0)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn extrapolates_positives_apart_and_mixes_only_queue_keys() -> Result<()> {
        let q = Tensor::new(&[[1.0f64, 0.0, 0.0], [0.0, 1.0, 0.0]], &Device::Cpu)?;
        let k = Tensor::new(&[[0.8f64, 0.6, 0.0], [0.0, 0.6, 0.8]], &Device::Cpu)?;
        let queue = Tensor::new(&[[0.0f64, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]], &Device::Cpu)?;
        let mut c = Contrast::with_queue(&q, &k, &queue)?;
        let before = c.clone();
        transform_features(&mut c, 2.0, 1.6, &mut StdRng::seed_from_u64(0))?;
        let s = c.scores()?;
        // Each anchor's only positive is now its private extrapolated key, whose cosine with the
        // extrapolated anchor is below the original pair's (0.8 and 0.6).
        let (positive, _) = s.positive_cosine()?;
        for (i, (&after, original)) in positive.to_vec1::<f64>()?.iter().zip([0.8, 0.6]).enumerate() {
            assert!(after < original, "anchor {i}: {after} vs {original}");
        }
        assert_eq!(s.positives.narrow(1, 0, 5)?.sum_all()?.to_scalar::<f64>()?, 0.0);
        // The original keys leave the sums; the queue columns stay in.
        assert_eq!(s.denominator.to_vec2::<f64>()?, vec![vec![0., 0., 1., 1., 1., 1.], vec![0., 0., 1., 1., 1., 1.]]);
        // Keys are untouched, queue keys are unit mixes of two queue keys.
        let (old, new) = (before.candidates.to_vec2::<f64>()?, c.candidates.to_vec2::<f64>()?);
        assert_eq!(old[..2], new[..2]);
        for row in &new[2..] {
            assert!((row.iter().map(|v| v * v).sum::<f64>() - 1.0).abs() < 1e-12);
        }
        assert_ne!(old[2..], new[2..]);
        Ok(())
    }

    #[test]
    fn the_anchor_keeps_its_gradient_and_the_positive_has_none() -> Result<()> {
        let z1 = candle_core::Var::new(&[[1.0f64, 0.2], [0.1, 1.0]], &Device::Cpu)?;
        let z2 = Tensor::new(&[[0.9f64, 0.3], [0.2, 0.8]], &Device::Cpu)?;
        let mut c = Contrast::in_batch(z1.as_tensor(), &z2)?;
        transform_features(&mut c, 2.0, 1.6, &mut StdRng::seed_from_u64(0))?;
        let grads = c.anchors.sum_all()?.backward()?;
        assert!(grads.get(z1.as_tensor()).is_some());
        assert!(c.private.as_ref().unwrap().0.sum_all()?.backward()?.get(z1.as_tensor()).is_none());
        Ok(())
    }
}

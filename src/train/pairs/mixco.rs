//! Positive expansion by mixing, MixCo / i-Mix (Kim, Lee, Bae, Yun, "MixCo: Mix-up Contrastive
//! Learning for Visual Representation", 2020; Lee et al., "i-Mix", ICLR 2021).
//!
//! Each image `x_i` of the first view is mixed with another image of the batch, and the mixed
//! image's projection is an extra anchor whose positives are soft: the second views of both
//! source images, weighted by their shares,
//!
//! ```text
//! x̃_i = λ_i x_i + (1 − λ_i) x_π(i),   λ_i ~ Beta(α, α),   π a random permutation
//! P(x̃_i, v2_i) = λ_i,   P(x̃_i, v2_π(i)) = 1 − λ_i
//! ```
//!
//! and InfoNCE with these targets (the general form of `loss::info_nce`) is MixCo's soft
//! cross-entropy. The mixed anchors join the others, so their term weighs like any anchor's;
//! MixCo's paper adds the term to MoCo's with weight 1, as here. α = 1 (λ uniform) as i-Mix.

use candle_core::{bail, Result, Tensor};
use rand::Rng;
use rand_distr::{Beta, Distribution};

use super::Contrast;
use contrastive_kernels::l2_normalize;

/// One batch's mixing: each image's share and partner.
pub struct Mixing {
    pub lambda: Vec<f64>,
    pub partner: Vec<u32>,
}

impl Mixing {
    /// Draws shares from `Beta(alpha, alpha)` and a random partner permutation for `n` images.
    pub fn draw(n: usize, alpha: f64, rng: &mut impl Rng) -> Result<Self> {
        let beta = Beta::new(alpha, alpha).map_err(|e| candle_core::Error::Msg(format!("Beta({alpha}): {e}")))?;
        let lambda = (0..n).map(|_| beta.sample(rng)).collect();
        let mut partner: Vec<u32> = (0..n as u32).collect();
        for i in (1..n).rev() {
            partner.swap(i, rng.random_range(0..=i));
        }
        Ok(Self { lambda, partner })
    }

    /// The mixed images `[N, C, H, W]` of `images`.
    pub fn mix_images(&self, images: &Tensor) -> Result<Tensor> {
        let n = self.lambda.len();
        let shape: Vec<usize> = std::iter::once(n).chain(std::iter::repeat_n(1, images.rank() - 1)).collect();
        let lambda = Tensor::from_vec(self.lambda.clone(), shape, images.device())?.to_dtype(images.dtype())?;
        let partner = images.index_select(&Tensor::new(self.partner.clone(), images.device())?, 0)?;
        images.broadcast_mul(&lambda)? + partner.broadcast_mul(&(1.0 - &lambda)?)?
    }

    /// Appends the mixed images' projections `mixed` (`[N, D]`) as anchors: image i's positives
    /// are candidate `positive_columns[i]` (λ_i) and its partner's (1 − λ_i); each mixed anchor
    /// also contrasts against the candidates `negatives` marks (`[C]`, 1 or 0).
    pub fn add_anchors(
        &self,
        contrast: &mut Contrast,
        mixed: &Tensor,
        positive_columns: &[usize],
        negatives: &[f64],
    ) -> Result<()> {
        let n = self.lambda.len();
        let c = contrast.candidates.dims()[0];
        if mixed.dims()[0] != n || positive_columns.len() != n || negatives.len() != c {
            bail!("mixing {n} images needs {n} mixed projections and positive columns and {c} negative flags")
        }
        if contrast.private.is_some() || contrast.support.is_some() {
            bail!("mixed anchors join the contrast before strategies that add candidates or support views")
        }
        let mut positives = vec![0f64; n * c];
        let mut denominator = vec![0f64; n * c];
        for i in 0..n {
            let row = i * c;
            positives[row + positive_columns[i]] += self.lambda[i];
            positives[row + positive_columns[self.partner[i] as usize]] += 1.0 - self.lambda[i];
            for j in 0..c {
                denominator[row + j] = if positives[row + j] > 0.0 { 1.0 } else { negatives[j] };
            }
        }
        let device = contrast.anchors.device().clone();
        let dtype = contrast.positives.dtype();
        let weights = |values| -> Result<Tensor> { Tensor::from_vec(values, (n, c), &device)?.to_dtype(dtype) };
        contrast.positives = Tensor::cat(&[&contrast.positives, &weights(positives)?], 0)?;
        contrast.denominator = Tensor::cat(&[&contrast.denominator, &weights(denominator)?], 0)?;
        let mixed = l2_normalize(mixed)?.to_dtype(contrast.anchors.dtype())?;
        contrast.anchors = Tensor::cat(&[&contrast.anchors, &mixed], 0)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::loss::info_nce;
    use candle_core::Device;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn images_mix_by_their_shares_with_a_permuted_partner() -> Result<()> {
        let mixing = Mixing { lambda: vec![0.25, 1.0, 0.5], partner: vec![1, 2, 0] };
        let images = Tensor::new(&[[[[0.0f32]]], [[[4.0]]], [[[8.0]]]], &Device::Cpu)?;
        let mixed = mixing.mix_images(&images)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(mixed, vec![3.0, 4.0, 4.0]);
        let drawn = Mixing::draw(50, 1.0, &mut StdRng::seed_from_u64(0))?;
        let mut sorted = drawn.partner.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<u32>>(), "a permutation");
        assert!(drawn.lambda.iter().all(|l| (0.0..=1.0).contains(l)));
        Ok(())
    }

    #[test]
    fn the_mixed_anchor_term_is_the_soft_cross_entropy_by_loops() -> Result<()> {
        // SimCLR's contrast of two images, plus image 0 mixed 0.7 / 0.3 with image 1.
        let z1 = Tensor::new(&[[1.0f64, 0.0], [0.0, 1.0]], &Device::Cpu)?;
        let z2 = Tensor::new(&[[0.8f64, 0.6], [0.6, 0.8]], &Device::Cpu)?;
        let mixing = Mixing { lambda: vec![0.7, 1.0], partner: vec![1, 0] };
        let mixed = Tensor::new(&[[0.7f64, 0.3], [0.0, 1.0]], &Device::Cpu)?;
        let mut c = Contrast::in_batch(&z1, &z2)?;
        let plain = info_nce(&c, 0.5)?.to_scalar::<f64>()?;
        mixing.add_anchors(&mut c, &mixed, &[2, 3], &[1.0; 4])?;
        let row = &c.positives.to_vec2::<f64>()?[4];
        for (got, want) in row.iter().zip([0.0, 0.0, 0.7, 0.3]) {
            assert!((got - want).abs() < 1e-15, "{row:?}");
        }
        let total = info_nce(&c, 0.5)?.to_scalar::<f64>()?;
        // The mixed anchors' soft cross-entropy by loops: candidates are the four views.
        let views = [[1.0, 0.0], [0.0, 1.0], [0.8, 0.6], [0.6, 0.8]];
        let soft = |anchor: [f64; 2], targets: [f64; 4]| -> f64 {
            let norm = (anchor[0] * anchor[0] + anchor[1] * anchor[1]).sqrt();
            let s: Vec<f64> = views.iter().map(|v| (anchor[0] * v[0] + anchor[1] * v[1]) / norm / 0.5).collect();
            let log_z = s.iter().map(|x| x.exp()).sum::<f64>().ln();
            -(0..4).map(|j| targets[j] * (s[j] - log_z)).sum::<f64>()
        };
        let mixed_terms = soft([0.7, 0.3], [0.0, 0.0, 0.7, 0.3]) + soft([0.0, 1.0], [0.0, 0.0, 0.0, 1.0]);
        let expected = (4.0 * plain + mixed_terms) / 6.0;
        assert!((total - expected).abs() < 1e-12, "{total} vs {expected}");
        Ok(())
    }
}

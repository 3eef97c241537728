//! Mixup hard samples (Zhong et al., as the survey summarises them): mix the batch's images and
//! keep, for each anchor, the mixed samples it finds most similar as extra negatives.
//!
//! With the mixes `x̃_k = λ_k x_k + (1 − λ_k) x_π(k)` of [`super::Mixing`] and their projections
//! `m_k` (unit rows, no gradient), anchor `a` of image i keeps
//!
//! ```text
//! H(a) = top-h_k { cos(a, m_k) : k ≠ i, π(k) ≠ i }
//! ```
//!
//! as private negatives: a mix that contains the anchor's own image is partly its positive, so it
//! is left out. Mixes sit between two images, so the most similar ones are harder than most
//! in-batch negatives. Default h = 64 of a batch of 256, α = 1.

use candle_core::{bail, DType, Result, Tensor};

use super::{Contrast, Mixing};
use contrastive_kernels::l2_normalize;

/// Adds each anchor's `hardest` most similar mixes that do not contain its image
/// (`anchor_images[a]`) as private negatives; `mixed` holds the N mixes' projections `[N, D]`.
pub fn add_hardest_mixed_negatives(
    contrast: &mut Contrast,
    mixing: &Mixing,
    mixed: &Tensor,
    anchor_images: &[usize],
    hardest: usize,
) -> Result<()> {
    let n = mixing.partner.len();
    let a = contrast.anchor_count();
    if mixed.dims()[0] != n || anchor_images.len() != a || n < 3 {
        bail!("mixup negatives need one mix per image (at least 3) and one image per anchor")
    }
    let mixed = l2_normalize(&mixed.detach())?.to_dtype(contrast.anchors.dtype())?;
    let cosines = contrast.anchors.detach().matmul(&mixed.t()?)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    // Each anchor excludes at most two mixes (its own, and the one whose partner it is).
    let keep = hardest.clamp(1, n - 2);
    let mut rows = Vec::with_capacity(a * keep);
    for (anchor, cosine) in cosines.iter().enumerate() {
        let image = anchor_images[anchor];
        let mut candidates: Vec<u32> =
            (0..n).filter(|&k| k != image && mixing.partner[k] as usize != image).map(|k| k as u32).collect();
        candidates.select_nth_unstable_by(keep - 1, |x, y| cosine[*y as usize].total_cmp(&cosine[*x as usize]));
        rows.extend_from_slice(&candidates[..keep]);
    }
    let dim = mixed.dims()[1];
    let chosen = mixed.index_select(&Tensor::new(rows, mixed.device())?, 0)?.reshape((a, keep, dim))?;
    let weights = Tensor::zeros((a, keep), contrast.positives.dtype(), mixed.device())?;
    contrast.add_private(chosen, weights)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn keeps_the_most_similar_mixes_without_the_anchors_image() -> Result<()> {
        // Four images; mix k pairs image k with image k + 1 (mod 4).
        let mixing = Mixing { lambda: vec![0.5; 4], partner: vec![1, 2, 3, 0] };
        let q = Tensor::new(&[[1.0f64, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]], &Device::Cpu)?;
        let mut c = Contrast::with_queue(&q, &q, &q)?;
        // Mix projections at angles 0.1, 1.6, 3.0 and 4.7 rad.
        let mixed = Tensor::new(
            &[
                [0.1f64.cos(), 0.1f64.sin()],
                [1.6f64.cos(), 1.6f64.sin()],
                [3.0f64.cos(), 3.0f64.sin()],
                [4.7f64.cos(), 4.7f64.sin()],
            ],
            &Device::Cpu,
        )?;
        add_hardest_mixed_negatives(&mut c, &mixing, &mixed, &[0, 1, 2, 3], 1)?;
        let (private, weights) = c.private.clone().unwrap();
        assert_eq!(private.dims(), &[4, 1, 2]);
        assert_eq!(weights.sum_all()?.to_scalar::<f64>()?, 0.0);
        // Anchor 0 (angle 0) may not take mixes 0 (its own) or 3 (partner 0): of mixes 1 and 2,
        // mix 1 (1.6 rad) is nearer. Anchor 1 (π/2) excludes mixes 1 and 0: mix 2 (3.0) beats 3.
        let angles: Vec<f64> = private.squeeze(1)?.to_vec2::<f64>()?.iter().map(|r| r[1].atan2(r[0])).collect();
        assert!((angles[0] - 1.6).abs() < 1e-9, "{angles:?}");
        assert!((angles[1] - 3.0).abs() < 1e-9, "{angles:?}");
        Ok(())
    }
}

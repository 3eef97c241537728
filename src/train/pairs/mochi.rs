//! Hard negative mixing, MoCHi (Kalantidis, Sariyildiz, Pion, Weinzaepfel, Larlus, "Hard Negative
//! Mixing for Contrastive Learning", NeurIPS 2020).
//!
//! For each query `q`, take its `N` hardest negatives `Ñ` (highest cosine) and synthesise
//!
//! ```text
//! h_k  = ĥ_k/‖ĥ_k‖,   ĥ_k  = α_k n_i + (1 − α_k) n_j,   n_i, n_j ∈ Ñ,  α_k ~ U(0, 1),   k = 1..s
//! h'_k = ĥ'_k/‖ĥ'_k‖, ĥ'_k = β_k q + (1 − β_k) n_j,     n_j ∈ Ñ,      β_k ~ U(0, 0.5), k = 1..s'
//! ```
//!
//! as extra negatives of that query only, with no gradient through them. The paper mixes the
//! hardest 1,024 of a 16k queue (MoCHi(1024, 1024, 128) on ImageNet-100); the defaults here keep
//! that proportion of a 4,096-key queue: N = 256, s = 256, s' = 64.

use candle_core::{Result, Tensor};
use rand::Rng;

use super::Contrast;
use contrastive_kernels::l2_normalize;

/// Adds `mixes` + `query_mixes` synthetic negatives per anchor, from its `hardest` negatives.
pub fn mix_hard_negatives(
    contrast: &mut Contrast,
    hardest: usize,
    mixes: usize,
    query_mixes: usize,
    rng: &mut impl Rng,
) -> Result<()> {
    let anchors = contrast.anchors.detach();
    let cosines =
        anchors.matmul(&contrast.candidates.detach().t()?)?.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?;
    let negatives = contrast.negatives()?.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?;
    let a = contrast.anchor_count();
    let (mut left, mut right, mut alpha) = (Vec::with_capacity(a * mixes), Vec::new(), Vec::new());
    let (mut query_rows, mut query_partner, mut beta) = (Vec::new(), Vec::new(), Vec::new());
    for (row, (cosine, negative)) in cosines.iter().zip(&negatives).enumerate() {
        let mut candidates: Vec<u32> = (0..negative.len()).filter(|&c| negative[c] > 0.0).map(|c| c as u32).collect();
        if candidates.is_empty() {
            candle_core::bail!("MoCHi needs negatives to mix, anchor {row} has none")
        }
        let n = hardest.clamp(1, candidates.len());
        if n < candidates.len() {
            candidates.select_nth_unstable_by(n - 1, |x, y| cosine[*y as usize].total_cmp(&cosine[*x as usize]));
            candidates.truncate(n);
        }
        for _ in 0..mixes {
            left.push(candidates[rng.random_range(0..n)]);
            right.push(candidates[rng.random_range(0..n)]);
            alpha.push(rng.random::<f32>());
        }
        for _ in 0..query_mixes {
            query_rows.push(row as u32);
            query_partner.push(candidates[rng.random_range(0..n)]);
            beta.push(rng.random::<f32>() * 0.5);
        }
    }
    let device = anchors.device();
    let candidates = contrast.candidates.detach();
    let dtype = candidates.dtype();
    let mix = |x: &Tensor, x_rows: Vec<u32>, y_rows: Vec<u32>, weights: Vec<f32>| -> Result<Tensor> {
        let count = weights.len();
        let w = Tensor::from_vec(weights, (count, 1), device)?.to_dtype(dtype)?;
        let x = x.index_select(&Tensor::new(x_rows, device)?, 0)?;
        let y = candidates.index_select(&Tensor::new(y_rows, device)?, 0)?;
        l2_normalize(&(x.broadcast_mul(&w)? + y.broadcast_mul(&(1.0 - &w)?)?)?)
    };
    let dim = candidates.dims()[1];
    let mut synthetic = Vec::new();
    if mixes > 0 {
        synthetic.push(mix(&candidates, left, right, alpha)?.reshape((a, mixes, dim))?);
    }
    if query_mixes > 0 {
        synthetic.push(mix(&anchors.to_dtype(dtype)?, query_rows, query_partner, beta)?.reshape((
            a,
            query_mixes,
            dim,
        ))?);
    }
    if synthetic.is_empty() {
        return Ok(());
    }
    let synthetic = Tensor::cat(&synthetic, 1)?;
    let weights = Tensor::zeros((a, mixes + query_mixes), contrast.positives.dtype(), device)?;
    contrast.add_private(synthetic, weights)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn unit(angle: f64) -> [f64; 2] {
        [angle.cos(), angle.sin()]
    }

    #[test]
    fn mixes_only_the_hardest_negatives_and_the_query() -> Result<()> {
        // One query at angle 0, its key, and a queue at angles 0.1, 0.2 (the two hardest), 2, 3.
        let q = Tensor::new(&[unit(0.0)], &Device::Cpu)?;
        let queue = Tensor::new(&[unit(2.0), unit(0.1), unit(3.0), unit(0.2)], &Device::Cpu)?;
        let mut c = Contrast::with_queue(&q, &q, &queue)?;
        mix_hard_negatives(&mut c, 2, 50, 50, &mut StdRng::seed_from_u64(1))?;
        let (private, weights) = c.private.clone().unwrap();
        assert_eq!(private.dims(), &[1, 100, 2]);
        assert_eq!(weights.sum_all()?.to_scalar::<f64>()?, 0.0, "synthetic points are negatives");
        for (k, point) in private.squeeze(0)?.to_vec2::<f64>()?.iter().enumerate() {
            let angle = point[1].atan2(point[0]);
            assert!(((point[0].powi(2) + point[1].powi(2)).sqrt() - 1.0).abs() < 1e-12, "unit");
            if k < 50 {
                // A mix of the negatives at 0.1 and 0.2 lies between them on the circle.
                assert!((0.1 - 1e-12..=0.2 + 1e-12).contains(&angle), "mix {k} at angle {angle}");
            } else {
                // β q + (1 − β) n with β < 0.5 lies between the query and n, nearer n.
                assert!((0.05 - 1e-12..=0.2 + 1e-12).contains(&angle), "query mix {k} at angle {angle}");
            }
        }
        // The synthetic negatives enter the loss's denominator.
        let s = c.scores()?;
        assert_eq!(s.cosines.dims(), &[1, 105]);
        assert_eq!(s.denominator.sum_all()?.to_scalar::<f64>()?, 105.0);
        Ok(())
    }

    #[test]
    fn draws_repeat_with_the_seed() -> Result<()> {
        let q = Tensor::new(&[unit(0.0), unit(1.0)], &Device::Cpu)?;
        let queue = Tensor::new(&[unit(2.0), unit(0.1), unit(3.0), unit(0.2)], &Device::Cpu)?;
        let run = |seed| -> Result<Vec<f64>> {
            let mut c = Contrast::with_queue(&q, &q, &queue)?;
            mix_hard_negatives(&mut c, 3, 4, 2, &mut StdRng::seed_from_u64(seed))?;
            c.private.unwrap().0.flatten_all()?.to_vec1::<f64>()
        };
        assert_eq!(run(3)?, run(3)?);
        assert_ne!(run(3)?, run(4)?);
        Ok(())
    }
}

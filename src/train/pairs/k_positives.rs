//! k-positive pairs (Kang, Li, Xie, Feng & Zhao, "Exploring Balanced Feature Spaces for
//! Representation Learning", ICLR 2021): the pair construction of KCL. Each anchor keeps the other
//! views of its own image and only `k` views of other images of its class, drawn at random, as
//! positives. SupCon's positives grow with the class's share of the batch, so head classes
//! dominate the feature space of a long-tailed set; a fixed `k` gives every class the same pull.
//! With `k` at least the largest class in the batch this is SupCon's positive set. Paper: k = 6.

use candle_core::{bail, Device, Result, Tensor};
use rand::seq::index::sample;
use rand::Rng;

/// The `[M, M]` F32 positive mask of `views` views of `labels.len()` images stacked view-major
/// (row `r` is image `r % N`): the anchor's own other views, plus `k` rows of other images with its
/// label drawn without replacement from `rng` (all of them when there are fewer).
pub fn k_positive_mask(labels: &[u32], views: usize, k: usize, rng: &mut impl Rng, device: &Device) -> Result<Tensor> {
    let n = labels.len();
    if n == 0 || views == 0 {
        bail!("k-positive pairs need at least one image and one view, got {n} images and {views} views")
    }
    let m = n * views;
    let mut mask = vec![0f32; m * m];
    for row in 0..m {
        let image = row % n;
        let same_class: Vec<usize> =
            (0..m).filter(|&other| other % n != image && labels[other % n] == labels[image]).collect();
        let chosen = sample(rng, same_class.len(), k.min(same_class.len()));
        for column in chosen.iter().map(|i| same_class[i]).chain((0..views).map(|v| v * n + image)) {
            if column != row {
                mask[row * m + column] = 1.0;
            }
        }
    }
    Tensor::from_vec(mask, (m, m), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn rows(labels: &[u32], views: usize, k: usize, seed: u64) -> Vec<Vec<f32>> {
        let mut rng = StdRng::seed_from_u64(seed);
        k_positive_mask(labels, views, k, &mut rng, &Device::Cpu).unwrap().to_vec2::<f32>().unwrap()
    }

    #[test]
    fn keeps_the_own_views_and_k_others_of_the_class() {
        // Class 0 has four images (eight views), class 1 one image.
        let labels = [0, 0, 1, 0, 0];
        let mask = rows(&labels, 2, 3, 7);
        for (row, positives) in mask.iter().enumerate() {
            let image = row % 5;
            let own = (row + 5) % 10;
            assert_eq!(positives[row], 0.0, "never its own positive");
            assert_eq!(positives[own], 1.0, "row {row}: the other view of its image");
            let others: Vec<usize> = (0..10).filter(|&c| c % 5 != image && positives[c] == 1.0).collect();
            assert!(others.iter().all(|&c| labels[c % 5] == labels[image]), "row {row}: only its class");
            let expected = if labels[image] == 0 { 3 } else { 0 };
            assert_eq!(others.len(), expected, "row {row}: k others, or all there are");
        }
    }

    #[test]
    fn large_k_is_supcon_and_draws_are_seeded() {
        let labels = [2, 1, 2, 2, 1];
        let mask = rows(&labels, 2, 100, 0);
        for (row, positives) in mask.iter().enumerate() {
            for (column, &value) in positives.iter().enumerate() {
                let expected = row != column && labels[row % 5] == labels[column % 5];
                assert_eq!(value == 1.0, expected, "[{row}][{column}]");
            }
        }
        assert_eq!(rows(&labels, 2, 1, 3), rows(&labels, 2, 1, 3));
        let draws: std::collections::HashSet<_> =
            (0..20).map(|seed| format!("{:?}", rows(&labels, 2, 1, seed))).collect();
        assert!(draws.len() > 1, "different seeds draw different positives");
    }
}

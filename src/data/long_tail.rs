//! Long-tailed training splits, the setting of the long-tail losses (KCL, TSC, BCL, PaCo): class
//! `c` of `C` keeps an exponentially decreasing share of its images (Cui et al. 2019, Cao et
//! al. 2019), so the first class keeps all `n_max` and the last `n_max / ρ`:
//!
//! ```text
//! n_c = ⌊n_max · ρ^(−c / (C − 1))⌋        ρ: the imbalance ratio n_0 / n_{C−1}
//! ```
//!
//! Which images a class keeps is drawn from the seed. Evaluation stays on the balanced test set
//! and splits the classes by their training counts into many-, medium- and few-shot groups.
//! The usual thresholds (> 100 and < 20 images, Liu et al. 2019) leave Fashion-MNIST at
//! ρ = 100 (6,000 down to 60 images) without a few-shot class, so the groups here are thirds:
//! the ⌊C/3⌋ most frequent classes, the ⌊C/3⌋ least frequent, and the rest.

use anyhow::{ensure, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::Dataset;

/// How many images each class keeps at imbalance `ratio`, given the classes' counts.
pub fn long_tail_counts(class_counts: &[usize], ratio: f64) -> Result<Vec<usize>> {
    ensure!(ratio >= 1.0 && ratio.is_finite(), "the imbalance ratio must be at least 1, got {ratio}");
    ensure!(class_counts.len() >= 2, "a long tail needs at least two classes");
    let n_max = *class_counts.iter().min().expect("classes");
    ensure!(n_max > 0, "every class needs images for a long-tailed split");
    let last = (class_counts.len() - 1) as f64;
    Ok((0..class_counts.len())
        // The epsilon keeps exact products (6000 / 100) from flooring one below.
        .map(|c| ((n_max as f64 * ratio.powf(-(c as f64) / last) + 1e-9).floor() as usize).max(1))
        .collect())
}

impl Dataset {
    /// The long-tailed subset at imbalance `ratio` (see the module), in the original order.
    pub fn long_tailed(&self, ratio: f64, seed: u64) -> Result<Dataset> {
        let mut members = vec![Vec::new(); self.num_classes()];
        for (i, &label) in self.labels.iter().enumerate() {
            members[label as usize].push(i);
        }
        let counts = long_tail_counts(&members.iter().map(Vec::len).collect::<Vec<_>>(), ratio)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut kept = Vec::new();
        for (class, keep) in members.iter_mut().zip(counts) {
            class.shuffle(&mut rng);
            kept.extend_from_slice(&class[..keep]);
        }
        kept.sort_unstable();
        Ok(self.subset(&kept))
    }
}

/// Many-, medium- and few-shot classes by their training counts: the ⌊C/3⌋ most frequent, the
/// ⌊C/3⌋ least frequent (ties broken by class index), and the rest.
pub fn shot_groups(class_counts: &[usize]) -> [Vec<u32>; 3] {
    let mut order: Vec<u32> = (0..class_counts.len() as u32).collect();
    order.sort_by_key(|&c| (std::cmp::Reverse(class_counts[c as usize]), c));
    let third = class_counts.len() / 3;
    let few = order.split_off(order.len() - third);
    let medium = order.split_off(third);
    [order, medium, few]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::ImageShape;

    #[test]
    fn fashion_mnist_at_ratio_100_keeps_6000_down_to_60() {
        // 6000 · 100^(−c/9) = 6000 · 10^(−2c/9): 6000, 3596.9, 2156.3, 1292.7, 774.9, 464.6,
        // 278.5, 167.0, 100.1, 60.
        let counts = long_tail_counts(&[6000; 10], 100.0).unwrap();
        assert_eq!(counts, [6000, 3596, 2156, 1292, 774, 464, 278, 166, 100, 60]);
        assert_eq!(long_tail_counts(&[50, 80], 1.0).unwrap(), [50, 50], "ratio 1: balanced at the smallest class");
        assert!(long_tail_counts(&[10, 10], 0.5).unwrap_err().to_string().contains("at least 1"));
    }

    #[test]
    fn the_split_keeps_the_counts_and_is_drawn_from_the_seed() {
        let labels: Vec<u32> = (0..300).map(|i| (i % 3) as u32).collect();
        let shape = ImageShape::new(1, 1, 1);
        let images: Vec<f32> = (0..300).map(|i| i as f32).collect();
        let data = Dataset::new(images, labels, shape, vec!["a".into(), "b".into(), "c".into()]).unwrap();
        let split = data.long_tailed(10.0, 7).unwrap();
        let count = |c: u32| split.labels.iter().filter(|&&l| l == c).count();
        assert_eq!((count(0), count(1), count(2)), (100, 31, 10));
        assert!(split.images.windows(2).all(|w| w[0] < w[1]), "original order");
        assert!(split.images.iter().zip(&split.labels).all(|(&x, &l)| x as u32 % 3 == l), "images keep their labels");
        assert_eq!(data.long_tailed(10.0, 7).unwrap().images, split.images);
        assert_ne!(data.long_tailed(10.0, 8).unwrap().images, split.images);
    }

    #[test]
    fn shot_groups_are_thirds_by_count() {
        let groups = shot_groups(&[60, 6000, 464, 3596, 278, 2156, 1292, 774, 166, 100]);
        assert_eq!(groups, [vec![1, 3, 5], vec![6, 7, 2, 4], vec![8, 9, 0]]);
    }
}

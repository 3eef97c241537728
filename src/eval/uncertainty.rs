//! How sure a held-out figure is: a fine-tune judged on 60 held-out images sees accuracies move
//! by ±0.1 from the draw of images alone, so its before/after comparison carries intervals.
//!
//! - One accuracy: the Wilson score interval (Wilson 1927), which stays inside [0, 1] and is
//!   accurate for small samples: with `p̂ = k/n` and `z` the normal quantile,
//!   `(p̂ + z²/2n ± z·√(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n)`.
//! - The change between two models on the same images: a paired bootstrap (Efron & Tibshirani
//!   1993, ch. 13) of `mean(correct_after − correct_before)`, resampling images with
//!   replacement and taking the percentile interval. Pairing removes the variance both models
//!   share (easy and hard images), which two separate intervals would count twice.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// A two-sided interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    pub low: f64,
    pub high: f64,
}

/// An estimate with its interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    pub value: f64,
    pub interval: Interval,
}

/// The normal quantile of a two-sided 95 % interval.
pub const Z_95: f64 = 1.959_963_984_540_054;

/// The Wilson score interval of `successes` out of `n` (see the module docs); `[0, 1]` for n = 0.
pub fn wilson_interval(successes: usize, n: usize, z: f64) -> Interval {
    if n == 0 {
        return Interval { low: 0.0, high: 1.0 };
    }
    let n = n as f64;
    let p = successes as f64 / n;
    let z2 = z * z;
    let denominator = 1.0 + z2 / n;
    let centre = (p + z2 / (2.0 * n)) / denominator;
    let half = z / denominator * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    Interval { low: (centre - half).max(0.0), high: (centre + half).min(1.0) }
}

/// `mean(after − before)` over paired outcomes, with its `level` (e.g. 0.95) percentile interval
/// from `resamples` bootstrap resamples drawn with `seed` (deterministic).
pub fn paired_bootstrap_difference(
    before: &[bool],
    after: &[bool],
    resamples: usize,
    level: f64,
    seed: u64,
) -> Estimate {
    assert_eq!(before.len(), after.len(), "paired outcomes need the same images");
    let n = before.len();
    if n == 0 {
        return Estimate { value: 0.0, interval: Interval { low: -1.0, high: 1.0 } };
    }
    let differences: Vec<i32> = before.iter().zip(after).map(|(&b, &a)| a as i32 - b as i32).collect();
    let value = differences.iter().sum::<i32>() as f64 / n as f64;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut means: Vec<f64> = (0..resamples.max(1))
        .map(|_| (0..n).map(|_| differences[rng.random_range(0..n)]).sum::<i32>() as f64 / n as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    let tail = (1.0 - level) / 2.0;
    let at = |q: f64| means[((q * means.len() as f64).floor() as usize).min(means.len() - 1)];
    Estimate { value, interval: Interval { low: at(tail), high: at(1.0 - tail) } }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_matches_hand_computed_intervals() {
        // 8 of 10: centre (0.8 + 0.19208) / 1.38416 = 0.71674, half-width
        // 1.96 / 1.38416 · √(0.016 + 0.009604) = 0.22658 (Wilson 1927; also Newcombe 1998, table I).
        let interval = wilson_interval(8, 10, Z_95);
        assert!((interval.low - 0.4902).abs() < 1e-3, "{interval:?}");
        assert!((interval.high - 0.9433).abs() < 1e-3, "{interval:?}");
        // 0 of 10 stays inside [0, 1]: [0, z²/(n + z²)] = [0, 0.2775].
        let none = wilson_interval(0, 10, Z_95);
        assert_eq!(none.low, 0.0);
        assert!((none.high - 0.2775).abs() < 1e-3, "{none:?}");
        assert_eq!(wilson_interval(0, 0, Z_95), Interval { low: 0.0, high: 1.0 });
    }

    #[test]
    fn paired_bootstrap_agrees_with_the_normal_approximation() {
        // 2,000 images: 300 fixed by the new model, 200 broken, the rest unchanged. The change is
        // +0.05; the paired normal approximation gives the standard error
        // √(((b + c)/n − d²)/n) = √((0.25 − 0.0025)/2000) = 0.011124, so ±0.0218 at 95 %.
        let n = 2000;
        let before: Vec<bool> = (0..n).map(|i| i >= 300 && (i < 500 || i % 2 == 0)).collect();
        let after: Vec<bool> = (0..n).map(|i| i < 300 || (i >= 500 && i % 2 == 0)).collect();
        let fixed = (0..n).filter(|&i| after[i] && !before[i]).count();
        let broken = (0..n).filter(|&i| before[i] && !after[i]).count();
        assert_eq!((fixed, broken), (300, 200));
        let change = paired_bootstrap_difference(&before, &after, 4000, 0.95, 7);
        assert!((change.value - 0.05).abs() < 1e-12);
        assert!((change.interval.low - (0.05 - 0.0218)).abs() < 0.003, "{change:?}");
        assert!((change.interval.high - (0.05 + 0.0218)).abs() < 0.003, "{change:?}");
        assert_eq!(change, paired_bootstrap_difference(&before, &after, 4000, 0.95, 7), "deterministic");
    }

    #[test]
    fn identical_models_change_by_exactly_nothing() {
        let outcomes = [true, false, true, true, false];
        let change = paired_bootstrap_difference(&outcomes, &outcomes, 500, 0.95, 1);
        assert_eq!(change, Estimate { value: 0.0, interval: Interval { low: 0.0, high: 0.0 } });
    }
}

//! Accuracy on a balanced test set by how often each class was seen in training: the
//! long-tail protocol's many-, medium- and few-shot accuracies (groups from
//! [`crate::data::long_tail::shot_groups`]).

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};

use crate::data::long_tail::shot_groups;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShotAccuracy {
    /// Accuracy over the test images of the most frequent third of the training classes.
    pub many: f64,
    pub medium: f64,
    /// ... and of the least frequent third.
    pub few: f64,
}

/// Group accuracies of per-image `outcomes` (right or wrong) of test images labelled
/// `test_labels`, the groups set by the training split's `train_labels`.
pub fn shot_accuracy(
    outcomes: &[bool],
    test_labels: &[u32],
    train_labels: &[u32],
    num_classes: usize,
) -> Result<ShotAccuracy> {
    ensure!(outcomes.len() == test_labels.len(), "{} outcomes for {} test labels", outcomes.len(), test_labels.len());
    ensure!(num_classes >= 3, "many/medium/few-shot groups need at least 3 classes, got {num_classes}");
    let mut counts = vec![0usize; num_classes];
    for &label in train_labels {
        counts[label as usize] += 1;
    }
    let [many, medium, few] = shot_groups(&counts);
    let accuracy = |group: &[u32]| {
        let (right, total) = outcomes
            .iter()
            .zip(test_labels)
            .filter(|(_, label)| group.contains(label))
            .fold((0usize, 0usize), |(r, t), (&ok, _)| (r + ok as usize, t + 1));
        if total == 0 {
            f64::NAN
        } else {
            right as f64 / total as f64
        }
    };
    Ok(ShotAccuracy { many: accuracy(&many), medium: accuracy(&medium), few: accuracy(&few) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_follow_the_training_counts() {
        // Training counts: class 2 most frequent (3), class 0 next (2), class 1 rarest (1), so
        // many = {2}, medium = {0}, few = {1}. Test: class 0 right 1 of 2, class 1 wrong,
        // class 2 right twice.
        let train = [0, 0, 1, 2, 2, 2];
        let test = [0, 0, 1, 2, 2];
        let outcomes = [true, false, false, true, true];
        let shots = shot_accuracy(&outcomes, &test, &train, 3).unwrap();
        assert_eq!(shots, ShotAccuracy { many: 1.0, medium: 0.5, few: 0.0 });
    }
}

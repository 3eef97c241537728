//! Weighted k-nearest-neighbour classification on frozen features.
//!
//! The protocol of InstDisc (Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric
//! Instance Discrimination"), also used by lightly and solo-learn: features are L2-normalised,
//! the `k` train rows with the highest cosine similarity `s_j` to a test row vote, each with
//! weight `e^{s_j / T}`, and the class with the largest total weight wins:
//!
//! `ŷ = argmax_c Σ_{j ∈ top-k, y_j = c} e^{s_j / T}`

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor};
use rayon::prelude::*;

use super::{check_labels, l2_normalize_rows};

/// Test rows handled per similarity matmul: a `[CHUNK, N_train]` block is the largest
/// similarity matrix that exists at once (256 x 60k f32 = 61 MB).
const TEST_CHUNK_ROWS: usize = 256;

/// Settings of the weighted k-NN classifier.
#[derive(Debug, Clone, PartialEq)]
pub struct KnnConfig {
    /// Neighbours that vote; capped at the number of train rows.
    pub k: usize,
    /// Temperature `T` of the vote weight `e^{sim/T}`; small values favour the nearest.
    pub temperature: f64,
}

impl Default for KnnConfig {
    /// k = 200, T = 0.1: the InstDisc / lightly defaults.
    fn default() -> Self {
        Self { k: 200, temperature: 0.1 }
    }
}

/// Predicts a class for every row of `test` by the weighted vote of its `k` most
/// cosine-similar rows of `train` (see the module docs for the formula).
///
/// `train` is `[N, D]` with `train_labels[i]` the class of row `i`; `test` is `[M, D]`.
/// Ties between classes go to the lowest class index.
pub fn knn_predict(
    train: &Tensor,
    train_labels: &[u32],
    test: &Tensor,
    num_classes: usize,
    config: &KnnConfig,
) -> Result<Vec<u32>> {
    check_labels("k-NN train", train, train_labels, num_classes)?;
    ensure!(test.rank() == 2, "k-NN test features must be a [M, D] matrix, got shape {:?}", test.shape());
    ensure!(
        train.dim(1)? == test.dim(1)?,
        "k-NN train features have {} dimensions but test features have {}",
        train.dim(1)?,
        test.dim(1)?
    );
    ensure!(!train_labels.is_empty(), "k-NN needs at least one train row");
    ensure!(config.k > 0, "k-NN needs k > 0");
    ensure!(config.temperature > 0.0, "k-NN temperature must be positive, got {}", config.temperature);

    let k = config.k.min(train_labels.len());
    // [D, N], contiguous so that every chunk's matmul reads it directly.
    let train_t = l2_normalize_rows(train)?.t()?.contiguous()?;
    let test = l2_normalize_rows(test)?;
    let test_rows = test.dim(0)?;

    let mut predictions = Vec::with_capacity(test_rows);
    for start in (0..test_rows).step_by(TEST_CHUNK_ROWS) {
        let len = TEST_CHUNK_ROWS.min(test_rows - start);
        let similarities = test.narrow(0, start, len)?.matmul(&train_t)?;
        // One flat buffer (row after row) rather than a Vec per row.
        let similarities = similarities.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let chunk: Vec<u32> = similarities
            .par_chunks(train_labels.len())
            .map(|row| weighted_vote(row, train_labels, num_classes, k, config.temperature))
            .collect();
        predictions.extend(chunk);
    }
    Ok(predictions)
}

/// Fraction of `test` rows whose [`knn_predict`] class equals `test_labels`.
pub fn knn_accuracy(
    train: &Tensor,
    train_labels: &[u32],
    test: &Tensor,
    test_labels: &[u32],
    num_classes: usize,
    config: &KnnConfig,
) -> Result<f64> {
    let outcomes = knn_outcomes(train, train_labels, test, test_labels, num_classes, config)?;
    Ok(accuracy_of(&outcomes))
}

/// Whether [`knn_predict`] classifies each `test` row right: the per-row outcomes behind
/// [`knn_accuracy`], for paired comparisons of two encoders on the same rows.
pub fn knn_outcomes(
    train: &Tensor,
    train_labels: &[u32],
    test: &Tensor,
    test_labels: &[u32],
    num_classes: usize,
    config: &KnnConfig,
) -> Result<Vec<bool>> {
    check_labels("k-NN test", test, test_labels, num_classes)?;
    ensure!(!test_labels.is_empty(), "k-NN accuracy needs at least one test row");
    let predictions = knn_predict(train, train_labels, test, num_classes, config)?;
    Ok(predictions.iter().zip(test_labels).map(|(p, y)| p == y).collect())
}

/// The fraction of `true` outcomes.
pub fn accuracy_of(outcomes: &[bool]) -> f64 {
    outcomes.iter().filter(|&&right| right).count() as f64 / outcomes.len() as f64
}

/// The class with the largest `Σ e^{s/T}` over the `k` most similar train rows.
/// `similarities[j]` is the similarity to train row `j`; `1 <= k <= similarities.len()`.
fn weighted_vote(similarities: &[f32], labels: &[u32], num_classes: usize, k: usize, temperature: f64) -> u32 {
    let neighbours = top_k_indices(similarities, k);

    // Subtracting the largest similarity leaves the argmax unchanged and keeps e^{s/T} finite
    // for any temperature.
    let max_similarity = neighbours.iter().map(|&j| similarities[j as usize]).fold(f32::NEG_INFINITY, f32::max);
    let mut scores = vec![0.0f64; num_classes];
    for &j in &neighbours {
        let s = (similarities[j as usize] - max_similarity) as f64;
        scores[labels[j as usize] as usize] += (s / temperature).exp();
    }
    // First index of the maximum: ties go to the lowest class.
    let mut best = 0;
    for (class, &score) in scores.iter().enumerate() {
        if score > scores[best] {
            best = class;
        }
    }
    best as u32
}

/// Indices of the `k` largest values (`1 <= k <= values.len()`), in no particular order;
/// ties at the k-th value are broken towards lower indices.
///
/// Selecting the k-th largest value on a plain copy and then filtering is several times faster
/// than partitioning an index array through indirect comparisons.
fn top_k_indices(values: &[f32], k: usize) -> Vec<u32> {
    if k == values.len() {
        return (0..values.len() as u32).collect();
    }
    let mut scratch = values.to_vec();
    let (_, &mut threshold, _) = scratch.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    let mut picked: Vec<u32> = Vec::with_capacity(k);
    let mut ties_left = k - values.iter().filter(|v| v.total_cmp(&threshold).is_gt()).count();
    for (i, v) in values.iter().enumerate() {
        match v.total_cmp(&threshold) {
            std::cmp::Ordering::Greater => picked.push(i as u32),
            std::cmp::Ordering::Equal if ties_left > 0 => {
                picked.push(i as u32);
                ties_left -= 1;
            }
            _ => {}
        }
    }
    picked
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn matrix(rows: &[[f32; 2]]) -> Tensor {
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        Tensor::from_vec(flat, (rows.len(), 2), &Device::Cpu).unwrap()
    }

    /// One class-0 point identical to the query (sim 1) against two class-1 points orthogonal
    /// to it (sim 0). With T = 0.1: class 0 scores e^{10} ≈ 22026, class 1 scores 2·e^0 = 2,
    /// so the weighted vote says 0 while the plain 2-to-1 majority says 1. With T = 100 the
    /// weights flatten to e^{0.01} ≈ 1.01 against 2, and the majority wins.
    #[test]
    fn weighted_vote_overrules_the_majority_at_low_temperature() {
        let train = matrix(&[[1.0, 0.0], [0.0, 1.0], [0.0, 2.0]]);
        let labels = [0, 1, 1];
        let test = matrix(&[[3.0, 0.0]]);

        let sharp = KnnConfig { k: 3, temperature: 0.1 };
        assert_eq!(knn_predict(&train, &labels, &test, 2, &sharp).unwrap(), vec![0]);

        let flat = KnnConfig { k: 3, temperature: 100.0 };
        assert_eq!(knn_predict(&train, &labels, &test, 2, &flat).unwrap(), vec![1]);
    }

    /// Only the k nearest vote: with k = 1 the nearest point decides even at a flat temperature.
    #[test]
    fn only_the_k_nearest_vote() {
        // Similarities to the query [1, 0]: 0.8, 0.6, 0.0 (rows 0,1 are unit vectors).
        let train = matrix(&[[0.8, 0.6], [0.6, 0.8], [0.0, 1.0]]);
        let labels = [0, 1, 1];
        let test = matrix(&[[1.0, 0.0]]);
        let k1 = KnnConfig { k: 1, temperature: 100.0 };
        assert_eq!(knn_predict(&train, &labels, &test, 2, &k1).unwrap(), vec![0]);
        let k3 = KnnConfig { k: 3, temperature: 100.0 };
        assert_eq!(knn_predict(&train, &labels, &test, 2, &k3).unwrap(), vec![1]);
    }

    /// k = 200 on 3 train rows behaves exactly as k = 3.
    #[test]
    fn k_larger_than_the_train_set_uses_all_rows() {
        let train = matrix(&[[1.0, 0.0], [0.0, 1.0], [0.0, 2.0]]);
        let labels = [0, 1, 1];
        let test = matrix(&[[3.0, 0.0], [0.1, 1.0], [-1.0, 0.0]]);
        let big = KnnConfig { k: 200, temperature: 100.0 };
        let exact = KnnConfig { k: 3, temperature: 100.0 };
        let expected = knn_predict(&train, &labels, &test, 2, &exact).unwrap();
        assert_eq!(knn_predict(&train, &labels, &test, 2, &big).unwrap(), expected);
        // All three rows vote and class 1 has two of them, at nearly equal weights.
        assert_eq!(expected, vec![1, 1, 1]);
    }

    /// Four tight clusters along the axes of R^4, more test rows than one chunk: accuracy 1.
    #[test]
    fn perfect_clusters_are_classified_perfectly() {
        let dims = 4;
        let make = |rows_per_class: usize, jitter_seed: u64| {
            let mut values = Vec::new();
            let mut labels = Vec::new();
            let mut state = jitter_seed;
            for i in 0..rows_per_class * dims {
                let class = i % dims;
                for d in 0..dims {
                    // Small deterministic jitter in [0, 0.1) off the cluster axis.
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let jitter = (state >> 40) as f32 / (1u64 << 24) as f32 * 0.1;
                    values.push(if d == class { 1.0 } else { jitter });
                }
                labels.push(class as u32);
            }
            (Tensor::from_vec(values, (rows_per_class * dims, dims), &Device::Cpu).unwrap(), labels)
        };
        let (train, train_labels) = make(60, 1);
        let (test, test_labels) = make(100, 2); // 400 test rows: two chunks
        let accuracy = knn_accuracy(&train, &train_labels, &test, &test_labels, dims, &KnnConfig::default()).unwrap();
        assert_eq!(accuracy, 1.0);
    }

    #[test]
    fn top_k_picks_the_largest_values_and_breaks_ties_by_index() {
        let values = [0.5, 0.9, 0.1, 0.9, 0.7, 0.9];
        let mut top = top_k_indices(&values, 2);
        top.sort();
        assert_eq!(top, vec![1, 3]);
        let mut top = top_k_indices(&values, 4);
        top.sort();
        assert_eq!(top, vec![1, 3, 4, 5]);
        assert_eq!(top_k_indices(&values, 6).len(), 6);
    }

    #[test]
    fn mismatched_inputs_are_rejected() {
        let train = matrix(&[[1.0, 0.0], [0.0, 1.0]]);
        let test = matrix(&[[1.0, 0.0]]);
        let config = KnnConfig::default();
        assert!(knn_predict(&train, &[0], &test, 2, &config).is_err(), "label count");
        assert!(knn_predict(&train, &[0, 5], &test, 2, &config).is_err(), "label range");
        let wide = Tensor::zeros((1, 3), DType::F32, &Device::Cpu).unwrap();
        assert!(knn_predict(&train, &[0, 1], &wide, 2, &config).is_err(), "dimensions");
    }
}

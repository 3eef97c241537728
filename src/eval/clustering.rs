//! Clustering quality: k-means ([`super::kmeans`]) of the L2-normalised features into as many
//! clusters as there are classes, compared with the labels by the clustering literature's three
//! figures. With `n_ij` images of class `i` in cluster `j`, `a_i = Σ_j n_ij`, `b_j = Σ_i n_ij`:
//!
//! ```text
//! NMI = I(U; V) / ((H(U) + H(V)) / 2)                    (arithmetic normalisation, as scikit-learn)
//!       I = Σ_ij (n_ij/N) log(N n_ij / (a_i b_j)),  H(U) = −Σ_i (a_i/N) log(a_i/N)
//! ARI = (Σ_ij C(n_ij,2) − E) / (½ (Σ_i C(a_i,2) + Σ_j C(b_j,2)) − E)
//!       E = Σ_i C(a_i,2) Σ_j C(b_j,2) / C(N,2)            (Hubert & Arabie 1985)
//! ACC = max over one-to-one maps m of clusters to classes of Σ_j n_{m(j) j} / N
//!       (the Hungarian algorithm, Kuhn 1955)
//! ```

use anyhow::{ensure, Result};
use candle_core::Tensor;
use pathfinding::prelude::{kuhn_munkres, Matrix};
use serde::{Deserialize, Serialize};

use super::kmeans::{kmeans, KMeansConfig};
use super::{check_labels, l2_normalize_rows};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusteringReport {
    pub clusters: usize,
    /// Normalised mutual information, 0..1.
    pub nmi: f64,
    /// Adjusted Rand index: 0 for chance, 1 for the labels' partition.
    pub ari: f64,
    /// Accuracy of the best one-to-one map of clusters to classes.
    pub accuracy: f64,
}

/// k-means of `features` (`[N, D]`, normalised here) into `num_classes` clusters, scored
/// against `labels`.
pub fn clustering(features: &Tensor, labels: &[u32], num_classes: usize, seed: u64) -> Result<ClusteringReport> {
    check_labels("clustered", features, labels, num_classes)?;
    let result = kmeans(&l2_normalize_rows(features)?, &KMeansConfig::new(num_classes, seed))?;
    partition_scores(labels, &result.assignments)
}

/// NMI, ARI and matched accuracy of the partition `clusters` against `labels`.
pub fn partition_scores(labels: &[u32], clusters: &[u32]) -> Result<ClusteringReport> {
    ensure!(labels.len() == clusters.len(), "{} labels but {} cluster assignments", labels.len(), clusters.len());
    ensure!(!labels.is_empty(), "scoring a clustering of no images");
    let rows = 1 + *labels.iter().max().expect("not empty") as usize;
    let columns = 1 + *clusters.iter().max().expect("not empty") as usize;
    let mut counts = vec![vec![0u64; columns]; rows];
    for (&label, &cluster) in labels.iter().zip(clusters) {
        counts[label as usize][cluster as usize] += 1;
    }
    Ok(ClusteringReport {
        clusters: clusters.iter().collect::<std::collections::BTreeSet<_>>().len(),
        nmi: normalized_mutual_information(&counts),
        ari: adjusted_rand_index(&counts),
        accuracy: matched_accuracy(&counts, labels.len()),
    })
}

fn marginals(counts: &[Vec<u64>]) -> (Vec<u64>, Vec<u64>) {
    let rows = counts.iter().map(|r| r.iter().sum()).collect();
    let columns = (0..counts[0].len()).map(|j| counts.iter().map(|r| r[j]).sum()).collect();
    (rows, columns)
}

fn normalized_mutual_information(counts: &[Vec<u64>]) -> f64 {
    let (a, b) = marginals(counts);
    let n = a.iter().sum::<u64>() as f64;
    let entropy = |m: &[u64]| -> f64 { m.iter().filter(|&&c| c > 0).map(|&c| c as f64 / n).map(|p| -p * p.ln()).sum() };
    let (hu, hv) = (entropy(&a), entropy(&b));
    if hu == 0.0 && hv == 0.0 {
        return 1.0; // one class, one cluster: the partitions agree
    }
    let mut mutual = 0.0;
    for (i, row) in counts.iter().enumerate() {
        for (j, &nij) in row.iter().enumerate().filter(|(_, &c)| c > 0) {
            let nij = nij as f64;
            mutual += nij / n * (n * nij / (a[i] as f64 * b[j] as f64)).ln();
        }
    }
    (mutual / ((hu + hv) / 2.0)).clamp(0.0, 1.0)
}

fn adjusted_rand_index(counts: &[Vec<u64>]) -> f64 {
    let pairs = |c: u64| (c * c.saturating_sub(1) / 2) as f64;
    let (a, b) = marginals(counts);
    let n = a.iter().sum::<u64>();
    let index: f64 = counts.iter().flatten().map(|&c| pairs(c)).sum();
    let (sum_a, sum_b) = (a.iter().map(|&c| pairs(c)).sum::<f64>(), b.iter().map(|&c| pairs(c)).sum::<f64>());
    let expected = sum_a * sum_b / pairs(n).max(1.0);
    let maximum = (sum_a + sum_b) / 2.0;
    if maximum == expected {
        return 1.0; // both partitions trivial (one group, or all singletons) and equal
    }
    (index - expected) / (maximum - expected)
}

fn matched_accuracy(counts: &[Vec<u64>], n: usize) -> f64 {
    // kuhn_munkres maximises over a matrix with no more rows than columns.
    let (rows, columns) = (counts.len(), counts[0].len());
    let weights = if rows <= columns {
        Matrix::from_fn(rows, columns, |(i, j)| counts[i][j] as i64)
    } else {
        Matrix::from_fn(columns, rows, |(j, i)| counts[i][j] as i64)
    };
    let (matched, _) = kuhn_munkres(&weights);
    matched as f64 / n as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Labels, clusters, and the expected NMI, ARI and matched accuracy.
    type Case = (&'static [u32], &'static [u32], f64, f64, f64);

    /// Expected values from scikit-learn 1.x (`normalized_mutual_info_score`,
    /// `adjusted_rand_score`) and scipy's `linear_sum_assignment` on the contingency table.
    #[test]
    fn scores_match_scikit_learn() {
        let cases: [Case; 4] = [
            (&[0, 0, 0, 1, 1, 1], &[0, 0, 1, 1, 2, 2], 0.5158037429793889, 0.24242424242424243, 4.0 / 6.0),
            (&[0, 0, 1, 1], &[0, 0, 1, 2], 0.8, 0.5714285714285714, 0.75),
            (&[0, 0, 1, 1, 2, 2, 2, 1], &[1, 1, 0, 0, 2, 2, 0, 0], 0.7550042924856722, 0.5454545454545454, 0.875),
            (&[0, 1, 2, 0, 1, 2, 0, 1, 2, 2], &[0, 0, 0, 1, 1, 1, 2, 2, 2, 2], 0.012714017928048455, -0.25, 0.4),
        ];
        for (labels, clusters, nmi, ari, accuracy) in cases {
            let report = partition_scores(labels, clusters).unwrap();
            assert!((report.nmi - nmi).abs() < 1e-12, "{labels:?} {clusters:?}: {report:?}");
            assert!((report.ari - ari).abs() < 1e-12, "{labels:?} {clusters:?}: {report:?}");
            assert!((report.accuracy - accuracy).abs() < 1e-12, "{labels:?} {clusters:?}: {report:?}");
        }
    }

    #[test]
    fn renamed_clusters_score_perfectly_and_trivial_partitions_are_defined() {
        let report = partition_scores(&[0, 0, 1, 1, 2], &[2, 2, 0, 0, 1]).unwrap();
        assert_eq!((report.nmi, report.ari, report.accuracy, report.clusters), (1.0, 1.0, 1.0, 3));
        let one = partition_scores(&[0, 0, 0], &[0, 0, 0]).unwrap();
        assert_eq!((one.nmi, one.ari, one.accuracy), (1.0, 1.0, 1.0));
    }

    #[test]
    fn separated_features_are_clustered_as_labelled() {
        // Two directions on the unit circle, scaled differently: normalisation makes them two
        // tight clusters whatever the scale.
        let rows: Vec<f32> =
            (0..20).flat_map(|i| if i % 2 == 0 { [1.0 + i as f32, 0.1] } else { [0.1, 0.5] }).collect();
        let labels: Vec<u32> = (0..20).map(|i| (i % 2) as u32).collect();
        let features = Tensor::from_vec(rows, (20, 2), &Device::Cpu).unwrap();
        let report = clustering(&features, &labels, 2, 0).unwrap();
        assert_eq!((report.nmi, report.ari, report.accuracy), (1.0, 1.0, 1.0));
    }
}

//! Cluster-level contrastive loss of Contrastive Clustering. Li, Hu, Liu, Peng, Zhou & Peng,
//! "Contrastive Clustering", AAAI 2021.
//!
//! A cluster head maps each view of a batch of N images to soft assignments over M clusters,
//! `Y^a, Y^b ∈ R^{N×M}` (rows sum to 1). Column `y_i` of `Y` is cluster i's representation: which
//! images of the batch it holds. The same cluster seen through the two views is a positive pair,
//! the other 2M − 2 columns are negatives (NT-Xent over columns, cosine similarity), and the
//! entropy of the cluster sizes keeps every cluster in use:
//!
//! ```text
//! L = (1/2M) Σ_i (ℓ̂_i^a + ℓ̂_i^b) − H(Y),   ℓ̂_i^a = −log( e^{s(y_i^a, y_i^b)} / Σ_{k≠i^a} e^{s(y_i^a, ·_k)} )
//! H(Y) = −Σ_i [P(y_i^a) log P(y_i^a) + P(y_i^b) log P(y_i^b)],   P(y_i) = Σ_t Y_ti / Σ Y
//! ```
//!
//! with `s(a, b) = cos(a, b) / τ_C`, τ_C = 1. As in the authors' code, each view's entropy enters as
//! `log M − H`, which is 0 for equal clusters, so the loss stays non-negative.

use candle_core::{bail, Result, Tensor, D};

use super::common::{expect_float_matrix, expect_same_shape};
use super::nt_xent;

/// The cluster-level loss of the two views' soft assignments `[N, M]`.
pub fn cluster_contrast(assignments_a: &Tensor, assignments_b: &Tensor, temperature: f64) -> Result<Tensor> {
    let (_, clusters) = expect_float_matrix("cluster assignments", assignments_a)?;
    expect_same_shape("assignments of view a", assignments_a, "assignments of view b", assignments_b)?;
    if clusters < 2 {
        bail!("contrastive clustering needs at least 2 clusters, got {clusters}")
    }
    let columns = nt_xent(&assignments_a.t()?.contiguous()?, &assignments_b.t()?.contiguous()?, temperature)?;
    columns + size_entropy_gap(assignments_a)? + size_entropy_gap(assignments_b)?
}

/// `log M − H(P)` of the cluster sizes `P(y_i) = Σ_t Y_ti / Σ Y`: 0 when every cluster holds the
/// same share of the batch, `log M` when one holds all of it.
fn size_entropy_gap(assignments: &Tensor) -> Result<Tensor> {
    let sizes = assignments.sum(0)?;
    let p = sizes.broadcast_div(&sizes.sum_all()?)?;
    let clusters = p.dim(D::Minus1)? as f64;
    // p log p with p floored away from 0 so an empty cluster adds 0, not NaN, to the gradient.
    let p_log_p = (&p * p.maximum(1e-12)?.log()?)?.sum_all()?;
    p_log_p.affine(1.0, clusters.ln())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::loss::testing::*;

    /// The paper's loss written out over the columns.
    fn reference(a: &[Vec<f64>], b: &[Vec<f64>], temperature: f64) -> f64 {
        let m = a[0].len();
        let column = |y: &[Vec<f64>], i: usize| -> Vec<f64> { y.iter().map(|row| row[i]).collect() };
        let columns: Vec<Vec<f64>> = (0..m).map(|i| column(a, i)).chain((0..m).map(|i| column(b, i))).collect();
        let mut total = 0.0;
        for i in 0..2 * m {
            let s = |k: usize| cosine(&columns[i], &columns[k]) / temperature;
            let denominator: f64 = (0..2 * m).filter(|&k| k != i).map(|k| s(k).exp()).sum();
            total -= (s((i + m) % (2 * m)).exp() / denominator).ln();
        }
        let gap = |y: &[Vec<f64>]| {
            let sums: Vec<f64> = (0..m).map(|i| column(y, i).iter().sum()).collect();
            let all: f64 = sums.iter().sum();
            (m as f64).ln() + sums.iter().map(|s| s / all * (s / all).ln()).sum::<f64>()
        };
        total / (2 * m) as f64 + gap(a) + gap(b)
    }

    fn softmax_rows(rows: &[Vec<f64>]) -> Vec<Vec<f64>> {
        rows.iter()
            .map(|r| {
                let total: f64 = r.iter().map(|x| x.exp()).sum();
                r.iter().map(|x| x.exp() / total).collect()
            })
            .collect()
    }

    #[test]
    fn matches_the_paper_and_its_gradient() -> Result<()> {
        let a = softmax_rows(&[vec![1.0, 0.2, -0.5], vec![-0.3, 0.8, 0.1], vec![0.4, -0.6, 0.9], vec![2.0, 0.0, 0.0]]);
        let b = softmax_rows(&[vec![0.9, 0.1, -0.2], vec![-0.5, 1.1, 0.3], vec![0.2, -0.2, 1.5], vec![1.0, 0.5, 0.0]]);
        for temperature in [1.0, 0.5] {
            let loss = cluster_contrast(&matrix(&a), &matrix(&b), temperature)?.to_scalar::<f64>()?;
            let expected = reference(&a, &b, temperature);
            assert!((loss - expected).abs() < 1e-10, "τ {temperature}: {loss} vs {expected}");
        }
        assert_gradients_match_finite_differences(&[matrix(&a), matrix(&b)], &[0, 1], |x| {
            cluster_contrast(&x[0], &x[1], 1.0)
        });
        Ok(())
    }

    #[test]
    fn equal_cluster_sizes_add_no_entropy_term_and_one_cluster_adds_log_m() -> Result<()> {
        let even = matrix(&[vec![0.7, 0.3], vec![0.3, 0.7]]);
        assert!(size_entropy_gap(&even)?.to_scalar::<f64>()?.abs() < 1e-12);
        let collapsed = matrix(&[vec![1.0, 0.0], vec![1.0, 0.0]]);
        assert!((size_entropy_gap(&collapsed)?.to_scalar::<f64>()? - 2f64.ln()).abs() < 1e-12);
        Ok(())
    }
}

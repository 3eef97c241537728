//! Balanced contrastive loss, BCL. Zhu, Wang, Chen, Chen & Jiang, "Balanced Contrastive Learning
//! for Long-Tailed Visual Recognition", CVPR 2022.
//!
//! SupCon's denominator sums over every view, so a long-tailed batch's head classes dominate
//! each anchor's gradient. BCL makes two changes: class-averaging, where each class's terms in
//! the denominator are averaged over that class's members (every class weighs the same), and
//! class-complement, where the `C` learnable class centres `c_1..c_C` join every batch so that
//! every class is present. With `B_j` the views of class `j` in the batch plus centre `c_j`, and
//! the anchor left out of its own class:
//!
//! ```text
//! ℓ_i = −1/|B_{y_i}∖{i}| Σ_{p ∈ B_{y_i}∖{i}} log( e^{z_i·z_p/τ} / Σ_j (1/|B_j∖{i}|) Σ_{k ∈ B_j∖{i}} e^{z_i·z_k/τ} )
//! ```
//!
//! with normalised `z` and centres. Every anchor has a positive, its class's centre.

use candle_core::{bail, Result, Tensor};

use super::common::{expect_float_matrix, expect_positive, l2_normalize, one_hot, weighted_positive_log_likelihood};
use crate::train::pairs::label_positive_mask;

/// BCL of `features` `[M, D]` with `labels` `[M]` and learnable `centres` `[C, D]` (both
/// normalised here).
pub fn bcl(features: &Tensor, labels: &Tensor, centres: &Tensor, temperature: f64) -> Result<Tensor> {
    let (views, dim) = expect_float_matrix("features", features)?;
    let (classes, centre_dim) = expect_float_matrix("class centres", centres)?;
    if centre_dim != dim {
        bail!("class centres have {centre_dim} dimensions but the features {dim}")
    }
    if labels.dims() != [views] {
        bail!("labels must have shape [{views}] (one per feature row), got {:?}", labels.dims())
    }
    expect_positive("temperature", temperature)?;
    let z = l2_normalize(features)?;
    let c = l2_normalize(&centres.to_dtype(z.dtype())?)?;
    let logits = (z.matmul(&Tensor::cat(&[&z, &c], 0)?.t()?)? / temperature)?;
    // Column labels: the views', then 0..C for the centres.
    let dtype = z.dtype();
    let view_classes = one_hot(labels, classes, dtype)?; // [M, C]
    let column_classes = Tensor::cat(&[&view_classes, &Tensor::eye(classes, dtype, z.device())?], 0)?; // [M+C, C]
    let class_sizes = column_classes.sum(0)?; // views of each class plus its centre
    let same_class = label_positive_mask(labels)?.to_dtype(dtype)?;
    let positives = Tensor::cat(&[&same_class, &view_classes], 1)?;
    // |B_j∖{i}| for each column's class j: the class's size, less one in the anchor's own class.
    let column_size = column_classes.matmul(&class_sizes.unsqueeze(1)?)?.squeeze(1)?; // [M+C]
    let own_class = Tensor::cat(&[(&same_class + Tensor::eye(views, dtype, z.device())?)?, view_classes.clone()], 1)?;
    let sizes = column_size.unsqueeze(0)?.broadcast_sub(&own_class)?;
    let not_self = Tensor::cat(
        &[
            (Tensor::ones((views, views), dtype, z.device())? - Tensor::eye(views, dtype, z.device())?)?,
            Tensor::ones((views, classes), dtype, z.device())?,
        ],
        1,
    )?;
    let denominator = (not_self / sizes.maximum(1.0)?)?;
    weighted_positive_log_likelihood(&logits, &positives, &denominator)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::loss::testing::*;
    use candle_core::Device;

    /// The paper's formula written out per anchor.
    fn reference(features: &[Vec<f64>], labels: &[u32], centres: &[Vec<f64>], temperature: f64) -> f64 {
        let mut columns: Vec<(Vec<f64>, u32)> =
            features.iter().map(|f| normalize(f)).zip(labels.iter().copied()).collect();
        columns.extend(centres.iter().enumerate().map(|(c, v)| (normalize(v), c as u32)));
        let mut total = 0.0;
        for i in 0..features.len() {
            let zi = &columns[i].0;
            let s = |k: usize| dot(zi, &columns[k].0) / temperature;
            let members = |class: u32| -> Vec<usize> {
                (0..columns.len()).filter(|&k| k != i && columns[k].1 == class).collect()
            };
            let denominator: f64 = (0..centres.len() as u32)
                .map(|class| {
                    let m = members(class);
                    m.iter().map(|&k| s(k).exp()).sum::<f64>() / m.len() as f64
                })
                .sum();
            let positives = members(labels[i]);
            total -= positives.iter().map(|&p| (s(p).exp() / denominator).ln()).sum::<f64>() / positives.len() as f64;
        }
        total / features.len() as f64
    }

    #[test]
    fn matches_the_paper_and_its_gradient() -> Result<()> {
        let features = six_features();
        // Class 0 has three views, 1 two, 2 one, 3 none (only its centre).
        let labels = [0u32, 1, 0, 2, 1, 0];
        let centres = vec![vec![0.5, 0.5, 0.1], vec![-1.0, 0.3, 0.2], vec![0.1, -0.9, 0.4], vec![0.3, 0.3, -1.0]];
        let (z, y, c) = (matrix(&features), Tensor::new(&labels, &Device::Cpu)?, matrix(&centres));
        for temperature in [0.1, 0.5] {
            let loss = bcl(&z, &y, &c, temperature)?.to_scalar::<f64>()?;
            let expected = reference(&features, &labels, &centres, temperature);
            assert!((loss - expected).abs() < 1e-10, "τ {temperature}: {loss} vs {expected}");
        }
        assert_gradients_match_finite_differences(&[z, c], &[0, 1], |x| bcl(&x[0], &y, &x[1], 0.3));
        Ok(())
    }
}

//! 4. Losses, one file per loss, its formula and paper in the doc comment.

pub mod bcl;
pub mod byol;
pub mod cluster_contrast;
pub mod common;
pub mod dcl;
pub mod debiased;
pub mod dino;
pub mod hinge;
pub mod hybrid;
pub mod info_nce;
pub mod instance;
pub mod nt_xent;
pub mod paco;
pub mod proto_nce;
pub mod simsiam;
pub mod supcon;
pub mod swav;
pub mod tsc;

pub use bcl::bcl;
pub use byol::byol;
pub use cluster_contrast::cluster_contrast;
pub use common::{cross_entropy, l2_normalize};
pub use dcl::{dcl, dclw};
pub use debiased::debiased_info_nce;
pub use dino::{dino, DinoCenter};
pub use hinge::hinge;
pub use hybrid::hybrid;
pub use info_nce::{info_nce, info_nce_in_batch, info_nce_with_queue};
pub use instance::ContrastLoss;
pub use nt_xent::nt_xent;
pub use paco::paco;
pub use simsiam::simsiam;
pub use supcon::{supcon, supcon_with_positives};
pub use swav::{sinkhorn_knopp, swapped_prediction};

/// Test helpers shared by every loss's tests: central finite differences and plain-`f64`
/// vector arithmetic for the independent reference formulas.
#[cfg(test)]
pub(crate) mod testing {
    use candle_core::{Device, Result, Tensor, Var};

    use crate::train::pairs::Contrast;

    /// SimCLR's problem for two views (see [`Contrast::in_batch`]).
    pub fn pair(z1: &Tensor, z2: &Tensor) -> Contrast {
        Contrast::in_batch(z1, z2).expect("two views of one shape")
    }

    /// [`pair`] of two views given as rows.
    pub fn in_batch(z1: &[Vec<f64>], z2: &[Vec<f64>]) -> Contrast {
        pair(&matrix(z1), &matrix(z2))
    }

    /// A matrix as rows of plain numbers, the form the reference formulas work on.
    pub type Rows = Vec<Vec<f64>>;

    /// An F64 `[rows, cols]` tensor from nested vectors.
    pub fn matrix(rows: &[Vec<f64>]) -> Tensor {
        let cols = rows[0].len();
        let flat: Vec<f64> = rows.iter().flatten().copied().collect();
        Tensor::from_vec(flat, (rows.len(), cols), &Device::Cpu).expect("matrix shape")
    }

    /// Two views of three samples in three dimensions, shared by the pairwise losses' tests.
    pub fn two_view_example() -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
        let z1 = vec![vec![1.0, 0.2, -0.5], vec![-0.3, 0.8, 0.1], vec![0.4, -0.6, 0.9]];
        let z2 = vec![vec![0.9, 0.1, -0.2], vec![-0.5, 1.1, 0.3], vec![0.2, -0.2, 1.5]];
        (z1, z2)
    }

    /// The six rows of [`two_view_example`] as one batch of features.
    pub fn six_features() -> Rows {
        let (z1, z2) = two_view_example();
        z1.into_iter().chain(z2).collect()
    }

    pub fn dot(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    pub fn normalize(v: &[f64]) -> Vec<f64> {
        let norm = dot(v, v).sqrt();
        v.iter().map(|x| x / norm).collect()
    }

    pub fn cosine(a: &[f64], b: &[f64]) -> f64 {
        dot(&normalize(a), &normalize(b))
    }

    /// `log Σ exp(x)`, stabilised.
    pub fn log_sum_exp(xs: &[f64]) -> f64 {
        let max = xs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        max + xs.iter().map(|x| (x - max).exp()).sum::<f64>().ln()
    }

    /// Checks the backward pass of `loss` (a scalar function of `inputs`, all F64) against
    /// central finite differences, for the inputs whose index is in `checked`.
    pub fn assert_gradients_match_finite_differences(
        inputs: &[Tensor],
        checked: &[usize],
        loss: impl Fn(&[Tensor]) -> Result<Tensor>,
    ) {
        const STEP: f64 = 1e-5;
        const TOLERANCE: f64 = 1e-6;
        let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
        let var_tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let grads = loss(&var_tensors).unwrap().backward().unwrap();
        for &index in checked {
            let input = &inputs[index];
            let analytic = grads
                .get(&var_tensors[index])
                .unwrap_or_else(|| panic!("input {index} received no gradient"))
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let values = input.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let loss_with = |element: usize, delta: f64| -> f64 {
                let mut shifted = values.clone();
                shifted[element] += delta;
                let mut args = inputs.to_vec();
                args[index] = Tensor::from_vec(shifted, input.shape(), input.device()).unwrap();
                loss(&args).unwrap().to_scalar::<f64>().unwrap()
            };
            for (element, &analytic) in analytic.iter().enumerate() {
                let numeric = (loss_with(element, STEP) - loss_with(element, -STEP)) / (2.0 * STEP);
                let error = (numeric - analytic).abs();
                assert!(
                    error < TOLERANCE * (1.0 + numeric.abs()),
                    "input {index} element {element}: analytic {} vs finite differences {numeric}",
                    analytic
                );
            }
        }
    }
}

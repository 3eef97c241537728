//! ProtoNCE's prototype term. Li, Zhou, Xiong & Hoi, "Prototypical Contrastive Learning of
//! Unsupervised Representations", ICLR 2021.
//!
//! After k-means with `K_m` clusters (m = 1..M) on the momentum encoder's projections, each
//! query `v` is pulled to its cluster's prototype `c_s` against the other prototypes, each scored
//! at its own concentration `φ` (a loose cluster gets a higher temperature):
//!
//! ```text
//! L_ProtoNCE = L_InfoNCE + (1/M) Σ_m −log( e^{v·c_s^m / φ_s^m} / Σ_j e^{v·c_j^m / φ_j^m} )
//! φ = Σ_{z=1..Z} ‖v'_z − c‖ / (Z log(Z + α)),   α = 10
//! ```
//!
//! As in the authors' code, a cluster of one point takes the largest φ, the φ's are clamped to
//! their 10th–90th percentiles and scaled so that their mean is the InfoNCE temperature τ.

use candle_core::{bail, Result, Tensor};

use super::common::{cross_entropy, expect_float_matrix, l2_normalize, one_hot, weighted_positive_log_likelihood};

/// The smoothing `α` of the concentration estimate.
pub const CONCENTRATION_ALPHA: f64 = 10.0;

/// The prototype term of one clustering: `queries` `[N, D]` (normalised here), unit `prototypes`
/// `[K, D]`, their `concentration` `[K]` and each query's cluster `assignments` `[N]`.
pub fn prototype_term(
    queries: &Tensor,
    prototypes: &Tensor,
    concentration: &Tensor,
    assignments: &Tensor,
) -> Result<Tensor> {
    selected_prototype_term(queries, prototypes, concentration, assignments, None)
}

/// [`prototype_term`] with only the negative prototypes `selected` (`[N, K]`, 1 or 0) marks in
/// each query's denominator; its own prototype always stays (HCSC's prototype selection).
pub fn selected_prototype_term(
    queries: &Tensor,
    prototypes: &Tensor,
    concentration: &Tensor,
    assignments: &Tensor,
    selected: Option<&Tensor>,
) -> Result<Tensor> {
    let (_, dim) = expect_float_matrix("queries", queries)?;
    let (clusters, prototype_dim) = expect_float_matrix("prototypes", prototypes)?;
    if prototype_dim != dim || concentration.dims() != [clusters] {
        bail!(
            "{clusters} prototypes of {prototype_dim} dimensions with {:?} concentrations for {dim}-d queries",
            concentration.dims()
        )
    }
    let v = l2_normalize(queries)?;
    let dtype = v.dtype();
    let logits = v
        .matmul(&prototypes.to_dtype(dtype)?.detach().t()?)?
        .broadcast_div(&concentration.to_dtype(dtype)?.detach().unsqueeze(0)?)?;
    let Some(selected) = selected else { return cross_entropy(&logits, assignments) };
    let own = one_hot(assignments, clusters, dtype)?;
    let denominator = selected.to_dtype(dtype)?.maximum(&own)?;
    weighted_positive_log_likelihood(&logits, &own, &denominator)
}

/// Each cluster's `φ` from the distances of its members to its centroid, clamped and scaled to
/// mean `temperature` (see the module's doc). Empty clusters get the largest `φ` as well.
pub fn concentrations(distances: &[Vec<f64>], temperature: f64) -> Vec<f64> {
    let raw: Vec<Option<f64>> = distances
        .iter()
        .map(|d| {
            (d.len() > 1)
                .then(|| d.iter().sum::<f64>() / (d.len() as f64 * (d.len() as f64 + CONCENTRATION_ALPHA).ln()))
        })
        .collect();
    let largest = raw.iter().flatten().cloned().fold(f64::NEG_INFINITY, f64::max);
    let largest = if largest.is_finite() { largest } else { 1.0 };
    let mut phi: Vec<f64> = raw.into_iter().map(|p| p.unwrap_or(largest)).collect();
    let (low, high) = (percentile(&phi, 10.0), percentile(&phi, 90.0));
    phi.iter_mut().for_each(|p| *p = p.clamp(low, high));
    let mean = phi.iter().sum::<f64>() / phi.len() as f64;
    phi.into_iter().map(|p| if mean > 0.0 { temperature * p / mean } else { temperature }).collect()
}

/// numpy's default (linear) percentile.
fn percentile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let position = q / 100.0 * (sorted.len() - 1) as f64;
    let (below, fraction) = (position.floor() as usize, position.fract());
    let above = (below + 1).min(sorted.len() - 1);
    sorted[below] + fraction * (sorted[above] - sorted[below])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::loss::testing::*;
    use candle_core::Device;

    #[test]
    fn prototype_term_matches_the_definition_and_its_gradient() -> Result<()> {
        let queries = vec![vec![1.0, 0.2, -0.5], vec![-0.3, 0.8, 0.1], vec![0.4, -0.6, 0.9]];
        let prototypes: Vec<Vec<f64>> =
            [vec![1.0, 0.0, 0.0], vec![0.0, 1.0, 0.0], vec![0.0, 0.6, 0.8]].iter().map(|p| normalize(p)).collect();
        let phi = [0.1, 0.3, 0.2];
        let assignments = [0u32, 1, 2];
        let mut expected = 0.0;
        for (q, &s) in queries.iter().zip(&assignments) {
            let logits: Vec<f64> = prototypes.iter().zip(&phi).map(|(c, f)| dot(&normalize(q), c) / f).collect();
            expected += log_sum_exp(&logits) - logits[s as usize];
        }
        expected /= 3.0;
        let (c, f, a) =
            (matrix(&prototypes), Tensor::new(&phi, &Device::Cpu)?, Tensor::new(&assignments, &Device::Cpu)?);
        let loss = prototype_term(&matrix(&queries), &c, &f, &a)?.to_scalar::<f64>()?;
        assert!((loss - expected).abs() < 1e-10, "{loss} vs {expected}");
        assert_gradients_match_finite_differences(&[matrix(&queries)], &[0], |x| prototype_term(&x[0], &c, &f, &a));
        Ok(())
    }

    #[test]
    fn a_selection_leaves_unselected_prototypes_out_but_keeps_the_own_one() -> Result<()> {
        let queries = matrix(&[vec![1.0, 0.2], vec![-0.3, 0.8]]);
        let prototypes = matrix(&[vec![1.0, 0.0], vec![0.0, 1.0], vec![-1.0, 0.0]]);
        let phi = Tensor::new(&[0.2f64, 0.2, 0.2], &Device::Cpu)?;
        let assignments = Tensor::new(&[0u32, 1], &Device::Cpu)?;
        // Query 0 drops prototype 2, query 1 drops prototype 0; query 1's own prototype (1) is
        // marked 0 but stays.
        let selected = Tensor::new(&[[1.0f64, 1.0, 0.0], [0.0, 0.0, 1.0]], &Device::Cpu)?;
        let loss =
            selected_prototype_term(&queries, &prototypes, &phi, &assignments, Some(&selected))?.to_scalar::<f64>()?;
        let (q0, q1) = (normalize(&[1.0, 0.2]), normalize(&[-0.3, 0.8]));
        let l0 = log_sum_exp(&[q0[0] / 0.2, q0[1] / 0.2]) - q0[0] / 0.2;
        let l1 = log_sum_exp(&[q1[1] / 0.2, -q1[0] / 0.2]) - q1[1] / 0.2;
        assert!((loss - (l0 + l1) / 2.0).abs() < 1e-10, "{loss}");
        Ok(())
    }

    #[test]
    fn concentrations_follow_the_papers_estimate() {
        // Two members at distances 1 and 3: Σ/(Z log(Z + 10)) = 4 / (2 ln 12); three at 1: 3 / (3 ln 13).
        let raw = [4.0 / (2.0 * 12f64.ln()), 3.0 / (3.0 * 13f64.ln())];
        // The singleton takes the larger; with three values the 10th/90th percentiles clamp the
        // ends towards the middle one, then the mean is scaled to 0.2.
        let phi = concentrations(&[vec![1.0, 3.0], vec![1.0, 1.0, 1.0], vec![0.5]], 0.2);
        let values = [raw[0], raw[1], raw[0]];
        let (low, high) = (raw[1] + 0.2 * (raw[0] - raw[1]), raw[0]);
        let clamped: Vec<f64> = values.iter().map(|v| v.clamp(low, high)).collect();
        let mean = clamped.iter().sum::<f64>() / 3.0;
        for (got, want) in phi.iter().zip(clamped.iter().map(|v| 0.2 * v / mean)) {
            assert!((got - want).abs() < 1e-12, "{phi:?}");
        }
        assert!((phi.iter().sum::<f64>() / 3.0 - 0.2).abs() < 1e-12);
    }
}

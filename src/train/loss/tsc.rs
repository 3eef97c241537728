//! Targeted supervised contrastive loss, TSC. Li, Cao, Yang, Liu, Zhang, Feng & Zhao,
//! "Targeted Supervised Contrastive Learning for Long-Tailed Recognition", CVPR 2022.
//!
//! On a long-tailed set the head classes take most of the hypersphere and the tail classes are
//! squeezed together. TSC fixes `C` targets `u_1..u_C` spread uniformly on the sphere before
//! training (they minimise `L_u = Σ_i log Σ_{j≠i} e^{u_i·u_j / τ_u}`; for `C ≤ D` the optimum is
//! the regular simplex, `u_i·u_j = −1/(C−1)`), assigns them to classes by matching class centres
//! to targets (Hungarian, re-done during training), and pulls each anchor to its class's target:
//!
//! ```text
//! L = L_KCL + λ · mean_i −log( e^{z_i·u_{y_i}/τ} / ( Σ_{a≠i} e^{z_i·z_a/τ} + Σ_c e^{z_i·u_c/τ} ) )
//! ```
//!
//! with normalised `z` and `L_KCL` SupCon on k-positive pairs ([`crate::train::pairs::k_positives`]).

use candle_core::{bail, DType, Result, Tensor};
use pathfinding::prelude::{kuhn_munkres, Matrix};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

use super::common::{expect_float_matrix, expect_positive, l2_normalize, one_hot, weighted_positive_log_likelihood};
use super::supcon::off_diagonal;

/// Temperature of the uniformity objective the targets minimise (the paper's code: 0.1).
const UNIFORMITY_TEMPERATURE: f64 = 0.1;

/// `classes` unit vectors of `dim` dimensions spread as far apart as they go: the regular simplex
/// when `classes ≤ dim`, else seeded points moved by gradient descent on the uniformity objective.
pub fn uniform_targets(classes: usize, dim: usize, seed: u64) -> Result<Vec<Vec<f64>>> {
    if classes < 2 || dim < 2 {
        bail!("targets need at least 2 classes in at least 2 dimensions, got {classes} in {dim}")
    }
    if classes <= dim {
        // e_c minus the centroid of the e's, normalised.
        let centre = 1.0 / classes as f64;
        let norm = ((1.0 - centre).powi(2) + (classes - 1) as f64 * centre * centre).sqrt();
        return Ok((0..classes)
            .map(|c| {
                (0..dim)
                    .map(|d| {
                        if d >= classes {
                            0.0
                        } else if d == c {
                            (1.0 - centre) / norm
                        } else {
                            -centre / norm
                        }
                    })
                    .collect()
            })
            .collect());
    }
    // Gradient descent on the sphere can stall with two points on top of each other (their
    // repulsion is radial there); several seeded starts, keeping the lowest objective, avoid it.
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut best: Option<(f64, Vec<Vec<f64>>)> = None;
    for _ in 0..4 {
        let start: Vec<Vec<f64>> =
            (0..classes).map(|_| normalize((0..dim).map(|_| StandardNormal.sample(&mut rng)).collect())).collect();
        let (objective, points) = spread_on_sphere(start);
        if best.as_ref().is_none_or(|(lowest, _)| objective < *lowest) {
            best = Some((objective, points));
        }
    }
    Ok(best.expect("at least one start").1)
}

/// Moves `points` along the sphere down the uniformity objective; returns it and the points.
fn spread_on_sphere(mut points: Vec<Vec<f64>>) -> (f64, Vec<Vec<f64>>) {
    const STEPS: usize = 2000;
    const STEP_SIZE: f64 = 1e-3;
    let n = points.len();
    let mut objective = f64::INFINITY;
    for _ in 0..=STEPS {
        // softmax[i][j] of u_i·u_j/τ over j ≠ i, and Σ_i log Σ_{j≠i} e^{u_i·u_j/τ}.
        objective = 0.0;
        let mut softmax = vec![vec![0.0; n]; n];
        for i in 0..n {
            let logits: Vec<f64> = (0..n)
                .map(|j| if i == j { f64::NEG_INFINITY } else { dot(&points[i], &points[j]) / UNIFORMITY_TEMPERATURE })
                .collect();
            let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let total: f64 = logits.iter().map(|l| (l - max).exp()).sum();
            objective += max + total.ln();
            for j in 0..n {
                softmax[i][j] = (logits[j] - max).exp() / total;
            }
        }
        // The gradient for u_i holds both terms with u_i in them; only its part along the
        // sphere moves the point.
        points = (0..n)
            .map(|i| {
                let mut grad = vec![0.0; points[i].len()];
                for j in (0..n).filter(|&j| j != i) {
                    let weight = (softmax[i][j] + softmax[j][i]) / UNIFORMITY_TEMPERATURE;
                    grad.iter_mut().zip(&points[j]).for_each(|(g, v)| *g += weight * v);
                }
                let radial = dot(&grad, &points[i]);
                normalize(points[i].iter().zip(&grad).map(|(u, g)| u - STEP_SIZE * (g - radial * u)).collect())
            })
            .collect();
    }
    (objective, points)
}

/// The target index of each class: the assignment of `centres` (one per class, any norm) to
/// `targets` that maximises the total cosine similarity (Hungarian matching, as in the paper).
/// A class without a centre yet (all zeros) takes whatever target is left.
pub fn assign_targets(centres: &[Vec<f64>], targets: &[Vec<f64>]) -> Result<Vec<usize>> {
    if centres.len() != targets.len() {
        bail!("{} class centres cannot be matched to {} targets", centres.len(), targets.len())
    }
    // kuhn_munkres maximises integer weights: cosines in millionths.
    let weights = Matrix::from_fn(centres.len(), targets.len(), |(c, t)| {
        let norm = dot(&centres[c], &centres[c]).sqrt();
        let cosine = if norm > 0.0 { dot(&centres[c], &targets[t]) / norm } else { 0.0 };
        (cosine * 1e6).round() as i64
    });
    Ok(kuhn_munkres(&weights).1)
}

/// The target term of TSC for `features` `[M, D]` (normalised here) with `labels` `[M]` and
/// `class_targets` `[C, D]`, row `c` the unit target assigned to class `c`.
pub fn target_term(features: &Tensor, labels: &Tensor, class_targets: &Tensor, temperature: f64) -> Result<Tensor> {
    let (views, dim) = expect_float_matrix("features", features)?;
    let (classes, target_dim) = expect_float_matrix("class targets", class_targets)?;
    if target_dim != dim {
        bail!("targets have {target_dim} dimensions but the features {dim}")
    }
    expect_positive("temperature", temperature)?;
    let z = l2_normalize(features)?;
    let targets = class_targets.to_dtype(z.dtype())?.detach();
    let logits = (Tensor::cat(&[z.matmul(&z.t()?)?, z.matmul(&targets.t()?)?], 1)? / temperature)?;
    let positives = Tensor::cat(
        &[Tensor::zeros((views, views), DType::F32, z.device())?, one_hot(labels, classes, DType::F32)?],
        1,
    )?;
    let denominator =
        Tensor::cat(&[off_diagonal(views, z.device())?, Tensor::ones((views, classes), DType::F32, z.device())?], 1)?;
    weighted_positive_log_likelihood(&logits, &positives, &denominator)
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn normalize(v: Vec<f64>) -> Vec<f64> {
    let norm = dot(&v, &v).sqrt().max(1e-12);
    v.into_iter().map(|x| x / norm).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::loss::testing::{assert_gradients_match_finite_differences, log_sum_exp, matrix};
    use candle_core::Device;

    fn largest_cosine(points: &[Vec<f64>]) -> f64 {
        let mut largest = f64::NEG_INFINITY;
        for i in 0..points.len() {
            assert!((dot(&points[i], &points[i]) - 1.0).abs() < 1e-9, "unit length");
            for j in i + 1..points.len() {
                largest = largest.max(dot(&points[i], &points[j]));
            }
        }
        largest
    }

    #[test]
    fn targets_are_the_simplex_or_the_known_optimum() -> Result<()> {
        // The regular simplex: every pair at cosine −1/(C−1).
        let simplex = uniform_targets(10, 64, 0)?;
        for i in 0..10 {
            for j in (0..10).filter(|&j| j != i) {
                assert!((dot(&simplex[i], &simplex[j]) + 1.0 / 9.0).abs() < 1e-12);
            }
        }
        // More points than dimensions: 4 in 2-D make a square and 6 in 3-D an octahedron (closest
        // pairs at right angles), 12 in 3-D an icosahedron (closest pairs at cosine 1/√5).
        for (classes, dim, expected) in [(4, 2, 0.0), (6, 3, 0.0), (12, 3, 1.0 / 5f64.sqrt())] {
            for seed in 0..3 {
                let largest = largest_cosine(&uniform_targets(classes, dim, seed)?);
                assert!((largest - expected).abs() < 1e-3, "{classes} in {dim}-D, seed {seed}: {largest}");
            }
        }
        Ok(())
    }

    #[test]
    fn assignment_maximises_the_total_cosine() -> Result<()> {
        let targets = vec![vec![1.0, 0.0], vec![0.0, 1.0], vec![-1.0, 0.0]];
        // Class 0 is nearest target 1, class 1 target 2; class 2 lies between targets 0 and 1 but
        // nearer 1, which class 0 needs more: the best total gives class 2 target 0.
        let centres = vec![vec![0.1, 1.0], vec![-2.0, 0.1], vec![0.8, 0.9]];
        assert_eq!(assign_targets(&centres, &targets)?, vec![1, 2, 0]);
        assert!(assign_targets(&centres[..2], &targets).is_err());
        Ok(())
    }

    /// The paper's target term written out per anchor.
    fn reference(features: &[Vec<f64>], labels: &[u32], targets: &[Vec<f64>], temperature: f64) -> f64 {
        let z: Vec<Vec<f64>> = features.iter().map(|f| normalize(f.clone())).collect();
        let mut total = 0.0;
        for i in 0..z.len() {
            let mut terms: Vec<f64> =
                (0..z.len()).filter(|&a| a != i).map(|a| dot(&z[i], &z[a]) / temperature).collect();
            terms.extend(targets.iter().map(|u| dot(&z[i], u) / temperature));
            total += log_sum_exp(&terms) - dot(&z[i], &targets[labels[i] as usize]) / temperature;
        }
        total / z.len() as f64
    }

    #[test]
    fn target_term_matches_the_definition_and_its_gradient() -> Result<()> {
        let features = vec![vec![1.0, 0.2, -0.5], vec![-0.3, 0.8, 0.1], vec![0.4, -0.6, 0.9], vec![0.9, 0.1, -0.2]];
        let labels = [1u32, 0, 1, 2];
        let targets = uniform_targets(3, 3, 0)?;
        let (z, y, u) = (matrix(&features), Tensor::new(&labels, &Device::Cpu)?, matrix(&targets));
        let loss = target_term(&z, &y, &u, 0.2)?.to_scalar::<f64>()?;
        let expected = reference(&features, &labels, &targets, 0.2);
        assert!((loss - expected).abs() < 1e-10, "{loss} vs {expected}");
        assert_gradients_match_finite_differences(&[z], &[0], |x| target_term(&x[0], &y, &u, 0.2));
        Ok(())
    }
}

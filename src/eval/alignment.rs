//! Alignment and uniformity of normalised features (Wang & Isola 2020, "Understanding
//! Contrastive Representation Learning through Alignment and Uniformity on the Hypersphere").
//!
//! - alignment `ℓ_align = E_{(x,x⁺)} ‖f(x) − f(x⁺)‖^α`: positives should map close together;
//! - uniformity `ℓ_unif = log E_{x,y} e^{−t‖f(x) − f(y)‖²}`: features should spread over the sphere.
//!
//! Both are lower-is-better. Features are L2-normalised here, so callers pass raw features.

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor, D};

use super::l2_normalize_rows;

/// Uniformity uses at most this many rows (an evenly strided subset), so that it costs
/// about 8M pairs whatever the dataset size.
const UNIFORMITY_MAX_ROWS: usize = 4096;
/// Rows per Gram-matrix block in [`uniformity`].
const UNIFORMITY_CHUNK_ROWS: usize = 512;

/// `E_i ‖f(a_i) − f(b_i)‖^α` over paired rows of `a` and `b` (both `[N, D]`, row `i` of `a`
/// and of `b` are two views of one sample), with `f` the L2 normalisation. Wang & Isola use α = 2.
pub fn alignment(a: &Tensor, b: &Tensor, alpha: f64) -> Result<f64> {
    ensure!(a.dims() == b.dims(), "alignment needs paired views of one shape, got {:?} and {:?}", a.shape(), b.shape());
    ensure!(a.dim(0)? > 0, "alignment needs at least one pair");
    ensure!(alpha > 0.0, "alignment exponent must be positive, got {alpha}");
    let difference = (l2_normalize_rows(a)? - l2_normalize_rows(b)?)?;
    let squared_distances = difference.sqr()?.sum(D::Minus1)?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let total: f64 = squared_distances.iter().map(|d2| d2.max(0.0).powf(alpha / 2.0)).sum();
    Ok(total / squared_distances.len() as f64)
}

/// `log( mean_{i<j} e^{−t ‖f(x_i) − f(x_j)‖²} )` over distinct pairs of rows of `x` (`[N, D]`),
/// with `f` the L2 normalisation. Wang & Isola use t = 2.
///
/// For unit vectors `‖u − v‖² = 2 − 2 u·v`, so the distances come from Gram-matrix blocks.
/// Above 4096 rows an evenly strided subset of 4096 rows is used (deterministic).
pub fn uniformity(x: &Tensor, t: f64) -> Result<f64> {
    ensure!(x.rank() == 2, "uniformity needs a [N, D] matrix, got shape {:?}", x.shape());
    let rows = x.dim(0)?;
    ensure!(rows >= 2, "uniformity needs at least two rows, got {rows}");

    let x = if rows > UNIFORMITY_MAX_ROWS {
        let stride = rows as f64 / UNIFORMITY_MAX_ROWS as f64;
        let picks: Vec<u32> = (0..UNIFORMITY_MAX_ROWS).map(|i| (i as f64 * stride) as u32).collect();
        let picks = Tensor::from_vec(picks, UNIFORMITY_MAX_ROWS, x.device())?;
        x.index_select(&picks, 0)?
    } else {
        x.clone()
    };
    let x = l2_normalize_rows(&x)?;
    let x_t = x.t()?.contiguous()?;
    let rows = x.dim(0)?;

    // Running log-sum-exp of −t‖·‖² over pairs i < j: stays finite even when every term
    // would underflow e^{…} (large t).
    let mut log_sum = LogSumExp::default();
    for start in (0..rows).step_by(UNIFORMITY_CHUNK_ROWS) {
        let len = UNIFORMITY_CHUNK_ROWS.min(rows - start);
        let gram = x.narrow(0, start, len)?.matmul(&x_t)?.to_vec2::<f32>()?;
        for (offset, similarities) in gram.iter().enumerate() {
            let i = start + offset;
            for &similarity in &similarities[i + 1..] {
                let squared_distance = (2.0 - 2.0 * similarity as f64).max(0.0);
                log_sum.add(-t * squared_distance);
            }
        }
    }
    let pairs = (rows * (rows - 1) / 2) as f64;
    Ok(log_sum.value() - pairs.ln())
}

/// `log Σ e^{v}` accumulated one value at a time without overflow or underflow.
#[derive(Default)]
struct LogSumExp {
    max: Option<f64>,
    /// `Σ e^{v − max}`.
    scaled_sum: f64,
}

impl LogSumExp {
    fn add(&mut self, v: f64) {
        match self.max {
            None => {
                self.max = Some(v);
                self.scaled_sum = 1.0;
            }
            Some(max) if v > max => {
                self.scaled_sum = self.scaled_sum * (max - v).exp() + 1.0;
                self.max = Some(v);
            }
            Some(max) => self.scaled_sum += (v - max).exp(),
        }
    }
    fn value(&self) -> f64 {
        self.max.map_or(f64::NEG_INFINITY, |max| max + self.scaled_sum.ln())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn matrix(rows: &[[f32; 2]]) -> Tensor {
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        Tensor::from_vec(flat, (rows.len(), 2), &Device::Cpu).unwrap()
    }

    fn close(actual: f64, expected: f64) -> bool {
        (actual - expected).abs() < 1e-5
    }

    /// Pairs (e1, e2) at distance √2 and (e2, e2) at distance 0:
    /// α = 2 gives (2 + 0)/2 = 1; α = 1 gives (√2 + 0)/2.
    #[test]
    fn alignment_of_hand_made_pairs() {
        let a = matrix(&[[1.0, 0.0], [0.0, 1.0]]);
        let b = matrix(&[[0.0, 5.0], [0.0, 0.5]]); // rescaled: normalisation removes the length
        assert!(close(alignment(&a, &b, 2.0).unwrap(), 1.0));
        assert!(close(alignment(&a, &b, 1.0).unwrap(), 2f64.sqrt() / 2.0));
        assert!(close(alignment(&a, &a, 2.0).unwrap(), 0.0));
    }

    /// Antipodal points on the circle: one pair at ‖·‖² = 4, so log e^{−2·4} = −8.
    #[test]
    fn uniformity_of_antipodal_points() {
        let x = matrix(&[[1.0, 0.0], [-2.0, 0.0]]);
        assert!(close(uniformity(&x, 2.0).unwrap(), -8.0));
    }

    /// Three points 120° apart: every pair has ‖·‖² = 2 − 2cos120° = 3, so the value is −2·3 = −6.
    /// Adding a copy of the first point adds three pairs at distances 0, 3, 3:
    /// log((3e^{−6} + e^{0} + 2e^{−6}) / 6) = log((1 + 5e^{−6}) / 6).
    #[test]
    fn uniformity_of_points_on_a_circle() {
        let s = 3f32.sqrt() / 2.0;
        let triangle = matrix(&[[1.0, 0.0], [-0.5, s], [-0.5, -s]]);
        assert!(close(uniformity(&triangle, 2.0).unwrap(), -6.0));

        let with_copy = matrix(&[[1.0, 0.0], [-0.5, s], [-0.5, -s], [1.0, 0.0]]);
        let expected = ((1.0 + 5.0 * (-6f64).exp()) / 6.0).ln();
        assert!(close(uniformity(&with_copy, 2.0).unwrap(), expected));
    }

    /// A huge t would underflow every e^{−t d²}; the log-sum-exp keeps the exact −t·d².
    #[test]
    fn uniformity_survives_large_t() {
        let x = matrix(&[[1.0, 0.0], [-1.0, 0.0]]);
        assert!(close(uniformity(&x, 1000.0).unwrap(), -4000.0));
    }

    /// More rows than one Gram block and than the subset cap: identical rows give 0 (e^0 = 1),
    /// whatever blocks and subsets are taken.
    #[test]
    fn uniformity_of_many_identical_rows_is_zero() {
        let x = Tensor::ones((5000, 3), DType::F32, &Device::Cpu).unwrap();
        assert!(close(uniformity(&x, 2.0).unwrap(), 0.0));
    }
}

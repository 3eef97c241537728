//! SimSiam's negative cosine similarity. Chen, He, "Exploring Simple Siamese Representation
//! Learning", CVPR 2021.
//!
//! ```text
//! D(p, z) = −cos(p, sg(z)),   L = mean over the batch
//! ```
//!
//! The method symmetrises it: `½ D(p1, z2) + ½ D(p2, z1)`. The stop-gradient on `z` is what keeps
//! SimSiam from collapsing without negatives or a momentum encoder.

use candle_core::{Result, Tensor};

use super::common::{expect_float_matrix, expect_same_shape, row_cosine};

/// SimSiam's `mean(−cos(p, sg(z)))` for predictions `p` and projections `z`, both `[N, D]`;
/// `z` is detached here.
pub fn simsiam(p: &Tensor, z: &Tensor) -> Result<Tensor> {
    expect_float_matrix("p", p)?;
    expect_same_shape("p", p, "z", z)?;
    row_cosine(p, &z.detach())?.neg()?.mean_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::loss::testing::*;
    use candle_core::{DType, Var};

    #[test]
    fn matches_hand_values() -> Result<()> {
        // cos((1,0),(1,1)) = 1/√2, cos((0,2),(0,-1)) = −1: mean of −cos = (−1/√2 + 1)/2.
        let p = matrix(&[vec![1.0, 0.0], vec![0.0, 2.0]]);
        let z = matrix(&[vec![1.0, 1.0], vec![0.0, -1.0]]);
        let expected = (-(0.5f64).sqrt() + 1.0) / 2.0;
        assert!((simsiam(&p, &z)?.to_scalar::<f64>()? - expected).abs() < 1e-12);
        let loss32 = simsiam(&p.to_dtype(DType::F32)?, &z.to_dtype(DType::F32)?)?.to_scalar::<f32>()?;
        assert!((loss32 as f64 - expected).abs() < 1e-6);
        Ok(())
    }

    #[test]
    fn gradient_matches_finite_differences_and_stops_at_the_target() -> Result<()> {
        let p = matrix(&[vec![1.0, 2.0, -0.5], vec![0.3, -0.7, 0.2]]);
        let z = matrix(&[vec![0.5, 1.0, 0.5], vec![-0.3, -0.2, 0.9]]);
        assert_gradients_match_finite_differences(&[p.clone(), z.clone()], &[0], |x| simsiam(&x[0], &x[1]));
        let (p, z) = (Var::from_tensor(&p)?, Var::from_tensor(&z)?);
        let grads = simsiam(p.as_tensor(), z.as_tensor())?.backward()?;
        assert!(grads.get(p.as_tensor()).is_some());
        assert!(grads.get(z.as_tensor()).is_none());
        Ok(())
    }
}

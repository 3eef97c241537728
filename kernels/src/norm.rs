//! Row L2 normalisation: `x_i / √(‖x_i‖² + ε²)`. Losses, pair strategies, evaluation, the
//! served embeddings and the exported ONNX graph all normalise with this one formula, so the
//! served answer equals the trainer's to rounding.

use candle_core::{Result, Tensor, D};

/// Added under the square root of every squared norm so that a zero row normalises to zero
/// instead of dividing by zero (a norm floor of 1e-12, as in PyTorch's `F.normalize`).
pub const L2_EPS_SQUARED: f64 = 1e-24;

/// Divides every row of `x` (`[N, D]`, or any rank: the last axis) by its L2 norm, with a
/// gradient built from candle primitives.
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let squared_norm = x.sqr()?.sum_keepdim(D::Minus1)?;
    let norm = (squared_norm + L2_EPS_SQUARED)?.sqrt()?;
    x.broadcast_div(&norm)
}

/// [`l2_normalize`] of one row of plain values, in place.
pub fn l2_normalize_slice(values: &mut [f32]) {
    let norm = (values.iter().map(|v| v * v).sum::<f32>() + L2_EPS_SQUARED as f32).sqrt();
    values.iter_mut().for_each(|v| *v /= norm);
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn normalised_rows_have_unit_norm_and_zero_rows_stay_zero() -> Result<()> {
        let x = Tensor::new(&[[3.0f64, 4.0], [0.0, 0.0]], &Device::Cpu)?;
        let n = l2_normalize(&x)?.to_vec2::<f64>()?;
        assert!((n[0][0] - 0.6).abs() < 1e-12 && (n[0][1] - 0.8).abs() < 1e-12);
        assert_eq!(n[1], vec![0.0, 0.0]);
        let mut row = [3.0f32, 4.0];
        l2_normalize_slice(&mut row);
        assert_eq!(row, [0.6, 0.8]);
        let mut zero = [0.0f32; 3];
        l2_normalize_slice(&mut zero);
        assert_eq!(zero, [0.0; 3]);
        Ok(())
    }
}

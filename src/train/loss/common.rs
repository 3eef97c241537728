//! Building blocks the losses share: cosine similarities, a log-sum-exp whose max-shift carries
//! no gradient, and shape checks with messages that name the argument. Row normalisation is
//! [`contrastive_kernels::l2_normalize`], shared with evaluation and serving.

use candle_core::{bail, DType, Result, Tensor, D};
pub use contrastive_kernels::l2_normalize;

/// Logit given to entries a loss must ignore (the self-similarity of an anchor, say).
/// `exp(MASKED_LOGIT - max)` underflows to exactly zero in F32 and F64, so those entries
/// contribute neither to the value nor to the gradient.
pub const MASKED_LOGIT: f64 = -1e9;

/// Row-wise cosine similarity of two `[N, D]` matrices: `[cos(a_i, b_i)]`, shape `[N]`.
pub fn row_cosine(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    (l2_normalize(a)? * l2_normalize(b)?)?.sum(D::Minus1)
}

/// `log Σ_j exp(x_ij)` over the last dimension of `x` (`[M, K]` -> `[M]`), computed as
/// `m + log Σ exp(x - m)` with `m` the row max. The shift is detached: the result does not depend
/// on it, so its gradient is exactly zero and needs no path through `max`.
pub fn log_sum_exp_rows(x: &Tensor) -> Result<Tensor> {
    let shift = x.max_keepdim(D::Minus1)?.detach();
    let sum_exp = x.broadcast_sub(&shift)?.exp()?.sum_keepdim(D::Minus1)?;
    (sum_exp.log()? + shift)?.squeeze(D::Minus1)
}

/// An `[n, n]` matrix with [`MASKED_LOGIT`] on the diagonal and 0 elsewhere: added to a similarity
/// matrix it removes each anchor from its own denominator.
pub fn diagonal_logit_mask(n: usize, dtype: DType, device: &candle_core::Device) -> Result<Tensor> {
    Tensor::eye(n, dtype, device)?.affine(MASKED_LOGIT, 0.0)
}

/// Checks that `t` is a floating-point `[rows, cols]` matrix and returns its dimensions.
pub fn expect_float_matrix(name: &str, t: &Tensor) -> Result<(usize, usize)> {
    if !t.dtype().is_float() {
        bail!("{name} must be a floating-point tensor, got {:?}", t.dtype())
    }
    match t.dims() {
        [rows, cols] => Ok((*rows, *cols)),
        dims => bail!("{name} must be a 2-D [rows, features] tensor, got shape {dims:?}"),
    }
}

/// Checks that two matrices have the same shape (the two views of one batch, say).
pub fn expect_same_shape(name_a: &str, a: &Tensor, name_b: &str, b: &Tensor) -> Result<()> {
    if a.dims() != b.dims() {
        bail!("{name_a} and {name_b} must have the same shape, got {:?} and {:?}", a.dims(), b.dims())
    }
    Ok(())
}

/// Checks that a temperature is a finite positive number.
pub fn expect_positive(name: &str, value: f64) -> Result<()> {
    if !(value.is_finite() && value > 0.0) {
        bail!("{name} must be a finite positive number, got {value}")
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn log_sum_exp_matches_direct_formula_and_survives_large_values() -> Result<()> {
        let x = Tensor::new(&[[1.0f64, 2.0, 3.0], [1000.0, 1000.0, MASKED_LOGIT]], &Device::Cpu)?;
        let lse = log_sum_exp_rows(&x)?.to_vec1::<f64>()?;
        let direct = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln();
        assert!((lse[0] - direct).abs() < 1e-12);
        assert!((lse[1] - (1000.0 + 2f64.ln())).abs() < 1e-9);
        Ok(())
    }
}

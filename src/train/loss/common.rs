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

/// The form every label-positive loss here shares (SupCon, KCL, TSC, BCL, PaCo): for each anchor
/// row `i` of `logits` `[M, K]`, with positive weights `P` and denominator weights `W` (both
/// `[M, K]`, constants, `W_ij = 0` leaves column j out of row i's denominator),
///
/// ```text
/// ℓ_i = −Σ_k P_ik ( l_ik − log Σ_j W_ij e^{l_ij} ) / Σ_k P_ik
/// L   = mean of ℓ_i over the anchors with Σ_k P_ik > 0   (0 when there is none)
/// ```
///
/// SupCon is `P` = same label off the diagonal, `W` = 1 off the diagonal; the others change the
/// columns (class centres, targets) or the weights.
pub fn weighted_positive_log_likelihood(
    logits: &Tensor,
    positive_weights: &Tensor,
    denominator_weights: &Tensor,
) -> Result<Tensor> {
    let (rows, cols) = expect_float_matrix("logits", logits)?;
    for (name, weights) in [("positive weights", positive_weights), ("denominator weights", denominator_weights)] {
        if weights.dims() != [rows, cols] {
            bail!("{name} must have the logits' shape [{rows}, {cols}], got {:?}", weights.dims())
        }
    }
    // Above zero in F32 as in F64, so that 0 / TINY = 0 for anchors without positives.
    const TINY: f64 = 1e-30;
    let dtype = logits.dtype();
    let positives = positive_weights.to_dtype(dtype)?.detach();
    let weights = denominator_weights.to_dtype(dtype)?.detach();
    // log W where W > 0; MASKED_LOGIT removes the column from the row's sum.
    let log_weights = weights
        .gt(0.0)?
        .where_cond(&weights.maximum(TINY)?.log()?, &weights.ones_like()?.affine(0.0, MASKED_LOGIT)?)?;
    let log_denominator = log_sum_exp_rows(&(logits + log_weights)?)?;
    let log_prob = logits.broadcast_sub(&log_denominator.unsqueeze(1)?)?;
    let positive_total = positives.sum(D::Minus1)?;
    let has_positive = positive_total.gt(0.0)?.to_dtype(dtype)?;
    let per_anchor = ((&log_prob * &positives)?.sum(D::Minus1)? / positive_total.maximum(TINY)?)?;
    let anchors = has_positive.sum_all()?.maximum(1.0)?;
    (per_anchor * has_positive)?.sum_all()?.neg()?.div(&anchors)
}

/// `[rows, classes]` one-hot rows of `labels` (`[rows]`, any integer dtype), in `dtype`; fails
/// on a label outside `0..classes`.
pub fn one_hot(labels: &Tensor, classes: usize, dtype: DType) -> Result<Tensor> {
    let values = labels.to_dtype(DType::I64)?.to_vec1::<i64>()?;
    if let Some(bad) = values.iter().find(|&&l| l < 0 || l as usize >= classes) {
        bail!("label {bad} is outside the {classes} classes the loss was built for")
    }
    let mut data = vec![0f32; values.len() * classes];
    for (row, &label) in values.iter().enumerate() {
        data[row * classes + label as usize] = 1.0;
    }
    Tensor::from_vec(data, (values.len(), classes), labels.device())?.to_dtype(dtype)
}

/// Mean cross-entropy of `logits` `[N, C]` against `labels` `[N]`: `mean(log Σ_c e^{l_c} − l_y)`.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let rows = logits.dim(0)?;
    weighted_cross_entropy(logits, labels, &Tensor::ones(rows, logits.dtype(), logits.device())?)
}

/// Cross-entropy with a weight per row: `Σ_i w_i (log Σ_c e^{l_ic} − l_{i,y_i}) / Σ_i w_i`.
pub fn weighted_cross_entropy(logits: &Tensor, labels: &Tensor, row_weights: &Tensor) -> Result<Tensor> {
    let (rows, classes) = expect_float_matrix("logits", logits)?;
    if labels.dims() != [rows] || row_weights.dims() != [rows] {
        bail!("logits have {rows} rows but labels {:?} and weights {:?}", labels.dims(), row_weights.dims())
    }
    let target = one_hot(labels, classes, logits.dtype())?;
    let per_row = (log_sum_exp_rows(logits)? - (logits * target)?.sum(D::Minus1)?)?;
    let weights = row_weights.to_dtype(logits.dtype())?.detach();
    (per_row * &weights)?.sum_all()?.div(&weights.sum_all()?)
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

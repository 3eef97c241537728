//! A causal context network over a grid of codes, CPC's autoregressive part (van den Oord et al.
//! 2018; Hénaff et al. 2020 use a PixelCNN-style stack): each layer a 2×3 convolution over the
//! row above and the row itself (zeros above the first row and beside the edges), ReLU, and a
//! residual connection. After L layers the context of row i has seen rows i − L … i and
//! never a row below it, which the predictions of lower rows must not see.

use candle_core::{Result, Tensor};
use candle_nn::{Init, VarBuilder};

pub struct MaskedContext {
    /// `[D, D, 2, 3]` kernels and `[D]` biases, one pair per layer.
    layers: Vec<(Tensor, Tensor)>,
}

impl MaskedContext {
    pub fn new(vb: VarBuilder, dim: usize, layers: usize) -> Result<Self> {
        // Kaiming-normal over the 6·D inputs of each output, as the encoder's convolutions.
        let init = Init::Randn { mean: 0.0, stdev: (2.0 / (6 * dim) as f64).sqrt() };
        let layers = (0..layers)
            .map(|l| {
                let vb = vb.pp(format!("layer{}", l + 1));
                Ok((
                    vb.get_with_hints((dim, dim, 2, 3), "weight", init)?,
                    vb.get_with_hints(dim, "bias", Init::Const(0.))?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(Self { layers })
    }

    /// Contexts `[N, D, R, C]` of codes `[N, D, R, C]`.
    pub fn forward(&self, codes: &Tensor) -> Result<Tensor> {
        let mut h = codes.clone();
        for (weight, bias) in &self.layers {
            let padded = h.pad_with_zeros(2, 1, 0)?.pad_with_zeros(3, 1, 1)?;
            let y = padded.conv2d(weight, 0, 1, 1, 1)?.broadcast_add(&bias.reshape((1, (), 1, 1))?)?;
            h = (h + y.relu()?)?;
        }
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    /// Changing the codes of row 2 moves no context of rows 0 and 1 and does move row 2's (and,
    /// through two layers, row 3's): the predictions of lower rows cannot read their targets.
    #[test]
    fn a_row_context_sees_no_row_below_it() -> Result<()> {
        let varmap = VarMap::new();
        let context = MaskedContext::new(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu), 3, 2)?;
        let codes = Tensor::randn(0f32, 1., (1, 3, 4, 4), &Device::Cpu)?;
        let bump = Tensor::zeros((1, 3, 4, 4), DType::F32, &Device::Cpu)?
            .slice_assign(&[0..1, 0..3, 2..3, 0..4], &Tensor::ones((1, 3, 1, 4), DType::F32, &Device::Cpu)?)?;
        let before = context.forward(&codes)?;
        let after = context.forward(&(&codes + bump)?)?;
        let moved = (after - before)?.abs()?.sum((0, 1, 3))?.to_vec1::<f32>()?;
        assert_eq!(moved[..2], [0., 0.], "rows above the change: {moved:?}");
        assert!(moved[2] > 0.0, "the changed row itself: {moved:?}");
        Ok(())
    }

    /// The gradients of a weighted sum of the contexts with respect to the codes and to every
    /// kernel and bias agree with central finite differences (the 2×3 kernels' backward is
    /// candle's conv2d backward on a padded input).
    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        let device = Device::Cpu;
        let codes = Tensor::randn(0f64, 1., (2, 2, 3, 3), &device)?;
        let weights = Tensor::randn(0f64, 1., (2, 2, 3, 3), &device)?;
        let kernels =
            [Tensor::randn(0f64, 0.5, (2, 2, 2, 3), &device)?, Tensor::randn(0f64, 0.5, (2, 2, 2, 3), &device)?];
        let biases = [Tensor::randn(0f64, 0.1, 2, &device)?, Tensor::randn(0f64, 0.1, 2, &device)?];
        let inputs = [codes, kernels[0].clone(), biases[0].clone(), kernels[1].clone(), biases[1].clone()];
        crate::train::loss::testing::assert_gradients_match_finite_differences(&inputs, &[0, 1, 2, 3, 4], |x| {
            let context = MaskedContext { layers: vec![(x[1].clone(), x[2].clone()), (x[3].clone(), x[4].clone())] };
            (context.forward(&x[0])? * &weights)?.sum_all()
        });
        Ok(())
    }
}

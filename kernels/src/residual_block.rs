//! A ResNet basic block (He et al. 2016) as one op in CPU training:
//!
//! ```text
//! h = max(0, bn₁(conv₁(x)))      s = bn_s(conv_s(x))  (a projection)  or  s = x  (identity)
//! y = max(0, bn₂(conv₂(h)) + s)
//! ```
//!
//! Every tensor between two candle ops costs the backward a gradient buffer (`zeros_like`, then
//! an `add` of each incoming gradient: a fresh allocation and three passes). Built from
//! [`crate::conv_bn_train`] and [`crate::add_relu`], a block has four such tensors besides its
//! input and output (`h`, the two batch-normed branches, and the input's second use by the sum),
//! each as large as an activation map. As one op only `x` and `y` are candle tensors; inside,
//! the same kernels run in the same order, so values and gradients are bit for bit those of the
//! composed ops. The backward never forms `g = dy·1(y > 0)`: the batch norms of the second
//! convolution and of the projection apply the mask themselves, as for their own ReLU.
//!
//! The weights of all convolutions travel as one flat operand and the batch-norm parameters as
//! another (a custom op takes at most three); `cat` hands each parameter its gradient back.

use std::sync::{Arc, Mutex};

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use crate::activation::{add_relu_storage, relu_grad};
use crate::batch_norm::{train_backward, train_forward_storage, BatchStatistics};
use crate::conv::{conv_backward_where, conv_forward_storage, storage_into_tensor, ConvGeometry};

/// One convolution + batch norm of a block: its parameters and hyper-parameters.
#[derive(Debug, Clone, Copy)]
pub struct ConvBnLayer<'a> {
    /// `[c_out, c_in, k, k]`.
    pub weight: &'a Tensor,
    pub gamma: &'a Tensor,
    pub beta: &'a Tensor,
    pub stride: usize,
    pub padding: usize,
    pub eps: f64,
}

/// The batch statistics of a block's batch norms, for their running averages.
#[derive(Debug, Clone)]
pub struct BlockStatistics {
    pub layer1: BatchStatistics,
    pub layer2: BatchStatistics,
    pub shortcut: Option<BatchStatistics>,
}

/// `max(0, bn₂(conv₂(max(0, bn₁(conv₁(x))))) + shortcut(x))` with batch statistics, as one op;
/// `shortcut` is the projection (1×1 conv + batch norm), `None` for the identity. Same values
/// and gradients as the composed [`crate::conv_bn_train`] and [`crate::add_relu`]. CPU tensors,
/// f32 or f64.
pub fn residual_block_train(
    x: &Tensor,
    layer1: ConvBnLayer,
    layer2: ConvBnLayer,
    shortcut: Option<ConvBnLayer>,
) -> Result<(Tensor, BlockStatistics)> {
    if !x.device().is_cpu() {
        bail!("fused residual block runs on the CPU only, got {:?}", x.device())
    }
    let layers: Vec<ConvBnLayer> = [Some(layer1), Some(layer2), shortcut].into_iter().flatten().collect();
    let weights: Vec<Tensor> = layers.iter().map(|l| l.weight.flatten_all()).collect::<Result<_>>()?;
    let norms: Vec<&Tensor> = layers.iter().flat_map(|l| [l.gamma, l.beta]).collect();
    let shapes = layers
        .iter()
        .map(|l| {
            let &[c_out, c_in, k, k_w] = l.weight.dims() else {
                bail!(
                    "fused residual block: a convolution weight must be [c_out, c_in, k, k], got {:?}",
                    l.weight.dims()
                )
            };
            if k != k_w || l.gamma.elem_count() != c_out || l.beta.elem_count() != c_out {
                bail!(
                    "fused residual block: weight {:?} with {} and {} batch-norm parameters",
                    l.weight.dims(),
                    l.gamma.elem_count(),
                    l.beta.elem_count()
                )
            }
            Ok(LayerShape { c_out, c_in, kernel: k, stride: l.stride, padding: l.padding, eps: l.eps })
        })
        .collect::<Result<Vec<_>>>()?;
    let saved = Arc::new(Mutex::new(None));
    let op = ResidualBlockTrain { layers: shapes, saved: saved.clone() };
    let y = x.contiguous()?.apply_op3(&Tensor::cat(&weights, 0)?, &Tensor::cat(&norms, 0)?, op)?;
    let saved = saved.lock().expect("residual block state lock");
    let Some(saved) = saved.as_ref() else { bail!("fused residual block: forward kept no statistics") };
    let mut stats = saved.stats.clone().into_iter();
    let (Some(layer1), Some(layer2)) = (stats.next(), stats.next()) else {
        bail!("fused residual block: forward kept statistics for fewer than two layers")
    };
    Ok((y, BlockStatistics { layer1, layer2, shortcut: stats.next() }))
}

/// A layer's sizes: where its weight and batch-norm parameters lie in the packed operands.
#[derive(Debug, Clone, Copy)]
struct LayerShape {
    c_out: usize,
    c_in: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    eps: f64,
}

impl LayerShape {
    fn weight_dims(&self) -> Shape {
        Shape::from((self.c_out, self.c_in, self.kernel, self.kernel))
    }

    fn weight_len(&self) -> usize {
        self.weight_dims().elem_count()
    }

    fn geometry(&self, input_dims: &[usize]) -> Result<ConvGeometry> {
        ConvGeometry::new(input_dims, self.weight_dims().dims(), self.stride, self.padding)
    }
}

/// What the backward needs: each convolution's output, the first layer's output `h`, and the
/// batch statistics (layer 1, layer 2, then the projection's).
struct Saved {
    conv_outputs: Vec<Tensor>,
    hidden: Tensor,
    stats: Vec<BatchStatistics>,
}

/// The op on `(x, packed weights, packed [γ₁; β₁; γ₂; β₂; (γ_s; β_s)])`.
struct ResidualBlockTrain {
    /// Layer 1, layer 2, then the projection when there is one.
    layers: Vec<LayerShape>,
    saved: Arc<Mutex<Option<Saved>>>,
}

impl ResidualBlockTrain {
    /// Start of each layer's weight in the packed weights, and of its γ in the packed norms.
    fn offsets(&self) -> Vec<(usize, usize)> {
        let (mut weight, mut norm) = (0, 0);
        self.layers
            .iter()
            .map(|l| {
                let at = (weight, norm);
                (weight, norm) = (weight + l.weight_len(), norm + 2 * l.c_out);
                at
            })
            .collect()
    }
}

impl CustomOp3 for ResidualBlockTrain {
    fn name(&self) -> &'static str {
        "fused-residual-block-train"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        weights: &CpuStorage,
        lw: &Layout,
        norms: &CpuStorage,
        ln: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (Some((w_start, _)), Some((n_start, _))) = (lw.contiguous_offsets(), ln.contiguous_offsets()) else {
            bail!("fused residual block: packed parameters must be contiguous")
        };
        let offsets = self.offsets();
        let weight_layout =
            |i: usize| Layout::contiguous_with_offset(self.layers[i].weight_dims(), w_start + offsets[i].0);
        let norm_layouts = |i: usize| {
            let (c, at) = (self.layers[i].c_out, n_start + offsets[i].1);
            (Layout::contiguous_with_offset(c, at), Layout::contiguous_with_offset(c, at + c))
        };
        // conv → batch norm [→ ReLU] of layer `i` on `input`: (conv output, output, statistics).
        let conv_bn = |i: usize, input: (&CpuStorage, &Layout), relu: bool| {
            let layer = &self.layers[i];
            let g = layer.geometry(input.1.dims())?;
            let z = conv_forward_storage(&g, input, (weights, &weight_layout(i)))?;
            let shape = g.output_shape();
            let (gamma, beta) = norm_layouts(i);
            let (y, stats) = train_forward_storage(
                (&z, 0, shape.elem_count()),
                shape.dims(),
                (norms, &gamma),
                (norms, &beta),
                layer.eps,
                relu,
            )?;
            Ok::<_, candle_core::Error>((storage_into_tensor(z, shape.clone())?, y, shape, stats))
        };
        let (z1, h, h_shape, stats1) = conv_bn(0, (x, lx), true)?;
        let h_layout = Layout::contiguous(h_shape.clone());
        let (z2, u2, out_shape, stats2) = conv_bn(1, (&h, &h_layout), false)?;
        let out_layout = Layout::contiguous(out_shape.clone());
        let mut conv_outputs = vec![z1, z2];
        let mut stats = vec![stats1, stats2];
        let y = match self.layers.get(2) {
            Some(_) => {
                let (zs, us, shortcut_shape, stats_s) = conv_bn(2, (x, lx), false)?;
                if shortcut_shape != out_shape {
                    bail!(
                        "fused residual block: projection gives {shortcut_shape:?}, the residual branch {out_shape:?}"
                    )
                }
                conv_outputs.push(zs);
                stats.push(stats_s);
                add_relu_storage(self.name(), (&u2, &out_layout), (&us, &out_layout))?.0
            }
            None => {
                if lx.shape() != &out_shape {
                    bail!("fused residual block: identity shortcut of {:?} onto {out_shape:?}", lx.shape())
                }
                add_relu_storage(self.name(), (&u2, &out_layout), (x, lx))?.0
            }
        };
        let hidden = storage_into_tensor(h, h_shape)?;
        *self.saved.lock().expect("residual block state lock") = Some(Saved { conv_outputs, hidden, stats });
        Ok((y, out_shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weights: &Tensor,
        norms: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let guard = self.saved.lock().expect("residual block state lock");
        let Some(saved) = guard.as_ref() else { bail!("fused residual block: backward called before forward") };
        let offsets = self.offsets();
        let weight = |i: usize| {
            weights.narrow(0, offsets[i].0, self.layers[i].weight_len())?.reshape(self.layers[i].weight_dims())
        };
        let want_dw = weights.track_op();
        let (conv_outputs, h) = (&saved.conv_outputs, &saved.hidden);
        // Layer 2 and the projection feed the final ReLU: their batch norms mask `dy` by `y`.
        let (dz2, d_gamma2, d_beta2) = train_backward(&conv_outputs[1], y, dy, saved.stats[1].clone(), true)?;
        let (dh, dw2) = conv_backward_where(h, &weight(1)?, &dz2, self.layers[1].geometry(h.dims())?, (true, want_dw))?;
        let Some(dh) = dh else { bail!("fused residual block: no gradient for the hidden layer") };
        let (dz1, d_gamma1, d_beta1) = train_backward(&conv_outputs[0], h, &dh, saved.stats[0].clone(), true)?;
        let geometry1 = self.layers[0].geometry(x.dims())?;
        let (dx1, dw1) = conv_backward_where(x, &weight(0)?, &dz1, geometry1, (x.track_op(), want_dw))?;
        let mut d_norms = [d_gamma1, d_beta1, d_gamma2, d_beta2].concat();
        let mut d_weights = vec![dw1, dw2];
        let dx_shortcut = match self.layers.get(2) {
            Some(layer) => {
                let (dzs, d_gamma_s, d_beta_s) = train_backward(&conv_outputs[2], y, dy, saved.stats[2].clone(), true)?;
                let (dxs, dws) =
                    conv_backward_where(x, &weight(2)?, &dzs, layer.geometry(x.dims())?, (x.track_op(), want_dw))?;
                d_norms.extend(d_gamma_s.into_iter().chain(d_beta_s));
                d_weights.push(dws);
                dxs
            }
            None => x.track_op().then(|| relu_grad(y, dy)).transpose()?,
        };
        let dx = match (dx1, dx_shortcut) {
            (Some(a), Some(b)) => Some((a + b)?),
            (a, b) => a.or(b),
        };
        let d_weights = match want_dw {
            true => {
                let flat: Vec<Tensor> =
                    d_weights.into_iter().flatten().map(|d| d.flatten_all()).collect::<Result<_>>()?;
                Some(Tensor::cat(&flat, 0)?)
            }
            false => None,
        };
        let d_norms = Tensor::from_vec(d_norms, norms.dims(), x.device())?.to_dtype(norms.dtype())?;
        Ok((dx, d_weights, Some(d_norms)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{max_abs_diff, randn};
    use crate::{add_relu, conv_bn_train};
    use candle_core::{DType, Var};

    /// Parameters of one conv + batch norm layer.
    struct Params {
        weight: Var,
        gamma: Var,
        beta: Var,
        stride: usize,
        padding: usize,
    }

    impl Params {
        fn new(c_in: usize, c_out: usize, kernel: usize, stride: usize, dtype: DType) -> Self {
            Self {
                weight: Var::from_tensor(&randn(0.0, 0.5, (c_out, c_in, kernel, kernel), dtype)).unwrap(),
                gamma: Var::from_tensor(&randn(1.0, 0.3, c_out, dtype)).unwrap(),
                beta: Var::from_tensor(&randn(0.0, 0.3, c_out, dtype)).unwrap(),
                stride,
                padding: kernel / 2,
            }
        }

        fn layer(&self) -> ConvBnLayer<'_> {
            ConvBnLayer {
                weight: self.weight.as_tensor(),
                gamma: self.gamma.as_tensor(),
                beta: self.beta.as_tensor(),
                stride: self.stride,
                padding: self.padding,
                eps: 1e-5,
            }
        }

        fn composed(&self, x: &Tensor, relu: bool) -> (Tensor, BatchStatistics) {
            let l = self.layer();
            conv_bn_train(x, l.weight, l.gamma, l.beta, l.stride, l.padding, l.eps, relu).unwrap()
        }

        fn vars(&self) -> [&Var; 3] {
            [&self.weight, &self.gamma, &self.beta]
        }
    }

    /// The fused block against the same block composed of `conv_bn_train` and `add_relu` (each
    /// tested against candle's ops): equal values, batch statistics and gradients for every
    /// parameter and the input, for identity and projection shortcuts, in f32 and f64.
    #[test]
    fn fused_block_equals_the_composed_ops_bit_for_bit() {
        // (c_in, c_out, stride, input dims): identity, projection with stride 2, projection
        // that only widens.
        let cases = [(4, 4, 1, (3, 4, 6, 6)), (3, 5, 2, (2, 3, 9, 7)), (2, 6, 1, (4, 2, 5, 5))];
        for dtype in [DType::F64, DType::F32] {
            for (c_in, c_out, stride, dims) in cases {
                let case = format!("{dtype:?} {dims:?} -> {c_out} stride {stride}");
                let x = Var::from_tensor(&randn(0.0, 1.0, dims, dtype)).unwrap();
                let layer1 = Params::new(c_in, c_out, 3, stride, dtype);
                let layer2 = Params::new(c_out, c_out, 3, 1, dtype);
                let projection = (stride != 1 || c_in != c_out).then(|| Params::new(c_in, c_out, 1, stride, dtype));

                let (fused, stats) =
                    residual_block_train(&x, layer1.layer(), layer2.layer(), projection.as_ref().map(Params::layer))
                        .unwrap();

                let (h, stats1) = layer1.composed(&x, true);
                let (u2, stats2) = layer2.composed(&h, false);
                let (shortcut, stats_s) = match &projection {
                    Some(p) => {
                        let (s, stats) = p.composed(&x, false);
                        (s, Some(stats))
                    }
                    None => (x.as_tensor().clone(), None),
                };
                let composed = add_relu(&u2, &shortcut).unwrap();

                assert_eq!(max_abs_diff(&fused, &composed), 0.0, "{case}: values");
                let expected = [Some(&stats1), Some(&stats2), stats_s.as_ref()];
                let actual = [Some(&stats.layer1), Some(&stats.layer2), stats.shortcut.as_ref()];
                for (a, e) in actual.iter().zip(expected) {
                    assert_eq!(
                        a.map(|s| (&s.mean, &s.variance)),
                        e.map(|s| (&s.mean, &s.variance)),
                        "{case}: statistics"
                    );
                }

                let probe = randn(0.0, 1.0, fused.shape(), dtype);
                let g_fused = (&fused * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                let g_composed = (&composed * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                let mut vars: Vec<(&Var, String)> = vec![(&x, "input".into())];
                for (name, params) in
                    [("layer 1", Some(&layer1)), ("layer 2", Some(&layer2)), ("projection", projection.as_ref())]
                {
                    for (var, what) in params.into_iter().flat_map(Params::vars).zip(["weight", "γ", "β"]) {
                        vars.push((var, format!("{name} {what}")));
                    }
                }
                for (var, what) in vars {
                    let (a, b) = (g_fused.get(var).unwrap(), g_composed.get(var).unwrap());
                    assert_eq!(max_abs_diff(a, b), 0.0, "{case}: {what} gradient");
                }
            }
        }
    }

    /// Without gradients for the input (a frozen part below), only the parameters get them.
    #[test]
    fn an_input_without_gradient_gets_none() {
        let x = randn(0.0, 1.0, (2, 3, 6, 6), DType::F64);
        let layer1 = Params::new(3, 3, 3, 1, DType::F64);
        let layer2 = Params::new(3, 3, 3, 1, DType::F64);
        let (y, _) = residual_block_train(&x, layer1.layer(), layer2.layer(), None).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&x).is_none());
        assert!(grads.get(&layer1.weight).is_some() && grads.get(&layer2.beta).is_some());
    }
}

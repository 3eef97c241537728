//! CIFAR-style ResNet for small images (He et al. 2016, "Deep Residual Learning"): a 3×3
//! stride-1 stem with no max-pool, stages of basic blocks, batch norm, global mean pooling.

use candle_core::{Result, Tensor, D};
use candle_nn::VarBuilder;
use contrastive_export::{Attr, GraphBuilder, Result as ExportResult};
use serde::{Deserialize, Serialize};

use contrastive_kernels::Backend;

use super::batch_norm::BatchNorm2d;
use super::conv::Conv2d;
use super::conv_bn::ConvBn;
use crate::train::augment::patches::{grid_starts, patch_grid};

/// Widths, depths and strides of a CIFAR-style ResNet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResNetConfig {
    pub in_channels: usize,
    /// Output channels of each stage; the stem has the first stage's width.
    pub widths: Vec<usize>,
    /// Basic blocks in each stage.
    pub blocks: Vec<usize>,
    /// Stride of each stage's first block.
    pub strides: Vec<usize>,
    /// Encode a grid of patches and average their features instead of the whole image (CPC's
    /// encoder, trained on patches, embeds an image as the mean of its patch codes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patches: Option<PatchGrid>,
}

/// Square patches of `size` pixels every `stride` pixels (see [`patch_grid`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatchGrid {
    pub size: usize,
    pub stride: usize,
}

impl ResNetConfig {
    /// The project's benchmark encoder: widths (32, 64, 128), one block per stage, strides
    /// (1, 2, 2), a 128-d feature; about 307k parameters for one input channel.
    pub fn canonical(in_channels: usize) -> Self {
        Self { in_channels, widths: vec![32, 64, 128], blocks: vec![1, 1, 1], strides: vec![1, 2, 2], patches: None }
    }

    /// ResNet-18's layout (two blocks per stage, widths 64..512) with the CIFAR stem.
    pub fn resnet18(in_channels: usize) -> Self {
        Self {
            in_channels,
            widths: vec![64, 128, 256, 512],
            blocks: vec![2, 2, 2, 2],
            strides: vec![1, 2, 2, 2],
            patches: None,
        }
    }

    /// Size of the pooled feature (the embedding).
    pub fn feature_dim(&self) -> usize {
        *self.widths.last().expect("a ResNet has at least one stage")
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.widths.is_empty(), "a ResNet needs at least one stage");
        anyhow::ensure!(
            self.widths.len() == self.blocks.len() && self.widths.len() == self.strides.len(),
            "ResNet widths ({}), blocks ({}) and strides ({}) must have one entry per stage",
            self.widths.len(),
            self.blocks.len(),
            self.strides.len()
        );
        anyhow::ensure!(self.in_channels > 0, "a ResNet needs at least one input channel");
        anyhow::ensure!(self.blocks.iter().all(|&b| b > 0), "every ResNet stage needs at least one block");
        anyhow::ensure!(self.strides.iter().all(|&s| s == 1 || s == 2), "ResNet strides must be 1 or 2");
        if let Some(PatchGrid { size, stride }) = self.patches {
            anyhow::ensure!(size > 0 && stride > 0, "patch size and stride must be positive, got {size} and {stride}");
        }
        Ok(())
    }
}

/// conv3×3 → BN → ReLU → conv3×3 → BN, plus the identity (or a 1×1 conv + BN projection when the
/// shape changes), then ReLU.
#[derive(Debug, Clone)]
pub struct BasicBlock {
    pub layer1: ConvBn,
    pub layer2: ConvBn,
    pub shortcut: Option<ConvBn>,
    backend: Backend,
}

impl BasicBlock {
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        stride: usize,
        backend: Backend,
    ) -> Result<Self> {
        let conv_bn = |conv: &str, bn: &str, c_in: usize, kernel: usize, stride: usize, padding: usize| {
            let conv = Conv2d::new(vb.pp(conv), c_in, out_channels, kernel, stride, padding, backend)?;
            Ok::<_, candle_core::Error>(ConvBn::new(conv, BatchNorm2d::new(vb.pp(bn), out_channels, backend)?))
        };
        let layer1 = conv_bn("conv1", "bn1", in_channels, 3, stride, 1)?;
        let layer2 = conv_bn("conv2", "bn2", out_channels, 3, 1, 1)?;
        let shortcut = if stride != 1 || in_channels != out_channels {
            Some(conv_bn("shortcut.conv", "shortcut.bn", in_channels, 1, stride, 0)?)
        } else {
            None
        };
        Ok(Self { layer1, layer2, shortcut, backend })
    }

    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if train && self.backend.fused_on(x) {
            return self.forward_fused(x);
        }
        let h = self.layer1.forward_t(x, train, true)?;
        let h = self.layer2.forward_t(&h, train, false)?;
        let identity = match &self.shortcut {
            Some(shortcut) => shortcut.forward_t(x, train, false)?,
            None => x.clone(),
        };
        match self.backend {
            Backend::Fused => contrastive_kernels::add_relu(&h, &identity),
            Backend::Candle => (h + identity)?.relu(),
        }
    }

    /// Training on the CPU: the whole block as one op ([`contrastive_kernels::residual_block_train`],
    /// the same values and gradients as the layers' own ops with fewer gradient buffers), then
    /// each batch norm's running-average update.
    fn forward_fused(&self, x: &Tensor) -> Result<Tensor> {
        fn layer(unit: &ConvBn) -> contrastive_kernels::ConvBnLayer<'_> {
            contrastive_kernels::ConvBnLayer {
                weight: unit.conv.weight(),
                gamma: unit.bn.weight(),
                beta: unit.bn.bias(),
                stride: unit.conv.stride(),
                padding: unit.conv.padding(),
                eps: unit.bn.eps(),
            }
        }
        let (y, stats) = contrastive_kernels::residual_block_train(
            x,
            layer(&self.layer1),
            layer(&self.layer2),
            self.shortcut.as_ref().map(layer),
        )?;
        self.layer1.bn.update_running_statistics(&stats.layer1)?;
        self.layer2.bn.update_running_statistics(&stats.layer2)?;
        if let (Some(shortcut), Some(stats)) = (&self.shortcut, &stats.shortcut) {
            shortcut.bn.update_running_statistics(stats)?;
        }
        Ok(y)
    }

    /// The block in evaluation mode as ONNX nodes (batch norms folded into the convs); values
    /// are named `{name}.conv1`, `{name}.add`, ….
    pub fn to_onnx(&self, g: &mut GraphBuilder, input: &str, name: &str) -> ExportResult<String> {
        let h = self.layer1.to_onnx(g, input, &format!("{name}.conv1"))?;
        let h = g.node("Relu", &[&h], &format!("{name}.relu1"), &[])?;
        let h = self.layer2.to_onnx(g, &h, &format!("{name}.conv2"))?;
        let identity = match &self.shortcut {
            Some(shortcut) => shortcut.to_onnx(g, input, &format!("{name}.shortcut.conv"))?,
            None => input.to_string(),
        };
        let sum = g.node("Add", &[&h, &identity], &format!("{name}.add"), &[])?;
        g.node("Relu", &[&sum], &format!("{name}.relu2"), &[])
    }
}

/// The ResNet encoder: `[N, C, H, W]` images to `[N, feature_dim]` features.
#[derive(Debug, Clone)]
pub struct ResNet {
    pub config: ResNetConfig,
    pub stem: ConvBn,
    pub blocks: Vec<BasicBlock>,
    /// In training, the stem and this many blocks are frozen (see [`ResNet::freeze_stages`]).
    frozen_blocks: Option<usize>,
}

impl ResNet {
    pub fn new(vb: VarBuilder, config: &ResNetConfig, backend: Backend) -> Result<Self> {
        config.validate().map_err(candle_core::Error::wrap)?;
        let stem_width = config.widths[0];
        let stem = ConvBn::new(
            Conv2d::new(vb.pp("stem.conv"), config.in_channels, stem_width, 3, 1, 1, backend)?,
            BatchNorm2d::new(vb.pp("stem.bn"), stem_width, backend)?,
        );
        let mut blocks = Vec::new();
        let mut in_channels = stem_width;
        for (stage, ((&width, &depth), &stride)) in
            config.widths.iter().zip(&config.blocks).zip(&config.strides).enumerate()
        {
            for block in 0..depth {
                let vb = vb.pp(format!("stage{}.block{}", stage + 1, block + 1));
                let stride = if block == 0 { stride } else { 1 };
                blocks.push(BasicBlock::new(vb, in_channels, width, stride, backend)?);
                in_channels = width;
            }
        }
        Ok(Self { config: config.clone(), stem, blocks, frozen_blocks: None })
    }

    /// Freezes the stem and the first `stages` stages for training (`None`: nothing frozen).
    /// Frozen layers then run as served, on their running statistics, whose values the
    /// training batches (a few classes of a fine-tune) would not match, and the backward
    /// pass stops where they end instead of computing gradients nothing reads.
    pub fn freeze_stages(&mut self, stages: Option<usize>) {
        self.frozen_blocks = stages.map(|s| self.config.blocks.iter().take(s).sum());
    }

    pub fn feature_dim(&self) -> usize {
        self.config.feature_dim()
    }

    /// The embedding `[N, feature_dim]`: the image's pooled features, or with a patch grid the
    /// mean of its patches' (see [`ResNetConfig::patches`]).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let Some(grid) = self.config.patches else { return self.pooled_t(x, train) };
        let (patches, rows, columns) = patch_grid(x, grid.size, grid.stride)?;
        let [n, count, c, size, _] = patches.dims5().map(|d| [d.0, d.1, d.2, d.3, d.4])?;
        debug_assert_eq!(count, rows * columns);
        let codes = self.pooled_t(&patches.reshape((n * count, c, size, size))?, train)?;
        codes.reshape((n, count, ()))?.mean(1)
    }

    /// The globally mean-pooled features of `x` as it is, `[N, feature_dim]` (CPC's patch codes).
    pub fn pooled_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        // Global mean pooling: pooling ops' backward only works when kernel == stride.
        self.feature_map_t(x, train)?.flatten_from(2)?.mean(D::Minus1)
    }

    /// The last stage's output before pooling, `[N, C, h, w]` (ContrastiveCrop's heatmaps).
    pub fn feature_map_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        Ok(self.stage_maps_t(x, train)?.pop().expect("a ResNet has at least one stage"))
    }

    /// Every stage's output, `[N, widths[s], h_s, w_s]` (SelfCon's exit path reads an
    /// intermediate one).
    pub fn stage_maps_t(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        let frozen = if train { self.frozen_blocks } else { None };
        let stage_ends: Vec<usize> = self
            .config
            .blocks
            .iter()
            .scan(0, |end, &blocks| {
                *end += blocks;
                Some(*end)
            })
            .collect();
        let mut h = self.stem.forward_t(x, train && frozen.is_none(), true)?;
        let mut maps = Vec::with_capacity(stage_ends.len());
        for (i, block) in self.blocks.iter().enumerate() {
            if frozen == Some(i) {
                h = h.detach();
            }
            h = block.forward_t(&h, train && frozen.is_none_or(|f| i >= f))?;
            if stage_ends.contains(&(i + 1)) {
                // A stage that ends within the frozen part passes no gradient back.
                maps.push(if frozen.is_some_and(|f| i < f) { h.detach() } else { h.clone() });
            }
        }
        Ok(maps)
    }

    /// The encoder in evaluation mode as ONNX nodes reading `input` (`[N, C, H, W]` of `height`
    /// × `width`); returns the `[N, feature_dim]` feature value, named `features`.
    pub fn to_onnx(&self, g: &mut GraphBuilder, input: &str, height: usize, width: usize) -> ExportResult<String> {
        let Some(grid) = self.config.patches else { return self.body_to_onnx(g, input, "features") };
        // The patches stacked patch-major on the batch axis, [G·N, C, p, p], through the body,
        // then [G, N, F] averaged over G.
        let (rows, columns) = (grid_starts(height, grid.size, grid.stride), grid_starts(width, grid.size, grid.stride));
        let axes = g.initializer_i64("patches.axes", &[2], &[2, 3])?;
        let mut patches = Vec::new();
        for &top in &rows {
            for &left in &columns {
                let name = format!("patches.r{top}c{left}");
                let starts = g.initializer_i64(&format!("{name}.starts"), &[2], &[top as i64, left as i64])?;
                let ends = g.initializer_i64(
                    &format!("{name}.ends"),
                    &[2],
                    &[(top + grid.size) as i64, (left + grid.size) as i64],
                )?;
                patches.push(g.node("Slice", &[input, &starts, &ends, &axes], &name, &[])?);
            }
        }
        let refs: Vec<&str> = patches.iter().map(String::as_str).collect();
        let stacked = g.node("Concat", &refs, "patches", &[("axis", Attr::Int(0))])?;
        let codes = self.body_to_onnx(g, &stacked, "patch_codes")?;
        let shape =
            g.initializer_i64("patch_codes.shape", &[3], &[patches.len() as i64, -1, self.feature_dim() as i64])?;
        let grouped = g.node("Reshape", &[&codes, &shape], "patch_codes.by_patch", &[])?;
        g.node("ReduceMean", &[&grouped], "features", &[("axes", Attr::Ints(vec![0])), ("keepdims", Attr::Int(0))])
    }

    /// Stem, blocks and global pooling as ONNX nodes; the pooled `[N, feature_dim]` value is
    /// named `output`.
    fn body_to_onnx(&self, g: &mut GraphBuilder, input: &str, output: &str) -> ExportResult<String> {
        let h = self.stem.to_onnx(g, input, "stem.conv")?;
        let mut h = g.node("Relu", &[&h], "stem.relu", &[])?;
        let mut names = Vec::new();
        for (stage, &depth) in self.config.blocks.iter().enumerate() {
            names.extend((0..depth).map(|block| format!("stage{}.block{}", stage + 1, block + 1)));
        }
        for (block, name) in self.blocks.iter().zip(&names) {
            h = block.to_onnx(g, &h, name)?;
        }
        let pooled = g.node("GlobalAveragePool", &[&h], "pool", &[])?;
        g.node("Flatten", &[&pooled], output, &[("axis", Attr::Int(1))])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    #[test]
    fn canonical_encoder_has_about_307k_parameters() -> anyhow::Result<()> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        ResNet::new(vb, &ResNetConfig::canonical(1), Backend::Fused)?;
        let trainable: usize = varmap
            .data()
            .lock()
            .unwrap()
            .iter()
            .filter(|(name, _)| !name.ends_with("running_mean") && !name.ends_with("running_var"))
            .map(|(_, v)| v.elem_count())
            .sum();
        // Counted by hand from the layer list: convs 305,440 + batch-norm scales and shifts 1,344.
        assert_eq!(trainable, 306_784);
        Ok(())
    }

    #[test]
    fn output_is_feature_dim_wide_and_spatial_size_follows_strides() -> anyhow::Result<()> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let net = ResNet::new(vb, &ResNetConfig::canonical(3), Backend::Fused)?;
        let x = Tensor::rand(0f32, 1f32, (2, 3, 28, 28), &Device::Cpu)?;
        assert_eq!(net.forward_t(&x, true)?.dims(), &[2, 128]);
        assert_eq!(net.forward_t(&x, false)?.dims(), &[2, 128]);
        Ok(())
    }

    /// Training with the stem and stages 1–2 frozen: those layers give what evaluation gives
    /// (running statistics, left unchanged), no gradient reaches them, and stage 3 trains.
    #[test]
    fn frozen_stages_run_as_served_and_get_no_gradient() -> anyhow::Result<()> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let mut net = ResNet::new(vb, &ResNetConfig::canonical(1), Backend::Fused)?;
        let x = Tensor::rand(0f32, 1f32, (4, 1, 28, 28), &Device::Cpu)?;
        let stat = |name: &str| -> anyhow::Result<Vec<f32>> {
            Ok(varmap.data().lock().unwrap()[name].as_tensor().to_vec1::<f32>()?)
        };
        let before = stat("stage2.block1.bn1.running_mean")?;

        net.freeze_stages(Some(3));
        let all_frozen = net.forward_t(&x, true)?;
        let served = net.forward_t(&x, false)?;
        let diff = (all_frozen - &served)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "every stage frozen: training forward equals evaluation, max diff {diff}");

        net.freeze_stages(Some(2));
        let loss = net.forward_t(&x, true)?.sqr()?.sum_all()?;
        let grads = loss.backward()?;
        let vars = varmap.data().lock().unwrap();
        for (name, var) in vars.iter().filter(|(n, _)| n.ends_with(".weight")) {
            let reached = grads.get(var.as_tensor()).is_some();
            assert_eq!(reached, name.starts_with("stage3."), "gradient of {name}");
        }
        drop(vars);
        assert_eq!(stat("stage2.block1.bn1.running_mean")?, before, "a frozen batch norm keeps its statistics");
        assert_ne!(stat("stage3.block1.bn1.running_mean")?, vec![0.0; 128], "a trained one updates them");
        Ok(())
    }

    #[test]
    fn mismatched_stage_lists_are_rejected() {
        let mut config = ResNetConfig::canonical(1);
        config.strides.pop();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("one entry per stage"), "{err}");
    }
}

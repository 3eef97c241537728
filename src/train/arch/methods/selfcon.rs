//! SelfCon (Bae et al. 2023, "Self-Contrastive Learning: Single-viewed Supervised Contrastive
//! Framework using Sub-network"): synchronous asymmetric.
//!
//! - backbone f with projector g; a sub-network ("exit path") branches off after stage
//!   `exit_stage`: its own copies of the remaining stages (one basic block each, the paper's
//!   small exit) and its own projector g_sub. Both branches are trained by gradient and differ
//!   in depth, hence asymmetric.
//! - pairs: per image, the backbone's and the exit's projection of the same view are positives;
//!   with two views (SelfCon-M, the default here) the four vectors of an image are each other's
//!   positives; with `single_view` (SelfCon-S) only the two exits of one view are. With
//!   `labels` the paper's supervised form: every vector of a same-class image is a positive too.
//!   Every other vector in the batch is a negative ([`Contrast::in_batch_views`]).
//! - loss: InfoNCE with multiple positives (SupCon's L_out), or the run's instance loss:
//!   `ℓ_a = −1/|P(a)| Σ_{p∈P(a)} log( e^{z_a·z_p/τ} / Σ_{k≠a} e^{z_a·z_k/τ} )`.
//!
//! The served embedding is the backbone's (the exit path is dropped); the paper's finding is
//! that the exit's gradient regularises the backbone's earlier stages.

use candle_core::{Result, Tensor, D};

use super::{Method, MethodConfig, MethodParts};
use crate::train::arch::resnet::BasicBlock;
use crate::train::arch::{Encoder, Mlp};
use crate::train::pairs::{label_positive_mask, Contrast, Denominator};

pub struct SelfCon {
    config: MethodConfig,
    encoder: Encoder,
    projector: Mlp,
    exit: ExitPath,
}

/// The sub-network after an intermediate stage: one basic block per remaining stage, global
/// mean pooling, a projector of the backbone's sizes.
pub struct ExitPath {
    /// Index into the backbone's stage outputs that the exit reads.
    stage: usize,
    blocks: Vec<BasicBlock>,
    projector: Mlp,
}

impl ExitPath {
    fn new(parts: &MethodParts, exit_stage: usize) -> Result<Self> {
        let Some(encoder) = parts.encoder.as_resnet() else {
            candle_core::bail!("selfcon's exit path branches off a ResNet stage: it needs --encoder resnet")
        };
        let stages = encoder.widths.len();
        check_exit_stage(exit_stage, stages)?;
        let vb = parts.vb.pp("exit");
        let mut blocks = Vec::new();
        let mut in_channels = encoder.widths[exit_stage - 1];
        for stage in exit_stage..stages {
            let (width, stride) = (encoder.widths[stage], encoder.strides[stage]);
            blocks.push(BasicBlock::new(
                vb.pp(format!("stage{}", stage + 1)),
                in_channels,
                width,
                stride,
                parts.backend,
            )?);
            in_channels = width;
        }
        let projector = Mlp::new(vb.pp("projector"), &parts.projector_config(), parts.backend)?;
        Ok(Self { stage: exit_stage - 1, blocks, projector })
    }

    fn forward_t(&self, stage_maps: &[Tensor], train: bool) -> Result<Tensor> {
        let mut h = stage_maps[self.stage].clone();
        for block in &self.blocks {
            h = block.forward_t(&h, train)?;
        }
        self.projector.forward_t(&h.flatten_from(2)?.mean(D::Minus1)?, train)
    }
}

/// The exit must branch off after a stage before the encoder's last.
pub fn check_exit_stage(exit_stage: usize, stages: usize) -> Result<()> {
    if exit_stage == 0 || exit_stage >= stages {
        candle_core::bail!(
            "selfcon: exit_stage must be in 1..={} (a stage before the encoder's last of {stages}), got {exit_stage}",
            stages.saturating_sub(1)
        )
    }
    Ok(())
}

impl SelfCon {
    pub fn new(config: MethodConfig, parts: &MethodParts) -> Result<Self> {
        let MethodConfig::Selfcon { exit_stage, .. } = &config else { candle_core::bail!("not a SelfCon config") };
        let exit = ExitPath::new(parts, *exit_stage)?;
        let encoder = Encoder::new(parts.vb.pp("encoder"), parts.encoder, parts.backend)?;
        let projector = Mlp::new(parts.vb.pp("projector"), &parts.projector_config(), parts.backend)?;
        Ok(Self { config, encoder, projector, exit })
    }
}

impl Method for SelfCon {
    fn config(&self) -> &MethodConfig {
        &self.config
    }

    fn loss(&mut self, views: &[Tensor], labels: &Tensor, _indices: &[usize], _step: usize) -> Result<Tensor> {
        let MethodConfig::Selfcon { temperature, single_view, labels: supervised, loss, .. } = &self.config else {
            unreachable!("built from a SelfCon config")
        };
        let views = if *single_view { &views[..1] } else { &views[..2] };
        let maps = self
            .encoder
            .as_resnet()
            .expect("SelfCon is built on a ResNet")
            .stage_maps_t(&Tensor::cat(views, 0)?, true)?;
        let pooled = maps.last().expect("a ResNet has stages").flatten_from(2)?.mean(D::Minus1)?;
        let backbone = self.projector.forward_t(&pooled, true)?;
        let exit = self.exit.forward_t(&maps, true)?;
        // Groups: the backbone's vectors of each view, then the exit's.
        let mut groups = backbone.chunk(views.len(), 0)?;
        groups.extend(exit.chunk(views.len(), 0)?);
        let mut contrast = Contrast::in_batch_views(&groups, Denominator::AllViews)?;
        if *supervised {
            let class_of_rows = Tensor::cat(&vec![labels.clone(); groups.len()], 0)?;
            contrast.positives = label_positive_mask(&class_of_rows)?.to_dtype(contrast.positives.dtype())?;
        }
        loss.loss(&contrast, *temperature)
    }

    fn encoder(&self) -> &Encoder {
        &self.encoder
    }

    fn encoder_mut(&mut self) -> &mut Encoder {
        &mut self.encoder
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    use crate::train::arch::methods::{named_vars, trainable_vars};
    use crate::train::arch::ResNetConfig;

    fn build(config: &MethodConfig, varmap: &VarMap) -> Result<SelfCon> {
        let encoder = ResNetConfig { widths: vec![4, 8, 8], ..ResNetConfig::canonical(1) }.into();
        let parts = MethodParts::for_test(varmap, &encoder);
        SelfCon::new(config.clone(), &parts)
    }

    /// The exit path copies the stages after the exit (stage 3: widths 8, stride 2), and one
    /// step's gradient reaches the backbone's stages, its head and the exit's parts.
    #[test]
    fn the_exit_path_and_the_backbone_both_train() -> Result<()> {
        let varmap = VarMap::new();
        let config = MethodConfig::default_for("selfcon").unwrap();
        let mut method = build(&config, &varmap)?;
        let names: Vec<String> = named_vars(&varmap).into_iter().map(|(n, _)| n).collect();
        assert!(names.contains(&"exit.stage3.conv1.weight".to_string()), "{names:?}");
        assert!(!names.iter().any(|n| n.starts_with("exit.stage2")), "the exit starts after stage 2");
        let views = vec![Tensor::randn(0f32, 1., (4, 1, 12, 12), &Device::Cpu)?; 2];
        let labels = Tensor::new(&[0u32, 1, 0, 1], &Device::Cpu)?;
        let loss = method.loss(&views, &labels, &[0, 1, 2, 3], 0)?;
        let grads = loss.backward()?;
        for prefix in ["encoder.stage1.", "encoder.stage3.", "projector.", "exit.stage3.", "exit.projector."] {
            let reached = trainable_vars(&varmap).iter().filter(|(n, _)| n.starts_with(prefix)).any(|(_, v)| {
                grads
                    .get(v.as_tensor())
                    .is_some_and(|g| g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0)
            });
            assert!(reached, "no gradient reached {prefix}");
        }
        Ok(())
    }

    /// With one view the batch's 2N vectors are the N backbone and N exit projections: InfoNCE
    /// over them has 2N − 1 candidates, so at random init it sits near log(2N − 1).
    #[test]
    fn single_view_contrasts_the_two_exits_of_one_view() -> Result<()> {
        let varmap = VarMap::new();
        let mut config = MethodConfig::default_for("selfcon").unwrap();
        if let MethodConfig::Selfcon { single_view, temperature, .. } = &mut config {
            *single_view = true;
            *temperature = 1e6; // every logit ~0: the loss is exactly log(2N − 1)
        }
        let mut method = build(&config, &varmap)?;
        let views = vec![Tensor::randn(0f32, 1., (8, 1, 12, 12), &Device::Cpu)?; 2];
        let loss = method.loss(&views, &Tensor::zeros(8, DType::U32, &Device::Cpu)?, &[0; 8], 0)?;
        let expected = (15f32).ln();
        assert!((loss.to_scalar::<f32>()? - expected).abs() < 1e-4, "{loss} vs log 15 = {expected}");
        Ok(())
    }

    #[test]
    fn an_exit_at_the_last_stage_is_refused() {
        let varmap = VarMap::new();
        let mut config = MethodConfig::default_for("selfcon").unwrap();
        if let MethodConfig::Selfcon { exit_stage, .. } = &mut config {
            *exit_stage = 3;
        }
        let err = build(&config, &varmap).err().expect("refused").to_string();
        assert!(err.contains("exit_stage must be in 1..=2"), "{err}");
    }
}

//! DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers"):
//! asynchronous asymmetric self-distillation, no negatives.
//!
//! - student: encoder + head (an MLP to a bottleneck, L2 normalisation, a weight-normalised
//!   linear layer to K outputs, [`WeightNormLinear`]), trained by gradient;
//! - teacher: the same networks, an EMA of the student with momentum rising from
//!   `base_momentum` to 1 on a cosine schedule;
//! - pairs: every (teacher crop, other student crop) pair: the teacher sees the two global
//!   views, the student those and the multi-crop local crops (`local_crops`, 0 by default);
//! - loss: cross-entropy of the student's `softmax(s/τ_s)` against the teacher's centred and
//!   sharpened `softmax((t − c)/τ_t)` ([`loss::dino`]); τ_t rises linearly from
//!   `warmup_teacher_temperature` to `teacher_temperature` over the first `teacher_warmup` of
//!   training;
//! - after each step: momentum update; the centre `c ← m c + (1 − m) mean(t)` after each loss;
//!   the student's last layer stays fixed for the first `freeze_last_layer` of the run.
//!
//! The paper's head is 2048 wide with a 256 bottleneck and K = 65,536 for ImageNet; the run's
//! projector sizes give the MLP here and K is a parameter. The MLP's hidden layers have batch
//! norm (as solo-learn's DINO head for ResNets): without it, 210 steps on the test subset
//! collapsed to uniform outputs (k-NN 0.430 against 0.512 at random init; with it 0.544).

use std::collections::HashMap;

use candle_core::{Result, Tensor};

use super::{Branch, Method, MethodConfig, MethodParts, TARGET_PREFIX};
use crate::train::arch::{ema::cosine_momentum, EmaPairs, Encoder, MlpConfig, WeightNormLinear};
use crate::train::loss::{self, DinoCenter};

const CENTER_BUFFER: &str = "dino.center";

pub struct Dino {
    config: MethodConfig,
    student: Branch,
    student_last: WeightNormLinear,
    teacher: Branch,
    teacher_last: WeightNormLinear,
    ema: EmaPairs,
    center: DinoCenter,
    /// Fraction of training done, for the teacher temperature's warm-up.
    progress: f64,
}

impl Dino {
    pub fn new(config: MethodConfig, parts: &MethodParts) -> Result<Self> {
        let MethodConfig::Dino { out_dim, center_momentum, .. } = config else {
            candle_core::bail!("not a DINO config")
        };
        let head = MlpConfig { output_batch_norm: false, ..parts.projector_config() };
        let student = parts.branch(&head)?;
        let student_last = WeightNormLinear::new(parts.vb.pp("projector.last"), head.out_dim(), out_dim)?;
        // The teacher's last layer exists before the EMA pairs are made, which copy the
        // student's values into every target parameter.
        let teacher_vb = parts.vb.pp(TARGET_PREFIX.trim_end_matches('.'));
        let teacher_last = WeightNormLinear::new(teacher_vb.pp("projector.last"), head.out_dim(), out_dim)?;
        let (teacher, ema) = parts.target_branch(&head)?;
        let center = DinoCenter::new(out_dim, center_momentum, parts.vb.device())?;
        Ok(Self { config, student, student_last, teacher, teacher_last, ema, center, progress: 0.0 })
    }

    /// τ_t at the current point of training.
    fn teacher_temperature(&self) -> f64 {
        let MethodConfig::Dino { teacher_temperature, warmup_teacher_temperature, teacher_warmup, .. } = self.config
        else {
            unreachable!("a DINO config")
        };
        if self.progress >= teacher_warmup {
            return teacher_temperature;
        }
        let share = self.progress / teacher_warmup;
        warmup_teacher_temperature + (teacher_temperature - warmup_teacher_temperature) * share
    }
}

/// The head's K outputs of every view: MLP, L2 normalisation, the weight-normalised layer.
fn head_outputs(branch: &Branch, last: &WeightNormLinear, views: &[Tensor]) -> Result<Vec<Tensor>> {
    branch.project_views(views, true)?.iter().map(|z| last.forward(&contrastive_kernels::l2_normalize(z)?)).collect()
}

impl Method for Dino {
    fn config(&self) -> &MethodConfig {
        &self.config
    }

    fn loss(&mut self, views: &[Tensor], _labels: &Tensor, _indices: &[usize], _step: usize) -> Result<Tensor> {
        let MethodConfig::Dino { student_temperature, .. } = self.config else { unreachable!("a DINO config") };
        let MethodConfig::Dino { freeze_last_layer, .. } = self.config else { unreachable!("a DINO config") };
        let student = if self.progress < freeze_last_layer {
            let fixed = WeightNormLinear { direction: self.student_last.direction.detach() };
            head_outputs(&self.student, &fixed, views)?
        } else {
            head_outputs(&self.student, &self.student_last, views)?
        };
        // The teacher sees the two global views only.
        let teacher: Vec<Tensor> =
            head_outputs(&self.teacher, &self.teacher_last, &views[..2])?.iter().map(Tensor::detach).collect();
        let loss =
            loss::dino(&student, &teacher, self.center.tensor(), student_temperature, self.teacher_temperature())?;
        self.center.update(&teacher)?;
        Ok(loss)
    }

    fn after_step(&mut self, progress: f64) -> Result<()> {
        let MethodConfig::Dino { base_momentum, .. } = self.config else { unreachable!("a DINO config") };
        self.progress = progress;
        self.ema.update(cosine_momentum(base_momentum, progress))
    }

    fn encoder(&self) -> &Encoder {
        &self.student.encoder
    }

    fn encoder_mut(&mut self) -> &mut Encoder {
        &mut self.student.encoder
    }

    fn buffers(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(vec![(CENTER_BUFFER.to_string(), self.center.tensor().clone())])
    }

    fn load_buffers(&mut self, buffers: &HashMap<String, Tensor>) -> Result<()> {
        let MethodConfig::Dino { center_momentum, .. } = self.config else { unreachable!("a DINO config") };
        if let Some(center) = buffers.get(CENTER_BUFFER) {
            self.center = DinoCenter::from_tensor(center, center_momentum)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    use crate::train::arch::methods::{named_vars, trainable_vars, MultiCrop};
    use crate::train::arch::{EncoderConfig, ResNetConfig};

    fn build(varmap: &VarMap) -> Result<Dino> {
        let encoder: EncoderConfig = ResNetConfig { widths: vec![4, 8, 8], ..ResNetConfig::canonical(1) }.into();
        let parts = MethodParts::for_test(varmap, &encoder);
        let config = MethodConfig::Dino {
            out_dim: 16,
            student_temperature: 0.1,
            teacher_temperature: 0.07,
            warmup_teacher_temperature: 0.04,
            teacher_warmup: 0.5,
            base_momentum: 0.996,
            center_momentum: 0.9,
            freeze_last_layer: 0.0,
            multi_crop: MultiCrop { local_crops: 0, local_size: 4, local_scale: (0.05, 0.4) },
        };
        Dino::new(config, &parts)
    }

    /// The student trains, the teacher (last layer included) starts equal and gets no gradient,
    /// the centre moves to 10 % of the teacher outputs' mean after one loss and travels with
    /// the checkpoint's buffers.
    #[test]
    fn student_trains_teacher_follows_and_the_centre_is_kept() -> anyhow::Result<()> {
        let varmap = VarMap::new();
        let mut method = build(&varmap)?;
        let named = named_vars(&varmap);
        let value = |name: &str| named.iter().find(|(n, _)| n == name).unwrap().1.as_tensor().to_vec2::<f32>();
        assert_eq!(value("target.projector.last.direction")?, value("projector.last.direction")?);

        let views: Vec<Tensor> =
            (0..2).map(|_| Tensor::rand(0f32, 1f32, (6, 1, 8, 8), &Device::Cpu)).collect::<candle_core::Result<_>>()?;
        let labels = Tensor::zeros(6, DType::U32, &Device::Cpu)?;
        let teacher = head_outputs(&method.teacher, &method.teacher_last, &views)?;
        let loss = method.loss(&views, &labels, &[0; 6], 0)?;
        let grads = loss.backward()?;
        let trainable = trainable_vars(&varmap);
        assert!(trainable.iter().any(|(n, _)| n == "projector.last.direction"));
        for (name, var) in &trainable {
            assert!(grads.get(var.as_tensor()).is_some(), "no gradient for {name}");
        }
        for (name, var) in named.iter().filter(|(n, _)| n.starts_with("target.")) {
            assert!(grads.get(var.as_tensor()).is_none(), "gradient reached {name}");
        }

        let mean = Tensor::cat(&teacher, 0)?.mean(0)?;
        let expected = (mean * 0.1)?.to_vec1::<f32>()?;
        let center = method.center.tensor().to_vec1::<f32>()?;
        for (a, b) in center.iter().zip(&expected) {
            assert!((a - b).abs() < 1e-6, "{center:?} vs {expected:?}");
        }
        let buffers: HashMap<String, Tensor> = method.buffers()?.into_iter().collect();
        let mut restored = build(&VarMap::new())?;
        restored.load_buffers(&buffers)?;
        assert_eq!(restored.center.tensor().to_vec1::<f32>()?, center);
        Ok(())
    }

    /// Multi-crop: two 8×8 global views and two 4×4 local crops; the student's four outputs
    /// meet the teacher's two in 2·4 − 2 = 6 pairs, and every trainable parameter learns.
    #[test]
    fn local_crops_reach_the_student_only() -> anyhow::Result<()> {
        let varmap = VarMap::new();
        let mut method = build(&varmap)?;
        let sizes = [8, 8, 4, 4];
        let views: Vec<Tensor> = sizes
            .iter()
            .map(|&side| Tensor::rand(0f32, 1f32, (6, 1, side, side), &Device::Cpu))
            .collect::<candle_core::Result<_>>()?;
        let labels = Tensor::zeros(6, DType::U32, &Device::Cpu)?;
        let student = head_outputs(&method.student, &method.student_last, &views)?;
        let teacher = head_outputs(&method.teacher, &method.teacher_last, &views[..2])?;
        let expected = loss::dino(&student, &teacher, method.center.tensor(), 0.1, 0.04)?.to_scalar::<f32>()?;
        let loss = method.loss(&views, &labels, &[0; 6], 0)?;
        assert!((loss.to_scalar::<f32>()? - expected).abs() < 1e-5);
        let grads = loss.backward()?;
        for (name, var) in trainable_vars(&varmap) {
            assert!(grads.get(var.as_tensor()).is_some(), "no gradient for {name}");
        }
        Ok(())
    }

    /// τ_t: 0.04 at the start, 0.055 half-way through a warm-up of half the run, 0.07 after.
    #[test]
    fn the_teacher_temperature_warms_up_linearly() -> anyhow::Result<()> {
        let mut method = build(&VarMap::new())?;
        for (progress, expected) in [(0.0, 0.04), (0.25, 0.055), (0.5, 0.07), (0.9, 0.07)] {
            method.progress = progress;
            assert!((method.teacher_temperature() - expected).abs() < 1e-12, "at {progress}");
        }
        Ok(())
    }
}

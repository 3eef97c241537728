//! Supervised contrastive learning (Khosla et al. 2020): synchronous symmetric, like SimCLR, but
//! every view of every sample with the same label is a positive (positive expansion by labels).
//! The loss is SupCon's L_out, on the projection head's output or, for fine-tunes, on the
//! encoder's output itself (`on_embedding`). Fine-tuning jobs use this method.
//!
//! The long-tail members of the family are chosen with `loss` ([`SupervisedLoss`]): KCL keeps
//! k positives per anchor, TSC adds class targets spread on the sphere, BCL class-averages the
//! denominator and adds class centres, the hybrid network adds a classifier's cross-entropy.

use std::collections::HashMap;

use candle_core::{DType, Result, Tensor};
use candle_nn::{Linear, Module};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::{Branch, Method, MethodConfig, MethodParts};
use crate::train::arch::Encoder;
use crate::train::loader::mix_seed;
use crate::train::loss::{self, tsc};
use crate::train::pairs::k_positive_mask;

/// The loss of the SupCon family (`contrastive train --method supcon --loss NAME`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "kebab-case")]
pub enum SupervisedLoss {
    /// SupCon's L_out: every same-label view is a positive.
    #[default]
    Supcon,
    /// KCL (Kang et al. 2021): SupCon on `positives` same-class views per anchor.
    Kcl { positives: usize },
    /// TSC (Li et al. 2022): KCL plus `target_weight` times the pull to the class's target;
    /// targets are re-matched to class centres every `assign_every_steps` steps.
    Tsc { positives: usize, target_weight: f64, classes: usize, assign_every_steps: usize },
    /// BCL (Zhu et al. 2022): class-averaged denominators and `classes` learnable centres.
    Bcl { classes: usize },
    /// Wang et al. 2021: SupCon plus a `classes`-way classifier's cross-entropy, the weight moving
    /// from the first to the second over training.
    Hybrid { classes: usize },
}

impl SupervisedLoss {
    pub const NAMES: [&'static str; 5] = ["supcon", "kcl", "tsc", "bcl", "hybrid"];

    /// The defaults for `name`: the papers' k = 6 and λ = 1; `classes` is set from the data when
    /// a run starts ([`MethodConfig::set_classes`]).
    pub fn default_for(name: &str) -> anyhow::Result<Self> {
        Ok(match name {
            "supcon" => Self::Supcon,
            "kcl" => Self::Kcl { positives: 6 },
            "tsc" => Self::Tsc { positives: 6, target_weight: 1.0, classes: 10, assign_every_steps: 50 },
            "bcl" => Self::Bcl { classes: 10 },
            "hybrid" => Self::Hybrid { classes: 10 },
            other => anyhow::bail!("unknown supervised loss '{other}': expected one of {}", Self::NAMES.join(", ")),
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Supcon => "supcon",
            Self::Kcl { .. } => "kcl",
            Self::Tsc { .. } => "tsc",
            Self::Bcl { .. } => "bcl",
            Self::Hybrid { .. } => "hybrid",
        }
    }

    /// The number of classes the loss is built for, where it has one.
    pub fn classes_mut(&mut self) -> Option<&mut usize> {
        match self {
            Self::Tsc { classes, .. } | Self::Bcl { classes } | Self::Hybrid { classes } => Some(classes),
            Self::Supcon | Self::Kcl { .. } => None,
        }
    }
}

/// What each loss adds to the shared encoder and head.
enum LossParts {
    Supcon,
    Kcl { positives: usize },
    Tsc(Box<TargetState>),
    Bcl { centres: candle_core::Var },
    Hybrid { classifier: Linear, progress: f64 },
}

/// TSC's targets, the target each class is matched to, and the class sums of the features seen
/// since the last matching (the centres of the next one).
struct TargetState {
    positives: usize,
    target_weight: f64,
    assign_every_steps: usize,
    targets: Vec<Vec<f64>>,
    assignment: Vec<usize>,
    sums: Vec<Vec<f64>>,
}

impl TargetState {
    /// `[C, D]`: row `c` is class `c`'s target.
    fn class_targets(&self, device: &candle_core::Device) -> Result<Tensor> {
        let rows: Vec<f32> = self.assignment.iter().flat_map(|&t| self.targets[t].iter().map(|&x| x as f32)).collect();
        Tensor::from_vec(rows, (self.assignment.len(), self.targets[0].len()), device)
    }

    fn accumulate(&mut self, z: &Tensor, labels: &[u32]) -> Result<()> {
        let z = loss::l2_normalize(&z.detach())?.to_dtype(DType::F64)?.to_vec2::<f64>()?;
        for (row, &label) in z.iter().zip(labels) {
            self.sums[label as usize].iter_mut().zip(row).for_each(|(s, x)| *s += x);
        }
        Ok(())
    }

    fn reassign(&mut self) -> Result<()> {
        self.assignment = tsc::assign_targets(&self.sums, &self.targets)?;
        self.sums.iter_mut().for_each(|s| s.fill(0.0));
        Ok(())
    }
}

pub struct SupCon {
    config: MethodConfig,
    temperature: f64,
    on_embedding: bool,
    branch: Branch,
    parts: LossParts,
    seed: u64,
    device: candle_core::Device,
}

impl SupCon {
    pub fn new(config: MethodConfig, parts: &MethodParts) -> Result<Self> {
        let MethodConfig::Supcon { temperature, on_embedding, ref loss } = config else {
            candle_core::bail!("not a SupCon config")
        };
        let projector = parts.projector_config();
        let branch = parts.branch(&projector)?;
        let (features, dim) =
            (parts.encoder.feature_dim(), if on_embedding { parts.encoder.feature_dim() } else { projector.out_dim() });
        let loss_parts = match *loss {
            SupervisedLoss::Supcon => LossParts::Supcon,
            SupervisedLoss::Kcl { positives } => LossParts::Kcl { positives },
            SupervisedLoss::Tsc { positives, target_weight, classes, assign_every_steps } => {
                if assign_every_steps == 0 {
                    candle_core::bail!("TSC's assign_every_steps must be at least 1")
                }
                LossParts::Tsc(Box::new(TargetState {
                    positives,
                    target_weight,
                    assign_every_steps,
                    targets: tsc::uniform_targets(classes, dim, parts.seed)?,
                    assignment: (0..classes).collect(),
                    sums: vec![vec![0.0; dim]; classes],
                }))
            }
            SupervisedLoss::Bcl { classes } => {
                let init = candle_nn::init::DEFAULT_KAIMING_UNIFORM;
                LossParts::Bcl {
                    centres: candle_core::Var::from_tensor(&parts.vb.get_with_hints(
                        (classes, dim),
                        "centres.weight",
                        init,
                    )?)?,
                }
            }
            SupervisedLoss::Hybrid { classes } => LossParts::Hybrid {
                classifier: candle_nn::linear(features, classes, parts.vb.pp("classifier"))?,
                progress: 0.0,
            },
        };
        Ok(Self {
            config,
            temperature,
            on_embedding,
            branch,
            parts: loss_parts,
            seed: parts.seed,
            device: parts.vb.device().clone(),
        })
    }
}

impl Method for SupCon {
    fn config(&self) -> &MethodConfig {
        &self.config
    }

    fn loss(&mut self, views: &[Tensor], labels: &Tensor, _indices: &[usize], step: usize) -> Result<Tensor> {
        let h = self.branch.encoder.forward_t(&Tensor::cat(views, 0)?, true)?;
        let z = if self.on_embedding { h.clone() } else { self.branch.projector.forward_t(&h, true)? };
        // Views are stacked view-major, so the labels repeat once per view.
        let view_labels = Tensor::cat(&vec![labels.clone(); views.len()], 0)?;
        let k_positives = |k: usize| {
            let mut rng = StdRng::seed_from_u64(mix_seed(&[self.seed, step as u64]));
            k_positive_mask(&labels.to_vec1::<u32>()?, views.len(), k, &mut rng, z.device())
        };
        match &mut self.parts {
            LossParts::Supcon => loss::supcon(&z, &view_labels, self.temperature),
            LossParts::Kcl { positives } => {
                loss::supcon_with_positives(&z, &k_positives(*positives)?, self.temperature)
            }
            LossParts::Tsc(state) => {
                if step > 0 && step.is_multiple_of(state.assign_every_steps) {
                    state.reassign()?;
                }
                state.accumulate(&z, &view_labels.to_vec1::<u32>()?)?;
                let kcl = loss::supcon_with_positives(&z, &k_positives(state.positives)?, self.temperature)?;
                let targets = state.class_targets(z.device())?.to_dtype(z.dtype())?;
                kcl + (tsc::target_term(&z, &view_labels, &targets, self.temperature)? * state.target_weight)?
            }
            LossParts::Bcl { centres } => loss::bcl(&z, &view_labels, centres.as_tensor(), self.temperature),
            LossParts::Hybrid { classifier, progress } => {
                let contrastive = loss::supcon(&z, &view_labels, self.temperature)?;
                loss::hybrid(&contrastive, &classifier.forward(&h)?, &view_labels, *progress)
            }
        }
    }

    fn after_step(&mut self, progress: f64) -> Result<()> {
        if let LossParts::Hybrid { progress: done, .. } = &mut self.parts {
            *done = progress;
        }
        Ok(())
    }

    fn encoder(&self) -> &Encoder {
        &self.branch.encoder
    }

    fn encoder_mut(&mut self) -> &mut Encoder {
        &mut self.branch.encoder
    }

    fn buffers(&self) -> Result<Vec<(String, Tensor)>> {
        let device = &self.device;
        Ok(match &self.parts {
            LossParts::Tsc(state) => {
                let assignment: Vec<u32> = state.assignment.iter().map(|&t| t as u32).collect();
                let sums: Vec<f64> = state.sums.iter().flatten().copied().collect();
                vec![
                    ("tsc.assignment".into(), Tensor::new(assignment, device)?),
                    ("tsc.class_sums".into(), Tensor::from_vec(sums, (state.sums.len(), state.sums[0].len()), device)?),
                ]
            }
            LossParts::Hybrid { progress, .. } => vec![("hybrid.progress".into(), Tensor::new(&[*progress], device)?)],
            _ => Vec::new(),
        })
    }

    fn load_buffers(&mut self, buffers: &HashMap<String, Tensor>) -> Result<()> {
        match &mut self.parts {
            LossParts::Tsc(state) => {
                if let (Some(assignment), Some(sums)) = (buffers.get("tsc.assignment"), buffers.get("tsc.class_sums")) {
                    state.assignment = assignment.to_vec1::<u32>()?.into_iter().map(|t| t as usize).collect();
                    state.sums = sums.to_dtype(DType::F64)?.to_vec2::<f64>()?;
                }
            }
            LossParts::Hybrid { progress, .. } => {
                if let Some(saved) = buffers.get("hybrid.progress") {
                    *progress = saved.to_dtype(DType::F64)?.to_vec1::<f64>()?[0];
                }
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::train::arch::ResNetConfig;
    use candle_core::{DType, Device, Tensor};

    use super::SupervisedLoss;
    use crate::data::ImageShape;
    use crate::train::arch::MethodConfig;
    use crate::train::config::TrainConfig;
    use crate::train::Model;

    /// Whether the loss's gradient reaches (the encoder, the projection head).
    fn gradient_reaches(on_embedding: bool) -> (bool, bool) {
        let method = MethodConfig::Supcon { temperature: 0.1, on_embedding, loss: Default::default() };
        let mut model = Model::new(&TrainConfig::for_method(method, ImageShape::new(1, 28, 28)), &Device::Cpu).unwrap();
        let views: Vec<Tensor> =
            (0..2).map(|_| Tensor::rand(0f32, 1f32, (4, 1, 28, 28), &Device::Cpu).unwrap()).collect();
        let labels = Tensor::new(&[0u32, 0, 1, 1], &Device::Cpu).unwrap();
        let grads = model.method.loss(&views, &labels, &[], 0).unwrap().backward().unwrap();
        let vars = model.varmap.data().lock().unwrap();
        let reached = |prefix: &str| {
            vars.iter().filter(|(name, _)| name.starts_with(prefix)).any(|(_, var)| {
                grads.get(var.as_tensor()).is_some_and(|g| {
                    g.abs().unwrap().sum_all().unwrap().to_dtype(DType::F32).unwrap().to_scalar::<f32>().unwrap() > 0.0
                })
            })
        };
        (reached("encoder."), reached("projector."))
    }

    /// A small model of `method` and one batch of two views of four images (labels 0, 0, 1, 2).
    fn small_model(method: MethodConfig) -> (Model, Vec<Tensor>, Tensor) {
        let mut config = TrainConfig::for_method(method, ImageShape::new(1, 28, 28));
        config.encoder = ResNetConfig { widths: vec![8, 16, 16], ..ResNetConfig::canonical(1) }.into();
        config.method.set_classes(3);
        let model = Model::new(&config, &Device::Cpu).unwrap();
        let views = (0..2).map(|_| Tensor::rand(0f32, 1f32, (4, 1, 28, 28), &Device::Cpu).unwrap()).collect();
        (model, views, Tensor::new(&[0u32, 0, 1, 2], &Device::Cpu).unwrap())
    }

    #[test]
    fn every_supervised_loss_trains_the_encoder_and_its_own_parts() {
        let mut methods: Vec<(MethodConfig, Option<&str>)> = SupervisedLoss::NAMES
            .iter()
            .map(|name| MethodConfig::Supcon {
                temperature: 0.1,
                on_embedding: false,
                loss: SupervisedLoss::default_for(name).unwrap(),
            })
            .zip([None, None, None, Some("centres."), Some("classifier.")])
            .collect();
        methods.push((MethodConfig::default_for("paco").unwrap(), Some("centres.")));
        for (method, own_part) in methods {
            let name = method.loss_name();
            let (mut model, views, labels) = small_model(method);
            // Half-way, where the hybrid's cross-entropy has weight 1 − 0.75.
            model.method.after_step(0.5).unwrap();
            let loss = model.method.loss(&views, &labels, &[], 0).unwrap();
            let value = loss.to_scalar::<f32>().unwrap();
            assert!(value.is_finite() && value > 0.0, "{name}: loss {value}");
            let grads = loss.backward().unwrap();
            let vars = model.varmap.data().lock().unwrap();
            let reached = |prefix: &str| {
                vars.iter().filter(|(n, _)| n.starts_with(prefix)).any(|(_, v)| {
                    grads
                        .get(v.as_tensor())
                        .is_some_and(|g| g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0)
                })
            };
            assert!(reached("encoder.") && reached("projector."), "{name}: the encoder and head train");
            if let Some(part) = own_part {
                assert!(reached(part), "{name}: its {part} train");
            }
        }
    }

    #[test]
    fn tsc_rematches_targets_to_class_centres_and_checkpoints_the_state() {
        let loss = SupervisedLoss::Tsc { positives: 6, target_weight: 1.0, classes: 3, assign_every_steps: 2 };
        let method = MethodConfig::Supcon { temperature: 0.1, on_embedding: false, loss };
        let (mut model, views, labels) = small_model(method.clone());
        let before = model.method.buffers().unwrap();
        assert_eq!(before[0].1.to_vec1::<u32>().unwrap(), vec![0, 1, 2], "targets start in class order");
        for step in 0..2 {
            model.method.loss(&views, &labels, &[], step).unwrap();
        }
        // The class sums of two steps, then the matching the paper's Hungarian step makes of them.
        let buffers: std::collections::HashMap<_, _> = model.method.buffers().unwrap().into_iter().collect();
        let sums = buffers["tsc.class_sums"].to_vec2::<f64>().unwrap();
        let dim = sums[0].len();
        let expected = crate::train::loss::tsc::assign_targets(
            &sums,
            &crate::train::loss::tsc::uniform_targets(3, dim, 0).unwrap(),
        )
        .unwrap();
        let (mut resumed, _, _) = small_model(method);
        resumed.method.load_buffers(&buffers).unwrap();
        for m in [&mut model, &mut resumed] {
            m.method.loss(&views, &labels, &[], 2).unwrap();
            let after: std::collections::HashMap<_, _> = m.method.buffers().unwrap().into_iter().collect();
            let assignment: Vec<usize> =
                after["tsc.assignment"].to_vec1::<u32>().unwrap().iter().map(|&t| t as usize).collect();
            assert_eq!(assignment, expected);
        }
        let l1 = model.method.loss(&views, &labels, &[], 3).unwrap().to_scalar::<f32>().unwrap();
        let l2 = resumed.method.loss(&views, &labels, &[], 3).unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(l1, l2, "a resumed run continues exactly");
    }

    #[test]
    fn on_embedding_trains_the_encoder_without_the_head() {
        assert_eq!(gradient_reaches(false), (true, true), "Khosla et al.: through the head");
        assert_eq!(gradient_reaches(true), (true, false), "on the embedding: the head gets no gradient");
    }
}

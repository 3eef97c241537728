//! The pair strategies a contrasting method can stack (`--pairs NAME[,NAME]`), applied in the
//! order given to each [`Contrast`] before the loss scores it.

use std::collections::HashMap;

use candle_core::{Device, Result, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::{
    cancel_false_negatives, mix_hard_negatives, transform_features, Contrast, Mixing, NearestNeighbourSupport,
};

/// One pair strategy and its parameters; the name is the `--pairs` value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "kebab-case")]
pub enum PairStrategy {
    /// Debiased negatives (Chuang et al. 2020): `class_prior` τ⁺ of the negatives are positives.
    Debiased { class_prior: f64 },
    /// Hard negative mixing, MoCHi (Kalantidis et al. 2020); see [`super::mochi`].
    Mochi { hardest: usize, mixes: usize, query_mixes: usize },
    /// Feature-space hard pairs (Zhu et al. 2021); see [`super::feature_transform`].
    HardPairs { positive_alpha: f64, negative_alpha: f64 },
    /// False-negative cancellation, FNC (Huynh et al. 2022); see [`super::fnc`].
    Fnc { support_views: usize, false_negatives: usize, attract: bool },
    /// Nearest-neighbour positives, NNCLR (Dwibedi et al. 2021); see [`super::nnclr`].
    Nnclr { support_size: usize },
    /// Mixed images with soft positives, MixCo / i-Mix (Kim et al. 2020); see [`super::mixco`].
    Mixco { alpha: f64 },
    /// Mixed images as hard negatives (Zhong et al.); see [`super::mixup`].
    Mixup { alpha: f64, hardest: usize },
}

impl PairStrategy {
    pub const NAMES: [&'static str; 7] = ["debiased", "mochi", "hard-pairs", "fnc", "nnclr", "mixco", "mixup"];

    /// The defaults for `name`, scaled to Fashion-MNIST (each file says how).
    pub fn default_for(name: &str) -> anyhow::Result<Self> {
        Ok(match name {
            // Ten balanced classes: a tenth of the negatives share the anchor's class.
            "debiased" => Self::Debiased { class_prior: 0.1 },
            "mochi" => Self::Mochi { hardest: 256, mixes: 256, query_mixes: 64 },
            "hard-pairs" => Self::HardPairs { positive_alpha: 2.0, negative_alpha: 1.6 },
            "fnc" => Self::Fnc { support_views: 2, false_negatives: 5, attract: false },
            "nnclr" => Self::Nnclr { support_size: 4096 },
            "mixco" => Self::Mixco { alpha: 1.0 },
            "mixup" => Self::Mixup { alpha: 1.0, hardest: 64 },
            other => anyhow::bail!("unknown pair strategy '{other}': expected one of {}", Self::NAMES.join(", ")),
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Debiased { .. } => "debiased",
            Self::Mochi { .. } => "mochi",
            Self::HardPairs { .. } => "hard-pairs",
            Self::Fnc { .. } => "fnc",
            Self::Nnclr { .. } => "nnclr",
            Self::Mixco { .. } => "mixco",
            Self::Mixup { .. } => "mixup",
        }
    }

    /// Extra views per image the loader must produce.
    pub fn support_views(&self) -> usize {
        match self {
            Self::Fnc { support_views, .. } => *support_views,
            _ => 0,
        }
    }

    /// Whether the strategy replaces each anchor's positive (two such cannot be stacked).
    fn replaces_positives(&self) -> bool {
        matches!(self, Self::HardPairs { .. } | Self::Nnclr { .. })
    }

    /// Checks the parameters and that `strategies` fit a method (`has_queue`: it keeps a memory
    /// queue of negatives) trained with loss `loss`; messages name both choices.
    pub fn validate_all(strategies: &[Self], method: &str, has_queue: bool, loss: &str) -> anyhow::Result<()> {
        use anyhow::ensure;
        for (i, strategy) in strategies.iter().enumerate() {
            let name = strategy.name();
            ensure!(
                strategies[..i].iter().all(|s| s.name() != name),
                "--pairs names {name} twice; give each strategy once"
            );
            if strategy.replaces_positives() {
                if let Some(other) = strategies[..i].iter().find(|s| s.replaces_positives()) {
                    anyhow::bail!("--pairs {} and {name} both replace each anchor's positive; choose one", other.name())
                }
            }
            match strategy {
                Self::Debiased { class_prior } => {
                    ensure!(
                        (0.0..1.0).contains(class_prior),
                        "debiased: class_prior is a probability in [0, 1), got {class_prior}"
                    );
                    ensure!(
                        loss == "info-nce",
                        "--pairs debiased corrects InfoNCE's negative sum by Chuang et al.'s estimate; --loss {loss} is not InfoNCE (use info-nce)"
                    );
                }
                Self::Mochi { hardest, mixes, query_mixes } => {
                    ensure!(
                        has_queue,
                        "--pairs mochi mixes the hardest keys of a memory queue; --method {method} has no queue (use moco-v2)"
                    );
                    ensure!(*hardest >= 1, "mochi: hardest must be at least 1");
                    ensure!(mixes + query_mixes >= 1, "mochi: mixes + query_mixes must be at least 1");
                }
                Self::HardPairs { positive_alpha, negative_alpha } => ensure!(
                    *positive_alpha > 0.0 && *negative_alpha > 0.0,
                    "hard-pairs: the Beta parameters must be positive, got {positive_alpha} and {negative_alpha}"
                ),
                Self::Fnc { support_views, false_negatives, .. } => {
                    ensure!(*support_views >= 1, "--pairs fnc needs support views: support_views must be at least 1");
                    ensure!(*false_negatives >= 1, "fnc: false_negatives must be at least 1");
                }
                Self::Nnclr { support_size } => ensure!(*support_size >= 1, "nnclr: support_size must be at least 1"),
                Self::Mixco { alpha } | Self::Mixup { alpha, .. } => {
                    ensure!(*alpha > 0.0, "{name}: alpha must be positive, got {alpha}");
                    ensure!(
                        strategies.iter().all(|s| !matches!(s, Self::Fnc { .. })),
                        "--pairs {name} and fnc do not combine: a mixed image has no support views of its own"
                    );
                    ensure!(
                        !strategies.iter().any(|s| matches!(s, Self::Mixco { .. }))
                            || !strategies.iter().any(|s| matches!(s, Self::Mixup { .. })),
                        "--pairs mixco and mixup both mix the batch's images; choose one"
                    );
                    if let Self::Mixup { hardest, .. } = strategy {
                        ensure!(*hardest >= 1, "mixup: hardest must be at least 1");
                    }
                }
            }
        }
        Ok(())
    }
}

/// The strategies of a run with their state: NNCLR's support set, and random draws that depend
/// only on the seed, the step and the call, so a resumed run draws the same.
pub struct PairPipeline {
    strategies: Vec<PairStrategy>,
    seed: u64,
    step: u64,
    calls: u64,
    nearest: Option<NearestNeighbourSupport>,
}

/// Checkpoint name prefix of the pipeline's buffers.
const BUFFER_PREFIX: &str = "pairs.";

impl PairPipeline {
    /// `dim` is the dimension of the contrasted vectors.
    pub fn new(strategies: &[PairStrategy], dim: usize, seed: u64, device: &Device) -> Result<Self> {
        let nearest = strategies
            .iter()
            .find_map(|s| match s {
                PairStrategy::Nnclr { support_size } => Some(NearestNeighbourSupport::new(*support_size, dim, device)),
                _ => None,
            })
            .transpose()?;
        Ok(Self { strategies: strategies.to_vec(), seed, step: 0, calls: 0, nearest })
    }

    /// How many mixed negatives each anchor keeps, when the mixes are negatives (Mixup) rather
    /// than anchors (MixCo).
    pub fn mixed_negatives(&self) -> Option<usize> {
        self.strategies.iter().find_map(|s| match s {
            PairStrategy::Mixup { hardest, .. } => Some(*hardest),
            _ => None,
        })
    }

    /// The generator of this call at `step`: seeded by (seed, step, calls so far in the step).
    fn rng(&mut self, step: usize) -> StdRng {
        if step as u64 != self.step {
            (self.step, self.calls) = (step as u64, 0);
        }
        self.calls += 1;
        StdRng::seed_from_u64(crate::train::loader::mix_seed(&[self.seed, 0x9a12_5eed, self.step, self.calls - 1]))
    }

    /// The mixing of `n` images at `step`, when the run mixes (MixCo, Mixup negatives).
    pub fn mixing(&mut self, n: usize, step: usize) -> Result<Option<Mixing>> {
        let Some(alpha) = self.strategies.iter().find_map(|s| match s {
            PairStrategy::Mixco { alpha } | PairStrategy::Mixup { alpha, .. } => Some(*alpha),
            _ => None,
        }) else {
            return Ok(None);
        };
        Mixing::draw(n, alpha, &mut self.rng(step)).map(Some)
    }

    /// Rewrites `contrast` by every strategy in turn; `step` counts optimiser steps. (MixCo and
    /// Mixup act on the images, through [`PairPipeline::mixing`].)
    pub fn apply(&mut self, contrast: &mut Contrast, step: usize) -> Result<()> {
        let mut rng = self.rng(step);
        for strategy in &self.strategies {
            match strategy {
                PairStrategy::Debiased { class_prior } => contrast.class_prior = Some(*class_prior),
                PairStrategy::Mochi { hardest, mixes, query_mixes } => {
                    mix_hard_negatives(contrast, *hardest, *mixes, *query_mixes, &mut rng)?
                }
                PairStrategy::HardPairs { positive_alpha, negative_alpha } => {
                    transform_features(contrast, *positive_alpha, *negative_alpha, &mut rng)?
                }
                PairStrategy::Fnc { false_negatives, attract, .. } => {
                    cancel_false_negatives(contrast, *false_negatives, *attract)?
                }
                PairStrategy::Nnclr { .. } => {
                    self.nearest.as_mut().expect("built with the strategy").replace_positives(contrast)?
                }
                PairStrategy::Mixco { .. } | PairStrategy::Mixup { .. } => {}
            }
        }
        Ok(())
    }

    pub fn after_step(&mut self) -> Result<()> {
        match &mut self.nearest {
            Some(nearest) => nearest.after_step(),
            None => Ok(()),
        }
    }

    pub fn buffers(&self) -> Result<Vec<(String, Tensor)>> {
        match &self.nearest {
            Some(nearest) => nearest.buffers(BUFFER_PREFIX),
            None => Ok(Vec::new()),
        }
    }

    pub fn load_buffers(&mut self, buffers: &HashMap<String, Tensor>) -> Result<()> {
        match &mut self.nearest {
            Some(nearest) => nearest.load_buffers(BUFFER_PREFIX, buffers),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strategies(names: &[&str]) -> Vec<PairStrategy> {
        names.iter().map(|n| PairStrategy::default_for(n).unwrap()).collect()
    }

    #[test]
    fn refuses_combinations_that_do_not_fit_naming_both_choices() {
        let err = |names: &[&str], method: &str, queue: bool, loss: &str| {
            PairStrategy::validate_all(&strategies(names), method, queue, loss).unwrap_err().to_string()
        };
        let e = err(&["mochi"], "simclr", false, "info-nce");
        assert!(e.contains("mochi") && e.contains("simclr"), "{e}");
        let e = err(&["debiased"], "simclr", false, "dcl");
        assert!(e.contains("debiased") && e.contains("dcl"), "{e}");
        let e = err(&["nnclr", "hard-pairs"], "moco-v2", true, "info-nce");
        assert!(e.contains("nnclr") && e.contains("hard-pairs"), "{e}");
        let e = err(&["mixco", "mixup"], "simclr", false, "info-nce");
        assert!(e.contains("mixco") && e.contains("mixup"), "{e}");
        let e = err(&["mixco", "fnc"], "simclr", false, "info-nce");
        assert!(e.contains("mixco") && e.contains("fnc"), "{e}");
        let e = err(&["fnc", "fnc"], "simclr", false, "info-nce");
        assert!(e.contains("twice"), "{e}");
        let no_support = [PairStrategy::Fnc { support_views: 0, false_negatives: 5, attract: false }];
        let e = PairStrategy::validate_all(&no_support, "simclr", false, "info-nce").unwrap_err().to_string();
        assert!(e.contains("support views"), "{e}");
        assert!(
            PairStrategy::validate_all(&strategies(&["mochi", "fnc", "debiased"]), "moco-v2", true, "info-nce").is_ok()
        );
    }

    #[test]
    fn draws_depend_on_the_step_and_call_only() -> Result<()> {
        let device = Device::Cpu;
        let q = Tensor::new(&[[1.0f32, 0.0], [0.0, 1.0]], &device)?;
        let queue = Tensor::new(&[[0.6f32, 0.8], [-1.0, 0.0], [0.8, -0.6]], &device)?;
        let run = |pipeline: &mut PairPipeline, step| -> Result<Vec<f32>> {
            let mut c = Contrast::with_queue(&q, &q, &queue)?;
            pipeline.apply(&mut c, step)?;
            c.private.unwrap().0.flatten_all()?.to_vec1::<f32>()
        };
        let mochi = strategies(&["mochi"]);
        let mut first = PairPipeline::new(&mochi, 2, 7, &device)?;
        let (a, b, c) = (run(&mut first, 0)?, run(&mut first, 0)?, run(&mut first, 1)?);
        assert_ne!(a, b, "two calls within a step draw differently");
        let mut resumed = PairPipeline::new(&mochi, 2, 7, &device)?;
        assert_eq!(run(&mut resumed, 1)?, c, "a resumed run draws as the original at that step");
        Ok(())
    }
}

//! What one fine-tune job does, from the base model to a published version, in two parts that the
//! [`super::runner`] runs in its VALIDATING and RUNNING states:
//!
//! 1. [`prepare`]: the base version from the model repository (manifest and weights, digests
//!    checked), every image decoded as the model's input, each class split into training and
//!    held-out images.
//! 2. [`train_and_publish`]: the base encoder trained with SupCon (Khosla et al. 2020) on its
//!    own output, the served embedding, by the trainer's own loop ([`crate::train::fit`]) on
//!    the training images, the top `trainable_stages` backbone stages learning and the stages
//!    below running as served (running statistics, no gradient), k-NN and a linear probe on
//!    the held-out images before and after, the quality guard (a paired-bootstrap interval of
//!    the k-NN change: refused only when worse beyond it), then export with the parity check
//!    and an atomic publish of the next version of the output model.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, ensure, Context, Result};
use candle_core::{Device, Var};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::datasets::LabeledImage;
use super::parameters::JobParameters;
use crate::data::{Dataset, ImageShape};
use crate::eval::uncertainty::{paired_bootstrap_difference, wilson_interval, Estimate, Interval, Z_95};
use crate::eval::EvalReport;
use crate::export::{self, ExportOptions, Provenance};
use crate::registry::{Manifest, ModelRepository, WEIGHTS_FILE};
use crate::train::arch::{methods, MethodConfig};
use crate::train::augment::AugmentConfig;
use crate::train::config::TrainConfig;
use crate::train::fit::{fit, Control, FitEnd, FitHooks, NonFiniteLoss, Progress};
use crate::train::optim::Optimizer;
use crate::train::{checkpoint, EvalScope, Model};

/// What a job is asked to do.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub job_id: String,
    pub base_model: String,
    /// 0: the newest valid version.
    pub base_version: u64,
    pub output_model: String,
    /// The version to publish (reserved in the job store); None: the next free one.
    pub output_version: Option<u64>,
    pub dataset_id: String,
    pub parameters: JobParameters,
    /// Publish even when the held-out k-NN accuracy is worse beyond its uncertainty.
    pub allow_worse: bool,
}

/// Why a job failed, in the terms of the gRPC status its record carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The dataset or the hyper-parameters cannot train a model.
    InvalidArgument,
    /// The base model, its version or the dataset does not exist.
    NotFound,
    /// Trained, but not published (the quality guard).
    FailedPrecondition,
    Internal,
}

impl FailureKind {
    pub fn grpc_code(self) -> tonic::Code {
        match self {
            Self::InvalidArgument => tonic::Code::InvalidArgument,
            Self::NotFound => tonic::Code::NotFound,
            Self::FailedPrecondition => tonic::Code::FailedPrecondition,
            Self::Internal => tonic::Code::Internal,
        }
    }
}

/// Why a job stopped before it succeeded.
#[derive(Debug)]
pub enum JobStop {
    Cancelled,
    Failed { kind: FailureKind, message: String },
}

impl JobStop {
    fn failed(kind: FailureKind, message: impl Into<String>) -> Self {
        Self::Failed { kind, message: message.into() }
    }
}

impl From<anyhow::Error> for JobStop {
    fn from(error: anyhow::Error) -> Self {
        let kind = match error.downcast_ref::<NonFiniteLoss>() {
            Some(_) => FailureKind::InvalidArgument,
            None => FailureKind::Internal,
        };
        Self::failed(kind, format!("{error:#}"))
    }
}

impl From<candle_core::Error> for JobStop {
    fn from(error: candle_core::Error) -> Self {
        anyhow::Error::from(error).into()
    }
}

/// What a running job reports, in order; the runner turns each into a stored job event.
#[derive(Debug, Clone, PartialEq)]
pub enum JobUpdate {
    Message(String),
    /// Held-out figures of the base model.
    Before(HeldOut),
    Epoch {
        epoch: usize,
        mean_loss: f64,
    },
    /// Fraction of the job done, 0..1.
    Progress(f64),
    /// Held-out figures of the trained model, with the change from the base model.
    After(HeldOut),
}

/// A model's figures on the held-out images, with their uncertainty.
#[derive(Debug, Clone, PartialEq)]
pub struct HeldOut {
    pub report: EvalReport,
    /// 95 % Wilson interval of `report.knn_accuracy`.
    pub knn_interval: Interval,
    pub images: usize,
    /// After training: the k-NN accuracy change from the base model, paired over the same images.
    pub knn_change: Option<Estimate>,
}

/// Bootstrap resamples of the paired change: the interval's ends move by < 0.005 between seeds.
const BOOTSTRAP_RESAMPLES: usize = 4000;

/// The held-out figures of `model` and whether its k-NN classifies each held-out image right.
fn judge(model: &Model, train: &Dataset, heldout: &Dataset) -> Result<(HeldOut, Vec<bool>)> {
    let scope = EvalScope { linear_probe: true, ..EvalScope::KNN };
    let (report, correct) = model.evaluate_with_outcomes(train, heldout, scope)?;
    let right = correct.iter().filter(|&&c| c).count();
    let knn_interval = wilson_interval(right, correct.len(), Z_95);
    Ok((HeldOut { report, knn_interval, images: correct.len(), knn_change: None }, correct))
}

/// The base model and the data, ready to train.
pub struct PreparedJob {
    pub manifest: Manifest,
    pub base_version: u64,
    weights: PathBuf,
    pub train: Dataset,
    pub heldout: Dataset,
}

/// The published version.
#[derive(Debug, Clone, PartialEq)]
pub struct Published {
    pub name: String,
    pub version: u64,
    /// The held-out comparison with the base model, in words.
    pub verdict: String,
}

/// VALIDATING: the base version exists and is intact, every image decodes, and each of at
/// least two classes has `min_per_class` images.
pub fn prepare(
    repository: &ModelRepository,
    spec: &JobSpec,
    images: &[LabeledImage],
    min_per_class: usize,
) -> Result<PreparedJob, JobStop> {
    let (base_version, manifest) = repository
        .resolve(&spec.base_model, spec.base_version)
        .map_err(|e| JobStop::failed(FailureKind::NotFound, format!("base model: {e:#}")))?;
    let weights = repository.version_dir(&spec.base_model, base_version).join(WEIGHTS_FILE);
    let (train, heldout) = split_dataset(images, &manifest, spec.parameters, min_per_class)
        .map_err(|e| JobStop::failed(FailureKind::InvalidArgument, format!("{e:#}")))?;
    Ok(PreparedJob { manifest, base_version, weights, train, heldout })
}

/// RUNNING: trains, evaluates, guards and publishes; `cancel` is read before every step.
pub fn train_and_publish(
    repository: &ModelRepository,
    spec: &JobSpec,
    prepared: PreparedJob,
    cancel: &AtomicBool,
    report: &mut dyn FnMut(JobUpdate) -> Result<()>,
) -> Result<Published, JobStop> {
    let h = spec.parameters;
    let PreparedJob { manifest, base_version, weights, train, heldout } = prepared;
    let device = Device::Cpu;

    // The base encoder and projection head, with SupCon as the objective and its optimiser.
    let mut config = manifest.training.config.clone();
    // The loss on the served embedding, and mild views (crop 0.5–1 and flip): measured by `bench
    // finetune`, each about doubles the gain on never-uploaded images over SupCon's head and the
    // SimCLR views, whose crops and jitter erase what tells a shirt from a T-shirt.
    config.method = MethodConfig::Supcon { temperature: h.temperature, on_embedding: true, loss: Default::default() };
    config.augment = vec![AugmentConfig::weak(); 2];
    config.optimizer = TrainConfig::default_optimizer(&config.method, &config.encoder);
    config.epochs = h.epochs;
    config.batch_size = h.batch_size.min(train.len());
    config.learning_rate = h.learning_rate;
    config.warmup_epochs = 0.0;
    config.seed = h.seed;
    let mut model = Model::new(&config, &device)?;
    // The encoder only: SupCon's loss reads the embedding, and the base's heads are its method's.
    checkpoint::load_encoder_weights_file(&weights, &model.varmap, &device)
        .context("cannot load the base model's weights")?;

    let (before, before_correct) = judge(&model, &train, &heldout)?;
    report(JobUpdate::Before(before.clone()))?;

    let stages = config.encoder.stages();
    let trainable = trainable_variables(&model, h.trainable_stages, stages);
    model.method.encoder_mut().freeze_stages(h.trainable_stages.map(|trained| stages.saturating_sub(trained)));
    let mut optimizer = model.optimizer_over(trainable);
    let train = Arc::new(train);
    let mut progress = Progress::default();
    let mut hooks = JobHooks { cancel, report: &mut *report, epochs: config.epochs };
    if fit(&mut model, &mut optimizer, &train, &mut progress, &mut hooks)? == FitEnd::Stopped {
        return Err(JobStop::Cancelled);
    }

    let (mut after, after_correct) = judge(&model, &train, &heldout)?;
    let change = paired_bootstrap_difference(&before_correct, &after_correct, BOOTSTRAP_RESAMPLES, 0.95, h.seed);
    after.knn_change = Some(change);
    report(JobUpdate::After(after.clone()))?;
    let verdict = verdict(&before, &after, change);
    if worse_beyond_uncertainty(&change) && !spec.allow_worse {
        return Err(JobStop::failed(
            FailureKind::FailedPrecondition,
            format!("not published: worse beyond the uncertainty: {verdict}; create the job with allow_worse to publish anyway"),
        ));
    }
    let after = after.report;
    if cancel.load(Ordering::Acquire) {
        return Err(JobStop::Cancelled);
    }
    let provenance = Provenance {
        source: format!("fine-tune job {} from {} version {base_version}", spec.job_id, spec.base_model),
        evaluation: Some(after),
        epochs: config.epochs,
        steps: progress.step,
        data: Some(format!(
            "dataset {} ({} training and {} held-out images)",
            spec.dataset_id,
            train.len(),
            heldout.len()
        )),
        fine_tune_job: Some(spec.job_id.clone()),
    };
    // A job publishes once: a version it published before a crash is its result.
    if let Some(version) = repository.version_published_by(&spec.output_model, &spec.job_id)? {
        return Ok(Published { name: spec.output_model.clone(), version, verdict });
    }
    let options = ExportOptions { version: spec.output_version, ..ExportOptions::new(&spec.output_model) };
    let manifest = export::publish_model(repository, &model, &options, &provenance, Some(&heldout))?;
    Ok(Published { name: manifest.name, version: manifest.version, verdict })
}

/// The guard: refuse only a change whose whole 95 % interval is below zero. Held-out sets of a
/// few dozen images move k-NN accuracy by several points from the draw alone.
fn worse_beyond_uncertainty(change: &Estimate) -> bool {
    change.interval.high < 0.0
}

/// "held-out k-NN accuracy 0.767 [0.645, 0.855] → 0.733 [0.609, 0.829] on 60 images; change
/// -0.033, 95 % interval -0.100 to +0.033 (paired bootstrap)"
fn verdict(before: &HeldOut, after: &HeldOut, change: Estimate) -> String {
    format!(
        "held-out k-NN accuracy {:.3} [{:.3}, {:.3}] → {:.3} [{:.3}, {:.3}] on {} images; change {:+.3}, 95 % interval {:+.3} to {:+.3} (paired bootstrap)",
        before.report.knn_accuracy,
        before.knn_interval.low,
        before.knn_interval.high,
        after.report.knn_accuracy,
        after.knn_interval.low,
        after.knn_interval.high,
        after.images,
        change.value,
        change.interval.low,
        change.interval.high
    )
}

/// The job's side of the training loop: cancellation, and an event per epoch.
struct JobHooks<'a> {
    cancel: &'a AtomicBool,
    report: &'a mut dyn FnMut(JobUpdate) -> Result<()>,
    epochs: usize,
}

impl FitHooks for JobHooks<'_> {
    fn before_step(&mut self, _progress: &Progress) -> Control {
        if self.cancel.load(Ordering::Acquire) {
            Control::Stop
        } else {
            Control::Continue
        }
    }

    fn after_epoch(
        &mut self,
        _model: &Model,
        _optimizer: &Optimizer,
        progress: &Progress,
        mean_loss: f64,
    ) -> Result<()> {
        (self.report)(JobUpdate::Epoch { epoch: progress.epoch, mean_loss })?;
        // Evaluation and export take the last tenth of the progress bar.
        (self.report)(JobUpdate::Progress(0.9 * progress.epoch as f64 / self.epochs as f64))
    }
}

/// Decodes every image as the model's input and splits each class into training and held-out
/// images (a seeded shuffle per class; at least one of each).
pub fn split_dataset(
    images: &[LabeledImage],
    manifest: &Manifest,
    parameters: JobParameters,
    min_per_class: usize,
) -> Result<(Dataset, Dataset)> {
    let mut by_class: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, image) in images.iter().enumerate() {
        by_class.entry(image.label.as_str()).or_default().push(i);
    }
    ensure!(
        by_class.len() >= 2,
        "the dataset has {} class(es); contrastive fine-tuning needs at least 2",
        by_class.len()
    );
    let small: Vec<String> =
        by_class.iter().filter(|(_, v)| v.len() < min_per_class).map(|(c, v)| format!("{c:?} ({})", v.len())).collect();
    ensure!(small.is_empty(), "each class needs at least {min_per_class} images; too few in {}", small.join(", "));

    let numel = manifest.input.channels * manifest.input.height * manifest.input.width;
    let mut pixels = Vec::with_capacity(images.len() * numel);
    for (i, image) in images.iter().enumerate() {
        crate::registry::input::image_to_tensor(&image.bytes, &manifest.input, &mut pixels)
            .map_err(|reason| anyhow!("image {i} (label {:?}): {reason}", image.label))?;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(parameters.seed);
    let (mut train_idx, mut heldout_idx) = (Vec::new(), Vec::new());
    let class_names: Vec<String> = by_class.keys().map(|c| c.to_string()).collect();
    for (label, (_, mut members)) in by_class.into_iter().enumerate() {
        members.shuffle(&mut rng);
        let held = ((members.len() as f64 * parameters.holdout_fraction).round() as usize).clamp(1, members.len() - 1);
        heldout_idx.extend(members[..held].iter().map(|&i| (i, label as u32)));
        train_idx.extend(members[held..].iter().map(|&i| (i, label as u32)));
    }
    let shape = ImageShape::new(manifest.input.channels, manifest.input.height, manifest.input.width);
    let build = |members: &[(usize, u32)]| {
        let mut data = Vec::with_capacity(members.len() * numel);
        for &(i, _) in members {
            data.extend_from_slice(&pixels[i * numel..(i + 1) * numel]);
        }
        Dataset::new(data, members.iter().map(|&(_, l)| l).collect(), shape, class_names.clone())
    };
    Ok((build(&train_idx)?, build(&heldout_idx)?))
}

/// The optimiser's variables: the projection head, plus the top `stages` backbone stages
/// (`None`: the whole backbone, stem included).
fn trainable_variables(model: &Model, stages: Option<usize>, total_stages: usize) -> Vec<(String, Var)> {
    let all = methods::trainable_vars(&model.varmap);
    let Some(stages) = stages else { return all };
    let first_trained = total_stages.saturating_sub(stages) + 1;
    all.into_iter()
        .filter(|(name, _)| match name.strip_prefix("encoder.") {
            Some(rest) => model.config.encoder.stage_of(rest) >= first_trained,
            None => true,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Paired outcomes on 60 held-out images: `both` right for both models, `fixed` right only
    /// after, `broken` right only before, the rest wrong for both.
    fn outcomes(both: usize, fixed: usize, broken: usize) -> (Vec<bool>, Vec<bool>) {
        let before = (0..60).map(|i| i < both || (both + fixed..both + fixed + broken).contains(&i)).collect();
        let after = (0..60).map(|i| i < both + fixed).collect();
        (before, after)
    }

    /// A fine-tune of a ViT base with `trainable_stages` 1 trains the last block, the final norm
    /// and the heads; the embeddings and the first three blocks stay as the base had them.
    #[test]
    fn a_vit_base_trains_only_its_top_blocks() -> anyhow::Result<()> {
        use crate::data::ImageShape;
        use crate::train::arch::{EncoderConfig, MethodConfig};
        use crate::train::config::TrainConfig;
        let shape = ImageShape::new(1, 28, 28);
        let config = TrainConfig::for_method(MethodConfig::default_for("supcon")?, shape)
            .with_encoder(EncoderConfig::default_for("vit", shape)?);
        let model = Model::new(&config, &candle_core::Device::Cpu)?;
        let trained: Vec<String> =
            trainable_variables(&model, Some(1), config.encoder.stages()).into_iter().map(|(name, _)| name).collect();
        for (name, _) in methods::trainable_vars(&model.varmap) {
            let expected = !name.starts_with("encoder.")
                || name.starts_with("encoder.blocks.3.")
                || name.starts_with("encoder.norm.");
            assert_eq!(trained.contains(&name), expected, "{name}");
        }
        Ok(())
    }

    #[test]
    fn the_guard_refuses_only_what_is_worse_beyond_the_noise() {
        // The case: 0.767 -> 0.733 on 60 images (2 more broken than fixed) is noise.
        let (before, after) = outcomes(40, 4, 6);
        let change = paired_bootstrap_difference(&before, &after, BOOTSTRAP_RESAMPLES, 0.95, 0);
        assert!((change.value - (-2.0 / 60.0)).abs() < 1e-12);
        assert!(!worse_beyond_uncertainty(&change), "{change:?}");
        // 0.767 -> 0.500: 16 images broken, none fixed, is worse beyond any draw.
        let (before, after) = outcomes(30, 0, 16);
        let change = paired_bootstrap_difference(&before, &after, BOOTSTRAP_RESAMPLES, 0.95, 0);
        assert!(worse_beyond_uncertainty(&change), "{change:?}");
    }
}

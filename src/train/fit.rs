//! The training loop, the one both `contrastive train` and fine-tune jobs run: batches of
//! augmented views from the loader thread, the method's loss, backward, the optimiser step at the
//! scheduled learning rate, the method's momentum/queue/prototype updates. What differs between
//! its callers comes in through [`FitHooks`] (checkpoints, metrics and a progress bar for a run;
//! cancellation and job events for a fine-tune) and through the optimiser, which holds the
//! variables that train.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use candle_core::Tensor;

use super::loader::{batches_per_epoch, view_pipelines, Batch, BatchLoader, LoaderConfig};
use super::model::Model;
use super::optim::{LrSchedule, Optimizer};
pub use super::progress::Progress;
use crate::data::Dataset;

/// What a hook tells the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Continue,
    /// End the fit now; [`fit`] returns [`FitEnd::Stopped`] with the progress as it is.
    Stop,
}

/// One optimisation step, as the hooks see it.
#[derive(Debug, Clone, Copy)]
pub struct StepReport {
    pub loss: f64,
    pub learning_rate: f64,
    pub images: usize,
    pub seconds: f64,
}

/// The caller's part of the loop. Every method has a default that does nothing.
pub trait FitHooks {
    /// Before each step: [`Control::Stop`] ends the fit (Ctrl-C, a step limit, a cancelled job).
    fn before_step(&mut self, _progress: &Progress) -> Control {
        Control::Continue
    }

    fn after_step(&mut self, _progress: &Progress, _step: &StepReport) -> Result<()> {
        Ok(())
    }

    /// After each epoch (`progress.epoch` already counts it), with the epoch's mean loss.
    fn after_epoch(
        &mut self,
        _model: &Model,
        _optimizer: &Optimizer,
        _progress: &Progress,
        _mean_loss: f64,
    ) -> Result<()> {
        Ok(())
    }
}

/// How a fit ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FitEnd {
    /// Every epoch of the config is done.
    Finished,
    /// A hook stopped it.
    Stopped,
}

/// The loss became NaN or infinite; nothing of that step was applied.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the loss became {value} at step {step} (epoch {epoch}): lower the learning rate (now {learning_rate})")]
pub struct NonFiniteLoss {
    pub value: f64,
    pub step: usize,
    pub epoch: usize,
    pub learning_rate: f64,
}

/// Trains `model` on `data` from `progress` to the end of `model.config.epochs`, or until a
/// hook stops it. `optimizer` holds the variables that train. The learning rate follows the
/// config's warm-up and cosine schedule over all steps.
pub fn fit(
    model: &mut Model,
    optimizer: &mut Optimizer,
    data: &Arc<Dataset>,
    progress: &mut Progress,
    hooks: &mut dyn FitHooks,
) -> Result<FitEnd> {
    let config = model.config.clone();
    let mut loader = LoaderConfig {
        batch_size: config.batch_size,
        seed: config.seed,
        shuffle: true,
        drop_last: true,
        prefetch: 2,
        object_boxes: None,
    };
    let object_crop = config.augment.iter().find_map(|a| a.contrastive_crop.clone());
    let pipelines = view_pipelines(&config.augment);
    let steps_per_epoch = steps_per_epoch(data.len(), config.batch_size)?;
    let total_steps = steps_per_epoch * config.epochs;
    let schedule = LrSchedule {
        base: config.learning_rate,
        warmup_steps: (config.warmup_epochs * steps_per_epoch as f64).round() as usize,
        total_steps,
        final_fraction: 0.0,
    };
    for epoch in progress.epoch..config.epochs {
        model.method.before_epoch(data, epoch)?;
        if let Some(crop) = &object_crop {
            // ContrastiveCrop's boxes from the encoder as it is now: at each refresh epoch, and
            // when a run (re)starts past the warm-up (the boxes are not checkpointed).
            let refresh = epoch >= crop.warmup_epochs
                && ((epoch - crop.warmup_epochs).is_multiple_of(crop.refresh_every_epochs.max(1))
                    || loader.object_boxes.is_none());
            if refresh {
                loader.object_boxes = Some(Arc::new(model.object_boxes(data, crop.heatmap_threshold)?));
            }
        }
        let mut loss_sum = 0.0;
        let batches = BatchLoader::spawn(data.clone(), pipelines.clone(), loader.clone(), epoch);
        for batch in batches.skip(progress.batch_in_epoch) {
            if hooks.before_step(progress) == Control::Stop {
                return Ok(FitEnd::Stopped);
            }
            let started = Instant::now();
            let learning_rate = schedule.at(progress.step);
            let loss = train_step(model, optimizer, &batch, progress.step, learning_rate, total_steps)?;
            if !loss.is_finite() {
                return Err(NonFiniteLoss { value: loss, step: progress.step, epoch: epoch + 1, learning_rate }.into());
            }
            progress.step += 1;
            progress.batch_in_epoch += 1;
            let seconds = started.elapsed().as_secs_f64();
            progress.train_seconds += seconds;
            loss_sum += loss;
            hooks.after_step(progress, &StepReport { loss, learning_rate, images: batch.len(), seconds })?;
        }
        progress.epoch = epoch + 1;
        progress.batch_in_epoch = 0;
        hooks.after_epoch(model, optimizer, progress, loss_sum / steps_per_epoch as f64)?;
    }
    Ok(FitEnd::Finished)
}

/// Full batches in one epoch of `images` (the last, smaller batch is dropped); at least one.
pub fn steps_per_epoch(images: usize, batch_size: usize) -> Result<usize> {
    let steps = batches_per_epoch(images, batch_size, true);
    anyhow::ensure!(steps > 0, "the training set has {images} images, fewer than one batch of {batch_size}");
    Ok(steps)
}

/// One optimisation step on a batch: its views through the method's loss, backward, the update
/// at learning rate `lr`, then the method's own after-step work (EMA targets, ...). `step` is the
/// number of steps done before this one, out of `total_steps`. Returns the loss; a non-finite
/// loss is returned without any update.
pub fn train_step(
    model: &mut Model,
    optimizer: &mut Optimizer,
    batch: &Batch,
    step: usize,
    lr: f64,
    total_steps: usize,
) -> Result<f64> {
    let views = batch.view_tensors(&model.device)?;
    let labels = Tensor::from_slice(&batch.labels, batch.len(), &model.device)?;
    let loss = model.method.loss(&views, &labels, &batch.indices, step)?;
    let value = loss.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()? as f64;
    if !value.is_finite() {
        return Ok(value);
    }
    optimizer.schedule_weight_decay(step, total_steps);
    optimizer.step(&loss.backward()?, lr)?;
    model.method.after_step((step + 1) as f64 / total_steps as f64)?;
    Ok(value)
}

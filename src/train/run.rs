//! A training run in its folder (`contrastive train`): the [`fit`] loop with a progress bar,
//! `metrics.jsonl`, k-NN monitoring after each epoch, atomic checkpoints, `--resume` from the
//! exact batch, a clean stop on Ctrl-C, and the loss and accuracy curves.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use super::checkpoint::{self, RunState};
use super::config::{MonitorConfig, TrainConfig};
use super::fit::{fit, steps_per_epoch, Control, FitEnd, FitHooks, Progress, StepReport};
use super::model::{EvalScope, Model};
use super::optim::Optimizer;
use crate::data::Dataset;

/// Options of one `train` invocation that are not part of the run's identity.
pub struct TrainOptions {
    pub run_dir: PathBuf,
    pub device: Device,
    /// Continue the checkpoint in `run_dir` instead of starting afresh.
    pub resume: bool,
    /// Set from a Ctrl-C handler: the loop saves a checkpoint and returns.
    pub stop: Arc<AtomicBool>,
    pub progress_bar: bool,
    /// Run the linear probe and alignment/uniformity at the end.
    pub final_eval: bool,
    /// Stop (as if interrupted, with a checkpoint) once this many steps are done in total.
    pub stop_at_step: Option<usize>,
}

/// Trains (or resumes) the run described by `config` in `options.run_dir`.
pub fn train(config: &TrainConfig, options: &TrainOptions) -> Result<RunState> {
    config.validate()?; // before the run folder exists, so a refused config leaves nothing behind
    let dir = &options.run_dir;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create run folder {}", dir.display()))?;
    let config_path = dir.join(checkpoint::CONFIG_FILE);
    if !options.resume && dir.join(checkpoint::STATE_FILE).exists() {
        bail!("{} already holds a run: pass --resume to continue it, or choose another --out", dir.display());
    }
    let (train_set, test_set) = config.data.load()?;
    // Losses with one centre or target per class are built for the data's classes.
    let mut config = config.clone();
    config.method.set_classes(train_set.num_classes());
    let config = &config;
    let train_set = config.long_tail_split(train_set)?;
    let train_set = match config.train_limit {
        Some(n) => train_set.head(n),
        None => train_set,
    };
    let steps_per_epoch = steps_per_epoch(train_set.len(), config.batch_size)?;
    anyhow::ensure!(
        train_set.shape.channels == config.encoder.in_channels(),
        "the data has {} channel(s) but the encoder expects {}",
        train_set.shape.channels,
        config.encoder.in_channels()
    );

    let mut model = Model::new(config, &options.device)?;
    let mut optimizer = model.optimizer();
    let mut state = if options.resume {
        let saved = TrainConfig::load(&config_path)?;
        anyhow::ensure!(saved == *config, "{} was trained with another configuration", dir.display());
        let buffers = checkpoint::load_weights(dir, &model.varmap, &options.device)?;
        model.method.load_buffers(&buffers)?;
        optimizer.load_state(checkpoint::load_optimizer(dir)?)?;
        checkpoint::load_state(dir)?
    } else {
        if let Some(source) = &config.init_from {
            let file = if source.is_dir() { source.join(checkpoint::WEIGHTS_FILE) } else { source.clone() };
            let buffers = checkpoint::load_weights_file(&file, &model.varmap, &options.device)
                .with_context(|| format!("cannot start from {}", source.display()))?;
            model.method.load_buffers(&buffers)?;
        }
        config.save(&config_path)?;
        let _ = std::fs::remove_file(dir.join(checkpoint::METRICS_FILE));
        RunState::default()
    };
    if state.finished {
        tracing::info!("{} is already trained to {} epochs", dir.display(), config.epochs);
        return Ok(state);
    }

    let train_set = Arc::new(train_set);
    let metrics = std::fs::OpenOptions::new().create(true).append(true).open(dir.join(checkpoint::METRICS_FILE))?;
    let bar = progress_bar(options.progress_bar, (steps_per_epoch * config.epochs) as u64, state.progress.step as u64);
    let mut progress = state.progress.clone();
    let mut hooks = RunHooks {
        dir,
        options,
        config,
        train_set: &train_set,
        test_set: test_set.as_ref(),
        state: &mut state,
        metrics,
        bar,
        steps_per_epoch,
        window: (Instant::now(), 0),
    };
    hooks.bar.set_prefix(format!("epoch {}/{}", progress.epoch + 1, config.epochs));
    let end = fit(&mut model, &mut optimizer, &train_set, &mut progress, &mut hooks)?;
    let RunHooks { bar, mut metrics, .. } = hooks;
    state.progress = progress;
    if end == FitEnd::Stopped {
        bar.abandon_with_message("stopped: checkpoint saved");
        save_checkpoint(dir, &model, &optimizer, &state)?;
        return Ok(state);
    }
    bar.finish_with_message("done");

    if options.final_eval {
        if let Some(test_set) = &test_set {
            let scope = EvalScope { shots: config.long_tail.is_some(), ..EvalScope::FULL };
            let report = model.evaluate(&train_set, test_set, scope)?;
            writeln!(metrics, "{}", json!({"epoch": state.progress.epoch, "final_eval": report}))?;
            state.final_eval = Some(report);
        }
    }
    state.finished = true;
    save_checkpoint(dir, &model, &optimizer, &state)?;
    Ok(state)
}

/// The run folder's side of the loop.
struct RunHooks<'a> {
    dir: &'a Path,
    options: &'a TrainOptions,
    config: &'a TrainConfig,
    train_set: &'a Dataset,
    test_set: Option<&'a Dataset>,
    state: &'a mut RunState,
    metrics: std::fs::File,
    bar: ProgressBar,
    steps_per_epoch: usize,
    /// Start and images of the current logging window, for images/s.
    window: (Instant, usize),
}

impl FitHooks for RunHooks<'_> {
    fn before_step(&mut self, progress: &Progress) -> Control {
        let stop =
            self.options.stop.load(Ordering::SeqCst) || self.options.stop_at_step.is_some_and(|s| progress.step >= s);
        if stop {
            Control::Stop
        } else {
            Control::Continue
        }
    }

    fn after_step(&mut self, progress: &Progress, step: &StepReport) -> Result<()> {
        self.window.1 += step.images;
        self.bar.inc(1);
        let end_of_epoch = progress.batch_in_epoch == self.steps_per_epoch;
        if progress.step.is_multiple_of(self.config.monitor.log_every_steps.max(1)) || end_of_epoch {
            let images_per_second = self.window.1 as f64 / self.window.0.elapsed().as_secs_f64();
            self.window = (Instant::now(), 0);
            let epoch = progress.epoch as f64 + progress.batch_in_epoch as f64 / self.steps_per_epoch as f64;
            self.state.loss_history.push((epoch, step.loss));
            self.bar.set_message(format!(
                "loss {:.4} · {images_per_second:.0} img/s · lr {:.4}",
                step.loss, step.learning_rate
            ));
            let line = json!({"epoch": epoch, "step": progress.step, "loss": step.loss, "lr": step.learning_rate, "images_per_second": images_per_second});
            writeln!(self.metrics, "{line}")?;
        }
        Ok(())
    }

    fn after_epoch(
        &mut self,
        model: &Model,
        optimizer: &Optimizer,
        progress: &Progress,
        _mean_loss: f64,
    ) -> Result<()> {
        self.state.progress = progress.clone();
        let every = self.config.monitor.knn_every_epochs;
        let due = every > 0 && (progress.epoch.is_multiple_of(every) || progress.epoch == self.config.epochs);
        if let Some(test_set) = self.test_set.filter(|_| due) {
            let accuracy = monitor_knn(model, self.train_set, test_set, &self.config.monitor)?;
            self.state.knn_history.push((progress.epoch, accuracy));
            self.bar.println(format!("epoch {}: k-NN accuracy {accuracy:.4}", progress.epoch));
            writeln!(
                self.metrics,
                "{}",
                json!({"epoch": progress.epoch, "step": progress.step, "knn_accuracy": accuracy})
            )?;
        }
        save_checkpoint(self.dir, model, optimizer, self.state)?;
        draw_curves(self.dir, self.config, self.state);
        if progress.epoch < self.config.epochs {
            self.bar.set_prefix(format!("epoch {}/{}", progress.epoch + 1, self.config.epochs));
        }
        Ok(())
    }
}

/// Weights, buffers, optimiser state and run state, into the run folder.
fn save_checkpoint(dir: &Path, model: &Model, optimizer: &Optimizer, state: &RunState) -> Result<()> {
    checkpoint::save(dir, &model.varmap, &model.method.buffers()?, &optimizer.state_tensors(), state)
}

/// k-NN accuracy during training, on a smaller memory bank or test set where the config asks.
fn monitor_knn(model: &Model, train_set: &Dataset, test_set: &Dataset, monitor: &MonitorConfig) -> Result<f64> {
    // Copies only where a limit asks for a smaller set.
    let train_head = monitor.knn_train_limit.map(|n| train_set.head(n));
    let test_head = monitor.knn_test_limit.map(|n| test_set.head(n));
    let train_set = train_head.as_ref().unwrap_or(train_set);
    let test_set = test_head.as_ref().unwrap_or(test_set);
    Ok(model.evaluate(train_set, test_set, EvalScope::KNN)?.knn_accuracy)
}

fn draw_curves(dir: &Path, config: &TrainConfig, state: &RunState) {
    let title = format!("{}, batch {}", config.method.name(), config.batch_size);
    let acc: Vec<(f64, f64)> = state.knn_history.iter().map(|&(e, a)| (e as f64, a)).collect();
    if let Err(err) = super::curves::draw_curves(&dir.join(checkpoint::CURVES_FILE), &state.loss_history, &acc, &title)
    {
        tracing::warn!("could not draw the training curves: {err:#}");
    }
}

fn progress_bar(visible: bool, total: u64, position: u64) -> ProgressBar {
    let bar = if visible { ProgressBar::new(total) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} · ETA {eta}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_position(position);
    bar
}

//! The training loop: batches from the loader thread, the method's loss, backward, the
//! optimiser step, the method's momentum/queue/prototype updates; k-NN monitoring, metrics,
//! checkpoints, resumption and a clean stop on Ctrl-C.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, Var};
use candle_nn::VarMap;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use super::arch::init::seeded_var_builder;
use super::arch::methods::{self, Method, MethodParts};
use super::augment::Pipeline;
use super::checkpoint::{self, RunState};
use super::config::TrainConfig;
use super::optim::{LrSchedule, Optimizer};
use crate::data::loader::{BatchLoader, LoaderConfig};
use crate::data::Dataset;
use crate::eval::{self, EvalReport};

/// A method with its parameters, built from a run config.
pub struct Model {
    pub config: TrainConfig,
    pub varmap: VarMap,
    pub method: Box<dyn Method>,
    pub device: Device,
}

impl Model {
    /// Builds the networks with fresh, seeded weights.
    pub fn new(config: &TrainConfig, device: &Device) -> Result<Self> {
        config.validate()?;
        let varmap = VarMap::new();
        let method = methods::build(
            &config.method,
            &MethodParts {
                vb: seeded_var_builder(&varmap, config.seed, device),
                varmap: &varmap,
                encoder: &config.encoder,
                projector_dims: &config.projector_dims,
                seed: config.seed,
            },
        )?;
        Ok(Self { config: config.clone(), varmap, method, device: device.clone() })
    }

    /// Rebuilds the model of a run folder and loads its latest checkpoint.
    pub fn load(run_dir: &Path, device: &Device) -> Result<Self> {
        let config = TrainConfig::load(&run_dir.join(checkpoint::CONFIG_FILE))?;
        let mut model = Self::new(&config, device)?;
        let buffers = checkpoint::load_weights(run_dir, &model.varmap, device)?;
        model.method.load_buffers(&buffers)?;
        Ok(model)
    }

    /// The run's optimiser over every trainable parameter (see [`Model::optimizer_over`]).
    pub fn optimizer(&self) -> Optimizer {
        self.optimizer_over(methods::trainable_vars(&self.varmap))
    }

    /// The run's optimiser over `params` (fine-tuning trains a subset), with the method's
    /// learning-rate multipliers (a faster predictor for SimSiam).
    pub fn optimizer_over(&self, params: Vec<(String, Var)>) -> Optimizer {
        let mut optimizer = Optimizer::new(self.config.optimizer.clone(), params);
        for (prefix, factor) in self.config.method.learning_rate_scales() {
            optimizer.scale_learning_rate(prefix, factor);
        }
        optimizer
    }

    /// The encoder's features of every image, in evaluation mode, `[N, feature_dim]`.
    pub fn encode(&self, dataset: &Dataset) -> Result<Tensor> {
        Ok(eval::features::encode(self.method.encoder(), dataset, &self.device, 512)?)
    }
}

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
    let dir = &options.run_dir;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create run folder {}", dir.display()))?;
    let config_path = dir.join(checkpoint::CONFIG_FILE);
    if !options.resume && dir.join(checkpoint::STATE_FILE).exists() {
        bail!("{} already holds a run: pass --resume to continue it, or choose another --out", dir.display());
    }
    let (train_set, test_set) = config.data.load()?;
    let train_set = match config.train_limit {
        Some(n) => train_set.head(n),
        None => train_set,
    };
    anyhow::ensure!(
        train_set.len() >= config.batch_size,
        "the training set has {} images, fewer than one batch of {}",
        train_set.len(),
        config.batch_size
    );
    anyhow::ensure!(
        train_set.shape.channels == config.encoder.in_channels,
        "the data has {} channel(s) but the encoder expects {}",
        train_set.shape.channels,
        config.encoder.in_channels
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
        config.save(&config_path)?;
        let _ = std::fs::remove_file(dir.join(checkpoint::METRICS_FILE));
        RunState::default()
    };
    if state.finished {
        tracing::info!("{} is already trained to {} epochs", dir.display(), config.epochs);
        return Ok(state);
    }

    let train_set = Arc::new(train_set);
    let pipelines = view_pipelines(config);
    let loader_config =
        LoaderConfig { batch_size: config.batch_size, seed: config.seed, shuffle: true, drop_last: true, prefetch: 2 };
    let steps_per_epoch = crate::data::loader::batches_per_epoch(train_set.len(), config.batch_size, true);
    let total_steps = steps_per_epoch * config.epochs;
    let schedule = LrSchedule {
        base: config.learning_rate,
        warmup_steps: (config.warmup_epochs * steps_per_epoch as f64).round() as usize,
        total_steps,
        final_fraction: 0.0,
    };
    let mut metrics = std::fs::OpenOptions::new().create(true).append(true).open(dir.join(checkpoint::METRICS_FILE))?;
    let shape = train_set.shape;

    let bar = progress_bar(options.progress_bar, total_steps as u64, state.step as u64);
    for epoch in state.epoch..config.epochs {
        bar.set_prefix(format!("epoch {}/{}", epoch + 1, config.epochs));
        let loader = BatchLoader::spawn(train_set.clone(), pipelines.clone(), loader_config.clone(), epoch);
        let mut window = (Instant::now(), 0usize);
        for batch in loader.skip(state.batch_in_epoch) {
            if options.stop.load(Ordering::SeqCst) || options.stop_at_step.is_some_and(|s| state.step >= s) {
                bar.abandon_with_message("stopped: checkpoint saved");
                save_checkpoint(dir, &model, &optimizer, &state)?;
                return Ok(state);
            }
            let started = Instant::now();
            let n = batch.labels.len();
            let lr = schedule.at(state.step);
            let loss_value = match train_step(&mut model, &mut optimizer, &batch, shape, state.step, lr, total_steps)? {
                StepOutcome::Loss(value) => value,
                StepOutcome::NonFinite(value) => bail!(
                    "the loss became {value} at step {} (epoch {}): lower the learning rate (now {})",
                    state.step,
                    epoch + 1,
                    config.learning_rate
                ),
            };
            state.step += 1;
            state.batch_in_epoch += 1;
            state.train_seconds += started.elapsed().as_secs_f64();

            window.1 += n;
            bar.inc(1);
            if state.step % config.monitor.log_every_steps.max(1) == 0 || state.batch_in_epoch == steps_per_epoch {
                let images_per_second = window.1 as f64 / window.0.elapsed().as_secs_f64();
                window = (Instant::now(), 0);
                let epoch_fraction = epoch as f64 + state.batch_in_epoch as f64 / steps_per_epoch as f64;
                state.loss_history.push((epoch_fraction, loss_value));
                bar.set_message(format!("loss {loss_value:.4} · {images_per_second:.0} img/s · lr {lr:.4}"));
                writeln!(
                    metrics,
                    "{}",
                    json!({"epoch": epoch_fraction, "step": state.step, "loss": loss_value, "lr": lr, "images_per_second": images_per_second})
                )?;
            }
        }
        state.epoch = epoch + 1;
        state.batch_in_epoch = 0;

        let every = config.monitor.knn_every_epochs;
        if let Some(test_set) =
            test_set.as_ref().filter(|_| every > 0 && (state.epoch % every == 0 || state.epoch == config.epochs))
        {
            let accuracy = monitor_knn(&model, &train_set, test_set, &config.monitor)?;
            state.knn_history.push((state.epoch, accuracy));
            bar.println(format!("epoch {}: k-NN accuracy {accuracy:.4}", state.epoch));
            writeln!(metrics, "{}", json!({"epoch": state.epoch, "step": state.step, "knn_accuracy": accuracy}))?;
        }
        save_checkpoint(dir, &model, &optimizer, &state)?;
        draw_curves(dir, config, &state);
    }
    bar.finish_with_message("done");

    if options.final_eval {
        if let Some(test_set) = &test_set {
            let report = evaluate(&model, &train_set, test_set, true)?;
            writeln!(metrics, "{}", json!({"epoch": state.epoch, "final_eval": report}))?;
            state.final_eval = Some(report);
        }
    }
    state.finished = true;
    save_checkpoint(dir, &model, &optimizer, &state)?;
    Ok(state)
}

/// What one optimisation step gave.
pub enum StepOutcome {
    Loss(f64),
    /// The loss was NaN or infinite; nothing was updated.
    NonFinite(f64),
}

/// One optimisation step on a batch: its views through the method's loss, backward, the update
/// at learning rate `lr`, then the method's own after-step work (EMA targets, ...). `step` is the
/// number of steps done before this one, out of `total_steps`.
pub fn train_step(
    model: &mut Model,
    optimizer: &mut Optimizer,
    batch: &crate::data::loader::Batch,
    shape: crate::data::ImageShape,
    step: usize,
    lr: f64,
    total_steps: usize,
) -> Result<StepOutcome> {
    let n = batch.labels.len();
    let views: Vec<Tensor> = batch
        .views
        .iter()
        .map(|v| Tensor::from_slice(v, (n, shape.channels, shape.height, shape.width), &model.device))
        .collect::<candle_core::Result<_>>()?;
    let labels = Tensor::from_slice(&batch.labels, n, &model.device)?;
    let loss = model.method.loss(&views, &labels, step)?;
    let value = loss.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()? as f64;
    if !value.is_finite() {
        return Ok(StepOutcome::NonFinite(value));
    }
    optimizer.step(&loss.backward()?, lr)?;
    model.method.after_step((step + 1) as f64 / total_steps as f64)?;
    Ok(StepOutcome::Loss(value))
}

/// Weights, buffers, optimiser state and run state, into the run folder.
fn save_checkpoint(dir: &Path, model: &Model, optimizer: &Optimizer, state: &RunState) -> Result<()> {
    checkpoint::save(dir, &model.varmap, &model.method.buffers()?, &optimizer.state_tensors(), state)
}

/// One augmentation pipeline per view, as the config describes them.
fn view_pipelines(config: &TrainConfig) -> Vec<Arc<Pipeline>> {
    config.augment.iter().map(|a| Arc::new(Pipeline::from_config(a))).collect()
}

fn monitor_knn(
    model: &Model,
    train_set: &Dataset,
    test_set: &Dataset,
    monitor: &super::config::MonitorConfig,
) -> Result<f64> {
    // Copies only where a limit asks for a smaller set.
    let (train_head, test_head) =
        (monitor.knn_train_limit.map(|n| train_set.head(n)), monitor.knn_test_limit.map(|n| test_set.head(n)));
    let (train_set, test_set) = (train_head.as_ref().unwrap_or(train_set), test_head.as_ref().unwrap_or(test_set));
    let (train_features, test_features) = (model.encode(train_set)?, model.encode(test_set)?);
    eval::knn_accuracy(
        &train_features,
        &train_set.labels,
        &test_features,
        &test_set.labels,
        train_set.num_classes(),
        &eval::KnnConfig::default(),
    )
}

/// The field's protocol on frozen encoder features: weighted k-NN (k = 200, T = 0.1), and
/// optionally a linear probe and alignment/uniformity (Wang & Isola 2020) of two augmented
/// views of the test images.
pub fn evaluate(model: &Model, train_set: &Dataset, test_set: &Dataset, full: bool) -> Result<EvalReport> {
    let (train_features, test_features) = (model.encode(train_set)?, model.encode(test_set)?);
    let classes = train_set.num_classes();
    let knn_accuracy = eval::knn_accuracy(
        &train_features,
        &train_set.labels,
        &test_features,
        &test_set.labels,
        classes,
        &eval::KnnConfig::default(),
    )?;
    let mut report = EvalReport { knn_accuracy, linear_probe_accuracy: None, alignment: None, uniformity: None };
    if full {
        let probe = eval::linear_probe(
            &train_features,
            &train_set.labels,
            &test_features,
            &test_set.labels,
            classes,
            &eval::ProbeConfig::default(),
        )?;
        report.linear_probe_accuracy = Some(probe.test_accuracy);
        let (a, b) = augmented_pair_features(model, test_set)?;
        report.alignment = Some(eval::alignment(&a, &b, 2.0)?);
        report.uniformity = Some(eval::uniformity(&a, 2.0)?);
    }
    Ok(report)
}

/// Features of two augmented views of (up to 2,048 of) the images, for alignment.
fn augmented_pair_features(model: &Model, dataset: &Dataset) -> Result<(Tensor, Tensor)> {
    let subset = Arc::new(dataset.head(2048));
    let pipelines = view_pipelines(&model.config);
    let config = LoaderConfig {
        batch_size: subset.len(),
        seed: model.config.seed ^ 0xa11,
        shuffle: false,
        drop_last: false,
        prefetch: 1,
    };
    let batch = BatchLoader::spawn(subset.clone(), pipelines, config, 0).next().context("no batch for alignment")?;
    let mut features = Vec::new();
    for view in &batch.views {
        let images = Dataset { images: view.clone(), ..(*subset).clone() };
        features.push(super::loss::l2_normalize(&model.encode(&images)?)?);
    }
    Ok((features[0].clone(), features[1].clone()))
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

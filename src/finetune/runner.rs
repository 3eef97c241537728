//! Runs fine-tune jobs: QUEUED → VALIDATING → RUNNING → SUCCEEDED | FAILED | CANCELLED.
//!
//! A job loads the base version's weights and manifest into candle, trains SupCon (Khosla et
//! al. 2020) on the client's labelled images with the trainer's augmentations, evaluates k-NN and a
//! linear probe on a held-out split before and after, exports with the parity check and publishes
//! the next version of the output model; the serving side loads it at once. A version worse than
//! its base on the held-out k-NN is not published unless the job allows it.
//!
//! Jobs run on `concurrency` worker threads, each training inside a rayon pool of `threads`
//! threads, so embedding requests keep CPU. Cancellation is checked before every step. Every state
//! change and metric is an event in the job store and is broadcast to watchers.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use anyhow::{anyhow, ensure, Context, Result};
use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use tokio::sync::broadcast;

use super::datasets::{DatasetStore, LabeledImage};
use super::store::JobStore;
use crate::data::loader::{BatchLoader, LoaderConfig};
use crate::data::Dataset;
use crate::export::{self, ExportOptions, Provenance};
use crate::proto::v1::{
    job_event::Event, EpochMetrics, Evaluation, HyperParameters, Job, JobError, JobEvent, JobState,
};
use crate::registry::{Manifest, ModelRepository, WEIGHTS_FILE};
use crate::serve::models::ModelStore;
use crate::serve::preprocess::image_to_tensor;
use crate::train::arch::{methods, MethodConfig};
use crate::train::augment::Pipeline;
use crate::train::checkpoint;
use crate::train::optim::{LrSchedule, OptimizerConfig};
use crate::train::trainer::{train_step, Model, StepOutcome};

/// Limits and resources of the job runner.
#[derive(Debug, Clone)]
pub struct RunnerSettings {
    /// Jobs training at once.
    pub concurrency: usize,
    /// Threads one job's training may use.
    pub threads: usize,
    /// Images each class needs (so that both splits hold some).
    pub min_images_per_class: usize,
}

impl Default for RunnerSettings {
    fn default() -> Self {
        Self { concurrency: 1, threads: 1, min_images_per_class: 8 }
    }
}

/// Defaults for hyper-parameters a request leaves at 0.
pub fn with_defaults(h: Option<HyperParameters>) -> HyperParameters {
    let mut h = h.unwrap_or_default();
    if h.epochs == 0 {
        h.epochs = 10;
    }
    if h.batch_size == 0 {
        h.batch_size = 64;
    }
    if h.learning_rate == 0.0 {
        h.learning_rate = 0.05;
    }
    if h.temperature == 0.0 {
        h.temperature = 0.1;
    }
    if h.holdout_fraction == 0.0 {
        h.holdout_fraction = 0.2;
    }
    // On a few hundred images, training deeper stages overfits (measured in the README).
    if h.trainable_stages.is_none() {
        h.trainable_stages = Some(1);
    }
    h
}

/// Checks the ranges of (defaulted) hyper-parameters; the message names the field.
pub fn validate_hyper_parameters(h: &HyperParameters) -> Result<()> {
    ensure!((1..=1000).contains(&h.epochs), "epochs must be 1–1000, got {}", h.epochs);
    ensure!((2..=1024).contains(&h.batch_size), "batch_size must be 2–1024, got {}", h.batch_size);
    ensure!(
        h.learning_rate > 0.0 && h.learning_rate <= 10.0,
        "learning_rate must be in (0, 10], got {}",
        h.learning_rate
    );
    ensure!(h.temperature > 0.0 && h.temperature <= 10.0, "temperature must be in (0, 10], got {}", h.temperature);
    ensure!(
        h.holdout_fraction > 0.0 && h.holdout_fraction < 0.9,
        "holdout_fraction must be in (0, 0.9), got {}",
        h.holdout_fraction
    );
    Ok(())
}

/// Why a job stopped early; becomes FAILED (with a gRPC code) or CANCELLED.
enum Stop {
    Cancelled,
    Failed { code: tonic::Code, message: String },
}

impl From<anyhow::Error> for Stop {
    fn from(error: anyhow::Error) -> Self {
        Stop::Failed { code: tonic::Code::Internal, message: format!("{error:#}") }
    }
}

impl From<candle_core::Error> for Stop {
    fn from(error: candle_core::Error) -> Self {
        anyhow::Error::from(error).into()
    }
}

fn invalid(message: String) -> Stop {
    Stop::Failed { code: tonic::Code::InvalidArgument, message }
}

pub struct JobRunner {
    store: Arc<JobStore>,
    datasets: Arc<DatasetStore>,
    models: Arc<ModelStore>,
    settings: RunnerSettings,
    events: broadcast::Sender<JobEvent>,
    cancels: Mutex<HashMap<String, Arc<AtomicBool>>>,
    /// Guards claiming a queued job, so a cancel and a worker cannot both take it.
    claim: Mutex<()>,
    wake: Condvar,
    shutting_down: AtomicBool,
    workers: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl JobRunner {
    /// Recovers from a crash (a job left RUNNING is marked FAILED "interrupted"; one left
    /// VALIDATING is queued again) and starts the workers.
    pub fn start(
        store: Arc<JobStore>,
        datasets: Arc<DatasetStore>,
        models: Arc<ModelStore>,
        settings: RunnerSettings,
    ) -> Result<Arc<Self>> {
        let (events, _) = broadcast::channel(1024);
        let runner = Arc::new(Self {
            store,
            datasets,
            models,
            settings,
            events,
            cancels: Mutex::new(HashMap::new()),
            claim: Mutex::new(()),
            wake: Condvar::new(),
            shutting_down: AtomicBool::new(false),
            workers: Mutex::new(Vec::new()),
        });
        for job in runner.store.jobs_in_states(&[JobState::Running])? {
            let error = JobError {
                code: tonic::Code::Aborted as i32,
                message: "interrupted: the server stopped while the job was running".into(),
            };
            runner.store.transition(&job.job_id, JobState::Failed, Some(error), Some("interrupted"))?;
            crate::serve::metrics::finetune_job_finished("failed");
            tracing::warn!(job = %job.job_id, "job was running when the server stopped; marked FAILED (interrupted)");
        }
        for job in runner.store.jobs_in_states(&[JobState::Validating])? {
            runner.store.transition(
                &job.job_id,
                JobState::Queued,
                None,
                Some("queued again after a server restart"),
            )?;
        }
        let mut workers = runner.workers.lock().expect("workers lock");
        for i in 0..runner.settings.concurrency {
            let runner = runner.clone();
            workers.push(
                std::thread::Builder::new()
                    .name(format!("finetune {i}"))
                    .spawn(move || runner.work())
                    .expect("spawn a fine-tune worker"),
            );
        }
        drop(workers);
        Ok(runner)
    }

    pub fn store(&self) -> &JobStore {
        &self.store
    }

    pub fn datasets(&self) -> &DatasetStore {
        &self.datasets
    }

    /// Live events of every job (watchers filter by id).
    pub fn subscribe(&self) -> broadcast::Receiver<JobEvent> {
        self.events.subscribe()
    }

    fn publish_event(&self, event: JobEvent) {
        let _ = self.events.send(event);
    }

    /// Stores a new QUEUED job and wakes a worker.
    pub fn submit(&self, job: &Job, client: &str) -> Result<()> {
        let event = self.store.create_job(job, client)?;
        self.publish_event(event);
        let _guard = self.claim.lock().expect("claim lock");
        self.wake.notify_one();
        Ok(())
    }

    /// Cancels a job: at once when it has not started training, within one step otherwise.
    pub fn cancel(&self, job_id: &str) -> Result<Job, tonic::Status> {
        let internal = |e: anyhow::Error| tonic::Status::internal(format!("{e:#}"));
        let _guard = self.claim.lock().expect("claim lock");
        let job = self
            .store
            .job(job_id)
            .map_err(internal)?
            .ok_or_else(|| tonic::Status::not_found(format!("no job {job_id:?}")))?;
        match job.state() {
            JobState::Queued | JobState::Validating if !self.cancels.lock().expect("cancels").contains_key(job_id) => {
                let event = self
                    .store
                    .transition(job_id, JobState::Cancelled, None, Some("cancelled before it ran"))
                    .map_err(internal)?;
                crate::serve::metrics::finetune_job_finished("cancelled");
                let job = event.job.clone().unwrap_or_default();
                self.publish_event(event);
                Ok(job)
            }
            JobState::Queued | JobState::Validating | JobState::Running => {
                if let Some(flag) = self.cancels.lock().expect("cancels").get(job_id) {
                    flag.store(true, Ordering::Release);
                }
                Ok(job)
            }
            state => {
                Err(tonic::Status::failed_precondition(format!("job {job_id} is already {}", state.as_str_name())))
            }
        }
    }

    /// Stops taking jobs; a running job stops at its next step and is left for recovery.
    pub fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
        for flag in self.cancels.lock().expect("cancels").values() {
            flag.store(true, Ordering::Release);
        }
        {
            let _guard = self.claim.lock().expect("claim lock");
            self.wake.notify_all();
        }
        for worker in self.workers.lock().expect("workers lock").drain(..) {
            let _ = worker.join();
        }
    }

    fn work(self: Arc<Self>) {
        while let Some((job, cancel)) = self.next_job() {
            let id = job.job_id.clone();
            let result = self.run_job(job, &cancel);
            self.cancels.lock().expect("cancels").remove(&id);
            self.finish(&id, result);
        }
    }

    /// Blocks until a queued job can be claimed (oldest first) or the runner shuts down.
    fn next_job(&self) -> Option<(Job, Arc<AtomicBool>)> {
        let mut guard = self.claim.lock().expect("claim lock");
        loop {
            if self.shutting_down.load(Ordering::Acquire) {
                return None;
            }
            match self.store.jobs_in_states(&[JobState::Queued]) {
                Ok(queued) => {
                    if let Some(job) = queued.into_iter().next() {
                        let cancel = Arc::new(AtomicBool::new(false));
                        self.cancels.lock().expect("cancels").insert(job.job_id.clone(), cancel.clone());
                        return Some((job, cancel));
                    }
                }
                Err(error) => tracing::error!(%error, "cannot read the job queue"),
            }
            guard = self.wake.wait_timeout(guard, std::time::Duration::from_secs(5)).expect("claim lock").0;
        }
    }

    fn transition(&self, job_id: &str, to: JobState, error: Option<JobError>, message: Option<&str>) -> Result<()> {
        let event = self.store.transition(job_id, to, error, message)?;
        self.publish_event(event);
        Ok(())
    }

    fn record(&self, job_id: &str, event: Event) -> Result<()> {
        let event = self.store.record(job_id, event)?;
        self.publish_event(event);
        Ok(())
    }

    fn finish(&self, job_id: &str, result: Result<(), Stop>) {
        let outcome = match result {
            Ok(()) => self.transition(job_id, JobState::Succeeded, None, None).map(|_| "succeeded"),
            Err(Stop::Cancelled) if self.shutting_down.load(Ordering::Acquire) => {
                // Left RUNNING on purpose: the next start marks it interrupted.
                tracing::warn!(job = job_id, "server stopping: job interrupted");
                return;
            }
            Err(Stop::Cancelled) => self
                .transition(job_id, JobState::Cancelled, None, Some("cancelled; nothing was published"))
                .map(|_| "cancelled"),
            Err(Stop::Failed { code, message }) => {
                tracing::warn!(job = job_id, %message, "job failed");
                let error = JobError { code: code as i32, message: message.clone() };
                self.transition(job_id, JobState::Failed, Some(error), Some(&message)).map(|_| "failed")
            }
        };
        match outcome {
            Ok(state) => crate::serve::metrics::finetune_job_finished(state),
            Err(error) => tracing::error!(job = job_id, %error, "cannot record the end of the job"),
        }
    }

    fn run_job(&self, job: Job, cancel: &AtomicBool) -> Result<(), Stop> {
        let id = job.job_id.as_str();
        self.transition(id, JobState::Validating, None, Some("validating the dataset and the base model"))?;
        let prepared = self.validate(&job)?;
        let message = format!(
            "validated: base {} version {}, {} training and {} held-out images",
            job.base_model,
            prepared.base_version,
            prepared.train.len(),
            prepared.heldout.len()
        );
        self.record(id, Event::Message(message))?;
        if cancel.load(Ordering::Acquire) {
            return Err(Stop::Cancelled);
        }
        self.transition(id, JobState::Running, None, Some("training"))?;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(self.settings.threads)
            .thread_name(|i| format!("finetune-train {i}"))
            .build()
            .map_err(|e| anyhow!("cannot start the training threads: {e}"))?;
        pool.install(|| self.train_and_publish(&job, prepared, cancel))
    }

    /// VALIDATING: the base model exists and loads; every image decodes; enough classes and images.
    fn validate(&self, job: &Job) -> Result<Prepared, Stop> {
        let not_found = |message: String| Stop::Failed { code: tonic::Code::NotFound, message };
        let base = self
            .models
            .resolve(&job.base_model, job.base_version)
            .map_err(|e| not_found(format!("base model: {e}")))?;
        let repository = self.models.repository();
        let manifest = base.manifest.clone();
        let weights = repository.version_dir(&base.name, base.version).join(WEIGHTS_FILE);

        let record = self
            .store
            .dataset(&job.dataset_id)?
            .ok_or_else(|| not_found(format!("dataset {} does not exist", job.dataset_id)))?;
        let images = self.datasets.load(&record)?;
        let h = job.hyper_parameters.unwrap_or_default();
        let (train, heldout) =
            split_dataset(&images, &manifest, h.holdout_fraction, h.seed, self.settings.min_images_per_class)
                .map_err(|e| invalid(format!("{e:#}")))?;
        Ok(Prepared { manifest, base_version: base.version, weights, train, heldout, repository: repository.clone() })
    }

    fn train_and_publish(&self, job: &Job, prepared: Prepared, cancel: &AtomicBool) -> Result<(), Stop> {
        let id = job.job_id.as_str();
        let h = job.hyper_parameters.unwrap_or_default();
        let Prepared { manifest, base_version, weights, train, heldout, repository } = prepared;
        let device = Device::Cpu;

        // The base encoder and projection head, with SupCon as the objective.
        let mut config = manifest.training.config.clone();
        config.method = MethodConfig::Supcon { temperature: h.temperature };
        config.augment = config.method.view_augmentations();
        config.epochs = h.epochs as usize;
        config.batch_size = (h.batch_size as usize).min(train.len());
        config.learning_rate = h.learning_rate;
        config.warmup_epochs = 0.0;
        config.seed = h.seed;
        config.optimizer = OptimizerConfig::sgd(0.9, 5e-4);
        let mut model = Model::new(&config, &device)?;
        checkpoint::load_weights_file(&weights, &model.varmap, &device)
            .context("cannot load the base model's weights")?;

        let before = evaluate(&model, &train, &heldout)?;
        self.record(id, Event::Before(before))?;

        let trainable = trainable_variables(&model, h.trainable_stages, config.encoder.widths.len());
        // Batch norm updates its running statistics in every training forward pass, even in
        // frozen stages; keep the base's so that a frozen stage really stays as it was.
        let frozen_statistics = frozen_running_statistics(&model, &trainable);
        let mut optimizer = model.optimizer_over(trainable);
        let train = Arc::new(train);
        let pipelines: Vec<Arc<Pipeline>> = config.augment.iter().map(|a| Arc::new(Pipeline::from_config(a))).collect();
        let loader = LoaderConfig {
            batch_size: config.batch_size,
            seed: config.seed,
            shuffle: true,
            drop_last: true,
            prefetch: 2,
        };
        let steps_per_epoch = crate::data::loader::batches_per_epoch(train.len(), config.batch_size, true);
        let total_steps = steps_per_epoch * config.epochs;
        let schedule = LrSchedule { base: config.learning_rate, warmup_steps: 0, total_steps, final_fraction: 0.0 };
        let shape = train.shape;
        let mut step = 0;
        for epoch in 0..config.epochs {
            let mut loss_sum = 0.0;
            for batch in BatchLoader::spawn(train.clone(), pipelines.clone(), loader.clone(), epoch) {
                if cancel.load(Ordering::Acquire) {
                    return Err(Stop::Cancelled);
                }
                match train_step(&mut model, &mut optimizer, &batch, shape, step, schedule.at(step), total_steps)? {
                    StepOutcome::Loss(value) => loss_sum += value,
                    StepOutcome::NonFinite(value) => {
                        return Err(invalid(format!(
                            "the loss became {value} at epoch {}: lower the learning rate (now {})",
                            epoch + 1,
                            h.learning_rate
                        )))
                    }
                }
                step += 1;
            }
            let epoch_metrics = EpochMetrics { epoch: epoch as u32 + 1, train_loss: loss_sum / steps_per_epoch as f64 };
            self.record(id, Event::Epoch(epoch_metrics))?;
            // Evaluation and export take the last tenth of the progress bar.
            self.record(id, Event::Progress(0.9 * (epoch + 1) as f64 / config.epochs as f64))?;
        }

        for (var, saved) in &frozen_statistics {
            var.set(saved)?;
        }
        let after = evaluate(&model, &train, &heldout)?;
        self.record(id, Event::After(after))?;
        if after.knn_accuracy < before.knn_accuracy && !job.allow_worse {
            return Err(Stop::Failed {
                code: tonic::Code::FailedPrecondition,
                message: format!(
                    "not published: held-out k-NN accuracy fell from {:.4} to {:.4}; create the job with allow_worse to publish anyway",
                    before.knn_accuracy, after.knn_accuracy
                ),
            });
        }
        if cancel.load(Ordering::Acquire) {
            return Err(Stop::Cancelled);
        }
        let provenance = Provenance {
            source: format!("fine-tune job {id} from {} version {base_version}", job.base_model),
            evaluation: Some(crate::eval::EvalReport {
                knn_accuracy: after.knn_accuracy,
                linear_probe_accuracy: Some(after.linear_probe_accuracy),
                alignment: None,
                uniformity: None,
            }),
            epochs: config.epochs,
            steps: step,
            data: Some(format!(
                "dataset {} ({} training and {} held-out images)",
                job.dataset_id,
                train.len(),
                heldout.len()
            )),
        };
        let published = export::publish_model(
            &repository,
            &model,
            &ExportOptions::new(&job.output_model),
            &provenance,
            Some(&heldout),
        )?;
        self.store.set_output_version(id, published.version)?;
        self.record(id, Event::Message(format!("published {} version {}", published.name, published.version)))?;
        // Serve it now rather than at the next poll.
        if let Err(error) = self.models.scan() {
            tracing::warn!(%error, "rescan after publishing failed; the poller will pick the version up");
        }
        Ok(())
    }
}

struct Prepared {
    manifest: Manifest,
    base_version: u64,
    weights: std::path::PathBuf,
    train: Dataset,
    heldout: Dataset,
    repository: ModelRepository,
}

/// Decodes every image as the model's input and splits each class into training and held-out
/// images (a seeded shuffle per class; at least one of each).
pub fn split_dataset(
    images: &[LabeledImage],
    manifest: &Manifest,
    holdout: f64,
    seed: u64,
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
        image_to_tensor(&image.bytes, &manifest.input, &mut pixels)
            .map_err(|reason| anyhow!("image {i} (label {:?}): {reason}", image.label))?;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (mut train_idx, mut heldout_idx) = (Vec::new(), Vec::new());
    let class_names: Vec<String> = by_class.keys().map(|c| c.to_string()).collect();
    for (label, (_, mut members)) in by_class.into_iter().enumerate() {
        members.shuffle(&mut rng);
        let held = ((members.len() as f64 * holdout).round() as usize).clamp(1, members.len() - 1);
        heldout_idx.extend(members[..held].iter().map(|&i| (i, label as u32)));
        train_idx.extend(members[held..].iter().map(|&i| (i, label as u32)));
    }
    let shape = crate::data::ImageShape::new(manifest.input.channels, manifest.input.height, manifest.input.width);
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
fn trainable_variables(model: &Model, stages: Option<u32>, total_stages: usize) -> Vec<(String, candle_core::Var)> {
    let all = methods::trainable_vars(&model.varmap);
    let Some(stages) = stages.map(|s| s as usize) else { return all };
    let first_trained = total_stages.saturating_sub(stages) + 1;
    all.into_iter()
        .filter(|(name, _)| {
            let Some(rest) = name.strip_prefix("encoder.") else { return true };
            rest.strip_prefix("stage")
                .and_then(|s| s.split('.').next())
                .and_then(|n| n.parse::<usize>().ok())
                .is_some_and(|n| n >= first_trained)
        })
        .collect()
}

/// Copies of the running statistics of every batch norm whose scale is not trained.
fn frozen_running_statistics(
    model: &Model,
    trainable: &[(String, candle_core::Var)],
) -> Vec<(candle_core::Var, Tensor)> {
    let trained: std::collections::HashSet<&str> = trainable.iter().map(|(n, _)| n.as_str()).collect();
    let vars = model.varmap.data().lock().expect("varmap lock");
    vars.iter()
        .filter_map(|(name, var)| {
            let layer = name.strip_suffix(".running_mean").or_else(|| name.strip_suffix(".running_var"))?;
            let frozen = !trained.contains(format!("{layer}.weight").as_str());
            frozen.then(|| (var.clone(), var.as_tensor().copy().expect("copy a CPU tensor")))
        })
        .collect()
}

/// k-NN and linear-probe accuracy of the held-out images against the training images.
fn evaluate(model: &Model, train: &Dataset, heldout: &Dataset) -> Result<Evaluation> {
    let (train_features, heldout_features) = (model.encode(train)?, model.encode(heldout)?);
    let knn_accuracy = crate::eval::knn_accuracy(
        &train_features,
        &train.labels,
        &heldout_features,
        &heldout.labels,
        train.num_classes(),
        &crate::eval::KnnConfig::default(),
    )?;
    let probe = crate::eval::linear_probe(
        &train_features,
        &train.labels,
        &heldout_features,
        &heldout.labels,
        train.num_classes(),
        &crate::eval::ProbeConfig::default(),
    )?;
    Ok(Evaluation { knn_accuracy, linear_probe_accuracy: probe.test_accuracy })
}

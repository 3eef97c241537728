//! Runs fine-tune jobs: QUEUED → VALIDATING → RUNNING → SUCCEEDED | FAILED | CANCELLED. What a
//! job does is [`super::job`]; this is the job system around it: workers, claiming, cancellation,
//! crash recovery, and every state change and update stored as an event and broadcast to
//! watchers.
//!
//! Jobs run on `concurrency` worker threads, each training inside a rayon pool of `threads`
//! threads, so embedding requests keep CPU. Cancellation is checked before every step. A
//! published version reaches the serving side through the model repository.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use anyhow::{anyhow, Result};
use tokio::sync::broadcast;

use super::datasets::DatasetStore;
use super::job::{self, FailureKind, HeldOut, JobSpec, JobStop, JobUpdate};
use super::parameters::JobParameters;
use super::store::JobStore;
use crate::eval::uncertainty::Interval;
use crate::proto::v1::{
    job_event::Event, EpochMetrics, Estimate as ProtoEstimate, Evaluation, Interval as ProtoInterval, Job, JobError,
    JobEvent, JobState,
};
use crate::registry::ModelRepository;

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

/// Why a job cannot be cancelled.
#[derive(Debug, thiserror::Error)]
pub enum CancelError {
    #[error("no job {0:?}")]
    NotFound(String),
    #[error("job {job_id} is already {}", .state.as_str_name())]
    Finished { job_id: String, state: JobState },
    #[error(transparent)]
    Store(#[from] anyhow::Error),
}

pub struct JobRunner {
    store: Arc<JobStore>,
    datasets: Arc<DatasetStore>,
    repository: ModelRepository,
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
        repository: ModelRepository,
        settings: RunnerSettings,
    ) -> Result<Arc<Self>> {
        let (events, _) = broadcast::channel(1024);
        let runner = Arc::new(Self {
            store,
            datasets,
            repository,
            settings,
            events,
            cancels: Mutex::new(HashMap::new()),
            claim: Mutex::new(()),
            wake: Condvar::new(),
            shutting_down: AtomicBool::new(false),
            workers: Mutex::new(Vec::new()),
        });
        for job in runner.store.jobs_in_states(&[JobState::Running])? {
            // Killed after its version became visible: the version is the job's result.
            if let Ok(Some(version)) = runner.repository.version_published_by(&job.output_model, &job.job_id) {
                runner.store.set_output_version(&job.job_id, version)?;
                let message = format!("published {} version {version} before the server stopped", job.output_model);
                runner.store.transition(&job.job_id, JobState::Succeeded, None, Some(&message))?;
                crate::metrics::finetune_job_finished("succeeded");
                tracing::warn!(job = %job.job_id, version, "job was running when the server stopped, after publishing; marked SUCCEEDED");
                continue;
            }
            let error = JobError {
                code: tonic::Code::Aborted as i32,
                message: "interrupted: the server stopped while the job was running".into(),
            };
            runner.store.transition(&job.job_id, JobState::Failed, Some(error), Some("interrupted"))?;
            crate::metrics::finetune_job_finished("failed");
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

    pub fn repository(&self) -> &ModelRepository {
        &self.repository
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
    pub fn cancel(&self, job_id: &str) -> Result<Job, CancelError> {
        let _guard = self.claim.lock().expect("claim lock");
        let job = self.store.job(job_id)?.ok_or_else(|| CancelError::NotFound(job_id.to_string()))?;
        match job.state() {
            JobState::Queued | JobState::Validating if !self.cancels.lock().expect("cancels").contains_key(job_id) => {
                let event =
                    self.store.transition(job_id, JobState::Cancelled, None, Some("cancelled before it ran"))?;
                crate::metrics::finetune_job_finished("cancelled");
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
            state => Err(CancelError::Finished { job_id: job_id.to_string(), state }),
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

    fn finish(&self, job_id: &str, result: Result<(), JobStop>) {
        let outcome = match result {
            Ok(()) => self.transition(job_id, JobState::Succeeded, None, None).map(|_| "succeeded"),
            Err(JobStop::Cancelled) if self.shutting_down.load(Ordering::Acquire) => {
                // Left RUNNING on purpose: the next start marks it interrupted.
                tracing::warn!(job = job_id, "server stopping: job interrupted");
                return;
            }
            Err(JobStop::Cancelled) => self
                .transition(job_id, JobState::Cancelled, None, Some("cancelled; nothing was published"))
                .map(|_| "cancelled"),
            Err(JobStop::Failed { kind, message }) => {
                tracing::warn!(job = job_id, %message, "job failed");
                let error = JobError { code: kind.grpc_code() as i32, message: message.clone() };
                self.transition(job_id, JobState::Failed, Some(error), Some(&message)).map(|_| "failed")
            }
        };
        match outcome {
            Ok(state) => crate::metrics::finetune_job_finished(state),
            Err(error) => tracing::error!(job = job_id, %error, "cannot record the end of the job"),
        }
    }

    fn run_job(&self, job: Job, cancel: &AtomicBool) -> Result<(), JobStop> {
        let id = job.job_id.as_str();
        self.transition(id, JobState::Validating, None, Some("validating the dataset and the base model"))?;
        let spec = JobSpec {
            job_id: job.job_id.clone(),
            base_model: job.base_model.clone(),
            base_version: job.base_version,
            output_model: job.output_model.clone(),
            dataset_id: job.dataset_id.clone(),
            parameters: JobParameters::from_proto(job.hyper_parameters.as_ref())
                .map_err(|e| JobStop::Failed { kind: FailureKind::InvalidArgument, message: format!("{e:#}") })?,
            allow_worse: job.allow_worse,
        };
        let record = self.store.dataset(&job.dataset_id)?.ok_or_else(|| JobStop::Failed {
            kind: FailureKind::NotFound,
            message: format!("dataset {} does not exist", job.dataset_id),
        })?;
        let images = self.datasets.load(&record)?;
        let prepared = job::prepare(&self.repository, &spec, &images, self.settings.min_images_per_class)?;
        let message = format!(
            "validated: base {} version {}, {} training and {} held-out images",
            job.base_model,
            prepared.base_version,
            prepared.train.len(),
            prepared.heldout.len()
        );
        self.record(id, Event::Message(message))?;
        if cancel.load(Ordering::Acquire) {
            return Err(JobStop::Cancelled);
        }
        self.transition(id, JobState::Running, None, Some("training"))?;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(self.settings.threads)
            .thread_name(|i| format!("finetune-train {i}"))
            .build()
            .map_err(|e| anyhow!("cannot start the training threads: {e}"))?;
        let mut report = |update: JobUpdate| self.record(id, update_event(update));
        let published =
            pool.install(|| job::train_and_publish(&self.repository, &spec, prepared, cancel, &mut report))?;
        self.store.set_output_version(id, published.version)?;
        let message = format!("published {} version {}; {}", published.name, published.version, published.verdict);
        self.record(id, Event::Message(message))?;
        Ok(())
    }
}

/// A job update as the event the store keeps.
fn update_event(update: JobUpdate) -> Event {
    let interval = |i: Interval| ProtoInterval { low: i.low, high: i.high };
    let evaluation = |held: HeldOut| Evaluation {
        knn_accuracy: held.report.knn_accuracy,
        linear_probe_accuracy: held.report.linear_probe_accuracy.unwrap_or_default(),
        knn_accuracy_interval: Some(interval(held.knn_interval)),
        images: held.images as u32,
        knn_change: held
            .knn_change
            .map(|change| ProtoEstimate { value: change.value, interval: Some(interval(change.interval)) }),
    };
    match update {
        JobUpdate::Message(message) => Event::Message(message),
        JobUpdate::Before(report) => Event::Before(evaluation(report)),
        JobUpdate::After(report) => Event::After(evaluation(report)),
        JobUpdate::Epoch { epoch, mean_loss } => {
            Event::Epoch(EpochMetrics { epoch: epoch as u32, train_loss: mean_loss })
        }
        JobUpdate::Progress(fraction) => Event::Progress(fraction),
    }
}

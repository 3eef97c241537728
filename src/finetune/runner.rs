//! Runs fine-tune jobs: QUEUED → VALIDATING → RUNNING → SUCCEEDED | FAILED | CANCELLED. What a
//! job does is [`super::job`]; this is the job system around it: workers, claiming, cancellation,
//! crash recovery, and every state change and update stored as an event and broadcast to
//! watchers.
//!
//! Jobs run on `concurrency` worker threads, each training inside a rayon pool of `threads`
//! threads, so embedding requests keep CPU. Cancellation is checked before every step. A
//! published version reaches the serving side through the model repository.
//!
//! Workers claim jobs from the store under a lease that a heartbeat renews while the job runs,
//! so replicas sharing one store never run a job twice: when a server dies, its lease runs out
//! and another server's worker starts the job again from its dataset (or, when the dead server
//! had already published the version, records that as the job's result).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Result};
use tokio::sync::broadcast;

use super::datasets::DatasetStore;
use super::job::{self, FailureKind, HeldOut, JobSpec, JobStop, JobUpdate};
use super::parameters::JobParameters;
use super::store::{CancelOutcome, Claim, JobStore, Lease};
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
    /// How long a claimed job stays this server's without a renewal.
    pub lease: Duration,
}

impl Default for RunnerSettings {
    fn default() -> Self {
        Self { concurrency: 1, threads: 1, min_images_per_class: 8, lease: Duration::from_secs(30) }
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
    /// This server's name: host, process and a random part; each worker holds leases as
    /// `SERVER/wN`, so that two workers of one server never both hold a job.
    server_name: String,
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
            server_name: server_name(),
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
        if !runner.store.is_shared() {
            runner.recover()?;
        }
        let mut workers = runner.workers.lock().expect("workers lock");
        for i in 0..runner.settings.concurrency {
            let runner = runner.clone();
            workers.push(
                std::thread::Builder::new()
                    .name(format!("finetune {i}"))
                    .spawn(move || {
                        let worker = format!("{}/w{i}", runner.server_name);
                        runner.work(&worker)
                    })
                    .expect("spawn a fine-tune worker"),
            );
        }
        drop(workers);
        Ok(runner)
    }

    /// After a restart on a store of its own: a job left RUNNING is marked FAILED "interrupted"
    /// (or SUCCEEDED when its version was published); one left VALIDATING is queued again. A
    /// shared store leaves such jobs to their leases instead: their server may be alive.
    fn recover(&self) -> Result<()> {
        for job in self.store.jobs_in_states(&[JobState::Running])? {
            if self.succeed_if_published(&job, None, "before the server stopped")? {
                continue;
            }
            let error = JobError {
                code: tonic::Code::Aborted as i32,
                message: "interrupted: the server stopped while the job was running".into(),
            };
            self.store.transition(&job.job_id, JobState::Failed, Some(error), Some("interrupted"))?;
            crate::metrics::finetune_job_finished("failed");
            tracing::warn!(job = %job.job_id, "job was running when the server stopped; marked FAILED (interrupted)");
        }
        for job in self.store.jobs_in_states(&[JobState::Validating])? {
            self.store.transition(&job.job_id, JobState::Queued, None, Some("queued again after a server restart"))?;
        }
        Ok(())
    }

    /// When a run of `job` that did not finish had already published its version, records that
    /// version as the job's result (SUCCEEDED) and returns true. `owner`: the worker that holds
    /// the job now, if any.
    fn succeed_if_published(&self, job: &Job, owner: Option<&str>, when: &str) -> Result<bool> {
        let Ok(Some(version)) = self.repository.version_published_by(&job.output_model, &job.job_id) else {
            return Ok(false);
        };
        self.store.set_output_version(&job.job_id, version)?;
        let message = format!("published {} version {version} {when}", job.output_model);
        let id = job.job_id.as_str();
        let events = match owner {
            Some(owner) => vec![
                self.store.transition_held(id, owner, JobState::Running, None, Some(&message))?,
                self.store.transition_held(id, owner, JobState::Succeeded, None, Some(&message))?,
            ],
            None => vec![self.store.transition(id, JobState::Succeeded, None, Some(&message))?],
        };
        events.into_iter().for_each(|event| self.publish_event(event));
        crate::metrics::finetune_job_finished("succeeded");
        tracing::warn!(job = id, version, "the job's version was published {when}; marked SUCCEEDED");
        Ok(true)
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

    /// Cancels a job: at once when no worker holds it yet, within one step (or one lease
    /// renewal, when another server runs it) otherwise.
    pub fn cancel(&self, job_id: &str) -> Result<Job, CancelError> {
        match self.store.cancel(job_id)? {
            CancelOutcome::Cancelled(event) => {
                crate::metrics::finetune_job_finished("cancelled");
                let job = event.job.clone().unwrap_or_default();
                self.publish_event(event);
                Ok(job)
            }
            CancelOutcome::Requested(job) => {
                if let Some(flag) = self.cancels.lock().expect("cancels").get(job_id) {
                    flag.store(true, Ordering::Release);
                }
                Ok(job)
            }
            CancelOutcome::Finished(state) => Err(CancelError::Finished { job_id: job_id.to_string(), state }),
            CancelOutcome::NotFound => Err(CancelError::NotFound(job_id.to_string())),
        }
    }

    /// Stops taking jobs; a running job stops at its next step and is left for recovery (or, on
    /// a shared store, handed back). A second call returns once the first has joined the workers.
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

    fn work(self: Arc<Self>, owner: &str) {
        while let Some((claim, cancel)) = self.next_job(owner) {
            let id = claim.job.job_id.clone();
            if claim.taken_from.is_some() {
                // The server that ran it before may have died after publishing.
                match self.succeed_if_published(&claim.job, Some(owner), "by the server that ran it before") {
                    Ok(true) => {
                        self.cancels.lock().expect("cancels").remove(&id);
                        continue;
                    }
                    Ok(false) => {}
                    Err(error) => tracing::error!(job = %id, %error, "cannot check what the job's last run published"),
                }
            }
            let lost = AtomicBool::new(false);
            let done = AtomicBool::new(false);
            let result = std::thread::scope(|scope| {
                scope.spawn(|| self.keep_lease(owner, &id, &cancel, &lost, &done));
                let result = self.run_job(owner, claim, &cancel);
                done.store(true, Ordering::Release);
                result
            });
            self.cancels.lock().expect("cancels").remove(&id);
            if lost.load(Ordering::Acquire) {
                tracing::warn!(job = %id, "this server's lease on the job ran out; another server runs it now");
                continue;
            }
            self.finish(owner, &id, result);
        }
    }

    /// While the job runs: renews the lease a few times per lease length, and raises `cancel`
    /// when a client asked (at any server) or the lease was lost (`lost` then says so).
    fn keep_lease(&self, owner: &str, job_id: &str, cancel: &AtomicBool, lost: &AtomicBool, done: &AtomicBool) {
        let tick = Duration::from_millis(100);
        let renew_every = (self.settings.lease / 4).min(Duration::from_secs(2));
        let mut since_renewal = Duration::ZERO;
        while !done.load(Ordering::Acquire) {
            std::thread::sleep(tick);
            since_renewal += tick;
            if since_renewal < renew_every {
                continue;
            }
            since_renewal = Duration::ZERO;
            match self.store.renew_lease(job_id, owner, self.settings.lease) {
                Ok(Lease::Held { cancel_requested }) => {
                    if cancel_requested {
                        cancel.store(true, Ordering::Release);
                    }
                }
                Ok(Lease::Lost) => {
                    if done.load(Ordering::Acquire) {
                        return;
                    }
                    lost.store(true, Ordering::Release);
                    cancel.store(true, Ordering::Release);
                    return;
                }
                Err(error) => tracing::error!(job = job_id, %error, "cannot renew the job's lease"),
            }
        }
    }

    /// Blocks until a job can be claimed (oldest first) or the runner shuts down.
    fn next_job(&self, owner: &str) -> Option<(Claim, Arc<AtomicBool>)> {
        // Other servers sharing the store queue jobs this one hears of only by asking.
        let poll = if self.store.is_shared() { Duration::from_secs(1) } else { Duration::from_secs(5) };
        let mut guard = self.claim.lock().expect("claim lock");
        loop {
            if self.shutting_down.load(Ordering::Acquire) {
                return None;
            }
            match self.store.claim_next(owner, self.settings.lease) {
                Ok(Some(claim)) => {
                    let cancel = Arc::new(AtomicBool::new(false));
                    self.cancels.lock().expect("cancels").insert(claim.job.job_id.clone(), cancel.clone());
                    claim.events.iter().cloned().for_each(|event| self.publish_event(event));
                    if let Some(previous) = &claim.taken_from {
                        crate::metrics::finetune_job_taken_over();
                        tracing::warn!(job = %claim.job.job_id, previous, "took over a job whose lease ran out");
                    }
                    return Some((claim, cancel));
                }
                Ok(None) => {}
                Err(error) => tracing::error!(%error, "cannot claim from the job queue"),
            }
            guard = self.wake.wait_timeout(guard, poll).expect("claim lock").0;
        }
    }

    fn transition(
        &self,
        owner: &str,
        job_id: &str,
        to: JobState,
        error: Option<JobError>,
        message: Option<&str>,
    ) -> Result<()> {
        let event = self.store.transition_held(job_id, owner, to, error, message)?;
        self.publish_event(event);
        Ok(())
    }

    fn record(&self, owner: &str, job_id: &str, event: Event) -> Result<()> {
        let event = self.store.record_held(job_id, owner, event)?;
        self.publish_event(event);
        Ok(())
    }

    fn finish(&self, owner: &str, job_id: &str, result: Result<(), JobStop>) {
        let outcome = match result {
            Ok(()) => self.transition(owner, job_id, JobState::Succeeded, None, None).map(|_| "succeeded"),
            Err(JobStop::Cancelled) if self.shutting_down.load(Ordering::Acquire) => {
                // Left RUNNING on purpose: the next start marks it interrupted (own store), or
                // another server takes it over (shared store): at once, as the lease ends now.
                tracing::warn!(job = job_id, "server stopping: job interrupted");
                if self.store.is_shared() {
                    if let Err(error) = self.store.renew_lease(job_id, owner, Duration::ZERO) {
                        tracing::error!(job = job_id, %error, "cannot hand the job back");
                    }
                }
                return;
            }
            Err(JobStop::Cancelled) => self
                .transition(owner, job_id, JobState::Cancelled, None, Some("cancelled; nothing was published"))
                .map(|_| "cancelled"),
            Err(JobStop::Failed { kind, message }) => {
                tracing::warn!(job = job_id, %message, "job failed");
                let error = JobError { code: kind.grpc_code() as i32, message: message.clone() };
                self.transition(owner, job_id, JobState::Failed, Some(error), Some(&message)).map(|_| "failed")
            }
        };
        match outcome {
            Ok(state) => crate::metrics::finetune_job_finished(state),
            Err(error) => tracing::error!(job = job_id, %error, "cannot record the end of the job"),
        }
    }

    fn run_job(&self, owner: &str, claim: Claim, cancel: &AtomicBool) -> Result<(), JobStop> {
        let job = claim.job;
        let id = job.job_id.as_str();
        let mut spec = JobSpec {
            job_id: job.job_id.clone(),
            base_model: job.base_model.clone(),
            base_version: job.base_version,
            output_model: job.output_model.clone(),
            output_version: None,
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
        // Reserved before training, so that jobs publishing to one model at once (here or at
        // another server) never take the same number, and a run taken over keeps it.
        let latest = self.repository.versions(&job.output_model).ok().and_then(|v| v.last().copied());
        let version = self.store.reserve_version(&job.output_model, id, latest)?;
        spec.output_version = Some(version);
        let message = format!(
            "validated: base {} version {}, {} training and {} held-out images; will publish {} version {version}",
            job.base_model,
            prepared.base_version,
            prepared.train.len(),
            prepared.heldout.len(),
            job.output_model,
        );
        self.record(owner, id, Event::Message(message))?;
        if cancel.load(Ordering::Acquire) {
            return Err(JobStop::Cancelled);
        }
        self.transition(owner, id, JobState::Running, None, Some(&format!("training on {owner}")))?;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(self.settings.threads)
            .thread_name(|i| format!("finetune-train {i}"))
            .build()
            .map_err(|e| anyhow!("cannot start the training threads: {e}"))?;
        let mut report = |update: JobUpdate| self.record(owner, id, update_event(update));
        let published =
            pool.install(|| job::train_and_publish(&self.repository, &spec, prepared, cancel, &mut report))?;
        self.store.set_output_version(id, published.version)?;
        let message = format!("published {} version {}; {}", published.name, published.version, published.verdict);
        self.record(owner, id, Event::Message(message))?;
        Ok(())
    }
}

/// A job update as the event the store keeps.
/// `host/pid/random`: unique per server process, and says where a job ran.
fn server_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "server".to_owned());
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}/{}/{}", std::process::id(), &random[..8])
}

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

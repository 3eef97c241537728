//! The fine-tune job store: jobs, their event histories and the uploaded datasets' metadata, in
//! SQLite (one server, the default: `sqlite:PATH`) or PostgreSQL (replicas that share one job
//! queue: `postgres://…`). The rules live here once; [`sqlite`] and [`postgres`] only speak SQL.
//!
//! A job is kept as its encoded protobuf `Job` beside the few columns needed to filter and page
//! (state, creation order, client). Each change to a job is also an encoded `JobEvent`, numbered
//! 1, 2, 3... per job and carrying the job as it stands afterwards, so a client that reconnects to
//! WatchJob asks for the events after the last sequence it saw and misses nothing.
//!
//! Every change is one transaction. A worker holds the job it runs by a lease that it renews
//! ([`JobStore::claim_next`], [`JobStore::renew_lease`]); a job whose lease runs out (its server
//! died) is queued again and claimed by another worker, and the old holder's later writes are
//! refused ([`JobStore::transition_held`], [`JobStore::record_held`]).

mod postgres;
mod sqlite;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use prost::Message;

use crate::proto::v1::{job_event::Event, DatasetInfo, Job, JobError, JobEvent, JobState};
use crate::registry::manifest::now_rfc3339;

/// An uploaded (or server-folder) dataset: where its file lies and what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetRecord {
    /// A uuid v4 in simple form (32 hex digits).
    pub id: String,
    pub name: String,
    /// Number of images.
    pub size: u64,
    pub class_counts: BTreeMap<String, u64>,
    /// SHA-256 over the whole dataset file, lower-case hex.
    pub sha256: String,
    pub path: PathBuf,
    pub created_at: String,
}

impl DatasetRecord {
    /// The record as the gRPC API shows it (the server-side path stays private).
    pub fn to_proto(&self) -> DatasetInfo {
        DatasetInfo {
            dataset_id: self.id.clone(),
            name: self.name.clone(),
            size: self.size,
            class_counts: self.class_counts.iter().map(|(class, n)| (class.clone(), *n)).collect(),
            sha256: self.sha256.clone(),
            created_at: self.created_at.clone(),
        }
    }
}

/// Where the job store lives: `--job-store sqlite:PATH` or `--job-store postgres://…`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    Sqlite(PathBuf),
    /// A `postgres://` or `postgresql://` connection URL.
    Postgres(String),
}

impl std::str::FromStr for StoreLocation {
    type Err = anyhow::Error;

    fn from_str(text: &str) -> Result<Self> {
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            return Ok(Self::Postgres(text.to_owned()));
        }
        match text.strip_prefix("sqlite:") {
            Some(path) if !path.is_empty() => Ok(Self::Sqlite(PathBuf::from(path))),
            _ => bail!("the job store is sqlite:PATH or postgres://USER:PASSWORD@HOST:PORT/DATABASE, not {text:?}"),
        }
    }
}

/// Default and largest page of `list_jobs`.
const DEFAULT_PAGE_SIZE: usize = 50;
const MAX_PAGE_SIZE: usize = 500;

/// The states a client's job counts against its limits in.
const ACTIVE_STATES: [JobState; 3] = [JobState::Queued, JobState::Validating, JobState::Running];

/// The states a worker holds a job in, by its lease.
const HELD_STATES: [JobState; 2] = [JobState::Validating, JobState::Running];

/// A job claimed by a worker: the job (VALIDATING), the events the claim recorded, and the worker
/// whose lease had run out when the job was taken from it.
#[derive(Debug)]
pub struct Claim {
    pub job: Job,
    pub events: Vec<JobEvent>,
    pub taken_from: Option<String>,
}

/// What a worker learns when it renews its lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lease {
    /// Still the worker's; `cancel_requested` when a client asked (possibly at another server).
    Held { cancel_requested: bool },
    /// Taken by another worker after it ran out, or the job ended: stop without writing.
    Lost,
}

/// What a cancel request did.
#[derive(Debug)]
pub enum CancelOutcome {
    /// The job had not been claimed: it is CANCELLED now (the event that says so).
    Cancelled(JobEvent),
    /// A worker holds it: asked to stop at its next step; the job as it stands.
    Requested(Job),
    /// Already SUCCEEDED, FAILED or CANCELLED.
    Finished(JobState),
    NotFound,
}

/// The job store, over either database.
pub struct JobStore {
    db: Database,
}

enum Database {
    Sqlite(sqlite::SqliteDb),
    Postgres(Box<postgres::PostgresDb>),
}

/// What the rules need of a database, inside one transaction.
trait Tx {
    fn insert_dataset(&mut self, row: &DatasetRow) -> Result<bool>;
    fn dataset(&mut self, id: &str) -> Result<Option<DatasetRow>>;
    fn insert_job(&mut self, job_id: &str, client: &str, state: i32, blob: &[u8]) -> Result<bool>;
    /// The job, locked against concurrent changes until the transaction ends.
    fn load_job(&mut self, job_id: &str) -> Result<Option<StoredJob>>;
    /// The encoded job, without a lock (reads: GetJob, WatchJob's polls).
    fn read_job(&mut self, job_id: &str) -> Result<Option<Vec<u8>>>;
    fn save_job(&mut self, job_id: &str, state: i32, last_sequence: i64, blob: &[u8]) -> Result<()>;
    fn insert_event(&mut self, job_id: &str, sequence: i64, blob: &[u8]) -> Result<()>;
    fn events_after(&mut self, job_id: &str, after: i64) -> Result<Vec<(i64, Vec<u8>)>>;
    fn list_jobs(&mut self, before: i64, state: Option<i32>, limit: i64) -> Result<Vec<JobRow>>;
    fn jobs_in_states(&mut self, states: &[i32]) -> Result<Vec<JobRow>>;
    fn count_jobs_of_client(&mut self, client: &str, states: &[i32]) -> Result<i64>;
    /// The oldest job in state `queued`, or in one of `held` whose lease ran out, skipping rows
    /// another transaction is claiming; locked until the transaction ends.
    fn oldest_claimable(&mut self, queued: i32, held: &[i32]) -> Result<Option<String>>;
    /// Gives the job to `owner` until `length` from now by the database's clock, or (None) to no one.
    fn set_lease(&mut self, job_id: &str, lease: Option<(&str, Duration)>) -> Result<()>;
    fn request_cancel(&mut self, job_id: &str) -> Result<()>;
    fn reserved_version(&mut self, job_id: &str) -> Result<Option<i64>>;
    /// The highest version of `model` reserved so far; other reservations of the model wait
    /// until this transaction ends.
    fn latest_reserved_version(&mut self, model: &str) -> Result<Option<i64>>;
    fn reserve_version(&mut self, model: &str, version: i64, job_id: &str) -> Result<()>;
}

/// A dataset row as stored.
struct DatasetRow {
    id: String,
    name: String,
    size: i64,
    class_counts: String,
    sha256: String,
    path: String,
    created_at: String,
}

/// A job row with its lease.
struct StoredJob {
    blob: Vec<u8>,
    last_sequence: i64,
    lease_owner: Option<String>,
    cancel_requested: bool,
}

struct JobRow {
    creation_order: i64,
    job_id: String,
    blob: Vec<u8>,
}

/// A job loaded for a change.
struct Loaded {
    job: Job,
    last_sequence: u64,
    lease_owner: Option<String>,
    cancel_requested: bool,
}

impl JobStore {
    /// Opens or creates the SQLite database at `path` (parent folders created), runs the schema
    /// migrations.
    pub fn open(path: &Path) -> Result<Self> {
        Ok(Self { db: Database::Sqlite(sqlite::SqliteDb::open(path)?) })
    }

    /// Opens the store at `location`, creating or migrating its schema.
    pub fn connect(location: &StoreLocation) -> Result<Self> {
        match location {
            StoreLocation::Sqlite(path) => Self::open(path),
            StoreLocation::Postgres(url) => {
                Ok(Self { db: Database::Postgres(Box::new(postgres::PostgresDb::connect(url)?)) })
            }
        }
    }

    /// Whether other servers may share this store (PostgreSQL): then a job another server left
    /// VALIDATING or RUNNING may still be running there, and only its lease says otherwise.
    pub fn is_shared(&self) -> bool {
        matches!(self.db, Database::Postgres(_))
    }

    /// The database, for messages (a PostgreSQL URL without its password).
    pub fn describe(&self) -> String {
        match &self.db {
            Database::Sqlite(db) => db.describe(),
            Database::Postgres(db) => db.describe(),
        }
    }

    fn write<T: Send>(&self, change: impl FnOnce(&mut dyn Tx) -> Result<T> + Send) -> Result<T> {
        match &self.db {
            Database::Sqlite(db) => db.write(change),
            Database::Postgres(db) => db.write(change),
        }
    }

    pub fn insert_dataset(&self, record: &DatasetRecord) -> Result<()> {
        let path = record
            .path
            .to_str()
            .with_context(|| format!("dataset {}: its path {} is not UTF-8", record.id, record.path.display()))?;
        let row = DatasetRow {
            id: record.id.clone(),
            name: record.name.clone(),
            size: i64::try_from(record.size)
                .with_context(|| format!("dataset {}: size {} does not fit the database", record.id, record.size))?,
            class_counts: serde_json::to_string(&record.class_counts)?,
            sha256: record.sha256.clone(),
            path: path.to_owned(),
            created_at: record.created_at.clone(),
        };
        self.write(|tx| {
            if !tx.insert_dataset(&row)? {
                bail!("dataset {} already exists", record.id);
            }
            Ok(())
        })
        .with_context(|| format!("storing dataset {} in {}", record.id, self.describe()))
    }

    pub fn dataset(&self, id: &str) -> Result<Option<DatasetRecord>> {
        let row = self
            .write(|tx| tx.dataset(id))
            .with_context(|| format!("reading dataset {id} from {}", self.describe()))?;
        let Some(row) = row else { return Ok(None) };
        Ok(Some(DatasetRecord {
            id: id.to_owned(),
            name: row.name,
            size: u64::try_from(row.size).with_context(|| format!("dataset {id} has a negative size {}", row.size))?,
            class_counts: serde_json::from_str(&row.class_counts)
                .with_context(|| format!("dataset {id}: class counts {:?} are not a JSON object", row.class_counts))?,
            sha256: row.sha256,
            path: PathBuf::from(row.path),
            created_at: row.created_at,
        }))
    }

    /// Stores a new job exactly as given (caller sets job_id, created_at, state QUEUED, etc.) for `client`
    /// (an opaque client identity string, may be empty), plus its first event (Event::State(QUEUED)); returns that event.
    pub fn create_job(&self, job: &Job, client: &str) -> Result<JobEvent> {
        let job_id = &job.job_id;
        if job_id.is_empty() {
            bail!("a new job needs a job_id");
        }
        if job.state != JobState::Queued as i32 {
            bail!("job {job_id} is created {}; a new job must be QUEUED", state_name(job.state));
        }
        self.write(|tx| {
            if !tx.insert_job(job_id, client, job.state, &job.encode_to_vec())? {
                bail!("job {job_id} already exists");
            }
            append_event(tx, job, 0, Event::State(JobState::Queued as i32), now_rfc3339())
        })
        .with_context(|| format!("creating job {job_id} in {}", self.describe()))
    }

    pub fn job(&self, job_id: &str) -> Result<Option<Job>> {
        self.write(|tx| tx.read_job(job_id)?.map(|blob| decode_job(job_id, &blob)).transpose())
            .with_context(|| format!("reading job {job_id} from {}", self.describe()))
    }

    /// Moves a job to `to`, checking the transition; sets started_at when entering VALIDATING the first time,
    /// finished_at on a terminal state, progress = 1.0 on SUCCEEDED, `error` and `message` when given (message
    /// replaces job.message). Records an Event::State(to) event. Returns the event (with `job` = the updated job).
    ///
    /// Allowed: QUEUED -> VALIDATING | FAILED | CANCELLED; VALIDATING -> RUNNING | FAILED | CANCELLED | QUEUED
    /// (the crash-recovery re-queue); RUNNING -> SUCCEEDED | FAILED | CANCELLED.
    pub fn transition(
        &self,
        job_id: &str,
        to: JobState,
        error: Option<JobError>,
        message: Option<&str>,
    ) -> Result<JobEvent> {
        self.change_state(job_id, None, to, error, message)
    }

    /// [`Self::transition`] by the worker `owner`, refused unless it still holds the job's lease;
    /// a terminal state releases the lease.
    pub fn transition_held(
        &self,
        job_id: &str,
        owner: &str,
        to: JobState,
        error: Option<JobError>,
        message: Option<&str>,
    ) -> Result<JobEvent> {
        self.change_state(job_id, Some(owner), to, error, message)
    }

    fn change_state(
        &self,
        job_id: &str,
        owner: Option<&str>,
        to: JobState,
        error: Option<JobError>,
        message: Option<&str>,
    ) -> Result<JobEvent> {
        self.write(|tx| {
            let loaded = require_job(tx, job_id)?;
            if let Some(owner) = owner {
                check_holder(job_id, &loaded, owner)?;
            }
            let from = job_state(&loaded.job)?;
            if !transition_allowed(from, to) {
                bail!("job {job_id} is {}; it cannot become {}", state_name(from as i32), state_name(to as i32));
            }
            apply_state(tx, loaded, to, error, message)
        })
        .with_context(|| format!("moving job {job_id} to {} in {}", state_name(to as i32), self.describe()))
    }

    /// Records a non-state event and applies it to the job: Epoch -> push onto job.epochs; Progress -> job.progress;
    /// Before/After -> job.before/job.after; Message -> job.message. An Event::State here is an error (use transition).
    /// Refused once the job is in a terminal state.
    pub fn record(&self, job_id: &str, event: Event) -> Result<JobEvent> {
        self.record_event(job_id, None, event)
    }

    /// [`Self::record`] by the worker `owner`, refused unless it still holds the job's lease.
    pub fn record_held(&self, job_id: &str, owner: &str, event: Event) -> Result<JobEvent> {
        self.record_event(job_id, Some(owner), event)
    }

    fn record_event(&self, job_id: &str, owner: Option<&str>, event: Event) -> Result<JobEvent> {
        match &event {
            Event::State(state) => {
                bail!("job {job_id}: the state change to {} goes through transition, not record", state_name(*state))
            }
            Event::Progress(p) if !(0.0..=1.0).contains(p) => bail!("job {job_id}: progress {p} is outside 0..1"),
            _ => {}
        }
        self.write(|tx| {
            let loaded = require_job(tx, job_id)?;
            if let Some(owner) = owner {
                check_holder(job_id, &loaded, owner)?;
            }
            let Loaded { mut job, last_sequence, .. } = loaded;
            let state = job_state(&job)?;
            if state.is_terminal() {
                bail!("job {job_id} is {}; it records no more events", state_name(state as i32));
            }
            match &event {
                Event::State(_) => unreachable!("refused above"),
                Event::Epoch(metrics) => job.epochs.push(*metrics),
                Event::Progress(p) => job.progress = *p,
                Event::Before(evaluation) => job.before = Some(*evaluation),
                Event::After(evaluation) => job.after = Some(*evaluation),
                Event::Message(message) => job.message.clone_from(message),
            }
            append_event(tx, &job, last_sequence, event, now_rfc3339())
        })
        .with_context(|| format!("recording an event of job {job_id} in {}", self.describe()))
    }

    /// Sets job.output_version (after a publish). No event: the next state event carries it.
    pub fn set_output_version(&self, job_id: &str, version: u64) -> Result<Job> {
        self.write(|tx| {
            let Loaded { mut job, last_sequence, .. } = require_job(tx, job_id)?;
            job.output_version = version;
            tx.save_job(job_id, job.state, last_sequence as i64, &job.encode_to_vec())?;
            Ok(job)
        })
        .with_context(|| format!("setting the output version {version} of job {job_id} in {}", self.describe()))
    }

    /// Events with sequence > after_sequence, in order (sequence numbers are 1, 2, 3... per job).
    /// An unknown job is an error.
    pub fn events(&self, job_id: &str, after_sequence: u64) -> Result<Vec<JobEvent>> {
        self.write(|tx| {
            tx.read_job(job_id)?.with_context(|| format!("there is no job {job_id}"))?;
            // Sequences are stored as i64; anything past i64::MAX has no events after it.
            let Ok(after) = i64::try_from(after_sequence) else { return Ok(Vec::new()) };
            tx.events_after(job_id, after)?
                .into_iter()
                .map(|(sequence, blob)| {
                    JobEvent::decode(blob.as_slice()).with_context(|| format!("decoding event {sequence}"))
                })
                .collect()
        })
        .with_context(|| format!("reading the events of job {job_id} from {}", self.describe()))
    }

    /// Newest first; `state` None (or UNSPECIFIED) = all; `page_token` "" = first page; returns
    /// (jobs, next_page_token or "" at the end). page_size 0 means 50, capped at 500. A malformed token
    /// is an error naming it.
    ///
    /// The token is the creation order of the last job returned, so pages neither repeat nor skip
    /// jobs while new jobs arrive.
    pub fn list_jobs(&self, state: Option<JobState>, page_size: usize, page_token: &str) -> Result<(Vec<Job>, String)> {
        let limit = match page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        let before = if page_token.is_empty() {
            i64::MAX
        } else {
            match page_token.parse::<i64>() {
                Ok(order) if order > 0 && page_token.bytes().all(|b| b.is_ascii_digit()) => order,
                _ => bail!("page token {page_token:?} is malformed: it is not one this server issued"),
            }
        };
        let state = state.filter(|s| *s != JobState::Unspecified).map(|s| s as i32);
        let mut rows = self
            .write(|tx| tx.list_jobs(before, state, (limit + 1) as i64))
            .with_context(|| format!("listing jobs in {}", self.describe()))?;
        let next_page_token = if rows.len() > limit {
            rows.truncate(limit);
            rows.last().map(|row| row.creation_order.to_string()).unwrap_or_default()
        } else {
            String::new()
        };
        let jobs = rows.iter().map(|row| decode_job(&row.job_id, &row.blob)).collect::<Result<_>>()?;
        Ok((jobs, next_page_token))
    }

    /// Jobs currently in any of `states`, oldest first (crash recovery).
    pub fn jobs_in_states(&self, states: &[JobState]) -> Result<Vec<Job>> {
        if states.is_empty() {
            return Ok(Vec::new());
        }
        let states: Vec<i32> = states.iter().map(|s| *s as i32).collect();
        let rows = self
            .write(|tx| tx.jobs_in_states(&states))
            .with_context(|| format!("reading the jobs in states {states:?} from {}", self.describe()))?;
        rows.iter().map(|row| decode_job(&row.job_id, &row.blob)).collect()
    }

    /// Jobs of `client` that are QUEUED, VALIDATING or RUNNING (per-client limits).
    pub fn active_jobs_of_client(&self, client: &str) -> Result<usize> {
        let states = ACTIVE_STATES.map(|s| s as i32);
        let count = self
            .write(|tx| tx.count_jobs_of_client(client, &states))
            .with_context(|| format!("counting the active jobs of client {client:?} in {}", self.describe()))?;
        Ok(count as usize)
    }

    /// Claims the oldest QUEUED job for the worker `owner` for `lease`, or else the oldest job
    /// whose holder's lease ran out (that job goes back to QUEUED first, saying whose lease ran
    /// out), and moves it to VALIDATING. None when there is nothing to claim. Two workers never
    /// claim the same job: the claim is one transaction that locks the job's row.
    pub fn claim_next(&self, owner: &str, lease: Duration) -> Result<Option<Claim>> {
        let held = HELD_STATES.map(|s| s as i32);
        self.write(|tx| {
            let Some(job_id) = tx.oldest_claimable(JobState::Queued as i32, &held)? else { return Ok(None) };
            let mut loaded = require_job(tx, &job_id)?;
            let mut events = Vec::new();
            let mut taken_from = None;
            if job_state(&loaded.job)? != JobState::Queued {
                let previous = loaded.lease_owner.clone().unwrap_or_else(|| "an unknown worker".to_owned());
                let message = format!("queued again: {previous} stopped renewing its lease");
                let event = apply_state(tx, loaded, JobState::Queued, None, Some(&message))?;
                loaded = require_job(tx, &job_id)?;
                events.push(event);
                taken_from = Some(previous);
            }
            let message = format!("validating the dataset and the base model on {owner}");
            let event = apply_state(tx, loaded, JobState::Validating, None, Some(&message))?;
            tx.set_lease(&job_id, Some((owner, lease)))?;
            let job = event.job.clone().unwrap_or_default();
            events.push(event);
            Ok(Some(Claim { job, events, taken_from }))
        })
        .with_context(|| format!("claiming a job for {owner} in {}", self.describe()))
    }

    /// Extends `owner`'s lease on a job by `lease` from now, and says whether a client asked to
    /// cancel it; [`Lease::Lost`] once another worker holds it or it ended.
    pub fn renew_lease(&self, job_id: &str, owner: &str, lease: Duration) -> Result<Lease> {
        self.write(|tx| {
            let loaded = require_job(tx, job_id)?;
            if loaded.lease_owner.as_deref() != Some(owner) || job_state(&loaded.job)?.is_terminal() {
                return Ok(Lease::Lost);
            }
            tx.set_lease(job_id, Some((owner, lease)))?;
            Ok(Lease::Held { cancel_requested: loaded.cancel_requested })
        })
        .with_context(|| format!("renewing the lease of {owner} on job {job_id} in {}", self.describe()))
    }

    /// The output version the job publishes: the one it reserved before (a run taken over
    /// publishes the same number), else the next after both every reservation of `model` and
    /// `latest_published` (the repository's newest). Two jobs never get the same version; a
    /// job that fails leaves its number unused.
    pub fn reserve_version(&self, model: &str, job_id: &str, latest_published: Option<u64>) -> Result<u64> {
        self.write(|tx| {
            if let Some(version) = tx.reserved_version(job_id)? {
                return Ok(version as u64);
            }
            let reserved = tx.latest_reserved_version(model)?.unwrap_or(0) as u64;
            let version = reserved.max(latest_published.unwrap_or(0)) + 1;
            tx.reserve_version(model, version as i64, job_id)?;
            Ok(version)
        })
        .with_context(|| format!("reserving a version of {model} for job {job_id} in {}", self.describe()))
    }

    /// Cancels a QUEUED job at once; asks the worker that holds a VALIDATING or RUNNING one to stop.
    pub fn cancel(&self, job_id: &str) -> Result<CancelOutcome> {
        self.write(|tx| {
            let Some(loaded) = load_job(tx, job_id)? else { return Ok(CancelOutcome::NotFound) };
            match job_state(&loaded.job)? {
                JobState::Queued => {
                    let event = apply_state(tx, loaded, JobState::Cancelled, None, Some("cancelled before it ran"))?;
                    Ok(CancelOutcome::Cancelled(event))
                }
                state if state.is_terminal() => Ok(CancelOutcome::Finished(state)),
                _ => {
                    tx.request_cancel(job_id)?;
                    Ok(CancelOutcome::Requested(loaded.job))
                }
            }
        })
        .with_context(|| format!("cancelling job {job_id} in {}", self.describe()))
    }
}

fn load_job(tx: &mut dyn Tx, job_id: &str) -> Result<Option<Loaded>> {
    let Some(stored) = tx.load_job(job_id)? else { return Ok(None) };
    Ok(Some(Loaded {
        job: decode_job(job_id, &stored.blob)?,
        last_sequence: stored.last_sequence as u64,
        lease_owner: stored.lease_owner,
        cancel_requested: stored.cancel_requested,
    }))
}

fn require_job(tx: &mut dyn Tx, job_id: &str) -> Result<Loaded> {
    load_job(tx, job_id)?.with_context(|| format!("there is no job {job_id}"))
}

/// Refuses a write by a worker that no longer holds the job.
fn check_holder(job_id: &str, loaded: &Loaded, owner: &str) -> Result<()> {
    match loaded.lease_owner.as_deref() {
        Some(holder) if holder == owner => Ok(()),
        Some(holder) => bail!("job {job_id} is held by {holder} now, not by {owner}: its lease ran out"),
        None => bail!("job {job_id} is held by no worker; {owner} lost it"),
    }
}

/// Sets the job's state (no check: the callers do), with the timestamps, error and message
/// that go with it; a terminal state releases the lease.
fn apply_state(
    tx: &mut dyn Tx,
    loaded: Loaded,
    to: JobState,
    error: Option<JobError>,
    message: Option<&str>,
) -> Result<JobEvent> {
    let Loaded { mut job, last_sequence, .. } = loaded;
    let now = now_rfc3339();
    job.set_state(to);
    if to == JobState::Validating && job.started_at.is_empty() {
        job.started_at = now.clone();
    }
    if to.is_terminal() {
        job.finished_at = now.clone();
        tx.set_lease(&job.job_id, None)?;
    }
    if to == JobState::Succeeded {
        job.progress = 1.0;
    }
    if let Some(error) = error {
        job.error = Some(error);
    }
    if let Some(message) = message {
        job.message = message.to_owned();
    }
    append_event(tx, &job, last_sequence, Event::State(to as i32), now)
}

fn decode_job(job_id: &str, blob: &[u8]) -> Result<Job> {
    Job::decode(blob).with_context(|| format!("decoding the stored job {job_id}"))
}

/// Stores `event` as the job's next one and the job as it stands after it.
fn append_event(tx: &mut dyn Tx, job: &Job, last_sequence: u64, event: Event, time: String) -> Result<JobEvent> {
    let sequence = last_sequence + 1;
    let job_event = JobEvent { sequence, time, event: Some(event), job: Some(job.clone()) };
    tx.insert_event(&job.job_id, sequence as i64, &job_event.encode_to_vec())?;
    tx.save_job(&job.job_id, job.state, sequence as i64, &job.encode_to_vec())?;
    Ok(job_event)
}

fn job_state(job: &Job) -> Result<JobState> {
    JobState::try_from(job.state).with_context(|| format!("job {} has an unknown state {}", job.job_id, job.state))
}

fn transition_allowed(from: JobState, to: JobState) -> bool {
    use JobState::*;
    matches!(
        (from, to),
        (Queued, Validating | Failed | Cancelled)
            | (Validating, Running | Failed | Cancelled | Queued)
            | (Running, Succeeded | Failed | Cancelled)
    )
}

/// "SUCCEEDED" for JOB_STATE_SUCCEEDED: how people say it.
fn state_name(state: i32) -> String {
    match JobState::try_from(state) {
        Ok(state) => state.as_str_name().trim_start_matches("JOB_STATE_").to_owned(),
        Err(_) => format!("unknown state {state}"),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::proto::v1::{EpochMetrics, Evaluation};

    fn queued_job(id: &str) -> Job {
        let mut job = Job {
            job_id: id.to_owned(),
            base_model: "tiny".to_owned(),
            base_version: 1,
            output_model: "tiny".to_owned(),
            dataset_id: "d1".to_owned(),
            created_at: now_rfc3339(),
            ..Default::default()
        };
        job.set_state(JobState::Queued);
        job
    }

    /// A fresh database of each kind: SQLite in a temporary folder (nested, to check that its
    /// folders are made) and, when `CONTRASTIVE_TEST_POSTGRES` names a PostgreSQL database, a
    /// schema of its own there (skipped with a message otherwise).
    fn test_databases() -> Vec<(StoreLocation, Option<tempfile::TempDir>)> {
        let dir = tempfile::tempdir().unwrap();
        let sqlite = StoreLocation::Sqlite(dir.path().join("nested/folder/jobs.sqlite"));
        let mut databases = vec![(sqlite, Some(dir))];
        match test_postgres_schema() {
            Some(url) => databases.push((StoreLocation::Postgres(url), None)),
            None => eprintln!("CONTRASTIVE_TEST_POSTGRES is not set: the PostgreSQL job store is not tested"),
        }
        databases
    }

    /// A URL for a new, empty schema of the test database.
    fn test_postgres_schema() -> Option<String> {
        let url = std::env::var("CONTRASTIVE_TEST_POSTGRES").ok().filter(|url| !url.is_empty())?;
        let schema = format!("test_{}", uuid::Uuid::new_v4().simple());
        std::thread::spawn({
            let (url, schema) = (url.clone(), schema.clone());
            move || {
                let mut client =
                    ::postgres::Client::connect(&url, ::postgres::NoTls).expect("connect to the test database");
                client.batch_execute(&format!("CREATE SCHEMA {schema}")).expect("create a test schema");
            }
        })
        .join()
        .unwrap();
        let separator = if url.contains('?') { '&' } else { '?' };
        Some(format!("{url}{separator}options=-csearch_path%3D{schema}"))
    }

    fn state_of(event: &JobEvent) -> Option<JobState> {
        match event.event {
            Some(Event::State(s)) => JobState::try_from(s).ok(),
            _ => None,
        }
    }

    #[test]
    fn store_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<JobStore>();
    }

    #[test]
    fn lifecycle_is_recorded_in_order_and_survives_reopening() {
        for (location, _dir) in test_databases() {
            lifecycle_is_recorded_in_order_and_survives_reopening_in(&location);
        }
    }

    fn lifecycle_is_recorded_in_order_and_survives_reopening_in(location: &StoreLocation) {
        {
            let store = JobStore::connect(location).unwrap();
            let first = store.create_job(&queued_job("j1"), "alice").unwrap();
            assert_eq!(first.sequence, 1);
            assert_eq!(state_of(&first), Some(JobState::Queued));
            assert_eq!(first.job.as_ref().unwrap().job_id, "j1");

            let validating = store.transition("j1", JobState::Validating, None, None).unwrap();
            let started = validating.job.as_ref().unwrap().started_at.clone();
            assert!(!started.is_empty());
            store.transition("j1", JobState::Running, None, Some("training")).unwrap();
            store.record("j1", Event::Epoch(EpochMetrics { epoch: 1, train_loss: 2.5 })).unwrap();
            store.record("j1", Event::Progress(0.5)).unwrap();
            store.record("j1", Event::Epoch(EpochMetrics { epoch: 2, train_loss: 1.25 })).unwrap();
            store
                .record(
                    "j1",
                    Event::Before(Evaluation { knn_accuracy: 0.5, linear_probe_accuracy: 0.25, ..Default::default() }),
                )
                .unwrap();
            store
                .record(
                    "j1",
                    Event::After(Evaluation { knn_accuracy: 0.75, linear_probe_accuracy: 0.5, ..Default::default() }),
                )
                .unwrap();
            store.record("j1", Event::Message("better".to_owned())).unwrap();
            let job = store.set_output_version("j1", 7).unwrap();
            assert_eq!(job.output_version, 7);
            let last = store.transition("j1", JobState::Succeeded, None, None).unwrap();
            assert_eq!(last.sequence, 10);
            let job = last.job.unwrap();
            assert_eq!(job.state(), JobState::Succeeded);
            assert_eq!(job.progress, 1.0);
            assert_eq!(job.started_at, started);
            assert!(!job.finished_at.is_empty());
            assert_eq!(job.output_version, 7);
        }

        let store = JobStore::connect(location).unwrap();
        let job = store.job("j1").unwrap().unwrap();
        assert_eq!(job.state(), JobState::Succeeded);
        assert_eq!(
            job.epochs,
            vec![EpochMetrics { epoch: 1, train_loss: 2.5 }, EpochMetrics { epoch: 2, train_loss: 1.25 }]
        );
        assert_eq!(
            job.before,
            Some(Evaluation { knn_accuracy: 0.5, linear_probe_accuracy: 0.25, ..Default::default() })
        );
        assert_eq!(
            job.after,
            Some(Evaluation { knn_accuracy: 0.75, linear_probe_accuracy: 0.5, ..Default::default() })
        );
        assert_eq!(job.message, "better");
        assert_eq!(job.output_version, 7);

        let events = store.events("j1", 0).unwrap();
        assert_eq!(events.iter().map(|e| e.sequence).collect::<Vec<_>>(), (1..=10).collect::<Vec<u64>>());
        let states: Vec<_> = events.iter().filter_map(state_of).collect();
        assert_eq!(states, [JobState::Queued, JobState::Validating, JobState::Running, JobState::Succeeded]);
        // Each event carries the job as it stood right after it.
        assert_eq!(events[2].job.as_ref().unwrap().message, "training");
        assert_eq!(events[3].job.as_ref().unwrap().epochs.len(), 1);
        assert_eq!(events[4].event, Some(Event::Progress(0.5)));
        assert_eq!(events[4].job.as_ref().unwrap().progress, 0.5);
        assert_eq!(events[5].job.as_ref().unwrap().epochs.len(), 2);
        assert_eq!(events[9].job.as_ref().unwrap(), &job);

        let tail = store.events("j1", 8).unwrap();
        assert_eq!(tail.iter().map(|e| e.sequence).collect::<Vec<_>>(), vec![9, 10]);
        assert!(store.events("j1", 10).unwrap().is_empty());
        assert!(store.events("j1", u64::MAX).unwrap().is_empty());
        assert!(store.events("nope", 0).unwrap_err().to_string().contains("nope"));
        assert!(store.job("nope").unwrap().is_none());
    }

    #[test]
    fn failure_sets_error_and_message() {
        for (location, _dir) in test_databases() {
            failure_sets_error_and_message_in(&JobStore::connect(&location).unwrap());
        }
    }

    fn failure_sets_error_and_message_in(store: &JobStore) {
        store.create_job(&queued_job("j"), "").unwrap();
        let error = JobError { code: 3, message: "image 4 is not a PNG".to_owned() };
        let event = store.transition("j", JobState::Failed, Some(error.clone()), Some("validation failed")).unwrap();
        let job = event.job.unwrap();
        assert_eq!(job.error, Some(error));
        assert_eq!(job.message, "validation failed");
        assert!(!job.finished_at.is_empty());
        assert!(job.started_at.is_empty());
        assert_ne!(job.progress, 1.0);
    }

    #[test]
    fn illegal_transitions_and_events_are_refused() {
        for (location, _dir) in test_databases() {
            illegal_transitions_and_events_are_refused_in(&JobStore::connect(&location).unwrap());
        }
    }

    fn illegal_transitions_and_events_are_refused_in(store: &JobStore) {
        store.create_job(&queued_job("j1"), "c").unwrap();

        let err = store.transition("j1", JobState::Running, None, None).unwrap_err();
        assert!(format!("{err:#}").contains("job j1 is QUEUED; it cannot become RUNNING"), "{err:#}");
        let err = store.transition("j1", JobState::Succeeded, None, None).unwrap_err();
        assert!(format!("{err:#}").contains("job j1 is QUEUED; it cannot become SUCCEEDED"), "{err:#}");

        // Crash recovery: VALIDATING goes back to QUEUED, and started_at keeps the first start.
        let started = store.transition("j1", JobState::Validating, None, None).unwrap().job.unwrap().started_at;
        store.transition("j1", JobState::Queued, None, None).unwrap();
        let again = store.transition("j1", JobState::Validating, None, None).unwrap().job.unwrap();
        assert_eq!(again.started_at, started);
        store.transition("j1", JobState::Running, None, None).unwrap();
        let err = store.transition("j1", JobState::Queued, None, None).unwrap_err();
        assert!(format!("{err:#}").contains("job j1 is RUNNING; it cannot become QUEUED"), "{err:#}");
        store.transition("j1", JobState::Succeeded, None, None).unwrap();

        let err = store.transition("j1", JobState::Running, None, None).unwrap_err();
        assert!(format!("{err:#}").contains("job j1 is SUCCEEDED; it cannot become RUNNING"), "{err:#}");
        let err = store.transition("j1", JobState::Cancelled, None, None).unwrap_err();
        assert!(format!("{err:#}").contains("job j1 is SUCCEEDED; it cannot become CANCELLED"), "{err:#}");
        let err = store.record("j1", Event::Progress(0.5)).unwrap_err();
        assert!(format!("{err:#}").contains("job j1 is SUCCEEDED"), "{err:#}");

        store.create_job(&queued_job("j2"), "c").unwrap();
        let err = store.record("j2", Event::State(JobState::Running as i32)).unwrap_err();
        assert!(format!("{err:#}").contains("transition"), "{err:#}");
        let err = store.record("j2", Event::Progress(1.5)).unwrap_err();
        assert!(format!("{err:#}").contains("progress 1.5"), "{err:#}");
        let err = store.create_job(&queued_job("j2"), "c").unwrap_err();
        assert!(format!("{err:#}").contains("job j2 already exists"), "{err:#}");
        let mut running = queued_job("j3");
        running.set_state(JobState::Running);
        assert!(store.create_job(&running, "c").is_err());
        let err = store.transition("missing", JobState::Validating, None, None).unwrap_err();
        assert!(format!("{err:#}").contains("there is no job missing"), "{err:#}");

        // The refused calls changed nothing: j1 has its 6 events, j2 its first one.
        assert_eq!(store.events("j1", 0).unwrap().len(), 6);
        assert_eq!(store.events("j2", 0).unwrap().len(), 1);
        assert!(store.job("j3").unwrap().is_none());
    }

    #[test]
    fn list_pages_newest_first_and_filters_by_state() {
        for (location, _dir) in test_databases() {
            list_pages_newest_first_and_filters_by_state_in(&JobStore::connect(&location).unwrap());
        }
    }

    fn list_pages_newest_first_and_filters_by_state_in(store: &JobStore) {
        for i in 1..=7 {
            store.create_job(&queued_job(&format!("j{i}")), if i % 2 == 0 { "even" } else { "odd" }).unwrap();
        }
        for id in ["j2", "j5"] {
            store.transition(id, JobState::Validating, None, None).unwrap();
        }
        store.transition("j5", JobState::Running, None, None).unwrap();
        store.transition("j3", JobState::Cancelled, None, None).unwrap();

        let mut pages = Vec::new();
        let mut token = String::new();
        loop {
            let (jobs, next) = store.list_jobs(None, 3, &token).unwrap();
            pages.push(jobs.iter().map(|j| j.job_id.clone()).collect::<Vec<_>>());
            if next.is_empty() {
                break;
            }
            token = next;
        }
        assert_eq!(pages, vec![vec!["j7", "j6", "j5"], vec!["j4", "j3", "j2"], vec!["j1"]]);

        // Exactly a page full: no empty trailing page.
        let (jobs, next) = store.list_jobs(None, 7, "").unwrap();
        assert_eq!(jobs.len(), 7);
        assert_eq!(next, "");
        let (jobs, _) = store.list_jobs(None, 0, "").unwrap();
        assert_eq!(jobs.len(), 7);

        let ids =
            |state| store.list_jobs(Some(state), 0, "").unwrap().0.into_iter().map(|j| j.job_id).collect::<Vec<_>>();
        assert_eq!(ids(JobState::Queued), vec!["j7", "j6", "j4", "j1"]);
        assert_eq!(ids(JobState::Validating), vec!["j2"]);
        assert_eq!(ids(JobState::Running), vec!["j5"]);
        assert_eq!(ids(JobState::Cancelled), vec!["j3"]);
        assert!(ids(JobState::Succeeded).is_empty());
        assert_eq!(ids(JobState::Unspecified).len(), 7);

        let (first, token) = store.list_jobs(Some(JobState::Queued), 3, "").unwrap();
        assert_eq!(first.iter().map(|j| j.job_id.as_str()).collect::<Vec<_>>(), ["j7", "j6", "j4"]);
        let (second, end) = store.list_jobs(Some(JobState::Queued), 3, &token).unwrap();
        assert_eq!(second.iter().map(|j| j.job_id.as_str()).collect::<Vec<_>>(), ["j1"]);
        assert_eq!(end, "");

        for bad in ["abc", "-3", "0", "+4", " 5"] {
            let err = store.list_jobs(None, 3, bad).unwrap_err();
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }

        let oldest_first = store
            .jobs_in_states(&[JobState::Queued, JobState::Validating])
            .unwrap()
            .into_iter()
            .map(|j| j.job_id)
            .collect::<Vec<_>>();
        assert_eq!(oldest_first, ["j1", "j2", "j4", "j6", "j7"]);
        assert!(store.jobs_in_states(&[]).unwrap().is_empty());

        // even: j2 VALIDATING, j4 j6 QUEUED; odd: j1 j7 QUEUED, j5 RUNNING, j3 CANCELLED.
        assert_eq!(store.active_jobs_of_client("even").unwrap(), 3);
        assert_eq!(store.active_jobs_of_client("odd").unwrap(), 3);
        assert_eq!(store.active_jobs_of_client("nobody").unwrap(), 0);
    }

    #[test]
    fn datasets_round_trip() {
        for (location, _dir) in test_databases() {
            datasets_round_trip_in(&location);
        }
    }

    fn datasets_round_trip_in(location: &StoreLocation) {
        let dir = tempfile::tempdir().unwrap();
        let record = DatasetRecord {
            id: "0123456789abcdef0123456789abcdef".to_owned(),
            name: "cats and dogs".to_owned(),
            size: 5,
            class_counts: BTreeMap::from([("cat".to_owned(), 2), ("dog".to_owned(), 3)]),
            sha256: "ab".repeat(32),
            path: dir.path().join("datasets/0123456789abcdef0123456789abcdef.ds"),
            created_at: "2024-05-06T07:08:09Z".to_owned(),
        };
        {
            let store = JobStore::connect(location).unwrap();
            store.insert_dataset(&record).unwrap();
            let err = store.insert_dataset(&record).unwrap_err();
            assert!(format!("{err:#}").contains("already exists"), "{err:#}");
        }
        let store = JobStore::connect(location).unwrap();
        assert_eq!(store.dataset(&record.id).unwrap(), Some(record.clone()));
        assert_eq!(store.dataset("other").unwrap(), None);

        let info = record.to_proto();
        assert_eq!(info.dataset_id, record.id);
        assert_eq!(info.size, 5);
        assert_eq!(info.class_counts.get("dog"), Some(&3));
        assert_eq!(info.class_counts.len(), 2);
        assert_eq!(info.created_at, "2024-05-06T07:08:09Z");
    }

    /// Claims take the oldest QUEUED job, move it to VALIDATING under the claimer's lease, and
    /// never give one job to two workers.
    #[test]
    fn claims_take_the_oldest_queued_job_once() {
        for (location, _dir) in test_databases() {
            let store = JobStore::connect(&location).unwrap();
            for id in ["j1", "j2"] {
                store.create_job(&queued_job(id), "c").unwrap();
            }
            let lease = Duration::from_secs(60);
            let first = store.claim_next("worker-a", lease).unwrap().unwrap();
            assert_eq!(first.job.job_id, "j1");
            assert_eq!(first.job.state(), JobState::Validating);
            assert_eq!(first.taken_from, None);
            assert_eq!(first.job.message, "validating the dataset and the base model on worker-a");
            assert_eq!(first.events.iter().map(|e| e.sequence).collect::<Vec<_>>(), [2]);
            assert_eq!(store.claim_next("worker-b", lease).unwrap().unwrap().job.job_id, "j2");
            assert!(store.claim_next("worker-c", lease).unwrap().is_none());

            // Only the holder writes; a terminal state ends the lease.
            store.transition_held("j1", "worker-a", JobState::Running, None, None).unwrap();
            let err = store.record_held("j1", "worker-b", Event::Progress(0.5)).unwrap_err();
            assert!(format!("{err:#}").contains("job j1 is held by worker-a now, not by worker-b"), "{err:#}");
            store.record_held("j1", "worker-a", Event::Progress(0.5)).unwrap();
            assert_eq!(store.renew_lease("j1", "worker-a", lease).unwrap(), Lease::Held { cancel_requested: false });
            assert_eq!(store.renew_lease("j1", "worker-b", lease).unwrap(), Lease::Lost);
            store.transition_held("j1", "worker-a", JobState::Succeeded, None, None).unwrap();
            assert_eq!(store.renew_lease("j1", "worker-a", lease).unwrap(), Lease::Lost);
            let err = store.record_held("j1", "worker-a", Event::Progress(0.5)).unwrap_err();
            assert!(format!("{err:#}").contains("held by no worker"), "{err:#}");
        }
    }

    /// A job whose lease runs out is queued again, saying whose lease it was, and claimed by the
    /// next worker; the old holder learns it lost the job and cannot write to it any more.
    #[test]
    fn an_expired_lease_passes_the_job_on() {
        for (location, _dir) in test_databases() {
            let store = JobStore::connect(&location).unwrap();
            store.create_job(&queued_job("j"), "c").unwrap();
            store.claim_next("worker-a", Duration::ZERO).unwrap().unwrap();
            store.transition_held("j", "worker-a", JobState::Running, None, Some("training")).unwrap();
            std::thread::sleep(Duration::from_millis(5));

            let claim = store.claim_next("worker-b", Duration::from_secs(60)).unwrap().unwrap();
            assert_eq!(claim.taken_from.as_deref(), Some("worker-a"));
            assert_eq!(
                claim.events.iter().filter_map(state_of).collect::<Vec<_>>(),
                [JobState::Queued, JobState::Validating]
            );
            assert_eq!(
                claim.events[0].job.as_ref().unwrap().message,
                "queued again: worker-a stopped renewing its lease"
            );
            assert_eq!(claim.job.state(), JobState::Validating);
            assert_eq!(store.renew_lease("j", "worker-a", Duration::from_secs(60)).unwrap(), Lease::Lost);
            let err = store.transition_held("j", "worker-a", JobState::Succeeded, None, None).unwrap_err();
            assert!(format!("{err:#}").contains("held by worker-b now"), "{err:#}");
            // Not expired: nobody else takes it.
            assert!(store.claim_next("worker-c", Duration::from_secs(60)).unwrap().is_none());
            let states: Vec<_> = store.events("j", 0).unwrap().iter().filter_map(state_of).collect();
            use JobState::*;
            assert_eq!(states, [Queued, Validating, Running, Queued, Validating]);
        }
    }

    #[test]
    fn cancel_ends_a_queued_job_and_asks_the_holder_of_a_running_one() {
        for (location, _dir) in test_databases() {
            let store = JobStore::connect(&location).unwrap();
            for id in ["held", "queued"] {
                store.create_job(&queued_job(id), "c").unwrap();
            }
            let lease = Duration::from_secs(60);
            store.claim_next("worker", lease).unwrap().unwrap();
            let CancelOutcome::Cancelled(event) = store.cancel("queued").unwrap() else { panic!("not cancelled") };
            assert_eq!(state_of(&event), Some(JobState::Cancelled));
            assert!(matches!(store.cancel("queued").unwrap(), CancelOutcome::Finished(JobState::Cancelled)));
            assert!(matches!(store.cancel("missing").unwrap(), CancelOutcome::NotFound));

            assert_eq!(store.renew_lease("held", "worker", lease).unwrap(), Lease::Held { cancel_requested: false });
            let CancelOutcome::Requested(job) = store.cancel("held").unwrap() else { panic!("not requested") };
            assert_eq!(job.state(), JobState::Validating);
            assert_eq!(store.renew_lease("held", "worker", lease).unwrap(), Lease::Held { cancel_requested: true });
            store.transition_held("held", "worker", JobState::Cancelled, None, None).unwrap();
            assert!(matches!(store.cancel("held").unwrap(), CancelOutcome::Finished(JobState::Cancelled)));
        }
    }

    /// Four workers, each with its own connection, claim 24 jobs at once: each job exactly once.
    #[test]
    fn concurrent_claims_never_share_a_job() {
        for (location, _dir) in test_databases() {
            let setup = JobStore::connect(&location).unwrap();
            for i in 0..24 {
                setup.create_job(&queued_job(&format!("j{i:02}")), "c").unwrap();
            }
            let claimed: Vec<String> = std::thread::scope(|scope| {
                let workers: Vec<_> = (0..4)
                    .map(|w| {
                        let location = location.clone();
                        scope.spawn(move || {
                            let store = JobStore::connect(&location).unwrap();
                            let mut mine = Vec::new();
                            while let Some(claim) = store.claim_next(&format!("w{w}"), Duration::from_secs(60)).unwrap()
                            {
                                mine.push(claim.job.job_id);
                            }
                            mine
                        })
                    })
                    .collect();
                workers.into_iter().flat_map(|w| w.join().unwrap()).collect()
            });
            let mut sorted = claimed.clone();
            sorted.sort();
            sorted.dedup();
            assert_eq!((claimed.len(), sorted.len()), (24, 24), "{location:?}");
        }
    }

    /// Versions: after the repository's newest and every reservation, one per job, the same
    /// again for a job that asks twice; each model counts on its own. Eight threads reserving
    /// at once get eight different versions.
    #[test]
    fn each_job_reserves_its_own_version() {
        for (location, _dir) in test_databases() {
            let store = JobStore::connect(&location).unwrap();
            assert_eq!(store.reserve_version("m", "j1", Some(3)).unwrap(), 4);
            assert_eq!(store.reserve_version("m", "j2", Some(3)).unwrap(), 5);
            assert_eq!(store.reserve_version("m", "j1", Some(9)).unwrap(), 4, "j1 keeps its version");
            assert_eq!(store.reserve_version("m", "j3", Some(9)).unwrap(), 10, "past a version published since");
            assert_eq!(store.reserve_version("other", "j4", None).unwrap(), 1);

            let versions: BTreeSet<u64> = std::thread::scope(|scope| {
                let workers: Vec<_> = (0..8)
                    .map(|i| {
                        let location = location.clone();
                        scope.spawn(move || {
                            let store = JobStore::connect(&location).unwrap();
                            store.reserve_version("race", &format!("r{i}"), None).unwrap()
                        })
                    })
                    .collect();
                workers.into_iter().map(|w| w.join().unwrap()).collect()
            });
            assert_eq!(versions, (1..=8).collect(), "{location:?}");
        }
    }

    #[test]
    fn store_locations_are_read_from_the_flag() {
        use std::str::FromStr;
        assert_eq!(
            StoreLocation::from_str("sqlite:/data/jobs.sqlite").unwrap(),
            StoreLocation::Sqlite("/data/jobs.sqlite".into())
        );
        let url = "postgres://u:p@db:5432/jobs";
        assert_eq!(StoreLocation::from_str(url).unwrap(), StoreLocation::Postgres(url.into()));
        assert!(StoreLocation::from_str("postgresql://db/jobs").is_ok());
        for bad in ["sqlite:", "mysql://db", "/data/jobs.sqlite"] {
            let err = StoreLocation::from_str(bad).unwrap_err().to_string();
            assert!(err.contains("sqlite:PATH or postgres://") && err.contains(&format!("{bad:?}")), "{err}");
        }
    }
}

//! The fine-tune job store: jobs, their event histories and the uploaded datasets' metadata, in one
//! SQLite database.
//!
//! A job is kept as its encoded protobuf `Job` beside the few columns needed to filter and page
//! (state, creation order, client). Each change to a job is also an encoded `JobEvent`, numbered
//! 1, 2, 3... per job and carrying the job as it stands afterwards, so a client that reconnects to
//! WatchJob asks for the events after the last sequence it saw and misses nothing.
//!
//! Durability: the database runs in WAL mode with `synchronous=FULL`, and every change is one
//! immediate transaction, so once a call returns the change survives a crash or a power cut, and a
//! crash in the middle of a call leaves the job as it was before.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use prost::Message;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

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

/// The schema, one entry per version; `PRAGMA user_version` counts the entries already applied.
/// Append new migrations, never edit old ones: existing databases have already run them.
const MIGRATIONS: &[&str] = &[r"
CREATE TABLE datasets (
    id           TEXT PRIMARY KEY NOT NULL,
    name         TEXT NOT NULL,
    size         INTEGER NOT NULL,
    class_counts TEXT NOT NULL,  -- JSON object: class -> image count
    sha256       TEXT NOT NULL,
    path         TEXT NOT NULL,
    created_at   TEXT NOT NULL
);
-- AUTOINCREMENT: creation_order never goes back or reuses a value, so page tokens stay valid.
CREATE TABLE jobs (
    creation_order INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id         TEXT NOT NULL UNIQUE,
    client         TEXT NOT NULL,
    state          INTEGER NOT NULL,
    last_sequence  INTEGER NOT NULL,
    job            BLOB NOT NULL    -- encoded contrastive.v1.Job
);
CREATE INDEX jobs_by_state ON jobs (state, creation_order);
CREATE INDEX jobs_by_client ON jobs (client, state);
CREATE TABLE job_events (
    job_id   TEXT NOT NULL REFERENCES jobs (job_id),
    sequence INTEGER NOT NULL,
    event    BLOB NOT NULL,         -- encoded contrastive.v1.JobEvent
    PRIMARY KEY (job_id, sequence)
) WITHOUT ROWID;
"];

/// Default and largest page of `list_jobs`.
const DEFAULT_PAGE_SIZE: usize = 50;
const MAX_PAGE_SIZE: usize = 500;

/// The states a client's job counts against its limits in.
const ACTIVE_STATES: [JobState; 3] = [JobState::Queued, JobState::Validating, JobState::Running];

/// The job store. One connection behind a mutex: SQLite serialises writers anyway, and the calls
/// are short, so this is `Send + Sync` without a pool.
pub struct JobStore {
    conn: Mutex<Connection>,
    path: PathBuf,
}

impl JobStore {
    /// Opens or creates the database at `path` (parent folders created), runs the schema migrations.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating the folder {} of the job database", parent.display()))?;
        }
        let mut conn =
            Connection::open(path).with_context(|| format!("opening the job database {}", path.display()))?;
        configure(&conn).with_context(|| format!("configuring the job database {}", path.display()))?;
        migrate(&mut conn).with_context(|| format!("migrating the schema of the job database {}", path.display()))?;
        Ok(Self { conn: Mutex::new(conn), path: path.to_owned() })
    }

    pub fn insert_dataset(&self, record: &DatasetRecord) -> Result<()> {
        let path = record
            .path
            .to_str()
            .with_context(|| format!("dataset {}: its path {} is not UTF-8", record.id, record.path.display()))?;
        let size = i64::try_from(record.size)
            .with_context(|| format!("dataset {}: size {} does not fit the database", record.id, record.size))?;
        let class_counts = serde_json::to_string(&record.class_counts)?;
        self.write(|tx| {
            let inserted = tx.execute(
                "INSERT INTO datasets (id, name, size, class_counts, sha256, path, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (id) DO NOTHING",
                params![record.id, record.name, size, class_counts, record.sha256, path, record.created_at],
            )?;
            if inserted == 0 {
                bail!("dataset {} already exists", record.id);
            }
            Ok(())
        })
        .with_context(|| format!("storing dataset {} in {}", record.id, self.path.display()))
    }

    pub fn dataset(&self, id: &str) -> Result<Option<DatasetRecord>> {
        let conn = self.lock();
        let row = conn
            .query_row(
                "SELECT name, size, class_counts, sha256, path, created_at FROM datasets WHERE id = ?1",
                params![id],
                |row| {
                    Ok((
                        row.get::<_, String>(0)?,
                        row.get::<_, i64>(1)?,
                        row.get::<_, String>(2)?,
                        row.get::<_, String>(3)?,
                        row.get::<_, String>(4)?,
                        row.get::<_, String>(5)?,
                    ))
                },
            )
            .optional()
            .with_context(|| format!("reading dataset {id} from {}", self.path.display()))?;
        let Some((name, size, class_counts, sha256, path, created_at)) = row else {
            return Ok(None);
        };
        Ok(Some(DatasetRecord {
            id: id.to_owned(),
            name,
            size: u64::try_from(size).with_context(|| format!("dataset {id} has a negative size {size}"))?,
            class_counts: serde_json::from_str(&class_counts)
                .with_context(|| format!("dataset {id}: class counts {class_counts:?} are not a JSON object"))?,
            sha256,
            path: PathBuf::from(path),
            created_at,
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
            let inserted = tx.execute(
                "INSERT INTO jobs (job_id, client, state, last_sequence, job) VALUES (?1, ?2, ?3, 0, ?4)
                 ON CONFLICT (job_id) DO NOTHING",
                params![job_id, client, job.state, job.encode_to_vec()],
            )?;
            if inserted == 0 {
                bail!("job {job_id} already exists");
            }
            append_event(tx, job, 0, Event::State(JobState::Queued as i32), now_rfc3339())
        })
        .with_context(|| format!("creating job {job_id} in {}", self.path.display()))
    }

    pub fn job(&self, job_id: &str) -> Result<Option<Job>> {
        let conn = self.lock();
        Ok(load_job(&conn, job_id)
            .with_context(|| format!("reading job {job_id} from {}", self.path.display()))?
            .map(|(job, _)| job))
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
        self.write(|tx| {
            let (mut job, last_sequence) = require_job(tx, job_id)?;
            let from = job_state(&job)?;
            if !transition_allowed(from, to) {
                bail!("job {job_id} is {}; it cannot become {}", state_name(from as i32), state_name(to as i32));
            }
            let now = now_rfc3339();
            job.set_state(to);
            if to == JobState::Validating && job.started_at.is_empty() {
                job.started_at = now.clone();
            }
            if to.is_terminal() {
                job.finished_at = now.clone();
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
        })
        .with_context(|| format!("moving job {job_id} to {} in {}", state_name(to as i32), self.path.display()))
    }

    /// Records a non-state event and applies it to the job: Epoch -> push onto job.epochs; Progress -> job.progress;
    /// Before/After -> job.before/job.after; Message -> job.message. An Event::State here is an error (use transition).
    /// Refused once the job is in a terminal state.
    pub fn record(&self, job_id: &str, event: Event) -> Result<JobEvent> {
        match &event {
            Event::State(state) => {
                bail!("job {job_id}: the state change to {} goes through transition, not record", state_name(*state))
            }
            Event::Progress(p) if !(0.0..=1.0).contains(p) => bail!("job {job_id}: progress {p} is outside 0..1"),
            _ => {}
        }
        self.write(|tx| {
            let (mut job, last_sequence) = require_job(tx, job_id)?;
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
        .with_context(|| format!("recording an event of job {job_id} in {}", self.path.display()))
    }

    /// Sets job.output_version (after a publish). No event: the next state event carries it.
    pub fn set_output_version(&self, job_id: &str, version: u64) -> Result<Job> {
        self.write(|tx| {
            let (mut job, _) = require_job(tx, job_id)?;
            job.output_version = version;
            tx.execute("UPDATE jobs SET job = ?2 WHERE job_id = ?1", params![job_id, job.encode_to_vec()])?;
            Ok(job)
        })
        .with_context(|| format!("setting the output version {version} of job {job_id} in {}", self.path.display()))
    }

    /// Events with sequence > after_sequence, in order (sequence numbers are 1, 2, 3... per job).
    /// An unknown job is an error.
    pub fn events(&self, job_id: &str, after_sequence: u64) -> Result<Vec<JobEvent>> {
        let conn = self.lock();
        let read = || -> Result<Vec<JobEvent>> {
            require_job(&conn, job_id)?;
            // Sequences are stored as i64; anything past i64::MAX has no events after it.
            let Ok(after) = i64::try_from(after_sequence) else { return Ok(Vec::new()) };
            let mut statement = conn.prepare_cached(
                "SELECT sequence, event FROM job_events WHERE job_id = ?1 AND sequence > ?2 ORDER BY sequence",
            )?;
            let rows = statement
                .query_map(params![job_id, after], |row| Ok((row.get::<_, i64>(0)?, row.get::<_, Vec<u8>>(1)?)))?;
            rows.map(|row| {
                let (sequence, blob) = row?;
                JobEvent::decode(blob.as_slice()).with_context(|| format!("decoding event {sequence}"))
            })
            .collect()
        };
        read().with_context(|| format!("reading the events of job {job_id} from {}", self.path.display()))
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
        let conn = self.lock();
        let read = || -> Result<Vec<(i64, Job)>> {
            let mut statement = conn.prepare_cached(
                "SELECT creation_order, job_id, job FROM jobs
                 WHERE creation_order < ?1 AND (?2 IS NULL OR state = ?2)
                 ORDER BY creation_order DESC LIMIT ?3",
            )?;
            let rows = statement.query_map(params![before, state, (limit + 1) as i64], |row| {
                Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?, row.get::<_, Vec<u8>>(2)?))
            })?;
            rows.map(|row| {
                let (order, job_id, blob) = row?;
                Ok((order, decode_job(&job_id, &blob)?))
            })
            .collect()
        };
        let mut rows = read().with_context(|| format!("listing jobs in {}", self.path.display()))?;
        let next_page_token = if rows.len() > limit {
            rows.truncate(limit);
            rows.last().map(|(order, _)| order.to_string()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok((rows.into_iter().map(|(_, job)| job).collect(), next_page_token))
    }

    /// Jobs currently in any of `states`, oldest first (the runner's queue and crash recovery).
    pub fn jobs_in_states(&self, states: &[JobState]) -> Result<Vec<Job>> {
        if states.is_empty() {
            return Ok(Vec::new());
        }
        let placeholders = vec!["?"; states.len()].join(", ");
        let sql = format!("SELECT job_id, job FROM jobs WHERE state IN ({placeholders}) ORDER BY creation_order");
        let conn = self.lock();
        let read = || -> Result<Vec<Job>> {
            let mut statement = conn.prepare(&sql)?;
            let rows = statement.query_map(rusqlite::params_from_iter(states.iter().map(|s| *s as i32)), |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, Vec<u8>>(1)?))
            })?;
            rows.map(|row| {
                let (job_id, blob) = row?;
                decode_job(&job_id, &blob)
            })
            .collect()
        };
        read().with_context(|| format!("reading the jobs in states {states:?} from {}", self.path.display()))
    }

    /// Jobs of `client` that are QUEUED, VALIDATING or RUNNING (per-client limits).
    pub fn active_jobs_of_client(&self, client: &str) -> Result<usize> {
        let conn = self.lock();
        let count: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM jobs WHERE client = ?1 AND state IN (?2, ?3, ?4)",
                params![client, ACTIVE_STATES[0] as i32, ACTIVE_STATES[1] as i32, ACTIVE_STATES[2] as i32],
                |row| row.get(0),
            )
            .with_context(|| format!("counting the active jobs of client {client:?} in {}", self.path.display()))?;
        Ok(count as usize)
    }

    /// The connection. A panic while it was held cannot have left a half-done change (an open
    /// transaction rolls back when dropped), so a poisoned lock is still safe to use.
    fn lock(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `change` in one immediate (write-locking) transaction, committed only if it succeeds.
    fn write<T>(&self, change: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let value = change(&tx)?;
        tx.commit()?;
        Ok(value)
    }
}

/// WAL (readers never block the writer; a commit is one append) with full fsync on commit.
fn configure(conn: &Connection) -> Result<()> {
    conn.busy_timeout(Duration::from_secs(10))?;
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        bail!("SQLite refused the WAL journal (journal_mode is {mode})");
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", true)?;
    Ok(())
}

/// Applies the migrations this database has not run yet, all in one transaction.
fn migrate(conn: &mut Connection) -> Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let applied: i64 = tx.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    let applied = usize::try_from(applied).with_context(|| format!("schema version {applied} is negative"))?;
    if applied > MIGRATIONS.len() {
        bail!("schema version {applied} is newer than this program, which knows {}", MIGRATIONS.len());
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
        tx.execute_batch(sql).with_context(|| format!("schema migration {}", index + 1))?;
    }
    tx.pragma_update(None, "user_version", MIGRATIONS.len() as i64)?;
    tx.commit()?;
    Ok(())
}

/// The job and the sequence of its last event, if it exists.
fn load_job(conn: &Connection, job_id: &str) -> Result<Option<(Job, u64)>> {
    let row = conn
        .query_row("SELECT job, last_sequence FROM jobs WHERE job_id = ?1", params![job_id], |row| {
            Ok((row.get::<_, Vec<u8>>(0)?, row.get::<_, i64>(1)?))
        })
        .optional()?;
    let Some((blob, last_sequence)) = row else { return Ok(None) };
    Ok(Some((decode_job(job_id, &blob)?, last_sequence as u64)))
}

fn require_job(conn: &Connection, job_id: &str) -> Result<(Job, u64)> {
    load_job(conn, job_id)?.with_context(|| format!("there is no job {job_id}"))
}

fn decode_job(job_id: &str, blob: &[u8]) -> Result<Job> {
    Job::decode(blob).with_context(|| format!("decoding the stored job {job_id}"))
}

/// Stores `event` as the job's next one and the job as it stands after it.
fn append_event(conn: &Connection, job: &Job, last_sequence: u64, event: Event, time: String) -> Result<JobEvent> {
    let sequence = last_sequence + 1;
    let job_event = JobEvent { sequence, time, event: Some(event), job: Some(job.clone()) };
    conn.execute(
        "INSERT INTO job_events (job_id, sequence, event) VALUES (?1, ?2, ?3)",
        params![job.job_id, sequence as i64, job_event.encode_to_vec()],
    )?;
    conn.execute(
        "UPDATE jobs SET state = ?2, last_sequence = ?3, job = ?4 WHERE job_id = ?1",
        params![job.job_id, job.state, sequence as i64, job.encode_to_vec()],
    )?;
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
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/folder/jobs.sqlite");
        {
            let store = JobStore::open(&path).unwrap();
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

        let store = JobStore::open(&path).unwrap();
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
        let dir = tempfile::tempdir().unwrap();
        let store = JobStore::open(&dir.path().join("jobs.db")).unwrap();
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
        let dir = tempfile::tempdir().unwrap();
        let store = JobStore::open(&dir.path().join("jobs.db")).unwrap();
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
        let dir = tempfile::tempdir().unwrap();
        let store = JobStore::open(&dir.path().join("jobs.db")).unwrap();
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
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.db");
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
            let store = JobStore::open(&path).unwrap();
            store.insert_dataset(&record).unwrap();
            let err = store.insert_dataset(&record).unwrap_err();
            assert!(format!("{err:#}").contains("already exists"), "{err:#}");
        }
        let store = JobStore::open(&path).unwrap();
        assert_eq!(store.dataset(&record.id).unwrap(), Some(record.clone()));
        assert_eq!(store.dataset("other").unwrap(), None);

        let info = record.to_proto();
        assert_eq!(info.dataset_id, record.id);
        assert_eq!(info.size, 5);
        assert_eq!(info.class_counts.get("dog"), Some(&3));
        assert_eq!(info.class_counts.len(), 2);
        assert_eq!(info.created_at, "2024-05-06T07:08:09Z");
    }
}

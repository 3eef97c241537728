//! The job store in one SQLite file: the default, for one server process.
//!
//! Durability: WAL mode with `synchronous=FULL`, and every change is one immediate (write-locking)
//! transaction, so once a call returns the change survives a crash or a power cut, and a crash in
//! the middle of a call leaves the job as it was before.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};

use super::{DatasetRow, JobRow, StoredJob, Tx};

/// The schema, one entry per version; `PRAGMA user_version` counts the entries already applied.
/// Append new migrations, never edit old ones: existing databases have already run them.
const MIGRATIONS: &[&str] = &[
    r"
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
",
    // Leases: which worker holds a job and until when (Unix milliseconds), and cancel requests
    // for the worker that holds it.
    r"
ALTER TABLE jobs ADD COLUMN lease_owner TEXT;
ALTER TABLE jobs ADD COLUMN lease_expires_ms INTEGER;
ALTER TABLE jobs ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0;
",
    // Output versions reserved by jobs, so that no two jobs publish the same one.
    r"
CREATE TABLE model_versions (
    model   TEXT NOT NULL,
    version INTEGER NOT NULL,
    job_id  TEXT NOT NULL UNIQUE,
    PRIMARY KEY (model, version)
);
",
];

/// The database's clock in Unix milliseconds.
const NOW_MS: &str = "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)";

/// One connection behind a mutex: SQLite serialises writers anyway, and the calls are short.
pub(super) struct SqliteDb {
    conn: Mutex<Connection>,
    path: PathBuf,
}

impl SqliteDb {
    /// Opens or creates the database at `path` (parent folders created), runs the schema migrations.
    pub(super) fn open(path: &Path) -> Result<Self> {
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

    pub(super) fn describe(&self) -> String {
        self.path.display().to_string()
    }

    /// Runs `change` in one immediate transaction, committed only if it succeeds.
    pub(super) fn write<T>(&self, change: impl FnOnce(&mut dyn Tx) -> Result<T>) -> Result<T> {
        let mut conn = self.lock();
        let mut tx = SqliteTx(conn.transaction_with_behavior(TransactionBehavior::Immediate)?);
        let value = change(&mut tx)?;
        tx.0.commit()?;
        Ok(value)
    }

    /// The connection. A panic while it was held cannot have left a half-done change (an open
    /// transaction rolls back when dropped), so a poisoned lock is still safe to use.
    fn lock(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
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

struct SqliteTx<'a>(Transaction<'a>);

impl Tx for SqliteTx<'_> {
    fn insert_dataset(&mut self, row: &DatasetRow) -> Result<bool> {
        let inserted = self.0.execute(
            "INSERT INTO datasets (id, name, size, class_counts, sha256, path, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (id) DO NOTHING",
            params![row.id, row.name, row.size, row.class_counts, row.sha256, row.path, row.created_at],
        )?;
        Ok(inserted > 0)
    }

    fn dataset(&mut self, id: &str) -> Result<Option<DatasetRow>> {
        Ok(self
            .0
            .query_row(
                "SELECT name, size, class_counts, sha256, path, created_at FROM datasets WHERE id = ?1",
                params![id],
                |row| {
                    Ok(DatasetRow {
                        id: id.to_owned(),
                        name: row.get(0)?,
                        size: row.get(1)?,
                        class_counts: row.get(2)?,
                        sha256: row.get(3)?,
                        path: row.get(4)?,
                        created_at: row.get(5)?,
                    })
                },
            )
            .optional()?)
    }

    fn insert_job(&mut self, job_id: &str, client: &str, state: i32, blob: &[u8]) -> Result<bool> {
        let inserted = self.0.execute(
            "INSERT INTO jobs (job_id, client, state, last_sequence, job) VALUES (?1, ?2, ?3, 0, ?4)
             ON CONFLICT (job_id) DO NOTHING",
            params![job_id, client, state, blob],
        )?;
        Ok(inserted > 0)
    }

    fn load_job(&mut self, job_id: &str) -> Result<Option<StoredJob>> {
        let sql = "SELECT job, last_sequence, lease_owner, cancel_requested FROM jobs WHERE job_id = ?1";
        Ok(self
            .0
            .query_row(sql, params![job_id], |row| {
                Ok(StoredJob {
                    blob: row.get(0)?,
                    last_sequence: row.get(1)?,
                    lease_owner: row.get(2)?,
                    cancel_requested: row.get(3)?,
                })
            })
            .optional()?)
    }

    fn read_job(&mut self, job_id: &str) -> Result<Option<Vec<u8>>> {
        let sql = "SELECT job FROM jobs WHERE job_id = ?1";
        Ok(self.0.query_row(sql, params![job_id], |row| row.get(0)).optional()?)
    }

    fn save_job(&mut self, job_id: &str, state: i32, last_sequence: i64, blob: &[u8]) -> Result<()> {
        self.0.execute(
            "UPDATE jobs SET state = ?2, last_sequence = ?3, job = ?4 WHERE job_id = ?1",
            params![job_id, state, last_sequence, blob],
        )?;
        Ok(())
    }

    fn insert_event(&mut self, job_id: &str, sequence: i64, blob: &[u8]) -> Result<()> {
        self.0.execute(
            "INSERT INTO job_events (job_id, sequence, event) VALUES (?1, ?2, ?3)",
            params![job_id, sequence, blob],
        )?;
        Ok(())
    }

    fn events_after(&mut self, job_id: &str, after: i64) -> Result<Vec<(i64, Vec<u8>)>> {
        let mut statement = self.0.prepare_cached(
            "SELECT sequence, event FROM job_events WHERE job_id = ?1 AND sequence > ?2 ORDER BY sequence",
        )?;
        let rows = statement.query_map(params![job_id, after], |row| Ok((row.get(0)?, row.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn list_jobs(&mut self, before: i64, state: Option<i32>, limit: i64) -> Result<Vec<JobRow>> {
        let mut statement = self.0.prepare_cached(
            "SELECT creation_order, job_id, job FROM jobs
             WHERE creation_order < ?1 AND (?2 IS NULL OR state = ?2)
             ORDER BY creation_order DESC LIMIT ?3",
        )?;
        let rows = statement.query_map(params![before, state, limit], |row| {
            Ok(JobRow { creation_order: row.get(0)?, job_id: row.get(1)?, blob: row.get(2)? })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn jobs_in_states(&mut self, states: &[i32]) -> Result<Vec<JobRow>> {
        let placeholders = vec!["?"; states.len()].join(", ");
        let sql = format!(
            "SELECT creation_order, job_id, job FROM jobs WHERE state IN ({placeholders}) ORDER BY creation_order"
        );
        let mut statement = self.0.prepare(&sql)?;
        let rows = statement.query_map(rusqlite::params_from_iter(states), |row| {
            Ok(JobRow { creation_order: row.get(0)?, job_id: row.get(1)?, blob: row.get(2)? })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn count_jobs_of_client(&mut self, client: &str, states: &[i32]) -> Result<i64> {
        let placeholders = vec!["?"; states.len()].join(", ");
        let sql = format!("SELECT COUNT(*) FROM jobs WHERE client = ? AND state IN ({placeholders})");
        let values = std::iter::once(rusqlite::types::Value::from(client.to_owned()))
            .chain(states.iter().map(|&s| rusqlite::types::Value::from(s)));
        Ok(self.0.query_row(&sql, rusqlite::params_from_iter(values), |row| row.get(0))?)
    }

    fn oldest_claimable(&mut self, queued: i32, held: &[i32]) -> Result<Option<String>> {
        let placeholders = vec!["?"; held.len()].join(", ");
        let sql = format!(
            "SELECT job_id FROM jobs
             WHERE state = ? OR (state IN ({placeholders}) AND COALESCE(lease_expires_ms, 0) < {NOW_MS})
             ORDER BY creation_order LIMIT 1"
        );
        let values = std::iter::once(queued).chain(held.iter().copied());
        Ok(self.0.query_row(&sql, rusqlite::params_from_iter(values), |row| row.get(0)).optional()?)
    }

    fn set_lease(&mut self, job_id: &str, lease: Option<(&str, Duration)>) -> Result<()> {
        match lease {
            Some((owner, length)) => self.0.execute(
                &format!("UPDATE jobs SET lease_owner = ?2, lease_expires_ms = {NOW_MS} + ?3 WHERE job_id = ?1"),
                params![job_id, owner, length.as_millis() as i64],
            )?,
            None => self.0.execute(
                "UPDATE jobs SET lease_owner = NULL, lease_expires_ms = NULL, cancel_requested = 0 WHERE job_id = ?1",
                params![job_id],
            )?,
        };
        Ok(())
    }

    fn request_cancel(&mut self, job_id: &str) -> Result<()> {
        self.0.execute("UPDATE jobs SET cancel_requested = 1 WHERE job_id = ?1", params![job_id])?;
        Ok(())
    }

    fn reserved_version(&mut self, job_id: &str) -> Result<Option<i64>> {
        let sql = "SELECT version FROM model_versions WHERE job_id = ?1";
        Ok(self.0.query_row(sql, params![job_id], |row| row.get(0)).optional()?)
    }

    fn latest_reserved_version(&mut self, model: &str) -> Result<Option<i64>> {
        let sql = "SELECT MAX(version) FROM model_versions WHERE model = ?1";
        Ok(self.0.query_row(sql, params![model], |row| row.get(0))?)
    }

    fn reserve_version(&mut self, model: &str, version: i64, job_id: &str) -> Result<()> {
        self.0.execute(
            "INSERT INTO model_versions (model, version, job_id) VALUES (?1, ?2, ?3)",
            params![model, version, job_id],
        )?;
        Ok(())
    }
}

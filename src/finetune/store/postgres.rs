//! The job store in PostgreSQL, shared by every replica of the server.
//!
//! Rows are locked where two replicas could race: a change locks its job's row (`FOR UPDATE`), so
//! event numbers never collide, and claiming skips rows another replica is claiming (`FOR UPDATE
//! SKIP LOCKED`). Lease times come from the database's clock, so replicas need not agree on time.
//! Migrations run under an advisory lock, so replicas that start together migrate once.

use std::str::FromStr;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use postgres::{Client, Config, NoTls, Transaction};

use super::{DatasetRow, JobRow, StoredJob, Tx};

/// The schema, one entry per version, as the SQLite one; `contrastive_schema` counts the
/// entries applied. Append new migrations, never edit old ones.
const MIGRATIONS: &[&str] = &[
    r"
CREATE TABLE datasets (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    size         BIGINT NOT NULL,
    class_counts TEXT NOT NULL,
    sha256       TEXT NOT NULL,
    path         TEXT NOT NULL,
    created_at   TEXT NOT NULL
);
CREATE TABLE jobs (
    creation_order   BIGSERIAL PRIMARY KEY,
    job_id           TEXT NOT NULL UNIQUE,
    client           TEXT NOT NULL,
    state            INTEGER NOT NULL,
    last_sequence    BIGINT NOT NULL,
    job              BYTEA NOT NULL,
    lease_owner      TEXT,
    lease_expires_ms BIGINT,
    cancel_requested BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX jobs_by_state ON jobs (state, creation_order);
CREATE INDEX jobs_by_client ON jobs (client, state);
CREATE TABLE job_events (
    job_id   TEXT NOT NULL REFERENCES jobs (job_id),
    sequence BIGINT NOT NULL,
    event    BYTEA NOT NULL,
    PRIMARY KEY (job_id, sequence)
);
",
    r"
CREATE TABLE model_versions (
    model   TEXT NOT NULL,
    version BIGINT NOT NULL,
    job_id  TEXT NOT NULL UNIQUE,
    PRIMARY KEY (model, version)
);
",
];

/// Key of the advisory lock that serialises migrations ("contrastive" in ASCII, cut to 63 bits).
const MIGRATION_LOCK: i64 = 0x636f_6e74_7261_7374;

/// First key of the advisory locks that serialise version reservations (the second is the
/// model name's hash).
const VERSION_LOCK: i32 = 0x6374_7276;

/// The database's clock in Unix milliseconds (the time of the statement, not of the transaction).
const NOW_MS: &str = "(extract(epoch FROM clock_timestamp()) * 1000)::BIGINT";

/// One connection behind a mutex, opened again when it breaks (the database restarted).
pub(super) struct PostgresDb {
    config: Config,
    client: Mutex<Option<Client>>,
    describe: String,
}

impl PostgresDb {
    /// Connects to `url` (`postgres://USER:PASSWORD@HOST:PORT/DATABASE`, no TLS) and runs the
    /// schema migrations.
    pub(super) fn connect(url: &str) -> Result<Self> {
        let config = Config::from_str(url).context("reading the PostgreSQL connection URL")?;
        let describe = describe(&config);
        let db = Self { config, client: Mutex::new(None), describe };
        off_runtime(|| {
            let mut client = db.client()?;
            migrate(client.as_mut().expect("connected"))
                .with_context(|| format!("migrating the schema of the job database {}", db.describe))
        })?;
        Ok(db)
    }

    pub(super) fn describe(&self) -> String {
        self.describe.clone()
    }

    /// Runs `change` in one transaction, committed only if it succeeds.
    pub(super) fn write<T: Send>(&self, change: impl FnOnce(&mut dyn Tx) -> Result<T> + Send) -> Result<T> {
        off_runtime(|| {
            let mut guard = self.client()?;
            let client = guard.as_mut().expect("connected");
            let mut tx = PostgresTx(client.transaction()?);
            let value = change(&mut tx)?;
            tx.0.commit()?;
            Ok(value)
        })
    }

    /// The connection, opened if there is none or the last one broke.
    fn client(&self) -> Result<MutexGuard<'_, Option<Client>>> {
        let mut guard = self.client.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if guard.as_ref().is_none_or(Client::is_closed) {
            let client = self
                .config
                .connect(NoTls)
                .with_context(|| format!("connecting to the job database {}", self.describe))?;
            *guard = Some(client);
        }
        Ok(guard)
    }
}

impl Drop for PostgresDb {
    /// Closing the connection blocks on the client's runtime, which must not happen on another.
    fn drop(&mut self) {
        let client = self.client.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
        if let Some(client) = client {
            let _ = off_runtime(move || {
                drop(client);
                Ok(())
            });
        }
    }
}

/// `user@host:port/database`, never the password.
fn describe(config: &Config) -> String {
    let host = match config.get_hosts().first() {
        Some(postgres::config::Host::Tcp(host)) => host.clone(),
        Some(postgres::config::Host::Unix(path)) => path.display().to_string(),
        None => "localhost".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "postgres://{}@{host}:{port}/{}",
        config.get_user().unwrap_or_default(),
        config.get_dbname().unwrap_or_default()
    )
}

/// The synchronous client runs its own small runtime, which must not start inside another:
/// from async code, the call runs on a scoped thread.
fn off_runtime<T: Send>(work: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    if tokio::runtime::Handle::try_current().is_err() {
        return work();
    }
    std::thread::scope(|scope| match scope.spawn(work).join() {
        Ok(result) => result,
        Err(panic) => std::panic::resume_unwind(panic),
    })
}

fn migrate(client: &mut Client) -> Result<()> {
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS contrastive_schema (version INTEGER NOT NULL)")?;
    let applied: Option<i32> = tx.query_opt("SELECT version FROM contrastive_schema", &[])?.map(|row| row.get(0));
    let applied = applied.unwrap_or(0) as usize;
    if applied > MIGRATIONS.len() {
        bail!("schema version {applied} is newer than this program, which knows {}", MIGRATIONS.len());
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
        tx.batch_execute(sql).with_context(|| format!("schema migration {}", index + 1))?;
    }
    tx.execute("DELETE FROM contrastive_schema", &[])?;
    tx.execute("INSERT INTO contrastive_schema (version) VALUES ($1)", &[&(MIGRATIONS.len() as i32)])?;
    tx.commit()?;
    Ok(())
}

struct PostgresTx<'a>(Transaction<'a>);

fn job_row(row: &postgres::Row) -> JobRow {
    JobRow { creation_order: row.get(0), job_id: row.get(1), blob: row.get(2) }
}

impl Tx for PostgresTx<'_> {
    fn insert_dataset(&mut self, row: &DatasetRow) -> Result<bool> {
        let inserted = self.0.execute(
            "INSERT INTO datasets (id, name, size, class_counts, sha256, path, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO NOTHING",
            &[&row.id, &row.name, &row.size, &row.class_counts, &row.sha256, &row.path, &row.created_at],
        )?;
        Ok(inserted > 0)
    }

    fn dataset(&mut self, id: &str) -> Result<Option<DatasetRow>> {
        let row = self.0.query_opt(
            "SELECT name, size, class_counts, sha256, path, created_at FROM datasets WHERE id = $1",
            &[&id],
        )?;
        Ok(row.map(|row| DatasetRow {
            id: id.to_owned(),
            name: row.get(0),
            size: row.get(1),
            class_counts: row.get(2),
            sha256: row.get(3),
            path: row.get(4),
            created_at: row.get(5),
        }))
    }

    fn insert_job(&mut self, job_id: &str, client: &str, state: i32, blob: &[u8]) -> Result<bool> {
        let inserted = self.0.execute(
            "INSERT INTO jobs (job_id, client, state, last_sequence, job) VALUES ($1, $2, $3, 0, $4)
             ON CONFLICT (job_id) DO NOTHING",
            &[&job_id, &client, &state, &blob],
        )?;
        Ok(inserted > 0)
    }

    fn load_job(&mut self, job_id: &str) -> Result<Option<StoredJob>> {
        let sql = "SELECT job, last_sequence, lease_owner, cancel_requested FROM jobs WHERE job_id = $1 FOR UPDATE";
        let row = self.0.query_opt(sql, &[&job_id])?;
        Ok(row.map(|row| StoredJob {
            blob: row.get(0),
            last_sequence: row.get(1),
            lease_owner: row.get(2),
            cancel_requested: row.get(3),
        }))
    }

    fn read_job(&mut self, job_id: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.0.query_opt("SELECT job FROM jobs WHERE job_id = $1", &[&job_id])?.map(|row| row.get(0)))
    }

    fn save_job(&mut self, job_id: &str, state: i32, last_sequence: i64, blob: &[u8]) -> Result<()> {
        self.0.execute(
            "UPDATE jobs SET state = $2, last_sequence = $3, job = $4 WHERE job_id = $1",
            &[&job_id, &state, &last_sequence, &blob],
        )?;
        Ok(())
    }

    fn insert_event(&mut self, job_id: &str, sequence: i64, blob: &[u8]) -> Result<()> {
        self.0.execute(
            "INSERT INTO job_events (job_id, sequence, event) VALUES ($1, $2, $3)",
            &[&job_id, &sequence, &blob],
        )?;
        Ok(())
    }

    fn events_after(&mut self, job_id: &str, after: i64) -> Result<Vec<(i64, Vec<u8>)>> {
        let rows = self.0.query(
            "SELECT sequence, event FROM job_events WHERE job_id = $1 AND sequence > $2 ORDER BY sequence",
            &[&job_id, &after],
        )?;
        Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
    }

    fn list_jobs(&mut self, before: i64, state: Option<i32>, limit: i64) -> Result<Vec<JobRow>> {
        let rows = self.0.query(
            "SELECT creation_order, job_id, job FROM jobs
             WHERE creation_order < $1 AND ($2::INTEGER IS NULL OR state = $2)
             ORDER BY creation_order DESC LIMIT $3",
            &[&before, &state, &limit],
        )?;
        Ok(rows.iter().map(job_row).collect())
    }

    fn jobs_in_states(&mut self, states: &[i32]) -> Result<Vec<JobRow>> {
        let rows = self.0.query(
            "SELECT creation_order, job_id, job FROM jobs WHERE state = ANY($1) ORDER BY creation_order",
            &[&states],
        )?;
        Ok(rows.iter().map(job_row).collect())
    }

    fn count_jobs_of_client(&mut self, client: &str, states: &[i32]) -> Result<i64> {
        let row =
            self.0.query_one("SELECT COUNT(*) FROM jobs WHERE client = $1 AND state = ANY($2)", &[&client, &states])?;
        Ok(row.get(0))
    }

    fn oldest_claimable(&mut self, queued: i32, held: &[i32]) -> Result<Option<String>> {
        let sql = format!(
            "SELECT job_id FROM jobs
             WHERE state = $1 OR (state = ANY($2) AND COALESCE(lease_expires_ms, 0) < {NOW_MS})
             ORDER BY creation_order LIMIT 1 FOR UPDATE SKIP LOCKED"
        );
        Ok(self.0.query_opt(&sql, &[&queued, &held])?.map(|row| row.get(0)))
    }

    fn set_lease(&mut self, job_id: &str, lease: Option<(&str, Duration)>) -> Result<()> {
        match lease {
            Some((owner, length)) => self.0.execute(
                &format!("UPDATE jobs SET lease_owner = $2, lease_expires_ms = {NOW_MS} + $3 WHERE job_id = $1"),
                &[&job_id, &owner, &(length.as_millis() as i64)],
            )?,
            None => self.0.execute(
                "UPDATE jobs SET lease_owner = NULL, lease_expires_ms = NULL, cancel_requested = FALSE
                 WHERE job_id = $1",
                &[&job_id],
            )?,
        };
        Ok(())
    }

    fn request_cancel(&mut self, job_id: &str) -> Result<()> {
        self.0.execute("UPDATE jobs SET cancel_requested = TRUE WHERE job_id = $1", &[&job_id])?;
        Ok(())
    }

    fn reserved_version(&mut self, job_id: &str) -> Result<Option<i64>> {
        let row = self.0.query_opt("SELECT version FROM model_versions WHERE job_id = $1", &[&job_id])?;
        Ok(row.map(|row| row.get(0)))
    }

    fn latest_reserved_version(&mut self, model: &str) -> Result<Option<i64>> {
        // Reservations of one model queue behind each other, so two never read the same latest.
        self.0.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", &[&VERSION_LOCK, &model])?;
        let row = self.0.query_one("SELECT MAX(version) FROM model_versions WHERE model = $1", &[&model])?;
        Ok(row.get(0))
    }

    fn reserve_version(&mut self, model: &str, version: i64, job_id: &str) -> Result<()> {
        self.0.execute(
            "INSERT INTO model_versions (model, version, job_id) VALUES ($1, $2, $3)",
            &[&model, &version, &job_id],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Messages name the database but never its password.
    #[test]
    fn the_description_leaves_the_password_out() {
        let config = Config::from_str("postgres://jobs:s3cret@db.internal:6543/contrastive").unwrap();
        assert_eq!(describe(&config), "postgres://jobs@db.internal:6543/contrastive");
    }
}

//! PostgreSQL, the source of truth. Every SQL statement of gitfleet lives in this module: one
//! submodule per table family. Each state change is one statement that states its guard in its
//! `WHERE`, and callers check what it returned.

mod job_views;
mod jobs;
mod maintenance;
mod notify;
mod pending;
mod reconcile;
mod recovery;
mod replica_paths;
mod replication;
mod repositories;
mod status;
mod verify;
mod walks;
mod writes;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

pub use job_views::{JobRow, QueueDepth};
pub use jobs::{ClaimedJob, Closed, JOB_STATES, JobId, NewJob};
pub use maintenance::WriteInFlight;
pub use notify::{JOBS_CHANNEL, MAINTENANCE_CHANNEL, Notice, ROUTING_CHANNEL};
pub use pending::{PendingStart, PendingWrite};
pub use reconcile::{Accepted, Placement, Round};
pub use recovery::{CREATE_RPC, Interrupted};
pub use replica_paths::ReplicaPathLock;
pub use replication::{LeasedReplication, ReplicationLease, ReplicationPlan};
pub use repositories::{
    Deleted, Deletion, NewRepository, RemovedRepository, Renamed, RepositoryRecord, Which,
};
pub use status::{
    Figures, JobFigures, ReplicaReport, ReplicaRow, Shortfall, StorageFigures, WriteLock,
};
pub use verify::{Finding, Identity, Recorded, Verdict, Verification};
pub use walks::{Tracking, WalkRecord, WalkResults};
pub use writes::{RefChange, StaleIntent, Standing, WriteLease, WriteOutcome, WriteStart};

use crate::model::StorageName;

/// Job kinds queued by the proxy.
pub const JOB_REPLICATE: &str = "replicate";
/// Removes one replica of a removed repository; the job carries its replica path.
pub const JOB_REMOVE: &str = "remove";
/// A job that does nothing: for measuring and testing the queue itself.
pub const JOB_NOOP: &str = "noop";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Worth trying again: the database is out of reach, restarting or short of resources, or
    /// it rolled the statement back whole to break a deadlock or a serialization conflict.
    #[error("the database cannot take the statement now: {0}")]
    Unavailable(sqlx::Error),
    #[error("the database refused a statement: {0}")]
    Failed(sqlx::Error),
}

impl StoreError {
    /// Whether trying the statement again may help.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        match &error {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Tls(_) => Self::Unavailable(error),
            sqlx::Error::Database(db)
                // Class 08: connection exceptions; 57P0x: the server is shutting down or
                // restarting; 53: out of resources; 40001 and 40P01: a serialization failure
                // or a deadlock, for which PostgreSQL undid the statement.
                if db.code().is_some_and(|code| {
                    code.starts_with("08")
                        || code.starts_with("57P")
                        || code.starts_with("53")
                        || code == "40001"
                        || code == "40P01"
                }) =>
            {
                Self::Unavailable(error)
            }
            _ => Self::Failed(error),
        }
    }
}

/// Counts what the store asks of PostgreSQL: one round trip per statement.
#[derive(Debug, Default)]
pub struct StoreMetrics {
    statements: AtomicU64,
    /// Total time spent waiting for statements, in microseconds.
    wait_micros: AtomicU64,
}

/// A pool of connections and the statements gitfleet runs.
#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
    metrics: Arc<StoreMetrics>,
}

impl Store {
    /// Creates the pool without connecting: a database that is down at start makes calls fail
    /// with UNAVAILABLE rather than keeping the process from starting.
    pub fn connect_lazy(
        url: &str,
        max_connections: u32,
        acquire_timeout: Duration,
    ) -> Result<Self, StoreError> {
        let options: PgConnectOptions = url.parse().map_err(StoreError::Failed)?;
        let options = options.application_name("gitfleet");
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(acquire_timeout)
            // A ping before every statement would double the round trips; a dead connection
            // fails its statement instead and is replaced.
            .test_before_acquire(false)
            .connect_lazy_with(options);
        Ok(Self {
            pool,
            metrics: Arc::default(),
        })
    }

    /// Applies `migrations/`. sqlx holds a PostgreSQL advisory lock while it does, so
    /// processes that migrate at the same moment take turns.
    pub async fn migrate(&self) -> Result<(), sqlx::migrate::MigrateError> {
        sqlx::migrate!("./migrations").run(&self.pool).await
    }

    /// Asks the database for nothing, to see that it answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let one: i32 = self
            .measure(
                "ping",
                sqlx::query_scalar("SELECT 1::int4").fetch_one(&self.pool),
            )
            .await?;
        debug_assert_eq!(one, 1);
        Ok(())
    }

    /// How many migrations the database has applied.
    pub async fn applied_migrations(&self) -> Result<i64, StoreError> {
        self.measure(
            "applied_migrations",
            sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
                .fetch_one(&self.pool),
        )
        .await
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Time spent waiting for statements since start.
    pub fn wait_time(&self) -> std::time::Duration {
        std::time::Duration::from_micros(self.metrics.wait_micros.load(Ordering::Relaxed))
    }

    /// Statements run since start.
    pub fn round_trips(&self) -> u64 {
        self.metrics.statements.load(Ordering::Relaxed)
    }

    /// Runs one statement, counting it and its latency.
    async fn measure<T, F>(&self, operation: &'static str, statement: F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, sqlx::Error>>,
    {
        let started = Instant::now();
        let result = statement.await;
        let elapsed = started.elapsed();
        self.metrics.statements.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .wait_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
        tracing::trace!(operation, ?elapsed, ok = result.is_ok(), "statement");
        result.map_err(StoreError::from)
    }

    /// Closes the pool, waiting for connections in use to be returned.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// A column whose text is not the domain value it should hold.
fn undecodable(column: &str, error: crate::model::InvalidInput) -> sqlx::Error {
    sqlx::Error::ColumnDecode {
        index: column.to_owned(),
        source: Box::new(error),
    }
}

fn storage_names(names: &[String]) -> Vec<StorageName> {
    names
        .iter()
        .filter_map(|name| StorageName::parse(name).ok())
        .collect()
}

/// A duration as the milliseconds a statement multiplies `interval '1 millisecond'` by.
fn millis(duration: std::time::Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

fn texts(storages: &[StorageName]) -> Vec<String> {
    storages.iter().map(|s| s.as_str().to_owned()).collect()
}

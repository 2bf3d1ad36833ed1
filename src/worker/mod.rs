//! `gitfleet worker`: runs the background jobs, all of them or a chosen few. Each job type runs
//! under its own supervisor, so that a panic or an error in one restarts that type alone, with
//! backoff, while the others go on. Any number of workers share the queue in PostgreSQL.

mod metrics;
mod queue;
mod reconcile;
mod recover;
mod remove;
mod replicate;
mod supervisor;
mod verify;
pub mod walker;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures_util::future::BoxFuture;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use self::metrics::Metrics;
use crate::config::ProxyConfig;
use crate::fleet::Nodes;
use crate::model::RepositoryId;
use crate::store::{
    ClaimedJob, Closed, JOB_NOOP, JOB_REMOVE, JOB_REPLICATE, JOBS_CHANNEL, Notice, Store,
};
use crate::toolkit::{Backoff, LeaseKeeper};

/// A type of job a worker can run: its name on the command line, and the queue kinds it takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobType {
    /// Brings an outdated replica to its repository's generation.
    Replicator,
    /// Deletes the replicas of removed repositories.
    Remover,
    /// Walks the storages for replicas nothing references; not a queue, but a lease per
    /// storage.
    Walker,
    /// Checks that replicas exist and agree; not a queue, but leased batches of replicas.
    Verifier,
    /// Queues the repairs and carries out the assignment changes; one decides at a time.
    Reconciler,
    /// Rolls back writes whose proxy went away; not a queue, but the intents themselves.
    Recovery,
    /// Completes `noop` jobs and does nothing else: for measuring the queue itself.
    Noop,
}

impl JobType {
    pub const ALL: [JobType; 7] = [
        JobType::Replicator,
        JobType::Remover,
        JobType::Walker,
        JobType::Verifier,
        JobType::Reconciler,
        JobType::Recovery,
        JobType::Noop,
    ];

    pub fn name(self) -> &'static str {
        match self {
            JobType::Replicator => "replicator",
            JobType::Remover => "remover",
            JobType::Walker => "walker",
            JobType::Verifier => "verifier",
            JobType::Reconciler => "reconciler",
            JobType::Recovery => "recovery",
            JobType::Noop => "noop",
        }
    }

    /// The `jobs.kind` values this type claims.
    pub fn kinds(self) -> &'static [&'static str] {
        match self {
            JobType::Replicator => &[JOB_REPLICATE],
            JobType::Remover => &[JOB_REMOVE],
            JobType::Walker | JobType::Verifier | JobType::Reconciler | JobType::Recovery => &[],
            JobType::Noop => &[JOB_NOOP],
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|job| job.name() == name)
    }

    /// Does one job's work.
    async fn run(self, worker: &Inner, job: &ClaimedJob) -> Outcome {
        match self {
            JobType::Replicator => replicate::run(worker, job).await,
            JobType::Remover => remove::run(worker, job).await,
            // They claim no queue kind, so they are never handed a job.
            JobType::Walker | JobType::Verifier | JobType::Reconciler | JobType::Recovery => {
                Outcome::Failed(format!("the {} runs no queued jobs", self.name()))
            }
            JobType::Noop => Outcome::Done,
        }
    }
}

/// How a job's work ended.
#[derive(Debug)]
pub enum Outcome {
    /// Done: the job is marked done (or runs once more if the same work arrived meanwhile).
    Done,
    /// The job type already closed the job with its own fenced statement.
    Closed(Closed),
    /// Failed: retried after a backoff until its attempts run out.
    Failed(String),
    /// Could not run now (a node is down, a write is in flight): waits with backoff and
    /// spends no attempt.
    Postponed(String),
}

/// Where a paused job stands, for [`Hooks::pause`].
#[derive(Debug, Clone)]
pub enum Pause {
    /// A replication copied the objects and is about to take the repository's lease.
    Copied(ClaimedJob),
    /// A replication took the repository's lease (this token) and is about to send its refs
    /// phase.
    Leased(ClaimedJob, i64),
    /// A replication recorded its result.
    Closed(ClaimedJob, Closed),
    /// The recovery of an interrupted write (its intent) is about to send a rollback to a
    /// replica.
    RollingBack(i64),
}

pub type StartHook = Arc<dyn Fn(&ClaimedJob) + Send + Sync>;
pub type PauseHook = Arc<dyn Fn(Pause) -> BoxFuture<'static, ()> + Send + Sync>;

/// Test points in a job's run. Tests use them to force an interleaving (a pause between a copy
/// and its record) or to inject a panic; production leaves them empty.
#[derive(Clone, Default)]
pub struct Hooks {
    /// Called as a job starts.
    pub on_start: Option<StartHook>,
    /// Awaited at the points of [`Pause`].
    pub pause: Option<PauseHook>,
    /// The walker's clock, instead of the system's.
    pub clock: Option<walker::Clock>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks").finish_non_exhaustive()
    }
}

/// What every part of a worker shares.
#[derive(Debug)]
struct Inner {
    config: ProxyConfig,
    store: Store,
    nodes: Arc<Nodes>,
    /// This process's name in job leases: [`crate::toolkit::owner_id`].
    instance: String,
    metrics: Arc<Metrics>,
    hooks: Hooks,
    /// Woken when the database announces a ready job of the type.
    wakeups: HashMap<JobType, Notify>,
}

impl Inner {
    /// The clock the walker judges ages by.
    fn clock(&self) -> walker::Clock {
        self.hooks
            .clock
            .clone()
            .unwrap_or_else(|| Arc::new(std::time::SystemTime::now))
    }

    /// Keeps a lease this worker took on a repository (for a recovery or a replication's
    /// refs), taken by a statement sent at `taken_at`, while the work under it runs.
    fn keep_repository_lease(
        &self,
        what: &'static str,
        repository: RepositoryId,
        token: i64,
        taken_at: tokio::time::Instant,
    ) -> LeaseKeeper {
        let (store, owner) = (self.store.clone(), self.instance.clone());
        let duration = self.config.worker.lease.0;
        LeaseKeeper::start(what, duration, taken_at, move || {
            let (store, owner) = (store.clone(), owner.clone());
            async move {
                store
                    .renew_repository_lease(repository, token, &owner, duration)
                    .await
            }
        })
    }

    /// A retry's or a wait's delay: `base` doubled `times` times, at most `max`, then between
    /// half and all of that (jitter, so that jobs that failed together do not retry together).
    fn backoff(&self, times: i32, max: Duration) -> Duration {
        Backoff::new(self.config.worker.retry_backoff.0, max).delay(times.max(0) as u32)
    }
}

/// A worker, ready to run.
#[derive(Debug)]
pub struct Worker {
    inner: Arc<Inner>,
    jobs: Vec<JobType>,
}

impl Worker {
    /// A worker for `jobs` (all of them when empty).
    pub fn new(config: ProxyConfig, jobs: &[JobType]) -> anyhow::Result<Self> {
        let store = Store::connect_lazy(
            &config.database.url,
            config.database.max_connections,
            config.database.acquire_timeout.0,
        )?;
        let nodes = Arc::new(Nodes::new(&config)?);
        let jobs = if jobs.is_empty() {
            JobType::ALL.to_vec()
        } else {
            let mut jobs = jobs.to_vec();
            jobs.dedup();
            jobs
        };
        let instance = crate::toolkit::owner_id("worker");
        let wakeups = jobs.iter().map(|job| (*job, Notify::new())).collect();
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                store,
                nodes,
                instance,
                metrics: Arc::new(Metrics::new(&jobs)),
                hooks: Hooks::default(),
                wakeups,
            }),
            jobs,
        })
    }

    /// Sets test hooks; before [`Worker::run`].
    pub fn with_hooks(mut self, hooks: Hooks) -> Self {
        Arc::get_mut(&mut self.inner)
            .expect("hooks are set before the worker runs")
            .hooks = hooks;
        self
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.inner.metrics.clone()
    }

    /// This worker's name in the leases it takes.
    pub fn instance(&self) -> &str {
        &self.inner.instance
    }

    /// Runs until `shutdown`: then stops claiming, lets running jobs finish for up to
    /// `worker.shutdown_grace`, and hands back the leases of those still running.
    /// `http` serves /metrics and /healthz.
    pub async fn run(
        self,
        http: Option<TcpListener>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let inner = self.inner;
        if inner.config.database.migrate_on_start {
            inner
                .store
                .migrate()
                .await
                .context("applying the database migrations")?;
        }
        let background = CancellationToken::new();
        let health = &inner.config.health;
        inner.nodes.probe_all(health.timeout.0).await;
        tokio::spawn(inner.nodes.clone().run_prober(
            health.interval.0,
            health.timeout.0,
            background.clone(),
        ));
        tokio::spawn(listen_for_jobs(inner.clone(), background.clone()));
        tokio::spawn(forget_finished_jobs(inner.clone(), background.clone()));
        let http_stop = CancellationToken::new();
        let http_task = http.map(|listener| {
            tokio::spawn(crate::http::serve(
                listener,
                metrics::router(inner.clone()),
                http_stop.clone(),
            ))
        });
        let names: Vec<&str> = self.jobs.iter().map(|job| job.name()).collect();
        tracing::info!(instance = %inner.instance, jobs = ?names, "worker started");
        let supervisors: Vec<_> = self
            .jobs
            .iter()
            .map(|job| tokio::spawn(supervisor::supervise(inner.clone(), *job, shutdown.clone())))
            .collect();
        for supervisor in supervisors {
            let _ = supervisor.await;
        }
        background.cancel();
        http_stop.cancel();
        if let Some(task) = http_task {
            let _ = task.await;
        }
        inner.store.close().await;
        tracing::info!(instance = %inner.instance, "worker stopped");
        Ok(())
    }
}

/// Wakes the job types whose kinds the database announces. Polling covers the time the
/// listener is down.
async fn listen_for_jobs(inner: Arc<Inner>, stop: CancellationToken) {
    let kinds: HashMap<&str, JobType> = inner
        .wakeups
        .keys()
        .flat_map(|job| job.kinds().iter().map(move |kind| (*kind, *job)))
        .collect();
    let mut notices = inner.store.listen(&[JOBS_CHANNEL], stop);
    while let Some(notice) = notices.recv().await {
        if let Notice::Notified { payload, .. } = notice
            && let Some(job) = kinds.get(payload.as_str())
            && let Some(wakeup) = inner.wakeups.get(job)
        {
            wakeup.notify_one();
        }
    }
}

/// Deletes long-finished jobs once an hour.
async fn forget_finished_jobs(inner: Arc<Inner>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(3600));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match inner
            .store
            .forget_finished_jobs(inner.config.worker.keep_finished.0)
            .await
        {
            Ok(0) => {}
            Ok(count) => tracing::info!(count, "forgot finished jobs"),
            Err(error) => tracing::debug!(%error, "cannot forget finished jobs"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_types_parse_by_name() {
        for job in JobType::ALL {
            assert_eq!(JobType::parse(job.name()), Some(job));
        }
        assert_eq!(JobType::parse("nothing"), None);
    }
}

//! The worker's metrics, per job type, and its small HTTP server: `/metrics` and `/healthz`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::response::Response;
use tonic::codegen::http::StatusCode;

use super::{Inner, JobType};
use crate::http::{metric, text};
use crate::store::WalkRecord;

#[derive(Debug, Default)]
struct Counters {
    runs: AtomicU64,
    failures: AtomicU64,
    panics: AtomicU64,
    restarts: AtomicU64,
    lost: AtomicU64,
    in_flight: AtomicU64,
}

/// Counters per job type, since start.
#[derive(Debug)]
pub struct Metrics {
    types: BTreeMap<&'static str, Counters>,
}

/// Counts a job as in flight while it lives.
pub(super) struct InFlight<'a>(&'a AtomicU64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    pub(super) fn new(jobs: &[JobType]) -> Self {
        Self {
            types: jobs
                .iter()
                .map(|job| (job.name(), Counters::default()))
                .collect(),
        }
    }

    fn of(&self, job: JobType) -> &Counters {
        self.types
            .get(job.name())
            .expect("counters exist for every job type the worker runs")
    }

    pub(super) fn count_run(&self, job: JobType, succeeded: bool) {
        let counters = self.of(job);
        counters.runs.fetch_add(1, Ordering::Relaxed);
        if !succeeded {
            counters.failures.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(super) fn count_panic(&self, job: JobType) {
        self.of(job).panics.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn count_restart(&self, job: JobType) {
        self.of(job).restarts.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn count_lost(&self, job: JobType) {
        self.of(job).lost.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn in_flight(&self, job: JobType) -> InFlight<'_> {
        let counter = &self.of(job).in_flight;
        counter.fetch_add(1, Ordering::Relaxed);
        InFlight(counter)
    }

    /// Jobs of the type run to a close, failed ones included.
    pub fn runs(&self, job: JobType) -> u64 {
        self.of(job).runs.load(Ordering::Relaxed)
    }

    pub fn failures(&self, job: JobType) -> u64 {
        self.of(job).failures.load(Ordering::Relaxed)
    }

    pub fn panics(&self, job: JobType) -> u64 {
        self.of(job).panics.load(Ordering::Relaxed)
    }

    /// Times the type's loop was restarted by its supervisor.
    pub fn restarts(&self, job: JobType) -> u64 {
        self.of(job).restarts.load(Ordering::Relaxed)
    }

    /// One sample per job type.
    fn samples(&self, value: impl Fn(&Counters) -> u64) -> Vec<(String, String)> {
        self.types
            .iter()
            .map(|(name, counters)| (format!("{{job=\"{name}\"}}"), value(counters).to_string()))
            .collect()
    }
}

pub(super) fn router(inner: Arc<Inner>) -> axum::Router {
    axum::Router::new()
        .route(
            "/healthz",
            axum::routing::get(|| async { text(StatusCode::OK, "ok") }),
        )
        .route(
            "/metrics",
            axum::routing::get(move || {
                let inner = inner.clone();
                let answer: futures_util::future::BoxFuture<'static, Response> =
                    Box::pin(async move { render(&inner).await });
                answer
            }),
        )
}

/// A counter's name, type and help, and where it is kept.
type Counter = (
    &'static str,
    &'static str,
    &'static str,
    fn(&Counters) -> &AtomicU64,
);

/// Prometheus text: the counters of this worker, and the queue as the database sees it.
async fn render(inner: &Inner) -> Response {
    let metrics = &inner.metrics;
    let mut out = String::new();
    let counters: [Counter; 6] = [
        (
            "runs_total",
            "counter",
            "Jobs run to a close, failed ones included.",
            |c| &c.runs,
        ),
        (
            "failures_total",
            "counter",
            "Jobs that failed (to be retried, or dead).",
            |c| &c.failures,
        ),
        ("panics_total", "counter", "Jobs that panicked.", |c| {
            &c.panics
        }),
        (
            "restarts_total",
            "counter",
            "Restarts of the job type's loop after a panic or an error.",
            |c| &c.restarts,
        ),
        (
            "lost_total",
            "counter",
            "Jobs abandoned because their lease was taken over or cancelled.",
            |c| &c.lost,
        ),
        ("in_flight", "gauge", "Jobs running now.", |c| &c.in_flight),
    ];
    for (name, kind, help, field) in counters {
        metric(
            &mut out,
            &format!("gitfleet_worker_jobs_{name}"),
            kind,
            help,
            &metrics.samples(|c| field(c).load(Ordering::Relaxed)),
        );
    }
    match inner.store.queue_depth().await {
        Ok(depths) => {
            let by_state: Vec<(String, String)> = depths
                .iter()
                .map(|depth| {
                    (
                        format!("{{kind=\"{}\",state=\"{}\"}}", depth.kind, depth.state),
                        depth.count.to_string(),
                    )
                })
                .collect();
            metric(
                &mut out,
                "gitfleet_jobs",
                "gauge",
                "Jobs in the queue, by kind and state.",
                &by_state,
            );
            let oldest: Vec<(String, String)> = depths
                .iter()
                .filter(|depth| depth.state == "queued")
                .map(|depth| {
                    (
                        format!("{{kind=\"{}\"}}", depth.kind),
                        format!("{:.3}", depth.oldest_ready),
                    )
                })
                .collect();
            metric(
                &mut out,
                "gitfleet_jobs_oldest_ready_seconds",
                "gauge",
                "How long the oldest ready job of the kind has waited.",
                &oldest,
            );
            metric(
                &mut out,
                "gitfleet_worker_database_up",
                "gauge",
                "Whether the queue could be read.",
                &[(String::new(), "1".into())],
            );
        }
        Err(error) => {
            tracing::debug!(%error, "cannot read the queue for /metrics");
            metric(
                &mut out,
                "gitfleet_worker_database_up",
                "gauge",
                "Whether the queue could be read.",
                &[(String::new(), "0".into())],
            );
        }
    }
    let nodes: Vec<crate::status::NodeState> = inner
        .nodes
        .storages()
        .map(|node| crate::status::NodeState {
            storage: node.storage.to_string(),
            healthy: node.is_healthy(),
        })
        .collect();
    if let Ok(report) =
        crate::status::Report::gather(&inner.store, &nodes, inner.config.status.stall_after.0).await
    {
        walk_metrics(&mut out, &report.walks);
        status_metrics(&mut out, &report);
    }
    let mut response = text(StatusCode::OK, out.trim_end());
    response.headers_mut().insert(
        "content-type",
        "text/plain; version=0.0.4".parse().expect("a valid header"),
    );
    response
}

/// The last walk of each storage, as recorded in the database by whichever worker walked it.
fn walk_metrics(out: &mut String, walks: &[WalkRecord]) {
    type Figure = (&'static str, &'static str, fn(&WalkRecord) -> String);
    let figures: [Figure; 9] = [
        (
            "last_seen",
            "Replicas on the storage, at its last walk.",
            |w| w.results.seen.to_string(),
        ),
        (
            "last_untracked",
            "Replicas no repository references, at the last walk.",
            |w| w.results.untracked.to_string(),
        ),
        (
            "last_extra",
            "Replicas of repositories not assigned to the storage, at the last walk.",
            |w| w.results.extra.to_string(),
        ),
        (
            "last_quarantined",
            "Replicas the last walk moved to quarantine.",
            |w| w.results.quarantined.to_string(),
        ),
        (
            "last_purged",
            "Quarantined replicas the last walk purged.",
            |w| w.results.purged.to_string(),
        ),
        ("last_errors", "Errors the last walk met.", |w| {
            w.results.errors.to_string()
        }),
        (
            "last_duration_seconds",
            "How long the last walk took.",
            |w| format!("{:.3}", w.results.duration_seconds),
        ),
        (
            "last_age_seconds",
            "How long ago the last walk finished.",
            |w| format!("{:.0}", w.finished_ago_seconds.unwrap_or(f64::INFINITY)),
        ),
        ("runs_total", "Finished walks, ever.", |w| {
            w.walks.to_string()
        }),
    ];
    for (name, help, value) in figures {
        let samples: Vec<(String, String)> = walks
            .iter()
            .map(|walk| (format!("{{storage=\"{}\"}}", walk.storage), value(walk)))
            .collect();
        metric(
            out,
            &format!("gitfleet_walk_{name}"),
            "gauge",
            help,
            &samples,
        );
    }
}

/// The status figures: replicas by state per storage, repositories, the queue's progress, the
/// write lock and the verdict. Read from counter rows and indexes over outstanding work, so a
/// scrape costs the same at a million repositories as at ten.
fn status_metrics(out: &mut String, report: &crate::status::Report) {
    let figures = &report.figures;
    let by_state: Vec<(String, String)> = figures
        .storages
        .iter()
        .flat_map(|s| {
            [
                ("up_to_date", s.up_to_date()),
                ("behind", s.behind),
                ("missing", s.missing),
            ]
            .map(|(state, count)| {
                (
                    format!("{{storage=\"{}\",state=\"{state}\"}}", s.storage),
                    count.to_string(),
                )
            })
        })
        .collect();
    metric(
        out,
        "gitfleet_replicas",
        "gauge",
        "Replicas recorded on each storage, by state.",
        &by_state,
    );
    type Figure = (
        &'static str,
        &'static str,
        &'static str,
        fn(&crate::store::StorageFigures) -> String,
    );
    let per_storage: [Figure; 5] = [
        (
            "gitfleet_replicas_repairing",
            "gauge",
            "Replication jobs running against the storage.",
            |s| s.repairing.to_string(),
        ),
        (
            "gitfleet_replicas_unverified",
            "gauge",
            "Replicas waiting for their first verification.",
            |s| s.unverified.to_string(),
        ),
        (
            "gitfleet_verify_missing_total",
            "counter",
            "Replicas the verifier found missing.",
            |s| s.found_missing.to_string(),
        ),
        (
            "gitfleet_verify_diverged_total",
            "counter",
            "Replicas the verifier found diverged.",
            |s| s.found_diverged.to_string(),
        ),
        (
            "gitfleet_verify_verified_total",
            "counter",
            "Replicas the verifier found in order.",
            |s| s.verified.to_string(),
        ),
    ];
    for (name, kind, help, value) in per_storage {
        let samples: Vec<(String, String)> = figures
            .storages
            .iter()
            .map(|s| (format!("{{storage=\"{}\"}}", s.storage), value(s)))
            .collect();
        metric(out, name, kind, help, &samples);
    }
    let repositories: Vec<(String, String)> = figures
        .repositories
        .iter()
        .map(|(vs, count)| (format!("{{virtual_storage=\"{vs}\"}}"), count.to_string()))
        .collect();
    metric(
        out,
        "gitfleet_repositories",
        "gauge",
        "Repositories in each virtual storage.",
        &repositories,
    );
    let one = |value: String| vec![(String::new(), value)];
    let jobs = &figures.jobs;
    metric(
        out,
        "gitfleet_jobs_ready",
        "gauge",
        "Jobs that could run now.",
        &one(jobs.ready.to_string()),
    );
    metric(
        out,
        "gitfleet_jobs_dead",
        "gauge",
        "Jobs out of attempts.",
        &one(jobs.dead.to_string()),
    );
    if let Some(seconds) = jobs.last_progress_seconds {
        metric(
            out,
            "gitfleet_jobs_last_progress_seconds",
            "gauge",
            "How long ago any job last started or finished.",
            &one(format!("{seconds:.3}")),
        );
    }
    metric(
        out,
        "gitfleet_write_lock",
        "gauge",
        "Whether the cluster-wide write lock is on.",
        &one(u8::from(figures.write_lock.enabled).to_string()),
    );
    metric(
        out,
        "gitfleet_status",
        "gauge",
        "The status verdict: 0 healthy, 1 repairing, 2 needs attention (as `admin status`).",
        &one(match report.verdict {
            crate::status::Verdict::Healthy => "0",
            crate::status::Verdict::Repairing => "1",
            crate::status::Verdict::Attention => "2",
        }
        .to_owned()),
    );
}

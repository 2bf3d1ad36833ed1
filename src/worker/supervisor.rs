//! One supervisor per job type: it runs the type's queue loop as a task of its own and, when
//! that loop panics or fails, logs why, counts it, hands back the leases the loop held, and
//! starts it again after a backoff. The other job types never notice.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::{Inner, JobType, queue, reconcile, recover, verify, walker};
use crate::toolkit::Backoff;

/// The longest wait between restarts.
const MAX_RESTART_BACKOFF: Duration = Duration::from_secs(60);
/// A loop that ran this long before failing starts its backoff over.
const STABLE: Duration = Duration::from_secs(60);

pub(super) async fn supervise(inner: Arc<Inner>, job: JobType, shutdown: CancellationToken) {
    let kinds: Vec<String> = job.kinds().iter().map(|kind| kind.to_string()).collect();
    let mut failures = 0u32;
    loop {
        let started = Instant::now();
        let run = match job {
            JobType::Walker => tokio::spawn(walker::run(inner.clone(), shutdown.clone())),
            JobType::Verifier => tokio::spawn(verify::run(inner.clone(), shutdown.clone())),
            JobType::Reconciler => tokio::spawn(reconcile::run(inner.clone(), shutdown.clone())),
            JobType::Recovery => tokio::spawn(recover::run(inner.clone(), shutdown.clone())),
            _ => tokio::spawn(queue::run(inner.clone(), job, shutdown.clone())),
        };
        let reason = match run.await {
            Ok(Ok(())) => return,
            Ok(Err(error)) => format!("{error:#}"),
            Err(join) if join.is_panic() => {
                format!("panicked: {}", queue::panic_message(join.into_panic()))
            }
            Err(_) => return,
        };
        inner.metrics.count_restart(job);
        if job == JobType::Walker {
            let _ = inner.store.release_storage_walks_of(&inner.instance).await;
        }
        match inner.store.release_jobs_of(&inner.instance, &kinds).await {
            Ok(released) => tracing::error!(
                job = job.name(),
                reason,
                released,
                "job type stopped; restarting it"
            ),
            Err(error) => tracing::error!(
                job = job.name(),
                reason,
                %error,
                "job type stopped, and its leases could not be handed back (they expire); restarting it"
            ),
        }
        if started.elapsed() > STABLE {
            failures = 0;
        }
        let delay = Backoff::new(inner.config.worker.restart_backoff.0, MAX_RESTART_BACKOFF)
            .delay(failures);
        failures += 1;
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

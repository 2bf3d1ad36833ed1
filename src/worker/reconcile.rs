//! The reconciler: every `reconciler.interval`, one round in which the one reconciler holding
//! the database lock brings assignments to the replication factors (a sweep at a time) and
//! queues the replication of every assigned replica that is missing or behind. However many
//! workers run it, one decides at a time; the others find the lock taken and wait for the next
//! round. The replicators then run the jobs, at most `worker.max_jobs_per_target` at once
//! against one storage.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::{Inner, JobType};

pub(super) async fn run(inner: Arc<Inner>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let config = &inner.config.reconciler;
    let placements = inner.nodes.placements();
    while !shutdown.is_cancelled() {
        let healthy = inner.nodes.healthy();
        let round = {
            let _in_flight = inner.metrics.in_flight(JobType::Reconciler);
            inner
                .store
                .reconcile_round(&placements, &healthy, config.sweep.max(1), config.batch)
                .await
        };
        match round {
            Ok(Some(round)) => {
                if round.assigned + round.unassigned + round.recorded_missing + round.queued > 0 {
                    tracing::info!(?round, "reconciled");
                }
                inner.metrics.count_run(JobType::Reconciler, true);
            }
            Ok(None) => tracing::debug!("another reconciler is deciding"),
            Err(error) => {
                tracing::warn!(%error, "reconciler round failed");
                inner.metrics.count_run(JobType::Reconciler, false);
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = tokio::time::sleep(config.interval.0) => {}
        }
    }
    Ok(())
}

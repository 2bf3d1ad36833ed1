//! A job type's queue loop: claim ready jobs up to the concurrency, run each in a task of its
//! own with a heartbeat that renews its lease, and close it with a statement fenced by the
//! lease token. A job whose lease is lost (taken over, cancelled) is abandoned at once and
//! changes nothing.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{Inner, JobType, Outcome};
use crate::store::{ClaimedJob, Closed, StoreError};
use crate::toolkit::{Backoff, LeaseKeeper, Retry, retry};

/// Attempts at a closing statement while the database is unreachable, within the lease.
const CLOSE_ATTEMPTS: u32 = 5;
/// The pause after the first failed attempt; it doubles up to a quarter of the lease.
const FIRST_CLOSE_PAUSE: Duration = Duration::from_millis(200);

/// Runs `job`'s queue until `shutdown`. Returns an error, or panics, only when the loop itself
/// must be restarted by its supervisor.
pub(super) async fn run(
    inner: Arc<Inner>,
    job: JobType,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let kinds: Vec<String> = job.kinds().iter().map(|kind| kind.to_string()).collect();
    let worker = &inner.config.worker;
    // Noop jobs touch no node, so no target needs sparing from them.
    let per_target = match job {
        JobType::Noop => usize::MAX,
        _ => worker.max_jobs_per_target,
    };
    let wakeup = inner
        .wakeups
        .get(&job)
        .expect("every job type has a wakeup");
    let mut running: JoinSet<()> = JoinSet::new();
    let mut claimed: HashMap<tokio::task::Id, ClaimedJob> = HashMap::new();
    // Cancelled when the grace period is over: running jobs hand their leases back.
    let give_up = CancellationToken::new();
    while !shutdown.is_cancelled() {
        let free = worker.concurrency.saturating_sub(running.len());
        let mut full = false;
        if free > 0 {
            // The leases run from the moment the claim was sent.
            let claim_sent = tokio::time::Instant::now();
            match inner
                .store
                .claim_jobs(&kinds, &inner.instance, worker.lease.0, free, per_target)
                .await
            {
                Ok(jobs) => {
                    full = jobs.len() == free;
                    for claimed_job in jobs {
                        let task = running.spawn(execute(
                            inner.clone(),
                            job,
                            claimed_job.clone(),
                            claim_sent,
                            give_up.clone(),
                        ));
                        claimed.insert(task.id(), claimed_job);
                    }
                }
                Err(StoreError::Unavailable(error)) => {
                    tracing::warn!(job = job.name(), %error, "cannot claim jobs: the database is unavailable");
                }
                Err(error) => return Err(error.into()),
            }
        }
        // When every slot was filled more may be ready: claim again as soon as one frees.
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = wakeup.notified(), if !full => {}
            _ = tokio::time::sleep(worker.poll_interval.0), if !full => {}
            Some(result) = running.join_next_with_id(), if !running.is_empty() => {
                reap(&inner, job, &mut claimed, result).await?;
            }
        }
    }
    // Stopping: nothing more is claimed; running jobs get the grace period.
    let deadline = tokio::time::sleep(worker.shutdown_grace.0);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            result = running.join_next_with_id() => match result {
                Some(result) => reap(&inner, job, &mut claimed, result).await?,
                None => break,
            },
            _ = &mut deadline, if !give_up.is_cancelled() => {
                tracing::warn!(job = job.name(), running = running.len(), "grace period over: handing back the running jobs");
                give_up.cancel();
            }
        }
    }
    Ok(())
}

/// Accounts for a finished job task. A panic is the job type's failure: the job is failed
/// (it will not run again at once), and the error goes up for the supervisor to restart the
/// loop.
async fn reap(
    inner: &Inner,
    job: JobType,
    claimed: &mut HashMap<tokio::task::Id, ClaimedJob>,
    result: Result<(tokio::task::Id, ()), tokio::task::JoinError>,
) -> anyhow::Result<()> {
    let id = match &result {
        Ok((id, ())) => *id,
        Err(error) => error.id(),
    };
    let Some(claimed_job) = claimed.remove(&id) else {
        return Ok(());
    };
    let Err(error) = result else { return Ok(()) };
    if !error.is_panic() {
        return Ok(());
    }
    let message = panic_message(error.into_panic());
    inner.metrics.count_run(job, false);
    inner.metrics.count_panic(job);
    tracing::error!(
        job = job.name(),
        id = %claimed_job.id,
        repository = %claimed_job.repository,
        target = %claimed_job.target,
        panic = message,
        "a job panicked"
    );
    let delay = inner.backoff(claimed_job.attempts - 1, inner.config.worker.max_backoff.0);
    let _ = inner
        .store
        .fail_job(
            claimed_job.id,
            claimed_job.lease_token,
            &format!("panicked: {message}"),
            inner.config.worker.max_attempts,
            delay,
        )
        .await;
    anyhow::bail!("job {} panicked: {message}", claimed_job.id)
}

pub(super) fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|text| text.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic with no message".into())
}

/// Runs one job under its lease: heartbeats while it works, then closes it.
async fn execute(
    inner: Arc<Inner>,
    job: JobType,
    claimed: ClaimedJob,
    claim_sent: tokio::time::Instant,
    give_up: CancellationToken,
) {
    let _in_flight = inner.metrics.in_flight(job);
    if let Some(on_start) = &inner.hooks.on_start {
        on_start(&claimed);
    }
    let started = Instant::now();
    let keeper = heartbeat(&inner, &claimed, claim_sent);
    let outcome = tokio::select! {
        outcome = job.run(&inner, &claimed) => Some(outcome),
        _ = keeper.lost().cancelled() => None,
        _ = give_up.cancelled() => {
            drop(keeper);
            let closed = close(&inner, &claimed, || inner.store.release_job(claimed.id, claimed.lease_token)).await;
            tracing::info!(job = job.name(), id = %claimed.id, ?closed, "handed back at shutdown");
            return;
        }
    };
    drop(keeper);
    let Some(outcome) = outcome else {
        inner.metrics.count_lost(job);
        tracing::warn!(job = job.name(), id = %claimed.id, "lease lost (cancelled or taken over): stopped, nothing recorded");
        return;
    };
    let worker = &inner.config.worker;
    let (closed, error) = match outcome {
        Outcome::Done => (
            close(&inner, &claimed, || {
                inner.store.complete_job(claimed.id, claimed.lease_token)
            })
            .await,
            None,
        ),
        Outcome::Closed(closed) => (Some(closed), None),
        Outcome::Failed(error) => {
            let delay = inner.backoff(claimed.attempts - 1, worker.max_backoff.0);
            let closed = close(&inner, &claimed, || {
                inner.store.fail_job(
                    claimed.id,
                    claimed.lease_token,
                    &error,
                    worker.max_attempts,
                    delay,
                )
            })
            .await;
            (closed, Some(error))
        }
        Outcome::Postponed(reason) => {
            let delay = inner.backoff(claimed.postponed, worker.max_backoff.0);
            let closed = close(&inner, &claimed, || {
                inner
                    .store
                    .postpone_job(claimed.id, claimed.lease_token, &reason, delay)
            })
            .await;
            (closed, Some(reason))
        }
    };
    let failed = matches!(closed, Some(Closed::Retrying | Closed::Dead));
    inner.metrics.count_run(job, !failed);
    if closed == Some(Closed::Lost) {
        inner.metrics.count_lost(job);
    }
    let elapsed = started.elapsed();
    match (closed, error) {
        (Some(Closed::Dead), Some(error)) => {
            tracing::error!(job = job.name(), id = %claimed.id, attempts = claimed.attempts, error, "job is dead: out of attempts")
        }
        (Some(Closed::Retrying), Some(error)) => {
            tracing::warn!(job = job.name(), id = %claimed.id, attempts = claimed.attempts, error, "job failed; it will be retried")
        }
        (Some(Closed::Postponed), Some(reason)) => {
            tracing::info!(job = job.name(), id = %claimed.id, reason, "job postponed")
        }
        (closed, _) => {
            tracing::debug!(job = job.name(), id = %claimed.id, ?closed, ?elapsed, "job closed")
        }
    }
}

/// Runs a closing statement, retrying while the database is unreachable. None: it could not
/// be run; the lease then expires and another run redoes the job, which is safe.
async fn close<F, Fut>(inner: &Inner, claimed: &ClaimedJob, statement: F) -> Option<Closed>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Closed, StoreError>>,
{
    let backoff = Backoff::exact(FIRST_CLOSE_PAUSE, inner.config.worker.lease.0 / 4);
    let policy = Retry::attempts(backoff, CLOSE_ATTEMPTS);
    match retry(
        &policy,
        "closing a job",
        None,
        StoreError::is_unavailable,
        statement,
    )
    .await
    {
        Ok(closed) => Some(closed),
        Err(stop) => {
            let error = stop.into_error().map(|error| error.to_string());
            let error = error.as_deref().unwrap_or_default();
            tracing::warn!(id = %claimed.id, error, "cannot close a job: its lease will expire and it will run again");
            None
        }
    }
}

/// Renews the job's lease every third of it while it runs; the keeper's `lost` is cancelled
/// when the lease is gone or may have run out.
fn heartbeat(
    inner: &Arc<Inner>,
    claimed: &ClaimedJob,
    claim_sent: tokio::time::Instant,
) -> LeaseKeeper {
    let lease = inner.config.worker.lease.0;
    let store = inner.store.clone();
    let (id, token) = (claimed.id, claimed.lease_token);
    LeaseKeeper::start("job", lease, claim_sent, move || {
        let store = store.clone();
        async move { store.renew_job(id, token, lease, None).await }
    })
}

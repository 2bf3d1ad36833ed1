//! The replicator: brings a target replica to its repository's generation from an up-to-date
//! replica, in the two phases of the target node's ReplicateRepository.
//!
//! 1. Objects, with no lease: the long part. It changes no reference, so it harms nothing if
//!    it runs late, or twice.
//! 2. Refs: the repository's lease is taken as a write takes it (waiting while writes hold
//!    it), the target's references and HEAD are set to the source's under the lease's token,
//!    which the target's node keeps as the replica's fence, and one statement fenced by the
//!    job's lease and the repository's records the target at the leased generation and
//!    releases the lease.
//!
//! Writes, recoveries and replications of a repository are thus totally ordered: a lagging
//! replica catches up while its repository is busy (the writers pause only for the refs
//! phase), and a replication that resumes after a newer lease changed the replica is refused
//! by the node.

use std::time::Duration;

use tonic::Code;

use super::{Inner, Outcome, Pause};
use crate::auth::{REPLICATION_SCOPE, sign};
use crate::fleet::{NodeHandle, set_fence};
use crate::model::{RelativePath, StorageName};
use crate::proto::node_service_client::NodeServiceClient;
use crate::proto::{
    ReplicateRepositoryRequest, ReplicateRepositoryResponse, ReplicationPhase, RepositoryHeader,
    SourceRepository,
};
use crate::store::{ClaimedJob, LeasedReplication, ReplicationLease, StoreError};
use crate::toolkit::{Backoff, Retry, Stop, retry};

/// The pause after the repository's lease was found taken; it doubles up to the next. Shorter
/// than a write's, so that a replication waiting among busy writers gets its turn.
const FIRST_BUSY_PAUSE: Duration = Duration::from_millis(5);
const LONGEST_BUSY_PAUSE: Duration = Duration::from_millis(50);

pub(super) async fn run(inner: &Inner, job: &ClaimedJob) -> Outcome {
    let plan = match inner
        .store
        .plan_replication(job.repository, job.source.as_ref(), &job.target)
        .await
    {
        Ok(Some(plan)) => plan,
        // Removed: nothing left to copy.
        Ok(None) => return Outcome::Done,
        Err(error) => return store_failed(error),
    };
    if plan.target_generation == Some(plan.generation) {
        return Outcome::Done;
    }
    if !plan.target_assigned && plan.target_generation.is_none() {
        // No longer meant to be there, and not there: nothing to do.
        return Outcome::Done;
    }
    let Some(target) = inner.nodes.get(&job.target) else {
        return Outcome::Failed(format!("storage {} is not configured", job.target));
    };
    if !target.is_healthy() {
        return Outcome::Postponed(format!("{} is down", job.target));
    }
    let source = match pick_source(inner, job, &plan.sources) {
        Ok(source) => source,
        Err(outcome) => return outcome,
    };
    let _ = inner
        .store
        .renew_job(
            job.id,
            job.lease_token,
            inner.config.worker.lease.0,
            Some(&format!(
                "copying the objects of generation {} from {}",
                plan.generation, source.storage
            )),
        )
        .await;
    let copy = Copy {
        inner,
        job,
        target,
        replica_path: &plan.replica_path,
    };
    if let Err(outcome) = copy.send(source, ReplicationPhase::Objects, None).await {
        return outcome;
    }
    if let Some(pause) = &inner.hooks.pause {
        pause(Pause::Copied(job.clone())).await;
    }

    let (leased, taken_at) = match take_lease(inner, job).await {
        Ok(taken) => taken,
        Err(outcome) => return outcome,
    };
    let release = async || {
        if let Err(error) = inner
            .store
            .release_repository_lease(leased.repository, leased.token, &inner.instance)
            .await
        {
            tracing::debug!(%error, "the replication's lease runs out by itself");
        }
    };
    if leased.target_generation == Some(leased.generation) {
        release().await;
        return Outcome::Done;
    }
    let _keeper =
        inner.keep_repository_lease("replication", leased.repository, leased.token, taken_at);
    if let Some(pause) = &inner.hooks.pause {
        pause(Pause::Leased(job.clone(), leased.token)).await;
    }
    let copied = match pick_source(inner, job, &leased.sources) {
        Ok(source) => {
            copy.send(source, ReplicationPhase::Refs, Some(leased.token))
                .await
        }
        Err(outcome) => Err(outcome),
    };
    if let Err(outcome) = copied {
        release().await;
        return outcome;
    }
    match inner
        .store
        .close_replication(job, &leased, &inner.instance)
        .await
    {
        Ok((closed, recorded)) => {
            tracing::info!(
                id = %job.id,
                repository = %job.repository,
                target = %job.target,
                copied = leased.generation,
                recorded,
                ?closed,
                "replicated"
            );
            if let Some(pause) = &inner.hooks.pause {
                pause(Pause::Closed(job.clone(), closed)).await;
            }
            Outcome::Closed(closed)
        }
        // Not recorded: the leases run out and a later run copies again (cheaply: the target
        // already has the objects).
        Err(error) => Outcome::Failed(format!("recording the replica: {error}")),
    }
}

/// The first up-to-date replica on a healthy node, the job's own source first.
fn pick_source<'a>(
    inner: &'a Inner,
    job: &ClaimedJob,
    sources: &[StorageName],
) -> Result<&'a NodeHandle, Outcome> {
    let Some(source) = sources
        .iter()
        .find_map(|storage| inner.nodes.get(storage).filter(|node| node.is_healthy()))
    else {
        return Err(if sources.is_empty() {
            Outcome::Failed("no replica is up to date: there is nothing to copy from".into())
        } else {
            Outcome::Postponed("every up-to-date replica is on a node that is down".into())
        });
    };
    if let Some(wanted) = &job.source
        && *wanted != source.storage
    {
        tracing::debug!(id = %job.id, %wanted, chosen = %source.storage, "the job's source is behind or down: copying from another");
    }
    Ok(source)
}

/// Takes the repository's lease for the refs phase, waiting while writes hold it, up to
/// `writes.lease_wait`. Returns it and when the statement that took it was sent.
async fn take_lease(
    inner: &Inner,
    job: &ClaimedJob,
) -> Result<(LeasedReplication, tokio::time::Instant), Outcome> {
    let wait = inner.config.writes.lease_wait.0;
    let policy = Retry::until(
        Backoff::exact(FIRST_BUSY_PAUSE, LONGEST_BUSY_PAUSE),
        tokio::time::Instant::now() + wait,
    );
    let attempt = || async {
        let sent = tokio::time::Instant::now();
        match inner
            .store
            .lease_for_replication(
                job.repository,
                job.source.as_ref(),
                &job.target,
                &inner.instance,
                inner.config.worker.lease.0,
            )
            .await
        {
            Ok(ReplicationLease::Busy) => Err(Taking::Busy),
            Ok(taken) => Ok((taken, sent)),
            Err(error) => Err(Taking::Store(error)),
        }
    };
    match retry(
        &policy,
        "waiting for the repository's lease",
        None,
        Taking::is_busy,
        attempt,
    )
    .await
    {
        Ok((ReplicationLease::Leased(leased), sent)) => Ok((leased, sent)),
        Ok((ReplicationLease::Gone, _)) => Err(Outcome::Done),
        Ok((ReplicationLease::Interrupted, _)) => Err(Outcome::Postponed(
            "an interrupted write to the repository is being recovered".into(),
        )),
        Err(Stop::Permanent(Taking::Store(error))) => Err(store_failed(error)),
        Ok((ReplicationLease::Busy, _)) | Err(_) => Err(Outcome::Postponed(format!(
            "writes held the repository's lease for {wait:?}"
        ))),
    }
}

/// Why taking the repository's lease did not work this time.
#[derive(Debug, thiserror::Error)]
enum Taking {
    #[error("a write holds the lease")]
    Busy,
    #[error(transparent)]
    Store(StoreError),
}

impl Taking {
    fn is_busy(&self) -> bool {
        matches!(self, Taking::Busy)
    }
}

fn store_failed(error: StoreError) -> Outcome {
    match error {
        StoreError::Unavailable(_) => Outcome::Postponed(error.to_string()),
        error => Outcome::Failed(error.to_string()),
    }
}

/// One replication's calls to its target node.
struct Copy<'a> {
    inner: &'a Inner,
    job: &'a ClaimedJob,
    target: &'a NodeHandle,
    replica_path: &'a RelativePath,
}

impl Copy<'_> {
    /// Sends one phase of the replication from `source`, with the lease's token for the
    /// refs phase.
    async fn send(
        &self,
        source: &NodeHandle,
        phase: ReplicationPhase,
        token: Option<i64>,
    ) -> Result<ReplicateRepositoryResponse, Outcome> {
        let mut request = tonic::Request::new(ReplicateRepositoryRequest {
            repository: Some(RepositoryHeader {
                storage: self.job.target.to_string(),
                relative_path: self.replica_path.to_string(),
            }),
            source: Some(SourceRepository {
                address: source.address.clone(),
                storage: source.storage.to_string(),
                relative_path: self.replica_path.to_string(),
                token: sign(source.secret(), REPLICATION_SCOPE),
            }),
            phase: phase.into(),
        });
        request.set_timeout(self.inner.config.worker.replication_timeout.0);
        if let Some(token) = token {
            set_fence(request.metadata_mut(), token);
        }
        match NodeServiceClient::new(self.target.authed())
            .replicate_repository(request)
            .await
        {
            Ok(response) => Ok(response.into_inner()),
            Err(status) => {
                let message = format!(
                    "replicating {} from {} to {} ({}): {}",
                    self.replica_path,
                    source.storage,
                    self.job.target,
                    phase.as_str_name(),
                    status.message()
                );
                Err(match status.code() {
                    Code::Unavailable => Outcome::Postponed(message),
                    _ => Outcome::Failed(message),
                })
            }
        }
    }
}

//! The replicator: brings a target replica to its repository's generation by mirroring an
//! up-to-date replica with the target node's ReplicateRepository, then records the result with
//! one statement fenced by the job's lease (see `Store::close_replication`).

use tonic::Code;

use super::{Inner, Outcome, Pause};
use crate::auth::{REPLICATION_SCOPE, sign};
use crate::proto::node_service_client::NodeServiceClient;
use crate::proto::{ReplicateRepositoryRequest, RepositoryHeader, SourceRepository};
use crate::store::{ClaimedJob, StoreError};

pub(super) async fn run(inner: &Inner, job: &ClaimedJob) -> Outcome {
    let plan = match inner
        .store
        .plan_replication(job.repository, job.source.as_ref(), &job.target)
        .await
    {
        Ok(Some(plan)) => plan,
        // Removed: nothing left to copy.
        Ok(None) => return Outcome::Done,
        Err(error @ StoreError::Unavailable(_)) => return Outcome::Postponed(error.to_string()),
        Err(error) => return Outcome::Failed(error.to_string()),
    };
    if plan.writing {
        return Outcome::Postponed("a write to the repository is in flight".into());
    }
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
    let Some(source) = plan
        .sources
        .iter()
        .find_map(|storage| inner.nodes.get(storage).filter(|node| node.is_healthy()))
    else {
        return if plan.sources.is_empty() {
            Outcome::Failed("no replica is up to date: there is nothing to copy from".into())
        } else {
            Outcome::Postponed("every up-to-date replica is on a node that is down".into())
        };
    };
    if let Some(wanted) = &job.source
        && *wanted != source.storage
    {
        tracing::debug!(id = %job.id, %wanted, chosen = %source.storage, "the job's source is behind or down: copying from another");
    }
    let _ = inner
        .store
        .renew_job(
            job.id,
            job.lease_token,
            inner.config.worker.lease.0,
            Some(&format!(
                "copying generation {} from {}",
                plan.generation, source.storage
            )),
        )
        .await;
    let mut request = tonic::Request::new(ReplicateRepositoryRequest {
        repository: Some(RepositoryHeader {
            storage: job.target.to_string(),
            relative_path: plan.replica_path.to_string(),
        }),
        source: Some(SourceRepository {
            address: source.address.clone(),
            storage: source.storage.to_string(),
            relative_path: plan.replica_path.to_string(),
            token: sign(source.secret(), REPLICATION_SCOPE),
        }),
    });
    request.set_timeout(inner.config.worker.replication_timeout.0);
    if let Err(status) = NodeServiceClient::new(target.authed())
        .replicate_repository(request)
        .await
    {
        let message = format!(
            "replicating {} from {} to {}: {}",
            plan.replica_path,
            source.storage,
            job.target,
            status.message()
        );
        return match status.code() {
            Code::Unavailable => Outcome::Postponed(message),
            _ => Outcome::Failed(message),
        };
    }
    if let Some(pause) = &inner.hooks.pause {
        pause(Pause::Copied(job.clone())).await;
    }
    match inner.store.close_replication(job, &plan).await {
        Ok((closed, recorded)) => {
            tracing::info!(
                id = %job.id,
                repository = %job.repository,
                target = %job.target,
                source = %source.storage,
                copied = plan.generation,
                recorded,
                ?closed,
                "replicated"
            );
            if let Some(pause) = &inner.hooks.pause {
                pause(Pause::Closed(job.clone(), closed)).await;
            }
            Outcome::Closed(closed)
        }
        // Not recorded: the lease expires and a later run copies again (cheaply: the target
        // already has the objects).
        Err(error) => Outcome::Failed(format!("recording the replica: {error}")),
    }
}

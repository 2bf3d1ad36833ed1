//! Creation, removal and the questions PostgreSQL answers alone.

use std::time::Duration;

use bytes::Bytes;
use prost::Message as _;
use tonic::{Request, Response};

use super::error::ProxyError;
use super::forward::{lookup, send};
use super::response::{ResponseStream, single};
use super::write::keep_write_lease;
use super::{Call, Proxy, header};
use crate::fleet::{NewPlacement, majority};
use crate::model::{RelativePath, RepositoryId, StorageName};
use crate::proto::{
    RemoveRepositoryResponse, RenameRepositoryRequest, RenameRepositoryResponse,
    RepositoryExistsResponse,
};
use crate::store::{Deleted, Deletion, NewRepository, RemovedRepository, Renamed, Which};

/// How long removal waits for the nodes: what is left is the removal jobs'.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Removal jobs wait this long before they run, so that they do not race the proxy's own
/// attempt.
pub(super) const REMOVAL_JOB_DELAY: Duration = Duration::from_secs(15);
/// Undoing a creation: nothing was acknowledged, so nothing waits.
const UNDO: Deletion = Deletion {
    force: true,
    remove_after: Some(REMOVAL_JOB_DELAY),
    unwritten_only: false,
};

const EXISTS: &str = "/gitfleet.v1.RepositoryService/RepositoryExists";
const CREATE: &str = "/gitfleet.v1.RepositoryService/CreateRepository";
const RENAME: &str = "/gitfleet.v1.RepositoryService/RenameRepository";

/// Writes the repository row and its assignments with the creation's lease and intent, then
/// creates the replicas. A replica that fails is queued for repair; fewer than a majority
/// undoes the row. A creation whose proxy dies is left to the recovery job.
pub(super) async fn create(
    proxy: &Proxy,
    call: Call,
) -> Result<Response<ResponseStream>, ProxyError> {
    let state = &proxy.state;
    // Checked first so that a duplicate uses up no id; the insert below settles races.
    if state
        .routing
        .lookup(&call.virtual_storage, &call.relative_path)
        .await?
        .is_some()
    {
        return Err(ProxyError::AlreadyExists(call.repository()));
    }
    let creation = Creation {
        first: &call.first,
        located: &call.located,
        virtual_storage: &call.virtual_storage,
        relative_path: &call.relative_path,
        by_push: false,
    };
    make(proxy, &creation).await?;
    Ok(single(crate::proto::CreateRepositoryResponse {}))
}

/// A repository to make: where, and the `CreateRepository` message its replicas get.
pub(super) struct Creation<'a> {
    pub first: &'a Bytes,
    pub located: &'a header::Located,
    pub virtual_storage: &'a StorageName,
    pub relative_path: &'a RelativePath,
    /// Made by a push (push-to-create), which undoes it if it fails before it commits.
    pub by_push: bool,
}

/// Makes a repository: its row, then its replicas; returns its id. AlreadyExists when the path
/// is taken.
pub(super) async fn make(
    proxy: &Proxy,
    creation: &Creation<'_>,
) -> Result<RepositoryId, ProxyError> {
    let state = &proxy.state;
    let repository = format!("{}/{}", creation.virtual_storage, creation.relative_path);
    let virtual_storage = state
        .nodes
        .virtual_storage(creation.virtual_storage.as_str())
        .ok_or_else(|| ProxyError::UnknownVirtualStorage(creation.virtual_storage.to_string()))?;
    let factor = virtual_storage.replication_factor;
    let NewPlacement {
        assigned,
        reachable,
    } = virtual_storage.place_new(|storage| state.nodes.is_healthy(storage));
    if reachable.len() < majority(factor) {
        return Err(ProxyError::not_enough(
            repository.clone(),
            &assigned,
            &reachable,
        ));
    }

    let id = state.store.next_repository_id().await?;
    let new = NewRepository {
        id,
        virtual_storage: creation.virtual_storage.clone(),
        relative_path: creation.relative_path.clone(),
        primary: reachable[0].clone(),
        assigned: assigned.clone(),
        awaiting_first_push: creation.by_push,
    };
    let duration = state.config.writes.lease.0;
    let taken_at = tokio::time::Instant::now();
    let Some(lease) = state
        .store
        .insert_repository(&new, &state.instance_id, duration, CREATE)
        .await?
    else {
        return Err(ProxyError::AlreadyExists(repository));
    };
    let replica_path = id.replica_path();
    tracing::info!(%id, %replica_path, assigned = ?assigned, "repository recorded");
    // Renewal stops when the keeper is dropped, however the creation ends.
    let _keeper = keep_write_lease(state, "create", &lease, taken_at);

    let attempts = reachable.iter().map(|storage| {
        let message = header::rewrite(
            creation.first,
            creation.located,
            storage.as_str(),
            replica_path.as_str(),
        );
        unary(proxy, storage, CREATE, message)
    });
    let results = futures_util::future::join_all(attempts).await;
    let mut created = Vec::new();
    let mut errors = Vec::new();
    for (storage, result) in reachable.iter().zip(results) {
        match result {
            Ok(_) => created.push(storage.clone()),
            Err(error) => {
                tracing::warn!(%storage, %error, "replica not created");
                errors.push(error.to_string());
            }
        }
    }
    if created.len() >= majority(factor) {
        // The empty repository's refs checksum (HEAD alone), which pushes advance from.
        let checksum = match state.nodes.replica(&created[0], &replica_path) {
            Some(replica) => replica.refs_checksum().await.ok(),
            None => None,
        };
        let failed: Vec<StorageName> = assigned
            .iter()
            .filter(|storage| !created.contains(storage))
            .cloned()
            .collect();
        match state
            .store
            .record_created_replicas(
                &lease,
                &state.instance_id,
                &created,
                &failed,
                &created[0],
                checksum.as_deref(),
            )
            .await
        {
            Ok(true) => return Ok(id),
            // Taken over: the recovery job finishes or undoes the creation.
            Ok(false) => {
                return Err(ProxyError::WriteFailed {
                    repository,
                    reason: "the creation's lease was lost before it was recorded; the \
                             recovery job finishes or undoes it"
                        .into(),
                });
            }
            Err(error) => {
                // Without its replicas recorded the repository could not be served: undo it,
                // if the database lets us.
                tracing::warn!(%error, "replicas not recorded: undoing the creation");
                if let Ok(Deleted::Removed(removed)) =
                    state.store.delete_repository(Which::Id(id), UNDO).await
                {
                    remove_replicas(proxy, &removed).await;
                }
                return Err(error.into());
            }
        }
    }
    // Not enough replicas to stand on: the creation is undone and the replicas that were made
    // are removed (what a removal misses, the storage walker finds).
    if let Deleted::Removed(removed) = state.store.delete_repository(Which::Id(id), UNDO).await? {
        remove_replicas(proxy, &removed).await;
    }
    Err(ProxyError::WriteFailed {
        repository,
        reason: format!(
            "only {} of {factor} replicas could be created: {}",
            created.len(),
            errors.join("; ")
        ),
    })
}

/// Deletes the row and queues one removal job per replica (one statement), then removes the
/// replicas at once, briefly: what fails is left to the jobs, and in the last resort to the
/// storage walker. A write in flight is waited for, up to `writes.lease_wait`; after that the
/// row goes anyway and the write, fenced on it, commits nothing.
pub(super) async fn remove(
    proxy: &Proxy,
    call: Call,
) -> Result<Response<ResponseStream>, ProxyError> {
    let state = &proxy.state;
    let removed = state
        .store
        .delete_repository_after_writes(
            Which::Path(&call.virtual_storage, &call.relative_path),
            Some(REMOVAL_JOB_DELAY),
            state.config.writes.lease_wait.0,
        )
        .await?
        .ok_or_else(|| ProxyError::NotFound(call.repository()))?;
    state.routing.invalidate(removed.id);
    tracing::info!(id = %removed.id, replica_path = %removed.replica_path, "repository removed from the catalog");
    remove_replicas(proxy, &removed).await;
    Ok(single(RemoveRepositoryResponse {}))
}

/// Removes the replicas of a deleted repository, briefly, and closes the removal jobs of those
/// that are gone.
pub(super) async fn remove_replicas(proxy: &Proxy, removed: &RemovedRepository) {
    let replica_path = &removed.replica_path;
    let removals = removed.storages.iter().map(|storage| async move {
        let replica = proxy.state.nodes.replica(storage, replica_path)?;
        if !replica.node.is_healthy() {
            tracing::info!(%storage, %replica_path, "node is down: the replica is left to its removal job");
            return None;
        }
        match tokio::time::timeout(REMOVE_TIMEOUT, replica.remove(Some(removed.fence))).await {
            Ok(Ok(_)) => Some(storage.clone()),
            Ok(Err(status)) if status.code() == tonic::Code::NotFound => Some(storage.clone()),
            // A newer token raised the fence (an adoption, or one that never committed): the
            // removal job decides, under the replica path's lock.
            Ok(Err(status)) if crate::fleet::is_fenced(&status) => {
                tracing::info!(%storage, %replica_path, %status, "replica fenced: left to its removal job");
                None
            }
            Ok(Err(status)) => {
                tracing::warn!(%storage, %replica_path, %status, "replica left to its removal job");
                None
            }
            Err(_) => {
                tracing::warn!(%storage, %replica_path, "replica removal timed out: left to its removal job");
                None
            }
        }
    });
    let gone: Vec<StorageName> = futures_util::future::join_all(removals)
        .await
        .into_iter()
        .flatten()
        .collect();
    if let Err(error) = proxy.state.store.finish_removals(removed.id, &gone).await {
        // The jobs run anyway and find nothing to remove.
        tracing::debug!(%error, "removal jobs not closed");
    }
}

/// Calls answered from the catalog.
pub(super) async fn answer(
    proxy: &Proxy,
    call: Call,
) -> Result<Response<ResponseStream>, ProxyError> {
    match call.info.path {
        EXISTS => {
            let exists = proxy
                .state
                .routing
                .lookup(&call.virtual_storage, &call.relative_path)
                .await?
                .is_some_and(|record| !record.unborn);
            Ok(single(RepositoryExistsResponse { exists }))
        }
        RENAME => {
            let request = RenameRepositoryRequest::decode(call.first.clone())
                .map_err(|_| ProxyError::Undecodable("RenameRepositoryRequest"))?;
            let to = RelativePath::parse(&request.new_relative_path)?;
            let renamed = proxy
                .state
                .store
                .rename_repository(&call.virtual_storage, &call.relative_path, &to)
                .await?;
            match renamed {
                Renamed::Done => Ok(single(RenameRepositoryResponse {})),
                Renamed::NotFound => Err(ProxyError::NotFound(call.repository())),
                Renamed::Taken => Err(ProxyError::AlreadyExists(format!(
                    "{}/{to}",
                    call.virtual_storage
                ))),
            }
        }
        other => {
            // A catalog RPC this proxy does not know how to answer: refuse rather than guess.
            let _ = lookup(proxy, &call).await?;
            Err(ProxyError::NotServed(other.to_owned()))
        }
    }
}

/// Sends a one-message call and waits for its one answer and final status.
pub(super) async fn unary(
    proxy: &Proxy,
    storage: &StorageName,
    path: &'static str,
    message: Bytes,
) -> Result<Bytes, ProxyError> {
    let node_error = |status| ProxyError::Node {
        storage: storage.clone(),
        status,
    };
    let response = send(
        proxy,
        storage,
        path,
        Request::new(tokio_stream::once(message)),
    )
    .await?;
    let mut stream = response.into_inner();
    let answer = stream
        .message()
        .await
        .map_err(node_error)?
        .ok_or_else(|| node_error(tonic::Status::internal("the node sent no answer")))?;
    stream.message().await.map_err(node_error)?;
    Ok(answer)
}

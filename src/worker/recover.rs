//! The recovery job: finishes writes whose proxy went away (its lease expired with the intent
//! still open). It takes over the repository's lease, which fences the old proxy out, sets
//! every ref the write moved back to where it was on each target (compare-and-swap, so a
//! replica the write never reached is left as it is), and closes the intent with the
//! repository's generation unchanged. A target it cannot roll back (its node is down, or its
//! refs are elsewhere) is marked outdated and the reconciler repairs it from an up-to-date
//! replica; if no up-to-date replica would be left, the intent stays for a later attempt.
//! Two workers never recover the same write: the lease is theirs alone, and every statement
//! after is fenced on it.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::{Inner, JobType, Pause};
use crate::fleet::majority;
use crate::model::StorageName;
use crate::store::{Deletion, Interrupted, Which};
use crate::toolkit::LeaseKeeper;

/// How long the removal of an undone creation's replicas waits, so that a node still making
/// one has finished.
const REMOVAL_DELAY: std::time::Duration = std::time::Duration::from_secs(15);

pub(super) async fn run(inner: Arc<Inner>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let idle = inner.config.worker.poll_interval.0;
    while !shutdown.is_cancelled() {
        let taken_at = tokio::time::Instant::now();
        let taken = inner
            .store
            .take_interrupted_write(&inner.instance, inner.config.worker.lease.0)
            .await;
        match taken {
            Ok(Some(write)) => {
                let _in_flight = inner.metrics.in_flight(JobType::Recovery);
                let keeper = inner.keep_repository_lease(
                    "recovery",
                    write.repository,
                    write.lease_token,
                    taken_at,
                );
                let recovered = recover(&inner, &write, &keeper).await;
                inner.metrics.count_run(JobType::Recovery, recovered);
                continue;
            }
            Ok(None) => {}
            Err(error) => tracing::warn!(%error, "cannot look for interrupted writes"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = tokio::time::sleep(idle) => {}
        }
    }
    Ok(())
}

/// Rolls one interrupted write back; true when its intent is closed. Every compare-and-swap
/// carries the recovery's token, so one sent after a newer lease changed the replica is
/// refused by its node.
async fn recover(inner: &Inner, write: &Interrupted, keeper: &LeaseKeeper) -> bool {
    if write.is_creation() {
        return recover_creation(inner, write, keeper).await;
    }
    let nodes = &inner.nodes;
    let mut outdated: Vec<StorageName> = Vec::new();
    for storage in &write.targets {
        if keeper.is_lost() {
            tracing::warn!(
                intent = write.intent,
                "the recovery lease was lost; stopped"
            );
            return false;
        }
        let replica = nodes.replica(storage, &write.replica_path);
        let Some(replica) = replica.filter(|replica| replica.node.is_healthy()) else {
            outdated.push(storage.clone());
            continue;
        };
        if let Some(pause) = &inner.hooks.pause {
            pause(Pause::RollingBack(write.intent)).await;
        }
        replica
            .reverse_changes(&write.changes, write.lease_token)
            .await;
        if replica.refs_at_old(&write.changes).await != Some(true) {
            outdated.push(storage.clone());
        }
    }
    let survivors = write
        .up_to_date
        .iter()
        .filter(|storage| !outdated.contains(storage))
        .count();
    if survivors == 0 {
        tracing::warn!(
            intent = write.intent,
            repository = write.repository.0,
            ?outdated,
            "an interrupted write cannot be rolled back on any up-to-date replica now; trying again later"
        );
        if let Err(error) = inner
            .store
            .release_repository_lease(write.repository, write.lease_token, &inner.instance)
            .await
        {
            tracing::debug!(%error, "the recovery lease runs out by itself");
        }
        return false;
    }
    match inner
        .store
        .close_interrupted_write(write, &inner.instance, &outdated)
        .await
    {
        Ok(true) => {
            tracing::info!(
                intent = write.intent,
                repository = write.repository.0,
                generation = write.generation,
                ?outdated,
                "interrupted write rolled back"
            );
            true
        }
        Ok(false) => {
            tracing::warn!(
                intent = write.intent,
                "the recovery lease was lost; nothing recorded"
            );
            false
        }
        Err(error) => {
            tracing::warn!(intent = write.intent, %error, "the recovery was not recorded; its lease runs out and it is tried again");
            false
        }
    }
}

/// Settles a creation whose proxy went away: with a majority of the assigned replicas made,
/// it is finished as the proxy would have (the others queued for repair); otherwise it is
/// undone, the row deleted and what replicas were made queued for removal. It was never
/// acknowledged, so either is allowed; the path is usable again in both cases.
async fn recover_creation(inner: &Inner, write: &Interrupted, keeper: &LeaseKeeper) -> bool {
    let mut made = Vec::new();
    let mut missing = Vec::new();
    for storage in &write.targets {
        let replica = inner
            .nodes
            .replica(storage, &write.replica_path)
            .filter(|replica| replica.node.is_healthy());
        match replica {
            Some(replica) if replica.exists().await.unwrap_or(false) => made.push(storage.clone()),
            _ => missing.push(storage.clone()),
        }
    }
    if keeper.is_lost() {
        tracing::warn!(
            intent = write.intent,
            "the recovery lease was lost; stopped"
        );
        return false;
    }
    if made.len() >= majority(write.targets.len()) {
        let finished = inner
            .store
            .record_created_replicas(&write.lease(), &inner.instance, &made, &missing, &made[0])
            .await;
        return match finished {
            Ok(finished) => {
                tracing::info!(
                    repository = write.repository.0,
                    ?made,
                    ?missing,
                    finished,
                    "interrupted creation finished"
                );
                finished
            }
            Err(error) => {
                tracing::warn!(intent = write.intent, %error, "the creation was not recorded; tried again later");
                false
            }
        };
    }
    let undo = Deletion {
        force: true,
        remove_after: Some(REMOVAL_DELAY),
    };
    match inner
        .store
        .delete_repository(Which::Id(write.repository), undo)
        .await
    {
        Ok(deleted) => {
            tracing::info!(
                repository = write.repository.0,
                ?made,
                ?deleted,
                "interrupted creation undone"
            );
            true
        }
        Err(error) => {
            tracing::warn!(intent = write.intent, %error, "the creation was not undone; tried again later");
            false
        }
    }
}

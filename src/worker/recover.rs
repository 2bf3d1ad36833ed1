//! The recovery job: finishes writes whose proxy went away (its lease expired with the intent
//! still open), and forgets pushes that were pending when their proxy went away (no ref moved
//! for them: their replicas abort on their own), with the repository such a push made when
//! nothing was written to it. It takes over the repository's lease, which fences the old proxy out, sets
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
use crate::fleet::{ChangedRefs, majority};
use crate::model::StorageName;
use crate::store::{Deletion, Interrupted, RefChange, Which};
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
            Ok(None) => forget_abandoned_pushes(&inner).await,
            Err(error) => tracing::warn!(%error, "cannot look for interrupted writes"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = tokio::time::sleep(idle) => {}
        }
    }
    Ok(())
}

/// Forgets the pushes that were pending when their proxy went away, and undoes the
/// repositories such a push made that nothing was written to since (their replicas go to
/// removal jobs).
async fn forget_abandoned_pushes(inner: &Inner) {
    let repositories = match inner.store.purge_expired_pending_writes().await {
        Ok(repositories) => repositories,
        Err(error) => {
            tracing::warn!(%error, "cannot purge abandoned pending pushes");
            return;
        }
    };
    for repository in repositories {
        tracing::info!(
            repository = repository.0,
            "an abandoned pending push forgotten"
        );
        let undo = Deletion {
            force: false,
            remove_after: Some(std::time::Duration::ZERO),
            unwritten_only: true,
        };
        match inner
            .store
            .delete_repository(Which::Id(repository), undo)
            .await
        {
            Ok(crate::store::Deleted::Removed(removed)) => tracing::info!(
                repository = removed.id.0,
                "the repository an abandoned push made is undone; its replicas are queued for removal"
            ),
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "cannot undo the repository of an abandoned push"),
        }
    }
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
    let mut seen: Vec<(StorageName, ChangedRefs)> = Vec::new();
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
        match replica.changed_refs(&write.changes).await {
            Some(refs) => seen.push((storage.clone(), refs)),
            None => outdated.push(storage.clone()),
        }
    }
    outdated.extend(not_undone(&write.changes, &seen));
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
            .record_created_replicas(
                &write.lease(),
                &inner.instance,
                &made,
                &missing,
                &made[0],
                None,
            )
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
        unwritten_only: false,
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

/// The replicas on which the write may still be visible once rolled back. A ref is back when
/// it holds its old value (absent for a ref the write created), and HEAD on its old branch. A
/// ref at neither its old nor its new value is back only when every replica that answered
/// holds that same value: the write's old value was out of date (a push that lost a race to
/// an earlier one, which git refused), and the replicas agree on the ref. Where they differ,
/// the replica is diverged and is repaired.
fn not_undone(changes: &[RefChange], seen: &[(StorageName, ChangedRefs)]) -> Vec<StorageName> {
    const ABSENT: &str = "";
    let value = |refs: &ChangedRefs, name: &str| -> String {
        refs.refs
            .get(name)
            .cloned()
            .unwrap_or_else(|| ABSENT.to_owned())
    };
    let normal = |oid: &str| -> String {
        match oid.bytes().all(|b| b == b'0') {
            true => ABSENT.to_owned(),
            false => oid.to_owned(),
        }
    };
    seen.iter()
        .filter(|(_, refs)| {
            !changes.iter().all(|change| {
                if change.name == "HEAD" {
                    return change.old.is_empty() || refs.head.as_deref() == Some(&change.old);
                }
                let here = value(refs, &change.name);
                if here == normal(&change.old) {
                    return true;
                }
                here != normal(&change.new)
                    && seen
                        .iter()
                        .all(|(_, other)| value(other, &change.name) == here)
            })
        })
        .map(|(storage, _)| storage.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn storage(name: &str) -> StorageName {
        StorageName::parse(name).unwrap()
    }

    fn at(main: Option<&str>) -> ChangedRefs {
        ChangedRefs {
            head: None,
            refs: main
                .map(|oid| ("refs/heads/main".to_owned(), oid.to_owned()))
                .into_iter()
                .collect(),
        }
    }

    #[test]
    fn a_replica_is_undone_at_the_old_value_or_where_every_replica_agrees() {
        let (old, new, other) = ("1".repeat(40), "2".repeat(40), "3".repeat(40));
        let change = [RefChange {
            name: "refs/heads/main".into(),
            old: old.clone(),
            new: new.clone(),
        }];
        let judge = |values: &[Option<&str>]| {
            let seen: Vec<(StorageName, ChangedRefs)> = values
                .iter()
                .enumerate()
                .map(|(i, value)| (storage(&format!("s{i}")), at(*value)))
                .collect();
            not_undone(&change, &seen)
        };
        assert!(judge(&[Some(&old), Some(&old), Some(&old)]).is_empty());
        assert_eq!(
            judge(&[Some(&old), Some(&new), Some(&old)]),
            [storage("s1")]
        );
        // A push that lost a race: the ref moved before it, everywhere alike.
        assert!(judge(&[Some(&other), Some(&other), Some(&other)]).is_empty());
        // Moved on one replica only: diverged.
        assert_eq!(
            judge(&[Some(&old), Some(&old), Some(&other)]),
            [storage("s2")]
        );
        assert_eq!(judge(&[None, Some(&old), Some(&old)]), [storage("s0")]);
        // A creation undone is an absent ref; a deletion that stayed is one too.
        let creation = [RefChange {
            name: "refs/heads/main".into(),
            old: "0".repeat(40),
            new: new.clone(),
        }];
        let seen = vec![(storage("a"), at(None)), (storage("b"), at(Some(&new)))];
        assert_eq!(not_undone(&creation, &seen), [storage("b")]);
    }
}

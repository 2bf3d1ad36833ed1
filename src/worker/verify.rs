//! The verifier: leases the replicas verified longest ago, in batches, and asks two questions
//! of each: is it on its node, and does it hold the same refs as the other replicas of its
//! generation? A missing replica's generation becomes unknown (and it is dated missing); a
//! diverged one's too. Nothing here deletes a repository row, so a repository that lost every
//! replica shows as data loss, never as gone.
//!
//! Every second it also asks every healthy node for its storages' identities: a storage whose
//! directory was wiped shows a new one, and all its replicas are verified first.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use tokio_util::sync::CancellationToken;

use super::{Inner, JobType};
use crate::fleet::Nodes;
use crate::model::{RelativePath, StorageName};
use crate::proto::node_service_client::NodeServiceClient;
use crate::proto::{StorageHeader, StorageIdentityRequest};
use crate::store::{Finding, Identity, Verdict, Verification};

/// The longest one question to a node may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the nodes are asked for their storages' identities.
const IDENTITY_EVERY: Duration = Duration::from_secs(1);
/// Repositories checked at once within a batch.
const PARALLEL: usize = 8;

pub(super) async fn run(inner: Arc<Inner>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let config = &inner.config.verifier;
    let idle = inner.config.worker.poll_interval.0;
    let mut observed: Option<std::time::Instant> = None;
    while !shutdown.is_cancelled() {
        // Once a second at most, not once a batch: a wipe is still seen within a second.
        if observed.is_none_or(|at| at.elapsed() >= IDENTITY_EVERY) {
            observe_identities(&inner).await;
            observed = Some(std::time::Instant::now());
        }
        let claimed = match inner
            .store
            .claim_verifications(
                &inner.instance,
                inner.config.worker.lease.0,
                config.interval.0,
                config.batch.max(1),
            )
            .await
        {
            Ok(claimed) => claimed,
            Err(error) => {
                tracing::warn!(%error, "cannot lease replicas to verify");
                Vec::new()
            }
        };
        if claimed.is_empty() {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(idle) => {}
            }
            continue;
        }
        let _in_flight = inner.metrics.in_flight(JobType::Verifier);
        let findings = verify_batch(&inner.nodes, claimed).await;
        match inner
            .store
            .record_verifications(&inner.instance, &findings)
            .await
        {
            Ok(recorded) => {
                if recorded.missing + recorded.diverged > 0 {
                    tracing::warn!(
                        missing = recorded.missing,
                        diverged = recorded.diverged,
                        "replicas found out of sync; the reconciler repairs them"
                    );
                }
                tracing::debug!(?recorded, "verified a batch");
                inner.metrics.count_run(JobType::Verifier, true);
            }
            Err(error) => {
                // The leases expire and the replicas are leased again.
                tracing::warn!(%error, "verification not recorded");
                inner.metrics.count_run(JobType::Verifier, false);
            }
        }
    }
    Ok(())
}

/// Records the identity of every healthy node's storage.
async fn observe_identities(inner: &Inner) {
    for node in inner.nodes.storages() {
        if !node.is_healthy() {
            continue;
        }
        let request = StorageIdentityRequest {
            storage: Some(StorageHeader {
                storage: node.storage.to_string(),
            }),
        };
        let asked = tokio::time::timeout(
            CALL_TIMEOUT,
            NodeServiceClient::new(node.authed()).storage_identity(request),
        )
        .await;
        let storage_id = match asked {
            Ok(Ok(response)) => response.into_inner().storage_id,
            Ok(Err(status)) => {
                tracing::debug!(storage = %node.storage, %status, "no storage identity");
                continue;
            }
            Err(_) => continue,
        };
        match inner
            .store
            .observe_storage_identity(&node.storage, &storage_id)
            .await
        {
            Ok(Identity::Changed { replicas }) => tracing::warn!(
                storage = %node.storage,
                replicas,
                "the storage has a new identity (wiped or replaced): verifying all its replicas first"
            ),
            Ok(_) => {}
            Err(error) => tracing::debug!(storage = %node.storage, %error, "identity not recorded"),
        }
    }
}

/// Checks a leased batch, one repository at a time for each of up to [`PARALLEL`]
/// repositories.
pub async fn verify_batch(nodes: &Nodes, claimed: Vec<Verification>) -> Vec<Finding> {
    let mut by_repository: BTreeMap<i64, Vec<Verification>> = BTreeMap::new();
    for item in claimed {
        by_repository
            .entry(item.repository.0)
            .or_default()
            .push(item);
    }
    futures_util::stream::iter(by_repository.into_values())
        .map(|items| verify_repository(nodes, items))
        .buffer_unordered(PARALLEL)
        .flat_map(futures_util::stream::iter)
        .collect()
        .await
}

/// What one replica looks like on its node.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Missing,
    Present { checksum: Option<String> },
    Unknown(Option<String>),
}

/// Checks the leased replicas of one repository, and the repository's other up-to-date
/// replicas to compare them with. Any up-to-date replica whose refs differ from a strict
/// majority of them is diverged; with no strict majority, nothing is judged diverged.
async fn verify_repository(nodes: &Nodes, items: Vec<Verification>) -> Vec<Finding> {
    let first = &items[0];
    if first.writing {
        return findings(&items, |_| Verdict::Skipped);
    }
    let up_to_date: BTreeSet<StorageName> = first.up_to_date.iter().cloned().collect();
    let mut storages: BTreeSet<StorageName> = up_to_date.clone();
    storages.extend(items.iter().map(|item| item.storage.clone()));
    let seen: HashMap<StorageName, Seen> =
        futures_util::future::join_all(storages.iter().map(|storage| async {
            let seen = look(
                nodes,
                storage,
                &first.replica_path,
                up_to_date.contains(storage),
            )
            .await;
            (storage.clone(), seen)
        }))
        .await
        .into_iter()
        .collect();
    let mut tally: BTreeMap<&str, usize> = BTreeMap::new();
    for (storage, state) in &seen {
        if let (
            true,
            Seen::Present {
                checksum: Some(sum),
            },
        ) = (up_to_date.contains(storage), state)
        {
            *tally.entry(sum.as_str()).or_default() += 1;
        }
    }
    let compared: usize = tally.values().sum();
    let majority = tally
        .iter()
        .find(|(_, count)| **count * 2 > compared)
        .map(|(sum, _)| sum.to_string());
    let verdict_of = |storage: &StorageName| match seen.get(storage) {
        Some(Seen::Missing) => Verdict::Missing,
        Some(Seen::Present { checksum }) => match (checksum, &majority) {
            (Some(sum), Some(majority)) if sum != majority => Verdict::Diverged,
            _ => Verdict::Verified,
        },
        Some(Seen::Unknown(Some(error))) => Verdict::Error(error.clone()),
        Some(Seen::Unknown(None)) | None => Verdict::Skipped,
    };
    let mut found = findings(&items, |item| verdict_of(&item.storage));
    // An up-to-date replica that was not leased but turned out missing or diverged is marked
    // too: it was looked at, and the same guards apply.
    let leased: BTreeSet<&StorageName> = items.iter().map(|item| &item.storage).collect();
    for storage in up_to_date.iter().filter(|s| !leased.contains(s)) {
        let verdict = verdict_of(storage);
        if matches!(verdict, Verdict::Missing | Verdict::Diverged) {
            found.push(Finding {
                repository: first.repository,
                storage: storage.clone(),
                generation: Some(first.repository_generation),
                lease_token: first.lease_token,
                verdict,
            });
        }
    }
    found
}

fn findings(items: &[Verification], verdict: impl Fn(&Verification) -> Verdict) -> Vec<Finding> {
    items
        .iter()
        .map(|item| Finding {
            repository: item.repository,
            storage: item.storage.clone(),
            generation: item.generation,
            lease_token: item.lease_token,
            verdict: verdict(item),
        })
        .collect()
}

/// Asks a storage's node whether it holds the replica and, when `checksum`, for its refs'
/// checksum.
async fn look(
    nodes: &Nodes,
    storage: &StorageName,
    replica_path: &RelativePath,
    checksum: bool,
) -> Seen {
    let Some(replica) = nodes.replica(storage, replica_path) else {
        return Seen::Unknown(Some(format!("storage {storage} is not configured")));
    };
    if !replica.node.is_healthy() {
        return Seen::Unknown(None);
    }
    match tokio::time::timeout(CALL_TIMEOUT, replica.exists()).await {
        Ok(Ok(false)) => return Seen::Missing,
        Ok(Ok(true)) => {}
        Ok(Err(status)) => {
            return Seen::Unknown(Some(format!("{storage}: {}", status.message())));
        }
        Err(_) => return Seen::Unknown(Some(format!("{storage}: timed out"))),
    }
    if !checksum {
        return Seen::Present { checksum: None };
    }
    match tokio::time::timeout(CALL_TIMEOUT, replica.refs_checksum()).await {
        Ok(Ok(checksum)) => Seen::Present {
            checksum: Some(checksum),
        },
        Ok(Err(status)) if status.code() == tonic::Code::NotFound => Seen::Missing,
        Ok(Err(status)) => Seen::Unknown(Some(format!("{storage}: {}", status.message()))),
        Err(_) => Seen::Unknown(Some(format!("{storage}: timed out"))),
    }
}

//! The storage walker: streams every replica a storage holds, compares them with the catalog a
//! batch at a time (one statement per batch), and moves to the node's quarantine what no
//! repository references, or what a repository no longer wants on that storage, once it was
//! last modified longer ago than the grace period. It checks the catalog once more right before
//! each move. Quarantine older than the retention period is purged.
//!
//! A replica cannot be taken while it is being created: a creation writes the repository row
//! before the replica exists, so the walker sees the row whenever it sees the replica.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;

use super::{Inner, JobType};
use crate::fleet::{Nodes, fenced, is_fenced};
use crate::model::StorageName;
use crate::proto::node_service_client::NodeServiceClient;
use crate::proto::{
    PurgeQuarantineRequest, QuarantineRepositoryRequest, RepositoryHeader, StorageHeader,
    WalkStorageRequest,
};
use crate::store::{Store, StoreError, Tracking, WalkResults};
use crate::toolkit::LeaseKeeper;

/// The walker's idea of now: the system clock, or a test's.
pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// Whether a walk acts on what it finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Quarantine and purge.
    Act,
    /// Only report.
    DryRun,
}

/// A replica the walk found that the storage should not hold.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Found {
    pub storage: String,
    pub relative_path: String,
    /// "untracked" or "extra".
    pub kind: &'static str,
    /// Seconds since the epoch.
    pub modified_at: i64,
    /// Seconds since it was last modified, by the walk's clock.
    pub age_seconds: i64,
    /// What the walk did: "quarantined", "kept" (younger than the grace period, or still
    /// wanted), "reported" (a dry run), or "error: ...".
    pub action: String,
    pub quarantine_id: Option<String>,
}

/// Why a walk stopped before the end.
#[derive(Debug, thiserror::Error)]
pub enum WalkError {
    #[error("storage {0} is not configured")]
    UnknownStorage(StorageName),
    #[error("the walk lease of storage {0} was lost")]
    LeaseLost(StorageName),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The lease a walk holds on its storage, kept alive while it goes.
#[derive(Debug, Clone, Copy)]
pub struct WalkLease {
    pub token: i64,
    pub duration: Duration,
    /// When the statement that took it was sent.
    pub taken_at: tokio::time::Instant,
}

/// One walk's settings and what it talks to.
pub struct Walk<'a> {
    pub store: &'a Store,
    pub nodes: &'a Nodes,
    pub grace_period: Duration,
    pub quarantine_retention: Duration,
    pub clock: &'a (dyn Fn() -> SystemTime + Send + Sync),
    pub mode: Mode,
}

fn seconds(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Walk<'_> {
    /// Walks one storage. `on_found` hears of every replica the storage should not hold, and
    /// `on_batch` of the running totals after each batch. A failure of the node or a single
    /// move is counted in the results; the walk goes on where it can.
    pub async fn run(
        &self,
        storage: &StorageName,
        lease: Option<WalkLease>,
        mut on_found: impl FnMut(&Found),
        mut on_batch: impl FnMut(&WalkResults),
    ) -> Result<WalkResults, WalkError> {
        let node = self
            .nodes
            .get(storage)
            .ok_or_else(|| WalkError::UnknownStorage(storage.clone()))?;
        let started = Instant::now();
        let keeper = lease.map(|lease| self.keep(storage, lease));
        let mut results = WalkResults::default();
        let mut client = NodeServiceClient::new(node.authed());
        let header = StorageHeader {
            storage: storage.to_string(),
        };
        let mut stream = match client
            .walk_storage(WalkStorageRequest {
                storage: Some(header.clone()),
            })
            .await
        {
            Ok(response) => Some(response.into_inner()),
            Err(status) => {
                failed(&mut results, format!("walking: {}", status.message()));
                None
            }
        };
        while let Some(walking) = stream.as_mut() {
            let batch = match walking.message().await {
                Ok(Some(batch)) => batch.repositories,
                Ok(None) => break,
                Err(status) => {
                    failed(&mut results, format!("walking: {}", status.message()));
                    break;
                }
            };
            results.seen += batch.len() as u64;
            let paths: Vec<String> = batch.iter().map(|r| r.relative_path.clone()).collect();
            let tracking = self.store.classify_replicas(storage, &paths).await?;
            let now = seconds((self.clock)());
            let cutoff = now - self.grace_period.as_secs() as i64;
            for (walked, tracking) in batch.into_iter().zip(tracking) {
                let kind = match tracking {
                    Tracking::Assigned => continue,
                    Tracking::Untracked => {
                        results.untracked += 1;
                        "untracked"
                    }
                    Tracking::Extra => {
                        results.extra += 1;
                        "extra"
                    }
                };
                let mut found = Found {
                    storage: storage.to_string(),
                    relative_path: walked.relative_path,
                    kind,
                    modified_at: walked.modified_at,
                    age_seconds: now - walked.modified_at,
                    action: "kept".into(),
                    quarantine_id: None,
                };
                if walked.modified_at <= cutoff {
                    match self.mode {
                        Mode::DryRun => found.action = "reported".into(),
                        Mode::Act => {
                            self.remove(&mut client, storage, tracking, &mut found, &mut results)
                                .await?;
                            still_held(storage, keeper.as_ref())?;
                        }
                    }
                }
                on_found(&found);
            }
            still_held(storage, keeper.as_ref())?;
            on_batch(&results);
        }
        if self.mode == Mode::Act {
            let before = seconds((self.clock)()) - self.quarantine_retention.as_secs() as i64;
            match client
                .purge_quarantine(PurgeQuarantineRequest {
                    storage: Some(header),
                    older_than_seconds: 0,
                    quarantined_before: before.max(1),
                })
                .await
            {
                Ok(response) => results.purged = response.into_inner().purged,
                Err(status) => failed(&mut results, format!("purging: {}", status.message())),
            }
        }
        results.duration_seconds = started.elapsed().as_secs_f64();
        Ok(results)
    }

    /// Quarantines one replica the storage should not hold, after asking the catalog once more.
    async fn remove(
        &self,
        client: &mut NodeServiceClient<crate::client::AuthedChannel>,
        storage: &StorageName,
        tracking: Tracking,
        found: &mut Found,
        results: &mut WalkResults,
    ) -> Result<(), WalkError> {
        // Held until the node has acted, so the path cannot be adopted in between.
        let mut lock = self.store.lock_replica_path(&found.relative_path).await?;
        let unwanted = match tracking {
            Tracking::Untracked => !lock.in_use().await?,
            // Forgotten in the catalog first, so no read is routed to it.
            Tracking::Extra => {
                self.store
                    .drop_extra_replica(storage, &found.relative_path)
                    .await?
            }
            Tracking::Assigned => false,
        };
        if !unwanted {
            return Ok(lock.release().await?);
        }
        // An adoption after this point raises the replica's fence past this token, so a
        // quarantine that reaches the node late is refused.
        let token = lock.fence_token().await?;
        let request = QuarantineRepositoryRequest {
            repository: Some(RepositoryHeader {
                storage: storage.to_string(),
                relative_path: found.relative_path.clone(),
            }),
        };
        match client.quarantine_repository(fenced(request, token)).await {
            Ok(response) => {
                let id = response.into_inner().quarantine_id;
                tracing::info!(%storage, relative_path = %found.relative_path, kind = found.kind, quarantine_id = %id, "replica quarantined");
                results.quarantined += 1;
                found.action = "quarantined".into();
                found.quarantine_id = Some(id);
            }
            // Gone meanwhile: a removal job got there first.
            Err(status) if status.code() == tonic::Code::NotFound => {
                found.action = "gone".into();
            }
            Err(status) if is_fenced(&status) => {
                tracing::info!(%storage, relative_path = %found.relative_path, %status, "adopted meanwhile: not quarantined");
                found.action = "adopted".into();
            }
            Err(status) => {
                let message = format!("quarantining {}: {}", found.relative_path, status.message());
                found.action = format!("error: {message}");
                failed(results, message);
            }
        }
        Ok(lock.release().await?)
    }

    /// Keeps the walk's lease while it runs.
    fn keep(&self, storage: &StorageName, lease: WalkLease) -> LeaseKeeper {
        let (store, storage) = (self.store.clone(), storage.clone());
        LeaseKeeper::start("storage walk", lease.duration, lease.taken_at, move || {
            let (store, storage) = (store.clone(), storage.clone());
            async move {
                store
                    .renew_storage_walk(&storage, lease.token, lease.duration)
                    .await
            }
        })
    }
}

/// Fails once the walk's lease is lost: checked between removals, so that no removal is cut
/// halfway.
fn still_held(storage: &StorageName, keeper: Option<&LeaseKeeper>) -> Result<(), WalkError> {
    match keeper {
        Some(keeper) if keeper.is_lost() => Err(WalkError::LeaseLost(storage.clone())),
        _ => Ok(()),
    }
}

fn failed(results: &mut WalkResults, message: String) {
    tracing::warn!(error = %message, "storage walk");
    results.errors += 1;
    results.last_error = Some(message);
}

/// The walker job: takes each storage in turn whose last walk is at least `walker.interval`
/// old and whose walk lease is free, walks it, and records the results.
pub(super) async fn run(inner: Arc<Inner>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let config = &inner.config.walker;
    let tick = config
        .interval
        .0
        .min(Duration::from_secs(60))
        .max(Duration::from_millis(100));
    let clock = inner.clock();
    let mut storages: Vec<StorageName> =
        inner.nodes.storages().map(|n| n.storage.clone()).collect();
    storages.sort();
    while !shutdown.is_cancelled() {
        for storage in &storages {
            if shutdown.is_cancelled() {
                break;
            }
            if !inner.nodes.is_healthy(storage) {
                continue;
            }
            let lease = inner.config.worker.lease.0;
            let taken_at = tokio::time::Instant::now();
            let token = match inner
                .store
                .take_storage_walk(storage, &inner.instance, lease, config.interval.0)
                .await
            {
                Ok(Some(token)) => token,
                Ok(None) => continue,
                Err(error) => {
                    tracing::warn!(%storage, %error, "cannot take the walk lease");
                    continue;
                }
            };
            let walk = Walk {
                store: &inner.store,
                nodes: &inner.nodes,
                grace_period: config.grace_period.0,
                quarantine_retention: config.quarantine_retention.0,
                clock: clock.as_ref(),
                mode: Mode::Act,
            };
            let walk_lease = Some(WalkLease {
                token,
                duration: lease,
                taken_at,
            });
            let _in_flight = inner.metrics.in_flight(JobType::Walker);
            let outcome = tokio::select! {
                outcome = walk.run(storage, walk_lease, |_| {}, |_| {}) => Some(outcome),
                _ = shutdown.cancelled() => None,
            };
            let recorded = match &outcome {
                Some(Ok(results)) => {
                    tracing::info!(%storage, ?results, "storage walked");
                    Some(results)
                }
                Some(Err(error)) => {
                    tracing::warn!(%storage, %error, "storage walk stopped");
                    None
                }
                None => None,
            };
            inner
                .metrics
                .count_run(JobType::Walker, matches!(outcome, Some(Ok(_))));
            if let Err(error) = inner
                .store
                .finish_storage_walk(storage, token, recorded)
                .await
            {
                tracing::warn!(%storage, %error, "walk not recorded; its lease expires");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = tokio::time::sleep(tick) => {}
        }
    }
    Ok(())
}

//! The write's hold on its repository: taking the lease and recording the intent (waiting
//! while another write holds it), keeping the lease while the write runs, and recording
//! HEAD's old branch in the intent before a HEAD change is sent.

use std::time::{Duration, Instant};

use super::Write;
use crate::model::StorageName;
use crate::proxy::ProxyState;
use crate::proxy::error::ProxyError;
use crate::store::{StoreError, WriteLease, WriteStart};
use crate::toolkit::{Backoff, LeaseKeeper, Retry, Stop, retry};

/// The pause after a write found the lease taken; it doubles up to the next.
const FIRST_BUSY_PAUSE: Duration = Duration::from_millis(10);
const LONGEST_BUSY_PAUSE: Duration = Duration::from_millis(250);

impl Write {
    /// Reads the branch HEAD points to on the targets, and records it in the intent as the
    /// old value of the write's HEAD change, before any replica sees the change: a rollback
    /// then knows where to set HEAD back. The targets must agree on it (they are up to date).
    pub(super) async fn record_head_before(
        &mut self,
        lease: &WriteLease,
    ) -> Result<(), ProxyError> {
        let nodes = &self.proxy.state.nodes;
        let mut head = None;
        for storage in &lease.targets {
            let Some(replica) = nodes.replica(storage, &lease.replica_path) else {
                continue;
            };
            if let Ok(branch) = replica.head().await {
                head = Some(branch);
                break;
            }
        }
        let Some(head) = head else {
            self.release(lease).await?;
            return Err(self.not_enough(lease, &[]));
        };
        let state = &self.proxy.state;
        if !state
            .store
            .record_head_before(lease, &state.instance_id, &head)
            .await?
        {
            return Err(
                self.failed("the write lease was lost before the write was sent; nothing changed")
            );
        }
        for change in self
            .changes
            .iter_mut()
            .filter(|change| change.name == "HEAD")
        {
            change.old = head.clone();
        }
        Ok(())
    }

    /// Keeps the write's lease while it runs.
    pub(super) fn keep(&self, lease: &WriteLease, begin_sent: tokio::time::Instant) -> LeaseKeeper {
        keep_write_lease(&self.proxy.state, "write", lease, begin_sent)
    }

    /// Takes the lease and turns the pending write into the intent, waiting while another
    /// write holds it, up to `writes.lease_wait` from `started`. The write targets only the
    /// storages in `prepared`, those that prepared it in agreement (and are still up to date).
    /// Returns the lease and when the statement that took it was sent.
    pub(super) async fn begin(
        &self,
        started: Instant,
        (pending, prepared): (i64, &[StorageName]),
    ) -> Result<(WriteLease, tokio::time::Instant), ProxyError> {
        let state = &self.proxy.state;
        let deadline = tokio::time::Instant::from_std(started) + state.config.writes.lease_wait.0;
        let policy = Retry::until(
            Backoff::exact(FIRST_BUSY_PAUSE, LONGEST_BUSY_PAUSE),
            deadline,
        );
        let attempt = || async {
            let sent = tokio::time::Instant::now();
            let store = &state.store;
            let owner = &state.instance_id;
            let lease = state.config.writes.lease.0;
            let started = store
                .begin_prepared_write(
                    &self.virtual_storage,
                    &self.relative_path,
                    pending,
                    owner,
                    lease,
                    self.path,
                    &self.changes,
                    prepared,
                )
                .await;
            match started {
                Ok(WriteStart::Busy) => Err(Begin::Busy),
                Ok(start) => Ok((start, sent)),
                Err(error) => Err(Begin::Store(error)),
            }
        };
        loop {
            let (start, sent) = match retry(
                &policy,
                "waiting for the write lease",
                None,
                Begin::is_busy,
                attempt,
            )
            .await
            {
                Ok(started) => started,
                Err(Stop::Permanent(Begin::Store(error))) => return Err(error.into()),
                Err(_) => return Err(self.busy(started)),
            };
            match start {
                WriteStart::Leased(lease) => return Ok((lease, sent)),
                WriteStart::Recover(lease, stale) => self.recover(&lease, &stale).await?,
                WriteStart::NotFound => return Err(ProxyError::NotFound(self.repository.clone())),
                WriteStart::Locked(reason) => return Err(ProxyError::WriteLocked(reason)),
                WriteStart::Unreachable {
                    assigned,
                    reachable,
                } => {
                    return Err(ProxyError::not_enough(
                        self.repository.clone(),
                        &assigned,
                        &reachable,
                    ));
                }
                WriteStart::Busy => return Err(self.busy(started)),
            }
        }
    }
}

/// Why taking the write lease did not work this time.
#[derive(Debug, thiserror::Error)]
enum Begin {
    #[error("another write holds the lease")]
    Busy,
    #[error(transparent)]
    Store(StoreError),
}

impl Begin {
    fn is_busy(&self) -> bool {
        matches!(self, Begin::Busy)
    }
}

/// Keeps a write lease this proxy took (a write's, or a creation's) with a statement sent at
/// `taken_at`, renewing it and its intent until the keeper is dropped.
pub(in crate::proxy) fn keep_write_lease(
    state: &ProxyState,
    what: &'static str,
    lease: &WriteLease,
    taken_at: tokio::time::Instant,
) -> LeaseKeeper {
    let duration = state.config.writes.lease.0;
    let (store, owner, lease) = (
        state.store.clone(),
        state.instance_id.clone(),
        lease.clone(),
    );
    LeaseKeeper::start(what, duration, taken_at, move || {
        let (store, owner, lease) = (store.clone(), owner.clone(), lease.clone());
        async move { store.renew_write(&lease, &owner, duration).await }
    })
}

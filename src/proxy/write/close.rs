//! Recording how a write ended: its commit or its release, retried with backoff while
//! PostgreSQL cannot be reached (a restart) for up to `writes.commit_retry`, and checked when
//! an answer was lost on the way back, since the statement may have landed.

use std::future::Future;
use std::time::Duration;

use super::Write;
use crate::model::StorageName;
use crate::proxy::error::ProxyError;
use crate::store::{Standing, StoreError, WriteLease, WriteOutcome};
use crate::toolkit::{Backoff, Retry, Stop, retry};

/// The first pause before a closing statement is tried again; it doubles up to the next.
const FIRST_PAUSE: Duration = Duration::from_millis(100);
const LONGEST_PAUSE: Duration = Duration::from_secs(2);

/// What a commit found.
pub(super) enum Commit {
    Done(WriteOutcome),
    /// Refused, and the lease is still this write's: the replicas it would have committed
    /// changed under it. The write may be undone under the lease.
    Refused,
    /// Refused because the lease is no longer this write's. Whoever holds it now settles the
    /// intent; nothing may be undone from here, since a later write may already have
    /// built on the same refs.
    Lost,
}

impl Write {
    /// Commits the write with `current` at the next generation, whose refs checksum is
    /// `checksum` when known.
    pub(super) async fn commit(
        &self,
        lease: &WriteLease,
        current: &[StorageName],
        source: &StorageName,
        checksum: Option<&str>,
    ) -> Result<Commit, ProxyError> {
        let state = &self.proxy.state;
        let owner = state.instance_id.as_str();
        let committed = self
            .retrying("commit", || {
                state
                    .store
                    .commit_write(lease, owner, current, source, checksum)
            })
            .await?;
        if let Some(outcome) = committed {
            return Ok(Commit::Done(outcome));
        }
        Ok(match self.standing(lease).await? {
            // An earlier attempt landed and its answer was lost.
            Standing::Committed => Commit::Done(WriteOutcome {
                generation: lease.generation + 1,
                queued: Vec::new(),
            }),
            Standing::Held => Commit::Refused,
            Standing::Released | Standing::Lost => Commit::Lost,
        })
    }

    /// Closes the intent and releases the lease, the generation unchanged; false when the
    /// lease was no longer this write's.
    pub(super) async fn release(&self, lease: &WriteLease) -> Result<bool, ProxyError> {
        let state = &self.proxy.state;
        let owner = state.instance_id.as_str();
        if self
            .retrying("release", || state.store.release_write(lease, owner))
            .await?
        {
            return Ok(true);
        }
        Ok(self.standing(lease).await? == Standing::Released)
    }

    async fn standing(&self, lease: &WriteLease) -> Result<Standing, ProxyError> {
        let state = &self.proxy.state;
        let owner = state.instance_id.as_str();
        self.retrying("check", || state.store.write_standing(lease, owner))
            .await
    }

    /// Runs one closing statement, again and again while the database is unavailable, until
    /// `writes.commit_retry` has passed since the first try.
    async fn retrying<T, F, Fut>(&self, what: &str, statement: F) -> Result<T, ProxyError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let configured = self.proxy.state.config.writes.commit_retry;
        let deadline = tokio::time::Instant::now() + configured.0;
        let policy =
            Retry::until(Backoff::exact(FIRST_PAUSE, LONGEST_PAUSE), deadline).warn_after(0);
        let description = format!("recording the write's {what}");
        match retry(&policy, &description, None, StoreError::is_unavailable, statement).await {
            Ok(value) => Ok(value),
            Err(Stop::Permanent(error)) => Err(error.into()),
            Err(stop) => Err(self.failed(&format!(
                "its outcome could not be recorded within {configured}{}; the recovery job rolls it back",
                stop.into_error().map(|error| format!(": {error}")).unwrap_or_default()
            ))),
        }
    }
}

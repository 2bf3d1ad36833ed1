//! Opening a push: its pending write, and where push-to-create applies, the repository the
//! push makes first (waiting while another push is making it) and undoes if it fails.

use std::time::Duration;

use bytes::Bytes;
use prost::Message as _;

use super::Write;
use crate::model::RepositoryId;
use crate::proto::{CreateRepositoryRequest, RepositoryHeader};
use crate::proxy::catalog::{self, Creation};
use crate::proxy::error::ProxyError;
use crate::proxy::header::{self, HeaderError};
use crate::store::{Deleted, Deletion, PendingStart, PendingWrite, Which};

/// The first pause while another push makes the repository; it doubles up to the next.
const FIRST_CREATION_PAUSE: Duration = Duration::from_millis(20);
const LONGEST_CREATION_PAUSE: Duration = Duration::from_millis(250);

/// How many times a push makes its missing repository: again only when a push that made it
/// failed and undid it meanwhile.
const MAKE_ATTEMPTS: usize = 3;

impl Write {
    /// Records the push as pending; with `create`, makes its repository first when it is
    /// missing (`made` says which, when this push made it), and waits while another push is
    /// still making it.
    pub(super) async fn open(
        &mut self,
        create: bool,
        made: &mut Option<RepositoryId>,
    ) -> Result<PendingWrite, ProxyError> {
        let state = self.proxy.state.clone();
        let writes = &state.config.writes;
        // By then the push has become an intent, or has ended.
        let expiry = writes.timeout.0 + writes.lease_wait.0 + writes.lease.0;
        let deadline = tokio::time::Instant::now() + writes.lease_wait.0;
        let mut pause = FIRST_CREATION_PAUSE;
        let mut attempts = 0;
        loop {
            let recorded = state
                .store
                .record_pending_write(
                    &self.virtual_storage,
                    &self.relative_path,
                    &state.instance_id,
                    self.path,
                    &self.changes,
                    &state.nodes.healthy(),
                    expiry,
                )
                .await?;
            match recorded {
                PendingStart::Recorded(pending) => return Ok(pending),
                // Made again if a push that made it undid it meanwhile.
                PendingStart::NotFound if create && attempts < MAKE_ATTEMPTS => {
                    attempts += 1;
                    match self.make_repository().await {
                        Ok(id) => *made = Some(id),
                        Err(ProxyError::AlreadyExists(_)) => {}
                        Err(error) => return Err(error),
                    }
                }
                PendingStart::NotFound => {
                    return Err(ProxyError::NotFound(self.repository.clone()));
                }
                PendingStart::Locked(reason) => return Err(ProxyError::WriteLocked(reason)),
                PendingStart::Unreachable { creating: true, .. }
                    if tokio::time::Instant::now() < deadline =>
                {
                    // Another push is making the repository: its replicas come soon.
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(LONGEST_CREATION_PAUSE);
                }
                PendingStart::Unreachable {
                    assigned,
                    reachable,
                    ..
                } => {
                    return Err(ProxyError::not_enough(
                        self.repository.clone(),
                        &assigned,
                        &reachable,
                    ));
                }
            }
        }
    }

    /// Makes the repository the push names, as `CreateRepository` would, marked as awaiting
    /// its first push; returns its id.
    async fn make_repository(&self) -> Result<RepositoryId, ProxyError> {
        let message = Bytes::from(
            CreateRepositoryRequest {
                repository: Some(RepositoryHeader {
                    storage: self.virtual_storage.to_string(),
                    relative_path: self.relative_path.to_string(),
                }),
                default_branch: String::new(),
            }
            .encode_to_vec(),
        );
        let located = header::locate(&message)?.ok_or(HeaderError::Missing)?;
        let creation = Creation {
            first: &message,
            located: &located,
            virtual_storage: &self.virtual_storage,
            relative_path: &self.relative_path,
            by_push: true,
        };
        let id = catalog::make(&self.proxy, &creation).await?;
        tracing::info!(repository = %self.repository, "made by a push");
        Ok(id)
    }

    /// Deletes a repository this push made, when no write has committed to it and no other
    /// push is under way on it, and removes its replicas.
    pub(super) async fn undo_creation(&self, repository: RepositoryId) {
        let undo = Deletion {
            force: false,
            remove_after: Some(catalog::REMOVAL_JOB_DELAY),
            unwritten_only: true,
        };
        let state = &self.proxy.state;
        match state
            .store
            .delete_repository(Which::Id(repository), undo)
            .await
        {
            Ok(Deleted::Removed(removed)) => {
                tracing::info!(repository = %self.repository, "a push that failed undid the repository it made");
                state.routing.invalidate(removed.id);
                catalog::remove_replicas(&self.proxy, &removed).await;
            }
            Ok(Deleted::NotFound | Deleted::Busy) => {}
            Err(error) => tracing::warn!(%error, "the repository a failed push made stays"),
        }
    }
}

//! The lock on a replica path: whoever decides the fate of a replica path's bytes (the walker
//! and the remover before they remove, an operator adopting it) holds it, so no replica is
//! removed just as a row comes to reference it.

use super::{JOB_REMOVE, JOB_REPLICATE, Store, StoreError, texts};
use crate::model::{RelativePath, RepositoryId, StorageName};

impl Store {
    /// Takes the lock that serialises every decision about `replica_path`'s bytes: the walker
    /// and the remover hold it from their last look at the catalog until the node has acted,
    /// and adopting the path takes it too. So a replica is never removed just as a row comes to
    /// reference it. The lock is a transaction's advisory lock, released when the guard is
    /// released or dropped.
    pub async fn lock_replica_path(
        &self,
        replica_path: &str,
    ) -> Result<ReplicaPathLock, StoreError> {
        let mut transaction = self.measure("begin", self.pool.begin()).await?;
        self.measure(
            "lock_replica_path",
            sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
                .bind(replica_path)
                .execute(&mut *transaction),
        )
        .await?;
        Ok(ReplicaPathLock {
            store: self.clone(),
            replica_path: replica_path.to_owned(),
            transaction,
        })
    }
}

/// A replica path held by [`Store::lock_replica_path`].
#[derive(Debug)]
pub struct ReplicaPathLock {
    store: Store,
    replica_path: String,
    transaction: sqlx::Transaction<'static, sqlx::Postgres>,
}

impl ReplicaPathLock {
    /// Whether a repository row references the path. Read after the lock was granted, so it
    /// sees every row committed by an earlier holder.
    pub async fn in_use(&mut self) -> Result<bool, StoreError> {
        self.store
            .measure(
                "replica_path_in_use",
                sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM repositories WHERE replica_path = $1)",
                )
                .bind(&self.replica_path)
                .fetch_one(&mut *self.transaction),
            )
            .await
    }

    /// A new fencing token, from the sequence every lease draws from: a walk's quarantine
    /// carries it, and an adoption raises the replica's fence to it, so whichever of the two the
    /// node sees last is refused if it was decided first.
    pub async fn fence_token(&mut self) -> Result<i64, StoreError> {
        self.store
            .measure(
                "replica_path_fence_token",
                sqlx::query_scalar("SELECT nextval('repository_lease_tokens')")
                    .fetch_one(&mut *self.transaction),
            )
            .await
    }

    /// Adopts the repository that lies on `storage` at the locked replica path: a new row
    /// pointing there, the replica recorded at generation 0, the other `assigned` storages
    /// queued to copy from it, and any removal still queued for that replica path cancelled.
    /// It takes effect when the lock is released. None when the path or the replica path is
    /// already tracked.
    pub async fn track(
        &mut self,
        virtual_storage: &StorageName,
        relative_path: &RelativePath,
        storage: &StorageName,
        assigned: &[StorageName],
    ) -> Result<Option<RepositoryId>, StoreError> {
        let id: Option<i64> = self
            .store
            .measure(
                "track_repository",
                sqlx::query_scalar(
                    "WITH repo AS (
                         INSERT INTO repositories
                             (virtual_storage, relative_path, replica_path, primary_storage)
                         VALUES ($1, $2, $3, $4)
                         ON CONFLICT DO NOTHING
                         RETURNING id
                     ), assigned AS (
                         INSERT INTO assignments (repository_id, storage)
                         SELECT repo.id, storage FROM repo, unnest($5::text[]) AS storage
                     ), replica AS (
                         INSERT INTO replicas (repository_id, storage, generation)
                         SELECT repo.id, $4, 0 FROM repo
                     ), queued AS (
                         INSERT INTO jobs (kind, repository_id, source_storage, target_storage)
                         SELECT $6, repo.id, $4, storage
                         FROM repo, unnest($5::text[]) AS storage WHERE storage <> $4
                     ), spared AS (
                         UPDATE jobs j
                         SET state = 'cancelled', lease_token = j.lease_token + 1,
                             lease_owner = NULL, lease_expires_at = NULL,
                             last_error = 'the replica path is tracked again',
                             finished_at = now(), updated_at = now()
                         WHERE j.kind = $7 AND j.replica_path = $3
                           AND j.state IN ('queued', 'running') AND EXISTS (SELECT 1 FROM repo)
                     )
                     SELECT id FROM repo",
                )
                .bind(virtual_storage.as_str())
                .bind(relative_path.as_str())
                .bind(&self.replica_path)
                .bind(storage.as_str())
                .bind(texts(assigned))
                .bind(JOB_REPLICATE)
                .bind(JOB_REMOVE)
                .fetch_optional(&mut *self.transaction),
            )
            .await?;
        Ok(id.map(RepositoryId))
    }

    /// Commits what was done under the lock, and lets the next holder in.
    pub async fn release(self) -> Result<(), StoreError> {
        self.store
            .measure("commit", self.transaction.commit())
            .await
    }
}

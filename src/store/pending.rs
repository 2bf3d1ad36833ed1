//! Pending writes: a push recorded before its pack reaches any replica, with no lease. It
//! becomes a write intent under the lease once the replicas have prepared it (see
//! `Store::begin_prepared_write`); one whose proxy went away is deleted when it expires, and no
//! ref ever moved for it.

use std::time::Duration;

use sqlx::Row as _;

use super::{
    CREATE_RPC, RefChange, Store, StoreError, WriteStart, storage_names, texts, undecodable,
};
use crate::model::{RelativePath, RepositoryId, StorageName};

/// A push recorded as pending.
#[derive(Debug, Clone)]
pub struct PendingWrite {
    pub id: i64,
    pub repository: RepositoryId,
    pub replica_path: RelativePath,
    /// The generation the push starts from.
    pub generation: i64,
    /// The assigned replicas that are up to date and reachable: a majority of them.
    pub ready: Vec<StorageName>,
    /// Where the pack goes: every assigned replica that is reachable. One being repaired may
    /// be up to date by phase 2, and then it takes the push too, rather than falling behind
    /// again with every push that was in flight when its repair ended.
    pub targets: Vec<StorageName>,
    pub assigned: Vec<StorageName>,
}

/// What recording a push as pending found.
#[derive(Debug)]
pub enum PendingStart {
    Recorded(PendingWrite),
    NotFound,
    /// The maintenance write lock is on, for this reason.
    Locked(String),
    /// Fewer than a majority of the assigned replicas are up to date on reachable nodes.
    Unreachable {
        assigned: Vec<StorageName>,
        reachable: Vec<StorageName>,
        /// The repository is still being made: its replicas are not recorded yet.
        creating: bool,
    },
}

impl Store {
    /// Records a push as pending, in one statement: its commands, and as targets the
    /// assigned replicas among `healthy`. Nothing is recorded when the write lock is on or
    /// those up to date are fewer than a majority of the assigned storages.
    /// The row expires after `expiry`, by when the push must have become an intent.
    #[allow(clippy::too_many_arguments)]
    pub async fn record_pending_write(
        &self,
        virtual_storage: &StorageName,
        relative_path: &RelativePath,
        owner: &str,
        rpc: &str,
        changes: &[RefChange],
        healthy: &[StorageName],
        expiry: Duration,
    ) -> Result<PendingStart, StoreError> {
        let changes = serde_json::to_value(changes)
            .map_err(|error| StoreError::Failed(sqlx::Error::Encode(Box::new(error))))?;
        let row = self
            .measure(
                "record_pending_write",
                sqlx::query(
                    "WITH repo AS (
                         SELECT r.id, r.generation, r.replica_path,
                                ARRAY(SELECT a.storage FROM assignments a
                                      WHERE a.repository_id = r.id ORDER BY a.storage)
                                    AS assigned,
                                ARRAY(SELECT a.storage FROM assignments a
                                      JOIN replicas p ON p.repository_id = a.repository_id
                                                     AND p.storage = a.storage
                                      WHERE a.repository_id = r.id
                                        AND p.generation = r.generation
                                        AND a.storage = ANY($6) ORDER BY a.storage) AS ready,
                                ARRAY(SELECT a.storage FROM assignments a
                                      JOIN replicas p ON p.repository_id = a.repository_id
                                                     AND p.storage = a.storage
                                      WHERE a.repository_id = r.id
                                        AND a.storage = ANY($6) ORDER BY a.storage) AS targets
                         FROM repositories r
                         WHERE r.virtual_storage = $1 AND r.relative_path = $2
                     ), locked AS (
                         SELECT CASE WHEN write_lock THEN COALESCE(reason, '') END AS reason
                         FROM maintenance
                     ), pending AS (
                         INSERT INTO pending_writes (repository_id, owner, rpc, ref_updates,
                             target_storages, base_generation, expires_at)
                         SELECT repo.id, $3, $4, $5, repo.targets, repo.generation,
                                now() + make_interval(secs => $7)
                         FROM repo
                         WHERE cardinality(repo.ready) >= cardinality(repo.assigned) / 2 + 1
                           AND NOT EXISTS (SELECT 1 FROM locked WHERE reason IS NOT NULL)
                         RETURNING id
                     )
                     SELECT repo.id AS repository, repo.generation, repo.replica_path,
                            repo.assigned, repo.ready, repo.targets, pending.id AS pending,
                            (SELECT reason FROM locked) AS locked,
                            EXISTS (SELECT 1 FROM write_intents i
                                    WHERE i.repository_id = repo.id AND i.rpc = $8) AS creating
                     FROM repo LEFT JOIN pending ON true",
                )
                .bind(virtual_storage.as_str())
                .bind(relative_path.as_str())
                .bind(owner)
                .bind(rpc)
                .bind(changes)
                .bind(texts(healthy))
                .bind(expiry.as_secs_f64())
                .bind(CREATE_RPC)
                .fetch_optional(&self.pool),
            )
            .await?;
        let Some(row) = row else {
            return Ok(PendingStart::NotFound);
        };
        let assigned = storage_names(&row.try_get::<Vec<String>, _>("assigned")?);
        let ready = storage_names(&row.try_get::<Vec<String>, _>("ready")?);
        let targets = storage_names(&row.try_get::<Vec<String>, _>("targets")?);
        let Some(id) = row.try_get::<Option<i64>, _>("pending")? else {
            if let Some(reason) = row.try_get::<Option<String>, _>("locked")? {
                return Ok(PendingStart::Locked(reason));
            }
            return Ok(PendingStart::Unreachable {
                assigned,
                reachable: ready,
                creating: row.try_get("creating")?,
            });
        };
        let replica_path: String = row.try_get("replica_path")?;
        Ok(PendingStart::Recorded(PendingWrite {
            id,
            repository: RepositoryId(row.try_get("repository")?),
            replica_path: RelativePath::parse(&replica_path)
                .map_err(|error| undecodable("replica_path", error))?,
            generation: row.try_get("generation")?,
            ready,
            targets,
            assigned,
        }))
    }

    /// Phase 2 of a prepared push: as [`Store::begin_write`], with the ref changes the
    /// replicas prepared, targeting only the `prepared` storages that are still up to date,
    /// and in the same statement the pending write becomes the intent (its row is deleted).
    /// The pending row stays when no intent was recorded. NotFound when the pending write is
    /// gone or the path now names another repository.
    #[allow(clippy::too_many_arguments)]
    pub async fn begin_prepared_write(
        &self,
        virtual_storage: &StorageName,
        relative_path: &RelativePath,
        pending: i64,
        owner: &str,
        lease: Duration,
        rpc: &str,
        changes: &[RefChange],
        prepared: &[StorageName],
    ) -> Result<WriteStart, StoreError> {
        let write = (virtual_storage, relative_path, rpc, changes);
        self.start_write(write, owner, lease, prepared, Some(pending))
            .await
    }

    /// Forgets a pending write that ended without becoming an intent. Its replicas were
    /// told to abort, or were left to abort on their own.
    pub async fn drop_pending_write(&self, id: i64) -> Result<(), StoreError> {
        self.measure(
            "drop_pending_write",
            sqlx::query("DELETE FROM pending_writes WHERE id = $1")
                .bind(id)
                .execute(&self.pool),
        )
        .await?;
        Ok(())
    }

    /// How many pushes are pending now.
    pub async fn pending_writes(&self) -> Result<i64, StoreError> {
        self.measure(
            "pending_writes",
            sqlx::query_scalar("SELECT count(*) FROM pending_writes").fetch_one(&self.pool),
        )
        .await
    }

    /// Deletes the pending writes that have expired: their proxies went away before the
    /// replicas were told to commit, so no ref moved for them. Returns the repositories they
    /// were for, once each.
    pub async fn purge_expired_pending_writes(&self) -> Result<Vec<RepositoryId>, StoreError> {
        let purged: Vec<i64> = self
            .measure(
                "purge_expired_pending_writes",
                sqlx::query_scalar(
                    "WITH purged AS (
                         DELETE FROM pending_writes WHERE expires_at < now()
                         RETURNING repository_id
                     )
                     SELECT DISTINCT repository_id FROM purged",
                )
                .fetch_all(&self.pool),
            )
            .await?;
        Ok(purged.into_iter().map(RepositoryId).collect())
    }
}

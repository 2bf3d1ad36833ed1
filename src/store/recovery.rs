//! The recovery job's statements: taking over the lease of a repository whose write was
//! interrupted (its intent outlived its lease), and closing that intent without a new
//! generation, marking outdated the replicas that could not be rolled back.

use std::time::Duration;

use sqlx::Row as _;

use super::{RefChange, Store, StoreError, WriteLease, millis, storage_names, texts, undecodable};
use crate::model::{RelativePath, RepositoryId, StorageName};

/// An interrupted write, with the repository's lease now held by the recovering worker.
#[derive(Debug, Clone)]
pub struct Interrupted {
    pub intent: i64,
    pub repository: RepositoryId,
    pub replica_path: RelativePath,
    pub generation: i64,
    /// The recovering worker's fencing token on the repository.
    pub lease_token: i64,
    pub changes: Vec<RefChange>,
    pub targets: Vec<StorageName>,
    /// The replicas at the repository's generation.
    pub up_to_date: Vec<StorageName>,
    /// The gRPC method of the write: [`CREATE_RPC`] for a creation.
    pub rpc: String,
}

/// The method of a creation's intent: its targets are the assigned storages, and it has no
/// ref changes.
pub const CREATE_RPC: &str = "/gitfleet.v1.RepositoryService/CreateRepository";

impl Interrupted {
    pub fn is_creation(&self) -> bool {
        self.rpc == CREATE_RPC
    }

    /// The lease the recovery holds, in the form the write statements take.
    pub fn lease(&self) -> WriteLease {
        WriteLease {
            repository: self.repository,
            replica_path: self.replica_path.clone(),
            intent: self.intent,
            token: self.lease_token,
            generation: self.generation,
            targets: self.targets.clone(),
            assigned: self.targets.clone(),
            refs_checksum: None,
        }
    }
}

impl Store {
    /// Takes over the repository lease of the oldest interrupted write no one holds, moving
    /// the fencing token on so that the proxy that began it can no longer commit it. None
    /// when there is none.
    pub async fn take_interrupted_write(
        &self,
        owner: &str,
        lease: Duration,
    ) -> Result<Option<Interrupted>, StoreError> {
        let row = self
            .measure(
                "take_interrupted_write",
                sqlx::query(
                    "WITH candidate AS (
                         SELECT i.id, i.repository_id FROM write_intents i
                         JOIN repositories r ON r.id = i.repository_id
                         WHERE i.lease_expires_at < now()
                           AND (r.lease_owner IS NULL OR r.lease_expires_at < now())
                         ORDER BY i.lease_expires_at
                         LIMIT 1
                         FOR UPDATE OF r SKIP LOCKED
                     ), lease AS (
                         UPDATE repositories r
                         SET lease_owner = $1, lease_token = nextval('repository_lease_tokens'),
                             lease_expires_at = now() + $2 * interval '1 millisecond'
                         FROM candidate c
                         WHERE r.id = c.repository_id
                           AND (r.lease_owner IS NULL OR r.lease_expires_at < now())
                         RETURNING r.id, r.replica_path, r.generation, r.lease_token
                     )
                     SELECT c.id AS intent, lease.id AS repository, lease.replica_path,
                            lease.generation, lease.lease_token,
                            i.ref_updates::text AS changes, i.target_storages, i.rpc,
                            ARRAY(SELECT p.storage FROM replicas p
                                  WHERE p.repository_id = lease.id
                                    AND p.generation = lease.generation
                                  ORDER BY p.storage) AS up_to_date
                     FROM lease JOIN candidate c ON c.repository_id = lease.id
                     JOIN write_intents i ON i.id = c.id",
                )
                .bind(owner)
                .bind(millis(lease))
                .fetch_optional(&self.pool),
            )
            .await?;
        let Some(row) = row else { return Ok(None) };
        let changes: String = row.try_get("changes")?;
        let changes: Vec<RefChange> = serde_json::from_str(&changes)
            .map_err(|error| StoreError::Failed(sqlx::Error::Decode(Box::new(error))))?;
        let replica_path: String = row.try_get("replica_path")?;
        Ok(Some(Interrupted {
            intent: row.try_get("intent")?,
            repository: RepositoryId(row.try_get("repository")?),
            replica_path: RelativePath::parse(&replica_path)
                .map_err(|e| StoreError::from(undecodable("replica_path", e)))?,
            generation: row.try_get("generation")?,
            lease_token: row.try_get("lease_token")?,
            changes,
            targets: storage_names(&row.try_get::<Vec<String>, _>("target_storages")?),
            up_to_date: storage_names(&row.try_get::<Vec<String>, _>("up_to_date")?),
            rpc: row.try_get("rpc")?,
        }))
    }

    /// Closes an interrupted write, fenced on the recovering worker's lease: the intent goes,
    /// the replicas in `outdated` (not rolled back) get an unknown generation so they are
    /// repaired, the repository's generation stays, and the lease is released. False when
    /// the lease was lost (another recovery took over): nothing changed.
    pub async fn close_interrupted_write(
        &self,
        interrupted: &Interrupted,
        owner: &str,
        outdated: &[StorageName],
    ) -> Result<bool, StoreError> {
        let closed: bool = self
            .measure(
                "close_interrupted_write",
                sqlx::query_scalar(
                    "WITH repo AS (
                         SELECT id FROM repositories
                         WHERE id = $1 AND lease_token = $2 AND lease_owner = $3
                         FOR UPDATE
                     ), closed AS (
                         DELETE FROM write_intents
                         WHERE id = $4 AND repository_id IN (SELECT id FROM repo)
                     ), marked AS (
                         UPDATE replicas SET generation = NULL
                         WHERE repository_id IN (SELECT id FROM repo) AND storage = ANY($5)
                     ), released AS (
                         UPDATE repositories SET lease_owner = NULL, lease_expires_at = NULL
                         WHERE id IN (SELECT id FROM repo)
                         RETURNING id
                     )
                     SELECT EXISTS (SELECT 1 FROM released)",
                )
                .bind(interrupted.repository.0)
                .bind(interrupted.lease_token)
                .bind(owner)
                .bind(interrupted.intent)
                .bind(texts(outdated))
                .fetch_one(&self.pool),
            )
            .await?;
        Ok(closed)
    }

    /// Extends a lease on the repository (a recovery's or a replication's); false once it is
    /// no longer this owner's.
    pub async fn renew_repository_lease(
        &self,
        repository: RepositoryId,
        lease_token: i64,
        owner: &str,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let renewed = self
            .measure(
                "renew_repository_lease",
                sqlx::query(
                    "UPDATE repositories
                     SET lease_expires_at = now() + $4 * interval '1 millisecond'
                     WHERE id = $1 AND lease_token = $2 AND lease_owner = $3",
                )
                .bind(repository.0)
                .bind(lease_token)
                .bind(owner)
                .bind(millis(lease))
                .execute(&self.pool),
            )
            .await?;
        Ok(renewed.rows_affected() == 1)
    }

    /// Hands back a lease on the repository, if it is still this owner's; whatever it was
    /// taken for (an interrupted write's intent) stays for a later attempt.
    pub async fn release_repository_lease(
        &self,
        repository: RepositoryId,
        lease_token: i64,
        owner: &str,
    ) -> Result<(), StoreError> {
        self.measure(
            "release_repository_lease",
            sqlx::query(
                "UPDATE repositories SET lease_owner = NULL, lease_expires_at = NULL
                 WHERE id = $1 AND lease_token = $2 AND lease_owner = $3",
            )
            .bind(repository.0)
            .bind(lease_token)
            .bind(owner)
            .execute(&self.pool),
        )
        .await?;
        Ok(())
    }
}

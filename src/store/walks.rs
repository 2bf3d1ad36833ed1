//! The storage walker's statements: its lease on a storage, the batched comparison of what a
//! storage holds with the catalog, the removal of replicas a storage should not hold, and the
//! record of each walk.

use std::time::Duration;

use sqlx::Row as _;

use super::{Store, StoreError};
use crate::model::StorageName;

/// What the catalog says of a replica path found on a storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tracking {
    /// No repository row references it.
    Untracked,
    /// A repository references it, and the storage is assigned to hold it.
    Assigned,
    /// A repository references it, but the storage is not assigned to hold it: an extra copy,
    /// for example after a replication factor was lowered.
    Extra,
}

/// What one walk of one storage found and did.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct WalkResults {
    pub seen: u64,
    pub untracked: u64,
    pub extra: u64,
    pub quarantined: u64,
    pub purged: u64,
    pub errors: u64,
    pub last_error: Option<String>,
    pub duration_seconds: f64,
}

/// The last finished walk of a storage, as recorded.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WalkRecord {
    pub storage: String,
    pub walks: i64,
    pub walking: Option<String>,
    /// Seconds since the last walk finished.
    pub finished_ago_seconds: Option<f64>,
    #[serde(flatten)]
    pub results: WalkResults,
}

impl Store {
    /// Takes the walk lease of a storage if no live walk holds it and its last walk finished
    /// at least `interval` ago. Returns the lease's fencing token.
    pub async fn take_storage_walk(
        &self,
        storage: &StorageName,
        owner: &str,
        lease: Duration,
        interval: Duration,
    ) -> Result<Option<i64>, StoreError> {
        self.measure(
            "take_storage_walk",
            sqlx::query_scalar(
                "INSERT INTO storage_walks (storage, lease_owner, lease_token, lease_expires_at,
                                            started_at)
                 VALUES ($1, $2, 1, now() + make_interval(secs => $3), now())
                 ON CONFLICT (storage) DO UPDATE
                 SET lease_owner = $2, lease_token = storage_walks.lease_token + 1,
                     lease_expires_at = now() + make_interval(secs => $3), started_at = now()
                 WHERE (storage_walks.lease_expires_at IS NULL
                        OR storage_walks.lease_expires_at < now())
                   AND (storage_walks.finished_at IS NULL
                        OR storage_walks.finished_at <= now() - make_interval(secs => $4))
                 RETURNING lease_token",
            )
            .bind(storage.as_str())
            .bind(owner)
            .bind(lease.as_secs_f64())
            .bind(interval.as_secs_f64())
            .fetch_optional(&self.pool),
        )
        .await
    }

    /// Who holds the walk lease of a storage now, if anyone.
    pub async fn storage_walk_holder(
        &self,
        storage: &StorageName,
    ) -> Result<Option<String>, StoreError> {
        self.measure(
            "storage_walk_holder",
            sqlx::query_scalar(
                "SELECT lease_owner FROM storage_walks
                 WHERE storage = $1 AND lease_expires_at >= now()",
            )
            .bind(storage.as_str())
            .fetch_optional(&self.pool),
        )
        .await
        .map(Option::flatten)
    }

    /// Extends a walk's lease. False: the lease is lost and the walk must stop.
    pub async fn renew_storage_walk(
        &self,
        storage: &StorageName,
        token: i64,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let renewed = self
            .measure(
                "renew_storage_walk",
                sqlx::query(
                    "UPDATE storage_walks SET lease_expires_at = now() + make_interval(secs => $3)
                     WHERE storage = $1 AND lease_token = $2 AND lease_owner IS NOT NULL",
                )
                .bind(storage.as_str())
                .bind(token)
                .bind(lease.as_secs_f64())
                .execute(&self.pool),
            )
            .await?;
        Ok(renewed.rows_affected() == 1)
    }

    /// Records a walk's results and gives its lease up. A walk that did not finish passes
    /// None: the lease goes, the last results stay.
    pub async fn finish_storage_walk(
        &self,
        storage: &StorageName,
        token: i64,
        results: Option<&WalkResults>,
    ) -> Result<bool, StoreError> {
        let done = self
            .measure(
                "finish_storage_walk",
                sqlx::query(
                    "UPDATE storage_walks
                     SET lease_owner = NULL, lease_expires_at = NULL,
                         finished_at = CASE WHEN $3 THEN now() ELSE finished_at END,
                         walks = walks + $3::int,
                         seen = CASE WHEN $3 THEN $4 ELSE seen END,
                         untracked = CASE WHEN $3 THEN $5 ELSE untracked END,
                         extra = CASE WHEN $3 THEN $6 ELSE extra END,
                         quarantined = CASE WHEN $3 THEN $7 ELSE quarantined END,
                         purged = CASE WHEN $3 THEN $8 ELSE purged END,
                         errors = CASE WHEN $3 THEN $9 ELSE errors END,
                         last_error = CASE WHEN $3 THEN $10 ELSE last_error END,
                         duration_seconds = CASE WHEN $3 THEN $11 ELSE duration_seconds END
                     WHERE storage = $1 AND lease_token = $2 AND lease_owner IS NOT NULL",
                )
                .bind(storage.as_str())
                .bind(token)
                .bind(results.is_some())
                .bind(results.map_or(0, |r| r.seen as i64))
                .bind(results.map_or(0, |r| r.untracked as i64))
                .bind(results.map_or(0, |r| r.extra as i64))
                .bind(results.map_or(0, |r| r.quarantined as i64))
                .bind(results.map_or(0, |r| r.purged as i64))
                .bind(results.map_or(0, |r| r.errors as i64))
                .bind(results.and_then(|r| r.last_error.as_deref()))
                .bind(results.map_or(0.0, |r| r.duration_seconds))
                .execute(&self.pool),
            )
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Gives up the walk leases a worker holds: after its walker stopped.
    pub async fn release_storage_walks_of(&self, owner: &str) -> Result<u64, StoreError> {
        let released = self
            .measure(
                "release_storage_walks_of",
                sqlx::query(
                    "UPDATE storage_walks SET lease_owner = NULL, lease_expires_at = NULL
                     WHERE lease_owner = $1",
                )
                .bind(owner)
                .execute(&self.pool),
            )
            .await?;
        Ok(released.rows_affected())
    }

    /// The last walk of every storage that was ever walked.
    pub async fn storage_walks(&self) -> Result<Vec<WalkRecord>, StoreError> {
        let rows = self
            .measure(
                "storage_walks",
                sqlx::query(
                    "SELECT storage, walks, seen, untracked, extra, quarantined, purged, errors,
                            last_error, coalesce(duration_seconds, 0) AS duration_seconds,
                            CASE WHEN lease_expires_at >= now() THEN lease_owner END AS walking,
                            extract(epoch FROM now() - finished_at)::float8 AS finished_ago
                     FROM storage_walks ORDER BY storage",
                )
                .fetch_all(&self.pool),
            )
            .await?;
        rows.iter()
            .map(|row| {
                Ok(WalkRecord {
                    storage: row.try_get("storage")?,
                    walks: row.try_get("walks")?,
                    walking: row.try_get("walking")?,
                    finished_ago_seconds: row.try_get("finished_ago")?,
                    results: WalkResults {
                        seen: row.try_get::<i64, _>("seen")? as u64,
                        untracked: row.try_get::<i64, _>("untracked")? as u64,
                        extra: row.try_get::<i64, _>("extra")? as u64,
                        quarantined: row.try_get::<i64, _>("quarantined")? as u64,
                        purged: row.try_get::<i64, _>("purged")? as u64,
                        errors: row.try_get::<i64, _>("errors")? as u64,
                        last_error: row.try_get("last_error")?,
                        duration_seconds: row.try_get("duration_seconds")?,
                    },
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    /// What the catalog says of each replica path found on a storage: one statement for the
    /// whole batch, in the batch's order.
    pub async fn classify_replicas(
        &self,
        storage: &StorageName,
        paths: &[String],
    ) -> Result<Vec<Tracking>, StoreError> {
        let rows: Vec<(i32, bool)> = self
            .measure(
                "classify_replicas",
                sqlx::query_as(
                    "SELECT w.ordinality::int4,
                            EXISTS (SELECT 1 FROM assignments a
                                    WHERE a.repository_id = r.id AND a.storage = $1)
                     FROM unnest($2::text[]) WITH ORDINALITY AS w(path, ordinality)
                     JOIN repositories r ON r.replica_path = w.path",
                )
                .bind(storage.as_str())
                .bind(paths)
                .fetch_all(&self.pool),
            )
            .await?;
        let mut tracking = vec![Tracking::Untracked; paths.len()];
        for (ordinality, assigned) in rows {
            if let Some(slot) = usize::try_from(ordinality - 1)
                .ok()
                .and_then(|index| tracking.get_mut(index))
            {
                *slot = if assigned {
                    Tracking::Assigned
                } else {
                    Tracking::Extra
                };
            }
        }
        Ok(tracking)
    }

    /// Forgets the replica of the repository at `replica_path` on `storage`, if the storage is
    /// not assigned to hold it and every assigned replica is up to date; one statement. True:
    /// the copy on the storage is no longer wanted and may be removed.
    pub async fn drop_extra_replica(
        &self,
        storage: &StorageName,
        replica_path: &str,
    ) -> Result<bool, StoreError> {
        let dropped: bool = self
            .measure(
                "drop_extra_replica",
                sqlx::query_scalar(
                    "WITH repository AS (
                         SELECT r.id, r.generation FROM repositories r
                         WHERE r.replica_path = $2
                         FOR UPDATE
                     ), unwanted AS (
                         SELECT r.id FROM repository r
                         WHERE NOT EXISTS (SELECT 1 FROM assignments a
                                           WHERE a.repository_id = r.id AND a.storage = $1)
                           AND EXISTS (SELECT 1 FROM assignments a WHERE a.repository_id = r.id)
                           AND NOT EXISTS (
                               SELECT 1 FROM assignments a
                               LEFT JOIN replicas p ON p.repository_id = a.repository_id
                                                   AND p.storage = a.storage
                               WHERE a.repository_id = r.id
                                 AND (p.generation IS NULL OR p.generation <> r.generation))
                     ), dropped AS (
                         DELETE FROM replicas p USING unwanted u
                         WHERE p.repository_id = u.id AND p.storage = $1
                     )
                     SELECT EXISTS (SELECT 1 FROM unwanted)",
                )
                .bind(storage.as_str())
                .bind(replica_path)
                .fetch_one(&self.pool),
            )
            .await?;
        Ok(dropped)
    }
}

//! Write leases and write intents: a write is recorded, with the ref updates it will make,
//! before any replica sees it, and committed as a new generation after a majority applied it.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::Row as _;

use super::{JOB_REPLICATE, Store, StoreError, storage_names, texts, undecodable};
use crate::model::{RelativePath, RepositoryId, StorageName};

/// One ref update a write will make. `old` and `new` are object ids (all zeros: absent), or
/// for a symbolic ref such as HEAD, the ref it points to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RefChange {
    #[serde(rename = "ref")]
    pub name: String,
    pub old: String,
    pub new: String,
}

/// No intent has this id (identities start at 1): a lease released with it closes none.
const NO_INTENT: i64 = 0;

/// A write lease held by this proxy, and the intent recorded under it.
#[derive(Debug, Clone)]
pub struct WriteLease {
    pub repository: RepositoryId,
    /// Where the repository's replicas live.
    pub replica_path: RelativePath,
    pub intent: i64,
    /// The fencing token: every later statement of this write is guarded by it.
    pub token: i64,
    /// The generation the write starts from.
    pub generation: i64,
    /// The storages the write goes to: assigned, up to date and healthy.
    pub targets: Vec<StorageName>,
    pub assigned: Vec<StorageName>,
    /// The refs checksum of the generation the write starts from, when known.
    pub refs_checksum: Option<String>,
}

/// A write that was recorded and never committed: its proxy died or lost its lease.
#[derive(Debug, Clone)]
pub struct StaleIntent {
    pub changes: Vec<RefChange>,
    pub targets: Vec<StorageName>,
}

/// What an attempt to start a write found.
#[derive(Debug)]
pub enum WriteStart {
    Leased(WriteLease),
    /// The lease is taken, but an interrupted write must be settled first: the lease's intent
    /// is that write's, and no new intent was recorded.
    Recover(WriteLease, StaleIntent),
    /// Another write holds the lease.
    Busy,
    /// The repository is gone.
    NotFound,
    /// Fewer than a majority of the assigned replicas are up to date on reachable nodes: the
    /// lease was not taken and nothing was recorded.
    Unreachable {
        assigned: Vec<StorageName>,
        reachable: Vec<StorageName>,
    },
    /// The maintenance write lock is on, for this reason: nothing was taken.
    Locked(String),
}

/// How a write ended, once committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteOutcome {
    pub generation: i64,
    /// Assigned storages that did not get the write and now have a replication job.
    pub queued: Vec<StorageName>,
}

/// Where a write stands once the answer to its closing statement was lost (the database went
/// away) or the statement was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Committed under this lease: the token unchanged, the lease released, the intent closed
    /// and the generation one past the write's.
    Committed,
    /// Released under this lease: as committed, with the generation unchanged.
    Released,
    /// The lease is still this owner's and the intent open.
    Held,
    /// Another owner took the lease (a recovery, or a later write after the lease ran out), or
    /// the repository is gone: the intent is no longer this write's to close.
    Lost,
}

impl Store {
    /// Takes the write lease of the repository at a path and records the write intent, in one
    /// statement; not while a replication has reserved the lease (see
    /// `Store::lease_for_replication`). `healthy` lists the storages the proxy can reach now; the write targets the
    /// assigned, up-to-date ones among them, and the lease is not taken at all when they are
    /// fewer than a majority of the assigned storages.
    #[allow(clippy::too_many_arguments)]
    pub async fn begin_write(
        &self,
        virtual_storage: &StorageName,
        relative_path: &RelativePath,
        owner: &str,
        lease: Duration,
        rpc: &str,
        changes: &[RefChange],
        healthy: &[StorageName],
    ) -> Result<WriteStart, StoreError> {
        let write = (virtual_storage, relative_path, rpc, changes);
        self.start_write(write, owner, lease, healthy, None).await
    }

    pub(super) async fn start_write(
        &self,
        (virtual_storage, relative_path, rpc, changes): (
            &StorageName,
            &RelativePath,
            &str,
            &[RefChange],
        ),
        owner: &str,
        lease: Duration,
        healthy: &[StorageName],
        pending: Option<i64>,
    ) -> Result<WriteStart, StoreError> {
        let changes = serde_json::to_value(changes)
            .map_err(|error| StoreError::Failed(sqlx::Error::Encode(Box::new(error))))?;
        let row = self
            .measure(
                "begin_write",
                sqlx::query(
                    "WITH snapshot AS (
                         SELECT r.id, r.generation, r.replica_path,
                                (r.lease_owner IS NULL OR r.lease_expires_at < now())
                                AND (r.lease_reserved_by IS NULL
                                     OR r.lease_reserved_until < now()) AS free,
                                (SELECT count(*) FROM assignments a
                                 WHERE a.repository_id = r.id) AS assigned,
                                (SELECT count(*) FROM assignments a
                                 JOIN replicas p ON p.repository_id = a.repository_id
                                                AND p.storage = a.storage
                                 WHERE a.repository_id = r.id AND p.generation = r.generation
                                   AND a.storage = ANY($7)) AS reachable
                         FROM repositories r
                         WHERE r.virtual_storage = $1 AND r.relative_path = $2
                           -- A prepared push commits only into the repository it was prepared
                           -- in, and only while its pending write stands: not into one made
                           -- anew at the path, nor after recovery forgot it.
                           AND ($8::bigint IS NULL
                                OR EXISTS (SELECT 1 FROM pending_writes p
                                           WHERE p.id = $8 AND p.repository_id = r.id))
                     ), lease AS (
                         UPDATE repositories r
                         SET lease_owner = $3, lease_token = nextval('repository_lease_tokens'),
                             lease_expires_at = now() + make_interval(secs => $4)
                         FROM snapshot s
                         WHERE r.id = s.id
                           AND (r.lease_owner IS NULL OR r.lease_expires_at < now())
                           AND (r.lease_reserved_by IS NULL OR r.lease_reserved_until < now())
                           AND s.reachable >= s.assigned / 2 + 1
                           AND NOT (SELECT write_lock FROM maintenance)
                         RETURNING r.id, r.lease_token, r.generation, r.lease_expires_at,
                                   r.refs_checksum
                     ), targets AS (
                         SELECT coalesce(array_agg(a.storage ORDER BY a.storage), '{}') AS storages
                         FROM lease
                         JOIN assignments a ON a.repository_id = lease.id
                         JOIN replicas p ON p.repository_id = a.repository_id
                                        AND p.storage = a.storage
                         WHERE p.generation = lease.generation AND a.storage = ANY($7)
                     ), stale AS (
                         SELECT i.id, i.ref_updates, i.target_storages
                         FROM write_intents i, snapshot s
                         WHERE i.repository_id = s.id ORDER BY i.id LIMIT 1
                     ), intent AS (
                         INSERT INTO write_intents (repository_id, owner, fencing_token,
                             lease_expires_at, rpc, base_generation, ref_updates, target_storages)
                         SELECT lease.id, $3, lease.lease_token, lease.lease_expires_at, $5,
                                lease.generation, $6, targets.storages
                         FROM lease, targets
                         WHERE NOT EXISTS (SELECT 1 FROM stale)
                         RETURNING id
                     ), promoted AS (
                         -- Not when the snapshot is old: the lease is released again below,
                         -- and the push tries again with its pending write.
                         DELETE FROM pending_writes p USING intent, lease, snapshot s
                         WHERE p.id = $8 AND s.generation = lease.generation AND s.free
                         RETURNING p.id
                     )
                     SELECT snapshot.id AS repository, snapshot.generation AS snapshot_generation,
                            snapshot.replica_path, snapshot.free,
                            lease.lease_token, lease.generation, intent.id AS intent,
                            lease.refs_checksum,
                            targets.storages AS targets,
                            ARRAY(SELECT a.storage FROM assignments a
                                  WHERE a.repository_id = snapshot.id ORDER BY a.storage)
                                AS assigned_storages,
                            ARRAY(SELECT a.storage FROM assignments a
                                  JOIN replicas p ON p.repository_id = a.repository_id
                                                 AND p.storage = a.storage
                                  WHERE a.repository_id = snapshot.id
                                    AND p.generation = snapshot.generation
                                    AND a.storage = ANY($7) ORDER BY a.storage)
                                AS reachable_storages,
                            stale.id AS stale_intent, stale.ref_updates::text AS stale_changes,
                            stale.target_storages AS stale_targets,
                            (SELECT CASE WHEN write_lock THEN COALESCE(reason, '') END
                             FROM maintenance) AS locked
                     FROM snapshot
                     LEFT JOIN lease ON true LEFT JOIN intent ON true LEFT JOIN targets ON true
                     LEFT JOIN stale ON true",
                )
                .bind(virtual_storage.as_str())
                .bind(relative_path.as_str())
                .bind(owner)
                .bind(lease.as_secs_f64())
                .bind(rpc)
                .bind(changes)
                .bind(texts(healthy))
                .bind(pending)
                .fetch_optional(&self.pool),
            )
            .await?;
        let Some(row) = row else {
            return Ok(WriteStart::NotFound);
        };
        let repository = RepositoryId(row.try_get("repository")?);
        let assigned = storage_names(&row.try_get::<Vec<String>, _>("assigned_storages")?);
        let token: Option<i64> = row.try_get("lease_token")?;
        let stale: Option<i64> = row.try_get("stale_intent")?;
        let intent = row.try_get::<Option<i64>, _>("intent")?.or(stale);
        let (Some(token), Some(intent)) = (token, intent) else {
            if let Some(reason) = row.try_get::<Option<String>, _>("locked")? {
                return Ok(WriteStart::Locked(reason));
            }
            let free: bool = row.try_get("free")?;
            if !free {
                return Ok(WriteStart::Busy);
            }
            // The lease was free and not taken: a majority is out of reach, unless a write
            // committed while this statement waited (then its snapshot is old: try again).
            let reachable = storage_names(&row.try_get::<Vec<String>, _>("reachable_storages")?);
            if reachable.len() > assigned.len() / 2 {
                return Ok(WriteStart::Busy);
            }
            return Ok(WriteStart::Unreachable {
                assigned,
                reachable,
            });
        };
        let generation: i64 = row.try_get("generation")?;
        let replica_path: String = row.try_get("replica_path")?;
        let replica_path = RelativePath::parse(&replica_path)
            .map_err(|error| undecodable("replica_path", error))?;
        let mut lease = WriteLease {
            repository,
            replica_path,
            intent,
            token,
            generation,
            targets: storage_names(&row.try_get::<Vec<String>, _>("targets")?),
            assigned,
            refs_checksum: row.try_get("refs_checksum")?,
        };
        // The lease was free only after a write or a replication that finished while this
        // statement waited for the row: the targets were read before it committed (a replica
        // it brought up to date would be left out). Start again.
        let snapshot_generation: i64 = row.try_get("snapshot_generation")?;
        let free_in_snapshot: bool = row.try_get("free")?;
        if snapshot_generation != generation || !free_in_snapshot {
            if stale.is_some() {
                // Release the lease only: the interrupted write's intent stays.
                lease.intent = NO_INTENT;
            }
            self.release_write(&lease, owner).await?;
            return Ok(WriteStart::Busy);
        }
        if stale.is_none() {
            return Ok(WriteStart::Leased(lease));
        }
        let changes: Option<String> = row.try_get("stale_changes")?;
        let changes: Vec<RefChange> = serde_json::from_str(changes.as_deref().unwrap_or("[]"))
            .map_err(|error| StoreError::Failed(sqlx::Error::Decode(Box::new(error))))?;
        let targets: Option<Vec<String>> = row.try_get("stale_targets")?;
        let stale = StaleIntent {
            changes,
            targets: storage_names(&targets.unwrap_or_default()),
        };
        Ok(WriteStart::Recover(lease, stale))
    }

    /// Extends a lease that a long write still needs. False when the lease was lost.
    pub async fn renew_write(
        &self,
        lease: &WriteLease,
        owner: &str,
        duration: Duration,
    ) -> Result<bool, StoreError> {
        let renewed: Option<i64> = self
            .measure(
                "renew_write",
                sqlx::query_scalar(
                    "WITH repo AS (
                         UPDATE repositories
                         SET lease_expires_at = now() + make_interval(secs => $4)
                         WHERE id = $1 AND lease_owner = $2 AND lease_token = $3
                         RETURNING id, lease_expires_at
                     ), intent AS (
                         UPDATE write_intents i SET lease_expires_at = repo.lease_expires_at
                         FROM repo WHERE i.id = $5
                         RETURNING i.id
                     )
                     SELECT id FROM repo",
                )
                .bind(lease.repository.0)
                .bind(owner)
                .bind(lease.token)
                .bind(duration.as_secs_f64())
                .bind(lease.intent)
                .fetch_optional(&self.pool),
            )
            .await?;
        Ok(renewed.is_some())
    }

    /// Commits a write: generation + 1 on the repository and on the replicas in `current`
    /// (those that hold the new state), a replication job from `source` for every other
    /// assigned storage, the intent closed and the lease released. One statement, guarded by
    /// the fencing token, by every replica in `current` still being recorded at the write's
    /// starting generation, and by `current` being a majority of the repository's assignments
    /// as they stand in the statement: None when a guard fails, and then nothing changed.
    /// `checksum` is the new generation's refs checksum, None when not known.
    pub async fn commit_write(
        &self,
        lease: &WriteLease,
        owner: &str,
        current: &[StorageName],
        source: &StorageName,
        checksum: Option<&str>,
    ) -> Result<Option<WriteOutcome>, StoreError> {
        let row = self
            .measure(
                "commit_write",
                sqlx::query(
                    "WITH eligible AS (
                         SELECT count(*) AS replicas FROM replicas
                         WHERE repository_id = $1 AND storage = ANY($4) AND generation = $8
                     ), assigned AS (
                         SELECT count(*) AS storages,
                                count(*) FILTER (WHERE storage = ANY($4)) AS current
                         FROM assignments WHERE repository_id = $1
                     ), repo AS (
                         UPDATE repositories
                         SET generation = generation + 1, lease_owner = NULL,
                             lease_expires_at = NULL, awaiting_first_push = false,
                             refs_checksum = $9
                         WHERE id = $1 AND lease_owner = $2 AND lease_token = $3
                           AND generation = $8
                           AND (SELECT replicas FROM eligible) = cardinality($4::text[])
                           -- A majority of the assignments as they stand now, not as they
                           -- stood when the write began.
                           AND (SELECT current FROM assigned)
                               >= (SELECT storages FROM assigned) / 2 + 1
                         RETURNING id, generation
                     ), current AS (
                         UPDATE replicas p SET generation = repo.generation
                         FROM repo
                         WHERE p.repository_id = repo.id AND p.storage = ANY($4)
                         RETURNING p.storage
                     ), queued AS (
                         INSERT INTO jobs (kind, repository_id, source_storage, target_storage)
                         SELECT $7, repo.id, $5, a.storage
                         FROM repo JOIN assignments a ON a.repository_id = repo.id
                         WHERE NOT (a.storage = ANY($4))
                         ON CONFLICT (kind, repository_id, target_storage)
                             WHERE state IN ('queued', 'running')
                         DO UPDATE SET rerun = jobs.rerun OR jobs.state = 'running',
                                       updated_at = now()
                         RETURNING target_storage
                     ), closed AS (
                         DELETE FROM write_intents i USING repo
                         WHERE i.id = $6 AND i.repository_id = repo.id
                         RETURNING i.id
                     )
                     SELECT repo.generation,
                            (SELECT count(*) FROM current) AS current,
                            (SELECT count(*) FROM closed) AS closed,
                            ARRAY(SELECT a.storage FROM repo
                                  JOIN assignments a ON a.repository_id = repo.id
                                  WHERE NOT (a.storage = ANY($4)) ORDER BY a.storage) AS behind
                     FROM repo",
                )
                .bind(lease.repository.0)
                .bind(owner)
                .bind(lease.token)
                .bind(texts(current))
                .bind(source.as_str())
                .bind(lease.intent)
                .bind(JOB_REPLICATE)
                .bind(lease.generation)
                .bind(checksum)
                .fetch_optional(&self.pool),
            )
            .await?;
        let Some(row) = row else { return Ok(None) };
        Ok(Some(WriteOutcome {
            generation: row.try_get("generation")?,
            queued: storage_names(&row.try_get::<Vec<String>, _>("behind")?),
        }))
    }

    /// Records, in the write's intent, the branch HEAD pointed to before the write: the old
    /// value of its HEAD change, so that a rollback can set it back. Fenced on the lease;
    /// false when the lease is no longer this write's.
    pub async fn record_head_before(
        &self,
        lease: &WriteLease,
        owner: &str,
        head: &str,
    ) -> Result<bool, StoreError> {
        let recorded = self
            .measure(
                "record_head_before",
                sqlx::query(
                    "UPDATE write_intents i
                     SET ref_updates = (
                         SELECT jsonb_agg(CASE WHEN e->>'ref' = 'HEAD'
                                               THEN jsonb_set(e, '{old}', to_jsonb($4::text))
                                               ELSE e END
                                          ORDER BY n)
                         FROM jsonb_array_elements(i.ref_updates) WITH ORDINALITY AS u(e, n))
                     FROM repositories r
                     WHERE i.id = $1 AND r.id = i.repository_id
                       AND r.lease_owner = $2 AND r.lease_token = $3",
                )
                .bind(lease.intent)
                .bind(owner)
                .bind(lease.token)
                .bind(head)
                .execute(&self.pool),
            )
            .await?;
        Ok(recorded.rows_affected() == 1)
    }

    /// The refs checksum recorded for the repository's generation, if known.
    pub async fn refs_checksum(
        &self,
        repository: RepositoryId,
    ) -> Result<Option<String>, StoreError> {
        let checksum: Option<Option<String>> = self
            .measure(
                "refs_checksum",
                sqlx::query_scalar("SELECT refs_checksum FROM repositories WHERE id = $1")
                    .bind(repository.0)
                    .fetch_optional(&self.pool),
            )
            .await?;
        Ok(checksum.flatten())
    }

    /// Ends a write that changed nothing on any replica: the intent is closed and the lease
    /// released, the generation stays. False when the lease was already lost.
    pub async fn release_write(&self, lease: &WriteLease, owner: &str) -> Result<bool, StoreError> {
        let released: Option<i64> = self
            .measure(
                "release_write",
                sqlx::query_scalar(
                    "WITH repo AS (
                         UPDATE repositories SET lease_owner = NULL, lease_expires_at = NULL
                         WHERE id = $1 AND lease_owner = $2 AND lease_token = $3
                         RETURNING id
                     ), closed AS (
                         DELETE FROM write_intents i USING repo
                         WHERE i.id = $4 AND i.repository_id = repo.id
                         RETURNING i.id
                     )
                     SELECT id FROM repo",
                )
                .bind(lease.repository.0)
                .bind(owner)
                .bind(lease.token)
                .bind(lease.intent)
                .fetch_optional(&self.pool),
            )
            .await?;
        Ok(released.is_some())
    }

    /// Reads where a write stands after its commit or release was refused, or its answer lost.
    pub async fn write_standing(
        &self,
        lease: &WriteLease,
        owner: &str,
    ) -> Result<Standing, StoreError> {
        let standing: Option<String> = self
            .measure(
                "write_standing",
                sqlx::query_scalar(
                    "SELECT CASE
                         WHEN r.lease_token <> $2 THEN 'lost'
                         WHEN r.lease_owner = $3 THEN
                             CASE WHEN EXISTS (SELECT 1 FROM write_intents WHERE id = $5)
                                  THEN 'held' ELSE 'lost' END
                         WHEN r.lease_owner IS NOT NULL
                              OR EXISTS (SELECT 1 FROM write_intents WHERE id = $5) THEN 'lost'
                         WHEN r.generation = $4 + 1 THEN 'committed'
                         WHEN r.generation = $4 THEN 'released'
                         ELSE 'lost'
                     END
                     FROM repositories r WHERE r.id = $1",
                )
                .bind(lease.repository.0)
                .bind(lease.token)
                .bind(owner)
                .bind(lease.generation)
                .bind(lease.intent)
                .fetch_optional(&self.pool),
            )
            .await?;
        Ok(match standing.as_deref() {
            Some("committed") => Standing::Committed,
            Some("released") => Standing::Released,
            Some("held") => Standing::Held,
            _ => Standing::Lost,
        })
    }
}

//! The replicator's statements: what a copy starts from, the repository's lease for its refs
//! phase, and how its result is recorded, fenced by both the job's lease and the repository's.

use sqlx::Row as _;

use std::time::Duration;

use super::{ClaimedJob, Closed, Store, StoreError, millis, undecodable};
use crate::model::{RelativePath, RepositoryId, StorageName};

/// What the replicator reads before it copies.
#[derive(Debug, Clone)]
pub struct ReplicationPlan {
    pub replica_path: RelativePath,
    /// The repository's generation when the plan was read.
    pub generation: i64,
    /// The target's recorded generation; None when it has no replica.
    pub target_generation: Option<i64>,
    pub target_assigned: bool,
    /// Up-to-date replicas to copy from, the job's own source first.
    pub sources: Vec<StorageName>,
}

impl Store {
    /// What a replication of `repository` to `target` starts from. None: the repository is
    /// gone.
    pub async fn plan_replication(
        &self,
        repository: RepositoryId,
        source: Option<&StorageName>,
        target: &StorageName,
    ) -> Result<Option<ReplicationPlan>, StoreError> {
        let row = self
            .measure(
                "plan_replication",
                sqlx::query(
                    "SELECT r.replica_path, r.generation,
                            (SELECT p.generation FROM replicas p
                             WHERE p.repository_id = r.id AND p.storage = $2) AS target_generation,
                            EXISTS (SELECT 1 FROM assignments a
                                    WHERE a.repository_id = r.id AND a.storage = $2) AS assigned,
                            ARRAY(SELECT p.storage FROM replicas p
                                  WHERE p.repository_id = r.id AND p.generation = r.generation
                                    AND p.storage <> $2
                                  ORDER BY p.storage IS NOT DISTINCT FROM $3 DESC, random())
                                AS sources
                     FROM repositories r WHERE r.id = $1",
                )
                .bind(repository.0)
                .bind(target.as_str())
                .bind(source.map(StorageName::as_str))
                .fetch_optional(&self.pool),
            )
            .await?;
        let Some(row) = row else { return Ok(None) };
        let replica_path: String = row.try_get("replica_path")?;
        let sources: Vec<String> = row.try_get("sources")?;
        Ok(Some(ReplicationPlan {
            replica_path: RelativePath::parse(&replica_path)
                .map_err(|error| undecodable("replica_path", error))?,
            generation: row.try_get("generation")?,
            target_generation: row.try_get("target_generation")?,
            target_assigned: row.try_get("assigned")?,
            sources: super::storage_names(&sources),
        }))
    }

    /// Takes the repository's lease for a replication's refs phase, as a write takes it: a
    /// new token, which the target's node takes as its fence. Not while a write holds the
    /// lease (its intent is open while it runs: busy), nor while an interrupted write's intent
    /// outlived its lease (its recovery comes first).
    ///
    /// While the lease is busy, each attempt reserves it for [`RESERVATION`]: new writes then
    /// wait, and the replication takes the lease when the write holding it ends, rather than
    /// racing a stream of writers for it. A reservation that is not renewed lapses.
    pub async fn lease_for_replication(
        &self,
        repository: RepositoryId,
        source: Option<&StorageName>,
        target: &StorageName,
        owner: &str,
        lease: Duration,
    ) -> Result<ReplicationLease, StoreError> {
        let row = self
            .measure(
                "lease_for_replication",
                sqlx::query(
                    "WITH repo AS (
                         SELECT r.id,
                                (r.lease_owner IS NULL OR r.lease_expires_at < now()) AS free,
                                EXISTS (SELECT 1 FROM write_intents i
                                        WHERE i.repository_id = r.id) AS intent
                         FROM repositories r WHERE r.id = $1
                     ), lease AS (
                         UPDATE repositories r
                         SET lease_owner = $4, lease_token = nextval('repository_lease_tokens'),
                             lease_expires_at = now() + $5 * interval '1 millisecond',
                             lease_reserved_by = NULL, lease_reserved_until = NULL
                         FROM repo
                         WHERE r.id = repo.id AND NOT repo.intent
                           AND (r.lease_owner IS NULL OR r.lease_expires_at < now())
                           AND (r.lease_reserved_by IS NULL OR r.lease_reserved_until < now()
                                OR r.lease_reserved_by = $4)
                         RETURNING r.id, r.lease_token, r.generation
                     ), reserved AS (
                         UPDATE repositories r
                         SET lease_reserved_by = $4,
                             lease_reserved_until = now() + $6 * interval '1 millisecond'
                         FROM repo
                         WHERE r.id = repo.id AND NOT repo.free
                           AND NOT EXISTS (SELECT 1 FROM lease)
                           AND (r.lease_reserved_by IS NULL OR r.lease_reserved_until < now()
                                OR r.lease_reserved_by = $4)
                     )
                     SELECT repo.free AND repo.intent AS interrupted, lease.lease_token, lease.generation,
                            (SELECT p.generation FROM replicas p
                             WHERE p.repository_id = lease.id AND p.storage = $2)
                                AS target_generation,
                            ARRAY(SELECT p.storage FROM replicas p
                                  WHERE p.repository_id = lease.id
                                    AND p.generation = lease.generation AND p.storage <> $2
                                  ORDER BY p.storage IS NOT DISTINCT FROM $3 DESC, random())
                                AS sources
                     FROM repo LEFT JOIN lease ON true",
                )
                .bind(repository.0)
                .bind(target.as_str())
                .bind(source.map(StorageName::as_str))
                .bind(owner)
                .bind(millis(lease))
                .bind(millis(RESERVATION))
                .fetch_optional(&self.pool),
            )
            .await?;
        let Some(row) = row else {
            return Ok(ReplicationLease::Gone);
        };
        let (Some(token), Some(generation)) = (
            row.try_get::<Option<i64>, _>("lease_token")?,
            row.try_get::<Option<i64>, _>("generation")?,
        ) else {
            return Ok(if row.try_get("interrupted")? {
                ReplicationLease::Interrupted
            } else {
                ReplicationLease::Busy
            });
        };
        let sources: Vec<String> = row.try_get("sources")?;
        Ok(ReplicationLease::Leased(LeasedReplication {
            repository,
            token,
            generation,
            target_generation: row.try_get("target_generation")?,
            sources: super::storage_names(&sources),
        }))
    }

    /// Closes a replication whose refs phase ran under `leased`, in one statement fenced by
    /// the job's lease and the repository's: the target is recorded at the leased generation
    /// (never lower than it was), the repository's lease is released, and the job is done (or
    /// queued again when the same work was merged into it while it ran). A replication whose
    /// repository lease was lost records nothing, and its job is queued again.
    ///
    /// Returns how the job closed and the target's recorded generation after.
    pub async fn close_replication(
        &self,
        job: &ClaimedJob,
        leased: &LeasedReplication,
        owner: &str,
    ) -> Result<(Closed, Option<i64>), StoreError> {
        let row = self
            .measure(
                "close_replication",
                sqlx::query(
                    "WITH repo AS (
                         SELECT r.id, r.generation FROM repositories r
                         WHERE r.id = $3 AND r.lease_token = $5 AND r.lease_owner = $6
                         FOR UPDATE
                     ), decision AS (
                         SELECT CASE
                             WHEN NOT EXISTS (SELECT 1 FROM repositories WHERE id = $3)
                                 THEN 'cancelled'
                             WHEN NOT EXISTS (SELECT 1 FROM repo) THEN 'queued'
                             ELSE 'done' END AS state
                     ), job AS (
                         UPDATE jobs j
                         SET state = CASE WHEN j.rerun AND d.state = 'done' THEN 'queued'
                                          ELSE d.state END,
                             finished_at = CASE WHEN j.rerun OR d.state = 'queued' THEN NULL
                                                ELSE now() END,
                             attempts = CASE WHEN j.rerun OR d.state = 'queued' THEN 0
                                             ELSE j.attempts END,
                             postponed = 0, rerun = false, run_after = now(),
                             lease_owner = NULL, lease_expires_at = NULL, last_error = NULL,
                             updated_at = now()
                         FROM decision d
                         WHERE j.id = $1 AND j.lease_token = $2 AND j.state = 'running'
                         RETURNING j.state
                     ), recorded AS (
                         INSERT INTO replicas AS p (repository_id, storage, generation)
                         SELECT repo.id, $4, repo.generation FROM repo, job
                         ON CONFLICT (repository_id, storage) DO UPDATE
                             SET generation = EXCLUDED.generation
                             WHERE p.generation IS NULL OR p.generation < EXCLUDED.generation
                         RETURNING p.generation
                     ), released AS (
                         UPDATE repositories r SET lease_owner = NULL, lease_expires_at = NULL
                         FROM repo WHERE r.id = repo.id
                     )
                     SELECT (SELECT state FROM job) AS state,
                            COALESCE((SELECT generation FROM recorded),
                                     (SELECT p.generation FROM replicas p
                                      WHERE p.repository_id = $3 AND p.storage = $4))
                                AS target_generation",
                )
                .bind(job.id.0)
                .bind(job.lease_token)
                .bind(job.repository.0)
                .bind(job.target.as_str())
                .bind(leased.token)
                .bind(owner)
                .fetch_one(&self.pool),
            )
            .await?;
        let state: Option<String> = row.try_get("state")?;
        let closed = match state.as_deref() {
            Some("done") | Some("cancelled") => Closed::Done,
            Some(_) => Closed::Requeued,
            None => Closed::Lost,
        };
        Ok((closed, row.try_get("target_generation")?))
    }
}

/// How long one attempt to take a busy repository's lease keeps it reserved.
pub const RESERVATION: Duration = Duration::from_secs(1);

/// What an attempt to take the repository's lease for a replication found.
#[derive(Debug)]
pub enum ReplicationLease {
    Leased(LeasedReplication),
    /// A write (or another replication) holds the lease.
    Busy,
    /// An interrupted write's intent is open: the recovery job settles it first.
    Interrupted,
    /// The repository is gone.
    Gone,
}

/// The repository's lease, held by a replication for its refs phase.
#[derive(Debug, Clone)]
pub struct LeasedReplication {
    pub repository: RepositoryId,
    /// The token the target's node takes as the replica's fence.
    pub token: i64,
    /// The repository's generation: no write can move it while the lease is held.
    pub generation: i64,
    /// The target's recorded generation; None when it has none.
    pub target_generation: Option<i64>,
    /// Up-to-date replicas to copy from, the job's own source first.
    pub sources: Vec<StorageName>,
}

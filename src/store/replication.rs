//! The replicator's two statements: what a copy starts from, and how its result is recorded,
//! fenced by the job's lease.

use sqlx::Row as _;

use super::{ClaimedJob, Closed, Store, StoreError, undecodable};
use crate::model::{RelativePath, RepositoryId, StorageName};

/// What the replicator reads before it copies.
#[derive(Debug, Clone)]
pub struct ReplicationPlan {
    pub replica_path: RelativePath,
    /// The repository's generation: what the copy will bring the target to.
    pub generation: i64,
    /// The repository's write-lease token: it counts the writes begun so far.
    pub lease_token: i64,
    /// A write is in flight.
    pub writing: bool,
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
                    "SELECT r.replica_path, r.generation, r.lease_token,
                            EXISTS (SELECT 1 FROM write_intents i WHERE i.repository_id = r.id)
                                AS writing,
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
            lease_token: row.try_get("lease_token")?,
            writing: row.try_get("writing")?,
            target_generation: row.try_get("target_generation")?,
            target_assigned: row.try_get("assigned")?,
            sources: super::storage_names(&sources),
        }))
    }

    /// Closes a replication that copied the repository as it was at `plan`, in one statement
    /// fenced by the job's lease:
    /// - the target is recorded at the plan's generation, never lower than it was, and only
    ///   if every write begun since the plan has committed and none is in flight (the copy
    ///   then holds no change that could still be rolled back);
    /// - the job is done, or queued again when the repository has moved on (or the same work
    ///   was merged into it), so the target catches up with the newer writes too.
    ///
    /// Returns how the job closed and the target's recorded generation after.
    pub async fn close_replication(
        &self,
        job: &ClaimedJob,
        plan: &ReplicationPlan,
    ) -> Result<(Closed, Option<i64>), StoreError> {
        let row = self
            .measure(
                "close_replication",
                sqlx::query(
                    "WITH repo AS (
                         SELECT r.id, r.generation, r.lease_token,
                                EXISTS (SELECT 1 FROM write_intents i
                                        WHERE i.repository_id = r.id) AS writing
                         FROM repositories r WHERE r.id = $3
                     ), clean AS (
                         SELECT repo.id FROM repo
                         WHERE NOT repo.writing
                           AND repo.lease_token - $6 = repo.generation - $5
                     ), decision AS (
                         SELECT CASE
                             WHEN NOT EXISTS (SELECT 1 FROM repo) THEN 'cancelled'
                             WHEN NOT EXISTS (SELECT 1 FROM clean)
                                  OR (SELECT generation FROM repo) <> $5 THEN 'queued'
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
                         SELECT clean.id, $4, $5 FROM clean, job
                         ON CONFLICT (repository_id, storage) DO UPDATE
                             SET generation = EXCLUDED.generation
                             WHERE p.generation IS NULL OR p.generation < EXCLUDED.generation
                         RETURNING p.generation
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
                .bind(plan.generation)
                .bind(plan.lease_token)
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

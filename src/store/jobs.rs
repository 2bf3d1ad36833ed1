//! The job queue. A worker claims ready jobs with `FOR UPDATE SKIP LOCKED`, which gives each a
//! new lease token (the fencing token) and an expiry. Every later statement about the job, be
//! it a heartbeat, a completion, a failure or a release, is a compare-and-set on (id, lease
//! token) of a running job: a worker whose lease was taken over or cancelled changes nothing.

use std::time::Duration;

use sqlx::Row as _;

use super::{Store, StoreError, millis, undecodable};
use crate::model::{RepositoryId, StorageName};

/// A job's state. `dead` jobs ran out of attempts and stay for operators to see.
pub const JOB_STATES: [&str; 5] = ["queued", "running", "done", "dead", "cancelled"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(pub i64);

impl std::fmt::Display for JobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Work to put on the queue.
#[derive(Debug, Clone)]
pub struct NewJob<'a> {
    pub kind: &'a str,
    pub repository: RepositoryId,
    pub source: Option<&'a StorageName>,
    pub target: &'a StorageName,
}

/// A job this worker holds the lease of.
#[derive(Debug, Clone)]
pub struct ClaimedJob {
    pub id: JobId,
    pub kind: String,
    pub repository: RepositoryId,
    pub source: Option<StorageName>,
    pub target: StorageName,
    /// Set on removal jobs, whose repository row is gone.
    pub replica_path: Option<String>,
    /// This run included.
    pub attempts: i32,
    pub postponed: i32,
    pub lease_token: i64,
    /// Seconds since the job was created.
    pub age: f64,
}

/// How a job closed, as the statement that closed it saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    Done,
    /// Queued again: more work arrived while it ran.
    Requeued,
    /// Queued again after a failure, to run after the backoff.
    Retrying,
    /// Out of attempts.
    Dead,
    /// Waiting for a node, with no attempt spent.
    Postponed,
    /// Handed back at once, with no attempt spent.
    Released,
    /// The lease was no longer this worker's: taken over, or the job was cancelled. Nothing
    /// was changed.
    Lost,
}

impl Store {
    /// Queues a job, or merges it into the active job for the same (kind, repository,
    /// target): a queued one already covers it, and a running one runs once more when done.
    /// Returns the job's id and whether it was new.
    pub async fn enqueue(&self, job: &NewJob<'_>) -> Result<(JobId, bool), StoreError> {
        let row = self
            .measure(
                "enqueue",
                sqlx::query(
                    "INSERT INTO jobs (kind, repository_id, source_storage, target_storage)
                     VALUES ($1, $2, $3, $4)
                     ON CONFLICT (kind, repository_id, target_storage)
                         WHERE state IN ('queued', 'running')
                     DO UPDATE SET rerun = jobs.rerun OR jobs.state = 'running',
                                   updated_at = now()
                     RETURNING id, xmax = 0 AS inserted",
                )
                .bind(job.kind)
                .bind(job.repository.0)
                .bind(job.source.map(StorageName::as_str))
                .bind(job.target.as_str())
                .fetch_one(&self.pool),
            )
            .await?;
        Ok((JobId(row.try_get("id")?), row.try_get("inserted")?))
    }

    /// Leases up to `limit` ready jobs of `kinds`: queued ones whose time has come, and
    /// running ones whose worker stopped renewing. Each gets a new lease token. A target
    /// storage never has more than `per_target` live jobs running, across all workers: a
    /// target at its limit is passed over, so the others' jobs go on.
    pub async fn claim_jobs(
        &self,
        kinds: &[String],
        owner: &str,
        lease: Duration,
        limit: usize,
        per_target: usize,
    ) -> Result<Vec<ClaimedJob>, StoreError> {
        let rows = self
            .measure(
                "claim_jobs",
                sqlx::query(
                    "WITH busy AS (
                         SELECT target_storage, count(*) AS running FROM jobs
                         WHERE state = 'running' AND lease_expires_at >= now()
                         GROUP BY target_storage
                     ), candidates AS (
                         SELECT j.id, j.target_storage, j.run_after,
                                COALESCE(b.running, 0) AS running
                         FROM jobs j LEFT JOIN busy b ON b.target_storage = j.target_storage
                         WHERE j.kind = ANY($1)
                           AND ((j.state = 'queued' AND j.run_after <= now())
                                OR (j.state = 'running' AND j.lease_expires_at < now()))
                           AND COALESCE(b.running, 0) < $5
                         ORDER BY j.run_after, j.id
                         LIMIT $4 * 4
                     ), ranked AS (
                         SELECT id, run_after, running + row_number() OVER (
                                    PARTITION BY target_storage ORDER BY run_after, id) AS slot
                         FROM candidates
                     ), ready AS (
                         SELECT j.id FROM jobs j
                         WHERE j.id IN (SELECT id FROM ranked WHERE slot <= $5)
                           AND j.kind = ANY($1)
                           AND ((j.state = 'queued' AND j.run_after <= now())
                                OR (j.state = 'running' AND j.lease_expires_at < now()))
                         ORDER BY j.run_after, j.id
                         LIMIT $4
                         FOR UPDATE SKIP LOCKED
                     )
                     UPDATE jobs j
                     SET state = 'running', lease_owner = $2, lease_token = j.lease_token + 1,
                         lease_expires_at = now() + $3 * interval '1 millisecond',
                         attempts = j.attempts + 1, progress = NULL,
                         started_at = now(), updated_at = now()
                     FROM ready WHERE j.id = ready.id
                     RETURNING j.id, j.kind, j.repository_id, j.source_storage,
                               j.target_storage, j.attempts, j.postponed, j.lease_token, j.replica_path,
                               extract(epoch FROM now() - j.created_at)::float8 AS age",
                )
                .bind(kinds)
                .bind(owner)
                .bind(millis(lease))
                .bind(limit as i64)
                .bind(per_target.clamp(1, i64::MAX as usize) as i64)
                .fetch_all(&self.pool),
            )
            .await?;
        rows.iter().map(claimed).collect()
    }

    /// Renews a lease, and records what the job is doing. False: the lease is lost, and the
    /// worker must stop.
    pub async fn renew_job(
        &self,
        id: JobId,
        token: i64,
        lease: Duration,
        progress: Option<&str>,
    ) -> Result<bool, StoreError> {
        let result = self
            .measure(
                "renew_job",
                sqlx::query(
                    "UPDATE jobs
                     SET lease_expires_at = now() + $3 * interval '1 millisecond',
                         progress = COALESCE($4, progress), updated_at = now()
                     WHERE id = $1 AND lease_token = $2 AND state = 'running'",
                )
                .bind(id.0)
                .bind(token)
                .bind(millis(lease))
                .bind(progress)
                .execute(&self.pool),
            )
            .await?;
        Ok(result.rows_affected() == 1)
    }

    /// Marks a job done, or queues it again at once when the same work was merged into it
    /// while it ran.
    pub async fn complete_job(&self, id: JobId, token: i64) -> Result<Closed, StoreError> {
        let state: Option<String> = self
            .measure(
                "complete_job",
                sqlx::query_scalar(
                    "UPDATE jobs
                     SET state = CASE WHEN rerun THEN 'queued' ELSE 'done' END,
                         attempts = CASE WHEN rerun THEN 0 ELSE attempts END,
                         run_after = now(), rerun = false, postponed = 0,
                         lease_owner = NULL, lease_expires_at = NULL, last_error = NULL,
                         finished_at = CASE WHEN rerun THEN NULL ELSE now() END,
                         updated_at = now()
                     WHERE id = $1 AND lease_token = $2 AND state = 'running'
                     RETURNING state",
                )
                .bind(id.0)
                .bind(token)
                .fetch_optional(&self.pool),
            )
            .await?;
        Ok(match state.as_deref() {
            Some("done") => Closed::Done,
            Some(_) => Closed::Requeued,
            None => Closed::Lost,
        })
    }

    /// Records a failure: the job runs again after `backoff`, unless this was its last
    /// attempt, when it is dead.
    pub async fn fail_job(
        &self,
        id: JobId,
        token: i64,
        error: &str,
        max_attempts: i32,
        backoff: Duration,
    ) -> Result<Closed, StoreError> {
        let state: Option<String> = self
            .measure(
                "fail_job",
                sqlx::query_scalar(
                    "UPDATE jobs
                     SET state = CASE WHEN attempts >= $4 THEN 'dead' ELSE 'queued' END,
                         run_after = now() + $5 * interval '1 millisecond',
                         last_error = $3, lease_owner = NULL, lease_expires_at = NULL,
                         finished_at = CASE WHEN attempts >= $4 THEN now() END,
                         updated_at = now()
                     WHERE id = $1 AND lease_token = $2 AND state = 'running'
                     RETURNING state",
                )
                .bind(id.0)
                .bind(token)
                .bind(truncate(error))
                .bind(max_attempts)
                .bind(millis(backoff))
                .fetch_optional(&self.pool),
            )
            .await?;
        Ok(match state.as_deref() {
            Some("dead") => Closed::Dead,
            Some(_) => Closed::Retrying,
            None => Closed::Lost,
        })
    }

    /// Puts a job back to wait for a node that is down: the attempt is given back, and the
    /// wait counted in `postponed`, which its backoff grows with.
    pub async fn postpone_job(
        &self,
        id: JobId,
        token: i64,
        reason: &str,
        delay: Duration,
    ) -> Result<Closed, StoreError> {
        self.hand_back("postpone_job", id, token, Some(reason), delay)
            .await
            .map(|handed| {
                if handed {
                    Closed::Postponed
                } else {
                    Closed::Lost
                }
            })
    }

    /// Hands a lease back at once (a worker shutting down): the job is ready for another
    /// worker, with no attempt spent.
    pub async fn release_job(&self, id: JobId, token: i64) -> Result<Closed, StoreError> {
        self.hand_back("release_job", id, token, None, Duration::ZERO)
            .await
            .map(|handed| {
                if handed {
                    Closed::Released
                } else {
                    Closed::Lost
                }
            })
    }

    async fn hand_back(
        &self,
        operation: &'static str,
        id: JobId,
        token: i64,
        reason: Option<&str>,
        delay: Duration,
    ) -> Result<bool, StoreError> {
        let result = self
            .measure(
                operation,
                sqlx::query(
                    "UPDATE jobs
                     SET state = 'queued', attempts = greatest(attempts - 1, 0),
                         postponed = postponed + CASE WHEN $3::text IS NULL THEN 0 ELSE 1 END,
                         last_error = COALESCE($3, last_error),
                         run_after = now() + $4 * interval '1 millisecond',
                         lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
                     WHERE id = $1 AND lease_token = $2 AND state = 'running'",
                )
                .bind(id.0)
                .bind(token)
                .bind(reason.map(truncate))
                .bind(millis(delay))
                .execute(&self.pool),
            )
            .await?;
        Ok(result.rows_affected() == 1)
    }

    /// Hands back every lease `owner` holds on jobs of `kinds`: after a job type's runner
    /// stopped, its jobs are ready again at once rather than when their leases expire.
    pub async fn release_jobs_of(&self, owner: &str, kinds: &[String]) -> Result<u64, StoreError> {
        let result = self
            .measure(
                "release_jobs_of",
                sqlx::query(
                    "UPDATE jobs
                     SET state = 'queued', attempts = greatest(attempts - 1, 0),
                         lease_token = lease_token + 1, run_after = now(),
                         lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
                     WHERE lease_owner = $1 AND kind = ANY($2) AND state = 'running'",
                )
                .bind(owner)
                .bind(kinds)
                .execute(&self.pool),
            )
            .await?;
        Ok(result.rows_affected())
    }

    /// Cancels a queued or running job. A running one's lease token moves on, so its worker
    /// can neither renew nor complete it. False: the job is not active.
    pub async fn cancel_job(&self, id: JobId, reason: &str) -> Result<bool, StoreError> {
        let result = self
            .measure(
                "cancel_job",
                sqlx::query(
                    "UPDATE jobs
                     SET state = 'cancelled', lease_token = lease_token + 1,
                         lease_owner = NULL, lease_expires_at = NULL, last_error = $2,
                         finished_at = now(), updated_at = now()
                     WHERE id = $1 AND state IN ('queued', 'running')",
                )
                .bind(id.0)
                .bind(reason)
                .execute(&self.pool),
            )
            .await?;
        Ok(result.rows_affected() == 1)
    }

    /// Queues a dead, cancelled or done job again with fresh attempts. Err(Some(other)):
    /// another active job already covers the same work. Err(None): no such job, or it is
    /// still active.
    pub async fn retry_job(&self, id: JobId) -> Result<Result<(), Option<JobId>>, StoreError> {
        let row = self
            .measure(
                "retry_job",
                sqlx::query(
                    "WITH old AS (SELECT * FROM jobs WHERE id = $1),
                     covering AS (
                         SELECT j.id FROM jobs j, old
                         WHERE j.kind = old.kind AND j.repository_id = old.repository_id
                           AND j.target_storage = old.target_storage
                           AND j.state IN ('queued', 'running') AND j.id <> old.id
                     ),
                     retried AS (
                         UPDATE jobs j
                         SET state = 'queued', attempts = 0, postponed = 0, run_after = now(),
                             finished_at = NULL, updated_at = now()
                         FROM old
                         WHERE j.id = old.id AND old.state IN ('dead', 'cancelled', 'done')
                           AND NOT EXISTS (SELECT 1 FROM covering)
                         RETURNING j.id
                     )
                     SELECT (SELECT id FROM retried) AS retried, (SELECT id FROM covering) AS covering",
                )
                .bind(id.0)
                .fetch_one(&self.pool),
            )
            .await?;
        let retried: Option<i64> = row.try_get("retried")?;
        let covering: Option<i64> = row.try_get("covering")?;
        Ok(match (retried, covering) {
            (Some(_), _) => Ok(()),
            (None, other) => Err(other.map(JobId)),
        })
    }

    /// Deletes jobs that finished (done or cancelled) longer ago than `age`. Dead jobs stay
    /// until an operator retries or cancels them.
    pub async fn forget_finished_jobs(&self, age: Duration) -> Result<u64, StoreError> {
        let result = self
            .measure(
                "forget_finished_jobs",
                sqlx::query(
                    "DELETE FROM jobs
                     WHERE state IN ('done', 'cancelled')
                       AND finished_at < now() - $1 * interval '1 millisecond'",
                )
                .bind(millis(age))
                .execute(&self.pool),
            )
            .await?;
        Ok(result.rows_affected())
    }
}

fn claimed(row: &sqlx::postgres::PgRow) -> Result<ClaimedJob, StoreError> {
    let source: Option<String> = row.try_get("source_storage")?;
    let target: String = row.try_get("target_storage")?;
    Ok(ClaimedJob {
        id: JobId(row.try_get("id")?),
        kind: row.try_get("kind")?,
        repository: RepositoryId(row.try_get("repository_id")?),
        source: source
            .map(|source| StorageName::parse(&source))
            .transpose()
            .map_err(|error| undecodable("source_storage", error))?,
        target: StorageName::parse(&target)
            .map_err(|error| undecodable("target_storage", error))?,
        replica_path: row.try_get("replica_path")?,
        attempts: row.try_get("attempts")?,
        postponed: row.try_get("postponed")?,
        lease_token: row.try_get("lease_token")?,
        age: row.try_get("age")?,
    })
}

/// Errors are stored up to 2 KiB.
pub(super) fn truncate(error: &str) -> &str {
    let mut end = error.len().min(2048);
    while !error.is_char_boundary(end) {
        end -= 1;
    }
    &error[..end]
}

//! What operators and the metrics see of the job queue: the listing and the depth by kind and
//! state. The queue's own statements are in `jobs.rs`.

use sqlx::Row as _;

use super::{Store, StoreError};

/// One row of the operators' listing.
#[derive(Debug, Clone, serde::Serialize)]
pub struct JobRow {
    pub id: i64,
    pub kind: String,
    pub repository_id: i64,
    pub source: Option<String>,
    pub target: String,
    pub state: String,
    pub attempts: i32,
    pub postponed: i32,
    pub lease_owner: Option<String>,
    pub last_error: Option<String>,
    pub progress: Option<String>,
    /// Seconds since creation.
    pub age_seconds: f64,
    /// Seconds until it may run; negative when ready.
    pub runs_in_seconds: f64,
}

/// Queue depth of one kind in one state, and for ready jobs the age of the oldest.
#[derive(Debug, Clone)]
pub struct QueueDepth {
    pub kind: String,
    pub state: String,
    pub count: i64,
    /// Seconds the oldest ready job has been ready (queued jobs only).
    pub oldest_ready: f64,
}

impl Store {
    /// Jobs for operators, newest first, optionally of one state.
    pub async fn list_jobs(
        &self,
        state: Option<&str>,
        limit: i64,
    ) -> Result<Vec<JobRow>, StoreError> {
        let rows = self
            .measure(
                "list_jobs",
                sqlx::query(
                    "SELECT id, kind, repository_id, source_storage, target_storage, state,
                            attempts, postponed, lease_owner, last_error, progress,
                            extract(epoch FROM now() - created_at)::float8 AS age,
                            extract(epoch FROM run_after - now())::float8 AS runs_in
                     FROM jobs WHERE $1::text IS NULL OR state = $1
                     ORDER BY id DESC LIMIT $2",
                )
                .bind(state)
                .bind(limit)
                .fetch_all(&self.pool),
            )
            .await?;
        rows.iter()
            .map(|row| {
                Ok(JobRow {
                    id: row.try_get("id")?,
                    kind: row.try_get("kind")?,
                    repository_id: row.try_get("repository_id")?,
                    source: row.try_get("source_storage")?,
                    target: row.try_get("target_storage")?,
                    state: row.try_get("state")?,
                    attempts: row.try_get("attempts")?,
                    postponed: row.try_get("postponed")?,
                    lease_owner: row.try_get("lease_owner")?,
                    last_error: row.try_get("last_error")?,
                    progress: row.try_get("progress")?,
                    age_seconds: row.try_get("age")?,
                    runs_in_seconds: row.try_get("runs_in")?,
                })
            })
            .collect()
    }

    /// Jobs by kind and state, with the age of the oldest ready one.
    pub async fn queue_depth(&self) -> Result<Vec<QueueDepth>, StoreError> {
        let rows = self
            .measure(
                "queue_depth",
                sqlx::query(
                    "SELECT kind, state, count(*) AS count,
                            COALESCE(extract(epoch FROM now() - min(run_after)
                                FILTER (WHERE state = 'queued' AND run_after <= now())), 0)::float8
                                AS oldest_ready
                     FROM jobs GROUP BY kind, state ORDER BY kind, state",
                )
                .fetch_all(&self.pool),
            )
            .await?;
        rows.iter()
            .map(|row| {
                Ok(QueueDepth {
                    kind: row.try_get("kind")?,
                    state: row.try_get("state")?,
                    count: row.try_get("count")?,
                    oldest_ready: row.try_get("oldest_ready")?,
                })
            })
            .collect()
    }
}

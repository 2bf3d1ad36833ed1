//! The figures behind `admin status`, `/status` and the metrics, and the operator's views of
//! one repository's replicas and of the repositories short of replicas. Every figure comes
//! from a counter row or an index over the work outstanding, never from a count of every
//! repository, so a status costs the same at a million repositories as at ten.

use sqlx::Row as _;

use super::{JOB_REPLICATE, Store, StoreError, texts};
use crate::model::{RelativePath, StorageName};

/// One storage's replicas and the work aimed at it.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct StorageFigures {
    pub storage: String,
    /// Replicas recorded on the storage.
    pub replicas: i64,
    /// Present, but behind their repository's generation (or of unknown generation).
    pub behind: i64,
    /// Missing on the node, or not copied there yet.
    pub missing: i64,
    /// Replication jobs running against the storage now.
    pub repairing: i64,
    /// Jobs queued against the storage.
    pub queued: i64,
    /// Replicas waiting for their first verification (all of them after a wipe).
    pub unverified: i64,
    /// Seconds since the verifier last recorded a batch with a replica here.
    pub verified_ago_seconds: Option<f64>,
    pub verified: i64,
    pub found_missing: i64,
    pub found_diverged: i64,
    pub verify_errors: i64,
    /// Seconds since the storage's identity last changed (a wipe), if it ever did.
    pub identity_changed_ago_seconds: Option<f64>,
}

impl StorageFigures {
    pub fn up_to_date(&self) -> i64 {
        self.replicas - self.behind - self.missing
    }
}

/// The queue, by kind and state, for the states that matter to an operator.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct JobFigures {
    /// (kind, state, jobs) for queued, running and dead jobs.
    pub by_state: Vec<(String, String, i64)>,
    /// Jobs that could run now: queued and due, or running under an expired lease.
    pub ready: i64,
    /// Seconds the oldest of them has been ready.
    pub oldest_ready_seconds: Option<f64>,
    /// Seconds since any job last started or finished.
    pub last_progress_seconds: Option<f64>,
    pub dead: i64,
}

/// The cluster-wide write lock.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct WriteLock {
    pub enabled: bool,
    pub reason: Option<String>,
    pub changed_by: Option<String>,
    pub changed_ago_seconds: f64,
}

/// Everything the status shows that the database knows.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Figures {
    /// (virtual storage, repositories).
    pub repositories: Vec<(String, i64)>,
    pub storages: Vec<StorageFigures>,
    pub jobs: JobFigures,
    pub write_lock: WriteLock,
    /// The reconciler's last round, seconds ago.
    pub reconciled_ago_seconds: Option<f64>,
    /// Write intents whose lease ran out: interrupted writes that wait for recovery.
    pub interrupted_writes: i64,
    /// How long ago the oldest of those leases ran out, in seconds.
    pub interrupted_oldest_seconds: Option<f64>,
}

/// One replica, or one assigned storage without a replica, of a repository.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ReplicaRow {
    pub storage: String,
    pub generation: Option<i64>,
    pub assigned: bool,
    /// Whether a replica is recorded on the storage.
    pub recorded: bool,
    pub missing_since_seconds: Option<f64>,
    pub verified_ago_seconds: Option<f64>,
    /// Active and dead jobs aimed at the storage for this repository, as "kind:state".
    pub jobs: Vec<String>,
}

/// A repository and each of its replicas.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ReplicaReport {
    pub id: i64,
    pub virtual_storage: String,
    pub relative_path: String,
    pub replica_path: String,
    pub generation: i64,
    pub replication_factor: Option<i32>,
    pub replicas: Vec<ReplicaRow>,
}

/// A repository with fewer up-to-date replicas on healthy storages than it is assigned.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Shortfall {
    pub id: i64,
    pub repository: String,
    pub generation: i64,
    pub assigned: Vec<String>,
    /// Up to date, on a healthy storage.
    pub available: Vec<String>,
    /// Up to date, wherever.
    pub up_to_date: Vec<String>,
}

impl Shortfall {
    /// No up-to-date replica can serve it.
    pub fn unavailable(&self) -> bool {
        self.available.is_empty()
    }
}

impl Store {
    /// The status figures for `storages` (every configured one).
    pub async fn status_figures(&self, storages: &[StorageName]) -> Result<Figures, StoreError> {
        let rows = self
            .measure(
                "status_storages",
                sqlx::query(
                    "SELECT s.storage,
                            (SELECT COALESCE(sum(t.replicas), 0)::bigint FROM replica_totals t
                             WHERE t.storage = s.storage) AS replicas,
                            (SELECT count(*) FROM replicas p WHERE p.stale
                             AND p.storage = s.storage AND p.missing_since IS NULL) AS behind,
                            (SELECT count(*) FROM replicas p WHERE p.stale
                             AND p.storage = s.storage AND p.missing_since IS NOT NULL) AS missing,
                            (SELECT count(*) FROM jobs j WHERE j.state = 'running'
                             AND j.target_storage = s.storage AND j.kind = $2) AS repairing,
                            (SELECT count(*) FROM jobs j WHERE j.state = 'queued'
                             AND j.target_storage = s.storage) AS queued,
                            (SELECT count(*) FROM replicas p WHERE p.verified_at IS NULL
                             AND p.storage = s.storage) AS unverified,
                            extract(epoch FROM now() - v.last_verified_at)::float8 AS verified_ago,
                            COALESCE(v.verified, 0) AS verified,
                            COALESCE(v.missing, 0) AS found_missing,
                            COALESCE(v.diverged, 0) AS found_diverged,
                            COALESCE(v.errors, 0) AS verify_errors,
                            extract(epoch FROM now() - i.changed_at)::float8 AS identity_changed
                     FROM unnest($1::text[]) AS s(storage)
                     LEFT JOIN storage_verifications v ON v.storage = s.storage
                     LEFT JOIN storage_identities i ON i.storage = s.storage
                     ORDER BY s.storage",
                )
                .bind(texts(storages))
                .bind(JOB_REPLICATE)
                .fetch_all(&self.pool),
            )
            .await?;
        let mut figures = Figures::default();
        for row in rows {
            figures.storages.push(StorageFigures {
                storage: row.try_get("storage")?,
                replicas: row.try_get("replicas")?,
                behind: row.try_get("behind")?,
                missing: row.try_get("missing")?,
                repairing: row.try_get("repairing")?,
                queued: row.try_get("queued")?,
                unverified: row.try_get("unverified")?,
                verified_ago_seconds: row.try_get("verified_ago")?,
                verified: row.try_get("verified")?,
                found_missing: row.try_get("found_missing")?,
                found_diverged: row.try_get("found_diverged")?,
                verify_errors: row.try_get("verify_errors")?,
                identity_changed_ago_seconds: row.try_get("identity_changed")?,
            });
        }
        let row = self
            .measure(
                "status_cluster",
                sqlx::query(
                    "SELECT ARRAY(SELECT virtual_storage FROM repository_totals
                                  GROUP BY 1 ORDER BY 1) AS virtual_storages,
                            ARRAY(SELECT sum(repositories)::bigint FROM repository_totals
                                  GROUP BY virtual_storage ORDER BY virtual_storage)
                                AS repositories,
                            ARRAY(SELECT kind FROM jobs WHERE state IN ('queued', 'running', 'dead')
                                  GROUP BY kind, state ORDER BY kind, state) AS kinds,
                            ARRAY(SELECT state FROM jobs WHERE state IN ('queued', 'running', 'dead')
                                  GROUP BY kind, state ORDER BY kind, state) AS states,
                            ARRAY(SELECT count(*) FROM jobs
                                  WHERE state IN ('queued', 'running', 'dead')
                                  GROUP BY kind, state ORDER BY kind, state) AS counts,
                            (SELECT count(*) FROM jobs WHERE state = 'queued'
                             AND run_after <= now()) +
                            (SELECT count(*) FROM jobs WHERE state = 'running'
                             AND lease_expires_at < now()) AS ready,
                            extract(epoch FROM now() - LEAST(
                                (SELECT min(run_after) FROM jobs
                                 WHERE state = 'queued' AND run_after <= now()),
                                (SELECT min(lease_expires_at) FROM jobs
                                 WHERE state = 'running' AND lease_expires_at < now())))::float8
                                AS oldest_ready,
                            extract(epoch FROM now() - GREATEST(
                                (SELECT max(started_at) FROM jobs),
                                (SELECT max(finished_at) FROM jobs)))::float8 AS last_progress,
                            (SELECT count(*) FROM jobs WHERE state = 'dead') AS dead,
                            m.write_lock, m.reason, m.changed_by,
                            extract(epoch FROM now() - m.changed_at)::float8 AS lock_changed,
                            extract(epoch FROM now() - (SELECT last_round_at FROM reconciler))::float8
                                AS reconciled,
                            (SELECT count(*) FROM write_intents WHERE lease_expires_at < now())
                                AS interrupted,
                            extract(epoch FROM now() - (SELECT min(lease_expires_at)
                                FROM write_intents WHERE lease_expires_at < now()))::float8
                                AS interrupted_oldest
                     FROM maintenance m",
                )
                .fetch_one(&self.pool),
            )
            .await?;
        let names: Vec<String> = row.try_get("virtual_storages")?;
        let counts: Vec<i64> = row.try_get("repositories")?;
        figures.repositories = names.into_iter().zip(counts).collect();
        let kinds: Vec<String> = row.try_get("kinds")?;
        let states: Vec<String> = row.try_get("states")?;
        let counts: Vec<i64> = row.try_get("counts")?;
        figures.jobs = JobFigures {
            by_state: kinds
                .into_iter()
                .zip(states)
                .zip(counts)
                .map(|((kind, state), count)| (kind, state, count))
                .collect(),
            ready: row.try_get("ready")?,
            oldest_ready_seconds: row.try_get("oldest_ready")?,
            last_progress_seconds: row.try_get("last_progress")?,
            dead: row.try_get("dead")?,
        };
        figures.write_lock = WriteLock {
            enabled: row.try_get("write_lock")?,
            reason: row.try_get("reason")?,
            changed_by: row.try_get("changed_by")?,
            changed_ago_seconds: row.try_get("lock_changed")?,
        };
        figures.reconciled_ago_seconds = row.try_get("reconciled")?;
        figures.interrupted_writes = row.try_get("interrupted")?;
        figures.interrupted_oldest_seconds = row.try_get("interrupted_oldest")?;
        Ok(figures)
    }

    /// A repository's replicas, and the assigned storages that have none. None when it does
    /// not exist.
    pub async fn replica_report(
        &self,
        virtual_storage: &StorageName,
        relative_path: &RelativePath,
    ) -> Result<Option<ReplicaReport>, StoreError> {
        let rows = self
            .measure(
                "replica_report",
                sqlx::query(
                    "WITH repo AS (
                         SELECT * FROM repositories
                         WHERE virtual_storage = $1 AND relative_path = $2
                     ), places AS (
                         SELECT p.storage FROM replicas p, repo WHERE p.repository_id = repo.id
                         UNION
                         SELECT a.storage FROM assignments a, repo WHERE a.repository_id = repo.id
                     )
                     SELECT repo.id, repo.replica_path, repo.generation, repo.replication_factor,
                            x.storage, p.generation AS replica_generation,
                            p.storage IS NOT NULL AS recorded,
                            EXISTS (SELECT 1 FROM assignments a WHERE a.repository_id = repo.id
                                    AND a.storage = x.storage) AS assigned,
                            extract(epoch FROM now() - p.missing_since)::float8 AS missing_since,
                            extract(epoch FROM now() - p.verified_at)::float8 AS verified_ago,
                            ARRAY(SELECT j.kind || ':' || j.state FROM jobs j
                                  WHERE j.repository_id = repo.id AND j.target_storage = x.storage
                                    AND j.state IN ('queued', 'running', 'dead')
                                  ORDER BY j.id) AS jobs
                     FROM repo
                     LEFT JOIN places x ON true
                     LEFT JOIN replicas p ON p.repository_id = repo.id AND p.storage = x.storage
                     ORDER BY x.storage",
                )
                .bind(virtual_storage.as_str())
                .bind(relative_path.as_str())
                .fetch_all(&self.pool),
            )
            .await?;
        let Some(first) = rows.first() else {
            return Ok(None);
        };
        let mut report = ReplicaReport {
            id: first.try_get("id")?,
            virtual_storage: virtual_storage.to_string(),
            relative_path: relative_path.to_string(),
            replica_path: first.try_get("replica_path")?,
            generation: first.try_get("generation")?,
            replication_factor: first.try_get("replication_factor")?,
            replicas: Vec::new(),
        };
        for row in &rows {
            let Some(storage) = row.try_get::<Option<String>, _>("storage")? else {
                continue;
            };
            report.replicas.push(ReplicaRow {
                storage,
                generation: row.try_get("replica_generation")?,
                assigned: row.try_get("assigned")?,
                recorded: row.try_get("recorded")?,
                missing_since_seconds: row.try_get("missing_since")?,
                verified_ago_seconds: row.try_get("verified_ago")?,
                jobs: row.try_get("jobs")?,
            });
        }
        Ok(Some(report))
    }

    /// Up to `limit` repositories with fewer up-to-date replicas on `healthy` storages than
    /// assigned storages, unavailable ones (none at all) first. Candidates come from the
    /// stale replicas and the replicas on storages that are not healthy, so the cost follows
    /// what is wrong, not the size of the catalog.
    pub async fn shortfalls(
        &self,
        healthy: &[StorageName],
        limit: usize,
    ) -> Result<Vec<Shortfall>, StoreError> {
        let rows = self
            .measure(
                "shortfalls",
                sqlx::query(
                    "WITH candidates AS (
                         SELECT repository_id FROM replicas WHERE stale
                         UNION
                         SELECT repository_id FROM replicas
                         WHERE storage IN (SELECT DISTINCT storage FROM replicas
                                           WHERE storage <> ALL($1))
                           AND storage <> ALL($1)
                     ), judged AS (
                         SELECT r.id, r.virtual_storage, r.relative_path, r.generation,
                                ARRAY(SELECT a.storage FROM assignments a
                                      WHERE a.repository_id = r.id ORDER BY 1) AS assigned,
                                ARRAY(SELECT p.storage FROM replicas p
                                      WHERE p.repository_id = r.id
                                        AND p.generation = r.generation
                                        AND p.storage = ANY($1) ORDER BY 1) AS available,
                                ARRAY(SELECT p.storage FROM replicas p
                                      WHERE p.repository_id = r.id
                                        AND p.generation = r.generation ORDER BY 1) AS up_to_date
                         FROM candidates c JOIN repositories r ON r.id = c.repository_id
                     )
                     SELECT * FROM judged
                     WHERE cardinality(available) = 0
                        OR cardinality(available) < cardinality(assigned)
                     ORDER BY cardinality(available), virtual_storage, relative_path
                     LIMIT $2",
                )
                .bind(texts(healthy))
                .bind(limit as i64)
                .fetch_all(&self.pool),
            )
            .await?;
        rows.iter()
            .map(|row| {
                let vs: String = row.try_get("virtual_storage")?;
                let path: String = row.try_get("relative_path")?;
                Ok(Shortfall {
                    id: row.try_get("id")?,
                    repository: format!("{vs}/{path}"),
                    generation: row.try_get("generation")?,
                    assigned: row.try_get("assigned")?,
                    available: row.try_get("available")?,
                    up_to_date: row.try_get("up_to_date")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }
}

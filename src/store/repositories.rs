//! Repositories, their assignments and their replicas: what exists and where.

use std::time::Duration;

use sqlx::Row as _;

use super::{
    JOB_REMOVE, JOB_REPLICATE, Store, StoreError, WriteLease, storage_names, texts, undecodable,
};
use crate::model::{RelativePath, RepositoryId, StorageName};

/// What a deleted repository row returns: where its replicas were.
macro_rules! removed_columns {
    () => {
        "r.id, r.replica_path,
    ARRAY(SELECT p.storage FROM replicas p WHERE p.repository_id = r.id
          UNION
          SELECT a.storage FROM assignments a WHERE a.repository_id = r.id) AS storages"
    };
}

/// Cancels the active jobs of the repository deleted in `gone`, in the same statement: their
/// lease tokens move on, so a worker still running one can neither renew nor complete it.
macro_rules! cancel_jobs {
    () => {
        "cancelled AS (
    UPDATE jobs j
    SET state = 'cancelled', lease_token = j.lease_token + 1, lease_owner = NULL,
        lease_expires_at = NULL, last_error = 'the repository was removed',
        finished_at = now(), updated_at = now()
    FROM gone WHERE j.repository_id = gone.id AND j.state IN ('queued', 'running')
)"
    };
}

/// A repository as the router needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepositoryRecord {
    pub id: RepositoryId,
    pub virtual_storage: StorageName,
    pub relative_path: RelativePath,
    pub replica_path: RelativePath,
    pub generation: i64,
    pub primary: StorageName,
    /// The storages that should hold it.
    pub assigned: Vec<StorageName>,
    /// The replicas known to exist, with the generation each holds. Replicas whose
    /// generation is unknown (missing or diverged) are left out.
    pub replicas: Vec<(StorageName, i64)>,
    /// Made by a push whose first write has not committed: to readers it does not exist yet,
    /// and the push undoes it if it fails.
    pub unborn: bool,
}

impl RepositoryRecord {
    /// Replicas that hold the repository's current generation.
    pub fn up_to_date(&self) -> impl Iterator<Item = &StorageName> {
        self.replicas
            .iter()
            .filter(|(_, generation)| *generation == self.generation)
            .map(|(storage, _)| storage)
    }

    pub fn is_up_to_date(&self, storage: &StorageName) -> bool {
        self.up_to_date().any(|s| s == storage)
    }
}

/// A repository about to be created.
#[derive(Debug, Clone)]
pub struct NewRepository {
    pub id: RepositoryId,
    pub virtual_storage: StorageName,
    pub relative_path: RelativePath,
    pub primary: StorageName,
    pub assigned: Vec<StorageName>,
    /// Made by a push, which deletes it again if it fails before its first write commits.
    pub awaiting_first_push: bool,
}

/// What a removal took out of the catalog, for cleaning the disks.
#[derive(Debug, Clone)]
pub struct RemovedRepository {
    pub id: RepositoryId,
    pub replica_path: RelativePath,
    /// Every storage that holds or should hold a replica.
    pub storages: Vec<StorageName>,
    /// The fencing token the proxy's own removal carries: taken as the row was deleted, so a
    /// replica adopted later (whose fence a newer token raised) refuses it. Removal jobs take
    /// a fresh one under the replica path's lock instead.
    pub fence: i64,
}

/// The columns of a [`RepositoryRecord`], for `concat!` with a WHERE clause.
macro_rules! select_record {
    () => {
        "
    SELECT r.id, r.virtual_storage, r.relative_path, r.replica_path, r.generation,
           r.primary_storage, r.awaiting_first_push,
           ARRAY(SELECT a.storage FROM assignments a
                 WHERE a.repository_id = r.id ORDER BY a.storage) AS assigned,
           ARRAY(SELECT p.storage FROM replicas p
                 WHERE p.repository_id = r.id AND p.generation IS NOT NULL
                 ORDER BY p.storage) AS replica_storages,
           ARRAY(SELECT p.generation FROM replicas p
                 WHERE p.repository_id = r.id AND p.generation IS NOT NULL
                 ORDER BY p.storage) AS replica_generations
    FROM repositories r"
    };
}

fn record(row: &sqlx::postgres::PgRow) -> Result<RepositoryRecord, sqlx::Error> {
    let storages: Vec<String> = row.try_get("replica_storages")?;
    let generations: Vec<i64> = row.try_get("replica_generations")?;
    let replicas = storage_names(&storages)
        .into_iter()
        .zip(generations)
        .collect();
    Ok(RepositoryRecord {
        id: RepositoryId(row.try_get("id")?),
        virtual_storage: StorageName::parse(row.try_get("virtual_storage")?)
            .map_err(|e| undecodable("virtual_storage", e))?,
        relative_path: RelativePath::parse(row.try_get("relative_path")?)
            .map_err(|e| undecodable("relative_path", e))?,
        replica_path: RelativePath::parse(row.try_get("replica_path")?)
            .map_err(|e| undecodable("replica_path", e))?,
        generation: row.try_get("generation")?,
        primary: StorageName::parse(row.try_get("primary_storage")?)
            .map_err(|e| undecodable("primary_storage", e))?,
        assigned: storage_names(&row.try_get::<Vec<String>, _>("assigned")?),
        replicas,
        unborn: row.try_get("awaiting_first_push")?,
    })
}

/// How often a removal looks again at a lease held by a write in flight.
const LEASE_POLL: std::time::Duration = std::time::Duration::from_millis(50);

/// Which repository a statement is about.
#[derive(Debug, Clone, Copy)]
pub enum Which<'a> {
    Id(RepositoryId),
    Path(&'a StorageName, &'a RelativePath),
}

/// How a repository row is deleted.
#[derive(Debug, Clone, Copy)]
pub struct Deletion {
    /// Delete even while a live write holds the repository's lease.
    pub force: bool,
    /// Queue one removal job per replica, to run after this delay. None leaves the disks to
    /// the storage walker.
    pub remove_after: Option<std::time::Duration>,
    /// Only a repository a push made that no write has committed to, with no push pending or
    /// in flight on it: undoing a push-to-create.
    pub unwritten_only: bool,
}

/// What a deletion found.
#[derive(Debug, Clone)]
pub enum Deleted {
    Removed(RemovedRepository),
    NotFound,
    /// A live write holds the repository's lease; nothing was changed.
    Busy,
}

/// What a rename did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renamed {
    Done,
    NotFound,
    Taken,
}

impl Store {
    /// The repository at a path, with its assignments and replicas: one statement.
    pub async fn find_repository(
        &self,
        virtual_storage: &StorageName,
        relative_path: &RelativePath,
    ) -> Result<Option<RepositoryRecord>, StoreError> {
        let row = self
            .measure(
                "find_repository",
                sqlx::query(concat!(
                    select_record!(),
                    " WHERE r.virtual_storage = $1 AND r.relative_path = $2"
                ))
                .bind(virtual_storage.as_str())
                .bind(relative_path.as_str())
                .fetch_optional(&self.pool),
            )
            .await?;
        row.as_ref()
            .map(record)
            .transpose()
            .map_err(StoreError::from)
    }

    /// Reserves a repository id. Ids come from a sequence and are never handed out twice.
    pub async fn next_repository_id(&self) -> Result<RepositoryId, StoreError> {
        let id: i64 = self
            .measure(
                "next_repository_id",
                sqlx::query_scalar("SELECT nextval(pg_get_serial_sequence('repositories', 'id'))")
                    .fetch_one(&self.pool),
            )
            .await?;
        Ok(RepositoryId(id))
    }

    /// Writes a new repository's row and assignments, and records its creation as a write:
    /// the repository's lease (a new token), and an intent naming the assigned storages, so
    /// that a creation whose proxy dies is finished or undone by the recovery job. None when
    /// the path is taken.
    pub async fn insert_repository(
        &self,
        new: &NewRepository,
        owner: &str,
        lease: Duration,
        rpc: &str,
    ) -> Result<Option<WriteLease>, StoreError> {
        let row = self
            .measure(
                "insert_repository",
                sqlx::query(
                    "WITH repo AS (
                         INSERT INTO repositories
                             (id, virtual_storage, relative_path, replica_path, primary_storage,
                              lease_owner, lease_token, lease_expires_at, awaiting_first_push)
                         OVERRIDING SYSTEM VALUE
                         VALUES ($1, $2, $3, $4, $5, $7, nextval('repository_lease_tokens'),
                                 now() + make_interval(secs => $8), $10)
                         ON CONFLICT (virtual_storage, relative_path) DO NOTHING
                         RETURNING id, lease_token, lease_expires_at, generation
                     ), assigned AS (
                         INSERT INTO assignments (repository_id, storage)
                         SELECT repo.id, storage FROM repo, unnest($6::text[]) AS storage
                     ), intent AS (
                         INSERT INTO write_intents (repository_id, owner, fencing_token,
                             lease_expires_at, rpc, base_generation, ref_updates, target_storages)
                         SELECT repo.id, $7, repo.lease_token, repo.lease_expires_at, $9,
                                repo.generation, '[]'::jsonb, $6::text[]
                         FROM repo
                         RETURNING id
                     )
                     SELECT repo.lease_token, repo.generation, intent.id AS intent
                     FROM repo, intent",
                )
                .bind(new.id.0)
                .bind(new.virtual_storage.as_str())
                .bind(new.relative_path.as_str())
                .bind(new.id.replica_path().as_str())
                .bind(new.primary.as_str())
                .bind(texts(&new.assigned))
                .bind(owner)
                .bind(lease.as_secs_f64())
                .bind(rpc)
                .bind(new.awaiting_first_push)
                .fetch_optional(&self.pool),
            )
            .await?;
        let Some(row) = row else { return Ok(None) };
        Ok(Some(WriteLease {
            repository: new.id,
            replica_path: new.id.replica_path(),
            intent: row.try_get("intent")?,
            token: row.try_get("lease_token")?,
            generation: row.try_get("generation")?,
            targets: new.assigned.clone(),
            assigned: new.assigned.clone(),
            refs_checksum: None,
        }))
    }

    /// Finishes a creation, fenced by its lease (the creating proxy's, or a recovery's):
    /// records the replicas that were created (at generation 0), and the assigned storages
    /// that failed as missing replicas, each with a replication job copying from `source`;
    /// closes the creation's intent and releases the lease. False when the lease is no longer
    /// `owner`'s: nothing changed.
    pub async fn record_created_replicas(
        &self,
        lease: &WriteLease,
        owner: &str,
        created: &[StorageName],
        failed: &[StorageName],
        source: &StorageName,
        checksum: Option<&str>,
    ) -> Result<bool, StoreError> {
        let recorded: bool = self
            .measure(
                "record_created_replicas",
                sqlx::query_scalar(
                    "WITH repo AS (
                         SELECT id FROM repositories
                         WHERE id = $1 AND lease_token = $6 AND lease_owner = $7
                         FOR UPDATE
                     ), created AS (
                         INSERT INTO replicas AS p (repository_id, storage, generation)
                         SELECT repo.id, storage, 0
                         FROM repo, unnest($2::text[]) AS storage
                         ON CONFLICT (repository_id, storage) DO UPDATE SET generation = 0
                             WHERE p.generation IS NULL
                         RETURNING storage
                     ), absent AS (
                         INSERT INTO replicas (repository_id, storage, generation, missing_since)
                         SELECT repo.id, storage, NULL, now()
                         FROM repo, unnest($4::text[]) AS storage
                         ON CONFLICT (repository_id, storage) DO NOTHING
                     ), queued AS (
                         INSERT INTO jobs (kind, repository_id, source_storage, target_storage)
                         SELECT $5, repo.id, $3, storage
                         FROM repo, unnest($4::text[]) AS storage
                         ON CONFLICT (kind, repository_id, target_storage)
                             WHERE state IN ('queued', 'running')
                         DO UPDATE SET rerun = jobs.rerun OR jobs.state = 'running',
                                       updated_at = now()
                         RETURNING id
                     ), closed AS (
                         DELETE FROM write_intents i USING repo
                         WHERE i.id = $8 AND i.repository_id = repo.id
                     ), released AS (
                         UPDATE repositories r SET lease_owner = NULL, lease_expires_at = NULL,
                                                   refs_checksum = $9
                         FROM repo WHERE r.id = repo.id
                         RETURNING r.id
                     )
                     SELECT EXISTS (SELECT 1 FROM released)",
                )
                .bind(lease.repository.0)
                .bind(texts(created))
                .bind(source.as_str())
                .bind(texts(failed))
                .bind(JOB_REPLICATE)
                .bind(lease.token)
                .bind(owner)
                .bind(lease.intent)
                .bind(checksum)
                .fetch_one(&self.pool),
            )
            .await?;
        Ok(recorded)
    }

    /// Deletes a repository row (its assignments, replicas and open intents go with it) and
    /// its active jobs, and queues the removal of its replicas, in one statement. A live write
    /// holding the repository's lease makes it `Busy`, unless `deletion.force`: the write can
    /// then commit nothing, since every step of a write is fenced on the row.
    pub async fn delete_repository(
        &self,
        which: Which<'_>,
        deletion: Deletion,
    ) -> Result<Deleted, StoreError> {
        let (id, virtual_storage, relative_path) = match which {
            Which::Id(id) => (Some(id.0), None, None),
            Which::Path(virtual_storage, relative_path) => (
                None,
                Some(virtual_storage.as_str()),
                Some(relative_path.as_str()),
            ),
        };
        let row = self
            .measure(
                "delete_repository",
                sqlx::query(concat!(
                    "WITH target AS (
                         SELECT r.id,
                                (r.lease_owner IS NOT NULL AND r.lease_expires_at > now()) AS busy
                         FROM repositories r
                         WHERE r.id = $1 OR (r.virtual_storage = $2 AND r.relative_path = $3)
                         FOR UPDATE
                     ), gone AS (
                         DELETE FROM repositories r USING target t
                         WHERE r.id = t.id AND (NOT t.busy OR $4)
                           AND (NOT $7 OR (r.awaiting_first_push AND r.generation = 0
                                AND NOT EXISTS (SELECT 1 FROM pending_writes p
                                                WHERE p.repository_id = r.id)
                                AND NOT EXISTS (SELECT 1 FROM write_intents i
                                                WHERE i.repository_id = r.id)))
                         RETURNING ",
                    removed_columns!(),
                    "), ",
                    cancel_jobs!(),
                    ", fence AS (
                         SELECT nextval('repository_lease_tokens') AS token FROM gone
                     ), queued AS (
                         INSERT INTO jobs
                             (kind, repository_id, target_storage, replica_path, run_after)
                         SELECT $5, gone.id, storage, gone.replica_path,
                                now() + make_interval(secs => $6::float8)
                         FROM gone, unnest(gone.storages) AS storage
                         WHERE $6::float8 IS NOT NULL
                         ON CONFLICT DO NOTHING
                     )
                     SELECT t.busy, gone.id, gone.replica_path, gone.storages, fence.token
                     FROM target t LEFT JOIN gone ON true LEFT JOIN fence ON true"
                ))
                .bind(id)
                .bind(virtual_storage)
                .bind(relative_path)
                .bind(deletion.force)
                .bind(JOB_REMOVE)
                .bind(deletion.remove_after.map(|delay| delay.as_secs_f64()))
                .bind(deletion.unwritten_only)
                .fetch_optional(&self.pool),
            )
            .await?;
        let Some(row) = row else {
            return Ok(Deleted::NotFound);
        };
        if row.try_get::<Option<i64>, _>("id")?.is_none() {
            return Ok(Deleted::Busy);
        }
        Ok(Deleted::Removed(removed(&row)?))
    }

    /// Deletes a repository as [`Store::delete_repository`] does, waiting while a live write
    /// holds its lease, for up to `wait`; after that the row goes anyway. None when there is no
    /// such repository.
    pub async fn delete_repository_after_writes(
        &self,
        which: Which<'_>,
        remove_after: Option<std::time::Duration>,
        wait: std::time::Duration,
    ) -> Result<Option<RemovedRepository>, StoreError> {
        let started = tokio::time::Instant::now();
        loop {
            let deletion = Deletion {
                force: started.elapsed() >= wait,
                remove_after,
                unwritten_only: false,
            };
            match self.delete_repository(which, deletion).await? {
                Deleted::Removed(removed) => return Ok(Some(removed)),
                Deleted::NotFound => return Ok(None),
                Deleted::Busy => tokio::time::sleep(LEASE_POLL).await,
            }
        }
    }

    /// Closes the queued removal jobs of `storages`, whose replicas were removed at once.
    pub async fn finish_removals(
        &self,
        id: RepositoryId,
        storages: &[StorageName],
    ) -> Result<u64, StoreError> {
        let done = self
            .measure(
                "finish_removals",
                sqlx::query(
                    "UPDATE jobs
                     SET state = 'done', lease_token = lease_token + 1, finished_at = now(),
                         updated_at = now(), progress = 'removed by the proxy'
                     WHERE kind = $1 AND repository_id = $2 AND target_storage = ANY($3)
                       AND state = 'queued'",
                )
                .bind(JOB_REMOVE)
                .bind(id.0)
                .bind(texts(storages))
                .execute(&self.pool),
            )
            .await?;
        Ok(done.rows_affected())
    }

    /// Gives a repository a new relative path: a change of this row only, since replica paths
    /// derive from the id.
    pub async fn rename_repository(
        &self,
        virtual_storage: &StorageName,
        from: &RelativePath,
        to: &RelativePath,
    ) -> Result<Renamed, StoreError> {
        let result = self
            .measure(
                "rename_repository",
                sqlx::query(
                    "UPDATE repositories SET relative_path = $3
                     WHERE virtual_storage = $1 AND relative_path = $2",
                )
                .bind(virtual_storage.as_str())
                .bind(from.as_str())
                .bind(to.as_str())
                .execute(&self.pool),
            )
            .await;
        match result {
            Ok(done) if done.rows_affected() == 1 => Ok(Renamed::Done),
            Ok(_) => Ok(Renamed::NotFound),
            Err(StoreError::Failed(sqlx::Error::Database(db)))
                if db.code().as_deref() == Some("23505") =>
            {
                Ok(Renamed::Taken)
            }
            Err(error) => Err(error),
        }
    }
}

fn removed(row: &sqlx::postgres::PgRow) -> Result<RemovedRepository, StoreError> {
    let replica_path: String = row.try_get("replica_path")?;
    let replica_path =
        RelativePath::parse(&replica_path).map_err(|error| undecodable("replica_path", error))?;
    Ok(RemovedRepository {
        id: RepositoryId(row.try_get("id")?),
        replica_path,
        storages: storage_names(&row.try_get::<Vec<String>, _>("storages")?),
        fence: row.try_get("token")?,
    })
}

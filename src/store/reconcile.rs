//! The reconciler's statements, run by one reconciler at a time: assignments brought to each
//! repository's replication factor, a sweep at a time, and replication queued for every
//! assigned replica that is missing or behind. Also the operator's changes that the reconciler
//! then carries out: a repository's own replication factor, and accepting data loss.

use sqlx::Row as _;

use super::{JOB_REPLICATE, Store, StoreError, texts};
use crate::model::{RepositoryId, StorageName};

/// The virtual storages, from the parallel arrays $1..$4 of [`placement_arrays`].
macro_rules! placement_ctes {
    () => {
        "vs AS (SELECT * FROM unnest($1::text[], $2::integer[]) AS v(name, factor)),
     member AS (SELECT * FROM unnest($3::text[], $4::text[]) AS m(vs, storage))"
    };
}

/// Ranks each `swept` repository's member storages, assigned and unassigned apart: the
/// primary first, then those holding the repository's generation, then those holding any
/// replica, then a spread that is stable per repository. Also counts the assigned members.
macro_rules! rank_assignments {
    () => {
        "counted AS (
         SELECT s.*, (SELECT count(*) FROM assignments a JOIN member m
                      ON m.vs = s.virtual_storage AND m.storage = a.storage
                      WHERE a.repository_id = s.id) AS assigned_count
         FROM swept s
     ), ranked AS (
         SELECT c.id, m.storage, c.wanted, c.assigned_count,
                a.storage IS NOT NULL AS assigned, p.storage IS NOT NULL AS has_replica,
                row_number() OVER (
                    PARTITION BY c.id, a.storage IS NOT NULL
                    ORDER BY m.storage = c.primary_storage DESC,
                             COALESCE(p.generation = c.generation, false) DESC,
                             p.storage IS NOT NULL DESC,
                             md5(c.id::text || m.storage)) AS rank
         FROM counted c
         JOIN member m ON m.vs = c.virtual_storage
         LEFT JOIN assignments a ON a.repository_id = c.id AND a.storage = m.storage
         LEFT JOIN replicas p ON p.repository_id = c.id AND p.storage = m.storage
     )"
    };
}

/// Carries out the ranking of `rank_assignments`: the best `wanted` member storages are
/// assigned (the assigned ones kept first), the rest unassigned, and an assigned storage with
/// no replica record is recorded as missing. Each part returns a row per change.
macro_rules! apply_assignments {
    () => {
        "added AS (
         INSERT INTO assignments (repository_id, storage)
         SELECT id, storage FROM ranked
         WHERE NOT assigned AND rank <= wanted - assigned_count
         ON CONFLICT DO NOTHING
         RETURNING 1
     ), dropped AS (
         DELETE FROM assignments a USING ranked k
         WHERE k.assigned AND k.rank > k.wanted
           AND a.repository_id = k.id AND a.storage = k.storage
         RETURNING 1
     ), absent AS (
         INSERT INTO replicas (repository_id, storage, generation, missing_since)
         SELECT id, storage, NULL, now() FROM ranked
         WHERE NOT has_replica
           AND ((assigned AND rank <= wanted)
                OR (NOT assigned AND rank <= wanted - assigned_count))
         ON CONFLICT DO NOTHING
         RETURNING 1
     )"
    };
}

/// The advisory lock whose holder is the one reconciler deciding.
const RECONCILER_LOCK: i64 = 0x6769_7466_6c65_6574; // "gitfleet"

/// A virtual storage as the reconciler needs it.
#[derive(Debug, Clone)]
pub struct Placement {
    pub virtual_storage: StorageName,
    pub storages: Vec<StorageName>,
    pub replication_factor: usize,
}

/// What one round did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Round {
    /// Repositories whose assignments were compared.
    pub swept: u64,
    pub assigned: u64,
    pub unassigned: u64,
    /// Assigned replicas with no record, now recorded as missing.
    pub recorded_missing: u64,
    /// Replication jobs queued.
    pub queued: u64,
}

/// How accepting data loss went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accepted {
    /// The new generation, held by the authoritative replica alone.
    Generation(i64),
    NotFound,
    /// A write is in flight; nothing changed.
    Busy,
}

impl Store {
    /// One reconciler round, in one transaction, when no other reconciler holds the lock
    /// (None otherwise):
    /// 1. the next `sweep` repositories (by id, wrapping around) get as many assignments as
    ///    their replication factor asks, within their virtual storage: added where a replica
    ///    already is (up to date first), removed where none is up to date; the primary is kept.
    ///    An assigned storage with no replica record is recorded as missing;
    /// 2. up to `batch` assigned replicas that are missing or behind, on `healthy` storages,
    ///    get a replication job from an up-to-date replica on a healthy storage, unless one is
    ///    active, or one died within the hour.
    pub async fn reconcile_round(
        &self,
        placements: &[Placement],
        healthy: &[StorageName],
        sweep: usize,
        batch: usize,
    ) -> Result<Option<Round>, StoreError> {
        let mut transaction = self.measure("begin", self.pool.begin()).await?;
        let locked: bool = self
            .measure(
                "reconciler_lock",
                sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
                    .bind(RECONCILER_LOCK)
                    .fetch_one(&mut *transaction),
            )
            .await?;
        if !locked {
            return Ok(None);
        }
        let (names, factors, member_of, members) = placement_arrays(placements);
        let row = self
            .measure(
                "reconcile_assignments",
                sqlx::query(concat!(
                    "WITH state AS (SELECT cursor FROM reconciler), ",
                    placement_ctes!(),
                    ",
                     swept AS (
                         SELECT r.id, r.primary_storage, r.generation, r.virtual_storage,
                                LEAST(COALESCE(r.replication_factor, vs.factor),
                                      (SELECT count(*) FROM member m
                                       WHERE m.vs = r.virtual_storage)) AS wanted
                         FROM repositories r JOIN vs ON vs.name = r.virtual_storage
                         WHERE r.id > (SELECT cursor FROM state)
                           AND r.created_at < now() - interval '1 minute'
                         ORDER BY r.id LIMIT $5
                     ), ",
                    rank_assignments!(),
                    ", ",
                    apply_assignments!(),
                    ", moved AS (
                         UPDATE reconciler
                         SET cursor = CASE WHEN (SELECT count(*) FROM swept) < $5 THEN 0
                                           ELSE (SELECT max(id) FROM swept) END,
                             sweeps = sweeps + CASE WHEN (SELECT count(*) FROM swept) < $5
                                                    THEN 1 ELSE 0 END,
                             last_round_at = now()
                     )
                     SELECT (SELECT count(*) FROM swept) AS swept,
                            (SELECT count(*) FROM added) AS added,
                            (SELECT count(*) FROM dropped) AS dropped,
                            (SELECT count(*) FROM absent) AS absent"
                ))
                .bind(&names)
                .bind(&factors)
                .bind(&member_of)
                .bind(&members)
                .bind(sweep as i64)
                .fetch_one(&mut *transaction),
            )
            .await?;
        let mut round = Round {
            swept: row.try_get::<i64, _>("swept")? as u64,
            assigned: row.try_get::<i64, _>("added")? as u64,
            unassigned: row.try_get::<i64, _>("dropped")? as u64,
            recorded_missing: row.try_get::<i64, _>("absent")? as u64,
            queued: 0,
        };
        round.queued = self
            .measure(
                "queue_repairs",
                sqlx::query(
                    "INSERT INTO jobs (kind, repository_id, source_storage, target_storage)
                     SELECT $1, p.repository_id, source.storage, p.storage
                     FROM replicas p
                     JOIN assignments a ON a.repository_id = p.repository_id
                                       AND a.storage = p.storage
                     JOIN repositories r ON r.id = p.repository_id
                     CROSS JOIN LATERAL (
                         SELECT q.storage FROM replicas q
                         WHERE q.repository_id = p.repository_id
                           AND q.generation = r.generation AND q.storage = ANY($2)
                         ORDER BY random() LIMIT 1
                     ) source
                     WHERE p.stale AND p.storage = ANY($2)
                       AND NOT EXISTS (
                           SELECT 1 FROM jobs j
                           WHERE j.repository_id = p.repository_id
                             AND j.target_storage = p.storage AND j.kind = $1
                             AND (j.state IN ('queued', 'running')
                                  OR (j.state = 'dead'
                                      AND j.finished_at > now() - interval '1 hour')))
                     LIMIT $3
                     ON CONFLICT (kind, repository_id, target_storage)
                         WHERE state IN ('queued', 'running')
                     DO NOTHING",
                )
                .bind(JOB_REPLICATE)
                .bind(texts(healthy))
                .bind(batch as i64)
                .execute(&mut *transaction),
            )
            .await?
            .rows_affected();
        self.measure("commit", transaction.commit()).await?;
        Ok(Some(round))
    }

    /// Sets a repository's own replication factor (None: its virtual storage's) and brings
    /// its assignments to it at once, the way the reconciler would. Returns the assigned
    /// storages after, or None when the repository does not exist.
    pub async fn set_replication_factor(
        &self,
        id: RepositoryId,
        factor: Option<usize>,
        placements: &[Placement],
    ) -> Result<Option<Vec<StorageName>>, StoreError> {
        let (names, factors, member_of, members) = placement_arrays(placements);
        let row = self
            .measure(
                "set_replication_factor",
                sqlx::query(concat!(
                    "WITH changed AS (
                         UPDATE repositories SET replication_factor = $6 WHERE id = $5
                         RETURNING id
                     ), ",
                    placement_ctes!(),
                    ",
                     swept AS (
                         SELECT r.id, r.primary_storage, r.generation, r.virtual_storage,
                                LEAST(COALESCE($6, vs.factor),
                                      (SELECT count(*) FROM member m
                                       WHERE m.vs = r.virtual_storage)) AS wanted
                         FROM repositories r JOIN vs ON vs.name = r.virtual_storage
                         WHERE r.id = (SELECT id FROM changed)
                     ), ",
                    rank_assignments!(),
                    ", ",
                    apply_assignments!(),
                    "
                     SELECT EXISTS (SELECT 1 FROM changed) AS found,
                            ARRAY(SELECT storage FROM ranked
                                  WHERE (assigned AND rank <= wanted)
                                     OR (NOT assigned AND rank <= wanted - assigned_count)
                                  ORDER BY storage) AS assigned"
                ))
                .bind(&names)
                .bind(&factors)
                .bind(&member_of)
                .bind(&members)
                .bind(id.0)
                .bind(factor.map(|f| f as i32))
                .fetch_one(&self.pool),
            )
            .await?;
        if !row.try_get::<bool, _>("found")? {
            return Ok(None);
        }
        Ok(Some(super::storage_names(
            &row.try_get::<Vec<String>, _>("assigned")?,
        )))
    }

    /// Declares the replica on `storage` the truth: the repository moves to a new generation
    /// that this replica alone holds (its write-lease token moves with it, as if a write had
    /// committed), so every other replica is behind and is repaired from it. Refused while a
    /// write is in flight.
    pub async fn accept_dataloss(
        &self,
        id: RepositoryId,
        storage: &StorageName,
    ) -> Result<Accepted, StoreError> {
        let row = self
            .measure(
                "accept_dataloss",
                sqlx::query(
                    "WITH repo AS (
                         SELECT r.id, (COALESCE(r.lease_expires_at > now(), false)
                                       OR EXISTS (SELECT 1 FROM write_intents i
                                                  WHERE i.repository_id = r.id)) AS writing
                         FROM repositories r WHERE r.id = $1 FOR UPDATE
                     ), bumped AS (
                         UPDATE repositories r
                         SET generation = GREATEST(r.generation,
                                 (SELECT max(p.generation) FROM replicas p
                                  WHERE p.repository_id = r.id)) + 1,
                             lease_token = nextval('repository_lease_tokens'),
                             -- The replica declared the truth may hold other refs.
                             refs_checksum = NULL
                         FROM repo WHERE r.id = repo.id AND NOT repo.writing
                         RETURNING r.id, r.generation
                     ), truth AS (
                         INSERT INTO replicas AS p (repository_id, storage, generation,
                                                    verified_at)
                         SELECT id, $2, generation, now() FROM bumped
                         ON CONFLICT (repository_id, storage) DO UPDATE
                             SET generation = EXCLUDED.generation, verified_at = now()
                     ), assigned AS (
                         INSERT INTO assignments (repository_id, storage)
                         SELECT id, $2 FROM bumped
                         ON CONFLICT DO NOTHING
                     )
                     SELECT EXISTS (SELECT 1 FROM repo) AS found,
                            (SELECT writing FROM repo) AS writing,
                            (SELECT generation FROM bumped) AS generation",
                )
                .bind(id.0)
                .bind(storage.as_str())
                .fetch_one(&self.pool),
            )
            .await?;
        if !row.try_get::<bool, _>("found")? {
            return Ok(Accepted::NotFound);
        }
        match row.try_get::<Option<i64>, _>("generation")? {
            Some(generation) => Ok(Accepted::Generation(generation)),
            None => Ok(Accepted::Busy),
        }
    }
}

/// The placements as parallel arrays: names and factors; then each member storage with its
/// virtual storage.
fn placement_arrays(placements: &[Placement]) -> (Vec<String>, Vec<i32>, Vec<String>, Vec<String>) {
    let names = placements
        .iter()
        .map(|p| p.virtual_storage.to_string())
        .collect();
    let factors = placements
        .iter()
        .map(|p| p.replication_factor as i32)
        .collect();
    let (member_of, members) = placements
        .iter()
        .flat_map(|p| {
            p.storages
                .iter()
                .map(|s| (p.virtual_storage.to_string(), s.to_string()))
        })
        .unzip();
    (names, factors, member_of, members)
}

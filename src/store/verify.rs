//! The verifier's statements: the identity each storage last showed, leased batches of the
//! replicas verified longest ago, and one statement per batch that records what was found.

use std::time::Duration;

use sqlx::Row as _;

use super::jobs::truncate;
use super::{Store, StoreError, millis, storage_names, undecodable};
use crate::model::{RelativePath, RepositoryId, StorageName};

/// What a storage's identity says since it was last seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identity {
    /// Seen for the first time.
    First,
    Same,
    /// Another id: the directory was wiped or replaced. Every replica on it waits for its
    /// verification, first in line.
    Changed {
        replicas: u64,
    },
}

/// A replica leased for verification, with what its repository looked like when leased.
#[derive(Debug, Clone)]
pub struct Verification {
    pub repository: RepositoryId,
    pub storage: StorageName,
    /// The replica's recorded generation; None when unknown.
    pub generation: Option<i64>,
    pub replica_path: RelativePath,
    pub repository_generation: i64,
    /// The repository's write-lease token: it counts the writes begun.
    pub lease_token: i64,
    /// A write is in flight; nothing can be compared now.
    pub writing: bool,
    /// The storages holding the repository's generation.
    pub up_to_date: Vec<StorageName>,
}

/// What the verifier found of one replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Present, and equal to the other up-to-date replicas.
    Verified,
    /// Not on its node.
    Missing,
    /// Its refs differ from those of the other replicas of its generation.
    Diverged,
    /// Not checked now (its node is down, a write began): it stays first in line.
    Skipped,
    /// The check failed.
    Error(String),
}

impl Verdict {
    fn name(&self) -> &'static str {
        match self {
            Verdict::Verified => "verified",
            Verdict::Missing => "missing",
            Verdict::Diverged => "diverged",
            Verdict::Skipped => "skipped",
            Verdict::Error(_) => "error",
        }
    }
}

/// One replica's verdict, with the state it was judged against: a missing or diverged replica
/// is marked only if neither its generation nor the repository's writes moved since.
#[derive(Debug, Clone)]
pub struct Finding {
    pub repository: RepositoryId,
    pub storage: StorageName,
    pub generation: Option<i64>,
    pub lease_token: i64,
    pub verdict: Verdict,
}

/// What recording a batch changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recorded {
    pub verified: u64,
    pub missing: u64,
    pub diverged: u64,
}

impl Store {
    /// Records the identity a storage's node reports. A changed identity queues every replica
    /// on the storage for verification, in the same statement.
    pub async fn observe_storage_identity(
        &self,
        storage: &StorageName,
        storage_id: &str,
    ) -> Result<Identity, StoreError> {
        let row = self
            .measure(
                "observe_storage_identity",
                sqlx::query(
                    "WITH before AS (
                         SELECT storage_id FROM storage_identities WHERE storage = $1
                     ), seen AS (
                         INSERT INTO storage_identities AS s (storage, storage_id)
                         VALUES ($1, $2)
                         ON CONFLICT (storage) DO UPDATE
                             SET storage_id = EXCLUDED.storage_id, seen_at = now(),
                                 changed_at = CASE WHEN s.storage_id = EXCLUDED.storage_id
                                                   THEN s.changed_at ELSE now() END
                     ), requeued AS (
                         UPDATE replicas SET verified_at = NULL
                         WHERE storage = $1 AND verified_at IS NOT NULL
                           AND EXISTS (SELECT 1 FROM before WHERE storage_id <> $2)
                         RETURNING 1
                     )
                     SELECT (SELECT storage_id FROM before) AS before,
                            (SELECT count(*) FROM requeued) AS requeued",
                )
                .bind(storage.as_str())
                .bind(storage_id)
                .fetch_one(&self.pool),
            )
            .await?;
        let before: Option<String> = row.try_get("before")?;
        let requeued: i64 = row.try_get("requeued")?;
        Ok(match before {
            None => Identity::First,
            Some(before) if before == storage_id => Identity::Same,
            Some(_) => Identity::Changed {
                replicas: requeued as u64,
            },
        })
    }

    /// Leases up to `limit` replicas whose last verification is older than `interval` (never
    /// verified first) and that no live verification holds.
    pub async fn claim_verifications(
        &self,
        owner: &str,
        lease: Duration,
        interval: Duration,
        limit: usize,
    ) -> Result<Vec<Verification>, StoreError> {
        let rows = self
            .measure(
                "claim_verifications",
                sqlx::query(
                    "WITH due AS (
                         SELECT repository_id, storage FROM replicas
                         WHERE (verified_at IS NULL
                                OR verified_at < now() - $3 * interval '1 millisecond')
                           AND (verify_expires_at IS NULL OR verify_expires_at < now())
                         ORDER BY verified_at NULLS FIRST
                         LIMIT $4
                         FOR UPDATE SKIP LOCKED
                     ), claimed AS (
                         UPDATE replicas p
                         SET verify_owner = $1,
                             verify_expires_at = now() + $2 * interval '1 millisecond'
                         FROM due
                         WHERE p.repository_id = due.repository_id AND p.storage = due.storage
                         RETURNING p.repository_id, p.storage, p.generation
                     )
                     SELECT c.repository_id, c.storage, c.generation, r.replica_path,
                            r.generation AS repository_generation, r.lease_token,
                            (COALESCE(r.lease_expires_at > now(), false)
                             OR EXISTS (SELECT 1 FROM write_intents i
                                        WHERE i.repository_id = r.id)) AS writing,
                            ARRAY(SELECT p.storage FROM replicas p
                                  WHERE p.repository_id = r.id AND p.generation = r.generation
                                  ORDER BY p.storage) AS up_to_date
                     FROM claimed c JOIN repositories r ON r.id = c.repository_id
                     ORDER BY c.repository_id, c.storage",
                )
                .bind(owner)
                .bind(millis(lease))
                .bind(millis(interval))
                .bind(limit as i64)
                .fetch_all(&self.pool),
            )
            .await?;
        rows.iter()
            .map(|row| {
                let replica_path: String = row.try_get("replica_path")?;
                Ok(Verification {
                    repository: RepositoryId(row.try_get("repository_id")?),
                    storage: StorageName::parse(row.try_get("storage")?)
                        .map_err(|e| undecodable("storage", e))?,
                    generation: row.try_get("generation")?,
                    replica_path: RelativePath::parse(&replica_path)
                        .map_err(|e| undecodable("replica_path", e))?,
                    repository_generation: row.try_get("repository_generation")?,
                    lease_token: row.try_get("lease_token")?,
                    writing: row.try_get("writing")?,
                    up_to_date: storage_names(&row.try_get::<Vec<String>, _>("up_to_date")?),
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    /// Records a batch of findings in one statement, and hands back `owner`'s leases:
    /// - verified: stamped now;
    /// - missing or diverged: the generation becomes unknown (and a missing one is dated), but
    ///   only if the replica's generation and the repository's write-lease token are what they
    ///   were when judged and no write is in flight; otherwise it stays first in line;
    /// - skipped or failed: it stays first in line.
    ///
    /// The storage's running totals move with it; a replica already known missing or
    /// diverged is not counted again.
    pub async fn record_verifications(
        &self,
        owner: &str,
        findings: &[Finding],
    ) -> Result<Recorded, StoreError> {
        if findings.is_empty() {
            return Ok(Recorded::default());
        }
        let repositories: Vec<i64> = findings.iter().map(|f| f.repository.0).collect();
        let storages: Vec<&str> = findings.iter().map(|f| f.storage.as_str()).collect();
        let verdicts: Vec<&str> = findings.iter().map(|f| f.verdict.name()).collect();
        let generations: Vec<Option<i64>> = findings.iter().map(|f| f.generation).collect();
        let tokens: Vec<i64> = findings.iter().map(|f| f.lease_token).collect();
        let errors: Vec<Option<&str>> = findings
            .iter()
            .map(|f| match &f.verdict {
                Verdict::Error(message) => Some(truncate(message)),
                _ => None,
            })
            .collect();
        let rows = self
            .measure(
                "record_verifications",
                sqlx::query(
                    "WITH finding AS (
                         SELECT * FROM unnest($2::bigint[], $3::text[], $4::text[], $5::bigint[],
                                              $6::bigint[], $7::text[])
                             AS f(repository_id, storage, verdict, generation, lease_token, error)
                     ), judged AS (
                         SELECT f.*, (f.verdict IN ('missing', 'diverged')
                                      AND p.generation IS NOT DISTINCT FROM f.generation
                                      AND r.lease_token = f.lease_token
                                      AND NOT COALESCE(r.lease_expires_at > now(), false)
                                      AND NOT EXISTS (SELECT 1 FROM write_intents i
                                                      WHERE i.repository_id = r.id)) AS marks,
                                -- Not known missing (or diverged) before: counted as found.
                                ((f.verdict = 'missing' AND p.missing_since IS NULL)
                                 OR (f.verdict = 'diverged' AND p.generation IS NOT NULL))
                                    AS news
                         FROM finding f
                         JOIN replicas p ON p.repository_id = f.repository_id
                                        AND p.storage = f.storage
                         JOIN repositories r ON r.id = f.repository_id
                     ), changed AS (
                         UPDATE replicas p
                         SET generation = CASE WHEN j.marks THEN NULL ELSE p.generation END,
                             missing_since = CASE
                                 WHEN j.marks AND j.verdict = 'missing'
                                     THEN COALESCE(p.missing_since, now())
                                 ELSE p.missing_since END,
                             verified_at = CASE WHEN j.verdict = 'verified' OR j.marks
                                                THEN now() ELSE p.verified_at END,
                             verify_owner = CASE WHEN p.verify_owner = $1 THEN NULL
                                                 ELSE p.verify_owner END,
                             verify_expires_at = CASE WHEN p.verify_owner = $1 THEN NULL
                                                      ELSE p.verify_expires_at END
                         FROM judged j
                         WHERE p.repository_id = j.repository_id AND p.storage = j.storage
                         RETURNING p.storage, j.verdict, j.marks, j.news, j.error
                     ), totals AS (
                         INSERT INTO storage_verifications AS s
                             (storage, last_verified_at, verified, missing, diverged, errors,
                              last_error)
                         SELECT c.storage, now(),
                                count(*) FILTER (WHERE c.verdict = 'verified'),
                                count(*) FILTER (WHERE c.verdict = 'missing'
                                                 AND c.marks AND c.news),
                                count(*) FILTER (WHERE c.verdict = 'diverged'
                                                 AND c.marks AND c.news),
                                count(*) FILTER (WHERE c.verdict = 'error'),
                                max(c.error)
                         FROM changed c GROUP BY c.storage ORDER BY c.storage
                         ON CONFLICT (storage) DO UPDATE
                             SET last_verified_at = now(),
                                 verified = s.verified + EXCLUDED.verified,
                                 missing = s.missing + EXCLUDED.missing,
                                 diverged = s.diverged + EXCLUDED.diverged,
                                 errors = s.errors + EXCLUDED.errors,
                                 last_error = COALESCE(EXCLUDED.last_error, s.last_error)
                     )
                     SELECT verdict, count(*) AS replicas FROM changed
                     WHERE verdict = 'verified' OR (marks AND news) GROUP BY verdict",
                )
                .bind(owner)
                .bind(&repositories)
                .bind(&storages)
                .bind(&verdicts)
                .bind(&generations)
                .bind(&tokens)
                .bind(&errors)
                .fetch_all(&self.pool),
            )
            .await?;
        let mut recorded = Recorded::default();
        for row in rows {
            let verdict: String = row.try_get("verdict")?;
            let count = row.try_get::<i64, _>("replicas")? as u64;
            match verdict.as_str() {
                "verified" => recorded.verified = count,
                "missing" => recorded.missing = count,
                "diverged" => recorded.diverged = count,
                _ => {}
            }
        }
        Ok(recorded)
    }

    /// Puts replicas first in the verifier's line: one repository's, or one storage's.
    pub async fn request_verification(
        &self,
        repository: Option<RepositoryId>,
        storage: Option<&StorageName>,
    ) -> Result<u64, StoreError> {
        let done = self
            .measure(
                "request_verification",
                sqlx::query(
                    "UPDATE replicas SET verified_at = NULL
                     WHERE ($1::bigint IS NULL OR repository_id = $1)
                       AND ($2::text IS NULL OR storage = $2)",
                )
                .bind(repository.map(|id| id.0))
                .bind(storage.map(StorageName::as_str))
                .execute(&self.pool),
            )
            .await?;
        Ok(done.rows_affected())
    }
}

//! The cluster-wide write lock for maintenance, and the writes still in flight.

use sqlx::Row as _;

use super::{Store, StoreError, WriteLock};

/// A write holding its repository's lease now.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct WriteInFlight {
    pub repository: String,
    /// The proxy instance that holds it.
    pub owner: String,
    pub rpc: String,
    pub age_seconds: f64,
    /// Its lease ran out: the proxy is gone, and recovery finishes it.
    pub expired: bool,
}

impl Store {
    /// The write lock as it stands.
    pub async fn write_lock(&self) -> Result<WriteLock, StoreError> {
        let row = self
            .measure(
                "write_lock",
                sqlx::query(
                    "SELECT write_lock, reason, changed_by,
                            extract(epoch FROM now() - changed_at)::float8 AS changed_ago
                     FROM maintenance",
                )
                .fetch_one(&self.pool),
            )
            .await?;
        Ok(WriteLock {
            enabled: row.try_get("write_lock")?,
            reason: row.try_get("reason")?,
            changed_by: row.try_get("changed_by")?,
            changed_ago_seconds: row.try_get("changed_ago")?,
        })
    }

    /// Turns the write lock on (with its reason) or off. From the commit on, no write can
    /// take a repository's lease; proxies are notified at once.
    pub async fn set_write_lock(
        &self,
        enabled: bool,
        reason: Option<&str>,
        changed_by: &str,
    ) -> Result<(), StoreError> {
        self.measure(
            "set_write_lock",
            sqlx::query(
                "UPDATE maintenance
                 SET write_lock = $1, reason = $2, changed_by = $3, changed_at = now()",
            )
            .bind(enabled)
            .bind(reason)
            .bind(changed_by)
            .execute(&self.pool),
        )
        .await?;
        Ok(())
    }

    /// Every recorded write intent, oldest first: in flight, or interrupted (lease expired).
    pub async fn writes_in_flight(&self) -> Result<Vec<WriteInFlight>, StoreError> {
        let rows = self
            .measure(
                "writes_in_flight",
                sqlx::query(
                    "SELECT r.virtual_storage || '/' || r.relative_path AS repository,
                            i.owner, i.rpc,
                            extract(epoch FROM now() - i.created_at)::float8 AS age,
                            i.lease_expires_at < now() AS expired
                     FROM write_intents i JOIN repositories r ON r.id = i.repository_id
                     ORDER BY i.created_at",
                )
                .fetch_all(&self.pool),
            )
            .await?;
        rows.iter()
            .map(|row| {
                Ok(WriteInFlight {
                    repository: row.try_get("repository")?,
                    owner: row.try_get("owner")?,
                    rpc: row.try_get("rpc")?,
                    age_seconds: row.try_get("age")?,
                    expired: row.try_get("expired")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }
}

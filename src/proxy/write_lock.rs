//! The proxy's copy of the maintenance write lock: refreshed when PostgreSQL announces a
//! change, and polled as a fallback, so every proxy obeys within a second. New writes are
//! turned away at once while it is on; reads never look at it. PostgreSQL enforces it too,
//! in the statement that takes a write lease, so a write that starts while this copy is stale
//! is refused there.

use std::sync::RwLock;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::store::{MAINTENANCE_CHANNEL, Notice, Store};

/// How often the lock is read while notifications flow, and while they do not.
const POLL_LISTENING: Duration = Duration::from_secs(5);
const POLL_DEAF: Duration = Duration::from_millis(500);

#[derive(Debug, Default)]
pub struct WriteLockWatch {
    /// The reason, while the lock is on.
    reason: RwLock<Option<String>>,
}

impl WriteLockWatch {
    /// The reason writes are locked, if they are.
    pub fn locked(&self) -> Option<String> {
        self.reason.read().unwrap().clone()
    }

    async fn refresh(&self, store: &Store) {
        match store.write_lock().await {
            Ok(lock) => {
                let reason = lock
                    .enabled
                    .then(|| lock.reason.unwrap_or_else(|| "no reason given".into()));
                let mut current = self.reason.write().unwrap();
                if *current != reason {
                    match &reason {
                        Some(reason) => {
                            tracing::warn!(%reason, "writes are locked for maintenance")
                        }
                        None => tracing::info!("the write lock is lifted"),
                    }
                    *current = reason;
                }
            }
            Err(error) => tracing::debug!(%error, "cannot read the write lock"),
        }
    }

    /// Keeps the copy current until `stop`: read again at every announcement and every
    /// (re)connection of the listener, and polled, more often while it hears nothing.
    pub async fn run(self: std::sync::Arc<Self>, store: Store, stop: CancellationToken) {
        let mut notices = store.listen(&[MAINTENANCE_CHANNEL], stop.clone());
        let mut listening = false;
        loop {
            self.refresh(&store).await;
            let poll = if listening { POLL_LISTENING } else { POLL_DEAF };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(poll) => {}
                notice = notices.recv() => match notice {
                    Some(Notice::Listening | Notice::Notified { .. }) => listening = true,
                    Some(Notice::Deaf(_)) => listening = false,
                    None => return,
                },
            }
        }
    }
}

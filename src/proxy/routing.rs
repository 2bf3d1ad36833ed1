//! Routing state cached in memory: repository records, dropped when PostgreSQL announces a
//! change on [`ROUTING_CHANNEL`]. While the notification connection is down nothing is cached
//! and every lookup reads the database, so the cache is never trusted blindly.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use crate::model::{RelativePath, RepositoryId, StorageName};
use crate::store::{Notice, ROUTING_CHANNEL, RepositoryRecord, Store, StoreError};

type Key = (StorageName, RelativePath);

#[derive(Debug, Default)]
struct Entries {
    by_path: HashMap<Key, Arc<RepositoryRecord>>,
    path_of: HashMap<RepositoryId, Key>,
}

#[derive(Debug)]
pub struct RoutingCache {
    store: Store,
    entries: Mutex<Entries>,
    /// Bumped by every invalidation: a lookup that read the database before a bump does not
    /// cache what it read.
    epoch: AtomicU64,
    /// Whether notifications are being received.
    listening: AtomicBool,
    received: AtomicU64,
}

impl RoutingCache {
    pub fn new(store: Store) -> Self {
        Self {
            store,
            entries: Mutex::default(),
            epoch: AtomicU64::new(0),
            listening: AtomicBool::new(false),
            received: AtomicU64::new(0),
        }
    }

    /// The repository at a path: from memory when it is there and notifications flow, else
    /// from the database (one round trip).
    pub async fn lookup(
        &self,
        virtual_storage: &StorageName,
        relative_path: &RelativePath,
    ) -> Result<Option<Arc<RepositoryRecord>>, StoreError> {
        if let Some(record) = self.cached(virtual_storage, relative_path) {
            return Ok(Some(record));
        }
        let key = (virtual_storage.clone(), relative_path.clone());
        let epoch = self.epoch.load(Ordering::Acquire);
        let Some(record) = self
            .store
            .find_repository(virtual_storage, relative_path)
            .await?
        else {
            return Ok(None);
        };
        let record = Arc::new(record);
        let mut entries = self.entries.lock().unwrap();
        if self.listening.load(Ordering::Acquire) && self.epoch.load(Ordering::Acquire) == epoch {
            // A repository lives at one path: an entry under an older path (a rename not yet
            // announced) goes, so the announcement, which drops by id, finds every entry.
            if let Some(old_key) = entries.path_of.insert(record.id, key.clone())
                && old_key != key
            {
                entries.by_path.remove(&old_key);
            }
            entries.by_path.insert(key, record.clone());
        }
        Ok(Some(record))
    }

    /// The repository at a path if it is in memory and notifications flow; never reads the
    /// database.
    pub fn cached(
        &self,
        virtual_storage: &StorageName,
        relative_path: &RelativePath,
    ) -> Option<Arc<RepositoryRecord>> {
        if !self.listening.load(Ordering::Acquire) {
            return None;
        }
        let key = (virtual_storage.clone(), relative_path.clone());
        self.entries.lock().unwrap().by_path.get(&key).cloned()
    }

    /// Notifications received since start.
    pub fn notifications(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Forgets one repository.
    pub fn invalidate(&self, id: RepositoryId) {
        let mut entries = self.entries.lock().unwrap();
        self.epoch.fetch_add(1, Ordering::AcqRel);
        if let Some(key) = entries.path_of.remove(&id) {
            entries.by_path.remove(&key);
        }
    }

    /// Forgets everything.
    pub fn clear(&self) {
        let mut entries = self.entries.lock().unwrap();
        self.epoch.fetch_add(1, Ordering::AcqRel);
        *entries = Entries::default();
    }

    pub fn len(&self) -> usize {
        self.entries.lock().unwrap().by_path.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn is_listening(&self) -> bool {
        self.listening.load(Ordering::Acquire)
    }

    fn set_listening(&self, listening: bool) {
        // Whatever was cached may have changed unannounced: start over either way.
        self.clear();
        let was = self.listening.swap(listening, Ordering::AcqRel);
        if was != listening {
            if listening {
                tracing::info!("routing notifications flow: caching routing state");
            } else {
                tracing::warn!(
                    "routing notifications lost: reading routing state from the database"
                );
            }
        }
    }

    /// Follows the routing announcements until `cancel`; the cache is emptied at every
    /// (re)connection and unused while the connection is down.
    pub async fn run_listener(self: Arc<Self>, cancel: CancellationToken) {
        let mut notices = self.store.listen(&[ROUTING_CHANNEL], cancel.clone());
        loop {
            let notice = tokio::select! {
                _ = cancel.cancelled() => return,
                notice = notices.recv() => notice,
            };
            match notice {
                Some(Notice::Listening) => self.set_listening(true),
                Some(Notice::Deaf(_)) => self.set_listening(false),
                Some(Notice::Notified { payload, .. }) => {
                    match payload.parse::<i64>() {
                        Ok(id) => self.invalidate(RepositoryId(id)),
                        Err(_) => self.clear(),
                    }
                    self.received.fetch_add(1, Ordering::Relaxed);
                }
                // The listener is gone: nothing more is heard, so nothing cached is trusted.
                None => {
                    self.set_listening(false);
                    return;
                }
            }
        }
    }
}

//! Undoing a write: reversing its ref updates where they landed (through the fleet's replica
//! calls), and settling a write whose proxy died before its commit.

use std::collections::HashMap;

use super::Write;
use super::close::Commit;
use super::fanout::checksums;
use crate::fleet::majority;
use crate::model::StorageName;
use crate::proxy::error::ProxyError;
use crate::store::{StaleIntent, WriteLease};

impl Write {
    /// Settles a write that was recorded and never committed (its proxy died, or lost its
    /// lease before it could undo the write): its ref updates are reversed wherever they
    /// landed, the replicas that then agree become the next generation, and the others are
    /// left behind it, to be repaired.
    pub(super) async fn recover(
        &self,
        lease: &WriteLease,
        stale: &StaleIntent,
    ) -> Result<(), ProxyError> {
        let state = &self.proxy.state;
        let replica_path = &lease.replica_path;
        tracing::warn!(intent = lease.intent, targets = ?stale.targets, "settling an interrupted write");
        for storage in lease.targets.iter().filter(|s| stale.targets.contains(s)) {
            if let Some(replica) = state.nodes.replica(storage, replica_path) {
                replica.reverse_changes(&stale.changes, lease.token).await;
            }
        }
        let after = checksums(&self.proxy, &lease.targets, replica_path).await;
        let mut groups: HashMap<&str, Vec<StorageName>> = HashMap::new();
        for (storage, checksum) in lease.targets.iter().zip(&after) {
            if let Some(checksum) = checksum {
                groups.entry(checksum).or_default().push(storage.clone());
            }
        }
        let Some((checksum, current)) = groups.into_iter().max_by_key(|(_, group)| group.len())
        else {
            return Err(self.failed(
                "an interrupted write cannot be settled: no replica answered; it is retried when the lease runs out",
            ));
        };
        if current.len() < majority(lease.assigned.len()) {
            // No generation is recorded on fewer: the recovery job settles it once the lease
            // runs out, and marks what it cannot roll back outdated.
            return Err(self.failed(&format!(
                "an interrupted write cannot be settled here: only {} of {} assigned replicas agree after the rollback",
                current.len(),
                lease.assigned.len()
            )));
        }
        let committed = self
            .commit(lease, &current, &current[0], Some(checksum))
            .await?;
        let Commit::Done(outcome) = committed else {
            return Err(self.failed(
                "the lease was lost or the replicas changed while an interrupted write was settled",
            ));
        };
        state.routing.invalidate(lease.repository);
        tracing::info!(generation = outcome.generation, current = ?current, queued = ?outcome.queued, "interrupted write settled");
        Ok(())
    }
}

//! Undoing a write: reversing its ref updates where they landed, and settling a write whose
//! proxy died before its commit.

use std::collections::HashMap;

use super::Write;
use super::close::Commit;
use super::fanout::checksums;
use crate::model::{RelativePath, StorageName};
use crate::proto::ref_service_client::RefServiceClient;
use crate::proto::{ListRefsRequest, RefUpdate, UpdateRefsRequest};
use crate::proxy::Nodes;
use crate::proxy::error::ProxyError;
use crate::proxy::replica_header;
use crate::store::{RefChange, StaleIntent, WriteLease};

impl Write {
    /// Reverses the write's ref updates on one replica; true when its refs are back to
    /// `before`.
    pub(super) async fn roll_back(
        &self,
        storage: &StorageName,
        replica_path: &RelativePath,
        before: &str,
    ) -> bool {
        reverse_changes(
            &self.proxy.state.nodes,
            storage,
            replica_path,
            &self.changes,
        )
        .await;
        let after = checksums(&self.proxy, std::slice::from_ref(storage), replica_path).await;
        after[0].as_deref() == Some(before)
    }

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
            reverse_changes(
                &self.proxy.state.nodes,
                storage,
                replica_path,
                &stale.changes,
            )
            .await;
        }
        let after = checksums(&self.proxy, &lease.targets, replica_path).await;
        let mut groups: HashMap<&str, Vec<StorageName>> = HashMap::new();
        for (storage, checksum) in lease.targets.iter().zip(&after) {
            if let Some(checksum) = checksum {
                groups.entry(checksum).or_default().push(storage.clone());
            }
        }
        let Some(current) = groups.into_values().max_by_key(Vec::len) else {
            return Err(self.failed(
                "an interrupted write cannot be settled: no replica answered; it is retried when the lease runs out",
            ));
        };
        let Commit::Done(outcome) = self.commit(lease, &current, &current[0]).await? else {
            return Err(self.failed(
                "the lease was lost or the replicas changed while an interrupted write was settled",
            ));
        };
        state.routing.invalidate(lease.repository);
        tracing::info!(generation = outcome.generation, current = ?current, queued = ?outcome.queued, "interrupted write settled");
        Ok(())
    }
}

/// Reverses ref updates on one replica, one compare-and-swap per ref: a ref the replica did
/// not move refuses the swap, which is what is wanted. HEAD is not reversed.
pub(crate) async fn reverse_changes(
    nodes: &Nodes,
    storage: &StorageName,
    replica_path: &RelativePath,
    changes: &[RefChange],
) {
    let Some(node) = nodes.get(storage) else {
        return;
    };
    let mut client = RefServiceClient::new(node.authed());
    for change in changes.iter().rev().filter(|change| change.name != "HEAD") {
        let request = UpdateRefsRequest {
            repository: Some(replica_header(storage, replica_path)),
            updates: vec![RefUpdate {
                name: change.name.clone(),
                old_target: change.new.clone(),
                new_target: change.old.clone(),
            }],
        };
        if let Err(status) = client.update_refs(request).await {
            tracing::debug!(%storage, reference = %change.name, %status, "not reversed");
        }
    }
}

/// Whether every ref a write changed (HEAD aside) is back where the write found it on one
/// replica: at its old value, or absent where the write created it. None when the replica
/// cannot be read.
pub(crate) async fn refs_at_old(
    nodes: &Nodes,
    storage: &StorageName,
    replica_path: &RelativePath,
    changes: &[RefChange],
) -> Option<bool> {
    let node = nodes.get(storage)?;
    let changes: Vec<&RefChange> = changes.iter().filter(|c| c.name != "HEAD").collect();
    let request = ListRefsRequest {
        repository: Some(replica_header(storage, replica_path)),
        prefixes: changes.iter().map(|change| change.name.clone()).collect(),
    };
    let mut stream = RefServiceClient::new(node.authed())
        .list_refs(request)
        .await
        .ok()?
        .into_inner();
    let mut found: HashMap<String, String> = HashMap::new();
    while let Some(batch) = stream.message().await.ok()? {
        found.extend(batch.refs.into_iter().map(|r| (r.name, r.target)));
    }
    Some(changes.iter().all(|change| {
        let absent = change.old.bytes().all(|b| b == b'0');
        match found.get(&change.name) {
            None => absent,
            Some(target) => !absent && *target == change.old,
        }
    }))
}

//! The calls every role makes on one replica: its refs checksum, whether it exists, its
//! removal, and reversing a write's ref updates. The proxy, the worker and the admin commands
//! all go through here, so a replica is named on its node in one way.

use std::collections::HashMap;

use tonic::Status;

use super::nodes::{NodeHandle, Nodes};
use crate::model::{RelativePath, StorageName};
use crate::node::fence::FENCE_HEADER;
use crate::proto::node_service_client::NodeServiceClient;
use crate::proto::ref_service_client::RefServiceClient;
use crate::proto::repository_service_client::RepositoryServiceClient;
use crate::proto::{
    FindDefaultBranchRequest, ListRefsRequest, RaiseFenceRequest, RefUpdate, RefsChecksumRequest,
    RemoveRepositoryRequest, RepositoryExistsRequest, RepositoryHeader, SetDefaultBranchRequest,
    UpdateRefsRequest,
};
use crate::store::RefChange;

/// Names a replica on its node.
pub fn replica_header(storage: &StorageName, replica_path: &RelativePath) -> RepositoryHeader {
    RepositoryHeader {
        storage: storage.to_string(),
        relative_path: replica_path.to_string(),
    }
}

/// A request that carries the fencing token of the caller's lease: the node refuses it once a
/// newer lease has changed the replica.
pub fn fenced<T>(message: T, token: i64) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    set_fence(request.metadata_mut(), token);
    request
}

/// Sets the fencing token on a request's metadata.
pub fn set_fence(metadata: &mut tonic::metadata::MetadataMap, token: i64) {
    metadata.insert(FENCE_HEADER, tonic::metadata::MetadataValue::from(token));
}

/// Whether a node refused a call because the replica's fence is newer than the call's token:
/// a newer lease has acted on the replica since the call was decided.
pub fn is_fenced(status: &Status) -> bool {
    status.code() == tonic::Code::FailedPrecondition && status.message().starts_with("fenced:")
}

/// One replica: a repository's copy on one storage.
#[derive(Debug, Clone, Copy)]
pub struct Replica<'a> {
    pub node: &'a NodeHandle,
    pub replica_path: &'a RelativePath,
}

impl Nodes {
    /// The replica at `replica_path` on `storage`; None when the storage is not configured.
    pub fn replica<'a>(
        &'a self,
        storage: &StorageName,
        replica_path: &'a RelativePath,
    ) -> Option<Replica<'a>> {
        Some(Replica {
            node: self.get(storage)?,
            replica_path,
        })
    }
}

impl Replica<'_> {
    pub fn storage(&self) -> &StorageName {
        &self.node.storage
    }

    pub fn header(&self) -> RepositoryHeader {
        replica_header(&self.node.storage, self.replica_path)
    }

    /// The checksum of the replica's refs, as its node computes it.
    pub async fn refs_checksum(&self) -> Result<String, Status> {
        let request = RefsChecksumRequest {
            repository: Some(self.header()),
        };
        let response = RefServiceClient::new(self.node.authed())
            .refs_checksum(request)
            .await?;
        Ok(response.into_inner().checksum)
    }

    /// Whether the node holds the replica.
    pub async fn exists(&self) -> Result<bool, Status> {
        let request = RepositoryExistsRequest {
            repository: Some(self.header()),
        };
        let response = RepositoryServiceClient::new(self.node.authed())
            .repository_exists(request)
            .await?;
        Ok(response.into_inner().exists)
    }

    /// Removes the replica from its node under the fencing token `fence` (taken when its
    /// repository row was deleted): a replica whose fence a newer lease raised refuses it. A
    /// replica already gone answers NotFound.
    pub async fn remove(&self, fence: Option<i64>) -> Result<(), Status> {
        let request = RemoveRepositoryRequest {
            repository: Some(self.header()),
        };
        let request = match fence {
            Some(token) => fenced(request, token),
            None => tonic::Request::new(request),
        };
        RepositoryServiceClient::new(self.node.authed())
            .remove_repository(request)
            .await?;
        Ok(())
    }

    /// Raises the replica's fence to `token` and changes nothing else: a removal or quarantine
    /// decided with an older token is refused from then on.
    pub async fn raise_fence(&self, token: i64) -> Result<(), Status> {
        let request = RaiseFenceRequest {
            repository: Some(self.header()),
        };
        NodeServiceClient::new(self.node.authed())
            .raise_fence(fenced(request, token))
            .await?;
        Ok(())
    }

    /// The branch HEAD points to, as a full ref name.
    pub async fn head(&self) -> Result<String, Status> {
        let request = FindDefaultBranchRequest {
            repository: Some(self.header()),
        };
        let response = RefServiceClient::new(self.node.authed())
            .find_default_branch(request)
            .await?;
        Ok(response.into_inner().name)
    }

    /// Reverses ref updates, one compare-and-swap per ref, under the fencing token `token`: a
    /// ref the replica did not move refuses the swap, which is what is wanted, and so does a
    /// replica whose fence a newer lease has raised. HEAD is set back to its old branch when
    /// it points where the write set it (a newer lease's change is fenced out); a HEAD change
    /// with no old value (one that was never sent) is left.
    pub async fn reverse_changes(&self, changes: &[RefChange], token: i64) {
        let mut client = RefServiceClient::new(self.node.authed());
        for change in changes.iter().rev() {
            let reversed = if change.name == "HEAD" {
                let Some(branch) = change.old.strip_prefix("refs/heads/") else {
                    continue;
                };
                if self.head().await.ok().as_deref() != Some(change.new.as_str()) {
                    continue;
                }
                let request = SetDefaultBranchRequest {
                    repository: Some(self.header()),
                    branch: branch.to_owned(),
                };
                client
                    .set_default_branch(fenced(request, token))
                    .await
                    .map(drop)
            } else {
                let request = UpdateRefsRequest {
                    repository: Some(self.header()),
                    updates: vec![RefUpdate {
                        name: change.name.clone(),
                        old_target: change.new.clone(),
                        new_target: change.old.clone(),
                    }],
                };
                client.update_refs(fenced(request, token)).await.map(drop)
            };
            if let Err(status) = reversed {
                tracing::debug!(storage = %self.node.storage, reference = %change.name, %status, "not reversed");
            }
        }
    }

    /// Where the refs a write changed stand on the replica, and HEAD's branch when the write
    /// changed HEAD. None when the replica cannot be read.
    pub async fn changed_refs(&self, changes: &[RefChange]) -> Option<ChangedRefs> {
        let head = match changes.iter().any(|change| change.name == "HEAD") {
            true => Some(self.head().await.ok()?),
            false => None,
        };
        let names: Vec<String> = changes
            .iter()
            .filter(|change| change.name != "HEAD")
            .map(|change| change.name.clone())
            .collect();
        let wanted: std::collections::HashSet<&str> = names.iter().map(String::as_str).collect();
        let mut refs: HashMap<String, String> = HashMap::new();
        if !names.is_empty() {
            let request = ListRefsRequest {
                repository: Some(self.header()),
                prefixes: names.to_vec(),
            };
            let mut stream = RefServiceClient::new(self.node.authed())
                .list_refs(request)
                .await
                .ok()?
                .into_inner();
            while let Some(batch) = stream.message().await.ok()? {
                refs.extend(
                    batch
                        .refs
                        .into_iter()
                        .filter(|r| wanted.contains(r.name.as_str()))
                        .map(|r| (r.name, r.target)),
                );
            }
        }
        Some(ChangedRefs { head, refs })
    }
}

/// The values of the refs a write changed, on one replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangedRefs {
    /// HEAD's branch, when the write changed HEAD.
    pub head: Option<String>,
    /// Each changed ref that exists, and its object id.
    pub refs: HashMap<String, String>,
}

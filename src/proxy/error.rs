//! The proxy's errors and their one mapping to gRPC statuses. Errors the proxy makes itself
//! carry `gitfleet-error-source: proxy`; a node's own error is passed on as the node sent it,
//! tagged `gitfleet-error-source: node` and `gitfleet-storage`.

use tonic::Status;
use tonic::metadata::MetadataValue;

use super::header::HeaderError;
use crate::model::{InvalidInput, StorageName};
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("{0}")]
    BadHeader(#[from] HeaderError),
    #[error("{0}")]
    InvalidInput(#[from] InvalidInput),
    /// The client's stream failed (a message too large, a broken connection).
    #[error("{0}")]
    Inbound(Status),
    #[error("the request stream is empty")]
    EmptyRequest,
    /// A client sent a fencing token: tokens come only from the cluster's own leases.
    #[error("{0} is set by the cluster, never by a client")]
    ClientFence(&'static str),
    #[error("the request is not a valid {0} message")]
    Undecodable(&'static str),
    #[error("virtual storage {0:?} is not configured on this proxy")]
    UnknownVirtualStorage(String),
    #[error("repository {0} does not exist")]
    NotFound(String),
    #[error("repository {0} already exists")]
    AlreadyExists(String),
    #[error("{0} is not served by the proxy")]
    NotServed(String),
    #[error("{0}")]
    Database(#[from] StoreError),
    #[error("repository {repository} has no up-to-date replica on a healthy node ({reason})")]
    NoReplica { repository: String, reason: String },
    #[error(
        "repository {repository}: a write needs {needed} of its {assigned} assigned replicas, but these are unhealthy or outdated: {}",
        list(missing)
    )]
    NotEnoughReplicas {
        repository: String,
        needed: usize,
        assigned: usize,
        missing: Vec<StorageName>,
    },
    #[error("repository {repository}: another write still holds the write lease after {waited:?}")]
    WriteBusy {
        repository: String,
        waited: std::time::Duration,
    },
    #[error("repository {repository}: the write was not acknowledged: {reason}")]
    WriteFailed { repository: String, reason: String },
    #[error("storage {storage}: {status}")]
    Node {
        storage: StorageName,
        status: Status,
    },
    #[error("the request's task failed: {0}")]
    Task(String),
    #[error("writes are locked for maintenance: {0}")]
    WriteLocked(String),
}

impl ProxyError {
    /// A write (or creation) that cannot reach a majority of `assigned`: only `reachable` are
    /// up to date on healthy nodes.
    pub fn not_enough(
        repository: impl Into<String>,
        assigned: &[StorageName],
        reachable: &[StorageName],
    ) -> Self {
        ProxyError::NotEnoughReplicas {
            repository: repository.into(),
            needed: crate::fleet::majority(assigned.len()),
            assigned: assigned.len(),
            missing: assigned
                .iter()
                .filter(|storage| !reachable.contains(storage))
                .cloned()
                .collect(),
        }
    }
}

/// "s1, s2", for messages.
pub(super) fn list(storages: &[StorageName]) -> String {
    storages
        .iter()
        .map(StorageName::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

impl From<ProxyError> for Status {
    fn from(error: ProxyError) -> Self {
        let message = error.to_string();
        let mut status = match error {
            ProxyError::Node { storage, status } => {
                let mut status = status;
                status
                    .metadata_mut()
                    .insert("gitfleet-error-source", MetadataValue::from_static("node"));
                if let Ok(value) = MetadataValue::try_from(storage.as_str()) {
                    status.metadata_mut().insert("gitfleet-storage", value);
                }
                return status;
            }
            ProxyError::Inbound(status) => return status,
            ProxyError::BadHeader(_)
            | ProxyError::InvalidInput(_)
            | ProxyError::EmptyRequest
            | ProxyError::ClientFence(_)
            | ProxyError::Undecodable(_)
            | ProxyError::UnknownVirtualStorage(_) => Status::invalid_argument(message),
            ProxyError::NotFound(_) => Status::not_found(message),
            ProxyError::AlreadyExists(_) => Status::already_exists(message),
            ProxyError::NotServed(_) => Status::unimplemented(message),
            ProxyError::Database(StoreError::Unavailable(_)) => Status::unavailable(message),
            ProxyError::Database(StoreError::Failed(_)) => Status::internal(message),
            ProxyError::NoReplica { .. }
            | ProxyError::NotEnoughReplicas { .. }
            | ProxyError::WriteBusy { .. }
            | ProxyError::WriteFailed { .. }
            | ProxyError::WriteLocked(_) => Status::unavailable(message),
            ProxyError::Task(_) => Status::internal(message),
        };
        status
            .metadata_mut()
            .insert("gitfleet-error-source", MetadataValue::from_static("proxy"));
        status
    }
}

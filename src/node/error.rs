use tonic::{Code, Status};

/// Set on the status of a call whose repository does not exist on the node, so that a caller
/// can tell it from a revision or a path that does not exist, without reading the message.
pub const MISSING_REPOSITORY: &str = "gitfleet-missing-repository";

use crate::git::GitError;
use crate::git::pipe::PipeError;
use crate::model::InvalidInput;

/// Everything a node RPC can fail with. Mapped to a gRPC status in exactly one place.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Invalid(#[from] InvalidInput),
    #[error("{0}")]
    BadRequest(String),
    #[error("storage {0:?} is not served by this node")]
    UnknownStorage(String),
    #[error("repository {0} does not exist")]
    RepositoryNotFound(String),
    #[error("repository {0} already exists")]
    RepositoryExists(String),
    #[error("{0}")]
    NotFound(String),
    /// A compare-and-swap lost: a reference was not at the expected value.
    #[error("{0}")]
    RefConflict(String),
    /// git refused a push or an update for a reason the caller must fix first.
    #[error("{0}")]
    Rejected(String),
    /// A newer lease than the caller's has changed the replica: its call changes nothing.
    #[error(transparent)]
    Fenced(#[from] super::fence::FenceError),
    #[error("source repository: {0}")]
    SourceUnavailable(String),
    #[error("source repository: {0}")]
    SourceFailed(String),
    #[error("the node is shutting down")]
    ShuttingDown,
    #[error("the client went away")]
    ClientGone,
    #[error(transparent)]
    Git(GitError),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

impl From<GitError> for NodeError {
    fn from(error: GitError) -> Self {
        match error {
            GitError::Killed => NodeError::ShuttingDown,
            error => NodeError::Git(error),
        }
    }
}

impl From<PipeError> for NodeError {
    fn from(error: PipeError) -> Self {
        match error {
            PipeError::Io(error) => NodeError::Io(error),
            PipeError::InputBroken(reason) => {
                NodeError::BadRequest(format!("the request stream broke off: {reason}"))
            }
            PipeError::ClientGone => NodeError::ClientGone,
            PipeError::ShuttingDown => NodeError::ShuttingDown,
        }
    }
}

impl From<NodeError> for Status {
    fn from(error: NodeError) -> Self {
        let code = match &error {
            NodeError::Invalid(_) | NodeError::BadRequest(_) => Code::InvalidArgument,
            NodeError::UnknownStorage(_)
            | NodeError::RepositoryNotFound(_)
            | NodeError::NotFound(_) => Code::NotFound,
            NodeError::RepositoryExists(_) => Code::AlreadyExists,
            NodeError::RefConflict(_) => Code::Aborted,
            NodeError::Rejected(_) | NodeError::SourceFailed(_) => Code::FailedPrecondition,
            NodeError::Fenced(super::fence::FenceError::Fenced { .. }) => Code::FailedPrecondition,
            NodeError::Fenced(super::fence::FenceError::Busy(_)) => Code::Unavailable,
            NodeError::Fenced(super::fence::FenceError::Io(_)) => Code::Internal,
            NodeError::SourceUnavailable(_) | NodeError::ShuttingDown => Code::Unavailable,
            NodeError::ClientGone => Code::Cancelled,
            NodeError::Git(_) | NodeError::Io(_) => Code::Internal,
        };
        if code == Code::Internal {
            tracing::error!(%error, "request failed");
        } else {
            tracing::debug!(%error, ?code, "request refused");
        }
        let missing = matches!(error, NodeError::RepositoryNotFound(_));
        let mut status = Status::new(code, error.to_string());
        if missing {
            status.metadata_mut().insert(
                MISSING_REPOSITORY,
                tonic::metadata::MetadataValue::from_static("1"),
            );
        }
        status
    }
}

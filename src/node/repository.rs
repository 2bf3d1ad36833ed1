//! Repository lifecycle. Creation and removal each take one rename, so a crash never leaves a
//! half-made or half-removed repository at its final path.

use std::io::ErrorKind;
use std::path::Path;

use tonic::{Request, Response, Status};

use super::fence::FenceGuard;
use super::refs::{enter_fence, fence_token};
use super::storage::{Located, place, prune_empty_parents};
use super::{Node, NodeError};
use crate::model::{RefName, RelativePath};
use crate::proto::repository_service_server::RepositoryService;
use crate::proto::*;

impl Node {
    async fn create(&self, request: CreateRepositoryRequest) -> Result<(), NodeError> {
        let target = self.state.storages.locate(request.repository.as_ref())?;
        let branch = match request.default_branch.as_str() {
            "" => "main",
            branch => branch,
        };
        let head = RefName::branch(branch)?;
        self.build_aside(&target, "create", async |staging: &Path| {
            self.build_empty(staging, &head).await
        })
        .await
    }

    /// Builds a new repository with `build` in the temporary area and moves it to `target`
    /// whole, so its final path never holds a half-made repository; a failure leaves nothing
    /// behind.
    pub(super) async fn build_aside(
        &self,
        target: &Located<'_>,
        purpose: &str,
        build: impl AsyncFnOnce(&Path) -> Result<(), NodeError>,
    ) -> Result<(), NodeError> {
        target.check_free()?;
        let staging = target.storage.tmp_path(purpose);
        let placed = match build(&staging).await {
            Ok(()) => place(target.storage, &staging, &target.path, &target.to_string()),
            Err(error) => Err(error),
        };
        if placed.is_err() {
            let _ = tokio::fs::remove_dir_all(&staging).await;
        }
        placed
    }

    /// Builds an empty bare repository at `path` with HEAD at `head`.
    pub(super) async fn build_empty(
        &self,
        path: &std::path::Path,
        head: &RefName,
    ) -> Result<(), NodeError> {
        let path_arg = path
            .to_str()
            .ok_or_else(|| NodeError::BadRequest("path is not UTF-8".into()))?;
        self.state
            .git
            .run(
                None,
                &["init", "--bare", "--quiet", "--template=", path_arg],
                None,
            )
            .await?;
        self.state
            .git
            .run(Some(path), &["symbolic-ref", "HEAD", head.as_str()], None)
            .await?;
        Ok(())
    }

    async fn remove(
        &self,
        request: RemoveRepositoryRequest,
        token: Option<u64>,
    ) -> Result<(), NodeError> {
        let target = self.state.storages.existing(request.repository.as_ref())?;
        // Held across the rename: a removal decided before a newer lease's change is refused.
        let _fence = enter_replica_fence(&target, token).await?;
        let doomed = target.storage.tmp_path("remove");
        match tokio::fs::rename(&target.path, &doomed).await {
            Ok(()) => {}
            Err(error) if error.kind() == ErrorKind::NotFound => {
                return Err(NodeError::RepositoryNotFound(target.to_string()));
            }
            Err(error) => return Err(error.into()),
        }
        prune_empty_parents(&target.storage.root, &target.path);
        // The repository is gone once the rename is done; a failure below only leaves bytes in
        // the temporary area, which is emptied at the next start.
        if let Err(error) = tokio::fs::remove_dir_all(&doomed).await {
            tracing::warn!(%error, path = %doomed.display(), "cannot delete a removed repository");
        }
        Ok(())
    }

    /// Raises a replica's fence to `token`, changing nothing else.
    pub(super) async fn raise_replica_fence(
        &self,
        request: RaiseFenceRequest,
        token: u64,
    ) -> Result<(), NodeError> {
        let replica = self.state.storages.existing(request.repository.as_ref())?;
        enter_replica_fence(&replica, Some(token)).await?;
        tracing::info!(%replica, token, "fence raised");
        Ok(())
    }

    async fn rename(&self, request: RenameRepositoryRequest) -> Result<(), NodeError> {
        let source = self.state.storages.existing(request.repository.as_ref())?;
        let new_path = RelativePath::parse(&request.new_relative_path)?;
        let destination = source.storage.root.join(new_path.as_str());
        let name = format!("{}/{new_path}", source.storage.name);
        place(source.storage, &source.path, &destination, &name)?;
        prune_empty_parents(&source.storage.root, &source.path);
        Ok(())
    }
}

/// Takes the fence of the replica at `target` for `token` (nothing to take without one); a
/// replica gone meanwhile is not found, as it would be without a token.
pub(super) async fn enter_replica_fence(
    target: &Located<'_>,
    token: Option<u64>,
) -> Result<Option<FenceGuard>, NodeError> {
    match enter_fence(&target.path, token).await {
        Err(NodeError::Fenced(super::fence::FenceError::Io(error)))
            if error.kind() == ErrorKind::NotFound =>
        {
            Err(NodeError::RepositoryNotFound(target.to_string()))
        }
        other => other,
    }
}

#[tonic::async_trait]
impl RepositoryService for Node {
    async fn create_repository(
        &self,
        request: Request<CreateRepositoryRequest>,
    ) -> Result<Response<CreateRepositoryResponse>, Status> {
        self.detached(move |node| async move { node.create(request.into_inner()).await })
            .await?;
        Ok(Response::new(CreateRepositoryResponse {}))
    }

    async fn remove_repository(
        &self,
        request: Request<RemoveRepositoryRequest>,
    ) -> Result<Response<RemoveRepositoryResponse>, Status> {
        let token = fence_token(request.metadata())?;
        self.detached(move |node| async move { node.remove(request.into_inner(), token).await })
            .await?;
        Ok(Response::new(RemoveRepositoryResponse {}))
    }

    async fn repository_exists(
        &self,
        request: Request<RepositoryExistsRequest>,
    ) -> Result<Response<RepositoryExistsResponse>, Status> {
        let target = self
            .state
            .storages
            .locate(request.get_ref().repository.as_ref())?;
        Ok(Response::new(RepositoryExistsResponse {
            exists: target.exists(),
        }))
    }

    async fn rename_repository(
        &self,
        request: Request<RenameRepositoryRequest>,
    ) -> Result<Response<RenameRepositoryResponse>, Status> {
        self.detached(move |node| async move { node.rename(request.into_inner()).await })
            .await?;
        Ok(Response::new(RenameRepositoryResponse {}))
    }
}

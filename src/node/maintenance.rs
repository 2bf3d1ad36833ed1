//! Storage maintenance: walking every repository, the quarantine area, disk usage. Also the
//! NodeService trait, whose replication half lives in `replication.rs`.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use walkdir::WalkDir;

use super::repository::enter_replica_fence;
use super::storage::{Storage, is_repository, place, storage_identity, sync_parent};
use super::{Node, NodeError};
use crate::model::{RESERVED_COMPONENT, RelativePath};
use crate::proto::node_service_server::NodeService;
use crate::proto::*;

/// Repositories per WalkStorage message.
const WALK_BATCH: usize = 1000;
/// Inside a quarantine entry: the repository itself and the path it came from.
const QUARANTINED_REPOSITORY: &str = "repository.git";
const QUARANTINE_ORIGIN: &str = "origin";
/// Prefixes of quarantine entries being assembled or restored; the listing skips them.
const INCOMING: &str = ".incoming-";
const RESTORING: &str = ".restoring-";

/// Finishes or undoes what a crash interrupted in a storage's quarantine area: an entry whose
/// repository was already moved in is completed, one without is dropped, and an entry claimed
/// by a restore that did not finish is put back. Run at start, before any request.
pub fn recover_quarantine(storage: &Storage) -> std::io::Result<()> {
    let area = storage.quarantine_dir();
    for dir in std::fs::read_dir(&area)? {
        let dir = dir?;
        let name = dir.file_name().to_string_lossy().into_owned();
        if let Some(id) = name.strip_prefix(INCOMING) {
            if dir.path().join(QUARANTINED_REPOSITORY).exists() {
                std::fs::rename(dir.path(), area.join(id))?;
                tracing::warn!(storage = %storage.name, quarantine_id = id, "finished an interrupted quarantine");
            } else {
                std::fs::remove_dir_all(dir.path())?;
            }
        } else if let Some(id) = name.strip_prefix(RESTORING) {
            if dir.path().join(QUARANTINED_REPOSITORY).exists() {
                std::fs::rename(dir.path(), area.join(id))?;
                tracing::warn!(storage = %storage.name, quarantine_id = id, "returned an interrupted restore to quarantine");
            } else {
                // The repository reached its place; only the empty entry was left.
                std::fs::remove_dir_all(dir.path())?;
            }
        }
    }
    Ok(())
}

fn unix_seconds(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The newest modification time among the places git touches when a repository changes.
fn last_modified(repository: &Path) -> i64 {
    [
        "",
        "HEAD",
        "config",
        "packed-refs",
        "refs",
        "refs/heads",
        "refs/tags",
        "objects",
        "objects/pack",
    ]
    .iter()
    .filter_map(|name| std::fs::metadata(repository.join(name)).ok())
    .filter_map(|metadata| metadata.modified().ok())
    .map(unix_seconds)
    .max()
    .unwrap_or(0)
}

/// Every repository below a storage root, in walk order, skipping the node's own area.
/// Holds one open directory per level, never the whole list.
fn repositories(root: &Path) -> impl Iterator<Item = std::io::Result<PathBuf>> {
    let mut walker = WalkDir::new(root)
        .min_depth(1)
        .follow_links(false)
        .into_iter();
    std::iter::from_fn(move || {
        loop {
            let entry = match walker.next()? {
                Ok(entry) => entry,
                // Repositories removed or renamed while the walk runs are simply gone.
                // A missing storage root is an error, not an empty storage.
                Err(error)
                    if error.depth() > 0
                        && error.io_error().map(std::io::Error::kind)
                            == Some(std::io::ErrorKind::NotFound) =>
                {
                    continue;
                }
                Err(error) => return Some(Err(error.into())),
            };
            if !entry.file_type().is_dir() {
                continue;
            }
            if entry.depth() == 1 && entry.file_name() == RESERVED_COMPONENT {
                walker.skip_current_dir();
                continue;
            }
            if is_repository(entry.path()) {
                walker.skip_current_dir();
                return Some(Ok(entry.into_path()));
            }
        }
    })
}

fn relative(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .to_string_lossy()
        .into_owned()
}

impl Node {
    fn walk(&self, storage: &Storage) -> ReceiverStream<Result<WalkStorageResponse, Status>> {
        let (sender, receiver) = mpsc::channel(2);
        let root = storage.root.clone();
        tokio::task::spawn_blocking(move || {
            let mut batch = Vec::with_capacity(WALK_BATCH);
            for path in repositories(&root) {
                let path = match path {
                    Ok(path) => path,
                    Err(error) => {
                        let _ = sender.blocking_send(Err(NodeError::Io(error).into()));
                        return;
                    }
                };
                batch.push(WalkedRepository {
                    relative_path: relative(&root, &path),
                    modified_at: last_modified(&path),
                });
                if batch.len() == WALK_BATCH {
                    let repositories =
                        std::mem::replace(&mut batch, Vec::with_capacity(WALK_BATCH));
                    if sender
                        .blocking_send(Ok(WalkStorageResponse { repositories }))
                        .is_err()
                    {
                        return;
                    }
                }
            }
            if !batch.is_empty() {
                let _ = sender.blocking_send(Ok(WalkStorageResponse {
                    repositories: batch,
                }));
            }
        });
        ReceiverStream::new(receiver)
    }

    async fn quarantine(
        &self,
        request: QuarantineRepositoryRequest,
        token: Option<u64>,
    ) -> Result<String, NodeError> {
        let repository = self.state.storages.existing(request.repository.as_ref())?;
        // Held across the move: a quarantine decided before a newer lease's change is refused.
        let _fence = enter_replica_fence(&repository, token).await?;
        let id = format!(
            "{}-{:016x}",
            unix_seconds(SystemTime::now()),
            rand::random::<u64>()
        );
        // The entry is assembled under a name the listing skips and renamed into view whole.
        // A live repository never passes through the temporary area, which a start empties;
        // what a crash leaves here is finished or undone by `recover_quarantine`.
        let area = repository.storage.quarantine_dir();
        let staging = area.join(format!("{INCOMING}{id}"));
        tokio::fs::create_dir_all(&staging).await?;
        let origin = staging.join(QUARANTINE_ORIGIN);
        tokio::fs::write(&origin, repository.relative_path.as_str()).await?;
        tokio::fs::File::open(&origin).await?.sync_all().await?;
        let quarantined = staging.join(QUARANTINED_REPOSITORY);
        if let Err(error) = tokio::fs::rename(&repository.path, &quarantined).await {
            let _ = tokio::fs::remove_dir_all(&staging).await;
            return Err(match error.kind() {
                std::io::ErrorKind::NotFound => {
                    NodeError::RepositoryNotFound(repository.to_string())
                }
                _ => NodeError::Io(error),
            });
        }
        let entry = area.join(&id);
        if let Err(error) = tokio::fs::rename(&staging, &entry).await {
            // Put the repository back where it was; if even that fails, the next start finishes
            // the quarantine, so the repository stays restorable either way.
            if tokio::fs::rename(&quarantined, &repository.path)
                .await
                .is_ok()
            {
                let _ = tokio::fs::remove_dir_all(&staging).await;
            }
            return Err(error.into());
        }
        sync_parent(&entry)?;
        super::storage::prune_empty_parents(&repository.storage.root, &repository.path);
        tracing::info!(repository = %repository, quarantine_id = %id, "repository quarantined");
        Ok(id)
    }

    fn quarantine_entry(&self, storage: &Storage, id: &str) -> Result<PathBuf, NodeError> {
        let valid = !id.is_empty()
            && id.len() <= 64
            && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !valid {
            return Err(NodeError::BadRequest(format!(
                "{id:?} is not a quarantine id"
            )));
        }
        let entry = storage.quarantine_dir().join(id);
        if !entry.is_dir() {
            return Err(NodeError::NotFound(format!(
                "no quarantine entry {id} in storage {}",
                storage.name
            )));
        }
        Ok(entry)
    }

    async fn restore(&self, request: RestoreRepositoryRequest) -> Result<String, NodeError> {
        let storage = self.state.storages.storage(request.storage.as_ref())?;
        let entry = self.quarantine_entry(storage, &request.quarantine_id)?;
        // Claim the entry first, inside the quarantine area: a concurrent restore or purge of
        // the same entry then finds nothing, and a crash leaves it for `recover_quarantine`.
        let claimed = storage
            .quarantine_dir()
            .join(format!("{RESTORING}{}", request.quarantine_id));
        tokio::fs::rename(&entry, &claimed)
            .await
            .map_err(|error| match error.kind() {
                std::io::ErrorKind::NotFound => NodeError::NotFound(format!(
                    "no quarantine entry {} in storage {}",
                    request.quarantine_id, storage.name
                )),
                _ => NodeError::Io(error),
            })?;
        let restored = async {
            let origin = tokio::fs::read_to_string(claimed.join(QUARANTINE_ORIGIN)).await?;
            let relative_path = RelativePath::parse(origin.trim())?;
            let destination = storage.root.join(relative_path.as_str());
            let name = format!("{}/{relative_path}", storage.name);
            let repository = claimed.join(QUARANTINED_REPOSITORY);
            // Modified now: untracked, it gets a full grace period before a walk takes it.
            std::fs::File::open(&repository)?.set_modified(SystemTime::now())?;
            place(storage, &repository, &destination, &name)?;
            Ok::<_, NodeError>(relative_path)
        }
        .await;
        let relative_path = match restored {
            Ok(relative_path) => relative_path,
            Err(error) => {
                // Not restored: the entry goes back where it was, still restorable.
                if let Err(undo) = tokio::fs::rename(&claimed, &entry).await {
                    tracing::error!(%undo, entry = %claimed.display(), "cannot return a quarantine entry; the next start will");
                }
                return Err(error);
            }
        };
        tokio::fs::remove_dir_all(&claimed).await?;
        tracing::info!(storage = %storage.name, %relative_path, "repository restored from quarantine");
        Ok(relative_path.to_string())
    }

    /// Entries as (id, relative path, quarantined at), read from the quarantine directory.
    fn quarantine_entries(storage: &Storage) -> std::io::Result<Vec<QuarantinedRepository>> {
        let mut entries = Vec::new();
        for dir in std::fs::read_dir(storage.quarantine_dir())? {
            let dir = dir?;
            let id = dir.file_name().to_string_lossy().into_owned();
            if id.starts_with('.') {
                continue;
            }
            let quarantined_at = id
                .split('-')
                .next()
                .and_then(|t| t.parse().ok())
                .unwrap_or(0);
            let relative_path =
                std::fs::read_to_string(dir.path().join(QUARANTINE_ORIGIN)).unwrap_or_default();
            entries.push(QuarantinedRepository {
                quarantine_id: id,
                relative_path: relative_path.trim().to_owned(),
                quarantined_at,
            });
        }
        entries.sort_by(|a, b| a.quarantine_id.cmp(&b.quarantine_id));
        Ok(entries)
    }

    async fn purge(&self, request: PurgeQuarantineRequest) -> Result<u64, NodeError> {
        let storage = self.state.storages.storage(request.storage.as_ref())?;
        let now = unix_seconds(SystemTime::now());
        let cutoff = if request.quarantined_before != 0 {
            request.quarantined_before
        } else {
            now.saturating_sub(i64::try_from(request.older_than_seconds).unwrap_or(i64::MAX))
        };
        let mut purged = 0;
        for entry in Self::quarantine_entries(storage)? {
            if entry.quarantined_at > cutoff {
                continue;
            }
            // Moved out of the quarantine area first, so a half-deleted entry is never listed.
            let doomed = storage.tmp_path("purge");
            let source = storage.quarantine_dir().join(&entry.quarantine_id);
            match tokio::fs::rename(&source, &doomed).await {
                // A restore claimed it meanwhile.
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                result => result?,
            }
            tokio::fs::remove_dir_all(&doomed).await?;
            purged += 1;
        }
        tracing::info!(storage = %storage.name, purged, "quarantine purged");
        Ok(purged)
    }

    async fn disk_usage(&self, request: DiskUsageRequest) -> Result<DiskUsageResponse, NodeError> {
        let storage = self.state.storages.storage(request.storage.as_ref())?;
        let root = storage.root.clone();
        let filesystem = nix::sys::statvfs::statvfs(&root).map_err(std::io::Error::from)?;
        let block = filesystem.fragment_size() as u64;
        // One walk both adds up the blocks and counts the repositories, the way WalkStorage
        // finds them: not inside another repository, not in the node's own area.
        let (used_bytes, repository_count) = tokio::task::spawn_blocking(move || {
            let reserved = root.join(RESERVED_COMPONENT);
            let (mut used, mut count) = (0, 0);
            let mut repository: Option<PathBuf> = None;
            for entry in WalkDir::new(&root)
                .follow_links(false)
                .into_iter()
                .filter_map(Result::ok)
            {
                used += entry
                    .metadata()
                    .map(|metadata| metadata.blocks() * 512)
                    .unwrap_or(0);
                let path = entry.path();
                let counted = entry.file_type().is_dir()
                    && !path.starts_with(&reserved)
                    && !repository
                        .as_deref()
                        .is_some_and(|inside| path.starts_with(inside));
                if counted && is_repository(path) {
                    count += 1;
                    repository = Some(path.to_path_buf());
                }
            }
            (used, count)
        })
        .await
        .map_err(std::io::Error::other)?;
        Ok(DiskUsageResponse {
            total_bytes: filesystem.blocks() as u64 * block,
            available_bytes: filesystem.blocks_available() as u64 * block,
            used_bytes,
            repository_count,
        })
    }
}

#[tonic::async_trait]
impl NodeService for Node {
    type WalkStorageStream = ReceiverStream<Result<WalkStorageResponse, Status>>;
    type ListQuarantineStream = ReceiverStream<Result<ListQuarantineResponse, Status>>;
    type PrepareRefsStream = ReceiverStream<Result<PrepareRefsResponse, Status>>;

    async fn replicate_repository(
        &self,
        request: Request<ReplicateRepositoryRequest>,
    ) -> Result<Response<ReplicateRepositoryResponse>, Status> {
        let token = super::refs::fence_token(request.metadata())?;
        let response = self
            .detached(move |node| async move { node.replicate(request.into_inner(), token).await })
            .await?;
        Ok(Response::new(response))
    }

    async fn walk_storage(
        &self,
        request: Request<WalkStorageRequest>,
    ) -> Result<Response<Self::WalkStorageStream>, Status> {
        let storage = self
            .state
            .storages
            .storage(request.get_ref().storage.as_ref())?;
        Ok(Response::new(self.walk(storage)))
    }

    async fn quarantine_repository(
        &self,
        request: Request<QuarantineRepositoryRequest>,
    ) -> Result<Response<QuarantineRepositoryResponse>, Status> {
        let token = super::refs::fence_token(request.metadata())?;
        let quarantine_id = self
            .detached(move |node| async move { node.quarantine(request.into_inner(), token).await })
            .await?;
        Ok(Response::new(QuarantineRepositoryResponse {
            quarantine_id,
        }))
    }

    async fn raise_fence(
        &self,
        request: Request<RaiseFenceRequest>,
    ) -> Result<Response<RaiseFenceResponse>, Status> {
        let token = super::refs::fence_token(request.metadata())?.ok_or_else(|| {
            Status::invalid_argument(format!(
                "RaiseFence needs a token in the {} header",
                super::fence::FENCE_HEADER
            ))
        })?;
        self.detached(move |node| async move {
            node.raise_replica_fence(request.into_inner(), token).await
        })
        .await?;
        Ok(Response::new(RaiseFenceResponse {}))
    }

    async fn prepare_refs(
        &self,
        request: Request<Streaming<PrepareRefsRequest>>,
    ) -> Result<Response<Self::PrepareRefsStream>, Status> {
        if super::refs::fence_token(request.metadata())?.is_some() {
            return Err(Status::invalid_argument(
                "a prepared change takes its token with its decision, not in its header",
            ));
        }
        let mut stream = request.into_inner();
        let first = super::smarthttp::first_message(&mut stream).await?;
        Ok(Response::new(self.prepare_refs(first, stream).await?))
    }

    async fn restore_repository(
        &self,
        request: Request<RestoreRepositoryRequest>,
    ) -> Result<Response<RestoreRepositoryResponse>, Status> {
        let relative_path = self
            .detached(move |node| async move { node.restore(request.into_inner()).await })
            .await?;
        Ok(Response::new(RestoreRepositoryResponse { relative_path }))
    }

    async fn list_quarantine(
        &self,
        request: Request<ListQuarantineRequest>,
    ) -> Result<Response<Self::ListQuarantineStream>, Status> {
        let storage = self
            .state
            .storages
            .storage(request.get_ref().storage.as_ref())?;
        let entries = Self::quarantine_entries(storage).map_err(NodeError::from)?;
        let (sender, receiver) = mpsc::channel(entries.len().div_ceil(WALK_BATCH).max(1));
        for batch in entries.chunks(WALK_BATCH) {
            let _ = sender.try_send(Ok(ListQuarantineResponse {
                entries: batch.to_vec(),
            }));
        }
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn purge_quarantine(
        &self,
        request: Request<PurgeQuarantineRequest>,
    ) -> Result<Response<PurgeQuarantineResponse>, Status> {
        let purged = self
            .detached(move |node| async move { node.purge(request.into_inner()).await })
            .await?;
        Ok(Response::new(PurgeQuarantineResponse { purged }))
    }

    async fn storage_identity(
        &self,
        request: Request<StorageIdentityRequest>,
    ) -> Result<Response<StorageIdentityResponse>, Status> {
        let internal = self
            .state
            .storages
            .storage(request.get_ref().storage.as_ref())?
            .internal_dir();
        let storage_id = tokio::task::spawn_blocking(move || storage_identity(&internal))
            .await
            .map_err(|error| Status::internal(error.to_string()))??;
        Ok(Response::new(StorageIdentityResponse { storage_id }))
    }

    async fn disk_usage(
        &self,
        request: Request<DiskUsageRequest>,
    ) -> Result<Response<DiskUsageResponse>, Status> {
        Ok(Response::new(
            self.detached(move |node| async move {
                Node::disk_usage(&node, request.into_inner()).await
            })
            .await?,
        ))
    }
}

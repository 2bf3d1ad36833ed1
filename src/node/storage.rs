//! Where a storage keeps its repositories, and the node's own areas inside it:
//! `.gitfleet/tmp` (repositories being built or torn down), `.gitfleet/quarantine` and
//! `.gitfleet/hooks` (the node's reference-transaction hook).

use std::collections::HashMap;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};

use super::NodeError;
use crate::config::StorageConfig;
use crate::model::{RESERVED_COMPONENT, RelativePath, StorageName};
use crate::proto::{RepositoryHeader, StorageHeader};

#[derive(Debug)]
pub struct Storage {
    pub name: StorageName,
    pub root: PathBuf,
    /// Taken while a repository is moved into its final place; see [`place`].
    placing: std::sync::Mutex<()>,
}

/// A repository path on this node, validated and resolved.
#[derive(Debug)]
pub struct Located<'a> {
    pub storage: &'a Storage,
    pub relative_path: RelativePath,
    pub path: PathBuf,
}

impl Located<'_> {
    pub fn exists(&self) -> bool {
        is_repository(&self.path)
    }

    /// Checks that a new repository may be placed here: every directory between the storage
    /// root and the path is a plain directory, not a repository (a repository nested in
    /// another would corrupt its refs and vanish with it), and nothing is at the path yet.
    pub fn check_free(&self) -> Result<(), NodeError> {
        check_free(&self.storage.root, &self.path, &self.to_string())
    }

    /// Fails with `NotFound` unless the repository exists.
    pub fn require(self) -> Result<Self, NodeError> {
        if self.exists() {
            Ok(self)
        } else {
            Err(NodeError::RepositoryNotFound(self.to_string()))
        }
    }
}

impl std::fmt::Display for Located<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.storage.name, self.relative_path)
    }
}

/// Whether `path` holds a bare repository.
pub fn is_repository(path: &Path) -> bool {
    path.join("HEAD").is_file() && path.join("objects").is_dir() && path.join("refs").is_dir()
}

impl Storage {
    pub fn internal_dir(&self) -> PathBuf {
        self.root.join(RESERVED_COMPONENT)
    }

    pub fn tmp_dir(&self) -> PathBuf {
        self.internal_dir().join("tmp")
    }

    pub fn quarantine_dir(&self) -> PathBuf {
        self.internal_dir().join("quarantine")
    }

    /// The node's git hooks (`core.hooksPath` of a push that carries a fencing token).
    pub fn hooks_dir(&self) -> PathBuf {
        self.internal_dir().join("hooks")
    }

    /// The git hooks of a prepared push (see [`super::prepare`]).
    pub fn prepared_hooks_dir(&self) -> PathBuf {
        self.internal_dir().join("prepared-hooks")
    }

    /// A fresh, unused path in the temporary area.
    pub fn tmp_path(&self, purpose: &str) -> PathBuf {
        self.tmp_dir()
            .join(format!("{purpose}-{:016x}", rand::random::<u64>()))
    }

    /// Creates the node's areas and empties the temporary one, which holds only what a crash
    /// interrupted.
    pub fn prepare(&self) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.root)?;
        match std::fs::remove_dir_all(self.tmp_dir()) {
            Err(error) if error.kind() != ErrorKind::NotFound => return Err(error),
            _ => {}
        }
        std::fs::create_dir_all(self.tmp_dir())?;
        std::fs::create_dir_all(self.quarantine_dir())?;
        let exe = std::env::current_exe()?;
        super::hook::install_hook(&self.hooks_dir(), &exe, super::hook::FENCED_HOOKS)?;
        super::hook::install_hook(
            &self.prepared_hooks_dir(),
            &exe,
            super::hook::PREPARED_HOOKS,
        )?;
        super::maintenance::recover_quarantine(self)
    }
}

/// See [`Located::check_free`].
pub fn check_free(root: &Path, path: &Path, name: &str) -> Result<(), NodeError> {
    let mut ancestor = path.parent();
    while let Some(dir) = ancestor.filter(|dir| *dir != root && dir.starts_with(root)) {
        match std::fs::symlink_metadata(dir) {
            Ok(metadata) if !metadata.is_dir() => {
                return Err(NodeError::BadRequest(format!(
                    "cannot place {name}: {} is not a directory",
                    dir.display()
                )));
            }
            Ok(_) if is_repository(dir) => {
                let inside = dir.strip_prefix(root).unwrap_or(dir).display();
                return Err(NodeError::BadRequest(format!(
                    "cannot place {name} inside repository {inside}"
                )));
            }
            _ => {}
        }
        ancestor = dir.parent();
    }
    match std::fs::symlink_metadata(path) {
        Ok(_) if is_repository(path) => Err(NodeError::RepositoryExists(name.to_owned())),
        Ok(_) => Err(NodeError::BadRequest(format!(
            "cannot place {name}: the path is taken by something that is not a repository (for example a directory of repositories)"
        ))),
        Err(_) => Ok(()),
    }
}

/// Moves `from` to `to` in one step, failing with `AlreadyExists` rather than replacing
/// anything at `to`. Creates the parents of `to`.
pub fn move_into_place(from: &Path, to: &Path) -> std::io::Result<()> {
    for attempt in 0..3 {
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent)?;
        }
        match renameat2(AT_FDCWD, from, AT_FDCWD, to, RenameFlags::RENAME_NOREPLACE) {
            Ok(()) => return Ok(()),
            // A concurrent removal may have pruned the empty parent we just made.
            Err(nix::errno::Errno::ENOENT) if attempt < 2 && from.exists() => continue,
            Err(errno) => return Err(std::io::Error::from(errno)),
        }
    }
    unreachable!("the loop returns on its last attempt")
}

/// Moves a repository built or kept elsewhere to `to`, the path of repository `name`: checks
/// that the place is free, renames without replacing anything, and makes the rename durable.
/// Placements in one storage take turns, so two of them cannot both find a place free and
/// then nest one repository inside the other.
pub fn place(storage: &Storage, from: &Path, to: &Path, name: &str) -> Result<(), NodeError> {
    let _turn = storage
        .placing
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    check_free(&storage.root, to, name)?;
    move_into_place(from, to).map_err(|error| match error.kind() {
        ErrorKind::AlreadyExists | ErrorKind::DirectoryNotEmpty => {
            NodeError::RepositoryExists(name.to_owned())
        }
        ErrorKind::NotFound if !from.exists() => NodeError::NotFound(format!(
            "cannot place {name}: what was to be moved there is gone"
        )),
        _ => NodeError::Io(error),
    })?;
    sync_parent(to)
}

/// Flushes the directory entry of `path` to disk, so a rename survives a power loss.
pub fn sync_parent(path: &Path) -> Result<(), NodeError> {
    if let Some(parent) = path.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

/// The identity of the storage whose internal area is `internal`, made (and made durable) when
/// its file is missing: a wiped directory gets a new one.
pub fn storage_identity(internal: &Path) -> Result<String, NodeError> {
    let file = internal.join("storage-id");
    match std::fs::read_to_string(&file) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_owned()),
        Ok(_) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(error.into()),
    }
    std::fs::create_dir_all(internal)?;
    let id = format!("{:032x}", rand::random::<u128>());
    let staged = internal.join(format!("storage-id.{:08x}", rand::random::<u32>()));
    {
        let mut out = std::fs::File::create(&staged)?;
        std::io::Write::write_all(&mut out, id.as_bytes())?;
        out.sync_all()?;
    }
    // A link, not a rename: when two calls race, the first id stays and both return it.
    let linked = std::fs::hard_link(&staged, &file);
    let _ = std::fs::remove_file(&staged);
    match linked {
        Ok(()) => sync_parent(&file)?,
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(error) => return Err(error.into()),
    }
    Ok(std::fs::read_to_string(&file)?.trim().to_owned())
}

/// Removes the empty directories between `path` and `root`, best effort.
pub fn prune_empty_parents(root: &Path, path: &Path) {
    let mut current = path.parent();
    while let Some(dir) = current {
        if dir == root || !dir.starts_with(root) || std::fs::remove_dir(dir).is_err() {
            break;
        }
        current = dir.parent();
    }
}

/// The storages one node serves.
#[derive(Debug)]
pub struct Storages {
    by_name: HashMap<String, Storage>,
}

impl Storages {
    pub fn new(configs: &[StorageConfig]) -> Result<Self, crate::model::InvalidInput> {
        let mut by_name = HashMap::new();
        for config in configs {
            let name = StorageName::parse(&config.name)?;
            by_name.insert(
                config.name.clone(),
                Storage {
                    name,
                    root: config.path.clone(),
                    placing: std::sync::Mutex::new(()),
                },
            );
        }
        Ok(Self { by_name })
    }

    pub fn iter(&self) -> impl Iterator<Item = &Storage> {
        self.by_name.values()
    }

    pub fn get(&self, name: &str) -> Result<&Storage, NodeError> {
        StorageName::parse(name)?;
        self.by_name
            .get(name)
            .ok_or_else(|| NodeError::UnknownStorage(name.to_owned()))
    }

    pub fn storage(&self, header: Option<&StorageHeader>) -> Result<&Storage, NodeError> {
        let header = header.ok_or_else(|| {
            NodeError::BadRequest("the storage header (field 1) is missing".into())
        })?;
        let storage = self.get(&header.storage)?;
        tracing::Span::current().record("storage", storage.name.as_str());
        Ok(storage)
    }

    /// Like [`Storages::locate`], for a repository that must exist (`NotFound` otherwise).
    pub fn existing(&self, header: Option<&RepositoryHeader>) -> Result<Located<'_>, NodeError> {
        self.locate(header)?.require()
    }

    /// Validates a repository header and resolves it to a path. The repository may not exist.
    pub fn locate(&self, header: Option<&RepositoryHeader>) -> Result<Located<'_>, NodeError> {
        let header = header.ok_or_else(|| {
            NodeError::BadRequest("the repository header (field 1) is missing".into())
        })?;
        let storage = self.get(&header.storage)?;
        let relative_path = RelativePath::parse(&header.relative_path)?;
        let span = tracing::Span::current();
        span.record("storage", storage.name.as_str());
        span.record("repository", relative_path.as_str());
        let path = storage.root.join(relative_path.as_str());
        Ok(Located {
            storage,
            relative_path,
            path,
        })
    }
}

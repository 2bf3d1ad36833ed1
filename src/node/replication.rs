//! Replication: the target node fetches from the source node through the source's own
//! SshUploadPack RPC, with `gitfleet bridge` as git's ssh command. Mirror semantics: every
//! reference is copied, references the source lacks are deleted, and HEAD follows the source.
//!
//! It runs in two phases (see `ReplicationPhase` in the proto). The objects phase copies the
//! objects of the source's references as they are now, and changes no reference: the replica
//! is behind, and a late objects phase harms nothing. The refs phase, sent under the
//! repository's lease, reads the source's references and HEAD again, copies the few objects
//! still missing, and sets the target's references to them in one `update-ref` transaction,
//! every update a compare-and-swap, under the replica's fence.
//!
//! Objects copied without a reference to them are not negotiation tips for git: the objects
//! phase writes their ids to [`TIPS_FILE`], and the refs phase hands them to `git fetch` as
//! `--negotiation-tip`s, so that it asks only for what is new since.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use tonic::Code;

use super::{Node, NodeError};
use crate::auth::{Credentials, Signer};
use crate::client::{ConnectError, connect};
use crate::git::GitError;
use crate::model::{ObjectId, RefName, RelativePath, StorageName};
use crate::proto::ref_service_client::RefServiceClient;
use crate::proto::*;

/// Environment read by `gitfleet bridge ssh` when replication runs it.
pub const ADDRESS_ENV: &str = "GITFLEET_ADDRESS";
pub const SIGNED_TOKEN_ENV: &str = "GITFLEET_SIGNED_TOKEN";

struct Source {
    address: String,
    storage: StorageName,
    relative_path: RelativePath,
    token: String,
}

impl TryFrom<Option<SourceRepository>> for Source {
    type Error = NodeError;

    fn try_from(source: Option<SourceRepository>) -> Result<Self, NodeError> {
        let source = source
            .ok_or_else(|| NodeError::BadRequest("the source repository is missing".into()))?;
        if source.token.is_empty() {
            return Err(NodeError::BadRequest("the source token is missing".into()));
        }
        crate::client::endpoint(&source.address)
            .map_err(|error| NodeError::BadRequest(format!("source: {error}")))?;
        Ok(Self {
            storage: StorageName::parse(&source.storage)?,
            relative_path: RelativePath::parse(&source.relative_path)?,
            address: source.address,
            token: source.token,
        })
    }
}

impl Source {
    fn describe(&self) -> String {
        format!(
            "{}/{} on {}",
            self.storage, self.relative_path, self.address
        )
    }

    fn header(&self) -> RepositoryHeader {
        RepositoryHeader {
            storage: self.storage.to_string(),
            relative_path: self.relative_path.to_string(),
        }
    }

    /// Turns a failed call to the source into the error the caller can act on: unavailable
    /// is worth a retry, anything else is the source's fault.
    fn failed(&self, status: tonic::Status) -> NodeError {
        let message = format!("{}: {}", self.describe(), status.message());
        match status.code() {
            Code::Unavailable | Code::DeadlineExceeded => NodeError::SourceUnavailable(message),
            _ => NodeError::SourceFailed(message),
        }
    }

    /// The source's HEAD and every reference, as they are now. Connecting also proves the
    /// source is reachable and lets us in.
    async fn snapshot(&self) -> Result<Snapshot, NodeError> {
        let channel = connect(
            &self.address,
            Signer::new(Credentials::Signed(self.token.as_str().into())),
        )
        .await
        .map_err(|error| match error {
            ConnectError::BadAddress(_) => NodeError::BadRequest(error.to_string()),
            ConnectError::Unreachable { .. } => NodeError::SourceUnavailable(error.to_string()),
        })?;
        let mut client = RefServiceClient::new(channel);
        let head = client
            .find_default_branch(FindDefaultBranchRequest {
                repository: Some(self.header()),
            })
            .await
            .map_err(|status| self.failed(status))?
            .into_inner()
            .name;
        let head = RefName::parse(&head)
            .map_err(|error| NodeError::SourceFailed(format!("HEAD is not a branch: {error}")))?;
        let mut stream = client
            .list_refs(ListRefsRequest {
                repository: Some(self.header()),
                prefixes: Vec::new(),
            })
            .await
            .map_err(|status| self.failed(status))?
            .into_inner();
        let mut refs = BTreeMap::new();
        while let Some(batch) = stream
            .message()
            .await
            .map_err(|status| self.failed(status))?
        {
            for reference in batch.refs {
                let name = RefName::parse(&reference.name).map_err(|error| {
                    NodeError::SourceFailed(format!("the source lists a bad reference: {error}"))
                })?;
                let target = ObjectId::parse(&reference.target).map_err(|error| {
                    NodeError::SourceFailed(format!("the source lists a bad target: {error}"))
                })?;
                refs.insert(name, target);
            }
        }
        Ok(Snapshot { head, refs })
    }
}

/// The source's references and HEAD at one moment.
struct Snapshot {
    head: RefName,
    refs: BTreeMap<RefName, ObjectId>,
}

impl Snapshot {
    /// The distinct objects the references point at, branches first.
    fn tips(&self) -> Vec<&ObjectId> {
        let mut seen = HashSet::new();
        let (branches, others): (Vec<_>, Vec<_>) = self
            .refs
            .iter()
            .partition(|(name, _)| name.as_str().starts_with("refs/heads/"));
        branches
            .into_iter()
            .chain(others)
            .filter_map(|(_, target)| seen.insert(target).then_some(target))
            .collect()
    }

    /// The `update-ref --stdin` commands that turn references `local` into the snapshot's,
    /// each one checked against the value it replaces.
    fn script(&self, local: &BTreeMap<String, String>) -> (String, u32) {
        let mut script = String::new();
        let mut count = 0;
        for (name, target) in &self.refs {
            match local.get(name.as_str()) {
                Some(old) if old == target.as_str() => continue,
                Some(old) => script.push_str(&format!("update {name} {target} {old}\n")),
                None => script.push_str(&format!("create {name} {target}\n")),
            }
            count += 1;
        }
        for (name, old) in local {
            if RefName::parse(name).is_ok_and(|name| !self.refs.contains_key(&name)) {
                script.push_str(&format!("delete {name} {old}\n"));
                count += 1;
            }
        }
        (script, count)
    }
}

/// Where the objects phase leaves the ids it fetched, for the refs phase's negotiation.
pub const TIPS_FILE: &str = "gitfleet-replication-tips";

/// The most negotiation tips handed to one fetch; the rest of the replica's objects are found
/// from its own references, or sent again.
const MAX_TIPS: usize = 1024;

/// Quotes `text` for the shell that git runs GIT_SSH_COMMAND with.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

impl Node {
    pub(super) async fn replicate(
        &self,
        request: ReplicateRepositoryRequest,
        token: Option<u64>,
    ) -> Result<ReplicateRepositoryResponse, NodeError> {
        let phase = request.phase();
        let target = self.state.storages.locate(request.repository.as_ref())?;
        let source = Source::try_from(request.source)?;
        let snapshot = source.snapshot().await?;
        let created = !target.exists();
        if created {
            // A new replica is built aside and moved into place whole, like a create: HEAD
            // and the objects, no reference yet.
            self.build_aside(&target, "replicate", async |staging: &Path| {
                self.build_empty(staging, &snapshot.head).await?;
                self.fetch_objects(staging, &source, &snapshot).await
            })
            .await?;
        } else {
            self.fetch_objects(&target.path, &source, &snapshot).await?;
        }
        let refs_changed = match phase {
            ReplicationPhase::Objects => 0,
            ReplicationPhase::Refs => self.set_refs(&target.path, &snapshot, token).await?,
        };
        tracing::info!(
            target = %target,
            source = %source.describe(),
            ?phase,
            created,
            refs_changed,
            "replicated"
        );
        Ok(ReplicateRepositoryResponse {
            created,
            refs_changed,
        })
    }

    /// Copies the objects of the snapshot's references that the replica lacks, and changes
    /// no reference.
    async fn fetch_objects(
        &self,
        path: &Path,
        source: &Source,
        snapshot: &Snapshot,
    ) -> Result<(), NodeError> {
        let tips = snapshot.tips();
        let wanted: String = tips.iter().map(|tip| format!("{tip}\n")).collect();
        let listed = self
            .state
            .git
            .run(
                Some(path),
                &["cat-file", "--batch-check"],
                Some(wanted.as_bytes()),
            )
            .await?;
        let missing: String = String::from_utf8_lossy(&listed)
            .lines()
            .filter_map(|line| line.strip_suffix(" missing"))
            .map(|id| format!("{id}\n"))
            .collect();
        if !missing.is_empty() {
            let known = read_tips(path).await;
            let bridge = std::env::current_exe()?;
            let bridge = shell_quote(&bridge.to_string_lossy());
            let url = format!("ssh://gitfleet/{}/{}", source.storage, source.relative_path);
            let mut command = self.state.git.command(Some(path));
            command
                .env("GIT_SSH_COMMAND", format!("{bridge} bridge ssh"))
                .env("GIT_SSH_VARIANT", "ssh")
                .env(ADDRESS_ENV, &source.address)
                .env(SIGNED_TOKEN_ENV, &source.token)
                .args(["-c", "protocol.version=2", "fetch", "--quiet", "--stdin"])
                .args([
                    "--no-write-fetch-head",
                    "--no-auto-gc",
                    "--no-auto-maintenance",
                ]);
            if !known.is_empty() {
                // Naming tips replaces the default (every reference): name those too.
                command.arg("--negotiation-tip=refs/*");
                for tip in &known {
                    command.arg(format!("--negotiation-tip={tip}"));
                }
            }
            command.args(["--", &url]);
            match self
                .state
                .git
                .output(command, Some(missing.as_bytes()), usize::MAX)
                .await
            {
                Ok(_) => {}
                Err(GitError::Failed { stderr, .. }) => {
                    return Err(NodeError::SourceFailed(format!(
                        "fetching from {} failed: {stderr}",
                        source.describe()
                    )));
                }
                Err(error) => return Err(error.into()),
            }
        }
        write_tips(path, &tips).await?;
        Ok(())
    }

    /// Sets the replica's references and HEAD to the snapshot's, under its fence: one
    /// transaction of compare-and-swaps against the references as they are once the fence is
    /// held. Returns how many changed.
    async fn set_refs(
        &self,
        path: &Path,
        snapshot: &Snapshot,
        token: Option<u64>,
    ) -> Result<u32, NodeError> {
        let _fence = super::refs::enter_fence(path, token).await?;
        let local: BTreeMap<String, String> = self
            .read_refs(path)
            .await?
            .into_iter()
            .map(|reference| (reference.name, reference.target))
            .collect();
        let (script, mut changed) = snapshot.script(&local);
        if !script.is_empty() {
            let script = format!("start\n{script}prepare\ncommit\n");
            self.change_refs(
                path,
                &["update-ref", "--no-deref", "--stdin"],
                Some(script.as_bytes()),
            )
            .await
            .map_err(super::refs::classify_update_failure)?;
        }
        if self.head(path).await? != snapshot.head.as_str() {
            self.change_refs(
                path,
                &["symbolic-ref", "HEAD", snapshot.head.as_str()],
                None,
            )
            .await?;
            changed += 1;
        }
        Ok(changed)
    }
}

/// The ids the last objects phase fetched; none when it left no file.
async fn read_tips(path: &Path) -> Vec<String> {
    let text = tokio::fs::read_to_string(path.join(TIPS_FILE))
        .await
        .unwrap_or_default();
    text.lines()
        .filter(|line| ObjectId::parse(line).is_ok())
        .take(MAX_TIPS)
        .map(str::to_owned)
        .collect()
}

/// Replaces the tips file whole: written aside, then renamed over.
async fn write_tips(path: &Path, tips: &[&ObjectId]) -> Result<(), NodeError> {
    let text: String = tips
        .iter()
        .take(MAX_TIPS)
        .map(|tip| format!("{tip}\n"))
        .collect();
    let aside = path.join(format!("{TIPS_FILE}.new"));
    tokio::fs::write(&aside, text).await?;
    tokio::fs::rename(&aside, path.join(TIPS_FILE)).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::shell_quote;

    #[test]
    fn quotes_for_the_shell() {
        assert_eq!(shell_quote("/usr/bin/gitfleet"), "'/usr/bin/gitfleet'");
        assert_eq!(shell_quote("/a b/it's"), r"'/a b/it'\''s'");
    }
}

//! Reading and changing references with `git for-each-ref`, `symbolic-ref` and
//! `update-ref --stdin` (one transaction: all updates or none).

use std::collections::HashSet;
use std::path::Path;

use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::fence::{self, FENCE_HEADER, FenceGuard};
use super::{Node, NodeError, locks};
use crate::git::GitError;
use crate::git::checksum::Checksum;
use crate::git::pipe::{self, Output};
use crate::model::{ObjectId, RefName};
use crate::proto::ref_service_server::RefService;
use crate::proto::*;

/// The most updates one UpdateRefs request may carry.
pub const MAX_REF_UPDATES: usize = 10_000;

impl Node {
    /// Every reference as (name, target, peeled target).
    pub(super) async fn read_refs(&self, path: &Path) -> Result<Vec<Ref>, NodeError> {
        let output = self
            .state
            .git
            .run(Some(path), &["for-each-ref", REF_FORMAT], None)
            .await?;
        Ok(String::from_utf8_lossy(&output)
            .lines()
            .filter_map(parse_ref)
            .collect())
    }

    /// HEAD's symbolic target, such as `refs/heads/main`. Read straight from the HEAD file
    /// when it is a plain symbolic reference (a write reads it on every replica, before and
    /// after, and a process start costs more than the rest of the checksum). Anything else, a
    /// detached HEAD or the reftable backend's placeholder, is left to `git symbolic-ref`,
    /// which answers or fails as it always did.
    pub(super) async fn head(&self, path: &Path) -> Result<String, NodeError> {
        if let Ok(contents) = tokio::fs::read_to_string(path.join("HEAD")).await
            && let Some(target) = contents.strip_prefix("ref: ")
            && let Ok(name) = RefName::parse(target.trim_end_matches('\n'))
        {
            return Ok(name.as_str().to_owned());
        }
        let output = self
            .state
            .git
            .run(Some(path), &["symbolic-ref", "HEAD"], None)
            .await?;
        Ok(String::from_utf8_lossy(&output).trim().to_owned())
    }

    async fn default_branch(
        &self,
        request: FindDefaultBranchRequest,
    ) -> Result<FindDefaultBranchResponse, NodeError> {
        let repository = self.state.storages.existing(request.repository.as_ref())?;
        let name = self.head(&repository.path).await?;
        let target = match self
            .state
            .git
            .run(
                Some(&repository.path),
                &["rev-parse", "-q", "--verify", &name],
                None,
            )
            .await
        {
            Ok(output) => String::from_utf8_lossy(&output).trim().to_owned(),
            Err(GitError::Failed { .. }) => String::new(),
            Err(error) => return Err(error.into()),
        };
        Ok(FindDefaultBranchResponse { name, target })
    }

    async fn checksum(
        &self,
        request: RefsChecksumRequest,
    ) -> Result<RefsChecksumResponse, NodeError> {
        let repository = self.state.storages.existing(request.repository.as_ref())?;
        let mut checksum = Checksum::default();
        for reference in self.read_refs(&repository.path).await? {
            checksum.add(&reference.name, &reference.target);
        }
        let ref_count = checksum.count();
        checksum.add("HEAD", &self.head(&repository.path).await?);
        Ok(RefsChecksumResponse {
            checksum: checksum.hex(),
            ref_count,
        })
    }

    async fn update_refs(
        &self,
        request: UpdateRefsRequest,
        token: Option<u64>,
    ) -> Result<(), NodeError> {
        let repository = self.state.storages.existing(request.repository.as_ref())?;
        let script = update_script(&request.updates)?;
        self.apply_updates(&repository.path, &script, token).await
    }

    /// Runs `update-ref --stdin` with `script` (see [`update_script`]) under the replica's
    /// fence for `token`: one transaction, all updates or none.
    pub(super) async fn apply_updates(
        &self,
        replica: &Path,
        script: &str,
        token: Option<u64>,
    ) -> Result<(), NodeError> {
        // Held while the refs change: a newer token waits, an older one is refused.
        let _fence = enter_fence(replica, token).await?;
        match self
            .change_refs(replica, &["update-ref", "--stdin"], Some(script.as_bytes()))
            .await
        {
            Ok(_) => Ok(()),
            Err(error @ GitError::Failed { .. }) => Err(classify_update_failure(error)),
            Err(error) => Err(error.into()),
        }
    }

    async fn set_default_branch(
        &self,
        request: SetDefaultBranchRequest,
        token: Option<u64>,
    ) -> Result<(), NodeError> {
        let repository = self.state.storages.existing(request.repository.as_ref())?;
        let branch = RefName::branch(&request.branch)?;
        self.point_head(&repository.path, &branch, token).await
    }

    /// Points HEAD at `branch` under the replica's fence for `token`.
    pub(super) async fn point_head(
        &self,
        replica: &Path,
        branch: &RefName,
        token: Option<u64>,
    ) -> Result<(), NodeError> {
        let _fence = enter_fence(replica, token).await?;
        self.change_refs(replica, &["symbolic-ref", "HEAD", branch.as_str()], None)
            .await?;
        Ok(())
    }

    /// Runs a git command that changes the replica's refs. One that trips over a ref lock
    /// left by a git process that died mid-update has the lock removed, if no git of this
    /// node is working on the replica, and runs once more.
    pub(super) async fn change_refs(
        &self,
        replica: &Path,
        args: &[&str],
        stdin: Option<&[u8]>,
    ) -> Result<Vec<u8>, GitError> {
        match self.state.git.run(Some(replica), args, stdin).await {
            Err(error @ GitError::Failed { .. }) if locks::tripped_over_a_lock(error.stderr()) => {
                let path = replica.to_owned();
                let removed = tokio::task::spawn_blocking(move || locks::clear_stale(&path))
                    .await
                    .unwrap_or_default();
                if removed.is_empty() {
                    return Err(error);
                }
                self.state.git.run(Some(replica), args, stdin).await
            }
            other => other,
        }
    }
}

/// The caller's fencing token, when its call carries one.
pub(super) fn fence_token(metadata: &tonic::metadata::MetadataMap) -> Result<Option<u64>, Status> {
    let Some(value) = metadata.get(FENCE_HEADER) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|text| text.parse().ok())
        .map(Some)
        .ok_or_else(|| Status::invalid_argument(format!("{FENCE_HEADER} is not a token")))
}

/// Takes the replica's fence for `token`; nothing to take for a call without one.
pub(super) async fn enter_fence(
    replica: &Path,
    token: Option<u64>,
) -> Result<Option<FenceGuard>, NodeError> {
    match token {
        Some(token) => Ok(Some(fence::enter_async(replica, token).await?)),
        None => Ok(None),
    }
}

/// `git for-each-ref` output that [`parse_ref`] reads.
const REF_FORMAT: &str = "--format=%(refname)%00%(objectname)%00%(*objectname)";

fn parse_ref(line: &str) -> Option<Ref> {
    let mut fields = line.split('\0');
    Some(Ref {
        name: fields.next()?.to_owned(),
        target: fields.next()?.to_owned(),
        peeled_target: fields.next().unwrap_or_default().to_owned(),
    })
}

/// Turns chunks of `for-each-ref` output into messages of the references that match one of
/// `prefixes`; a line split between chunks waits for its end.
struct RefBatcher {
    prefixes: Vec<String>,
    partial: Vec<u8>,
}

impl RefBatcher {
    fn push(&mut self, chunk: &[u8]) -> Option<ListRefsResponse> {
        self.partial.extend_from_slice(chunk);
        let complete = self.partial.iter().rposition(|b| *b == b'\n')? + 1;
        let lines: Vec<u8> = self.partial.drain(..complete).collect();
        let refs: Vec<Ref> = String::from_utf8_lossy(&lines)
            .lines()
            .filter_map(parse_ref)
            .filter(|r| {
                self.prefixes.is_empty() || self.prefixes.iter().any(|p| r.name.starts_with(p))
            })
            .collect();
        (!refs.is_empty()).then_some(ListRefsResponse { refs })
    }
}

/// The `update-ref --stdin` script of one request's updates, checked first: at least one and
/// at most [`MAX_REF_UPDATES`], valid names and ids, no ref twice.
pub(super) fn update_script(updates: &[RefUpdate]) -> Result<String, NodeError> {
    if updates.is_empty() {
        return Err(NodeError::BadRequest("no reference updates given".into()));
    }
    if updates.len() > MAX_REF_UPDATES {
        return Err(NodeError::BadRequest(format!(
            "{} reference updates given; the limit is {MAX_REF_UPDATES}",
            updates.len()
        )));
    }
    let mut script = String::from("start\n");
    let mut seen = HashSet::new();
    for update in updates {
        let name = RefName::parse(&update.name)?;
        let old = ObjectId::parse(&update.old_target)?;
        let new = ObjectId::parse(&update.new_target)?;
        if !seen.insert(name.clone()) {
            return Err(NodeError::BadRequest(format!(
                "{name} is updated twice in one request"
            )));
        }
        script.push_str(&format!("update {name} {new} {old}\n"));
    }
    script.push_str("prepare\ncommit\n");
    Ok(script)
}

/// Tells a lost compare-and-swap from a bad request from a broken repository.
pub(super) fn classify_update_failure(error: GitError) -> NodeError {
    let stderr = error.stderr();
    let message = stderr
        .strip_prefix("fatal: ")
        .unwrap_or(stderr)
        .trim()
        .to_owned();
    let invalid = ["nonexistent object", "non-commit object", "invalid"];
    // A branch and a directory of branches with the same name: retrying will not help.
    let clash = ["exists; cannot create", "is a directory"];
    let conflict = [
        "but expected",
        "reference already exists",
        "unable to resolve reference",
        "cannot lock ref",
    ];
    if invalid.iter().any(|needle| stderr.contains(needle)) {
        NodeError::BadRequest(format!("reference update refused: {message}"))
    } else if clash.iter().any(|needle| stderr.contains(needle)) {
        NodeError::Rejected(format!(
            "reference update refused, nothing was changed: {message}"
        ))
    } else if conflict.iter().any(|needle| stderr.contains(needle)) {
        NodeError::RefConflict(format!(
            "reference update rejected, nothing was changed: {message}"
        ))
    } else {
        NodeError::Git(error)
    }
}

#[tonic::async_trait]
impl RefService for Node {
    type ListRefsStream = ReceiverStream<Result<ListRefsResponse, Status>>;

    async fn list_refs(
        &self,
        request: Request<ListRefsRequest>,
    ) -> Result<Response<Self::ListRefsStream>, Status> {
        let request = request.into_inner();
        let repository = self.state.storages.existing(request.repository.as_ref())?;
        // Streamed as git lists them, one message per chunk of output, in constant memory.
        let mut command = self.state.git.command(Some(&repository.path));
        command.args(["for-each-ref", REF_FORMAT]);
        let mut batcher = RefBatcher {
            prefixes: request.prefixes,
            partial: Vec::new(),
        };
        let (sender, receiver) = tokio::sync::mpsc::channel(4);
        let kill = self.state.kill.clone();
        tokio::spawn(async move {
            let exit = pipe::run(
                command,
                None::<tokio_stream::Empty<_>>,
                &kill,
                &sender,
                |output| match output {
                    Output::Stdout(chunk) => batcher.push(&chunk),
                    Output::Stderr(_) => None,
                },
            )
            .await;
            let failure = match exit {
                Ok(exit) if exit.success() => return,
                Ok(exit) => NodeError::Io(std::io::Error::other(format!(
                    "git for-each-ref failed: {}",
                    exit.stderr
                ))),
                Err(error) => error.into(),
            };
            let _ = sender.send(Err(failure.into())).await;
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn find_default_branch(
        &self,
        request: Request<FindDefaultBranchRequest>,
    ) -> Result<Response<FindDefaultBranchResponse>, Status> {
        Ok(Response::new(
            self.detached(
                move |node| async move { node.default_branch(request.into_inner()).await },
            )
            .await?,
        ))
    }

    async fn refs_checksum(
        &self,
        request: Request<RefsChecksumRequest>,
    ) -> Result<Response<RefsChecksumResponse>, Status> {
        Ok(Response::new(
            self.detached(move |node| async move { node.checksum(request.into_inner()).await })
                .await?,
        ))
    }

    async fn update_refs(
        &self,
        request: Request<UpdateRefsRequest>,
    ) -> Result<Response<UpdateRefsResponse>, Status> {
        let token = fence_token(request.metadata())?;
        self.detached(move |node| async move {
            Node::update_refs(&node, request.into_inner(), token).await
        })
        .await?;
        Ok(Response::new(UpdateRefsResponse {}))
    }

    async fn set_default_branch(
        &self,
        request: Request<SetDefaultBranchRequest>,
    ) -> Result<Response<SetDefaultBranchResponse>, Status> {
        let token = fence_token(request.metadata())?;
        self.detached(move |node| async move {
            Node::set_default_branch(&node, request.into_inner(), token).await
        })
        .await?;
        Ok(Response::new(SetDefaultBranchResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_lines_split_across_chunks_and_filters_by_prefix() {
        let output = b"refs/heads/main\0aa\0\nrefs/tags/v1\0bb\0cc\nrefs/heads/x\0dd\0\n";
        let mut batcher = RefBatcher {
            prefixes: vec!["refs/heads/".into()],
            partial: Vec::new(),
        };
        let mut refs = Vec::new();
        for chunk in output.chunks(5) {
            if let Some(message) = batcher.push(chunk) {
                refs.extend(message.refs);
            }
        }
        let names: Vec<&str> = refs.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["refs/heads/main", "refs/heads/x"]);
        assert_eq!(refs[1].target, "dd");
        assert!(batcher.partial.is_empty());
    }
}

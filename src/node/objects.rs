//! Reading a file or a commit, what an application shows to a person.

use std::process::Stdio;

use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{Node, NodeError};
use crate::git::GitError;
use crate::model::{Revision, TreePath};
use crate::proto::object_service_server::ObjectService;
use crate::proto::*;

const BLOB_CHUNK: usize = 64 * 1024;
/// Commit messages are cut at this many bytes.
const MAX_MESSAGE: usize = 1 << 20;
/// The most of a commit object read: the message limit plus room for the headers.
const MAX_COMMIT_READ: usize = MAX_MESSAGE + (256 << 10);

struct TreeEntry {
    mode: u32,
    kind: String,
    oid: String,
    size: u64,
}

impl Node {
    /// Resolves `revision:path` to its tree entry.
    async fn tree_entry(
        &self,
        path: &std::path::Path,
        revision: &Revision,
        file: &TreePath,
    ) -> Result<TreeEntry, NodeError> {
        let listed = self
            .state
            .git
            .run(
                Some(path),
                &[
                    "ls-tree",
                    "-z",
                    "--long",
                    "--full-tree",
                    "--end-of-options",
                    revision.as_str(),
                    "--",
                    file.as_str(),
                ],
                None,
            )
            .await;
        let output = match listed {
            Ok(output) => output,
            Err(GitError::Failed { .. }) => {
                return Err(NodeError::NotFound(format!(
                    "revision {:?} does not exist",
                    revision.as_str()
                )));
            }
            Err(error) => return Err(error.into()),
        };
        let record = output.split(|b| *b == 0).find(|record| !record.is_empty());
        let record = record.map(String::from_utf8_lossy).ok_or_else(|| {
            NodeError::NotFound(format!(
                "path {:?} does not exist in {:?}",
                file.as_str(),
                revision.as_str()
            ))
        })?;
        // "<mode> <type> <oid> <size>\t<path>"
        let (meta, _) = record.split_once('\t').unwrap_or((&record, ""));
        let fields: Vec<&str> = meta.split_whitespace().collect();
        let [mode, kind, oid, size] = fields[..] else {
            return Err(NodeError::Io(std::io::Error::other(format!(
                "unexpected ls-tree output {record:?}"
            ))));
        };
        Ok(TreeEntry {
            mode: u32::from_str_radix(mode, 8).unwrap_or(0),
            kind: kind.to_owned(),
            oid: oid.to_owned(),
            size: size.parse().unwrap_or(0),
        })
    }

    async fn commit(&self, request: ReadCommitRequest) -> Result<ReadCommitResponse, NodeError> {
        let repository = self.state.storages.existing(request.repository.as_ref())?;
        let revision = Revision::parse(&request.revision)?;
        let spec = format!("{}^{{commit}}", revision.as_str());
        let oid = match self
            .state
            .git
            .run(
                Some(&repository.path),
                &["rev-parse", "-q", "--verify", "--end-of-options", &spec],
                None,
            )
            .await
        {
            Ok(output) => String::from_utf8_lossy(&output).trim().to_owned(),
            Err(GitError::Failed { .. }) => {
                return Err(NodeError::NotFound(format!(
                    "revision {:?} is not a commit in this repository",
                    revision.as_str()
                )));
            }
            Err(error) => return Err(error.into()),
        };
        let raw = self
            .state
            .git
            .run_limited(
                Some(&repository.path),
                &["cat-file", "commit", &oid],
                MAX_COMMIT_READ,
            )
            .await?;
        Ok(parse_commit(oid, &raw))
    }
}

fn parse_commit(oid: String, raw: &[u8]) -> ReadCommitResponse {
    let split = raw.windows(2).position(|w| w == b"\n\n");
    let (headers, message) = match split {
        Some(at) => (&raw[..at], &raw[at + 2..]),
        None => (raw, &b""[..]),
    };
    let mut commit = ReadCommitResponse {
        oid,
        message: message[..message.len().min(MAX_MESSAGE)].to_vec().into(),
        ..Default::default()
    };
    for line in String::from_utf8_lossy(headers).lines() {
        match line.split_once(' ') {
            Some(("tree", tree)) => commit.tree = tree.to_owned(),
            Some(("parent", parent)) => commit.parents.push(parent.to_owned()),
            Some(("author", signature)) => commit.author = Some(parse_signature(signature)),
            Some(("committer", signature)) => commit.committer = Some(parse_signature(signature)),
            _ => {}
        }
    }
    commit
}

/// "Name <email> 1700000000 +0100"
fn parse_signature(text: &str) -> Signature {
    let (name, rest) = text.split_once(" <").unwrap_or((text, ""));
    let (email, rest) = rest.split_once('>').unwrap_or((rest, ""));
    let timestamp = rest
        .split_whitespace()
        .next()
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    Signature {
        name: name.to_owned(),
        email: email.to_owned(),
        timestamp,
    }
}

#[tonic::async_trait]
impl ObjectService for Node {
    type ReadBlobStream = ReceiverStream<Result<ReadBlobResponse, Status>>;

    async fn read_blob(
        &self,
        request: Request<ReadBlobRequest>,
    ) -> Result<Response<Self::ReadBlobStream>, Status> {
        let request = request.into_inner();
        let repository = self.state.storages.existing(request.repository.as_ref())?;
        let revision = Revision::parse(&request.revision).map_err(NodeError::from)?;
        let file = TreePath::parse(&request.path).map_err(NodeError::from)?;
        let (path, wanted) = (repository.path.clone(), file.clone());
        let entry = self
            .detached(move |node| async move { node.tree_entry(&path, &revision, &wanted).await })
            .await?;
        if entry.kind != "blob" {
            return Err(NodeError::BadRequest(format!(
                "{:?} is a {}, not a file",
                file.as_str(),
                entry.kind
            ))
            .into());
        }
        let mut command = self.state.git.command(Some(&repository.path));
        command
            .args(["cat-file", "blob", &entry.oid])
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = command
            .spawn()
            .map_err(|error| NodeError::Git(GitError::Spawn(error)))?;
        let mut stdout = child.stdout.take().expect("stdout is piped");
        let limit = if request.limit == 0 {
            entry.size
        } else {
            request.limit.min(entry.size)
        };
        let (sender, receiver) = mpsc::channel(4);
        let kill = self.state.kill.clone();
        tokio::spawn(async move {
            let mut first = Some(ReadBlobResponse {
                oid: entry.oid,
                size: entry.size,
                mode: entry.mode,
                data: Default::default(),
            });
            let mut remaining = limit;
            let mut cut_short = None;
            while remaining > 0 {
                let mut buffer = BytesMut::with_capacity(BLOB_CHUNK.min(remaining as usize));
                let read = tokio::select! {
                    read = stdout.read_buf(&mut buffer) => read,
                    _ = kill.cancelled() => {
                        cut_short = Some(NodeError::ShuttingDown);
                        break;
                    }
                };
                match read {
                    Ok(0) => {
                        cut_short = Some(NodeError::Io(std::io::Error::other(format!(
                            "git cat-file ended {remaining} bytes before the end of the blob"
                        ))));
                        break;
                    }
                    Err(error) => {
                        cut_short = Some(NodeError::Io(error));
                        break;
                    }
                    Ok(read) => remaining -= (read as u64).min(remaining),
                }
                let mut message = first.take().unwrap_or_default();
                message.data = buffer.freeze();
                if sender.send(Ok(message)).await.is_err() {
                    break;
                }
            }
            // Stop git if the limit cut the blob short, and reap it either way.
            crate::git::terminate(&mut child).await;
            // A blob that could not be read whole must not look complete to the client.
            let last = match (cut_short, first) {
                (Some(error), _) => Err(error.into()),
                (None, Some(metadata)) => Ok(metadata),
                (None, None) => return,
            };
            let _ = sender.send(last).await;
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn read_commit(
        &self,
        request: Request<ReadCommitRequest>,
    ) -> Result<Response<ReadCommitResponse>, Status> {
        Ok(Response::new(
            self.detached(move |node| async move { node.commit(request.into_inner()).await })
                .await?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_commit_with_two_parents() {
        let raw = b"tree 1111\nparent aaaa\nparent bbbb\nauthor A U Thor <a@example.com> 1700000000 +0100\ncommitter C <c@example.com> 1700000001 +0000\n\nsubject\n\nbody\n";
        let commit = parse_commit("cccc".into(), raw);
        assert_eq!(commit.tree, "1111");
        assert_eq!(commit.parents, vec!["aaaa", "bbbb"]);
        let author = commit.author.unwrap();
        assert_eq!(
            (
                author.name.as_str(),
                author.email.as_str(),
                author.timestamp
            ),
            ("A U Thor", "a@example.com", 1_700_000_000)
        );
        assert_eq!(&commit.message[..], b"subject\n\nbody\n");
    }
}

//! Replication: the target node fetches from the source node through the source's own
//! SshUploadPack RPC, with `gitfleet bridge` as git's ssh command. Mirror semantics: every
//! reference is copied, references the source lacks are deleted, and HEAD follows the source.

use std::path::Path;

use tonic::Code;

use super::{Node, NodeError};
use crate::auth::{Credentials, Signer};
use crate::client::{ConnectError, connect};
use crate::git::GitError;
use crate::model::{RefName, RelativePath, StorageName};
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

    /// Asks the source for its HEAD; this also proves it is reachable and lets us in.
    async fn head(&self) -> Result<String, NodeError> {
        let channel = connect(
            &self.address,
            Signer::new(Credentials::Signed(self.token.as_str().into())),
        )
        .await
        .map_err(|error| match error {
            ConnectError::BadAddress(_) => NodeError::BadRequest(error.to_string()),
            ConnectError::Unreachable { .. } => NodeError::SourceUnavailable(error.to_string()),
        })?;
        let request = FindDefaultBranchRequest {
            repository: Some(RepositoryHeader {
                storage: self.storage.to_string(),
                relative_path: self.relative_path.to_string(),
            }),
        };
        let describe = self.describe();
        let response = RefServiceClient::new(channel)
            .find_default_branch(request)
            .await
            .map_err(|status| {
                let message = format!("{describe}: {}", status.message());
                match status.code() {
                    Code::Unavailable | Code::DeadlineExceeded => {
                        NodeError::SourceUnavailable(message)
                    }
                    _ => NodeError::SourceFailed(message),
                }
            })?;
        Ok(response.into_inner().name)
    }
}

/// Quotes `text` for the shell that git runs GIT_SSH_COMMAND with.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

impl Node {
    /// Returns whether the target had to be created.
    pub(super) async fn replicate(
        &self,
        request: ReplicateRepositoryRequest,
    ) -> Result<bool, NodeError> {
        let target = self.state.storages.locate(request.repository.as_ref())?;
        let source = Source::try_from(request.source)?;
        let head = RefName::parse(&source.head().await?)
            .map_err(|error| NodeError::SourceFailed(format!("HEAD is not a branch: {error}")))?;
        if target.exists() {
            self.fetch_mirror(&target.path, &source).await?;
            self.state
                .git
                .run(
                    Some(&target.path),
                    &["symbolic-ref", "HEAD", head.as_str()],
                    None,
                )
                .await?;
            tracing::info!(target = %target, source = %source.describe(), "replica updated");
            return Ok(false);
        }
        // A new replica is built aside and moved into place whole, like a create.
        self.build_aside(&target, "replicate", async |staging: &Path| {
            self.build_empty(staging, &head).await?;
            self.fetch_mirror(staging, &source).await
        })
        .await?;
        tracing::info!(target = %target, source = %source.describe(), "replica created");
        Ok(true)
    }

    async fn fetch_mirror(&self, path: &Path, source: &Source) -> Result<(), NodeError> {
        let bridge = std::env::current_exe()?;
        let bridge = shell_quote(&bridge.to_string_lossy());
        let url = format!("ssh://gitfleet/{}/{}", source.storage, source.relative_path);
        let mut command = self.state.git.command(Some(path));
        command
            .env("GIT_SSH_COMMAND", format!("{bridge} bridge ssh"))
            .env("GIT_SSH_VARIANT", "ssh")
            .env(ADDRESS_ENV, &source.address)
            .env(SIGNED_TOKEN_ENV, &source.token)
            .args([
                "-c",
                "protocol.version=2",
                "fetch",
                "--quiet",
                "--prune",
                "--force",
                "--no-write-fetch-head",
            ])
            .args([
                "--no-auto-gc",
                "--no-auto-maintenance",
                "--",
                &url,
                "+refs/*:refs/*",
            ]);
        match self.state.git.output(command, None, usize::MAX).await {
            Ok(_) => Ok(()),
            Err(GitError::Failed { stderr, .. }) => Err(NodeError::SourceFailed(format!(
                "fetching from {} failed: {stderr}",
                source.describe()
            ))),
            Err(error) => Err(error.into()),
        }
    }
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

//! A prepared push: receive-pack has the pack in its quarantine and waits for a decision
//! before it changes any ref. The node's `pre-receive` hook (started by git with every command
//! of the push, before the objects move in) connects to the push's rendezvous, a unix socket
//! the node listens on, sends the commands (`OLD NEW REF` lines, then the end of its half of
//! the connection), and waits for one answer line:
//! - `commit TOKEN`: the hook enters the replica's fence with the token (refusing the push if a
//!   newer one was accepted) and leaves its lock with a holder that keeps it until
//!   receive-pack exits; then it lets receive-pack go on. Every ref transaction that follows
//!   (git 2.47 commits a push without --atomic one transaction per command) runs under the
//!   fence, and a newer token waits for the push to end;
//! - `abort REASON`: the hook says why and fails, so receive-pack refuses every command
//!   ("pre-receive hook declined") and drops the quarantined objects.
//!
//! No answer (the node went away, or [`DECISION_WAIT`] passed) aborts too: a prepared push
//! never commits on its own.

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tonic::Status;

use crate::model::{RefName, parse_ref_command};
use crate::proto::{PostReceivePackResponse, PreparedPush, RefUpdate, push_decision};

/// The environment that carries a prepared push's rendezvous to the hook.
pub const PREPARE_ENV: &str = "GITFLEET_PREPARE";

/// How long a prepared push waits for its decision before it aborts.
pub const DECISION_WAIT: Duration = Duration::from_secs(300);

/// The most bytes of ref updates one prepared push may report: room for about 100,000 refs.
const MAX_UPDATE_BYTES: u64 = 16 << 20;

/// One ref update a prepared push is about to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedUpdate {
    pub name: String,
    pub old: String,
    pub new: String,
}

/// Where one push's hook finds its node: a socket in the storage's temporary area, removed
/// when this is dropped.
#[derive(Debug)]
pub struct Rendezvous {
    listener: tokio::net::UnixListener,
    path: PathBuf,
}

impl Rendezvous {
    /// Listens on a new socket in `dir`, which must be short enough for a socket's path
    /// (about 100 bytes).
    pub fn bind(dir: &Path) -> std::io::Result<Self> {
        let path = dir.join(format!("prepare-{:016x}.sock", rand::random::<u64>()));
        let listener = tokio::net::UnixListener::bind(&path)?;
        Ok(Self { listener, path })
    }

    /// The socket's path, for [`PREPARE_ENV`].
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for the hook, and reads the ref updates it reports.
    pub async fn prepared(&self) -> std::io::Result<Prepared> {
        let (mut stream, _) = self.listener.accept().await?;
        let mut text = String::new();
        (&mut stream)
            .take(MAX_UPDATE_BYTES + 1)
            .read_to_string(&mut text)
            .await?;
        if text.len() as u64 > MAX_UPDATE_BYTES {
            return Err(invalid(format!(
                "the push's ref updates are longer than {MAX_UPDATE_BYTES} bytes"
            )));
        }
        let updates = text.lines().map(parse_update).collect::<Result<_, _>>()?;
        Ok(Prepared { updates, stream })
    }
}

impl Drop for Rendezvous {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A push whose hook waits for the decision. Dropping it without one aborts the push.
#[derive(Debug)]
pub struct Prepared {
    pub updates: Vec<PreparedUpdate>,
    stream: tokio::net::UnixStream,
}

impl Prepared {
    /// Lets the push commit under `token`, which its replica's fence checks first.
    pub async fn commit(mut self, token: u64) -> std::io::Result<()> {
        self.stream
            .write_all(format!("commit {token}\n").as_bytes())
            .await
    }

    /// Aborts the push; git tells its client `reason`.
    pub async fn abort(mut self, reason: &str) -> std::io::Result<()> {
        let reason = reason.replace('\n', " ");
        self.stream
            .write_all(format!("abort {reason}\n").as_bytes())
            .await
    }
}

fn parse_update(line: &str) -> std::io::Result<PreparedUpdate> {
    let (old, new, name) =
        parse_ref_command("ref update", line).map_err(|error| invalid(error.to_string()))?;
    // HEAD and other symbolic refs come through too.
    if name != "HEAD" {
        RefName::parse(name).map_err(|error| invalid(error.to_string()))?;
    }
    Ok(PreparedUpdate {
        name: name.to_owned(),
        old: old.as_str().to_owned(),
        new: new.as_str().to_owned(),
    })
}

fn invalid(message: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, message)
}

/// The decision a prepared push's hook got.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    Commit(u64),
    Abort(String),
}

/// The hook's side: reports the updates git gave on standard input to the node at `socket`,
/// and waits for the decision. Any failure to get one is an abort.
pub fn ask(socket: &Path, updates: &[u8]) -> Decision {
    let asked = (|| -> std::io::Result<String> {
        let mut stream = UnixStream::connect(socket)?;
        stream.set_read_timeout(Some(DECISION_WAIT))?;
        stream.write_all(updates)?;
        stream.shutdown(std::net::Shutdown::Write)?;
        let mut answer = String::new();
        stream.take(64 << 10).read_to_string(&mut answer)?;
        Ok(answer)
    })();
    let answer = match asked {
        Ok(answer) => answer,
        Err(error) => return Decision::Abort(format!("no decision from the node: {error}")),
    };
    let line = answer.lines().next().unwrap_or_default();
    match line.split_once(' ') {
        Some(("commit", token)) => match token.parse() {
            Ok(token) => Decision::Commit(token),
            Err(_) => Decision::Abort(format!("the node answered {line:?}")),
        },
        Some(("abort", reason)) => Decision::Abort(reason.to_owned()),
        _ if line.is_empty() => Decision::Abort("the node gave no decision".into()),
        _ => Decision::Abort(format!("the node answered {line:?}")),
    }
}

/// The `pre-receive` hook of a prepared push, run by git in the replica's directory: reports
/// the push's commands to the node at `socket`, and lets receive-pack go on only on a commit,
/// once it holds the replica's fence for the decision's token (until receive-pack exits).
pub fn pre_receive(socket: &Path) -> std::process::ExitCode {
    let decision = match read_updates() {
        Ok(updates) => ask(socket, &updates),
        Err(error) => Decision::Abort(format!("cannot read the push's commands: {error}")),
    };
    let refused = match decision {
        Decision::Commit(token) => {
            let receive_pack = std::os::unix::process::parent_id();
            match super::hook::hook_prepared(Path::new("."), token, receive_pack) {
                Ok(()) => return std::process::ExitCode::SUCCESS,
                Err(error) => error.to_string(),
            }
        }
        Decision::Abort(reason) => reason,
    };
    eprintln!("{refused}");
    std::process::ExitCode::FAILURE
}

/// Reads what git gives the hook on standard input.
pub fn read_updates() -> std::io::Result<Vec<u8>> {
    let mut updates = Vec::new();
    std::io::stdin()
        .take(MAX_UPDATE_BYTES + 1)
        .read_to_end(&mut updates)?;
    Ok(updates)
}

/// Waits for the prepared push's hook, answers its updates as `prepared`, and hands it the
/// caller's decision; no decision (the caller went away) aborts.
pub(super) async fn decide(
    rendezvous: Rendezvous,
    decision: tokio::sync::oneshot::Receiver<push_decision::Decision>,
    sender: mpsc::Sender<Result<PostReceivePackResponse, Status>>,
) {
    let prepared = match rendezvous.prepared().await {
        Ok(prepared) => prepared,
        Err(error) => {
            tracing::warn!(%error, "a prepared push's hook could not be heard");
            return;
        }
    };
    let updates = prepared
        .updates
        .iter()
        .map(|update| RefUpdate {
            name: update.name.clone(),
            old_target: update.old.clone(),
            new_target: update.new.clone(),
        })
        .collect();
    let answered = sender
        .send(Ok(PostReceivePackResponse {
            data: Bytes::new(),
            prepared: Some(PreparedPush { updates }),
        }))
        .await;
    let decision = match (answered, decision.await) {
        (Ok(()), Ok(decision)) => decision,
        _ => push_decision::Decision::AbortReason(
            "the push's caller went away before deciding".into(),
        ),
    };
    let handed = match &decision {
        push_decision::Decision::CommitToken(token) => prepared.commit(*token).await,
        push_decision::Decision::AbortReason(reason) => prepared.abort(reason).await,
    };
    if let Err(error) = handed {
        tracing::warn!(%error, "a prepared push's decision could not be handed over");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn updates_are_parsed_and_bad_lines_refused() {
        let zero = "0".repeat(40);
        let one = "1".repeat(40);
        assert_eq!(
            parse_update(&format!("{zero} {one} refs/heads/main")).unwrap(),
            PreparedUpdate {
                name: "refs/heads/main".into(),
                old: zero.clone(),
                new: one.clone()
            }
        );
        assert!(parse_update(&format!("{zero} {one} HEAD")).is_ok());
        for bad in [
            "nonsense".to_owned(),
            format!("{zero} xyz refs/heads/main"),
            format!("{zero} {one} refs/heads/a..b"),
        ] {
            assert!(parse_update(&bad).is_err(), "{bad}");
        }
    }
}

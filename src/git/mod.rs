//! Everything that runs or parses git.

pub mod checksum;
pub mod pipe;
pub mod pktline;
pub mod report;

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

/// Set in the environment of every git command a node runs, and so of everything git starts.
pub const NODE_PID_ENV: &str = "GITFLEET_NODE_PID";

/// The longest stderr kept for an error message.
pub const STDERR_LIMIT: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("cannot run git: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("git {command} exited with {code}: {stderr}")]
    Failed {
        command: String,
        code: i32,
        stderr: String,
    },
    #[error("git was stopped: the node is shutting down")]
    Killed,
}

impl GitError {
    pub fn stderr(&self) -> &str {
        match self {
            GitError::Spawn(_) | GitError::Killed => "",
            GitError::Failed { stderr, .. } => stderr,
        }
    }
}

/// Runs the real git CLI with an environment that the node controls: no system or global
/// config, no prompts, C locale.
#[derive(Debug, Clone)]
pub struct Git {
    binary: PathBuf,
    /// Extra `-c key=value` settings applied to every command.
    settings: Vec<String>,
    /// Cancelled when the node's shutdown grace period is over: running commands are killed.
    kill: CancellationToken,
}

impl Git {
    pub fn new(binary: impl Into<PathBuf>, kill: CancellationToken) -> Self {
        Self {
            binary: binary.into(),
            settings: Vec::new(),
            kill,
        }
    }

    pub fn with_setting(mut self, setting: impl Into<String>) -> Self {
        self.settings.push(setting.into());
        self
    }

    /// A git command, run against `git_dir` when one is given.
    pub fn command(&self, git_dir: Option<&Path>) -> Command {
        let mut command = Command::new(&self.binary);
        command.env_clear();
        for name in ["PATH", "HOME", "TMPDIR"] {
            if let Some(value) = std::env::var_os(name) {
                command.env(name, value);
            }
        }
        command
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("LC_ALL", "C")
            // The node owns its storages, whoever created the files.
            .args(["-c", "safe.directory=*"]);
        for setting in &self.settings {
            command.args(["-c", setting]);
        }
        if let Some(git_dir) = git_dir {
            command.arg("--git-dir").arg(git_dir);
        }
        // Each git command leads a process group of its own, so that killing it also ends the
        // processes it started (pack-objects, index-pack, the bridge of a fetch). They all carry
        // the node's pid, which tells operators (and tests) whose they are.
        command
            .env(NODE_PID_ENV, std::process::id().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        command
    }

    /// Runs `git ARGS` to completion and returns its stdout; a non-zero exit is an error that
    /// carries stderr.
    pub async fn run(
        &self,
        git_dir: Option<&Path>,
        args: &[&str],
        stdin: Option<&[u8]>,
    ) -> Result<Vec<u8>, GitError> {
        let mut command = self.command(git_dir);
        command.args(args);
        self.output(command, stdin, usize::MAX).await
    }

    /// Like [`Git::run`], but returns at most `limit` bytes of stdout and stops git once the
    /// limit is reached, so a huge object costs no more than `limit` bytes of memory.
    pub async fn run_limited(
        &self,
        git_dir: Option<&Path>,
        args: &[&str],
        limit: usize,
    ) -> Result<Vec<u8>, GitError> {
        let mut command = self.command(git_dir);
        command.args(args);
        self.output(command, None, limit).await
    }

    /// Runs a command made by [`Git::command`] to completion: feeds it `stdin` while reading
    /// at most `limit` bytes of its stdout, fails with its stderr when it exits non-zero, and
    /// kills it when the node's shutdown deadline passes.
    pub async fn output(
        &self,
        mut command: Command,
        stdin: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<u8>, GitError> {
        let name = subcommand(&command);
        if stdin.is_some() {
            command.stdin(Stdio::piped());
        }
        let mut child = command.spawn().map_err(GitError::Spawn)?;
        let input = child.stdin.take();
        let mut stdout = child
            .stdout
            .take()
            .expect("stdout is piped")
            .take(limit as u64);
        let mut stderr = child.stderr.take().expect("stderr is piped");
        // stderr is drained on its own, so git never blocks on it whatever happens to stdout.
        let stderr = AbortOnDropHandle::new(tokio::spawn(async move {
            let mut text = Vec::new();
            let _ = stderr.read_to_end(&mut text).await;
            text
        }));
        let feed = async move {
            if let (Some(data), Some(mut pipe)) = (stdin, input) {
                // A child that exits early closes its stdin; its exit status tells why.
                let _ = pipe.write_all(data).await;
            }
            Ok(())
        };
        let mut output = Vec::new();
        let read = tokio::select! {
            read = async { tokio::try_join!(feed, stdout.read_to_end(&mut output)) } => read,
            _ = self.kill.cancelled() => {
                terminate(&mut child).await;
                return Err(GitError::Killed);
            }
        };
        if let Err(error) = read {
            terminate(&mut child).await;
            return Err(GitError::Spawn(error));
        }
        if output.len() >= limit {
            terminate(&mut child).await;
            return Ok(output);
        }
        let status = tokio::select! {
            status = child.wait() => status.map_err(GitError::Spawn)?,
            _ = self.kill.cancelled() => {
                terminate(&mut child).await;
                return Err(GitError::Killed);
            }
        };
        if status.success() {
            return Ok(output);
        }
        Err(GitError::Failed {
            command: name,
            code: status.code().unwrap_or(-1),
            stderr: tail(&stderr.await.unwrap_or_default()),
        })
    }
}

/// The git subcommand a command runs, such as "fetch", for error messages.
fn subcommand(command: &Command) -> String {
    let mut args = command.as_std().get_args();
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("-c" | "--git-dir") => {
                args.next();
            }
            Some(name) => return name.to_owned(),
            None => break,
        }
    }
    String::from("?")
}

/// Kills a git command and everything it started, and reaps it.
pub async fn terminate(child: &mut tokio::process::Child) {
    if let Some(id) = child.id().and_then(|id| i32::try_from(id).ok()) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(id),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    // kill() also waits, so no zombie is left behind.
    if let Err(error) = child.kill().await {
        tracing::warn!(%error, "cannot kill git child");
    }
}

/// The end of `stderr` as text, at most [`STDERR_LIMIT`] bytes, trimmed.
pub fn tail(stderr: &[u8]) -> String {
    let start = stderr.len().saturating_sub(STDERR_LIMIT);
    String::from_utf8_lossy(&stderr[start..]).trim().to_owned()
}

//! Streams a git child's stdin, stdout and stderr to and from gRPC streams.
//!
//! The child is always reaped: it is killed and waited for when the client goes away, when its
//! request stream breaks, or when the node's shutdown deadline passes.

use std::pin::pin;
use std::process::Stdio;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tonic::Status;

use super::STDERR_LIMIT;

const READ_CHUNK: usize = 64 * 1024;

/// One piece of the child's output.
pub enum Output {
    Stdout(Bytes),
    Stderr(Bytes),
}

/// How the child ended.
#[derive(Debug)]
pub struct Exit {
    /// The exit code, or `None` when a signal ended it.
    pub code: Option<i32>,
    /// The end of what it wrote to stderr.
    pub stderr: String,
}

impl Exit {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// Why the child did not run to its own end.
#[derive(Debug, thiserror::Error)]
pub enum PipeError {
    #[error("cannot run git: {0}")]
    Io(#[from] std::io::Error),
    #[error("the request stream broke: {0}")]
    InputBroken(String),
    #[error("the client went away")]
    ClientGone,
    #[error("the node is shutting down")]
    ShuttingDown,
}

/// Runs `command`, writing `input` to its stdin, and sends what `map` makes of its output to
/// `out`. Returns when the child has exited and been reaped.
pub async fn run<R, S, F>(
    mut command: Command,
    input: Option<S>,
    kill: &CancellationToken,
    out: &mpsc::Sender<Result<R, Status>>,
    mut map: F,
) -> Result<Exit, PipeError>
where
    S: Stream<Item = Result<Bytes, Status>> + Send + 'static,
    F: FnMut(Output) -> Option<R>,
{
    command.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn()?;
    let result = drive(&mut child, input, kill, out, &mut map).await;
    match result {
        Ok(stderr) => {
            let status = tokio::select! {
                status = child.wait() => status?,
                _ = kill.cancelled() => { reap(&mut child).await; return Err(PipeError::ShuttingDown) }
            };
            Ok(Exit {
                code: status.code(),
                stderr,
            })
        }
        Err(error) => {
            reap(&mut child).await;
            Err(error)
        }
    }
}

async fn reap(child: &mut Child) {
    super::terminate(child).await;
}

/// Pumps the pipes until stdout and stderr are both closed; returns the stderr tail.
async fn drive<R, S, F>(
    child: &mut Child,
    input: Option<S>,
    kill: &CancellationToken,
    out: &mpsc::Sender<Result<R, Status>>,
    map: &mut F,
) -> Result<String, PipeError>
where
    S: Stream<Item = Result<Bytes, Status>> + Send + 'static,
    F: FnMut(Output) -> Option<R>,
{
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let mut writer = match (input, child.stdin.take()) {
        (Some(input), Some(stdin)) => {
            Some(AbortOnDropHandle::new(tokio::spawn(feed(input, stdin))))
        }
        _ => None,
    };
    let mut stderr_tail = Vec::new();
    let (mut stdout_open, mut stderr_open) = (true, true);
    while stdout_open || stderr_open {
        let event = tokio::select! {
            _ = kill.cancelled() => return Err(PipeError::ShuttingDown),
            _ = out.closed() => return Err(PipeError::ClientGone),
            fed = async { writer.as_mut().expect("guarded").await }, if writer.is_some() => {
                writer = None;
                match fed {
                    Ok(Ok(())) => continue,
                    Ok(Err(error)) => return Err(PipeError::InputBroken(error)),
                    Err(join) => return Err(PipeError::InputBroken(join.to_string())),
                }
            }
            chunk = read_chunk(&mut stdout), if stdout_open => match chunk? {
                Some(chunk) => Output::Stdout(chunk),
                None => { stdout_open = false; continue }
            },
            chunk = read_chunk(&mut stderr), if stderr_open => match chunk? {
                Some(chunk) => {
                    stderr_tail.extend_from_slice(&chunk);
                    let excess = stderr_tail.len().saturating_sub(STDERR_LIMIT);
                    stderr_tail.drain(..excess);
                    Output::Stderr(chunk)
                }
                None => { stderr_open = false; continue }
            },
        };
        if let Some(message) = map(event) {
            tokio::select! {
                sent = out.send(Ok(message)) => sent.map_err(|_| PipeError::ClientGone)?,
                _ = kill.cancelled() => return Err(PipeError::ShuttingDown),
            }
        }
    }
    // The child closed its output; any input it did not read no longer matters, and the
    // writer is aborted when dropped here, as on every error path above.
    Ok(super::tail(&stderr_tail))
}

async fn read_chunk(reader: &mut (impl AsyncRead + Unpin)) -> std::io::Result<Option<Bytes>> {
    let mut buffer = BytesMut::with_capacity(READ_CHUNK);
    let read = reader.read_buf(&mut buffer).await?;
    Ok((read > 0).then(|| buffer.freeze()))
}

/// Copies the request stream into the child's stdin, then closes it. A child that stops
/// reading is not an error here: its exit status says what happened.
async fn feed<S>(input: S, mut stdin: ChildStdin) -> Result<(), String>
where
    S: Stream<Item = Result<Bytes, Status>> + Send,
{
    let mut input = pin!(input);
    while let Some(chunk) = input.next().await {
        let chunk = chunk.map_err(|status| status.message().to_owned())?;
        if stdin.write_all(&chunk).await.is_err() {
            return Ok(());
        }
    }
    let _ = stdin.shutdown().await;
    Ok(())
}

//! git's stateless protocol, as smart HTTP uses it.

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::prepare::Rendezvous;
use super::{Node, NodeError};
use crate::git::pipe::{self, Output};
use crate::git::pktline;
use crate::git::report::ReportScanner;
use crate::proto::smart_http_service_server::SmartHttpService;
use crate::proto::*;

/// The two git services a client can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    UploadPack,
    ReceivePack,
}

impl Service {
    pub fn command(self) -> &'static str {
        match self {
            Service::UploadPack => "upload-pack",
            Service::ReceivePack => "receive-pack",
        }
    }
}

/// Checks a GIT_PROTOCOL value: short, printable, no spaces.
pub fn check_git_protocol(value: &str) -> Result<(), NodeError> {
    if value.len() > 256 || !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(NodeError::BadRequest(
            "git_protocol must be at most 256 printable characters".into(),
        ));
    }
    Ok(())
}

/// Raises the replica's fence to a push's token while receive-pack takes the pack, so that
/// the sync of the raise is not on the push's path: when the hook checks the token as the refs
/// are committed, the fence already holds it and nothing is written. The check there still
/// decides (a newer token accepted meanwhile refuses the push); a raise refused or failed here
/// is left for the hook to report.
fn raise_ahead(replica: std::path::PathBuf, token: u64) {
    tokio::task::spawn_blocking(move || {
        if let Err(error) = super::fence::enter(&replica, token) {
            tracing::debug!(%error, token, "the fence was not raised ahead of the push");
        }
    });
}

fn is_v2(git_protocol: &str) -> bool {
    git_protocol.split(':').any(|part| part == "version=2")
}

/// One run of upload-pack or receive-pack for a client.
pub(super) struct Invocation<'a> {
    pub header: Option<&'a RepositoryHeader>,
    pub service: Service,
    /// Extra arguments, such as `--stateless-rpc`.
    pub args: &'a [&'a str],
    /// The client's GIT_PROTOCOL, empty for protocol v0.
    pub git_protocol: &'a str,
    /// The caller's fencing token: a push's ref updates are checked against the replica's
    /// fence, by the node's reference-transaction hook, as they are committed.
    pub fence: Option<u64>,
    /// A prepared push's rendezvous (see [`super::prepare`]): the hook reports the updates
    /// there and waits for the decision, which brings the token.
    pub prepare: Option<&'a std::path::Path>,
}

impl Node {
    /// The git command for an invocation, after checking the repository and protocol.
    pub(super) fn service_command(
        &self,
        invocation: &Invocation<'_>,
    ) -> Result<tokio::process::Command, NodeError> {
        let repository = self.state.storages.existing(invocation.header)?;
        check_git_protocol(invocation.git_protocol)?;
        let mut command = self.state.git.command(None);
        let hooks = match (invocation.fence, invocation.prepare) {
            (_, Some(_)) => Some((
                repository.storage.prepared_hooks_dir(),
                super::hook::PREPARED_HOOKS,
            )),
            (Some(_), None) => Some((repository.storage.hooks_dir(), super::hook::FENCED_HOOKS)),
            (None, None) => None,
        };
        if let (Service::ReceivePack, Some((dir, names))) = (invocation.service, hooks) {
            // git skips a hook it cannot run: a link whose program is gone, or is not
            // executable, would let the push through unchecked, so the push is refused instead.
            for name in names {
                let hook = dir.join(name);
                if nix::unistd::access(&hook, nix::unistd::AccessFlags::X_OK).is_err() {
                    return Err(NodeError::Io(std::io::Error::other(format!(
                        "the fence hook {} does not lead to a program it can run; restart the node",
                        hook.display()
                    ))));
                }
            }
            command
                .arg("-c")
                .arg(format!("core.hooksPath={}", dir.display()));
            if let Some(token) = invocation.fence {
                command.env(super::hook::FENCE_ENV, token.to_string());
                raise_ahead(repository.path.clone(), token);
            }
            if let Some(rendezvous) = invocation.prepare {
                command.env(super::prepare::PREPARE_ENV, rendezvous);
            }
        }
        command
            .arg(invocation.service.command())
            .args(invocation.args)
            .arg(&repository.path);
        if !invocation.git_protocol.is_empty() {
            command.env("GIT_PROTOCOL", invocation.git_protocol);
        }
        Ok(command)
    }

    /// Runs a stateless invocation and streams its stdout, sent after `prefix`, as `wrap`
    /// makes it. A failed run, or a push that receive-pack reported as failed, ends the stream
    /// with an error status.
    fn stream_service<R, S>(
        &self,
        invocation: Invocation<'_>,
        input: Option<S>,
        prefix: Option<R>,
        wrap: fn(Bytes) -> R,
    ) -> Result<ReceiverStream<Result<R, Status>>, NodeError>
    where
        R: Send + 'static,
        S: Stream<Item = Result<Bytes, Status>> + Send + 'static,
    {
        let command = self.service_command(&invocation)?;
        // A prepared push's caller reads git's report itself, where a partial push is an
        // answer and not a failure: only a failed run ends its stream with an error.
        let service = invocation.service;
        let judge_report = service == Service::ReceivePack && invocation.prepare.is_none();
        let (sender, receiver) = mpsc::channel(8);
        let kill = self.state.kill.clone();
        tokio::spawn(async move {
            if let Some(prefix) = prefix
                && sender.send(Ok(prefix)).await.is_err()
            {
                return;
            }
            let mut report = judge_report.then(ReportScanner::default);
            let exit = pipe::run(command, input, &kill, &sender, |output| match output {
                Output::Stdout(chunk) => {
                    if let Some(report) = report.as_mut() {
                        report.push(&chunk);
                    }
                    Some(wrap(chunk))
                }
                Output::Stderr(_) => None,
            })
            .await;
            let failure = match exit {
                Ok(exit) if exit.code.is_none() => Some(NodeError::Io(std::io::Error::other(
                    format!("git {} was killed by a signal", service.command()),
                ))),
                Ok(exit) if !exit.success() => Some(NodeError::BadRequest(format!(
                    "git {} failed: {}",
                    service.command(),
                    if exit.stderr.is_empty() {
                        format!("exit status {:?}", exit.code)
                    } else {
                        exit.stderr
                    }
                ))),
                Ok(_) => report.and_then(|scanner| push_failure(&scanner.finish())),
                Err(error) => Some(error.into()),
            };
            if let Some(error) = failure {
                let _ = sender.send(Err(error.into())).await;
            }
        });
        Ok(ReceiverStream::new(receiver))
    }
}

/// A push that receive-pack reported as failed, even though it exited 0.
pub fn push_failure(report: &crate::git::report::Report) -> Option<NodeError> {
    if let Some(fatal) = &report.fatal {
        return Some(NodeError::BadRequest(format!(
            "git receive-pack failed: {fatal}"
        )));
    }
    if let Some(error) = report.unpack_failed() {
        return Some(NodeError::BadRequest(format!(
            "the pushed pack was rejected ({error}); no reference was changed"
        )));
    }
    if !report.rejected.is_empty() {
        let refs: Vec<String> = report
            .rejected
            .iter()
            .map(|(name, reason)| format!("{name} ({reason})"))
            .collect();
        return Some(NodeError::Rejected(format!(
            "push rejected: {}",
            refs.join(", ")
        )));
    }
    None
}

/// The data of a streamed request, after the first message's header has been read.
fn request_data<M, F>(
    first: Bytes,
    rest: Streaming<M>,
    data: F,
) -> impl Stream<Item = Result<Bytes, Status>> + Send + 'static
where
    M: Send + 'static,
    F: Fn(M) -> Bytes + Send + 'static,
{
    tokio_stream::once(Ok(first)).chain(rest.map(move |message| message.map(&data)))
}

#[tonic::async_trait]
impl SmartHttpService for Node {
    type InfoRefsUploadPackStream = ReceiverStream<Result<InfoRefsResponse, Status>>;
    type InfoRefsReceivePackStream = ReceiverStream<Result<InfoRefsResponse, Status>>;
    type PostUploadPackStream = ReceiverStream<Result<PostUploadPackResponse, Status>>;
    type PostReceivePackStream = ReceiverStream<Result<PostReceivePackResponse, Status>>;

    async fn info_refs_upload_pack(
        &self,
        request: Request<InfoRefsRequest>,
    ) -> Result<Response<Self::InfoRefsUploadPackStream>, Status> {
        Ok(Response::new(
            self.info_refs(request.into_inner(), Service::UploadPack)?,
        ))
    }

    async fn info_refs_receive_pack(
        &self,
        request: Request<InfoRefsRequest>,
    ) -> Result<Response<Self::InfoRefsReceivePackStream>, Status> {
        Ok(Response::new(
            self.info_refs(request.into_inner(), Service::ReceivePack)?,
        ))
    }

    async fn post_upload_pack(
        &self,
        request: Request<Streaming<PostUploadPackRequest>>,
    ) -> Result<Response<Self::PostUploadPackStream>, Status> {
        let mut stream = request.into_inner();
        let first = first_message(&mut stream).await?;
        let input = request_data(first.data, stream, |message: PostUploadPackRequest| {
            message.data
        });
        let output = self.stream_service(
            Invocation {
                header: first.repository.as_ref(),
                service: Service::UploadPack,
                args: &["--stateless-rpc"],
                git_protocol: &first.git_protocol,
                fence: None,
                prepare: None,
            },
            Some(input),
            None,
            |data| PostUploadPackResponse { data },
        )?;
        Ok(Response::new(output))
    }

    async fn post_receive_pack(
        &self,
        request: Request<Streaming<PostReceivePackRequest>>,
    ) -> Result<Response<Self::PostReceivePackStream>, Status> {
        let fence = super::refs::fence_token(request.metadata())?;
        let mut stream = request.into_inner();
        let first = first_message(&mut stream).await?;
        if first.prepare {
            if fence.is_some() {
                return Err(Status::invalid_argument(
                    "a prepared push takes its token with its decision, not in its header",
                ));
            }
            return Ok(Response::new(self.prepared_receive_pack(first, stream)?));
        }
        let input = request_data(first.data, stream, |message: PostReceivePackRequest| {
            message.data
        });
        let output = self.stream_service(
            Invocation {
                header: first.repository.as_ref(),
                service: Service::ReceivePack,
                args: &["--stateless-rpc"],
                git_protocol: &first.git_protocol,
                fence,
                prepare: None,
            },
            Some(input),
            None,
            |data| PostReceivePackResponse {
                data,
                prepared: None,
            },
        )?;
        Ok(Response::new(output))
    }
}

impl Node {
    /// A prepared push (see [`super::prepare`]): receive-pack runs with the rendezvous; once
    /// its hook reports the updates, they are answered as `prepared`, and the caller's
    /// decision, the next message after its data, is handed to the hook. receive-pack's own
    /// report follows, as for any push. A caller that goes away without a decision aborts it.
    fn prepared_receive_pack(
        &self,
        first: PostReceivePackRequest,
        mut stream: Streaming<PostReceivePackRequest>,
    ) -> Result<ReceiverStream<Result<PostReceivePackResponse, Status>>, NodeError> {
        let located = self.state.storages.existing(first.repository.as_ref())?;
        let rendezvous = Rendezvous::bind(&located.storage.tmp_dir())?;
        let (data_sender, data) = mpsc::channel::<Result<Bytes, Status>>(8);
        let (decided, decision) = tokio::sync::oneshot::channel::<push_decision::Decision>();
        tokio::spawn(async move {
            let mut data_sender = Some(data_sender);
            if let Some(sender) = &data_sender
                && sender.send(Ok(first.data)).await.is_err()
            {
                return;
            }
            loop {
                match stream.message().await {
                    Ok(Some(message)) => {
                        if let Some(decision) = message.decision.and_then(|d| d.decision) {
                            let _ = decided.send(decision);
                            return;
                        }
                        if message.end_of_data {
                            // receive-pack's input ends; the decision is still to come.
                            data_sender = None;
                            continue;
                        }
                        if let Some(sender) = &data_sender
                            && sender.send(Ok(message.data)).await.is_err()
                        {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(status) => {
                        if let Some(sender) = &data_sender {
                            let _ = sender.send(Err(status)).await;
                        }
                        return;
                    }
                }
            }
        });
        let mut output = self.stream_service(
            Invocation {
                header: first.repository.as_ref(),
                service: Service::ReceivePack,
                args: &["--stateless-rpc"],
                git_protocol: &first.git_protocol,
                fence: None,
                prepare: Some(rendezvous.path()),
            },
            Some(ReceiverStream::new(data)),
            None,
            |data| PostReceivePackResponse {
                data,
                prepared: None,
            },
        )?;
        let (sender, receiver) = mpsc::channel(8);
        tokio::spawn(async move {
            let step = super::prepare::decide(rendezvous, decision, sender.clone());
            tokio::pin!(step);
            let mut deciding = true;
            loop {
                tokio::select! {
                    item = output.next() => match item {
                        // receive-pack is over: a rendezvous not reached yet never will be.
                        None => return,
                        Some(item) => {
                            if sender.send(item).await.is_err() {
                                return;
                            }
                        }
                    },
                    () = &mut step, if deciding => deciding = false,
                }
            }
        });
        Ok(ReceiverStream::new(receiver))
    }

    fn info_refs(
        &self,
        request: InfoRefsRequest,
        service: Service,
    ) -> Result<ReceiverStream<Result<InfoRefsResponse, Status>>, NodeError> {
        // Protocol v0 and v1 answers start with the service announcement; v2 answers do not.
        // receive-pack has no v2 and answers a v2 request in v0.
        let v2 = service == Service::UploadPack && is_v2(&request.git_protocol);
        let prefix = (!v2).then(|| {
            let mut data =
                pktline::encode(format!("# service=git-{}\n", service.command()).as_bytes());
            data.extend_from_slice(b"0000");
            InfoRefsResponse { data: data.into() }
        });
        self.stream_service(
            Invocation {
                header: request.repository.as_ref(),
                service,
                args: &["--stateless-rpc", "--advertise-refs"],
                git_protocol: &request.git_protocol,
                fence: None,
                prepare: None,
            },
            None::<tokio_stream::Empty<Result<Bytes, Status>>>,
            prefix,
            |data| InfoRefsResponse { data },
        )
    }
}

/// The first message of a client stream, which must exist.
pub(super) async fn first_message<M>(stream: &mut Streaming<M>) -> Result<M, Status> {
    match stream.message().await? {
        Some(message) => Ok(message),
        None => Err(NodeError::BadRequest(
            "the request stream is empty: the first message must carry the repository header"
                .into(),
        )
        .into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_versions() {
        assert!(is_v2("version=2"));
        assert!(is_v2("object-format=sha1:version=2"));
        assert!(!is_v2(""));
        assert!(!is_v2("version=1"));
        assert!(check_git_protocol("version=2").is_ok());
        assert!(check_git_protocol("version=2\nx").is_err());
    }
}

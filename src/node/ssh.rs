//! git's full-duplex protocol, the form git speaks over ssh: stdin in, stdout and stderr out,
//! and the exit status at the end.

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::smarthttp::{Invocation, Service, first_message};
use super::{Node, NodeError};
use crate::git::pipe::{self, Output};
use crate::proto::ssh_service_server::SshService;
use crate::proto::*;

type SshStream = ReceiverStream<Result<SshResponse, Status>>;

impl Node {
    async fn ssh(
        &self,
        request: Request<Streaming<SshRequest>>,
        service: Service,
    ) -> Result<SshStream, Status> {
        let fence = super::refs::fence_token(request.metadata())?;
        let mut stream = request.into_inner();
        let first = first_message(&mut stream).await?;
        let command = self.service_command(&Invocation {
            header: first.repository.as_ref(),
            service,
            args: &[],
            git_protocol: &first.git_protocol,
            fence,
            prepare: None,
        })?;
        let input = stdin_of(first, stream);
        let (sender, receiver) = mpsc::channel(8);
        let kill = self.state.kill.clone();
        tokio::spawn(async move {
            let exit = pipe::run(command, Some(input), &kill, &sender, |output| {
                Some(match output {
                    Output::Stdout(stdout) => SshResponse {
                        stdout,
                        ..Default::default()
                    },
                    Output::Stderr(stderr) => SshResponse {
                        stderr,
                        ..Default::default()
                    },
                })
            })
            .await;
            let last = match exit {
                Ok(exit) => Ok(SshResponse {
                    exit_status: Some(exit.code.unwrap_or(128)),
                    ..Default::default()
                }),
                Err(error) => Err(NodeError::from(error).into()),
            };
            let _ = sender.send(last).await;
        });
        Ok(ReceiverStream::new(receiver))
    }
}

/// The client's stdin: every message's bytes, up to the message that closes it.
fn stdin_of(
    first: SshRequest,
    mut rest: Streaming<SshRequest>,
) -> ReceiverStream<Result<Bytes, Status>> {
    let (sender, receiver) = mpsc::channel(4);
    tokio::spawn(async move {
        let mut closed = first.close_stdin;
        if sender.send(Ok(first.stdin)).await.is_err() {
            return;
        }
        while !closed {
            let chunk = match rest.message().await {
                Ok(Some(message)) => {
                    closed = message.close_stdin;
                    Ok(message.stdin)
                }
                Ok(None) => return,
                Err(status) => Err(status),
            };
            let broken = chunk.is_err();
            if sender.send(chunk).await.is_err() || broken {
                return;
            }
        }
    });
    ReceiverStream::new(receiver)
}

#[tonic::async_trait]
impl SshService for Node {
    type SshUploadPackStream = SshStream;
    type SshReceivePackStream = SshStream;

    async fn ssh_upload_pack(
        &self,
        request: Request<Streaming<SshRequest>>,
    ) -> Result<Response<SshStream>, Status> {
        Ok(Response::new(self.ssh(request, Service::UploadPack).await?))
    }

    async fn ssh_receive_pack(
        &self,
        request: Request<Streaming<SshRequest>>,
    ) -> Result<Response<SshStream>, Status> {
        Ok(Response::new(
            self.ssh(request, Service::ReceivePack).await?,
        ))
    }
}

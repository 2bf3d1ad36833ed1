//! A push in git's full-duplex form (`SshReceivePack`, what `gitfleet bridge ssh` speaks).
//! git reads the ref advertisement before it sends its commands, so one up-to-date replica
//! advertises first and is then dismissed without a command. The push itself is a two-phase
//! push like one over HTTP: from its commands on, the client's input is the bytes git's
//! stateless form takes, so the replicas get it as `PostReceivePack`, and git's report comes
//! back as the session's output.

use bytes::Bytes;
use prost::Message as _;
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument as _;

use super::{Write, check_reachable, push};
use crate::git::pktline::{Decoder, Packet};
use crate::model::StorageName;
use crate::proto::{PostReceivePackRequest, PostReceivePackResponse, SshRequest, SshResponse};
use crate::proxy::error::ProxyError;
use crate::proxy::forward::{choose, later_messages, lookup, send};
use crate::proxy::response::ResponseStream;
use crate::proxy::{Call, Proxy, header};

pub(in crate::proxy) const SSH_RECEIVE_PACK: &str = "/gitfleet.v1.SshService/SshReceivePack";

pub(in crate::proxy) async fn receive_pack(
    proxy: &Proxy,
    call: Call,
) -> Result<Response<ResponseStream>, ProxyError> {
    let record = lookup(proxy, &call).await?;
    check_reachable(proxy, &record, &call.repository())?;
    let advertiser = choose(&proxy.state.nodes, &record, false, &call.repository())?;
    let (advertiser_tx, advertiser_rx) = mpsc::channel::<Bytes>(16);
    // The advertiser must never see a command: it gets the header and the protocol only.
    let opening = SshRequest::decode(call.first.clone())
        .map_err(|_| ProxyError::Undecodable("SshRequest"))?;
    let first = Bytes::from(
        SshRequest {
            repository: Some(crate::fleet::replica_header(
                &advertiser,
                &record.replica_path,
            )),
            git_protocol: opening.git_protocol,
            ..Default::default()
        }
        .encode_to_vec(),
    );
    let request = Request::new(tokio_stream::once(first).chain(ReceiverStream::new(advertiser_rx)));
    let advertisement = send(proxy, &advertiser, SSH_RECEIVE_PACK, request)
        .await?
        .into_inner();

    let (out_tx, out_rx) = mpsc::channel::<Result<Bytes, Status>>(16);
    let session = Session {
        proxy: proxy.clone(),
        advertiser,
        advertiser_tx,
        out_tx: out_tx.clone(),
    };
    let work = async move {
        if let Err(error) = session.run(call, advertisement).await {
            let _ = out_tx.send(Err(Status::from(error))).await;
        }
    };
    proxy
        .state
        .writes
        .spawn(work.instrument(tracing::Span::current()));
    Ok(Response::new(Box::pin(ReceiverStream::new(out_rx))))
}

struct Session {
    proxy: Proxy,
    advertiser: StorageName,
    advertiser_tx: mpsc::Sender<Bytes>,
    out_tx: mpsc::Sender<Result<Bytes, Status>>,
}

impl Session {
    async fn run(
        self,
        mut call: Call,
        mut advertisement: Streaming<Bytes>,
    ) -> Result<(), ProxyError> {
        let node_error = |status| ProxyError::Node {
            storage: self.advertiser.clone(),
            status,
        };
        // The advertisement goes to the client as it comes, up to its closing flush.
        let mut cut = AdvertisementCut::default();
        loop {
            let Some(message) = advertisement.message().await.map_err(node_error)? else {
                return Ok(());
            };
            let done = cut.is_done_after(&message);
            let finished = SshResponse::decode(message.clone())
                .map(|response| response.exit_status.is_some())
                .unwrap_or(true);
            if self.out_tx.send(Ok(message)).await.is_err() {
                return Ok(());
            }
            if finished {
                return Ok(());
            }
            if done {
                break;
            }
        }

        let head = push::read_head(&call.first, &mut call.inbound).await?;
        head.check_reportable()?;
        if head.changes.is_empty() {
            // Nothing to write (git push --dry-run, or everything up to date): the advertiser
            // answers the rest.
            for message in head.messages {
                let _ = self.advertiser_tx.send(message).await;
            }
            let mut rest = std::pin::pin!(later_messages(call.inbound));
            let forward = async {
                while let Some(message) = rest.next().await {
                    if self.advertiser_tx.send(message).await.is_err() {
                        break;
                    }
                }
            };
            let relay = async {
                while let Some(message) = advertisement.message().await.transpose() {
                    if self.out_tx.send(message).await.is_err() {
                        break;
                    }
                }
            };
            tokio::join!(forward, relay);
            return Ok(());
        }

        // The advertiser is dismissed with an empty command list.
        let dismissal = SshRequest {
            stdin: Bytes::from_static(b"0000"),
            close_stdin: true,
            ..Default::default()
        };
        let _ = self
            .advertiser_tx
            .send(Bytes::from(dismissal.encode_to_vec()))
            .await;
        drop(self.advertiser_tx);
        while let Ok(Some(_)) = advertisement.message().await {}

        // The replicas take the push as git's stateless form, a two-phase push like any other:
        // the client's input, from its commands on, is the same bytes.
        let opening = SshRequest::decode(call.first.clone())
            .map_err(|_| ProxyError::Undecodable("SshRequest"))?;
        let first = Bytes::from(
            PostReceivePackRequest {
                repository: Some(crate::proto::RepositoryHeader {
                    storage: call.virtual_storage.to_string(),
                    relative_path: call.relative_path.to_string(),
                }),
                git_protocol: opening.git_protocol,
                data: opening.stdin,
                ..Default::default()
            }
            .encode_to_vec(),
        );
        let located = header::locate(&first)?.ok_or(header::HeaderError::Missing)?;
        let mut closed = opening.close_stdin;
        let mut input = move |message: Bytes| -> Option<Bytes> {
            if closed {
                return None;
            }
            let request = SshRequest::decode(message).ok()?;
            closed = request.close_stdin;
            let data = PostReceivePackRequest {
                data: request.stdin,
                ..Default::default()
            };
            Some(Bytes::from(data.encode_to_vec()))
        };
        let prefix: Vec<Bytes> = head.messages.into_iter().map_while(&mut input).collect();
        let write = Write::converted_push(
            &self.proxy,
            call,
            (first, located),
            prefix,
            input,
            head.changes,
        );
        let reply = write.push(head.capabilities, false).await?;
        for message in reply.messages {
            let Ok(answer) = PostReceivePackResponse::decode(message) else {
                continue;
            };
            let stdout = SshResponse {
                stdout: answer.data,
                ..Default::default()
            };
            if self
                .out_tx
                .send(Ok(Bytes::from(stdout.encode_to_vec())))
                .await
                .is_err()
            {
                return Ok(());
            }
        }
        let exit = SshResponse {
            exit_status: Some(0),
            ..Default::default()
        };
        let _ = self
            .out_tx
            .send(Ok(Bytes::from(exit.encode_to_vec())))
            .await;
        Ok(())
    }
}

/// Finds where receive-pack's ref advertisement ends in its stdout: at the first flush.
#[derive(Debug, Default)]
struct AdvertisementCut {
    decoder: Decoder,
    done: bool,
}

impl AdvertisementCut {
    /// Feeds a message of the advertiser; true once the advertisement is complete.
    fn is_done_after(&mut self, message: &Bytes) -> bool {
        if let Ok(response) = SshResponse::decode(message.clone()) {
            self.feed(&response.stdout);
        }
        self.done
    }

    /// Reads advertisement bytes; returns how many of `stdout` belonged to it.
    fn feed(&mut self, stdout: &Bytes) -> usize {
        if self.done {
            return 0;
        }
        let mut consumed = 0;
        for byte in stdout.iter() {
            consumed += 1;
            self.decoder.push(std::slice::from_ref(byte));
            if let Some(packet) = self.decoder.next_packet()
                && matches!(packet, Ok(Packet::Flush) | Err(_))
            {
                self.done = true;
                return consumed;
            }
        }
        consumed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::git::pktline::encode;

    fn stdout(bytes: &[u8]) -> Bytes {
        Bytes::from(
            SshResponse {
                stdout: Bytes::copy_from_slice(bytes),
                ..Default::default()
            }
            .encode_to_vec(),
        )
    }

    #[test]
    fn the_advertisement_ends_at_its_flush() {
        let mut advertisement =
            encode(b"0000000000000000000000000000000000000000 capabilities^{}\0report-status\n");
        advertisement.extend(b"0000");
        let (head, tail) = advertisement.split_at(20);
        let mut cut = AdvertisementCut::default();
        assert!(!cut.is_done_after(&stdout(head)));
        assert!(cut.is_done_after(&stdout(tail)));
    }
}

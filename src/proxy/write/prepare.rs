//! The replica side of a two-phase push: one prepared `PostReceivePack` call per target, the
//! client's stream teed to all of them. Each call reports when its replica has the pack in
//! quarantine and the ref updates it is ready to make, then waits for the decision the
//! coordinator sends on the same stream, and finally ends with git's own answer.

use std::time::Duration;

use bytes::Bytes;
use prost::Message as _;
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Status};

use super::fanout::REPLICA_STALL_TIMEOUT;
use super::{Inbound, Reply};
use crate::model::{RelativePath, StorageName};
use crate::proto::{PostReceivePackRequest, PostReceivePackResponse, PushDecision, push_decision};
use crate::proxy::Proxy;
use crate::proxy::error::ProxyError;
use crate::proxy::forward::send;
use crate::proxy::header::{self, Located};
use crate::store::RefChange;

const POST_RECEIVE_PACK: &str = "/gitfleet.v1.SmartHttpService/PostReceivePack";
/// The most answer bytes kept per replica.
const MAX_RESPONSE_BYTES: usize = 16 << 20;
/// How long a decision may wait for room on a replica's stream.
const DECISION_SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// What one replica's call has come to.
pub(super) enum Event {
    /// The replica holds the pack and is ready to make these ref updates.
    Prepared(usize, Vec<RefChange>),
    /// The call is over: git's answer, or why there is none.
    Finished(usize, Result<Reply, Status>),
}

/// The fields of a push request only the proxy may set. A client's message that carries one
/// ends its stream: a client never decides a prepared push.
#[derive(Clone, PartialEq, prost::Message)]
struct Control {
    #[prost(bool, tag = "4")]
    prepare: bool,
    #[prost(message, optional, tag = "5")]
    decision: Option<PushDecision>,
    #[prost(bool, tag = "6")]
    end_of_data: bool,
}

/// Whether a client's push message is free of the proxy's own fields.
pub(super) fn check_client_message(message: &Bytes) -> Result<(), ProxyError> {
    match Control::decode(message.clone()) {
        Ok(control) if !control.prepare && control.decision.is_none() && !control.end_of_data => {
            Ok(())
        }
        Ok(_) => Err(ProxyError::ClientFence(
            "a push's prepare, decision or end of data",
        )),
        Err(_) => Err(ProxyError::Undecodable("PostReceivePackRequest")),
    }
}

/// The running calls of one push.
pub(super) struct Replicas {
    pub storages: Vec<StorageName>,
    /// Each call's stream, for its decision; None once decided.
    streams: Vec<Option<mpsc::Sender<Bytes>>>,
    pub events: mpsc::Receiver<Event>,
}

/// Where a push's calls go and what they start with.
pub(super) struct Opening<'a> {
    pub first: &'a Bytes,
    pub located: &'a Located,
    pub prefix: &'a [Bytes],
    pub replica_path: &'a RelativePath,
    pub timeout: Duration,
}

/// Starts a prepared push on every storage, and tees `inbound` to all of them.
pub(super) fn start(
    proxy: &Proxy,
    storages: &[StorageName],
    opening: Opening<'_>,
    inbound: Option<Inbound>,
) -> Replicas {
    let (event_tx, events) = mpsc::channel(2 * storages.len() + 2);
    let mut streams = Vec::with_capacity(storages.len());
    let mut tee_senders = Vec::with_capacity(storages.len());
    for (index, storage) in storages.iter().enumerate() {
        let (message_tx, message_rx) = mpsc::channel::<Bytes>(16);
        tee_senders.push(message_tx.clone());
        streams.push(Some(message_tx));
        let mut first = header::rewrite(
            opening.first,
            opening.located,
            storage.as_str(),
            opening.replica_path.as_str(),
        )
        .to_vec();
        // Field 4, `prepare`, set last: it wins over anything before it.
        first.extend_from_slice(&[0x20, 0x01]);
        let outbound = tokio_stream::once(Bytes::from(first))
            .chain(tokio_stream::iter(opening.prefix.to_vec()))
            .chain(ReceiverStream::new(message_rx));
        let mut request = Request::new(outbound);
        request.set_timeout(opening.timeout);
        let (proxy, storage, events) = (proxy.clone(), storage.clone(), event_tx.clone());
        tokio::spawn(async move {
            let finished = call(&proxy, &storage, index, request, &events).await;
            let _ = events.send(Event::Finished(index, finished)).await;
        });
    }
    if let Some(inbound) = inbound {
        tokio::spawn(tee(inbound, tee_senders));
    }
    Replicas {
        storages: storages.to_vec(),
        streams,
        events,
    }
}

impl Replicas {
    /// Tells replica `index` to commit under `token`.
    pub async fn commit(&mut self, index: usize, token: i64) -> bool {
        let decision = push_decision::Decision::CommitToken(token as u64);
        self.decide(index, decision).await
    }

    /// Tells replica `index` to drop the push, and why.
    pub async fn abort(&mut self, index: usize, reason: &str) {
        let decision = push_decision::Decision::AbortReason(reason.to_owned());
        self.decide(index, decision).await;
    }

    /// Aborts every replica not decided yet.
    pub async fn abort_all(&mut self, reason: &str) {
        for index in 0..self.streams.len() {
            self.abort(index, reason).await;
        }
    }

    async fn decide(&mut self, index: usize, decision: push_decision::Decision) -> bool {
        let Some(stream) = self.streams.get_mut(index).and_then(Option::take) else {
            return false;
        };
        let message = PostReceivePackRequest {
            decision: Some(PushDecision {
                decision: Some(decision),
            }),
            ..Default::default()
        };
        matches!(
            tokio::time::timeout(
                DECISION_SEND_TIMEOUT,
                stream.send(Bytes::from(message.encode_to_vec()))
            )
            .await,
            Ok(Ok(()))
        )
    }
}

/// One replica's call: its answer's data messages, with the `prepared` one reported as an
/// event instead.
async fn call(
    proxy: &Proxy,
    storage: &StorageName,
    index: usize,
    request: Request<impl tokio_stream::Stream<Item = Bytes> + Send + 'static>,
    events: &mpsc::Sender<Event>,
) -> Result<Reply, Status> {
    let response = match send(proxy, storage, POST_RECEIVE_PACK, request).await {
        Ok(response) => response,
        Err(ProxyError::Node { status, .. }) => return Err(status),
        Err(error) => return Err(Status::internal(error.to_string())),
    };
    let (metadata, mut stream, _) = response.into_parts();
    let mut messages = Vec::new();
    let mut size = 0;
    while let Some(message) = stream.message().await? {
        let decoded = PostReceivePackResponse::decode(message.clone())
            .map_err(|_| Status::internal("the node's answer is not a PostReceivePackResponse"))?;
        if let Some(prepared) = decoded.prepared {
            let updates = prepared
                .updates
                .into_iter()
                .map(|update| RefChange {
                    name: update.name,
                    old: update.old_target,
                    new: update.new_target,
                })
                .collect();
            let _ = events.send(Event::Prepared(index, updates)).await;
            continue;
        }
        size += message.len();
        if size > MAX_RESPONSE_BYTES {
            return Err(Status::resource_exhausted(format!(
                "the node's answer is larger than {MAX_RESPONSE_BYTES} bytes"
            )));
        }
        messages.push(message);
    }
    Ok(Reply { metadata, messages })
}

/// Passes the client's messages to every replica; one that stops reading is dropped, and the
/// others go on.
async fn tee(inbound: Inbound, mut senders: Vec<mpsc::Sender<Bytes>>) {
    let inbound = inbound.map_while(|message| {
        check_client_message(&message).ok()?;
        Some(message)
    });
    super::fanout::tee(Box::pin(inbound), &mut senders).await;
    // However the client's stream ended, receive-pack's input ends with it.
    let end = Bytes::from(
        PostReceivePackRequest {
            end_of_data: true,
            ..Default::default()
        }
        .encode_to_vec(),
    );
    for sender in senders {
        let _ = tokio::time::timeout(REPLICA_STALL_TIMEOUT, sender.send(end.clone())).await;
    }
}

/// The data git wrote in an answer, its messages' `data` fields joined.
pub(super) fn answer_data(reply: &Reply) -> Vec<u8> {
    let mut data = Vec::new();
    for message in &reply.messages {
        if let Ok(decoded) = PostReceivePackResponse::decode(message.clone()) {
            data.extend_from_slice(&decoded.data);
        }
    }
    data
}

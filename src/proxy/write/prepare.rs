//! The replica side of a two-phase write: one prepared call per target (`PostReceivePack` for a
//! push, with the client's stream teed to all of them; `PrepareRefs` for a reference change).
//! Each call reports when its replica is ready (a push's pack in quarantine) and the ref
//! updates it is ready to make, then waits for the decision the coordinator sends on the same
//! stream, and finally ends with the replica's answer (git's own report, for a push).

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
use crate::proto::{
    PostReceivePackRequest, PostReceivePackResponse, PrepareRefsRequest, PreparedPush,
    PushDecision, push_decision,
};
use crate::proxy::Proxy;
use crate::proxy::error::ProxyError;
use crate::proxy::forward::send;
use crate::proxy::header::{self, Located};
use crate::store::RefChange;

const POST_RECEIVE_PACK: &str = "/gitfleet.v1.SmartHttpService/PostReceivePack";
const PREPARE_REFS: &str = "/gitfleet.v1.NodeService/PrepareRefs";
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

/// A replica's answer with the updates it is ready to make: `PostReceivePackResponse` and
/// `PrepareRefsResponse` carry them in the same field.
#[derive(Clone, PartialEq, prost::Message)]
struct PreparedAnswer {
    #[prost(message, optional, tag = "2")]
    prepared: Option<PreparedPush>,
}

/// Which prepared call a write makes on each replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// `PostReceivePack`, prepared.
    Push,
    /// `PrepareRefs`.
    Refs,
}

impl Kind {
    fn path(self) -> &'static str {
        match self {
            Kind::Push => POST_RECEIVE_PACK,
            Kind::Refs => PREPARE_REFS,
        }
    }

    fn decision(self, decision: push_decision::Decision) -> Bytes {
        let decision = Some(PushDecision {
            decision: Some(decision),
        });
        match self {
            Kind::Push => PostReceivePackRequest {
                decision,
                ..Default::default()
            }
            .encode_to_vec(),
            Kind::Refs => PrepareRefsRequest {
                decision,
                ..Default::default()
            }
            .encode_to_vec(),
        }
        .into()
    }
}

/// The running calls of one write.
pub(super) struct Replicas {
    kind: Kind,
    pub storages: Vec<StorageName>,
    /// Each call's stream, for its decision; None once decided.
    streams: Vec<Option<mpsc::Sender<Bytes>>>,
    pub events: mpsc::Receiver<Event>,
}

/// What a write's calls start with.
pub(super) struct Opening<'a> {
    pub kind: Kind,
    /// Each replica's first message.
    pub first: &'a (dyn Fn(&StorageName) -> Bytes + Sync),
    /// The client's messages already read, after the first (a push's).
    pub prefix: &'a [Bytes],
    pub timeout: Duration,
}

/// A push's first message for one replica: the client's, with the replica's header and
/// `prepare` set.
pub(super) fn push_opening(
    first: &Bytes,
    located: &Located,
    storage: &StorageName,
    replica_path: &RelativePath,
) -> Bytes {
    let mut first =
        header::rewrite(first, located, storage.as_str(), replica_path.as_str()).to_vec();
    // Field 4, `prepare`, set last: it wins over anything before it.
    first.extend_from_slice(&[0x20, 0x01]);
    Bytes::from(first)
}

/// Starts a prepared call on every storage, and tees `inbound` (a push's) to all of them.
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
        let outbound = tokio_stream::once((opening.first)(storage))
            .chain(tokio_stream::iter(opening.prefix.to_vec()))
            .chain(ReceiverStream::new(message_rx));
        let mut request = Request::new(outbound);
        request.set_timeout(opening.timeout);
        let (proxy, storage, events) = (proxy.clone(), storage.clone(), event_tx.clone());
        let path = opening.kind.path();
        tokio::spawn(async move {
            let finished = call(&proxy, &storage, (path, index), request, &events).await;
            let _ = events.send(Event::Finished(index, finished)).await;
        });
    }
    if let Some(inbound) = inbound {
        tokio::spawn(tee(inbound, tee_senders));
    }
    Replicas {
        kind: opening.kind,
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
        let message = self.kind.decision(decision);
        matches!(
            tokio::time::timeout(DECISION_SEND_TIMEOUT, stream.send(message)).await,
            Ok(Ok(()))
        )
    }
}

/// One replica's call (to `path`): its answer's messages, with the `prepared` one reported as
/// an event instead.
async fn call(
    proxy: &Proxy,
    storage: &StorageName,
    (path, index): (&'static str, usize),
    request: Request<impl tokio_stream::Stream<Item = Bytes> + Send + 'static>,
    events: &mpsc::Sender<Event>,
) -> Result<Reply, Status> {
    let response = match send(proxy, storage, path, request).await {
        Ok(response) => response,
        Err(ProxyError::Node { status, .. }) => return Err(status),
        Err(error) => return Err(Status::internal(error.to_string())),
    };
    let (metadata, mut stream, _) = response.into_parts();
    let mut messages = Vec::new();
    let mut size = 0;
    while let Some(message) = stream.message().await? {
        let decoded = PreparedAnswer::decode(message.clone())
            .map_err(|_| Status::internal("the node's answer cannot be decoded"))?;
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

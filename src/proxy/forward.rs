//! Accessors: one up-to-date replica on a healthy node serves the call, chosen at random among
//! equals, and its answer streams back untouched.

use std::sync::Arc;

use bytes::Bytes;
use rand::seq::IndexedRandom as _;
use tokio_stream::{Stream, StreamExt as _};
use tonic::{Request, Response, Status};

use super::error::ProxyError;
use super::response::{ResponseStream, streamed};
use super::{Call, Proxy, ROUTE_HEADER, header};
use crate::fleet::Nodes;
use crate::model::StorageName;
use crate::store::RepositoryRecord;

pub(super) async fn accessor(
    proxy: &Proxy,
    call: Call,
) -> Result<Response<ResponseStream>, ProxyError> {
    let record = lookup(proxy, &call).await?;
    let primary = call
        .metadata
        .get(ROUTE_HEADER)
        .is_some_and(|value| value.as_bytes() == b"primary");
    let deadline = call.deadline();
    let repository = call.repository();
    let inbound = Replayable::new(later_messages(call.inbound));
    let mut failed: Vec<StorageName> = Vec::new();
    let mut last_failure = None;
    loop {
        let storage = match choose_among(&proxy.state.nodes, &record, primary, &repository, &failed)
        {
            Ok(storage) => storage,
            // Every replica was tried: the caller gets the last one's answer.
            Err(error) => return Err(last_failure.unwrap_or(error)),
        };
        tracing::debug!(%storage, generation = record.generation, "routing read");
        if let Some(node) = proxy.state.nodes.get(&storage) {
            node.count_read();
        }
        let first = header::rewrite(
            &call.first,
            &call.located,
            storage.as_str(),
            record.replica_path.as_str(),
        );
        let outbound = tokio_stream::once(first).chain(inbound.clone());
        let mut request = Request::new(outbound);
        if let Some(deadline) = deadline {
            request.set_timeout(deadline);
        }
        let sent = send(proxy, &storage, call.info.path, request).await;
        let Err(ProxyError::Node { status, .. }) = &sent else {
            return sent.map(streamed);
        };
        let missing = is_missing_repository(status);
        if missing {
            suspect(proxy, &record, &storage);
        }
        // Another replica can answer as long as none of the caller's later messages went
        // to this one.
        if (missing || is_transport_failure(status)) && inbound.replayable() {
            tracing::warn!(%storage, %status, "a replica could not serve a read; trying another");
            failed.push(storage);
            last_failure = sent.err();
            continue;
        }
        return sent.map(streamed);
    }
}

/// Whether a call failed on the way (no connection, a connection that broke) rather than
/// being answered by the node.
fn is_transport_failure(status: &Status) -> bool {
    is_unreachable(status)
        || (matches!(status.code(), tonic::Code::Unknown | tonic::Code::Internal)
            && status.metadata().get("content-type").is_none())
}

/// The caller's later messages, shared by every attempt at a read, so that a read can go to
/// another replica when the first failed before any of them was sent on.
#[derive(Clone)]
struct Replayable {
    inner: Arc<std::sync::Mutex<ReplayState>>,
}

struct ReplayState {
    stream: std::pin::Pin<Box<dyn Stream<Item = Bytes> + Send>>,
    yielded: bool,
    ended: bool,
}

impl Replayable {
    fn new(stream: impl Stream<Item = Bytes> + Send + 'static) -> Self {
        Self {
            inner: Arc::new(std::sync::Mutex::new(ReplayState {
                stream: Box::pin(stream),
                yielded: false,
                ended: false,
            })),
        }
    }

    /// True while no message has gone to a replica.
    fn replayable(&self) -> bool {
        !self.inner.lock().unwrap_or_else(|e| e.into_inner()).yielded
    }
}

impl Stream for Replayable {
    type Item = Bytes;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Bytes>> {
        let mut state = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if state.ended {
            return std::task::Poll::Ready(None);
        }
        let next = state.stream.as_mut().poll_next(cx);
        match &next {
            std::task::Poll::Ready(Some(_)) => state.yielded = true,
            std::task::Poll::Ready(None) => state.ended = true,
            std::task::Poll::Pending => {}
        }
        next
    }
}

/// Whether a node answered that the repository itself is not there (rather than a revision
/// or a path in it).
fn is_missing_repository(status: &Status) -> bool {
    status.code() == tonic::Code::NotFound
        && status
            .metadata()
            .contains_key(crate::node::MISSING_REPOSITORY)
}

/// A replica the catalog holds up to date answered that it does not exist: it goes first in
/// the verifier's line, which records it missing and so has it repaired, instead of waiting
/// for its turn. In the background; the read's answer does not wait for it.
fn suspect(proxy: &Proxy, record: &RepositoryRecord, storage: &StorageName) {
    tracing::warn!(%storage, repository = record.id.0, "an up-to-date replica is missing on its node; verifying it now");
    let store = proxy.state.store.clone();
    let (id, storage) = (record.id, storage.clone());
    tokio::spawn(async move {
        if let Err(error) = store.request_verification(Some(id), Some(&storage)).await {
            tracing::debug!(%error, "the verification was not requested");
        }
    });
}

/// The repository a call names, from the routing cache. One a push made and has not written
/// to yet is not there for anyone else: it exists once the push's refs commit.
pub(super) async fn lookup(
    proxy: &Proxy,
    call: &Call,
) -> Result<Arc<RepositoryRecord>, ProxyError> {
    proxy
        .state
        .routing
        .lookup(&call.virtual_storage, &call.relative_path)
        .await?
        .filter(|record| !record.unborn)
        .ok_or_else(|| ProxyError::NotFound(call.repository()))
}

/// Sends a call to one storage's node. A node that cannot be reached is marked unhealthy at
/// once; the prober brings it back.
pub(super) async fn send<S>(
    proxy: &Proxy,
    storage: &StorageName,
    path: &'static str,
    request: Request<S>,
) -> Result<tonic::Response<tonic::Streaming<Bytes>>, ProxyError>
where
    S: Stream<Item = Bytes> + Send + 'static,
{
    let nodes = &proxy.state.nodes;
    let node = nodes.get(storage).ok_or_else(|| ProxyError::Node {
        storage: storage.clone(),
        status: Status::unavailable("the storage is not configured on this proxy"),
    })?;
    node.call(path, request).await.map_err(|status| {
        // A connection that broke mid-call (the node died) comes back as CANCELLED, which the
        // proxy never asks for: the node could not be reached, and a caller may try again.
        let status = match status.code() {
            tonic::Code::Cancelled => Status::unavailable(format!(
                "the connection to the node broke: {}",
                status.message()
            )),
            _ => status,
        };
        if is_unreachable(&status) {
            nodes.report_unreachable(storage);
        }
        ProxyError::Node {
            storage: storage.clone(),
            status,
        }
    })
}

/// Whether a status says the node could not be reached at all (rather than that it refused).
pub(super) fn is_unreachable(status: &Status) -> bool {
    status.code() == tonic::Code::Unavailable
        && status.metadata().get("gitfleet-error-source").is_none()
        && status.metadata().get("content-type").is_none()
}

/// The messages after the first: passed on while they are well formed. A message that
/// carries a header of its own, or a broken client stream, ends the stream early; the node
/// then sees an incomplete request and changes nothing.
pub(super) fn later_messages(
    inbound: tonic::Streaming<Bytes>,
) -> impl Stream<Item = Bytes> + Send + 'static {
    inbound.map_while(|message| match message {
        Ok(message) if header::check_not_first(&message).is_ok() => Some(message),
        _ => None,
    })
}

/// Picks the replica for a read: up to date, on a healthy node, at random among equals.
pub(super) fn choose(
    nodes: &Nodes,
    record: &RepositoryRecord,
    primary: bool,
    repository: &str,
) -> Result<StorageName, ProxyError> {
    choose_among(nodes, record, primary, repository, &[])
}

/// As [`choose`], leaving out the replicas in `failed`.
fn choose_among(
    nodes: &Nodes,
    record: &RepositoryRecord,
    primary: bool,
    repository: &str,
    failed: &[StorageName],
) -> Result<StorageName, ProxyError> {
    let candidates: Vec<&StorageName> = record
        .up_to_date()
        .filter(|storage| nodes.is_healthy(storage) && !failed.contains(storage))
        .collect();
    if primary {
        return if candidates.contains(&&record.primary) {
            Ok(record.primary.clone())
        } else {
            Err(ProxyError::NoReplica {
                repository: repository.to_owned(),
                reason: format!(
                    "the primary, {}, was asked for and is outdated or unhealthy",
                    record.primary
                ),
            })
        };
    }
    match candidates.choose(&mut rand::rng()) {
        Some(storage) => Ok((*storage).clone()),
        None => Err(ProxyError::NoReplica {
            repository: repository.to_owned(),
            reason: describe_replicas(nodes, record),
        }),
    }
}

/// "s1 at generation 3 (unhealthy), s2 at generation 2 (outdated)", for error messages.
fn describe_replicas(nodes: &Nodes, record: &RepositoryRecord) -> String {
    if record.replicas.is_empty() {
        return "no replica is recorded yet".into();
    }
    record
        .replicas
        .iter()
        .map(|(storage, generation)| {
            let mut state = Vec::new();
            if *generation != record.generation {
                state.push("outdated");
            }
            if !nodes.is_healthy(storage) {
                state.push("unhealthy");
            }
            format!(
                "{storage} at generation {generation} of {} ({})",
                record.generation,
                state.join(", ")
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

//! Mutators, each a two-phase commit on the replicas: the write is recorded as pending before
//! any replica sees it, prepared on every assigned replica with no lease (a push's pack in
//! quarantine, a reference change checked), then, once a majority has prepared it alike, made
//! under the lease's token and committed as a new generation before the caller hears anything.
//! Pushes: [`two_phase`]; `UpdateRefs` and `SetDefaultBranch`: [`ref_change`].

mod close;
mod fanout;
mod lease;
mod open;
mod prepare;
mod push;
mod ref_change;
mod ssh_push;
mod two_phase;
mod undo;

use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message as _;
use tokio_stream::StreamExt as _;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataMap;
use tonic::{Response, Status, Streaming};
use tracing::Instrument as _;

use super::error::ProxyError;
use super::forward::later_messages;
use super::header::Located;
use super::response::ResponseStream;
use super::{Call, Proxy};
use crate::fleet::majority;
use crate::model::{ObjectId, RefName, RelativePath, StorageName};
use crate::proto::{SetDefaultBranchRequest, UpdateRefsRequest};
use crate::store::{RefChange, RepositoryRecord, WriteLease};
pub(super) use lease::keep_write_lease;
pub(super) use ssh_push::{SSH_RECEIVE_PACK, receive_pack as ssh_receive_pack};

const UPDATE_REFS: &str = "/gitfleet.v1.RefService/UpdateRefs";
const SET_DEFAULT_BRANCH: &str = "/gitfleet.v1.RefService/SetDefaultBranch";
pub(super) const POST_RECEIVE_PACK: &str = "/gitfleet.v1.SmartHttpService/PostReceivePack";

pub(super) async fn mutator(
    proxy: &Proxy,
    mut call: Call,
) -> Result<Response<ResponseStream>, ProxyError> {
    // From memory only: a write never reads the catalog before its first transaction.
    let cached = proxy
        .state
        .routing
        .cached(&call.virtual_storage, &call.relative_path);
    let (changes, prefix) = match call.info.path {
        UPDATE_REFS => (update_refs_changes(&call.first)?, Vec::new()),
        SET_DEFAULT_BRANCH => (default_branch_change(&call.first)?, Vec::new()),
        POST_RECEIVE_PACK => {
            prepare::check_client_message(&call.first)?;
            let head = push::read_head(&call.first, &mut call.inbound).await?;
            head.check_reportable()?;
            for message in &head.messages {
                prepare::check_client_message(message)?;
            }
            let create = push_to_create(proxy, &call);
            let write = Write::new(proxy, call, head.changes, head.messages);
            // The push runs to its end even if the caller goes away.
            let task = proxy.state.writes.spawn(
                write
                    .push(head.capabilities, create)
                    .instrument(tracing::Span::current()),
            );
            let reply = task
                .await
                .map_err(|error| ProxyError::Task(error.to_string()))??;
            return Ok(answer(reply));
        }
        // A mutator whose changes the proxy cannot read is refused: it could not be recorded.
        other => return Err(ProxyError::NotServed(other.to_owned())),
    };
    if let Some(record) = &cached {
        check_reachable(proxy, record, &call.repository())?;
    }
    let write = Write::new(proxy, call, changes, prefix);
    // The write runs to its end even if the caller goes away.
    let task = proxy
        .state
        .writes
        .spawn(write.change_refs().instrument(tracing::Span::current()));
    let (storage, reply) = task
        .await
        .map_err(|error| ProxyError::Task(error.to_string()))??;
    respond(&storage, reply)
}

/// Whether a push asked to make its repository if it is missing, and its virtual storage lets
/// a push do that.
fn push_to_create(proxy: &Proxy, call: &Call) -> bool {
    let asked = call
        .metadata
        .get(super::PUSH_TO_CREATE_HEADER)
        .is_some_and(|value| value == "true");
    asked
        && proxy
            .state
            .nodes
            .virtual_storage(call.virtual_storage.as_str())
            .is_some_and(|virtual_storage| virtual_storage.push_to_create)
}

/// Fails at once, before anything is recorded, when a majority of the assigned replicas is
/// outdated or on unhealthy nodes.
pub(super) fn check_reachable(
    proxy: &Proxy,
    record: &RepositoryRecord,
    repository: &str,
) -> Result<(), ProxyError> {
    let nodes = &proxy.state.nodes;
    let ready: Vec<StorageName> = record
        .assigned
        .iter()
        .filter(|storage| record.is_up_to_date(storage) && nodes.is_healthy(storage))
        .cloned()
        .collect();
    if ready.len() >= majority(record.assigned.len()) {
        return Ok(());
    }
    Err(ProxyError::not_enough(repository, &record.assigned, &ready))
}

fn update_refs_changes(message: &Bytes) -> Result<Vec<RefChange>, ProxyError> {
    let request = UpdateRefsRequest::decode(message.clone())
        .map_err(|_| ProxyError::Undecodable("UpdateRefsRequest"))?;
    request
        .updates
        .iter()
        .map(|update| {
            Ok(RefChange {
                name: RefName::parse(&update.name)?.as_str().to_owned(),
                old: ObjectId::parse(&update.old_target)?.as_str().to_owned(),
                new: ObjectId::parse(&update.new_target)?.as_str().to_owned(),
            })
        })
        .collect()
}

fn default_branch_change(message: &Bytes) -> Result<Vec<RefChange>, ProxyError> {
    let request = SetDefaultBranchRequest::decode(message.clone())
        .map_err(|_| ProxyError::Undecodable("SetDefaultBranchRequest"))?;
    let branch = RefName::branch(&request.branch)?;
    Ok(vec![RefChange {
        name: "HEAD".into(),
        old: String::new(),
        new: branch.as_str().to_owned(),
    }])
}

/// The client's messages after those already read, as the nodes are to get them.
pub(super) type Inbound = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Bytes> + Send>>;
type Converter = Box<dyn FnMut(Bytes) -> Option<Bytes> + Send + Sync>;

/// What one replica answered.
pub(super) struct Reply {
    pub metadata: MetadataMap,
    pub messages: Vec<Bytes>,
}

/// The replica whose answer is the caller's, and that answer.
pub(super) type Answer = (StorageName, Result<Reply, Status>);

pub(super) struct Write {
    proxy: Proxy,
    repository: String,
    deadline: Option<Duration>,
    path: &'static str,
    first: Bytes,
    located: Located,
    /// Messages read after the first to find a push's commands.
    prefix: Vec<Bytes>,
    inbound: Option<Streaming<Bytes>>,
    /// Turns the inbound messages into the form the nodes get (None ends the input); None
    /// passes them as they are.
    convert: Option<Converter>,
    virtual_storage: StorageName,
    relative_path: RelativePath,
    changes: Vec<RefChange>,
    /// Cancelled when the lease can no longer be renewed: the write must stop and undo.
    lease_lost: CancellationToken,
}

impl Write {
    pub(super) fn new(
        proxy: &Proxy,
        call: Call,
        changes: Vec<RefChange>,
        prefix: Vec<Bytes>,
    ) -> Self {
        Self {
            proxy: proxy.clone(),
            repository: call.repository(),
            deadline: call.deadline(),
            path: call.info.path,
            first: call.first,
            located: call.located,
            prefix,
            inbound: Some(call.inbound),
            convert: None,
            virtual_storage: call.virtual_storage,
            relative_path: call.relative_path,
            changes,
            lease_lost: CancellationToken::new(),
        }
    }

    /// A push whose messages the proxy made from another form (an ssh push, as
    /// `PostReceivePack`): `first` carries the repository header.
    /// `convert` turns each later message of the call into the push's form, and ends its input
    /// with None.
    pub(super) fn converted_push(
        proxy: &Proxy,
        call: Call,
        (first, located): (Bytes, Located),
        prefix: Vec<Bytes>,
        convert: impl FnMut(Bytes) -> Option<Bytes> + Send + Sync + 'static,
        changes: Vec<RefChange>,
    ) -> Self {
        let repository = call.repository();
        let deadline = call.deadline();
        Self {
            proxy: proxy.clone(),
            repository,
            deadline,
            path: POST_RECEIVE_PACK,
            first,
            located,
            prefix,
            inbound: Some(call.inbound),
            convert: Some(Box::new(convert)),
            virtual_storage: call.virtual_storage,
            relative_path: call.relative_path,
            changes,
            lease_lost: CancellationToken::new(),
        }
    }

    /// The client's later messages, as the nodes are to get them; None once taken.
    fn take_inbound(&mut self) -> Option<Inbound> {
        let messages = later_messages(self.inbound.take()?);
        Some(match self.convert.take() {
            Some(convert) => Box::pin(messages.map_while(convert)),
            None => Box::pin(messages),
        })
    }

    fn busy(&self, started: Instant) -> ProxyError {
        ProxyError::WriteBusy {
            repository: self.repository.clone(),
            waited: started.elapsed(),
        }
    }

    fn not_enough(&self, lease: &WriteLease, reachable: &[StorageName]) -> ProxyError {
        ProxyError::not_enough(self.repository.clone(), &lease.assigned, reachable)
    }

    fn failed(&self, reason: &str) -> ProxyError {
        ProxyError::WriteFailed {
            repository: self.repository.clone(),
            reason: reason.to_owned(),
        }
    }
}

pub(super) fn respond(
    storage: &StorageName,
    reply: Result<Reply, Status>,
) -> Result<Response<ResponseStream>, ProxyError> {
    match reply {
        Ok(reply) => Ok(answer(reply)),
        Err(status) => Err(ProxyError::Node {
            storage: storage.clone(),
            status,
        }),
    }
}

/// A reply, as the caller's answer.
fn answer(Reply { metadata, messages }: Reply) -> Response<ResponseStream> {
    let stream: ResponseStream = Box::pin(tokio_stream::iter(messages.into_iter().map(Ok)));
    Response::from_parts(metadata, stream, tonic::Extensions::default())
}

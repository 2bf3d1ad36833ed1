//! Mutators: the write is recorded (lease and intent, one transaction) before any replica sees
//! it, sent to every up-to-date assigned replica at once, judged by the refs each replica ends
//! up with, and committed as a new generation (second transaction) before the caller hears
//! anything. Fewer than a majority in agreement and it is rolled back.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message as _;
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument as _;

use super::error::ProxyError;
use super::forward::{later_messages, send};
use super::header::Located;
use super::service::ResponseStream;
use super::{Call, Proxy, header, majority, push};
use crate::model::{ObjectId, RefName, RelativePath, StorageName};
use crate::proto::ref_service_client::RefServiceClient;
use crate::proto::{
    RefUpdate, RefsChecksumRequest, RepositoryHeader, SetDefaultBranchRequest, UpdateRefsRequest,
};
use crate::store::{RefChange, RepositoryRecord, StaleIntent, WriteLease, WriteStart};

const UPDATE_REFS: &str = "/gitfleet.v1.RefService/UpdateRefs";
const SET_DEFAULT_BRANCH: &str = "/gitfleet.v1.RefService/SetDefaultBranch";
const POST_RECEIVE_PACK: &str = "/gitfleet.v1.SmartHttpService/PostReceivePack";

/// The most response bytes kept per replica while the write is judged.
const MAX_RESPONSE_BYTES: usize = 16 << 20;
/// How long a replica may leave a message of the write unread before it is dropped from the
/// write (and repaired later), so that it does not hold back the others.
const REPLICA_STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a replica may take to report its refs' checksum.
const CHECKSUM_TIMEOUT: Duration = Duration::from_secs(30);

pub(super) async fn mutator(
    proxy: &Proxy,
    mut call: Call,
) -> Result<Response<ResponseStream>, ProxyError> {
    if call.info.path == super::ssh_push::SSH_RECEIVE_PACK {
        return super::ssh_push::receive_pack(proxy, call).await;
    }
    // From memory only: a write never reads the catalog before its first transaction.
    let cached = proxy
        .state
        .routing
        .cached(&call.virtual_storage, &call.relative_path);
    let (changes, prefix) = match call.info.path {
        UPDATE_REFS => (update_refs_changes(&call.first)?, Vec::new()),
        SET_DEFAULT_BRANCH => (default_branch_change(&call.first)?, Vec::new()),
        POST_RECEIVE_PACK => {
            let head = push::read_head(&call.first, &mut call.inbound).await?;
            (head.changes, head.messages)
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
        .spawn(write.run().instrument(tracing::Span::current()));
    let (storage, reply) = task
        .await
        .map_err(|error| ProxyError::Task(error.to_string()))??;
    respond(&storage, reply)
}

/// Fails at once, before anything is recorded, when a majority of the assigned replicas is
/// outdated or on unhealthy nodes.
pub(super) fn check_reachable(
    proxy: &Proxy,
    record: &RepositoryRecord,
    repository: &str,
) -> Result<(), ProxyError> {
    let nodes = &proxy.state.nodes;
    let ready: Vec<&StorageName> = record
        .assigned
        .iter()
        .filter(|storage| record.is_up_to_date(storage) && nodes.is_healthy(storage))
        .collect();
    let needed = majority(record.assigned.len());
    if ready.len() >= needed {
        return Ok(());
    }
    Err(ProxyError::NotEnoughReplicas {
        repository: repository.to_owned(),
        needed,
        assigned: record.assigned.len(),
        missing: record
            .assigned
            .iter()
            .filter(|storage| !ready.contains(storage))
            .cloned()
            .collect(),
    })
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
            virtual_storage: call.virtual_storage,
            relative_path: call.relative_path,
            changes,
            lease_lost: CancellationToken::new(),
        }
    }

    pub(super) async fn run(mut self) -> Result<Answer, ProxyError> {
        let state = &self.proxy.state;
        let started = Instant::now();
        let wait = state.config.writes.lease_wait.0;
        let queue = self
            .proxy
            .write_queue(&self.virtual_storage, &self.relative_path);
        let _turn = tokio::time::timeout(wait, queue.lock_owned())
            .await
            .map_err(|_| self.busy(started))?;
        let lease = self.begin(started).await?;
        tracing::Span::current().record("generation", lease.generation);

        let needed = majority(lease.assigned.len());
        if lease.targets.len() < needed {
            state
                .store
                .release_write(&lease, &state.instance_id)
                .await?;
            return Err(self.not_enough(&lease, &lease.targets));
        }

        // Renewal stops when the write ends, however it ends (a panic included).
        let renewing = CancellationToken::new();
        let _stop_renewing = renewing.clone().drop_guard();
        tokio::spawn(renew(
            self.proxy.clone(),
            lease.clone(),
            renewing,
            self.lease_lost.clone(),
        ));
        self.apply(&lease, needed).await
    }

    /// Takes the lease and records the intent, waiting while another write holds it.
    async fn begin(&self, started: Instant) -> Result<WriteLease, ProxyError> {
        let state = &self.proxy.state;
        let mut pause = Duration::from_millis(10);
        loop {
            let start = state
                .store
                .begin_write(
                    &self.virtual_storage,
                    &self.relative_path,
                    &state.instance_id,
                    state.config.writes.lease.0,
                    self.path,
                    &self.changes,
                    &state.nodes.healthy(),
                )
                .await?;
            match start {
                WriteStart::Leased(lease) => return Ok(lease),
                WriteStart::Recover(lease, stale) => self.recover(&lease, &stale).await?,
                WriteStart::NotFound => return Err(ProxyError::NotFound(self.repository.clone())),
                WriteStart::Unreachable {
                    assigned,
                    reachable,
                } => {
                    return Err(ProxyError::NotEnoughReplicas {
                        repository: self.repository.clone(),
                        needed: majority(assigned.len()),
                        assigned: assigned.len(),
                        missing: assigned
                            .into_iter()
                            .filter(|storage| !reachable.contains(storage))
                            .collect(),
                    });
                }
                WriteStart::Busy if started.elapsed() >= state.config.writes.lease_wait.0 => {
                    return Err(self.busy(started));
                }
                WriteStart::Busy => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(250));
                }
            }
        }
    }

    /// Sends the write, judges it and records the outcome.
    async fn apply(&mut self, lease: &WriteLease, needed: usize) -> Result<Answer, ProxyError> {
        let state = self.proxy.state.clone();
        let replica_path = lease.replica_path.clone();
        let owner = state.instance_id.as_str();

        // Each replica's refs before: a replica that cannot say is left out, and repaired later.
        let before = checksums(&self.proxy, &lease.targets, &replica_path).await;
        let (targets, before): (Vec<StorageName>, Vec<String>) = lease
            .targets
            .iter()
            .cloned()
            .zip(before)
            .filter_map(|(storage, checksum)| checksum.map(|checksum| (storage, checksum)))
            .unzip();
        if targets.len() < needed {
            state.store.release_write(lease, owner).await?;
            return Err(self.not_enough(lease, &targets));
        }

        let mut replies = self.fan_out(&targets, &replica_path).await;
        let after = checksums(&self.proxy, &targets, &replica_path).await;
        if self.lease_lost.is_cancelled() {
            // Another writer may hold the repository now: nothing may be committed, and what
            // landed is undone.
            for (index, (before, after)) in before.iter().zip(&after).enumerate() {
                if after.as_deref() != Some(before.as_str()) {
                    self.roll_back(&targets[index], &replica_path, before).await;
                }
            }
            return Err(self.failed("the write lease was lost while the write ran; rolled back"));
        }

        // Group the replicas by what the write did to their refs.
        let mut changed: HashMap<&str, Vec<usize>> = HashMap::new();
        let mut unchanged = Vec::new();
        let mut unknown = Vec::new();
        for (index, (before, after)) in before.iter().zip(&after).enumerate() {
            match after {
                Some(after) if after == before => unchanged.push(index),
                Some(after) => changed.entry(after.as_str()).or_default().push(index),
                None => unknown.push(index),
            }
        }
        let agreeing = changed
            .values()
            .max_by_key(|group| group.len())
            .cloned()
            .unwrap_or_default();

        if agreeing.len() >= needed {
            let current: Vec<StorageName> = agreeing.iter().map(|&i| targets[i].clone()).collect();
            let Some(outcome) = state
                .store
                .commit_write(lease, owner, &current, &current[0])
                .await?
            else {
                for &index in &agreeing {
                    self.roll_back(&targets[index], &replica_path, &before[index])
                        .await;
                }
                return Err(self.failed(
                    "the write lease was lost or the replicas changed before the commit; rolled back",
                ));
            };
            tracing::info!(
                generation = outcome.generation,
                current = ?current,
                queued = ?outcome.queued,
                "write committed"
            );
            state.routing.invalidate(lease.repository);
            let answer = agreeing
                .iter()
                .position(|&i| replies[i].is_ok())
                .map(|position| agreeing[position])
                .unwrap_or(agreeing[0]);
            return Ok((targets[answer].clone(), replies.swap_remove(answer)));
        }

        if changed.is_empty() && unknown.is_empty() {
            // Nothing changed anywhere: the replicas refused the write (a stale old value, a
            // non-fast-forward push). Their answer is the caller's answer.
            state.store.release_write(lease, owner).await?;
            return Ok((targets[0].clone(), replies.swap_remove(0)));
        }

        // Not acknowledged: undo it where it landed.
        let mut clean: Vec<StorageName> = unchanged.iter().map(|&i| targets[i].clone()).collect();
        let mut uncertain: Vec<StorageName> = unknown.iter().map(|&i| targets[i].clone()).collect();
        for index in changed.values().flatten().copied() {
            let storage = &targets[index];
            if self.roll_back(storage, &replica_path, &before[index]).await {
                clean.push(storage.clone());
            } else {
                uncertain.push(storage.clone());
            }
        }
        let reason = format!(
            "{} of {} assigned replicas applied it in agreement, {needed} are needed; rolled back on the others{}",
            agreeing.len(),
            lease.assigned.len(),
            if uncertain.is_empty() {
                String::new()
            } else {
                format!("; state unknown on {}", list(&uncertain))
            }
        );
        tracing::warn!(%reason, "write failed");
        if uncertain.is_empty() {
            state.store.release_write(lease, owner).await?;
        } else if let Some(source) = clean.first() {
            // The clean replicas hold the state before the write; they become the new
            // generation and the uncertain ones are repaired from them.
            let committed = state
                .store
                .commit_write(lease, owner, &clean, source)
                .await?;
            if committed.is_none() {
                tracing::error!(
                    intent = lease.intent,
                    "the lease was lost before the uncertain replicas could be marked: the intent stays open for recovery"
                );
            }
            state.routing.invalidate(lease.repository);
        } else {
            tracing::error!(
                intent = lease.intent,
                "no replica is known to be clean: the intent stays open for recovery"
            );
        }
        Err(self.failed(&reason))
    }

    /// Sends the same request to every target at once, the client's stream teed to all.
    async fn fan_out(
        &mut self,
        targets: &[StorageName],
        replica_path: &RelativePath,
    ) -> Vec<Result<Reply, Status>> {
        let mut senders = Vec::with_capacity(targets.len());
        let mut calls = Vec::with_capacity(targets.len());
        for storage in targets {
            let (message_tx, message_rx) = mpsc::channel::<Bytes>(16);
            senders.push(message_tx);
            let first = header::rewrite(
                &self.first,
                &self.located,
                storage.as_str(),
                replica_path.as_str(),
            );
            let outbound = tokio_stream::once(first)
                .chain(tokio_stream::iter(self.prefix.clone()))
                .chain(ReceiverStream::new(message_rx));
            let mut request = Request::new(outbound);
            let limit = self.proxy.state.config.writes.timeout.0;
            request.set_timeout(self.deadline.map_or(limit, |deadline| deadline.min(limit)));
            let proxy = self.proxy.clone();
            let path = self.path;
            calls.push(async move {
                match send(&proxy, storage, path, request).await {
                    Ok(response) => collect(response).await,
                    Err(ProxyError::Node { status, .. }) => Err(status),
                    Err(error) => Err(Status::internal(error.to_string())),
                }
            });
        }
        let inbound = self.inbound.take();
        let tee = async move {
            let Some(inbound) = inbound else { return };
            let mut inbound = std::pin::pin!(later_messages(inbound));
            while let Some(message) = inbound.next().await {
                let sent = futures_util::future::join_all(senders.iter().map(|sender| {
                    tokio::time::timeout(REPLICA_STALL_TIMEOUT, sender.send(message.clone()))
                }))
                .await;
                // A replica that stopped reading is dropped; the others go on.
                let mut results = sent.into_iter();
                senders.retain(|_| {
                    results
                        .next()
                        .is_some_and(|result| matches!(result, Ok(Ok(()))))
                });
                if senders.is_empty() {
                    break;
                }
            }
        };
        // The calls decide when the fan-out is over: a client may keep its side of the stream
        // open until it has the answer (git's full-duplex form does).
        let calls = futures_util::future::join_all(calls);
        tokio::pin!(calls, tee);
        let mut teeing = true;
        let lease_lost = self.lease_lost.clone();
        let replies = loop {
            tokio::select! {
                replies = &mut calls => break replies,
                () = &mut tee, if teeing => teeing = false,
                () = lease_lost.cancelled() => {
                    // Dropping the calls cancels them on the nodes.
                    break targets
                        .iter()
                        .map(|_| Err(Status::aborted("the write lease was lost")))
                        .collect();
                }
            }
        };
        for (storage, reply) in targets.iter().zip(&replies) {
            if let Err(status) = reply {
                tracing::warn!(%storage, %status, "replica did not apply the write");
            }
        }
        replies
    }

    /// Reverses the write's ref updates on one replica; true when its refs are back to
    /// `before`.
    async fn roll_back(
        &self,
        storage: &StorageName,
        replica_path: &RelativePath,
        before: &str,
    ) -> bool {
        reverse_changes(&self.proxy, storage, replica_path, &self.changes).await;
        let after = checksums(&self.proxy, std::slice::from_ref(storage), replica_path).await;
        after[0].as_deref() == Some(before)
    }

    /// Settles a write that was recorded and never committed (its proxy died, or lost its
    /// lease before it could undo the write): its ref updates are reversed wherever they
    /// landed, the replicas that then agree become the next generation, and the others are
    /// left behind it, to be repaired.
    async fn recover(&self, lease: &WriteLease, stale: &StaleIntent) -> Result<(), ProxyError> {
        let state = &self.proxy.state;
        let replica_path = &lease.replica_path;
        tracing::warn!(intent = lease.intent, targets = ?stale.targets, "settling an interrupted write");
        for storage in lease.targets.iter().filter(|s| stale.targets.contains(s)) {
            reverse_changes(&self.proxy, storage, replica_path, &stale.changes).await;
        }
        let after = checksums(&self.proxy, &lease.targets, replica_path).await;
        let mut groups: HashMap<&str, Vec<StorageName>> = HashMap::new();
        for (storage, checksum) in lease.targets.iter().zip(&after) {
            if let Some(checksum) = checksum {
                groups.entry(checksum).or_default().push(storage.clone());
            }
        }
        let Some(current) = groups.into_values().max_by_key(Vec::len) else {
            return Err(self.failed(
                "an interrupted write cannot be settled: no replica answered; it is retried when the lease runs out",
            ));
        };
        let outcome = state
            .store
            .commit_write(lease, &state.instance_id, &current, &current[0])
            .await?
            .ok_or_else(|| {
                self.failed("the lease was lost while an interrupted write was settled")
            })?;
        state.routing.invalidate(lease.repository);
        tracing::info!(generation = outcome.generation, current = ?current, queued = ?outcome.queued, "interrupted write settled");
        Ok(())
    }

    fn busy(&self, started: Instant) -> ProxyError {
        ProxyError::WriteBusy {
            repository: self.repository.clone(),
            waited: started.elapsed(),
        }
    }

    fn not_enough(&self, lease: &WriteLease, reachable: &[StorageName]) -> ProxyError {
        ProxyError::NotEnoughReplicas {
            repository: self.repository.clone(),
            needed: majority(lease.assigned.len()),
            assigned: lease.assigned.len(),
            missing: lease
                .assigned
                .iter()
                .filter(|storage| !reachable.contains(storage))
                .cloned()
                .collect(),
        }
    }

    fn failed(&self, reason: &str) -> ProxyError {
        ProxyError::WriteFailed {
            repository: self.repository.clone(),
            reason: reason.to_owned(),
        }
    }
}

/// Reverses ref updates on one replica, one compare-and-swap per ref: a ref the replica did
/// not move refuses the swap, which is what is wanted. HEAD is not reversed.
async fn reverse_changes(
    proxy: &Proxy,
    storage: &StorageName,
    replica_path: &RelativePath,
    changes: &[RefChange],
) {
    let Some(node) = proxy.state.nodes.get(storage) else {
        return;
    };
    let mut client = RefServiceClient::new(node.authed());
    for change in changes.iter().rev().filter(|change| change.name != "HEAD") {
        let request = UpdateRefsRequest {
            repository: Some(replica_header(storage, replica_path)),
            updates: vec![RefUpdate {
                name: change.name.clone(),
                old_target: change.new.clone(),
                new_target: change.old.clone(),
            }],
        };
        if let Err(status) = client.update_refs(request).await {
            tracing::debug!(%storage, reference = %change.name, %status, "not reversed");
        }
    }
}

/// Keeps the lease alive while a long write runs; cancels `lost` when it is taken away or
/// cannot be renewed before it runs out.
async fn renew(proxy: Proxy, lease: WriteLease, stop: CancellationToken, lost: CancellationToken) {
    let state = &proxy.state;
    let duration = state.config.writes.lease.0;
    let mut renewed_at = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(duration / 3) => {}
        }
        match state
            .store
            .renew_write(&lease, &state.instance_id, duration)
            .await
        {
            Ok(true) => renewed_at = tokio::time::Instant::now(),
            Ok(false) => {
                tracing::error!("the write lease was taken away while the write ran");
                lost.cancel();
                return;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot renew the write lease");
                // Give up a little before the lease runs out, so no other writer overlaps.
                if renewed_at.elapsed() > duration.mul_f64(0.9) {
                    tracing::error!("the write lease ran out while the write ran");
                    lost.cancel();
                    return;
                }
            }
        }
    }
}

/// Reads a whole answer, bounded.
async fn collect(response: Response<Streaming<Bytes>>) -> Result<Reply, Status> {
    let (metadata, mut stream, _) = response.into_parts();
    let mut messages = Vec::new();
    let mut size = 0;
    while let Some(message) = stream.message().await? {
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

pub(super) fn respond(
    storage: &StorageName,
    reply: Result<Reply, Status>,
) -> Result<Response<ResponseStream>, ProxyError> {
    match reply {
        Ok(Reply { metadata, messages }) => {
            let stream: ResponseStream = Box::pin(tokio_stream::iter(messages.into_iter().map(Ok)));
            Ok(Response::from_parts(
                metadata,
                stream,
                tonic::Extensions::default(),
            ))
        }
        Err(status) => Err(ProxyError::Node {
            storage: storage.clone(),
            status,
        }),
    }
}

/// The refs checksum of each storage's replica; None where the node did not answer.
async fn checksums(
    proxy: &Proxy,
    storages: &[StorageName],
    replica_path: &RelativePath,
) -> Vec<Option<String>> {
    let asks = storages.iter().map(|storage| async move {
        let node = proxy.state.nodes.get(storage)?;
        let mut client = RefServiceClient::new(node.authed());
        let request = RefsChecksumRequest {
            repository: Some(replica_header(storage, replica_path)),
        };
        match tokio::time::timeout(CHECKSUM_TIMEOUT, client.refs_checksum(request)).await {
            Ok(Ok(response)) => Some(response.into_inner().checksum),
            Ok(Err(status)) => {
                tracing::warn!(%storage, %status, "no refs checksum");
                None
            }
            Err(_) => {
                tracing::warn!(%storage, "refs checksum timed out");
                None
            }
        }
    });
    futures_util::future::join_all(asks).await
}

fn replica_header(storage: &StorageName, replica_path: &RelativePath) -> RepositoryHeader {
    RepositoryHeader {
        storage: storage.to_string(),
        relative_path: replica_path.to_string(),
    }
}

fn list(storages: &[StorageName]) -> String {
    storages
        .iter()
        .map(StorageName::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

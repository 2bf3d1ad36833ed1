//! A push as a two-phase commit on the replicas.
//!
//! 0. The push is recorded as pending (its commands and targets, no lease).
//! 1. The pack goes to every target as a prepared push: each keeps the objects in git's
//!    quarantine and reports the ref updates it is ready to make. No lease is held, so a slow
//!    client holds no other push.
//! 2. Once a majority has prepared identical updates, the lease is taken and the pending write
//!    becomes the intent with those updates (one statement); the prepared replicas are told to
//!    commit under the lease's token, the others to abort. Each answers with git's own report.
//! 3. The replicas that report the same refs moved, if a majority, commit the generation (one
//!    statement); the rest are repaired. The client gets git's report from one of them: `ok`
//!    and `ng` per ref, a partial push included.
//!
//! The proxy's own refusals (the write lock, a majority out of reach, a push it could not
//! record) reach git as `ng` lines with the reason, when the client asked for a report.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message as _;
use tokio::sync::OwnedMutexGuard;
use tokio_stream::StreamExt as _;
use tonic::Status;
use tonic::metadata::MetadataMap;

use super::prepare::{self, Event, Kind, Opening, Replicas, answer_data};
use super::{Reply, Write};
use crate::fleet::majority;
use crate::git::checksum::Checksum;
use crate::git::report::{PushCapabilities, Report, encode_report};
use crate::model::StorageName;
use crate::proto::PostReceivePackResponse;
use crate::proxy::error::ProxyError;
use crate::store::{PendingWrite, RefChange, WriteLease};
use crate::toolkit::LeaseKeeper;

/// How far a push got.
#[derive(Debug, Default)]
struct Progress {
    /// The pending write became the intent.
    promoted: bool,
    /// A generation was committed.
    committed: bool,
}

/// Where one replica stands in phase 1.
pub(super) enum Phase1 {
    Waiting,
    Prepared(Vec<RefChange>),
    Ended(Result<Reply, Status>),
}

impl Write {
    /// Runs a push (`PostReceivePack`) as a two-phase commit, and answers with git's report.
    /// With `create`, a missing repository is made first, and undone if the push fails.
    pub(super) async fn push(
        mut self,
        capabilities: PushCapabilities,
        create: bool,
    ) -> Result<Reply, ProxyError> {
        let state = self.proxy.state.clone();
        let mut made = None;
        let pending = match self.open(create, &mut made).await {
            Ok(pending) => pending,
            Err(error) => {
                if let Some(repository) = made {
                    self.undo_creation(repository).await;
                }
                return match error {
                    ProxyError::NotFound(_) | ProxyError::Database(_) => Err(error),
                    error => self.refuse(&capabilities, error).await,
                };
            }
        };
        let mut progress = Progress::default();
        let answer = self
            .two_phases(&pending, &capabilities, &mut progress)
            .await;
        if !progress.promoted
            && let Err(error) = state.store.drop_pending_write(pending.id).await
        {
            tracing::debug!(%error, "the pending write is left to expire");
        }
        // Only the push that made the repository undoes it, and only if nothing was written.
        if made.is_some() && !progress.committed {
            self.undo_creation(pending.repository).await;
        }
        answer
    }

    async fn two_phases(
        &mut self,
        pending: &PendingWrite,
        capabilities: &PushCapabilities,
        progress: &mut Progress,
    ) -> Result<Reply, ProxyError> {
        let state = self.proxy.state.clone();
        let needed = majority(pending.assigned.len());
        let inbound = self.take_inbound();
        let (first, located) = (&self.first, &self.located);
        let opening = Opening {
            kind: Kind::Push,
            first: &|storage: &StorageName| {
                prepare::push_opening(first, located, storage, &pending.replica_path)
            },
            prefix: &self.prefix,
            timeout: self.phase1_limit(),
        };
        let mut replicas = prepare::start(&self.proxy, &pending.targets, opening, inbound);

        // Phase 1: the pack to every target, no lease held, bounded by the write's timeout: a
        // client that trickles its pack for ever would outlive its pending write.
        let phase1 = match self.phase1(&mut replicas, pending, "push").await {
            Ok(phase1) => phase1,
            Err(error) => return self.refuse(capabilities, error).await,
        };
        let Some((updates, agreeing)) = agreement(&phase1, &replicas, needed) else {
            replicas
                .abort_all("the push was not prepared by a majority of replicas")
                .await;
            return match self.unprepared(&replicas, phase1, needed, pending) {
                Ok((_, reply)) => Ok(reply),
                Err(error @ ProxyError::Node { .. }) => Err(error),
                Err(error) => self.refuse(capabilities, error).await,
            };
        };
        self.changes = updates;

        // Phase 2: under the lease, short.
        let (lease, begun_at, _turn) = match self.take_lease(pending, &agreeing).await {
            Ok(taken) => taken,
            Err(error) => {
                replicas.abort_all(&error.to_string()).await;
                return self.refuse(capabilities, error).await;
            }
        };
        progress.promoted = true;
        let keeper = self.keep(&lease, begun_at);
        self.lease_lost = keeper.lost().clone();
        let committing = decide(&mut replicas, &lease).await;
        let finished = self.finish(&mut replicas, &committing, needed).await;
        let answer = self
            .settle(capabilities, &lease, keeper, &replicas, finished, progress)
            .await;
        state.lease_holds.record(begun_at.elapsed());
        answer
    }

    /// How long phase 1 may take: `writes.timeout`, or the caller's deadline if sooner.
    pub(super) fn phase1_limit(&self) -> Duration {
        let limit = self.proxy.state.config.writes.timeout.0;
        self.deadline.map_or(limit, |deadline| deadline.min(limit))
    }

    /// Phase 1: waits for the targets to prepare (see [`Write::prepare`]) within
    /// [`Write::phase1_limit`]; past it, every call is aborted and the write (`what`) fails,
    /// having changed nothing.
    pub(super) async fn phase1(
        &self,
        replicas: &mut Replicas,
        pending: &PendingWrite,
        what: &str,
    ) -> Result<Vec<Phase1>, ProxyError> {
        let needed = majority(pending.assigned.len());
        let limit = self.phase1_limit();
        let prepared =
            tokio::time::timeout(limit, self.prepare(replicas, &pending.ready, needed)).await;
        match prepared {
            Ok(phase1) => Ok(phase1),
            Err(_) => {
                let error = self.failed(&format!(
                    "the {what} was not prepared within {limit:?}; nothing changed"
                ));
                replicas.abort_all(&error.to_string()).await;
                Err(error)
            }
        }
    }

    /// Phase 2's start: waits for this proxy's turn on the repository (pushes through one
    /// proxy take turns here, so that each takes the lease as soon as the one before releases
    /// it, rather than polling for it), takes the lease, and turns the pending write into the
    /// intent with `agreeing` as its targets. `writes.lease_wait` counts from here: a long
    /// phase 1 does not use it up. The turn is held until the returned guard is dropped.
    pub(super) async fn take_lease(
        &mut self,
        pending: &PendingWrite,
        agreeing: &[StorageName],
    ) -> Result<(WriteLease, tokio::time::Instant, OwnedMutexGuard<()>), ProxyError> {
        let started = Instant::now();
        let wait = self.proxy.state.config.writes.lease_wait.0;
        let queue = self
            .proxy
            .write_queue(&self.virtual_storage, &self.relative_path);
        let turn = tokio::time::timeout(wait, queue.lock_owned())
            .await
            .map_err(|_| self.busy(started))?;
        let (lease, begun_at) = self.begin(started, (pending.id, agreeing)).await?;
        tracing::Span::current().record("generation", lease.generation);
        Ok((lease, begun_at, turn))
    }

    /// Phase 2's end: the replicas that report the same refs moved, if a majority, commit
    /// the generation; the client gets git's report from one of them.
    async fn settle(
        &mut self,
        capabilities: &PushCapabilities,
        lease: &WriteLease,
        keeper: LeaseKeeper,
        replicas: &Replicas,
        mut finished: HashMap<usize, Result<Reply, Status>>,
        progress: &mut Progress,
    ) -> Result<Reply, ProxyError> {
        let state = self.proxy.state.clone();
        let needed = majority(lease.assigned.len());
        if self.lease_lost.is_cancelled() {
            let error = self.failed(
                "the write lease was lost while the replicas committed; the recovery job rolls it back",
            );
            return self.refuse(capabilities, error).await;
        }

        // Which refs each replica moved, by its own report.
        let mut outcomes: HashMap<Vec<String>, Vec<usize>> = HashMap::new();
        for (&index, reply) in &finished {
            if let Ok(reply) = reply {
                let report = Report::read(&answer_data(reply));
                if report.unpack.is_some() {
                    outcomes.entry(report.updated).or_default().push(index);
                }
            }
        }
        let best = outcomes
            .into_iter()
            .max_by_key(|(_, members)| members.len());
        let Some((moved, mut current)) = best.filter(|(_, members)| members.len() >= needed) else {
            // The intent stays open: once the lease runs out, recovery rolls the push back
            // wherever it landed.
            drop(keeper);
            let error = self.failed(&format!(
                "fewer than {needed} replicas agree on which refs the push moved; the recovery job rolls it back"
            ));
            return self.refuse(capabilities, error).await;
        };
        current.sort_unstable();
        let storages: Vec<StorageName> = current
            .iter()
            .map(|&index| replicas.storages[index].clone())
            .collect();
        let answer = finished
            .remove(&current[0])
            .and_then(Result::ok)
            .expect("a replica in agreement has answered");
        if moved.is_empty() && storages.len() == lease.targets.len() {
            // Nothing moved anywhere: git refused every command, and says why.
            self.release(lease).await?;
            return Ok(answer);
        }
        // The new generation's refs checksum, from the old one and the refs that moved.
        let moved: std::collections::HashSet<&str> = moved.iter().map(String::as_str).collect();
        let checksum = lease.refs_checksum.as_deref().and_then(|old| {
            let changes = self
                .changes
                .iter()
                .filter(|change| moved.contains(change.name.as_str()))
                .map(|change| {
                    (
                        change.name.as_str(),
                        change.old.as_str(),
                        change.new.as_str(),
                    )
                });
            Checksum::advanced(old, changes)
        });
        match self
            .commit(lease, &storages, &storages[0], checksum.as_deref())
            .await?
        {
            super::close::Commit::Done(outcome) => {
                progress.committed = true;
                tracing::info!(
                    generation = outcome.generation,
                    current = ?storages,
                    queued = ?outcome.queued,
                    moved = moved.len(),
                    "push committed"
                );
                state.routing.invalidate(lease.repository);
                Ok(answer)
            }
            super::close::Commit::Refused | super::close::Commit::Lost => {
                drop(keeper);
                let error = self.failed(
                    "the replicas changed under the push before it was recorded; the recovery job rolls it back",
                );
                self.refuse(capabilities, error).await
            }
        }
    }

    /// Waits until every target has prepared or ended, or, once a majority has, for
    /// `writes.straggler_timeout` more: a replica that hangs (its node stopped, its disk stuck)
    /// is left out and repaired later, rather than holding the push.
    pub(super) async fn prepare(
        &self,
        replicas: &mut Replicas,
        ready: &[StorageName],
        needed: usize,
    ) -> Vec<Phase1> {
        let grace = self.proxy.state.config.writes.straggler_timeout.0;
        let mut phase1: Vec<Phase1> = replicas.storages.iter().map(|_| Phase1::Waiting).collect();
        let mut deadline = None;
        loop {
            let waiting = phase1
                .iter()
                .filter(|s| matches!(s, Phase1::Waiting))
                .count();
            if waiting == 0 {
                break;
            }
            // Prepared or ended: a replica that answered either way.
            let answered = phase1.len() - waiting;
            if answered >= needed && deadline.is_none() {
                deadline = Some(tokio::time::Instant::now() + grace);
            }
            let event = match deadline {
                None => replicas.events.recv().await,
                Some(deadline) => {
                    match tokio::time::timeout_at(deadline, replicas.events.recv()).await {
                        Ok(event) => event,
                        Err(_) => break,
                    }
                }
            };
            match event {
                Some(Event::Prepared(index, updates)) => phase1[index] = Phase1::Prepared(updates),
                Some(Event::Finished(index, reply)) => {
                    if let Err(status) = &reply {
                        // One not up to date may well lack what the pack builds on.
                        let storage = &replicas.storages[index];
                        match ready.contains(storage) {
                            true => {
                                tracing::warn!(%storage, %status, "replica did not prepare the push")
                            }
                            false => {
                                tracing::debug!(%storage, %status, "replica did not prepare the push")
                            }
                        }
                    }
                    phase1[index] = Phase1::Ended(reply);
                }
                None => break,
            }
        }
        phase1
    }

    /// Waits for the answers of the replicas told to commit: all of them, or, once a
    /// majority has answered, `writes.straggler_timeout` more. Stops when the lease is lost.
    pub(super) async fn finish(
        &self,
        replicas: &mut Replicas,
        committing: &[usize],
        needed: usize,
    ) -> HashMap<usize, Result<Reply, Status>> {
        let grace = self.proxy.state.config.writes.straggler_timeout.0;
        let mut finished = HashMap::new();
        let mut deadline = None;
        while finished.len() < committing.len() {
            if finished.len() >= needed && deadline.is_none() {
                deadline = Some(tokio::time::Instant::now() + grace);
            }
            let next = async {
                match deadline {
                    None => replicas.events.recv().await,
                    Some(deadline) => tokio::time::timeout_at(deadline, replicas.events.recv())
                        .await
                        .ok()
                        .flatten(),
                }
            };
            let event = tokio::select! {
                event = next => event,
                () = self.lease_lost.cancelled() => None,
            };
            match event {
                Some(Event::Finished(index, reply)) if committing.contains(&index) => {
                    if let Err(status) = &reply {
                        tracing::warn!(storage = %replicas.storages[index], %status, "replica did not commit the push");
                    }
                    finished.insert(index, reply);
                }
                Some(_) => {}
                None => break,
            }
        }
        finished
    }

    /// Why no majority prepared the write: the replica's own answer when none prepared it and
    /// one answered (git's refusal of a bad pack, or of commands before its hooks), the node's
    /// error when none answered, and the proxy's refusal otherwise.
    pub(super) fn unprepared(
        &self,
        replicas: &Replicas,
        phase1: Vec<Phase1>,
        needed: usize,
        pending: &PendingWrite,
    ) -> Result<(StorageName, Reply), ProxyError> {
        let prepared = phase1
            .iter()
            .filter(|s| matches!(s, Phase1::Prepared(_)))
            .count();
        if prepared == 0 {
            let mut failure = None;
            for (index, standing) in phase1.into_iter().enumerate() {
                let storage = replicas.storages[index].clone();
                match standing {
                    Phase1::Ended(Ok(reply)) => return Ok((storage, reply)),
                    Phase1::Ended(Err(status)) if failure.is_none() => {
                        failure = Some(ProxyError::Node { storage, status });
                    }
                    _ => {}
                }
            }
            if let Some(failure) = failure {
                return Err(failure);
            }
        }
        Err(self.failed(&format!(
            "{prepared} of {} assigned replicas prepared it in agreement, {needed} are needed; nothing changed",
            pending.assigned.len()
        )))
    }

    /// Refuses the whole push: as git's report with an `ng` line per command and the reason
    /// (on side-band too) when the client asked for a report, as the error otherwise. The
    /// client's stream is read to its end first, if nothing has read it, so that its sender
    /// sees the answer rather than a broken connection.
    async fn refuse(
        &mut self,
        capabilities: &PushCapabilities,
        error: ProxyError,
    ) -> Result<Reply, ProxyError> {
        tracing::warn!(%error, "push refused");
        if !capabilities.report_status {
            return Err(error);
        }
        if let Some(inbound) = self.take_inbound() {
            let limit = self.proxy.state.config.writes.timeout.0;
            let drain = async move {
                let mut inbound = inbound;
                while inbound.next().await.is_some() {}
            };
            let _ = tokio::time::timeout(limit, drain).await;
        }
        let reason = error.to_string();
        let refs: Vec<(String, Option<String>)> = self
            .changes
            .iter()
            .map(|change| (change.name.clone(), Some(reason.clone())))
            .collect();
        let data = encode_report(capabilities, &refs, &reason);
        let message = PostReceivePackResponse {
            data: Bytes::from(data),
            prepared: None,
        };
        Ok(Reply {
            metadata: MetadataMap::new(),
            messages: vec![Bytes::from(message.encode_to_vec())],
        })
    }
}

/// The updates a majority of the replicas prepared alike, and those replicas; None when no
/// majority agrees.
pub(super) fn agreement(
    phase1: &[Phase1],
    replicas: &Replicas,
    needed: usize,
) -> Option<(Vec<RefChange>, Vec<StorageName>)> {
    let mut groups: HashMap<&Vec<RefChange>, Vec<usize>> = HashMap::new();
    for (index, standing) in phase1.iter().enumerate() {
        if let Phase1::Prepared(updates) = standing {
            groups.entry(updates).or_default().push(index);
        }
    }
    let (updates, members) = groups
        .into_iter()
        .max_by_key(|(_, members)| members.len())
        .filter(|(_, members)| members.len() >= needed)?;
    let agreeing = members
        .iter()
        .map(|&index| replicas.storages[index].clone())
        .collect();
    Some((updates.clone(), agreeing))
}

/// Tells the lease's targets to commit under its token, and every other replica to abort;
/// returns the replicas told to commit.
pub(super) async fn decide(replicas: &mut Replicas, lease: &WriteLease) -> Vec<usize> {
    let mut committing = Vec::new();
    for index in 0..replicas.storages.len() {
        if lease.targets.contains(&replicas.storages[index]) {
            if replicas.commit(index, lease.token).await {
                committing.push(index);
            }
        } else {
            replicas
                .abort(index, "the replica was left out of the write")
                .await;
        }
    }
    committing
}

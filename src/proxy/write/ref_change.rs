//! `UpdateRefs` and `SetDefaultBranch` as a two-phase commit on the replicas, as a push is
//! (see [`super::two_phase`]):
//!
//! 0. The change is recorded as pending (its updates and targets, no lease).
//! 1. Every target gets a prepared `PrepareRefs` call and checks the change with no lock: the
//!    repository exists, the updates are well formed, the new targets are objects it has. A
//!    change no replica can make (a bad request) is refused here, before any lease.
//! 2. Once a majority has prepared it, the lease is taken and the pending write becomes the
//!    intent (one statement); a HEAD change records HEAD's old branch first. The targets are
//!    told to commit under the lease's token: each makes the change in one reference
//!    transaction, through its fence, and answers made or refused (a lost compare-and-swap).
//! 3. The replicas whose answers agree, if a majority, commit the generation, with the refs
//!    checksum advanced by the change when it was made. A change every replica refused
//!    releases the lease, and the caller gets the refusal.

use std::collections::HashMap;

use bytes::Bytes;
use prost::Message as _;
use tonic::{Code, Status};

use super::close::Commit;
use super::prepare::{self, Kind, Opening, Replicas};
use super::two_phase::{agreement, decide};
use super::{Answer, Reply, SET_DEFAULT_BRANCH, Write};
use crate::fleet::majority;
use crate::git::checksum::Checksum;
use crate::model::StorageName;
use crate::proto::{
    PrepareRefsRequest, PrepareRefsResponse, RepositoryHeader, SetDefaultBranchRequest,
    UpdateRefsRequest,
};
use crate::proxy::error::ProxyError;
use crate::store::{PendingWrite, WriteLease};
use crate::toolkit::LeaseKeeper;

impl Write {
    /// Runs an `UpdateRefs` or `SetDefaultBranch` as a two-phase commit; the answer is one
    /// replica's.
    pub(super) async fn change_refs(mut self) -> Result<Answer, ProxyError> {
        let state = self.proxy.state.clone();
        let pending = self.open(false, &mut None).await?;
        let mut promoted = false;
        let answer = self.ref_phases(&pending, &mut promoted).await;
        if !promoted && let Err(error) = state.store.drop_pending_write(pending.id).await {
            tracing::debug!(%error, "the pending write is left to expire");
        }
        answer
    }

    async fn ref_phases(
        &mut self,
        pending: &PendingWrite,
        promoted: &mut bool,
    ) -> Result<Answer, ProxyError> {
        let state = self.proxy.state.clone();
        let needed = majority(pending.assigned.len());
        let request = self.prepared_request()?;
        let replica_path = pending.replica_path.to_string();
        let first = |storage: &StorageName| {
            let mut request = request.clone();
            request.repository = Some(RepositoryHeader {
                storage: storage.to_string(),
                relative_path: replica_path.clone(),
            });
            Bytes::from(request.encode_to_vec())
        };
        let opening = Opening {
            kind: Kind::Refs,
            first: &first,
            prefix: &[],
            timeout: self.phase1_limit(),
        };
        let mut replicas = prepare::start(&self.proxy, &pending.targets, opening, None);

        // Phase 1: each target checks the change; no lease is held.
        let phase1 = self.phase1(&mut replicas, pending, "change").await?;
        // The change recorded is the caller's, as the proxy read it; the replicas' echo of it
        // only has to agree.
        let Some((_, agreeing)) = agreement(&phase1, &replicas, needed) else {
            replicas
                .abort_all("the change was not prepared by a majority of replicas")
                .await;
            return match self.unprepared(&replicas, phase1, needed, pending) {
                Ok((storage, _)) => Err(ProxyError::Node {
                    storage,
                    status: Status::internal("the replica ended the change before its decision"),
                }),
                Err(error) => Err(error),
            };
        };

        // Phase 2: under the lease, short.
        let (lease, begun_at, _turn) = match self.take_lease(pending, &agreeing).await {
            Ok(taken) => taken,
            Err(error) => {
                replicas.abort_all(&error.to_string()).await;
                return Err(error);
            }
        };
        *promoted = true;
        let keeper = self.keep(&lease, begun_at);
        self.lease_lost = keeper.lost().clone();
        if self.path == SET_DEFAULT_BRANCH
            && let Err(error) = self.record_head_before(&lease).await
        {
            replicas.abort_all(&error.to_string()).await;
            // No replica was told anything: the lease goes back at once, if still held.
            if let Err(release) = self.release(&lease).await {
                tracing::debug!(%release, "the lease is left to run out");
            }
            return Err(error);
        }
        let committing = decide(&mut replicas, &lease).await;
        let finished = self.finish(&mut replicas, &committing, needed).await;
        let answer = self
            .settle_change(&lease, keeper, &replicas, finished)
            .await;
        state.lease_holds.record(begun_at.elapsed());
        answer
    }

    /// The `PrepareRefs` request for the client's change, with no repository yet.
    fn prepared_request(&self) -> Result<PrepareRefsRequest, ProxyError> {
        if self.path == SET_DEFAULT_BRANCH {
            let request = SetDefaultBranchRequest::decode(self.first.clone())
                .map_err(|_| ProxyError::Undecodable("SetDefaultBranchRequest"))?;
            return Ok(PrepareRefsRequest {
                default_branch: request.branch,
                ..Default::default()
            });
        }
        let request = UpdateRefsRequest::decode(self.first.clone())
            .map_err(|_| ProxyError::Undecodable("UpdateRefsRequest"))?;
        Ok(PrepareRefsRequest {
            updates: request.updates,
            ..Default::default()
        })
    }

    /// Phase 2's end: the replicas that answered alike (all made the change, or all refused
    /// it), if a majority, commit the generation; the others are repaired.
    async fn settle_change(
        &mut self,
        lease: &WriteLease,
        keeper: LeaseKeeper,
        replicas: &Replicas,
        mut finished: HashMap<usize, Result<Reply, Status>>,
    ) -> Result<Answer, ProxyError> {
        let needed = majority(lease.assigned.len());
        if self.lease_lost.is_cancelled() {
            return Err(self.failed(
                "the write lease was lost while the replicas committed; the recovery job rolls it back",
            ));
        }
        let mut made = Vec::new();
        let mut refused = Vec::new();
        for (&index, reply) in &finished {
            match reply {
                Ok(reply) if was_made(reply) => made.push(index),
                // A lost compare-and-swap, a fenced token or a name clash: the reference
                // transaction refused the change, and nothing changed. Anything else (a
                // replica that lost its repository or objects, a call cut off) may have changed
                // it, or is broken: its replica is repaired.
                Err(status)
                    if matches!(status.code(), Code::Aborted | Code::FailedPrecondition) =>
                {
                    refused.push(index)
                }
                _ => {}
            }
        }
        let (mut current, moved) = if made.len() >= needed {
            (made, true)
        } else if refused.len() >= needed {
            (refused, false)
        } else {
            // The intent stays open: once the lease runs out, recovery rolls the change back
            // wherever it was made.
            drop(keeper);
            return Err(self.failed(&format!(
                "fewer than {needed} replicas agree on whether the change was made; the recovery job rolls it back"
            )));
        };
        current.sort_unstable();
        let storages: Vec<StorageName> = current
            .iter()
            .map(|&index| replicas.storages[index].clone())
            .collect();
        let source = storages[0].clone();
        let answer = match finished.remove(&current[0]) {
            // The caller's answer: the method's response, which is empty.
            Some(Ok(reply)) => Ok(Reply {
                metadata: reply.metadata,
                messages: vec![Bytes::new()],
            }),
            Some(Err(status)) => Err(status),
            None => unreachable!("a replica in agreement has answered"),
        };
        if !moved && storages.len() == lease.targets.len() {
            // Every replica refused the change, and says why.
            self.release(lease).await?;
            return Ok((source, answer));
        }
        let checksum = match moved {
            true => lease.refs_checksum.as_deref().and_then(|old| {
                let changes = self.changes.iter().map(|change| {
                    (
                        change.name.as_str(),
                        change.old.as_str(),
                        change.new.as_str(),
                    )
                });
                Checksum::advanced(old, changes)
            }),
            false => lease.refs_checksum.clone(),
        };
        match self
            .commit(lease, &storages, &source, checksum.as_deref())
            .await?
        {
            Commit::Done(outcome) => {
                tracing::info!(
                    generation = outcome.generation,
                    current = ?storages,
                    queued = ?outcome.queued,
                    made = moved,
                    "reference change committed"
                );
                self.proxy.state.routing.invalidate(lease.repository);
                Ok((source, answer))
            }
            Commit::Refused | Commit::Lost => {
                drop(keeper);
                Err(self.failed(
                    "the replicas changed under the write before it was recorded; the recovery job rolls it back",
                ))
            }
        }
    }
}

/// Whether a replica's answer says it made the change: its last message carries `made`.
fn was_made(reply: &Reply) -> bool {
    reply
        .messages
        .iter()
        .any(|message| PrepareRefsResponse::decode(message.clone()).is_ok_and(|answer| answer.made))
}

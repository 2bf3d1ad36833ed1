//! A prepared reference change (`PrepareRefs`): the proxy's `UpdateRefs` and
//! `SetDefaultBranch` in two steps, as a push is (see [`super::prepare`]).
//!
//! 1. The first message names the change. The node checks it, with no lock and no lease: the
//!    repository exists, the updates are well formed, and every new target is an object the
//!    replica has. It answers `prepared` with the change, and has changed nothing.
//! 2. The caller's decision follows on the same stream. `commit TOKEN` enters the replica's
//!    fence with the token and makes the change in one reference transaction, which compares
//!    the old targets then, and answers `made` (or ends with why not). An abort, a caller that
//!    goes away, or no decision within [`DECISION_WAIT`] changes nothing, and an answer that
//!    ends without `made` says so.

use std::path::Path;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use super::prepare::DECISION_WAIT;
use super::refs::update_script;
use super::{Node, NodeError};
use crate::model::{ObjectId, RefName};
use crate::proto::{
    PrepareRefsRequest, PrepareRefsResponse, PreparedPush, PushDecision, RefUpdate, push_decision,
};

/// The change a prepared call makes once committed.
enum Change {
    /// `update-ref --stdin`'s script for the updates.
    Updates(String),
    /// HEAD to this branch.
    Head(RefName),
}

impl Node {
    /// Checks the change the first message names, answers `prepared`, and makes the change once
    /// the caller's decision commits it.
    pub(super) async fn prepare_refs(
        &self,
        first: PrepareRefsRequest,
        mut stream: Streaming<PrepareRefsRequest>,
    ) -> Result<ReceiverStream<Result<PrepareRefsResponse, Status>>, NodeError> {
        let repository = self.state.storages.existing(first.repository.as_ref())?;
        let (change, prepared) = match (first.updates.is_empty(), first.default_branch.is_empty()) {
            (false, true) => {
                let script = update_script(&first.updates)?;
                self.check_objects(&repository.path, &first.updates).await?;
                (Change::Updates(script), normalized(&first.updates)?)
            }
            (true, false) => {
                let branch = RefName::branch(&first.default_branch)?;
                let update = RefUpdate {
                    name: "HEAD".into(),
                    old_target: String::new(),
                    new_target: branch.as_str().to_owned(),
                };
                (Change::Head(branch), vec![update])
            }
            _ => {
                return Err(NodeError::BadRequest(
                    "a prepared change names either reference updates or a default branch".into(),
                ));
            }
        };
        let (sender, receiver) = mpsc::channel(2);
        let answer = PrepareRefsResponse {
            prepared: Some(PreparedPush { updates: prepared }),
            made: false,
        };
        sender
            .try_send(Ok(answer))
            .expect("a new channel has room for the first answer");
        let node = self.clone();
        let replica = repository.path.clone();
        tokio::spawn(tracing::Instrument::in_current_span(async move {
            let decision = match tokio::time::timeout(DECISION_WAIT, stream.message()).await {
                Ok(Ok(Some(message))) => message.decision,
                Ok(Ok(None)) => None,
                Ok(Err(status)) => {
                    tracing::debug!(%status, "a prepared change's caller went away");
                    None
                }
                Err(_) => {
                    let _ = sender.send(Err(unmade("no decision came in time"))).await;
                    return;
                }
            };
            let token = match decision {
                Some(PushDecision {
                    decision: Some(push_decision::Decision::CommitToken(token)),
                }) => token,
                Some(PushDecision {
                    decision: Some(push_decision::Decision::AbortReason(_)),
                }) => {
                    let _ = sender.send(Err(unmade("aborted"))).await;
                    return;
                }
                Some(PushDecision { decision: None }) => {
                    let refused = Status::invalid_argument(
                        "a prepared change's second message must be its decision",
                    );
                    let _ = sender.send(Err(refused)).await;
                    return;
                }
                // The caller went away (or sent no decision): nothing changes.
                None => return,
            };
            // Once decided, the change runs to its end whoever is still listening.
            let made = node
                .detached(move |node| async move {
                    match change {
                        Change::Updates(script) => {
                            node.apply_updates(&replica, &script, Some(token)).await
                        }
                        Change::Head(branch) => {
                            node.point_head(&replica, &branch, Some(token)).await
                        }
                    }
                })
                .await;
            let answer = made.map(|()| PrepareRefsResponse {
                prepared: None,
                made: true,
            });
            let _ = sender.send(answer).await;
        }));
        Ok(ReceiverStream::new(receiver))
    }

    /// Refuses updates whose new targets the replica does not have: the reference
    /// transaction would refuse them at the commit, and a bad request had better fail before
    /// any lease is taken.
    async fn check_objects(&self, replica: &Path, updates: &[RefUpdate]) -> Result<(), NodeError> {
        let mut wanted = Vec::new();
        for update in updates {
            let new = ObjectId::parse(&update.new_target)?;
            if !new.is_zero() {
                wanted.push((update.name.as_str(), new));
            }
        }
        if wanted.is_empty() {
            return Ok(());
        }
        let input: String = wanted
            .iter()
            .map(|(_, oid)| format!("{}\n", oid.as_str()))
            .collect();
        let output = self
            .state
            .git
            .run(
                Some(replica),
                &["cat-file", "--batch-check=%(objectname)"],
                Some(input.as_bytes()),
            )
            .await?;
        let output = String::from_utf8_lossy(&output);
        for ((name, oid), line) in wanted.iter().zip(output.lines()) {
            if line.ends_with(" missing") {
                return Err(NodeError::BadRequest(format!(
                    "reference update refused: {name} would point to {}, a nonexistent object",
                    oid.as_str()
                )));
            }
        }
        Ok(())
    }
}

/// Why a prepared change made nothing, as the end of its answer.
fn unmade(why: &str) -> Status {
    Status::aborted(format!(
        "the prepared change was not made: {why}; nothing was changed"
    ))
}

/// The updates as the replica reads them: ids in the form git writes (lower-case hex).
fn normalized(updates: &[RefUpdate]) -> Result<Vec<RefUpdate>, NodeError> {
    updates
        .iter()
        .map(|update| {
            Ok(RefUpdate {
                name: RefName::parse(&update.name)?.as_str().to_owned(),
                old_target: ObjectId::parse(&update.old_target)?.as_str().to_owned(),
                new_target: ObjectId::parse(&update.new_target)?.as_str().to_owned(),
            })
        })
        .collect()
}

//! A prepared reference change (`PrepareRefs`), as the proxy makes `UpdateRefs` and
//! `SetDefaultBranch`: checked and answered `prepared` with nothing changed, then made only on
//! a commit decision, under its token and the replica's fence.

use std::time::Duration;

use tokio::sync::mpsc;

use crate::common::*;
use gitfleet::node::fence::{self, FENCE_HEADER};
use gitfleet::proto::node_service_client::NodeServiceClient;
use gitfleet::proto::{
    PrepareRefsRequest, PrepareRefsResponse, PreparedPush, PushDecision, RefUpdate, push_decision,
};

type Requests = mpsc::Sender<PrepareRefsRequest>;
type Responses = tonic::Streaming<PrepareRefsResponse>;

fn updates(name: &str, old: &str, new: &str) -> PrepareRefsRequest {
    PrepareRefsRequest {
        repository: header("s1", "repo.git"),
        updates: vec![RefUpdate {
            name: name.into(),
            old_target: old.into(),
            new_target: new.into(),
        }],
        ..Default::default()
    }
}

/// Starts a prepared change and reads its `prepared` answer.
async fn prepare(
    node: &NodeProcess,
    first: PrepareRefsRequest,
) -> Result<(Requests, Responses, PreparedPush), tonic::Status> {
    let (requests, inbound) = mpsc::channel(2);
    requests.send(first).await.unwrap();
    let mut responses = NodeServiceClient::new(node.channel().await)
        .prepare_refs(tokio_stream::wrappers::ReceiverStream::new(inbound))
        .await?
        .into_inner();
    let answer = responses.message().await?.expect("an answer");
    let prepared = answer.prepared.expect("prepared");
    Ok((requests, responses, prepared))
}

/// Sends the decision and reads the rest of the answer: whether it said `made`, and the error
/// it ended with, if any.
async fn decide(
    requests: Requests,
    mut responses: Responses,
    decision: push_decision::Decision,
) -> (bool, Option<tonic::Status>) {
    requests
        .send(PrepareRefsRequest {
            decision: Some(PushDecision {
                decision: Some(decision),
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut made = false;
    loop {
        match responses.message().await {
            Ok(Some(message)) => {
                assert!(message.prepared.is_none(), "prepared twice: {message:?}");
                made |= message.made;
            }
            Ok(None) => return (made, None),
            Err(status) => return (made, Some(status)),
        }
    }
}

fn commit(token: u64) -> push_decision::Decision {
    push_decision::Decision::CommitToken(token)
}

#[tokio::test]
async fn a_prepared_change_is_made_only_on_its_commit_and_under_its_token() {
    let node = NodeProcess::start();
    let work = push_history(&node, &["main"]).await;
    let replica = node.repo_path("s1", "repo.git");
    let main = run_git(work.path(), &["rev-parse", "main"])
        .trim()
        .to_owned();
    let zero = "0".repeat(40);

    // Prepared: answered with the change, and nothing changed yet.
    let request = updates("refs/heads/copy", &zero, &main);
    let (requests, responses, prepared) = prepare(&node, request.clone()).await.unwrap();
    assert_eq!(prepared.updates, request.updates);
    assert!(!refs_of(&replica).contains("refs/heads/copy"));
    let (made, ended) = decide(requests, responses, commit(21)).await;
    assert!(made && ended.is_none(), "{ended:?}");
    assert!(refs_of(&replica).contains("refs/heads/copy"));
    assert_eq!(fence::read(&replica).unwrap(), 21);

    // An abort, and a caller that goes away before deciding, change nothing.
    let (requests, responses, _) = prepare(&node, updates("refs/heads/aborted", &zero, &main))
        .await
        .unwrap();
    let abort = push_decision::Decision::AbortReason("the write lock is on".into());
    // Only an answer that says `made` made the change: an abort ends with ABORTED.
    let (made, ended) = decide(requests, responses, abort).await;
    assert!(!made, "an aborted change said made");
    let ended = ended.expect("an aborted change ends with why");
    assert_eq!(ended.code(), tonic::Code::Aborted, "{ended:?}");
    assert!(ended.message().contains("nothing was changed"), "{ended:?}");
    let gone = prepare(&node, updates("refs/heads/gone", &zero, &main))
        .await
        .unwrap();
    drop(gone);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let refs = refs_of(&replica);
    assert!(!refs.contains("refs/heads/aborted"), "{refs}");
    assert!(!refs.contains("refs/heads/gone"), "{refs}");

    // A commit under an older token than the fence is refused, and changes nothing.
    let (requests, responses, _) = prepare(&node, updates("refs/heads/late", &zero, &main))
        .await
        .unwrap();
    let (made, fenced) = decide(requests, responses, commit(20)).await;
    assert!(!made);
    let fenced = fenced.unwrap();
    assert_eq!(fenced.code(), tonic::Code::FailedPrecondition, "{fenced:?}");
    assert!(fenced.message().contains("fenced"), "{fenced:?}");
    assert!(!refs_of(&replica).contains("refs/heads/late"));

    // The old targets are compared when the change is made: one that no longer holds is a
    // lost compare-and-swap, and nothing changes.
    let (requests, responses, _) = prepare(&node, updates("refs/heads/copy", &zero, &main))
        .await
        .unwrap();
    let (made, lost) = decide(requests, responses, commit(22)).await;
    assert!(!made);
    let lost = lost.unwrap();
    assert_eq!(lost.code(), tonic::Code::Aborted, "{lost:?}");
    assert!(lost.message().contains("nothing was changed"), "{lost:?}");

    // HEAD, as SetDefaultBranch changes it.
    let (requests, responses, prepared) = prepare(
        &node,
        PrepareRefsRequest {
            repository: header("s1", "repo.git"),
            default_branch: "copy".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(prepared.updates.len(), 1);
    assert_eq!(prepared.updates[0].name, "HEAD");
    assert_eq!(prepared.updates[0].new_target, "refs/heads/copy");
    assert_eq!(
        run_git(&replica, &["symbolic-ref", "HEAD"]).trim(),
        "refs/heads/main"
    );
    let (made, ended) = decide(requests, responses, commit(23)).await;
    assert!(made && ended.is_none(), "{ended:?}");
    assert_eq!(
        run_git(&replica, &["symbolic-ref", "HEAD"]).trim(),
        "refs/heads/copy"
    );
    assert_eq!(fence::read(&replica).unwrap(), 23);
}

#[tokio::test]
async fn a_change_the_replica_cannot_make_is_refused_before_any_decision() {
    let node = NodeProcess::start();
    let work = push_history(&node, &["main"]).await;
    let replica = node.repo_path("s1", "repo.git");
    let main = run_git(work.path(), &["rev-parse", "main"])
        .trim()
        .to_owned();
    let zero = "0".repeat(40);
    let before = refs_of(&replica);

    let refused = |result: Result<(Requests, Responses, PreparedPush), tonic::Status>| {
        result.expect_err("refused at once")
    };
    let missing = refused(prepare(&node, updates("refs/heads/x", &zero, &"1".repeat(40))).await);
    assert_eq!(missing.code(), tonic::Code::InvalidArgument, "{missing:?}");
    assert!(
        missing.message().contains("nonexistent object"),
        "{missing:?}"
    );
    let bad_name = refused(prepare(&node, updates("refs/heads/a..b", &zero, &main)).await);
    assert_eq!(
        bad_name.code(),
        tonic::Code::InvalidArgument,
        "{bad_name:?}"
    );
    let mut both = updates("refs/heads/x", &zero, &main);
    both.default_branch = "main".into();
    let both = refused(prepare(&node, both).await);
    assert_eq!(both.code(), tonic::Code::InvalidArgument, "{both:?}");
    let neither = refused(
        prepare(
            &node,
            PrepareRefsRequest {
                repository: header("s1", "repo.git"),
                ..Default::default()
            },
        )
        .await,
    );
    assert_eq!(neither.code(), tonic::Code::InvalidArgument, "{neither:?}");
    let mut elsewhere = updates("refs/heads/x", &zero, &main);
    elsewhere.repository = header("s1", "missing.git");
    let elsewhere = refused(prepare(&node, elsewhere).await);
    assert_eq!(elsewhere.code(), tonic::Code::NotFound, "{elsewhere:?}");

    // The token comes with the decision, never in the header.
    let mut request = tonic::Request::new(tokio_stream::iter(vec![updates(
        "refs/heads/x",
        &zero,
        &main,
    )]));
    request
        .metadata_mut()
        .insert(FENCE_HEADER, "5".parse().unwrap());
    let headed = NodeServiceClient::new(node.channel().await)
        .prepare_refs(request)
        .await
        .unwrap_err();
    assert_eq!(headed.code(), tonic::Code::InvalidArgument, "{headed:?}");

    assert_eq!(refs_of(&replica), before);
    assert_eq!(fence::read(&replica).unwrap(), 0);
}

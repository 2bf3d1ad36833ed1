//! The fence a node keeps per replica: a ref change that carries a token older than the highest
//! the node has accepted for that replica changes nothing and says why, and the fence outlives
//! the node's restart.

use crate::common::*;
use gitfleet::node::fence::FENCE_HEADER;
use gitfleet::proto::ref_service_client::RefServiceClient;
use gitfleet::proto::*;
use tonic::Code;

fn fenced<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert(FENCE_HEADER, token.parse().unwrap());
    request
}

fn move_main(old: &str, new: &str) -> UpdateRefsRequest {
    UpdateRefsRequest {
        repository: header("s1", "repo.git"),
        updates: vec![RefUpdate {
            name: "refs/heads/main".into(),
            old_target: old.into(),
            new_target: new.into(),
        }],
    }
}

fn default_branch(branch: &str) -> SetDefaultBranchRequest {
    SetDefaultBranchRequest {
        repository: header("s1", "repo.git"),
        branch: branch.into(),
    }
}

#[tokio::test]
async fn a_ref_change_with_an_older_token_than_the_fence_changes_nothing() {
    let mut node = NodeProcess::start();
    let work = push_history(&node, &["main", "feature"]).await;
    let replica = node.repo_path("s1", "repo.git");
    let main = run_git(work.path(), &["rev-parse", "main"])
        .trim()
        .to_owned();
    let feature = run_git(work.path(), &["rev-parse", "feature"])
        .trim()
        .to_owned();
    let mut refs = RefServiceClient::new(node.channel().await);

    // A call without a token is not fenced; one with a token raises the fence.
    refs.update_refs(fenced(move_main(&main, &feature), "5"))
        .await
        .unwrap();
    assert_eq!(
        run_git(&replica, &["rev-parse", "refs/heads/main"]).trim(),
        feature
    );

    // An older token: refused with the reason, and the ref stays.
    let refused = refs
        .update_refs(fenced(move_main(&feature, &main), "4"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert_eq!(refused.message(), "fenced: token 4 is older than 5");
    assert_eq!(
        run_git(&replica, &["rev-parse", "refs/heads/main"]).trim(),
        feature
    );
    let refused = refs
        .set_default_branch(fenced(default_branch("feature"), "3"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert_eq!(
        run_git(&replica, &["symbolic-ref", "HEAD"]).trim(),
        "refs/heads/main"
    );

    // The fence is on disk: a restarted node still refuses the older token.
    node.restart();
    let mut refs = RefServiceClient::new(node.channel().await);
    let refused = refs
        .update_refs(fenced(move_main(&feature, &main), "4"))
        .await
        .unwrap_err();
    assert_eq!(refused.message(), "fenced: token 4 is older than 5");
    // The same token, or a newer one, goes through.
    refs.set_default_branch(fenced(default_branch("feature"), "5"))
        .await
        .unwrap();
    refs.update_refs(fenced(move_main(&feature, &main), "8"))
        .await
        .unwrap();
    assert_eq!(
        run_git(&replica, &["rev-parse", "refs/heads/main"]).trim(),
        main
    );
    assert_eq!(
        run_git(&replica, &["symbolic-ref", "HEAD"]).trim(),
        "refs/heads/feature"
    );

    // A token that is not a number is bad input.
    let refused = refs
        .update_refs(fenced(move_main(&main, &feature), "soon"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
}

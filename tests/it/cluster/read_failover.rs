//! A read whose replica fails before answering (its node unreachable, or the replica gone from
//! its disk) is served by another up-to-date replica: the caller never sees the failure while
//! one replica can answer.

use crate::common::cluster::Cluster;
use crate::common::*;
use gitfleet::proto::ref_service_client::RefServiceClient;
use gitfleet::proto::{FindDefaultBranchRequest, ListRefsRequest};

async fn default_branch(cluster: &Cluster) -> Result<String, tonic::Status> {
    RefServiceClient::new(cluster.channel().await)
        .find_default_branch(FindDefaultBranchRequest {
            repository: header("default", "failover.git"),
        })
        .await
        .map(|answer| answer.into_inner().name)
}

#[tokio::test(flavor = "multi_thread")]
async fn reads_go_to_another_replica_when_theirs_is_gone_or_its_node_is_dead() {
    let mut cluster = Cluster::start(3).await;
    cluster.create("failover.git").await;
    let work = cluster.push_main("failover.git");
    let record = cluster.record("failover.git").await;

    // Two of the three replicas vanish from their disks; the catalog still holds them up to
    // date, so two reads in three are routed to one of them first.
    for index in [0, 1] {
        std::fs::remove_dir_all(cluster.replica_dir(index, &record)).unwrap();
    }
    for _ in 0..20 {
        assert_eq!(default_branch(&cluster).await.unwrap(), "refs/heads/main");
    }
    let answer = RefServiceClient::new(cluster.channel().await)
        .list_refs(ListRefsRequest {
            repository: header("default", "failover.git"),
            prefixes: vec!["refs/heads/".into()],
        })
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    assert!(answer.refs.iter().any(|r| r.name == "refs/heads/main"));
    // git over HTTP too.
    let refs = run_git(
        work.path(),
        &[
            "ls-remote",
            &cluster.git_url(crate::common::cluster::READ_TOKEN, "failover.git"),
        ],
    );
    assert!(refs.contains("refs/heads/main"), "{refs}");

    // A node killed under a repository whose replicas are all whole: reads right after go to
    // the others, before the health prober has noticed.
    cluster.create("alive.git").await;
    cluster.push_main("alive.git");
    cluster.nodes[0].kill();
    for _ in 0..10 {
        let answer = RefServiceClient::new(cluster.channel().await)
            .find_default_branch(FindDefaultBranchRequest {
                repository: header("default", "alive.git"),
            })
            .await
            .unwrap();
        assert_eq!(answer.into_inner().name, "refs/heads/main");
    }

    // With the last replica's node killed, the caller gets that node's failure, not a
    // made-up one.
    cluster.nodes[2].kill();
    let failed = default_branch(&cluster).await.unwrap_err();
    assert!(
        matches!(
            failed.code(),
            tonic::Code::Unavailable | tonic::Code::NotFound
        ),
        "{failed:?}"
    );
}

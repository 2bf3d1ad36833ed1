//! The proxy end to end: real PostgreSQL, three real nodes, real git through smart HTTP.

mod common;

use common::cluster::{Cluster, STORAGES};
use common::*;
use gitfleet::proto::ref_service_client::RefServiceClient;
use gitfleet::proto::repository_service_client::RepositoryServiceClient;
use gitfleet::proto::*;
use gitfleet::store::RepositoryRecord;

async fn create(cluster: &Cluster, relative_path: &str) {
    RepositoryServiceClient::new(cluster.channel().await)
        .create_repository(CreateRepositoryRequest {
            repository: header("default", relative_path),
            default_branch: "main".into(),
        })
        .await
        .unwrap();
}

/// The refs checksum of the replica on node `index`, asked of the node directly.
async fn node_checksum(cluster: &Cluster, index: usize, record: &RepositoryRecord) -> String {
    RefServiceClient::new(cluster.nodes[index].channel().await)
        .refs_checksum(RefsChecksumRequest {
            repository: header(STORAGES[index], record.replica_path.as_str()),
        })
        .await
        .unwrap()
        .into_inner()
        .checksum
}

fn generation_of(record: &RepositoryRecord, index: usize) -> Option<i64> {
    record
        .replicas
        .iter()
        .find(|(storage, _)| storage.as_str() == STORAGES[index])
        .map(|(_, generation)| *generation)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_push_through_the_proxy_lands_on_every_replica_and_clones_back() {
    let cluster = Cluster::start(3).await;
    create(&cluster, "group/project.git").await;
    let record = cluster.record("group/project.git").await;
    assert_eq!(record.generation, 0);
    assert_eq!(record.assigned.len(), 3);
    for index in 0..3 {
        assert!(cluster.replica_dir(index, &record).join("HEAD").exists());
    }

    let work = tempfile::tempdir().unwrap();
    make_history(work.path());
    let url = cluster.url("group/project.git");
    run_git(
        work.path(),
        &["push", "-q", &url, "main", "feature", "v1", "v2"],
    );

    let record = cluster.record("group/project.git").await;
    assert_eq!(record.generation, 1);
    let mut checksums = Vec::new();
    for index in 0..3 {
        assert_eq!(generation_of(&record, index), Some(1), "{record:?}");
        checksums.push(node_checksum(&cluster, index, &record).await);
    }
    assert!(
        checksums.iter().all(|checksum| *checksum == checksums[0]),
        "{checksums:?}"
    );
    assert_ne!(checksums[0], "0".repeat(64));
    let intents: i64 = sqlx::query_scalar("SELECT count(*) FROM write_intents")
        .fetch_one(cluster.store().pool())
        .await
        .unwrap();
    assert_eq!(
        intents, 0,
        "the intent is closed once the write is committed"
    );

    let clones = tempfile::tempdir().unwrap();
    let (clone, _) = clone_traced(clones.path(), &url, "2", "clone");
    assert_eq!(
        run_git(&clone, &["rev-parse", "HEAD"]),
        run_git(work.path(), &["rev-parse", "main"])
    );
    let advertised = run_git(work.path(), &["ls-remote", "--refs", &url]);
    let local = run_git(work.path(), &["show-ref"]);
    let mut local: Vec<&str> = local.lines().collect();
    let mut advertised: Vec<&str> = advertised.lines().collect();
    local.sort();
    advertised.sort();
    assert_eq!(advertised.join("\n").replace('\t', " "), local.join("\n"));
}

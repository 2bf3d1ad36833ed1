//! The maintenance write lock against real PostgreSQL, node processes and git: every proxy
//! turns writes away with the reason, git users see it, reads go on, PostgreSQL itself refuses
//! a lease while the lock is on, `--wait` waits for the writes in flight, and lifting the lock
//! lets writes through again.

use std::time::{Duration, Instant};

use crate::common::cluster::Cluster;
use crate::common::http::ok;
use crate::common::worker::{admin, wait_for};
use crate::common::*;
use gitfleet::proto::CreateRepositoryRequest;
use gitfleet::proto::repository_service_client::RepositoryServiceClient;
use gitfleet::store::WriteStart;

const REASON: &str = "PostgreSQL upgrade, back at 14:00";

async fn create(channel: gitfleet::client::AuthedChannel, path: &str) -> Result<(), tonic::Status> {
    RepositoryServiceClient::new(channel)
        .create_repository(CreateRepositoryRequest {
            repository: header("default", path),
            default_branch: "main".into(),
        })
        .await
        .map(|_| ())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_write_lock_turns_writes_away_everywhere_and_lets_reads_through() {
    let cluster = Cluster::start(3).await;
    let (_second, second_channel) = cluster.second_proxy().await;
    cluster.create("locked.git").await;
    let work = cluster.push_main("locked.git");

    let enabled = admin(&cluster, &["write-lock", "enable", "--reason", REASON]);
    assert!(ok(&enabled).contains(&format!("writes are locked: {REASON}")));
    let started = Instant::now();
    // Both proxies turn writes away, with the reason.
    for channel in [cluster.channel().await, second_channel.clone()] {
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            match create(channel.clone(), "new.git").await {
                Err(status) => break status,
                Ok(()) => {
                    assert!(Instant::now() < deadline, "the proxy never obeyed the lock");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert_eq!(
            status.message(),
            format!("writes are locked for maintenance: {REASON}")
        );
    }
    println!(
        "both proxies obeyed {:.0} ms after the lock was enabled",
        started.elapsed().as_secs_f64() * 1000.0
    );
    // A git user sees why.
    std::fs::write(work.path().join("late.txt"), "late\n").unwrap();
    run_git(work.path(), &["add", "."]);
    run_git(work.path(), &["commit", "-q", "-m", "late"]);
    // Through the proxy's own git over HTTP.
    let url = cluster.git_url(crate::common::cluster::WRITE_TOKEN, "locked.git");
    let pushed = try_git(work.path(), &["push", &url, "main"]);
    assert!(!pushed.status.success());
    let said = String::from_utf8_lossy(&pushed.stderr);
    println!("git push said:\n{said}");
    assert!(
        said.contains(&format!("writes are locked for maintenance: {REASON}")),
        "{said}"
    );
    // Reads go on.
    let refs = run_git(work.path(), &["ls-remote", &url]);
    assert!(refs.contains("refs/heads/main"), "{refs}");
    let clone = tempfile::tempdir().unwrap();
    run_git(clone.path(), &["clone", "-q", &url, "copy"]);
    // PostgreSQL refuses a lease itself, whatever a proxy's copy of the lock says.
    let store = cluster.store();
    let start = store
        .begin_write(
            &Cluster::virtual_storage(),
            &gitfleet::model::RelativePath::parse("locked.git").unwrap(),
            "a-proxy-that-did-not-hear",
            Duration::from_secs(60),
            "/gitfleet.v1.RefService/UpdateRefs",
            &[],
            &[
                Cluster::storage(0),
                Cluster::storage(1),
                Cluster::storage(2),
            ],
        )
        .await
        .unwrap();
    assert!(
        matches!(&start, WriteStart::Locked(reason) if reason == REASON),
        "{start:?}"
    );

    let status = admin(&cluster, &["write-lock", "status"]);
    let said = ok(&status);
    assert!(said.starts_with("ON for "), "{said}");
    assert!(said.contains(&format!(": {REASON}")), "{said}");
    assert!(said.contains("no write in flight"), "{said}");
    let (code, text) = {
        let output = admin(&cluster, &["status"]);
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
        )
    };
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("write lock: ON for"), "{text}");

    // Lifted: the same push goes through.
    let disabled = admin(&cluster, &["write-lock", "disable"]);
    assert!(ok(&disabled).contains("writes are accepted"));
    wait_for(10, "the push to go through", || async {
        try_git(
            work.path(),
            &["push", "-q", &cluster.url("locked.git"), "main"],
        )
        .status
        .success()
    })
    .await;
    create(second_channel, "after.git").await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn enabling_with_wait_returns_once_the_writes_in_flight_are_over() {
    let cluster = Cluster::start(2).await;
    cluster.create("busy.git").await;
    let record = cluster.record("busy.git").await;
    let store = cluster.store();
    // A write in flight through another proxy: a live lease and its intent.
    sqlx::query(
        "WITH lease AS (
             UPDATE repositories SET lease_owner = 'another-proxy',
                    lease_token = nextval('repository_lease_tokens'),
                    lease_expires_at = now() + interval '1 minute'
             WHERE id = $1 RETURNING id, lease_token, lease_expires_at, generation
         )
         INSERT INTO write_intents (repository_id, owner, fencing_token, lease_expires_at,
                                    rpc, base_generation, ref_updates, target_storages)
         SELECT id, 'another-proxy', lease_token, lease_expires_at,
                '/gitfleet.v1.RefService/UpdateRefs', generation, '[]', '{}'
         FROM lease",
    )
    .bind(record.id.0)
    .execute(store.pool())
    .await
    .unwrap();

    let mut waiting = std::process::Command::new(BINARY)
        .args(["admin", "--config"])
        .arg(&cluster.config_path)
        .args(["write-lock", "enable", "--reason", "maintenance", "--wait"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        waiting.try_wait().unwrap().is_none(),
        "--wait returned while a write was in flight"
    );
    let status = admin(&cluster, &["write-lock", "status", "--json"]);
    let report: serde_json::Value = serde_json::from_str(&ok(&status)).unwrap();
    assert_eq!(report["lock"]["enabled"], true);
    assert_eq!(report["writes"][0]["repository"], "default/busy.git");
    assert_eq!(report["writes"][0]["owner"], "another-proxy");
    assert_eq!(report["writes"][0]["expired"], false);

    // The write ends.
    sqlx::query("DELETE FROM write_intents WHERE repository_id = $1")
        .bind(record.id.0)
        .execute(store.pool())
        .await
        .unwrap();
    sqlx::query(
        "UPDATE repositories SET lease_owner = NULL, lease_expires_at = NULL WHERE id = $1",
    )
    .bind(record.id.0)
    .execute(store.pool())
    .await
    .unwrap();
    let output = tokio::task::spawn_blocking(move || waiting.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(
        said.contains("no write in flight: maintenance can begin"),
        "{said}"
    );
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("waiting for 1 writes in flight"),
        "{output:?}"
    );

    // An empty reason is refused, and changes nothing.
    let refused = admin(&cluster, &["write-lock", "enable", "--reason", " "]);
    assert_eq!(refused.status.code(), Some(1));
    admin(&cluster, &["write-lock", "disable"]);
    let status = admin(&cluster, &["write-lock", "status"]);
    assert!(ok(&status).starts_with("off"), "{}", ok(&status));
}

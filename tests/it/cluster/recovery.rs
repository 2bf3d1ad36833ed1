//! The recovery job against real PostgreSQL, node processes and git: a write whose proxy died
//! after it moved refs on some replicas is rolled back on every one of them with the
//! generation unchanged; a replica that cannot be rolled back is marked outdated and repaired;
//! and two workers recovering at once do no harm.

use std::time::Duration;

use crate::common::cluster::Cluster;
use crate::common::worker::*;
use crate::common::*;
use gitfleet::proto::ref_service_client::RefServiceClient;
use gitfleet::proto::{RefUpdate, UpdateRefsRequest};
use gitfleet::store::RepositoryRecord;
use gitfleet::worker::{Hooks, JobType, Pause};

/// Records `change` as the intent of a write whose proxy died: its lease run out, its targets
/// all three storages.
async fn record_dead_intent(
    cluster: &Cluster,
    record: &RepositoryRecord,
    rpc: &str,
    change: serde_json::Value,
) {
    sqlx::query(
        "WITH lease AS (
             UPDATE repositories SET lease_owner = 'a-dead-proxy',
                    lease_token = nextval('repository_lease_tokens'),
                    lease_expires_at = now() - interval '1 second'
             WHERE id = $1 RETURNING id, lease_token, lease_expires_at, generation
         )
         INSERT INTO write_intents (repository_id, owner, fencing_token, lease_expires_at,
                                    rpc, base_generation, ref_updates, target_storages)
         SELECT id, 'a-dead-proxy', lease_token, lease_expires_at, $2, generation,
                jsonb_build_array($3::jsonb), ARRAY['storage-1', 'storage-2', 'storage-3']
         FROM lease",
    )
    .bind(record.id.0)
    .bind(rpc)
    .bind(change)
    .execute(cluster.store().pool())
    .await
    .unwrap();
}

/// Leaves an interrupted write on `name`: main moved from `old` to `new` on the replicas of
/// `applied` (as a proxy would have before it died), the intent recorded for all three, and
/// the dead proxy's lease run out.
async fn interrupt(
    cluster: &Cluster,
    record: &RepositoryRecord,
    applied: &[usize],
    old: &str,
    new: &str,
) {
    for &index in applied {
        run_git(
            &cluster.replica_dir(index, record),
            &["update-ref", "refs/heads/main", new, old],
        );
    }
    let change = serde_json::json!({"ref": "refs/heads/main", "old": old, "new": new});
    record_dead_intent(
        cluster,
        record,
        "/gitfleet.v1.SmartHTTPService/PostReceivePack",
        change,
    )
    .await;
}

fn main_of(cluster: &Cluster, index: usize, record: &RepositoryRecord) -> String {
    run_git(
        &cluster.replica_dir(index, record),
        &["rev-parse", "refs/heads/main"],
    )
    .trim()
    .to_owned()
}

/// A repository with main at a first commit, and a second commit on another branch (so every
/// replica holds its objects): returns (record, work tree, first, second).
async fn prepared(
    cluster: &Cluster,
    name: &str,
) -> (RepositoryRecord, tempfile::TempDir, String, String) {
    cluster.create(name).await;
    let work = cluster.push_main(name);
    let first = run_git(work.path(), &["rev-parse", "main"])
        .trim()
        .to_owned();
    run_git(work.path(), &["checkout", "-q", "-b", "next"]);
    std::fs::write(work.path().join("next.txt"), "next\n").unwrap();
    run_git(work.path(), &["add", "."]);
    run_git(work.path(), &["commit", "-q", "-m", "next"]);
    run_git(work.path(), &["push", "-q", &cluster.url(name), "next"]);
    let second = run_git(work.path(), &["rev-parse", "next"])
        .trim()
        .to_owned();
    run_git(work.path(), &["checkout", "-q", "main"]);
    (cluster.record(name).await, work, first, second)
}

/// Who holds the repository's write lease, if anyone.
async fn lease_owner(cluster: &Cluster, record: &RepositoryRecord) -> Option<String> {
    sqlx::query_scalar("SELECT lease_owner FROM repositories WHERE id = $1")
        .bind(record.id.0)
        .fetch_one(cluster.store().pool())
        .await
        .unwrap()
}

async fn intents(cluster: &Cluster) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM write_intents")
        .fetch_one(cluster.store().pool())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_interrupted_write_is_rolled_back_everywhere_with_the_generation_unchanged() {
    let cluster = Cluster::start(3).await;
    let (record, work, first, second) = prepared(&cluster, "interrupted.git").await;
    let good = cluster.agreed_checksum(&record).await;
    // The write reached storage-1 and storage-2, not storage-3.
    interrupt(&cluster, &record, &[0, 1], &first, &second).await;
    assert_eq!(main_of(&cluster, 0, &record), second);
    // Not "everything is fine" while the write waits.
    let status = admin(&cluster, &["status"]);
    assert_eq!(status.status.code(), Some(2));
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains("interrupted writes waiting for recovery: 1"),
        "{text}"
    );

    let worker = start_worker(
        worker_config(&cluster),
        &[JobType::Recovery],
        Hooks::default(),
    );
    wait_for(30, "the intent closed", || async {
        intents(&cluster).await == 0
    })
    .await;
    for index in 0..3 {
        assert_eq!(main_of(&cluster, index, &record), first, "storage {index}");
    }
    let after = cluster.record("interrupted.git").await;
    assert_eq!(after.generation, record.generation, "the generation moved");
    assert_eq!(after.up_to_date().count(), 3);
    assert_eq!(cluster.agreed_checksum(&after).await, good);
    assert_eq!(lease_owner(&cluster, &record).await, None);
    admin_says(&cluster, &["status"], "HEALTHY");
    // Not frozen: the next push goes through, and lands everywhere.
    std::fs::write(work.path().join("after.txt"), "after\n").unwrap();
    run_git(work.path(), &["add", "."]);
    run_git(work.path(), &["commit", "-q", "-m", "after"]);
    run_git(
        work.path(),
        &["push", "-q", &cluster.url("interrupted.git"), "main"],
    );
    let pushed = run_git(work.path(), &["rev-parse", "main"])
        .trim()
        .to_owned();
    for index in 0..3 {
        assert_eq!(main_of(&cluster, index, &record), pushed);
    }
    worker.stop().await;
}

/// Leaves an interrupted SetDefaultBranch on `record`: HEAD moved from main to next on the
/// replicas of `applied`, the intent recorded with HEAD's old branch (as the proxy records it
/// before it sends the change), and the dead proxy's lease run out.
async fn interrupt_head(cluster: &Cluster, record: &RepositoryRecord, applied: &[usize]) {
    for &index in applied {
        run_git(
            &cluster.replica_dir(index, record),
            &["symbolic-ref", "HEAD", "refs/heads/next"],
        );
    }
    let change =
        serde_json::json!({"ref": "HEAD", "old": "refs/heads/main", "new": "refs/heads/next"});
    record_dead_intent(
        cluster,
        record,
        "/gitfleet.v1.RefService/SetDefaultBranch",
        change,
    )
    .await;
}

fn head_of(cluster: &Cluster, index: usize, record: &RepositoryRecord) -> String {
    run_git(
        &cluster.replica_dir(index, record),
        &["symbolic-ref", "HEAD"],
    )
    .trim()
    .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_interrupted_default_branch_change_is_rolled_back_too() {
    let cluster = Cluster::start(3).await;
    let (record, _work, _first, _second) = prepared(&cluster, "head.git").await;
    let good = cluster.agreed_checksum(&record).await;
    interrupt_head(&cluster, &record, &[0, 1]).await;
    assert_eq!(head_of(&cluster, 0, &record), "refs/heads/next");

    let worker = start_worker(
        worker_config(&cluster),
        &[JobType::Recovery],
        Hooks::default(),
    );
    wait_for(30, "the intent closed", || async {
        intents(&cluster).await == 0
    })
    .await;
    for index in 0..3 {
        assert_eq!(
            head_of(&cluster, index, &record),
            "refs/heads/main",
            "storage {index}"
        );
    }
    let after = cluster.record("head.git").await;
    assert_eq!(after.generation, record.generation);
    assert_eq!(after.up_to_date().count(), 3);
    assert_eq!(cluster.agreed_checksum(&after).await, good);
    worker.stop().await;
}

/// Hooks that stall a recovery right before it sends its first rollback, until `go` has a
/// permit for each rollback; `stalled` hears when it stalls.
fn stalled_before_rollback() -> (
    Hooks,
    tokio::sync::mpsc::UnboundedReceiver<()>,
    std::sync::Arc<tokio::sync::Semaphore>,
) {
    let (stalled_tx, stalled_rx) = tokio::sync::mpsc::unbounded_channel();
    let go = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let gate = go.clone();
    let hooks = Hooks {
        pause: Some(std::sync::Arc::new(move |pause| {
            let (stalled_tx, gate) = (stalled_tx.clone(), gate.clone());
            Box::pin(async move {
                if let Pause::RollingBack(_) = pause {
                    let _ = stalled_tx.send(());
                    gate.acquire().await.unwrap().forget();
                }
            })
        })),
        ..Hooks::default()
    };
    (hooks, stalled_rx, go)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rollback_that_outlives_its_lease_cannot_undo_an_acknowledged_push() {
    let cluster = Cluster::start(3).await;
    let (record, work, first, second) = prepared(&cluster, "late.git").await;
    interrupt(&cluster, &record, &[0, 1, 2], &first, &second).await;

    // The recovery takes the lease and stalls right before its first compare-and-swap goes
    // out, as a stopped process would; its lease runs out meanwhile.
    let (hooks, mut stalled, go) = stalled_before_rollback();
    let worker = start_worker(worker_config(&cluster), &[JobType::Recovery], hooks);
    stalled.recv().await.unwrap();
    sqlx::query(
        "UPDATE repositories SET lease_owner = 'a-stalled-worker',
                lease_expires_at = now() - interval '1 second'
         WHERE id = $1",
    )
    .bind(record.id.0)
    .execute(cluster.store().pool())
    .await
    .unwrap();

    // The next write settles the interrupted one under a newer lease; then the user pushes
    // main to the second commit again, and is told it landed.
    let url = cluster.url("late.git");
    run_git(work.path(), &["push", "-q", &url, "next:refs/heads/other"]);
    for index in 0..3 {
        assert_eq!(main_of(&cluster, index, &record), first, "settled");
    }
    run_git(
        work.path(),
        &["push", "-q", &url, &format!("{second}:refs/heads/main")],
    );
    let acknowledged = cluster.record("late.git").await;
    for index in 0..3 {
        assert_eq!(main_of(&cluster, index, &record), second, "pushed");
    }

    // The stalled rollback resumes: second -> first would match, and must change nothing.
    go.add_permits(3);
    worker.stop().await;
    for index in 0..3 {
        assert_eq!(
            main_of(&cluster, index, &record),
            second,
            "storage {index}: the acknowledged push was undone"
        );
    }
    let after = cluster.record("late.git").await;
    assert_eq!(after.generation, acknowledged.generation);
    assert_eq!(after.up_to_date().count(), 3);
    let advertised = run_git(work.path(), &["ls-remote", &url, "refs/heads/main"]);
    assert!(advertised.starts_with(&second), "{advertised}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_that_cannot_be_rolled_back_is_marked_outdated_and_repaired() {
    let cluster = Cluster::start(3).await;
    let (record, work, first, second) = prepared(&cluster, "diverted.git").await;
    interrupt(&cluster, &record, &[0, 1, 2], &first, &second).await;
    // Something else moved storage-3's main after the write: no swap brings it back.
    let elsewhere = run_git(work.path(), &["rev-parse", "main~1"])
        .trim()
        .to_owned();
    run_git(
        &cluster.replica_dir(2, &record),
        &["update-ref", "refs/heads/main", &elsewhere],
    );

    let mut config = worker_config(&cluster);
    config.reconciler.interval = gitfleet::config::Duration(std::time::Duration::from_millis(200));
    let worker = start_worker(
        config,
        &[JobType::Recovery, JobType::Reconciler, JobType::Replicator],
        Hooks::default(),
    );
    wait_for(30, "the intent closed", || async {
        intents(&cluster).await == 0
    })
    .await;
    wait_for(60, "storage-3 repaired", || async {
        cluster.record("diverted.git").await.up_to_date().count() == 3
            && main_of(&cluster, 2, &record) == first
    })
    .await;
    let after = cluster.record("diverted.git").await;
    assert_eq!(after.generation, record.generation);
    cluster.agreed_checksum(&after).await;
    for index in 0..3 {
        assert_eq!(main_of(&cluster, index, &record), first, "storage {index}");
    }
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_workers_recovering_at_once_do_no_harm() {
    let cluster = Cluster::start(3).await;
    let mut prepared_writes = Vec::new();
    for n in 0..4 {
        let name = format!("race/{n}.git");
        let (record, _work, first, second) = prepared(&cluster, &name).await;
        interrupt(&cluster, &record, &[0, 1], &first, &second).await;
        prepared_writes.push((record, first));
    }
    let config = worker_config(&cluster);
    let one = start_worker(config.clone(), &[JobType::Recovery], Hooks::default());
    let two = start_worker(config, &[JobType::Recovery], Hooks::default());
    wait_for(30, "every intent closed", || async {
        intents(&cluster).await == 0
    })
    .await;
    for (record, first) in &prepared_writes {
        let after = cluster
            .store()
            .find_repository(&record.virtual_storage, &record.relative_path)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(after.generation, record.generation);
        assert_eq!(after.up_to_date().count(), 3);
        for index in 0..3 {
            assert_eq!(&main_of(&cluster, index, record), first);
        }
    }
    let runs = one.metrics.runs(JobType::Recovery) + two.metrics.runs(JobType::Recovery);
    assert_eq!(runs, 4, "each write recovered exactly once");
    one.stop().await;
    two.stop().await;
}

/// Makes every write's commit stall inside its transaction until the server restarts, so a
/// test can cut the database off while a commit is in flight, with no way for it to finish.
async fn hold_commits_until_restart(cluster: &Cluster) {
    sqlx::raw_sql(
        "CREATE TABLE hold_until_restart AS SELECT pg_postmaster_start_time() AS started;
         CREATE FUNCTION hold_commit() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF EXISTS (SELECT 1 FROM hold_until_restart
                        WHERE started = pg_postmaster_start_time()) THEN
                 PERFORM pg_sleep(600);
             END IF;
             RETURN OLD;
         END $$;
         CREATE TRIGGER hold_commit BEFORE DELETE ON write_intents
             FOR EACH ROW EXECUTE FUNCTION hold_commit();",
    )
    .execute(cluster.store().pool())
    .await
    .unwrap();
}

/// Waits until a commit is held by [`hold_commits_until_restart`].
async fn commit_held(cluster: &Cluster) {
    wait_for(30, "a commit held", || async {
        let held: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'",
        )
        .fetch_one(cluster.store().pool())
        .await
        .unwrap_or(0);
        held > 0
    })
    .await;
}

/// Pushes a new commit on `branch` through the proxy's HTTP in the background.
fn push_branch(
    cluster: &Cluster,
    work: &std::path::Path,
    branch: &str,
) -> (String, tokio::task::JoinHandle<std::process::Output>) {
    commit_branch(work, branch);
    let commit = run_git(work, &["rev-parse", branch]).trim().to_owned();
    let url = cluster.git_url(crate::common::cluster::WRITE_TOKEN, "restart.git");
    let work = work.to_owned();
    let branch = branch.to_owned();
    let push = tokio::task::spawn_blocking(move || try_git(&work, &["push", &url, &branch]));
    (commit, push)
}

fn branch_of(cluster: &Cluster, index: usize, record: &RepositoryRecord, branch: &str) -> String {
    let output = try_git(
        &cluster.replica_dir(index, record),
        &[
            "rev-parse",
            "--verify",
            "-q",
            &format!("refs/heads/{branch}"),
        ],
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_write_whose_commit_meets_a_database_restart_commits_once_it_is_back() {
    let server = crate::common::db::OwnServer::start().await;
    let cluster = Cluster::start_on(server.url().to_owned(), 3, 3, "", "").await;
    let (record, work, ..) = prepared(&cluster, "restart.git").await;
    hold_commits_until_restart(&cluster).await;

    let (commit, push) = push_branch(&cluster, work.path(), "during");
    commit_held(&cluster).await;
    // The commit's session is cut halfway.
    server.restart();
    let output = push.await.unwrap();
    assert!(
        output.status.success(),
        "the push failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );

    let after = cluster.record("restart.git").await;
    assert_eq!(after.generation, record.generation + 1);
    assert_eq!(after.up_to_date().count(), 3);
    for index in 0..3 {
        assert_eq!(branch_of(&cluster, index, &record, "during"), commit);
    }
    assert_eq!(intents(&cluster).await, 0);
    assert_eq!(lease_owner(&cluster, &record).await, None);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_write_that_cannot_commit_in_time_fails_and_is_rolled_back_by_recovery() {
    let server = crate::common::db::OwnServer::start().await;
    let cluster = Cluster::start_on(
        server.url().to_owned(),
        3,
        3,
        "[writes]\nlease = \"2s\"\ncommit_retry = \"1s\"\n",
        "",
    )
    .await;
    let (record, _work, first, _) = prepared(&cluster, "restart.git").await;
    hold_commits_until_restart(&cluster).await;

    // An app server's write, so the caller's error can be read whole.
    let mut refs = RefServiceClient::new(cluster.channel().await);
    let write = tokio::spawn(async move {
        refs.update_refs(UpdateRefsRequest {
            repository: header("default", "restart.git"),
            updates: vec![RefUpdate {
                name: "refs/heads/during".into(),
                old_target: "0".repeat(40),
                new_target: first,
            }],
        })
        .await
    });
    commit_held(&cluster).await;
    server.stop();
    let error = write.await.unwrap().unwrap_err();
    assert_eq!(error.code(), tonic::Code::Unavailable, "{error:?}");
    assert!(
        error.message().contains("could not be recorded within 1s")
            && error.message().contains("the recovery job rolls it back"),
        "{}",
        error.message()
    );
    // The write is on the replicas, and uncommitted.
    assert!(!branch_of(&cluster, 0, &record, "during").is_empty());

    server.start_again();
    let worker = start_worker(
        worker_config(&cluster),
        &[JobType::Recovery],
        Hooks::default(),
    );
    wait_for(30, "the intent closed", || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM write_intents")
            .fetch_one(cluster.store().pool())
            .await
            .is_ok_and(|count| count == 0)
    })
    .await;
    for index in 0..3 {
        assert_eq!(
            branch_of(&cluster, index, &record, "during"),
            "",
            "storage {index}"
        );
    }
    let after = cluster.record("restart.git").await;
    assert_eq!(after.generation, record.generation);
    assert_eq!(after.up_to_date().count(), 3);
    worker.stop().await;
}

/// A proxy killed while it creates a repository leaves the row behind. Before, the path was
/// taken for ever with no replica to serve it. The creation's intent lets the recovery job
/// settle it: undone here (no replica was made), and the path can be created again and used.
#[tokio::test(flavor = "multi_thread")]
async fn a_creation_whose_proxy_died_is_settled_and_the_path_can_be_created_again() {
    use crate::common::cluster::PROXY_TOKEN;
    use crate::common::fleet::Fleet;
    use crate::common::stall::Stall;
    use gitfleet::auth::Signer;
    use gitfleet::proto::CreateRepositoryRequest;
    use gitfleet::proto::repository_service_client::RepositoryServiceClient;

    let mut fleet = Fleet::start(
        "lease = \"2s\"",
        "lease = \"2s\"\npoll_interval = \"100ms\"",
    )
    .await;
    let stalls: Vec<Stall> = (0..3).map(|_| Stall::new("init")).collect();
    for (node, stall) in fleet.nodes.iter_mut().zip(&stalls) {
        node.restart_with(&stall.node_config());
        stall.arm();
    }
    let create = |channel| async move {
        RepositoryServiceClient::new(channel)
            .create_repository(CreateRepositoryRequest {
                repository: header("default", "born.git"),
                default_branch: String::new(),
            })
            .await
    };
    let address = fleet.grpc.clone();
    let connect = || gitfleet::client::connect(&address, Signer::from_secret(PROXY_TOKEN));
    // Until the proxy sees the restarted nodes, a creation fails before it reaches one: try
    // again until one is stalled on a node.
    let mut first = tokio::spawn(create(connect().await.unwrap()));
    for _ in 0..300 {
        if stalls.iter().any(Stall::caught) {
            break;
        }
        if first.is_finished() {
            first = tokio::spawn(create(connect().await.unwrap()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        stalls.iter().any(Stall::caught),
        "no creation reached a node"
    );
    // The other nodes' calls were sent at the same time.
    tokio::time::sleep(Duration::from_millis(300)).await;
    fleet.proxy.kill();
    for stall in &stalls {
        stall.disarm();
    }
    assert!(first.await.unwrap().is_err());

    fleet.start_proxy();
    let mut created = None;
    for _ in 0..300 {
        match create(connect().await.unwrap()).await {
            Ok(_) => {
                created = Some(());
                break;
            }
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::AlreadyExists, "{status:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    assert!(
        created.is_some(),
        "the path stayed taken 30 s after its creation was interrupted"
    );
    let work = tempfile::tempdir().unwrap();
    run_git(work.path(), &["init", "-q", "-b", "main"]);
    run_git(
        work.path(),
        &["commit", "-q", "--allow-empty", "-m", "first"],
    );
    run_git(
        work.path(),
        &["push", "-q", &fleet.git_url("born.git"), "main"],
    );
    let rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM repositories WHERE relative_path = 'born.git'")
            .fetch_one(&fleet.pool)
            .await
            .unwrap();
    assert_eq!(rows, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_abandoned_pending_push_is_forgotten_and_the_repository_it_made_undone() {
    let cluster = Cluster::start(3).await;
    let store = cluster.store();
    // A repository with a committed push, and one a push made that nothing was written to.
    cluster.create("kept.git").await;
    let work = cluster.push_main("kept.git");
    let kept = cluster.record("kept.git").await;
    cluster.create("made.git").await;
    let made = cluster.record("made.git").await;
    for record in [&kept, &made] {
        sqlx::query(
            "UPDATE repositories SET awaiting_first_push = true WHERE id = $1 AND generation = 0",
        )
        .bind(record.id.0)
        .execute(store.pool())
        .await
        .unwrap();
    }
    let refs_before: Vec<String> = (0..3)
        .map(|index| refs_of(&cluster.replica_dir(index, &kept)))
        .collect();
    // A proxy recorded a push on each as pending, and died before anything committed.
    let main = run_git(work.path(), &["rev-parse", "main"])
        .trim()
        .to_owned();
    let change = gitfleet::store::RefChange {
        name: "refs/heads/main".into(),
        old: main.clone(),
        new: "1".repeat(40),
    };
    let storages: Vec<_> = (0..3).map(Cluster::storage).collect();
    for path in ["kept.git", "made.git"] {
        let recorded = store
            .record_pending_write(
                &Cluster::virtual_storage(),
                &gitfleet::model::RelativePath::parse(path).unwrap(),
                "a-dead-proxy",
                "/gitfleet.v1.SmartHttpService/PostReceivePack",
                std::slice::from_ref(&change),
                &storages,
                Duration::ZERO,
            )
            .await
            .unwrap();
        assert!(
            matches!(recorded, gitfleet::store::PendingStart::Recorded(_)),
            "{recorded:?}"
        );
    }
    assert_eq!(store.pending_writes().await.unwrap(), 2);

    let worker = start_worker(
        worker_config(&cluster),
        &[JobType::Recovery, JobType::Remover],
        Hooks::default(),
    );
    wait_for(30, "the abandoned pushes forgotten", || async {
        store.pending_writes().await.unwrap() == 0
    })
    .await;
    wait_for(
        30,
        "the repository the abandoned push made undone",
        || async {
            store
                .find_repository(
                    &Cluster::virtual_storage(),
                    &gitfleet::model::RelativePath::parse("made.git").unwrap(),
                )
                .await
                .unwrap()
                .is_none()
                && (0..3).all(|index| !cluster.replica_dir(index, &made).exists())
        },
    )
    .await;
    // The written repository stays as it was: no ref moved for the abandoned push.
    let after = cluster.record("kept.git").await;
    assert_eq!(after.generation, kept.generation);
    for (index, before) in refs_before.iter().enumerate() {
        assert_eq!(&refs_of(&cluster.replica_dir(index, &kept)), before);
    }
    worker.stop().await;
}

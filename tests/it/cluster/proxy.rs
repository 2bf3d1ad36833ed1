//! The proxy end to end: real PostgreSQL, three real nodes, real git through smart HTTP.

use crate::common::cluster::{Cluster, STORAGES};
use crate::common::*;
use gitfleet::proto::ref_service_client::RefServiceClient;
use gitfleet::proto::repository_service_client::RepositoryServiceClient;
use gitfleet::proto::*;
use gitfleet::store::RepositoryRecord;

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
    cluster.create("group/project.git").await;
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
    for index in 0..3 {
        assert_eq!(generation_of(&record, index), Some(1), "{record:?}");
    }
    assert_ne!(cluster.agreed_checksum(&record).await, "0".repeat(64));
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

fn remote_refs(work: &std::path::Path, url: &str) -> String {
    run_git(work, &["ls-remote", "--refs", url])
}

#[tokio::test(flavor = "multi_thread")]
async fn reads_are_spread_over_the_replicas_and_cost_no_database_round_trip() {
    let cluster = Cluster::start(3).await;
    let notified = cluster.proxy.state().routing.notifications();
    cluster.create("spread.git").await;
    let work = cluster.push_main("spread.git");
    // The creation is announced twice (the row, then its replicas), the push once. Once they
    // are in, one read fills the cache.
    Cluster::wait_for_notifications(&cluster.proxy, notified, 3).await;
    let main = run_git(work.path(), &["rev-parse", "main"])
        .trim()
        .to_owned();
    let mut refs = RefServiceClient::new(cluster.channel().await);
    let find = || FindDefaultBranchRequest {
        repository: header("default", "spread.git"),
    };
    let round_trips = cluster.round_trips();
    refs.find_default_branch(find()).await.unwrap();
    assert_eq!(
        cluster.round_trips() - round_trips,
        1,
        "the cache is filled"
    );

    let round_trips = cluster.round_trips();
    let reads: Vec<u64> = (0..3).map(|index| cluster.reads(index)).collect();
    for _ in 0..60 {
        let answer = refs.find_default_branch(find()).await.unwrap().into_inner();
        assert_eq!(answer.name, "refs/heads/main");
        assert_eq!(answer.target, main);
    }
    assert_eq!(
        cluster.round_trips() - round_trips,
        0,
        "reads went to the database"
    );
    let spread: Vec<u64> = (0..3)
        .map(|index| cluster.reads(index) - reads[index])
        .collect();
    assert_eq!(spread.iter().sum::<u64>(), 60);
    // Sixty fair draws among three leave fewer than five for one replica about once in a
    // million runs.
    assert!(spread.iter().all(|&count| count >= 5), "{spread:?}");

    // A caller that asks for the primary gets the primary, every time.
    let record = cluster.record("spread.git").await;
    let primary = STORAGES
        .iter()
        .position(|storage| *storage == record.primary.as_str())
        .unwrap();
    let reads: Vec<u64> = (0..3).map(|index| cluster.reads(index)).collect();
    for _ in 0..10 {
        let mut request = tonic::Request::new(find());
        request
            .metadata_mut()
            .insert("gitfleet-route", "primary".parse().unwrap());
        refs.find_default_branch(request).await.unwrap();
    }
    let routed: Vec<u64> = (0..3)
        .map(|index| cluster.reads(index) - reads[index])
        .collect();
    let mut expected = vec![0; 3];
    expected[primary] = 10;
    assert_eq!(routed, expected);

    // Every write is three statements (pending, then lease and intent, then the commit),
    // whether the cache holds the repository or not.
    let notified = cluster.proxy.state().routing.notifications();
    for branch in ["copy-1", "copy-2", "copy-3"] {
        let round_trips = cluster.round_trips();
        refs.update_refs(UpdateRefsRequest {
            repository: header("default", "spread.git"),
            updates: vec![RefUpdate {
                name: format!("refs/heads/{branch}"),
                old_target: "0".repeat(40),
                new_target: main.clone(),
            }],
        })
        .await
        .unwrap();
        assert_eq!(
            cluster.round_trips() - round_trips,
            3,
            "a write is three statements"
        );
    }
    Cluster::wait_for_notifications(&cluster.proxy, notified, 3).await;
    refs.find_default_branch(find()).await.unwrap();
    // A push: its ref advertisement is a read from the cache, the push itself three
    // statements too.
    commit_branch(work.path(), "pushed");
    let round_trips = cluster.round_trips();
    run_git(
        work.path(),
        &["push", "-q", &cluster.url("spread.git"), "pushed"],
    );
    assert_eq!(
        cluster.round_trips() - round_trips,
        3,
        "a push is three statements"
    );
    let record = cluster.record("spread.git").await;
    assert_eq!(record.generation, 5);
    assert_eq!(record.up_to_date().count(), 3);
    // Each commit recorded the generation's refs checksum: the creation the empty
    // repository's, and every write its own, computed from the refs it moved.
    assert_eq!(
        cluster.store().refs_checksum(record.id).await.unwrap(),
        Some(cluster.agreed_checksum(&record).await)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn writes_to_one_repository_take_turns_and_other_repositories_do_not_wait() {
    let cluster = Cluster::start(3).await;
    cluster.create("a.git").await;
    cluster.create("b.git").await;
    let work = cluster.push_main("a.git");
    run_git(work.path(), &["push", "-q", &cluster.url("b.git"), "main"]);

    // Two pushes to one repository at the same moment: both land, one after the other.
    let url_a = cluster.url("a.git");
    let clones: Vec<(tempfile::TempDir, &str)> = ["x", "y"]
        .into_iter()
        .map(|branch| {
            let clone = tempfile::tempdir().unwrap();
            run_git(clone.path(), &["clone", "-q", &url_a, "."]);
            commit_branch(clone.path(), branch);
            (clone, branch)
        })
        .collect();
    let start = std::sync::Arc::new(std::sync::Barrier::new(clones.len()));
    let pushes: Vec<_> = clones
        .into_iter()
        .map(|(clone, branch)| {
            let (url, start) = (url_a.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                let output = try_git(clone.path(), &["push", "-q", &url, branch]);
                (output, clone)
            })
        })
        .collect();
    for push in pushes {
        let (output, _clone) = push.join().unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let record = cluster.record("a.git").await;
    assert_eq!(record.generation, 3);
    assert_eq!(record.up_to_date().count(), 3);
    let advertised = remote_refs(work.path(), &url_a);
    assert!(advertised.contains("refs/heads/x") && advertised.contains("refs/heads/y"));

    // While another proxy holds a.git's write lease, a push to a.git waits and a push to
    // b.git goes through.
    let store = cluster.store();
    sqlx::query(
        "UPDATE repositories SET lease_owner = 'another-proxy', lease_token = nextval('repository_lease_tokens'),
                lease_expires_at = now() + interval '1 hour'
         WHERE relative_path = 'a.git'",
    )
    .execute(store.pool())
    .await
    .unwrap();
    commit_branch(work.path(), "waiting");
    let waiting = {
        let (dir, url) = (work.path().to_owned(), url_a.clone());
        std::thread::spawn(move || try_git(&dir, &["push", "-q", &url, "waiting"]))
    };
    let other = tempfile::tempdir().unwrap();
    run_git(other.path(), &["clone", "-q", &cluster.url("b.git"), "."]);
    commit_branch(other.path(), "free");
    run_git(other.path(), &["push", "-q", &cluster.url("b.git"), "free"]);
    assert_eq!(cluster.record("b.git").await.generation, 2);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "the push did not wait for the lease"
    );
    assert!(!remote_refs(other.path(), &url_a).contains("refs/heads/waiting"));

    sqlx::query(
        "UPDATE repositories SET lease_owner = NULL, lease_expires_at = NULL
         WHERE relative_path = 'a.git'",
    )
    .execute(store.pool())
    .await
    .unwrap();
    let output = waiting.join().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(remote_refs(other.path(), &url_a).contains("refs/heads/waiting"));
    assert_eq!(cluster.record("a.git").await.generation, 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_node_misses_a_push_and_no_read_reaches_its_outdated_replica() {
    let mut cluster = Cluster::start(3).await;
    cluster.create("r.git").await;
    cluster.create("other.git").await;
    let work = cluster.push_main("r.git");
    let url = cluster.url("r.git");

    cluster.nodes[2].kill();
    cluster.wait_for_health(2, false).await;
    commit_branch(work.path(), "while-down");
    run_git(work.path(), &["push", "-q", &url, "while-down"]);

    let record = cluster.record("r.git").await;
    assert_eq!(record.generation, 2);
    assert_eq!(generation_of(&record, 0), Some(2));
    assert_eq!(generation_of(&record, 1), Some(2));
    assert_eq!(
        generation_of(&record, 2),
        Some(1),
        "the stopped node's replica is outdated"
    );
    let jobs: Vec<(String, String)> = sqlx::query_as(
        "SELECT kind, target_storage FROM jobs WHERE repository_id = $1 AND state = 'queued'",
    )
    .bind(record.id.0)
    .fetch_all(cluster.store().pool())
    .await
    .unwrap();
    assert_eq!(jobs, [("replicate".to_owned(), STORAGES[2].to_owned())]);

    // The node comes back, and its outdated replica is made to differ on purpose.
    cluster.nodes[2].restart();
    cluster.wait_for_health(2, true).await;
    let main = run_git(work.path(), &["rev-parse", "main"])
        .trim()
        .to_owned();
    RefServiceClient::new(cluster.nodes[2].channel().await)
        .update_refs(UpdateRefsRequest {
            repository: header(STORAGES[2], record.replica_path.as_str()),
            updates: vec![RefUpdate {
                name: "refs/heads/only-on-the-outdated-replica".into(),
                old_target: "0".repeat(40),
                new_target: main,
            }],
        })
        .await
        .unwrap();

    let outdated_reads = cluster.reads(2);
    for _ in 0..30 {
        let advertised = remote_refs(work.path(), &url);
        assert!(advertised.contains("refs/heads/while-down"), "{advertised}");
        assert!(
            !advertised.contains("only-on-the-outdated-replica"),
            "{advertised}"
        );
    }
    assert_eq!(cluster.reads(2), outdated_reads);

    // The node is used again where its replica is up to date.
    let mut refs = RefServiceClient::new(cluster.channel().await);
    for _ in 0..40 {
        refs.find_default_branch(FindDefaultBranchRequest {
            repository: header("default", "other.git"),
        })
        .await
        .unwrap();
    }
    assert!(
        cluster.reads(2) > outdated_reads,
        "the node that came back gets no reads"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn remove_deletes_the_row_then_the_replicas_and_rename_moves_only_the_row() {
    let cluster = Cluster::start(3).await;
    cluster.create("old/name.git").await;
    let work = cluster.push_main("old/name.git");
    let record = cluster.record("old/name.git").await;
    let mut repositories = RepositoryServiceClient::new(cluster.channel().await);

    repositories
        .rename_repository(RenameRepositoryRequest {
            repository: header("default", "old/name.git"),
            new_relative_path: "new/name.git".into(),
        })
        .await
        .unwrap();
    let renamed = cluster.record("new/name.git").await;
    assert_eq!(renamed.id, record.id);
    assert_eq!(renamed.replica_path, record.replica_path);
    let exists = |path: &str| RepositoryExistsRequest {
        repository: header("default", path),
    };
    assert!(
        !repositories
            .repository_exists(exists("old/name.git"))
            .await
            .unwrap()
            .into_inner()
            .exists
    );
    assert!(
        repositories
            .repository_exists(exists("new/name.git"))
            .await
            .unwrap()
            .into_inner()
            .exists
    );
    assert!(remote_refs(work.path(), &cluster.url("new/name.git")).contains("refs/heads/main"));

    repositories
        .remove_repository(RemoveRepositoryRequest {
            repository: header("default", "new/name.git"),
        })
        .await
        .unwrap();
    assert!(
        !repositories
            .repository_exists(exists("new/name.git"))
            .await
            .unwrap()
            .into_inner()
            .exists
    );
    for index in 0..3 {
        assert!(!cluster.replica_dir(index, &record).exists());
    }
    let error = repositories
        .remove_repository(RemoveRepositoryRequest {
            repository: header("default", "new/name.git"),
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), tonic::Code::NotFound);

    // The same path again is a new repository with a new replica path.
    cluster.create("new/name.git").await;
    let again = cluster.record("new/name.git").await;
    assert!(again.id > record.id);
    assert_ne!(again.replica_path, record.replica_path);
    assert!(remote_refs(work.path(), &cluster.url("new/name.git")).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn operators_create_and_remove_repositories_from_the_command_line() {
    let cluster = Cluster::start(3).await;
    let admin = |args: &[&str]| {
        std::process::Command::new(BINARY)
            .arg("admin")
            .arg("--config")
            .arg(&cluster.config_path)
            .args(["--address", &cluster.address])
            .args(args)
            .output()
            .unwrap()
    };
    let created = admin(&["create-repository", "default/ops/tool.git"]);
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&created.stdout),
        "created default/ops/tool.git\n"
    );
    assert_eq!(cluster.record("ops/tool.git").await.up_to_date().count(), 3);

    let again = admin(&["create-repository", "default/ops/tool.git"]);
    assert_eq!(again.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(stderr.contains("already exists"), "{stderr}");

    let bad = admin(&["create-repository", "default/../escape.git"]);
    assert_eq!(bad.status.code(), Some(1));

    let removed = admin(&["remove-repository", "default/ops/tool.git"]);
    assert!(
        removed.status.success(),
        "{}",
        String::from_utf8_lossy(&removed.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&removed.stdout),
        "removed default/ops/tool.git\n"
    );
    let missing = admin(&["remove-repository", "default/ops/tool.git"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("does not exist"));
}

#[tokio::test(flavor = "multi_thread")]
async fn git_over_the_bridge_clones_and_pushes_through_the_proxy() {
    let cluster = Cluster::start(3).await;
    cluster.create("ssh.git").await;
    let port = cluster.address.rsplit(':').next().unwrap();
    let url = format!("ssh://127.0.0.1:{port}/default/ssh.git");
    let proxy_git = |dir: &std::path::Path, args: &[&str]| {
        let output = git(dir)
            .env("GITFLEET_TOKEN", crate::common::cluster::PROXY_TOKEN)
            .args(args)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let work = tempfile::tempdir().unwrap();
    make_history(work.path());
    proxy_git(work.path(), &["push", "-q", &url, "main", "feature", "v1"]);
    let record = cluster.record("ssh.git").await;
    assert_eq!(record.generation, 1);
    assert_eq!(record.up_to_date().count(), 3);
    cluster.agreed_checksum(&record).await;

    // A dry run and an up-to-date push write nothing.
    proxy_git(work.path(), &["push", "--dry-run", &url, "v2"]);
    proxy_git(work.path(), &["push", &url, "main"]);
    assert_eq!(cluster.record("ssh.git").await.generation, 1);

    // A deletion is a write like any other.
    proxy_git(work.path(), &["push", "-q", &url, ":feature"]);
    assert_eq!(cluster.record("ssh.git").await.generation, 2);

    // A partial push: git's own answer for each ref, and exactly the accepted one recorded.
    let partial = git(work.path())
        .env("GITFLEET_TOKEN", crate::common::cluster::PROXY_TOKEN)
        .args([
            "push",
            &url,
            "main:refs/heads/side",
            "main:refs/heads/main/x",
        ])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&partial.stderr);
    assert_eq!(partial.status.code(), Some(1), "{said}");
    assert!(said.contains("* [new branch]      main -> side"), "{said}");
    assert!(
        said.contains("! [remote rejected] main -> main/x ("),
        "{said}"
    );
    let record = cluster.record("ssh.git").await;
    assert_eq!(record.generation, 3);
    for index in 0..3 {
        let refs = refs_of(&cluster.replica_dir(index, &record));
        assert!(refs.contains("refs/heads/side\n"), "{refs}");
        assert!(!refs.contains("refs/heads/main/x"), "{refs}");
    }

    let clones = tempfile::tempdir().unwrap();
    proxy_git(
        clones.path(),
        &["-c", "protocol.version=2", "clone", "-q", &url, "clone"],
    );
    let clone = clones.path().join("clone");
    assert_eq!(
        run_git(&clone, &["rev-parse", "HEAD"]),
        run_git(work.path(), &["rev-parse", "main"])
    );
    let advertised = proxy_git(work.path(), &["ls-remote", "--refs", &url]);
    assert!(!advertised.contains("refs/heads/feature"), "{advertised}");
    assert!(advertised.contains("refs/tags/v1"), "{advertised}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_write_through_one_proxy_reroutes_the_reads_of_another() {
    let cluster = Cluster::start(3).await;
    let (other, other_channel) = cluster.second_proxy().await;
    let notified = other.state().routing.notifications();
    cluster.create("shared.git").await;
    let work = cluster.push_main("shared.git");
    let main = run_git(work.path(), &["rev-parse", "main"])
        .trim()
        .to_owned();
    let record = cluster.record("shared.git").await;
    let find = || FindDefaultBranchRequest {
        repository: header("default", "shared.git"),
    };
    let mut other_refs = RefServiceClient::new(other_channel);
    // The other proxy caches the repository with every replica up to date.
    Cluster::wait_for_notifications(&other, notified, 3).await;
    other_refs.find_default_branch(find()).await.unwrap();
    let round_trips = other.state().store.round_trips();
    other_refs.find_default_branch(find()).await.unwrap();
    assert_eq!(other.state().store.round_trips(), round_trips, "not cached");

    // Node 3's main is moved behind the proxies' backs, so a write through the first proxy
    // that deletes main lands on nodes 1 and 2 only: node 3 stays healthy and falls behind,
    // still holding a main.
    let parent = run_git(work.path(), &["rev-parse", "main~1"])
        .trim()
        .to_owned();
    RefServiceClient::new(cluster.nodes[2].channel().await)
        .update_refs(UpdateRefsRequest {
            repository: header(STORAGES[2], record.replica_path.as_str()),
            updates: vec![RefUpdate {
                name: "refs/heads/main".into(),
                old_target: main.clone(),
                new_target: parent,
            }],
        })
        .await
        .unwrap();
    RefServiceClient::new(cluster.channel().await)
        .update_refs(UpdateRefsRequest {
            repository: header("default", "shared.git"),
            updates: vec![RefUpdate {
                name: "refs/heads/main".into(),
                old_target: main.clone(),
                new_target: "0".repeat(40),
            }],
        })
        .await
        .unwrap();
    let record = cluster.record("shared.git").await;
    assert_eq!(record.generation, 2);
    let current: Vec<&str> = record
        .up_to_date()
        .map(|storage| storage.as_str())
        .collect();
    assert_eq!(
        current,
        [STORAGES[0], STORAGES[1]],
        "node 3 refused: main had moved there"
    );

    // The other proxy heard of it: its next read reloads, and no read reaches node 3.
    Cluster::wait_for_notifications(&other, notified, 4).await;
    let round_trips = other.state().store.round_trips();
    let outdated_reads = other
        .state()
        .nodes
        .get(&Cluster::storage(2))
        .unwrap()
        .reads();
    for _ in 0..30 {
        let answer = other_refs
            .find_default_branch(find())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.target, "", "a read reached the outdated replica");
    }
    assert_eq!(
        other.state().store.round_trips() - round_trips,
        1,
        "one reload"
    );
    let after = other
        .state()
        .nodes
        .get(&Cluster::storage(2))
        .unwrap()
        .reads();
    assert_eq!(after, outdated_reads);
}

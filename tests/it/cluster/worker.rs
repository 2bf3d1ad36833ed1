//! `gitfleet worker` against real PostgreSQL and real nodes: replication, leases, retries,
//! supervision, and the races a queue must make impossible.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::cluster::{Cluster, STORAGES};
use crate::common::stall::Stall;
use crate::common::worker::*;
use crate::common::*;
use gitfleet::model::{RepositoryId, StorageName};
use gitfleet::proto::SetDefaultBranchRequest;
use gitfleet::proto::ref_service_client::RefServiceClient;
use gitfleet::store::{Closed, JOB_NOOP, JOB_REPLICATE, JobId, NewJob, RepositoryRecord, Store};
use gitfleet::worker::{Hooks, JobType, Pause};

/// One job's row, as operators see it.
#[derive(Debug)]
struct JobState {
    state: String,
    attempts: i32,
    postponed: i32,
    last_error: Option<String>,
}

async fn job_state(store: &Store, id: JobId) -> JobState {
    let row: (String, i32, i32, Option<String>) =
        sqlx::query_as("SELECT state, attempts, postponed, last_error FROM jobs WHERE id = $1")
            .bind(id.0)
            .fetch_one(store.pool())
            .await
            .unwrap();
    JobState {
        state: row.0,
        attempts: row.1,
        postponed: row.2,
        last_error: row.3,
    }
}

/// The active replication job of `repository` to storage `index`.
async fn replication_job(store: &Store, repository: RepositoryId, index: usize) -> JobId {
    let id: i64 = sqlx::query_scalar(
        "SELECT id FROM jobs WHERE kind = $1 AND repository_id = $2 AND target_storage = $3
           AND state IN ('queued', 'running')",
    )
    .bind(JOB_REPLICATE)
    .bind(repository.0)
    .bind(STORAGES[index])
    .fetch_one(store.pool())
    .await
    .unwrap();
    JobId(id)
}

/// Queues the replication of `repository` from the first storage to the third.
async fn enqueue_replication(store: &Store, repository: RepositoryId) -> (JobId, bool) {
    store
        .enqueue(&NewJob {
            kind: JOB_REPLICATE,
            repository,
            source: Some(&Cluster::storage(0)),
            target: &Cluster::storage(2),
        })
        .await
        .unwrap()
}

/// Waits up to `seconds` for a job to reach `state`.
async fn wait_for_state(store: &Store, job: JobId, state: &str, seconds: u64) {
    wait_for(seconds, &format!("job {job} to be {state}"), || async {
        job_state(store, job).await.state == state
    })
    .await;
}

/// The generation the database records for the replica on storage `index`.
async fn replica_generation(cluster: &Cluster, relative_path: &str, index: usize) -> Option<i64> {
    let storage = Cluster::storage(index);
    cluster
        .record(relative_path)
        .await
        .replicas
        .into_iter()
        .find(|(replica, _)| *replica == storage)
        .map(|(_, generation)| generation)
}

/// Pushes one more commit on main from `work` through the proxy.
fn push_commit(cluster: &Cluster, work: &std::path::Path, relative_path: &str, name: &str) {
    std::fs::write(work.join(format!("{name}.txt")), name).unwrap();
    run_git(work, &["add", "."]);
    run_git(work, &["commit", "-q", "-m", name]);
    run_git(work, &["push", "-q", &cluster.url(relative_path), "main"]);
}

/// A repository at generation 2 whose replica on the third node stayed at 1: the node was
/// down for the second push, which queued a replication job for it. The node is started
/// again when `restart`.
async fn left_behind(
    cluster: &mut Cluster,
    relative_path: &str,
    restart: bool,
) -> (RepositoryRecord, tempfile::TempDir, JobId) {
    cluster.create(relative_path).await;
    let work = cluster.push_main(relative_path);
    cluster.nodes[2].kill();
    cluster.wait_for_health(2, false).await;
    push_commit(cluster, work.path(), relative_path, "while-down");
    if restart {
        cluster.nodes[2].restart();
        cluster.wait_for_health(2, true).await;
    }
    let record = cluster.record(relative_path).await;
    assert_eq!(record.generation, 2);
    assert_eq!(replica_generation(cluster, relative_path, 2).await, Some(1));
    let job = replication_job(&cluster.store(), record.id, 2).await;
    (record, work, job)
}

async fn assert_replicas_agree(cluster: &Cluster, relative_path: &str) {
    let record = cluster.record(relative_path).await;
    assert_eq!(record.up_to_date().count(), 3, "{record:?}");
    cluster.agreed_checksum(&record).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_left_behind_is_brought_up_to_date_and_the_job_is_done() {
    let mut cluster = Cluster::start(3).await;
    let (record, _work, job) = left_behind(&mut cluster, "behind.git", true).await;
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_address = format!("http://{}", http.local_addr().unwrap());
    let worker = start_worker_on(worker_config(&cluster), &[], Hooks::default(), Some(http));
    let store = cluster.store();
    wait_for_state(&store, job, "done", 30).await;
    assert_eq!(replica_generation(&cluster, "behind.git", 2).await, Some(2));
    assert_replicas_agree(&cluster, "behind.git").await;
    let state = job_state(&store, job).await;
    assert_eq!((state.attempts, state.last_error), (1, None));
    // The counter moves just after the statement that closed the job.
    wait_for(10, "the run counted", || async {
        worker.metrics.runs(JobType::Replicator) == 1
    })
    .await;
    // The repository's own row is untouched by replication.
    assert_eq!(
        cluster.record("behind.git").await.generation,
        record.generation
    );

    // The worker's metrics: its own counters, and the queue as the database sees it.
    let (status, _, body) =
        tokio::task::spawn_blocking(move || http::http_get(&http_address, "/metrics", None))
            .await
            .unwrap();
    assert_eq!(status, 200);
    for line in [
        "gitfleet_worker_jobs_runs_total{job=\"replicator\"} 1",
        "gitfleet_worker_jobs_failures_total{job=\"replicator\"} 0",
        "gitfleet_worker_jobs_restarts_total{job=\"noop\"} 0",
        "gitfleet_worker_jobs_in_flight{job=\"replicator\"} 0",
        "gitfleet_jobs{kind=\"replicate\",state=\"done\"} 1",
        "gitfleet_worker_database_up 1",
    ] {
        assert!(body.contains(line), "{line} missing from:\n{body}");
    }
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn eight_workers_run_500_jobs_exactly_once_each() {
    let cluster = Cluster::start(1).await;
    let store = cluster.store();
    let target = StorageName::parse("noop-target").unwrap();
    let mut ids = Vec::new();
    for repository in 1..=500 {
        let (id, new) = store
            .enqueue(&NewJob {
                kind: JOB_NOOP,
                repository: RepositoryId(repository),
                source: None,
                target: &target,
            })
            .await
            .unwrap();
        assert!(new);
        ids.push(id);
    }
    // Enqueueing the same work again merges into the queued job.
    let (again, new) = store
        .enqueue(&NewJob {
            kind: JOB_NOOP,
            repository: RepositoryId(1),
            source: None,
            target: &target,
        })
        .await
        .unwrap();
    assert_eq!((again, new), (ids[0], false));

    let runs: Arc<Mutex<HashMap<JobId, u32>>> = Arc::default();
    let mut workers = Vec::new();
    for _ in 0..8 {
        let runs = runs.clone();
        let hooks = Hooks {
            on_start: Some(Arc::new(move |job| {
                *runs.lock().unwrap().entry(job.id).or_default() += 1;
            })),
            ..Hooks::default()
        };
        let mut config = worker_config(&cluster);
        config.worker.concurrency = 8;
        workers.push(start_worker(config, &[JobType::Noop], hooks));
    }
    wait_for(60, "500 jobs done", || async {
        let done: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE state = 'done'")
            .fetch_one(store.pool())
            .await
            .unwrap();
        done == 500
    })
    .await;
    let runs = runs.lock().unwrap().clone();
    assert_eq!(runs.len(), 500);
    let twice: Vec<_> = runs.iter().filter(|(_, count)| **count != 1).collect();
    assert!(twice.is_empty(), "jobs run more than once: {twice:?}");
    // Each worker counts a run just after the statement that closed it.
    let per_worker = || -> Vec<u64> {
        workers
            .iter()
            .map(|worker| worker.metrics.runs(JobType::Noop))
            .collect()
    };
    wait_for(10, "every run counted", || async {
        per_worker().iter().sum::<u64>() >= 500
    })
    .await;
    assert_eq!(per_worker().iter().sum::<u64>(), 500, "{:?}", per_worker());
    for worker in workers {
        worker.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_that_keeps_failing_is_dead_after_its_attempts_and_operators_see_it() {
    let cluster = Cluster::start(3).await;
    cluster.create("doomed.git").await;
    let _work = cluster.push_main("doomed.git");
    let record = cluster.record("doomed.git").await;
    let store = cluster.store();
    // The third replica is behind, and the copies it could be brought up from are gone.
    sqlx::query("UPDATE replicas SET generation = 0 WHERE repository_id = $1 AND storage = $2")
        .bind(record.id.0)
        .bind(STORAGES[2])
        .execute(store.pool())
        .await
        .unwrap();
    for index in 0..2 {
        std::fs::remove_dir_all(cluster.replica_dir(index, &record)).unwrap();
    }
    let (job, _) = enqueue_replication(&store, record.id).await;
    let worker = start_worker(
        worker_config(&cluster),
        &[JobType::Replicator],
        Hooks::default(),
    );
    wait_for_state(&store, job, "dead", 30).await;
    let state = job_state(&store, job).await;
    assert_eq!(state.attempts, 3);
    let error = state.last_error.unwrap();
    assert!(error.contains("replicating"), "{error}");
    // The counter moves just after the statement that made the job dead.
    wait_for(10, "three failures counted", || async {
        worker.metrics.failures(JobType::Replicator) == 3
    })
    .await;
    // Nothing was recorded for the target.
    assert_eq!(replica_generation(&cluster, "doomed.git", 2).await, Some(0));
    worker.stop().await;

    // Operators find it, and can queue it again.
    let listed = admin(&cluster, &["jobs", "--state", "dead"]);
    assert!(listed.status.success());
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.contains(&format!("{:>8}  replicate", job.0)),
        "{listed}"
    );
    assert!(listed.contains("dead"), "{listed}");
    let retried = admin(&cluster, &["jobs", "retry", &job.0.to_string()]);
    assert!(retried.status.success(), "{retried:?}");
    let state = job_state(&store, job).await;
    assert_eq!((state.state.as_str(), state.attempts), ("queued", 0));
    let cancelled = admin(&cluster, &["jobs", "cancel", &job.0.to_string()]);
    assert!(cancelled.status.success(), "{cancelled:?}");
    assert_eq!(job_state(&store, job).await.state, "cancelled");
    let again = admin(&cluster, &["jobs", "cancel", &job.0.to_string()]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("not queued or running"));
}

#[tokio::test(flavor = "multi_thread")]
async fn replication_to_a_node_that_is_down_waits_without_spending_attempts() {
    let mut cluster = Cluster::start(3).await;
    let (_record, _work, job) = left_behind(&mut cluster, "waiting.git", false).await;
    let worker = start_worker(worker_config(&cluster), &[], Hooks::default());
    let store = cluster.store();
    wait_for(30, "three postponements", || async {
        job_state(&store, job).await.postponed >= 3
    })
    .await;
    let state = job_state(&store, job).await;
    assert!(state.attempts <= 1, "{state:?}");
    assert_ne!(state.state, "dead");
    assert!(
        state
            .last_error
            .as_deref()
            .unwrap_or_default()
            .contains("down"),
        "{state:?}"
    );

    cluster.nodes[2].restart();
    wait_for_state(&store, job, "done", 30).await;
    assert_replicas_agree(&cluster, "waiting.git").await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_panicking_job_type_restarts_alone_while_another_keeps_working() {
    let mut cluster = Cluster::start(3).await;
    let (_record, _work, job) = left_behind(&mut cluster, "panics.git", true).await;
    let panics_left = Arc::new(AtomicU32::new(2));
    let armed = panics_left.clone();
    let hooks = Hooks {
        on_start: Some(Arc::new(move |claimed| {
            if claimed.kind == JOB_REPLICATE
                && armed
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                        left.checked_sub(1)
                    })
                    .is_ok()
            {
                panic!("injected failure in job {}", claimed.id);
            }
        })),
        ..Hooks::default()
    };
    let mut config = worker_config(&cluster);
    config.worker.max_attempts = 5;
    let worker = start_worker(config, &[], hooks);
    let store = cluster.store();
    let target = StorageName::parse("noop-target").unwrap();
    for repository in 1..=20 {
        store
            .enqueue(&NewJob {
                kind: JOB_NOOP,
                repository: RepositoryId(repository),
                source: None,
                target: &target,
            })
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_for(30, "the noop jobs", || async {
        worker.metrics.runs(JobType::Noop) == 20
    })
    .await;
    wait_for_state(&store, job, "done", 30).await;
    assert_eq!(worker.metrics.panics(JobType::Replicator), 2);
    assert_eq!(worker.metrics.restarts(JobType::Replicator), 2);
    assert_eq!(worker.metrics.restarts(JobType::Noop), 0);
    assert_eq!(worker.metrics.panics(JobType::Noop), 0);
    let state = job_state(&store, job).await;
    assert_eq!(state.state, "done");
    assert_replicas_agree(&cluster, "panics.git").await;
    worker.stop().await;
}

/// Hooks that stop a replication after its copy until the test says go, and report how its
/// close went.
fn paused_after_copy(
    job: JobId,
) -> (
    Hooks,
    tokio::sync::mpsc::UnboundedReceiver<&'static str>,
    tokio::sync::mpsc::UnboundedReceiver<Closed>,
    Arc<tokio::sync::Semaphore>,
) {
    let (copied_tx, copied_rx) = tokio::sync::mpsc::unbounded_channel();
    let (closed_tx, closed_rx) = tokio::sync::mpsc::unbounded_channel();
    let go = Arc::new(tokio::sync::Semaphore::new(0));
    let gate = go.clone();
    let hooks = Hooks {
        on_start: None,
        pause: Some(Arc::new(move |pause| {
            let copied_tx = copied_tx.clone();
            let closed_tx = closed_tx.clone();
            let gate = gate.clone();
            Box::pin(async move {
                match pause {
                    Pause::Copied(claimed) if claimed.id == job => {
                        copied_tx.send("copied").unwrap();
                        gate.acquire().await.unwrap().forget();
                    }
                    Pause::Closed(claimed, closed) if claimed.id == job => {
                        closed_tx.send(closed).unwrap();
                        gate.acquire().await.unwrap().forget();
                    }
                    _ => {}
                }
            })
        })),
        ..Hooks::default()
    };
    (hooks, copied_rx, closed_rx, go)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_that_runs_past_its_lease_keeps_it_while_its_worker_renews_it() {
    let mut cluster = Cluster::start(3).await;
    let (_record, _work, job) = left_behind(&mut cluster, "long.git", true).await;
    let store = cluster.store();
    let (hooks, mut copied, mut closed, go) = paused_after_copy(job);
    // Leases of 2s; the job stays paused for more than three of them.
    let slow = start_worker(worker_config(&cluster), &[JobType::Replicator], hooks);
    copied.recv().await.unwrap();
    let other = start_worker(
        worker_config(&cluster),
        &[JobType::Replicator],
        Hooks::default(),
    );
    tokio::time::sleep(Duration::from_secs(7)).await;
    let state = job_state(&store, job).await;
    assert_eq!(
        (state.state.as_str(), state.attempts),
        ("running", 1),
        "the other worker took the job over: {state:?}"
    );

    go.add_permits(1);
    assert_eq!(closed.recv().await.unwrap(), Closed::Done);
    go.add_permits(1);
    wait_for_state(&store, job, "done", 30).await;
    assert_eq!(job_state(&store, job).await.attempts, 1);
    assert_eq!(replica_generation(&cluster, "long.git", 2).await, Some(2));
    assert_replicas_agree(&cluster, "long.git").await;
    other.stop().await;
    slow.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_run_that_finishes_after_a_newer_one_changes_nothing() {
    let mut cluster = Cluster::start(3).await;
    let (record, _work, old_job) = left_behind(&mut cluster, "raced.git", true).await;
    let store = cluster.store();
    let (hooks, mut copied, mut closed, go) = paused_after_copy(old_job);
    // A lease long enough that its heartbeat does not notice the cancel during the test: the
    // old run reaches its close, as a slow worker would.
    let mut config = worker_config(&cluster);
    config.worker.lease = gitfleet::config::Duration(Duration::from_secs(300));
    // One job at a time: its run count then says when the old run is over.
    config.worker.concurrency = 1;
    let old = start_worker(config, &[JobType::Replicator], hooks);
    copied.recv().await.unwrap();

    // Cancelled while it copies; a newer job for the same work runs to the end.
    assert!(
        store
            .cancel_job(old_job, "cancelled by the test")
            .await
            .unwrap()
    );
    let (new_job, created) = enqueue_replication(&store, record.id).await;
    assert!(created);
    assert_ne!(new_job, old_job);
    let newer = start_worker(
        worker_config(&cluster),
        &[JobType::Replicator],
        Hooks::default(),
    );
    wait_for_state(&store, new_job, "done", 30).await;
    assert_eq!(replica_generation(&cluster, "raced.git", 2).await, Some(2));
    // Only the old run is left to touch the repository's lease.
    newer.stop().await;

    // The old run finishes last: under the repository's lease it finds the target up to
    // date, and hands the lease back; its job's close is refused by its stale lease token.
    go.add_permits(2);
    wait_for(30, "the old run to end", || async {
        old.metrics.runs(JobType::Replicator) == 1
    })
    .await;
    assert!(closed.try_recv().is_err(), "the old run recorded something");
    let holder: Option<String> =
        sqlx::query_scalar("SELECT lease_owner FROM repositories WHERE id = $1")
            .bind(record.id.0)
            .fetch_one(store.pool())
            .await
            .unwrap();
    assert_eq!(holder, None);
    let state = job_state(&store, old_job).await;
    assert_eq!(state.state, "cancelled");
    assert_eq!(state.last_error.as_deref(), Some("cancelled by the test"));
    assert_eq!(job_state(&store, new_job).await.state, "done");
    assert_eq!(replica_generation(&cluster, "raced.git", 2).await, Some(2));
    assert_replicas_agree(&cluster, "raced.git").await;
    old.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_write_during_the_objects_copy_is_caught_up_under_the_lease() {
    let mut cluster = Cluster::start(3).await;
    let (_record, work, job) = left_behind(&mut cluster, "moving.git", true).await;
    let store = cluster.store();
    let (hooks, mut copied, mut closed, go) = paused_after_copy(job);
    // One job at a time, so the job is not run again before the test has looked at it.
    let mut config = worker_config(&cluster);
    config.worker.concurrency = 1;
    let worker = start_worker(config, &[JobType::Replicator], hooks);
    copied.recv().await.unwrap();

    // The objects copied are generation 2's; a push lands on the up-to-date replicas
    // meanwhile.
    push_commit(&cluster, work.path(), "moving.git", "during-copy");
    assert_eq!(cluster.record("moving.git").await.generation, 3);
    assert_eq!(replica_generation(&cluster, "moving.git", 2).await, Some(1));

    // The refs phase, under the repository's lease, copies what is there now: the replica is
    // recorded at generation 3 by the same run. (The push queued the same work again, merged
    // into this job: it runs once more and finds nothing to do.)
    go.add_permits(1);
    assert_eq!(closed.recv().await.unwrap(), Closed::Requeued);
    assert_eq!(replica_generation(&cluster, "moving.git", 2).await, Some(3));
    go.add_permits(1);
    wait_for_state(&store, job, "done", 30).await;
    assert_eq!(job_state(&store, job).await.attempts, 1);
    assert_replicas_agree(&cluster, "moving.git").await;
    worker.stop().await;
}

/// Reads lines from a worker process's stderr until one contains `needle`.
fn wait_for_line(lines: &mut impl Iterator<Item = std::io::Result<String>>, needle: &str) {
    for line in lines.by_ref() {
        if line.unwrap().contains(needle) {
            return;
        }
    }
    panic!("the worker never logged {needle:?}");
}

fn signal(pid: u32, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_killed_mid_replication_is_taken_over_after_its_lease() {
    use std::io::BufRead as _;
    let mut cluster = Cluster::start(3).await;
    let (_record, _work, job) = left_behind(&mut cluster, "orphan.git", true).await;
    let store = cluster.store();
    // Held back until the first worker is ready; its health probes then run once an hour, so
    // it keeps seeing the target as healthy once the target is frozen.
    sqlx::query("UPDATE jobs SET run_after = now() + interval '1 hour' WHERE id = $1")
        .bind(job.0)
        .execute(store.pool())
        .await
        .unwrap();
    let config = std::fs::read_to_string(&cluster.config_path)
        .unwrap()
        .replace("interval = \"200ms\"", "interval = \"1h\"")
        + "\n[worker]\nlease = \"2s\"\npoll_interval = \"100ms\"\n";
    let config_path = cluster.config_path.with_file_name("worker.toml");
    std::fs::write(&config_path, config).unwrap();
    let spawn = || {
        std::process::Command::new(BINARY)
            .args(["worker", "--config"])
            .arg(&config_path)
            .env("GITFLEET_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut first = spawn();
    let mut lines = std::io::BufReader::new(first.stderr.take().unwrap()).lines();
    wait_for_line(&mut lines, "worker started");

    // The target freezes, and the job is released to the first worker, which hangs in the
    // copy holding the lease.
    let target_pid = cluster.nodes[2].pid();
    signal(target_pid, nix::sys::signal::Signal::SIGSTOP);
    sqlx::query("UPDATE jobs SET run_after = now() WHERE id = $1")
        .bind(job.0)
        .execute(store.pool())
        .await
        .unwrap();
    wait_for_state(&store, job, "running", 30).await;
    first.kill().unwrap();
    first.wait().unwrap();
    signal(target_pid, nix::sys::signal::Signal::SIGCONT);

    // A second worker takes the job over once the dead one's lease has expired.
    let mut second = spawn();
    let _drain = std::thread::spawn({
        let stderr = second.stderr.take().unwrap();
        move || std::io::copy(&mut std::io::BufReader::new(stderr), &mut std::io::sink())
    });
    wait_for_state(&store, job, "done", 60).await;
    let state = job_state(&store, job).await;
    assert_eq!(state.attempts, 2, "{state:?}");
    assert_replicas_agree(&cluster, "orphan.git").await;
    signal(second.id(), nix::sys::signal::Signal::SIGTERM);
    assert!(second.wait().unwrap().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn removing_a_repository_cancels_its_jobs_and_shutdown_hands_leases_back() {
    let mut cluster = Cluster::start(3).await;
    let (_record, _work, job) = left_behind(&mut cluster, "removed.git", true).await;
    let store = cluster.store();
    let (hooks, mut copied, _closed, _go) = paused_after_copy(job);
    let mut config = worker_config(&cluster);
    config.worker.shutdown_grace = gitfleet::config::Duration(Duration::from_millis(200));
    let worker = start_worker(config, &[JobType::Replicator], hooks);
    copied.recv().await.unwrap();
    // Shutting down while the job is held: after the grace period its lease is handed back
    // at once, not left to expire, and the attempt is not counted.
    worker.stop().await;
    let state = job_state(&store, job).await;
    assert_eq!((state.state.as_str(), state.attempts), ("queued", 0));

    gitfleet::proto::repository_service_client::RepositoryServiceClient::new(
        cluster.channel().await,
    )
    .remove_repository(gitfleet::proto::RemoveRepositoryRequest {
        repository: header("default", "removed.git"),
    })
    .await
    .unwrap();
    let state = job_state(&store, job).await;
    assert_eq!(state.state, "cancelled");
    assert_eq!(
        state.last_error.as_deref(),
        Some("the repository was removed")
    );
}

/// A replication whose caller gave up goes on on its node. Here the first run read the
/// source (HEAD on `main`) and stalled before it copied anything; its worker timed out and a
/// second run copied the newer state (HEAD moved to `dev`) and recorded the replica up to
/// date. When the first run resumes, it must not put the replica back as it read it.
#[tokio::test(flavor = "multi_thread")]
async fn a_replication_that_resumes_after_a_newer_one_leaves_the_replica_as_it_was_recorded() {
    let mut cluster = Cluster::start(3).await;
    let (_record, work, _job) = left_behind(&mut cluster, "late.git", false).await;
    let stall = Stall::new("fetch");
    cluster.nodes[2].restart_with(&stall.node_config());
    cluster.wait_for_health(2, true).await;
    stall.arm();
    let mut config = worker_config(&cluster);
    config.worker.replication_timeout = gitfleet::config::Duration(Duration::from_secs(1));
    let worker = start_worker(config, &[JobType::Replicator], Hooks::default());
    stall.stalled().await;

    // While the first run is stalled, the default branch moves to a new branch.
    run_git(
        work.path(),
        &[
            "push",
            "-q",
            &cluster.url("late.git"),
            "main:refs/heads/dev",
        ],
    );
    RefServiceClient::new(cluster.channel().await)
        .set_default_branch(SetDefaultBranchRequest {
            repository: header("default", "late.git"),
            branch: "dev".into(),
        })
        .await
        .unwrap();
    let generation = cluster.record("late.git").await.generation;
    assert_eq!(generation, 4);
    wait_for(
        60,
        "a newer run to bring the replica up to date",
        || async { replica_generation(&cluster, "late.git", 2).await == Some(generation) },
    )
    .await;

    // The first run resumes and ends.
    stall.release();
    wait_for_no_children(cluster.nodes[2].pid()).await;
    let record = cluster.record("late.git").await;
    assert_eq!(record.generation, generation);
    assert_eq!(
        replica_generation(&cluster, "late.git", 2).await,
        Some(generation)
    );
    let head = std::fs::read_to_string(cluster.replica_dir(2, &record).join("HEAD")).unwrap();
    assert_eq!(head.trim(), "ref: refs/heads/dev");
    assert_replicas_agree(&cluster, "late.git").await;
    worker.stop().await;
}

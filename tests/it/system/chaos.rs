//! The chaos suite. Everything is a real process: a PostgreSQL of the suite's own, three
//! `gitfleet node`s, `gitfleet proxy` and `gitfleet worker`. Several git clients push over
//! HTTP at once while one fault happens: the proxy, a node or the worker is killed with
//! SIGKILL, PostgreSQL is restarted, a node is stopped (SIGSTOP) for longer than a write
//! lease, or a single git process is stopped past the straggler timeout and the lease and then
//! let go on, late (a push's receive-pack; after a node missed writes, its replication's fetch,
//! the upload-pack on the source it fetches from, or its refs phase's update-ref), or the
//! worker is stopped past its lease while it rolls back a write the killed proxy left open. Then everything is brought back, and
//! the suite checks what a user would:
//!
//! * every push whose client saw success is on every replica;
//! * a replica recorded up to date equals the others on disk, refs and HEAD, read while
//!   nothing writes, before and after convergence (the `mismatched` column);
//! * the replicas converge to equal refs checksums, all up to date, within a bound;
//! * no write intent or write lease is left open, and `gitfleet admin status` says HEALTHY;
//! * no repository is frozen: a new push to each succeeds.
//!
//! Each scenario runs once per seed (`GITFLEET_CHAOS_SEEDS`, default "1,2"); the seed picks the
//! victim, the timings and the clients' pauses. `GITFLEET_CHAOS_FAULTS` picks scenarios by a
//! word of their name (say "update-ref,rollback"). The suite prints one row per run.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::common::fleet::Fleet;
use crate::common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const REPOSITORIES: usize = 3;
const PUSHERS_PER_REPOSITORY: usize = 2;
const LEASE: Duration = Duration::from_secs(3);
/// How long the replicas get to converge once every process is back.
const CONVERGE_WITHIN: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, Copy)]
enum Fault {
    KillProxy,
    KillNode,
    KillWorker,
    RestartPostgres,
    StopNode,
    /// One push's receive-pack on one node, stopped past the straggler timeout and the lease.
    StopReceivePack,
    /// A replication's fetch on its target, stopped past the job's lease.
    StopReplicationFetch,
    /// The upload-pack a replication fetches from, on its source, stopped past the lease.
    StopSourceUploadPack,
    /// The ref transaction of a replication's refs phase (`update-ref` on its target, under
    /// the replica's fence lock), stopped past the job's lease and the repository's.
    StopReplicationUpdateRef,
    /// The worker, stopped past its lease while it rolls back a write the proxy (killed, and
    /// kept down until then) left open; the proxy comes back and takes new writes meanwhile.
    StopRecovery,
}

impl Fault {
    const ALL: [Fault; 10] = [
        Fault::KillProxy,
        Fault::KillNode,
        Fault::KillWorker,
        Fault::RestartPostgres,
        Fault::StopNode,
        Fault::StopReceivePack,
        Fault::StopReplicationFetch,
        Fault::StopSourceUploadPack,
        Fault::StopReplicationUpdateRef,
        Fault::StopRecovery,
    ];

    fn name(self) -> &'static str {
        match self {
            Fault::KillProxy => "kill -9 proxy",
            Fault::KillNode => "kill -9 node",
            Fault::KillWorker => "kill -9 worker",
            Fault::RestartPostgres => "restart postgres",
            Fault::StopNode => "SIGSTOP node > lease",
            Fault::StopReceivePack => "SIGSTOP receive-pack",
            Fault::StopReplicationFetch => "SIGSTOP repl. fetch",
            Fault::StopSourceUploadPack => "SIGSTOP repl. source",
            Fault::StopReplicationUpdateRef => "SIGSTOP repl. update-ref",
            Fault::StopRecovery => "SIGSTOP worker mid-rollback",
        }
    }
}

/// The first git process running `subcommand` that one of `nodes` started, within `within`:
/// its node's index and its pid.
async fn catch_git(
    fleet: &Fleet,
    nodes: &[usize],
    subcommand: &str,
    within: Duration,
) -> Option<(usize, i32)> {
    catch_git_unlike(fleet, nodes, subcommand, &[], within).await
}

/// [`catch_git`], passing over a process with any of the arguments `unlike`.
async fn catch_git_unlike(
    fleet: &Fleet,
    nodes: &[usize],
    subcommand: &str,
    unlike: &[&[u8]],
    within: Duration,
) -> Option<(usize, i32)> {
    let markers: Vec<(usize, Vec<u8>)> = nodes
        .iter()
        .map(|&index| {
            let marker = format!("GITFLEET_NODE_PID={}", fleet.nodes[index].pid());
            (index, marker.into_bytes())
        })
        .collect();
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let mut args = cmdline.split(|b| *b == 0);
            let is_git = args.next().is_some_and(|arg0| arg0.ends_with(b"git"));
            let args: Vec<&[u8]> = args.collect();
            if !is_git
                || !args.contains(&subcommand.as_bytes())
                || args.iter().any(|arg| unlike.contains(arg))
            {
                continue;
            }
            let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
                continue;
            };
            for (index, marker) in &markers {
                if environ
                    .split(|b| *b == 0)
                    .any(|var| var == marker.as_slice())
                {
                    return Some((*index, pid));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    None
}

/// Stops a git process for `stopped`, then lets it go on.
async fn stop_git(pid: i32, stopped: Duration) {
    let pid = nix::unistd::Pid::from_raw(pid);
    if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).is_err() {
        return;
    }
    tokio::time::sleep(stopped).await;
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
}

/// Makes one node miss writes (killed for a while, then started again), so that a
/// replication to it follows; returns its index.
async fn left_behind(fleet: &mut Fleet, rng: &mut StdRng) -> usize {
    let victim = rng.random_range(0..fleet.nodes.len());
    fleet.nodes[victim].kill();
    tokio::time::sleep(Duration::from_millis(rng.random_range(800..1500))).await;
    fleet.nodes[victim].restart();
    victim
}

/// One push a client tried.
struct Attempt {
    branch: String,
    commit: String,
    acknowledged: bool,
}

struct Row {
    scenario: &'static str,
    seed: u64,
    detail: String,
    attempted: usize,
    acknowledged: usize,
    lost: usize,
    /// Replicas recorded up to date that differed on disk from the others.
    mismatched: usize,
    rolled_back: usize,
    kept: usize,
    recovered: usize,
    converged: Duration,
}

/// The faults to run: all of them, or those whose name contains one of the comma-separated
/// words of `GITFLEET_CHAOS_FAULTS` (say "update-ref,rollback").
fn faults() -> Vec<Fault> {
    let wanted = std::env::var("GITFLEET_CHAOS_FAULTS").unwrap_or_default();
    let words: Vec<&str> = wanted
        .split(',')
        .map(str::trim)
        .filter(|w| !w.is_empty())
        .collect();
    Fault::ALL
        .into_iter()
        .filter(|fault| words.is_empty() || words.iter().any(|w| fault.name().contains(w)))
        .collect()
}

fn seeds() -> Vec<u64> {
    std::env::var("GITFLEET_CHAOS_SEEDS")
        .ok()
        .map(|seeds| {
            seeds
                .split(',')
                .map(|seed| seed.trim().parse().expect("GITFLEET_CHAOS_SEEDS: numbers"))
                .collect()
        })
        .unwrap_or_else(|| vec![1, 2])
}

fn rev_parse(dir: &Path, what: &str) -> String {
    run_git(dir, &["rev-parse", what]).trim().to_owned()
}

/// A push that gives up on a server that stops answering.
fn push(work: &Path, url: &str, branch: &str) -> bool {
    git(work)
        .args(["-c", "http.lowSpeedLimit=1", "-c", "http.lowSpeedTime=60"])
        .args(["push", "-q", url, &format!("HEAD:refs/heads/{branch}")])
        .output()
        .unwrap()
        .status
        .success()
}

/// Starts the work tree again from what the cluster holds, so that every commit is pushed
/// exactly once and a push that failed is never carried by a later one unless the cluster
/// kept it.
fn resync(work: &Path, url: &str, branch: &str, deadline: Instant) {
    loop {
        let fetched = git(work)
            .args(["fetch", "-q", url])
            .arg(format!("+refs/heads/{branch}:refs/remotes/origin/{branch}"))
            .output()
            .unwrap();
        if fetched.status.success() {
            run_git(
                work,
                &["reset", "-q", "--hard", &format!("origin/{branch}")],
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "cannot fetch {branch} from {url}: {}",
            String::from_utf8_lossy(&fetched.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn commit(work: &Path, branch: &str, n: usize) -> String {
    std::fs::write(
        work.join(format!("{branch}.txt")),
        format!("{branch} {n}\n"),
    )
    .unwrap();
    run_git(work, &["add", "-A"]);
    run_git(work, &["commit", "-q", "-m", &format!("{branch} {n}")]);
    rev_parse(work, "HEAD")
}

/// One git client: commit, push, and after a failure start again from the cluster's state.
fn pusher(
    url: String,
    work: PathBuf,
    branch: String,
    stop: Arc<AtomicBool>,
    seed: u64,
) -> Vec<Attempt> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut attempts = Vec::new();
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let commit = commit(&work, &branch, n);
        let acknowledged = push(&work, &url, &branch);
        attempts.push(Attempt {
            branch: branch.clone(),
            commit,
            acknowledged,
        });
        if !acknowledged {
            resync(
                &work,
                &url,
                &branch,
                Instant::now() + Duration::from_secs(120),
            );
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(0..40)));
    }
    attempts
}

/// Brings the fault about and, once it is over, everything back.
async fn inflict(fleet: &mut Fleet, fault: Fault, rng: &mut StdRng) -> String {
    let millis =
        |rng: &mut StdRng, low: u64, high: u64| Duration::from_millis(rng.random_range(low..high));
    match fault {
        Fault::KillProxy => {
            let outage = millis(rng, 300, 1500);
            fleet.proxy.kill();
            tokio::time::sleep(outage).await;
            fleet.start_proxy();
            format!("down {outage:.1?}")
        }
        Fault::KillNode => {
            let victim = rng.random_range(0..fleet.nodes.len());
            let outage = millis(rng, 500, 2500);
            fleet.nodes[victim].kill();
            tokio::time::sleep(outage).await;
            fleet.nodes[victim].restart();
            format!("storage-{} down {outage:.1?}", victim + 1)
        }
        Fault::KillWorker => {
            let outage = millis(rng, 300, 1500);
            fleet.worker.kill();
            tokio::time::sleep(outage).await;
            fleet.start_worker();
            format!("down {outage:.1?}")
        }
        Fault::RestartPostgres => {
            let started = Instant::now();
            fleet.postgres.restart();
            format!("restart took {:.1?}", started.elapsed())
        }
        Fault::StopReceivePack => {
            let stopped = LEASE + millis(rng, 1000, 2000);
            match catch_git(fleet, &[0, 1, 2], "receive-pack", Duration::from_secs(10)).await {
                Some((index, pid)) => {
                    stop_git(pid, stopped).await;
                    format!("storage-{} {stopped:.1?}", index + 1)
                }
                None => "none caught".into(),
            }
        }
        Fault::StopReplicationFetch
        | Fault::StopSourceUploadPack
        | Fault::StopReplicationUpdateRef => {
            let victim = left_behind(fleet, rng).await;
            let stopped = LEASE + millis(rng, 1000, 2000);
            let (nodes, subcommand): (Vec<usize>, _) = match fault {
                Fault::StopReplicationFetch => (vec![victim], "fetch"),
                Fault::StopReplicationUpdateRef => (vec![victim], "update-ref"),
                _ => ((0..3).filter(|i| *i != victim).collect(), "upload-pack"),
            };
            match catch_git(fleet, &nodes, subcommand, Duration::from_secs(15)).await {
                Some((index, pid)) => {
                    stop_git(pid, stopped).await;
                    format!("storage-{} {stopped:.1?}", index + 1)
                }
                None => format!("storage-{} behind, none caught", victim + 1),
            }
        }
        Fault::StopRecovery => {
            // Writes in flight are left open; with the proxy down, only the worker's recovery
            // rolls them back, one compare-and-swap (`update-ref`) at a time.
            fleet.proxy.kill();
            let stopped = LEASE + millis(rng, 1000, 2000);
            // A rollback's compare-and-swap, not a replication's refs phase (`--no-deref`).
            let caught =
                catch_git_unlike(fleet, &[0, 1, 2], "update-ref", &[b"--no-deref"], LEASE * 4)
                    .await;
            let worker = fleet.worker.pid().expect("the worker runs");
            let worker = nix::unistd::Pid::from_raw(worker as i32);
            match caught {
                Some((index, _)) => {
                    nix::sys::signal::kill(worker, nix::sys::signal::Signal::SIGSTOP).unwrap();
                    // Its lease runs out while new writes come through the proxy again.
                    fleet.start_proxy();
                    tokio::time::sleep(stopped).await;
                    nix::sys::signal::kill(worker, nix::sys::signal::Signal::SIGCONT).unwrap();
                    format!("rollback on storage-{}, worker {stopped:.1?}", index + 1)
                }
                None => {
                    fleet.start_proxy();
                    "no rollback caught".into()
                }
            }
        }
        Fault::StopNode => {
            let victim = rng.random_range(0..fleet.nodes.len());
            let stopped = LEASE + millis(rng, 1000, 2000);
            let pid = nix::unistd::Pid::from_raw(fleet.nodes[victim].pid() as i32);
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
            tokio::time::sleep(stopped).await;
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
            format!("storage-{} stopped {stopped:.1?}", victim + 1)
        }
    }
}

/// Sets up `REPOSITORIES` repositories with a branch per client, and a work tree per client.
fn prepare(
    fleet: &Fleet,
    round: &str,
) -> (
    Vec<String>,
    Vec<(String, PathBuf, String)>,
    tempfile::TempDir,
) {
    let dir = tempfile::tempdir().unwrap();
    let mut repositories = Vec::new();
    let mut clients = Vec::new();
    for r in 0..REPOSITORIES {
        let name = format!("chaos/{round}-{r}.git");
        let created = fleet.admin(&["create-repository", &format!("default/{name}")]);
        assert!(
            created.status.success(),
            "{}",
            String::from_utf8_lossy(&created.stderr)
        );
        let url = fleet.git_url(&name);
        let seed = dir.path().join(format!("seed-{r}"));
        make_history(&seed);
        let branches: Vec<String> = (0..PUSHERS_PER_REPOSITORY)
            .map(|p| format!("client-{p}"))
            .collect();
        let mut refspecs = vec!["main".to_owned()];
        refspecs.extend(
            branches
                .iter()
                .map(|branch| format!("main:refs/heads/{branch}")),
        );
        let mut args = vec!["push", "-q", url.as_str()];
        args.extend(refspecs.iter().map(String::as_str));
        run_git(&seed, &args);
        for branch in branches {
            let work = dir.path().join(format!("work-{r}-{branch}"));
            run_git(dir.path(), &["clone", "-q", &url, work.to_str().unwrap()]);
            run_git(
                &work,
                &["checkout", "-q", "-b", &branch, &format!("origin/{branch}")],
            );
            clients.push((url.clone(), work, branch));
        }
        repositories.push(name);
    }
    (repositories, clients, dir)
}

fn is_ancestor(replica: &Path, commit: &str, tip: &str) -> bool {
    try_git(replica, &["merge-base", "--is-ancestor", commit, tip])
        .status
        .success()
}

async fn run_round(
    fleet: &mut Fleet,
    fault: Fault,
    seed: u64,
    all: &mut Vec<String>,
) -> Result<Row, String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let round = format!("{:?}-{seed}", fault).to_lowercase();
    let (repositories, clients, _dir) = prepare(fleet, &round);
    all.extend(repositories.iter().cloned());
    let recovered_before = recovered_writes(fleet);

    let stop = Arc::new(AtomicBool::new(false));
    let pushers: Vec<_> = clients
        .iter()
        .enumerate()
        .map(|(index, (url, work, branch))| {
            let (url, work, branch, stop) =
                (url.clone(), work.clone(), branch.clone(), stop.clone());
            let seed = seed * 100 + index as u64;
            tokio::task::spawn_blocking(move || pusher(url, work, branch, stop, seed))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(rng.random_range(800..1600))).await;
    let detail = inflict(fleet, fault, &mut rng).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut attempts: Vec<(usize, Attempt)> = Vec::new();
    for (index, pusher) in pushers.into_iter().enumerate() {
        let done = pusher
            .await
            .map_err(|error| format!("a client failed: {error}"))?;
        attempts.extend(
            done.into_iter()
                .map(|attempt| (index / PUSHERS_PER_REPOSITORY, attempt)),
        );
    }

    // Once nothing writes, a replica recorded up to date is equal to the others on disk; and
    // again once everything has converged (a late operation would land in between).
    let mut mismatched = quiet_mismatches(fleet, &repositories).await;
    let converged = fleet.converge(all, CONVERGE_WITHIN).await?;
    mismatched += quiet_mismatches(fleet, &repositories).await;

    // Every push a client saw succeed is on every replica; the others either were kept whole
    // or are gone from every replica.
    let mut replicas = Vec::new();
    for repository in &repositories {
        replicas.push(fleet.replica_dirs(repository).await);
    }
    let (mut lost, mut rolled_back, mut kept) = (0, 0, 0);
    for (repository_index, attempt) in &attempts {
        let repository = &repositories[*repository_index];
        let tip = format!("refs/heads/{}", attempt.branch);
        let present: Vec<bool> = replicas[*repository_index]
            .iter()
            .map(|replica| is_ancestor(replica, &attempt.commit, &tip))
            .collect();
        match (attempt.acknowledged, present.iter().all(|p| *p)) {
            (true, true) => {}
            (true, false) => lost += 1,
            (false, true) => kept += 1,
            (false, false) if present.iter().any(|p| *p) => {
                return Err(format!(
                    "{} on {repository} is on some replicas only: {present:?}",
                    attempt.commit
                ));
            }
            (false, false) => rolled_back += 1,
        }
    }
    if lost > 0 {
        return Err(format!("{lost} acknowledged pushes are missing"));
    }
    if mismatched > 0 {
        return Err(format!(
            "{mismatched} replicas recorded up to date differed from the others"
        ));
    }

    // Not frozen: one more push through each client lands on every replica.
    let deadline = Instant::now() + Duration::from_secs(60);
    for (index, (url, work, branch)) in clients.iter().enumerate() {
        resync(work, url, branch, deadline);
        let commit = commit(work, branch, 10_000);
        if !push(work, url, branch) {
            return Err(format!(
                "a push to {url} ({branch}) failed after the scenario"
            ));
        }
        for (node, replica) in replicas[index / PUSHERS_PER_REPOSITORY].iter().enumerate() {
            let tip = rev_parse(replica, &format!("refs/heads/{branch}"));
            if tip != commit {
                return Err(format!(
                    "storage-{}: {branch} is at {tip} after a push of {commit}",
                    node + 1
                ));
            }
        }
    }
    fleet.converge(all, CONVERGE_WITHIN).await?;

    let acknowledged = attempts.iter().filter(|(_, a)| a.acknowledged).count();
    Ok(Row {
        scenario: fault.name(),
        seed,
        detail,
        attempted: attempts.len(),
        acknowledged,
        lost,
        mismatched,
        rolled_back,
        kept,
        recovered: recovered_writes(fleet) - recovered_before,
        converged,
    })
}

/// [`Fleet::mismatched`] for every repository of the round, each read in a quiet moment (tried
/// for up to 20 s; a repository never quiet counts nothing).
async fn quiet_mismatches(fleet: &Fleet, repositories: &[String]) -> usize {
    let mut total = 0;
    for repository in repositories {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(count) = fleet.mismatched(repository).await {
                total += count;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    total
}

/// Interrupted writes settled so far, by the recovery job or by a proxy, as their logs say.
fn recovered_writes(fleet: &Fleet) -> usize {
    fleet.logged("interrupted write rolled back") + fleet.logged("interrupted write settled")
}

fn table(rows: &[Row]) -> String {
    let mut out = format!(
        "{:<27} {:>4} {:<34} {:>9} {:>12} {:>4} {:>10} {:>11} {:>11} {:>9} {:>10}\n",
        "scenario",
        "seed",
        "fault",
        "attempted",
        "acknowledged",
        "lost",
        "mismatched",
        "rolled back",
        "kept unack.",
        "recovered",
        "converged"
    );
    for row in rows {
        out.push_str(&format!(
            "{:<27} {:>4} {:<34} {:>9} {:>12} {:>4} {:>10} {:>11} {:>11} {:>9} {:>9.1}s\n",
            row.scenario,
            row.seed,
            row.detail,
            row.attempted,
            row.acknowledged,
            row.lost,
            row.mismatched,
            row.rolled_back,
            row.kept,
            row.recovered,
            row.converged.as_secs_f64()
        ));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_acknowledged_push_is_lost_and_nothing_stays_frozen_whatever_fails() {
    let mut fleet = Fleet::start(
        &format!(
            "lease = \"{}s\"\nlease_wait = \"30s\"\ncommit_retry = \"20s\"\nstraggler_timeout = \"2s\"\n",
            LEASE.as_secs()
        ),
        "lease = \"3s\"\npoll_interval = \"200ms\"\nretry_backoff = \"200ms\"\nmax_backoff = \"2s\"\n\
         restart_backoff = \"200ms\"\nshutdown_grace = \"2s\"",
    )
    .await;
    let mut rows = Vec::new();
    let mut repositories = Vec::new();
    for seed in seeds() {
        for fault in faults() {
            match run_round(&mut fleet, fault, seed, &mut repositories).await {
                Ok(row) => {
                    eprintln!(
                        "{}",
                        table(std::slice::from_ref(&row)).lines().nth(1).unwrap()
                    );
                    rows.push(row);
                }
                Err(error) => {
                    let logs = fleet.keep_logs();
                    panic!(
                        "{} with seed {seed}: {error}\nlogs in {}\n{}",
                        fault.name(),
                        logs.display(),
                        table(&rows)
                    );
                }
            }
        }
    }
    println!(
        "\n{}\nthe processes' logs are in {}",
        table(&rows),
        fleet.keep_logs().display()
    );
    assert!(rows.iter().all(|row| row.lost == 0 && row.mismatched == 0));
}

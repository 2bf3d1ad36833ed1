//! A lagging replica catching up while its repository is busy. Four writers push to the small
//! repository without a break; once they have run a while, one replica is marked as having
//! missed writes (its recorded generation forgotten, as after a rollback it could not
//! confirm), so the writes after leave it out and the replicator has to bring it back while
//! the writers go on. Figures: how long until every replica is up to date again, and the
//! longest push while it caught up, beside the longest before it fell behind.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};

use super::measure::{NODES, SMALL, Setup};
use super::progress;
use super::report::{Row, Target};
use crate::config::ProxyConfig;
use crate::model::{RelativePath, StorageName};
use crate::store::Store;

/// Writers pushing at once, each to a branch of its own.
const WRITERS: usize = 4;
/// How long the writers run before the replica falls behind: the baseline.
const BEFORE: Duration = Duration::from_secs(3);
/// How long the writers go on once every replica is up to date again.
const AFTER: Duration = Duration::from_secs(1);
/// How long the replica may take before the run is called a failure.
const DEADLINE: Duration = Duration::from_secs(120);

/// One push: when it started and how long it took, from the run's start.
#[derive(Debug, Clone, Copy)]
struct Push {
    started: f64,
    took: f64,
    /// A writer's first push, which warms up and is not counted before.
    first: bool,
}

/// A writer whose pushes are refused this many times in a row ends the run.
const MAX_REFUSED_IN_A_ROW: usize = 3;
/// Pushes the writers must have made before the replica falls behind, for a baseline.
const PUSHES_BEFORE: usize = 3 * WRITERS;

pub(super) fn busy_repository(
    runtime: &tokio::runtime::Runtime,
    setup: &Setup,
) -> anyhow::Result<Vec<Row>> {
    let config = ProxyConfig::load(std::path::Path::new(setup.cluster.var("GITFLEET_CONFIG")?))?;
    let store = {
        let _context = runtime.enter();
        Store::connect_lazy(&config.database.url, 2, Duration::from_secs(10))?
    };
    let lagging = config
        .virtual_storages
        .iter()
        .flat_map(|storage| &storage.nodes)
        .map(|node| node.storage.clone())
        .next_back()
        .context("the cluster has no node")?;
    let (virtual_storage, path) = (StorageName::parse("default")?, RelativePath::parse(SMALL)?);

    let work_trees = setup.small_clones("busy", WRITERS)?;
    progress(format_args!(
        "busy repository: {WRITERS} writers push for {BEFORE:?}, then a replica falls behind"
    ));
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let pushed = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let writers: Vec<_> = work_trees
        .into_iter()
        .enumerate()
        .map(|(writer, work_tree)| {
            let (git, stop, pushed) = (setup.git.clone(), stop.clone(), pushed.clone());
            let refused = refused.clone();
            std::thread::spawn(move || -> anyhow::Result<Vec<Push>> {
                let mut pushes = Vec::new();
                let mut round = 0;
                let mut in_a_row = 0;
                while !stop.load(Ordering::Relaxed) {
                    round += 1;
                    std::fs::write(work_tree.join("busy.txt"), format!("{writer} {round}\n"))?;
                    git.run(Some(&work_tree), &["add", "busy.txt"], &[])?;
                    git.run(
                        Some(&work_tree),
                        &["commit", "--quiet", "-m", &format!("busy {writer} {round}")],
                        &[],
                    )?;
                    let started = start.elapsed().as_secs_f64();
                    let pushed_now = git.timed(
                        Some(&work_tree),
                        &[
                            "push",
                            "--quiet",
                            "origin",
                            &format!("HEAD:refs/heads/busy-{writer}"),
                        ],
                        &[],
                    );
                    // A refused push (a node's health check timed out on a loaded machine, say)
                    // is counted and tried again with the next commit; a writer whose pushes
                    // keep failing ends the run.
                    let took = match pushed_now {
                        Ok(took) => {
                            in_a_row = 0;
                            took
                        }
                        Err(error) => {
                            refused.fetch_add(1, Ordering::Relaxed);
                            in_a_row += 1;
                            if in_a_row >= MAX_REFUSED_IN_A_ROW {
                                return Err(error);
                            }
                            continue;
                        }
                    };
                    pushes.push(Push {
                        started,
                        took,
                        first: round == 1,
                    });
                    pushed.fetch_add(1, Ordering::Relaxed);
                }
                Ok(pushes)
            })
        })
        .collect();

    std::thread::sleep(BEFORE);
    // A slow machine gets longer, so that there is a baseline to compare with.
    while pushed.load(Ordering::Relaxed) < PUSHES_BEFORE && start.elapsed() < DEADLINE {
        std::thread::sleep(Duration::from_millis(50));
    }
    // Under the repository's lease, between two writes, as any change to a replica's record is
    // made: the lease is taken, the replica forgotten, the lease released.
    let mut attempts = 0;
    while runtime
        .block_on(
            sqlx::query(
                "WITH lease AS (
                     UPDATE repositories
                     SET lease_owner = 'bench', lease_token = nextval('repository_lease_tokens'),
                         lease_expires_at = now() + interval '10 seconds'
                     WHERE virtual_storage = $1 AND relative_path = $2
                       AND (lease_owner IS NULL OR lease_expires_at < now())
                     RETURNING id
                 )
                 UPDATE replicas p SET generation = NULL FROM lease
                 WHERE p.repository_id = lease.id AND p.storage = $3",
            )
            .bind(virtual_storage.as_str())
            .bind(path.as_str())
            .bind(lagging.as_str())
            .execute(store.pool()),
        )?
        .rows_affected()
        == 0
    {
        attempts += 1;
        if attempts > 10_000 {
            stop.store(true, Ordering::Relaxed);
            bail!("{SMALL} was never between two writes");
        }
    }
    runtime.block_on(
        sqlx::query(
            "UPDATE repositories SET lease_owner = NULL, lease_expires_at = NULL
             WHERE virtual_storage = $1 AND relative_path = $2 AND lease_owner = 'bench'",
        )
        .bind(virtual_storage.as_str())
        .bind(path.as_str())
        .execute(store.pool()),
    )?;
    let behind_at = start.elapsed().as_secs_f64();
    let caught_up_at = loop {
        let record = runtime
            .block_on(store.find_repository(&virtual_storage, &path))?
            .context("the small repository is gone")?;
        let up_to_date = record
            .replicas
            .iter()
            .filter(|(_, generation)| *generation == record.generation)
            .count();
        let elapsed = start.elapsed().as_secs_f64();
        if up_to_date == NODES {
            break elapsed;
        }
        if elapsed - behind_at > DEADLINE.as_secs_f64() {
            stop.store(true, Ordering::Relaxed);
            bail!("the replica on {lagging} was not up to date {DEADLINE:?} after it fell behind");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    std::thread::sleep(AFTER);
    stop.store(true, Ordering::Relaxed);
    let mut pushes = Vec::new();
    for writer in writers {
        let writer = writer
            .join()
            .map_err(|_| anyhow::anyhow!("a writer panicked"))?;
        pushes.extend(writer.context("a writer's push failed")?);
    }

    // Once the writers stopped, every replica comes up to date (a push that left one out,
    // the lagging one still joining, queued its repair), and then they hold the same refs.
    let stopped = Instant::now();
    loop {
        let record = runtime
            .block_on(store.find_repository(&virtual_storage, &path))?
            .context("the small repository is gone")?;
        if record.up_to_date().count() == NODES {
            break;
        }
        ensure!(
            stopped.elapsed() < DEADLINE,
            "a replica was still behind {DEADLINE:?} after the writers stopped"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let settled = stopped.elapsed().as_secs_f64();
    let refs: Vec<String> = setup
        .small_replicas
        .iter()
        .map(|replica| setup.git.run(Some(replica), &["for-each-ref"], &[]))
        .collect::<anyhow::Result<_>>()?;
    ensure!(
        refs.windows(2).all(|pair| pair[0] == pair[1]),
        "the replicas differ after the writers stopped"
    );

    // A push that was running while the replica caught up, or one before it fell behind
    // (each writer's first push warms up).
    let during: Vec<f64> = pushes
        .iter()
        .filter(|push| push.started + push.took >= behind_at && push.started <= caught_up_at)
        .map(|push| push.took)
        .collect();
    let before: Vec<f64> = pushes
        .iter()
        .filter(|push| !push.first && push.started + push.took < behind_at)
        .map(|push| push.took)
        .collect();
    ensure!(
        !during.is_empty() && !before.is_empty(),
        "too few pushes to compare: {} before, {} while catching up",
        before.len(),
        during.len()
    );
    let longest = |pushes: &[f64]| pushes.iter().copied().fold(0.0, f64::max);
    let typical = super::report::Spread::of(&before).median;
    let converged = caught_up_at - behind_at;
    progress(format_args!(
        "busy repository: up to date again after {converged:.2}s; {} pushes meanwhile, the \
         longest {:.3}s (before: {} pushes, median {typical:.3}s, longest {:.3}s); {} pushes \
         refused; all up to date {settled:.2}s after the writers stopped",
        during.len(),
        longest(&during),
        before.len(),
        longest(&before),
        refused.load(Ordering::Relaxed)
    ));
    Ok(vec![
        Row::new(
            format!("busy repository ({WRITERS} writers): a lagging replica up to date after"),
            "s",
            &[converged],
        )
        .target(Target::ValueAtMost(5.0)),
        Row::new(
            format!("busy repository ({WRITERS} writers): longest push while it caught up"),
            "s",
            &[longest(&during)],
        )
        .against("longest before", &[longest(&before)]),
        Row::new(
            format!("busy repository ({WRITERS} writers): longest push over the median before"),
            "s",
            // A catch-up that made no push wait longer than usual costs nothing, not less.
            &[(longest(&during) - typical).max(0.0)],
        )
        .target(Target::ValueAtMost(0.5)),
        Row::new(
            format!("busy repository ({WRITERS} writers): pushes refused"),
            "",
            &[refused.load(Ordering::Relaxed) as f64],
        ),
        Row::new(
            format!(
                "busy repository ({WRITERS} writers): all up to date after the writers stopped"
            ),
            "s",
            &[settled],
        ),
    ])
}

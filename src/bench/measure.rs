//! The measurements, each way in turn within every run so that drift in the machine's speed
//! falls on all of them alike.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};

use super::generate::Repositories;
use super::git::Git;
use super::report::{Row, Target};
use super::rpc;
use super::servers::{Daemon, DevCluster};
use super::{Options, load, progress};
use crate::config::ProxyConfig;
use crate::dev::cluster::storage_dir;
use crate::model::{RelativePath, StorageName};

const LARGE: &str = "bench/large.git";
pub(super) const SMALL: &str = "bench/small.git";
/// Nodes of the cluster, so replicas of each repository.
pub(super) const NODES: usize = 3;

/// The servers, and where each serves the benchmark's repositories from.
pub(super) struct Setup<'a> {
    pub git: &'a Git,
    dir: PathBuf,
    pub scratch: PathBuf,
    pub cluster: DevCluster,
    daemon: Daemon,
    /// The cluster's URLs of the large and small repositories (git over HTTP).
    large_url: String,
    pub small_url: String,
    /// Storage-1's replica of the large repository: what git daemon and --no-local read.
    large_replica: PathBuf,
    /// The small repository's copies that git daemon, and a push to a path, take pushes into.
    daemon_small: PathBuf,
    path_small: PathBuf,
    /// Every replica directory of the small repository, one per storage.
    pub small_replicas: Vec<PathBuf>,
    pub proxy: rpc::Target,
    /// The same repository on each node, called straight.
    pub nodes: Vec<rpc::Target>,
}

/// Runs every measurement and returns the table's rows.
pub fn all(
    options: &Options,
    dir: &Path,
    git: &Git,
    repositories: &Repositories,
) -> anyhow::Result<Vec<Row>> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let setup = set_up(&runtime, options, dir, git, repositories)?;
    let mut rows = Vec::new();
    rows.push(clones(&setup, options.runs, repositories)?);
    rows.push(fetches(&setup, options.runs, repositories)?);
    rows.extend(pushes(&setup, options.runs * 2)?);
    rows.extend(super::many_refs::pushes_with_many_refs(
        &runtime,
        &setup,
        &options.many_refs,
        options.runs,
    )?);
    rows.extend(load::accessors(&runtime, &setup, options)?);
    rows.extend(load::parallel_clones(
        &setup,
        options.parallel_clones,
        repositories,
    )?);
    // Last: they leave the writers' branches in the small repository.
    rows.extend(super::throughput::pushes_per_second(&setup)?);
    rows.extend(super::converge::busy_repository(&runtime, &setup)?);
    let Setup {
        cluster,
        daemon,
        scratch,
        ..
    } = setup;
    daemon.stop();
    let cluster_dir = cluster.dir.clone();
    cluster.stop();
    // The replicas and the clones take room; the repositories and the cluster's log stay. A
    // removal that fails costs the room, not the figures.
    for path in [cluster_dir, scratch] {
        if let Err(error) = std::fs::remove_dir_all(&path) {
            progress(format_args!(
                "warning: cannot remove {}: {error}",
                path.display()
            ));
        }
    }
    Ok(rows)
}

fn set_up<'a>(
    runtime: &tokio::runtime::Runtime,
    options: &Options,
    dir: &Path,
    git: &'a Git,
    repositories: &Repositories,
) -> anyhow::Result<Setup<'a>> {
    let scratch = fresh(&dir.join("scratch"))?;
    progress(format_args!(
        "starting gitfleet dev: PostgreSQL, 3 nodes, the proxy"
    ));
    let cluster = DevCluster::start(&options.exe, &dir.join("cluster"), NODES)?;
    let http = cluster.var("GITFLEET_HTTP_URL")?.to_owned();
    let large_url = format!("{http}/default/{LARGE}");
    let small_url = format!("{http}/default/{SMALL}");
    progress(format_args!(
        "pushing the large repository through the proxy to 3 replicas"
    ));
    let took = git.timed(
        Some(&repositories.large),
        &[
            "push",
            "--quiet",
            &large_url,
            "refs/heads/main:refs/heads/main",
        ],
        &[],
    )?;
    progress(format_args!("  pushed in {took:.1}s"));
    git.run(
        Some(&repositories.small),
        &["push", "--quiet", &small_url, "refs/heads/*:refs/heads/*"],
        &[],
    )?;

    let config = ProxyConfig::load(Path::new(cluster.var("GITFLEET_CONFIG")?))?;
    let (large_path, small_path) = runtime.block_on(replica_paths(&config))?;
    let small_replicas = (1..=NODES)
        .map(|index| storage_dir(&cluster.dir, index).join(small_path.as_str()))
        .collect();
    let nodes = config
        .virtual_storages
        .iter()
        .flat_map(|storage| &storage.nodes)
        .map(|node| rpc::Target {
            address: node.address.clone(),
            secret: node.token.clone(),
            storage: node.storage.clone(),
            relative_path: small_path.to_string(),
            refs: repositories.small_refs,
        })
        .collect();
    let proxy = rpc::Target {
        address: cluster.var("GITFLEET_GRPC_ADDR")?.to_owned(),
        secret: cluster.var("GITFLEET_TOKEN")?.to_owned(),
        storage: "default".to_owned(),
        relative_path: SMALL.to_owned(),
        refs: repositories.small_refs,
    };

    let daemon_small = dir.join("scratch/daemon-small.git");
    let path_small = dir.join("scratch/path-small.git");
    for copy in [&daemon_small, &path_small] {
        git.run(
            None,
            &["clone", "--quiet", "--bare", "--no-local"],
            &[&repositories.small, copy],
        )?;
    }
    let daemon = Daemon::start(git, dir)?;
    Ok(Setup {
        git,
        dir: dir.to_owned(),
        large_replica: storage_dir(&cluster.dir, 1).join(large_path.as_str()),
        small_replicas,
        daemon_small,
        path_small,
        scratch,
        cluster,
        daemon,
        large_url,
        small_url,
        proxy,
        nodes,
    })
}

/// The replica paths of the two repositories, once all three replicas hold them.
async fn replica_paths(config: &ProxyConfig) -> anyhow::Result<(RelativePath, RelativePath)> {
    let store =
        crate::store::Store::connect_lazy(&config.database.url, 2, Duration::from_secs(10))?;
    let virtual_storage = StorageName::parse("default")?;
    let mut paths = Vec::new();
    for path in [LARGE, SMALL] {
        let record = store
            .find_repository(&virtual_storage, &RelativePath::parse(path)?)
            .await?
            .with_context(|| format!("{path} is not in the catalog after its push"))?;
        let current = record
            .replicas
            .iter()
            .filter(|(_, generation)| *generation == record.generation)
            .count();
        ensure!(
            current == NODES,
            "{path} has {current} up-to-date replicas, not {NODES}"
        );
        paths.push(record.replica_path);
    }
    let small = paths.pop().expect("two");
    Ok((paths.pop().expect("two"), small))
}

fn fresh(path: &Path) -> anyhow::Result<PathBuf> {
    if path.exists() {
        std::fs::remove_dir_all(path).with_context(|| format!("removing {}", path.display()))?;
    }
    std::fs::create_dir_all(path)?;
    Ok(path.to_owned())
}

impl Setup<'_> {
    /// The daemon's URL of a path under the benchmark's directory.
    fn daemon_url(&self, path: &Path) -> anyhow::Result<String> {
        Ok(self.daemon.url(path.strip_prefix(&self.dir)?))
    }

    /// The three ways to read the large repository: the cluster, git daemon, and the path.
    pub fn read_ways(&self) -> anyhow::Result<[(&'static str, String); 3]> {
        Ok([
            ("gitfleet", self.large_url.clone()),
            ("daemon", self.daemon_url(&self.large_replica)?),
            ("path", self.large_replica.display().to_string()),
        ])
    }

    /// `count` clones of the small repository through the cluster, in the scratch directory
    /// as `NAME-0`, `NAME-1`, ...
    pub fn small_clones(&self, name: &str, count: usize) -> anyhow::Result<Vec<PathBuf>> {
        (0..count)
            .map(|index| {
                let work_tree = self.scratch.join(format!("{name}-{index}"));
                self.git
                    .run(None, &["clone", "--quiet", &self.small_url], &[&work_tree])?;
                Ok(work_tree)
            })
            .collect()
    }

    pub fn tip(&self, repository: &Path) -> anyhow::Result<String> {
        Ok(self
            .git
            .run(Some(repository), &["rev-parse", "refs/heads/main"], &[])?
            .trim()
            .to_owned())
    }
}

/// Three lists of seconds, one per way.
type Timings = [Vec<f64>; 3];

fn clones(setup: &Setup, runs: usize, repositories: &Repositories) -> anyhow::Result<Row> {
    let ways = setup.read_ways()?;
    let expected = setup.tip(&repositories.large)?;
    let mut seconds: Timings = Default::default();
    // The first round warms the page cache and is not counted.
    for run in 0..=runs {
        for (index, (way, url)) in ways.iter().enumerate() {
            let destination = setup.scratch.join(format!("clone-{way}.git"));
            let mut args = vec!["clone", "--quiet", "--bare"];
            if *way == "path" {
                // Through upload-pack and a pack, as a server would; not hard links.
                args.push("--no-local");
            }
            args.push(url);
            let took = setup.git.timed(None, &args, &[&destination])?;
            let tip = setup.tip(&destination)?;
            ensure!(
                tip == expected,
                "a clone from {way} ended at {tip}, not {expected}"
            );
            std::fs::remove_dir_all(&destination)?;
            if run > 0 {
                seconds[index].push(took);
            }
        }
        progress(format_args!(
            "clone of the large repository: {run}/{runs} runs ({})",
            last_of(&seconds, ["gitfleet", "daemon", "path"])
        ));
    }
    let [gitfleet, daemon, path] = seconds;
    Ok(Row::new("clone, large repository (--bare)", "s", &gitfleet)
        .against("git daemon", &daemon)
        .limit(&path)
        .target(Target::RatioAtMost(1.10)))
}

fn last_of(seconds: &Timings, ways: [&str; 3]) -> String {
    seconds
        .iter()
        .zip(ways)
        .filter_map(|(values, way)| Some(format!("{way} {:.2}s", values.last()?)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn fetches(setup: &Setup, runs: usize, repositories: &Repositories) -> anyhow::Result<Row> {
    let ways = setup.read_ways()?;
    let expected = setup.tip(&repositories.large)?;
    let mut seconds: Timings = Default::default();
    for run in 0..=runs {
        for (index, (way, url)) in ways.iter().enumerate() {
            // A repository one commit behind, sharing the pack by hard links.
            let destination = setup.scratch.join(format!("fetch-{way}.git"));
            setup.git.run(
                None,
                &["clone", "--quiet", "--bare", "--local"],
                &[&repositories.large_before, &destination],
            )?;
            let took = setup.git.timed(
                Some(&destination),
                &["fetch", "--quiet", url, "refs/heads/main:refs/heads/main"],
                &[],
            )?;
            let tip = setup.tip(&destination)?;
            ensure!(
                tip == expected,
                "a fetch from {way} ended at {tip}, not {expected}"
            );
            std::fs::remove_dir_all(&destination)?;
            if run > 0 {
                seconds[index].push(took);
            }
        }
    }
    progress(format_args!("fetch of one new commit: {runs} runs"));
    let [gitfleet, daemon, path] = seconds;
    Ok(Row::new("fetch, one new commit (3 files)", "s", &gitfleet)
        .against("git daemon", &daemon)
        .limit(&path))
}

fn pushes(setup: &Setup, runs: usize) -> anyhow::Result<Vec<Row>> {
    let ways = [
        ("gitfleet", setup.small_url.clone()),
        ("daemon", setup.daemon_url(&setup.daemon_small)?),
        ("path", setup.path_small.display().to_string()),
    ];
    let mut seconds: Timings = Default::default();
    // The whole machine's CPU time spent in the measured pushes, by way.
    let mut cpu = [0.0; 3];
    let mut work_trees = Vec::new();
    for (way, url) in &ways {
        let work_tree = setup.scratch.join(format!("push-{way}"));
        setup
            .git
            .run(None, &["clone", "--quiet", url], &[&work_tree])?;
        work_trees.push(work_tree);
    }
    for run in 0..=runs {
        for (index, work_tree) in work_trees.iter().enumerate() {
            std::fs::write(work_tree.join("pushed.txt"), format!("push {run}\n"))?;
            let git = setup.git;
            git.run(Some(work_tree), &["add", "pushed.txt"], &[])?;
            git.run(
                Some(work_tree),
                &["commit", "--quiet", "-m", &format!("push {run}")],
                &[],
            )?;
            let busy = busy_seconds();
            let took = git.timed(
                Some(work_tree),
                &["push", "--quiet", "origin", "HEAD:refs/heads/main"],
                &[],
            )?;
            if run > 0 {
                seconds[index].push(took);
                cpu[index] += busy_seconds() - busy;
            }
        }
    }
    // Every replica holds the last push.
    let pushed = setup
        .git
        .run(Some(&work_trees[0]), &["rev-parse", "HEAD"], &[])?;
    for replica in &setup.small_replicas {
        let tip = setup.tip(replica)?;
        if tip != pushed.trim() {
            bail!("{} is at {tip}, not at the last push", replica.display());
        }
    }
    progress(format_args!("push of one commit: {runs} runs"));
    let [gitfleet, daemon, path] = seconds;
    Ok(vec![
        Row::new("push, one commit (3 replicas)", "s", &gitfleet)
            .against("git daemon", &daemon)
            .limit(&path)
            .target(Target::RatioAtMost(1.5)),
        Row::new("push, one commit, against a local path", "s", &gitfleet)
            .against("local path", &path)
            .target(Target::RatioAtMost(2.0)),
        // What bounds the two above on a small machine: every process the push starts, on
        // every replica, and the client's, over the machine's cores.
        Row::new(
            "push, one commit: CPU time of the whole machine",
            "s",
            &[cpu[0] / runs as f64],
        )
        .against("local path", &[cpu[2] / runs as f64]),
    ])
}

/// The CPU time the whole machine has spent busy so far (every core, user and system), from
/// /proc/stat; 0 where it cannot be read.
fn busy_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return 0.0;
    };
    let Some(line) = stat.lines().find(|line| line.starts_with("cpu ")) else {
        return 0.0;
    };
    // user nice system idle iowait irq softirq steal: all but idle and iowait.
    let ticks: u64 = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .enumerate()
        .filter(|(index, _)| !matches!(index, 3 | 4))
        .filter_map(|(_, value)| value.parse::<u64>().ok())
        .sum();
    // /proc/stat counts in USER_HZ, which Linux fixes at 100 for user space.
    ticks as f64 / 100.0
}

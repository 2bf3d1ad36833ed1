//! The measurements, each way in turn within every run so that drift in the machine's speed
//! falls on all of them alike.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};

use super::generate::Repositories;
use super::git::Git;
use super::report::{Row, Target};
use super::rpc;
use super::servers::{CpuMeter, Daemon, DevCluster, RssSampler, rss_bytes};
use super::{Options, progress};
use crate::config::ProxyConfig;
use crate::model::{RelativePath, StorageName};

const LARGE: &str = "bench/large.git";
const SMALL: &str = "bench/small.git";
/// The storage whose replicas the baselines serve.
const STORAGE: &str = "storage-1";
const MIB: f64 = 1048576.0;

/// The servers, and where each serves the benchmark's repositories from.
struct Setup<'a> {
    git: &'a Git,
    dir: PathBuf,
    scratch: PathBuf,
    cluster: DevCluster,
    daemon: Daemon,
    /// The cluster's URLs of the large and small repositories (git over HTTP).
    large_url: String,
    small_url: String,
    /// Storage-1's replica of the large repository: what git daemon and --no-local read.
    large_replica: PathBuf,
    /// The small repository's copies that git daemon, and a push to a path, take pushes into.
    daemon_small: PathBuf,
    path_small: PathBuf,
    /// Every replica directory of the small repository, one per storage.
    small_replicas: Vec<PathBuf>,
    proxy: rpc::Target,
    node: rpc::Target,
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
    rows.push(pushes(&setup, options.runs * 2)?);
    rows.extend(accessors(&runtime, &setup, options)?);
    rows.extend(parallel_clones(
        &setup,
        options.parallel_clones,
        repositories,
    )?);
    let Setup {
        cluster,
        daemon,
        scratch,
        ..
    } = setup;
    daemon.stop();
    let cluster_dir = cluster.dir.clone();
    cluster.stop();
    // The replicas and the clones take room; the repositories and the cluster's log stay.
    for path in [cluster_dir, scratch] {
        std::fs::remove_dir_all(&path).with_context(|| format!("removing {}", path.display()))?;
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
    let cluster = DevCluster::start(&options.exe, &dir.join("cluster"), 3)?;
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
    let storage_dir = |storage: &str| {
        let index = storage.trim_start_matches("storage-");
        cluster.dir.join(format!("node-{index}"))
    };
    let small_replicas = (1..=3)
        .map(|index| storage_dir(&format!("storage-{index}")).join(small_path.as_str()))
        .collect();
    let node = config
        .virtual_storages
        .iter()
        .flat_map(|storage| &storage.nodes)
        .find(|node| node.storage == STORAGE)
        .context("the dev cluster has no storage-1")?;
    let proxy = rpc::Target {
        address: cluster.var("GITFLEET_GRPC_ADDR")?.to_owned(),
        secret: cluster.var("GITFLEET_TOKEN")?.to_owned(),
        storage: "default".to_owned(),
        relative_path: SMALL.to_owned(),
        refs: repositories.small_refs,
    };
    let node = rpc::Target {
        address: node.address.clone(),
        secret: node.token.clone(),
        storage: STORAGE.to_owned(),
        relative_path: small_path.to_string(),
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
        large_replica: storage_dir(STORAGE).join(large_path.as_str()),
        small_replicas,
        daemon_small,
        path_small,
        scratch,
        cluster,
        daemon,
        large_url,
        small_url,
        proxy,
        node,
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
            current == 3,
            "{path} has {current} up-to-date replicas, not 3"
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
    fn read_ways(&self) -> anyhow::Result<[(&'static str, String); 3]> {
        Ok([
            ("gitfleet", self.large_url.clone()),
            ("daemon", self.daemon_url(&self.large_replica)?),
            ("path", self.large_replica.display().to_string()),
        ])
    }

    fn tip(&self, repository: &Path) -> anyhow::Result<String> {
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
        .target(Target::AtMostTimes(1.10)))
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

fn pushes(setup: &Setup, runs: usize) -> anyhow::Result<Row> {
    let ways = [
        ("gitfleet", setup.small_url.clone()),
        ("daemon", setup.daemon_url(&setup.daemon_small)?),
        ("path", setup.path_small.display().to_string()),
    ];
    let mut seconds: Timings = Default::default();
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
            let took = git.timed(
                Some(work_tree),
                &["push", "--quiet", "origin", "HEAD:refs/heads/main"],
                &[],
            )?;
            if run > 0 {
                seconds[index].push(took);
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
    Ok(Row::new("push, one commit (3 replicas)", "s", &gitfleet)
        .against("git daemon", &daemon)
        .limit(&path)
        .target(Target::AtMostTimes(1.5)))
}

/// One accessor load through the proxy or straight to the node, with what it cost the proxy.
struct Measured {
    load: rpc::Load,
    proxy_cpu_cores: f64,
    proxy_peak_rss: u64,
    proxy_statements: f64,
}

fn measured_load(
    runtime: &tokio::runtime::Runtime,
    setup: &Setup,
    target: &rpc::Target,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<Measured> {
    let pid = setup.cluster.pid();
    let statements = setup.cluster.metric("gitfleet_proxy_db_statements_total")?;
    let cpu = CpuMeter::start(pid);
    let rss = RssSampler::start(pid);
    let started = Instant::now();
    let load = runtime.block_on(rpc::run(
        target,
        concurrency,
        Duration::from_millis(500),
        duration,
    ))?;
    let wall = started.elapsed().as_secs_f64();
    let measured = Measured {
        proxy_cpu_cores: cpu.seconds() / wall,
        proxy_peak_rss: rss.finish(),
        proxy_statements: setup.cluster.metric("gitfleet_proxy_db_statements_total")? - statements,
        load,
    };
    if measured.load.failures > 0 {
        bail!(
            "{} of the accessor calls to {} failed: {}",
            measured.load.failures,
            target.address,
            measured.load.first_failure.as_deref().unwrap_or("")
        );
    }
    Ok(measured)
}

fn accessors(
    runtime: &tokio::runtime::Runtime,
    setup: &Setup,
    options: &Options,
) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    for concurrency in [1, 64] {
        let mut proxy = Vec::new();
        let mut node = Vec::new();
        for run in 1..=options.rpc_runs {
            proxy.push(measured_load(
                runtime,
                setup,
                &setup.proxy,
                concurrency,
                options.rpc_duration,
            )?);
            node.push(measured_load(
                runtime,
                setup,
                &setup.node,
                concurrency,
                options.rpc_duration,
            )?);
            let (p, n) = (&proxy[run - 1].load, &node[run - 1].load);
            progress(format_args!(
                "ListRefs at concurrency {concurrency}: run {run}/{}: proxy p50 {:.2} ms, {:.0}/s; node p50 {:.2} ms, {:.0}/s",
                options.rpc_runs,
                p.quantile(0.5) * 1e3,
                p.per_second(),
                n.quantile(0.5) * 1e3,
                n.per_second(),
            ));
        }
        let figure = |runs: &[Measured], f: &dyn Fn(&Measured) -> f64| -> Vec<f64> {
            runs.iter().map(f).collect()
        };
        let p50 = |m: &Measured| m.load.quantile(0.5) * 1e3;
        let p99 = |m: &Measured| m.load.quantile(0.99) * 1e3;
        let rate = |m: &Measured| m.load.per_second();
        let label = format!("ListRefs (101 refs), concurrency {concurrency}");
        rows.push(
            Row::new(format!("{label}: p50"), "ms", &figure(&proxy, &p50))
                .against("node", &figure(&node, &p50))
                .target(Target::AtMostTimes(1.3)),
        );
        rows.push(
            Row::new(format!("{label}: p99"), "ms", &figure(&proxy, &p99))
                .against("node", &figure(&node, &p99)),
        );
        rows.push(
            Row::new(
                format!("{label}: calls a second"),
                "1/s",
                &figure(&proxy, &rate),
            )
            .against("node", &figure(&node, &rate))
            .target(Target::AtLeastTimes(0.8)),
        );
        // The proxy's statements while it serves, next to the same while it idles (during
        // the node's runs, as long), both per call served in the proxy's run. Its background
        // work (health checks, the write lock's poll) sends a few a second whatever it
        // serves; a statement per call would show as 1 or more.
        let per_call = |m: &Measured, statements: f64| statements / m.load.calls() as f64;
        let serving: Vec<f64> = proxy
            .iter()
            .map(|m| per_call(m, m.proxy_statements))
            .collect();
        let idle: Vec<f64> = proxy
            .iter()
            .zip(&node)
            .map(|(m, idle)| per_call(m, idle.proxy_statements))
            .collect();
        rows.push(
            Row::new(format!("{label}: database statements a call"), "", &serving)
                .against("proxy idle", &idle)
                .target(Target::AtMost(0.01)),
        );
        if concurrency == 64 {
            rows.push(Row::new(
                format!("{label}: proxy CPU"),
                "cores",
                &figure(&proxy, &|m| m.proxy_cpu_cores),
            ));
            rows.push(Row::new(
                format!("{label}: proxy CPU a call"),
                "us",
                &figure(&proxy, &|m| m.proxy_cpu_cores / m.load.per_second() * 1e6),
            ));
            rows.push(
                Row::new(
                    format!("{label}: proxy peak RSS"),
                    "MiB",
                    &figure(&proxy, &|m| m.proxy_peak_rss as f64 / MIB),
                )
                .target(Target::AtMost(200.0)),
            );
        }
    }
    Ok(rows)
}

/// `clones` clones of the large repository at once, through the proxy and from git daemon:
/// the wall time of all, and the proxy's peak memory while they stream.
fn parallel_clones(
    setup: &Setup,
    clones: usize,
    repositories: &Repositories,
) -> anyhow::Result<Vec<Row>> {
    let ways = setup.read_ways()?;
    let expected = setup.tip(&repositories.large)?;
    let pid = setup.cluster.pid();
    let idle_rss = rss_bytes(pid).unwrap_or(0) as f64 / MIB;
    let mut walls: [Vec<f64>; 2] = Default::default();
    let mut peaks = Vec::new();
    for run in 1..=2 {
        for (index, (way, url)) in ways.iter().take(2).enumerate() {
            let rss = RssSampler::start(pid);
            let started = Instant::now();
            let children = (0..clones)
                .map(|clone| {
                    let destination = setup.scratch.join(format!("parallel-{way}-{clone}.git"));
                    let child = setup
                        .git
                        .command(None)
                        .args(["clone", "--quiet", "--bare", url])
                        .arg(&destination)
                        .spawn()?;
                    Ok((child, destination))
                })
                .collect::<std::io::Result<Vec<_>>>()?;
            for (child, destination) in children {
                let output = child.wait_with_output()?;
                ensure!(
                    output.status.success(),
                    "a parallel clone from {way} failed: {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                );
                let tip = setup.tip(&destination)?;
                ensure!(tip == expected, "a clone from {way} ended at {tip}");
                std::fs::remove_dir_all(&destination)?;
            }
            walls[index].push(started.elapsed().as_secs_f64());
            let peak = rss.finish() as f64 / MIB;
            if *way == "gitfleet" {
                peaks.push(peak);
            }
        }
        progress(format_args!(
            "{clones} clones at once: run {run}/2 (gitfleet {:.1}s, peak RSS {:.0} MiB; git daemon {:.1}s)",
            walls[0][run - 1],
            peaks[run - 1],
            walls[1][run - 1]
        ));
    }
    let [gitfleet, daemon] = walls;
    Ok(vec![
        Row::new(
            format!("{clones} clones of the large repository at once"),
            "s",
            &gitfleet,
        )
        .against("git daemon", &daemon),
        Row::new(
            format!("proxy peak RSS during the {clones} clones"),
            "MiB",
            &peaks,
        )
        .target(Target::AtMost(200.0)),
        Row::new("proxy RSS before them", "MiB", &[idle_rss]),
    ])
}

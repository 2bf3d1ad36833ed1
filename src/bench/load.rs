//! Load on the proxy: accessor calls at concurrency 1 and 64 beside the same calls straight to
//! the nodes, and several large clones at once; with what they cost the proxy's process.

use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure};

use super::generate::Repositories;
use super::measure::Setup;
use super::report::{Row, Target};
use super::rpc;
use super::servers::{CpuMeter, RssSampler, rss_bytes};
use super::{Options, progress};

const MIB: f64 = 1048576.0;
pub(super) const WARMUP: Duration = Duration::from_millis(500);
/// The accessor loads' concurrency levels.
pub(super) const CONCURRENCY: [usize; 2] = [1, 64];
const STATEMENTS: &str = "gitfleet_proxy_db_statements_total";
/// Runs of the parallel clones: each streams the whole large repository several times over.
const PARALLEL_RUNS: usize = 2;

/// One accessor load, with what it cost the proxy's process over the whole load (connecting,
/// warm-up and the calls finishing after the window included).
struct Measured {
    load: rpc::Load,
    proxy_cpu_seconds: f64,
    wall_seconds: f64,
    proxy_peak_rss: u64,
    proxy_statements: f64,
}

fn measured_load(
    runtime: &tokio::runtime::Runtime,
    setup: &Setup,
    targets: &[rpc::Target],
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<Measured> {
    let pid = setup.cluster.pid();
    let statements = setup.cluster.metric(STATEMENTS)?;
    let cpu = CpuMeter::start(pid);
    let rss = RssSampler::start(pid);
    let started = Instant::now();
    let load = runtime.block_on(rpc::run(targets, concurrency, WARMUP, duration))?;
    let measured = Measured {
        wall_seconds: started.elapsed().as_secs_f64(),
        proxy_cpu_seconds: cpu.seconds(),
        proxy_peak_rss: rss.finish(),
        proxy_statements: setup.cluster.metric(STATEMENTS)? - statements,
        load,
    };
    if measured.load.failures > 0 {
        bail!(
            "{} of the accessor calls to {} failed: {}",
            measured.load.failures,
            targets[0].address,
            measured.load.first_failure.as_deref().unwrap_or("")
        );
    }
    Ok(measured)
}

/// ListRefs through the proxy, and straight to the nodes (spread over them as the proxy
/// spreads its reads), at concurrency 1 and 64.
pub(super) fn accessors(
    runtime: &tokio::runtime::Runtime,
    setup: &Setup,
    options: &Options,
) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    for concurrency in CONCURRENCY {
        let mut proxy = Vec::new();
        let mut nodes = Vec::new();
        for run in 1..=options.rpc_runs {
            proxy.push(measured_load(
                runtime,
                setup,
                std::slice::from_ref(&setup.proxy),
                concurrency,
                options.rpc_duration,
            )?);
            nodes.push(measured_load(
                runtime,
                setup,
                &setup.nodes,
                concurrency,
                options.rpc_duration,
            )?);
            let (through, straight) = (&proxy[run - 1].load, &nodes[run - 1].load);
            progress(format_args!(
                "ListRefs at concurrency {concurrency}: run {run}/{}: proxy p50 {:.2} ms, {:.0}/s; nodes p50 {:.2} ms, {:.0}/s",
                options.rpc_runs,
                through.quantile(0.5) * 1e3,
                through.per_second(),
                straight.quantile(0.5) * 1e3,
                straight.per_second(),
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
                .against("nodes", &figure(&nodes, &p50))
                .target(Target::RatioAtMost(1.3)),
        );
        rows.push(
            Row::new(format!("{label}: p99"), "ms", &figure(&proxy, &p99))
                .against("nodes", &figure(&nodes, &p99)),
        );
        rows.push(
            Row::new(
                format!("{label}: calls a second"),
                "1/s",
                &figure(&proxy, &rate),
            )
            .against("nodes", &figure(&nodes, &rate))
            .target(Target::RatioAtLeast(0.8)),
        );
        // The proxy's statements while it serves, less those of its background work (the write
        // lock's poll) over as long a time with no calls (the nodes' run), per call made. A
        // statement per call would show as 1 or more.
        let excess: Vec<f64> = proxy
            .iter()
            .zip(&nodes)
            .map(|(serving, idle)| {
                let idle = idle.proxy_statements * serving.wall_seconds / idle.wall_seconds;
                (serving.proxy_statements - idle) / serving.load.all_calls as f64
            })
            .collect();
        rows.push(
            Row::new(format!("{label}: database statements a call"), "", &excess)
                .target(Target::ValueAtMost(0.01)),
        );
        if concurrency == 64 {
            rows.push(Row::new(
                format!("{label}: proxy CPU"),
                "cores",
                &figure(&proxy, &|m| m.proxy_cpu_seconds / m.wall_seconds),
            ));
            rows.push(Row::new(
                format!("{label}: proxy CPU a call"),
                "us",
                &figure(&proxy, &|m| {
                    m.proxy_cpu_seconds / m.load.all_calls as f64 * 1e6
                }),
            ));
            rows.push(
                Row::new(
                    format!("{label}: proxy peak RSS"),
                    "MiB",
                    &figure(&proxy, &|m| m.proxy_peak_rss as f64 / MIB),
                )
                .target(Target::ValueAtMost(200.0)),
            );
        }
    }
    Ok(rows)
}

/// Clones running at once; those still running when it is dropped (one failed) are killed.
struct Clones(Vec<(Child, PathBuf)>);

impl Drop for Clones {
    fn drop(&mut self) {
        for (child, _) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `clones` clones of the large repository at once, through the proxy and from git daemon:
/// the wall time of all, and the proxy's peak memory while they stream.
pub(super) fn parallel_clones(
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
    for run in 1..=PARALLEL_RUNS {
        for (index, (way, url)) in ways.iter().take(2).enumerate() {
            let rss = RssSampler::start(pid);
            let started = Instant::now();
            let mut running = Clones(Vec::new());
            for clone in 0..clones {
                let destination = setup.scratch.join(format!("parallel-{way}-{clone}.git"));
                let child = setup
                    .git
                    .command(None)
                    .args(["clone", "--quiet", "--bare", url])
                    .arg(&destination)
                    .spawn()?;
                running.0.push((child, destination));
            }
            while let Some((child, destination)) = running.0.pop() {
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
            "{clones} clones at once: run {run}/{PARALLEL_RUNS} (gitfleet {:.1}s, proxy peak RSS {:.0} MiB; git daemon {:.1}s)",
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
        .target(Target::ValueAtMost(200.0)),
        Row::new("proxy RSS before them", "MiB", &[idle_rss]),
    ])
}

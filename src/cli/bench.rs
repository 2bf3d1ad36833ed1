use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;

use crate::bench::{Options, Shape};

#[derive(Debug, clap::Args)]
#[command(
    after_help = "What it measures, each next to a baseline from the same run:\n  \
1. a clone of the large repository: through the cluster's git over HTTP (3 replicas), from \
git daemon serving one replica's directory, and with git clone --no-local from that \
directory (the physical limit);\n  \
2. a fetch of one new commit, the same three ways;\n  \
3. a push of one commit to 3 replicas, against a push to git daemon and one to a bare \
repository by its path;\n  \
4. a push of one commit into repositories with many refs (--many-refs), against a push to \
a bare repository by its path with the same refs;\n  \
5. pushes a second on one repository, 8 writers on branches of their own, with how long \
those pushes held the repository's write lease (p50, p99);\n  \
6. a busy repository: 4 writers push without a break, one replica is made to miss writes, \
and the time until it is up to date again is measured while they go on, with the longest \
push meanwhile against the longest before;\n  \
7. ListRefs of a repository with 101 refs at concurrency 1 and 64, through the proxy and \
straight to a node: p50, p99, calls a second, the proxy's database statements, CPU and \
memory;\n  \
8. the proxy's memory while several clones of the large repository stream at once.\n\n\
Build it with --release first: a debug build's figures say little. The repositories are \
kept in DIR/repos (about 250 MiB) and reused by the next run of the same shape; the cluster \
is made anew each time and removed at the end, its log kept in DIR/cluster.log. The whole \
run takes about 3.5 minutes on 2 cores."
)]
pub struct BenchArgs {
    /// Where the repositories, the cluster and the scratch clones go.
    #[arg(long, default_value_os_t = default_dir())]
    dir: PathBuf,
    /// Where the results go, as JSON.
    #[arg(long, default_value = "gitfleet-bench.json")]
    json: PathBuf,
    /// Commits of the large repository.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(2..=1_000_000))]
    commits: u32,
    /// Files of the large repository.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(3..=1_000_000))]
    files: u32,
    /// The large repository's pack size, roughly, in MiB.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pack_mib: u32,
    /// Runs of each clone and fetch (pushes get twice as many); one more warms up first.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    runs: u32,
    /// Runs of each accessor load.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    rpc_runs: u32,
    /// How long each accessor load lasts, after half a second of warm-up.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    rpc_duration: Duration,
    /// Clones of the large repository at once, for the proxy's memory.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=64))]
    parallel_clones: u32,
    /// The ref counts of the repositories a one-commit push goes into, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_values_t = [10_000u32, 100_000],
        value_parser = clap::value_parser!(u32).range(1..=1_000_000)
    )]
    many_refs: Vec<u32>,
}

/// Under /var/tmp, which the cluster's PostgreSQL (another user, when run as root) can reach.
fn default_dir() -> PathBuf {
    PathBuf::from(format!("/var/tmp/gitfleet-bench-{}", super::user_name()))
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    crate::bench::run(Options {
        dir: args.dir,
        json: args.json,
        shape: Shape {
            commits: args.commits as usize,
            files: args.files as usize,
            pack_mib: args.pack_mib as usize,
        },
        runs: args.runs as usize,
        rpc_runs: args.rpc_runs as usize,
        rpc_duration: args.rpc_duration,
        parallel_clones: args.parallel_clones as usize,
        many_refs: args.many_refs.iter().map(|&count| count as usize).collect(),
        exe: std::env::current_exe().context("finding the gitfleet binary")?,
    })
}

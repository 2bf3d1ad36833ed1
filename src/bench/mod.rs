//! `gitfleet bench`: what the proxy costs next to a single git server. It makes its own
//! repositories, starts a `gitfleet dev` cluster (3 nodes) and a plain `git daemon` on the same
//! machine, and measures clones, fetches, pushes and accessor calls each way in one run.

mod converge;
mod generate;
mod git;
mod load;
mod many_refs;
mod measure;
mod report;
mod rpc;
mod servers;
mod throughput;

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::Context as _;

pub use generate::Shape;

/// What `gitfleet bench` was asked for.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where everything goes; `dir/repos` is kept and reused by the next run of the same shape.
    pub dir: PathBuf,
    pub json: PathBuf,
    pub shape: Shape,
    /// Runs of each git measurement.
    pub runs: usize,
    /// Runs of each accessor load, and how long each lasts.
    pub rpc_runs: usize,
    pub rpc_duration: Duration,
    /// Clones of the large repository at once, for the proxy's memory.
    pub parallel_clones: usize,
    /// The ref counts of the repositories a one-commit push goes into.
    pub many_refs: Vec<usize>,
    /// The gitfleet binary that runs the cluster.
    pub exe: PathBuf,
}

/// A progress line on stderr, with the time since the benchmark started.
pub fn progress(line: std::fmt::Arguments<'_>) {
    static START: OnceLock<Instant> = OnceLock::new();
    let elapsed = START.get_or_init(Instant::now).elapsed().as_secs();
    crate::toolkit::say(
        true,
        format_args!("[{:02}:{:02}] {line}", elapsed / 60, elapsed % 60),
    );
}

/// The machine the figures come from.
#[derive(Debug, serde::Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub memory_gib: f64,
    pub kernel: String,
    pub git: String,
    pub build: &'static str,
}

impl Machine {
    fn read(git: &git::Git) -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_kib: f64 = meminfo
            .lines()
            .find_map(|line| line.strip_prefix("MemTotal:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0.0);
        Self {
            cpus: std::thread::available_parallelism().map_or(1, usize::from),
            cpu_model: cpuinfo
                .lines()
                .find_map(|line| line.strip_prefix("model name"))
                .map(|value| value.trim_start_matches([' ', '\t', ':']).to_owned())
                .unwrap_or_default(),
            memory_gib: (memory_kib / f64::from(1 << 20) * 10.0).round() / 10.0,
            kernel: nix::sys::utsname::uname()
                .map(|uname| uname.release().to_string_lossy().into_owned())
                .unwrap_or_default(),
            git: git
                .run(None, &["version"], &[])
                .map(|version| version.trim().to_owned())
                .unwrap_or_default(),
            build: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
        }
    }
}

/// Everything a run found, as written to the JSON file.
#[derive(Debug, serde::Serialize)]
struct Results {
    gitfleet: &'static str,
    /// When the run started, RFC 3339.
    started_at: String,
    machine: Machine,
    repositories: generate::Repositories,
    runs: usize,
    rpc_runs: usize,
    rpc_seconds: f64,
    rpc_warmup_seconds: f64,
    rpc_concurrency: [usize; 2],
    parallel_clones: usize,
    rows: Vec<report::Row>,
    seconds: f64,
}

pub fn run(options: Options) -> anyhow::Result<()> {
    let started = Instant::now();
    let started_at = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    progress(format_args!("gitfleet bench in {}", options.dir.display()));
    std::fs::create_dir_all(&options.dir)
        .with_context(|| format!("creating {}", options.dir.display()))?;
    let dir = options.dir.canonicalize()?;
    let git = git::Git::new(dir.join("home"))?;
    let machine = Machine::read(&git);
    if machine.build == "debug" {
        progress(format_args!(
            "warning: this gitfleet is a debug build; its figures say little (build with --release)"
        ));
    }
    let repositories = generate::prepare(&git, &dir.join("repos"), options.shape)?;
    let rows = measure::all(&options, &dir, &git, &repositories)?;
    let table = report::table(&rows);
    let results = Results {
        gitfleet: env!("CARGO_PKG_VERSION"),
        started_at,
        machine,
        repositories,
        runs: options.runs,
        rpc_runs: options.rpc_runs,
        rpc_seconds: options.rpc_duration.as_secs_f64(),
        rpc_warmup_seconds: load::WARMUP.as_secs_f64(),
        rpc_concurrency: load::CONCURRENCY,
        parallel_clones: options.parallel_clones,
        rows,
        seconds: started.elapsed().as_secs_f64(),
    };
    std::fs::write(&options.json, serde_json::to_vec_pretty(&results)?)
        .with_context(|| format!("writing {}", options.json.display()))?;
    progress(format_args!(
        "done in {:.0?}; results in {}",
        started.elapsed(),
        options.json.display()
    ));
    crate::toolkit::say(
        false,
        format_args!(
            "{} cores ({}), {} GiB, Linux {}, {}, gitfleet {} ({} build)\n\
             large repository: {} commits, {} files, pack {:.1} MiB; small: {} refs\n\n{table}",
            results.machine.cpus,
            results.machine.cpu_model,
            results.machine.memory_gib,
            results.machine.kernel,
            results.machine.git,
            results.gitfleet,
            results.machine.build,
            results.repositories.large_commits,
            results.repositories.large_files,
            results.repositories.large_pack_bytes as f64 / f64::from(1 << 20),
            results.repositories.small_refs,
        ),
    );
    Ok(())
}

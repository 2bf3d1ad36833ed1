//! What the benchmark serves from: a `gitfleet dev` cluster in a child process, and a plain
//! `git daemon` beside it; and the figures of a process read from /proc.

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::git::Git;
use crate::dev::cluster::{die_with_parent, read_env, stop_children};

/// SIGTERM, then SIGKILL after `grace`.
fn terminate(child: &mut Child, grace: Duration) {
    stop_children(&mut [child], grace);
}

/// How long `gitfleet dev` may take to say it is ready.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// A `gitfleet dev` cluster: PostgreSQL and the nodes are its children, the proxy (and an
/// idle worker) run in its own process, which is the one measured.
pub struct DevCluster {
    child: Child,
    pub dir: PathBuf,
    /// `DIR/env`, as KEY → value.
    pub env: HashMap<String, String>,
}

impl DevCluster {
    pub fn start(exe: &Path, dir: &Path, nodes: usize) -> anyhow::Result<Self> {
        if dir.exists() {
            std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        std::fs::create_dir_all(dir)?;
        let log = std::fs::File::create(dir.with_extension("log"))?;
        let mut command = Command::new(exe);
        command
            .arg("dev")
            .arg("--dir")
            .arg(dir)
            .args(["--nodes", &nodes.to_string()])
            .args([
                "--grpc-listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
            ])
            // What is measured is the default configuration at the default log level, whatever
            // the operator's shell says.
            .env("GITFLEET_LOG", "info")
            .env_remove("GITFLEET_LOG_FORMAT")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("GITFLEET__") {
                command.env_remove(key);
            }
        }
        die_with_parent(&mut command);
        let mut child = command.spawn().context("starting gitfleet dev")?;
        let stdout = child.stdout.take().expect("piped");
        // Its stdout is read in a thread, so a start that hangs is given up on.
        let (ready, waiting) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut said_ready = false;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if !said_ready && line.trim() == "gitfleet dev: ready" {
                    said_ready = true;
                    let _ = ready.send(());
                }
            }
        });
        if waiting.recv_timeout(READY_TIMEOUT).is_err() {
            terminate(&mut child, Duration::from_secs(5));
            bail!(
                "gitfleet dev was not ready within {READY_TIMEOUT:?}: see {}",
                dir.with_extension("log").display()
            );
        }
        let env = read_env(dir)?;
        Ok(Self {
            child,
            dir: dir.to_owned(),
            env,
        })
    }

    pub fn var(&self, key: &str) -> anyhow::Result<&str> {
        self.env
            .get(key)
            .map(String::as_str)
            .with_context(|| format!("{key} is missing from the dev cluster's env"))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The proxy's HTTP address, such as 127.0.0.1:8080.
    pub fn http_address(&self) -> anyhow::Result<String> {
        let url = self.var("GITFLEET_HTTP_URL")?;
        url.rsplit_once('@')
            .map(|(_, address)| address.to_owned())
            .context("GITFLEET_HTTP_URL has no address")
    }

    /// One counter from the proxy's /metrics.
    pub fn metric(&self, name: &str) -> anyhow::Result<f64> {
        self.scrape()?
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|value| value.trim().parse().ok())
            .with_context(|| format!("{name} is not in the proxy's /metrics"))
    }

    /// The proxy's /metrics, whole.
    pub fn scrape(&self) -> anyhow::Result<String> {
        let address = self.http_address()?;
        let mut stream = std::net::TcpStream::connect(&address)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            stream,
            "GET /metrics HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
        )?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response)
    }

    /// The proxy drains, then the nodes and PostgreSQL stop.
    pub fn stop(self) {
        drop(self);
    }
}

impl Drop for DevCluster {
    fn drop(&mut self) {
        terminate(&mut self.child, Duration::from_secs(60));
    }
}

/// `git daemon` serving every repository under `base`, receive-pack enabled.
pub struct Daemon {
    child: Child,
    pub port: u16,
}

impl Daemon {
    pub fn start(git: &Git, base: &Path) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut command = git.command(None);
        command
            .arg("daemon")
            .args(["--reuseaddr", "--listen=127.0.0.1", "--export-all"])
            // Its default of 32 would refuse the parallel clones past that.
            .arg("--max-connections=0")
            .arg(format!("--port={port}"))
            .arg("--enable=receive-pack")
            .arg("--informative-errors")
            .arg(format!("--base-path={}", base.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        die_with_parent(&mut command);
        let mut child = command.spawn().context("starting git daemon")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline || matches!(child.try_wait(), Ok(Some(_))) {
                terminate(&mut child, Duration::from_secs(1));
                bail!("git daemon did not start on port {port}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Self { child, port })
    }

    /// The git:// URL of `path`, which lies under the daemon's base.
    pub fn url(&self, relative: &Path) -> String {
        format!("git://127.0.0.1:{}/{}", self.port, relative.display())
    }

    pub fn stop(self) {
        drop(self);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        terminate(&mut self.child, Duration::from_secs(5));
    }
}

/// A process's user and system CPU time in clock ticks, from /proc/PID/stat.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: fields follow the last ')',
    // starting with the third (state); utime and stime are the 14th and 15th.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(field(14)? + field(15)?)
}

/// Clock ticks a second, for [`cpu_ticks`].
fn ticks_per_second() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |ticks| ticks as f64)
}

/// A line of /proc/PID/status in bytes, such as `VmRSS` or `VmHWM`.
fn status_bytes(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// A process's resident memory now, in bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    status_bytes(pid, "VmRSS")
}

/// A process's peak resident memory over a stretch of time. The kernel's own peak (VmHWM) is
/// reset at the start, where it allows it; a reading every 20 ms backs it up.
pub struct RssSampler {
    pid: u32,
    kernel_peak: bool,
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    pub fn start(pid: u32) -> Self {
        let kernel_peak = std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok();
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(rss_bytes(pid).unwrap_or(0)));
        let thread = std::thread::spawn({
            let (stop, peak) = (stop.clone(), peak.clone());
            move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(rss) = rss_bytes(pid) {
                        peak.fetch_max(rss, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        });
        Self {
            pid,
            kernel_peak,
            stop,
            peak,
            thread: Some(thread),
        }
    }

    /// The highest resident memory seen, in bytes.
    pub fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let sampled = self.peak.load(Ordering::Relaxed);
        match self.kernel_peak.then(|| status_bytes(self.pid, "VmHWM")) {
            Some(Some(kernel)) => kernel.max(sampled),
            _ => sampled,
        }
    }
}

/// CPU seconds a process used between two readings.
pub struct CpuMeter {
    pid: u32,
    ticks: u64,
}

impl CpuMeter {
    pub fn start(pid: u32) -> Self {
        Self {
            pid,
            ticks: cpu_ticks(pid).unwrap_or(0),
        }
    }

    pub fn seconds(&self) -> f64 {
        let now = cpu_ticks(self.pid).unwrap_or(self.ticks);
        now.saturating_sub(self.ticks) as f64 / ticks_per_second()
    }
}

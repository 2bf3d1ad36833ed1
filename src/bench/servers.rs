//! What the benchmark serves from: a `gitfleet dev` cluster in a child process, and a plain
//! `git daemon` beside it; and the figures of a process read from /proc.

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::git::Git;

/// Kills the child when this process dies, so an interrupted benchmark leaves nothing running.
fn die_with_parent(command: &mut Command) {
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
                .map_err(std::io::Error::from)
        });
    }
}

/// SIGTERM, then SIGKILL after `grace`; nothing for a child already reaped.
fn terminate(child: &mut Child, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

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
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        die_with_parent(&mut command);
        let mut child = command.spawn().context("starting gitfleet dev")?;
        let stdout = child.stdout.take().expect("piped");
        let mut lines = BufReader::new(stdout).lines();
        loop {
            match lines.next() {
                Some(Ok(line)) if line.trim() == "gitfleet dev: ready" => break,
                Some(Ok(_)) => {}
                _ => {
                    terminate(&mut child, Duration::from_secs(5));
                    bail!(
                        "gitfleet dev did not start: see {}",
                        dir.with_extension("log").display()
                    );
                }
            }
        }
        // The rest of its output is not read; it says nothing more on stdout.
        std::thread::spawn(move || lines.for_each(drop));
        let env = std::fs::read_to_string(dir.join("env"))?
            .lines()
            .filter_map(|line| line.strip_prefix("export "))
            .filter_map(|line| line.split_once('='))
            .map(|(key, value)| (key.to_owned(), value.trim_matches('\'').to_owned()))
            .collect();
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

    /// The node processes: storage name → pid.
    pub fn nodes(&self) -> HashMap<String, u32> {
        let mut nodes = HashMap::new();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return nodes;
        };
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let Some(stat) = ProcessStat::read(pid) else {
                continue;
            };
            if stat.parent != self.pid() {
                continue;
            }
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            if let Some(index) = cmdline.split('\0').find_map(|arg| {
                arg.rsplit('/')
                    .next()?
                    .strip_prefix("node-")?
                    .strip_suffix(".toml")
            }) {
                nodes.insert(format!("storage-{index}"), pid);
            }
        }
        nodes
    }

    /// One counter from the proxy's /metrics.
    pub fn metric(&self, name: &str) -> anyhow::Result<f64> {
        let address = self.http_address()?;
        let mut stream = std::net::TcpStream::connect(&address)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            stream,
            "GET /metrics HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
        )?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        response
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|value| value.trim().parse().ok())
            .with_context(|| format!("{name} is not in the proxy's /metrics"))
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

/// What /proc/PID/stat tells of a process.
#[derive(Debug, Clone, Copy)]
pub struct ProcessStat {
    pub parent: u32,
    /// User and system CPU time, in clock ticks.
    pub cpu_ticks: u64,
}

impl ProcessStat {
    pub fn read(pid: u32) -> Option<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name is in parentheses and may hold spaces: fields follow the last ')'.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
        Some(Self {
            parent: field(4)? as u32,
            cpu_ticks: field(14)? + field(15)?,
        })
    }
}

/// Clock ticks a second, for [`ProcessStat::cpu_ticks`].
pub fn ticks_per_second() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |ticks| ticks as f64)
}

/// A process's resident memory in bytes, from /proc/PID/status.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Samples a process's resident memory every 20 ms, in a thread, until stopped; keeps the peak.
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    pub fn start(pid: u32) -> Self {
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
        self.peak.load(Ordering::Relaxed)
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
            ticks: ProcessStat::read(pid).map_or(0, |stat| stat.cpu_ticks),
        }
    }

    pub fn seconds(&self) -> f64 {
        let now = ProcessStat::read(self.pid).map_or(self.ticks, |stat| stat.cpu_ticks);
        now.saturating_sub(self.ticks) as f64 / ticks_per_second()
    }
}

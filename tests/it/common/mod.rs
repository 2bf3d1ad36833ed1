//! Test support: real `gitfleet node` processes on 127.0.0.1:0, real git, real sockets.

#![allow(dead_code)]

pub mod cluster;
pub mod db;
pub mod fleet;
pub mod http;
pub mod http_front;
pub mod stall;
pub mod worker;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use gitfleet::auth::Signer;
use gitfleet::client::AuthedChannel;
use gitfleet::proto::RepositoryHeader;
use tempfile::TempDir;

pub const TOKEN: &str = "test-secret-0123456789";
pub const BINARY: &str = env!("CARGO_BIN_EXE_gitfleet");

/// A running `gitfleet node`, killed when dropped.
pub struct NodeProcess {
    pub child: Child,
    pub address: String,
    pub port: u16,
    pub dir: TempDir,
}

pub struct NodeOptions {
    pub storages: Vec<&'static str>,
    pub extra_config: String,
}

impl Default for NodeOptions {
    fn default() -> Self {
        Self {
            storages: vec!["s1"],
            extra_config: String::new(),
        }
    }
}

impl NodeProcess {
    pub fn start() -> Self {
        Self::start_with(NodeOptions::default())
    }

    pub fn start_with(options: NodeOptions) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = format!(
            "listen = \"127.0.0.1:0\"\n{}\n[auth]\ntoken = \"{TOKEN}\"\n",
            options.extra_config
        );
        for storage in &options.storages {
            config.push_str(&format!(
                "[[storages]]\nname = \"{storage}\"\npath = \"{}\"\n",
                dir.path().join(storage).display()
            ));
        }
        let config_path = dir.path().join("node.toml");
        std::fs::write(&config_path, config).unwrap();
        Self::spawn(dir, &config_path)
    }

    /// Starts a node from a config file, keeping `dir` alive as long as the node.
    pub fn spawn(dir: TempDir, config_path: &Path) -> Self {
        let (child, address) = spawn_node(config_path);
        let port = address.rsplit(':').next().unwrap().parse().unwrap();
        Self {
            child,
            address: format!("http://{address}"),
            port,
            dir,
        }
    }

    pub fn storage_path(&self, storage: &str) -> PathBuf {
        self.dir.path().join(storage)
    }

    pub fn repo_path(&self, storage: &str, relative_path: &str) -> PathBuf {
        self.storage_path(storage).join(relative_path)
    }

    pub async fn channel(&self) -> AuthedChannel {
        gitfleet::client::connect(&self.address, Signer::from_secret(TOKEN))
            .await
            .unwrap()
    }

    /// URL for real git through `gitfleet bridge ssh` (see [`bridge_env`]).
    pub fn ssh_url(&self, storage: &str, relative_path: &str) -> String {
        format!("ssh://127.0.0.1:{}/{storage}/{relative_path}", self.port)
    }

    /// URL for real git through the ext:: transport.
    pub fn ext_url(&self, storage: &str, relative_path: &str) -> String {
        format!(
            "ext::{BINARY} bridge connect --address {} %S {storage}/{relative_path}",
            self.address
        )
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the node (SIGKILL) and keeps its storages on disk.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the node again on the same port, with the same storages.
    pub fn restart(&mut self) {
        self.restart_with("");
    }

    /// Starts the node again on the same port, with the same storages, and `extra` added to
    /// its config.
    pub fn restart_with(&mut self, extra: &str) {
        self.kill();
        let config_path = self.dir.path().join("node.toml");
        let config = std::fs::read_to_string(&config_path).unwrap().replace(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"127.0.0.1:{}\"\n{extra}", self.port),
        );
        std::fs::write(&config_path, config).unwrap();
        let (child, _) = spawn_node(&config_path);
        self.child = child;
    }
}

/// Starts `gitfleet node` and waits for the address it listens on.
fn spawn_node(config_path: &Path) -> (Child, String) {
    let mut command = Command::new(BINARY);
    command
        .args(["node", "--config"])
        .arg(config_path)
        .env("GITFLEET_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    // A test process that is killed takes its nodes with it.
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, || {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
    let mut child = command.spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let Some(address) = line.trim().strip_prefix("gitfleet node: listening on ") else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("node did not start: {line:?}");
    };
    let address = address.to_owned();
    (child, address)
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn header(storage: &str, relative_path: &str) -> Option<RepositoryHeader> {
    Some(RepositoryHeader {
        storage: storage.into(),
        relative_path: relative_path.into(),
    })
}

/// Creates `s1/RELATIVE_PATH` on `node` over gRPC.
pub async fn create_repository(node: &NodeProcess, relative_path: &str, default_branch: &str) {
    gitfleet::proto::repository_service_client::RepositoryServiceClient::new(node.channel().await)
        .create_repository(gitfleet::proto::CreateRepositoryRequest {
            repository: header("s1", relative_path),
            default_branch: default_branch.into(),
        })
        .await
        .unwrap();
}

/// Creates `s1/repo.git` on `node` and pushes `refs` of the [`make_history`] work tree it
/// returns.
pub async fn push_history(node: &NodeProcess, refs: &[&str]) -> TempDir {
    create_repository(node, "repo.git", "main").await;
    let work = tempfile::tempdir().unwrap();
    make_history(work.path());
    let url = node.ssh_url("s1", "repo.git");
    let mut args = vec!["push", "-q", url.as_str()];
    args.extend_from_slice(refs);
    run_git(work.path(), &args);
    work
}

/// Commits 24 MB of incompressible data in `work` and pushes main to `s1/repo.git`, so that
/// moving the repository takes long enough to interrupt.
pub fn push_noise(node: &NodeProcess, work: &Path) {
    let noise: Vec<u8> = (0..24_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(work.join("noise.bin"), noise).unwrap();
    run_git(work, &["add", "noise.bin"]);
    run_git(work, &["commit", "-q", "-m", "noise"]);
    run_git(
        work,
        &["push", "-q", &node.ssh_url("s1", "repo.git"), "main"],
    );
}

/// Clones `url` into `dir/name` with git's protocol `version` ("0" or "2") and packet tracing;
/// panics if the clone fails. Returns the clone and the packet trace.
pub fn clone_traced(dir: &Path, url: &str, version: &str, name: &str) -> (PathBuf, String) {
    let output = git(dir)
        .args([
            "-c",
            &format!("protocol.version={version}"),
            "clone",
            "-q",
            url,
            name,
        ])
        .env("GIT_TRACE_PACKET", "1")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    (
        dir.join(name),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A git command with a clean environment that uses the bridge as its ssh command.
pub fn git(dir: &Path) -> Command {
    let mut command = Command::new("git");
    command
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "A U Thor")
        .env("GIT_AUTHOR_EMAIL", "author@example.com")
        .env("GIT_COMMITTER_NAME", "C O Mitter")
        .env("GIT_COMMITTER_EMAIL", "committer@example.com")
        .env("GIT_SSH_COMMAND", format!("{BINARY} bridge ssh"))
        .env("GIT_SSH_VARIANT", "ssh")
        .env("GITFLEET_TOKEN", TOKEN)
        .env_remove("GITFLEET_ADDRESS")
        .env_remove("GITFLEET_SIGNED_TOKEN")
        .args([
            "-c",
            "protocol.ext.allow=always",
            "-c",
            "init.defaultBranch=main",
        ]);
    command
}

/// Runs git and returns stdout, panicking with stderr when it fails.
pub fn run_git(dir: &Path, args: &[&str]) -> String {
    let output = git(dir).args(args).output().unwrap();
    assert!(
        output.status.success(),
        "git {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Runs git and returns the whole output, successful or not.
pub fn try_git(dir: &Path, args: &[&str]) -> Output {
    git(dir).args(args).output().unwrap()
}

/// A working tree with a small history: main (3 commits, a nested file, an executable),
/// a feature branch, a lightweight and an annotated tag.
pub fn make_history(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    run_git(dir, &["init", "-q"]);
    std::fs::write(dir.join("README.md"), "hello\n").unwrap();
    run_git(dir, &["add", "."]);
    run_git(dir, &["commit", "-q", "-m", "first"]);
    std::fs::create_dir_all(dir.join("src/deep")).unwrap();
    std::fs::write(
        dir.join("src/deep/lib.rs"),
        "pub fn answer() -> u32 { 42 }\n",
    )
    .unwrap();
    std::fs::write(dir.join("run.sh"), "#!/bin/sh\necho run\n").unwrap();
    run_git(dir, &["add", "."]);
    run_git(dir, &["update-index", "--chmod=+x", "run.sh"]);
    run_git(dir, &["commit", "-q", "-m", "second"]);
    run_git(dir, &["tag", "v1"]);
    run_git(dir, &["checkout", "-q", "-b", "feature"]);
    std::fs::write(dir.join("feature.txt"), "feature work\n").unwrap();
    run_git(dir, &["add", "."]);
    run_git(dir, &["commit", "-q", "-m", "feature"]);
    run_git(dir, &["checkout", "-q", "main"]);
    std::fs::write(dir.join("README.md"), "hello\nworld\n").unwrap();
    run_git(dir, &["commit", "-q", "-am", "third"]);
    run_git(dir, &["tag", "-a", "v2", "-m", "release two"]);
}

/// Commits a new file on a new branch, started from main, in `work`.
pub fn commit_branch(work: &Path, branch: &str) {
    run_git(work, &["checkout", "-q", "-B", branch, "main"]);
    std::fs::write(work.join(format!("{branch}.txt")), branch).unwrap();
    run_git(work, &["add", "."]);
    run_git(work, &["commit", "-q", "-m", branch]);
}

/// `git for-each-ref` of a repository (work tree or bare), one "oid name" per line, sorted.
pub fn refs_of(dir: &Path) -> String {
    run_git(
        dir,
        &[
            "for-each-ref",
            "--format=%(objectname) %(refname)",
            "refs/heads",
            "refs/tags",
        ],
    )
}

/// Child processes of `pid` as (pid, state), from /proc.
pub fn children_of(pid: u32) -> Vec<(u32, char)> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ..." where comm may contain spaces.
        let Some(after) = stat.rsplit_once(") ") else {
            continue;
        };
        let mut fields = after.1.split_whitespace();
        let state = fields.next().and_then(|s| s.chars().next()).unwrap_or('?');
        let parent: u32 = fields.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        if parent == pid {
            children.push((child, state));
        }
    }
    children
}

/// Opens an upload-pack session on `s1/repo.git` and reads the advertisement; git then waits
/// for the client's wants, so the session stays open until the client ends it.
pub async fn open_session(
    node: &NodeProcess,
) -> (
    tokio::sync::mpsc::Sender<gitfleet::proto::SshRequest>,
    tonic::Streaming<gitfleet::proto::SshResponse>,
) {
    let (sender, receiver) = tokio::sync::mpsc::channel(4);
    sender
        .send(gitfleet::proto::SshRequest {
            repository: header("s1", "repo.git"),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut stream =
        gitfleet::proto::ssh_service_client::SshServiceClient::new(node.channel().await)
            .ssh_upload_pack(tokio_stream::wrappers::ReceiverStream::new(receiver))
            .await
            .unwrap()
            .into_inner();
    assert!(!stream.message().await.unwrap().unwrap().stdout.is_empty());
    (sender, stream)
}

/// Every process that a node's git commands started, grandchildren included: they all carry
/// the node's pid in GITFLEET_NODE_PID.
pub fn git_processes_of(node_pid: u32) -> Vec<u32> {
    let marker = format!("{}={node_pid}", gitfleet::git::NODE_PID_ENV);
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if environ
            .split(|b| *b == 0)
            .any(|variable| variable == marker.as_bytes())
        {
            found.push(pid);
        }
    }
    found
}

/// Waits until `pid` has no children and no process its git started is left, or panics with
/// what remains.
pub async fn wait_for_no_children(pid: u32) {
    for _ in 0..100 {
        if children_of(pid).is_empty() && git_processes_of(pid).is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "node {pid} left processes behind: children {:?}, git processes {:?}",
        children_of(pid),
        git_processes_of(pid)
    );
}

/// Runs a command to its end and returns its output and its peak resident memory in bytes:
/// the kernel's high-water mark (VmHWM), read while it runs. (wait4's ru_maxrss would also
/// count the memory of this test process, which the child was forked from.)
pub fn run_with_peak_memory(mut command: Command) -> (Output, u64) {
    use std::io::Read as _;
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        stdout.read_to_end(&mut bytes).unwrap();
        bytes
    });
    let err = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        stderr.read_to_end(&mut bytes).unwrap();
        bytes
    });
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak_kib = 0;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        let high_water = std::fs::read_to_string(&status_file)
            .ok()
            .and_then(|status| {
                status
                    .lines()
                    .find_map(|line| line.strip_prefix("VmHWM:"))
                    .and_then(|kib| kib.trim().trim_end_matches("kB").trim().parse().ok())
            })
            .unwrap_or(0u64);
        peak_kib = peak_kib.max(high_water);
        std::thread::sleep(Duration::from_millis(2));
    };
    let output = Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    };
    (output, peak_kib * 1024)
}

/// Empties a storage directory while its node runs, as a wiped disk would be. The node may
/// write into it meanwhile (its identity file, say), so whatever appears during the removal is
/// removed too.
pub fn wipe_storage(root: &Path) {
    for _ in 0..20 {
        let mut left = false;
        for entry in std::fs::read_dir(root).unwrap() {
            let path = entry.unwrap().path();
            let removed = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            left |= removed.is_err_and(|error| error.kind() != std::io::ErrorKind::NotFound);
        }
        if !left {
            return;
        }
    }
    panic!("{} could not be emptied", root.display());
}

/// The runtime a benchmark's main runs on.
pub fn bench_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The body of a push (commands, flush, pack) creating each of `branches` at `commit`, read
/// from the repository at `work`; the first command asks for report-status.
pub fn creating_push(work: &Path, branches: &[&str], commit: &str) -> Vec<u8> {
    let pack = Command::new("git")
        .current_dir(work)
        .args(["pack-objects", "--stdout", "--revs", "-q"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write as _;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(format!("{commit}\n").as_bytes())?;
            child.wait_with_output()
        })
        .unwrap()
        .stdout;
    let zero = "0".repeat(40);
    let mut body = Vec::new();
    for (i, branch) in branches.iter().enumerate() {
        let capabilities = if i == 0 { "\0report-status" } else { "" };
        body.extend(gitfleet::git::pktline::encode(
            format!("{zero} {commit} refs/heads/{branch}{capabilities}\n").as_bytes(),
        ));
    }
    body.extend_from_slice(b"0000");
    body.extend_from_slice(&pack);
    body
}

/// A new commit on a branch of its own in `work`; returns its id.
pub fn commit_on(work: &Path, branch: &str) -> String {
    run_git(work, &["checkout", "-q", "-B", branch]);
    std::fs::write(work.join(format!("{branch}.txt")), branch).unwrap();
    run_git(work, &["add", "."]);
    run_git(work, &["commit", "-q", "-m", branch]);
    run_git(work, &["rev-parse", "HEAD"]).trim().to_owned()
}

/// The fence holder files left in a replica's directory (each names a push that holds, or
/// held, the replica's fence).
pub fn fence_holders(replica: &Path) -> Vec<String> {
    std::fs::read_dir(replica)
        .unwrap()
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("gitfleet-fence.holder"))
        .collect()
}

//! `gitfleet dev` as a newcomer runs it: start, use it from a shell, stop, start again.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A running `gitfleet dev`; killed if the test ends first.
struct Dev(Child);

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `gitfleet dev` on free ports and waits for its ready line.
fn start_dev(dir: &Path) -> Dev {
    let mut child = Command::new(BINARY)
        .args(["dev", "--dir"])
        .arg(dir)
        .args([
            "--grpc-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .env("GITFLEET_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let ready = lines.next().map(Result::unwrap);
    assert_eq!(ready.as_deref(), Some("gitfleet dev: ready"));
    Dev(child)
}

/// Runs a shell script with the cluster's env file sourced.
fn shell(dir: &Path, work: &Path, script: &str) -> String {
    let output = Command::new("/bin/sh")
        .arg("-c")
        .arg(format!(". '{}/env' && {script}", dir.display()))
        .current_dir(work)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_AUTHOR_NAME", "A U Thor")
        .env("GIT_AUTHOR_EMAIL", "author@example.com")
        .env("GIT_COMMITTER_NAME", "C O Mitter")
        .env("GIT_COMMITTER_EMAIL", "committer@example.com")
        .env_remove("GITFLEET_CONFIG")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Processes whose command line mentions `dir`.
fn processes_of(dir: &Path) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if entry.file_name().to_string_lossy().parse::<u32>().is_err() {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&needle) {
            found.push(cmdline);
        }
    }
    found
}

fn stop(mut dev: Dev) {
    let pid = nix::unistd::Pid::from_raw(dev.0.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let started = Instant::now();
    loop {
        if let Some(status) = dev.0.try_wait().unwrap() {
            assert!(status.success(), "gitfleet dev exited with {status}");
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "gitfleet dev did not stop"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn dev_starts_serves_from_a_shell_stops_cleanly_and_starts_again_on_its_data() {
    let scratch = tempfile::tempdir().unwrap();
    // As root, PostgreSQL runs as `postgres`, which must be able to enter the directory.
    std::fs::set_permissions(scratch.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let dir = scratch.path().join("cluster");
    let work = scratch.path().join("work");
    make_history(&work);

    let dev = start_dev(&dir);
    for file in [
        "env",
        "proxy.toml",
        "node-1.toml",
        "node-2.toml",
        "node-3.toml",
    ] {
        assert!(dir.join(file).exists(), "{file} is missing");
    }
    // The env file is all a shell needs: a push creates the repository, a clone reads it.
    shell(
        &dir,
        &work,
        "git push -q \"$GITFLEET_HTTP_URL/default/demo.git\" main feature",
    );
    shell(
        &dir,
        scratch.path(),
        "git clone -q \"$GITFLEET_HTTP_URL/default/demo.git\" first-clone",
    );
    assert_eq!(
        run_git(&scratch.path().join("first-clone"), &["rev-parse", "HEAD"]),
        run_git(&work, &["rev-parse", "main"])
    );
    let created = shell(
        &dir,
        scratch.path(),
        &format!("'{BINARY}' admin create-repository default/by-admin.git"),
    );
    assert_eq!(created, "created default/by-admin.git\n");

    stop(dev);
    let left = processes_of(&dir);
    assert!(left.is_empty(), "left running: {left:?}");

    // Started again, it serves the same repositories with the same credentials.
    let dev = start_dev(&dir);
    let advertised = shell(
        &dir,
        scratch.path(),
        "git ls-remote --refs \"$GITFLEET_HTTP_URL/default/demo.git\"",
    );
    assert!(advertised.contains("refs/heads/feature"), "{advertised}");
    let exists = shell(
        &dir,
        scratch.path(),
        "git ls-remote \"$GITFLEET_HTTP_URL/default/by-admin.git\" && echo reachable",
    );
    assert!(exists.contains("reachable"));

    // PostgreSQL dies hard (power cut, OOM killer): its pid file and socket stay behind, and
    // the next start must not mistake them for a running server.
    let pid_file = std::fs::read_to_string(dir.join("postgres/postmaster.pid")).unwrap();
    let postmaster: i32 = pid_file.lines().next().unwrap().trim().parse().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(postmaster),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    stop(dev);
    let dev = start_dev(&dir);
    let advertised = shell(
        &dir,
        scratch.path(),
        "git ls-remote --refs \"$GITFLEET_HTTP_URL/default/demo.git\"",
    );
    assert!(advertised.contains("refs/heads/main"), "{advertised}");
    stop(dev);
    assert!(processes_of(&dir).is_empty());

    // The secrets are the owner's alone.
    use std::os::unix::fs::MetadataExt;
    for file in ["env", "secrets.toml", "proxy.toml", "node-1.toml"] {
        let mode = std::fs::metadata(dir.join(file)).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600, "{file}");
    }
}

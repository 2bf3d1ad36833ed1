//! `gitfleet dev` as a newcomer runs it: start, use it from a shell, stop, start again.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::http::*;
use crate::common::*;
use gitfleet::model::{RelativePath, StorageName};
use gitfleet::store::Store;

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
    start_dev_with(dir, &[])
}

fn start_dev_with(dir: &Path, extra: &[&str]) -> Dev {
    let mut child = Command::new(BINARY)
        .args(["dev", "--dir"])
        .arg(dir)
        .args([
            "--grpc-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .args(extra)
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

/// The variables `DIR/env` exports.
fn env_of(dir: &Path) -> HashMap<String, String> {
    std::fs::read_to_string(dir.join("env"))
        .unwrap()
        .lines()
        .filter_map(|line| line.strip_prefix("export "))
        .filter_map(|line| line.split_once('='))
        .map(|(name, value)| (name.to_owned(), value.trim_matches('\'').to_owned()))
        .collect()
}

/// A repository's generation and its up-to-date replicas, read from the cluster's database.
fn generation(database_url: &str, relative_path: &str) -> (i64, usize) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let store = Store::connect_lazy(database_url, 1, Duration::from_secs(10)).unwrap();
        let record = store
            .find_repository(
                &StorageName::parse("default").unwrap(),
                &RelativePath::parse(relative_path).unwrap(),
            )
            .await
            .unwrap()
            .unwrap();
        (record.generation, record.up_to_date().count())
    })
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

    // Started again, it serves the same repositories with the same credentials. This time
    // a push must name a repository that exists.
    let dev = start_dev_with(&dir, &["--no-push-to-create"]);
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
    let env = env_of(&dir);
    let missing = format!("{}/default/never-made.git", env["GITFLEET_HTTP_URL"]);
    let output = git_http(&work, &["push", &missing, "main"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("default/never-made.git does not exist"),
        "{stderr}"
    );

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

/// What a git user does against the dev cluster's HTTP port, with the URLs from `DIR/env`.
#[test]
fn git_clients_clone_push_fetch_and_are_checked_on_the_dev_cluster() {
    let scratch = tempfile::tempdir().unwrap();
    std::fs::set_permissions(scratch.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let dir = scratch.path().join("cluster");
    let dev = start_dev(&dir);
    let env = env_of(&dir);
    let base = &env["GITFLEET_HTTP_URL"];
    let url = format!("{base}/default/web/project.git");
    let work = scratch.path().join("work");
    make_history(&work);

    // An empty repository clones.
    let created = shell(
        &dir,
        scratch.path(),
        &format!("'{BINARY}' admin create-repository default/web/project.git"),
    );
    assert_eq!(created, "created default/web/project.git\n");
    let output = git_http(scratch.path(), &["clone", &url, "empty"]);
    ok(&output);
    assert!(String::from_utf8_lossy(&output.stderr).contains("empty repository"));

    // A history with several branches and tags, then clones over protocol v0 and v2 that
    // hold every ref and the same working tree.
    ok(&git_http(
        &work,
        &["push", "-q", &url, "main", "feature", "v1", "v2"],
    ));
    assert_eq!(generation(&env["DATABASE_URL"], "web/project.git"), (1, 3));
    for version in ["0", "2"] {
        let name = format!("clone-v{version}");
        let output = git(scratch.path())
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_TRACE_PACKET", "1")
            .args([
                "-c",
                &format!("protocol.version={version}"),
                "clone",
                "-q",
                &url,
                &name,
            ])
            .output()
            .unwrap();
        ok(&output);
        let trace = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            trace.contains("git< version 2"),
            version == "2",
            "protocol v{version}"
        );
        let clone = scratch.path().join(&name);
        let advertised = ok(&git_http(&clone, &["ls-remote", "--refs", &url]));
        let pushed = run_git(&work, &["show-ref"]);
        assert_eq!(sorted_lines(&advertised), sorted_lines(&pushed));
        assert_eq!(
            run_git(&clone, &["rev-parse", "HEAD^{tree}"]),
            run_git(&work, &["rev-parse", "main^{tree}"])
        );
        assert_eq!(
            std::fs::read_to_string(clone.join("src/deep/lib.rs")).unwrap(),
            "pub fn answer() -> u32 { 42 }\n"
        );
    }

    // A second push, fetched into a clone; then a branch deleted by push.
    commit_branch(&work, "second");
    ok(&git_http(&work, &["push", "-q", &url, "second"]));
    let clone = scratch.path().join("clone-v2");
    ok(&git_http(&clone, &["fetch", "-q", "origin"]));
    assert_eq!(
        run_git(&clone, &["rev-parse", "origin/second"]),
        run_git(&work, &["rev-parse", "second"])
    );
    ok(&git_http(&work, &["push", "-q", &url, ":feature"]));
    let advertised = ok(&git_http(&work, &["ls-remote", "--refs", &url]));
    assert!(!advertised.contains("refs/heads/feature"), "{advertised}");
    assert_eq!(generation(&env["DATABASE_URL"], "web/project.git"), (3, 3));

    // No token: 401 with a challenge, so git asks for a password. A wrong token fails.
    let address = base.rsplit_once('@').unwrap().1;
    let (status, head, _) = http_get(
        &format!("http://{address}"),
        "/default/web/project.git/info/refs?service=git-upload-pack",
        None,
    );
    assert_eq!(status, 401);
    assert!(
        head.to_lowercase().contains("www-authenticate: basic"),
        "{head}"
    );
    let output = git_http(
        scratch.path(),
        &[
            "clone",
            &format!("http://git@{address}/default/web/project.git"),
            "anonymous",
        ],
    );
    assert!(!output.status.success());
    let wrong = format!("http://dev:not-the-token@{address}/default/web/project.git");
    let output = git_http(scratch.path(), &["clone", &wrong, "wrong"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("Authentication failed"), "{stderr}");

    // The read-only token clones, and may not push.
    let read_url = format!("{}/default/web/project.git", env["GITFLEET_READ_HTTP_URL"]);
    ok(&git_http(
        scratch.path(),
        &["clone", "-q", &read_url, "reader"],
    ));
    let reader = scratch.path().join("reader");
    commit_branch(&reader, "not-allowed");
    let output = git_http(&reader, &["push", &read_url, "not-allowed"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("403"), "{stderr}");
    assert!(stderr.contains("may read but not push"), "{stderr}");
    assert_eq!(generation(&env["DATABASE_URL"], "web/project.git"), (3, 3));

    // 50 MB of incompressible data, pushed (creating the repository) and cloned back.
    let big = format!("{base}/default/big.git");
    let noise: Vec<u8> = (0..50_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    run_git(&work, &["checkout", "-q", "main"]);
    std::fs::write(work.join("noise.bin"), &noise).unwrap();
    run_git(&work, &["add", "noise.bin"]);
    run_git(&work, &["commit", "-q", "-m", "noise"]);
    ok(&git_http(&work, &["push", "-q", &big, "main"]));
    ok(&git_http(scratch.path(), &["clone", "-q", &big, "big"]));
    let cloned = std::fs::read(scratch.path().join("big/noise.bin")).unwrap();
    assert_eq!(cloned.len(), noise.len());
    assert!(cloned == noise, "the clone's file differs");
    assert_eq!(generation(&env["DATABASE_URL"], "big.git"), (1, 3));

    // The operator's view of the background work, from the same env file.
    let jobs = shell(&dir, scratch.path(), &format!("'{BINARY}' admin jobs"));
    assert!(jobs.starts_with("      ID  KIND"), "{jobs}");

    stop(dev);
}

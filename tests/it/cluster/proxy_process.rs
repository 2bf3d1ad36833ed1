//! `gitfleet proxy` and `gitfleet migrate` as the processes operators run.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::cluster::PROXY_TOKEN;
use crate::common::*;

fn proxy_config(
    dir: &std::path::Path,
    database_url: &str,
    node: &NodeProcess,
) -> std::path::PathBuf {
    let config = format!(
        "listen = \"127.0.0.1:0\"\nshutdown_delay = \"0s\"\n\
         [auth]\ntoken = \"{PROXY_TOKEN}\"\n\
         [database]\nurl = \"{database_url}\"\nacquire_timeout = \"1s\"\n\
         [[virtual_storages]]\nname = \"default\"\nreplication_factor = 1\n\
         [[virtual_storages.nodes]]\nstorage = \"s1\"\naddress = \"{}\"\ntoken = \"{TOKEN}\"\n",
        node.address
    );
    let path = dir.join("proxy.toml");
    std::fs::write(&path, config).unwrap();
    path
}

/// A child process that is killed if the test ends before it does.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `gitfleet proxy` (without waiting for it).
fn spawn_proxy(config: &std::path::Path) -> KillOnDrop {
    KillOnDrop(
        Command::new(BINARY)
            .args(["proxy", "--config"])
            .arg(config)
            .env("GITFLEET_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    )
}

/// Waits for a started proxy's gRPC address.
fn address_of(proxy: &mut KillOnDrop) -> String {
    let mut line = String::new();
    BufReader::new(proxy.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    line.trim()
        .strip_prefix("gitfleet proxy: listening on ")
        .unwrap_or_else(|| panic!("the proxy did not start: {line:?}"))
        .to_owned()
}

/// Creates a repository with `gitfleet admin` through the proxy at `address`.
fn admin_create(config: &std::path::Path, address: &str, repository: &str) {
    let created = Command::new(BINARY)
        .args(["admin", "--config"])
        .arg(config)
        .args(["--address", address, "create-repository", repository])
        .output()
        .unwrap();
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
}

fn migrate(config: &std::path::Path) -> std::process::Output {
    Command::new(BINARY)
        .args(["migrate", "--config"])
        .arg(config)
        .env("GITFLEET_LOG", "warn")
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_proxy_process_migrates_serves_and_stops_on_sigterm() {
    let database_url = crate::common::db::fresh_database().await;
    let node = NodeProcess::start();
    let dir = tempfile::tempdir().unwrap();
    let config = proxy_config(dir.path(), &database_url, &node);

    let migrated = migrate(&config);
    assert!(
        migrated.status.success(),
        "{}",
        String::from_utf8_lossy(&migrated.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&migrated.stdout),
        format!(
            "gitfleet migrate: {0} applied now, {0} in all\n",
            migrations()
        )
    );
    let again = migrate(&config);
    assert_eq!(
        String::from_utf8_lossy(&again.stdout),
        format!("gitfleet migrate: 0 applied now, {} in all\n", migrations())
    );

    let mut proxy = spawn_proxy(&config);
    let address = address_of(&mut proxy);
    let proxy = &mut proxy.0;

    admin_create(&config, &address, "default/process.git");
    let work = tempfile::tempdir().unwrap();
    make_history(work.path());
    let pushed = git(work.path())
        .env("GITFLEET_TOKEN", PROXY_TOKEN)
        .args([
            "push",
            "-q",
            &format!("ssh://{address}/default/process.git"),
            "main",
        ])
        .output()
        .unwrap();
    assert!(
        pushed.status.success(),
        "{}",
        String::from_utf8_lossy(&pushed.stderr)
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(proxy.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = proxy.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the proxy did not stop"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
}

#[test]
fn a_proxy_that_cannot_reach_its_database_at_start_says_so() {
    let node = NodeProcess::start();
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "postgres://nobody@localhost/none?host={}",
        dir.path().join("no-socket-here").display()
    );
    let config = proxy_config(dir.path(), &url, &node);
    let output = Command::new(BINARY)
        .args(["proxy", "--config"])
        .arg(&config)
        .env("GITFLEET_LOG", "error")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot apply the migrations"), "{stderr}");

    let output = migrate(&config);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("migration failed"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_proxies_starting_together_on_a_fresh_database_both_serve() {
    let database_url = crate::common::db::fresh_database().await;
    let node = NodeProcess::start();
    let dir = tempfile::tempdir().unwrap();
    let config = proxy_config(dir.path(), &database_url, &node);
    // Both start before either has migrated.
    let mut proxies: Vec<KillOnDrop> = (0..2).map(|_| spawn_proxy(&config)).collect();
    let addresses: Vec<String> = proxies.iter_mut().map(address_of).collect();
    for (index, address) in addresses.iter().enumerate() {
        admin_create(&config, address, &format!("default/from-{index}.git"));
    }
    let store =
        gitfleet::store::Store::connect_lazy(&database_url, 1, Duration::from_secs(5)).unwrap();
    assert_eq!(store.applied_migrations().await.unwrap(), migrations());
}

/// How many migrations the repository has.
fn migrations() -> i64 {
    std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
        .unwrap()
        .filter(|entry| {
            entry
                .as_ref()
                .is_ok_and(|entry| entry.path().extension().is_some_and(|ext| ext == "sql"))
        })
        .count() as i64
}

//! The node as a process: configuration errors, SIGTERM with work in flight.

use std::time::{Duration, Instant};

use crate::common::*;
use gitfleet::proto::repository_service_client::RepositoryServiceClient;
use gitfleet::proto::*;

fn run_node_with(config: &str, env: &[(&str, &str)]) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.toml");
    std::fs::write(
        &path,
        config.replace("DIR", &dir.path().display().to_string()),
    )
    .unwrap();
    let mut command = std::process::Command::new(BINARY);
    command.args(["node", "--config"]).arg(&path);
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().unwrap()
}

#[test]
fn configuration_errors_are_reported_and_stop_the_node() {
    let valid = format!(
        "listen = \"127.0.0.1:0\"\n[auth]\ntoken = \"{TOKEN}\"\n[[storages]]\nname = \"s1\"\npath = \"DIR/s1\"\n"
    );
    let cases = [
        (
            valid.replace("listen", "listen_address"),
            vec![],
            "unknown field `listen_address`",
        ),
        (valid.replace(TOKEN, "short"), vec![], "at least 16 bytes"),
        (
            valid.replace("DIR/s1", "relative/s1"),
            vec![],
            "must be absolute",
        ),
        (
            valid.clone() + "[[storages]]\nname = \"s1\"\npath = \"DIR/other\"\n",
            vec![],
            "configured twice",
        ),
        (
            valid.clone(),
            vec![("GITFLEET__AUTH__TOKEN", "tiny")],
            "at least 16 bytes",
        ),
        (
            valid.clone(),
            vec![("GITFLEET__STORAGES__5__PATH", "/x")],
            "GITFLEET__STORAGES__5__PATH",
        ),
        (
            valid.replace("\"127.0.0.1:0\"", "\"not an address\""),
            vec![],
            "listen",
        ),
    ];
    for (config, env, needle) in cases {
        let output = run_node_with(&config, &env);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{needle}: the node started");
        assert!(stderr.contains(needle), "{needle:?} not in: {stderr}");
    }
    let missing = std::process::Command::new(BINARY)
        .args(["node", "--config", "/nonexistent/node.toml"])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("cannot read /nonexistent/node.toml")
    );
}

#[tokio::test]
async fn environment_overrides_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.toml");
    std::fs::write(&path, format!("listen = \"127.0.0.1:1\"\n[auth]\ntoken = \"file-secret-is-long-enough\"\n[[storages]]\nname = \"s1\"\npath = \"{}/s1\"\n", dir.path().display())).unwrap();
    let mut child = std::process::Command::new(BINARY)
        .args(["node", "--config"])
        .arg(&path)
        .env("GITFLEET__LISTEN", "127.0.0.1:0")
        .env("GITFLEET__AUTH__TOKEN", TOKEN)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let address = format!(
        "http://{}",
        line.trim()
            .strip_prefix("gitfleet node: listening on ")
            .unwrap()
    );
    let channel = gitfleet::client::connect(&address, gitfleet::auth::Signer::from_secret(TOKEN))
        .await
        .unwrap();
    let exists = RepositoryServiceClient::new(channel)
        .repository_exists(RepositoryExistsRequest {
            repository: header("s1", "x.git"),
        })
        .await;
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!exists.unwrap().into_inner().exists);
}

#[tokio::test]
async fn sigterm_reports_not_serving_stops_accepting_lets_git_finish_then_kills_it() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    let node = NodeProcess::start_with(NodeOptions {
        storages: vec!["s1"],
        extra_config: "shutdown_delay = \"700ms\"\nshutdown_grace = \"2s\"".into(),
    });
    RepositoryServiceClient::new(node.channel().await)
        .create_repository(CreateRepositoryRequest {
            repository: header("s1", "repo.git"),
            default_branch: String::new(),
        })
        .await
        .unwrap();
    let pid = node.pid();
    let health_channel = tonic::transport::Channel::from_shared(node.address.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = |service: &str| {
        let mut client = HealthClient::new(health_channel.clone());
        let request = HealthCheckRequest {
            service: service.into(),
        };
        async move {
            client
                .check(request)
                .await
                .map(|response| response.into_inner().status)
        }
    };
    assert_eq!(health("").await.unwrap(), ServingStatus::Serving as i32);
    assert_eq!(
        health("gitfleet.v1.SshService").await.unwrap(),
        ServingStatus::Serving as i32
    );

    // A session that finishes within the grace period completes normally.
    let (finisher, mut finishing) = open_session(&node).await;
    // A session that never finishes.
    let (_hanger, mut hanging) = open_session(&node).await;
    assert_eq!(children_of(pid).len(), 2);

    let stopped_at = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    // First the health checks say NOT_SERVING, while calls are still accepted.
    assert_eq!(health("").await.unwrap(), ServingStatus::NotServing as i32);
    assert_eq!(
        health("gitfleet.v1.SshService").await.unwrap(),
        ServingStatus::NotServing as i32
    );
    tokio::time::sleep(Duration::from_millis(800)).await;

    // Then new connections are refused while running calls go on.
    assert!(
        gitfleet::client::connect(&node.address, gitfleet::auth::Signer::from_secret(TOKEN))
            .await
            .is_err()
    );
    finisher
        .send(SshRequest {
            stdin: b"0000".to_vec().into(),
            close_stdin: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut exit = None;
    while let Some(message) = finishing.message().await.unwrap() {
        exit = message.exit_status.or(exit);
    }
    assert_eq!(
        exit,
        Some(0),
        "the session that ended in time finished normally"
    );

    // The hanging one is cut off when the grace period is over, and its git is reaped.
    let cut = loop {
        match hanging.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => break None,
            Err(status) => break Some(status),
        }
    };
    let waited = stopped_at.elapsed();
    assert!(cut.is_some(), "the hanging session ended without an error");
    assert!(
        waited >= Duration::from_millis(2500),
        "killed after {waited:?}, before delay and grace were over"
    );
    assert!(
        children_of(pid).is_empty(),
        "git left behind: {:?}",
        children_of(pid)
    );

    let mut node = node;
    let status = tokio::task::spawn_blocking(move || {
        let status = node.child.wait().unwrap();
        (status, node)
    })
    .await
    .unwrap()
    .0;
    assert!(status.success(), "node exited with {status}");
}

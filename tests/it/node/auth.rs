//! Every call needs a valid, fresh token; health checks do not; reflection lists the API.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::common::*;
use gitfleet::auth::{Credentials, Signer};
use gitfleet::proto::RepositoryExistsRequest;
use gitfleet::proto::repository_service_client::RepositoryServiceClient;
use tonic::Code;
use tonic::transport::Channel;

async fn exists_with(
    node: &NodeProcess,
    credentials: Option<Credentials>,
) -> Result<bool, tonic::Status> {
    let channel = Channel::from_shared(node.address.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let request = RepositoryExistsRequest {
        repository: header("s1", "any.git"),
    };
    let response = match credentials {
        Some(credentials) => {
            RepositoryServiceClient::with_interceptor(channel, Signer::new(credentials))
                .repository_exists(request)
                .await
        }
        None => {
            RepositoryServiceClient::new(channel)
                .repository_exists(request)
                .await
        }
    };
    response.map(|response| response.into_inner().exists)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn calls_without_a_valid_fresh_token_are_refused() {
    let node = NodeProcess::start();
    let exists = exists_with(&node, Some(Credentials::Secret(TOKEN.into()))).await;
    assert!(!exists.unwrap(), "a fresh token is accepted");

    let cases = [
        (None, "missing authorization"),
        (
            Some(Credentials::Secret("not the right secret".into())),
            "invalid token signature",
        ),
        (
            Some(Credentials::Signed(
                gitfleet::auth::sign_at(TOKEN, now() - 3600, "*").into(),
            )),
            "expired",
        ),
        (
            Some(Credentials::Signed(
                gitfleet::auth::sign_at(TOKEN, now() + 3600, "*").into(),
            )),
            "not yet valid",
        ),
        (Some(Credentials::Signed("v1.garbage".into())), "malformed"),
    ];
    for (credentials, needle) in cases {
        let status = exists_with(&node, credentials).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{needle}: {status:?}");
        assert!(
            status.message().contains(needle),
            "{:?} lacks {needle:?}",
            status.message()
        );
    }

    // A token scoped to other methods is refused for this one.
    let scoped = gitfleet::auth::sign(TOKEN, gitfleet::auth::REPLICATION_SCOPE);
    let status = exists_with(&node, Some(Credentials::Signed(scoped.into())))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("RepositoryExists"),
        "{}",
        status.message()
    );

    // A captured token keeps working only inside its window.
    let captured = gitfleet::auth::sign_at(TOKEN, now() - 30, "*");
    assert!(
        exists_with(&node, Some(Credentials::Signed(captured.into())))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn the_validity_window_is_configurable() {
    let node = NodeProcess::start();
    let old = gitfleet::auth::sign_at(TOKEN, now() - 90, "*");
    assert_eq!(
        exists_with(&node, Some(Credentials::Signed(old.into())))
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );

    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "listen = \"127.0.0.1:0\"\n[auth]\ntoken = \"{TOKEN}\"\nvalidity = \"5m\"\n[[storages]]\nname = \"s1\"\npath = \"{}\"\n",
        dir.path().join("s1").display()
    );
    let path = dir.path().join("node.toml");
    std::fs::write(&path, config).unwrap();
    let lenient = NodeProcess::spawn(dir, &path);
    let old = gitfleet::auth::sign_at(TOKEN, now() - 90, "*");
    assert!(
        exists_with(&lenient, Some(Credentials::Signed(old.into())))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn health_needs_no_token_and_reflection_lists_the_api() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let node = NodeProcess::start();
    let channel = Channel::from_shared(node.address.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = HealthClient::new(channel.clone())
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        health.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    let request = || {
        tokio_stream::iter(vec![ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        }])
    };
    let status = ServerReflectionClient::new(channel.clone())
        .server_reflection_info(request())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    let mut client = ServerReflectionClient::with_interceptor(channel, Signer::from_secret(TOKEN));
    let mut stream = client
        .server_reflection_info(request())
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        stream.message().await.unwrap().unwrap().message_response
    else {
        panic!("no service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for service in [
        "gitfleet.v1.RepositoryService",
        "gitfleet.v1.RefService",
        "gitfleet.v1.SshService",
        "gitfleet.v1.NodeService",
    ] {
        assert!(
            names.iter().any(|n| n == service),
            "{service} not listed: {names:?}"
        );
    }
}

#[tokio::test]
async fn gitfleet_token_mints_a_working_token() {
    let node = NodeProcess::start();
    let output = std::process::Command::new(BINARY)
        .arg("token")
        .env("GITFLEET_TOKEN", TOKEN)
        .output()
        .unwrap();
    assert!(output.status.success());
    let token = String::from_utf8(output.stdout).unwrap().trim().to_owned();
    assert!(
        exists_with(&node, Some(Credentials::Signed(token.into())))
            .await
            .is_ok()
    );

    let output = std::process::Command::new(BINARY)
        .args(["token", "--scope", "/gitfleet.v1.RefService/ListRefs"])
        .env("GITFLEET_TOKEN", TOKEN)
        .output()
        .unwrap();
    let token = String::from_utf8(output.stdout).unwrap().trim().to_owned();
    let status = exists_with(&node, Some(Credentials::Signed(token.into())))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
}

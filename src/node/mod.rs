//! The storage node: serves the repositories on its disks over gRPC, running the real git CLI.

mod error;
pub mod fence;
pub mod hook;
mod locks;
mod maintenance;
mod objects;
pub mod prepare;
mod prepared_refs;
mod refs;
mod replication;
mod repository;
mod smarthttp;
mod ssh;
pub mod storage;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic_health::ServingStatus;

pub use error::{MISSING_REPOSITORY, NodeError};
pub use replication::{ADDRESS_ENV, SIGNED_TOKEN_ENV};

use crate::auth::Verifier;
use crate::config::NodeConfig;
use crate::git::Git;
use crate::proto::node_service_server::NodeServiceServer;
use crate::proto::object_service_server::ObjectServiceServer;
use crate::proto::ref_service_server::RefServiceServer;
use crate::proto::repository_service_server::RepositoryServiceServer;
use crate::proto::smart_http_service_server::SmartHttpServiceServer;
use crate::proto::ssh_service_server::SshServiceServer;
use storage::Storages;

/// What every RPC handler shares.
#[derive(Debug)]
pub struct NodeState {
    pub storages: Storages,
    pub git: Git,
    /// Cancelled when the shutdown grace period is over: running git commands are killed.
    pub kill: CancellationToken,
}

/// One handle for every service, cloned into each generated server.
#[derive(Debug, Clone)]
pub struct Node {
    state: Arc<NodeState>,
}

impl Node {
    /// Checks the storages and prepares their areas; a node that returns from here is ready.
    pub fn new(config: &NodeConfig) -> anyhow::Result<Self> {
        let storages = Storages::new(&config.storages)?;
        for storage in storages.iter() {
            storage.prepare().map_err(|error| {
                anyhow::anyhow!(
                    "storage {}: cannot prepare {}: {error}",
                    storage.name,
                    storage.root.display()
                )
            })?;
        }
        check_disjoint(&storages)?;
        let kill = CancellationToken::new();
        let git = Git::new(&config.git.binary, kill.clone())
            // Housekeeping is scheduled deliberately, never started behind a request's back.
            .with_setting("gc.auto=0")
            .with_setting("maintenance.auto=false")
            .with_setting(format!(
                "receive.maxInputSize={}",
                config.git.max_push_bytes
            ));
        Ok(Self {
            state: Arc::new(NodeState {
                storages,
                git,
                kill,
            }),
        })
    }
}

/// Refuses storages whose directories are the same or nested: one storage's clients could
/// then reach into another's repositories and reserved area.
fn check_disjoint(storages: &Storages) -> anyhow::Result<()> {
    let mut roots: Vec<(crate::model::StorageName, std::path::PathBuf)> = Vec::new();
    for storage in storages.iter() {
        let root = storage.root.canonicalize()?;
        for (other, other_root) in &roots {
            if root.starts_with(other_root) || other_root.starts_with(&root) {
                anyhow::bail!(
                    "storages {} and {other} overlap: {} and {}",
                    storage.name,
                    root.display(),
                    other_root.display()
                );
            }
        }
        roots.push((storage.name.clone(), root));
    }
    Ok(())
}

impl Node {
    /// Runs one request's work as a task of its own, so that it runs to its end (reaping its
    /// git processes and cleaning its staging directories) even if the caller goes away.
    pub(crate) async fn detached<T, F, Fut>(&self, work: F) -> Result<T, tonic::Status>
    where
        T: Send + 'static,
        F: FnOnce(Node) -> Fut,
        Fut: std::future::Future<Output = Result<T, NodeError>> + Send + 'static,
    {
        // The task keeps the RPC's span, so its logs still say which repository they are about.
        let work = tracing::Instrument::in_current_span(work(self.clone()));
        match tokio::spawn(work).await {
            Ok(result) => result.map_err(tonic::Status::from),
            Err(error) => Err(tonic::Status::internal(format!(
                "the request's task failed: {error}"
            ))),
        }
    }
}

/// Sets the health of the whole server ("") and of every gitfleet service.
async fn set_health(reporter: &tonic_health::server::HealthReporter, status: ServingStatus) {
    reporter.set_service_status("", status).await;
    let services = crate::proto::routing::services(|_| true);
    for service in services {
        reporter.set_service_status(service, status).await;
    }
}

/// Serves the node on an already-bound listener until `shutdown` is cancelled, then stops
/// accepting, lets running requests finish for `config.shutdown_grace`, and kills what is left.
pub async fn serve(
    listener: TcpListener,
    node: Node,
    config: NodeConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let verifier = Verifier::new(&config.auth.token, config.auth.validity.0);
    let kill = node.state.kill.clone();

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    set_health(&health_reporter, ServingStatus::Serving).await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .build_v1()?;

    let server = Server::builder()
        .layer(crate::auth::CallPathLayer)
        .trace_fn(|request| {
            tracing::info_span!(
                "rpc",
                path = %request.uri().path(),
                storage = tracing::field::Empty,
                repository = tracing::field::Empty,
            )
        })
        .add_service(health_service)
        .add_service(tonic::service::interceptor::InterceptedService::new(
            reflection,
            verifier.clone(),
        ))
        .add_service(RepositoryServiceServer::with_interceptor(
            node.clone(),
            verifier.clone(),
        ))
        .add_service(RefServiceServer::with_interceptor(
            node.clone(),
            verifier.clone(),
        ))
        .add_service(ObjectServiceServer::with_interceptor(
            node.clone(),
            verifier.clone(),
        ))
        .add_service(SmartHttpServiceServer::with_interceptor(
            node.clone(),
            verifier.clone(),
        ))
        .add_service(SshServiceServer::with_interceptor(
            node.clone(),
            verifier.clone(),
        ))
        .add_service(NodeServiceServer::with_interceptor(node.clone(), verifier));

    // Shutdown, in order: health checks say NOT_SERVING while calls are still accepted for
    // shutdown_delay, so load balancers move away; then no new calls; then running calls get
    // shutdown_grace; then their git commands are killed.
    let stop_accepting = CancellationToken::new();
    let served = tokio::spawn(server.serve_with_incoming_shutdown(
        crate::client::incoming(listener),
        stop_accepting.clone().cancelled_owned(),
    ));
    tokio::pin!(served);
    tokio::select! {
        result = &mut served => return Ok(result??),
        _ = shutdown.cancelled() => {}
    }
    set_health(&health_reporter, ServingStatus::NotServing).await;
    tracing::info!(delay = ?config.shutdown_delay.0, "shutting down: health is NOT_SERVING");
    tokio::time::sleep(config.shutdown_delay.0).await;
    stop_accepting.cancel();
    let grace = config.shutdown_grace.0;
    tracing::info!(grace = ?grace, "no new calls: running ones may finish");
    tokio::select! {
        result = &mut served => return Ok(result??),
        _ = tokio::time::sleep(grace) => {}
    }
    tracing::warn!("shutdown grace period is over: killing running git commands");
    kill.cancel();
    // Killed commands end their calls at once; give the server a moment to flush them.
    match tokio::time::timeout(Duration::from_secs(2), served).await {
        Ok(result) => Ok(result??),
        Err(_) => {
            tracing::warn!("calls still open after the grace period: closing them");
            Ok(())
        }
    }
}

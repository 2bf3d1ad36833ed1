//! The routing proxy: serves the public API of a node, addressed by virtual storage, and
//! keeps the replicas of every repository in agreement through PostgreSQL.

mod catalog;
mod error;
mod forward;
mod header;
mod http;
mod response;
mod routing;
mod service;
pub(crate) mod write;
pub mod write_lock;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::metadata::MetadataMap;
use tonic::transport::Server;
use tonic_health::ServingStatus;

pub use error::ProxyError;
pub use routing::RoutingCache;

use crate::config::ProxyConfig;
use crate::fleet::Nodes;
use crate::model::{RelativePath, StorageName};
use crate::proto::routing::RpcInfo;
use crate::store::Store;

/// A request header that sends an accessor to the repository's primary replica.
pub const ROUTE_HEADER: &str = "gitfleet-route";
/// Request metadata on a push (`PostReceivePack`): make the repository if it is missing, where
/// its virtual storage allows push-to-create. The repository is undone if the push fails.
pub const PUSH_TO_CREATE_HEADER: &str = "gitfleet-push-to-create";

/// Writes to one repository through this proxy take turns on this.
type WriteQueue = tokio::sync::Mutex<()>;

/// What every call shares.
#[derive(Debug)]
pub struct ProxyState {
    pub config: ProxyConfig,
    pub store: Store,
    pub nodes: Arc<Nodes>,
    pub routing: Arc<RoutingCache>,
    /// Names this process in write leases.
    pub instance_id: String,
    /// Writes to one repository through this proxy queue here before they ask PostgreSQL for
    /// the lease.
    write_queues: Mutex<HashMap<(StorageName, RelativePath), Weak<WriteQueue>>>,
    /// Writes run as tasks of their own, so that a caller who goes away or a shutdown never
    /// cuts one between its commit decisions and its commit. Shutdown waits for them.
    writes: TaskTracker,
    /// Set when shutdown begins: /readyz turns away new traffic while calls drain.
    draining: std::sync::atomic::AtomicBool,
    /// The maintenance write lock, as last heard from PostgreSQL.
    pub write_lock: Arc<write_lock::WriteLockWatch>,
    /// How long writes held their repository's lease, from the statement that took it to
    /// the one that committed or released it.
    pub lease_holds: crate::toolkit::Histogram,
}

#[derive(Debug, Clone)]
pub struct Proxy {
    state: Arc<ProxyState>,
}

/// One call, once its first message has been read and its header checked.
pub(crate) struct Call {
    pub info: &'static RpcInfo,
    pub metadata: MetadataMap,
    pub first: Bytes,
    pub located: header::Located,
    pub inbound: tonic::Streaming<Bytes>,
    pub virtual_storage: StorageName,
    pub relative_path: RelativePath,
}

impl Call {
    /// `VIRTUAL_STORAGE/RELATIVE_PATH`, for messages.
    pub fn repository(&self) -> String {
        format!("{}/{}", self.virtual_storage, self.relative_path)
    }

    /// The caller's deadline, from its grpc-timeout header.
    pub fn deadline(&self) -> Option<Duration> {
        parse_grpc_timeout(self.metadata.get("grpc-timeout")?.to_str().ok()?)
    }
}

/// Reads a grpc-timeout value such as "1500m" or "30S".
fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

impl Proxy {
    /// Builds the proxy: a lazily connected pool, the nodes, an empty routing cache. Nothing
    /// runs until [`serve`].
    pub fn new(config: ProxyConfig) -> anyhow::Result<Self> {
        let store = Store::connect_lazy(
            &config.database.url,
            config.database.max_connections,
            config.database.acquire_timeout.0,
        )?;
        let nodes = Arc::new(Nodes::new(&config)?);
        let routing = Arc::new(RoutingCache::new(store.clone()));
        let instance_id = crate::toolkit::owner_id("proxy");
        Ok(Self {
            state: Arc::new(ProxyState {
                config,
                store,
                nodes,
                routing,
                instance_id,
                write_queues: Mutex::default(),
                writes: TaskTracker::new(),
                draining: std::sync::atomic::AtomicBool::new(false),
                write_lock: Arc::default(),
                lease_holds: Default::default(),
            }),
        })
    }

    pub fn state(&self) -> &ProxyState {
        &self.state
    }

    /// Whether shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.state
            .draining
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The queue for writes to one repository through this proxy.
    fn write_queue(
        &self,
        virtual_storage: &StorageName,
        relative_path: &RelativePath,
    ) -> Arc<WriteQueue> {
        let key = (virtual_storage.clone(), relative_path.clone());
        let mut queues = self.state.write_queues.lock().unwrap();
        if let Some(queue) = queues.get(&key).and_then(Weak::upgrade) {
            return queue;
        }
        queues.retain(|_, queue| queue.strong_count() > 0);
        let queue = Arc::new(WriteQueue::new(()));
        queues.insert(key, Arc::downgrade(&queue));
        queue
    }
}

async fn set_health(reporter: &tonic_health::server::HealthReporter, status: ServingStatus) {
    reporter.set_service_status("", status).await;
    for service in service::public_services() {
        reporter.set_service_status(service, status).await;
    }
}

/// Serves the proxy on an already-bound listener until `shutdown` is cancelled. Shutdown, in
/// order: health NOT_SERVING for shutdown_delay, no new calls, calls in flight (writes up to
/// their second transaction) get shutdown_grace, background work stops, the pool closes.
pub async fn serve(
    listeners: Listeners,
    proxy: Proxy,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    serve_announced(listeners, proxy, shutdown, CancellationToken::new()).await
}

/// The proxy's bound listeners: gRPC, and HTTP when it serves git over HTTP.
#[derive(Debug)]
pub struct Listeners {
    pub grpc: TcpListener,
    pub http: Option<TcpListener>,
}

/// [`serve`], cancelling `ready` once the migrations are applied, the nodes probed and calls
/// are taken.
pub async fn serve_announced(
    listeners: Listeners,
    proxy: Proxy,
    shutdown: CancellationToken,
    ready: CancellationToken,
) -> anyhow::Result<()> {
    let state = proxy.state.clone();
    let config = &state.config;
    if config.database.migrate_on_start {
        state.store.migrate().await.map_err(|error| {
            anyhow::anyhow!("cannot apply the migrations to the database: {error}")
        })?;
    }

    let background = CancellationToken::new();
    // The first round of health checks ends before the first call is taken.
    state.nodes.probe_all(config.health.timeout.0).await;
    let prober = tokio::spawn(state.nodes.clone().run_prober(
        config.health.interval.0,
        config.health.timeout.0,
        background.clone(),
    ));
    let listener_task = tokio::spawn(state.routing.clone().run_listener(background.clone()));
    tokio::spawn(
        state
            .write_lock
            .clone()
            .run(state.store.clone(), background.clone()),
    );

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    set_health(&health_reporter, ServingStatus::Serving).await;
    let routes = service::routes(proxy.clone(), health_service)?;
    let gateway = http::Gateway::new(proxy.clone(), routes.clone());
    let server = Server::builder()
        .layer(crate::auth::CallPathLayer)
        .trace_fn(|request| {
            tracing::info_span!(
                "rpc",
                path = %request.uri().path(),
                repository = tracing::field::Empty,
                generation = tracing::field::Empty,
            )
        })
        .add_routes(routes);

    let stop_accepting = CancellationToken::new();
    let http_served = listeners
        .http
        .map(|listener| tokio::spawn(http::serve(listener, gateway, stop_accepting.clone())));
    let served = tokio::spawn(server.serve_with_incoming_shutdown(
        crate::client::incoming(listeners.grpc),
        stop_accepting.clone().cancelled_owned(),
    ));
    tokio::pin!(served);
    ready.cancel();
    let stopped_early = tokio::select! {
        result = &mut served => Some(result),
        _ = shutdown.cancelled() => None,
    };
    if stopped_early.is_none() {
        state
            .draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
        set_health(&health_reporter, ServingStatus::NotServing).await;
        tracing::info!(delay = ?config.shutdown_delay.0, "shutting down: health is NOT_SERVING");
        tokio::time::sleep(config.shutdown_delay.0).await;
        stop_accepting.cancel();
    }
    state.writes.close();
    let grace = config.shutdown_grace.0;
    let drained = async {
        if stopped_early.is_none() {
            let _ = (&mut served).await;
        }
        if let Some(http_served) = http_served {
            let _ = http_served.await;
        }
        state.writes.wait().await;
    };
    if tokio::time::timeout(grace, drained).await.is_err() {
        tracing::warn!(
            ?grace,
            "calls still open after the grace period: closing them"
        );
    }
    background.cancel();
    let _ = tokio::join!(prober, listener_task);
    state.store.close().await;
    match stopped_early {
        Some(result) => Ok(result??),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_are_read() {
        assert_eq!(
            parse_grpc_timeout("1500m"),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(parse_grpc_timeout("30S"), Some(Duration::from_secs(30)));
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout("12x"), None);
        assert_eq!(parse_grpc_timeout("1234567890S"), None);
    }
}

//! The proxy's HTTP side: git's smart HTTP protocol, and `/metrics`, `/healthz`, `/readyz`.

mod auth;
mod body;
mod error;
mod git;
mod request;

use axum::body::Body;
use axum::response::Response;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::codegen::http::{HeaderMap, Method, StatusCode, Uri};
use tonic::service::interceptor::InterceptedService;
use tower::Layer as _;

use super::Proxy;
use crate::auth::{CallPathLayer, RecordCallPath, Signer};
use crate::fleet::majority;
use crate::http::{metric, text};
use crate::model::StorageName;
use crate::proto::smart_http_service_client::SmartHttpServiceClient;

/// The proxy's own gRPC routes, called in process: no network hop, the same checks.
type Internal = InterceptedService<InProcess, Signer>;

/// The gRPC routes as a service with a boxed future, so that the calls made through it can
/// be shown to be `Send` (with the routes' own generic future, the compiler cannot).
#[derive(Clone)]
struct InProcess(RecordCallPath<tonic::service::Routes>);

impl tower::Service<tonic::codegen::http::Request<tonic::body::Body>> for InProcess {
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = futures_util::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        tower::Service::<tonic::codegen::http::Request<tonic::body::Body>>::poll_ready(
            &mut self.0,
            cx,
        )
    }

    fn call(&mut self, request: tonic::codegen::http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.0.call(request))
    }
}

#[derive(Clone)]
pub struct Gateway {
    proxy: Proxy,
    internal: Internal,
}

impl Gateway {
    pub fn new(proxy: Proxy, routes: tonic::service::Routes) -> Self {
        let signer = Signer::from_secret(&proxy.state().config.auth.token);
        let internal = InterceptedService::new(InProcess(CallPathLayer.layer(routes)), signer);
        Self { proxy, internal }
    }

    fn smart_http(&self) -> SmartHttpServiceClient<Internal> {
        let limit = self.proxy.state().config.max_message_bytes;
        SmartHttpServiceClient::new(self.internal.clone())
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit)
    }

    fn push_to_create(&self, virtual_storage: &StorageName) -> bool {
        self.proxy
            .state()
            .nodes
            .virtual_storage(virtual_storage.as_str())
            .is_some_and(|virtual_storage| virtual_storage.push_to_create)
    }
}

/// Serves HTTP on `listener` until `stop` is cancelled; requests already running finish.
pub async fn serve(listener: TcpListener, gateway: Gateway, stop: CancellationToken) {
    let router = axum::Router::new().fallback(
        move |method: Method, uri: Uri, headers: HeaderMap, body: Body| {
            // Boxed here, where the compiler can see the future is Send for every lifetime.
            let answer: futures_util::future::BoxFuture<'static, Response> =
                Box::pin(route(gateway.clone(), method, uri, headers, body));
            answer
        },
    );
    crate::http::serve(listener, router, stop).await;
}

async fn route(
    gateway: Gateway,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match (&method, uri.path()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok"),
        (&Method::GET, "/readyz") => ready(gateway).await,
        (&Method::GET, "/metrics") => metrics(&gateway),
        (&Method::GET, "/status") => status_page(gateway).await,
        // As a task of its own: a git request runs to its end even if the client goes away.
        _ => match tokio::spawn(git::serve(gateway, method, uri, headers, body)).await {
            Ok(response) => response,
            Err(error) => error::GatewayError::Internal(error.to_string()).response(),
        },
    }
}

/// Ready when the database answers and every virtual storage has a majority of its nodes
/// healthy; otherwise 503 and what is missing.
async fn ready(gateway: Gateway) -> Response {
    if gateway.proxy.is_draining() {
        return text(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    }
    // Nothing borrowed from the gateway is held across the await.
    let store = gateway.proxy.state().store.clone();
    let mut problems = Vec::new();
    match tokio::spawn(async move { store.ping().await }).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => problems.push(error.to_string()),
        Err(error) => problems.push(error.to_string()),
    }
    let state = gateway.proxy.state();
    for virtual_storage in state.nodes.virtual_storages() {
        let healthy = virtual_storage
            .storages
            .iter()
            .filter(|storage| state.nodes.is_healthy(storage))
            .count();
        if healthy < majority(virtual_storage.storages.len()) {
            problems.push(format!(
                "virtual storage {}: {healthy} of {} nodes healthy",
                virtual_storage.name,
                virtual_storage.storages.len()
            ));
        }
    }
    if problems.is_empty() {
        text(StatusCode::OK, "ready")
    } else {
        text(StatusCode::SERVICE_UNAVAILABLE, &problems.join("\n"))
    }
}

/// How often the status page reloads itself.
const STATUS_REFRESH_SECONDS: u64 = 5;

/// The cluster's status as a page for people: the same report as `gitfleet admin status`,
/// with node health as this proxy sees it.
async fn status_page(gateway: Gateway) -> Response {
    let state = gateway.proxy.state();
    let mut nodes: Vec<crate::status::NodeState> = state
        .nodes
        .storages()
        .map(|node| crate::status::NodeState {
            storage: node.storage.to_string(),
            healthy: node.is_healthy(),
        })
        .collect();
    nodes.sort_by(|a, b| a.storage.cmp(&b.storage));
    let store = state.store.clone();
    let stall_after = state.config.status.stall_after.0;
    let gathered =
        tokio::spawn(
            async move { crate::status::Report::gather(&store, &nodes, stall_after).await },
        )
        .await;
    let report = match gathered {
        Ok(Ok(report)) => report,
        Ok(Err(error)) => {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("the status cannot be read: {error}"),
            );
        }
        Err(error) => return text(StatusCode::INTERNAL_SERVER_ERROR, &error.to_string()),
    };
    let mut response = text(StatusCode::OK, &report.html(STATUS_REFRESH_SECONDS));
    response.headers_mut().insert(
        "content-type",
        "text/html; charset=utf-8".parse().expect("a valid header"),
    );
    response
}

/// Prometheus text format.
fn metrics(gateway: &Gateway) -> Response {
    let state = gateway.proxy.state();
    let one = |value: String| vec![(String::new(), value)];
    let mut nodes: Vec<_> = state.nodes.storages().collect();
    nodes.sort_by(|a, b| a.storage.cmp(&b.storage));
    let per_node = |value: &dyn Fn(&crate::fleet::NodeHandle) -> String| -> Vec<(String, String)> {
        nodes
            .iter()
            .map(|node| (format!("{{storage=\"{}\"}}", node.storage), value(node)))
            .collect()
    };
    let mut out = String::new();
    metric(
        &mut out,
        "gitfleet_proxy_db_statements_total",
        "counter",
        "Statements sent to PostgreSQL.",
        &one(state.store.round_trips().to_string()),
    );
    metric(
        &mut out,
        "gitfleet_proxy_db_wait_seconds_total",
        "counter",
        "Time spent waiting for PostgreSQL.",
        &one(format!("{:.6}", state.store.wait_time().as_secs_f64())),
    );
    metric(
        &mut out,
        "gitfleet_proxy_routing_notifications_total",
        "counter",
        "Routing changes announced by PostgreSQL.",
        &one(state.routing.notifications().to_string()),
    );
    metric(
        &mut out,
        "gitfleet_proxy_routing_cached",
        "gauge",
        "Repositories in the routing cache.",
        &one(state.routing.len().to_string()),
    );
    metric(
        &mut out,
        "gitfleet_proxy_routing_listening",
        "gauge",
        "Whether routing notifications flow (1) or not (0).",
        &one(u8::from(state.routing.is_listening()).to_string()),
    );
    metric(
        &mut out,
        "gitfleet_proxy_node_healthy",
        "gauge",
        "Whether a storage's node answers its health checks.",
        &per_node(&|node| u8::from(node.is_healthy()).to_string()),
    );
    metric(
        &mut out,
        "gitfleet_proxy_reads_total",
        "counter",
        "Reads routed to each storage.",
        &per_node(&|node| node.reads().to_string()),
    );
    state.lease_holds.render(
        &mut out,
        "gitfleet_proxy_write_lease_held_seconds",
        "How long writes held their repository's lease.",
    );
    let mut response = text(StatusCode::OK, out.trim_end());
    response.headers_mut().insert(
        "content-type",
        "text/plain; version=0.0.4".parse().expect("a valid header"),
    );
    response
}

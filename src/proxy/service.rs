//! The gRPC face of the proxy: every public RPC of `proto/`, routed by the kind it declares.
//! Messages stay raw bytes; only the first message's header is read here.

use std::convert::Infallible;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use tonic::codegen::http;
use tonic::server::{Grpc, StreamingService};
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status, Streaming};
use tower::ServiceExt as _;

use super::error::ProxyError;
use super::response::ResponseStream;
use super::{Call, Proxy, catalog, forward, header, write};
use crate::auth::Verifier;
use crate::fleet::codec::RawCodec;
use crate::model::RelativePath;
use crate::node::fence::FENCE_HEADER;
use crate::proto::routing::{HeaderScope, RpcInfo, RpcKind, rpc_info};

/// The gRPC services the proxy serves: every service with an RPC that is not node-internal.
pub fn public_services() -> Vec<&'static str> {
    crate::proto::routing::services(|rpc| rpc.kind != RpcKind::Internal)
}

/// The routes: health (open), reflection and the public services (both behind the token).
pub fn routes(
    proxy: Proxy,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
) -> anyhow::Result<tonic::service::Routes> {
    let auth = &proxy.state.config.auth;
    let verifier = Verifier::new(&auth.token, auth.validity.0);
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let mut router = tonic::service::Routes::new(health)
        .add_service(InterceptedService::new(reflection, verifier.clone()))
        .into_axum_router();
    let entry = InterceptedService::new(Entry { proxy }, verifier);
    for service in public_services() {
        let entry = entry
            .clone()
            .map_request(|request: http::Request<axum::body::Body>| {
                request.map(tonic::body::Body::new)
            });
        router = router.route_service(&format!("/{service}/{{*method}}"), entry);
    }
    Ok(tonic::service::Routes::from(router))
}

/// Takes every call to a public service.
#[derive(Debug, Clone)]
struct Entry {
    proxy: Proxy,
}

impl tower::Service<http::Request<tonic::body::Body>> for Entry {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let info = rpc_info(request.uri().path()).filter(|info| info.kind != RpcKind::Internal);
        let Some(info) = info else {
            let status = Status::from(ProxyError::NotServed(request.uri().path().to_owned()));
            return Box::pin(async move { Ok(status.into_http()) });
        };
        let limit = self.proxy.state.config.max_message_bytes;
        let mut grpc = Grpc::new(RawCodec)
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit);
        let handler = Handler {
            proxy: self.proxy.clone(),
            info,
        };
        Box::pin(async move { Ok(grpc.streaming(handler, request).await) })
    }
}

/// Serves one call, whatever its shape: unary calls are streams of one message on the wire.
struct Handler {
    proxy: Proxy,
    info: &'static RpcInfo,
}

impl StreamingService<Bytes> for Handler {
    type Response = Bytes;
    type ResponseStream = ResponseStream;
    type Future = BoxFuture<'static, Result<Response<ResponseStream>, Status>>;

    fn call(&mut self, request: Request<Streaming<Bytes>>) -> Self::Future {
        let proxy = self.proxy.clone();
        let info = self.info;
        Box::pin(async move {
            handle(proxy, info, request).await.map_err(|error| {
                tracing::info!(%error, "call failed");
                Status::from(error)
            })
        })
    }
}

async fn handle(
    proxy: Proxy,
    info: &'static RpcInfo,
    request: Request<Streaming<Bytes>>,
) -> Result<Response<ResponseStream>, ProxyError> {
    if info.scope != HeaderScope::Repository {
        return Err(ProxyError::NotServed(info.path.to_owned()));
    }
    let (metadata, _, mut inbound) = request.into_parts();
    if metadata.contains_key(FENCE_HEADER) {
        return Err(ProxyError::ClientFence(FENCE_HEADER));
    }
    let first = inbound
        .message()
        .await
        .map_err(ProxyError::Inbound)?
        .ok_or(ProxyError::EmptyRequest)?;
    let (repository, located) = header::read(&first)?;
    let virtual_storage = proxy
        .state
        .nodes
        .virtual_storage(&repository.storage)
        .ok_or_else(|| ProxyError::UnknownVirtualStorage(repository.storage.clone()))?
        .name
        .clone();
    let relative_path = RelativePath::parse(&repository.relative_path)?;
    tracing::Span::current().record(
        "repository",
        tracing::field::display(format_args!("{virtual_storage}/{relative_path}")),
    );
    let call = Call {
        info,
        metadata,
        first,
        located,
        inbound,
        virtual_storage,
        relative_path,
    };
    // A push is refused by its own first statement, with git's report: `ng` and the reason
    // for each ref.
    if matches!(
        info.kind,
        RpcKind::Mutator | RpcKind::Creator | RpcKind::Remover
    ) && info.path != write::POST_RECEIVE_PACK
        && let Some(reason) = proxy.state.write_lock.locked()
    {
        return Err(ProxyError::WriteLocked(reason));
    }
    match info.kind {
        RpcKind::Accessor => forward::accessor(&proxy, call).await,
        RpcKind::Mutator if info.path == write::SSH_RECEIVE_PACK => {
            write::ssh_receive_pack(&proxy, call).await
        }
        RpcKind::Mutator => write::mutator(&proxy, call).await,
        RpcKind::Creator => catalog::create(&proxy, call).await,
        RpcKind::Remover => catalog::remove(&proxy, call).await,
        RpcKind::Catalog => catalog::answer(&proxy, call).await,
        RpcKind::Internal | RpcKind::Unspecified => {
            Err(ProxyError::NotServed(info.path.to_owned()))
        }
    }
}

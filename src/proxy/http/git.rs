//! git's smart HTTP protocol, served by calling the proxy's own gRPC router in process: a
//! clone or a push over HTTP takes exactly the routes, pending writes and prepared calls of
//! gRPC.
//! The request is read and admitted in `request.rs`; every failure before the answer starts
//! is a [`GatewayError`].

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use tokio_stream::StreamExt as _;
use tonic::codegen::http::{HeaderMap, Method, Uri};

use super::Gateway;
use super::auth::Caller;
use super::body::{DataStream, FaultCell, pump, request_body};
use super::error::GatewayError;
use super::request::{Endpoint, GitRequest, Service, admit, parse};
use crate::git::pktline;
use crate::model::RepositoryName;
use crate::proto::{
    InfoRefsRequest, PostReceivePackRequest, PostUploadPackRequest, RepositoryHeader,
};

/// The largest fetch negotiation a client may send (the haves and wants of a clone or fetch).
/// A push's size is bounded by the nodes (`git.max_push_bytes`).
const MAX_FETCH_REQUEST: usize = 64 << 20;

/// Serves one smart HTTP request.
pub async fn serve(
    gateway: Gateway,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match answer_request(gateway, &method, &uri, &headers, body).await {
        Ok(response) => response,
        Err(error) => error.response(),
    }
}

async fn answer_request(
    gateway: Gateway,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, GatewayError> {
    let request = parse(method, uri, headers)?;
    let state = gateway.proxy.state();
    let caller = admit(
        &state.config.access_tokens,
        headers,
        &request,
        state.write_lock.locked(),
    )?;
    let GitRequest {
        name,
        endpoint,
        git_protocol,
    } = request;
    tracing::debug!(repository = %name, caller = %caller.name, service = endpoint.service().name(), "git over http");
    let header = Some(RepositoryHeader {
        storage: name.storage.to_string(),
        relative_path: name.relative_path.to_string(),
    });
    let (content_type, stream) = match endpoint {
        Endpoint::Advertise(service) => {
            advertise(gateway, caller, name, service, header, git_protocol).await?
        }
        Endpoint::Post(service) => {
            let body = request_body(headers, body)?;
            // The push makes its repository when it is missing, and only once it is about to
            // commit: a push that fails leaves nothing.
            let create = service == Service::ReceivePack && gateway.push_to_create(&name.storage);
            post(gateway, service, header, git_protocol, body, create).await?
        }
    };
    let mut response = Response::new(Body::from_stream(stream));
    let headers = response.headers_mut();
    headers.insert(
        "content-type",
        content_type.parse().expect("a valid header"),
    );
    headers.insert("cache-control", "no-cache".parse().expect("a valid header"));
    Ok(response)
}

async fn advertise(
    gateway: Gateway,
    caller: Caller,
    name: RepositoryName,
    service: Service,
    header: Option<RepositoryHeader>,
    git_protocol: String,
) -> Result<(String, DataStream), GatewayError> {
    let request = InfoRefsRequest {
        repository: header.clone(),
        git_protocol,
    };
    let content_type = format!("application/x-{}-advertisement", service.name());
    let mut client = gateway.smart_http();
    let response = match service {
        Service::UploadPack => client.info_refs_upload_pack(request).await,
        Service::ReceivePack => match client.info_refs_receive_pack(request).await {
            // Where a push creates its repository, the push is answered as if by an empty
            // one, and the repository is made only when the commands arrive: a dry run, or
            // a push that is refused on the client's side, leaves nothing behind.
            Err(status)
                if gateway.push_to_create(&name.storage)
                    && (status.code() == tonic::Code::NotFound
                        || (status.code() == tonic::Code::Unavailable
                            && being_made(&gateway, &name).await)) =>
            {
                tracing::debug!(repository = %name, caller = %caller.name, "advertising a repository a push will create");
                let advertisement = Bytes::from(empty_receive_pack_advertisement());
                return Ok((
                    content_type,
                    Box::pin(tokio_stream::once(Ok(advertisement))),
                ));
            }
            other => other,
        },
    };
    let stream = answer(response, |m| m.data, None).await?;
    Ok((content_type, stream))
}

/// Whether the repository is still being made (by another push): nothing written yet, and
/// its replicas not recorded. It is as empty as a missing one.
async fn being_made(gateway: &Gateway, name: &RepositoryName) -> bool {
    let store = &gateway.proxy.state().store;
    match store
        .find_repository(&name.storage, &name.relative_path)
        .await
    {
        Ok(Some(record)) => record.generation == 0 && record.up_to_date().next().is_none(),
        _ => false,
    }
}

/// What `git receive-pack --advertise-refs` says for an empty repository (protocol v0, which
/// every client accepts for a push), with the capabilities the nodes' receive-pack honours.
fn empty_receive_pack_advertisement() -> Vec<u8> {
    const CAPABILITIES: &str = "report-status report-status-v2 delete-refs side-band-64k quiet \
atomic ofs-delta object-format=sha1 agent=gitfleet";
    let mut data = pktline::encode(b"# service=git-receive-pack\n");
    data.extend_from_slice(b"0000");
    let zero = "0".repeat(40);
    data.extend(pktline::encode(
        format!("{zero} capabilities^{{}}\0{CAPABILITIES}\n").as_bytes(),
    ));
    data.extend_from_slice(b"0000");
    data
}

async fn post(
    gateway: Gateway,
    service: Service,
    header: Option<RepositoryHeader>,
    git_protocol: String,
    body: DataStream,
    create: bool,
) -> Result<(String, DataStream), GatewayError> {
    let content_type = format!("application/x-{}-result", service.name());
    let mut first = Some(header);
    let mut client = gateway.smart_http();
    let stream = match service {
        Service::UploadPack => {
            let (messages, fault) =
                pump(body, MAX_FETCH_REQUEST, move |data| PostUploadPackRequest {
                    repository: first.take().flatten(),
                    git_protocol: git_protocol.clone(),
                    data,
                });
            let response = client.post_upload_pack(messages).await;
            answer(response, |m| m.data, Some(&fault)).await?
        }
        Service::ReceivePack => {
            let (messages, fault) = pump(body, usize::MAX, move |data| PostReceivePackRequest {
                repository: first.take().flatten(),
                git_protocol: git_protocol.clone(),
                data,
                ..Default::default()
            });
            let mut request = tonic::Request::new(messages);
            if create {
                request.metadata_mut().insert(
                    crate::proxy::PUSH_TO_CREATE_HEADER,
                    "true".parse().expect("a valid value"),
                );
            }
            let response = client.post_receive_pack(request).await;
            answer(response, |m| m.data, Some(&fault)).await?
        }
    };
    Ok((content_type, stream))
}

/// Waits for the first message of an answer before any HTTP status goes out, so that an
/// error the call meets before it has answered anything (a missing repository, an
/// unreachable majority, a request body cut off) reaches git as a status and a message.
async fn answer<M: Send + 'static>(
    response: Result<tonic::Response<tonic::Streaming<M>>, tonic::Status>,
    data: fn(M) -> Bytes,
    fault: Option<&FaultCell>,
) -> Result<DataStream, GatewayError> {
    // A body that ended early is the reason the call failed, whatever the call says.
    let body_fault = || fault.and_then(|fault| fault.get()).copied();
    let mut stream = match response {
        Ok(response) => response.into_inner(),
        Err(status) => return Err(body_fault().map_or(status.into(), GatewayError::from)),
    };
    let first = stream.message().await;
    if let Some(fault) = body_fault() {
        return Err(fault.into());
    }
    match first {
        Err(status) => Err(status.into()),
        Ok(None) => Ok(Box::pin(tokio_stream::empty())),
        Ok(Some(message)) => {
            let first = tokio_stream::once(Ok(data(message)));
            Ok(Box::pin(first.chain(data_stream(stream, data))))
        }
    }
}

/// A response's data fields as a body stream. An error after data has gone out can only end
/// the body early; it is logged.
fn data_stream<M: Send + 'static>(stream: tonic::Streaming<M>, data: fn(M) -> Bytes) -> DataStream {
    Box::pin(stream.map(move |message| match message {
        Ok(message) => Ok(data(message)),
        Err(status) => {
            tracing::warn!(%status, "git over http: the answer broke off");
            Err(std::io::Error::other(status.message().to_owned()))
        }
    }))
}

//! git's smart HTTP protocol, served by calling the proxy's own gRPC router in process: a
//! clone or a push over HTTP takes exactly the routes, write intents and fan-out of gRPC.

use std::pin::Pin;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt as _};
use tonic::codegen::http::{HeaderMap, Method, StatusCode, Uri};

use super::auth::{Caller, authenticate};
use super::{Gateway, text};
use crate::config::TokenScope;
use crate::model::RepositoryName;
use crate::proto::{
    CreateRepositoryRequest, InfoRefsRequest, PostReceivePackRequest, PostUploadPackRequest,
    RepositoryHeader,
};

/// The largest piece of a request body sent in one gRPC message.
const CHUNK: usize = 256 << 10;
/// The largest fetch negotiation a client may send (the haves and wants of a clone or fetch).
/// A push's size is bounded by the nodes (`git.max_push_bytes`).
const MAX_FETCH_REQUEST: usize = 64 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Service {
    UploadPack,
    ReceivePack,
}

impl Service {
    fn name(self) -> &'static str {
        match self {
            Service::UploadPack => "git-upload-pack",
            Service::ReceivePack => "git-receive-pack",
        }
    }
}

/// What a request asks for.
enum Endpoint {
    Advertise(Service),
    Post(Service),
}

/// Serves one smart HTTP request.
pub async fn serve(
    gateway: Gateway,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let decoded = match percent_decode(uri.path()) {
        Ok(decoded) => decoded,
        Err(reason) => return text(StatusCode::BAD_REQUEST, reason),
    };
    let path = decoded.trim_start_matches('/');
    let (repository, endpoint) = match (&method, path) {
        (&Method::GET, _) if path.ends_with("/info/refs") => {
            let service = match uri.query() {
                Some("service=git-upload-pack") => Service::UploadPack,
                Some("service=git-receive-pack") => Service::ReceivePack,
                _ => {
                    return text(
                        StatusCode::FORBIDDEN,
                        "only the smart protocol is served: ask for ?service=git-upload-pack or git-receive-pack",
                    );
                }
            };
            (
                &path[..path.len() - "/info/refs".len()],
                Endpoint::Advertise(service),
            )
        }
        (&Method::POST, _) if path.ends_with("/git-upload-pack") => (
            &path[..path.len() - "/git-upload-pack".len()],
            Endpoint::Post(Service::UploadPack),
        ),
        (&Method::POST, _) if path.ends_with("/git-receive-pack") => (
            &path[..path.len() - "/git-receive-pack".len()],
            Endpoint::Post(Service::ReceivePack),
        ),
        _ => return text(StatusCode::NOT_FOUND, "no such endpoint"),
    };
    let name = match RepositoryName::parse(repository) {
        Ok(name) => name,
        Err(error) => return text(StatusCode::BAD_REQUEST, &error.to_string()),
    };
    let caller = authenticate(&gateway.proxy.state().config.access_tokens, &headers);
    let Some(caller) = caller else {
        let mut response = text(StatusCode::UNAUTHORIZED, "an access token is needed");
        response.headers_mut().insert(
            "www-authenticate",
            "Basic realm=\"gitfleet\"".parse().expect("a valid header"),
        );
        return response;
    };
    let service = match endpoint {
        Endpoint::Advertise(service) | Endpoint::Post(service) => service,
    };
    if let Endpoint::Post(service) = endpoint {
        // As git's own http-backend does: a POST that is not git's is not taken (nor is a
        // form a web page might send with the user's stored credentials).
        let expected = format!("application/x-{}-request", service.name());
        let content_type = headers
            .get("content-type")
            .and_then(|value| value.to_str().ok());
        if content_type != Some(expected.as_str()) {
            return text(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                &format!("expected Content-Type: {expected}"),
            );
        }
    }
    if service == Service::ReceivePack && caller.scope != TokenScope::ReadWrite {
        return text(
            StatusCode::FORBIDDEN,
            &format!("the token of {} may read but not push", caller.name),
        );
    }
    tracing::debug!(repository = %name, caller = %caller.name, service = service.name(), "git over http");
    let git_protocol = headers
        .get("git-protocol")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let header = Some(RepositoryHeader {
        storage: name.storage.to_string(),
        relative_path: name.relative_path.to_string(),
    });
    let result = match endpoint {
        Endpoint::Advertise(service) => {
            advertise(gateway, caller, name, service, header, git_protocol).await
        }
        Endpoint::Post(service) => {
            let body = match request_body(&headers, body) {
                Ok(body) => body,
                Err(response) => return *response,
            };
            post(gateway, service, header, git_protocol, body).await
        }
    };
    let (content_type, stream) = match result {
        Ok(answer) => answer,
        Err(status) => return status_response(&status),
    };
    let mut response = Response::new(Body::from_stream(stream));
    let headers = response.headers_mut();
    headers.insert(
        "content-type",
        content_type.parse().expect("a valid header"),
    );
    headers.insert("cache-control", "no-cache".parse().expect("a valid header"));
    response
}

type DataStream = Pin<Box<dyn Stream<Item = Result<Bytes, std::io::Error>> + Send>>;

async fn advertise(
    gateway: Gateway,
    caller: Caller,
    name: RepositoryName,
    service: Service,
    header: Option<RepositoryHeader>,
    git_protocol: String,
) -> Result<(String, DataStream), tonic::Status> {
    let request = InfoRefsRequest {
        repository: header.clone(),
        git_protocol,
    };
    let may_create = gateway.push_to_create(&name.storage);
    let mut client = gateway.smart_http();
    let response = match service {
        Service::UploadPack => client.info_refs_upload_pack(request.clone()).await,
        Service::ReceivePack => {
            let first = client.info_refs_receive_pack(request.clone()).await;
            match first {
                Err(status) if status.code() == tonic::Code::NotFound && may_create => {
                    let mut repositories = gateway.repositories();
                    let create = CreateRepositoryRequest {
                        repository: header,
                        default_branch: String::new(),
                    };
                    repositories.create_repository(create).await?;
                    tracing::info!(repository = %name, caller = %caller.name, "created by push");
                    client.info_refs_receive_pack(request).await
                }
                other => other,
            }
        }
    }?;
    let content_type = format!("application/x-{}-advertisement", service.name());
    Ok((content_type, data_stream(response.into_inner(), |m| m.data)))
}

async fn post(
    gateway: Gateway,
    service: Service,
    header: Option<RepositoryHeader>,
    git_protocol: String,
    body: DataStream,
) -> Result<(String, DataStream), tonic::Status> {
    let content_type = format!("application/x-{}-result", service.name());
    let mut first = Some(header);
    let mut client = gateway.smart_http();
    let response = match service {
        Service::UploadPack => {
            let messages = pump(body, MAX_FETCH_REQUEST, move |data| PostUploadPackRequest {
                repository: first.take().flatten(),
                git_protocol: git_protocol.clone(),
                data,
            });
            let response = client.post_upload_pack(messages).await?;
            data_stream(response.into_inner(), |m| m.data)
        }
        Service::ReceivePack => {
            let messages = pump(body, usize::MAX, move |data| PostReceivePackRequest {
                repository: first.take().flatten(),
                git_protocol: git_protocol.clone(),
                data,
            });
            let response = client.post_receive_pack(messages).await?;
            data_stream(response.into_inner(), |m| m.data)
        }
    };
    Ok((content_type, response))
}

/// Turns a request body into request messages, in a task of its own, pieces no larger than
/// [`CHUNK`]. A body that breaks off, or grows past `limit` bytes (after gunzipping), ends
/// the messages early: the node then sees an incomplete request and changes nothing.
fn pump<M: Send + 'static>(
    mut body: DataStream,
    limit: usize,
    mut message: impl FnMut(Bytes) -> M + Send + 'static,
) -> ReceiverStream<M> {
    let (message_tx, message_rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        let mut seen = 0usize;
        while let Some(Ok(chunk)) = body.next().await {
            seen = seen.saturating_add(chunk.len());
            if seen > limit {
                tracing::warn!(limit, "request body too large: cut off");
                return;
            }
            for piece in split(chunk) {
                if message_tx.send(message(piece)).await.is_err() {
                    return;
                }
            }
        }
    });
    ReceiverStream::new(message_rx)
}

/// Decodes %XX escapes in a URL path. An escaped `/` or NUL, a broken escape, or a result
/// that is not UTF-8 is refused.
fn percent_decode(path: &str) -> Result<String, &'static str> {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] != b'%' {
            out.push(bytes[index]);
            index += 1;
            continue;
        }
        let hex = bytes
            .get(index + 1..index + 3)
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok())
            .ok_or("the path has a broken %-escape")?;
        if hex == b'/' || hex == 0 {
            return Err("the path has an escaped '/' or NUL");
        }
        out.push(hex);
        index += 3;
    }
    String::from_utf8(out).map_err(|_| "the path is not UTF-8")
}

/// Splits a body chunk into pieces that fit a gRPC message.
fn split(chunk: Bytes) -> Vec<Bytes> {
    let mut pieces = Vec::with_capacity(chunk.len() / CHUNK + 1);
    let mut rest = chunk;
    while rest.len() > CHUNK {
        pieces.push(rest.split_to(CHUNK));
    }
    if !rest.is_empty() {
        pieces.push(rest);
    }
    pieces
}

/// The request body as a stream of bytes, gunzipped when git compressed it.
fn request_body(headers: &HeaderMap, body: Body) -> Result<DataStream, Box<Response>> {
    let stream = body
        .into_data_stream()
        .map(|chunk| chunk.map_err(std::io::Error::other));
    match headers
        .get("content-encoding")
        .and_then(|value| value.to_str().ok())
    {
        None | Some("identity") => Ok(Box::pin(stream)),
        Some("gzip") | Some("x-gzip") => {
            let reader = tokio_util::io::StreamReader::new(stream);
            let decoder = async_compression::tokio::bufread::GzipDecoder::new(reader);
            Ok(Box::pin(tokio_util::io::ReaderStream::with_capacity(
                decoder, CHUNK,
            )))
        }
        Some(other) => Err(Box::new(text(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            &format!("content encoding {other:?} is not supported"),
        ))),
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

/// An error before any data: an HTTP status and a message git shows its user.
fn status_response(status: &tonic::Status) -> Response {
    let code = match status.code() {
        tonic::Code::InvalidArgument | tonic::Code::OutOfRange => StatusCode::BAD_REQUEST,
        tonic::Code::NotFound => StatusCode::NOT_FOUND,
        tonic::Code::AlreadyExists | tonic::Code::Aborted => StatusCode::CONFLICT,
        tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
        tonic::Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        tonic::Code::FailedPrecondition => StatusCode::PRECONDITION_FAILED,
        tonic::Code::ResourceExhausted => StatusCode::PAYLOAD_TOO_LARGE,
        tonic::Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        tonic::Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        tonic::Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        tonic::Code::Ok
        | tonic::Code::Cancelled
        | tonic::Code::Unknown
        | tonic::Code::Internal
        | tonic::Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    };
    text(code, status.message())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_percent_decoded_and_escaped_slashes_refused() {
        assert_eq!(
            percent_decode("/default/a%20b.git").unwrap(),
            "/default/a b.git"
        );
        assert_eq!(percent_decode("/plain/x.git").unwrap(), "/plain/x.git");
        assert!(percent_decode("/default/a%2Fb.git").is_err());
        assert!(percent_decode("/default/a%2f..%2fb").is_err());
        assert!(percent_decode("/default/%00").is_err());
        assert!(percent_decode("/default/%zz").is_err());
        assert!(percent_decode("/default/%e9.git").is_err());
    }

    #[test]
    fn large_chunks_are_split_to_fit_a_message() {
        let chunk = Bytes::from(vec![7u8; CHUNK * 2 + 10]);
        let pieces = split(chunk);
        assert_eq!(
            pieces.iter().map(Bytes::len).collect::<Vec<_>>(),
            [CHUNK, CHUNK, 10]
        );
        assert!(split(Bytes::new()).is_empty());
    }
}

//! git's smart HTTP protocol, served by calling the proxy's own gRPC router in process: a
//! clone or a push over HTTP takes exactly the routes, write intents and fan-out of gRPC.

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use tokio_stream::StreamExt as _;
use tonic::codegen::http::{HeaderMap, Method, StatusCode, Uri};

use super::auth::{Caller, authenticate};
use super::body::{DataStream, FaultCell, pump, request_body};
use super::{Gateway, text};
use crate::config::TokenScope;
use crate::git::pktline;
use crate::model::RepositoryName;
use crate::proto::{
    CreateRepositoryRequest, InfoRefsRequest, PostReceivePackRequest, PostUploadPackRequest,
    RepositoryExistsRequest, RepositoryHeader,
};

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
    // Turned away before the pack is sent, with the reason git shows its user.
    if service == Service::ReceivePack
        && let Some(reason) = gateway.proxy.state().write_lock.locked()
    {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("writes are locked for maintenance: {reason}"),
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
            if service == Service::ReceivePack
                && let Err(status) = create_for_push(&gateway, &caller, &name, &header).await
            {
                return status_response(&status);
            }
            post(gateway, service, header, git_protocol, body).await
        }
    };
    let (content_type, stream) = match result {
        Ok(answer) => answer,
        Err(response) => return *response,
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

async fn advertise(
    gateway: Gateway,
    caller: Caller,
    name: RepositoryName,
    service: Service,
    header: Option<RepositoryHeader>,
    git_protocol: String,
) -> Result<(String, DataStream), Box<Response>> {
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
                if status.code() == tonic::Code::NotFound
                    && gateway.push_to_create(&name.storage) =>
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

/// Creates the repository a push names, when its virtual storage lets a push create and it
/// does not exist yet. Two pushes racing to create it both go on.
async fn create_for_push(
    gateway: &Gateway,
    caller: &Caller,
    name: &RepositoryName,
    header: &Option<RepositoryHeader>,
) -> Result<(), tonic::Status> {
    if !gateway.push_to_create(&name.storage) {
        return Ok(());
    }
    let mut repositories = gateway.repositories();
    let exists = repositories
        .repository_exists(RepositoryExistsRequest {
            repository: header.clone(),
        })
        .await?
        .into_inner()
        .exists;
    if exists {
        return Ok(());
    }
    let create = CreateRepositoryRequest {
        repository: header.clone(),
        default_branch: String::new(),
    };
    match repositories.create_repository(create).await {
        Ok(_) => {
            tracing::info!(repository = %name, caller = %caller.name, "created by push");
            Ok(())
        }
        Err(status) if status.code() == tonic::Code::AlreadyExists => Ok(()),
        Err(status) => Err(status),
    }
}

async fn post(
    gateway: Gateway,
    service: Service,
    header: Option<RepositoryHeader>,
    git_protocol: String,
    body: DataStream,
) -> Result<(String, DataStream), Box<Response>> {
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
            });
            let response = client.post_receive_pack(messages).await;
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
) -> Result<DataStream, Box<Response>> {
    let fault_response = || {
        fault
            .and_then(|fault| fault.get())
            .map(|f| Box::new(f.response()))
    };
    let mut stream = match response {
        Ok(response) => response.into_inner(),
        Err(status) => {
            return Err(fault_response().unwrap_or_else(|| Box::new(status_response(&status))));
        }
    };
    let first = stream.message().await;
    if let Some(response) = fault_response() {
        return Err(response);
    }
    match first {
        Err(status) => Err(Box::new(status_response(&status))),
        Ok(None) => Ok(Box::pin(tokio_stream::empty())),
        Ok(Some(message)) => {
            let first = tokio_stream::once(Ok(data(message)));
            Ok(Box::pin(first.chain(data_stream(stream, data))))
        }
    }
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
}

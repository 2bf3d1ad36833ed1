//! Reading a git request over HTTP, apart from serving it: which repository and endpoint it
//! names, and whether its caller may have it. Both are plain functions of the request.

use tonic::codegen::http::{HeaderMap, Method, Uri};

use super::auth::{Caller, authenticate};
use super::error::GatewayError;
use crate::config::{AccessToken, TokenScope};
use crate::model::RepositoryName;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Service {
    UploadPack,
    ReceivePack,
}

impl Service {
    pub(super) fn name(self) -> &'static str {
        match self {
            Service::UploadPack => "git-upload-pack",
            Service::ReceivePack => "git-receive-pack",
        }
    }
}

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Endpoint {
    Advertise(Service),
    Post(Service),
}

impl Endpoint {
    pub(super) fn service(self) -> Service {
        match self {
            Endpoint::Advertise(service) | Endpoint::Post(service) => service,
        }
    }
}

/// A git request, read.
#[derive(Debug)]
pub(super) struct GitRequest {
    pub name: RepositoryName,
    pub endpoint: Endpoint,
    /// The `Git-Protocol` header, passed on to the node.
    pub git_protocol: String,
}

/// Reads the repository and the endpoint from the request line.
pub(super) fn parse(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<GitRequest, GatewayError> {
    let decoded = percent_decode(uri.path()).map_err(GatewayError::BadPath)?;
    let path = decoded.trim_start_matches('/');
    let (repository, endpoint) = match (method, path) {
        (&Method::GET, _) if path.ends_with("/info/refs") => {
            let service = match uri.query() {
                Some("service=git-upload-pack") => Service::UploadPack,
                Some("service=git-receive-pack") => Service::ReceivePack,
                _ => return Err(GatewayError::NotSmart),
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
        _ => return Err(GatewayError::NoEndpoint),
    };
    let name = RepositoryName::parse(repository)
        .map_err(|error| GatewayError::BadName(error.to_string()))?;
    let git_protocol = headers
        .get("git-protocol")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    Ok(GitRequest {
        name,
        endpoint,
        git_protocol,
    })
}

/// Decides whether the request is taken: its token, its content type, its token's scope, and
/// for a push the maintenance write lock (`write_lock`: its reason while it is on).
pub(super) fn admit(
    tokens: &[AccessToken],
    headers: &HeaderMap,
    request: &GitRequest,
    write_lock: Option<String>,
) -> Result<Caller, GatewayError> {
    let caller = authenticate(tokens, headers).ok_or(GatewayError::Unauthenticated)?;
    if let Endpoint::Post(service) = request.endpoint {
        // As git's own http-backend does: a POST that is not git's is not taken (nor is a
        // form a web page might send with the user's stored credentials).
        let expected = format!("application/x-{}-request", service.name());
        let content_type = headers
            .get("content-type")
            .and_then(|value| value.to_str().ok());
        if content_type != Some(expected.as_str()) {
            return Err(GatewayError::ContentType(expected));
        }
    }
    let service = request.endpoint.service();
    if service == Service::ReceivePack && caller.scope != TokenScope::ReadWrite {
        return Err(GatewayError::ReadOnly(caller.name));
    }
    // Turned away before the pack is sent, with the reason git shows its user. A push whose
    // pack is already on its way is refused by the push itself, with an `ng` per ref.
    if let Endpoint::Advertise(Service::ReceivePack) = request.endpoint
        && let Some(reason) = write_lock
    {
        return Err(GatewayError::WriteLocked(reason));
    }
    Ok(caller)
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

#[cfg(test)]
mod tests {
    use base64::Engine as _;

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

    fn read(method: Method, uri: &str) -> Result<GitRequest, GatewayError> {
        parse(&method, &uri.parse().unwrap(), &HeaderMap::new())
    }

    #[test]
    fn the_repository_and_endpoint_are_read_from_the_path() {
        let request = read(
            Method::GET,
            "/default/group/x.git/info/refs?service=git-receive-pack",
        )
        .unwrap();
        assert_eq!(request.name.to_string(), "default/group/x.git");
        assert_eq!(request.endpoint, Endpoint::Advertise(Service::ReceivePack));
        let request = read(Method::POST, "/default/x.git/git-upload-pack").unwrap();
        assert_eq!(request.endpoint, Endpoint::Post(Service::UploadPack));

        assert!(matches!(
            read(Method::GET, "/default/x.git/info/refs"),
            Err(GatewayError::NotSmart)
        ));
        assert!(matches!(
            read(Method::GET, "/default/x.git/git-upload-pack"),
            Err(GatewayError::NoEndpoint)
        ));
        assert!(matches!(
            read(Method::POST, "/default/../x.git/git-upload-pack"),
            Err(GatewayError::BadName(_))
        ));
    }

    fn headers(password: &str, content_type: Option<&str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        let value = base64::engine::general_purpose::STANDARD.encode(format!("git:{password}"));
        headers.insert("authorization", format!("Basic {value}").parse().unwrap());
        if let Some(content_type) = content_type {
            headers.insert("content-type", content_type.parse().unwrap());
        }
        headers
    }

    #[test]
    fn a_push_needs_a_read_write_token_git_s_content_type_and_no_write_lock() {
        let tokens = vec![
            AccessToken {
                name: "reader".into(),
                token: "read-only-token-0123456789".into(),
                scope: TokenScope::Read,
            },
            AccessToken {
                name: "writer".into(),
                token: "read-write-token-0123456789".into(),
                scope: TokenScope::ReadWrite,
            },
        ];
        let push = read(Method::POST, "/default/x.git/git-receive-pack").unwrap();
        let fetch = read(Method::POST, "/default/x.git/git-upload-pack").unwrap();
        let push_type = Some("application/x-git-receive-pack-request");
        let fetch_type = Some("application/x-git-upload-pack-request");

        let writer = headers("read-write-token-0123456789", push_type);
        assert_eq!(admit(&tokens, &writer, &push, None).unwrap().name, "writer");
        // The lock turns a push away at its advertisement; a pack already on its way is
        // refused by the push, ref by ref.
        let advertise = read(
            Method::GET,
            "/default/x.git/info/refs?service=git-receive-pack",
        )
        .unwrap();
        assert!(matches!(
            admit(&tokens, &headers("read-write-token-0123456789", None), &advertise, Some("upgrade".into())),
            Err(GatewayError::WriteLocked(reason)) if reason == "upgrade"
        ));
        assert!(admit(&tokens, &writer, &push, Some("upgrade".into())).is_ok());
        let reader = headers("read-only-token-0123456789", push_type);
        assert!(matches!(
            admit(&tokens, &reader, &push, None),
            Err(GatewayError::ReadOnly(name)) if name == "reader"
        ));
        let reader = headers("read-only-token-0123456789", fetch_type);
        assert!(admit(&tokens, &reader, &fetch, Some("upgrade".into())).is_ok());
        assert!(matches!(
            admit(&tokens, &headers("wrong", push_type), &push, None),
            Err(GatewayError::Unauthenticated)
        ));
        assert!(matches!(
            admit(
                &tokens,
                &headers("read-write-token-0123456789", Some("text/plain")),
                &push,
                None
            ),
            Err(GatewayError::ContentType(_))
        ));
    }
}

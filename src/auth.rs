//! Call authentication between gitfleet processes.
//!
//! Caller and callee share a secret (the configured `token`), which never crosses the wire.
//! Each call carries `authorization: Bearer v1.<unix-seconds>.<hex HMAC-SHA256>.<scope>` where
//! the MAC is computed over `gitfleet-v1:<unix-seconds>:<scope>` with the shared secret, and the
//! scope is `*` or a comma-separated list of gRPC method paths the token may call. The callee
//! recomputes the MAC, compares it in constant time, accepts the call only if the timestamp is
//! within the validity window of its own clock (60 seconds by default), and only for a method
//! the scope names. A captured header therefore works for one method (clients that mint a token
//! per call scope it to that call) and stops working once the window has passed.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tonic::codegen::http;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::{Request, Status};

type HmacSha256 = Hmac<Sha256>;

const VERSION: &str = "v1";

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A scope that allows every method.
pub const ANY_METHOD: &str = "*";

/// The scope of a token that a node uses to replicate from another: it may read the source
/// repository and nothing else.
pub const REPLICATION_SCOPE: &str = "/gitfleet.v1.SshService/SshUploadPack,\
     /gitfleet.v1.RefService/FindDefaultBranch,/gitfleet.v1.RefService/ListRefs";

fn mac(secret: &[u8], timestamp: u64, scope: &str) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(format!("gitfleet-{VERSION}:{timestamp}:{scope}").as_bytes());
    mac
}

/// Checks that a scope is `*` or a list of method paths, none of them empty.
pub fn check_scope(scope: &str) -> Result<(), AuthError> {
    if scope == ANY_METHOD
        || scope
            .split(',')
            .all(|method| method.starts_with('/') && method.len() > 1)
    {
        Ok(())
    } else {
        Err(AuthError::Malformed)
    }
}

/// Mints a token for calls made at `timestamp` (seconds since the epoch) to the methods in
/// `scope`.
pub fn sign_at(secret: &str, timestamp: u64, scope: &str) -> String {
    let tag = mac(secret.as_bytes(), timestamp, scope)
        .finalize()
        .into_bytes();
    format!("{VERSION}.{timestamp}.{}.{scope}", hex::encode(tag))
}

/// Mints a token for calls made now to the methods in `scope`.
pub fn sign(secret: &str, scope: &str) -> String {
    sign_at(secret, unix_now(), scope)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing authorization header: every call needs 'authorization: Bearer <token>'")]
    Missing,
    #[error("malformed token: expected v1.<timestamp>.<signature>.<scope>")]
    Malformed,
    #[error(
        "token expired or not yet valid: its time is {skew}s from this server's clock (the limit is {limit}s)"
    )]
    Expired { skew: u64, limit: u64 },
    #[error("invalid token signature")]
    BadSignature,
    #[error("the token does not allow {method} (its scope is {scope})")]
    OutOfScope { method: String, scope: String },
}

/// Checks a token for a call to `method` against the shared secret at `now`.
pub fn verify_at(
    secret: &str,
    token: &str,
    method: &str,
    validity: Duration,
    now: u64,
) -> Result<(), AuthError> {
    let mut parts = token.splitn(4, '.');
    let (Some(VERSION), Some(timestamp), Some(signature), Some(scope)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Malformed);
    };
    if timestamp.is_empty() || !timestamp.bytes().all(|b| b.is_ascii_digit()) {
        return Err(AuthError::Malformed);
    }
    let timestamp: u64 = timestamp.parse().map_err(|_| AuthError::Malformed)?;
    check_scope(scope)?;
    let signature = hex::decode(signature).map_err(|_| AuthError::Malformed)?;
    // The signature is checked first so that an unauthenticated caller learns nothing about
    // the server's clock.
    mac(secret.as_bytes(), timestamp, scope)
        .verify_slice(&signature)
        .map_err(|_| AuthError::BadSignature)?;
    let skew = now.abs_diff(timestamp);
    if skew > validity.as_secs() {
        return Err(AuthError::Expired {
            skew,
            limit: validity.as_secs(),
        });
    }
    if scope != ANY_METHOD && !scope.split(',').any(|allowed| allowed == method) {
        return Err(AuthError::OutOfScope {
            method: method.to_owned(),
            scope: scope.to_owned(),
        });
    }
    Ok(())
}

/// Server side: refuses calls without a valid token with `Unauthenticated`.
#[derive(Clone)]
pub struct Verifier {
    secret: std::sync::Arc<str>,
    validity: Duration,
}

impl Verifier {
    pub fn new(secret: &str, validity: Duration) -> Self {
        Self {
            secret: secret.into(),
            validity,
        }
    }
}

impl Interceptor for Verifier {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .ok_or_else(|| Status::unauthenticated(AuthError::Missing.to_string()))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|value| value.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated(AuthError::Malformed.to_string()))?;
        // Fails closed: a server that forgot the CallPathLayer accepts no call.
        let method = request
            .extensions()
            .get::<CallPath>()
            .map(|path| path.0.clone())
            .ok_or_else(|| {
                Status::unauthenticated("the server cannot tell which method was called")
            })?;
        let method = method.as_ref();
        verify_at(&self.secret, token, method, self.validity, unix_now()).map_err(|error| {
            match error {
                AuthError::OutOfScope { .. } => Status::permission_denied(error.to_string()),
                _ => Status::unauthenticated(error.to_string()),
            }
        })?;
        Ok(request)
    }
}

/// The gRPC path of the call being served, put in the request's extensions by [`CallPathLayer`]
/// for the [`Verifier`] to check the token's scope against.
#[derive(Debug, Clone)]
pub struct CallPath(std::sync::Arc<str>);

/// Server layer that records each request's path as a [`CallPath`].
#[derive(Debug, Clone, Default)]
pub struct CallPathLayer;

impl<S> tower::Layer<S> for CallPathLayer {
    type Service = RecordCallPath<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RecordCallPath(inner)
    }
}

#[derive(Debug, Clone)]
pub struct RecordCallPath<S>(S);

impl<S, B> tower::Service<http::Request<B>> for RecordCallPath<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let path = CallPath(request.uri().path().into());
        request.extensions_mut().insert(path);
        self.0.call(request)
    }
}

/// How a client authenticates its calls.
#[derive(Clone)]
pub enum Credentials {
    /// Mint a fresh token from the shared secret for every call, scoped to that call's method.
    Secret(std::sync::Arc<str>),
    /// Send a token minted elsewhere, as it is.
    Signed(std::sync::Arc<str>),
}

/// Client side: adds the authorization header to every call.
#[derive(Clone)]
pub struct Signer {
    credentials: Credentials,
}

impl Signer {
    pub fn new(credentials: Credentials) -> Self {
        Self { credentials }
    }

    pub fn from_secret(secret: &str) -> Self {
        Self::new(Credentials::Secret(secret.into()))
    }
}

impl Interceptor for Signer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let token = match &self.credentials {
            Credentials::Secret(secret) => {
                // A token is never minted wider than the call it is for.
                let method = request.extensions().get::<tonic::GrpcMethod<'static>>().ok_or_else(|| {
                    Status::internal("cannot tell which method is being called: refusing to mint an unscoped token")
                })?;
                let scope = format!("/{}/{}", method.service(), method.method());
                sign(secret, &scope)
            }
            Credentials::Signed(token) => token.to_string(),
        };
        let value = MetadataValue::try_from(format!("Bearer {token}")).map_err(|_| {
            Status::invalid_argument("token contains characters not allowed in a header")
        })?;
        request.metadata_mut().insert("authorization", value);
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "correct horse battery staple";
    const WINDOW: Duration = Duration::from_secs(60);
    const METHOD: &str = "/gitfleet.v1.RefService/ListRefs";

    #[test]
    fn a_fresh_token_verifies() {
        let token = sign_at(SECRET, 1_000_000, METHOD);
        assert_eq!(verify_at(SECRET, &token, METHOD, WINDOW, 1_000_030), Ok(()));
        assert_eq!(verify_at(SECRET, &token, METHOD, WINDOW, 999_950), Ok(()));
        let any = sign_at(SECRET, 1_000_000, ANY_METHOD);
        assert_eq!(verify_at(SECRET, &any, "/x.Y/Z", WINDOW, 1_000_000), Ok(()));
    }

    #[test]
    fn a_replayed_token_expires() {
        let token = sign_at(SECRET, 1_000_000, METHOD);
        assert_eq!(
            verify_at(SECRET, &token, METHOD, WINDOW, 1_000_061),
            Err(AuthError::Expired {
                skew: 61,
                limit: 60
            })
        );
    }

    #[test]
    fn a_token_works_only_for_the_methods_it_names() {
        let token = sign_at(SECRET, 1_000_000, REPLICATION_SCOPE);
        for allowed in REPLICATION_SCOPE.split(',') {
            assert_eq!(
                verify_at(SECRET, &token, allowed, WINDOW, 1_000_000),
                Ok(())
            );
        }
        let denied = "/gitfleet.v1.RepositoryService/RemoveRepository";
        assert!(matches!(
            verify_at(SECRET, &token, denied, WINDOW, 1_000_000),
            Err(AuthError::OutOfScope { .. })
        ));
        // Widening the scope breaks the signature.
        let widened = token.replacen(REPLICATION_SCOPE, ANY_METHOD, 1);
        assert_eq!(
            verify_at(SECRET, &widened, denied, WINDOW, 1_000_000),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn wrong_secret_or_tampering_is_refused() {
        let token = sign_at(SECRET, 1_000_000, METHOD);
        assert_eq!(
            verify_at("another secret!!", &token, METHOD, WINDOW, 1_000_000),
            Err(AuthError::BadSignature)
        );
        let moved = token.replacen("1000000", "1000100", 1);
        assert_eq!(
            verify_at(SECRET, &moved, METHOD, WINDOW, 1_000_100),
            Err(AuthError::BadSignature)
        );
        for garbage in [
            "",
            "v1",
            "v1.x.y.z",
            "v2.1.00.*",
            "v1.1.zz.*",
            "v1.1.00",
            "v1.+1.00.*",
            "v1.1.00.",
            "v1.1.00./a,,/b",
        ] {
            assert_eq!(
                verify_at(SECRET, garbage, METHOD, WINDOW, 1),
                Err(AuthError::Malformed),
                "{garbage:?}"
            );
        }
    }
}

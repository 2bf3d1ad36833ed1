//! Call authentication between gitfleet processes.
//!
//! Caller and callee share a secret (the configured `token`), which never crosses the wire.
//! Each call carries `authorization: Bearer v1.<unix-seconds>.<hex HMAC-SHA256>` where the MAC
//! is computed over `gitfleet-v1:<unix-seconds>` with the shared secret. The callee recomputes
//! the MAC, compares it in constant time, and accepts the call only if the timestamp is within
//! the validity window of its own clock (60 seconds by default). A captured header therefore
//! stops working once the window has passed.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::Sha256;
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

fn mac(secret: &[u8], timestamp: u64) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(format!("gitfleet-{VERSION}:{timestamp}").as_bytes());
    mac
}

/// Mints the token for a call made at `timestamp` (seconds since the epoch).
pub fn sign_at(secret: &str, timestamp: u64) -> String {
    let tag = mac(secret.as_bytes(), timestamp).finalize().into_bytes();
    format!("{VERSION}.{timestamp}.{}", hex::encode(tag))
}

/// Mints the token for a call made now.
pub fn sign(secret: &str) -> String {
    sign_at(secret, unix_now())
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing authorization header: every call needs 'authorization: Bearer <token>'")]
    Missing,
    #[error("malformed token: expected v1.<timestamp>.<signature>")]
    Malformed,
    #[error(
        "token expired or not yet valid: its time is {skew}s from this server's clock (the limit is {limit}s)"
    )]
    Expired { skew: u64, limit: u64 },
    #[error("invalid token signature")]
    BadSignature,
}

/// Checks a token against the shared secret at `now`.
pub fn verify_at(secret: &str, token: &str, validity: Duration, now: u64) -> Result<(), AuthError> {
    let mut parts = token.splitn(3, '.');
    let (Some(VERSION), Some(timestamp), Some(signature)) =
        (parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Malformed);
    };
    let timestamp: u64 = timestamp.parse().map_err(|_| AuthError::Malformed)?;
    let signature = hex::decode(signature).map_err(|_| AuthError::Malformed)?;
    // The signature is checked first so that an unauthenticated caller learns nothing about
    // the server's clock.
    mac(secret.as_bytes(), timestamp)
        .verify_slice(&signature)
        .map_err(|_| AuthError::BadSignature)?;
    let skew = now.abs_diff(timestamp);
    if skew > validity.as_secs() {
        return Err(AuthError::Expired {
            skew,
            limit: validity.as_secs(),
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
        verify_at(&self.secret, token, self.validity, unix_now())
            .map_err(|error| Status::unauthenticated(error.to_string()))?;
        Ok(request)
    }
}

/// How a client authenticates its calls.
#[derive(Clone)]
pub enum Credentials {
    /// Mint a fresh token from the shared secret for every call.
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
            Credentials::Secret(secret) => sign(secret),
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

    #[test]
    fn a_fresh_token_verifies() {
        let token = sign_at(SECRET, 1_000_000);
        assert_eq!(verify_at(SECRET, &token, WINDOW, 1_000_030), Ok(()));
        assert_eq!(verify_at(SECRET, &token, WINDOW, 999_950), Ok(()));
    }

    #[test]
    fn a_replayed_token_expires() {
        let token = sign_at(SECRET, 1_000_000);
        assert_eq!(
            verify_at(SECRET, &token, WINDOW, 1_000_061),
            Err(AuthError::Expired {
                skew: 61,
                limit: 60
            })
        );
    }

    #[test]
    fn wrong_secret_or_tampering_is_refused() {
        let token = sign_at(SECRET, 1_000_000);
        assert_eq!(
            verify_at("another secret!!", &token, WINDOW, 1_000_000),
            Err(AuthError::BadSignature)
        );
        let moved = token.replacen("1000000", "1000100", 1);
        assert_eq!(
            verify_at(SECRET, &moved, WINDOW, 1_000_100),
            Err(AuthError::BadSignature)
        );
        for garbage in ["", "v1", "v1.x.y", "v2.1.00", "v1.1.zz"] {
            assert_eq!(
                verify_at(SECRET, garbage, WINDOW, 1),
                Err(AuthError::Malformed),
                "{garbage:?}"
            );
        }
    }
}

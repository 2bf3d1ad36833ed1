//! HTTP Basic auth for git clients: the password is an access token from the config, compared
//! in constant time against every configured token.

use base64::Engine as _;
use tonic::codegen::http::HeaderMap;

use crate::config::{AccessToken, TokenScope};

/// Who is calling, once their token matched.
#[derive(Debug, Clone)]
pub struct Caller {
    pub name: String,
    pub scope: TokenScope,
}

/// Finds the token given in an `Authorization: Basic` header. Every configured token is
/// compared, whichever matches, so the time taken says nothing about which one did.
pub fn authenticate(tokens: &[AccessToken], headers: &HeaderMap) -> Option<Caller> {
    let value = headers.get("authorization")?.to_str().ok()?;
    let encoded = value
        .strip_prefix("Basic ")
        .or_else(|| value.strip_prefix("basic "))?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (_user, password) = decoded.split_once(':')?;
    let mut found = None;
    for token in tokens {
        if constant_time_eq(token.token.as_bytes(), password.as_bytes()) {
            found = Some(Caller {
                name: token.name.clone(),
                scope: token.scope,
            });
        }
    }
    found
}

/// Compares two secrets in constant time. Their SHA-256 digests are compared, so not even
/// a token's length shows in the time taken.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use sha2::Digest as _;
    let (a, b) = (sha2::Sha256::digest(a), sha2::Sha256::digest(b));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(user: &str, password: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        let value = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        headers.insert("authorization", format!("Basic {value}").parse().unwrap());
        headers
    }

    #[test]
    fn only_a_configured_token_is_accepted() {
        let tokens = vec![
            AccessToken {
                name: "ci".into(),
                token: "read-only-token-0123456789".into(),
                scope: TokenScope::Read,
            },
            AccessToken {
                name: "dev".into(),
                token: "read-write-token-0123456789".into(),
                scope: TokenScope::ReadWrite,
            },
        ];
        let caller =
            authenticate(&tokens, &basic("anyone", "read-write-token-0123456789")).unwrap();
        assert_eq!(
            (caller.name.as_str(), caller.scope),
            ("dev", TokenScope::ReadWrite)
        );
        let caller = authenticate(&tokens, &basic("x", "read-only-token-0123456789")).unwrap();
        assert_eq!(caller.scope, TokenScope::Read);
        assert!(authenticate(&tokens, &basic("dev", "read-write-token-012345678")).is_none());
        assert!(authenticate(&tokens, &basic("dev", "")).is_none());
        assert!(authenticate(&tokens, &HeaderMap::new()).is_none());
        let mut garbage = HeaderMap::new();
        garbage.insert("authorization", "Basic !!!".parse().unwrap());
        assert!(authenticate(&tokens, &garbage).is_none());
    }
}

//! Every way a git request over HTTP can fail before its answer starts, and the one mapping of
//! each to an HTTP status and the message git shows its user.

use axum::response::Response;
use tonic::codegen::http::StatusCode;

use crate::http::text;

#[derive(Debug, thiserror::Error)]
pub(super) enum GatewayError {
    #[error("{0}")]
    BadPath(&'static str),
    #[error(
        "only the smart protocol is served: ask for ?service=git-upload-pack or git-receive-pack"
    )]
    NotSmart,
    #[error("no such endpoint")]
    NoEndpoint,
    #[error("{0}")]
    BadName(String),
    #[error("an access token is needed")]
    Unauthenticated,
    #[error("expected Content-Type: {0}")]
    ContentType(String),
    #[error("content encoding {0:?} is not supported")]
    ContentEncoding(String),
    #[error("the token of {0} may read but not push")]
    ReadOnly(String),
    #[error("writes are locked for maintenance: {0}")]
    WriteLocked(String),
    #[error("the request is larger than {} MiB", .0 >> 20)]
    TooLarge(usize),
    #[error("the request body broke off, or its gzip is damaged")]
    BrokeOff,
    #[error("the request body sent nothing for {} s", .0.as_secs())]
    Stalled(std::time::Duration),
    /// The call through the proxy's gRPC routes failed: its code says how.
    #[error("{}", .0.message())]
    Call(tonic::Status),
    #[error("{0}")]
    Internal(String),
}

impl From<tonic::Status> for GatewayError {
    fn from(status: tonic::Status) -> Self {
        GatewayError::Call(status)
    }
}

impl GatewayError {
    pub(super) fn status(&self) -> StatusCode {
        match self {
            GatewayError::BadPath(_) | GatewayError::BadName(_) | GatewayError::BrokeOff => {
                StatusCode::BAD_REQUEST
            }
            GatewayError::NotSmart | GatewayError::ReadOnly(_) => StatusCode::FORBIDDEN,
            GatewayError::NoEndpoint => StatusCode::NOT_FOUND,
            GatewayError::Unauthenticated => StatusCode::UNAUTHORIZED,
            GatewayError::ContentType(_) | GatewayError::ContentEncoding(_) => {
                StatusCode::UNSUPPORTED_MEDIA_TYPE
            }
            GatewayError::WriteLocked(_) => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::Stalled(_) => StatusCode::REQUEST_TIMEOUT,
            GatewayError::Call(status) => call_status(status.code()),
            GatewayError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The response git gets: the status, the message, and for a missing token the
    /// challenge that makes git ask for credentials.
    pub(super) fn response(&self) -> Response {
        let mut response = text(self.status(), &self.to_string());
        if matches!(self, GatewayError::Unauthenticated) {
            response.headers_mut().insert(
                "www-authenticate",
                "Basic realm=\"gitfleet\"".parse().expect("a valid header"),
            );
        }
        response
    }
}

/// The HTTP status for a gRPC code.
fn call_status(code: tonic::Code) -> StatusCode {
    match code {
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::time::Duration;

    #[test]
    fn each_error_has_its_status_and_message() {
        let cases = [
            (GatewayError::NotSmart, 403),
            (GatewayError::NoEndpoint, 404),
            (GatewayError::Unauthenticated, 401),
            (GatewayError::ReadOnly("ci".into()), 403),
            (GatewayError::WriteLocked("upgrade".into()), 503),
            (GatewayError::TooLarge(64 << 20), 413),
            (GatewayError::Stalled(Duration::from_secs(120)), 408),
            (GatewayError::Call(tonic::Status::not_found("gone")), 404),
            (
                GatewayError::Call(tonic::Status::failed_precondition("stale")),
                412,
            ),
            (GatewayError::Call(tonic::Status::unavailable("down")), 503),
        ];
        for (error, status) in cases {
            assert_eq!(error.status().as_u16(), status, "{error}");
        }
        assert_eq!(
            GatewayError::TooLarge(64 << 20).to_string(),
            "the request is larger than 64 MiB"
        );
        assert_eq!(
            GatewayError::Call(tonic::Status::not_found("no such repository")).to_string(),
            "no such repository"
        );
        let challenge = GatewayError::Unauthenticated.response();
        assert_eq!(
            challenge.headers()["www-authenticate"],
            "Basic realm=\"gitfleet\""
        );
    }
}

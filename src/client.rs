//! Connecting to a gitfleet gRPC server (a node, later the proxy) as a client.

use std::time::Duration;

use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::auth::Signer;

pub type AuthedChannel = InterceptedService<Channel, Signer>;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0:?} is not an address: write it as http://HOST:PORT")]
    BadAddress(String),
    #[error("cannot connect to {address}: {source}")]
    Unreachable {
        address: String,
        source: tonic::transport::Error,
    },
}

/// Validates an address such as `http://127.0.0.1:9001`.
pub fn endpoint(address: &str) -> Result<Endpoint, ConnectError> {
    if !address.starts_with("http://") {
        return Err(ConnectError::BadAddress(address.to_owned()));
    }
    Endpoint::from_shared(address.to_owned())
        .map(|endpoint| {
            endpoint
                .connect_timeout(Duration::from_secs(5))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(30))
        })
        .map_err(|_| ConnectError::BadAddress(address.to_owned()))
}

/// Connects now, so an unreachable server is reported before any call.
pub async fn connect(address: &str, signer: Signer) -> Result<AuthedChannel, ConnectError> {
    let channel =
        endpoint(address)?
            .connect()
            .await
            .map_err(|source| ConnectError::Unreachable {
                address: address.to_owned(),
                source,
            })?;
    Ok(InterceptedService::new(channel, signer))
}

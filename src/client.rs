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

/// The connections a server accepts, with Nagle's algorithm off: gRPC writes headers, data and
/// trailers separately, and Nagle would hold the last of them back for a delayed ACK.
pub fn incoming(
    listener: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt as _;
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|accepted| {
        accepted.inspect(|stream| {
            if let Err(error) = stream.set_nodelay(true) {
                tracing::debug!(%error, "cannot set TCP_NODELAY");
            }
        })
    })
}

//! Request bodies of git over HTTP: gunzipped when git compressed them, cut into pieces that
//! fit a gRPC message, and pumped into the request stream in a task of their own, with a
//! record of why a body that ended early did.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt as _};
use tonic::codegen::http::HeaderMap;

use super::error::GatewayError;

/// The largest piece of a request body sent in one gRPC message.
const CHUNK: usize = 256 << 10;
/// How long a request body may send nothing before it is given up.
const BODY_IDLE: Duration = Duration::from_secs(120);

/// Body bytes as they arrive, or the error that ended them.
pub(super) type DataStream = Pin<Box<dyn Stream<Item = Result<Bytes, std::io::Error>> + Send>>;

/// Why a request body ended before it was complete.
#[derive(Debug, Clone, Copy)]
pub(super) enum BodyFault {
    TooLarge(usize),
    BrokeOff,
    Stalled,
}

impl From<BodyFault> for GatewayError {
    fn from(fault: BodyFault) -> Self {
        match fault {
            BodyFault::TooLarge(limit) => GatewayError::TooLarge(limit),
            BodyFault::BrokeOff => GatewayError::BrokeOff,
            BodyFault::Stalled => GatewayError::Stalled(BODY_IDLE),
        }
    }
}

/// Set by [`pump`] when the body ended early, before the request stream ends.
pub(super) type FaultCell = Arc<OnceLock<BodyFault>>;

/// Turns a request body into request messages, in a task of its own, pieces no larger than
/// [`CHUNK`]. A body that breaks off, stalls for [`BODY_IDLE`], or grows past `limit` bytes
/// (after gunzipping) ends the messages early, and the fault is recorded first: the node
/// then sees an incomplete request and changes nothing, and the client is told why.
pub(super) fn pump<M: Send + 'static>(
    mut body: DataStream,
    limit: usize,
    mut message: impl FnMut(Bytes) -> M + Send + 'static,
) -> (ReceiverStream<M>, FaultCell) {
    let (message_tx, message_rx) = tokio::sync::mpsc::channel(4);
    let fault = FaultCell::default();
    let recorded = fault.clone();
    tokio::spawn(async move {
        let mut seen = 0usize;
        loop {
            let chunk = match tokio::time::timeout(BODY_IDLE, body.next()).await {
                Ok(None) => return,
                Ok(Some(Ok(chunk))) => chunk,
                Ok(Some(Err(error))) => {
                    tracing::debug!(%error, "request body broke off");
                    let _ = recorded.set(BodyFault::BrokeOff);
                    return;
                }
                Err(_) => {
                    tracing::debug!("request body stalled");
                    let _ = recorded.set(BodyFault::Stalled);
                    return;
                }
            };
            seen = seen.saturating_add(chunk.len());
            if seen > limit {
                tracing::warn!(limit, "request body too large: cut off");
                let _ = recorded.set(BodyFault::TooLarge(limit));
                return;
            }
            for piece in split(chunk) {
                if message_tx.send(message(piece)).await.is_err() {
                    return;
                }
            }
        }
    });
    (ReceiverStream::new(message_rx), fault)
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
pub(super) fn request_body(headers: &HeaderMap, body: Body) -> Result<DataStream, GatewayError> {
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
        Some(other) => Err(GatewayError::ContentEncoding(other.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

//! What every handler answers with: a stream of raw messages, built from one message or passed
//! on from a node as it streams.

use std::pin::Pin;

use bytes::Bytes;
use tokio_stream::Stream;
use tonic::{Response, Status, Streaming};

/// The messages of an answer, as the bytes they go out as.
pub type ResponseStream = Pin<Box<dyn Stream<Item = Result<Bytes, Status>> + Send>>;

/// A response of one message.
pub fn single(message: impl prost::Message) -> Response<ResponseStream> {
    let bytes = Bytes::from(message.encode_to_vec());
    Response::new(Box::pin(tokio_stream::once(Ok(bytes))))
}

/// A node's response, passed on as it streams.
pub fn streamed(response: Response<Streaming<Bytes>>) -> Response<ResponseStream> {
    response.map(|stream| Box::pin(stream) as ResponseStream)
}

//! git's pkt-line framing: a 4-digit hex length (including itself) and a payload, or one of the
//! special packets 0000 (flush), 0001 (delimiter) and 0002 (response end).

use bytes::{Buf, Bytes, BytesMut};

/// The largest packet git allows, length prefix included.
pub const MAX_PACKET: usize = 65520;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    Data(Bytes),
    Flush,
    Delimiter,
    ResponseEnd,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PktLineError {
    #[error("bad pkt-line length {0:?}")]
    BadLength(String),
}

/// Encodes one data packet.
pub fn encode(payload: &[u8]) -> Vec<u8> {
    let mut packet = format!("{:04x}", payload.len() + 4).into_bytes();
    packet.extend_from_slice(payload);
    packet
}

/// Splits a byte stream that arrives in arbitrary chunks into packets.
#[derive(Debug, Default)]
pub struct Decoder {
    buffer: BytesMut,
}

impl Decoder {
    pub fn push(&mut self, chunk: &[u8]) {
        self.buffer.extend_from_slice(chunk);
    }

    /// The next complete packet, or `None` when more bytes are needed.
    pub fn next_packet(&mut self) -> Option<Result<Packet, PktLineError>> {
        if self.buffer.len() < 4 {
            return None;
        }
        let prefix = &self.buffer[..4];
        let length = std::str::from_utf8(prefix)
            .ok()
            .and_then(|text| usize::from_str_radix(text, 16).ok());
        let length = match length {
            Some(length) => length,
            None => {
                return Some(Err(PktLineError::BadLength(
                    String::from_utf8_lossy(prefix).into_owned(),
                )));
            }
        };
        let special = match length {
            0 => Some(Packet::Flush),
            1 => Some(Packet::Delimiter),
            2 => Some(Packet::ResponseEnd),
            3 => return Some(Err(PktLineError::BadLength("0003".into()))),
            _ if length > MAX_PACKET => {
                return Some(Err(PktLineError::BadLength(format!("{length:04x}"))));
            }
            _ => None,
        };
        if let Some(packet) = special {
            self.buffer.advance(4);
            return Some(Ok(packet));
        }
        if self.buffer.len() < length {
            return None;
        }
        let mut packet = self.buffer.split_to(length);
        packet.advance(4);
        Some(Ok(Packet::Data(packet.freeze())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_across_chunk_boundaries() {
        let mut stream = encode(b"hello\n");
        stream.extend_from_slice(b"0000");
        stream.extend_from_slice(&encode(b"x"));
        stream.extend_from_slice(b"0001");
        let mut decoder = Decoder::default();
        let mut packets = Vec::new();
        for byte in stream {
            decoder.push(&[byte]);
            while let Some(packet) = decoder.next_packet() {
                packets.push(packet.unwrap());
            }
        }
        assert_eq!(
            packets,
            vec![
                Packet::Data(Bytes::from_static(b"hello\n")),
                Packet::Flush,
                Packet::Data(Bytes::from_static(b"x")),
                Packet::Delimiter,
            ]
        );
    }

    #[test]
    fn refuses_garbage_lengths() {
        let mut decoder = Decoder::default();
        decoder.push(b"zzzz");
        assert_eq!(
            decoder.next_packet(),
            Some(Err(PktLineError::BadLength("zzzz".into())))
        );
        let mut decoder = Decoder::default();
        decoder.push(b"fff1");
        assert!(matches!(decoder.next_packet(), Some(Err(_))));
    }
}

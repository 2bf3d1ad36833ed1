//! Finds and replaces field 1 of a request message, the repository header, without decoding
//! anything else: the other fields (pack data among them) are skipped by their lengths and
//! copied as they are.

use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message as _;
use prost::encoding::{WireType, decode_key, decode_varint, encode_key, encode_varint};

use crate::proto::RepositoryHeader;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("the request is not a valid protobuf message")]
    Malformed,
    #[error("the request has no repository header (field 1)")]
    Missing,
    #[error("the request carries its repository header more than once")]
    Repeated,
    #[error("the repository header belongs in the first message of a stream only")]
    NotFirst,
}

/// Where field 1 sits in a message: the whole field (key, length and payload) and its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    field: Range<usize>,
    payload: Range<usize>,
}

/// Walks the top-level fields of `message` and finds field 1, if present.
pub fn locate(message: &[u8]) -> Result<Option<Located>, HeaderError> {
    let mut rest = message;
    let mut found = None;
    while !rest.is_empty() {
        let start = message.len() - rest.len();
        let (field, wire_type) = decode_key(&mut rest).map_err(|_| HeaderError::Malformed)?;
        let skip = match wire_type {
            WireType::Varint => {
                decode_varint(&mut rest).map_err(|_| HeaderError::Malformed)?;
                0
            }
            WireType::SixtyFourBit => 8,
            WireType::ThirtyTwoBit => 4,
            WireType::LengthDelimited => {
                let length = decode_varint(&mut rest).map_err(|_| HeaderError::Malformed)?;
                usize::try_from(length).map_err(|_| HeaderError::Malformed)?
            }
            WireType::StartGroup | WireType::EndGroup => return Err(HeaderError::Malformed),
        };
        if skip > rest.len() {
            return Err(HeaderError::Malformed);
        }
        let payload_start = message.len() - rest.len();
        rest = &rest[skip..];
        if field == 1 {
            if wire_type != WireType::LengthDelimited {
                return Err(HeaderError::Malformed);
            }
            if found.is_some() {
                return Err(HeaderError::Repeated);
            }
            found = Some(Located {
                field: start..payload_start + skip,
                payload: payload_start..payload_start + skip,
            });
        }
    }
    Ok(found)
}

/// Reads the header of a stream's first message.
pub fn read(message: &[u8]) -> Result<(RepositoryHeader, Located), HeaderError> {
    let located = locate(message)?.ok_or(HeaderError::Missing)?;
    let header = RepositoryHeader::decode(&message[located.payload.clone()])
        .map_err(|_| HeaderError::Malformed)?;
    Ok((header, located))
}

/// Checks that a later message of a stream carries no header.
pub fn check_not_first(message: &[u8]) -> Result<(), HeaderError> {
    match locate(message)? {
        None => Ok(()),
        Some(_) => Err(HeaderError::NotFirst),
    }
}

/// The message with its header replaced by one naming `storage` and `relative_path`.
pub fn rewrite(message: &[u8], located: &Located, storage: &str, relative_path: &str) -> Bytes {
    let header = RepositoryHeader {
        storage: storage.to_owned(),
        relative_path: relative_path.to_owned(),
    }
    .encode_to_vec();
    let mut out = BytesMut::with_capacity(message.len() + header.len());
    out.put_slice(&message[..located.field.start]);
    encode_key(1, WireType::LengthDelimited, &mut out);
    encode_varint(header.len() as u64, &mut out);
    out.put_slice(&header);
    out.put_slice(&message[located.field.end..]);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::PostReceivePackRequest;

    fn request(storage: &str, path: &str, data: &[u8]) -> Vec<u8> {
        PostReceivePackRequest {
            repository: Some(RepositoryHeader {
                storage: storage.into(),
                relative_path: path.into(),
            }),
            git_protocol: "version=2".into(),
            data: Bytes::copy_from_slice(data),
            ..Default::default()
        }
        .encode_to_vec()
    }

    #[test]
    fn the_header_is_replaced_and_the_rest_kept_byte_for_byte() {
        let data: Vec<u8> = (0..=255).cycle().take(70_000).collect();
        let message = request("default", "group/a.git", &data);
        let (header, located) = read(&message).unwrap();
        assert_eq!(header.storage, "default");
        assert_eq!(header.relative_path, "group/a.git");
        let rewritten = rewrite(&message, &located, "storage-2", "@cluster/ab/cd/7.git");
        let decoded = PostReceivePackRequest::decode(rewritten).unwrap();
        let header = decoded.repository.unwrap();
        assert_eq!(header.storage, "storage-2");
        assert_eq!(header.relative_path, "@cluster/ab/cd/7.git");
        assert_eq!(decoded.git_protocol, "version=2");
        assert_eq!(decoded.data.as_ref(), data.as_slice());
    }

    #[test]
    fn the_header_is_found_wherever_it_sits() {
        let mut message = PostReceivePackRequest {
            data: Bytes::from_static(b"0000"),
            ..Default::default()
        }
        .encode_to_vec();
        message.extend(request("default", "x.git", b""));
        let (header, _) = read(&message).unwrap();
        assert_eq!(header.relative_path, "x.git");
    }

    #[test]
    fn bad_messages_are_refused() {
        let data_only = PostReceivePackRequest {
            data: Bytes::from_static(b"0000"),
            ..Default::default()
        }
        .encode_to_vec();
        assert_eq!(read(&data_only).unwrap_err(), HeaderError::Missing);
        assert_eq!(check_not_first(&data_only), Ok(()));
        let first = request("default", "x.git", b"");
        assert_eq!(check_not_first(&first), Err(HeaderError::NotFirst));
        let mut twice = first.clone();
        twice.extend(request("default", "y.git", b""));
        assert_eq!(read(&twice).unwrap_err(), HeaderError::Repeated);
        assert_eq!(
            read(&first[..first.len() - 1]).unwrap_err(),
            HeaderError::Malformed
        );
        assert_eq!(read(&[0x0b]).unwrap_err(), HeaderError::Malformed);
    }
}

//! The ref-update commands at the head of a push: read before the write is recorded, so the
//! write intent says which refs the push will move. The pack after them is not looked at.

use bytes::Bytes;
use prost::Message as _;
use tonic::Streaming;

use crate::git::pktline::{Decoder, Packet};
use crate::git::report::PushCapabilities;
use crate::proxy::error::ProxyError;
use crate::store::RefChange;

/// The most command bytes a push may send before its pack: room for ~40,000 ref updates.
pub const MAX_COMMAND_BYTES: usize = 4 << 20;

/// Field 3 of both `PostReceivePackRequest` (`data`) and `SshRequest` (`stdin`): the bytes
/// git reads. Nothing else of the message is decoded.
#[derive(Clone, PartialEq, prost::Message)]
struct GitInput {
    #[prost(bytes = "bytes", tag = "3")]
    data: Bytes,
}

/// The commands of a push, and the messages read to find them (after the first one).
#[derive(Debug)]
pub struct PushHead {
    pub changes: Vec<RefChange>,
    /// What the client asked of the answer.
    pub capabilities: PushCapabilities,
    pub messages: Vec<Bytes>,
}

/// How long a client may take to send its command list.
pub const COMMAND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);
/// The most messages held while the command list is read.
const MAX_HEAD_MESSAGES: usize = 1024;

/// Reads messages until the command list has ended, within [`COMMAND_TIMEOUT`].
pub async fn read_head(
    first: &Bytes,
    inbound: &mut Streaming<Bytes>,
) -> Result<PushHead, ProxyError> {
    tokio::time::timeout(COMMAND_TIMEOUT, read_commands(first, inbound))
        .await
        .map_err(|_| {
            bad(&format!(
                "the command list did not arrive within {COMMAND_TIMEOUT:?}"
            ))
        })?
}

async fn read_commands(
    first: &Bytes,
    inbound: &mut Streaming<Bytes>,
) -> Result<PushHead, ProxyError> {
    let mut reader = CommandReader::default();
    let mut messages = Vec::new();
    let mut held = 0;
    let mut message = first.clone();
    loop {
        let data = GitInput::decode(message.clone())
            .map_err(|_| ProxyError::Undecodable("push request"))?
            .data;
        if let Some(changes) = reader.push(&data)? {
            return Ok(PushHead {
                changes,
                capabilities: PushCapabilities::parse(&reader.capabilities),
                messages,
            });
        }
        message = match inbound.message().await.map_err(ProxyError::Inbound)? {
            Some(next) => next,
            None => return Err(bad("the push ended before its command list did")),
        };
        crate::proxy::header::check_not_first(&message)?;
        held += message.len();
        if held > 2 * MAX_COMMAND_BYTES || messages.len() >= MAX_HEAD_MESSAGES {
            return Err(bad("the push sent too much before its command list ended"));
        }
        messages.push(message.clone());
    }
}

impl PushHead {
    /// A push with commands must ask for git's report: the replicas' reports say which refs
    /// each moved, and the push is judged by them.
    pub fn check_reportable(&self) -> Result<(), ProxyError> {
        if self.changes.is_empty() || self.capabilities.report_status {
            return Ok(());
        }
        Err(bad(
            "a push must ask for report-status (or report-status-v2): its answer is git's report",
        ))
    }
}

fn bad(reason: &str) -> ProxyError {
    ProxyError::InvalidInput(crate::model::InvalidInput::new("push", reason))
}

/// Parses `old new ref` commands, up to the flush that ends them.
#[derive(Debug, Default)]
pub struct CommandReader {
    decoder: Decoder,
    seen: usize,
    changes: Vec<RefChange>,
    /// The capabilities after the first command's NUL.
    capabilities: String,
}

impl CommandReader {
    /// Feeds a chunk; returns the commands once the list is complete.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Option<Vec<RefChange>>, ProxyError> {
        self.seen += chunk.len();
        self.decoder.push(chunk);
        while let Some(packet) = self.decoder.next_packet() {
            match packet.map_err(|error| bad(&error.to_string()))? {
                Packet::Flush => return Ok(Some(std::mem::take(&mut self.changes))),
                Packet::Data(line) => self.line(&line)?,
                Packet::Delimiter | Packet::ResponseEnd => {
                    return Err(bad("unexpected special packet in the command list"));
                }
            }
        }
        if self.seen > MAX_COMMAND_BYTES {
            return Err(bad(&format!(
                "the command list is longer than {MAX_COMMAND_BYTES} bytes"
            )));
        }
        Ok(None)
    }

    fn line(&mut self, line: &[u8]) -> Result<(), ProxyError> {
        // Capabilities follow a NUL on the first command.
        let mut parts = line.splitn(2, |byte| *byte == 0);
        let line = parts.next().unwrap_or_default();
        if let Some(capabilities) = parts.next()
            && self.changes.is_empty()
        {
            self.capabilities = String::from_utf8_lossy(capabilities).into_owned();
        }
        let line = std::str::from_utf8(line)
            .map_err(|_| bad("a command is not UTF-8"))?
            .trim_end_matches('\n');
        if line.starts_with("shallow ") {
            return Ok(());
        }
        if line.starts_with("push-cert") {
            return Err(bad("signed pushes are not supported"));
        }
        let (old, new, name) = crate::model::parse_ref_command("push", line)?;
        let name = crate::model::RefName::parse(name)?;
        self.changes.push(RefChange {
            name: name.as_str().to_owned(),
            old: old.as_str().to_owned(),
            new: new.as_str().to_owned(),
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::git::pktline::encode;

    #[test]
    fn commands_are_read_across_chunks_up_to_the_flush() {
        let zero = "0".repeat(40);
        let one = "1".repeat(40);
        let mut stream = encode(
            format!("{zero} {one} refs/heads/main\0report-status side-band-64k\n").as_bytes(),
        );
        stream.extend(encode(format!("{one} {zero} refs/heads/old\n").as_bytes()));
        stream.extend(b"0000PACK\x00\x00\x00\x02");
        let mut reader = CommandReader::default();
        let (head, tail) = stream.split_at(30);
        assert_eq!(reader.push(head).unwrap(), None);
        let changes = reader.push(tail).unwrap().unwrap();
        assert_eq!(
            changes,
            [
                RefChange {
                    name: "refs/heads/main".into(),
                    old: zero.clone(),
                    new: one.clone()
                },
                RefChange {
                    name: "refs/heads/old".into(),
                    old: one,
                    new: zero
                },
            ]
        );
    }

    #[test]
    fn bad_commands_are_refused() {
        for line in ["nonsense", "abc def refs/heads/x", "push-cert\0"] {
            let mut stream = encode(line.as_bytes());
            stream.extend(b"0000");
            assert!(CommandReader::default().push(&stream).is_err(), "{line:?}");
        }
        let endless =
            encode(format!("{} {} refs/heads/x", "0".repeat(40), "1".repeat(40)).as_bytes());
        let mut reader = CommandReader::default();
        let mut refused = false;
        for _ in 0..(MAX_COMMAND_BYTES / endless.len() + 2) {
            if reader.push(&endless).is_err() {
                refused = true;
                break;
            }
        }
        assert!(refused);
    }
}

//! git's report-status, the answer `git receive-pack` ends a push with: `unpack ok`, then
//! `ok REF` or `ng REF REASON` per command, with or without side-band. Read by the node, to
//! tell a failed push from a good one (receive-pack exits 0 even when it rejected the pack),
//! and by the proxy, to learn which refs a replica moved; written by the proxy when it refuses
//! a push itself, in the form the client asked for.

use super::pktline::{Decoder, Packet, encode};

/// The push capabilities that shape an answer, from the first command's line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PushCapabilities {
    pub report_status: bool,
    pub side_band: bool,
    pub atomic: bool,
}

impl PushCapabilities {
    /// Reads the space-separated capabilities after the NUL of the first command.
    pub fn parse(capabilities: &str) -> Self {
        let mut parsed = Self::default();
        for capability in capabilities.split_ascii_whitespace() {
            match capability {
                "report-status" | "report-status-v2" => parsed.report_status = true,
                "side-band" | "side-band-64k" => parsed.side_band = true,
                "atomic" => parsed.atomic = true,
                _ => {}
            }
        }
        parsed
    }
}

/// A report the proxy writes: `unpack ok` (the pack was fine; the refusal is the proxy's),
/// then each command's status (None: `ok`, or the reason of an `ng`). With side-band,
/// `message` goes first on band 2, where git shows it as `remote: gitfleet: ...`.
pub fn encode_report(
    capabilities: &PushCapabilities,
    refs: &[(String, Option<String>)],
    message: &str,
) -> Vec<u8> {
    let mut inner = encode(b"unpack ok\n");
    for (name, refused) in refs {
        let line = match refused {
            None => format!("ok {name}\n"),
            Some(reason) => format!("ng {name} {}\n", one_line(reason)),
        };
        inner.extend(encode(line.as_bytes()));
    }
    inner.extend_from_slice(b"0000");
    if !capabilities.side_band {
        return inner;
    }
    let mut answer = Vec::new();
    if !message.is_empty() {
        let mut band = vec![2u8];
        band.extend_from_slice(format!("gitfleet: {}\n", one_line(message)).as_bytes());
        answer.extend(encode(&band));
    }
    // A side-band packet carries at most 65,515 bytes after its band byte.
    for chunk in inner.chunks(65_515) {
        let mut band = vec![1u8];
        band.extend_from_slice(chunk);
        answer.extend(encode(&band));
    }
    answer.extend_from_slice(b"0000");
    answer
}

fn one_line(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

/// What receive-pack reported.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// `Some("ok")` or the unpack error; `None` when no report was seen.
    pub unpack: Option<String>,
    /// References that were updated.
    pub updated: Vec<String>,
    /// References that were refused, with git's reason.
    pub rejected: Vec<(String, String)>,
    /// A fatal error sent on side-band channel 3.
    pub fatal: Option<String>,
}

impl Report {
    pub fn unpack_failed(&self) -> Option<&str> {
        self.unpack.as_deref().filter(|status| *status != "ok")
    }

    /// The report in a whole receive-pack answer.
    pub fn read(answer: &[u8]) -> Self {
        let mut scanner = ReportScanner::default();
        scanner.push(answer);
        scanner.finish()
    }
}

/// Feed it receive-pack's stdout, chunk by chunk.
#[derive(Debug, Default)]
pub struct ReportScanner {
    outer: Decoder,
    inner: Decoder,
    report: Report,
    broken: bool,
}

impl ReportScanner {
    pub fn push(&mut self, chunk: &[u8]) {
        if self.broken {
            return;
        }
        self.outer.push(chunk);
        while let Some(packet) = self.outer.next_packet() {
            match packet {
                Ok(Packet::Data(payload)) => match payload.first() {
                    Some(1) => {
                        self.inner.push(&payload[1..]);
                        while let Some(Ok(Packet::Data(line))) = self.inner.next_packet() {
                            self.line(&line);
                        }
                    }
                    Some(2) => {}
                    Some(3) => {
                        self.report.fatal =
                            Some(String::from_utf8_lossy(&payload[1..]).trim().to_owned())
                    }
                    _ => self.line(&payload),
                },
                Ok(_) => {}
                Err(_) => {
                    self.broken = true;
                    return;
                }
            }
        }
    }

    fn line(&mut self, line: &[u8]) {
        let line = String::from_utf8_lossy(line);
        let line = line.trim_end_matches('\n');
        if let Some(status) = line.strip_prefix("unpack ") {
            self.report.unpack = Some(status.to_owned());
        } else if let Some(name) = line.strip_prefix("ok ") {
            self.report.updated.push(name.to_owned());
        } else if let Some(rest) = line.strip_prefix("ng ") {
            let (name, reason) = rest.split_once(' ').unwrap_or((rest, ""));
            self.report
                .rejected
                .push((name.to_owned(), reason.to_owned()));
        }
    }

    pub fn finish(self) -> Report {
        self.report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sideband(band: u8, payload: &[u8]) -> Vec<u8> {
        let mut data = vec![band];
        data.extend_from_slice(payload);
        encode(&data)
    }

    #[test]
    fn the_proxy_s_report_reads_back_in_both_forms() {
        let refs = vec![
            ("refs/heads/main".to_owned(), None),
            (
                "refs/heads/feat/x".to_owned(),
                Some("failed to update ref".to_owned()),
            ),
        ];
        for side_band in [false, true] {
            let capabilities = PushCapabilities {
                report_status: true,
                side_band,
                atomic: false,
            };
            let report = Report::read(&encode_report(&capabilities, &refs, "why\nnot"));
            assert_eq!(report.unpack.as_deref(), Some("ok"));
            assert_eq!(report.updated, ["refs/heads/main"]);
            assert_eq!(
                report.rejected,
                [(
                    "refs/heads/feat/x".to_owned(),
                    "failed to update ref".to_owned()
                )]
            );
        }
        let parsed =
            PushCapabilities::parse(" report-status-v2 side-band-64k quiet atomic agent=git/2.47");
        assert!(parsed.report_status && parsed.side_band && parsed.atomic);
        assert_eq!(PushCapabilities::parse(""), PushCapabilities::default());
    }

    #[test]
    fn plain_report() {
        let mut stream = encode(b"unpack ok\n");
        stream.extend(encode(b"ok refs/heads/main\n"));
        stream.extend(encode(b"ng refs/heads/x non-fast-forward\n"));
        stream.extend(b"0000");
        let mut scanner = ReportScanner::default();
        scanner.push(&stream);
        let report = scanner.finish();
        assert_eq!(report.unpack.as_deref(), Some("ok"));
        assert_eq!(report.updated, vec!["refs/heads/main"]);
        assert_eq!(
            report.rejected,
            vec![("refs/heads/x".into(), "non-fast-forward".into())]
        );
    }

    #[test]
    fn side_band_report_split_anywhere() {
        let mut inner = encode(b"unpack index-pack abnormal exit\n");
        inner.extend(encode(b"ng refs/heads/main unpacker error\n"));
        inner.extend(b"0000");
        let mut stream = sideband(2, b"progress\n");
        stream.extend(sideband(1, &inner[..10]));
        stream.extend(sideband(1, &inner[10..]));
        stream.extend(b"0000");
        let mut scanner = ReportScanner::default();
        for chunk in stream.chunks(7) {
            scanner.push(chunk);
        }
        let report = scanner.finish();
        assert_eq!(report.unpack_failed(), Some("index-pack abnormal exit"));
        assert_eq!(report.rejected.len(), 1);
    }
}

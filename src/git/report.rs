//! Reads the report-status that `git receive-pack` sends at the end of a push, with or without
//! side-band, so the node can tell a failed push from a good one: receive-pack exits 0 even
//! when it rejected the pack.

use super::pktline::{Decoder, Packet};

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
    use super::super::pktline::encode;
    use super::*;

    fn sideband(band: u8, payload: &[u8]) -> Vec<u8> {
        let mut data = vec![band];
        data.extend_from_slice(payload);
        encode(&data)
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

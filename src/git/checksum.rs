//! An order-independent checksum of a repository's references.
//!
//! Each reference contributes SHA-256(`name NUL target`) and the contributions are combined with
//! XOR, so the order git lists them in does not matter and equal sets give equal checksums.
//! Names are unique within a repository, so no two contributions can cancel out. HEAD
//! contributes its symbolic target, so replicas that disagree on the default branch differ.

use sha2::{Digest, Sha256};

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Checksum {
    state: [u8; 32],
    count: u64,
}

impl Checksum {
    pub fn add(&mut self, name: &str, target: &str) {
        let mut hasher = Sha256::new();
        hasher.update(name.as_bytes());
        hasher.update([0]);
        hasher.update(target.as_bytes());
        for (state, byte) in self.state.iter_mut().zip(hasher.finalize()) {
            *state ^= byte;
        }
        self.count += 1;
    }

    /// The checksum once `changes` (name, old, new; an all-zero id for an absent ref) moved
    /// the refs of the one given as hex. None when `hex` is not a checksum.
    pub fn advanced<'a>(
        hex: &str,
        changes: impl IntoIterator<Item = (&'a str, &'a str, &'a str)>,
    ) -> Option<String> {
        let mut checksum = Checksum::default();
        hex::decode_to_slice(hex, &mut checksum.state).ok()?;
        let present = |oid: &str| !oid.bytes().all(|b| b == b'0');
        for (name, old, new) in changes {
            if present(old) {
                checksum.add(name, old);
            }
            if present(new) {
                checksum.add(name, new);
            }
        }
        Some(checksum.hex())
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn hex(&self) -> String {
        hex::encode(self.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_does_not_matter_and_content_does() {
        let mut a = Checksum::default();
        a.add("refs/heads/main", "aa");
        a.add("refs/tags/v1", "bb");
        let mut b = Checksum::default();
        b.add("refs/tags/v1", "bb");
        b.add("refs/heads/main", "aa");
        assert_eq!(a.hex(), b.hex());
        let mut c = Checksum::default();
        c.add("refs/heads/main", "aa");
        c.add("refs/tags/v1", "bc");
        assert_ne!(a.hex(), c.hex());
        assert_eq!(Checksum::default().hex(), "0".repeat(64));
    }

    #[test]
    fn a_checksum_advances_by_the_changes_alone() {
        let (zero, one, two) = ("0".repeat(40), "1".repeat(40), "2".repeat(40));
        let mut before = Checksum::default();
        before.add("refs/heads/main", &one);
        before.add("refs/heads/gone", &one);
        before.add("HEAD", "refs/heads/main");
        let mut after = Checksum::default();
        after.add("refs/heads/main", &two);
        after.add("refs/heads/new", &one);
        after.add("HEAD", "refs/heads/main");
        let changes = [
            ("refs/heads/main", one.as_str(), two.as_str()),
            ("refs/heads/gone", one.as_str(), zero.as_str()),
            ("refs/heads/new", zero.as_str(), one.as_str()),
        ];
        assert_eq!(
            Checksum::advanced(&before.hex(), changes).as_deref(),
            Some(after.hex().as_str())
        );
        assert_eq!(Checksum::advanced("xyz", []), None);
    }
}

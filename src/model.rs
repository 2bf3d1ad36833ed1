//! Domain types shared by every role. Each is validated once, where it enters from the wire or
//! the command line, so code inside never handles a raw, unchecked string.

use std::fmt;

/// Why an input was refused. The message is meant for the person who sent it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}: {reason}")]
pub struct InvalidInput {
    pub what: &'static str,
    pub reason: String,
}

/// An `OLD NEW NAME` ref-update line, as a push's commands and git's hooks carry it: both ids
/// checked, the name as given (each caller decides which names it takes). `what` names the
/// input in the error.
pub fn parse_ref_command<'a>(
    what: &'static str,
    line: &'a str,
) -> Result<(ObjectId, ObjectId, &'a str), InvalidInput> {
    let mut parts = line.splitn(3, ' ');
    let (Some(old), Some(new), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(InvalidInput::new(
            what,
            format!("{line:?} is not an \"old new ref\" command"),
        ));
    };
    Ok((ObjectId::parse(old)?, ObjectId::parse(new)?, name))
}

impl InvalidInput {
    pub fn new(what: &'static str, reason: impl Into<String>) -> Self {
        Self {
            what,
            reason: reason.into(),
        }
    }
}

/// The longest relative path accepted, in bytes.
pub const MAX_RELATIVE_PATH: usize = 1024;
/// The first path component reserved for a node's own bookkeeping inside each storage.
pub const RESERVED_COMPONENT: &str = ".gitfleet";

/// Name of a storage (on a node) or virtual storage (on the proxy).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorageName(String);

impl StorageName {
    pub fn parse(name: &str) -> Result<Self, InvalidInput> {
        let invalid =
            |reason: &str| InvalidInput::new("storage name", format!("{name:?} {reason}"));
        if name.is_empty() {
            return Err(InvalidInput::new("storage name", "is empty"));
        }
        if name.len() > 64 {
            return Err(invalid("is longer than 64 bytes"));
        }
        if name.starts_with('.') {
            return Err(invalid("starts with a dot"));
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err(invalid(
                "may contain only letters, digits, '.', '_' and '-'",
            ));
        }
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for StorageName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Path of a repository inside a storage: relative, normalized, bounded.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RelativePath(String);

impl RelativePath {
    pub fn parse(path: &str) -> Result<Self, InvalidInput> {
        check_path("relative path", path, MAX_RELATIVE_PATH)?;
        if path.split('/').next() == Some(RESERVED_COMPONENT) {
            return Err(InvalidInput::new(
                "relative path",
                format!("{path:?} is inside {RESERVED_COMPONENT}/, which is reserved"),
            ));
        }
        Ok(Self(path.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RelativePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A repository's id in the catalog. Ids are never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepositoryId(pub i64);

/// Top directory of the replicas the proxy places on its nodes.
pub const REPLICA_ROOT: &str = "@cluster";

impl RepositoryId {
    /// Where this repository's replicas live on every node: derived from the id alone, spread
    /// over 65536 directories, such as `@cluster/6b/86/42.git`.
    pub fn replica_path(self) -> RelativePath {
        use sha2::Digest as _;
        let digest = sha2::Sha256::digest(self.0.to_string().as_bytes());
        RelativePath(format!(
            "{REPLICA_ROOT}/{:02x}/{:02x}/{}.git",
            digest[0], digest[1], self.0
        ))
    }

    /// The id a replica path was derived from, if it is one.
    pub fn from_replica_path(path: &RelativePath) -> Option<Self> {
        let id: i64 = path
            .as_str()
            .strip_prefix(REPLICA_ROOT)?
            .rsplit('/')
            .next()?
            .strip_suffix(".git")?
            .parse()
            .ok()?;
        let id = Self(id);
        (id.replica_path() == *path).then_some(id)
    }
}

impl fmt::Display for RepositoryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Path of a file inside a git tree, such as `src/main.rs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreePath(String);

impl TreePath {
    pub fn parse(path: &str) -> Result<Self, InvalidInput> {
        check_path("path", path, 4096)?;
        Ok(Self(path.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn check_path(what: &'static str, path: &str, max_len: usize) -> Result<(), InvalidInput> {
    let invalid = |reason: &str| InvalidInput::new(what, format!("{path:?} {reason}"));
    if path.is_empty() {
        return Err(InvalidInput::new(what, "is empty"));
    }
    if path.len() > max_len {
        return Err(InvalidInput::new(
            what,
            format!("is {} bytes long; the limit is {max_len}", path.len()),
        ));
    }
    if path.contains('\0') {
        return Err(invalid("contains a NUL byte"));
    }
    if path.chars().any(char::is_control) {
        return Err(invalid("contains a control character"));
    }
    if path.starts_with('/') {
        return Err(invalid("is absolute; it must be relative"));
    }
    if path.contains('\\') {
        return Err(invalid("contains a backslash"));
    }
    for component in path.split('/') {
        match component {
            "" => {
                return Err(invalid(
                    "has an empty component (a doubled or trailing '/')",
                ));
            }
            "." | ".." => return Err(invalid("contains a '.' or '..' component")),
            _ => {}
        }
    }
    Ok(())
}

/// A storage and a repository inside it, written `STORAGE/RELATIVE_PATH` on the command line.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RepositoryName {
    pub storage: StorageName,
    pub relative_path: RelativePath,
}

impl RepositoryName {
    pub fn parse(name: &str) -> Result<Self, InvalidInput> {
        let (storage, path) = name.split_once('/').ok_or_else(|| {
            InvalidInput::new(
                "repository",
                format!("{name:?} is not STORAGE/RELATIVE_PATH"),
            )
        })?;
        Ok(Self {
            storage: StorageName::parse(storage)?,
            relative_path: RelativePath::parse(path)?,
        })
    }
}

impl fmt::Display for RepositoryName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.storage, self.relative_path)
    }
}

/// A hex git object id: 40 digits (SHA-1) or 64 (SHA-256), stored in lower case.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ObjectId(String);

impl ObjectId {
    pub fn parse(oid: &str) -> Result<Self, InvalidInput> {
        if !(oid.len() == 40 || oid.len() == 64) || !oid.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(InvalidInput::new(
                "object id",
                format!("{oid:?} is not 40 or 64 hexadecimal digits"),
            ));
        }
        Ok(Self(oid.to_ascii_lowercase()))
    }

    /// The all-zero id of the same length: "absent" in a reference update.
    pub fn is_zero(&self) -> bool {
        self.0.bytes().all(|b| b == b'0')
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A full reference name under `refs/`, following git's check-ref-format rules.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RefName(String);

impl RefName {
    pub fn parse(name: &str) -> Result<Self, InvalidInput> {
        let invalid =
            |reason: &str| InvalidInput::new("reference name", format!("{name:?} {reason}"));
        if !name.starts_with("refs/") {
            return Err(invalid("does not start with refs/"));
        }
        if name.len() > 1024 {
            return Err(invalid("is longer than 1024 bytes"));
        }
        if name.ends_with('/') || name.ends_with('.') {
            return Err(invalid("ends with '/' or '.'"));
        }
        if name.contains("..") || name.contains("@{") || name.contains("//") {
            return Err(invalid("contains '..', '@{' or '//'"));
        }
        if name
            .chars()
            .any(|c| c.is_control() || c == ' ' || "~^:?*[\\".contains(c))
        {
            return Err(invalid(
                "contains a space, a control character or one of ~^:?*[\\",
            ));
        }
        for component in name.split('/') {
            if component.starts_with('.') || component.ends_with(".lock") {
                return Err(invalid(
                    "has a component that starts with '.' or ends with '.lock'",
                ));
            }
        }
        Ok(Self(name.to_owned()))
    }

    /// `refs/heads/BRANCH` for a branch name given without its prefix.
    pub fn branch(branch: &str) -> Result<Self, InvalidInput> {
        if branch.is_empty() {
            return Err(InvalidInput::new("branch name", "is empty"));
        }
        if branch.starts_with('-') || branch == "HEAD" || branch.starts_with("refs/") {
            return Err(InvalidInput::new(
                "branch name",
                format!("{branch:?} is not allowed (give the name without refs/heads/)"),
            ));
        }
        Self::parse(&format!("refs/heads/{branch}"))
            .map_err(|error| InvalidInput::new("branch name", error.reason))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RefName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A revision expression such as `main`, `v1.0` or an object id. Never starts with '-', so git
/// cannot read it as an option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revision(String);

impl Revision {
    pub fn parse(revision: &str) -> Result<Self, InvalidInput> {
        let invalid =
            |reason: &str| InvalidInput::new("revision", format!("{revision:?} {reason}"));
        if revision.is_empty() {
            return Err(InvalidInput::new("revision", "is empty"));
        }
        if revision.len() > 1024 {
            return Err(invalid("is longer than 1024 bytes"));
        }
        if revision.starts_with('-') {
            return Err(invalid("starts with '-'"));
        }
        if revision.chars().any(|c| c.is_control() || c == ':') {
            return Err(invalid("contains a control character or ':'"));
        }
        Ok(Self(revision.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_refuse_escapes_and_garbage() {
        for bad in [
            "",
            "/etc/passwd",
            "a/../b",
            "..",
            "./a",
            "a//b",
            "a/",
            "a\0b",
            "a\nb",
            "a\\b",
            ".gitfleet/tmp/x",
        ] {
            assert!(RelativePath::parse(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(RelativePath::parse(&"a".repeat(MAX_RELATIVE_PATH + 1)).is_err());
        for good in [
            "a.git",
            "group/sub/project.git",
            "@replicas/ab/cd/12.git",
            "..a/b..",
            ".gitfleetx",
        ] {
            assert_eq!(RelativePath::parse(good).unwrap().as_str(), good);
        }
    }

    #[test]
    fn messages_name_the_problem() {
        let error = RelativePath::parse("a/../b").unwrap_err();
        assert_eq!(
            error.to_string(),
            "relative path: \"a/../b\" contains a '.' or '..' component"
        );
        let error = RelativePath::parse("/x").unwrap_err();
        assert!(error.to_string().contains("is absolute"), "{error}");
    }

    #[test]
    fn storage_names() {
        assert!(StorageName::parse("storage-1").is_ok());
        for bad in ["", ".hidden", "a/b", "a b", &"s".repeat(65)] {
            assert!(StorageName::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn repository_names_split_at_the_first_slash() {
        let name = RepositoryName::parse("default/group/project.git").unwrap();
        assert_eq!(name.storage.as_str(), "default");
        assert_eq!(name.relative_path.as_str(), "group/project.git");
        assert!(RepositoryName::parse("noslash").is_err());
    }

    #[test]
    fn ref_names_follow_git_rules() {
        for good in [
            "refs/heads/main",
            "refs/tags/v1.0",
            "refs/heads/feature/x-y_z",
            "refs/heads/@",
        ] {
            assert!(RefName::parse(good).is_ok(), "{good:?} was refused");
        }
        for bad in [
            "main",
            "refs/heads/",
            "refs/heads/a..b",
            "refs/heads/a b",
            "refs/heads/x.lock",
            "refs/heads/.hidden",
            "refs/heads/a@{1}",
            "refs/heads/a~1",
            "refs/heads/a:b",
            "refs/heads/a.",
            "refs//heads",
            "refs/heads/a\0",
        ] {
            assert!(RefName::parse(bad).is_err(), "{bad:?} was accepted");
        }
        assert_eq!(RefName::branch("main").unwrap().as_str(), "refs/heads/main");
        for bad in ["", "-x", "HEAD", "refs/heads/main", "a..b"] {
            assert!(RefName::branch(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn object_ids() {
        let oid = ObjectId::parse(&"AB".repeat(20)).unwrap();
        assert_eq!(oid.as_str(), "ab".repeat(20));
        assert!(ObjectId::parse(&"0".repeat(40)).unwrap().is_zero());
        assert!(ObjectId::parse(&"0".repeat(64)).is_ok());
        for bad in ["", "abc", &"g".repeat(40), &"a".repeat(41)] {
            assert!(ObjectId::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn revisions() {
        assert!(Revision::parse("main~2").is_ok());
        for bad in ["", "-x", "--output=/tmp/x", "a:b", "a\nb"] {
            assert!(Revision::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn replica_paths_are_derived_from_the_id_and_back() {
        let path = RepositoryId(42).replica_path();
        assert!(path.as_str().starts_with("@cluster/"), "{path}");
        assert!(path.as_str().ends_with("/42.git"), "{path}");
        assert_eq!(
            RepositoryId::from_replica_path(&path),
            Some(RepositoryId(42))
        );
        assert_ne!(RepositoryId(43).replica_path(), path);
        let moved = RelativePath::parse("@cluster/00/00/42.git").unwrap();
        assert_eq!(RepositoryId::from_replica_path(&moved), None);
        let other = RelativePath::parse("group/42.git").unwrap();
        assert_eq!(RepositoryId::from_replica_path(&other), None);
    }
}

//! Ref locks left behind. git takes a reference's lock by creating `NAME.lock` beside it, and
//! removes it when the update ends; a git process killed mid-update (SIGKILL, a crash of the
//! machine) leaves it, and every later update of that reference fails with "File exists" for
//! as long as it stays. The node removes such a lock when an update trips over it and no git
//! process it started is working on the replica, then tries the update once more.

use std::path::{Path, PathBuf};

use crate::git::NODE_PID_ENV;

/// The lock files of a replica's references: HEAD's, packed-refs', and every `*.lock` under
/// `refs/`.
fn ref_locks(replica: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = ["HEAD.lock", "packed-refs.lock"]
        .iter()
        .map(|name| replica.join(name))
        .filter(|path| path.is_file())
        .collect();
    let mut dirs = vec![replica.join("refs")];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            match entry.file_type() {
                Ok(kind) if kind.is_dir() => dirs.push(path),
                Ok(kind) if kind.is_file() && path.extension().is_some_and(|ext| ext == "lock") => {
                    found.push(path)
                }
                _ => {}
            }
        }
    }
    found
}

/// Whether a git process this node started is working on `replica`: its environment names
/// this node, and its command line names the replica (`--git-dir PATH`, or the path a
/// receive-pack or upload-pack serves).
fn git_is_running_on(replica: &Path) -> bool {
    let marker = format!("{NODE_PID_ENV}={}", std::process::id()).into_bytes();
    let replica = replica.as_os_str().as_encoded_bytes();
    let Ok(processes) = std::fs::read_dir("/proc") else {
        // Cannot tell: assume the worst.
        return true;
    };
    processes.flatten().any(|process| {
        let dir = process.path();
        let ours = std::fs::read(dir.join("environ"))
            .is_ok_and(|environ| environ.split(|b| *b == 0).any(|var| var == marker));
        ours && std::fs::read(dir.join("cmdline"))
            .is_ok_and(|cmdline| cmdline.split(|b| *b == 0).any(|arg| arg == replica))
    })
}

/// Removes the replica's ref locks when no git process of this node is working on it;
/// returns those removed. Blocking.
pub fn clear_stale(replica: &Path) -> Vec<PathBuf> {
    let locks = ref_locks(replica);
    if locks.is_empty() || git_is_running_on(replica) {
        return Vec::new();
    }
    locks
        .into_iter()
        .filter(|lock| match std::fs::remove_file(lock) {
            Ok(()) => {
                tracing::warn!(lock = %lock.display(), "removed a ref lock no running git held");
                true
            }
            Err(error) => {
                tracing::warn!(lock = %lock.display(), %error, "cannot remove a stale ref lock");
                false
            }
        })
        .collect()
}

/// Whether git failed because a ref's lock file was already there.
pub fn tripped_over_a_lock(stderr: &str) -> bool {
    stderr.contains(".lock': File exists") || stderr.contains(".lock': file exists")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_ref_lock_is_found_and_nothing_else() {
        let replica = tempfile::tempdir().unwrap();
        let root = replica.path();
        std::fs::create_dir_all(root.join("refs/heads/team")).unwrap();
        for file in [
            "HEAD.lock",
            "refs/heads/main.lock",
            "refs/heads/team/x.lock",
            "refs/heads/main",
            "config.lock",
        ] {
            std::fs::write(root.join(file), "").unwrap();
        }
        let mut found = ref_locks(root);
        found.sort();
        assert_eq!(
            found,
            vec![
                root.join("HEAD.lock"),
                root.join("refs/heads/main.lock"),
                root.join("refs/heads/team/x.lock"),
            ]
        );
        // No git of this process works on a temporary directory: they go.
        assert_eq!(clear_stale(root).len(), 3);
        assert!(ref_locks(root).is_empty());
        assert!(root.join("refs/heads/main").exists());
    }

    #[test]
    fn git_s_complaint_about_a_lock_is_recognised() {
        assert!(tripped_over_a_lock(
            "fatal: cannot lock ref 'refs/heads/main': Unable to create '/s/r.git/refs/heads/main.lock': File exists."
        ));
        assert!(!tripped_over_a_lock(
            "fatal: cannot lock ref 'refs/heads/main': is at 1 but expected 2"
        ));
    }
}

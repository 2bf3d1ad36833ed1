//! A git wrapper, set as a node's `[git] binary`, that stalls one chosen git command, as a
//! process paused by the scheduler or by SIGSTOP would be: the first `git SUBCOMMAND` started
//! after [`Stall::arm`] waits, before git runs at all, until [`Stall::release`].

use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::time::Duration;

use tempfile::TempDir;

pub struct Stall {
    dir: TempDir,
    pub binary: PathBuf,
}

impl Stall {
    pub fn new(subcommand: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let binary = dir.path().join("git");
        let script = format!(
            "#!/bin/sh\n\
             dir='{dir}'\n\
             for arg in \"$@\"; do\n\
             \x20 if [ \"$arg\" = '{subcommand}' ]; then\n\
             \x20   if mv \"$dir/armed\" \"$dir/taken\" 2>/dev/null; then\n\
             \x20     while [ ! -e \"$dir/released\" ]; do sleep 0.05; done\n\
             \x20   fi\n\
             \x20   break\n\
             \x20 fi\n\
             done\n\
             exec git \"$@\"\n",
            dir = dir.path().display()
        );
        std::fs::write(&binary, script).unwrap();
        std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
        Self { dir, binary }
    }

    /// The node config that runs git through the wrapper.
    pub fn node_config(&self) -> String {
        format!("[git]\nbinary = \"{}\"\n", self.binary.display())
    }

    /// Stalls the next command.
    pub fn arm(&self) {
        std::fs::write(self.dir.path().join("armed"), "").unwrap();
    }

    /// Waits until a command has stalled.
    pub async fn stalled(&self) {
        for _ in 0..600 {
            if self.dir.path().join("taken").exists() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no git command stalled in 30 s");
    }

    /// Lets the stalled command go on.
    pub fn release(&self) {
        std::fs::write(self.dir.path().join("released"), "").unwrap();
    }
}

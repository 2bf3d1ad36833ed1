//! A git wrapper, set as a node's `[git] binary`, that stalls one chosen git command, as a
//! process paused by the scheduler or by SIGSTOP would be: the first `git SUBCOMMAND` started
//! after [`Stall::arm`] waits, before git runs at all, until [`Stall::release`]. A reference
//! advertisement (`--advertise-refs`, a read) is never caught. A command still waiting when
//! the wrapper is dropped goes on, so that no waiting shell outlives the test (its node's pid
//! may be another test's node's later).

use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::time::Duration;

use tempfile::TempDir;

pub struct Stall {
    dir: TempDir,
    pub binary: PathBuf,
}

/// What the wrapper does with the command it catches.
#[derive(Clone, Copy)]
enum Mode {
    /// Waits, then runs it.
    Wait,
    /// Waits in a session of its own, out of reach of the node's kill, then runs it and notes
    /// that it finished: a git process its node cannot stop, as across a network partition.
    Detached,
    /// Fails it at once, as git refusing would.
    Fail,
}

impl Stall {
    pub fn new(subcommand: &str) -> Self {
        Self::with(subcommand, Mode::Wait)
    }

    /// See [`Mode::Detached`]; [`Stall::finished`] waits for its end.
    pub fn detached(subcommand: &str) -> Self {
        Self::with(subcommand, Mode::Detached)
    }

    /// Fails the next command instead of stalling it.
    pub fn failing(subcommand: &str) -> Self {
        Self::with(subcommand, Mode::Fail)
    }

    fn with(subcommand: &str, mode: Mode) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let binary = dir.path().join("git");
        let caught = match mode {
            Mode::Wait => {
                "while [ -d \"$dir\" ] && [ ! -e \"$dir/released\" ]; do sleep 0.05; done\n\
                 \x20     [ -d \"$dir\" ] || exit 1"
            }
            // Its output goes nowhere: whoever read it is gone.
            Mode::Detached => {
                "exec 3<&0\n\
                 \x20     setsid sh -c 'while [ -d \"$0\" ] && [ ! -e \"$0/released\" ]; do sleep 0.05; done; \
                 [ -d \"$0\" ] || exit 1; \
                 git \"$@\" >/dev/null 2>&1; echo $? > \"$0/finished\"' \"$dir\" \"$@\" <&3 &\n\
                 \x20     wait $!; exit 1"
            }
            Mode::Fail => "echo 'injected failure' >&2; exit 1",
        };
        let script = format!(
            "#!/bin/sh\n\
             dir='{dir}'\n\
             case \" $* \" in *' --advertise-refs '*) exec git \"$@\" ;; esac\n\
             for arg in \"$@\"; do\n\
             \x20 if [ \"$arg\" = '{subcommand}' ]; then\n\
             \x20   if mv \"$dir/armed\" \"$dir/taken\" 2>/dev/null; then\n\
             \x20     {caught}\n\
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

    /// Whether a command has stalled (or, for a failing wrapper, failed).
    pub fn caught(&self) -> bool {
        self.dir.path().join("taken").exists()
    }

    /// Catches no command after all.
    pub fn disarm(&self) {
        let _ = std::fs::remove_file(self.dir.path().join("armed"));
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

    /// Waits until a detached command has run to its end; returns its exit status.
    pub async fn finished(&self) -> i32 {
        let path = self.dir.path().join("finished");
        for _ in 0..600 {
            if let Ok(status) = std::fs::read_to_string(&path)
                && let Ok(status) = status.trim().parse()
            {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the detached git command did not finish in 30 s");
    }
}

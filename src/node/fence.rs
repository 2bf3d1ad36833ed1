//! A replica's fence: the highest lease token its node has accepted for it. A call that changes
//! the replica's refs may carry a token (the [`FENCE_HEADER`] of its request); the node takes
//! the replica's fence lock, refuses a token lower than the fence, raises the fence to the
//! token, and holds the lock while the refs change. An operation that arrives, or resumes,
//! after a newer one was accepted changes nothing.
//!
//! The fence lives in the replica's directory, beside git's own files: `gitfleet-fence` holds
//! the token, replaced atomically (written aside, synced, renamed, the directory synced), and
//! `gitfleet-fence.lock` is the file locked with `flock`, so that any process on the node (a
//! git hook as much as the node itself) can take the same lock. A replica that was never
//! fenced has the fence 0.

use std::fs::{File, OpenOptions};
use std::io::{Read as _, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// The request metadata that carries the caller's token. Only the cluster's own callers set
/// it: the proxy refuses a client's call that does.
pub const FENCE_HEADER: &str = "gitfleet-fence";

/// The environment that carries a push's token to the node's reference-transaction hook.
pub const FENCE_ENV: &str = "GITFLEET_FENCE";

const FENCE_FILE: &str = "gitfleet-fence";
const FENCE_LOCK: &str = "gitfleet-fence.lock";
const FENCE_NEW: &str = "gitfleet-fence.new";
/// Present while a push's ref transaction holds the fence lock through its holder process.
const HOLDER_FILE: &str = "gitfleet-fence.holder";

/// How long an operation waits for a replica's fence lock before it gives up: the holder is a
/// stalled operation, and the caller had better fail (and be repaired later) than hang.
pub const LOCK_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    #[error("fenced: token {token} is older than {fence}")]
    Fenced { token: u64, fence: u64 },
    #[error("the replica's fence lock was held by another operation for {0:?}")]
    Busy(Duration),
    #[error("the fence of the replica cannot be read or written: {0}")]
    Io(#[from] std::io::Error),
}

/// The replica's fence lock, held while the refs change; the fence already raised to the
/// token that took it.
#[derive(Debug)]
pub struct FenceGuard {
    _lock: Flock<File>,
    pub fence: u64,
}

/// Reads a replica's fence; 0 when it was never fenced.
pub fn read(replica: &Path) -> Result<u64, FenceError> {
    let mut text = String::new();
    match File::open(replica.join(FENCE_FILE)) {
        Ok(mut file) => file.read_to_string(&mut text)?,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(error) => return Err(error.into()),
    };
    text.trim().parse().map_err(|_| {
        FenceError::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{FENCE_FILE} holds {text:?}, not a token"),
        ))
    })
}

/// Takes the replica's fence lock (waiting for whoever holds it), refuses `token` if it is
/// lower than the fence, and raises the fence to it. Blocking: call it off the async runtime.
pub fn enter(replica: &Path, token: u64) -> Result<FenceGuard, FenceError> {
    let lock_file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(replica.join(FENCE_LOCK))?;
    let lock = lock(lock_file, LOCK_WAIT)?;
    let fence = read(replica)?;
    if token < fence {
        return Err(FenceError::Fenced { token, fence });
    }
    if token > fence {
        write(replica, token)?;
    }
    Ok(FenceGuard {
        _lock: lock,
        fence: token,
    })
}

/// Takes the lock on `file`, waiting up to `wait` for whoever holds it.
fn lock(mut file: File, wait: Duration) -> Result<Flock<File>, FenceError> {
    let started = Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((returned, Errno::EWOULDBLOCK)) if started.elapsed() < wait => {
                file = returned;
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(20));
            }
            Err((_, Errno::EWOULDBLOCK)) => return Err(FenceError::Busy(wait)),
            Err((_, errno)) => return Err(FenceError::Io(errno.into())),
        }
    }
}

/// [`enter`], from async code.
pub async fn enter_async(replica: &Path, token: u64) -> Result<FenceGuard, FenceError> {
    let replica = replica.to_owned();
    tokio::task::spawn_blocking(move || enter(&replica, token))
        .await
        .map_err(|error| FenceError::Io(std::io::Error::other(error)))?
}

/// Writes the node's reference-transaction hook into `dir`, for receive-pack's ref updates
/// (git runs it with `core.hooksPath` pointing there when a push carries a token):
/// - `prepared`: `gitfleet hook prepared` takes the replica's fence lock, refuses a token
///   older than the fence (git then aborts the update), raises the fence, and leaves the lock
///   with a forked holder until the transaction ends;
/// - `committed` and `aborted`: the holder is told to let go.
pub fn install_hook(dir: &Path, exe: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let exe = exe.to_string_lossy().replace('\'', r"'\''");
    let script = format!(
        "#!/bin/sh\n\
         # gitfleet: checks the replica's fence when a push changes its refs.\n\
         [ -n \"${FENCE_ENV}\" ] || exit 0\n\
         case \"$1\" in\n\
         prepared) exec '{exe}' hook prepared ;;\n\
         committed|aborted) rm -f {HOLDER_FILE} ;;\n\
         esac\n\
         exit 0\n"
    );
    let path = dir.join("reference-transaction");
    let new = dir.join("reference-transaction.new");
    std::fs::write(&new, script)?;
    std::fs::set_permissions(&new, std::fs::Permissions::from_mode(0o755))?;
    std::fs::rename(new, path)
}

/// `gitfleet hook prepared`, run by git in the replica's directory once a push's ref updates
/// are locked and about to be committed: enters the fence for `token`, and leaves the lock
/// with a forked child that holds it until the transaction ends or `git` (the hook's parent,
/// pid `git`) exits. Must run single-threaded (it forks).
pub fn hook_prepared(replica: &Path, token: u64, git: u32) -> Result<(), FenceError> {
    let guard = enter(replica, token)?;
    std::fs::write(replica.join(HOLDER_FILE), "")?;
    // The lock belongs to the open file, which the child shares. Dropping the guard would
    // unlock it for the child too: this process forgets it and exits.
    // SAFETY: the hook runs no other thread, so the child may run any code.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Child) => {
            // Let go of git's pipes, so that nothing waits for this process's output.
            if let Ok(null) = OpenOptions::new().read(true).write(true).open("/dev/null") {
                let _ = nix::unistd::dup2_stdin(&null);
                let _ = nix::unistd::dup2_stdout(&null);
                let _ = nix::unistd::dup2_stderr(&null);
            }
            hold(replica, git);
            drop(guard);
            std::process::exit(0);
        }
        Ok(nix::unistd::ForkResult::Parent { .. }) => {
            std::mem::forget(guard);
            Ok(())
        }
        Err(errno) => Err(FenceError::Io(errno.into())),
    }
}

/// Keeps the fence lock until the holder file is gone (the transaction ended) or the process
/// `git` exited.
fn hold(replica: &Path, git: u32) {
    let git = nix::unistd::Pid::from_raw(git as i32);
    while replica.join(HOLDER_FILE).exists() && nix::sys::signal::kill(git, None).is_ok() {
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Replaces the fence: a crash leaves either the old token or the new one, never a torn file.
fn write(replica: &Path, token: u64) -> Result<(), FenceError> {
    let new = replica.join(FENCE_NEW);
    let mut file = File::create(&new)?;
    writeln!(file, "{token}")?;
    file.sync_all()?;
    std::fs::rename(&new, replica.join(FENCE_FILE))?;
    File::open(replica)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Barrier};

    use super::*;

    #[test]
    fn a_fence_only_rises_and_survives_on_disk() {
        let replica = tempfile::tempdir().unwrap();
        assert_eq!(read(replica.path()).unwrap(), 0);
        assert_eq!(enter(replica.path(), 5).unwrap().fence, 5);
        assert_eq!(read(replica.path()).unwrap(), 5);
        // The same token again is the same holder going on.
        assert!(enter(replica.path(), 5).is_ok());
        let refused = enter(replica.path(), 3).unwrap_err();
        assert_eq!(refused.to_string(), "fenced: token 3 is older than 5");
        assert_eq!(read(replica.path()).unwrap(), 5);
        assert!(enter(replica.path(), 9).is_ok());
        assert_eq!(
            std::fs::read_to_string(replica.path().join(FENCE_FILE)).unwrap(),
            "9\n"
        );
        assert!(!replica.path().join(FENCE_NEW).exists());
    }

    #[test]
    fn a_holder_of_the_lock_keeps_a_newer_token_waiting_and_an_older_one_is_then_refused() {
        let replica = tempfile::tempdir().unwrap();
        let guard = enter(replica.path(), 10).unwrap();
        let started = Arc::new(Barrier::new(2));
        let newer = std::thread::spawn({
            let path = replica.path().to_owned();
            let started = started.clone();
            move || {
                started.wait();
                enter(&path, 11).map(|guard| guard.fence)
            }
        });
        started.wait();
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(!newer.is_finished(), "the lock is held");
        assert_eq!(read(replica.path()).unwrap(), 10);
        drop(guard);
        assert_eq!(newer.join().unwrap().unwrap(), 11);
        assert!(matches!(
            enter(replica.path(), 10),
            Err(FenceError::Fenced {
                token: 10,
                fence: 11
            })
        ));
    }

    #[test]
    fn a_damaged_fence_is_an_error_not_a_zero() {
        let replica = tempfile::tempdir().unwrap();
        std::fs::write(replica.path().join(FENCE_FILE), "garbage").unwrap();
        assert!(matches!(enter(replica.path(), 1), Err(FenceError::Io(_))));
    }
}

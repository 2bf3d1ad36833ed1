//! The node's git hooks, each a link to the gitfleet binary, which knows by the name it was run
//! by that it runs as a hook (see [`run_as_hook`]): the `reference-transaction` hook checks a
//! push's fencing token against the replica's fence when its refs change, and a prepared
//! push's `pre-receive` reports its commands at the rendezvous and, once told to commit,
//! enters the fence for the rest of the push (see [`super::prepare`]).

use std::fs::OpenOptions;
use std::path::Path;
use std::time::Duration;

use super::fence::{FenceError, enter};

/// The environment that carries a push's token to the node's reference-transaction hook.
pub const FENCE_ENV: &str = "GITFLEET_FENCE";

/// Present while a push holds the fence lock through its holder process, suffixed with the pid
/// of the push's git process (see [`holder_file`]), so that one push's hook never lets go of
/// another's fence.
const HOLDER_FILE: &str = "gitfleet-fence.holder";

/// The holder file of the git process `git`.
fn holder_file(git: u32) -> String {
    format!("{HOLDER_FILE}.{git}")
}

/// The name git runs the hook by, and by which this program knows it was run as the hook.
pub const HOOK_NAME: &str = "reference-transaction";

/// The hook a prepared push reports its commands from, with the pack still in quarantine (see
/// [`super::prepare`]); it does nothing for any other push.
pub const PRE_RECEIVE: &str = "pre-receive";

/// The hooks of a push that carries a fencing token: only the ref transactions' check, so that
/// no other hook costs a process start.
pub const FENCED_HOOKS: &[&str] = &[HOOK_NAME];
/// The hooks of a prepared push: `pre-receive` alone, which holds the fence from the decision
/// to the end of the push, so that no ref transaction costs a process start.
pub const PREPARED_HOOKS: &[&str] = &[PRE_RECEIVE];
/// Every hook the node installs anywhere.
const ALL_HOOKS: &[&str] = &[HOOK_NAME, PRE_RECEIVE];

/// Installs the hooks `names` in `dir`, for receive-pack (git runs them with `core.hooksPath`
/// pointing there), and removes any other hook of the node's from it, left by an earlier
/// version. Each hook is a link to this program (`exe`), which [`run_as_hook`] recognises by
/// the name it was run by, so no shell starts for any of them.
pub fn install_hook(dir: &Path, exe: &Path, names: &[&str]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for stale in ALL_HOOKS.iter().filter(|hook| !names.contains(hook)) {
        match std::fs::remove_file(dir.join(stale)) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(error),
            _ => {}
        }
    }
    for name in names {
        let path = dir.join(name);
        let new = dir.join(format!("{name}.new"));
        match std::fs::remove_file(&new) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(error),
            _ => {}
        }
        std::os::unix::fs::symlink(exe, &new)?;
        std::fs::rename(new, path)?;
    }
    Ok(())
}

/// Runs the hook when this process was started as the node's reference-transaction hook (by
/// [`HOOK_NAME`]); None otherwise. git runs it in the replica's directory, with the
/// transaction's state as its argument:
/// - `prepared`: [`hook_prepared`] checks and raises the fence, and leaves the lock with a
///   holder until the transaction ends (a refusal makes git abort the update);
/// - `committed` and `aborted`: the holder is told to let go;
/// - anything else, or a push with no token (`GITFLEET_FENCE` unset): nothing.
pub fn run_as_hook() -> Option<std::process::ExitCode> {
    use std::process::ExitCode;
    let mut args = std::env::args_os();
    let name = args.next()?;
    let name = Path::new(&name).file_name()?;
    if name == PRE_RECEIVE {
        return Some(match std::env::var_os(super::prepare::PREPARE_ENV) {
            Some(socket) => super::prepare::pre_receive(Path::new(&socket)),
            None => ExitCode::SUCCESS,
        });
    }
    if name != HOOK_NAME {
        return None;
    }
    let replica = Path::new(".");
    let state = args.next();
    let state = state.as_ref().and_then(|state| state.to_str());
    let Some(token) = std::env::var_os(FENCE_ENV) else {
        return Some(ExitCode::SUCCESS);
    };
    let code = match state {
        Some("prepared") => {
            let Some(token) = token.to_str().and_then(|token| token.parse().ok()) else {
                eprintln!("gitfleet: {FENCE_ENV} is not a token");
                return Some(ExitCode::FAILURE);
            };
            match hook_prepared(replica, token, std::os::unix::process::parent_id()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("{error}");
                    ExitCode::FAILURE
                }
            }
        }
        Some("committed" | "aborted") => {
            let git = std::os::unix::process::parent_id();
            let _ = std::fs::remove_file(replica.join(holder_file(git)));
            ExitCode::SUCCESS
        }
        _ => ExitCode::SUCCESS,
    };
    Some(code)
}

/// Enters the fence for `token` from a hook run by git in the replica's directory: the
/// `prepared` state of a fenced push's ref transaction, or a prepared push's `pre-receive`
/// told to commit. Leaves the lock with a forked child that holds it until the holder file is
/// removed (the transaction ended) or `git` (the hook's parent, pid `git`) exits. Must run
/// single-threaded (it forks).
pub fn hook_prepared(replica: &Path, token: u64, git: u32) -> Result<(), FenceError> {
    let guard = enter(replica, token)?;
    std::fs::write(replica.join(holder_file(git)), "")?;
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
/// `git` exited, and removes the holder file, still under the lock.
fn hold(replica: &Path, git: u32) {
    let file = replica.join(holder_file(git));
    let git = nix::unistd::Pid::from_raw(git as i32);
    while file.exists() && nix::sys::signal::kill(git, None).is_ok() {
        std::thread::sleep(Duration::from_millis(2));
    }
    let _ = std::fs::remove_file(file);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installing_replaces_the_hooks_and_removes_those_no_longer_wanted() {
        let dir = tempfile::tempdir().unwrap();
        let hooks = dir.path().join("hooks");
        let exe = Path::new("/bin/true");
        install_hook(&hooks, exe, &[HOOK_NAME, PRE_RECEIVE]).unwrap();
        assert!(hooks.join(HOOK_NAME).exists());
        install_hook(&hooks, exe, PREPARED_HOOKS).unwrap();
        assert!(hooks.join(PRE_RECEIVE).exists());
        assert!(
            std::fs::symlink_metadata(hooks.join(HOOK_NAME)).is_err(),
            "an earlier version's hook is left"
        );
        assert_eq!(std::fs::read_link(hooks.join(PRE_RECEIVE)).unwrap(), exe);
    }
}

//! A replica's fence: the highest lease token its node has accepted for it. A call that changes
//! the replica's refs may carry a token (the [`FENCE_HEADER`] of its request); the node takes
//! the replica's fence lock, refuses a token lower than the fence, raises the fence to the
//! token, and holds the lock while the refs change. An operation that arrives, or resumes,
//! after a newer one was accepted changes nothing.
//!
//! The fence lives in the replica's directory, beside git's own files. `gitfleet-fence` holds
//! two records, a page apart, each a token with its check digits; the fence is the higher
//! valid one. Raising the fence overwrites the lower record in place and syncs its data once,
//! so a crash leaves either the old fence or the new one (a torn record fails its check and
//! the other record still holds the old fence). The file is made whole the first time (written
//! aside, synced, renamed, the directory synced); a file in the earlier one-token form is read
//! and replaced the same way. `gitfleet-fence.lock` is the file locked with `flock`, so that
//! any process on the node (a git hook as much as the node itself) can take the same lock. A
//! replica that was never fenced has the fence 0.

use std::fs::{File, OpenOptions};
use std::io::{Read as _, Write as _};
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// The request metadata that carries the caller's token. Only the cluster's own callers set
/// it: the proxy refuses a client's call that does.
pub const FENCE_HEADER: &str = "gitfleet-fence";

const FENCE_FILE: &str = "gitfleet-fence";
const FENCE_LOCK: &str = "gitfleet-fence.lock";
const FENCE_NEW: &str = "gitfleet-fence.new";
/// Where the second record starts: a page after the first, so that no write of one touches
/// the other.
const SLOT_SPACING: usize = 4096;
/// A record: the token in 20 digits, a space, its check in 8 hex digits, a newline.
const RECORD_LEN: usize = 30;
const FILE_LEN: usize = SLOT_SPACING + RECORD_LEN;

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
    Ok(load(replica)?.fence)
}

/// The fence as it lies on disk.
struct Stored {
    fence: u64,
    /// Each record's token, None where it fails its check; None for a file not in the
    /// two-record form (absent, or the earlier one-token form).
    records: Option<[Option<u64>; 2]>,
}

fn load(replica: &Path) -> Result<Stored, FenceError> {
    let mut bytes = Vec::new();
    match File::open(replica.join(FENCE_FILE)) {
        Ok(file) => file.take(2 * FILE_LEN as u64).read_to_end(&mut bytes)?,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Stored {
                fence: 0,
                records: None,
            });
        }
        Err(error) => return Err(error.into()),
    };
    let damaged = |what: String| {
        FenceError::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{FENCE_FILE} {what}"),
        ))
    };
    if bytes.len() != FILE_LEN {
        let text = String::from_utf8_lossy(&bytes);
        let fence = text
            .trim()
            .parse()
            .map_err(|_| damaged(format!("holds {text:?}, not a token")))?;
        return Ok(Stored {
            fence,
            records: None,
        });
    }
    let records = [
        parse_record(&bytes[..RECORD_LEN]),
        parse_record(&bytes[SLOT_SPACING..]),
    ];
    let fence = records
        .iter()
        .flatten()
        .max()
        .copied()
        .ok_or_else(|| damaged("has no intact record".into()))?;
    Ok(Stored {
        fence,
        records: Some(records),
    })
}

fn record(token: u64) -> String {
    format!("{token:020} {:08x}\n", check(token))
}

fn parse_record(bytes: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(bytes).ok()?.strip_suffix('\n')?;
    let (token, sum) = text.split_once(' ')?;
    let token: u64 = token.parse().ok()?;
    (u32::from_str_radix(sum, 16).ok()? == check(token)).then_some(token)
}

/// FNV-1a over the token's bytes: enough to tell a torn record from a whole one.
fn check(token: u64) -> u32 {
    token
        .to_le_bytes()
        .iter()
        .fold(0x811c_9dc5_u32, |hash, byte| {
            (hash ^ u32::from(*byte)).wrapping_mul(0x0100_0193)
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
    let stored = load(replica)?;
    if token < stored.fence {
        return Err(FenceError::Fenced {
            token,
            fence: stored.fence,
        });
    }
    if token > stored.fence {
        write(replica, &stored, token)?;
    }
    Ok(FenceGuard {
        _lock: lock,
        fence: token,
    })
}

/// Takes the lock on `file`, waiting up to `wait` for whoever holds it.
fn lock(mut file: File, wait: Duration) -> Result<Flock<File>, FenceError> {
    let started = Instant::now();
    // Most holders let go within milliseconds (a raise, a push's commit): look again soon.
    let mut pause = Duration::from_micros(500);
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((returned, Errno::EWOULDBLOCK)) if started.elapsed() < wait => {
                file = returned;
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(5));
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

/// Raises the fence to `token`: the lower record is overwritten in place and its data synced,
/// so a crash leaves the old fence or the new one. A file not yet in the two-record form is
/// replaced whole (written aside, synced, renamed, the directory synced).
///
/// A failed sync may leave the new record in the page cache but not on disk, where a later look
/// would take the fence as raised and a crash would undo it. The file is then written whole
/// instead; if that fails too, both records are spoiled, so that the fence reads as damaged
/// (every fenced call refused, and said why) rather than as a raise that might not last.
fn write(replica: &Path, stored: &Stored, token: u64) -> Result<(), FenceError> {
    let Some(records) = stored.records else {
        return replace(replica, token).inspect_err(|_| spoil(replica));
    };
    let slot = match records {
        [None, _] => 0,
        [_, None] => 1,
        [Some(first), Some(second)] => usize::from(second < first),
    };
    let file = OpenOptions::new()
        .write(true)
        .open(replica.join(FENCE_FILE))?;
    let written = file
        .write_all_at(record(token).as_bytes(), (slot * SLOT_SPACING) as u64)
        .and_then(|()| file.sync_data());
    match written {
        Ok(()) => Ok(()),
        Err(error) => match replace(replica, token) {
            Ok(()) => Ok(()),
            Err(_) => {
                spoil(replica);
                Err(error.into())
            }
        },
    }
}

/// Writes the fence file whole, aside, and renames it into place.
fn replace(replica: &Path, token: u64) -> Result<(), FenceError> {
    let mut bytes = vec![0u8; FILE_LEN];
    for slot in 0..2 {
        bytes[slot * SLOT_SPACING..][..RECORD_LEN].copy_from_slice(record(token).as_bytes());
    }
    let new = replica.join(FENCE_NEW);
    let mut file = File::create(&new)?;
    file.write_all(&bytes)?;
    file.sync_all()?;
    std::fs::rename(&new, replica.join(FENCE_FILE))?;
    File::open(replica)?.sync_all()?;
    Ok(())
}

/// Makes both records of the fence file fail their check, as far as anything can still be
/// written.
fn spoil(replica: &Path) {
    let spoiled = [b'x'; RECORD_LEN];
    if let Ok(file) = OpenOptions::new()
        .write(true)
        .open(replica.join(FENCE_FILE))
    {
        for slot in 0..2 {
            let _ = file.write_all_at(&spoiled, (slot * SLOT_SPACING) as u64);
        }
        let _ = file.set_len(FILE_LEN as u64);
    }
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
        let bytes = std::fs::read(replica.path().join(FENCE_FILE)).unwrap();
        assert_eq!(bytes.len(), FILE_LEN);
        assert_eq!(parse_record(&bytes[..RECORD_LEN]), Some(9));
        assert_eq!(parse_record(&bytes[SLOT_SPACING..]), Some(5));
        assert!(!replica.path().join(FENCE_NEW).exists());
        // Each raise overwrites the lower record.
        assert!(enter(replica.path(), 12).is_ok());
        let bytes = std::fs::read(replica.path().join(FENCE_FILE)).unwrap();
        assert_eq!(parse_record(&bytes[..RECORD_LEN]), Some(9));
        assert_eq!(parse_record(&bytes[SLOT_SPACING..]), Some(12));
        assert_eq!(read(replica.path()).unwrap(), 12);
    }

    #[test]
    fn a_torn_record_leaves_the_fence_it_was_raised_from() {
        let replica = tempfile::tempdir().unwrap();
        enter(replica.path(), 40).unwrap();
        enter(replica.path(), 41).unwrap();
        // The raise to 42 overwrites the record holding 40; a crash tears it halfway.
        let path = replica.path().join(FENCE_FILE);
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        let slot = if read_slot(&path, 0) == Some(40) {
            0
        } else {
            1
        };
        file.write_all_at(&record(42).as_bytes()[..25], (slot * SLOT_SPACING) as u64)
            .unwrap();
        assert_eq!(read(replica.path()).unwrap(), 41);
        assert!(matches!(
            enter(replica.path(), 40),
            Err(FenceError::Fenced {
                token: 40,
                fence: 41
            })
        ));
        // The torn record is the one the next raise takes.
        enter(replica.path(), 43).unwrap();
        assert_eq!(read_slot(&path, slot), Some(43));
        assert_eq!(read(replica.path()).unwrap(), 43);
        // With both records torn, the fence cannot be known: an error, never a zero.
        file.write_all_at(b"9999", 0).unwrap();
        file.write_all_at(b"9999", SLOT_SPACING as u64).unwrap();
        assert!(matches!(enter(replica.path(), 50), Err(FenceError::Io(_))));
    }

    #[test]
    fn a_spoiled_fence_refuses_every_token_instead_of_reading_zero() {
        let replica = tempfile::tempdir().unwrap();
        enter(replica.path(), 7).unwrap();
        spoil(replica.path());
        assert!(matches!(read(replica.path()), Err(FenceError::Io(_))));
        assert!(matches!(enter(replica.path(), 100), Err(FenceError::Io(_))));
        // A one-token file is spoiled too.
        std::fs::write(replica.path().join(FENCE_FILE), "12\n").unwrap();
        spoil(replica.path());
        assert!(matches!(read(replica.path()), Err(FenceError::Io(_))));
    }

    fn read_slot(path: &Path, slot: usize) -> Option<u64> {
        let bytes = std::fs::read(path).unwrap();
        parse_record(&bytes[slot * SLOT_SPACING..][..RECORD_LEN])
    }

    #[test]
    fn a_fence_in_the_one_token_form_is_read_and_rewritten_whole() {
        let replica = tempfile::tempdir().unwrap();
        std::fs::write(replica.path().join(FENCE_FILE), "17\n").unwrap();
        assert_eq!(read(replica.path()).unwrap(), 17);
        assert!(enter(replica.path(), 16).is_err());
        enter(replica.path(), 18).unwrap();
        assert_eq!(
            std::fs::read(replica.path().join(FENCE_FILE))
                .unwrap()
                .len(),
            FILE_LEN
        );
        assert_eq!(read(replica.path()).unwrap(), 18);
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

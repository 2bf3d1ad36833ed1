//! The small machinery every role shares: trying a statement or a call again with backoff,
//! keeping a lease alive while work runs under it, naming this process in the leases it takes,
//! and telling whoever runs a long command how it goes.

pub mod histogram;
mod lease;
mod retry;

pub use histogram::Histogram;
pub use lease::{LeaseKeeper, host_name, owner_id};
pub use retry::{Backoff, Give, Retry, Stop, retry};

/// Prints a line for whoever runs us; a closed stdout or stderr is not an error worth dying of.
pub fn say(to_stderr: bool, line: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let _ = if to_stderr {
        writeln!(std::io::stderr(), "{line}")
    } else {
        writeln!(std::io::stdout(), "{line}")
    };
}

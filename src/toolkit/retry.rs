//! Trying again: one backoff policy, one loop that knows which errors are worth another try,
//! when to stop, and how to be cancelled. Every place that sleeps and tries again uses it.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use rand::Rng as _;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Exponential backoff: `first`, doubled at each attempt, at most `max`; with jitter, a delay
/// falls between half and all of that, so that work that failed together does not retry
/// together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
    pub jitter: bool,
}

impl Backoff {
    /// Backoff with jitter.
    pub const fn new(first: Duration, max: Duration) -> Self {
        Self {
            first,
            max,
            jitter: true,
        }
    }

    /// The same without jitter: every delay is the full one.
    pub const fn exact(first: Duration, max: Duration) -> Self {
        Self {
            first,
            max,
            jitter: false,
        }
    }

    /// The pause after `attempt` failures (0: after the first).
    pub fn delay(&self, attempt: u32) -> Duration {
        let full = self
            .first
            .saturating_mul(1u32 << attempt.min(20))
            .min(self.max);
        if !self.jitter {
            return full;
        }
        let half = full / 2;
        half + full.mul_f64(rand::rng().random_range(0.0..=0.5))
    }
}

/// When a [`retry`] gives up on errors worth another try.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Give {
    /// After this many attempts in all.
    Attempts(u32),
    /// At this instant; a pause never runs past it.
    At(Instant),
}

/// A retry policy.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    pub backoff: Backoff,
    pub up: Give,
    /// Failures logged at debug level before they are logged as warnings.
    pub warn_after: u32,
}

impl Retry {
    /// At most `attempts` attempts.
    pub fn attempts(backoff: Backoff, attempts: u32) -> Self {
        Self {
            backoff,
            up: Give::Attempts(attempts),
            warn_after: u32::MAX,
        }
    }

    /// Attempts until `deadline`.
    pub fn until(backoff: Backoff, deadline: Instant) -> Self {
        Self {
            backoff,
            up: Give::At(deadline),
            warn_after: u32::MAX,
        }
    }

    /// Logs every failure after the first `quiet` as a warning.
    pub fn warn_after(mut self, quiet: u32) -> Self {
        self.warn_after = quiet;
        self
    }
}

/// Why a [`retry`] stopped without a result.
#[derive(Debug, PartialEq, Eq)]
pub enum Stop<E> {
    /// An error not worth another try.
    Permanent(E),
    /// The last error worth another try, when the policy gave up.
    Exhausted(E),
    /// Cancelled while it waited.
    Cancelled,
}

impl<E> Stop<E> {
    /// The error, whether permanent or the last of many; None when cancelled.
    pub fn into_error(self) -> Option<E> {
        match self {
            Stop::Permanent(error) | Stop::Exhausted(error) => Some(error),
            Stop::Cancelled => None,
        }
    }
}

/// Runs `operation` until it succeeds, fails with an error `is_transient` calls not worth
/// another try, the policy gives up, or `cancel` is cancelled (checked while it pauses).
pub async fn retry<T, E, F, Fut>(
    policy: &Retry,
    description: &str,
    cancel: Option<&CancellationToken>,
    is_transient: impl Fn(&E) -> bool,
    mut operation: F,
) -> Result<T, Stop<E>>
where
    E: Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut failures = 0u32;
    loop {
        let error = match operation().await {
            Ok(value) => return Ok(value),
            Err(error) if !is_transient(&error) => return Err(Stop::Permanent(error)),
            Err(error) => error,
        };
        failures += 1;
        let pause = policy.backoff.delay(failures - 1);
        let pause = match policy.up {
            Give::Attempts(attempts) if failures >= attempts => {
                return Err(Stop::Exhausted(error));
            }
            Give::Attempts(_) => pause,
            Give::At(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(Stop::Exhausted(error));
                }
                pause.min(left)
            }
        };
        if failures > policy.warn_after {
            tracing::warn!(%error, failures, ?pause, "{description}: trying again");
        } else {
            tracing::debug!(%error, failures, ?pause, "{description}: trying again");
        }
        match cancel {
            Some(cancel) => tokio::select! {
                _ = cancel.cancelled() => return Err(Stop::Cancelled),
                _ = tokio::time::sleep(pause) => {}
            },
            None => tokio::time::sleep(pause).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn backoff_doubles_with_jitter_and_stays_under_its_cap() {
        let base = Duration::from_secs(1);
        let max = Duration::from_secs(60);
        let backoff = Backoff::new(base, max);
        for attempt in 0..40 {
            let full = base.saturating_mul(1 << attempt.min(20)).min(max);
            let delay = backoff.delay(attempt);
            assert!(delay >= full / 2 && delay <= full, "{attempt}: {delay:?}");
        }
        assert!(backoff.delay(3) >= Duration::from_secs(4));
        let exact = Backoff::exact(10 * MS, 250 * MS);
        let delays: Vec<Duration> = (0..6).map(|attempt| exact.delay(attempt)).collect();
        assert_eq!(
            delays,
            [10, 20, 40, 80, 160, 250].map(|ms| ms * MS).to_vec()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn transient_errors_are_tried_again_until_success() {
        let calls = AtomicU32::new(0);
        let started = Instant::now();
        let policy = Retry::attempts(Backoff::exact(100 * MS, Duration::from_secs(1)), 5);
        let result: Result<u32, Stop<String>> = retry(
            &policy,
            "test",
            None,
            |_| true,
            || {
                let call = calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    if call < 2 {
                        Err(format!("failure {call}"))
                    } else {
                        Ok(call)
                    }
                }
            },
        )
        .await;
        assert_eq!(result, Ok(2));
        // Two pauses: 100ms then 200ms.
        assert_eq!(started.elapsed(), 300 * MS);
    }

    #[tokio::test(start_paused = true)]
    async fn a_permanent_error_stops_at_once_and_attempts_run_out() {
        let policy = Retry::attempts(Backoff::exact(MS, MS), 3);
        let calls = AtomicU32::new(0);
        let result: Result<(), Stop<&str>> = retry(
            &policy,
            "test",
            None,
            |error| *error == "again",
            || {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Err("no") }
            },
        )
        .await;
        assert_eq!(result, Err(Stop::Permanent("no")));
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        let result: Result<(), Stop<&str>> = retry(
            &policy,
            "test",
            None,
            |_| true,
            || {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Err("again") }
            },
        )
        .await;
        assert_eq!(result, Err(Stop::Exhausted("again")));
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_bounds_the_pauses_and_the_attempts() {
        let started = Instant::now();
        let policy = Retry::until(
            Backoff::exact(100 * MS, Duration::from_secs(10)),
            started + 250 * MS,
        );
        let result: Result<(), Stop<&str>> =
            retry(&policy, "test", None, |_| true, || async { Err("down") }).await;
        assert_eq!(result, Err(Stop::Exhausted("down")));
        // 100ms, then 150ms (what was left of the 200ms pause), then no time left.
        assert_eq!(started.elapsed(), 250 * MS);
    }

    #[tokio::test(start_paused = true)]
    async fn cancellation_ends_a_pause() {
        let cancel = CancellationToken::new();
        let policy = Retry::attempts(Backoff::exact(Duration::from_secs(60), Duration::MAX), 10);
        let canceller = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            canceller.cancel();
        });
        let started = Instant::now();
        let result: Result<(), Stop<&str>> = retry(
            &policy,
            "test",
            Some(&cancel),
            |_| true,
            || async { Err("down") },
        )
        .await;
        assert_eq!(result, Err(Stop::Cancelled));
        assert_eq!(started.elapsed(), Duration::from_secs(1));
    }
}

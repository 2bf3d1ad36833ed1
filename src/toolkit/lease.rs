//! Keeping a lease: renewed every third of its length while the work under it runs, and given
//! up, so that the work stops, when it is taken away or might have run out. A renewal only
//! extends the lease from the moment it was *sent*: the answer may arrive late, and the
//! database counted from when it ran the statement. The keeper gives up a margin before the
//! lease could have run out, so no other holder overlaps with work still running here.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

/// The share of the lease kept as a margin: the keeper gives up this much before the lease
/// could have run out.
const MARGIN_DIVISOR: u32 = 10;

/// Renews a lease until dropped. [`LeaseKeeper::lost`] is cancelled when the lease is taken
/// away or could not be renewed in time; the work under it must then stop and record nothing.
#[derive(Debug)]
pub struct LeaseKeeper {
    lost: CancellationToken,
    _stop: DropGuard,
}

impl LeaseKeeper {
    /// Starts renewing a lease of `duration` taken by a statement sent at `taken_at`.
    /// `renew` answers true while the lease is still this holder's, false once it is not; an
    /// error is a renewal that may or may not have landed.
    pub fn start<F, Fut, E>(
        description: &'static str,
        duration: Duration,
        taken_at: Instant,
        renew: F,
    ) -> Self
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = Result<bool, E>> + Send + 'static,
        E: Display + Send + 'static,
    {
        let lost = CancellationToken::new();
        let stop = CancellationToken::new();
        tokio::spawn(keep(
            description,
            duration,
            taken_at,
            renew,
            stop.clone(),
            lost.clone(),
        ));
        Self {
            lost,
            _stop: stop.drop_guard(),
        }
    }

    /// Cancelled once the lease is lost.
    pub fn lost(&self) -> &CancellationToken {
        &self.lost
    }

    pub fn is_lost(&self) -> bool {
        self.lost.is_cancelled()
    }
}

async fn keep<F, Fut, E>(
    description: &'static str,
    duration: Duration,
    taken_at: Instant,
    mut renew: F,
    stop: CancellationToken,
    lost: CancellationToken,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool, E>>,
    E: Display,
{
    let margin = duration / MARGIN_DIVISOR;
    // The last moment the work may go on under what is known of the lease.
    let mut give_up_at = taken_at + duration - margin;
    let mut next = taken_at + duration / 3;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(next.min(give_up_at)) => {}
        }
        if Instant::now() >= give_up_at {
            tracing::error!(
                ?duration,
                "{description}: the lease may have run out: giving it up"
            );
            lost.cancel();
            return;
        }
        let sent = Instant::now();
        let answer = tokio::select! {
            _ = stop.cancelled() => return,
            answer = tokio::time::timeout_at(give_up_at, renew()) => answer,
        };
        match answer {
            Ok(Ok(true)) => {
                give_up_at = sent + duration - margin;
                next = sent + duration / 3;
            }
            Ok(Ok(false)) => {
                tracing::warn!("{description}: the lease was taken away");
                lost.cancel();
                return;
            }
            Ok(Err(error)) => {
                tracing::warn!(%error, "{description}: cannot renew the lease");
                // Try again soon, but no more than a few times a third.
                next = Instant::now() + (duration / 12).max(Duration::from_millis(10));
            }
            // The deadline passed while the renewal was on its way: checked at the top.
            Err(_) => {}
        }
    }
}

/// How this process names itself in the leases it takes: its role, host, process id and a
/// random part, such as `worker@db-7:4242:5f3a9c01`. One format for every role, so that an
/// operator reading a lease owner knows who holds it.
pub fn owner_id(role: &str) -> String {
    format!(
        "{role}@{}:{}:{:08x}",
        host_name(),
        std::process::id(),
        rand::random::<u32>()
    )
}

/// This machine's name, or "unknown".
pub fn host_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|name| name.into_string().ok())
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    type Answer = futures_util::future::BoxFuture<'static, Result<bool, String>>;

    /// A 30-second lease taken now, whose renewals answer as `answer` says for each (numbered
    /// from 0); and the count of renewals sent.
    fn lease(answer: fn(u32) -> Answer) -> (LeaseKeeper, Arc<AtomicU32>) {
        let calls = Arc::new(AtomicU32::new(0));
        let counted = calls.clone();
        let keeper = LeaseKeeper::start("test", 30 * SECOND, Instant::now(), move || {
            answer(counted.fetch_add(1, Ordering::SeqCst))
        });
        (keeper, calls)
    }

    /// Lost after how long.
    async fn lost_after(keeper: &LeaseKeeper) -> Duration {
        let started = Instant::now();
        keeper.lost().cancelled().await;
        started.elapsed()
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_is_renewed_every_third_of_it() {
        let (keeper, renewals) = lease(|_| Box::pin(async { Ok(true) }));
        tokio::time::sleep(95 * SECOND).await;
        assert_eq!(renewals.load(Ordering::SeqCst), 9);
        assert!(!keeper.is_lost());
        drop(keeper);
        tokio::time::sleep(60 * SECOND).await;
        assert_eq!(
            renewals.load(Ordering::SeqCst),
            9,
            "renewal stops when dropped"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_taken_away_is_lost_at_once() {
        let (keeper, _) = lease(|_| Box::pin(async { Ok(false) }));
        assert_eq!(lost_after(&keeper).await, 10 * SECOND);
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewal_that_answers_after_the_lease_could_have_run_out_loses_it() {
        let (keeper, _) = lease(|_| {
            Box::pin(async {
                tokio::time::sleep(3600 * SECOND).await;
                Ok(true)
            })
        });
        assert_eq!(lost_after(&keeper).await, 27 * SECOND);
    }

    #[tokio::test(start_paused = true)]
    async fn failing_renewals_give_up_a_margin_before_the_last_renewal_sent_runs_out() {
        let (keeper, _) = lease(|call| {
            Box::pin(async move {
                match call {
                    0 => Ok(true),
                    _ => Err("the database is down".to_owned()),
                }
            })
        });
        // Renewed when sent at 10s: it lasts to 40s, given up at 37s.
        assert_eq!(lost_after(&keeper).await, 37 * SECOND);
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewal_whose_answer_is_late_counts_from_when_it_was_sent() {
        // The first renewal is sent at 10s and answers at 25s; the next one hangs.
        let (keeper, _) = lease(|call| {
            Box::pin(async move {
                let delay = if call == 0 { 15 } else { 3600 };
                tokio::time::sleep(delay * SECOND).await;
                Ok(true)
            })
        });
        // Counted from 25s (the answer) it would last to 55s; from 10s (sent), to 40s, and
        // it is given up the margin before.
        assert_eq!(lost_after(&keeper).await, 37 * SECOND);
    }

    #[test]
    fn owner_ids_name_the_role_and_differ() {
        let one = owner_id("worker");
        assert!(one.starts_with("worker@"), "{one}");
        assert_eq!(one.matches(':').count(), 2, "{one}");
        assert_ne!(one, owner_id("worker"));
    }
}

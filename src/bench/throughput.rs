//! Pushes a second on one repository: writers on branches of their own push one commit after
//! another for a fixed time, and the proxy's histogram of lease hold times says how long each
//! push held the repository's lease.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::measure::Setup;
use super::progress;
use super::report::{Row, Target};
use crate::toolkit::histogram::{buckets, quantile};

/// Writers at once, each on its own branch.
pub(super) const WRITERS: usize = 8;
/// How long they push.
const DURATION: Duration = Duration::from_secs(10);
const LEASE_HELD: &str = "gitfleet_proxy_write_lease_held_seconds";

pub(super) fn pushes_per_second(setup: &Setup) -> anyhow::Result<Vec<Row>> {
    let work_trees = setup.small_clones("rate", WRITERS)?;
    progress(format_args!(
        "pushes a second: {WRITERS} writers on branches of their own for {DURATION:?}"
    ));
    let before = buckets(&setup.cluster.scrape()?, LEASE_HELD);
    let stop = Arc::new(AtomicBool::new(false));
    let refused = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let writers: Vec<_> = work_trees
        .into_iter()
        .enumerate()
        .map(|(writer, work_tree)| {
            let (git, stop, refused) = (setup.git.clone(), stop.clone(), refused.clone());
            std::thread::spawn(move || -> anyhow::Result<usize> {
                let mut pushed = 0;
                let mut round = 0;
                while !stop.load(Ordering::Relaxed) {
                    round += 1;
                    std::fs::write(work_tree.join("rate.txt"), format!("{writer} {round}\n"))?;
                    git.run(Some(&work_tree), &["add", "rate.txt"], &[])?;
                    git.run(
                        Some(&work_tree),
                        &["commit", "--quiet", "-m", &format!("rate {writer} {round}")],
                        &[],
                    )?;
                    let branch = format!("HEAD:refs/heads/rate-{writer}");
                    match git.timed(
                        Some(&work_tree),
                        &["push", "--quiet", "origin", &branch],
                        &[],
                    ) {
                        Ok(_) => pushed += 1,
                        Err(_) => {
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                Ok(pushed)
            })
        })
        .collect();
    std::thread::sleep(DURATION);
    stop.store(true, Ordering::Relaxed);
    let mut pushed = 0;
    for writer in writers {
        pushed += writer
            .join()
            .map_err(|_| anyhow::anyhow!("a writer panicked"))??;
    }
    let seconds = started.elapsed().as_secs_f64();
    let after = buckets(&setup.cluster.scrape()?, LEASE_HELD);
    let refused = refused.load(Ordering::Relaxed);
    let rate = pushed as f64 / seconds;
    progress(format_args!(
        "  {pushed} pushes in {seconds:.1}s ({rate:.1}/s), {refused} refused"
    ));
    let mut rows = vec![
        Row::new(
            format!("pushes a second, {WRITERS} writers on one repository"),
            "/s",
            &[rate],
        )
        .target(Target::ValueAtLeast(100.0)),
    ];
    for (name, q) in [("p50", 0.5), ("p99", 0.99)] {
        if let Some(bound) = quantile(&before, &after, q) {
            rows.push(Row::new(
                format!("lease hold of those pushes, {name} (bucket bound)"),
                "s",
                &[bound],
            ));
        }
    }
    Ok(rows)
}

//! A histogram of durations with fixed buckets, kept in atomics so that any task can record
//! into it without a lock, and written in Prometheus' text format.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the buckets, in seconds; the last bucket (+Inf) is implied.
const BOUNDS: [f64; 14] = [
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0,
];

#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last is +Inf.
    buckets: [AtomicU64; BOUNDS.len() + 1],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn record(&self, duration: Duration) {
        let seconds = duration.as_secs_f64();
        let bucket = BOUNDS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(BOUNDS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(duration.as_micros() as u64, Ordering::Relaxed);
    }

    /// The `_bucket`, `_sum` and `_count` lines of metric `name`, with its help and type.
    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (index, bucket) in self.buckets.iter().enumerate() {
            cumulative += bucket.load(Ordering::Relaxed);
            let bound = BOUNDS
                .get(index)
                .map_or_else(|| "+Inf".to_owned(), f64::to_string);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum:.6}");
        let _ = writeln!(out, "{name}_count {}", self.count.load(Ordering::Relaxed));
    }
}

/// The quantile `q` (0 to 1) of the observations between two scrapes of a histogram, read
/// from its cumulative `_bucket` lines: the upper bound of the bucket it falls in. None when
/// nothing was observed in between.
pub fn quantile(before: &[(f64, u64)], after: &[(f64, u64)], q: f64) -> Option<f64> {
    let counts: Vec<(f64, u64)> = after
        .iter()
        .map(|&(bound, count)| {
            let earlier = before
                .iter()
                .find(|(b, _)| *b == bound)
                .map_or(0, |(_, c)| *c);
            (bound, count.saturating_sub(earlier))
        })
        .collect();
    let total = counts.last()?.1;
    if total == 0 {
        return None;
    }
    let rank = (q * total as f64).ceil().max(1.0) as u64;
    counts
        .iter()
        .find(|(_, count)| *count >= rank)
        .map(|(bound, _)| *bound)
}

/// The cumulative buckets of histogram `name` in a Prometheus text scrape, +Inf as infinity.
pub fn buckets(scrape: &str, name: &str) -> Vec<(f64, u64)> {
    let prefix = format!("{name}_bucket{{le=\"");
    scrape
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(&prefix)?;
            let (bound, count) = rest.split_once("\"} ")?;
            let bound = match bound {
                "+Inf" => f64::INFINITY,
                bound => bound.parse().ok()?,
            };
            Some((bound, count.trim().parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_durations_come_back_as_quantiles_between_scrapes() {
        let histogram = Histogram::default();
        histogram.record(Duration::from_millis(30));
        let mut before = String::new();
        histogram.render(&mut before, "held_seconds", "held");
        for millis in [1, 1, 3, 3, 3, 4, 8, 15, 40, 700] {
            histogram.record(Duration::from_millis(millis));
        }
        let mut after = String::new();
        histogram.render(&mut after, "held_seconds", "held");
        assert!(after.contains("held_seconds_count 11\n"), "{after}");
        assert!(
            after.contains("held_seconds_bucket{le=\"+Inf\"} 11\n"),
            "{after}"
        );
        let (before, after) = (
            buckets(&before, "held_seconds"),
            buckets(&after, "held_seconds"),
        );
        assert_eq!(after.len(), 15);
        assert_eq!(quantile(&before, &after, 0.5), Some(0.005));
        assert_eq!(quantile(&before, &after, 0.99), Some(1.0));
        assert_eq!(quantile(&after, &after, 0.5), None);
    }
}

//! The benchmark's figures: each a median with its min and max over runs, set beside its
//! baseline and judged against its target; printed as one table and kept as JSON.

use serde::Serialize;

/// A figure over several runs.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub runs: usize,
}

impl Spread {
    pub fn of(values: &[f64]) -> Self {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = match n {
            0 => f64::NAN,
            _ if n % 2 == 1 => sorted[n / 2],
            _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
        };
        Self {
            median,
            min: sorted.first().copied().unwrap_or(f64::NAN),
            max: sorted.last().copied().unwrap_or(f64::NAN),
            runs: n,
        }
    }

    fn show(&self) -> String {
        if self.runs == 1 || self.min == self.max {
            number(self.median)
        } else {
            format!(
                "{} ({}-{})",
                number(self.median),
                number(self.min),
                number(self.max)
            )
        }
    }
}

/// A number with as many digits as it deserves.
fn number(value: f64) -> String {
    let magnitude = value.abs();
    if magnitude < 0.0005 {
        "0".to_owned()
    } else if magnitude >= 100.0 {
        format!("{value:.0}")
    } else if magnitude >= 10.0 {
        format!("{value:.1}")
    } else if magnitude >= 0.1 {
        format!("{value:.2}")
    } else {
        format!("{value:.3}")
    }
}

/// What a figure must reach.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// gitfleet's median at most this many times the baseline's (a time).
    RatioAtMost(f64),
    /// gitfleet's median at least this many times the baseline's (a rate).
    RatioAtLeast(f64),
    /// gitfleet's median at most this value.
    ValueAtMost(f64),
    /// gitfleet's median at least this value (a rate).
    ValueAtLeast(f64),
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub measure: String,
    pub unit: &'static str,
    pub gitfleet: Spread,
    /// What gitfleet is compared with, such as "git daemon".
    pub baseline_name: &'static str,
    pub baseline: Option<Spread>,
    /// The physical limit, where there is one (a clone straight from the disk).
    pub limit: Option<Spread>,
    pub target: Option<Target>,
    /// gitfleet's median over the baseline's.
    pub ratio: Option<f64>,
    pub met: Option<bool>,
}

impl Row {
    pub fn new(measure: impl Into<String>, unit: &'static str, gitfleet: &[f64]) -> Self {
        Self {
            measure: measure.into(),
            unit,
            gitfleet: Spread::of(gitfleet),
            baseline_name: "",
            baseline: None,
            limit: None,
            target: None,
            ratio: None,
            met: None,
        }
    }

    pub fn against(mut self, name: &'static str, baseline: &[f64]) -> Self {
        let baseline = Spread::of(baseline);
        self.baseline_name = name;
        let ratio = self.gitfleet.median / baseline.median;
        self.ratio = ratio.is_finite().then_some(ratio);
        self.baseline = Some(baseline);
        self.judge()
    }

    pub fn limit(mut self, limit: &[f64]) -> Self {
        self.limit = Some(Spread::of(limit));
        self
    }

    pub fn target(mut self, target: Target) -> Self {
        self.target = Some(target);
        self.judge()
    }

    fn judge(mut self) -> Self {
        self.met = match (self.target, self.ratio) {
            (Some(Target::RatioAtMost(times)), Some(ratio)) => Some(ratio <= times),
            (Some(Target::RatioAtLeast(times)), Some(ratio)) => Some(ratio >= times),
            (Some(Target::ValueAtMost(value)), _) => Some(self.gitfleet.median <= value),
            (Some(Target::ValueAtLeast(value)), _) => Some(self.gitfleet.median >= value),
            _ => None,
        };
        self
    }
}

fn target_text(target: Option<Target>) -> String {
    match target {
        Some(Target::RatioAtMost(times)) => format!("<= {times:.2}x"),
        Some(Target::RatioAtLeast(times)) => format!(">= {times:.2}x"),
        Some(Target::ValueAtMost(value)) => format!("<= {}", number(value)),
        Some(Target::ValueAtLeast(value)) => format!(">= {}", number(value)),
        None => String::new(),
    }
}

/// The table, as printed and as kept in BENCHMARKS.md.
pub fn table(rows: &[Row]) -> String {
    let header = [
        "measure",
        "unit",
        "gitfleet",
        "baseline",
        "baseline: median (min-max)",
        "limit (local path)",
        "ratio",
        "target",
        "",
    ];
    let lines: Vec<[String; 9]> = rows
        .iter()
        .map(|row| {
            [
                row.measure.clone(),
                row.unit.to_owned(),
                row.gitfleet.show(),
                row.baseline_name.to_owned(),
                row.baseline.map(|b| b.show()).unwrap_or_default(),
                row.limit.map(|l| l.show()).unwrap_or_default(),
                row.ratio.map(|r| format!("{r:.2}x")).unwrap_or_default(),
                target_text(row.target),
                match row.met {
                    Some(true) => "met".to_owned(),
                    Some(false) => "MISSED".to_owned(),
                    None => String::new(),
                },
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for line in &lines {
        for (width, cell) in widths.iter_mut().zip(line) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut push = |cells: Vec<&str>| {
        let mut line = String::new();
        for (index, (cell, width)) in cells.iter().zip(widths).enumerate() {
            if index > 0 {
                line.push_str("  ");
            }
            line.push_str(&format!("{cell:<width$}"));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    };
    push(header.to_vec());
    for line in &lines {
        push(line.iter().map(String::as_str).collect());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spread_is_the_median_with_min_and_max() {
        let spread = Spread::of(&[3.0, 1.0, 2.0, 10.0]);
        assert_eq!((spread.median, spread.min, spread.max), (2.5, 1.0, 10.0));
        assert_eq!(Spread::of(&[4.0, 1.0, 9.0]).median, 4.0);
    }

    #[test]
    fn rows_are_judged_by_their_ratio_or_their_value() {
        let slow = Row::new("clone", "s", &[1.2])
            .against("git daemon", &[1.0])
            .target(Target::RatioAtMost(1.10));
        assert_eq!(slow.met, Some(false));
        let fast = Row::new("rate", "1/s", &[90.0])
            .against("node", &[100.0])
            .target(Target::RatioAtLeast(0.8));
        assert_eq!(fast.met, Some(true));
        let rss = Row::new("rss", "MB", &[250.0]).target(Target::ValueAtMost(200.0));
        assert_eq!(rss.met, Some(false));
        let table = table(&[slow, fast, rss]);
        assert!(table.contains("1.20x"), "{table}");
        assert_eq!(table.matches("MISSED").count(), 2, "{table}");
    }
}

//! What the cluster's state means: the figures from the database and the nodes' health, turned
//! into a verdict (healthy, repairing, or needing attention) with the reasons in words. The
//! same report backs `gitfleet admin status` and the proxy's `/status` page.

use std::fmt::Write as _;
use std::time::Duration;

use crate::model::StorageName;
use crate::store::{Figures, Store, StoreError, WalkRecord};

/// The verdict, from best to worst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Every replica is up to date, every node answers, nothing is queued or dead.
    Healthy,
    /// Replicas are being repaired, and the work moves.
    Repairing,
    /// Something needs an operator: a node is down, work is stuck, jobs are dead, or
    /// repositories have no up-to-date replica.
    Attention,
}

impl Verdict {
    pub fn word(self) -> &'static str {
        match self {
            Verdict::Healthy => "HEALTHY",
            Verdict::Repairing => "REPAIRING",
            Verdict::Attention => "ATTENTION",
        }
    }

    /// The exit code of `admin status`.
    pub fn exit_code(self) -> i32 {
        match self {
            Verdict::Healthy => 0,
            Verdict::Repairing => 2,
            Verdict::Attention => 3,
        }
    }
}

/// A storage's node as the reporter sees it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NodeState {
    pub storage: String,
    pub healthy: bool,
}

/// The whole report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub verdict: Verdict,
    /// One line that says it all.
    pub summary: String,
    /// Why the verdict is not healthy, in words.
    pub reasons: Vec<String>,
    pub nodes: Vec<NodeState>,
    pub figures: Figures,
    pub walks: Vec<WalkRecord>,
    /// The threshold past which ready work that does not move is stuck, in seconds.
    pub stall_after_seconds: f64,
}

impl Report {
    /// Reads the figures (a few statements, whatever the catalog's size) and judges them.
    pub async fn gather(
        store: &Store,
        nodes: &[NodeState],
        stall_after: Duration,
    ) -> Result<Report, StoreError> {
        let storages: Vec<StorageName> = nodes
            .iter()
            .filter_map(|node| StorageName::parse(&node.storage).ok())
            .collect();
        let figures = store.status_figures(&storages).await?;
        let walks = store.storage_walks().await?;
        Ok(Self::judge(figures, walks, nodes.to_vec(), stall_after))
    }

    pub fn judge(
        figures: Figures,
        walks: Vec<WalkRecord>,
        nodes: Vec<NodeState>,
        stall_after: Duration,
    ) -> Report {
        let stall = stall_after.as_secs_f64();
        let mut attention = Vec::new();
        let mut repairing = Vec::new();
        for node in nodes.iter().filter(|node| !node.healthy) {
            let replicas = figures
                .storages
                .iter()
                .find(|s| s.storage == node.storage)
                .map_or(0, |s| s.replicas);
            attention.push(format!(
                "{} is down: its {replicas} replicas are neither read nor written, and repairs to it wait",
                node.storage
            ));
        }
        let jobs = &figures.jobs;
        let waited = jobs.oldest_ready_seconds.unwrap_or(0.0);
        let quiet = jobs.last_progress_seconds.unwrap_or(f64::INFINITY);
        if jobs.ready > 0 && waited > stall && quiet > stall {
            attention.push(format!(
                "STUCK: {} jobs are ready and none has started or finished for {} (the oldest has waited {}); are the workers running?",
                jobs.ready,
                if quiet.is_finite() { ago(quiet) } else { "ever".into() },
                ago(waited)
            ));
        }
        if jobs.dead > 0 {
            attention.push(format!(
                "{} jobs are dead (out of attempts): see `gitfleet admin jobs --state dead`",
                jobs.dead
            ));
        }
        for storage in &figures.storages {
            let outstanding = storage.behind + storage.missing;
            if outstanding > 0 {
                repairing.push(format!(
                    "{}: {} of {} replicas up to date; {} missing, {} behind; {} being copied, {} queued",
                    storage.storage,
                    storage.up_to_date(),
                    storage.replicas,
                    storage.missing,
                    storage.behind,
                    storage.repairing,
                    storage.queued
                ));
            }
            if let Some(changed) = storage.identity_changed_ago_seconds
                && storage.unverified > 0
            {
                repairing.push(format!(
                    "{}: the storage was wiped or replaced {} ago; {} replicas wait for verification",
                    storage.storage,
                    ago(changed),
                    storage.unverified
                ));
            }
        }
        let outstanding: i64 = figures.storages.iter().map(|s| s.behind + s.missing).sum();
        if outstanding > 0 && figures.reconciled_ago_seconds.is_none_or(|ago| ago > stall) {
            attention.push(format!(
                "{outstanding} replicas need repair, and no reconciler has run {}: is a worker running the reconciler job?",
                match figures.reconciled_ago_seconds {
                    Some(seconds) => format!("for {}", ago(seconds)),
                    None => "yet".into(),
                }
            ));
        }
        if figures.interrupted_writes > 0 {
            let waited = figures.interrupted_oldest_seconds.unwrap_or(0.0);
            let line = format!(
                "interrupted writes waiting for recovery: {} (the oldest lease ran out {} ago)",
                figures.interrupted_writes,
                ago(waited)
            );
            if waited > stall {
                attention.push(format!("{line}; is a worker running the recovery job?"));
            } else {
                repairing.push(line);
            }
        }
        let verdict = if !attention.is_empty() {
            Verdict::Attention
        } else if !repairing.is_empty() || jobs.ready > 0 {
            Verdict::Repairing
        } else {
            Verdict::Healthy
        };
        let repositories: i64 = figures.repositories.iter().map(|(_, n)| n).sum();
        let summary = match verdict {
            Verdict::Healthy => format!(
                "{} storages up, {repositories} repositories, every replica up to date",
                nodes.len()
            ),
            Verdict::Repairing => format!(
                "{outstanding} replicas being repaired; {} jobs ready",
                jobs.ready
            ),
            Verdict::Attention => attention[0].clone(),
        };
        let mut reasons = attention;
        reasons.extend(repairing);
        Report {
            verdict,
            summary,
            reasons,
            nodes,
            figures,
            walks,
            stall_after_seconds: stall,
        }
    }

    fn node_up(&self, storage: &str) -> bool {
        self.nodes
            .iter()
            .find(|n| n.storage == storage)
            .is_some_and(|n| n.healthy)
    }

    /// Seconds since the storage's last walk finished.
    fn walked_ago(&self, storage: &str) -> Option<f64> {
        self.walks
            .iter()
            .find(|w| w.storage == storage)
            .and_then(|w| w.finished_ago_seconds)
    }

    /// "3 ready (oldest 5s), 0 dead; last started or finished 1s ago".
    fn jobs_line(&self) -> String {
        let jobs = &self.figures.jobs;
        format!(
            "{} ready{}, {} dead; last started or finished {}",
            jobs.ready,
            jobs.oldest_ready_seconds
                .map(|s| format!(" (oldest {})", ago(s)))
                .unwrap_or_default(),
            jobs.dead,
            since(jobs.last_progress_seconds)
        )
    }

    /// The report for a terminal.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "{}: {}", self.verdict.word(), self.summary);
        for reason in &self.reasons {
            let _ = writeln!(out, "  - {reason}");
        }
        let _ = writeln!(out);
        let _ = writeln!(out, "{:<20} {:>12}", "VIRTUAL STORAGE", "REPOSITORIES");
        for (name, count) in &self.figures.repositories {
            let _ = writeln!(out, "{name:<20} {count:>12}");
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<14} {:<5} {:>9} {:>10} {:>7} {:>8} {:>9} {:>7} {:>10}  {:<10} {:<10}",
            "STORAGE",
            "NODE",
            "REPLICAS",
            "UP-TO-DATE",
            "BEHIND",
            "MISSING",
            "REPAIRING",
            "QUEUED",
            "UNVERIFIED",
            "VERIFIED",
            "WALKED"
        );
        for storage in &self.figures.storages {
            let node = self.node_up(&storage.storage);
            let _ = writeln!(
                out,
                "{:<14} {:<5} {:>9} {:>10} {:>7} {:>8} {:>9} {:>7} {:>10}  {:<10} {:<10}",
                storage.storage,
                if node { "up" } else { "DOWN" },
                storage.replicas,
                storage.up_to_date(),
                storage.behind,
                storage.missing,
                storage.repairing,
                storage.queued,
                storage.unverified,
                since(storage.verified_ago_seconds),
                since(self.walked_ago(&storage.storage))
            );
        }
        let jobs = &self.figures.jobs;
        let _ = writeln!(out);
        let _ = writeln!(out, "jobs: {}", self.jobs_line());
        for (kind, state, count) in &jobs.by_state {
            let _ = writeln!(out, "  {kind:<10} {state:<8} {count:>8}");
        }
        let lock = &self.figures.write_lock;
        if lock.enabled {
            let _ = writeln!(
                out,
                "write lock: ON for {} by {}: {}",
                ago(lock.changed_ago_seconds),
                lock.changed_by.as_deref().unwrap_or("unknown"),
                lock.reason.as_deref().unwrap_or("no reason given")
            );
        } else {
            let _ = writeln!(out, "write lock: off");
        }
        let _ = writeln!(
            out,
            "reconciler: {}",
            self.figures
                .reconciled_ago_seconds
                .map_or("never ran".to_owned(), |s| format!(
                    "last round {} ago",
                    ago(s)
                ))
        );
        out
    }
}

/// "never", or how long ago: "42s ago".
fn since(seconds: Option<f64>) -> String {
    seconds.map_or("never".to_owned(), |s| format!("{} ago", ago(s)))
}

/// A rounded, readable duration: "42s", "5m", "3h", "2d".
pub fn ago(value: f64) -> String {
    let value = value.max(0.0);
    match value {
        v if v < 120.0 => format!("{v:.0}s"),
        v if v < 7200.0 => format!("{:.0}m", v / 60.0),
        v if v < 172_800.0 => format!("{:.0}h", v / 3600.0),
        v => format!("{:.0}d", v / 86_400.0),
    }
}

/// Escapes text for HTML.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font:15px/1.4 system-ui,sans-serif;margin:2em;color:#222}\
h1{font-size:1.6em;margin:0 0 .2em}\
.verdict{display:inline-block;padding:.2em .6em;border-radius:4px;color:#fff;font-weight:bold}\
.healthy{background:#2a7d2a}.repairing{background:#b8860b}.attention{background:#b22222}\
table{border-collapse:collapse;margin:1em 0}th,td{padding:.3em .8em;border-bottom:1px solid #ddd;text-align:right}\
th:first-child,td:first-child{text-align:left}.down{color:#b22222;font-weight:bold}\
.bar{background:#eee;width:10em;height:.8em;display:inline-block;vertical-align:middle}\
.bar span{background:#2a7d2a;height:100%;display:block}\
footer{color:#777;font-size:.85em;margin-top:2em}";

impl Report {
    /// The report as a page for people: server-rendered, readable without JavaScript, and
    /// reloading itself every `refresh_seconds`.
    pub fn html(&self, refresh_seconds: u64) -> String {
        let mut out = String::new();
        let class = match self.verdict {
            Verdict::Healthy => "healthy",
            Verdict::Repairing => "repairing",
            Verdict::Attention => "attention",
        };
        let _ = write!(
            out,
            "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
             <meta http-equiv=\"refresh\" content=\"{refresh_seconds}\">\
             <title>gitfleet: {}</title><style>{STYLE}</style></head><body>\
             <h1>gitfleet status</h1>\
             <p><span class=\"verdict {class}\" id=\"verdict\">{}</span> <span id=\"summary\">{}</span></p>",
            self.verdict.word(),
            self.verdict.word(),
            escape(&self.summary)
        );
        if !self.reasons.is_empty() {
            out.push_str("<ul id=\"reasons\">");
            for reason in &self.reasons {
                let _ = write!(out, "<li>{}</li>", escape(reason));
            }
            out.push_str("</ul>");
        }
        out.push_str(
            "<h2>Storages</h2><table id=\"storages\"><tr><th>Storage</th><th>Node</th>\
             <th>Replicas</th><th>Up to date</th><th></th><th>Behind</th><th>Missing</th>\
             <th>Being copied</th><th>Queued</th><th>Unverified</th><th>Last verification</th>\
             <th>Last walk</th></tr>",
        );
        for storage in &self.figures.storages {
            let up = self.node_up(&storage.storage);
            let share = if storage.replicas > 0 {
                100.0 * storage.up_to_date() as f64 / storage.replicas as f64
            } else {
                100.0
            };
            let _ = write!(
                out,
                "<tr><td>{}</td><td{}>{}</td><td>{}</td><td>{}</td>\
                 <td><span class=\"bar\" title=\"{share:.0}%\"><span style=\"width:{share:.0}%{}\"></span></span></td>\
                 <td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                escape(&storage.storage),
                if up { "" } else { " class=\"down\"" },
                if up { "up" } else { "DOWN" },
                storage.replicas,
                storage.up_to_date(),
                // What a node that is down holds cannot be read: its bar is grey.
                if up { "" } else { ";background:#999" },
                storage.behind,
                storage.missing,
                storage.repairing,
                storage.queued,
                storage.unverified,
                since(storage.verified_ago_seconds),
                since(self.walked_ago(&storage.storage)),
            );
        }
        out.push_str(
            "</table><h2>Repositories</h2><table id=\"repositories\">\
             <tr><th>Virtual storage</th><th>Repositories</th></tr>",
        );
        for (name, count) in &self.figures.repositories {
            let _ = write!(out, "<tr><td>{}</td><td>{count}</td></tr>", escape(name));
        }
        let jobs = &self.figures.jobs;
        let _ = write!(
            out,
            "</table><h2>Jobs</h2><p id=\"jobs\">{}.</p>\
             <table><tr><th>Kind</th><th>State</th><th>Jobs</th></tr>",
            escape(&self.jobs_line())
        );
        for (kind, state, count) in &jobs.by_state {
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{}</td><td>{count}</td></tr>",
                escape(kind),
                escape(state)
            );
        }
        out.push_str("</table>");
        let lock = &self.figures.write_lock;
        let _ = write!(
            out,
            "<h2>Writes</h2><p id=\"write-lock\">{}</p>",
            if lock.enabled {
                format!(
                    "Write lock ON for {}: {}",
                    ago(lock.changed_ago_seconds),
                    escape(lock.reason.as_deref().unwrap_or("no reason given"))
                )
            } else {
                "Write lock off: writes are accepted.".to_owned()
            }
        );
        let _ = write!(
            out,
            "<footer>Work that is ready and has not moved for {} counts as stuck. \
             This page reloads every {refresh_seconds} seconds. \
             The same figures: <code>gitfleet admin status --json</code>.</footer></body></html>",
            ago(self.stall_after_seconds)
        );
        out
    }
}

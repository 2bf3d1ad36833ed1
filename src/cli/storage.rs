//! Operator commands about what lies on the storages: untracked replicas and walks (quarantine
//! is in `quarantine.rs`), and removing a repository from the catalog alone. They talk to PostgreSQL and the nodes
//! directly, with the proxy's config.

use std::io::{IsTerminal as _, Write as _};
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, bail};

use crate::config::ProxyConfig;
use crate::fleet::Nodes;
use crate::model::{RepositoryName, StorageName};
use crate::store::{Store, WalkResults, Which};
use crate::worker::walker::{Found, Mode, Walk, WalkLease};

/// The lease an operator's walk holds on a storage, renewed as it goes.
const ADMIN_WALK_LEASE: Duration = Duration::from_secs(60);

#[derive(Debug, clap::Args)]
pub struct ListUntrackedArgs {
    /// Only this storage; all of them when left out.
    #[arg(long)]
    storage: Option<String>,
    /// Only replicas last modified at least this long ago, such as "1h" or "7d".
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    older_than: Duration,
    /// One JSON array instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
pub struct WalkArgs {
    /// Only this storage; all of them when left out.
    #[arg(long)]
    storage: Option<String>,
    /// Report what the walk would quarantine, and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// One JSON array of results instead of lines.
    #[arg(long)]
    json: bool,
}

/// What the storage commands share.
pub(super) struct Context {
    pub(super) config: ProxyConfig,
    pub(super) store: Store,
    pub(super) nodes: Nodes,
}

impl Context {
    pub(super) fn new(config: &ProxyConfig) -> anyhow::Result<Self> {
        let store =
            Store::connect_lazy(&config.database.url, 2, config.database.acquire_timeout.0)?;
        let nodes = Nodes::new(config)?;
        Ok(Self {
            config: config.clone(),
            store,
            nodes,
        })
    }

    /// The storage named, or every configured storage, in name order.
    pub(super) fn storages(&self, only: Option<&str>) -> anyhow::Result<Vec<StorageName>> {
        if let Some(name) = only {
            let storage = StorageName::parse(name)?;
            if self.nodes.get(&storage).is_none() {
                bail!("storage {storage} is not in the config");
            }
            return Ok(vec![storage]);
        }
        let mut all: Vec<StorageName> = self.nodes.storages().map(|n| n.storage.clone()).collect();
        all.sort();
        Ok(all)
    }

    fn walk(&self, grace_period: Duration, mode: Mode) -> Walk<'_> {
        Walk {
            store: &self.store,
            nodes: &self.nodes,
            grace_period,
            quarantine_retention: self.config.walker.quarantine_retention.0,
            clock: &SystemTime::now,
            mode,
        }
    }
}

/// A running count on stderr, when it is a terminal.
struct Progress {
    shown: bool,
}

impl Progress {
    fn new() -> Self {
        Self {
            shown: std::io::stderr().is_terminal(),
        }
    }

    fn update(&self, storage: &StorageName, results: &WalkResults) {
        if self.shown {
            let _ = write!(
                std::io::stderr(),
                "\r\x1b[K{storage}: {} replicas walked, {} untracked, {} extra",
                results.seen,
                results.untracked,
                results.extra
            );
        }
    }

    fn done(&self) {
        if self.shown {
            let _ = write!(std::io::stderr(), "\r\x1b[K");
        }
    }
}

pub async fn list_untracked(config: &ProxyConfig, args: ListUntrackedArgs) -> anyhow::Result<()> {
    let context = Context::new(config)?;
    let walk = context.walk(args.older_than, Mode::DryRun);
    let progress = Progress::new();
    let mut found = Vec::new();
    let mut out = std::io::stdout().lock();
    if !args.json {
        writeln!(out, "{:<12} {:<10} {:>6}  PATH", "STORAGE", "KIND", "AGE")?;
    }
    let mut errors = Vec::new();
    for storage in context.storages(args.storage.as_deref())? {
        let results = walk
            .run(
                &storage,
                None,
                |entry| {
                    if entry.action != "reported" {
                        return;
                    }
                    if args.json {
                        found.push(entry.clone());
                    } else {
                        progress.done();
                        let _ = writeln!(
                            out,
                            "{:<12} {:<10} {:>6}  {}",
                            entry.storage,
                            entry.kind,
                            super::admin::seconds(entry.age_seconds as f64),
                            entry.relative_path
                        );
                    }
                },
                |results| progress.update(&storage, results),
            )
            .await?;
        progress.done();
        if let Some(error) = results.last_error {
            errors.push(format!("{storage}: {error}"));
        }
    }
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&found)?)?;
    }
    if !errors.is_empty() {
        bail!("the walk was incomplete: {}", errors.join("; "));
    }
    Ok(())
}

#[derive(Debug, serde::Serialize)]
struct WalkReport {
    storage: String,
    dry_run: bool,
    #[serde(flatten)]
    results: WalkResults,
    /// Statements sent to PostgreSQL for this storage.
    database_statements: u64,
}

pub async fn walk(config: &ProxyConfig, args: WalkArgs) -> anyhow::Result<()> {
    let context = Context::new(config)?;
    let mode = if args.dry_run {
        Mode::DryRun
    } else {
        Mode::Act
    };
    let walk = context.walk(config.walker.grace_period.0, mode);
    let owner = crate::toolkit::owner_id("admin");
    let progress = Progress::new();
    let mut reports = Vec::new();
    for storage in context.storages(args.storage.as_deref())? {
        let statements = context.store.round_trips();
        // A dry run changes nothing, so it needs no lease; a real walk keeps workers off.
        let lease = if args.dry_run {
            None
        } else {
            let taken_at = tokio::time::Instant::now();
            let Some(token) = context
                .store
                .take_storage_walk(&storage, &owner, ADMIN_WALK_LEASE, Duration::ZERO)
                .await?
            else {
                let holder = context.store.storage_walk_holder(&storage).await?;
                bail!(
                    "storage {storage} is being walked by {}; try again when that walk is over",
                    holder.as_deref().unwrap_or("another walker")
                );
            };
            Some(WalkLease {
                token,
                duration: ADMIN_WALK_LEASE,
                taken_at,
            })
        };
        let json = args.json;
        let outcome = walk
            .run(
                &storage,
                lease,
                |entry: &Found| {
                    if !json && entry.action != "kept" {
                        progress.done();
                        println!(
                            "{} {}/{} ({}, {} old){}",
                            entry.action,
                            entry.storage,
                            entry.relative_path,
                            entry.kind,
                            super::admin::seconds(entry.age_seconds as f64),
                            entry
                                .quarantine_id
                                .as_deref()
                                .map(|id| format!(" as {id}"))
                                .unwrap_or_default()
                        );
                    }
                },
                |results| progress.update(&storage, results),
            )
            .await;
        progress.done();
        if let Some(lease) = lease {
            let recorded = outcome.as_ref().ok();
            let _ = context
                .store
                .finish_storage_walk(&storage, lease.token, recorded)
                .await;
        }
        let results = outcome?;
        let report = WalkReport {
            storage: storage.to_string(),
            dry_run: args.dry_run,
            results,
            database_statements: context.store.round_trips() - statements,
        };
        if !args.json {
            let r = &report.results;
            println!(
                "{}walked {}: {} replicas, {} untracked, {} extra, {} quarantined, {} purged, {} errors in {:.1}s ({} database statements){}",
                if args.dry_run { "dry run: " } else { "" },
                report.storage,
                r.seen,
                r.untracked,
                r.extra,
                r.quarantined,
                r.purged,
                r.errors,
                r.duration_seconds,
                report.database_statements,
                r.last_error
                    .as_deref()
                    .map(|e| format!("; last error: {e}"))
                    .unwrap_or_default()
            );
        }
        reports.push(report);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    }
    if reports.iter().any(|r| r.results.errors > 0) {
        bail!("the walk met errors");
    }
    Ok(())
}

/// `remove-repository --db-only`: the row goes, the disks are not touched; the walker finds
/// the replicas untracked and quarantines them after the grace period.
pub async fn remove_from_catalog(
    config: &ProxyConfig,
    name: &RepositoryName,
) -> anyhow::Result<()> {
    let store = Store::connect_lazy(&config.database.url, 1, config.database.acquire_timeout.0)?;
    let removed = store
        .delete_repository_after_writes(
            Which::Path(&name.storage, &name.relative_path),
            None,
            config.writes.lease_wait.0,
        )
        .await?
        .with_context(|| format!("{name} does not exist"))?;
    store.close().await;
    println!(
        "removed {name} from the catalog; its replicas stay at {} on {} until the walker quarantines them",
        removed.replica_path,
        removed
            .storages
            .iter()
            .map(StorageName::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

//! Operator commands about what lies on the storages: untracked replicas, walks, quarantine,
//! and removing a repository from the catalog alone. They talk to PostgreSQL and the nodes
//! directly, with the proxy's config.

use std::io::{IsTerminal as _, Write as _};
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, bail};
use futures_util::TryStreamExt as _;
use rand::seq::SliceRandom as _;

use crate::config::ProxyConfig;
use crate::model::{RelativePath, RepositoryName, StorageName};
use crate::proto::node_service_client::NodeServiceClient;
use crate::proto::{
    ListQuarantineRequest, QuarantinedRepository, RestoreRepositoryRequest, StorageHeader,
};
use crate::proxy::Nodes;
use crate::store::{Deleted, Deletion, Store, WalkResults, Which};
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

#[derive(Debug, clap::Subcommand)]
pub enum QuarantineAction {
    /// List what the storages hold in quarantine.
    List {
        /// Only this storage; all of them when left out.
        #[arg(long)]
        storage: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Put a quarantined replica back at the path it came from.
    Restore {
        /// The storage whose quarantine holds it.
        #[arg(long)]
        storage: String,
        /// The quarantine id, from `quarantine list`.
        id: String,
        /// Also track it as this repository (VIRTUAL_STORAGE/RELATIVE_PATH), replicated to
        /// the virtual storage's other storages. Without it the walker quarantines the replica
        /// again once the grace period has passed.
        #[arg(long, value_name = "REPOSITORY")]
        track: Option<String>,
    },
}

/// What the storage commands share.
struct Context {
    config: ProxyConfig,
    store: Store,
    nodes: Nodes,
}

impl Context {
    fn new(config: &ProxyConfig) -> anyhow::Result<Self> {
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
    fn storages(&self, only: Option<&str>) -> anyhow::Result<Vec<StorageName>> {
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
    let owner = format!("admin:{}", std::process::id());
    let progress = Progress::new();
    let mut reports = Vec::new();
    for storage in context.storages(args.storage.as_deref())? {
        let statements = context.store.round_trips();
        // A dry run changes nothing, so it needs no lease; a real walk keeps workers off.
        let lease = if args.dry_run {
            None
        } else {
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

pub async fn quarantine(config: &ProxyConfig, action: QuarantineAction) -> anyhow::Result<()> {
    let context = Context::new(config)?;
    match action {
        QuarantineAction::List { storage, json } => {
            let mut listed = Vec::new();
            for storage in context.storages(storage.as_deref())? {
                for entry in list_quarantine(&context, &storage).await? {
                    listed.push((storage.to_string(), entry));
                }
            }
            if json {
                let rows: Vec<_> = listed
                    .iter()
                    .map(|(storage, entry)| {
                        serde_json::json!({
                            "storage": storage,
                            "quarantine_id": entry.quarantine_id,
                            "relative_path": entry.relative_path,
                            "quarantined_at": entry.quarantined_at,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                let now = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_secs() as i64)
                    .unwrap_or(0);
                println!("{:<12} {:<28} {:>6}  PATH", "STORAGE", "ID", "AGE");
                for (storage, entry) in &listed {
                    println!(
                        "{:<12} {:<28} {:>6}  {}",
                        storage,
                        entry.quarantine_id,
                        super::admin::seconds((now - entry.quarantined_at) as f64),
                        entry.relative_path
                    );
                }
                if listed.is_empty() {
                    println!("(quarantine is empty)");
                }
            }
        }
        QuarantineAction::Restore { storage, id, track } => {
            restore(&context, &storage, &id, track.as_deref()).await?;
        }
    }
    context.store.close().await;
    Ok(())
}

async fn list_quarantine(
    context: &Context,
    storage: &StorageName,
) -> anyhow::Result<Vec<QuarantinedRepository>> {
    let node = context
        .nodes
        .get(storage)
        .context("storage not configured")?;
    let stream = NodeServiceClient::new(node.authed())
        .list_quarantine(ListQuarantineRequest {
            storage: Some(StorageHeader {
                storage: storage.to_string(),
            }),
        })
        .await
        .map_err(|status| anyhow::anyhow!("listing {storage}: {}", status.message()))?
        .into_inner();
    let batches: Vec<_> = stream
        .try_collect()
        .await
        .map_err(|status| anyhow::anyhow!("listing {storage}: {}", status.message()))?;
    Ok(batches
        .into_iter()
        .flat_map(|batch| batch.entries)
        .collect())
}

async fn restore(
    context: &Context,
    storage: &str,
    id: &str,
    track: Option<&str>,
) -> anyhow::Result<()> {
    let storage = context.storages(Some(storage))?.pop().expect("one storage");
    // Checked before anything moves, so a refusal changes nothing.
    let tracked = match track {
        Some(name) => {
            let name = RepositoryName::parse(name)?;
            let virtual_storage = context
                .nodes
                .virtual_storage(name.storage.as_str())
                .with_context(|| {
                    format!("virtual storage {} is not in the config", name.storage)
                })?;
            if !virtual_storage.storages.contains(&storage) {
                bail!(
                    "storage {storage} does not belong to virtual storage {}",
                    name.storage
                );
            }
            if context
                .store
                .find_repository(&name.storage, &name.relative_path)
                .await?
                .is_some()
            {
                bail!("{name} already exists; choose another name for the restored replica");
            }
            let mut others: Vec<StorageName> = virtual_storage
                .storages
                .iter()
                .filter(|s| **s != storage)
                .cloned()
                .collect();
            others.shuffle(&mut rand::rng());
            let mut assigned = vec![storage.clone()];
            assigned.extend(
                others
                    .into_iter()
                    .take(virtual_storage.replication_factor.saturating_sub(1)),
            );
            Some((name, assigned))
        }
        None => None,
    };
    let node = context
        .nodes
        .get(&storage)
        .context("storage not configured")?;
    let restored = NodeServiceClient::new(node.authed())
        .restore_repository(RestoreRepositoryRequest {
            storage: Some(StorageHeader {
                storage: storage.to_string(),
            }),
            quarantine_id: id.to_owned(),
        })
        .await
        .map_err(|status| anyhow::anyhow!("restoring {id}: {}", status.message()))?
        .into_inner()
        .relative_path;
    println!("restored {storage}/{restored} from quarantine entry {id}");
    let Some((name, assigned)) = tracked else {
        println!(
            "not tracked: the walker quarantines it again once it is {} old; give --track to keep it",
            crate::config::Duration(context.config.walker.grace_period.0)
        );
        return Ok(());
    };
    let replica_path = RelativePath::parse(&restored)?;
    match context
        .store
        .track_repository(
            &name.storage,
            &name.relative_path,
            &replica_path,
            &storage,
            &assigned,
        )
        .await?
    {
        Some(id) => {
            let copies: Vec<&str> = assigned[1..].iter().map(StorageName::as_str).collect();
            println!(
                "tracked as {name} (repository {id}); replicating to {}",
                if copies.is_empty() {
                    "no other storage".to_owned()
                } else {
                    copies.join(", ")
                }
            );
            Ok(())
        }
        None => bail!(
            "restored but not tracked: {name}, or replica path {replica_path}, was tracked meanwhile"
        ),
    }
}

/// `remove-repository --db-only`: the row goes, the disks are not touched; the walker finds
/// the replicas untracked and quarantines them after the grace period.
pub async fn remove_from_catalog(
    config: &ProxyConfig,
    name: &RepositoryName,
) -> anyhow::Result<()> {
    let store = Store::connect_lazy(&config.database.url, 1, config.database.acquire_timeout.0)?;
    let started = tokio::time::Instant::now();
    let removed = loop {
        let deletion = Deletion {
            force: started.elapsed() >= config.writes.lease_wait.0,
            remove_after: None,
        };
        match store
            .delete_repository(Which::Path(&name.storage, &name.relative_path), deletion)
            .await?
        {
            Deleted::Removed(removed) => break removed,
            Deleted::NotFound => bail!("{name} does not exist"),
            Deleted::Busy => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
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

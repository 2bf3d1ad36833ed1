//! Operator commands about the replicas' health: the cluster status, one repository's
//! replicas, the repositories short of replicas, and the repairs an operator decides on
//! (accepting data loss, adopting a repository found on disk, a repository's replication
//! factor, verification now). They talk to PostgreSQL and the nodes directly.

use std::time::Duration;

use anyhow::{Context as _, bail};

use super::storage::Context;
use crate::config::ProxyConfig;
use crate::model::{RelativePath, RepositoryName, StorageName};
use crate::status::{NodeState, Report, ago};
use crate::store::Accepted;

/// How long the commands wait for each node's health check.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Exit status: 0 healthy; 2 repairing (replicas are being repaired \
and the work moves); 3 needs attention (a node is down, work is stuck, jobs are dead); \
1 the status could not be read."
)]
pub struct StatusArgs {
    /// Ready work that has not moved for this long is reported stuck, such as "5m"; the
    /// config's status.stall_after by default.
    #[arg(long, value_parser = humantime::parse_duration)]
    stall_after: Option<Duration>,
    /// One JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
pub struct ReplicasArgs {
    /// VIRTUAL_STORAGE/RELATIVE_PATH.
    repository: String,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
pub struct DatalossArgs {
    /// At most this many repositories.
    #[arg(long, default_value_t = 1000)]
    limit: usize,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
pub struct AcceptDatalossArgs {
    /// VIRTUAL_STORAGE/RELATIVE_PATH.
    repository: String,
    /// The storage whose replica becomes the truth; the others are repaired from it.
    #[arg(long)]
    authoritative: String,
}

#[derive(Debug, clap::Args)]
pub struct TrackRepositoryArgs {
    /// The name to give it: VIRTUAL_STORAGE/RELATIVE_PATH.
    repository: String,
    /// The storage that holds it.
    #[arg(long)]
    storage: String,
    /// Where it lies on that storage, relative to the storage's directory.
    #[arg(long)]
    replica_path: String,
}

#[derive(Debug, clap::Args)]
pub struct SetReplicationFactorArgs {
    /// VIRTUAL_STORAGE/RELATIVE_PATH.
    repository: String,
    /// Replicas to keep, at most the virtual storage's storages; "default" follows the
    /// virtual storage's factor.
    factor: String,
}

#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// VIRTUAL_STORAGE/RELATIVE_PATH; or give --storage.
    repository: Option<String>,
    /// Every replica on this storage.
    #[arg(long, conflicts_with = "repository")]
    storage: Option<String>,
}

async fn probed(context: &Context) -> Vec<NodeState> {
    context.nodes.probe_all(PROBE_TIMEOUT).await;
    let mut nodes: Vec<NodeState> = context
        .nodes
        .storages()
        .map(|node| NodeState {
            storage: node.storage.to_string(),
            healthy: node.is_healthy(),
        })
        .collect();
    nodes.sort_by(|a, b| a.storage.cmp(&b.storage));
    nodes
}

/// `admin status`: returns the exit code.
pub async fn status(config: &ProxyConfig, args: StatusArgs) -> anyhow::Result<i32> {
    let context = Context::new(config)?;
    let nodes = probed(&context).await;
    let stall_after = args.stall_after.unwrap_or(config.status.stall_after.0);
    let report = Report::gather(&context.store, &nodes, stall_after).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.text());
    }
    context.store.close().await;
    Ok(report.verdict.exit_code())
}

/// `admin replicas`.
pub async fn replicas(config: &ProxyConfig, args: ReplicasArgs) -> anyhow::Result<()> {
    let context = Context::new(config)?;
    let name = RepositoryName::parse(&args.repository)?;
    let Some(report) = context
        .store
        .replica_report(&name.storage, &name.relative_path)
        .await?
    else {
        bail!("{name} does not exist");
    };
    context.nodes.probe_all(PROBE_TIMEOUT).await;
    let mut checksums = Vec::new();
    for replica in &report.replicas {
        checksums.push(checksum(&context, &replica.storage, &report.replica_path).await);
    }
    if args.json {
        let mut value = serde_json::to_value(&report)?;
        for (replica, sum) in value["replicas"]
            .as_array_mut()
            .expect("replicas is an array")
            .iter_mut()
            .zip(&checksums)
        {
            replica["checksum"] = serde_json::json!(sum);
            replica["state"] = serde_json::json!(state(&report, replica));
        }
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        println!(
            "{name}: id {}, replica path {}, generation {}, replication factor {}",
            report.id,
            report.replica_path,
            report.generation,
            report
                .replication_factor
                .map_or("default".to_owned(), |f| f.to_string())
        );
        println!(
            "{:<14} {:>10} {:<12} {:<10} {:<9} {:<10} {:<16}  JOBS",
            "STORAGE", "GENERATION", "STATE", "ASSIGNED", "VERIFIED", "CHECKSUM", ""
        );
        for (replica, sum) in report.replicas.iter().zip(&checksums) {
            let value = serde_json::to_value(replica)?;
            println!(
                "{:<14} {:>10} {:<12} {:<10} {:<9} {:<27}  {}",
                replica.storage,
                replica
                    .generation
                    .map_or("unknown".to_owned(), |g| g.to_string()),
                state(&report, &value),
                if replica.assigned { "yes" } else { "no" },
                replica
                    .verified_ago_seconds
                    .map_or("never".to_owned(), |s| format!("{} ago", ago(s))),
                sum.as_deref().map_or("-", |s| &s[..s.len().min(16)]),
                replica.jobs.join(", ")
            );
        }
    }
    context.store.close().await;
    Ok(())
}

fn state(report: &crate::store::ReplicaReport, replica: &serde_json::Value) -> &'static str {
    if !replica["recorded"].as_bool().unwrap_or(false) {
        return "unrecorded";
    }
    if replica["missing_since_seconds"].is_number() {
        return "missing";
    }
    match replica["generation"].as_i64() {
        None => "diverged",
        Some(g) if g == report.generation => "up-to-date",
        Some(_) => "behind",
    }
}

async fn checksum(context: &Context, storage: &str, replica_path: &str) -> Option<String> {
    let storage = StorageName::parse(storage).ok()?;
    let replica_path = RelativePath::parse(replica_path).ok()?;
    let replica = context.nodes.replica(&storage, &replica_path)?;
    if !replica.node.is_healthy() {
        return None;
    }
    replica.refs_checksum().await.ok()
}

/// `admin dataloss`: exits 0 when there is none.
pub async fn dataloss(config: &ProxyConfig, args: DatalossArgs) -> anyhow::Result<i32> {
    let context = Context::new(config)?;
    let nodes = probed(&context).await;
    let healthy: Vec<StorageName> = nodes
        .iter()
        .filter(|n| n.healthy)
        .filter_map(|n| StorageName::parse(&n.storage).ok())
        .collect();
    let shortfalls = context.store.shortfalls(&healthy, args.limit).await?;
    if args.json {
        let listed: Vec<serde_json::Value> = shortfalls
            .iter()
            .map(|s| {
                let mut value = serde_json::to_value(s).expect("serialisable");
                value["state"] = serde_json::json!(if s.unavailable() {
                    "unavailable"
                } else {
                    "degraded"
                });
                value
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&listed)?);
    } else if shortfalls.is_empty() {
        println!(
            "no data loss: every repository has an up-to-date replica on each healthy storage assigned to it"
        );
    } else {
        println!(
            "{:<12} {:<40} {:>10}  {:<24} UP TO DATE (HEALTHY)",
            "STATE", "REPOSITORY", "GENERATION", "ASSIGNED"
        );
        for s in &shortfalls {
            println!(
                "{:<12} {:<40} {:>10}  {:<24} {}",
                if s.unavailable() {
                    "unavailable"
                } else {
                    "degraded"
                },
                s.repository,
                s.generation,
                s.assigned.join(","),
                if s.available.is_empty() {
                    "none".to_owned()
                } else {
                    s.available.join(",")
                }
            );
        }
        if shortfalls.iter().any(|s| s.unavailable()) {
            println!(
                "unavailable repositories cannot be read; once no node that may hold them can come back, `gitfleet admin accept-dataloss REPO --authoritative STORAGE` makes one replica the truth"
            );
        }
    }
    context.store.close().await;
    Ok(if shortfalls.is_empty() { 0 } else { 2 })
}

/// `admin accept-dataloss`.
pub async fn accept_dataloss(config: &ProxyConfig, args: AcceptDatalossArgs) -> anyhow::Result<()> {
    let context = Context::new(config)?;
    let name = RepositoryName::parse(&args.repository)?;
    let storage = context
        .storages(Some(&args.authoritative))?
        .pop()
        .expect("one storage");
    let record = existing(&context, &name).await?;
    belongs(&context, &name, &storage)?;
    if !exists_on(&context, &storage, &record.replica_path).await? {
        bail!(
            "{storage} holds no replica of {name} (at {}): it cannot be the truth",
            record.replica_path
        );
    }
    match context.store.accept_dataloss(record.id, &storage).await? {
        Accepted::Generation(generation) => println!(
            "{name}: the replica on {storage} is the truth at generation {generation}; the other replicas are repaired from it"
        ),
        Accepted::NotFound => bail!("{name} was removed meanwhile"),
        Accepted::Busy => bail!("a write to {name} is in flight; try again when it is over"),
    }
    context.store.close().await;
    Ok(())
}

/// `admin track-repository`.
pub async fn track_repository(
    config: &ProxyConfig,
    args: TrackRepositoryArgs,
) -> anyhow::Result<()> {
    let context = Context::new(config)?;
    let name = RepositoryName::parse(&args.repository)?;
    let storage = context
        .storages(Some(&args.storage))?
        .pop()
        .expect("one storage");
    let replica_path = RelativePath::parse(&args.replica_path)?;
    let virtual_storage = belongs(&context, &name, &storage)?;
    let assigned = virtual_storage.place_around(&storage);
    // Held from the look at the disk to the commit of the row: no walk quarantines it between.
    let mut lock = context
        .store
        .lock_replica_path(replica_path.as_str())
        .await?;
    if lock.in_use().await? {
        bail!("{replica_path} is already the replica path of a repository");
    }
    if !exists_on(&context, &storage, &replica_path).await? {
        bail!("{storage} holds no repository at {replica_path}");
    }
    raise_fence(&context, &mut lock, &storage, &replica_path).await?;
    let Some(id) = lock
        .track(&name.storage, &name.relative_path, &storage, &assigned)
        .await?
    else {
        bail!("{name} already exists");
    };
    lock.release().await?;
    println!(
        "tracked {storage}/{replica_path} as {name} (repository {id}); replicating to {}",
        if assigned.len() > 1 {
            assigned[1..]
                .iter()
                .map(StorageName::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        } else {
            "no other storage".to_owned()
        }
    );
    context.store.close().await;
    Ok(())
}

/// `admin set-replication-factor`.
pub async fn set_replication_factor(
    config: &ProxyConfig,
    args: SetReplicationFactorArgs,
) -> anyhow::Result<()> {
    let context = Context::new(config)?;
    let name = RepositoryName::parse(&args.repository)?;
    let virtual_storage = context
        .nodes
        .virtual_storage(name.storage.as_str())
        .with_context(|| format!("virtual storage {} is not in the config", name.storage))?;
    let factor = match args.factor.as_str() {
        "default" => None,
        text => {
            let factor: usize = text.parse().ok().filter(|f| *f >= 1).with_context(|| {
                format!("the factor must be a number from 1, or \"default\"; not {text:?}")
            })?;
            if factor > virtual_storage.storages.len() {
                bail!(
                    "{} has {} storages: it cannot keep {factor} replicas",
                    name.storage,
                    virtual_storage.storages.len()
                );
            }
            Some(factor)
        }
    };
    let record = existing(&context, &name).await?;
    let Some(assigned) = context
        .store
        .set_replication_factor(record.id, factor, &context.nodes.placements())
        .await?
    else {
        bail!("{name} was removed meanwhile");
    };
    let names: Vec<&str> = assigned.iter().map(StorageName::as_str).collect();
    println!(
        "{name}: replication factor {}; assigned to {}. The reconciler copies it where it is missing; the walker removes copies no longer assigned once the others are up to date",
        factor.map_or(
            format!("{} (the default)", virtual_storage.replication_factor),
            |f| f.to_string()
        ),
        names.join(", ")
    );
    context.store.close().await;
    Ok(())
}

/// `admin verify`.
pub async fn verify(config: &ProxyConfig, args: VerifyArgs) -> anyhow::Result<()> {
    let context = Context::new(config)?;
    let queued = match (&args.repository, &args.storage) {
        (Some(repository), None) => {
            let name = RepositoryName::parse(repository)?;
            let record = existing(&context, &name).await?;
            context
                .store
                .request_verification(Some(record.id), None)
                .await?
        }
        (None, Some(storage)) => {
            let storage = context.storages(Some(storage))?.pop().expect("one storage");
            context
                .store
                .request_verification(None, Some(&storage))
                .await?
        }
        _ => bail!("give a repository or --storage"),
    };
    println!("{queued} replicas are first in line for the verifier");
    context.store.close().await;
    Ok(())
}

/// The repository named, which must exist.
async fn existing(
    context: &Context,
    name: &RepositoryName,
) -> anyhow::Result<crate::store::RepositoryRecord> {
    context
        .store
        .find_repository(&name.storage, &name.relative_path)
        .await?
        .with_context(|| format!("{name} does not exist"))
}

/// The virtual storage of `name`, which must contain `storage`.
fn belongs<'a>(
    context: &'a Context,
    name: &RepositoryName,
    storage: &StorageName,
) -> anyhow::Result<&'a crate::fleet::VirtualStorage> {
    let virtual_storage = context
        .nodes
        .virtual_storage(name.storage.as_str())
        .with_context(|| format!("virtual storage {} is not in the config", name.storage))?;
    if !virtual_storage.storages.contains(storage) {
        bail!(
            "storage {storage} does not belong to virtual storage {}",
            name.storage
        );
    }
    Ok(virtual_storage)
}

/// Raises the fence of the replica at `replica_path` on `storage` to a new token, before an
/// adoption commits: a removal or a walk's quarantine decided before it (with an older token)
/// and delivered late is then refused by the node.
pub(super) async fn raise_fence(
    context: &Context,
    lock: &mut crate::store::ReplicaPathLock,
    storage: &StorageName,
    replica_path: &RelativePath,
) -> anyhow::Result<()> {
    let token = lock.fence_token().await?;
    context
        .nodes
        .replica(storage, replica_path)
        .context("storage not configured")?
        .raise_fence(token)
        .await
        .map_err(|status| anyhow::anyhow!("fencing {storage}/{replica_path}: {}", status.message()))
}

async fn exists_on(
    context: &Context,
    storage: &StorageName,
    replica_path: &RelativePath,
) -> anyhow::Result<bool> {
    context
        .nodes
        .replica(storage, replica_path)
        .context("storage not configured")?
        .exists()
        .await
        .map_err(|status| anyhow::anyhow!("asking {storage}: {}", status.message()))
}

//! `gitfleet admin quarantine`: what the walker quarantined, and putting it back, as a
//! repository again if asked.

use std::time::SystemTime;

use anyhow::{Context as _, bail};
use futures_util::TryStreamExt as _;
use rand::seq::SliceRandom as _;

use super::storage::Context;
use crate::config::ProxyConfig;
use crate::model::{RelativePath, RepositoryName, StorageName};
use crate::proto::node_service_client::NodeServiceClient;
use crate::proto::{
    ListQuarantineRequest, QuarantinedRepository, RestoreRepositoryRequest, StorageHeader,
};

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

pub async fn run(config: &ProxyConfig, action: QuarantineAction) -> anyhow::Result<()> {
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
    // A tracked restore holds its replica path from before the bytes move back until the row
    // is committed, so no walk can quarantine the replica again in between.
    let mut lock = match tracked {
        Some(_) => {
            let entry = list_quarantine(context, &storage)
                .await?
                .into_iter()
                .find(|entry| entry.quarantine_id == id)
                .with_context(|| format!("{storage} has no quarantine entry {id}"))?;
            let mut lock = context
                .store
                .lock_replica_path(&entry.relative_path)
                .await?;
            // Checked before the bytes move: a row that still references the path could be
            // deleted after the fence is raised, with a newer token than the adoption's.
            if lock.in_use().await? {
                bail!(
                    "{} is the replica path of a repository: remove it first, or restore without --track",
                    entry.relative_path
                );
            }
            Some(lock)
        }
        None => None,
    };
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
    let (Some((name, assigned)), Some(mut lock)) = (tracked, lock.take()) else {
        println!(
            "not tracked: the walker quarantines it again once it is {} old; give --track to keep it",
            crate::config::Duration(context.config.walker.grace_period.0)
        );
        return Ok(());
    };
    let restored_path = RelativePath::parse(&restored)?;
    super::repair::raise_fence(context, &mut lock, &storage, &restored_path).await?;
    let tracked = lock
        .track(&name.storage, &name.relative_path, &storage, &assigned)
        .await?;
    lock.release().await?;
    match tracked {
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
            "restored but not tracked: {name}, or replica path {restored}, was tracked meanwhile"
        ),
    }
}

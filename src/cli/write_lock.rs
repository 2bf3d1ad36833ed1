//! `gitfleet admin write-lock`: stops new writes across the cluster for maintenance, waits for
//! the writes in flight, and lifts the lock again. Straight from the database.

use std::time::{Duration, Instant};

use anyhow::bail;

use crate::config::ProxyConfig;
use crate::status::ago;
use crate::store::Store;

#[derive(Debug, clap::Subcommand)]
pub enum WriteLockAction {
    /// Stop new writes: every proxy turns them away within a second with UNAVAILABLE and the
    /// reason (git users see it). Reads go on.
    Enable {
        /// Why: shown to everyone whose write is turned away.
        #[arg(long)]
        reason: String,
        /// Return only once every write in flight has finished; PostgreSQL can then be
        /// restarted safely.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up (exit 2, the lock stays on) after this long, such as "10m".
        #[arg(long, value_parser = humantime::parse_duration, default_value = "10m")]
        timeout: Duration,
    },
    /// Lift the lock: writes are accepted again.
    Disable,
    /// Whether the lock is on, since when, why, and the writes still in flight.
    Status {
        #[arg(long)]
        json: bool,
    },
}

/// Who changed the lock, for the record: user@host.
fn operator() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    format!("{user}@{}", crate::toolkit::host_name())
}

/// Runs the command; returns the exit code.
pub async fn run(config: &ProxyConfig, action: WriteLockAction) -> anyhow::Result<i32> {
    let store = Store::connect_lazy(&config.database.url, 1, config.database.acquire_timeout.0)?;
    let code = match action {
        WriteLockAction::Enable {
            reason,
            wait,
            timeout,
        } => {
            if reason.trim().is_empty() {
                bail!("give a reason: it is what turned-away writers see");
            }
            if reason.len() > 500 {
                bail!("the reason is {} bytes; keep it under 500", reason.len());
            }
            store
                .set_write_lock(true, Some(reason.trim()), &operator())
                .await?;
            println!("writes are locked: {}", reason.trim());
            if wait {
                wait_for_writes(&store, timeout).await?
            } else {
                0
            }
        }
        WriteLockAction::Disable => {
            store.set_write_lock(false, None, &operator()).await?;
            println!("the write lock is lifted: writes are accepted");
            0
        }
        WriteLockAction::Status { json } => {
            let lock = store.write_lock().await?;
            let writes = store.writes_in_flight().await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "lock": lock,
                        "writes": writes,
                    }))?
                );
            } else {
                if lock.enabled {
                    println!(
                        "ON for {}, by {}: {}",
                        ago(lock.changed_ago_seconds),
                        lock.changed_by.as_deref().unwrap_or("unknown"),
                        lock.reason.as_deref().unwrap_or("no reason given")
                    );
                } else {
                    println!("off: writes are accepted");
                }
                if writes.is_empty() {
                    println!("no write in flight");
                }
                for write in &writes {
                    println!(
                        "  {} {} by {} for {}{}",
                        write.repository,
                        write.rpc,
                        write.owner,
                        ago(write.age_seconds),
                        if write.expired {
                            " (interrupted: its lease ran out; recovery finishes it)"
                        } else {
                            ""
                        }
                    );
                }
            }
            0
        }
    };
    store.close().await;
    Ok(code)
}

/// Waits until no write holds a live lease; interrupted ones (lease expired) do not count,
/// since no proxy is working on them. Returns 0, or 2 on a timeout.
async fn wait_for_writes(store: &Store, timeout: Duration) -> anyhow::Result<i32> {
    let started = Instant::now();
    let mut said = None;
    loop {
        let live: Vec<_> = store
            .writes_in_flight()
            .await?
            .into_iter()
            .filter(|write| !write.expired)
            .collect();
        if live.is_empty() {
            println!("no write in flight: maintenance can begin");
            return Ok(0);
        }
        if said != Some(live.len()) {
            eprintln!("waiting for {} writes in flight", live.len());
            said = Some(live.len());
        }
        if started.elapsed() > timeout {
            eprintln!(
                "gave up after {}: {} writes are still in flight; the lock stays on",
                ago(timeout.as_secs_f64()),
                live.len()
            );
            return Ok(2);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

//! Operator commands: some go through the proxy, others read and change the database.

use std::path::PathBuf;

use anyhow::Context;

use crate::auth::Signer;
use crate::config::ProxyConfig;
use crate::model::RepositoryName;
use crate::proto::RepositoryHeader;
use crate::proto::repository_service_client::RepositoryServiceClient;
use crate::store::{JobId, JobRow};

#[derive(Debug, clap::Args)]
pub struct AdminArgs {
    /// The proxy's TOML config file: the proxy's address and secret are read from it.
    #[arg(long, env = "GITFLEET_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// The proxy's gRPC address, when it is not the config's listen address.
    #[arg(long, env = "GITFLEET_GRPC_ADDR", global = true)]
    address: Option<String>,
    #[command(subcommand)]
    command: AdminCommand,
}

#[derive(Debug, clap::Subcommand)]
enum AdminCommand {
    /// Create a repository, such as default/group/project.git, on its virtual storage.
    CreateRepository {
        /// VIRTUAL_STORAGE/RELATIVE_PATH.
        repository: String,
        /// The branch HEAD points at.
        #[arg(long, default_value = "main")]
        default_branch: String,
    },
    /// Remove a repository: it is gone from the catalog at once, its replicas are removed
    /// from the nodes (now, or by removal jobs when a node is down).
    RemoveRepository {
        /// VIRTUAL_STORAGE/RELATIVE_PATH.
        repository: String,
        /// Only delete it from the catalog, straight from the database; the disks are left
        /// alone, and the storage walker quarantines the replicas after its grace period
        /// (restorable with `quarantine restore --track`).
        #[arg(long)]
        db_only: bool,
    },
    /// List the background jobs, newest first; or retry or cancel one.
    Jobs(JobsArgs),
    /// List the replicas on the storages that no repository references ("untracked") or
    /// that their repository does not want there ("extra"). Changes nothing.
    ListUntracked(super::storage::ListUntrackedArgs),
    /// Walk the storages now: quarantine what nothing references and that is older than the
    /// grace period, and purge old quarantine, the way the walker job does.
    Walk(super::storage::WalkArgs),
    /// List or restore the replicas the walker quarantined.
    Quarantine {
        #[command(subcommand)]
        action: super::quarantine::QuarantineAction,
    },
    /// The cluster's health: nodes, replicas by state per storage, jobs, the last walks and
    /// verifications, the write lock; and in words, whatever needs attention.
    Status(super::repair::StatusArgs),
    /// One repository's replicas: generation, state, checksum, verification, assignment and
    /// pending jobs of each.
    Replicas(super::repair::ReplicasArgs),
    /// Repositories with no up-to-date replica on a healthy node (unavailable), or fewer than
    /// assigned (degraded). Exits 2 when there are any.
    Dataloss(super::repair::DatalossArgs),
    /// Make one replica of a repository the truth, at a new generation, and repair the others
    /// from it: for when every up-to-date replica is lost for good.
    AcceptDataloss(super::repair::AcceptDatalossArgs),
    /// Adopt a repository that already lies on a storage, under a name, and replicate it to
    /// the other storages its replication factor asks for.
    TrackRepository(super::repair::TrackRepositoryArgs),
    /// Set how many replicas one repository keeps.
    SetReplicationFactor(super::repair::SetReplicationFactorArgs),
    /// Put a repository's replicas, or a storage's, first in the verifier's line.
    Verify(super::repair::VerifyArgs),
    /// The cluster-wide write lock for maintenance: enable (optionally waiting for the writes
    /// in flight), disable, status.
    WriteLock {
        #[command(subcommand)]
        action: super::write_lock::WriteLockAction,
    },
}

#[derive(Debug, clap::Args)]
#[command(
    after_help = "States: queued (waiting, maybe for a backoff), running, done, dead (out of \
attempts: kept until retried or cancelled), cancelled."
)]
struct JobsArgs {
    #[command(subcommand)]
    action: Option<JobsAction>,
    /// Only jobs in this state.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(crate::store::JOB_STATES))]
    state: Option<String>,
    /// At most this many jobs.
    #[arg(long, default_value_t = 100)]
    limit: i64,
    /// One JSON array instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Subcommand)]
enum JobsAction {
    /// Queue a dead, cancelled or done job again, with fresh attempts.
    Retry { id: i64 },
    /// Cancel a queued or running job: a worker running it stops and records nothing.
    Cancel { id: i64 },
}

pub async fn run(args: AdminArgs) -> anyhow::Result<()> {
    let config_path = args
        .config
        .context("give --config FILE or set GITFLEET_CONFIG")?;
    let config = ProxyConfig::load(&config_path)?;
    let command = match args.command {
        AdminCommand::Jobs(jobs) => return run_jobs(&config, jobs).await,
        AdminCommand::ListUntracked(list) => {
            return super::storage::list_untracked(&config, list).await;
        }
        AdminCommand::Walk(walk) => return super::storage::walk(&config, walk).await,
        AdminCommand::Quarantine { action } => {
            return super::quarantine::run(&config, action).await;
        }
        AdminCommand::Status(status) => {
            return exit_with(super::repair::status(&config, status).await?);
        }
        AdminCommand::Replicas(replicas) => {
            return super::repair::replicas(&config, replicas).await;
        }
        AdminCommand::Dataloss(dataloss) => {
            return exit_with(super::repair::dataloss(&config, dataloss).await?);
        }
        AdminCommand::AcceptDataloss(accept) => {
            return super::repair::accept_dataloss(&config, accept).await;
        }
        AdminCommand::TrackRepository(track) => {
            return super::repair::track_repository(&config, track).await;
        }
        AdminCommand::SetReplicationFactor(set) => {
            return super::repair::set_replication_factor(&config, set).await;
        }
        AdminCommand::Verify(verify) => return super::repair::verify(&config, verify).await,
        AdminCommand::WriteLock { action } => {
            return exit_with(super::write_lock::run(&config, action).await?);
        }
        AdminCommand::RemoveRepository {
            repository,
            db_only: true,
        } => {
            let name = RepositoryName::parse(&repository)?;
            return super::storage::remove_from_catalog(&config, &name).await;
        }
        command => command,
    };
    let address = match args.address {
        Some(address) if address.starts_with("http://") => address,
        Some(address) => format!("http://{address}"),
        None => {
            let mut listen = config.listen;
            if listen.ip().is_unspecified() {
                listen.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            format!("http://{listen}")
        }
    };
    let channel = crate::client::connect(&address, Signer::from_secret(&config.auth.token)).await?;
    let mut client = RepositoryServiceClient::new(channel);
    match command {
        AdminCommand::CreateRepository {
            repository,
            default_branch,
        } => {
            let name = RepositoryName::parse(&repository)?;
            client
                .create_repository(crate::proto::CreateRepositoryRequest {
                    repository: Some(header(&name)),
                    default_branch,
                })
                .await
                .map_err(|status| anyhow::anyhow!("{}: {}", code(&status), status.message()))?;
            println!("created {name}");
        }
        AdminCommand::Jobs(_)
        | AdminCommand::ListUntracked(_)
        | AdminCommand::Walk(_)
        | AdminCommand::Quarantine { .. }
        | AdminCommand::Status(_)
        | AdminCommand::Replicas(_)
        | AdminCommand::Dataloss(_)
        | AdminCommand::AcceptDataloss(_)
        | AdminCommand::TrackRepository(_)
        | AdminCommand::SetReplicationFactor(_)
        | AdminCommand::Verify(_)
        | AdminCommand::WriteLock { .. } => unreachable!("answered above"),
        AdminCommand::RemoveRepository { repository, .. } => {
            let name = RepositoryName::parse(&repository)?;
            client
                .remove_repository(crate::proto::RemoveRepositoryRequest {
                    repository: Some(header(&name)),
                })
                .await
                .map_err(|status| anyhow::anyhow!("{}: {}", code(&status), status.message()))?;
            println!("removed {name}");
        }
    }
    Ok(())
}

/// Ends the process with `code` when it is not 0, once the output is out.
fn exit_with(code: i32) -> anyhow::Result<()> {
    if code != 0 {
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        std::process::exit(code);
    }
    Ok(())
}

fn header(name: &RepositoryName) -> RepositoryHeader {
    RepositoryHeader {
        storage: name.storage.to_string(),
        relative_path: name.relative_path.to_string(),
    }
}

fn code(status: &tonic::Status) -> String {
    format!("{:?}", status.code()).to_lowercase()
}

/// `admin jobs`: straight from the database.
async fn run_jobs(config: &ProxyConfig, args: JobsArgs) -> anyhow::Result<()> {
    let store = crate::store::Store::connect_lazy(
        &config.database.url,
        1,
        config.database.acquire_timeout.0,
    )?;
    match args.action {
        Some(JobsAction::Retry { id }) => match store.retry_job(JobId(id)).await? {
            Ok(()) => println!("job {id} queued again"),
            Err(Some(other)) => anyhow::bail!(
                "job {id} is not retried: job {other} is already queued or running for the same work"
            ),
            Err(None) => anyhow::bail!(
                "job {id} is not retried: there is no such job, or it is still queued or running"
            ),
        },
        Some(JobsAction::Cancel { id }) => {
            if !store
                .cancel_job(JobId(id), "cancelled by an operator")
                .await?
            {
                anyhow::bail!(
                    "job {id} is not cancelled: there is no such job, or it is not queued or running"
                );
            }
            println!("job {id} cancelled");
        }
        None => {
            let jobs = store.list_jobs(args.state.as_deref(), args.limit).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&jobs)?);
            } else {
                print!("{}", jobs_table(&jobs));
            }
        }
    }
    store.close().await;
    Ok(())
}

fn jobs_table(jobs: &[JobRow]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>8}  {:<10} {:>10}  {:<12} {:<10} {:>8}  {:>8}  NOTE",
        "ID", "KIND", "REPOSITORY", "TARGET", "STATE", "ATTEMPTS", "AGE"
    );
    for job in jobs {
        let note = match job.state.as_str() {
            "queued" if job.runs_in_seconds > 0.0 => format!(
                "runs in {}{}",
                seconds(job.runs_in_seconds),
                job.last_error
                    .as_deref()
                    .map(|error| format!(": {error}"))
                    .unwrap_or_default()
            ),
            "running" => format!(
                "{} {}",
                job.lease_owner.as_deref().unwrap_or_default(),
                job.progress.as_deref().unwrap_or_default()
            ),
            _ => job.last_error.clone().unwrap_or_default(),
        };
        let _ = writeln!(
            out,
            "{:>8}  {:<10} {:>10}  {:<12} {:<10} {:>8}  {:>8}  {}",
            job.id,
            job.kind,
            job.repository_id,
            job.target,
            job.state,
            job.attempts,
            seconds(job.age_seconds),
            note.trim().replace('\n', " ")
        );
    }
    if jobs.is_empty() {
        let _ = writeln!(out, "(no jobs)");
    }
    out
}

pub(super) use crate::status::ago as seconds;

use std::path::PathBuf;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::config::ProxyConfig;
use crate::worker::{JobType, Worker};

#[derive(Debug, clap::Args)]
#[command(after_help = "Job types:\n  \
replicator  brings outdated replicas up to date by mirroring an up-to-date one\n  \
noop        completes 'noop' jobs and nothing else (for measuring the queue)\n\n\
Run several workers with different --job lists to keep one kind of work from starving \
another; any number of workers, on any machines, share the queue safely. The [worker] \
section of the config sets leases, concurrency, attempts and backoff; worker.http_listen \
serves /metrics and /healthz. SIGTERM or SIGINT: no new jobs are claimed, running ones get \
worker.shutdown_grace to finish, and the leases of the rest are handed back at once.")]
pub struct WorkerArgs {
    /// The proxy's TOML config file: the worker reads its database, nodes and [worker] section.
    #[arg(long, env = "GITFLEET_CONFIG")]
    config: PathBuf,
    /// Run only this job type (repeat for several). Default: every type.
    #[arg(long = "job", value_name = "NAME", value_parser = parse_job)]
    jobs: Vec<JobType>,
}

fn parse_job(name: &str) -> Result<JobType, String> {
    JobType::parse(name).ok_or_else(|| {
        let known: Vec<&str> = JobType::ALL.iter().map(|job| job.name()).collect();
        format!("no job type {name:?}; the types are: {}", known.join(", "))
    })
}

pub async fn run(args: WorkerArgs) -> anyhow::Result<()> {
    let config = ProxyConfig::load(&args.config)?;
    let http = match config.worker.http_listen {
        Some(address) => Some(
            TcpListener::bind(address)
                .await
                .with_context(|| format!("cannot listen on {address} for HTTP"))?,
        ),
        None => None,
    };
    let http_address = http.as_ref().map(TcpListener::local_addr).transpose()?;
    let worker = Worker::new(config, &args.jobs)?;
    let shutdown = super::shutdown_on_signals()?;
    crate::toolkit::say(
        false,
        format_args!("gitfleet worker: running as {}", worker.instance()),
    );
    if let Some(address) = http_address {
        crate::toolkit::say(false, format_args!("gitfleet worker: http on {address}"));
    }
    worker.run(http, shutdown).await
}

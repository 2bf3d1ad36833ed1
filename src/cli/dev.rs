use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::ProxyConfig;
use crate::dev::cluster::{DevOptions, start_processes};

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Everything lives in DIR: PostgreSQL's data, each node's storage, the \
configs (proxy.toml, node-N.toml), secrets.toml and env. Starting again with the same DIR \
serves the same repositories with the same credentials. Once 'gitfleet dev: ready' is printed:\n\n  \
. DIR/env\n  git clone \"$GITFLEET_HTTP_URL/default/demo.git\"   (pushing creates it)\n  \
git clone \"$GITFLEET_READ_HTTP_URL/default/demo.git\"   (read-only: may not push)\n\n\
Ctrl-C or SIGTERM stops everything."
)]
pub struct DevArgs {
    /// The cluster's directory; made on the first start and reused after.
    #[arg(long, default_value_os_t = default_dir())]
    dir: PathBuf,
    /// How many nodes to start (each repository is kept on up to 3 of them).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=9))]
    nodes: u16,
    /// The proxy's gRPC address.
    #[arg(long, default_value = "127.0.0.1:2305")]
    grpc_listen: SocketAddr,
    /// The proxy's HTTP address: git over HTTP, /metrics, /healthz, /readyz.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http_listen: SocketAddr,
    /// Refuse pushes to repositories that do not exist, as a production virtual storage does
    /// unless configured otherwise (by default a push creates its repository).
    #[arg(long)]
    no_push_to_create: bool,
}

/// `/var/tmp/gitfleet-dev-USER`: outlives a reboot, and the PostgreSQL server can reach it
/// even when it runs as another user.
fn default_dir() -> PathBuf {
    PathBuf::from(format!("/var/tmp/gitfleet-dev-{}", super::user_name()))
}

/// Starts the processes from this (the main) thread, which lives as long as they do, then
/// runs the proxy until a signal.
pub fn run(args: DevArgs) -> anyhow::Result<()> {
    let options = DevOptions {
        dir: args.dir,
        nodes: usize::from(args.nodes),
        grpc_listen: args.grpc_listen,
        http_listen: args.http_listen,
        push_to_create: !args.no_push_to_create,
    };
    let processes = start_processes(&options)?;
    let runtime = super::runtime()?;
    let served = runtime.block_on(async {
        let config = ProxyConfig::load(&processes.proxy_config)?;
        let worker = crate::worker::Worker::new(config.clone(), &[])?;
        let proxy = crate::proxy::Proxy::new(config)?;
        let grpc = TcpListener::bind(processes.grpc_listen)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on {} (taken? choose another with --grpc-listen)",
                    processes.grpc_listen
                )
            })?;
        let http = TcpListener::bind(processes.http_listen)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on {} (taken? choose another with --http-listen)",
                    processes.http_listen
                )
            })?;
        let (grpc_address, http_address) = (grpc.local_addr()?, http.local_addr()?);
        let shutdown = super::shutdown_on_signals()?;
        let ready = CancellationToken::new();
        let listeners = crate::proxy::Listeners {
            grpc,
            http: Some(http),
        };
        let mut serving = tokio::spawn(crate::proxy::serve_announced(
            listeners,
            proxy.clone(),
            shutdown.clone(),
            ready.clone(),
        ));
        tokio::select! {
            _ = ready.cancelled() => {}
            result = &mut serving => return result?,
        }
        // Ready when every node answers its health checks.
        let mut healthy = 0;
        for _ in 0..300 {
            healthy = proxy.state().nodes.healthy().len();
            if healthy == options.nodes {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if healthy < options.nodes {
            anyhow::bail!(
                "only {healthy} of {} nodes answer their health checks after 30 s",
                options.nodes
            );
        }
        // The worker starts once the proxy has applied the migrations.
        let working = tokio::spawn(worker.run(None, shutdown.clone()));
        let dir = options.dir.canonicalize()?;
        processes.write_env(&dir, grpc_address, http_address)?;
        crate::toolkit::say(
            true,
            format_args!(
                "gitfleet dev: gRPC on {grpc_address}, git over HTTP on http://{http_address}"
            ),
        );
        crate::toolkit::say(
            true,
            format_args!(
                "gitfleet dev: . {}/env, then git clone \"$GITFLEET_HTTP_URL/default/demo.git\"",
                dir.display()
            ),
        );
        crate::toolkit::say(false, format_args!("gitfleet dev: ready"));
        shutdown.cancelled().await;
        crate::toolkit::say(true, format_args!("gitfleet dev: stopping"));
        // The proxy drains its calls and lets writes in flight commit; the worker finishes or
        // hands back its jobs.
        let served = serving.await?;
        working.await??;
        served
    });
    // The proxy's tasks end with the runtime; then the nodes, then PostgreSQL.
    runtime.shutdown_timeout(Duration::from_secs(30));
    drop(processes);
    crate::toolkit::say(true, format_args!("gitfleet dev: stopped"));
    served
}

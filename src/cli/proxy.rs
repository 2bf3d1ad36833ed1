use std::path::PathBuf;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::ProxyConfig;

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Every key of the config file can be overridden by an environment variable: \
GITFLEET__LISTEN, GITFLEET__AUTH__TOKEN, GITFLEET__DATABASE__URL, \
GITFLEET__VIRTUAL_STORAGES__0__NODES__0__TOKEN, and so on. \
On start the proxy applies the migrations (unless database.migrate_on_start is false), checks \
every node's health once and prints 'gitfleet proxy: listening on ADDRESS' on stdout. \
SIGTERM or SIGINT stops it: no new calls, writes in flight get shutdown_grace to commit."
)]
pub struct ProxyArgs {
    /// The proxy's TOML config file.
    #[arg(long, env = "GITFLEET_CONFIG")]
    config: PathBuf,
}

pub async fn run(args: ProxyArgs) -> anyhow::Result<()> {
    let config = ProxyConfig::load(&args.config)?;
    let listen = config.listen;
    let proxy = crate::proxy::Proxy::new(config)?;
    let grpc = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let address = grpc.local_addr()?;
    let http = match proxy.state().config.http_listen {
        Some(http_listen) => Some(
            TcpListener::bind(http_listen)
                .await
                .with_context(|| format!("cannot listen on {http_listen} for HTTP"))?,
        ),
        None => None,
    };
    let http_address = http.as_ref().map(TcpListener::local_addr).transpose()?;
    let shutdown = super::shutdown_on_signals()?;
    let ready = CancellationToken::new();
    let announce = ready.clone();
    tokio::spawn(async move {
        announce.cancelled().await;
        crate::toolkit::say(
            false,
            format_args!("gitfleet proxy: listening on {address}"),
        );
        if let Some(http_address) = http_address {
            crate::toolkit::say(
                false,
                format_args!("gitfleet proxy: http on {http_address}"),
            );
        }
    });
    tracing::info!(%address, "proxy starting");
    let listeners = crate::proxy::Listeners { grpc, http };
    crate::proxy::serve_announced(listeners, proxy, shutdown, ready).await?;
    tracing::info!("proxy stopped");
    Ok(())
}

use std::path::PathBuf;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::config::NodeConfig;

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Every key of the config file can be overridden by an environment variable: \
GITFLEET__LISTEN, GITFLEET__AUTH__TOKEN, GITFLEET__STORAGES__0__PATH, and so on. \
On start the node prints 'gitfleet node: listening on ADDRESS' on stdout. \
SIGTERM or SIGINT stops it: no new calls, running git commands get shutdown_grace to finish."
)]
pub struct NodeArgs {
    /// The node's TOML config file.
    #[arg(long, env = "GITFLEET_CONFIG")]
    config: PathBuf,
}

pub async fn run(args: NodeArgs) -> anyhow::Result<()> {
    let config = NodeConfig::load(&args.config)?;
    let node = crate::node::Node::new(&config)?;
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let address = listener.local_addr()?;
    crate::toolkit::say(false, format_args!("gitfleet node: listening on {address}"));
    tracing::info!(%address, storages = config.storages.len(), "node started");

    let shutdown = super::shutdown_on_signals()?;
    crate::node::serve(listener, node, config, shutdown).await?;
    tracing::info!("node stopped");
    Ok(())
}

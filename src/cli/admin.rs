//! Operator commands that go through the proxy.

use std::path::PathBuf;

use anyhow::Context;

use crate::auth::Signer;
use crate::config::ProxyConfig;
use crate::model::RepositoryName;
use crate::proto::RepositoryHeader;
use crate::proto::repository_service_client::RepositoryServiceClient;

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
    /// from the nodes.
    RemoveRepository {
        /// VIRTUAL_STORAGE/RELATIVE_PATH.
        repository: String,
    },
}

pub async fn run(args: AdminArgs) -> anyhow::Result<()> {
    let config_path = args
        .config
        .context("give --config FILE or set GITFLEET_CONFIG")?;
    let config = ProxyConfig::load(&config_path)?;
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
    match args.command {
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
        AdminCommand::RemoveRepository { repository } => {
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

fn header(name: &RepositoryName) -> RepositoryHeader {
    RepositoryHeader {
        storage: name.storage.to_string(),
        relative_path: name.relative_path.to_string(),
    }
}

fn code(status: &tonic::Status) -> String {
    format!("{:?}", status.code()).to_lowercase()
}

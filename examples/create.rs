//! Creates a repository on a running node.
//!
//!     GITFLEET_TOKEN=... cargo run --example create -- http://127.0.0.1:9001 STORAGE/PATH.git [BRANCH]

use gitfleet::auth::Signer;
use gitfleet::model::RepositoryName;
use gitfleet::proto::repository_service_client::RepositoryServiceClient;
use gitfleet::proto::{CreateRepositoryRequest, RepositoryHeader};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(address), Some(name)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: create ADDRESS STORAGE/PATH.git [BRANCH] (with GITFLEET_TOKEN set)");
    };
    let name = RepositoryName::parse(&name)?;
    let secret = std::env::var("GITFLEET_TOKEN")?;
    let channel = gitfleet::client::connect(&address, Signer::from_secret(&secret)).await?;
    RepositoryServiceClient::new(channel)
        .create_repository(CreateRepositoryRequest {
            repository: Some(RepositoryHeader {
                storage: name.storage.to_string(),
                relative_path: name.relative_path.to_string(),
            }),
            default_branch: args.next().unwrap_or_default(),
        })
        .await?;
    println!("created {name}");
    Ok(())
}

//! Walks one storage of a running node and prints how many repositories it reported and how
//! long it took. Used by `bench/walk-memory.sh`.
//!
//!     GITFLEET_TOKEN=... cargo run --release --example walk -- http://127.0.0.1:9001 storage-1

use std::time::Instant;

use gitfleet::auth::Signer;
use gitfleet::proto::node_service_client::NodeServiceClient;
use gitfleet::proto::{StorageHeader, WalkStorageRequest};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(address), Some(storage)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: walk ADDRESS STORAGE (with GITFLEET_TOKEN set)");
    };
    let secret = std::env::var("GITFLEET_TOKEN")?;
    let channel = gitfleet::client::connect(&address, Signer::from_secret(&secret)).await?;
    let started = Instant::now();
    let mut stream = NodeServiceClient::new(channel)
        .walk_storage(WalkStorageRequest {
            storage: Some(StorageHeader { storage }),
        })
        .await?
        .into_inner();
    let (mut repositories, mut messages) = (0usize, 0usize);
    while let Some(message) = stream.message().await? {
        repositories += message.repositories.len();
        messages += 1;
    }
    println!(
        "walked {repositories} repositories in {messages} messages in {:.2?}",
        started.elapsed()
    );
    Ok(())
}

use std::path::PathBuf;

use crate::config::ProxyConfig;
use crate::store::Store;

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Migrations are applied in order under a PostgreSQL advisory lock, so \
running this while proxies start is safe. Applied migrations are never applied twice."
)]
pub struct MigrateArgs {
    /// The proxy's TOML config file; the database is database.url.
    #[arg(
        long,
        env = "GITFLEET_CONFIG",
        required_unless_present = "database_url"
    )]
    config: Option<PathBuf>,
    /// Migrate this database instead of the config's.
    #[arg(long)]
    database_url: Option<String>,
}

pub async fn run(args: MigrateArgs) -> anyhow::Result<()> {
    let url = match (args.database_url, args.config) {
        (Some(url), _) => url,
        (None, Some(config)) => ProxyConfig::load(&config)?.database.url,
        (None, None) => anyhow::bail!("give --config or --database-url"),
    };
    let store = Store::connect_lazy(&url, 2, std::time::Duration::from_secs(10))?;
    let before = store.applied_migrations().await.unwrap_or_default();
    eprintln!("gitfleet migrate: {before} migrations applied so far");
    store
        .migrate()
        .await
        .map_err(|error| anyhow::anyhow!("migration failed: {error}"))?;
    let after = store.applied_migrations().await?;
    println!(
        "gitfleet migrate: {} applied now, {after} in all",
        after.saturating_sub(before)
    );
    Ok(())
}

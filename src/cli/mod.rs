//! The command line: one binary, one subcommand per role.

mod admin;
mod bench;
mod bridge;
mod dev;
mod migrate;
mod node;
mod proxy;
mod quarantine;
mod repair;
mod storage;
mod worker;
mod write_lock;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// gitfleet keeps every git repository on several storage nodes and serves them as one
/// reliable git server.
#[derive(Debug, Parser)]
#[command(name = "gitfleet", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a storage node: serve the repositories of one or more storages over gRPC.
    Node(node::NodeArgs),
    /// Run the routing proxy: one gRPC API for every repository, replicated on several nodes.
    Proxy(proxy::ProxyArgs),
    /// Run background jobs (replication, ...): all of them, or those named with --job.
    Worker(worker::WorkerArgs),
    /// Apply the database migrations in migrations/.
    Migrate(migrate::MigrateArgs),
    /// Start a whole local cluster: a private PostgreSQL, nodes, the proxy and the worker.
    Dev(dev::DevArgs),
    /// Operator commands: repositories, background jobs, storage walks and quarantine.
    Admin(admin::AdminArgs),
    /// Connect git to a gitfleet server through gRPC, as git's ext:: transport or ssh command.
    Bridge(bridge::BridgeArgs),
    /// Print a signed token for calling a node by hand (grpcurl and the like).
    Token(TokenArgs),
    /// Measure a local cluster against plain git: clones, fetches, pushes and accessor calls,
    /// each next to its baseline, printed as a table and written as JSON.
    Bench(bench::BenchArgs),
}

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example:\n  grpcurl -plaintext -H \"authorization: Bearer $(gitfleet token)\" 127.0.0.1:9001 list"
)]
struct TokenArgs {
    /// The shared secret the node is configured with (auth.token).
    #[arg(long, env = "GITFLEET_TOKEN", hide_env_values = true)]
    secret: String,
    /// The methods the token may call: "*" for all, or comma-separated gRPC paths such as
    /// /gitfleet.v1.RefService/ListRefs.
    #[arg(long, default_value = crate::auth::ANY_METHOD)]
    scope: String,
}

/// Logs go to stderr; GITFLEET_LOG sets the filter (default "info") and
/// GITFLEET_LOG_FORMAT=json switches to one JSON object per line.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("GITFLEET_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // A log line that cannot be written (stderr closed by whoever ran us) is dropped; it
        // must not panic the task that logged it.
        .log_internal_errors(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if std::env::var("GITFLEET_LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Who runs us, for per-user default directories: the user's name, else the uid.
fn user_name() -> String {
    nix::unistd::User::from_uid(nix::unistd::geteuid())
        .ok()
        .flatten()
        .map_or_else(|| nix::unistd::geteuid().to_string(), |user| user.name)
}

/// A token cancelled by the first SIGTERM or SIGINT: how long-running roles learn to stop.
fn shutdown_on_signals() -> std::io::Result<tokio_util::sync::CancellationToken> {
    use tokio::signal::unix::{SignalKind, signal};
    let shutdown = tokio_util::sync::CancellationToken::new();
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM received"),
            _ = interrupt.recv() => tracing::info!("SIGINT received"),
        }
        trigger.cancel();
    });
    Ok(shutdown)
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

pub fn main(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Node(args) => {
            init_logging();
            report(
                runtime()
                    .map_err(anyhow::Error::from)
                    .and_then(|rt| rt.block_on(node::run(args))),
            )
        }
        Command::Proxy(args) => {
            init_logging();
            report(
                runtime()
                    .map_err(anyhow::Error::from)
                    .and_then(|rt| rt.block_on(proxy::run(args))),
            )
        }
        Command::Worker(args) => {
            init_logging();
            report(
                runtime()
                    .map_err(anyhow::Error::from)
                    .and_then(|rt| rt.block_on(worker::run(args))),
            )
        }
        Command::Dev(args) => {
            init_logging();
            report(dev::run(args))
        }
        Command::Migrate(args) => {
            init_logging();
            report(
                runtime()
                    .map_err(anyhow::Error::from)
                    .and_then(|rt| rt.block_on(migrate::run(args))),
            )
        }
        Command::Bench(args) => report(bench::run(args)),
        Command::Admin(args) => report(
            runtime()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(admin::run(args))),
        ),
        Command::Token(args) => {
            if crate::auth::check_scope(&args.scope).is_err() {
                eprintln!(
                    "gitfleet token: --scope must be \"*\" or comma-separated method paths such as /gitfleet.v1.RefService/ListRefs"
                );
                return ExitCode::FAILURE;
            }
            println!("{}", crate::auth::sign(&args.secret, &args.scope));
            ExitCode::SUCCESS
        }
        // The bridge speaks git's protocol on stdout: it must not log there, and its exit
        // status is git's.
        Command::Bridge(args) => match runtime() {
            Ok(rt) => {
                let code = rt.block_on(bridge::run(args));
                // The stdin reader blocks in a thread of its own; do not wait for it.
                rt.shutdown_background();
                code
            }
            Err(error) => {
                eprintln!("gitfleet bridge: {error}");
                ExitCode::from(128)
            }
        },
    }
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("gitfleet: {error:#}");
            ExitCode::FAILURE
        }
    }
}

//! The storage walker's figures on 100,000 replicas of one storage, printed as a table: the
//! time, the peak memory and the database statements of `gitfleet admin walk --dry-run` (the
//! walker's own code, in its own process), next to the node's WalkStorage stream read
//! directly with no database, in the same run. Run with `cargo bench --bench walker`.
//!
//! PostgreSQL is found as the tests find it: DATABASE_URL, or a throwaway server.

#[path = "../tests/it/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::time::Instant;

use common::cluster::{Cluster, STORAGES};
use common::worker::bulk_repositories;
use common::{BINARY, run_with_peak_memory};
use gitfleet::proto::node_service_client::NodeServiceClient;
use gitfleet::proto::{StorageHeader, WalkStorageRequest};

const REPLICAS: usize = 100_000;
const RUNS: usize = 3;

fn main() {
    common::bench_runtime().block_on(async {
        let cluster = Cluster::start_with(1, 1, "").await;
        let root = cluster.nodes[0].storage_path(STORAGES[0]);
        let made = Instant::now();
        bulk_repositories(&cluster.store(), &root, REPLICAS).await;
        println!(
            "made {REPLICAS} tracked bare repositories in {:.1}s",
            made.elapsed().as_secs_f64()
        );

        let mut direct = Vec::new();
        let mut walks = Vec::new();
        for _ in 0..RUNS {
            direct.push(direct_stream(&cluster).await);
            walks.push(admin_walk(&cluster));
        }
        println!();
        println!("walk of {REPLICAS} replicas on one storage, {RUNS} runs: median (min-max)");
        println!(
            "{:<44} {:>22} {:>16} {:>12}",
            "", "seconds", "peak RSS MiB", "statements"
        );
        let seconds: Vec<f64> = direct.iter().map(|(s, _)| *s).collect();
        println!(
            "{:<44} {:>22} {:>16} {:>12}",
            "node WalkStorage stream, no database",
            spread(&seconds, 2),
            "-",
            "0"
        );
        let seconds: Vec<f64> = walks.iter().map(|w| w.seconds).collect();
        let peaks: Vec<f64> = walks.iter().map(|w| w.peak_mib).collect();
        let statements: Vec<f64> = walks.iter().map(|w| w.statements as f64).collect();
        println!(
            "{:<44} {:>22} {:>16} {:>12}",
            "gitfleet admin walk --dry-run (process)",
            spread(&seconds, 2),
            spread(&peaks, 1),
            spread(&statements, 0)
        );
        let inner: Vec<f64> = walks.iter().map(|w| w.walk_seconds).collect();
        println!(
            "{:<44} {:>22} {:>16} {:>12}",
            "  of which the walk itself",
            spread(&inner, 2),
            "",
            ""
        );
        let seen: Vec<u64> = direct.iter().map(|(_, n)| *n).collect();
        assert!(seen.iter().all(|n| *n == REPLICAS as u64), "{seen:?}");
        println!("targets: under 10 s, under 100 MB, about one statement per 1,000 replicas");
    });
}

/// Reads the node's walk stream to the end with no database: the floor for a walk.
async fn direct_stream(cluster: &Cluster) -> (f64, u64) {
    let started = Instant::now();
    let mut stream = NodeServiceClient::new(cluster.nodes[0].channel().await)
        .walk_storage(WalkStorageRequest {
            storage: Some(StorageHeader {
                storage: STORAGES[0].into(),
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = 0;
    while let Some(batch) = stream.message().await.unwrap() {
        seen += batch.repositories.len() as u64;
    }
    (started.elapsed().as_secs_f64(), seen)
}

struct Measured {
    seconds: f64,
    walk_seconds: f64,
    peak_mib: f64,
    statements: u64,
}

fn admin_walk(cluster: &Cluster) -> Measured {
    let mut command = std::process::Command::new(BINARY);
    command
        .args(["admin", "--config"])
        .arg(&cluster.config_path)
        .args(["walk", "--storage", STORAGES[0], "--dry-run", "--json"]);
    let started = Instant::now();
    let (output, peak) = run_with_peak_memory(command);
    let seconds = started.elapsed().as_secs_f64();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report[0]["seen"], REPLICAS as u64);
    Measured {
        seconds,
        walk_seconds: report[0]["duration_seconds"].as_f64().unwrap(),
        peak_mib: peak as f64 / (1024.0 * 1024.0),
        statements: report[0]["database_statements"].as_u64().unwrap(),
    }
}

/// "median (min-max)".
fn spread(values: &[f64], decimals: usize) -> String {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    format!(
        "{:.*} ({:.*}-{:.*})",
        decimals,
        sorted[sorted.len() / 2],
        decimals,
        sorted[0],
        decimals,
        sorted[sorted.len() - 1]
    )
}

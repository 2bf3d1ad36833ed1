//! What `admin status`, `/status` and the worker's `/metrics` cost at a million repositories:
//! the status statements timed against a catalog of 1,000,000 repositories and 3,000,000
//! replicas (a few thousand of them stale, missing or being repaired), next to the plain
//! aggregate over every replica that they replace, in the same run. Also checks that the
//! trigger-kept counters agree with that full count. Run with `cargo bench --bench status`.
//!
//! PostgreSQL is found as the tests find it: DATABASE_URL, or a throwaway server.

#[path = "../tests/it/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::time::{Duration, Instant};

use gitfleet::model::StorageName;
use gitfleet::status::{NodeState, Report};
use gitfleet::store::Store;

const REPOSITORIES: i64 = 1_000_000;
const CHUNK: i64 = 100_000;
const RUNS: usize = 15;

fn median(mut samples: Vec<Duration>) -> (Duration, Duration, Duration) {
    samples.sort();
    (
        samples[0],
        samples[samples.len() / 2],
        samples[samples.len() - 1],
    )
}

fn ms(duration: Duration) -> String {
    format!("{:.2} ms", duration.as_secs_f64() * 1000.0)
}

fn main() {
    common::bench_runtime().block_on(async {
        let url = common::db::fresh_database().await;
        let store = Store::connect_lazy(&url, 4, Duration::from_secs(30)).unwrap();
        store.migrate().await.unwrap();
        let pool = store.pool();
        // A bulk load: the routing notifications are off (nobody listens), every other
        // trigger runs, so the counters and staleness are kept as in production.
        for statement in [
            "ALTER TABLE repositories DISABLE TRIGGER repositories_notify",
            "ALTER TABLE replicas DISABLE TRIGGER replicas_notify",
            "ALTER TABLE assignments DISABLE TRIGGER assignments_notify",
        ] {
            sqlx::query(statement).execute(pool).await.unwrap();
        }
        let loading = Instant::now();
        for start in (0..REPOSITORIES).step_by(CHUNK as usize) {
            sqlx::query(
                "WITH made AS (
                     INSERT INTO repositories (virtual_storage, relative_path, replica_path,
                                               primary_storage, generation)
                     SELECT 'default', 'bulk/' || n || '.git', '@bulk/' || n || '.git',
                            'storage-1', 1
                     FROM generate_series($1, $2 - 1) AS n
                     RETURNING id
                 ), assigned AS (
                     INSERT INTO assignments (repository_id, storage)
                     SELECT id, s FROM made,
                            unnest(ARRAY['storage-1', 'storage-2', 'storage-3']) AS s
                 )
                 INSERT INTO replicas (repository_id, storage, generation, verified_at)
                 SELECT id, s, 1, now() FROM made,
                        unnest(ARRAY['storage-1', 'storage-2', 'storage-3']) AS s",
            )
            .bind(start)
            .bind(start + CHUNK)
            .execute(pool)
            .await
            .unwrap();
            eprint!("\rloaded {} repositories", start + CHUNK);
        }
        eprintln!();
        // Work outstanding: 2,000 replicas missing on storage-2, 1,000 behind on storage-3
        // (their repositories moved on), 500 never verified, 1,000 repair jobs queued.
        sqlx::query(
            "UPDATE replicas SET generation = NULL, missing_since = now()
             WHERE storage = 'storage-2' AND repository_id <= 2000",
        )
        .execute(pool)
        .await
        .unwrap();
        sqlx::query("UPDATE repositories SET generation = 2 WHERE id BETWEEN 500001 AND 501000")
            .execute(pool)
            .await
            .unwrap();
        sqlx::query(
            "UPDATE replicas SET generation = 2
             WHERE repository_id BETWEEN 500001 AND 501000 AND storage <> 'storage-3'",
        )
        .execute(pool)
        .await
        .unwrap();
        sqlx::query("UPDATE replicas SET verified_at = NULL WHERE repository_id BETWEEN 900001 AND 900500 AND storage = 'storage-1'")
            .execute(pool)
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO jobs (kind, repository_id, source_storage, target_storage)
             SELECT 'replicate', n, 'storage-1', 'storage-2' FROM generate_series(1, 1000) AS n",
        )
        .execute(pool)
        .await
        .unwrap();
        sqlx::query("VACUUM ANALYZE").execute(pool).await.unwrap();
        println!(
            "loaded {REPOSITORIES} repositories and {} replicas in {:.0}s",
            REPOSITORIES * 3,
            loading.elapsed().as_secs_f64()
        );

        let storages: Vec<StorageName> = ["storage-1", "storage-2", "storage-3"]
            .iter()
            .map(|s| StorageName::parse(s).unwrap())
            .collect();
        let nodes: Vec<NodeState> = storages
            .iter()
            .map(|s| NodeState {
                storage: s.to_string(),
                healthy: true,
            })
            .collect();
        let mut figures = Vec::new();
        let mut reports = Vec::new();
        let before = store.round_trips();
        for _ in 0..RUNS {
            let started = Instant::now();
            store.status_figures(&storages).await.unwrap();
            figures.push(started.elapsed());
        }
        let statements = (store.round_trips() - before) / RUNS as u64;
        let mut report = None;
        for _ in 0..RUNS {
            let started = Instant::now();
            report = Some(
                Report::gather(&store, &nodes, Duration::from_secs(300))
                    .await
                    .unwrap(),
            );
            reports.push(started.elapsed());
        }
        let report = report.unwrap();

        // The baseline: the same replica figures by a full aggregate over every replica.
        let mut full = Vec::new();
        let mut counted = Vec::new();
        for _ in 0..3 {
            let started = Instant::now();
            counted = sqlx::query_as::<_, (String, i64, i64, i64)>(
                "SELECT p.storage, count(*),
                        count(*) FILTER (WHERE p.generation IS DISTINCT FROM r.generation
                                         AND p.missing_since IS NULL),
                        count(*) FILTER (WHERE p.missing_since IS NOT NULL)
                 FROM replicas p JOIN repositories r ON r.id = p.repository_id
                 GROUP BY p.storage ORDER BY p.storage",
            )
            .fetch_all(pool)
            .await
            .unwrap();
            full.push(started.elapsed());
        }
        for (storage, (name, total, behind, missing)) in
            report.figures.storages.iter().zip(&counted)
        {
            assert_eq!(&storage.storage, name);
            assert_eq!(
                (storage.replicas, storage.behind, storage.missing),
                (*total, *behind, *missing),
                "the counters disagree with the full count"
            );
        }

        let (low, mid, high) = median(figures);
        println!("\nstatus at {REPOSITORIES} repositories, {RUNS} runs each");
        println!("{:<44} {:>10} {:>10} {:>10}", "", "median", "min", "max");
        println!(
            "{:<44} {:>10} {:>10} {:>10}",
            format!("status figures ({statements} statements)"),
            ms(mid),
            ms(low),
            ms(high)
        );
        let (low, mid, high) = median(reports);
        println!(
            "{:<44} {:>10} {:>10} {:>10}",
            "whole report (figures and walks)",
            ms(mid),
            ms(low),
            ms(high)
        );
        let (low, mid, high) = median(full);
        println!(
            "{:<44} {:>10} {:>10} {:>10}",
            "baseline: full aggregate over replicas (3 runs)",
            ms(mid),
            ms(low),
            ms(high)
        );
        println!("\ncounters agree with the full count:");
        for (name, total, behind, missing) in &counted {
            println!("  {name}: {total} replicas, {behind} behind, {missing} missing");
        }
        println!("verdict: {:?}: {}", report.verdict, report.summary);
    });
}

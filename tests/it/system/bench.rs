//! `gitfleet bench` at a toy scale: every step runs (each clone, fetch and push is checked
//! against the expected tip, every accessor call against its ref count), and the table and
//! the JSON hold every figure.

use std::path::Path;
use std::process::{Command, Output};

use crate::common::BINARY;

/// `gitfleet bench` at a toy shape into `dir`, writing `json`.
fn toy_bench(dir: &Path, json: &Path, rpc_duration: &str, clones: &str) -> Output {
    Command::new(BINARY)
        .arg("bench")
        .arg("--dir")
        .arg(dir)
        .arg("--json")
        .arg(json)
        .args(["--commits", "60", "--files", "30", "--pack-mib", "1"])
        .args([
            "--runs",
            "1",
            "--rpc-runs",
            "1",
            "--rpc-duration",
            rpc_duration,
        ])
        .args(["--parallel-clones", clones])
        .args(["--many-refs", "300"])
        .env("GITFLEET_LOG", "warn")
        .output()
        .unwrap()
}

#[test]
fn the_benchmark_measures_every_figure_next_to_its_baseline() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("results.json");
    let output = toy_bench(&dir.path().join("bench"), &json, "300ms", "2");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");

    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(results["repositories"]["large_commits"], 60);
    assert_eq!(results["repositories"]["small_refs"], 101);
    let rows = results["rows"].as_array().unwrap();
    let measures: Vec<&str> = rows
        .iter()
        .map(|row| row["measure"].as_str().unwrap())
        .collect();
    for wanted in [
        "clone, large repository (--bare)",
        "fetch, one new commit (3 files)",
        "push, one commit (3 replicas)",
        "push, one commit, against a local path",
        "push, one commit: CPU time of the whole machine",
        "push, one commit, into 300 refs",
        "pushes a second, 8 writers on one repository",
        "lease hold of those pushes, p50 (bucket bound)",
        "lease hold of those pushes, p99 (bucket bound)",
        "busy repository (4 writers): a lagging replica up to date after",
        "busy repository (4 writers): longest push while it caught up",
        "busy repository (4 writers): longest push over the median before",
        "busy repository (4 writers): pushes refused",
        "ListRefs (101 refs), concurrency 1: p50",
        "ListRefs (101 refs), concurrency 64: calls a second",
        "ListRefs (101 refs), concurrency 64: database statements a call",
        "ListRefs (101 refs), concurrency 64: proxy peak RSS",
        "proxy peak RSS during the 2 clones",
    ] {
        assert!(
            measures.contains(&wanted),
            "{wanted} is missing: {measures:?}"
        );
        assert!(
            stdout.contains(wanted),
            "{wanted} is not in the table:\n{stdout}"
        );
    }
    for row in rows {
        let median = row["gitfleet"]["median"].as_f64().unwrap();
        assert!(median.is_finite(), "{row}");
        // Statements beyond the idle rate may come out below zero; nothing else may.
        let excess = row["measure"]
            .as_str()
            .unwrap()
            .contains("database statements");
        assert!(excess || median >= 0.0, "{row}");
        if let Some(baseline) = row["baseline"].as_object() {
            assert!(baseline["median"].as_f64().unwrap().is_finite(), "{row}");
        }
    }
    // A push through three replicas costs the machine some CPU time.
    let cpu = rows
        .iter()
        .find(|row| row["measure"] == "push, one commit: CPU time of the whole machine")
        .unwrap();
    assert!(cpu["gitfleet"]["median"].as_f64().unwrap() > 0.0, "{cpu}");
    // The clone rows stand beside both baselines.
    let clone = &rows[0];
    assert_eq!(clone["baseline_name"], "git daemon");
    assert!(clone["limit"]["median"].as_f64().unwrap() > 0.0, "{clone}");
    // An accessor through the proxy sends no statement to the database: one per call would
    // show as 1 or more. (The exact figure moves with the proxy's background polls, which a
    // toy run's few calls cannot average out.)
    for concurrency in [1, 64] {
        let measure =
            format!("ListRefs (101 refs), concurrency {concurrency}: database statements a call");
        let row = rows
            .iter()
            .find(|row| row["measure"] == measure.as_str())
            .unwrap();
        assert!(row["gitfleet"]["median"].as_f64().unwrap() < 0.5, "{row}");
    }

    // A second run reuses the repositories of the same shape.
    let again = toy_bench(&dir.path().join("bench"), &json, "100ms", "1");
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{stderr}");
    assert!(stderr.contains("reusing the repositories"), "{stderr}");
}

#[test]
fn the_benchmark_refuses_bad_sizes_before_it_starts_anything() {
    let output = Command::new(BINARY)
        .args(["bench", "--commits", "1"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("--commits"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

//! The accessor load: `ListRefs` of one repository, from N callers at once on one channel,
//! for a fixed time; every call's latency is kept.

use std::time::{Duration, Instant};

use crate::auth::Signer;
use crate::proto::ref_service_client::RefServiceClient;
use crate::proto::{ListRefsRequest, RepositoryHeader};

/// Where the calls go.
#[derive(Debug, Clone)]
pub struct Target {
    pub address: String,
    pub secret: String,
    pub storage: String,
    pub relative_path: String,
    /// How many references a correct answer lists.
    pub refs: usize,
}

/// One load run.
#[derive(Debug, Clone)]
pub struct Load {
    /// Seconds each call begun in the measured window took, sorted.
    pub latencies: Vec<f64>,
    /// Every call made, warm-up and the calls still running at the window's end included.
    pub all_calls: usize,
    pub failures: usize,
    pub first_failure: Option<String>,
    /// The measured window.
    pub seconds: f64,
}

impl Load {
    pub fn calls(&self) -> usize {
        self.latencies.len()
    }

    pub fn per_second(&self) -> f64 {
        self.calls() as f64 / self.seconds
    }

    /// The `q` quantile of the latencies (0.5 for the median), in seconds.
    pub fn quantile(&self, q: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let rank = (q * (self.latencies.len() - 1) as f64).round() as usize;
        self.latencies[rank.min(self.latencies.len() - 1)]
    }
}

async fn list_refs(
    client: &mut RefServiceClient<crate::client::AuthedChannel>,
    target: &Target,
) -> Result<(), String> {
    let request = ListRefsRequest {
        repository: Some(RepositoryHeader {
            storage: target.storage.clone(),
            relative_path: target.relative_path.clone(),
        }),
        prefixes: Vec::new(),
    };
    let mut stream = client
        .list_refs(request)
        .await
        .map_err(|status| status.to_string())?
        .into_inner();
    let mut refs = 0;
    while let Some(message) = stream
        .message()
        .await
        .map_err(|status| status.to_string())?
    {
        refs += message.refs.len();
    }
    if refs != target.refs {
        return Err(format!("listed {refs} references, not {}", target.refs));
    }
    Ok(())
}

/// Runs `concurrency` callers for `duration` (after `warmup`, whose calls are not counted).
/// Each caller takes the targets in turn, starting from a different one, so the load spreads
/// over them the way the proxy spreads reads over replicas.
pub async fn run(
    targets: &[Target],
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<Load> {
    let mut clients = Vec::new();
    for target in targets {
        let channel =
            crate::client::connect(&target.address, Signer::from_secret(&target.secret)).await?;
        clients.push((RefServiceClient::new(channel), target.clone()));
    }
    anyhow::ensure!(!clients.is_empty(), "no target to call");
    let started = Instant::now();
    let counting_from = started + warmup;
    let until = counting_from + duration;
    let mut callers = tokio::task::JoinSet::new();
    for caller in 0..concurrency {
        let mut clients = clients.clone();
        let count = clients.len();
        clients.rotate_left(caller % count);
        callers.spawn(async move {
            let (mut latencies, mut failures, mut calls) = (Vec::new(), Vec::new(), 0);
            for turn in 0.. {
                let begun = Instant::now();
                if begun >= until {
                    break;
                }
                let (client, target) = &mut clients[turn % count];
                let outcome = list_refs(client, target).await;
                calls += 1;
                if begun >= counting_from {
                    match outcome {
                        Ok(()) => latencies.push(begun.elapsed().as_secs_f64()),
                        Err(error) => failures.push(error),
                    }
                }
            }
            (latencies, failures, calls)
        });
    }
    let mut load = Load {
        latencies: Vec::new(),
        all_calls: 0,
        failures: 0,
        first_failure: None,
        // Calls begun in the window count, and the window is their time: a way with a slower
        // tail is not charged for the calls it is still finishing.
        seconds: duration.as_secs_f64(),
    };
    while let Some(joined) = callers.join_next().await {
        let (latencies, failures, calls) = joined?;
        load.latencies.extend(latencies);
        load.all_calls += calls;
        load.failures += failures.len();
        if load.first_failure.is_none() {
            load.first_failure = failures.into_iter().next();
        }
    }
    load.latencies.sort_by(f64::total_cmp);
    Ok(load)
}

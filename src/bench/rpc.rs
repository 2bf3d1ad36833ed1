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
    /// Seconds a call took, sorted.
    pub latencies: Vec<f64>,
    pub failures: usize,
    pub first_failure: Option<String>,
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
pub async fn run(
    target: &Target,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<Load> {
    let channel =
        crate::client::connect(&target.address, Signer::from_secret(&target.secret)).await?;
    let started = Instant::now();
    let counting_from = started + warmup;
    let until = counting_from + duration;
    let mut callers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let mut client = RefServiceClient::new(channel.clone());
        let target = target.clone();
        callers.spawn(async move {
            let mut latencies = Vec::new();
            let mut failures = Vec::new();
            loop {
                let begun = Instant::now();
                if begun >= until {
                    break;
                }
                let outcome = list_refs(&mut client, &target).await;
                if begun >= counting_from {
                    match outcome {
                        Ok(()) => latencies.push(begun.elapsed().as_secs_f64()),
                        Err(error) => failures.push(error),
                    }
                }
            }
            (latencies, failures)
        });
    }
    let mut load = Load {
        latencies: Vec::new(),
        failures: 0,
        first_failure: None,
        seconds: 0.0,
    };
    while let Some(joined) = callers.join_next().await {
        let (latencies, failures) = joined?;
        load.latencies.extend(latencies);
        load.failures += failures.len();
        if load.first_failure.is_none() {
            load.first_failure = failures.into_iter().next();
        }
    }
    // Calls begun before the deadline finish after it; they count, and so does their time.
    load.seconds = counting_from.elapsed().as_secs_f64();
    load.latencies.sort_by(f64::total_cmp);
    Ok(load)
}

//! Teeing a push's stream to every target, and asking each replica for its refs checksum (to
//! settle an interrupted write). Once a majority has answered, the others get
//! `writes.straggler_timeout` more: a node that hangs (stopped, or its disk stuck) is left out
//! and repaired later, rather than holding every write on its repositories until it comes
//! back.

use std::future::Future;
use std::time::Duration;

use futures_util::stream::FuturesUnordered;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;

use super::Inbound;
use crate::model::{RelativePath, StorageName};
use crate::proxy::Proxy;

/// How long a replica may leave a message of the write unread before it is dropped from the
/// write (and repaired later), so that it does not hold back the others.
pub(super) const REPLICA_STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a replica may take to report its refs' checksum.
const CHECKSUM_TIMEOUT: Duration = Duration::from_secs(30);

/// Passes the client's messages to every sender until they end; a replica that stops reading
/// is dropped from `senders`, and the others go on.
pub(super) async fn tee(mut inbound: Inbound, senders: &mut Vec<mpsc::Sender<Bytes>>) {
    while let Some(message) = inbound.next().await {
        let sent = futures_util::future::join_all(senders.iter().map(|sender| {
            tokio::time::timeout(REPLICA_STALL_TIMEOUT, sender.send(message.clone()))
        }))
        .await;
        let mut results = sent.into_iter();
        senders.retain(|_| {
            results
                .next()
                .is_some_and(|result| matches!(result, Ok(Ok(()))))
        });
        if senders.is_empty() {
            break;
        }
    }
}

/// The refs checksum of each storage's replica; None where the node did not answer.
pub(super) async fn checksums(
    proxy: &Proxy,
    storages: &[StorageName],
    replica_path: &RelativePath,
) -> Vec<Option<String>> {
    quorum_checksums(proxy, storages, replica_path, storages.len()).await
}

/// As [`checksums`], but once `needed` replicas have answered, the others get
/// `writes.straggler_timeout` more.
pub(super) async fn quorum_checksums(
    proxy: &Proxy,
    storages: &[StorageName],
    replica_path: &RelativePath,
    needed: usize,
) -> Vec<Option<String>> {
    let asks = storages.iter().map(|storage| async move {
        let replica = proxy.state.nodes.replica(storage, replica_path)?;
        match tokio::time::timeout(CHECKSUM_TIMEOUT, replica.refs_checksum()).await {
            Ok(Ok(checksum)) => Some(checksum),
            Ok(Err(status)) => {
                tracing::warn!(%storage, %status, "no refs checksum");
                None
            }
            Err(_) => {
                tracing::warn!(%storage, "refs checksum timed out");
                None
            }
        }
    });
    let grace = proxy.state.config.writes.straggler_timeout.0;
    quorum(asks.collect(), needed, grace)
        .await
        .into_iter()
        .map(Option::flatten)
        .collect()
}

/// Runs every future to its end, except that once `needed` of them have finished, the rest
/// get at most `grace` more: those still running are dropped (a gRPC call dropped is
/// cancelled on its node) and come back as None. The results are in the futures' order.
async fn quorum<F: Future>(
    futures: Vec<F>,
    needed: usize,
    grace: Duration,
) -> Vec<Option<F::Output>> {
    let mut results: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    let mut running: FuturesUnordered<_> = futures
        .into_iter()
        .enumerate()
        .map(|(index, future)| async move { (index, future.await) })
        .collect();
    let mut finished = 0;
    let mut deadline = None;
    loop {
        let next = match deadline {
            None => running.next().await,
            Some(deadline) => match tokio::time::timeout_at(deadline, running.next()).await {
                Ok(next) => next,
                Err(_) => break,
            },
        };
        let Some((index, output)) = next else { break };
        results[index] = Some(output);
        finished += 1;
        if finished >= needed && deadline.is_none() {
            deadline = Some(tokio::time::Instant::now() + grace);
        }
    }
    results
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn once_a_majority_has_finished_the_rest_get_the_grace_and_no_more() {
        let delays = [10u64, 3_000, 20];
        let futures: Vec<_> = delays
            .iter()
            .map(|&millis| async move {
                tokio::time::sleep(Duration::from_millis(millis)).await;
                millis
            })
            .collect();
        let started = tokio::time::Instant::now();
        let results = quorum(futures, 2, Duration::from_millis(100)).await;
        assert_eq!(results, vec![Some(10), None, Some(20)]);
        // The second finished at 20ms; the third got 100ms more.
        assert_eq!(started.elapsed(), Duration::from_millis(120));

        // Until `needed` have finished, every future is waited for.
        let futures: Vec<_> = [50u64, 10]
            .iter()
            .map(|&millis| async move {
                tokio::time::sleep(Duration::from_millis(millis)).await;
                millis
            })
            .collect();
        let results = quorum(futures, 2, Duration::ZERO).await;
        assert_eq!(results, vec![Some(50), Some(10)]);
    }
}

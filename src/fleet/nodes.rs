//! The storage nodes: a small pool of HTTP/2 connections per node, each multiplexing many calls
//! and reconnected by tonic when it drops, and a health prober that routes around the nodes
//! that do not answer.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use super::codec::RawCodec;
use crate::auth::Signer;
use crate::client::AuthedChannel;
use crate::config::{ProxyConfig, VirtualStorageConfig};
use crate::model::StorageName;

/// One storage on one node.
#[derive(Debug)]
pub struct NodeHandle {
    pub storage: StorageName,
    pub address: String,
    /// The node's secret: calls are signed with it, and replication tokens minted from it.
    secret: Arc<str>,
    /// Calls take the connections in turn.
    channels: Vec<Channel>,
    next: AtomicUsize,
    healthy: AtomicBool,
    /// Reads routed here since start.
    reads: AtomicU64,
    max_message_bytes: usize,
}

impl NodeHandle {
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// The next connection of the pool.
    fn channel(&self) -> Channel {
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        self.channels[turn % self.channels.len()].clone()
    }

    /// A channel that signs every call with a token scoped to that call.
    pub fn authed(&self) -> AuthedChannel {
        tonic::service::interceptor::InterceptedService::new(
            self.channel(),
            Signer::from_secret(&self.secret),
        )
    }

    /// Counts a read routed to this storage.
    pub fn count_read(&self) {
        self.reads.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads routed to this storage since start.
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// Forwards a call as raw messages.
    pub async fn call<S>(
        &self,
        path: &'static str,
        mut request: Request<S>,
    ) -> Result<Response<Streaming<Bytes>>, Status>
    where
        S: Stream<Item = Bytes> + Send + 'static,
    {
        let mut grpc = tonic::client::Grpc::new(self.authed())
            .max_decoding_message_size(self.max_message_bytes)
            .max_encoding_message_size(self.max_message_bytes);
        grpc.ready()
            .await
            .map_err(|error| Status::unavailable(format!("not ready: {error}")))?;
        let (service, method) = path
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or(("", path));
        request
            .extensions_mut()
            .insert(tonic::GrpcMethod::new(service, method));
        grpc.streaming(
            request,
            tonic::codegen::http::uri::PathAndQuery::from_static(path),
            RawCodec,
        )
        .await
    }

    /// Asks the node's health service; a node that does not answer in `timeout` is unhealthy.
    async fn probe(&self, timeout: Duration) -> bool {
        let mut client = HealthClient::new(self.channel());
        let check = client.check(HealthCheckRequest {
            service: String::new(),
        });
        match tokio::time::timeout(timeout, check).await {
            Ok(Ok(response)) => response.into_inner().status == ServingStatus::Serving as i32,
            _ => false,
        }
    }

    fn set_health(&self, healthy: bool) {
        let was = self.healthy.swap(healthy, Ordering::Relaxed);
        if was != healthy {
            if healthy {
                tracing::info!(storage = %self.storage, address = %self.address, "node is healthy");
            } else {
                tracing::warn!(storage = %self.storage, address = %self.address, "node is unhealthy");
            }
        }
    }
}

/// A virtual storage: a name clients use, and the storages that hold its repositories.
#[derive(Debug)]
pub struct VirtualStorage {
    pub name: StorageName,
    pub replication_factor: usize,
    /// Whether a push over HTTP creates a missing repository.
    pub push_to_create: bool,
    pub storages: Vec<StorageName>,
}

/// Every node in the configuration.
#[derive(Debug)]
pub struct Nodes {
    nodes: HashMap<StorageName, Arc<NodeHandle>>,
    virtual_storages: HashMap<StorageName, VirtualStorage>,
}

impl Nodes {
    pub fn new(config: &ProxyConfig) -> anyhow::Result<Self> {
        let mut nodes = HashMap::new();
        let mut virtual_storages = HashMap::new();
        for VirtualStorageConfig {
            name,
            replication_factor,
            push_to_create,
            nodes: entries,
        } in &config.virtual_storages
        {
            let mut storages = Vec::new();
            for entry in entries {
                let storage = StorageName::parse(&entry.storage)?;
                let endpoint = crate::client::endpoint(&entry.address)?;
                let channels = (0..config.node_connections.max(1))
                    .map(|_| endpoint.connect_lazy())
                    .collect();
                nodes.insert(
                    storage.clone(),
                    Arc::new(NodeHandle {
                        storage: storage.clone(),
                        address: entry.address.clone(),
                        secret: entry.token.as_str().into(),
                        channels,
                        next: AtomicUsize::new(0),
                        healthy: AtomicBool::new(false),
                        reads: AtomicU64::new(0),
                        max_message_bytes: config.max_message_bytes,
                    }),
                );
                storages.push(storage);
            }
            let name = StorageName::parse(name)?;
            virtual_storages.insert(
                name.clone(),
                VirtualStorage {
                    name,
                    replication_factor: *replication_factor,
                    push_to_create: *push_to_create,
                    storages,
                },
            );
        }
        Ok(Self {
            nodes,
            virtual_storages,
        })
    }

    pub fn get(&self, storage: &StorageName) -> Option<&Arc<NodeHandle>> {
        self.nodes.get(storage)
    }

    pub fn virtual_storage(&self, name: &str) -> Option<&VirtualStorage> {
        StorageName::parse(name)
            .ok()
            .and_then(|name| self.virtual_storages.get(&name))
    }

    pub fn virtual_storages(&self) -> impl Iterator<Item = &VirtualStorage> {
        self.virtual_storages.values()
    }

    pub fn storages(&self) -> impl Iterator<Item = &Arc<NodeHandle>> {
        self.nodes.values()
    }

    pub fn is_healthy(&self, storage: &StorageName) -> bool {
        self.get(storage).is_some_and(|node| node.is_healthy())
    }

    /// Every storage that answers its health checks.
    pub fn healthy(&self) -> Vec<StorageName> {
        let mut healthy: Vec<StorageName> = self
            .nodes
            .values()
            .filter(|node| node.is_healthy())
            .map(|node| node.storage.clone())
            .collect();
        healthy.sort();
        healthy
    }

    /// Probes every node once, all at the same time.
    pub async fn probe_all(&self, timeout: Duration) {
        let probes = self.nodes.values().map(|node| async move {
            let healthy = node.probe(timeout).await;
            node.set_health(healthy);
        });
        futures_util::future::join_all(probes).await;
    }

    /// Marks a node unhealthy at once, when a call to it could not connect: the prober brings
    /// it back when it answers again.
    pub fn report_unreachable(&self, storage: &StorageName) {
        if let Some(node) = self.get(storage) {
            node.set_health(false);
        }
    }

    /// Probes every `interval` until `cancel`.
    pub async fn run_prober(
        self: Arc<Self>,
        interval: Duration,
        timeout: Duration,
        cancel: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => self.probe_all(timeout).await,
            }
        }
    }
}

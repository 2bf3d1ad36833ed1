//! A whole cluster for end-to-end tests: real node processes, a fresh PostgreSQL database, and
//! the proxy serving on 127.0.0.1:0 inside the test process (so the test can read its
//! counters), with a smart HTTP front end in front of it for real git.

use std::path::PathBuf;
use std::time::Duration;

use gitfleet::auth::Signer;
use gitfleet::client::AuthedChannel;
use gitfleet::config::ProxyConfig;
use gitfleet::model::{RelativePath, StorageName};
use gitfleet::proxy::Proxy;
use gitfleet::store::{RepositoryRecord, Store};
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

use super::http_front::{Hidden, start_front_end};
use super::{NodeOptions, NodeProcess, TOKEN};

pub const PROXY_TOKEN: &str = "proxy-secret-0123456789";
/// HTTP access tokens of the cluster's proxy.
pub const WRITE_TOKEN: &str = "writer-token-0123456789";
pub const READ_TOKEN: &str = "reader-token-0123456789";
pub const STORAGES: [&str; 5] = [
    "storage-1",
    "storage-2",
    "storage-3",
    "storage-4",
    "storage-5",
];

pub struct Cluster {
    pub nodes: Vec<NodeProcess>,
    pub proxy: Proxy,
    pub address: String,
    pub database_url: String,
    pub config_path: PathBuf,
    /// Base URL of the smart HTTP front end: `{http}/default/REPO.git`.
    pub http: String,
    /// The proxy's own HTTP port, as `http://127.0.0.1:PORT`.
    pub git_http: String,
    pub hidden: Hidden,
    shutdown: CancellationToken,
    served: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    _dir: TempDir,
}

impl Cluster {
    /// `nodes` nodes, every repository on all of them.
    pub async fn start(nodes: usize) -> Self {
        Self::start_with(nodes, nodes, "").await
    }

    /// `extra` is added at the top of the proxy's config.
    pub async fn start_with(nodes: usize, factor: usize, extra: &str) -> Self {
        Self::start_on(super::db::fresh_database().await, nodes, factor, extra, "").await
    }

    /// A cluster on the database at `database_url`; `virtual_storage_extra` is added to the
    /// virtual storage's table (`push_to_create = true`, say).
    pub async fn start_on(
        database_url: String,
        nodes: usize,
        factor: usize,
        extra: &str,
        virtual_storage_extra: &str,
    ) -> Self {
        let nodes: Vec<NodeProcess> = STORAGES[..nodes]
            .iter()
            .map(|storage| {
                NodeProcess::start_with(NodeOptions {
                    storages: vec![storage],
                    extra_config: String::new(),
                })
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let mut config = format!(
            "listen = \"127.0.0.1:0\"\nshutdown_delay = \"0s\"\n{extra}\n\
             [auth]\ntoken = \"{PROXY_TOKEN}\"\n\
             [database]\nurl = \"{database_url}\"\n\
             [health]\ninterval = \"200ms\"\ntimeout = \"1s\"\n\
             [[access_tokens]]\nname = \"writer\"\ntoken = \"{WRITE_TOKEN}\"\nscope = \"read-write\"\n\
             [[access_tokens]]\nname = \"reader\"\ntoken = \"{READ_TOKEN}\"\nscope = \"read\"\n\
             [[virtual_storages]]\nname = \"default\"\nreplication_factor = {factor}\n\
             {virtual_storage_extra}\n"
        );
        for (node, storage) in nodes.iter().zip(STORAGES) {
            config.push_str(&format!(
                "[[virtual_storages.nodes]]\nstorage = \"{storage}\"\naddress = \"{}\"\ntoken = \"{TOKEN}\"\n",
                node.address
            ));
        }
        let config_path = dir.path().join("proxy.toml");
        std::fs::write(&config_path, config).unwrap();
        let config = ProxyConfig::load(&config_path).unwrap();
        let proxy = Proxy::new(config).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let ready = CancellationToken::new();
        let http_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http_address = format!("http://{}", http_listener.local_addr().unwrap());
        let served = tokio::spawn(gitfleet::proxy::serve_announced(
            gitfleet::proxy::Listeners {
                grpc: listener,
                http: Some(http_listener),
            },
            proxy.clone(),
            shutdown.clone(),
            ready.clone(),
        ));
        tokio::select! {
            _ = ready.cancelled() => {}
            result = tokio::time::sleep(Duration::from_secs(60)) => panic!("the proxy did not start: {result:?}"),
        }
        let mut cluster = Self {
            nodes,
            proxy,
            address,
            database_url,
            config_path,
            http: String::new(),
            git_http: http_address,
            hidden: Hidden::default(),
            shutdown,
            served: Some(served),
            _dir: dir,
        };
        cluster.http = start_front_end(cluster.channel().await, cluster.hidden.clone()).await;
        cluster.wait_until_listening().await;
        cluster
    }

    /// Starts another proxy on the same database and nodes, as a second proxy process of
    /// the same cluster would be; it stops when the cluster is dropped.
    pub async fn second_proxy(&self) -> (Proxy, AuthedChannel) {
        let config = ProxyConfig::load(&self.config_path).unwrap();
        let proxy = Proxy::new(config).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = format!("http://{}", listener.local_addr().unwrap());
        let ready = CancellationToken::new();
        tokio::spawn(gitfleet::proxy::serve_announced(
            gitfleet::proxy::Listeners {
                grpc: listener,
                http: None,
            },
            proxy.clone(),
            self.shutdown.clone(),
            ready.clone(),
        ));
        ready.cancelled().await;
        let mut listening = false;
        for _ in 0..200 {
            listening = proxy.state().routing.is_listening();
            if listening {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            listening,
            "the second proxy never listened for notifications"
        );
        let channel = gitfleet::client::connect(&address, Signer::from_secret(PROXY_TOKEN))
            .await
            .unwrap();
        (proxy, channel)
    }

    pub async fn channel(&self) -> AuthedChannel {
        gitfleet::client::connect(&self.address, Signer::from_secret(PROXY_TOKEN))
            .await
            .unwrap()
    }

    /// A store on the cluster's database, for looking at rows.
    pub fn store(&self) -> Store {
        Store::connect_lazy(&self.database_url, 2, Duration::from_secs(5)).unwrap()
    }

    pub async fn record(&self, relative_path: &str) -> RepositoryRecord {
        self.store()
            .find_repository(
                &StorageName::parse("default").unwrap(),
                &RelativePath::parse(relative_path).unwrap(),
            )
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("no row for {relative_path}"))
    }

    /// Where the replica of `record` lives on node `index`.
    pub fn replica_dir(&self, index: usize, record: &RepositoryRecord) -> PathBuf {
        self.nodes[index].repo_path(STORAGES[index], record.replica_path.as_str())
    }

    pub fn virtual_storage() -> StorageName {
        StorageName::parse("default").unwrap()
    }

    /// Waits until the proxy has received `count` more routing notifications than `since`.
    pub async fn wait_for_notifications(proxy: &Proxy, since: u64, count: u64) {
        for _ in 0..400 {
            if proxy.state().routing.notifications() >= since + count {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("routing notifications did not arrive");
    }

    pub fn storage(index: usize) -> StorageName {
        StorageName::parse(STORAGES[index]).unwrap()
    }

    /// Waits until the proxy sees node `index` as `healthy`.
    pub async fn wait_for_health(&self, index: usize, healthy: bool) {
        let storage = Self::storage(index);
        for _ in 0..200 {
            if self.proxy.state().nodes.is_healthy(&storage) == healthy {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "{storage} never became {}",
            if healthy { "healthy" } else { "unhealthy" }
        );
    }

    /// Waits until the routing cache receives notifications.
    pub async fn wait_until_listening(&self) {
        for _ in 0..200 {
            if self.proxy.state().routing.is_listening() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the proxy never started listening for routing notifications");
    }

    /// URL of a repository on the proxy's own smart HTTP port, with `token` as the password.
    pub fn git_url(&self, token: &str, relative_path: &str) -> String {
        let address = self.git_http.trim_start_matches("http://");
        format!("http://git:{token}@{address}/default/{relative_path}")
    }

    /// URL of a repository on the front end.
    pub fn url(&self, relative_path: &str) -> String {
        format!("{}/default/{relative_path}", self.http)
    }

    /// Creates `default/RELATIVE_PATH` through the proxy, with main as its default branch.
    pub async fn create(&self, relative_path: &str) {
        gitfleet::proto::repository_service_client::RepositoryServiceClient::new(
            self.channel().await,
        )
        .create_repository(gitfleet::proto::CreateRepositoryRequest {
            repository: super::header("default", relative_path),
            default_branch: "main".into(),
        })
        .await
        .unwrap();
    }

    /// Makes the [`super::make_history`] work tree and pushes its main through the proxy.
    pub fn push_main(&self, relative_path: &str) -> TempDir {
        let work = tempfile::tempdir().unwrap();
        super::make_history(work.path());
        super::run_git(
            work.path(),
            &["push", "-q", &self.url(relative_path), "main"],
        );
        work
    }

    /// The refs checksum of the replica on node `index`, asked of the node directly.
    pub async fn node_checksum(&self, index: usize, record: &RepositoryRecord) -> String {
        gitfleet::proto::ref_service_client::RefServiceClient::new(
            self.nodes[index].channel().await,
        )
        .refs_checksum(gitfleet::proto::RefsChecksumRequest {
            repository: super::header(STORAGES[index], record.replica_path.as_str()),
        })
        .await
        .unwrap()
        .into_inner()
        .checksum
    }

    /// The refs checksum every node holds for `record`, asserting that they all agree.
    pub async fn agreed_checksum(&self, record: &RepositoryRecord) -> String {
        let checksums: Vec<String> = futures_util::future::join_all(
            (0..self.nodes.len()).map(|index| self.node_checksum(index, record)),
        )
        .await;
        assert!(
            checksums.iter().all(|checksum| *checksum == checksums[0]),
            "{checksums:?}"
        );
        checksums[0].clone()
    }

    /// Reads the proxy routed to node `index`.
    pub fn reads(&self, index: usize) -> u64 {
        self.proxy
            .state()
            .nodes
            .get(&Self::storage(index))
            .unwrap()
            .reads()
    }

    /// Statements the proxy has sent to PostgreSQL.
    pub fn round_trips(&self) -> u64 {
        self.proxy.state().store.round_trips()
    }

    /// Stops the proxy gracefully and returns what `serve` returned.
    pub async fn stop_proxy(&mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        match self.served.take() {
            Some(served) => served.await.unwrap(),
            None => Ok(()),
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.shutdown.cancel();
        let errors = self.hidden.lock().unwrap();
        if !errors.is_empty() && !std::thread::panicking() {
            panic!("errors hidden from git by the HTTP front end: {errors:?}");
        }
    }
}

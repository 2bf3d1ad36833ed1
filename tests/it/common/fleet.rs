//! A cluster made only of separate processes, for the chaos suite: a PostgreSQL of its own,
//! three `gitfleet node`s, one `gitfleet proxy` and one `gitfleet worker`. Each can be killed
//! and started again in place: same ports, same disks, same database.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gitfleet::proto::RefsChecksumRequest;
use gitfleet::proto::ref_service_client::RefServiceClient;
use sqlx::PgPool;
use tempfile::TempDir;

use super::cluster::{PROXY_TOKEN, STORAGES, WRITE_TOKEN};
use super::db::OwnServer;
use super::{BINARY, NodeOptions, NodeProcess, TOKEN};

/// A `gitfleet` process that is killed with the test, and can be killed and started again.
pub struct Daemon {
    name: &'static str,
    args: Vec<String>,
    env: Vec<(String, String)>,
    dir: PathBuf,
    child: Option<Child>,
    starts: u32,
}

impl Daemon {
    fn new(name: &'static str, args: &[&str], dir: &Path) -> Self {
        Self {
            name,
            args: args.iter().map(|arg| arg.to_string()).collect(),
            env: Vec::new(),
            dir: dir.to_owned(),
            child: None,
            starts: 0,
        }
    }

    /// Starts the process and waits until its standard output has every line in `expect`
    /// (a line's prefix each); returns those lines.
    fn start(&mut self, expect: &[&str]) -> Vec<String> {
        self.starts += 1;
        let out = self.dir.join(format!("{}.{}.out", self.name, self.starts));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .unwrap();
        let mut command = Command::new(BINARY);
        command
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("GITFLEET_LOG", "info")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(log);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, || {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)
            });
        }
        let mut child = command.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = std::fs::read_to_string(&out).unwrap_or_default();
            let found: Vec<String> = expect
                .iter()
                .filter_map(|prefix| {
                    text.lines()
                        .find(|line| line.starts_with(prefix))
                        .map(str::to_owned)
                })
                .collect();
            if found.len() == expect.len() {
                self.child = Some(child);
                return found;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "{} exited at start ({status}); see {}",
                    self.name,
                    self.log().display()
                );
            }
            assert!(Instant::now() < deadline, "{} did not start", self.name);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, and wait for it to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> PathBuf {
        self.dir.join(format!("{}.log", self.name))
    }

    /// The running process's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct Fleet {
    pub postgres: OwnServer,
    pub nodes: Vec<NodeProcess>,
    pub proxy: Daemon,
    pub worker: Daemon,
    pub config: PathBuf,
    /// `http://127.0.0.1:PORT` of the proxy's git over HTTP.
    pub http: String,
    /// `http://127.0.0.1:PORT` of the proxy's gRPC.
    pub grpc: String,
    pub pool: PgPool,
    dir: TempDir,
}

impl Fleet {
    /// Starts everything. `writes` and `worker` are the bodies of those config sections.
    pub async fn start(writes: &str, worker: &str) -> Self {
        let postgres = OwnServer::start().await;
        let nodes: Vec<NodeProcess> = STORAGES[..3]
            .iter()
            .map(|storage| {
                NodeProcess::start_with(NodeOptions {
                    storages: vec![storage],
                    extra_config: String::new(),
                })
            })
            .collect();
        let dir = tempfile::Builder::new()
            .prefix("gitfleet-fleet-")
            .tempdir()
            .unwrap();
        let mut config = format!(
            "listen = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\nshutdown_delay = \"0s\"\n\
             [auth]\ntoken = \"{PROXY_TOKEN}\"\n\
             [database]\nurl = \"{}\"\nacquire_timeout = \"1s\"\n\
             [health]\ninterval = \"200ms\"\ntimeout = \"500ms\"\n\
             [writes]\n{writes}\n[worker]\n{worker}\n\
             [reconciler]\ninterval = \"500ms\"\n\
             [[access_tokens]]\nname = \"writer\"\ntoken = \"{WRITE_TOKEN}\"\nscope = \"read-write\"\n\
             [[virtual_storages]]\nname = \"default\"\nreplication_factor = 3\n",
            postgres.url()
        );
        for (node, storage) in nodes.iter().zip(STORAGES) {
            config.push_str(&format!(
                "[[virtual_storages.nodes]]\nstorage = \"{storage}\"\naddress = \"{}\"\ntoken = \"{TOKEN}\"\n",
                node.address
            ));
        }
        let config_path = dir.path().join("proxy.toml");
        std::fs::write(&config_path, config).unwrap();
        let config_arg = config_path.to_str().unwrap();

        let mut proxy = Daemon::new("proxy", &["proxy", "--config", config_arg], dir.path());
        let lines = proxy.start(&["gitfleet proxy: listening on ", "gitfleet proxy: http on "]);
        let grpc = lines[0].rsplit(' ').next().unwrap().to_owned();
        let http = lines[1].rsplit(' ').next().unwrap().to_owned();
        // A proxy started again takes the same ports.
        proxy.env = vec![
            ("GITFLEET__LISTEN".into(), grpc.clone()),
            ("GITFLEET__HTTP_LISTEN".into(), http.clone()),
        ];
        let mut worker = Daemon::new(
            "worker",
            &[
                "worker",
                "--config",
                config_arg,
                "--job",
                "replicator",
                "--job",
                "recovery",
                "--job",
                "reconciler",
            ],
            dir.path(),
        );
        worker.start(&["gitfleet worker: running as "]);
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(5))
            .connect(postgres.url())
            .await
            .unwrap();
        Self {
            postgres,
            nodes,
            proxy,
            worker,
            config: config_path,
            http: format!("http://{http}"),
            grpc: format!("http://{grpc}"),
            pool,
            dir,
        }
    }

    pub fn start_proxy(&mut self) {
        self.proxy.start(&["gitfleet proxy: listening on "]);
    }

    pub fn start_worker(&mut self) {
        self.worker.start(&["gitfleet worker: running as "]);
    }

    /// A repository's URL on the proxy's git over HTTP, with the writer's token.
    pub fn git_url(&self, relative_path: &str) -> String {
        let address = self.http.trim_start_matches("http://");
        format!("http://git:{WRITE_TOKEN}@{address}/default/{relative_path}")
    }

    /// Runs `gitfleet admin --config proxy.toml ARGS`.
    pub fn admin(&self, args: &[&str]) -> std::process::Output {
        Command::new(BINARY)
            .arg("admin")
            .arg("--config")
            .arg(&self.config)
            .arg("--address")
            .arg(&self.grpc)
            .args(args)
            .env("GITFLEET_LOG", "warn")
            .output()
            .unwrap()
    }

    async fn replica_path(&self, relative_path: &str) -> Result<String, sqlx::Error> {
        sqlx::query_scalar("SELECT replica_path FROM repositories WHERE relative_path = $1")
            .bind(relative_path)
            .fetch_one(&self.pool)
            .await
    }

    /// The replica directories of `relative_path`, one per node.
    pub async fn replica_dirs(&self, relative_path: &str) -> Vec<PathBuf> {
        let replica_path = self.replica_path(relative_path).await.unwrap();
        (0..self.nodes.len())
            .map(|index| self.nodes[index].repo_path(STORAGES[index], &replica_path))
            .collect()
    }

    /// The refs checksum of every replica of `relative_path`, asked of each node; None where
    /// a node does not answer.
    pub async fn checksums(&self, relative_path: &str) -> Vec<Option<String>> {
        let Ok(replica_path) = self.replica_path(relative_path).await else {
            return vec![None; self.nodes.len()];
        };
        let mut checksums = Vec::new();
        for (index, node) in self.nodes.iter().enumerate() {
            let asked = async {
                let channel = gitfleet::client::connect(
                    &node.address,
                    gitfleet::auth::Signer::from_secret(TOKEN),
                )
                .await
                .ok()?;
                let answer = RefServiceClient::new(channel)
                    .refs_checksum(RefsChecksumRequest {
                        repository: super::header(STORAGES[index], &replica_path),
                    })
                    .await
                    .ok()?;
                Some(answer.into_inner().checksum)
            };
            checksums.push(
                tokio::time::timeout(Duration::from_secs(5), asked)
                    .await
                    .ok()
                    .flatten(),
            );
        }
        checksums
    }

    /// Why the fleet has not converged yet, or None once it has: no write intent or lease
    /// open, every replica up to date, no job waiting, equal checksums on every node for
    /// `repositories`, and `admin status` HEALTHY.
    pub async fn not_converged(&self, repositories: &[String]) -> Option<String> {
        let pool = &self.pool;
        let scalar = |sql: &'static str| async move {
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(pool)
                .await
                .map_err(|error| error.to_string())
        };
        let checks = [
            ("open write intents", "SELECT count(*) FROM write_intents"),
            (
                "held write leases",
                "SELECT count(*) FROM repositories WHERE lease_owner IS NOT NULL",
            ),
            (
                "replicas not up to date",
                "SELECT count(*) FROM replicas p JOIN repositories r ON r.id = p.repository_id
             WHERE p.generation IS DISTINCT FROM r.generation",
            ),
            (
                "jobs queued or running",
                "SELECT count(*) FROM jobs WHERE state IN ('queued', 'running')",
            ),
        ];
        for (what, sql) in checks {
            match scalar(sql).await {
                Ok(0) => {}
                Ok(count) => return Some(format!("{count} {what}")),
                Err(error) => return Some(format!("{what}: {error}")),
            }
        }
        for repository in repositories {
            let checksums = self.checksums(repository).await;
            if checksums.iter().any(Option::is_none) || checksums.iter().any(|c| *c != checksums[0])
            {
                return Some(format!("{repository}: checksums {checksums:?}"));
            }
        }
        let status = self.admin(&["status"]);
        if !status.status.success() {
            return Some(format!(
                "admin status: {}",
                String::from_utf8_lossy(&status.stdout)
            ));
        }
        None
    }

    /// How many of `relative_path`'s replicas recorded at its generation differ on disk (refs
    /// or HEAD) from the most common state among them, read while nothing writes: None when a
    /// write, lease or intent was open, or the catalog moved while the disks were read.
    pub async fn mismatched(&self, relative_path: &str) -> Option<usize> {
        let catalog = || async {
            let rows: Vec<(i64, Option<i64>, String, i64, i64)> = sqlx::query_as(
                "SELECT r.generation, p.generation, p.storage,
                        (SELECT count(*) FROM write_intents i WHERE i.repository_id = r.id),
                        (SELECT count(*) FROM repositories l
                         WHERE l.id = r.id AND l.lease_owner IS NOT NULL)
                 FROM repositories r JOIN replicas p ON p.repository_id = r.id
                 WHERE r.relative_path = $1 ORDER BY p.storage",
            )
            .bind(relative_path)
            .fetch_all(&self.pool)
            .await
            .ok()?;
            Some(rows)
        };
        let before = catalog().await?;
        if before.iter().any(|row| row.3 > 0 || row.4 > 0) {
            return None;
        }
        let dirs = self.replica_dirs(relative_path).await;
        let mut states = Vec::new();
        for (index, dir) in dirs.iter().enumerate() {
            let storage = STORAGES[index];
            let up_to_date = before
                .iter()
                .any(|row| row.2 == storage && row.1 == Some(row.0));
            if up_to_date {
                let refs =
                    super::try_git(dir, &["for-each-ref", "--format=%(refname) %(objectname)"]);
                let head = std::fs::read_to_string(dir.join("HEAD")).unwrap_or_default();
                states.push(format!("{}{head}", String::from_utf8_lossy(&refs.stdout)));
            }
        }
        if catalog().await? != before {
            return None;
        }
        let most = states
            .iter()
            .map(|state| states.iter().filter(|other| *other == state).count())
            .max()
            .unwrap_or(0);
        Some(states.len() - most)
    }

    /// Waits until the fleet has converged; how long that took.
    pub async fn converge(
        &self,
        repositories: &[String],
        within: Duration,
    ) -> Result<Duration, String> {
        let started = Instant::now();
        loop {
            let Some(reason) = self.not_converged(repositories).await else {
                return Ok(started.elapsed());
            };
            if started.elapsed() > within {
                return Err(format!("not converged after {within:?}: {reason}"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Copies the processes' logs where they outlive the test, and says where.
    pub fn keep_logs(&self) -> PathBuf {
        let kept = Path::new(env!("CARGO_TARGET_TMPDIR")).join("chaos-logs");
        let _ = std::fs::remove_dir_all(&kept);
        std::fs::create_dir_all(&kept).unwrap();
        for entry in std::fs::read_dir(self.dir.path()).unwrap().flatten() {
            let _ = std::fs::copy(entry.path(), kept.join(entry.file_name()));
        }
        kept
    }

    /// How many lines of the proxy's and the worker's logs so far contain `text`.
    pub fn logged(&self, text: &str) -> usize {
        [self.proxy.log(), self.worker.log()]
            .iter()
            .map(|log| {
                std::fs::read_to_string(log)
                    .unwrap_or_default()
                    .lines()
                    .filter(|line| line.contains(text))
                    .count()
            })
            .sum()
    }
}

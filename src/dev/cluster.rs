//! `gitfleet dev`: a whole cluster in one directory: a private PostgreSQL, N nodes as child
//! processes, and the proxy in this process. Secrets are made on the first start and kept in
//! the directory, so a second start serves the same repositories with the same credentials.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use super::postgres::{Durability, PrivatePostgres};

/// What `gitfleet dev` was asked for.
#[derive(Debug, Clone)]
pub struct DevOptions {
    pub dir: PathBuf,
    pub nodes: usize,
    pub grpc_listen: SocketAddr,
    pub http_listen: SocketAddr,
    /// Whether a push to a missing repository creates it.
    pub push_to_create: bool,
}

/// The credentials of a dev cluster, made once and kept in `DIR/secrets.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Secrets {
    proxy_token: String,
    node_token: String,
    access_token: String,
    /// Made on the first start after it was introduced, for a directory older than it.
    #[serde(default)]
    read_token: Option<String>,
}

impl Secrets {
    fn load_or_create(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join("secrets.toml");
        let mut secrets = match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str::<Secrets>(&text)
                .with_context(|| format!("reading {}", path.display()))?,
            Err(_) => Self {
                proxy_token: random_token(),
                node_token: random_token(),
                access_token: random_token(),
                read_token: None,
            },
        };
        if secrets.read_token.is_none() || !path.exists() {
            secrets.read_token.get_or_insert_with(random_token);
            write_private(&path, &toml::to_string(&secrets)?)?;
        }
        Ok(secrets)
    }

    fn read_token(&self) -> &str {
        self.read_token.as_deref().unwrap_or_default()
    }
}

fn random_token() -> String {
    hex::encode(rand::random::<[u8; 24]>())
}

/// The private PostgreSQL and the node processes of a running dev cluster. Dropping it stops
/// them: nodes first, then the database.
#[derive(Debug)]
pub struct DevProcesses {
    pub nodes: Vec<NodeChild>,
    pub postgres: PrivatePostgres,
    pub database_url: String,
    pub proxy_config: PathBuf,
    pub grpc_listen: SocketAddr,
    pub http_listen: SocketAddr,
    access_token: String,
    read_token: String,
    proxy_token: String,
}

/// One `gitfleet node` child.
#[derive(Debug)]
pub struct NodeChild {
    pub storage: String,
    pub address: String,
    child: Child,
}

/// Stops children together: SIGTERM to all, then up to `grace` for them to finish, then
/// SIGKILL for any left. Children already reaped are left alone.
pub fn stop_children(children: &mut [&mut Child], grace: Duration) {
    for child in children.iter_mut() {
        if let Ok(None) = child.try_wait() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline
        && children
            .iter_mut()
            .any(|child| matches!(child.try_wait(), Ok(None)))
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    for child in children {
        if let Ok(None) = child.try_wait() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Asks the kernel to send the child SIGTERM when the thread that starts it ends, so a cluster
/// never outlives whoever started it.
pub fn die_with_parent(command: &mut Command) {
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
                .map_err(std::io::Error::from)
        });
    }
}

/// Where node `index` (from 1) of a dev cluster in `dir` keeps its storage, `storage-INDEX`.
pub fn storage_dir(dir: &Path, index: usize) -> PathBuf {
    dir.join(format!("node-{index}"))
}

/// `DIR/env` of a running dev cluster, as KEY → value.
pub fn read_env(dir: &Path) -> anyhow::Result<std::collections::HashMap<String, String>> {
    let path = dir.join("env");
    Ok(std::fs::read_to_string(&path)
        .with_context(|| format!("reading {}", path.display()))?
        .lines()
        .filter_map(|line| line.strip_prefix("export "))
        .filter_map(|line| line.split_once('='))
        .map(|(key, value)| (key.to_owned(), value.trim_matches('\'').to_owned()))
        .collect())
}

impl Drop for DevProcesses {
    fn drop(&mut self) {
        let mut children: Vec<&mut Child> =
            self.nodes.iter_mut().map(|node| &mut node.child).collect();
        // Up to 15 s for the nodes to finish their calls.
        stop_children(&mut children, Duration::from_secs(15));
        self.postgres.stop();
    }
}

/// Starts PostgreSQL and the nodes, and writes the configs and `DIR/env`. Blocking: call it
/// from a thread that lives as long as the cluster (the children are tied to it).
pub fn start_processes(options: &DevOptions) -> anyhow::Result<DevProcesses> {
    let dir = &options.dir;
    let dir = own_directory(dir)?;
    let secrets = Secrets::load_or_create(&dir)?;

    crate::toolkit::say(
        true,
        format_args!(
            "gitfleet dev: starting PostgreSQL in {}",
            dir.join("postgres").display()
        ),
    );
    let postgres = PrivatePostgres::start(
        &dir.join("postgres"),
        &socket_dir(&dir),
        &dir.join("postgres.log"),
        Durability::Safe,
    )?;
    let database_url = postgres.url("gitfleet");
    create_database(&postgres)?;

    let mut nodes = Vec::new();
    for index in 1..=options.nodes {
        let storage = format!("storage-{index}");
        let storage_dir = storage_dir(&dir, index);
        std::fs::create_dir_all(&storage_dir)?;
        let config_path = dir.join(format!("node-{index}.toml"));
        write_private(
            &config_path,
            &format!(
                "# Written by gitfleet dev at every start.\n\
                 listen = \"127.0.0.1:0\"\n\
                 [auth]\ntoken = \"{}\"\n\
                 [[storages]]\nname = \"{storage}\"\npath = \"{}\"\n",
                secrets.node_token,
                storage_dir.display()
            ),
        )?;
        crate::toolkit::say(
            true,
            format_args!("gitfleet dev: starting node {index} ({storage})"),
        );
        nodes.push(spawn_node(&config_path, storage)?);
    }

    let proxy_config = dir.join("proxy.toml");
    let mut config = format!(
        "# Written by gitfleet dev at every start.\n\
         listen = \"{}\"\nhttp_listen = \"{}\"\nshutdown_delay = \"0s\"\n\
         [auth]\ntoken = \"{}\"\n\
         [[access_tokens]]\nname = \"dev\"\ntoken = \"{}\"\nscope = \"read-write\"\n\
         [[access_tokens]]\nname = \"dev-read\"\ntoken = \"{}\"\nscope = \"read\"\n\
         [database]\nurl = \"{database_url}\"\n\
         [worker]\nlease = \"10s\"\nshutdown_grace = \"5s\"\n\
         [[virtual_storages]]\nname = \"default\"\nreplication_factor = {}\npush_to_create = {}\n",
        options.grpc_listen,
        options.http_listen,
        secrets.proxy_token,
        secrets.access_token,
        secrets.read_token(),
        options.nodes.min(3),
        options.push_to_create,
    );
    for node in &nodes {
        config.push_str(&format!(
            "[[virtual_storages.nodes]]\nstorage = \"{}\"\naddress = \"{}\"\ntoken = \"{}\"\n",
            node.storage, node.address, secrets.node_token
        ));
    }
    write_private(&proxy_config, &config)?;
    Ok(DevProcesses {
        nodes,
        postgres,
        database_url,
        proxy_config,
        grpc_listen: options.grpc_listen,
        http_listen: options.http_listen,
        read_token: secrets.read_token().to_owned(),
        access_token: secrets.access_token,
        proxy_token: secrets.proxy_token,
    })
}

impl DevProcesses {
    /// Writes `DIR/env` for the addresses the proxy actually listens on.
    pub fn write_env(&self, dir: &Path, grpc: SocketAddr, http: SocketAddr) -> anyhow::Result<()> {
        let env = format!(
            "# Source it: . {}\n\
             export GITFLEET_CONFIG='{}'\n\
             export GITFLEET_GRPC_ADDR='http://{grpc}'\n\
             export GITFLEET_HTTP_URL='http://dev:{}@{http}'\n\
             export GITFLEET_READ_HTTP_URL='http://dev-read:{}@{http}'\n\
             export GITFLEET_TOKEN='{}'\n\
             export DATABASE_URL='{}'\n",
            dir.join("env").display(),
            self.proxy_config.display(),
            self.access_token,
            self.read_token,
            self.proxy_token,
            self.database_url,
        );
        write_private(&dir.join("env"), &env)
    }
}

/// Makes (or checks) the cluster's directory: ours, not a symlink, and closed to others but
/// for passing through (PostgreSQL, running as another user, must reach its data inside).
fn own_directory(dir: &Path) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    match std::fs::symlink_metadata(dir) {
        Ok(meta) if meta.file_type().is_symlink() => {
            bail!("{} is a symlink: give the real directory", dir.display())
        }
        Ok(meta) if meta.uid() != nix::unistd::geteuid().as_raw() => bail!(
            "{} belongs to another user: choose another --dir",
            dir.display()
        ),
        Ok(_) => {}
        Err(_) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?
        }
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))?;
    dir.canonicalize()
        .with_context(|| format!("resolving {}", dir.display()))
}

/// Writes a file only its owner can read, refusing to follow a symlink planted in its place.
fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(contents.as_bytes())?;
    Ok(())
}

/// The socket directory: inside DIR when the path is short enough for a Unix socket.
fn socket_dir(dir: &Path) -> PathBuf {
    let inside = dir.join("run");
    if inside.as_os_str().len() < 80 {
        return inside;
    }
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(dir.as_os_str().as_encoded_bytes());
    std::env::temp_dir().join(format!("gitfleet-dev-{}", hex::encode(&digest[..6])))
}

/// Creates the `gitfleet` database unless it exists, with psql from the server's binaries.
fn create_database(postgres: &PrivatePostgres) -> anyhow::Result<()> {
    let psql = super::postgres::find_bindir()?.join("psql");
    let run = |sql: &str| {
        Command::new(&psql)
            .args(["-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-d"])
            .arg(postgres.url("postgres"))
            .args(["-c", sql])
            .output()
            .context("running psql")
    };
    let exists = run("SELECT 1 FROM pg_database WHERE datname = 'gitfleet'")?;
    if !exists.status.success() {
        bail!(
            "psql failed: {}",
            String::from_utf8_lossy(&exists.stderr).trim()
        );
    }
    if String::from_utf8_lossy(&exists.stdout).trim() != "1" {
        let created = run("CREATE DATABASE gitfleet")?;
        if !created.status.success() {
            bail!(
                "cannot create the database: {}",
                String::from_utf8_lossy(&created.stderr).trim()
            );
        }
    }
    Ok(())
}

/// Starts `gitfleet node` (this very binary) and waits for its address. The node gets SIGTERM
/// if this thread ends.
fn spawn_node(config: &Path, storage: String) -> anyhow::Result<NodeChild> {
    let exe = std::env::current_exe().context("finding the gitfleet binary")?;
    let mut command = Command::new(exe);
    command
        .args(["node", "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        // Out of the terminal's process group: Ctrl-C reaches `gitfleet dev`, which stops the
        // nodes after the proxy has drained.
        .process_group(0);
    die_with_parent(&mut command);
    let mut child = command.spawn().context("starting a node")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped"))
        .read_line(&mut line)
        .context("reading the node's address")?;
    let Some(address) = line.trim().strip_prefix("gitfleet node: listening on ") else {
        let _ = child.kill();
        let _ = child.wait();
        bail!("node {storage} did not start");
    };
    Ok(NodeChild {
        storage,
        address: format!("http://{address}"),
        child,
    })
}

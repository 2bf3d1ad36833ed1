//! A private PostgreSQL server started from the system's binaries: for `gitfleet dev` and for
//! the tests. It listens only on a Unix socket in a directory of its own, trusts whoever can
//! reach that socket, and runs as the `postgres` user when started by root (initdb refuses root).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// The superuser initdb creates.
pub const SUPERUSER: &str = "postgres";
/// The port is only part of the socket's name: nothing listens on TCP.
const PORT: u16 = 5432;

/// How the server is tuned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Every commit reaches the disk: for a cluster whose data should survive a power cut.
    Safe,
    /// No fsync at all: for throwaway test servers, where speed matters and nothing persists.
    Throwaway,
}

/// A running server. Dropping it stops the server (fast shutdown: clients are disconnected).
#[derive(Debug)]
pub struct PrivatePostgres {
    child: Child,
    data_dir: PathBuf,
    socket_dir: PathBuf,
}

/// Finds the directory that holds `initdb` and `postgres`: `GITFLEET_PG_BINDIR`, then the
/// newest `/usr/lib/postgresql/*/bin`, then `PATH`.
pub fn find_bindir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("GITFLEET_PG_BINDIR") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("initdb").exists() && dir.join("postgres").exists() {
                return Ok(dir);
            }
        }
    }
    bail!(
        "no PostgreSQL server binaries found (looked in GITFLEET_PG_BINDIR, /usr/lib/postgresql/*/bin \
         and PATH): install the PostgreSQL server package, for example `apt-get install postgresql`"
    )
}

/// The user the server runs as: ourselves, or `postgres` when we are root.
fn server_user() -> anyhow::Result<Option<nix::unistd::User>> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    let user = nix::unistd::User::from_name(SUPERUSER)
        .context("looking up the postgres user")?
        .context("running as root, the server must run as the `postgres` user, which does not exist: install the PostgreSQL server package or run as another user")?;
    Ok(Some(user))
}

/// Creates `dir` if needed, private to the server's user.
fn private_dir(dir: &Path, user: Option<&nix::unistd::User>) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    if let Some(user) = user {
        nix::unistd::chown(dir, Some(user.uid), Some(user.gid))
            .with_context(|| format!("handing {} to {}", dir.display(), user.name))?;
    }
    Ok(())
}

/// Fails with a clear message when the server's user cannot enter `dir` (a parent directory
/// private to root, such as /root, is the usual reason).
fn check_reachable(user: &nix::unistd::User, dir: &Path) -> anyhow::Result<()> {
    let mut probe = Command::new("/bin/sh");
    probe
        .args(["-c", "cd \"$0\""])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    as_server_user(&mut probe, Some(user));
    let status = probe.status().context("checking the data directory")?;
    if !status.success() {
        bail!(
            "the PostgreSQL server runs as `{}`, which cannot enter {}: choose a directory \
             every user can reach, such as /var/tmp/gitfleet-dev",
            user.name,
            dir.display()
        );
    }
    Ok(())
}

fn as_server_user(command: &mut Command, user: Option<&nix::unistd::User>) {
    if let Some(user) = user {
        command.uid(user.uid.as_raw()).gid(user.gid.as_raw());
        command.env("HOME", &user.dir).env("USER", &user.name);
    }
}

impl PrivatePostgres {
    /// Starts a server on `data_dir` (initialised first if empty) with its socket in
    /// `socket_dir`, and waits until it accepts connections. Its log goes to `log_file`.
    ///
    /// The server gets SIGINT if the thread that started it ends, so a test process that dies
    /// does not leave it running: start it from a thread that lives as long as you need it.
    pub fn start(
        data_dir: &Path,
        socket_dir: &Path,
        log_file: &Path,
        durability: Durability,
    ) -> anyhow::Result<Self> {
        let bindir = find_bindir()?;
        let user = server_user()?;
        private_dir(data_dir, user.as_ref())?;
        private_dir(socket_dir, user.as_ref())?;
        if let Some(user) = &user {
            for dir in [data_dir, socket_dir] {
                check_reachable(user, dir)?;
            }
        }
        if socket_dir
            .join(format!(".s.PGSQL.{PORT}"))
            .as_os_str()
            .len()
            > 100
        {
            bail!(
                "the socket directory {} is too long for a Unix socket path",
                socket_dir.display()
            );
        }

        if !data_dir.join("PG_VERSION").exists() {
            let mut initdb = Command::new(bindir.join("initdb"));
            initdb
                .arg("--pgdata")
                .arg(data_dir)
                .args(["--username", SUPERUSER, "--auth", "trust"])
                .args(["--encoding", "UTF8", "--no-locale"])
                .stdin(Stdio::null());
            if durability == Durability::Throwaway {
                initdb.arg("--no-sync");
            }
            as_server_user(&mut initdb, user.as_ref());
            let output = initdb.output().context("running initdb")?;
            if !output.status.success() {
                bail!(
                    "initdb failed ({}): {}",
                    output.status,
                    String::from_utf8_lossy(&output.stderr).trim()
                );
            }
        }

        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_file)
            .with_context(|| format!("opening {}", log_file.display()))?;
        let mut postgres = Command::new(bindir.join("postgres"));
        postgres
            .arg("-D")
            .arg(data_dir)
            .arg("-k")
            .arg(socket_dir)
            .args(["-p", &PORT.to_string()])
            .args(["-c", "listen_addresses="])
            .args(["-c", "max_connections=300"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if durability == Durability::Throwaway {
            postgres.args(["-c", "fsync=off", "-c", "synchronous_commit=off"]);
            postgres.args(["-c", "full_page_writes=off"]);
        }
        as_server_user(&mut postgres, user.as_ref());
        // A Ctrl-C in the terminal goes to the foreground process group: the server is told
        // to stop by its owner, in order, not by the terminal.
        postgres.process_group(0);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            postgres.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGINT)
                    .map_err(std::io::Error::from)
            });
        }
        let child = postgres.spawn().context("starting postgres")?;
        let mut server = Self {
            child,
            data_dir: data_dir.to_owned(),
            socket_dir: socket_dir.to_owned(),
        };
        server.wait_until_ready(log_file)?;
        Ok(server)
    }

    /// Waits for the server to say "ready" in its pid file.
    fn wait_until_ready(&mut self, log_file: &Path) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let pid_file = self.data_dir.join("postmaster.pid");
        loop {
            if let Some(status) = self.child.try_wait()? {
                let log = fs::read_to_string(log_file).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(10).collect();
                bail!(
                    "postgres exited at start ({status}); the end of {}:\n{}",
                    log_file.display(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            // A server that crashed leaves its pid file (saying "ready") and its socket
            // behind: only this child's own pid file counts.
            let ours = self.child.id().to_string();
            let ready = fs::read_to_string(&pid_file)
                .map(|text| {
                    text.lines().next().map(str::trim) == Some(ours.as_str())
                        && text.lines().any(|line| line.trim() == "ready")
                })
                .unwrap_or(false);
            if ready && self.socket_dir.join(format!(".s.PGSQL.{PORT}")).exists() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("postgres did not become ready within 60 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A connection URL for `database` on this server.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://{SUPERUSER}@localhost:{PORT}/{database}?host={}",
            self.socket_dir.display()
        )
    }

    /// Stops the server, disconnecting its clients, and waits for it to exit.
    /// Escalates when the server does not go: SIGINT (fast shutdown), then after 20 s SIGQUIT
    /// (immediate), then after 5 s more SIGKILL.
    pub fn stop(&mut self) {
        use nix::sys::signal::Signal;
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        for (signal, patience) in [
            (Signal::SIGINT, Duration::from_secs(20)),
            (Signal::SIGQUIT, Duration::from_secs(5)),
            (Signal::SIGKILL, Duration::from_secs(5)),
        ] {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            let _ = nix::sys::signal::kill(pid, signal);
            let deadline = Instant::now() + patience;
            while Instant::now() < deadline {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// The server's process id, for tests that need to stop it abruptly.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        self.stop();
    }
}

//! PostgreSQL for the tests: `DATABASE_URL` when it is set, otherwise one throwaway server for
//! the test process, started from the system's binaries on a private socket. Every test gets a
//! fresh database of its own.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use gitfleet::dev::postgres::{Durability, PrivatePostgres};
use sqlx::Connection as _;

/// Where the throwaway servers of this and earlier test runs live.
const SCRATCH_PREFIX: &str = "gitfleet-test-pg-";

/// A URL to the server, on its maintenance database: for creating the per-test databases.
fn admin_url() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => url,
        _ => start_throwaway_server(),
    })
}

/// Starts the server from a thread that never ends: the server is bound to that thread's life
/// (parent-death signal), so it stops when the test process exits, however it exits.
fn start_throwaway_server() -> String {
    remove_stale_servers();
    let (url_tx, url_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("test-postgres".into())
        .spawn(move || {
            let base = std::env::temp_dir().join(format!("{SCRATCH_PREFIX}{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&base);
            std::fs::create_dir_all(&base).unwrap();
            let started = PrivatePostgres::start(
                &base.join("data"),
                &base.join("socket"),
                &base.join("postgres.log"),
                Durability::Throwaway,
            );
            match started {
                Ok(server) => {
                    url_tx.send(Ok(server.url("postgres"))).unwrap();
                    // Keep the server (and this thread) for the life of the process.
                    let _server = server;
                    loop {
                        std::thread::park();
                    }
                }
                Err(error) => url_tx.send(Err(format!("{error:#}"))).unwrap(),
            }
        })
        .unwrap();
    match url_rx.recv().unwrap() {
        Ok(url) => url,
        Err(error) => panic!(
            "no PostgreSQL for the tests: set DATABASE_URL, or install the PostgreSQL server package: {error}"
        ),
    }
}

/// Removes the directories of throwaway servers whose test process is gone.
fn remove_stale_servers() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|name| name.strip_prefix(SCRATCH_PREFIX))
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !PathBuf::from(format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Replaces the database name in a PostgreSQL URL.
pub fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[scheme_end..].find('/') {
        Some(slash) => &base[..scheme_end + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{base}/{database}?{query}"),
        None => format!("{base}/{database}"),
    }
}

/// Creates an empty database for one test and returns its URL.
pub async fn fresh_database() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let admin = admin_url();
    let name = format!(
        "gitfleet_test_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let mut connection = sqlx::PgConnection::connect(admin)
        .await
        .unwrap_or_else(|error| panic!("cannot reach the test PostgreSQL at {admin}: {error}"));
    drop_stale_databases(&mut connection).await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name}"
    )))
    .execute(&mut connection)
    .await
    .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut connection)
        .await
        .unwrap();
    connection.close().await.unwrap();
    with_database(admin, &name)
}

/// Drops, once per test process, the databases of earlier test processes that are gone, so a
/// long-lived server behind DATABASE_URL does not fill up with them.
async fn drop_stale_databases(connection: &mut sqlx::PgConnection) {
    static DONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if DONE.swap(true, Ordering::Relaxed) {
        return;
    }
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT datname::text FROM pg_database WHERE datname LIKE 'gitfleet\\_test\\_%'",
    )
    .fetch_all(&mut *connection)
    .await
    .unwrap_or_default();
    for name in names {
        let pid = name
            .strip_prefix("gitfleet_test_")
            .and_then(|rest| rest.split('_').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        let Some(pid) = pid else { continue };
        if PathBuf::from(format!("/proc/{pid}")).exists() {
            continue;
        }
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&mut *connection)
        .await;
    }
}

/// A PostgreSQL server of a test's own, for tests that restart or stop it (the shared server
/// must not be disturbed). It is owned by a thread of its own, which the server cannot outlive.
pub struct OwnServer {
    orders: std::sync::mpsc::Sender<(Order, std::sync::mpsc::Sender<Result<u32, String>>)>,
    url: String,
    _base: tempfile::TempDir,
}

#[derive(Debug, Clone, Copy)]
enum Order {
    /// A fast shutdown (clients disconnected), then a start on the same data.
    Restart,
    /// A fast shutdown, and nothing more until a start.
    Stop,
    Start,
    /// The server's process id.
    Pid,
}

impl OwnServer {
    /// Starts a throwaway server and creates a database `gitfleet` on it.
    pub async fn start() -> Self {
        let base = tempfile::Builder::new()
            .prefix("gitfleet-own-pg-")
            .tempdir()
            .unwrap();
        // The server may run as another user (postgres, under root), who must reach it.
        std::fs::set_permissions(
            base.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let paths = (
            base.path().join("data"),
            base.path().join("socket"),
            base.path().join("postgres.log"),
        );
        let (orders, received) =
            std::sync::mpsc::channel::<(Order, std::sync::mpsc::Sender<Result<u32, String>>)>();
        let (url_tx, url_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("own-postgres".into())
            .spawn(move || {
                let (data, socket, log) = paths;
                let start = || {
                    PrivatePostgres::start(&data, &socket, &log, Durability::Throwaway)
                        .map_err(|error| format!("{error:#}"))
                };
                let mut server = match start() {
                    Ok(server) => server,
                    Err(error) => return url_tx.send(Err(error)).unwrap(),
                };
                url_tx.send(Ok(server.url("postgres"))).unwrap();
                // Ends, and stops the server, when the OwnServer is dropped.
                for (order, reply) in received {
                    if matches!(order, Order::Restart | Order::Stop) {
                        server.stop();
                    }
                    let answer = match order {
                        Order::Restart | Order::Start => start().map(|started| {
                            server = started;
                            server.pid()
                        }),
                        Order::Stop => Ok(0),
                        Order::Pid => Ok(server.pid()),
                    };
                    let _ = reply.send(answer);
                }
            })
            .unwrap();
        let admin = url_rx
            .recv()
            .unwrap()
            .unwrap_or_else(|error| panic!("cannot start a PostgreSQL server: {error}"));
        let mut connection = sqlx::PgConnection::connect(&admin).await.unwrap();
        sqlx::query("CREATE DATABASE gitfleet")
            .execute(&mut connection)
            .await
            .unwrap();
        connection.close().await.unwrap();
        Self {
            orders,
            url: with_database(&admin, "gitfleet"),
            _base: base,
        }
    }

    /// The URL of the database `gitfleet`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Sends an order and waits for it to be carried out (from a multi-threaded runtime, or
    /// from no runtime at all).
    fn order(&self, order: Order) -> u32 {
        let (reply, answer) = std::sync::mpsc::channel();
        self.orders.send((order, reply)).unwrap();
        let wait = || answer.recv().unwrap();
        let answer = match tokio::runtime::Handle::try_current() {
            Ok(_) => tokio::task::block_in_place(wait),
            Err(_) => wait(),
        };
        answer.unwrap_or_else(|error| panic!("{order:?} failed: {error}"))
    }

    /// Restarts the server as `pg_ctl restart -m fast` does: every session is cut, and the
    /// server accepts connections again when this returns.
    pub fn restart(&self) {
        self.order(Order::Restart);
    }

    /// Stops the server (fast shutdown) until [`OwnServer::start_again`].
    pub fn stop(&self) {
        self.order(Order::Stop);
    }

    pub fn start_again(&self) {
        self.order(Order::Start);
    }

    pub fn pid(&self) -> u32 {
        self.order(Order::Pid)
    }
}

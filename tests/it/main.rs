//! gitfleet's integration tests: one binary, the tiers as folders. Everything is real: git,
//! PostgreSQL (a throwaway server, or `DATABASE_URL`), and nodes, proxies and workers talking
//! over sockets on 127.0.0.1.
//!
//! - `store`: the catalog's statements and the notification listener against PostgreSQL, a
//!   fresh database per test.
//! - `node`: one or two storage nodes, called over gRPC and driven by git.
//! - `cluster`: nodes, the proxy and the worker together, with the faults each part must
//!   survive.
//! - `system`: whole processes as operators run them: the chaos suite, `gitfleet dev`,
//!   `gitfleet bench`, the status page in a browser, the deployment files.
//!
//! Unit tests of pure logic live next to the code in `src/`.

mod common;

mod cluster {
    mod proxy;
    mod proxy_faults;
    mod proxy_http;
    mod proxy_process;
    mod push;
    mod push_create;
    mod read_failover;
    mod recovery;
    mod repair;
    mod walker;
    mod worker;
    mod write_lock;
}

mod node {
    mod auth;
    mod errors;
    mod fence;
    mod git;
    mod prepare;
    mod prepared_refs;
    mod process;
    mod refs;
    mod replication;
    mod smarthttp;
    mod storage;
}

mod store {
    mod catalog;
    mod notify;
}

mod system {
    mod bench;
    mod chaos;
    mod deploy;
    mod dev;
    mod status_page;
}

//! The local cluster, and the private PostgreSQL server it (and the tests) start.

pub mod cluster;
pub mod postgres;

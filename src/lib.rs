pub mod auth;
pub mod cli;
pub mod client;
pub mod config;
pub mod git;
pub mod model;
pub mod node;
pub mod proto;

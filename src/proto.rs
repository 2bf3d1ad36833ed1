//! Code generated from `proto/`, and the routing table generated from each RPC's kind option.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

tonic::include_proto!("gitfleet.v1");

/// The encoded file descriptor set, served by the reflection service.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("gitfleet_descriptor");

/// The routing table: every RPC of `gitfleet.v1` with its declared kind.
pub mod routing {
    pub use super::RpcKind;

    /// What field 1 of an RPC's (first) request message names.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum HeaderScope {
        Repository,
        Storage,
    }

    /// One RPC of `gitfleet.v1`, as declared in `proto/`.
    #[derive(Debug, Clone, Copy)]
    pub struct RpcInfo {
        /// The gRPC path, such as `/gitfleet.v1.RefService/ListRefs`.
        pub path: &'static str,
        pub kind: RpcKind,
        pub scope: HeaderScope,
        pub client_streaming: bool,
        pub server_streaming: bool,
    }

    include!(concat!(env!("OUT_DIR"), "/rpc_table.rs"));

    /// The gRPC services whose RPCs `keep` accepts, such as `gitfleet.v1.RefService`, each once.
    pub fn services(keep: impl Fn(&RpcInfo) -> bool) -> Vec<&'static str> {
        let mut services: Vec<&'static str> = RPC_TABLE
            .iter()
            .filter(|rpc| keep(rpc))
            .filter_map(|rpc| rpc.path.trim_start_matches('/').split_once('/'))
            .map(|(service, _)| service)
            .collect();
        services.sort_unstable();
        services.dedup();
        services
    }

    /// Looks up an RPC by its gRPC path.
    pub fn rpc_info(path: &str) -> Option<&'static RpcInfo> {
        RPC_TABLE.iter().find(|info| info.path == path)
    }
}

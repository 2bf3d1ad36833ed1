//! What every role does with the storage nodes: the pool of connections and the health of each
//! node, the calls made on one replica, and where replicas are placed. The proxy, the worker
//! and the admin commands share it; it knows nothing of any of them.

pub mod codec;
mod nodes;
mod placement;
mod replica;

pub use nodes::{NodeHandle, Nodes, VirtualStorage};
pub use placement::{NewPlacement, majority};
pub use replica::{ChangedRefs, Replica, fenced, is_fenced, replica_header, set_fence};

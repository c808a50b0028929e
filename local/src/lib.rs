//! owsfs-local: what a cache holds besides the workspace's files. The cache directory's
//! layout and lock (`cache`), its record of the base generation (`state`, `CACHE/state.db`),
//! the encoding of one node (`node`), file handles (`handle`), the access list format
//! (`access`), the one writer of nodes from a tree (`write`, used by `restore` and by
//! hydration), a tree as a tar archive (`export`), a restore drill (`drill`), and the progress trait long work reports to
//! (`progress`).
//!
//! Architecture invariant: this crate knows the store's formats but never talks to the
//! kernel's FUSE side, the journal's writer or the sync agent; the crates above it share the
//! state through it, so none of them needs another.

pub mod access;
pub mod adopt;
pub mod cache;
pub mod drill;
pub mod export;
pub use owsfs_sys::handle;
pub mod node;
pub mod progress;
pub mod restore;
pub mod state;
pub mod write;

pub use cache::Cache;
pub use node::{decode_node, encode_node};
pub use state::{Base, Kind, LocalState, NodeMap, NodeRow, Totals, Update};

//! owsfs-store: the object store side of owsfs. Content-addressed chunks and trees travel in
//! packs; generations are numbered, checksummed records committed by create-if-absent.
//! The byte layouts and the commit protocol are in `FORMAT.md`.
//!
//! Only verified bytes leave this crate: blobs through [`read_blob`], [`read_blob_run`] and
//! [`read_pack`], records through their decoders; the raw reads are crate-private. Time comes
//! from the [`Clock`] in [`StoreOptions`], never from the system directly (`clippy.toml`).
//!
//! ```compile_fail,E0624
//! fn raw(store: &owsfs_store::Store) {
//!     let _ = store.get_range("packs/00/00", 0..1); // private: use read_blob_run
//! }
//! ```
//! ```compile_fail,E0624
//! fn raw(store: &owsfs_store::Store) {
//!     let _ = store.get("owsfs-store.json"); // private: records have their own readers
//! }
//! ```

pub mod backend;
pub mod chunk;
pub mod clock;
pub mod copy;
pub mod diff;
pub mod drill;
pub mod error;
pub mod fault;
pub mod forward;
pub mod gc;
pub mod generation;
pub mod hook;
pub mod ids;
pub mod lease;
pub mod pack;
pub mod pins;
pub mod progress;
pub mod refs;
pub mod repack;
pub mod retention;
pub mod rollback;
pub mod snapshot;
pub mod stats;
pub mod template;
pub mod tree;
pub mod url;

pub use backend::{Store, StoreOptions};
pub use clock::{Clock, ManualClock, SystemClock};
pub use error::{Result, StoreError};
pub use fault::{FaultConfig, FaultKinds, FaultLayer};
pub use generation::{
    CommitError, ForkSource, GenKind, GenNumber, GenStats, GenerationRecord, SqliteState,
    WalPosition, Workspace, WorkspaceInfo,
};
pub use ids::{BlobId, ChunkId, PackId, TreeId};
pub use lease::{Holder, Lease, LeaseError, LeaseRecord, LeaseState, LeaseWatch};
pub use pack::{
    BlobKind, BlobRef, Codec, Compression, PackWriter, ParsedPack, read_blob, read_blob_run,
    read_pack,
};
pub use refs::{GenRef, ResolveError};
pub use snapshot::{Snapshot, SnapshotError};
pub use stats::{StatsSnapshot, StoreStats};
pub use tree::{BlobLoader, ChunkSpan, Content, FileContent, ListRef, NodeKind, Tree, TreeEntry};
pub use url::StoreUrl;

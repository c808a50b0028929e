//! owsfs write journal.
//!
//! The FUSE daemon appends an [`Op`] for every mutation of the backing directory *before*
//! performing it. The journal keeps the [`DirtyState`] (which files, extents and directories
//! may have changed) live in memory and on disk in segment files, so that after a `kill -9` of
//! the daemon the same state is rebuilt by replay. Appends are handed to the kernel with
//! write(2) but never synced; concurrent appends share one write call (group append).
//! When the journal cannot be trusted (damage, or an unclean shutdown across a reboot), opening
//! it rescans the backing directory and marks everything dirty.
//!
//! The on-disk format and the crash analysis are in `FORMAT.md` beside this crate.

mod error;
mod extent;
mod ino;
mod journal;
mod op;
mod record;
mod replay;
mod segment;
mod serde_path;
mod state;

pub use error::JournalError;
pub use extent::ExtentSet;
pub use ino::{BackingIno, FuseIno, InoMap};
pub use journal::{
    CLEAN_MARKER, Journal, JournalOptions, JournalStats, LOCK_FILE, Place, Recovery,
};
pub use op::{Ino, NodeKind, Op, Seq};
pub use state::{DirtyFile, DirtyState};

/// The segment format version this build writes and reads.
pub const FORMAT_VERSION: u32 = segment::VERSION;

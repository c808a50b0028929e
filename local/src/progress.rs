//! The progress trait long work reports to; it lives in the store crate, so that its long work
//! (GC) reports the same way.

pub use owsfs_store::progress::{Progress, Silent};

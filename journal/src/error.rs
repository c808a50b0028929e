//! The journal's error type: few variants, each saying what happened and what to do.

use std::io;
use std::path::PathBuf;

/// `EIO` on Linux. The journal crate has no libc dependency; every journal failure that is not
/// an OS error is an I/O failure from the point of view of a FUSE caller.
const EIO: i32 = 5;

/// Why a journal operation failed.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// A file system call on the journal directory failed.
    #[error(
        "journal: could not {action} {path}: {source}; check that the journal directory exists, \
         is writable by this user and that its file system is not full or read-only"
    )]
    Io {
        /// What the journal was doing, e.g. "write to segment".
        action: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// Another process holds the journal directory's lock.
    #[error(
        "journal {dir} is in use by another process (it holds the lock on {dir}/LOCK); \
         stop the other owsfs daemon using this journal first"
    )]
    Locked {
        /// The journal directory.
        dir: PathBuf,
    },

    /// `JournalOptions::boot_id` does not fit the 36-byte header field.
    #[error("journal: boot id {id:?} is longer than 36 bytes; use a boot_id of at most 36 bytes")]
    InvalidBootId {
        /// The rejected boot id.
        id: String,
    },

    /// Walking the backing directory during a rescan failed: the journal cannot be rebuilt.
    #[error(
        "journal rescan: could not read {path} in the backing directory: {source}; \
         fix the permissions or remove the entry, then start the daemon again"
    )]
    Rescan {
        /// The backing entry that could not be read.
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A record does not fit the 32-bit payload length of the record frame.
    #[error(
        "journal: a {what} record of {len} bytes does not fit a journal record (limit 4 GiB); \
         the dirty set is too large: cut a generation to shrink it"
    )]
    RecordTooLarge {
        /// "snapshot" or the op name.
        what: &'static str,
        /// The size that did not fit.
        len: u64,
    },

    /// An earlier write to the journal failed, so records may be missing from it; no further
    /// append is accepted because the journal would no longer cover every change.
    #[error(
        "journal {dir} stopped accepting records after an earlier failure ({reason}); \
         restart the daemon: opening the journal cuts the damaged tail or rescans"
    )]
    Poisoned {
        /// The journal directory.
        dir: PathBuf,
        /// The first failure, as text.
        reason: String,
    },
}

impl JournalError {
    /// The errno a FUSE reply should carry for this error: the OS error when there is one
    /// (e.g. `ENOSPC`), `EIO` otherwise.
    pub fn to_errno(&self) -> i32 {
        match self {
            JournalError::Io { source, .. } | JournalError::Rescan { source, .. } => {
                source.raw_os_error().unwrap_or(EIO)
            }
            _ => EIO,
        }
    }

    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        JournalError::Io {
            action,
            path: path.into(),
            source,
        }
    }
}

//! The one error type of the filesystem core. Every error that reaches a FUSE reply knows its
//! errno; the adapter turns it into a reply in one place.

use std::fmt;

/// An error from a filesystem operation: an errno for the kernel, and a message for the log.
#[derive(Debug)]
pub struct FsError {
    errno: i32,
    context: &'static str,
    source: Option<std::io::Error>,
}

impl FsError {
    /// An error with a bare errno, for conditions the core detects itself.
    pub fn errno(errno: i32, context: &'static str) -> Self {
        FsError {
            errno,
            context,
            source: None,
        }
    }

    /// Wraps an I/O error from the backing directory or the journal.
    pub fn io(context: &'static str, source: std::io::Error) -> Self {
        FsError {
            errno: source.raw_os_error().unwrap_or(libc::EIO),
            context,
            source: Some(source),
        }
    }

    /// The errno the kernel receives.
    pub fn to_errno(&self) -> i32 {
        self.errno
    }

    /// Errors that are part of normal POSIX traffic (ENOENT from a lookup, EEXIST from
    /// O_EXCL...) are not worth a log line; the rest are.
    pub fn is_expected(&self) -> bool {
        matches!(
            self.errno,
            libc::ENOENT
                | libc::EEXIST
                | libc::ENOTEMPTY
                | owsfs_sys::fs::NO_XATTR_RAW
                | libc::ERANGE
                | libc::EACCES
                | libc::EPERM
                | libc::ENOTDIR
                | libc::EISDIR
                | libc::EINVAL
                | libc::ESTALE
                | libc::ENAMETOOLONG
                | libc::EXDEV
                | libc::ENXIO
                | libc::EOPNOTSUPP
                | libc::ELOOP
                | libc::EMLINK
                | libc::EFBIG
                | libc::ENOSPC
                | libc::EDQUOT
                | libc::EROFS
                | libc::EBADF
                | libc::ETXTBSY
                // Warned about once where the budget runs out, not per request.
                | libc::ENFILE
        )
    }
}

impl fmt::Display for FsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Some(source) => write!(f, "{}: {source}", self.context),
            None => write!(
                f,
                "{}: {}",
                self.context,
                std::io::Error::from_raw_os_error(self.errno)
            ),
        }
    }
}

impl std::error::Error for FsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<owsfs_journal::JournalError> for FsError {
    fn from(e: owsfs_journal::JournalError) -> Self {
        // A journal that cannot record a mutation must refuse the mutation: nothing may
        // change in the workspace that the journal does not know about. The caller gets the
        // journal's errno: ENOSPC on a full disk (which passes once space is freed; the
        // journal logs when that starts and ends), EIO when the journal gave up.
        let errno = e.to_errno();
        if matches!(errno, libc::ENOSPC | libc::EDQUOT) {
            tracing::trace!("journal append refused, refusing the operation: {e}");
        } else {
            tracing::error!("journal append failed, refusing the operation: {e}");
        }
        FsError {
            errno,
            context: "journal append failed",
            source: Some(std::io::Error::other(e)),
        }
    }
}

/// Converts a rustix errno into an `FsError`, with context.
pub(crate) trait Context<T> {
    fn ctx(self, context: &'static str) -> Result<T, FsError>;
}

impl<T> Context<T> for Result<T, rustix::io::Errno> {
    fn ctx(self, context: &'static str) -> Result<T, FsError> {
        self.map_err(|e| FsError::errno(e.raw_os_error(), context))
    }
}

impl<T> Context<T> for Result<T, std::io::Error> {
    fn ctx(self, context: &'static str) -> Result<T, FsError> {
        self.map_err(|e| FsError::io(context, e))
    }
}

pub type FsResult<T> = Result<T, FsError>;

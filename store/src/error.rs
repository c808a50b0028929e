//! The store's error type. Few variants, each saying what happened and what to do next.

use crate::ids::BlobId;

/// Result with [`StoreError`].
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Errors of the object store layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store URL or options are not usable.
    #[error("invalid store location {url:?}: {msg}")]
    Config { url: String, msg: String },

    /// The backend could not be reached or refused us (bucket, credentials, endpoint).
    #[error("store {url} is not reachable: {msg}")]
    Access {
        url: String,
        msg: String,
        #[source]
        source: Option<Box<opendal::Error>>,
    },

    /// The location holds objects but is not an owsfs store.
    #[error(
        "{url} is not an owsfs store (no owsfs-store.json); point --store at an empty location or an existing owsfs store"
    )]
    NotOwsfsStore { url: String },

    /// An object has a format version newer than this build understands.
    #[error(
        "{object} has format version {found}, this owsfs understands up to {supported}; upgrade owsfs"
    )]
    UnsupportedVersion {
        object: String,
        found: u64,
        supported: u64,
    },

    /// The object does not exist.
    #[error("{key} does not exist in the store")]
    NotFound { key: String },

    /// Stored bytes failed verification. The bytes are never returned.
    #[error("corrupt object {object}{}: {what}", blob.map(|b| format!(" (blob {b})")).unwrap_or_default())]
    Corrupt {
        object: String,
        blob: Option<BlobId>,
        what: String,
    },

    /// A request to the backend failed (after retries for temporary errors).
    #[error("store {op} of {key} failed: {source}")]
    Backend {
        op: &'static str,
        key: String,
        #[source]
        source: Box<opendal::Error>,
    },

    /// A local file system operation failed (file:// conditional writes, restore, cache).
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },

    /// A caller passed something that cannot be stored (bad name, broken invariant).
    #[error("{0}")]
    Invalid(String),
}

impl StoreError {
    /// Builds a `Corrupt` error for a whole object.
    pub fn corrupt(object: impl Into<String>, what: impl Into<String>) -> Self {
        StoreError::Corrupt {
            object: object.into(),
            blob: None,
            what: what.into(),
        }
    }

    /// Builds an `Io` error with context.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        StoreError::Io {
            what: what.into(),
            source,
        }
    }

    /// True when the error says stored data failed verification.
    pub fn is_corrupt(&self) -> bool {
        matches!(self, StoreError::Corrupt { .. })
    }

    /// True for a missing object.
    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::NotFound { .. })
    }
}

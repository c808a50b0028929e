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

    /// The backend could not be reached or refused us (bucket, credentials, endpoint). `msg`
    /// says what to check; the whole backend error is kept for the debug log (`{:?}`), not
    /// shown: it repeats the request's context and the server's answer at length.
    #[error("store {url}: {msg}")]
    Access {
        url: String,
        msg: String,
        error: Option<Box<opendal::Error>>,
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

    /// A request to the backend failed (after retries for temporary errors). Shown with the
    /// short [`cause`]; the whole backend error was logged at debug level where it failed.
    #[error("store {op} of {key} failed: {}", cause(error))]
    Backend {
        op: &'static str,
        key: String,
        error: Box<opendal::Error>,
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

/// The cause of a failed store request in a few words: the HTTP status and S3 error code (with
/// the server's message, cut short), or else the innermost cause (an errno, a timeout), and
/// "(temporary)" when retrying could help. opendal's own text repeats the request's context,
/// the response headers and the XML body; that belongs in the debug log, not in a message.
pub fn cause(e: &opendal::Error) -> String {
    let full = e.to_string();
    let status = full.split("status: ").nth(1).and_then(|rest| {
        let code = rest.get(..3)?;
        code.bytes().all(|b| b.is_ascii_digit()).then_some(code)
    });
    let (code, server_msg) = s3_error_fields(e.message());
    let mut out = match (status, code) {
        (Some(s), Some(c)) => format!("HTTP {s} {c}"),
        (Some(s), None) => format!("HTTP {s}"),
        (None, Some(c)) => c.to_string(),
        (None, None) => {
            let mut innermost = None;
            let mut next = std::error::Error::source(e);
            while let Some(s) = next {
                innermost = Some(s.to_string());
                next = s.source();
            }
            match innermost {
                Some(inner) if !e.message().is_empty() => {
                    format!("{}: {}", shorten(e.message(), 80), shorten(&inner, 120))
                }
                Some(inner) => shorten(&inner, 160),
                None if !e.message().is_empty() => shorten(e.message(), 160),
                None => e.kind().to_string(),
            }
        }
    };
    // The server's sentence, when there is no code to say it shorter.
    if let Some(m) = server_msg.filter(|m| !m.is_empty() && code.is_none()) {
        out.push_str(": ");
        out.push_str(&shorten(m, 120));
    }
    if e.is_temporary() {
        out.push_str(" (temporary)");
    }
    out
}

/// The `code` and `message` of opendal's rendering of an S3 error body
/// (`S3Error { code: "NoSuchBucket", message: "…", … }`).
fn s3_error_fields(m: &str) -> (Option<&str>, Option<&str>) {
    let field = |name: &str| {
        let start = m.find(&format!("{name}: \""))? + name.len() + 3;
        let len = m[start..].find('"')?;
        Some(&m[start..start + len])
    };
    if !m.starts_with("S3Error") {
        return (None, None);
    }
    (field("code").filter(|c| !c.is_empty()), field("message"))
}

/// The first line of `s`, at most `max` characters.
fn shorten(s: &str, max: usize) -> String {
    let line = s.lines().next().unwrap_or("").trim();
    if line.chars().count() <= max {
        return line.to_string();
    }
    let cut: String = line.chars().take(max).collect();
    format!("{cut}…")
}

#[cfg(test)]
mod tests {
    use super::*;
    use opendal::ErrorKind;

    #[test]
    fn causes_are_short_and_keep_what_matters() {
        // An S3 answer, as opendal's S3 service renders it.
        let e = opendal::Error::new(
            ErrorKind::PermissionDenied,
            "S3Error { code: \"InvalidAccessKeyId\", message: \"The access key ID you provided does not exist in our records.\", resource: \"\", request_id: \"17E\" }",
        )
        .with_context("uri", "http://127.0.0.1:8333/b/p/owsfs-store.json")
        .with_context("response", "Parts { status: 403, version: HTTP/1.1, headers: {\"server\": \"SeaweedFS\"} }");
        assert_eq!(cause(&e), "HTTP 403 InvalidAccessKeyId");
        // A refused connection: the innermost cause.
        let io = std::io::Error::from_raw_os_error(libc::ECONNREFUSED);
        let e = opendal::Error::new(ErrorKind::Unexpected, "send http request")
            .with_context("url", "http://127.0.0.1:1/b/p/x")
            .set_source(anyhow::Error::new(io).context("client error (Connect)"))
            .set_temporary();
        assert_eq!(
            cause(&e),
            "send http request: Connection refused (os error 111) (temporary)"
        );
        // A server error without a body.
        let e = opendal::Error::new(ErrorKind::Unexpected, "")
            .with_context("response", "Parts { status: 503, headers: {} }")
            .set_temporary();
        assert_eq!(cause(&e), "HTTP 503 (temporary)");
        let long = "x".repeat(1000);
        assert!(cause(&opendal::Error::new(ErrorKind::Unexpected, &long)).len() < 200);
    }
}

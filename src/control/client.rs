//! The client side of the control socket: finds the daemon of a mountpoint and asks it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;

use super::{ControlError, Failure, Request, Snapshotted, Status, Synced, Unmounted};
use crate::mountpoint;

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No owsfs mount is at the path.
    #[error("{} is not an owsfs mount", .0.display())]
    NotMounted(PathBuf),
    /// The mount is there, but its daemon does not answer: it died, leaving the mount behind.
    #[error(
        "the owsfs daemon of {} does not answer at {}/control.sock ({source}); if it died, run \
         `owsfs unmount {}` to remove the dead mount",
        mountpoint.display(), cache.display(), mountpoint.display()
    )]
    DaemonGone {
        mountpoint: PathBuf,
        cache: PathBuf,
        source: std::io::Error,
    },
    /// The mount's cache directory was deleted under it: its control socket went with it.
    #[error(
        "the cache {} of the mount at {} is gone ({source}); `owsfs unmount {}` stops its daemon",
        cache.display(), mountpoint.display(), mountpoint.display()
    )]
    CacheGone {
        mountpoint: PathBuf,
        cache: PathBuf,
        source: std::io::Error,
    },
    /// The daemon answered with a refusal.
    #[error(transparent)]
    Refused(#[from] ControlError),
    /// Anything else on the way (a timeout, a malformed answer).
    #[error("{0}")]
    Other(String),
}

impl ClientError {
    /// No daemon serves the mount any more (or there is no mount).
    pub fn daemon_gone(&self) -> bool {
        matches!(
            self,
            ClientError::NotMounted(_) | ClientError::DaemonGone { .. }
        )
    }
}

/// Sends `req` to the daemon serving `mountpoint` and waits for its answer, as `T`.
fn call<T: DeserializeOwned>(
    mountpoint: &Path,
    req: &Request,
    timeout: Option<Duration>,
) -> Result<T, ClientError> {
    let mount = mountpoint::find_owsfs(mountpoint)
        .map_err(|e| ClientError::Other(format!("{e:#}")))?
        .ok_or_else(|| ClientError::NotMounted(mountpoint.to_path_buf()))?;
    let cache = mountpoint::cache_of(&mount).ok_or_else(|| {
        ClientError::Other(format!(
            "cannot find the daemon of the owsfs mount at {} (source {})",
            mount.mountpoint.display(),
            mount.source
        ))
    })?;
    let gone = |source: std::io::Error| ClientError::DaemonGone {
        mountpoint: mount.mountpoint.clone(),
        cache: cache.clone(),
        source,
    };
    let (_dirfd, short) = super::short_socket_path(&cache).map_err(|source| {
        // Only a cache that is not there is gone; EACCES, EMFILE... are said as they are.
        if source.kind() == std::io::ErrorKind::NotFound {
            ClientError::CacheGone {
                mountpoint: mount.mountpoint.clone(),
                cache: cache.clone(),
                source,
            }
        } else {
            ClientError::Other(format!(
                "cannot open the cache {} of the mount at {}: {source}",
                cache.display(),
                mount.mountpoint.display()
            ))
        }
    })?;
    let conn = UnixStream::connect(&short).map_err(gone)?;
    let io = |e: std::io::Error| ClientError::Other(format!("control socket: {e}"));
    conn.set_read_timeout(timeout).map_err(io)?;
    let mut w = conn.try_clone().map_err(io)?;
    super::http::write_request(&mut w, req).map_err(io)?;
    let answer = match super::http::read_response(&mut BufReader::new(conn)) {
        Ok(a) => a,
        // A daemon from before HTTP (a mount older than this binary): ask again in its form.
        Err(e)
            if e.get_ref()
                .is_some_and(|i| i.is::<super::http::LineAnswer>()) =>
        {
            let conn = UnixStream::connect(&short).map_err(gone)?;
            conn.set_read_timeout(timeout).map_err(io)?;
            let mut w = conn.try_clone().map_err(io)?;
            let line = serde_json::to_string(req).map_err(|e| ClientError::Other(e.to_string()))?;
            writeln!(w, "{line}").map_err(io)?;
            let mut answer = String::new();
            match BufReader::new(conn).read_line(&mut answer) {
                Ok(0) => return Err(gone(std::io::ErrorKind::UnexpectedEof.into())),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return Err(gone(e));
                }
                Err(e) => {
                    return Err(ClientError::Other(format!(
                        "the daemon did not answer: {e}"
                    )));
                }
                Ok(_) => answer,
            }
        }
        // The daemon died with the connection open (e.g. killed while its threads exit).
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof
            ) =>
        {
            return Err(gone(e));
        }
        Err(e) => {
            return Err(ClientError::Other(format!(
                "the daemon did not answer: {e}"
            )));
        }
    };
    let bad =
        |e: serde_json::Error| ClientError::Other(format!("the daemon sent a bad answer: {e}"));
    let v: serde_json::Value = serde_json::from_str(&answer).map_err(bad)?;
    if v["ok"] == serde_json::Value::Bool(false) {
        return Err(match serde_json::from_value::<Failure>(v.clone()) {
            Ok(f) => f.error.into(),
            // A daemon that sends only the message (an older one): keep its words.
            Err(e) => match v["error"].as_str() {
                Some(msg) => ControlError::Other(msg.to_string()).into(),
                None => bad(e),
            },
        });
    }
    serde_json::from_value(v).map_err(bad)
}

pub fn status(mountpoint: &Path, dirty: bool, timeout: Duration) -> Result<Status, ClientError> {
    call(mountpoint, &Request::Status { dirty }, Some(timeout))
}

/// The newest generation once everything written before the call is durable.
pub fn sync(mountpoint: &Path, timeout: Duration) -> Result<u64, ClientError> {
    let s: Synced = call(
        mountpoint,
        &Request::Sync {
            timeout_secs: timeout.as_secs_f64(),
        },
        Some(timeout + Duration::from_secs(10)),
    )?;
    Ok(s.generation)
}

/// Cuts a generation, waits until it is durable, and names it.
pub fn snapshot(
    mountpoint: &Path,
    name: &str,
    timeout: Duration,
) -> Result<owsfs_store::Snapshot, ClientError> {
    let s: Snapshotted = call(
        mountpoint,
        &Request::Snapshot {
            name: name.to_string(),
            timeout_secs: timeout.as_secs_f64(),
        },
        Some(timeout + Duration::from_secs(30)),
    )?;
    Ok(s.snapshot)
}

/// Rolls the mount back to `to` (a reference) and answers once the new tree is served.
pub fn rollback(
    mountpoint: &Path,
    to: &str,
    keep_snapshots: usize,
    timeout: Duration,
) -> Result<super::LiveRollback, ClientError> {
    let r: super::RolledBack = call(
        mountpoint,
        &Request::Rollback {
            to: to.to_string(),
            keep_snapshots,
            timeout_secs: timeout.as_secs_f64(),
        },
        Some(timeout + Duration::from_secs(60)),
    )?;
    Ok(r.rollback)
}

/// Unmounts; true when only detached (`lazy`).
pub fn unmount(mountpoint: &Path, lazy: bool) -> Result<bool, ClientError> {
    unmount_within(mountpoint, lazy, None)
}

/// [`unmount`], giving up on the answer after `timeout` (the handoff goes on in the daemon).
pub fn unmount_within(
    mountpoint: &Path,
    lazy: bool,
    timeout: Option<Duration>,
) -> Result<bool, ClientError> {
    let u: Unmounted = call(mountpoint, &Request::Unmount { lazy }, timeout)?;
    Ok(u.detached)
}

/// Asks the daemon to hand the connection to a new one; returns the pid of the one that
/// answered, which exits next.
pub fn restart(mountpoint: &Path) -> Result<u32, ClientError> {
    let r: super::Restarting = call(
        mountpoint,
        &Request::Restart {},
        Some(Duration::from_secs(60)),
    )?;
    Ok(r.restarting)
}

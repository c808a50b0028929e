//! The control protocol of a running daemon: `CACHE/control.sock`, JSON over HTTP ([`http`];
//! what the commands speak), or one JSON request line and one JSON response line per
//! connection (the older form, still served). The daemon serves it (`crate::mount::server`);
//! commands reach it through [`client`].
//!
//! Requests: `{"cmd":"status","dirty":bool}`, `{"cmd":"sync","timeout_secs":f64}`,
//! `{"cmd":"snapshot","name":str,"timeout_secs":f64}`,
//! `{"cmd":"rollback","to":str,"keep_snapshots":int,"timeout_secs":f64}`,
//! `{"cmd":"unmount","lazy":bool}`. Responses carry `"ok"`: the answer when true; when false,
//! the message (`"error"`) and a typed [`ControlError`] (`"kind"`, `"detail"`).

pub mod client;
pub mod http;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A request to the daemon.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// The state of the mount; with `dirty`, the journal's dirty set too.
    Status {
        #[serde(default)]
        dirty: bool,
    },
    /// Answer once everything written before the request is durable in the store.
    Sync {
        #[serde(default = "default_sync_timeout")]
        timeout_secs: f64,
    },
    /// Cut a generation, wait until it is durable, and name it (a snapshot).
    Snapshot {
        name: String,
        #[serde(default = "default_sync_timeout")]
        timeout_secs: f64,
    },
    /// Roll the mount back to generation `to` (a reference: number, snapshot, time): a new
    /// generation with its tree, visible at once, after an automatic snapshot of the state
    /// it replaces (older automatic ones beyond `keep_snapshots` roll off).
    Rollback {
        to: String,
        #[serde(default = "default_keep_snapshots")]
        keep_snapshots: usize,
        #[serde(default = "default_sync_timeout")]
        timeout_secs: f64,
    },
    /// Unmount (and hand off); `lazy`: detach now, finish when the last file is closed.
    Unmount {
        #[serde(default)]
        lazy: bool,
    },
    /// Replace the serving daemon with a new one (the binary now at its path) on the same
    /// connection, without unmounting: requests wait meanwhile. Only under a supervisor.
    Restart {},
}

fn default_sync_timeout() -> f64 {
    300.0
}

fn default_keep_snapshots() -> usize {
    5
}

/// The daemon's answer to a [`Request`].
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Response {
    Ok(Answer),
    Err(Failure),
}

/// A successful answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Answer {
    Status(Box<Status>),
    Synced(Synced),
    /// Before `Unmounted`, whose fields all have defaults.
    Snapshotted(Box<Snapshotted>),
    RolledBack(RolledBack),
    Restarting(Restarting),
    Unmounted(Unmounted),
}

/// A refused request: `{"ok": false, "error": "<message>", "kind": ..., "detail": ...}`.
/// `error` is the message for a person (and for clients that do not know the kind).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Failure {
    pub ok: False,
    #[serde(default, rename = "error")]
    pub message: Option<String>,
    #[serde(flatten)]
    pub error: ControlError,
}

/// `"ok": true` on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct True;

/// `"ok": false` on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct False;

macro_rules! const_bool {
    ($t:ident, $v:literal) => {
        impl Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_bool($v)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                match bool::deserialize(d)? {
                    $v => Ok($t),
                    _ => Err(serde::de::Error::custom(concat!("expected ok = ", $v))),
                }
            }
        }
    };
}
const_bool!(True, true);
const_bool!(False, false);

/// Why the daemon refused or could not do a request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "kind", content = "detail", rename_all = "snake_case")]
pub enum ControlError {
    /// The unmount was refused: a process has a file open or its working directory inside.
    #[error(
        "{} is busy (a process has a file open or its working directory inside); close it, \
         or use `owsfs unmount --lazy` to detach now and finish when it closes",
        .0.display()
    )]
    Busy(PathBuf),
    /// `sync` did not become durable in time.
    #[error("not durable after {secs:.1}s: {why}")]
    NotDurable { secs: f64, why: String },
    /// The mount is shutting down; the request cannot be served any more.
    #[error("the mount is shutting down")]
    ShuttingDown,
    /// The session ended, but the workspace was not handed off.
    #[error("{0}")]
    Unmount(String),
    /// The request could not be parsed.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// Anything else, with its message.
    #[error("{0}")]
    Other(String),
}

impl Response {
    pub fn ok(a: Answer) -> Response {
        Response::Ok(a)
    }

    pub fn err(e: ControlError) -> Response {
        Response::Err(Failure {
            ok: False,
            message: Some(e.to_string()),
            error: e,
        })
    }
}

/// `owsfs sync`'s answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Synced {
    pub ok: True,
    /// The newest durable generation: it holds everything written before the request.
    pub generation: u64,
}

/// `owsfs snapshot create`'s answer on a mount.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Snapshotted {
    pub ok: True,
    pub snapshot: owsfs_store::Snapshot,
}

/// `owsfs rollback MOUNTPOINT REF`'s answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RolledBack {
    pub ok: True,
    pub rollback: LiveRollback,
}

/// What a live rollback did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LiveRollback {
    /// The new generation, holding `to`'s tree.
    pub generation: u64,
    pub to: u64,
    /// The automatic snapshot of the state it replaced (undo: roll back to it).
    pub snapshot: Option<String>,
    /// From holding kernel requests back until the new tree was served, in ms (before it,
    /// everything written was made durable while writers went on).
    pub visible_ms: f64,
    /// The whole rollback, that first sync included, in ms.
    pub total_ms: f64,
}

/// `owsfs unmount`'s answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Unmounted {
    pub ok: True,
    /// Only detached (`--lazy`): the session ends when the last file is closed.
    #[serde(default)]
    pub detached: bool,
}

/// The answer to a restart: the daemon that answers (pid `restarting`) exits next, and its
/// supervisor starts the next one.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Restarting {
    pub ok: True,
    pub restarting: u32,
}

/// The supervisor of a mount (`src/mount/supervisor.rs`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Supervision {
    /// The supervisor's pid: it holds the kernel connection.
    pub pid: u32,
    /// Which daemon of the connection answers (0 for the one that mounted): each death or
    /// restart counts one.
    pub daemon: u16,
}

/// The version of the status document (docs/status.md): raised when a field is removed or
/// changes meaning; new fields do not raise it.
pub const STATUS_SCHEMA: u32 = 1;

/// `owsfs status`'s answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub ok: True,
    /// [`STATUS_SCHEMA`] of the daemon that wrote it (0: a daemon from before the schema).
    #[serde(default)]
    pub schema: u32,
    pub mountpoint: PathBuf,
    pub cache: PathBuf,
    pub backing: PathBuf,
    pub pid: u32,
    /// The supervisor, for a mount that has one (a background writer's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supervisor: Option<Supervision>,
    pub uptime_secs: f64,
    pub passthrough: bool,
    /// Requests served through FUSE over io_uring (`-o uring=`); None: through /dev/fuse.
    #[serde(default)]
    pub io_uring: Option<u64>,
    pub inodes: usize,
    pub inode_budget: usize,
    pub open_files: usize,
    pub journal: owsfs_journal::JournalStats,
    pub recovery: owsfs_journal::Recovery,
    pub ops: owsfs_fuse::StatsSnapshot,
    /// Log lines the daemon could not write (its log's file system full).
    #[serde(default)]
    pub log_lines_dropped: u64,
    /// A read-only mount (`--read-only`, `--at`): the generation it shows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only_at: Option<u64>,
    /// Where `--metrics` serves (`HOST:PORT`), if it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<String>,
    pub sync: SyncStatus,
    /// The journal's dirty set, when asked for (files with their extents, directories).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty: Option<serde_json::Value>,
}

/// The store side of the status: the agent, the lease, the hydration.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SyncStatus {
    #[serde(flatten)]
    pub agent: owsfs_sync::AgentStatus,
    pub lease: owsfs_sync::lease::LeaseStatus,
    pub hydration: owsfs_hydrate::Progress,
    /// The newest drill of the workspace (`owsfs drill`, `--drill-every`), as last read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drill: Option<owsfs_store::drill::DrillRecord>,
    /// The daemon's last GC (`--gc-every`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gc: Option<crate::mount::upkeep::GcOutcome>,
}

impl Status {
    /// Whether the mount stopped taking writes (fail-stop), and why.
    pub fn writes_stopped(&self) -> Option<&str> {
        self.sync.agent.writes_stopped.as_deref()
    }
}

/// Unix socket paths are limited to ~108 bytes; reaching the socket through an open
/// descriptor of its directory keeps the path short whatever the cache path is.
pub fn short_socket_path(dir: &Path) -> std::io::Result<(std::os::fd::OwnedFd, PathBuf)> {
    use std::os::fd::AsFd;
    let fd = owsfs_sys::fs::open_path(
        rustix::fs::CWD,
        dir,
        rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
    )?;
    // Elsewhere than Linux the descriptor's path is the directory's own, as long as it is.
    let path = owsfs_sys::fs::fd_path(fd.as_fd())?.join("control.sock");
    Ok((fd, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_keep_their_wire_form() {
        let r: Request = serde_json::from_str(r#"{"cmd":"unmount","lazy":true}"#).unwrap();
        assert_eq!(r, Request::Unmount { lazy: true });
        let r: Request = serde_json::from_str(r#"{"cmd":"status"}"#).unwrap();
        assert_eq!(r, Request::Status { dirty: false });
        assert_eq!(
            serde_json::to_string(&Request::Sync { timeout_secs: 2.0 }).unwrap(),
            r#"{"cmd":"sync","timeout_secs":2.0}"#
        );
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"reboot"}"#).is_err());
    }

    #[test]
    fn errors_travel_typed() {
        let e = Response::err(ControlError::Busy(PathBuf::from("/w")));
        let wire = serde_json::to_string(&e).unwrap();
        assert!(wire.contains(r#""ok":false"#), "{wire}");
        assert!(
            wire.contains(r#""error":"/w is busy"#),
            "the message travels too: {wire}"
        );
        match serde_json::from_str::<Response>(&wire).unwrap() {
            Response::Err(f) => assert_eq!(f.error, ControlError::Busy(PathBuf::from("/w"))),
            other => panic!("{other:?}"),
        }
        let ok = serde_json::to_string(&Response::ok(Answer::Synced(Synced {
            ok: True,
            generation: 7,
        })))
        .unwrap();
        assert_eq!(ok, r#"{"ok":true,"generation":7}"#);
        match serde_json::from_str::<Response>(&ok).unwrap() {
            Response::Ok(Answer::Synced(s)) => assert_eq!(s.generation, 7),
            other => panic!("{other:?}"),
        }
    }
}

//! The mutations the daemon journals.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::serde_path;

/// The inode number records name: the kernel's (FUSE) number, stable across daemon restarts
/// (see [`InoMap`](crate::InoMap) for how it relates to the backing file system's).
pub type Ino = crate::ino::FuseIno;
/// Record sequence number: strictly increasing over the life of a journal.
pub type Seq = u64;

/// Kind of node made by [`Op::Create`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeKind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

impl NodeKind {
    /// On-disk code (see FORMAT.md).
    pub(crate) fn code(self) -> u8 {
        match self {
            NodeKind::File => 0,
            NodeKind::Dir => 1,
            NodeKind::Symlink => 2,
            NodeKind::Fifo => 3,
            NodeKind::Socket => 4,
            NodeKind::CharDev => 5,
            NodeKind::BlockDev => 6,
        }
    }

    pub(crate) fn from_code(code: u8) -> Option<NodeKind> {
        Some(match code {
            0 => NodeKind::File,
            1 => NodeKind::Dir,
            2 => NodeKind::Symlink,
            3 => NodeKind::Fifo,
            4 => NodeKind::Socket,
            5 => NodeKind::CharDev,
            6 => NodeKind::BlockDev,
            _ => return None,
        })
    }
}

/// One journaled mutation. Records are *intents*: the daemon appends the record, then performs
/// the operation, so an op in the journal may not have happened (it failed, or the daemon died
/// first). The dirty state built from ops is therefore a superset of what changed.
///
/// Paths are relative to the workspace root, without a leading '/'; the root is "".
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// First mutation of a file in this window: where it lives (None: unlinked).
    Touch {
        ino: Ino,
        #[serde(serialize_with = "serde_path::opt_path")]
        path: Option<PathBuf>,
    },
    /// mknod/create/mkdir/symlink at `path`.
    Create {
        ino: Ino,
        kind: NodeKind,
        #[serde(serialize_with = "serde_path::path")]
        path: PathBuf,
    },
    /// unlink (dir=false) or rmdir (dir=true) of `path`.
    Remove {
        ino: Ino,
        #[serde(serialize_with = "serde_path::path")]
        path: PathBuf,
        dir: bool,
    },
    /// rename(2)/renameat2; exchange = RENAME_EXCHANGE.
    Rename {
        #[serde(serialize_with = "serde_path::path")]
        from: PathBuf,
        #[serde(serialize_with = "serde_path::path")]
        to: PathBuf,
        exchange: bool,
    },
    /// link(2): new name `path` for existing `ino`.
    Link {
        ino: Ino,
        #[serde(serialize_with = "serde_path::path")]
        path: PathBuf,
    },
    /// Content of [offset, offset+len) may have changed (write, fallocate, punch hole,
    /// copy_file_range dst).
    Write { ino: Ino, offset: u64, len: u64 },
    /// truncate/ftruncate/O_TRUNC to `size`.
    Truncate { ino: Ino, size: u64 },
    /// chmod/chown/utimens/xattr change. `dir` is Some(path) when the inode is a directory.
    Meta {
        ino: Ino,
        #[serde(serialize_with = "serde_path::opt_path")]
        dir: Option<PathBuf>,
    },
    /// fsync/fdatasync of a file, fsyncdir of a directory: durability barrier, no state change.
    Fsync { ino: Ino },
    /// A name of a regular file with other names is about to go (unlink, or a rename over
    /// it): if the file is dirty, its other names are unknown to the state, so the next cut
    /// must look for them (a walk of the whole tree).
    Unplace { ino: Ino },
}

impl Op {
    /// Short lowercase name of the variant, for logs and statistics.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Touch { .. } => "touch",
            Op::Create { .. } => "create",
            Op::Remove { .. } => "remove",
            Op::Rename { .. } => "rename",
            Op::Link { .. } => "link",
            Op::Write { .. } => "write",
            Op::Truncate { .. } => "truncate",
            Op::Meta { .. } => "meta",
            Op::Fsync { .. } => "fsync",
            Op::Unplace { .. } => "unplace",
        }
    }

    /// The inode the op is about, if it names one (Rename names paths only).
    pub fn ino(&self) -> Option<Ino> {
        match self {
            Op::Touch { ino, .. }
            | Op::Create { ino, .. }
            | Op::Remove { ino, .. }
            | Op::Link { ino, .. }
            | Op::Write { ino, .. }
            | Op::Truncate { ino, .. }
            | Op::Meta { ino, .. }
            | Op::Fsync { ino }
            | Op::Unplace { ino } => Some(*ino),
            Op::Rename { .. } => None,
        }
    }
}

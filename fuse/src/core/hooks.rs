//! What operations call before they serve or change bytes: lazy hydration (entries and bytes
//! still in the store are made local first) and copy-on-first-write (bytes a running cut
//! still has to read are saved before they change).

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::AsFd;

use owsfs_journal::{BackingIno, FuseIno, NodeKind};
use rustix::fs::{AtFlags, OFlags};

use super::Core;
use crate::error::{Context, FsError, FsResult};
use crate::hydrate::Hydrate;
use crate::inode::Inode;
use crate::kind;

impl Core {
    pub(super) fn hyd(&self) -> Option<&dyn Hydrate> {
        self.hydrate
            .get()
            .map(|h| h.as_ref())
            .filter(|h| h.active())
    }

    /// Lazy hydration: the entries of directory `dir` exist in the backing directory. Called
    /// before the operation takes the barrier (materializing takes it shared).
    pub(super) fn materialize(&self, dir: &Inode) -> FsResult<()> {
        let Some(h) = self.hyd() else {
            return Ok(());
        };
        if dir.kind != NodeKind::Dir {
            return Ok(());
        }
        let bino = self.inodes.backing_ino(dir.ino);
        if !h.dir_pending(bino) {
            return Ok(());
        }
        let _barrier = self.barrier.read();
        h.materialize(bino, dir.fd.as_fd())
            .map_err(|e| FsError::io("materialize a directory from the store", e))
    }

    /// [`Core::materialize`] for the directory `name` in `dir`, if it is one (before it is
    /// removed or replaced: an unmaterialized directory looks empty).
    pub(super) fn materialize_child(&self, dir: &Inode, name: &OsStr) -> FsResult<()> {
        let Some(h) = self.hyd() else {
            return Ok(());
        };
        let Ok(st) = rustix::fs::statat(&dir.fd, name, AtFlags::SYMLINK_NOFOLLOW) else {
            return Ok(());
        };
        if kind::of_mode(st.st_mode) != NodeKind::Dir || !h.dir_pending(BackingIno(st.st_ino)) {
            return Ok(());
        }
        let fd = owsfs_sys::fs::open_path(
            &dir.fd,
            name,
            OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        )
        .ctx("open a directory to materialize")?;
        let _barrier = self.barrier.read();
        h.materialize(BackingIno(st.st_ino), fd.as_fd())
            .map_err(|e| FsError::io("materialize a directory from the store", e))
    }

    /// Lazy hydration: bytes `[start, end)` of file `ino` are local.
    pub(super) fn fetch(&self, ino: FuseIno, start: u64, end: u64) -> FsResult<()> {
        let Some(h) = self.hyd() else {
            return Ok(());
        };
        if start >= end {
            return Ok(());
        }
        h.fetch(self.inodes.backing_ino(ino), start, end)
            .map_err(|e| FsError::io("fetch file content from the store", e))
    }

    /// Before a truncate to `size` of a file the running cut has frozen: the bytes it drops
    /// are saved for the cut, so they must be local (rare: truncating a file that is both
    /// being uploaded and not yet fetched).
    pub(super) fn fetch_if_frozen(&self, ino: FuseIno, size: u64) -> FsResult<()> {
        if self.hyd().is_some()
            && !self.whole(ino)
            && self.freezer.is_frozen(self.inodes.backing_ino(ino))
        {
            self.fetch(ino, size, u64::MAX)?;
        }
        Ok(())
    }

    /// File `ino` is whole: no byte of it is still only in the store.
    pub(super) fn whole(&self, ino: FuseIno) -> bool {
        self.hyd()
            .is_none_or(|h| h.whole(self.inodes.backing_ino(ino)))
    }

    /// Lazy hydration: file `ino` is truncated to `size` next.
    pub(super) fn hyd_truncate(&self, ino: FuseIno, size: u64) {
        if let Some(h) = self.hyd() {
            h.truncate(self.inodes.backing_ino(ino), size);
        }
    }

    /// The name `name` in `dir` goes away next (unlink, or replaced by a rename): if it is the
    /// last name of a file, lazy hydration forgets it.
    pub(super) fn hyd_removing(&self, st: &rustix::fs::Stat) {
        if let Some(h) = self.hyd()
            && kind::of_mode(st.st_mode) == NodeKind::File
            && st.st_nlink <= 1
        {
            h.removed(BackingIno(st.st_ino));
        }
    }

    /// Copy-on-first-write before `[start, end)` of `ino` changes.
    pub(super) fn freeze_before_change(
        &self,
        ino: FuseIno,
        start: u64,
        end: u64,
        inode: &Inode,
    ) -> FsResult<()> {
        self.freezer
            .before_change(self.inodes.backing_ino(ino), start, end, || {
                self.reopen(inode, OFlags::RDONLY | OFlags::CLOEXEC)
                    .map_err(|e| std::io::Error::from_raw_os_error(e.to_errno()))
            })
            .ctx("save bytes of a frozen file")
    }

    /// Copy-on-first-write through an open descriptor of the file (which may be write-only,
    /// so the bytes are read through a fresh read-only open of the same file).
    pub(super) fn freeze_before_change_fd(
        &self,
        ino: FuseIno,
        start: u64,
        end: u64,
        file: &File,
    ) -> FsResult<()> {
        self.freezer
            .before_change(self.inodes.backing_ino(ino), start, end, || {
                self.reopen_fd(file.as_fd(), OFlags::RDONLY | OFlags::CLOEXEC)
                    .map(File::from)
                    .map_err(std::io::Error::from)
            })
            .ctx("save bytes of a frozen file")
    }
}

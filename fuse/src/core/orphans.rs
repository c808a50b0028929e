//! Files removed while open, kept for the daemon after this one.
//!
//! A file removed while a program has it open lives on in the backing filesystem only as long
//! as a descriptor of it does: the daemon's. When the daemon dies, the kernel's connection (and
//! the program's open file) lives on under the supervisor, but the backing inode would be
//! freed with the dead daemon's descriptors, and the program's next read lose its data. So a
//! removal of the last name of a file that is open is a rename into the orphanage
//! (`CACHE/orphans`, named by inode number, outside the workspace: no cut sees it, and the
//! journal records the removal as usual); the name goes when the last open of the file closes.
//! A daemon that takes over the connection opens such a file again by handle, like any other,
//! and leaves its name for the next mount of the cache, which empties the orphanage: it cannot
//! know how many opens the dead daemon left.

use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;
use owsfs_journal::{FuseIno, NodeKind};
use rustix::fs::{AtFlags, OFlags};

use super::Core;
use crate::error::{Context, FsError, FsResult};
use crate::inode::Inode;

/// The orphanage: its directory and the inodes named in it.
pub(super) struct Orphanage {
    dir: OwnedFd,
    /// Orphans by inode number; true for one an earlier daemon made (its name stays until the
    /// next mount: the opens of it are not all known).
    names: DashMap<FuseIno, bool>,
    /// `names.len()`, read without locks on every attribute reply.
    count: AtomicUsize,
}

fn name_of(ino: FuseIno) -> String {
    ino.0.to_string()
}

impl Orphanage {
    /// Opens the orphanage at `path`, emptied for a new connection (`inherit` false), or with
    /// the orphans an earlier daemon of this connection left.
    pub(super) fn open(path: &Path, inherit: bool) -> FsResult<Orphanage> {
        match std::fs::create_dir(path) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(FsError::io("create the orphanage", e));
            }
            _ => {}
        }
        let names = DashMap::new();
        for entry in std::fs::read_dir(path).map_err(|e| FsError::io("list the orphanage", e))? {
            let entry = entry.map_err(|e| FsError::io("list the orphanage", e))?;
            match entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u64>().ok())
            {
                Some(ino) if inherit => {
                    names.insert(FuseIno(ino), true);
                }
                _ => {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        let dir =
            owsfs_sys::fs::open_path(rustix::fs::CWD, path, OFlags::DIRECTORY | OFlags::CLOEXEC)
                .ctx("open the orphanage")?;
        let count = AtomicUsize::new(names.len());
        Ok(Orphanage { dir, names, count })
    }
}

impl Core {
    /// Removes `name` (file inode `ino`, stat `st`) from `dir`: by moving it into the
    /// orphanage when it is the file's last name and the file is open (or was opened by an
    /// earlier daemon), else by unlinking it.
    pub(super) fn unlink_file(
        &self,
        dir: &Inode,
        name: &OsStr,
        ino: FuseIno,
        st: &rustix::fs::Stat,
    ) -> FsResult<()> {
        let moved = self.keep_orphan(ino, st, |o| {
            rustix::fs::renameat(&dir.fd, name, &o.dir, name_of(ino))
        });
        if moved {
            return Ok(());
        }
        rustix::fs::unlinkat(&dir.fd, name, AtFlags::empty()).ctx("remove")
    }

    /// Before a rename replaces `name` in `dir` (file inode `ino`, stat `st`): keeps the file
    /// in the orphanage if the name is its last and it is open. Returns what to undo should
    /// the rename fail ([`Core::unkeep`]).
    pub(super) fn keep_replaced(
        &self,
        dir: &Inode,
        name: &OsStr,
        ino: FuseIno,
        st: &rustix::fs::Stat,
    ) -> Option<FuseIno> {
        self.keep_orphan(ino, st, |o| {
            rustix::fs::linkat(&dir.fd, name, &o.dir, name_of(ino), AtFlags::empty())
        })
        .then_some(ino)
    }

    /// Names file `ino` (stat `st`) in the orphanage with `keep` if its last name is going
    /// while it is open (or was opened by an earlier daemon). The inode's open counts stay
    /// locked meanwhile, so that no open or close slips between the check and the naming.
    /// False when it is not kept (not open, or `keep` failed: another file system, for an
    /// adopted directory).
    fn keep_orphan(
        &self,
        ino: FuseIno,
        st: &rustix::fs::Stat,
        keep: impl FnOnce(&Orphanage) -> rustix::io::Result<()>,
    ) -> bool {
        let Some(o) = &self.orphans else {
            return false;
        };
        let inode = match self.inodes.get(ino) {
            Some(inode) => inode,
            // A file an earlier daemon handed out may be open through it although no request
            // of this daemon named it yet (a program unlinks by a name the kernel still had):
            // opened again, it counts as opened by that daemon. Left out, its last name would
            // go with no descriptor holding it, the backing inode (and its number) would be
            // freed, and the program's writes would reach whatever file took the number.
            None if self.inodes.successor_handle(ino).is_some() => match self.revive(ino) {
                Ok(inode) => inode,
                Err(_) => return false,
            },
            None => return false,
        };
        if st.st_nlink != 1 || inode.kind != NodeKind::File {
            return false;
        }
        let open = inode.open.lock();
        if open.cached + open.passthrough == 0 && !inode.is_revived() {
            return false;
        }
        match keep(o) {
            Ok(()) => {
                adopt_orphan(o, ino, inode.is_revived());
                true
            }
            Err(e) => {
                tracing::debug!("orphan {ino} not kept: {e}");
                false
            }
        }
    }

    /// An unnamed file (`O_TMPFILE`), open: named in the orphanage until its last close or a
    /// link names it, so that the daemon's death does not free it.
    pub(super) fn keep_unnamed(&self, inode: &Inode) {
        let Some(o) = &self.orphans else { return };
        match owsfs_sys::fs::link_fd(&inode.fd, &o.dir, name_of(inode.ino).as_str()) {
            Ok(()) => adopt_orphan(o, inode.ino, false),
            Err(e) => tracing::debug!("unnamed file {} not kept: {e}", inode.ino),
        }
    }

    /// The rename [`Core::keep_replaced`] prepared for failed: the file keeps its name, and
    /// its orphan name goes.
    pub(super) fn unkeep(&self, ino: FuseIno) {
        if let Some(o) = &self.orphans {
            drop_orphan(o, ino);
        }
    }

    /// The last open of `inode` closed: an orphan of this daemon goes (one an earlier daemon
    /// opened waits for the kernel to forget it: its opens are not all known).
    pub(super) fn orphan_closed(&self, inode: &Inode) {
        let Some(o) = &self.orphans else { return };
        if o.count.load(Ordering::Relaxed) == 0 {
            return;
        }
        let open = inode.open.lock();
        if open.cached + open.passthrough == 0 && o.names.get(&inode.ino).is_some_and(|e| !*e) {
            drop_orphan(o, inode.ino);
        }
    }

    /// The kernel forgot `inode`: no file of it is open, so its orphan name goes.
    pub(super) fn orphan_forgotten(&self, inode: &Inode) {
        let Some(o) = &self.orphans else { return };
        if o.count.load(Ordering::Relaxed) == 0 {
            return;
        }
        let open = inode.open.lock();
        if open.cached + open.passthrough == 0 {
            drop_orphan(o, inode.ino);
        }
    }

    /// Whether inode `ino` is an orphan (its one name is in the orphanage, which the
    /// workspace does not show).
    pub(super) fn is_orphan(&self, ino: FuseIno) -> bool {
        self.orphans
            .as_ref()
            .is_some_and(|o| o.count.load(Ordering::Relaxed) > 0 && o.names.contains_key(&ino))
    }
}

/// Records orphan `ino`; `earlier`: its opens are not all known (an inode an earlier daemon
/// handed out), so only the kernel's FORGET ends it.
fn adopt_orphan(o: &Orphanage, ino: FuseIno, earlier: bool) {
    if o.names.insert(ino, earlier).is_none() {
        o.count.fetch_add(1, Ordering::Relaxed);
    }
}

/// Removes orphan `ino`'s name, if it has one.
fn drop_orphan(o: &Orphanage, ino: FuseIno) {
    if o.names.remove(&ino).is_some() {
        o.count.fetch_sub(1, Ordering::Relaxed);
        if let Err(e) = rustix::fs::unlinkat(&o.dir, name_of(ino), AtFlags::empty()) {
            tracing::warn!("orphan {ino} not removed: {e}");
        }
    }
}

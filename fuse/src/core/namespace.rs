//! Names: lookup and forget, the create family (mknod, mkdir, symlink, create), unlink,
//! rmdir, rename and link.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

use owsfs_journal::{BackingIno, FuseIno, NodeKind, Op};
use rustix::fs::{AtFlags, Mode, OFlags, RenameFlags};

use super::data::{Handle, backing_open_flags, writable};
use super::{Caller, Core, Entry};
use crate::error::{Context, FsError, FsResult};
use crate::inode::Inode;
use crate::kind;

impl Core {
    /// Resolves `name` in `parent` and counts a kernel reference to the result.
    pub fn lookup(&self, parent: FuseIno, name: &OsStr) -> FsResult<Entry> {
        self.stats.count(&self.stats.lookups);
        // The kernel asks for "." and ".." only to decode file handles (FUSE_EXPORT_SUPPORT).
        match name.as_bytes() {
            b"." => return self.lookup_by_handle(parent),
            b".." => return self.lookup_parent(parent),
            _ => {}
        }
        let dir = self.inode(parent)?;
        self.materialize(&dir)?;
        self.lookup_in(&dir, name)
    }

    pub(super) fn lookup_in(&self, dir: &Inode, name: &OsStr) -> FsResult<Entry> {
        self.lookup_waiting(dir, name, true)
    }

    /// `lookup_in`; at the inode budget it waits for room (up to a second) only if `wait`.
    pub(super) fn lookup_waiting(&self, dir: &Inode, name: &OsStr, wait: bool) -> FsResult<Entry> {
        check_name(name)?;
        let st = rustix::fs::statat(&dir.fd, name, AtFlags::SYMLINK_NOFOLLOW).ctx("lookup")?;
        let ino = self.ino_of(&st);
        if let Some(generation) = self.inodes.reference_existing(ino, dir.ino, name) {
            return Ok(Entry {
                attr: self.attr(&st),
                generation,
            });
        }
        if wait {
            self.wait_for_inode_room();
        }
        self.lookup_new(dir, name)
    }

    /// "." of inode `ino`: a file handle names it, and the kernel no longer holds it. It is
    /// opened again by the backing handle kept when the kernel forgot it; an inode the daemon
    /// never handed out (a forged handle), one of an earlier cache or daemon, or one removed
    /// since, is stale.
    fn lookup_by_handle(&self, ino: FuseIno) -> FsResult<Entry> {
        let stale = |why: &'static str| FsError::errno(libc::ESTALE, why);
        if let Some(inode) = self.inodes.get(ino).filter(|i| self.inodes.is_current(i)) {
            let st = rustix::fs::fstat(&inode.fd).ctx("lookup by handle")?;
            if let Some(generation) = self.inodes.reference_keep_loc(ino) {
                return Ok(Entry {
                    attr: self.attr(&st),
                    generation,
                });
            }
        }
        let handle = self
            .inodes
            .forgotten_handle(ino)
            .or_else(|| self.inodes.revivable_handle(ino))
            .ok_or_else(|| stale("file handle of an inode the daemon did not hand out"))?;
        let (fd, st) = self.open_backing_handle(ino, &handle)?;
        let inode = self
            .inodes
            .reference(ino, kind::of_mode(st.st_mode), fd, None);
        Ok(Entry {
            attr: self.attr(&st),
            generation: inode.generation,
        })
    }

    /// An inode the kernel refers to that an earlier daemon of the connection handed out (it
    /// died or was replaced): opened again by the backing handle it left in the node log,
    /// and back in the table. ESTALE for any other, and for one removed since.
    pub(super) fn revive(&self, ino: FuseIno) -> FsResult<Arc<Inode>> {
        // A handle this daemon kept when the kernel forgot the inode is the newer: a FORGET
        // of a node an earlier daemon handed out may have taken the count of a file that got
        // its number since, while the kernel holds that file.
        let handle = self
            .inodes
            .successor_handle(ino)
            .ok_or_else(|| FsError::errno(libc::ESTALE, "inode not known"))?;
        let (fd, st) = self.open_backing_handle(ino, &handle).inspect_err(|e| {
            tracing::info!("inode {ino} of an earlier daemon cannot be opened again: {e}");
        })?;
        tracing::debug!("inode {ino} of an earlier daemon opened again");
        Ok(self.inodes.revive(ino, kind::of_mode(st.st_mode), fd))
    }

    /// Opens inode `ino` by its backing handle, within the inode budget; ESTALE for an inode
    /// removed since, or outside the tree.
    fn open_backing_handle(
        &self,
        ino: FuseIno,
        handle: &[u8],
    ) -> FsResult<(std::os::fd::OwnedFd, rustix::fs::Stat)> {
        let stale = |why: &'static str| FsError::errno(libc::ESTALE, why);
        // open_by_handle_at takes no O_PATH descriptor for the filesystem.
        let root = self.inode(crate::ROOT_INO)?;
        let root = self
            .reopener
            .reopen(
                root.fd.as_fd(),
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .ctx("open the backing root")?;
        self.admit_new_inode()?;
        let fd = match owsfs_local::handle::open(root.as_fd(), handle, owsfs_sys::fs::O_PATH_RAW) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ESTALE) => {
                return Err(stale("file handle of a removed inode"));
            }
            // EPERM: a daemon without CAP_DAC_READ_SEARCH; EMFILE, ENOMEM: passing.
            Err(e) => return Err(FsError::io("open by file handle", e)),
        };
        let st = rustix::fs::fstat(&fd).ctx("lookup by handle")?;
        // An unlinked inode that something still holds open stays openable by handle; a
        // directory must still be in the tree.
        let is_dir = kind::of_mode(st.st_mode) == NodeKind::Dir;
        if st.st_dev != self.root_dev
            || self.ino_of(&st) != ino
            || st.st_nlink == 0
            || (is_dir && self.backing_path_of_dir(&fd).is_none())
        {
            return Err(stale("file handle of a removed inode"));
        }
        Ok((fd, st))
    }

    /// ".." of directory `ino` (to reconnect a directory decoded from a file handle).
    fn lookup_parent(&self, ino: FuseIno) -> FsResult<Entry> {
        let dir = self.inode(ino)?;
        if dir.kind != NodeKind::Dir {
            return Err(FsError::errno(libc::ENOTDIR, "lookup of .."));
        }
        if ino == crate::ROOT_INO {
            return self.lookup_by_handle(ino);
        }
        let st = rustix::fs::statat(&dir.fd, "..", AtFlags::SYMLINK_NOFOLLOW).ctx("lookup ..")?;
        let parent = self.ino_of(&st);
        if let Some(generation) = self.inodes.reference_keep_loc(parent) {
            return Ok(Entry {
                attr: self.attr(&st),
                generation,
            });
        }
        self.admit_new_inode()?;
        let fd = owsfs_sys::fs::open_path(&dir.fd, "..", OFlags::DIRECTORY | OFlags::CLOEXEC)
            .ctx("lookup ..")?;
        let st = rustix::fs::fstat(&fd).ctx("lookup ..")?;
        if self.backing_path_of_dir(&fd).is_none() {
            return Err(FsError::errno(
                libc::ESTALE,
                "lookup of .. outside the workspace",
            ));
        }
        let inode = self
            .inodes
            .reference(self.ino_of(&st), NodeKind::Dir, fd, None);
        Ok(Entry {
            attr: self.attr(&st),
            generation: inode.generation,
        })
    }

    /// Lookup of a name whose inode is not in the table yet (just created, or not seen).
    fn lookup_new(&self, dir: &Inode, name: &OsStr) -> FsResult<Entry> {
        self.admit_new_inode()?;
        let fd = owsfs_sys::fs::open_path(&dir.fd, name, OFlags::NOFOLLOW | OFlags::CLOEXEC)
            .ctx("lookup open")?;
        // The descriptor, not the earlier stat, says which inode we hold.
        let st = rustix::fs::fstat(&fd).ctx("lookup stat")?;
        if st.st_dev != self.root_dev {
            return Err(FsError::errno(
                libc::EXDEV,
                "entry is on another filesystem",
            ));
        }
        let ino = self.ino_of(&st);
        let inode =
            self.inodes
                .reference(ino, kind::of_mode(st.st_mode), fd, Some((dir.ino, name)));
        Ok(Entry {
            attr: self.attr(&st),
            generation: inode.generation,
        })
    }

    pub fn forget(&self, ino: FuseIno, n: u64) {
        if let Some(inode) = self.inodes.forget(ino, n) {
            // The kernel let go of the inode: no file of it is open any more, whichever daemon
            // opened it, so an orphan's name can go.
            self.orphan_forgotten(&inode);
        }
    }

    pub fn readlink(&self, ino: FuseIno) -> FsResult<Vec<u8>> {
        let inode = self.inode(ino)?;
        let target = rustix::fs::readlinkat(&inode.fd, c"", Vec::new()).ctx("readlink")?;
        Ok(target.into_bytes())
    }

    /// Runs `create` as the caller (fs uid/gid), so the backing filesystem applies ownership,
    /// setgid inheritance and permission rules itself; then records and looks up the result.
    /// `create` says whether it made the node (false: it found it there).
    ///
    /// The `Create` record can only follow the creation, since it names the new inode. If it
    /// cannot be written (a full disk), the node is removed again and the caller gets the
    /// journal's error: an operation the journal did not record must not stay performed
    /// (an unrecorded file could reuse the inode number of a file the last generation holds,
    /// and would then pass for that file).
    fn create_node(
        &self,
        parent: FuseIno,
        name: &OsStr,
        mode: Option<u32>,
        caller: Caller,
        create: impl FnOnce(&Inode) -> FsResult<bool>,
    ) -> FsResult<Entry> {
        check_name(name)?;
        self.wait_for_inode_room();
        let dir = self.inode(parent)?;
        self.materialize(&dir)?;
        let _barrier = self.mutation()?;
        let dir_path = self.path_of(parent).unwrap_or_default();
        // The new inode number is unknown until it exists: mark the parent first, so a crash
        // between the two records still leaves the new name dirty.
        self.journal.append(Op::Meta {
            ino: parent,
            dir: Some(dir_path.clone()),
        })?;
        // A default ACL of the directory decides the new node's mode (the backing filesystem
        // applies it, and the umask does not count); otherwise it is the caller's mode less
        // the caller's umask, exactly.
        let inherits = self.posix_acl_enabled() && has_default_acl(&dir);
        let made = {
            let _as_caller = CallerCreds::assume(caller, self.own_uid, self.own_gid);
            create(&dir)?
        };
        let recorded = (|| {
            let mut entry = self.lookup_new(&dir, name)?;
            if let Some(mode) = mode.map(|m| m & !caller.umask)
                && made
                && !inherits
            {
                entry = match self.exact_mode(entry, mode) {
                    Ok(entry) => entry,
                    Err((e, ino)) => {
                        self.inodes.forget(ino, 1);
                        return Err(e);
                    }
                };
            }
            if let Some(h) = self.hyd() {
                h.created(self.inodes.backing_ino(entry.ino()));
            }
            let record = self.journal.append(Op::Create {
                ino: entry.ino(),
                kind: kind::of_fuser(entry.attr.kind),
                path: dir_path.join(name),
            });
            if let Err(e) = record {
                // The kernel never learns of the entry: drop the reference lookup_new counted.
                self.inodes.forget(entry.ino(), 1);
                return Err(FsError::from(e));
            }
            Ok(entry)
        })();
        if recorded.is_err() && made {
            self.undo_create(&dir, name);
        }
        recorded
    }

    /// Gives a node just made exactly the permission bits of `mode`, which the kernel masked
    /// with the caller's umask already: the process's own umask (the embedding program's
    /// business, left alone here) may have taken more. One `chmod` in that case only. On an
    /// error, also returns the inode number, whose reference the caller must drop.
    fn exact_mode(&self, entry: Entry, mode: u32) -> Result<Entry, (FsError, FuseIno)> {
        let ino = entry.ino();
        let want = mode & 0o777;
        let perm = u32::from(entry.attr.perm);
        if perm & 0o777 == want {
            return Ok(entry);
        }
        (|| {
            let inode = self.inode(ino)?;
            // The set-id and sticky bits are what the file system made of the request.
            rustix::fs::chmodat(
                rustix::fs::CWD,
                Self::proc_path(&inode.fd).as_c_str(),
                Mode::from_raw_mode((perm & 0o7000) | want),
                AtFlags::empty(),
            )
            .ctx("set the mode of a new node")?;
            let st = rustix::fs::fstat(&inode.fd).ctx("stat a new node")?;
            Ok(Entry {
                attr: self.attr(&st),
                generation: entry.generation,
            })
        })()
        .map_err(|e| (e, ino))
    }

    /// Removes the node `name` in `dir` that `create_node` just made. Nothing else can have
    /// used the name since: the kernel holds the directory's lock for the whole creation,
    /// and the daemon is the only writer of the backing directory.
    fn undo_create(&self, dir: &Inode, name: &OsStr) {
        let flags = match rustix::fs::statat(&dir.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if kind::of_mode(st.st_mode) == NodeKind::Dir => AtFlags::REMOVEDIR,
            Ok(_) => AtFlags::empty(),
            Err(e) => {
                tracing::error!("cannot find {name:?} to undo its creation: {e}");
                return;
            }
        };
        if let Err(e) = rustix::fs::unlinkat(&dir.fd, name, flags) {
            tracing::error!(
                "cannot remove {name:?}, created while its journal record failed: {e}; the \
                 parent directory is marked dirty, so the next generation lists it"
            );
        }
    }

    pub fn mknod(
        &self,
        parent: FuseIno,
        name: &OsStr,
        mode: u32,
        rdev: u32,
        caller: Caller,
    ) -> FsResult<Entry> {
        self.stats.count(&self.stats.creates);
        let kind = rustix::fs::FileType::from_raw_mode(mode);
        self.create_node(parent, name, Some(mode), caller, |dir| {
            owsfs_sys::fs::mknodat(
                &dir.fd,
                name,
                kind,
                Mode::from_raw_mode(mode & 0o7777),
                rdev as u64,
            )
            .ctx("mknod")
            .map(|()| true)
        })
    }

    pub fn mkdir(
        &self,
        parent: FuseIno,
        name: &OsStr,
        mode: u32,
        caller: Caller,
    ) -> FsResult<Entry> {
        self.stats.count(&self.stats.creates);
        self.create_node(parent, name, Some(mode), caller, |dir| {
            rustix::fs::mkdirat(&dir.fd, name, Mode::from_raw_mode(mode & 0o7777))
                .ctx("mkdir")
                .map(|()| true)
        })
    }

    pub fn symlink(
        &self,
        parent: FuseIno,
        name: &OsStr,
        target: &Path,
        caller: Caller,
    ) -> FsResult<Entry> {
        self.stats.count(&self.stats.creates);
        self.create_node(parent, name, None, caller, |dir| {
            rustix::fs::symlinkat(target, &dir.fd, name)
                .ctx("symlink")
                .map(|()| true)
        })
    }

    /// Creates and opens an unnamed regular file in `parent` (`O_TMPFILE`). Its inode enters
    /// the table without a name, and nothing is journaled yet: an unnamed file is in no tree,
    /// and its writes are recorded as a nameless file's. `linkat(2)` may name it later
    /// ([`Core::link`] records it as created then); otherwise it goes with its last close.
    pub fn tmpfile(
        &self,
        parent: FuseIno,
        mode: u32,
        flags: i32,
        caller: Caller,
    ) -> FsResult<(Entry, Arc<Handle>, u64)> {
        self.stats.count(&self.stats.creates);
        let dir = self.inode(parent)?;
        if dir.kind != NodeKind::Dir {
            return Err(FsError::errno(libc::ENOTDIR, "tmpfile"));
        }
        self.wait_for_inode_room();
        let _barrier = self.mutation()?;
        let inherits = self.posix_acl_enabled() && has_default_acl(&dir);
        let want = if inherits { mode } else { mode & !caller.umask } & 0o7777;
        // Without O_EXCL, so that a link can name it: the kernel keeps the caller's O_EXCL
        // (a file that must stay unnamed) on its own inode.
        let oflags = backing_open_flags(flags) - OFlags::EXCL;
        let fd = {
            let _as_caller = CallerCreds::assume(caller, self.own_uid, self.own_gid);
            owsfs_sys::fs::open_tmpfile(&dir.fd, oflags, Mode::from_raw_mode(want))
                .map_err(|e| FsError::errno(e.raw_os_error(), "tmpfile"))?
        };
        let mut st = rustix::fs::fstat(&fd).ctx("tmpfile stat")?;
        if !inherits && st.st_mode & 0o777 != want & 0o777 {
            // The daemon's own umask took bits the caller asked for.
            rustix::fs::fchmod(&fd, Mode::from_raw_mode(want)).ctx("tmpfile mode")?;
            st = rustix::fs::fstat(&fd).ctx("tmpfile stat")?;
        }
        self.admit_new_inode()?;
        let path_fd = self.reopener.name_only(fd.as_fd()).ctx("tmpfile")?;
        let ino = self.ino_of(&st);
        if let Some(h) = self.hyd() {
            h.created(self.inodes.backing_ino(ino));
        }
        let inode = self.inodes.reference(ino, NodeKind::File, path_fd, None);
        let io = match self.reserve_mode(&inode, writable(flags), false) {
            Ok(io) => io,
            Err(e) => {
                self.inodes.forget(ino, 1);
                return Err(e);
            }
        };
        // Kept in the orphanage while open, so that the daemon's death does not free it.
        self.keep_unnamed(&inode);
        let (handle, fh) = self.insert_handle(&inode, File::from(fd), io);
        let entry = Entry {
            attr: self.attr(&st),
            generation: inode.generation,
        };
        Ok((entry, handle, fh))
    }

    /// Creates and opens a regular file.
    pub fn create(
        &self,
        parent: FuseIno,
        name: &OsStr,
        mode: u32,
        flags: i32,
        caller: Caller,
    ) -> FsResult<(Entry, Arc<Handle>, u64)> {
        self.stats.count(&self.stats.creates);
        let oflags = backing_open_flags(flags) | OFlags::CREATE;
        if flags & libc::O_TRUNC != 0
            && let Some(h) = self.hyd()
            && let Ok(dir) = self.inode(parent)
            && let Ok(st) = rustix::fs::statat(&dir.fd, name, AtFlags::SYMLINK_NOFOLLOW)
        {
            h.truncate(BackingIno(st.st_ino), 0);
        }
        let mut file = None;
        let entry = self.create_node(parent, name, Some(mode), caller, |dir| {
            let m = Mode::from_raw_mode(mode & 0o7777);
            // O_EXCL first, to know whether this call made the file (only then may a failed
            // journal record remove it again).
            let (fd, made) = match rustix::fs::openat(&dir.fd, name, oflags | OFlags::EXCL, m) {
                Ok(fd) => (fd, true),
                Err(rustix::io::Errno::EXIST) if !oflags.contains(OFlags::EXCL) => {
                    let fd = rustix::fs::openat(&dir.fd, name, oflags - OFlags::CREATE, m)
                        .ctx("create")?;
                    (fd, false)
                }
                Err(e) => return Err(FsError::errno(e.raw_os_error(), "create")),
            };
            file = Some(File::from(fd));
            Ok(made)
        })?;
        let file = file.ok_or_else(|| FsError::errno(libc::EIO, "create left no file"))?;
        let inode = self.inode(entry.ino())?;
        let mode = self.reserve_mode(&inode, writable(flags), !self.whole(entry.ino()))?;
        let (handle, fh) = self.insert_handle(&inode, file, mode);
        Ok((entry, handle, fh))
    }

    pub fn unlink(&self, parent: FuseIno, name: &OsStr) -> FsResult<()> {
        self.remove(parent, name, false)
    }

    pub fn rmdir(&self, parent: FuseIno, name: &OsStr) -> FsResult<()> {
        self.remove(parent, name, true)
    }

    fn remove(&self, parent: FuseIno, name: &OsStr, dir: bool) -> FsResult<()> {
        self.stats.count(&self.stats.removes);
        check_name(name)?;
        let pdir = self.inode(parent)?;
        self.materialize(&pdir)?;
        if dir {
            self.materialize_child(&pdir, name)?;
        }
        let _barrier = self.mutation()?;
        let st = rustix::fs::statat(&pdir.fd, name, AtFlags::SYMLINK_NOFOLLOW).ctx("remove")?;
        let ino = self.ino_of(&st);
        if !dir && keeps_other_names(&st) {
            self.journal.append(Op::Unplace { ino })?;
        }
        self.journal.append(Op::Remove {
            ino,
            path: self.child_path(parent, name),
            dir,
        })?;
        self.freezer
            .before_name_change(&pdir.fd, name, false)
            .ctx("pin a frozen file")?;
        if dir {
            rustix::fs::unlinkat(&pdir.fd, name, AtFlags::REMOVEDIR).ctx("remove")?;
        } else {
            self.unlink_file(&pdir, name, ino, &st)?;
        }
        if !dir {
            self.hyd_removing(&st);
        }
        if let Some(child) = self.inodes.get(ino) {
            child.clear_loc_if(parent, name);
        }
        Ok(())
    }

    pub fn rename(
        &self,
        parent: FuseIno,
        name: &OsStr,
        newparent: FuseIno,
        newname: &OsStr,
        flags: u32,
    ) -> FsResult<()> {
        self.stats.count(&self.stats.renames);
        check_name(name)?;
        check_name(newname)?;
        let known = owsfs_sys::fs::RENAME_NOREPLACE | owsfs_sys::fs::RENAME_EXCHANGE;
        if flags & !known != 0 {
            return Err(FsError::errno(libc::EINVAL, "unsupported rename flags"));
        }
        let exchange = flags & owsfs_sys::fs::RENAME_EXCHANGE != 0;
        let src_dir = self.inode(parent)?;
        let dst_dir = self.inode(newparent)?;
        self.materialize(&src_dir)?;
        self.materialize(&dst_dir)?;
        if !exchange {
            // Replacing a directory needs it empty: it must show its real entries.
            self.materialize_child(&dst_dir, newname)?;
        }
        let _barrier = self.mutation()?;
        let src = rustix::fs::statat(&src_dir.fd, name, AtFlags::SYMLINK_NOFOLLOW)
            .ctx("rename source")?;
        // The target, if any: exchanged, or replaced (its recorded name must go).
        let dst = match rustix::fs::statat(&dst_dir.fd, newname, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Some(st),
            Err(rustix::io::Errno::NOENT) if !exchange => None,
            Err(e) => return Err(FsError::errno(e.raw_os_error(), "rename target")),
        };
        if let Some(d) = &dst
            && !exchange
            && d.st_ino != src.st_ino
            && keeps_other_names(d)
        {
            self.journal.append(Op::Unplace {
                ino: self.ino_of(d),
            })?;
        }
        self.journal.append(Op::Rename {
            from: self.child_path(parent, name),
            to: self.child_path(newparent, newname),
            exchange,
        })?;
        self.freezer
            .before_name_change(&src_dir.fd, name, true)
            .and_then(|()| {
                self.freezer
                    .before_name_change(&dst_dir.fd, newname, exchange)
            })
            .ctx("pin a frozen file")?;
        let kept = match &dst {
            Some(d)
                if !exchange
                    && flags & owsfs_sys::fs::RENAME_NOREPLACE == 0
                    && d.st_ino != src.st_ino
                    && kind::of_mode(d.st_mode) == NodeKind::File =>
            {
                self.keep_replaced(&dst_dir, newname, self.ino_of(d), d)
            }
            _ => None,
        };
        if let Err(e) = rustix::fs::renameat_with(
            &src_dir.fd,
            name,
            &dst_dir.fd,
            newname,
            RenameFlags::from_bits_retain(flags),
        ) {
            if let Some(ino) = kept {
                self.unkeep(ino);
            }
            return Err(FsError::errno(e.raw_os_error(), "rename"));
        }
        if let Some(dst) = &dst
            && !exchange
            && dst.st_ino != src.st_ino
        {
            self.hyd_removing(dst);
        }
        if let Some(dst) = dst
            && dst.st_ino != src.st_ino
            && let Some(other) = self.inodes.get(self.ino_of(&dst))
        {
            if exchange {
                other.set_loc(parent, name);
            } else {
                other.clear_loc_if(newparent, newname);
            }
        }
        if let Some(moved) = self.inodes.get(self.ino_of(&src)) {
            moved.set_loc(newparent, newname);
        }
        Ok(())
    }

    pub fn link(&self, ino: FuseIno, newparent: FuseIno, newname: &OsStr) -> FsResult<Entry> {
        self.stats.count(&self.stats.creates);
        check_name(newname)?;
        let inode = self.inode(ino)?;
        let dir = self.inode(newparent)?;
        self.materialize(&dir)?;
        let _barrier = self.mutation()?;
        // An unnamed file (`O_TMPFILE`) gets its first name: for the journal it is created
        // here, whole, with what was written to it before.
        let unnamed = rustix::fs::fstat(&inode.fd)
            .is_ok_and(|st| st.st_nlink == 0 || (st.st_nlink == 1 && self.is_orphan(inode.ino)));
        let path = self.child_path(newparent, newname);
        self.journal.append(if unnamed {
            Op::Create {
                ino,
                kind: NodeKind::File,
                path,
            }
        } else {
            Op::Link { ino, path }
        })?;
        owsfs_sys::fs::link_fd(&inode.fd, &dir.fd, newname)
            .map_err(|e| FsError::errno(e.raw_os_error(), "link"))?;
        if unnamed {
            // Named now: its orphan name (an unnamed file's, see `tmpfile`) goes.
            self.unkeep(ino);
        }
        // A hard link keeps the inode's recorded name; the new one is only an alias (of an
        // unnamed file, it is its name).
        let st = rustix::fs::statat(&dir.fd, newname, AtFlags::SYMLINK_NOFOLLOW).ctx("link")?;
        let linked_ino = self.ino_of(&st);
        let referenced = if unnamed {
            self.inodes
                .reference_existing(linked_ino, newparent, newname)
        } else {
            self.inodes.reference_keep_loc(linked_ino)
        };
        let Some(generation) = referenced else {
            return self.lookup_in(&dir, newname);
        };
        Ok(Entry {
            attr: self.attr(&st),
            generation,
        })
    }
}

fn check_name(name: &OsStr) -> FsResult<()> {
    let b = name.as_bytes();
    if b.is_empty() || b.contains(&b'/') || b == b"." || b == b".." {
        return Err(FsError::errno(libc::EINVAL, "invalid name"));
    }
    if b.len() > 255 {
        return Err(FsError::errno(libc::ENAMETOOLONG, "name too long"));
    }
    Ok(())
}

/// Acts as the caller for file-system permission and ownership purposes on this thread
/// (setfsuid/setfsgid are per thread on Linux), and back as the daemon on drop.
struct CallerCreds {
    restore: Option<(u32, u32)>,
}

impl CallerCreds {
    fn assume(caller: Caller, own_uid: u32, own_gid: u32) -> Self {
        // Only root can act as someone else; a user mount creates files as its user.
        if own_uid != 0 || (caller.uid == own_uid && caller.gid == own_gid) {
            return CallerCreds { restore: None };
        }
        if !owsfs_sys::creds::assume_fs_ids(caller.uid, caller.gid) {
            return CallerCreds { restore: None };
        }
        CallerCreds {
            restore: Some((own_uid, own_gid)),
        }
    }
}

impl Drop for CallerCreds {
    fn drop(&mut self) {
        if let Some((uid, gid)) = self.restore {
            owsfs_sys::creds::restore_fs_ids(uid, gid);
        }
    }
}

/// A regular file that keeps names after one of them goes (unlink, rename over it): the
/// journal must hear of it first (`Op::Unplace`), or a dirty file's change could stay behind
/// in a directory no cut lists.
fn keeps_other_names(st: &rustix::fs::Stat) -> bool {
    crate::kind::of_mode(st.st_mode) == owsfs_journal::NodeKind::File && st.st_nlink > 1
}

/// The directory has a default ACL (`system.posix_acl_default`), which new nodes inherit.
fn has_default_acl(dir: &Inode) -> bool {
    matches!(
        owsfs_sys::xattr::get(dir.fd.as_fd(), "system.posix_acl_default".as_ref(), &mut []),
        Ok(n) if n > 0
    )
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;
    use std::path::{Path, PathBuf};
    use std::sync::Arc;

    use owsfs_journal::{FuseIno, Journal, JournalOptions, NodeKind, Op};
    use rustix::fs::Mode;

    use crate::core::tests::{ROOT, fixture, name};
    use crate::core::{Caller, Core, CoreOptions};
    use crate::inode::ROOT_INO;

    #[test]
    fn lookups_are_counted_and_forgotten() {
        let f = fixture(true);
        std::fs::write(f.backing.join("a"), b"a").unwrap();
        let e1 = f.core.lookup(ROOT_INO, name("a")).unwrap();
        let e2 = f.core.lookup(ROOT_INO, name("a")).unwrap();
        assert_eq!(e1.attr.ino, e2.attr.ino);
        let before = f.core.inode_count();
        f.core.forget(e1.ino(), 1);
        assert_eq!(f.core.inode_count(), before, "one reference is left");
        f.core.forget(e1.ino(), 1);
        assert_eq!(f.core.inode_count(), before - 1);
        assert_eq!(
            f.core.getattr(e1.ino()).unwrap_err().to_errno(),
            libc::ESTALE
        );
        assert_eq!(
            f.core
                .lookup(ROOT_INO, name("missing"))
                .unwrap_err()
                .to_errno(),
            libc::ENOENT
        );
        assert_eq!(
            f.core.lookup(ROOT_INO, name("a/b")).unwrap_err().to_errno(),
            libc::EINVAL
        );
        // "." and "..", which the kernel asks for to decode file handles: a forgotten inode
        // the daemon handed out comes back with its generation; the root's parent is itself;
        // an inode never handed out is stale.
        if rustix::process::geteuid().is_root() {
            let back = f.core.lookup(e1.ino(), name(".")).unwrap();
            assert_eq!((back.ino(), back.generation), (e1.ino(), e1.generation));
            assert_ne!(e1.generation, 0);
            // After a live rollback the old tree's inodes are not reopened by handle.
            f.core.forget(e1.ino(), 1);
            f.core.replaced_tree();
            assert_eq!(
                f.core.lookup(e1.ino(), name(".")).unwrap_err().to_errno(),
                libc::ESTALE
            );
        }
        assert_eq!(f.core.lookup(ROOT_INO, name("..")).unwrap().ino(), ROOT_INO);
        assert_eq!(
            f.core
                .lookup(FuseIno(0x7fff_0000), name("."))
                .unwrap_err()
                .to_errno(),
            libc::ESTALE
        );
    }

    #[test]
    fn rename_and_unlink_update_paths_in_the_journal() {
        let f = fixture(true);
        let a = f
            .core
            .mkdir(ROOT_INO, name("a"), 0o755, ROOT)
            .unwrap()
            .ino();
        let (e, _, fh) = f
            .core
            .create(a, name("f"), 0o644, libc::O_WRONLY, ROOT)
            .unwrap();
        f.core.write(fh, 0, b"x", false).unwrap();
        f.core.release(fh).unwrap();
        f.core
            .rename(ROOT_INO, name("a"), ROOT_INO, name("b"), 0)
            .unwrap();
        let dirty = f.core.journal().dirty();
        assert_eq!(
            dirty.files[&e.ino()].path.as_deref(),
            Some(Path::new("b/f"))
        );
        // Later records about the file use its new path.
        let (_, fh) = f.core.open(e.ino(), libc::O_WRONLY, false).unwrap();
        f.core.write(fh, 1, b"y", false).unwrap();
        f.core.release(fh).unwrap();
        assert_eq!(std::fs::read(f.backing.join("b/f")).unwrap(), b"xy");
        f.core.unlink(a, name("f")).unwrap();
        let dirty = f.core.journal().dirty();
        assert_eq!(dirty.files[&e.ino()].path, None);
        assert!(!f.backing.join("b/f").exists());
        assert_eq!(
            f.core
                .rename(ROOT_INO, name("b"), ROOT_INO, name("c"), 1 << 7)
                .unwrap_err()
                .to_errno(),
            libc::EINVAL,
            "RENAME_WHITEOUT is not supported"
        );
    }

    #[test]
    fn rename_over_a_known_target_forgets_its_name() {
        let f = fixture(true);
        let (a, _, fha) = f
            .core
            .create(ROOT_INO, name("a"), 0o644, libc::O_WRONLY, ROOT)
            .unwrap();
        let (b, _, fhb) = f
            .core
            .create(ROOT_INO, name("b"), 0o644, libc::O_WRONLY, ROOT)
            .unwrap();
        f.core
            .rename(ROOT_INO, name("a"), ROOT_INO, name("b"), 0)
            .unwrap();
        assert_eq!(f.core.inodes.path_of(a.ino()), Some(PathBuf::from("b")));
        assert_eq!(
            f.core.inodes.path_of(b.ino()),
            None,
            "the replaced file is unlinked"
        );
        // Exchange swaps the names.
        let (c, _, fhc) = f
            .core
            .create(ROOT_INO, name("c"), 0o644, libc::O_WRONLY, ROOT)
            .unwrap();
        f.core
            .rename(
                ROOT_INO,
                name("b"),
                ROOT_INO,
                name("c"),
                owsfs_sys::fs::RENAME_EXCHANGE,
            )
            .unwrap();
        assert_eq!(f.core.inodes.path_of(a.ino()), Some(PathBuf::from("c")));
        assert_eq!(f.core.inodes.path_of(c.ino()), Some(PathBuf::from("b")));
        for fh in [fha, fhb, fhc] {
            f.core.release(fh).unwrap();
        }
    }

    #[test]
    fn created_nodes_belong_to_the_caller() {
        if !rustix::process::geteuid().is_root() {
            return;
        }
        let f = fixture(true);
        let user = Caller {
            uid: 4242,
            gid: 4343,
            umask: 0,
        };
        // The caller needs write access to the directory, as on a local disk.
        let d = f
            .core
            .mkdir(ROOT_INO, name("open"), 0o777, ROOT)
            .unwrap()
            .ino();
        let e = f.core.mkdir(d, name("mine"), 0o700, user).unwrap();
        assert_eq!((e.attr.uid, e.attr.gid), (4242, 4343));
        let (e, _, fh) = f
            .core
            .create(d, name("file"), 0o600, libc::O_WRONLY, user)
            .unwrap();
        f.core.release(fh).unwrap();
        assert_eq!((e.attr.uid, e.attr.gid), (4242, 4343));
        // A root-owned 0755 directory refuses the user's create, as the backing fs would.
        let closed = f
            .core
            .mkdir(ROOT_INO, name("closed"), 0o755, ROOT)
            .unwrap()
            .ino();
        assert_eq!(
            f.core
                .mkdir(closed, name("x"), 0o755, user)
                .unwrap_err()
                .to_errno(),
            libc::EACCES
        );
        // The daemon thread is root again afterwards.
        let e = f.core.mkdir(closed, name("y"), 0o755, ROOT).unwrap();
        assert_eq!(e.attr.uid, 0);
    }

    /// Core::new leaves the process umask alone (it used to set it to 0 behind the caller's
    /// back), and nodes are still created with exactly the requested permission bits, which
    /// the kernel has already masked with the caller's umask.
    #[test]
    fn the_umask_is_left_alone_and_new_nodes_get_their_exact_mode() {
        let old = rustix::process::umask(Mode::from_raw_mode(0o077));
        let f = fixture(false);
        let now = rustix::process::umask(Mode::from_raw_mode(0o077));
        assert_eq!(now.bits(), 0o077, "Core::new changed the process umask");
        let mode_of =
            |n: &str| std::fs::symlink_metadata(f.backing.join(n)).unwrap().mode() & 0o7777;
        let d = f.core.mkdir(ROOT_INO, name("d"), 0o775, ROOT).unwrap();
        assert_eq!((d.attr.perm, mode_of("d")), (0o775, 0o775));
        let (e, _, fh) = f
            .core
            .create(ROOT_INO, name("f"), 0o664, libc::O_WRONLY, ROOT)
            .unwrap();
        f.core.release(fh).unwrap();
        assert_eq!((e.attr.perm, mode_of("f")), (0o664, 0o664));
        let p = f
            .core
            .mknod(ROOT_INO, name("p"), libc::S_IFIFO | 0o646, 0, ROOT)
            .unwrap();
        assert_eq!((p.attr.perm, mode_of("p")), (0o646, 0o646));
        // Modes the umask does not touch need no second call, and special bits stay.
        let s = f.core.mkdir(ROOT_INO, name("s"), 0o1700, ROOT).unwrap();
        assert_eq!((s.attr.perm, mode_of("s")), (0o1700, 0o1700));
        rustix::process::umask(old);
    }

    /// A small tmpfs of the test's own, unmounted on drop. Needs root.
    struct Tmpfs(tempfile::TempDir);

    impl Tmpfs {
        fn mount(size: &str) -> Option<Tmpfs> {
            if !rustix::process::geteuid().is_root() {
                eprintln!("skipped: mounting a tmpfs needs root");
                return None;
            }
            let dir = tempfile::tempdir().unwrap();
            let ok = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(dir.path())
                .status()
                .unwrap()
                .success();
            assert!(ok, "mount tmpfs");
            Some(Tmpfs(dir))
        }
    }

    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(self.0.path())
                .status();
        }
    }

    /// The `Create` record of a new node can only be written once the node exists (it names
    /// its inode). When that write fails (here: the journal's page has room for the parent's
    /// `Meta` record but not for `Create`, on a full tmpfs, without a reserve), the node is
    /// removed again, the caller gets ENOSPC and the kernel's reference is not counted.
    #[test]
    fn a_node_whose_create_record_fails_is_removed_again() {
        let Some(fs) = Tmpfs::mount("1m") else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join("backing");
        std::fs::create_dir(&backing).unwrap();
        let opts = JournalOptions {
            reserve_bytes: 0,
            ..JournalOptions::default()
        };
        let (journal, _) = Journal::open(&fs.0.path().join("journal"), &backing, opts).unwrap();
        let journal = Arc::new(journal);
        let core = Core::new(&backing, Arc::clone(&journal), CoreOptions::default()).unwrap();
        let name = "n".repeat(40);
        // The sizes of the two records of a creation in the root.
        let size_of = |op: Op| {
            let before = journal.stats().segment_offset;
            journal.append(op).unwrap();
            journal.stats().segment_offset - before
        };
        let meta = size_of(Op::Meta {
            ino: ROOT_INO,
            dir: Some(PathBuf::new()),
        });
        let create = size_of(Op::Create {
            ino: FuseIno(99),
            kind: NodeKind::Dir,
            path: PathBuf::from(&name),
        });
        // Pad the segment until its last page has room for `meta` but not `meta + create`.
        let room = |j: &Journal| 4096 - j.stats().segment_offset % 4096;
        while !(meta..meta + create).contains(&room(&journal)) {
            journal.append(Op::Fsync { ino: FuseIno(1) }).unwrap();
        }
        let mut filler = File::create(fs.0.path().join("filler")).unwrap();
        while filler.write_all(&[0u8; 4096]).is_ok() {}
        let inodes = core.inode_count();

        let e = core
            .mkdir(ROOT_INO, name.as_ref(), 0o755, ROOT)
            .unwrap_err();
        assert_eq!(e.to_errno(), libc::ENOSPC, "{e}");
        assert!(
            !backing.join(&name).exists(),
            "the directory was not removed"
        );
        let e = core
            .create(ROOT_INO, name.as_ref(), 0o644, libc::O_RDWR, ROOT)
            .unwrap_err();
        assert_eq!(e.to_errno(), libc::ENOSPC, "{e}");
        assert!(!backing.join(&name).exists(), "the file was not removed");
        assert_eq!(core.inode_count(), inodes, "a reference was left behind");
        let dirty = journal.dirty();
        assert!(
            dirty
                .files
                .values()
                .all(|f| f.path.as_deref() != Some(Path::new(&name))),
            "{dirty:?}"
        );
        assert!(journal.stats().failed.is_none());
        // Space is back: the same creation succeeds.
        drop(filler);
        std::fs::remove_file(fs.0.path().join("filler")).unwrap();
        core.mkdir(ROOT_INO, name.as_ref(), 0o755, ROOT).unwrap();
        assert!(backing.join(&name).is_dir());
    }
}

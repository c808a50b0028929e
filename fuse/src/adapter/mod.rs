//! The fuser adapter: translates kernel requests into calls on [`Core`] and results into
//! replies. No POSIX logic lives here; errors become errnos in one place (`fail`).

use std::ffi::OsStr;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use fuser::{
    AccessFlags, BackingId, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, Filesystem,
    FopenFlags, Generation, INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty,
    ReplyEntry, ReplyIoctl, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request,
    TimeOrNow, WriteFlags,
};

use owsfs_journal::FuseIno;

use crate::core::{Caller, Core, IoMode, SetAttr, TimeSpec, XattrReply};
use crate::error::FsError;
use crate::stats::OpKind;

mod replies;

use replies::done_before;

/// Kernel-facing settings of a mount.
#[derive(Clone, Debug)]
pub struct AdapterOptions {
    /// How long the kernel may cache names and attributes. The daemon is the only writer of the
    /// backing directory, so these can be long.
    pub entry_ttl: Duration,
    pub attr_ttl: Duration,
    /// How long the kernel may cache "no such name".
    pub negative_ttl: Duration,
    /// Largest write request, in bytes.
    pub max_write: u32,
    /// Kernel writeback cache (the default; not with passthrough reads): writes are gathered
    /// in the kernel and reach the daemon at close, fsync or writeback. Much faster for small
    /// writes. The daemon's death loses none of them under a supervisor (the connection, and
    /// the kernel's dirty pages, live on); the node's death loses what was written but not
    /// yet closed or fsynced.
    pub writeback_cache: bool,
    /// POSIX ACLs (FUSE_POSIX_ACL): the kernel enforces the `system.posix_acl_*` xattrs the
    /// daemon stores. Costs one getxattr per inode the first time another user's access
    /// needs its ACL.
    pub posix_acl: bool,
    /// `-o durability=strict`: fsync and fdatasync (of files and directories) answer only once
    /// the store holds everything written before them, through `durable`.
    pub strict: bool,
    /// The thread that answers once the store holds what came before (strict fsyncs, the
    /// `OWSFS_IOC_SYNC` ioctl); None for a mount that writes nothing to the store.
    pub durable: Option<Arc<crate::durable::Waiter>>,
    /// FUSE over io_uring (`-o uring=`): asked for in INIT when not `Off`.
    pub uring: Uring,
}

/// `-o uring=`: whether requests come through FUSE over io_uring (Linux 6.14, when
/// `/sys/module/fuse/parameters/enable_uring` is Y) instead of /dev/fuse.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Uring {
    /// /dev/fuse only (the default: a daemon's death is survived only on /dev/fuse).
    #[default]
    Off,
    /// io_uring when the kernel offers it, /dev/fuse otherwise.
    Auto,
    /// io_uring, or the mount fails.
    On,
}

impl Default for AdapterOptions {
    fn default() -> Self {
        AdapterOptions {
            entry_ttl: Duration::from_secs(3600),
            attr_ttl: Duration::from_secs(3600),
            negative_ttl: Duration::from_secs(3600),
            max_write: 1 << 20,
            writeback_cache: true,
            posix_acl: true,
            strict: false,
            durable: None,
            uring: Uring::Off,
        }
    }
}

/// The fuser `Filesystem` over a [`Core`].
pub struct FuseAdapter {
    core: Arc<Core>,
    opts: AdapterOptions,
    /// Kernel backing files of inodes open by passthrough, with the number of such opens. All
    /// passthrough opens of one inode must share one backing id.
    backing: DashMap<FuseIno, (BackingId, u32)>,
    /// An ioctl was refused once already (only the first is logged).
    ioctl_refused: AtomicBool,
}

/// The kernel's inode number as the core takes it.
fn fuse_ino(ino: INodeNo) -> FuseIno {
    FuseIno(ino.0)
}

/// The core's inode number as fuser takes it.
fn inode_no(ino: FuseIno) -> INodeNo {
    INodeNo(ino.0)
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
        umask: 0,
    }
}

/// The caller's groups: its primary group and its supplementary ones (none more when the
/// process is gone).
fn caller_groups(req: &Request) -> Vec<u32> {
    let mut groups = vec![req.gid()];
    groups.extend(owsfs_sys::process::groups_of(req.pid()));
    groups
}

/// The caller of a creation, with its umask (not yet applied under FUSE_DONT_MASK; applying
/// it again is harmless otherwise).
fn creator(req: &Request, umask: u32) -> Caller {
    Caller {
        umask,
        ..caller(req)
    }
}

fn time_spec(t: Option<TimeOrNow>) -> Option<TimeSpec> {
    t.map(|t| match t {
        TimeOrNow::Now => TimeSpec::Now,
        TimeOrNow::SpecificTime(t) => TimeSpec::At(t),
    })
}

/// The one place an error becomes a reply.
fn errno(core: &Core, op: &'static str, e: &FsError) -> Errno {
    // ENOENT, ENODATA, EEXIST... are ordinary answers, not errors worth counting or logging.
    if e.is_expected() {
        tracing::trace!("{op}: {e}");
    } else {
        core.stats.count(&core.stats.errors);
        tracing::warn!("{op}: {e}");
    }
    Errno::from_i32(e.to_errno())
}

/// A file handle an earlier daemon of the connection handed out is opened again before the
/// request uses it (`Core::adopt_handle`); an error answers the request.
macro_rules! adopt {
    ($self:ident, $reply:ident, $op:literal, $ino:expr, $fh:expr) => {
        if let Err(e) = $self.core.adopt_handle(fuse_ino($ino), $fh.0) {
            return fail!($self, $reply, $op, e);
        }
    };
}

macro_rules! fail {
    ($self:ident, $reply:ident, $op:literal, $e:expr) => {
        $reply.error(errno(&$self.core, $op, &$e))
    };
}

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        if let Err(nearest) = config.set_max_write(self.opts.max_write) {
            let _ = config.set_max_write(nearest);
        }
        let _ = config.set_max_background(64);
        // Not FUSE_ATOMIC_O_TRUNC: with it the daemon truncates inside OPEN, before the VFS
        // checks write access, so open(O_RDONLY | O_TRUNC) of a running executable destroyed
        // it and then failed with ETXTBSY. Without it the VFS checks first and then sends
        // SETATTR(size 0).
        let wanted = [
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_CACHE_SYMLINKS,
            InitFlags::FUSE_ASYNC_DIO,
            InitFlags::FUSE_MAX_PAGES,
            InitFlags::FUSE_HANDLE_KILLPRIV_V2,
            // File handles (open_by_handle_at, NFS re-export) of inodes the kernel evicted:
            // it looks up "." and ".." by node id.
            InitFlags::FUSE_EXPORT_SUPPORT,
        ];
        for flag in wanted {
            if config.add_capabilities(flag).is_err() {
                tracing::debug!("kernel lacks {flag:?}");
            }
        }
        // FUSE_DONT_MASK: creations carry the caller's umask unapplied, since a directory
        // with a default ACL ignores it.
        if self.opts.posix_acl
            && config.add_capabilities(InitFlags::FUSE_POSIX_ACL).is_ok()
            && config.add_capabilities(InitFlags::FUSE_DONT_MASK).is_ok()
        {
            self.core.enable_posix_acl();
        }
        if self.opts.writeback_cache {
            self.core.disable_passthrough();
            if config
                .add_capabilities(InitFlags::FUSE_WRITEBACK_CACHE)
                .is_err()
            {
                tracing::warn!("kernel lacks the writeback cache; writes go through");
            }
        }
        match self.opts.uring {
            Uring::Off => {}
            Uring::Auto | Uring::On
                if config
                    .add_capabilities(InitFlags::FUSE_OVER_IO_URING)
                    .is_ok() =>
            {
                tracing::info!("serving through FUSE over io_uring");
            }
            Uring::Auto => tracing::info!(
                "the kernel does not offer FUSE over io_uring: serving through /dev/fuse"
            ),
            Uring::On => {
                return Err(io::Error::other(
                    "-o uring=on: the kernel does not offer FUSE over io_uring (Linux 6.14 or \
                     later, and as root: echo Y > /sys/module/fuse/parameters/enable_uring)",
                ));
            }
        }
        if self.core.passthrough_enabled() {
            let ok = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok();
            if !ok {
                tracing::info!("kernel has no FUSE passthrough; all reads go through the daemon");
                self.core.disable_passthrough();
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _serving = self.core.serving(OpKind::Lookup);
        match self.core.lookup(fuse_ino(parent), name) {
            Ok(entry) => self.reply_entry(reply, &entry),
            Err(e) if e.to_errno() == libc::ENOENT && !self.opts.negative_ttl.is_zero() => {
                // A zero inode number caches the absence of the name.
                let mut attr = negative_attr();
                attr.ino = INodeNo(0);
                reply.entry_with_ttls(
                    &self.opts.negative_ttl,
                    &Duration::ZERO,
                    &attr,
                    Generation(0),
                );
            }
            Err(e) => fail!(self, reply, "lookup", e),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.core.forget(fuse_ino(ino), nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _serving = self.core.serving(OpKind::Getattr);
        match self.core.getattr(fuse_ino(ino)) {
            Ok(attr) => reply.attr(&self.opts.attr_ttl, &attr),
            Err(e) => fail!(self, reply, "getattr", e),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let _serving = self.core.serving(OpKind::Setattr);
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: time_spec(atime),
            mtime: time_spec(mtime),
            fh: fh.map(|f| f.0),
            // fuser does not pass FATTR_KILL_SUIDGID; an unprivileged caller is what sets it.
            kill_suidgid: req.uid() != 0,
        };
        match self.core.setattr(fuse_ino(ino), set) {
            Ok(attr) => reply.attr(&self.opts.attr_ttl, &attr),
            Err(e) => fail!(self, reply, "setattr", e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let _serving = self.core.serving(OpKind::Readlink);
        match self.core.readlink(fuse_ino(ino)) {
            Ok(target) => reply.data(&target),
            Err(e) => fail!(self, reply, "readlink", e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let _serving = self.core.serving(OpKind::Create);
        match self
            .core
            .mknod(fuse_ino(parent), name, mode, rdev, creator(req, umask))
        {
            Ok(entry) => self.reply_entry(reply, &entry),
            Err(e) if done_before(req, &e, libc::EEXIST, "mknod") => {
                self.reply_lookup(reply, parent, name)
            }
            Err(e) => fail!(self, reply, "mknod", e),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let _serving = self.core.serving(OpKind::Create);
        match self
            .core
            .mkdir(fuse_ino(parent), name, mode, creator(req, umask))
        {
            Ok(entry) => {
                fail::fail_point!("fuse-after-mkdir");
                self.reply_entry(reply, &entry)
            }
            Err(e) if done_before(req, &e, libc::EEXIST, "mkdir") => {
                self.reply_lookup(reply, parent, name)
            }
            Err(e) => fail!(self, reply, "mkdir", e),
        }
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _serving = self.core.serving(OpKind::Remove);
        match self.core.unlink(fuse_ino(parent), name) {
            Ok(()) => {
                fail::fail_point!("fuse-after-unlink");
                reply.ok()
            }
            Err(e) if done_before(req, &e, libc::ENOENT, "unlink") => reply.ok(),
            Err(e) => fail!(self, reply, "unlink", e),
        }
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _serving = self.core.serving(OpKind::Remove);
        match self.core.rmdir(fuse_ino(parent), name) {
            Ok(()) => reply.ok(),
            Err(e) if done_before(req, &e, libc::ENOENT, "rmdir") => reply.ok(),
            Err(e) => fail!(self, reply, "rmdir", e),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let _serving = self.core.serving(OpKind::Create);
        match self
            .core
            .symlink(fuse_ino(parent), link_name, target, caller(req))
        {
            Ok(entry) => self.reply_entry(reply, &entry),
            Err(e) if done_before(req, &e, libc::EEXIST, "symlink") => {
                self.reply_lookup(reply, parent, link_name)
            }
            Err(e) => fail!(self, reply, "symlink", e),
        }
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let _serving = self.core.serving(OpKind::Rename);
        // An exchange done twice swaps the names back, and the tree cannot tell it was done:
        // it is recorded before its answer, and a resent one found there is answered as done.
        let exchange = flags.contains(RenameFlags::RENAME_EXCHANGE);
        let unique = replies::unique_of(req);
        if exchange && replies::resent_exchange_made(req, || self.core.made_before(unique)) {
            return reply.ok();
        }
        match self.core.rename(
            fuse_ino(parent),
            name,
            fuse_ino(newparent),
            newname,
            flags.bits(),
        ) {
            Ok(()) => {
                if exchange {
                    self.core.record_made(unique);
                }
                fail::fail_point!("fuse-after-rename");
                reply.ok()
            }
            Err(e) if done_before(req, &e, libc::ENOENT, "rename") => reply.ok(),
            Err(e) => fail!(self, reply, "rename", e),
        }
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let _serving = self.core.serving(OpKind::Link);
        match self.core.link(fuse_ino(ino), fuse_ino(newparent), newname) {
            Ok(entry) => self.reply_entry(reply, &entry),
            Err(e) if done_before(req, &e, libc::EEXIST, "link") => {
                self.reply_lookup(reply, newparent, newname)
            }
            Err(e) => fail!(self, reply, "link", e),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _serving = self.core.serving(OpKind::Open);
        let (handle, fh) = match self.core.open(fuse_ino(ino), flags.0, req.uid() != 0) {
            Ok(h) => h,
            Err(e) => return fail!(self, reply, "open", e),
        };
        match handle.mode() {
            IoMode::Passthrough => {
                match self.passthrough_backing(&handle, |f| reply.open_backing(f)) {
                    Ok(backing) => {
                        self.core.stats.count(&self.core.stats.opens_passthrough);
                        reply.opened_passthrough(
                            FileHandle(fh),
                            self.open_flags(IoMode::Passthrough),
                            &backing.0,
                        );
                    }
                    Err(err) => match self.demote(fh, &err) {
                        Ok(flags) => reply.opened(FileHandle(fh), flags),
                        Err(e) => fail!(self, reply, "open", e),
                    },
                }
            }
            IoMode::Cached => {
                self.core.stats.count(&self.core.stats.opens_cached);
                reply.opened(FileHandle(fh), self.open_flags(IoMode::Cached));
            }
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let _serving = self.core.serving(OpKind::Create);
        match self
            .core
            .create(fuse_ino(parent), name, mode, flags, creator(req, umask))
        {
            Ok((entry, handle, fh)) => {
                fail::fail_point!("fuse-after-create");
                self.reply_created(reply, &entry, &handle, fh)
            }
            Err(e) if done_before(req, &e, libc::EEXIST, "create") => {
                // The file the dead daemon made, opened as asked (it is new: no truncation).
                let opened = self.core.lookup(fuse_ino(parent), name).and_then(|entry| {
                    let flags = flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC);
                    match self.core.open(entry.ino(), flags, false) {
                        Ok((handle, fh)) => Ok((entry, handle, fh)),
                        Err(e) => {
                            self.core.forget(entry.ino(), 1);
                            Err(e)
                        }
                    }
                });
                match opened {
                    Ok((entry, handle, fh)) => self.reply_created(reply, &entry, &handle, fh),
                    Err(e) => fail!(self, reply, "create", e),
                }
            }
            Err(e) => fail!(self, reply, "create", e),
        }
    }

    /// `open(O_TMPFILE)`: an unnamed file, which `linkat(2)` may name.
    fn tmpfile(
        &self,
        req: &Request,
        parent: INodeNo,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let _serving = self.core.serving(OpKind::Create);
        match self
            .core
            .tmpfile(fuse_ino(parent), mode, flags, creator(req, umask))
        {
            Ok((entry, handle, fh)) => self.reply_created(reply, &entry, &handle, fh),
            Err(e) => fail!(self, reply, "tmpfile", e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let _serving = self.core.serving(OpKind::Read);
        adopt!(self, reply, "read", ino, fh);
        // The reply is sent inside: see `Core::read_then`.
        let mut reply = Some(reply);
        let sent = self.core.read_then(fh.0, offset, size, |data| {
            if let Some(r) = reply.take() {
                r.data(data);
            }
        });
        if let (Err(e), Some(reply)) = (sent, reply) {
            fail!(self, reply, "read", e)
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let _serving = self.core.serving(OpKind::Write);
        adopt!(self, reply, "write", ino, fh);
        let kill = write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID);
        // The request's flags are the descriptor's at the time (fcntl may have changed them
        // since the open).
        let r = if write_flags.contains(WriteFlags::FUSE_WRITE_CACHE) {
            self.core.write_pages(fh.0, offset, data, kill)
        } else if flags.0 & owsfs_sys::fs::O_DIRECT_RAW != 0 {
            self.core.write_direct(fh.0, offset, data, kill)
        } else {
            self.core.write(fh.0, offset, data, kill)
        };
        match r {
            Ok(n) => reply.written(n),
            Err(e) => fail!(self, reply, "write", e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let _serving = self.core.serving(OpKind::Flush);
        adopt!(self, reply, "flush", ino, fh);
        match self.core.flush(fh.0) {
            Ok(()) => reply.ok(),
            Err(e) => fail!(self, reply, "flush", e),
        }
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let _serving = self.core.serving(OpKind::Release);
        match self.core.release(fh.0) {
            Ok(mode) => {
                if mode == IoMode::Passthrough {
                    self.release_backing(fuse_ino(ino));
                }
                reply.ok()
            }
            Err(e) => fail!(self, reply, "release", e),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _serving = self.core.serving(OpKind::Fsync);
        adopt!(self, reply, "fsync", ino, fh);
        match self.core.fsync(fuse_ino(ino), fh.0, datasync) {
            Ok(()) => self.ok_when_durable(reply),
            Err(e) => fail!(self, reply, "fsync", e),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _serving = self.core.serving(OpKind::Open);
        // Tests hold a request here (`FAILPOINTS=fuse-opendir=sleep(MS)`) to kill the daemon
        // while a request is in flight.
        fail::fail_point!("fuse-opendir");
        match self.core.opendir(fuse_ino(ino)) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => fail!(self, reply, "opendir", e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let _serving = self.core.serving(OpKind::Readdir);
        if let Err(e) = self.core.adopt_dir(fuse_ino(ino), fh.0) {
            return fail!(self, reply, "readdir", e);
        }
        let entries = match self.core.readdir(fh.0, offset) {
            Ok(e) => e,
            Err(e) => return fail!(self, reply, "readdir", e),
        };
        // Entries go into the reply until it is full; the rest are neither copied nor looked at.
        for (next, entry) in entries.iter() {
            if reply.add(inode_no(entry.ino), next, entry.kind, &entry.name) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let _serving = self.core.serving(OpKind::Readdir);
        if let Err(e) = self.core.adopt_dir(fuse_ino(ino), fh.0) {
            return fail!(self, reply, "readdirplus", e);
        }
        let entries = match self.core.readdir(fh.0, offset) {
            Ok(e) => e,
            Err(e) => return fail!(self, reply, "readdirplus", e),
        };
        for (next, entry) in entries.iter() {
            let name = entry.name.as_encoded_bytes();
            if name == b"." || name == b".." {
                // The kernel does not count references for these two.
                let mut attr = negative_attr();
                attr.ino = inode_no(entry.ino);
                attr.kind = FileType::Directory;
                if reply.add(
                    inode_no(entry.ino),
                    next,
                    &entry.name,
                    &Duration::ZERO,
                    &attr,
                    Generation(0),
                ) {
                    break;
                }
                continue;
            }
            let found = match self.core.readdirplus_entry(fuse_ino(ino), &entry.name) {
                Ok(found) => found,
                // Gone since the directory was read: leave it out.
                Err(e) if e.to_errno() == libc::ENOENT => continue,
                // No room for another inode now (ENFILE at the inode budget), or another
                // failure: list the name without its lookup, as plain readdir would. Leaving
                // it out would hide a file that is there; a later lookup answers for itself.
                Err(_) => {
                    if reply.add_unlooked(inode_no(entry.ino), next, &entry.name, entry.kind) {
                        break;
                    }
                    continue;
                }
            };
            let attr = found.attr;
            if reply.add(
                attr.ino,
                next,
                &entry.name,
                &self.opts.entry_ttl,
                &attr,
                Generation(u64::from(found.generation)),
            ) {
                // It did not fit: the kernel will not count this reference.
                self.core.forget(fuse_ino(attr.ino), 1);
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        let _serving = self.core.serving(OpKind::Release);
        self.core.releasedir(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _serving = self.core.serving(OpKind::Fsync);
        match self.core.fsyncdir(fuse_ino(ino), datasync) {
            Ok(()) => self.ok_when_durable(reply),
            Err(e) => fail!(self, reply, "fsyncdir", e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let _serving = self.core.serving(OpKind::Statfs);
        match self.core.statfs() {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => fail!(self, reply, "statfs", e),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let _serving = self.core.serving(OpKind::Xattr);
        // An access ACL set by an unprivileged caller outside the file's group clears its
        // set-group-id bit, as on a local disk (the kernel would say so only with
        // FUSE_SETXATTR_EXT): the caller's groups, to decide.
        let groups =
            (name == "system.posix_acl_access" && req.uid() != 0).then(|| caller_groups(req));
        match self
            .core
            .setxattr(fuse_ino(ino), name, value, flags, groups.as_deref())
        {
            Ok(()) => reply.ok(),
            Err(e) => fail!(self, reply, "setxattr", e),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let _serving = self.core.serving(OpKind::Xattr);
        match self.core.getxattr(fuse_ino(ino), name, size) {
            Ok(XattrReply::Size(n)) => reply.size(n),
            Ok(XattrReply::Data(d)) => reply.data(&d),
            Err(e) => fail!(self, reply, "getxattr", e),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let _serving = self.core.serving(OpKind::Xattr);
        match self.core.listxattr(fuse_ino(ino), size) {
            Ok(XattrReply::Size(n)) => reply.size(n),
            Ok(XattrReply::Data(d)) => reply.data(&d),
            Err(e) => fail!(self, reply, "listxattr", e),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _serving = self.core.serving(OpKind::Xattr);
        match self.core.removexattr(fuse_ino(ino), name) {
            Ok(()) => reply.ok(),
            Err(e) => fail!(self, reply, "removexattr", e),
        }
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let _serving = self.core.serving(OpKind::Access);
        match self.core.access(fuse_ino(ino), mask.bits(), caller(req)) {
            Ok(()) => reply.ok(),
            Err(e) => fail!(self, reply, "access", e),
        }
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let _serving = self.core.serving(OpKind::Fallocate);
        adopt!(self, reply, "fallocate", ino, fh);
        // FUSE_FALLOCATE carries no kill flag: an unprivileged caller is what says it.
        match self
            .core
            .fallocate(fh.0, offset, length, mode, req.uid() != 0)
        {
            Ok(()) => reply.ok(),
            Err(e) => fail!(self, reply, "fallocate", e),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let _serving = self.core.serving(OpKind::Lseek);
        adopt!(self, reply, "lseek", ino, fh);
        if self.opts.writeback_cache {
            // Dirty pages in the kernel are invisible to the backing file, so its holes would
            // lie. ENOSYS makes the kernel answer itself (all data, the hole at the end).
            return reply.error(Errno::ENOSYS);
        }
        match self.core.lseek(fh.0, offset, whence) {
            Ok(at) => reply.offset(at),
            Err(e) => fail!(self, reply, "lseek", e),
        }
    }

    fn ioctl(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        let _serving = self.core.serving(OpKind::Ioctl);
        if cmd == crate::durable::OWSFS_IOC_SYNC
            && let Some(durable) = &self.opts.durable
        {
            return durable.after_durable(true, move |r| match r {
                Ok(generation) => reply.ioctl(0, &generation.to_ne_bytes()),
                Err(errno) => reply.error(Errno::from_i32(errno)),
            });
        }
        reply.error(refuse_ioctl(&self.ioctl_refused, fuse_ino(ino), cmd));
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let _serving = self.core.serving(OpKind::CopyFileRange);
        let adopted = (self.core.adopt_handle(fuse_ino(ino_in), fh_in.0))
            .and_then(|()| self.core.adopt_handle(fuse_ino(ino_out), fh_out.0));
        if let Err(e) = adopted {
            return fail!(self, reply, "copy_file_range", e);
        }
        match self
            .core
            .copy_file_range(fh_in.0, offset_in, fh_out.0, offset_out, len)
        {
            Ok(n) => reply.written(n),
            Err(e) => fail!(self, reply, "copy_file_range", e),
        }
    }
}

/// The answer to every ioctl: ENOTTY, what a local file system gives for a request it does
/// not know (`isatty(3)` asks TCGETS of every file it is given). fuser's default logged a
/// warning per call and answered ENOSYS; this logs the first one at debug level only.
fn refuse_ioctl(refused_before: &AtomicBool, ino: FuseIno, cmd: u32) -> Errno {
    if !refused_before.swap(true, Ordering::Relaxed) {
        tracing::debug!(
            "ioctl {cmd:#x} on inode {ino}: not supported (ENOTTY); later ones are not logged"
        );
    }
    Errno::ENOTTY
}

fn negative_attr() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_os = "linux")]
    fn ioctls_are_refused_with_enotty() {
        let refused = AtomicBool::new(false);
        let tcgets = libc::TCGETS as u32;
        assert_eq!(refuse_ioctl(&refused, FuseIno(2), tcgets), Errno::ENOTTY);
        assert!(
            refused.load(Ordering::Relaxed),
            "the first refusal is noted"
        );
        assert_eq!(refuse_ioctl(&refused, FuseIno(2), tcgets), Errno::ENOTTY);
    }
}

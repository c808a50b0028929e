//! The passthrough filesystem core: POSIX operations over the backing directory, each mutation
//! recorded in the journal before it is performed. Nothing here knows about the kernel
//! protocol, so tests drive it directly on a temporary directory.
//!
//! [`Core`] and the helpers every operation shares are here; the operations are split by
//! what they touch: `namespace` (names: lookup, the create family, remove, rename, link),
//! `data` (open files and their I/O modes), `dirs` (open directories), `xattr`, `attr`
//! (attributes, access, statfs), `budget` (the inode budget and its reaper) and `hooks`
//! (what operations call before they serve or change bytes: lazy hydration and
//! copy-on-first-write).

mod attr;
mod budget;
mod data;
mod dirs;
mod hooks;
mod namespace;
mod orphans;
#[cfg(test)]
mod tests;
mod xattr;

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use dashmap::DashMap;
use fuser::FileAttr;
use owsfs_journal::{BackingIno, FuseIno, InoMap, Journal, NodeKind, Op, Place};
use parking_lot::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use rustix::fs::{Mode, OFlags};

use crate::error::{Context, FsError, FsResult};
use crate::freeze::Freezer;
use crate::hydrate::Hydrate;
use crate::inode::{Inode, InodeTable};
use crate::stats::Stats;

pub use attr::{SetAttr, TimeSpec};
pub use data::{Handle, IoMode};

pub use dirs::{DirEntries, DirEntry};
pub use xattr::XattrReply;

use dirs::DirHandle;

/// Settings of the core that a mount chooses.
#[derive(Clone, Debug)]
pub struct CoreOptions {
    /// Serve read-only opens by kernel passthrough when no writer has the file open.
    pub passthrough: bool,
    /// How many inodes may hold a descriptor at once (each inode the kernel knows holds one);
    /// past it, lookups of new inodes fail with ENFILE instead of starving the daemon.
    pub inode_budget: usize,
    /// Where copy-on-first-write saves bytes of frozen files (unnamed files). It should be on
    /// the backing directory's file system (the cache's), which has room for the workspace's
    /// data, unlike a small `/tmp`. None: the directory that holds the backing root (the cache
    /// directory in owsfs's layout, `CACHE/backing`) if it is on that file system, else the
    /// temporary directory.
    pub side_dir: Option<PathBuf>,
    /// The backing root is a directory its user owns (`owsfs mount DIR --adopt`): its inode
    /// flags stay as they are (no `chattr +A`, which would outlive the mount).
    pub adopted: bool,
    /// The kernel connection outlives this daemon (a supervisor holds it): what a daemon
    /// that takes it over needs is kept, and an earlier one's is used.
    pub succession: Option<Succession>,
}

/// What makes a daemon's death invisible to the kernel's users: the daemon that takes over
/// the connection opens the inodes and open files the kernel still refers to.
#[derive(Clone, Debug)]
pub struct Succession {
    /// The node log (`crate::nodes`): the backing handle of each inode handed out.
    pub node_log: PathBuf,
    /// The orphanage (`core::orphans`): files removed while open are kept there, on the
    /// backing directory's file system.
    pub orphans: PathBuf,
    /// Which daemon of the connection this is (0 for the one that mounted). File handles
    /// this daemon hands out carry it in their top 16 bits, so that one an earlier daemon
    /// handed out is known for what it is and opened again.
    pub incarnation: u16,
}

impl Default for CoreOptions {
    /// Passthrough is off by default: while a file is open by passthrough the kernel lets no
    /// writer open it, and writes must go through the daemon.
    fn default() -> Self {
        CoreOptions {
            passthrough: false,
            inode_budget: usize::MAX,
            side_dir: None,
            adopted: false,
            succession: None,
        }
    }
}

/// The backpressure hook: called before each data write with whether it is the kernel's
/// page writeback; `Err(errno)` refuses the write.
pub type Throttle = Box<dyn Fn(bool) -> Result<(), i32> + Send + Sync>;

/// Tells the kernel to drop the cached name `name` in directory `parent`.
pub type Invalidator = Box<dyn Fn(FuseIno, &OsStr) -> std::io::Result<()> + Send + Sync>;

/// Tells the kernel that an inode's cached attributes are stale, and with a range
/// `(offset, len)` of a non-negative offset, its cached pages there too (a negative offset:
/// the attributes only; a zero length: to the end).
pub type InodeInvalidator = Arc<dyn Fn(FuseIno, i64, i64) -> std::io::Result<()> + Send + Sync>;

/// The caller of an operation, for ownership of what it creates.
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    /// The caller's umask, for creations: applied to the mode unless the parent directory
    /// has a default ACL (0 for other operations, or where the kernel applied it already).
    pub umask: u32,
}

/// A name and its attributes, as returned by lookup and the create family.
#[derive(Clone, Copy, Debug)]
pub struct Entry {
    pub attr: FileAttr,
    /// The inode's generation, which file handles of it carry: another inode that gets the
    /// same number later has another generation, so a handle of the first one goes stale.
    pub generation: u32,
}

impl Entry {
    /// The entry's inode number.
    pub fn ino(&self) -> FuseIno {
        FuseIno(self.attr.ino.0)
    }
}

/// The filesystem core.
pub struct Core {
    backing_root: PathBuf,
    inodes: InodeTable,
    handles: DashMap<u64, Arc<Handle>>,
    dirs: DashMap<u64, Arc<Mutex<DirHandle>>>,
    next_fh: AtomicU64,
    /// The first file handle this daemon hands out: a smaller one was an earlier daemon's
    /// (see [`Succession`]).
    first_fh: u64,
    journal: Arc<Journal>,
    /// Files removed while open, kept for the daemon after this one (with a succession).
    orphans: Option<orphans::Orphanage>,
    reopener: owsfs_sys::fs::Reopener,
    passthrough: AtomicBool,
    /// The kernel enforces POSIX ACLs (FUSE_POSIX_ACL was granted): their xattrs are stored.
    posix_acl: AtomicBool,
    inode_budget: usize,
    budget_warned: AtomicBool,
    /// Asks the kernel to drop a cached name (FUSE_NOTIFY_INVAL_ENTRY), so that it forgets the
    /// inode; set by the mount once the session exists.
    invalidate: std::sync::OnceLock<Invalidator>,
    /// Asks the kernel to forget an inode's attributes (FUSE_NOTIFY_INVAL_INODE without a
    /// range), after the daemon changed them as a side effect; set by the mount.
    invalidate_inode: std::sync::OnceLock<InodeInvalidator>,
    /// The thread that drops pages after direct writes, started at the first one.
    page_dropper: std::sync::OnceLock<crossbeam_channel::Sender<budget::PageDrop>>,
    /// Wakes the reaper when the inode table nears its budget.
    reaper_kick: (
        crossbeam_channel::Sender<()>,
        crossbeam_channel::Receiver<()>,
    ),
    /// The daemon's own ids, restored after acting as a caller.
    own_uid: u32,
    own_gid: u32,
    root_dev: u64,
    /// Mutations hold it shared from their journal record to the end of their operation; a
    /// cut holds it exclusively, so it sees no mutation half done.
    barrier: RwLock<()>,
    /// Every kernel request holds it shared while it is served ([`Core::serving`]); a live
    /// rollback holds it exclusively while it replaces the tree ([`Core::hold_requests`]).
    gate: RwLock<()>,
    freezer: Freezer,
    /// Called before a data write takes the barrier: slows writers down while the uploader
    /// lags too far behind (set by the daemon).
    throttle: std::sync::OnceLock<Throttle>,
    /// Set once by [`Core::stop_writes`].
    stopped: std::sync::OnceLock<String>,
    /// Lazy hydration: entries and bytes that are still in the store (set by the daemon).
    hydrate: std::sync::OnceLock<Arc<dyn Hydrate>>,
    pub stats: Stats,
}

impl Core {
    /// Opens the core over `backing_root`, which must be an existing directory.
    ///
    /// The process umask is left alone: the kernel sends modes already masked by the caller's
    /// umask, and where the process's own umask takes more bits, the creation restores them
    /// (`exact_mode`). A daemon can spare that call by running with umask 0.
    pub fn new(backing_root: &Path, journal: Arc<Journal>, opts: CoreOptions) -> FsResult<Core> {
        let root_fd = owsfs_sys::fs::open_path(
            rustix::fs::CWD,
            backing_root,
            OFlags::DIRECTORY | OFlags::CLOEXEC,
        )
        .ctx("open backing root")?;
        if !opts.adopted {
            noatime_inherited(backing_root);
        }
        let st = rustix::fs::fstat(&root_fd).ctx("stat backing root")?;
        let reopener =
            owsfs_sys::fs::Reopener::new().map_err(|e| FsError::io("open /proc/self/fd", e))?;
        let inodes = InodeTable::new(root_fd, BackingIno(st.st_ino));
        let (first_fh, orphans) = match &opts.succession {
            Some(s) => {
                inherit_nodes(&inodes, s)?;
                let orphans = orphans::Orphanage::open(&s.orphans, s.incarnation > 0)?;
                ((u64::from(s.incarnation) << 48) | 1, Some(orphans))
            }
            None => (1, None),
        };
        Ok(Core {
            backing_root: backing_root.to_path_buf(),
            inodes,
            handles: DashMap::new(),
            dirs: DashMap::new(),
            next_fh: AtomicU64::new(first_fh),
            first_fh,
            journal,
            orphans,
            reopener,
            passthrough: AtomicBool::new(opts.passthrough),
            posix_acl: AtomicBool::new(false),
            inode_budget: opts.inode_budget,
            budget_warned: AtomicBool::new(false),
            invalidate: std::sync::OnceLock::new(),
            invalidate_inode: std::sync::OnceLock::new(),
            page_dropper: std::sync::OnceLock::new(),
            reaper_kick: crossbeam_channel::bounded(1),
            own_uid: rustix::process::geteuid().as_raw(),
            own_gid: rustix::process::getegid().as_raw(),
            root_dev: st.st_dev,
            barrier: RwLock::new(()),
            gate: RwLock::new(()),
            freezer: Freezer::new(
                &opts
                    .side_dir
                    .unwrap_or_else(|| default_side_dir(backing_root, st.st_dev)),
            ),
            throttle: std::sync::OnceLock::new(),
            stopped: std::sync::OnceLock::new(),
            hydrate: std::sync::OnceLock::new(),
            stats: Stats::default(),
        })
    }

    pub fn backing_root(&self) -> &Path {
        &self.backing_root
    }

    /// Takes the write barrier: no mutation is in progress until the guard is dropped.
    pub fn barrier(&self) -> RwLockWriteGuard<'_, ()> {
        self.barrier.write()
    }

    /// Held by the adapter while it serves one kernel request of kind `op`; when it goes, the
    /// request's time goes into that kind's latency histogram.
    pub fn serving(&self, op: crate::stats::OpKind) -> Serving<'_> {
        // From before the gate: a request held back by a freeze waited too.
        let started = std::time::Instant::now();
        Serving {
            _gate: self.gate.read(),
            started,
            latency: &self.stats.latency[op as usize],
        }
    }

    /// Waits until no kernel request is being served and holds new ones back until the guard
    /// is dropped (a live rollback: nothing sees the tree half replaced). Nothing done while
    /// it is held may wait on a kernel request: not a syncfs of the mount, not a notification
    /// to the kernel (it may wait on a directory lock a held-back request holds).
    pub fn hold_requests(&self) -> RwLockWriteGuard<'_, ()> {
        self.gate.write()
    }

    /// Records, before its answer, that the change of request `unique` (without the resend
    /// bit) is made, for a change that cannot be told done from the tree
    /// ([`Core::made_before`]).
    pub fn record_made(&self, unique: u64) {
        self.inodes.log_done(unique);
    }

    /// Whether the change of request `unique` was made by an earlier daemon of the
    /// connection (the kernel sends it again because that daemon died before its answer).
    pub fn made_before(&self, unique: u64) -> bool {
        self.inodes.was_done(unique)
    }

    /// [`Core::hold_requests`], waiting at most `timeout` for the requests in flight (None:
    /// some still are).
    pub fn hold_requests_for(
        &self,
        timeout: std::time::Duration,
    ) -> Option<RwLockWriteGuard<'_, ()>> {
        self.gate.try_write_for(timeout)
    }

    /// [`Core::barrier`], waiting at most `timeout` (None: a mutation or a cut goes on).
    pub fn barrier_for(&self, timeout: std::time::Duration) -> Option<RwLockWriteGuard<'_, ()>> {
        self.barrier.try_write_for(timeout)
    }

    /// The tree below the root was replaced (a live rollback, under
    /// [`Core::hold_requests`]): every inode, handle and open directory from before is stale
    /// from now on (ESTALE), the root aside. Returns the names in the root the kernel may
    /// hold, to be invalidated once requests flow again.
    pub fn replaced_tree(&self) -> Vec<std::ffi::OsString> {
        self.inodes.next_era()
    }

    /// The inodes the kernel still holds of trees a live rollback replaced: their cached
    /// attributes are to be dropped, so that the kernel asks again, and a write(2) through the
    /// writeback cache to a file opened before (which checks the attributes first) fails with
    /// ESTALE instead of filling pages nobody will take.
    pub fn stale_inodes(&self) -> Vec<FuseIno> {
        self.inodes.stale()
    }

    /// The inode table's era (raised by each [`Core::replaced_tree`]).
    pub fn era(&self) -> u64 {
        self.inodes.era()
    }

    /// Runs `f` with the write barrier held shared, like a mutation (lazy hydration's
    /// background materializing).
    pub fn with_barrier_shared<R>(&self, f: impl FnOnce() -> R) -> R {
        let _shared = self.barrier.read();
        f()
    }

    /// The copy-on-first-write state of the cut in flight.
    pub fn freezer(&self) -> &Freezer {
        &self.freezer
    }

    /// Sets the function data writes call before they start (backpressure).
    /// The backpressure hook, called before each data write with whether the write is the
    /// kernel's page writeback (`FUSE_WRITE_CACHE`).
    pub fn set_throttle(&self, f: Throttle) {
        let _ = self.throttle.set(f);
    }

    /// Installs lazy hydration (once, before the mount serves).
    pub fn set_hydrator(&self, h: Arc<dyn Hydrate>) {
        let _ = self.hydrate.set(h);
    }

    /// How the FUSE and backing inode numbers of this mount map to each other.
    pub fn ino_map(&self) -> InoMap {
        self.inodes.inos()
    }

    /// The FUSE inode number of a backing inode number.
    pub fn fuse_ino(&self, ino: BackingIno) -> FuseIno {
        self.inodes.fuse_ino(ino)
    }

    /// The backing inode number of a FUSE inode number.
    pub fn backing_ino(&self, ino: FuseIno) -> BackingIno {
        self.inodes.backing_ino(ino)
    }

    /// The FUSE inode number of a backing file's `stat`.
    pub(super) fn ino_of(&self, st: &rustix::fs::Stat) -> FuseIno {
        self.inodes.fuse_ino(BackingIno(st.st_ino))
    }

    /// Shared barrier for one mutation; EROFS once the mount has stopped writing.
    fn mutation(&self) -> FsResult<RwLockReadGuard<'_, ()>> {
        let guard = self.barrier.read();
        if self.stopped.get().is_some() {
            return Err(FsError::errno(libc::EROFS, "writes stopped"));
        }
        Ok(guard)
    }

    /// Shared barrier for a data write, after the backpressure check.
    fn data_mutation(&self) -> FsResult<RwLockReadGuard<'_, ()>> {
        // A stopped mount fails at once: no waiting for an upload that will not come.
        if self.stopped.get().is_some() {
            return Err(FsError::errno(libc::EROFS, "writes stopped"));
        }
        if let Some(throttle) = self.throttle.get() {
            throttle(PAGE_WRITEBACK.with(std::cell::Cell::get)).map_err(|errno| {
                FsError::errno(
                    errno,
                    "refused: the cache's disk is full, so no commit can take the changes",
                )
            })?;
        }
        self.mutation()
    }

    /// Stops accepting writes for good (fail-stop): every mutation from now on fails with
    /// EROFS, reads go on. Returns once no mutation is in progress. The first reason stays.
    pub fn stop_writes(&self, reason: &str) {
        let _ = self.stopped.set(reason.to_string());
        drop(self.barrier.write());
    }

    /// Why writes were stopped, if they were.
    pub fn writes_stopped(&self) -> Option<&str> {
        self.stopped.get().map(String::as_str)
    }

    pub fn journal(&self) -> &Arc<Journal> {
        &self.journal
    }

    pub fn open_handles(&self) -> usize {
        self.handles.len()
    }

    /// The kernel enforces POSIX ACLs (it granted FUSE_POSIX_ACL): `system.posix_acl_*`
    /// xattrs are stored from now on, and creations in a directory with a default ACL leave
    /// the umask to it.
    pub fn enable_posix_acl(&self) {
        self.posix_acl.store(true, Ordering::Relaxed);
    }

    pub fn posix_acl_enabled(&self) -> bool {
        self.posix_acl.load(Ordering::Relaxed)
    }

    /// Turns passthrough off for later opens (the kernel refused it).
    pub fn disable_passthrough(&self) {
        self.passthrough.store(false, Ordering::Relaxed);
    }

    pub fn passthrough_enabled(&self) -> bool {
        self.passthrough.load(Ordering::Relaxed)
    }

    fn inode(&self, ino: FuseIno) -> FsResult<Arc<Inode>> {
        let inode = match self.inodes.get(ino) {
            Some(inode) => inode,
            None => self.revive(ino).inspect_err(|e| {
                if self.first_fh > 1 {
                    tracing::info!("inode {ino}: {e}");
                }
            })?,
        };
        if !self.inodes.is_current(&inode) {
            return Err(FsError::errno(
                libc::ESTALE,
                "inode from before a rollback of the workspace",
            ));
        }
        Ok(inode)
    }

    fn handle(&self, fh: u64) -> FsResult<Arc<Handle>> {
        let handle = self
            .handles
            .get(&fh)
            .map(|h| Arc::clone(h.value()))
            .ok_or_else(|| FsError::errno(libc::EBADF, "file handle not known"))?;
        if handle.era != self.inodes.era() {
            return Err(FsError::errno(
                libc::ESTALE,
                "file opened before a rollback of the workspace",
            ));
        }
        Ok(handle)
    }

    /// `/proc/self/fd/N` of a descriptor, to reach an `O_PATH` inode with calls that take a path.
    fn proc_path(fd: &impl AsFd) -> CString {
        owsfs_sys::fs::fd_cpath(fd.as_fd()).unwrap_or_default()
    }

    /// Opens the file `fd` names again for I/O, without moving its atime where allowed.
    fn reopen_fd(&self, fd: BorrowedFd<'_>, flags: OFlags) -> rustix::io::Result<OwnedFd> {
        let m = Mode::empty();
        match self.reopener.reopen(fd, flags | owsfs_sys::fs::NOATIME, m) {
            Err(rustix::io::Errno::PERM) => self.reopener.reopen(fd, flags, m),
            r => r,
        }
    }

    /// Opens the inode's backing file for I/O.
    fn reopen(&self, inode: &Inode, flags: OFlags) -> FsResult<File> {
        let fd = self
            .reopen_fd(inode.fd.as_fd(), flags)
            .ctx("open backing file")?;
        Ok(File::from(fd))
    }

    /// The path of an inode below the root. A directory whose place the table does not know
    /// (reached by a file handle) is placed by climbing its backing directory's "..": the
    /// journal names directories by path, and a wrong one would leave changes out of a cut.
    fn path_of(&self, ino: FuseIno) -> Option<PathBuf> {
        self.inodes.path_of(ino).or_else(|| {
            let inode = self.inodes.get(ino)?;
            if inode.kind != NodeKind::Dir {
                return None;
            }
            self.backing_path_of_dir(&inode.fd)
        })
    }

    fn child_path(&self, parent: FuseIno, name: &OsStr) -> PathBuf {
        // An unknown parent path only weakens a hint: the cut rescans what it cannot place.
        self.path_of(parent)
            .map(|p| p.join(name))
            .unwrap_or_else(|| PathBuf::from(name))
    }

    /// The path below the backing root of backing directory `dir`, found by climbing ".."
    /// and looking for each directory's name in its parent; None when the climb leaves the
    /// backing tree (a directory outside it, or one in a rollback's trash).
    pub(super) fn backing_path_of_dir(&self, dir: &impl AsFd) -> Option<PathBuf> {
        let root = rustix::fs::fstat(&self.inodes.get(crate::ROOT_INO)?.fd).ok()?;
        let mut names: Vec<std::ffi::OsString> = Vec::new();
        let mut cur = rustix::io::dup(dir).ok()?;
        for _ in 0..4096 {
            let st = rustix::fs::fstat(&cur).ok()?;
            if st.st_dev != root.st_dev {
                return None;
            }
            if st.st_ino == root.st_ino {
                return Some(names.iter().rev().collect());
            }
            let parent = crate::openat_noatime(
                &cur,
                "..",
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            )
            .ok()?;
            if rustix::fs::fstat(&parent).ok()?.st_ino == st.st_ino {
                return None; // the filesystem's root
            }
            let mut listing = rustix::fs::Dir::read_from(&parent).ok()?;
            let name = loop {
                let entry = listing.read()?.ok()?;
                let n = entry.file_name().to_bytes();
                if entry.ino() == st.st_ino && n != b"." && n != b".." {
                    break std::ffi::OsStr::from_bytes(n).to_os_string();
                }
            };
            names.push(name);
            cur = parent;
        }
        None
    }

    /// Appends a mutation of file `ino`, with its place recorded the first time it gets dirty.
    fn journal_file_op(&self, ino: FuseIno, op: Op) -> FsResult<()> {
        self.journal
            .append_file_op(ino, || self.place_of(ino), op)?;
        Ok(())
    }

    /// Where file `ino` is. Its path, where the table knows one; otherwise (the name it was
    /// known by went, and it was opened before) whether it still has names elsewhere: then
    /// the cut must look for them, or they would keep the old content in the store.
    fn place_of(&self, ino: FuseIno) -> Place {
        if self.is_orphan(ino) {
            return Place::Nameless;
        }
        if let Some(p) = self.inodes.path_of(ino) {
            return Place::Path(p);
        }
        let nameless = self
            .inodes
            .get(ino)
            .and_then(|i| rustix::fs::fstat(&i.fd).ok())
            .is_some_and(|st| st.st_nlink == 0);
        if nameless {
            Place::Nameless
        } else {
            Place::Unknown
        }
    }
}

/// Starts the node log of a daemon of a connection: with the inodes the earlier daemons
/// handed out (read from the log they left) for every one after the first.
fn inherit_nodes(inodes: &InodeTable, s: &Succession) -> FsResult<()> {
    let earlier = if s.incarnation == 0 {
        Default::default()
    } else {
        crate::nodes::read(&s.node_log).map_err(|e| FsError::io("read the node log", e))?
    };
    let log = crate::nodes::NodeLog::create(&s.node_log, &earlier)
        .map_err(|e| FsError::io("write the node log", e))?;
    if s.incarnation > 0 {
        tracing::info!(
            "taking over the kernel connection: {} inodes and {} open handles of earlier \
             daemons can be opened again",
            earlier.nodes.len(),
            earlier.opens.len()
        );
    }
    inodes.keep_log(log, earlier, s.incarnation > 0);
    Ok(())
}

/// Where side files go when the caller names no place: beside the backing root, if that is on
/// the backing root's file system (device `dev`); else the temporary directory.
fn default_side_dir(backing_root: &Path, dev: u64) -> PathBuf {
    let beside = std::fs::canonicalize(backing_root)
        .ok()
        .and_then(|root| root.parent().map(Path::to_path_buf))
        .filter(|parent| rustix::fs::stat(parent).is_ok_and(|st| st.st_dev == dev));
    beside.unwrap_or_else(|| {
        let tmp = std::env::temp_dir();
        tracing::info!(
            "copy-on-first-write saves bytes in {}: the directory above the backing root {} \
             is on another file system",
            tmp.display(),
            backing_root.display()
        );
        tmp
    })
}

thread_local! {
    /// Set by the adapter while it serves a write of the kernel's page writeback, which a cut's
    /// syncfs may be waiting for (`Core::write_pages`).
    static PAGE_WRITEBACK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Marks the backing root no-atime (`chattr +A`), which ext4 and xfs pass on to every file and
/// directory created under it. The daemon's own opens say `O_NOATIME`, but a passthrough read
/// goes through a backing file the kernel opens with the reader's flags, on the backing mount:
/// only the inode flag keeps that read from moving the atime getattr reports. Once per cache
/// (changing the flag touches the root's ctime); a filesystem without the flag (tmpfs) is left
/// as it is.
fn noatime_inherited(backing_root: &Path) {
    let set = || -> rustix::io::Result<()> {
        let fd = rustix::fs::open(
            backing_root,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | owsfs_sys::fs::NOATIME,
            Mode::empty(),
        )?;
        owsfs_sys::fs::set_noatime_inherited(&fd)
    };
    if let Err(e) = set() {
        tracing::debug!("backing root not marked no-atime: {e}");
    }
}

/// The guard of one request being served (see [`Core::serving`]).
pub struct Serving<'a> {
    _gate: RwLockReadGuard<'a, ()>,
    started: std::time::Instant,
    latency: &'a crate::stats::Histogram,
}

impl Drop for Serving<'_> {
    fn drop(&mut self) {
        self.latency.observe(self.started.elapsed());
    }
}

//! The passthrough filesystem core: POSIX operations over the backing directory, each mutation
//! recorded in the journal before it is performed. Nothing here knows about the kernel
//! protocol, so tests drive it directly on a temporary directory.

use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use fuser::{FileAttr, FileType, INodeNo};
use owsfs_journal::{Journal, NodeKind, Op};
use parking_lot::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use rustix::fs::{AtFlags, Mode, OFlags, RenameFlags, Timespec, Timestamps};

use crate::error::{Context, FsError, FsResult};
use crate::freeze::Freezer;
use crate::hydrate::Hydrate;
use crate::inode::{Inode, InodeTable, ROOT_INO};
use crate::stats::Stats;

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
}

impl Default for CoreOptions {
    /// Passthrough is off by default: while a file is open by passthrough the kernel lets no
    /// writer open it, and writes must go through the daemon.
    fn default() -> Self {
        CoreOptions {
            passthrough: false,
            inode_budget: usize::MAX,
            side_dir: None,
        }
    }
}

/// How long an open for writing waits for the RELEASE of passthrough readers that may
/// already have closed, before it is refused with ETXTBSY.
const PASSTHROUGH_RELEASE_WAIT: Duration = Duration::from_millis(200);

/// Tells the kernel to drop the cached name `name` in directory `parent`.
pub type Invalidator = Box<dyn Fn(u64, &OsStr) -> std::io::Result<()> + Send + Sync>;

/// The caller of an operation, for ownership of what it creates.
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

/// A name and its attributes, as returned by lookup and the create family.
#[derive(Clone, Copy, Debug)]
pub struct Entry {
    pub attr: FileAttr,
}

/// How the kernel serves an open file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoMode {
    /// Reads and writes go through the daemon and the kernel page cache.
    Cached,
    /// Read-only: the kernel reads the backing file directly (FUSE passthrough). While such
    /// an open exists, the kernel accepts only passthrough opens of the inode, so writers are
    /// refused (ETXTBSY) until the readers close.
    Passthrough,
}

/// An open file.
#[derive(Debug)]
pub struct Handle {
    pub ino: u64,
    pub file: File,
    mode: Mutex<IoMode>,
}

impl Handle {
    pub fn mode(&self) -> IoMode {
        *self.mode.lock()
    }
}

/// An open directory: its entries, read at opendir and again on rewind.
#[derive(Debug)]
struct DirHandle {
    ino: u64,
    /// Shared with the readdir replies in flight, which take entries from it without copies.
    entries: Arc<Vec<DirEntry>>,
    read_once: bool,
}

/// The entries of an open directory from some offset on, for one readdir reply. It shares
/// the listing with the handle: a reply takes the entries that fit and copies nothing, so a
/// directory of n entries costs O(n) over all its replies, not O(n²).
#[derive(Clone, Debug)]
pub struct DirEntries {
    entries: Arc<Vec<DirEntry>>,
    start: usize,
}

impl DirEntries {
    /// Each entry with the offset the kernel passes to continue after it.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &DirEntry)> {
        let start = self.start.min(self.entries.len());
        self.entries[start..]
            .iter()
            .enumerate()
            .map(move |(i, e)| ((start + i + 1) as u64, e))
    }

    /// How many entries are left from the offset on.
    pub fn len(&self) -> usize {
        self.entries.len().saturating_sub(self.start)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One directory entry, for readdir.
#[derive(Clone, Debug)]
pub struct DirEntry {
    pub ino: u64,
    pub kind: FileType,
    pub name: OsString,
}

/// What changes in `setattr`.
#[derive(Clone, Copy, Debug, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeSpec>,
    pub mtime: Option<TimeSpec>,
    pub fh: Option<u64>,
    /// The caller lacks CAP_FSETID: a truncate clears the set-id bits.
    pub kill_suidgid: bool,
}

/// A time to set, or "now".
#[derive(Clone, Copy, Debug)]
pub enum TimeSpec {
    Now,
    At(SystemTime),
}

/// The filesystem core.
pub struct Core {
    backing_root: PathBuf,
    inodes: InodeTable,
    handles: DashMap<u64, Arc<Handle>>,
    dirs: DashMap<u64, Arc<Mutex<DirHandle>>>,
    next_fh: AtomicU64,
    journal: Arc<Journal>,
    proc_self_fd: OwnedFd,
    passthrough: AtomicBool,
    inode_budget: usize,
    budget_warned: AtomicBool,
    /// Asks the kernel to drop a cached name (FUSE_NOTIFY_INVAL_ENTRY), so that it forgets the
    /// inode; set by the mount once the session exists.
    invalidate: std::sync::OnceLock<Invalidator>,
    /// Wakes the reaper when the inode table nears its budget.
    reaper_kick: (Mutex<bool>, parking_lot::Condvar),
    /// The daemon's own ids, restored after acting as a caller.
    own_uid: u32,
    own_gid: u32,
    root_dev: u64,
    /// Mutations hold it shared from their journal record to the end of their operation; a
    /// cut holds it exclusively, so it sees no mutation half done.
    barrier: RwLock<()>,
    freezer: Freezer,
    /// Called before a data write takes the barrier: slows writers down while the uploader
    /// lags too far behind (set by the daemon).
    throttle: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>,
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
        let root_fd = rustix::fs::open(
            backing_root,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .ctx("open backing root")?;
        let st = rustix::fs::fstat(&root_fd).ctx("stat backing root")?;
        let proc_self_fd = rustix::fs::open(
            "/proc/self/fd",
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .ctx("open /proc/self/fd")?;
        Ok(Core {
            backing_root: backing_root.to_path_buf(),
            inodes: InodeTable::new(root_fd, st.st_ino),
            handles: DashMap::new(),
            dirs: DashMap::new(),
            next_fh: AtomicU64::new(1),
            journal,
            proc_self_fd,
            passthrough: AtomicBool::new(opts.passthrough),
            inode_budget: opts.inode_budget,
            budget_warned: AtomicBool::new(false),
            invalidate: std::sync::OnceLock::new(),
            reaper_kick: (Mutex::new(false), parking_lot::Condvar::new()),
            own_uid: rustix::process::geteuid().as_raw(),
            own_gid: rustix::process::getegid().as_raw(),
            root_dev: st.st_dev,
            barrier: RwLock::new(()),
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
    pub fn set_throttle(&self, f: Box<dyn Fn() + Send + Sync>) {
        let _ = self.throttle.set(f);
    }

    /// Installs lazy hydration (once, before the mount serves).
    pub fn set_hydrator(&self, h: Arc<dyn Hydrate>) {
        let _ = self.hydrate.set(h);
    }

    fn hyd(&self) -> Option<&dyn Hydrate> {
        self.hydrate
            .get()
            .map(|h| h.as_ref())
            .filter(|h| h.active())
    }

    /// Lazy hydration: the entries of directory `dir` exist in the backing directory. Called
    /// before the operation takes the barrier (materializing takes it shared).
    fn materialize(&self, dir: &Inode) -> FsResult<()> {
        let Some(h) = self.hyd() else {
            return Ok(());
        };
        if dir.kind != FileType::Directory {
            return Ok(());
        }
        let bino = self.inodes.fuse_ino(dir.ino);
        if !h.dir_pending(bino) {
            return Ok(());
        }
        let _barrier = self.barrier.read();
        h.materialize(bino, dir.fd.as_fd())
            .map_err(|e| FsError::io("materialize a directory from the store", e))
    }

    /// [`Core::materialize`] for the directory `name` in `dir`, if it is one (before it is
    /// removed or replaced: an unmaterialized directory looks empty).
    fn materialize_child(&self, dir: &Inode, name: &OsStr) -> FsResult<()> {
        let Some(h) = self.hyd() else {
            return Ok(());
        };
        let Ok(st) = rustix::fs::statat(&dir.fd, name, AtFlags::SYMLINK_NOFOLLOW) else {
            return Ok(());
        };
        if st.st_mode & libc::S_IFMT != libc::S_IFDIR || !h.dir_pending(st.st_ino) {
            return Ok(());
        }
        let fd = rustix::fs::openat(
            &dir.fd,
            name,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .ctx("open a directory to materialize")?;
        let _barrier = self.barrier.read();
        h.materialize(st.st_ino, fd.as_fd())
            .map_err(|e| FsError::io("materialize a directory from the store", e))
    }

    /// Lazy hydration: bytes `[start, end)` of file `ino` (a FUSE number) are local.
    fn fetch(&self, ino: u64, start: u64, end: u64) -> FsResult<()> {
        let Some(h) = self.hyd() else {
            return Ok(());
        };
        if start >= end {
            return Ok(());
        }
        h.fetch(self.inodes.fuse_ino(ino), start, end)
            .map_err(|e| FsError::io("fetch file content from the store", e))
    }

    /// Before a truncate to `size` of a file the running cut has frozen: the bytes it drops
    /// are saved for the cut, so they must be local (rare: truncating a file that is both
    /// being uploaded and not yet fetched).
    fn fetch_if_frozen(&self, ino: u64, size: u64) -> FsResult<()> {
        if self.hyd().is_some()
            && !self.whole(ino)
            && self.freezer.is_frozen(self.inodes.fuse_ino(ino))
        {
            self.fetch(ino, size, u64::MAX)?;
        }
        Ok(())
    }

    /// File `ino` (a FUSE number) is whole: no byte of it is still only in the store.
    fn whole(&self, ino: u64) -> bool {
        self.hyd()
            .is_none_or(|h| h.whole(self.inodes.fuse_ino(ino)))
    }

    /// Lazy hydration: file `ino` (a FUSE number) is truncated to `size` next.
    fn hyd_truncate(&self, ino: u64, size: u64) {
        if let Some(h) = self.hyd() {
            h.truncate(self.inodes.fuse_ino(ino), size);
        }
    }

    /// The name `name` in `dir` goes away next (unlink, or replaced by a rename): if it is the
    /// last name of a file, lazy hydration forgets it.
    fn hyd_removing(&self, st: &rustix::fs::Stat) {
        if let Some(h) = self.hyd()
            && st.st_mode & libc::S_IFMT == libc::S_IFREG
            && st.st_nlink <= 1
        {
            h.removed(st.st_ino);
        }
    }

    /// FUSE inode number of a backing inode number (and back: the mapping is its own inverse).
    pub fn fuse_ino(&self, backing_ino: u64) -> u64 {
        self.inodes.fuse_ino(backing_ino)
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
            throttle();
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

    /// Copy-on-first-write before `[start, end)` of `ino` (a FUSE number) changes.
    fn freeze_before_change(&self, ino: u64, start: u64, end: u64, inode: &Inode) -> FsResult<()> {
        self.freezer
            .before_change(self.inodes.fuse_ino(ino), start, end, || {
                self.reopen(inode, OFlags::RDONLY | OFlags::CLOEXEC)
                    .map_err(|e| std::io::Error::from_raw_os_error(e.to_errno()))
            })
            .ctx("save bytes of a frozen file")
    }

    pub fn journal(&self) -> &Arc<Journal> {
        &self.journal
    }

    pub fn inode_count(&self) -> usize {
        self.inodes.len()
    }

    /// Where the reaper starts asking the kernel to forget (80% of the budget), and where it
    /// stops (70%). Both leave room for bursts, since the kernel forgets asynchronously.
    fn high_water(&self) -> usize {
        self.inode_budget / 10 * 8
    }

    fn low_water(&self) -> usize {
        self.inode_budget / 10 * 7
    }

    /// Installs the way to ask the kernel to drop names (once).
    pub fn set_invalidator(&self, f: Invalidator) {
        let _ = self.invalidate.set(f);
    }

    fn kick_reaper(&self) {
        let (lock, cv) = &self.reaper_kick;
        *lock.lock() = true;
        cv.notify_one();
    }

    /// The reaper's loop: whenever the inode table passes its high-water mark, ask the kernel
    /// to drop the least recently used names until it is back under the low-water mark. Runs
    /// on its own thread, never inside a request (the kernel takes directory locks to drop a
    /// name, which a request in flight may hold). Returns when `stop` says so.
    pub fn run_reaper(&self, stop: &AtomicBool) {
        let (lock, cv) = &self.reaper_kick;
        while !stop.load(Ordering::Relaxed) {
            {
                let mut kicked = lock.lock();
                if !*kicked {
                    cv.wait_for(&mut kicked, Duration::from_millis(500));
                }
                *kicked = false;
            }
            let cached = self.inodes.len();
            if cached < self.high_water() {
                continue;
            }
            let Some(invalidate) = self.invalidate.get() else {
                continue;
            };
            let excess = cached - self.low_water();
            for (parent, name) in self.inodes.eviction_candidates(excess) {
                // A name already gone or a busy entry is simply skipped.
                let _ = invalidate(parent, &name);
            }
        }
    }

    /// How many inodes may be cached by the kernel at once (see `CoreOptions::inode_budget`).
    pub fn inode_budget(&self) -> usize {
        self.inode_budget
    }

    pub fn open_handles(&self) -> usize {
        self.handles.len()
    }

    /// Turns passthrough off for later opens (the kernel refused it).
    pub fn disable_passthrough(&self) {
        self.passthrough.store(false, Ordering::Relaxed);
    }

    pub fn passthrough_enabled(&self) -> bool {
        self.passthrough.load(Ordering::Relaxed)
    }

    fn inode(&self, ino: u64) -> FsResult<Arc<Inode>> {
        self.inodes
            .get(ino)
            .ok_or_else(|| FsError::errno(libc::ESTALE, "inode not known"))
    }

    fn handle(&self, fh: u64) -> FsResult<Arc<Handle>> {
        self.handles
            .get(&fh)
            .map(|h| Arc::clone(h.value()))
            .ok_or_else(|| FsError::errno(libc::EBADF, "file handle not known"))
    }

    fn attr(&self, st: &rustix::fs::Stat) -> FileAttr {
        let kind = file_type(st.st_mode);
        FileAttr {
            ino: INodeNo(self.inodes.fuse_ino(st.st_ino)),
            size: st.st_size as u64,
            blocks: st.st_blocks as u64,
            atime: system_time(st.st_atime, st.st_atime_nsec as i64),
            mtime: system_time(st.st_mtime, st.st_mtime_nsec as i64),
            ctime: system_time(st.st_ctime, st.st_ctime_nsec as i64),
            crtime: UNIX_EPOCH,
            kind,
            perm: (st.st_mode & 0o7777) as u16,
            nlink: st.st_nlink as u32,
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev as u32,
            blksize: st.st_blksize as u32,
            flags: 0,
        }
    }

    /// `/proc/self/fd/N` of a descriptor, to reach an `O_PATH` inode with calls that take a path.
    fn proc_path(fd: &impl AsRawFd) -> CString {
        // The digits of a number never contain NUL.
        CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap_or_default()
    }

    /// Opens the inode's backing file for I/O.
    fn reopen(&self, inode: &Inode, flags: OFlags) -> FsResult<File> {
        let name = inode.fd.as_raw_fd().to_string();
        let fd = rustix::fs::openat(&self.proc_self_fd, name.as_str(), flags, Mode::empty())
            .ctx("open backing file")?;
        Ok(File::from(fd))
    }

    fn path_of(&self, ino: u64) -> Option<PathBuf> {
        self.inodes.path_of(ino)
    }

    fn child_path(&self, parent: u64, name: &OsStr) -> PathBuf {
        // An unknown parent path only weakens a hint: the cut rescans what it cannot place.
        self.inodes
            .child_path(parent, name)
            .unwrap_or_else(|| PathBuf::from(name))
    }

    /// Copy-on-first-write through an open descriptor of the file (which may be write-only,
    /// so the bytes are read through a fresh read-only open of the same file).
    fn freeze_before_change_fd(&self, ino: u64, start: u64, end: u64, file: &File) -> FsResult<()> {
        self.freezer
            .before_change(self.inodes.fuse_ino(ino), start, end, || {
                let name = file.as_raw_fd().to_string();
                rustix::fs::openat(
                    &self.proc_self_fd,
                    name.as_str(),
                    OFlags::RDONLY | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map(File::from)
                .map_err(std::io::Error::from)
            })
            .ctx("save bytes of a frozen file")
    }

    /// Appends a mutation of file `ino`, with its path recorded the first time it gets dirty.
    fn journal_file_op(&self, ino: u64, op: Op) -> FsResult<()> {
        self.journal
            .append_file_op(ino, || self.inodes.path_of(ino), op)?;
        Ok(())
    }

    // ---- lookup and attributes -------------------------------------------------------

    /// Resolves `name` in `parent` and counts a kernel reference to the result.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> FsResult<Entry> {
        self.stats.count(&self.stats.lookups);
        let dir = self.inode(parent)?;
        self.materialize(&dir)?;
        self.lookup_in(&dir, name)
    }

    fn lookup_in(&self, dir: &Inode, name: &OsStr) -> FsResult<Entry> {
        check_name(name)?;
        let st = rustix::fs::statat(&dir.fd, name, AtFlags::SYMLINK_NOFOLLOW).ctx("lookup")?;
        let ino = self.inodes.fuse_ino(st.st_ino);
        if self.inodes.reference_existing(ino, dir.ino, name) {
            return Ok(Entry {
                attr: self.attr(&st),
            });
        }
        self.wait_for_inode_room();
        self.lookup_new(dir, name)
    }

    /// When the inode table is full, waits a moment for the kernel's FORGETs: the reaper's
    /// invalidations make the kernel send them, and other threads serve them, but under load
    /// they can lag behind a burst of new names. Bounded, so open files beyond the budget
    /// still fail soon with ENFILE. Called before any barrier is taken.
    fn wait_for_inode_room(&self) {
        if self.inodes.len() < self.inode_budget {
            return;
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        while self.inodes.len() >= self.inode_budget && std::time::Instant::now() < deadline {
            self.kick_reaper();
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Lookup of a name whose inode is not in the table yet (just created, or not seen).
    fn lookup_new(&self, dir: &Inode, name: &OsStr) -> FsResult<Entry> {
        let cached = self.inodes.len();
        if cached >= self.high_water() {
            self.kick_reaper();
        }
        if cached >= self.inode_budget {
            if !self.budget_warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "the kernel holds {} inodes, the most this daemon's open file limit allows; \
                     new names fail with ENFILE until it forgets some (raise fs.nr_open and the \
                     hard `ulimit -n`, or `echo 2 > /proc/sys/vm/drop_caches`)",
                    self.inodes.len()
                );
            }
            return Err(FsError::errno(
                libc::ENFILE,
                "inode descriptor budget exhausted",
            ));
        }
        let fd = rustix::fs::openat(
            &dir.fd,
            name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .ctx("lookup open")?;
        // The descriptor, not the earlier stat, says which inode we hold.
        let st = rustix::fs::fstat(&fd).ctx("lookup stat")?;
        if st.st_dev != self.root_dev {
            return Err(FsError::errno(
                libc::EXDEV,
                "entry is on another filesystem",
            ));
        }
        let ino = self.inodes.fuse_ino(st.st_ino);
        self.inodes
            .reference(ino, file_type(st.st_mode), fd, dir.ino, name);
        Ok(Entry {
            attr: self.attr(&st),
        })
    }

    pub fn forget(&self, ino: u64, n: u64) {
        self.inodes.forget(ino, n);
    }

    pub fn getattr(&self, ino: u64) -> FsResult<FileAttr> {
        self.stats.count(&self.stats.getattrs);
        let inode = self.inode(ino)?;
        let st = rustix::fs::fstat(&inode.fd).ctx("getattr")?;
        Ok(self.attr(&st))
    }

    pub fn setattr(&self, ino: u64, set: SetAttr) -> FsResult<FileAttr> {
        self.stats.count(&self.stats.setattrs);
        let inode = self.inode(ino)?;
        let handle = match set.fh {
            Some(fh) => self.handles.get(&fh).map(|h| Arc::clone(h.value())),
            None => None,
        };
        let is_dir = inode.kind == FileType::Directory;
        let _barrier = if set.size.is_some() {
            self.data_mutation()?
        } else {
            self.mutation()?
        };
        if set.mode.is_some()
            || set.uid.is_some()
            || set.gid.is_some()
            || set.atime.is_some()
            || set.mtime.is_some()
        {
            let dir = if is_dir {
                self.path_of(ino).or_else(|| Some(PathBuf::new()))
            } else {
                None
            };
            if is_dir {
                self.journal.append(Op::Meta { ino, dir })?;
            } else {
                self.journal_file_op(ino, Op::Meta { ino, dir: None })?;
            }
        }
        // Every record before the first change: a setattr whose record failed changes nothing.
        if let Some(size) = set.size {
            self.journal_file_op(ino, Op::Truncate { ino, size })?;
        }
        if let Some(mode) = set.mode {
            let mode = Mode::from_raw_mode(mode & 0o7777);
            match &handle {
                Some(h) => rustix::fs::fchmod(&h.file, mode).ctx("chmod")?,
                None if inode.kind == FileType::Symlink => {
                    return Err(FsError::errno(libc::EOPNOTSUPP, "chmod of a symlink"));
                }
                None => rustix::fs::chmodat(
                    rustix::fs::CWD,
                    Self::proc_path(&inode.fd).as_c_str(),
                    mode,
                    AtFlags::empty(),
                )
                .ctx("chmod")?,
            }
        }
        if set.uid.is_some() || set.gid.is_some() {
            rustix::fs::chownat(
                &inode.fd,
                c"",
                set.uid.map(rustix::fs::Uid::from_raw),
                set.gid.map(rustix::fs::Gid::from_raw),
                AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
            )
            .ctx("chown")?;
        }
        if let Some(size) = set.size {
            self.fetch_if_frozen(ino, size)?;
            self.hyd_truncate(ino, size);
            self.freeze_before_change(ino, size, u64::MAX, &inode)?;
            let reopened;
            let file = match &handle {
                Some(h) => &h.file,
                None => {
                    reopened = self.reopen(&inode, OFlags::WRONLY | OFlags::CLOEXEC)?;
                    &reopened
                }
            };
            file.set_len(size).ctx("truncate")?;
            if set.kill_suidgid && set.mode.is_none() {
                self.kill_suidgid(ino, file)?;
            }
        }
        if set.atime.is_some() || set.mtime.is_some() {
            let times = Timestamps {
                last_access: timespec(set.atime),
                last_modification: timespec(set.mtime),
            };
            match &handle {
                Some(h) => rustix::fs::futimens(&h.file, &times).ctx("utimens")?,
                None => rustix::fs::utimensat(&inode.fd, c"", &times, AtFlags::EMPTY_PATH)
                    .ctx("utimens")?,
            }
        }
        let st = rustix::fs::fstat(&inode.fd).ctx("setattr stat")?;
        Ok(self.attr(&st))
    }

    pub fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        let inode = self.inode(ino)?;
        let target = rustix::fs::readlinkat(&inode.fd, c"", Vec::new()).ctx("readlink")?;
        Ok(target.into_bytes())
    }

    // ---- namespace -------------------------------------------------------------------

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
        parent: u64,
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
        let made = {
            let _as_caller = CallerCreds::assume(caller, self.own_uid, self.own_gid);
            create(&dir)?
        };
        let recorded = (|| {
            let mut entry = self.lookup_new(&dir, name)?;
            if let Some(mode) = mode
                && made
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
                h.created(self.inodes.fuse_ino(entry.attr.ino.0));
            }
            let record = self.journal.append(Op::Create {
                ino: entry.attr.ino.0,
                kind: node_kind(entry.attr.kind),
                path: dir_path.join(name),
            });
            if let Err(e) = record {
                // The kernel never learns of the entry: drop the reference lookup_new counted.
                self.inodes.forget(entry.attr.ino.0, 1);
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
    fn exact_mode(&self, entry: Entry, mode: u32) -> Result<Entry, (FsError, u64)> {
        let ino = entry.attr.ino.0;
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
            })
        })()
        .map_err(|e| (e, ino))
    }

    /// Removes the node `name` in `dir` that `create_node` just made. Nothing else can have
    /// used the name since: the kernel holds the directory's lock for the whole creation,
    /// and the daemon is the only writer of the backing directory.
    fn undo_create(&self, dir: &Inode, name: &OsStr) {
        let flags = match rustix::fs::statat(&dir.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => AtFlags::REMOVEDIR,
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
        parent: u64,
        name: &OsStr,
        mode: u32,
        rdev: u32,
        caller: Caller,
    ) -> FsResult<Entry> {
        self.stats.count(&self.stats.creates);
        let kind = rustix::fs::FileType::from_raw_mode(mode);
        self.create_node(parent, name, Some(mode), caller, |dir| {
            rustix::fs::mknodat(
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

    pub fn mkdir(&self, parent: u64, name: &OsStr, mode: u32, caller: Caller) -> FsResult<Entry> {
        self.stats.count(&self.stats.creates);
        self.create_node(parent, name, Some(mode), caller, |dir| {
            rustix::fs::mkdirat(&dir.fd, name, Mode::from_raw_mode(mode & 0o7777))
                .ctx("mkdir")
                .map(|()| true)
        })
    }

    pub fn symlink(
        &self,
        parent: u64,
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

    /// Creates and opens a regular file.
    pub fn create(
        &self,
        parent: u64,
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
            h.truncate(st.st_ino, 0);
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
        let inode = self.inode(entry.attr.ino.0)?;
        let mode = self.reserve_mode(&inode, writable(flags), !self.whole(entry.attr.ino.0))?;
        let (handle, fh) = self.insert_handle(&inode, file, mode);
        Ok((entry, handle, fh))
    }

    pub fn unlink(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        self.remove(parent, name, false)
    }

    pub fn rmdir(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        self.remove(parent, name, true)
    }

    fn remove(&self, parent: u64, name: &OsStr, dir: bool) -> FsResult<()> {
        self.stats.count(&self.stats.removes);
        check_name(name)?;
        let pdir = self.inode(parent)?;
        self.materialize(&pdir)?;
        if dir {
            self.materialize_child(&pdir, name)?;
        }
        let _barrier = self.mutation()?;
        let st = rustix::fs::statat(&pdir.fd, name, AtFlags::SYMLINK_NOFOLLOW).ctx("remove")?;
        let ino = self.inodes.fuse_ino(st.st_ino);
        self.journal.append(Op::Remove {
            ino,
            path: self.child_path(parent, name),
            dir,
        })?;
        self.freezer
            .before_name_change(&pdir.fd, name, false)
            .ctx("pin a frozen file")?;
        let flags = if dir {
            AtFlags::REMOVEDIR
        } else {
            AtFlags::empty()
        };
        rustix::fs::unlinkat(&pdir.fd, name, flags).ctx("remove")?;
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
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> FsResult<()> {
        self.stats.count(&self.stats.renames);
        check_name(name)?;
        check_name(newname)?;
        let known = libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE;
        if flags & !known != 0 {
            return Err(FsError::errno(libc::EINVAL, "unsupported rename flags"));
        }
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
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
        rustix::fs::renameat_with(
            &src_dir.fd,
            name,
            &dst_dir.fd,
            newname,
            RenameFlags::from_bits_retain(flags),
        )
        .ctx("rename")?;
        if let Some(dst) = &dst
            && !exchange
            && dst.st_ino != src.st_ino
        {
            self.hyd_removing(dst);
        }
        if let Some(dst) = dst
            && dst.st_ino != src.st_ino
            && let Some(other) = self.inodes.get(self.inodes.fuse_ino(dst.st_ino))
        {
            if exchange {
                other.set_loc(parent, name);
            } else {
                other.clear_loc_if(newparent, newname);
            }
        }
        if let Some(moved) = self.inodes.get(self.inodes.fuse_ino(src.st_ino)) {
            moved.set_loc(newparent, newname);
        }
        Ok(())
    }

    pub fn link(&self, ino: u64, newparent: u64, newname: &OsStr) -> FsResult<Entry> {
        self.stats.count(&self.stats.creates);
        check_name(newname)?;
        let inode = self.inode(ino)?;
        let dir = self.inode(newparent)?;
        self.materialize(&dir)?;
        let _barrier = self.mutation()?;
        self.journal.append(Op::Link {
            ino,
            path: self.child_path(newparent, newname),
        })?;
        let linked = rustix::fs::linkat(&inode.fd, c"", &dir.fd, newname, AtFlags::EMPTY_PATH);
        match linked {
            Ok(()) => {}
            // Linking by descriptor needs CAP_DAC_READ_SEARCH; the /proc path does not.
            Err(rustix::io::Errno::NOENT) | Err(rustix::io::Errno::PERM) if self.own_uid != 0 => {
                rustix::fs::linkat(
                    rustix::fs::CWD,
                    Self::proc_path(&inode.fd).as_c_str(),
                    &dir.fd,
                    newname,
                    AtFlags::SYMLINK_FOLLOW,
                )
                .ctx("link")?
            }
            Err(e) => return Err(FsError::errno(e.raw_os_error(), "link")),
        }
        // A hard link keeps the inode's recorded name; the new one is only an alias.
        let st = rustix::fs::statat(&dir.fd, newname, AtFlags::SYMLINK_NOFOLLOW).ctx("link")?;
        let linked_ino = self.inodes.fuse_ino(st.st_ino);
        if !self.inodes.reference_keep_loc(linked_ino) {
            return self.lookup_in(&dir, newname);
        }
        Ok(Entry {
            attr: self.attr(&st),
        })
    }

    // ---- files -----------------------------------------------------------------------

    /// Opens a file; the result says whether the kernel should serve it by passthrough.
    /// `kill_suidgid`: an unprivileged O_TRUNC, which clears the set-id bits.
    pub fn open(&self, ino: u64, flags: i32, kill_suidgid: bool) -> FsResult<(Arc<Handle>, u64)> {
        self.stats.count(&self.stats.opens);
        let inode = self.inode(ino)?;
        if inode.kind == FileType::Directory {
            return Err(FsError::errno(libc::EISDIR, "open of a directory"));
        }
        let write = writable(flags);
        if write && self.stopped.get().is_some() {
            return Err(FsError::errno(libc::EROFS, "writes stopped"));
        }
        // Recorded even once everything is local: the access list orders the next holder's
        // prefetch.
        if let Some(h) = self.hydrate.get() {
            h.opened(self.inodes.fuse_ino(ino), self.path_of(ino).as_deref());
        }
        let _barrier = (flags & libc::O_TRUNC != 0)
            .then(|| self.data_mutation())
            .transpose()?;
        // The mode is settled first: an open the kernel would refuse must change nothing.
        // A file that is not wholly local is read through the daemon, which fetches.
        let mode = self.reserve_mode(&inode, write, !self.whole(ino))?;
        let opened = (|| {
            // Without FUSE_ATOMIC_O_TRUNC the kernel truncates by SETATTR and strips O_TRUNC
            // from OPEN; should one arrive anyway, it is journaled and honoured like Linux
            // does (even for a read-only open).
            if flags & libc::O_TRUNC != 0 {
                self.journal_file_op(ino, Op::Truncate { ino, size: 0 })?;
                self.fetch_if_frozen(ino, 0)?;
                self.hyd_truncate(ino, 0);
                self.freeze_before_change(ino, 0, u64::MAX, &inode)?;
            }
            let file = self.reopen(&inode, backing_open_flags(flags))?;
            if kill_suidgid && flags & libc::O_TRUNC != 0 {
                self.kill_suidgid(ino, &file)?;
            }
            Ok(file)
        })();
        match opened {
            Ok(file) => Ok(self.insert_handle(&inode, file, mode)),
            Err(e) => {
                self.unreserve_mode(&inode, mode);
                Err(e)
            }
        }
    }

    /// Counts an open of `inode` in the I/O mode it gets: passthrough for a reader when no
    /// cached open exists (and passthrough is on); cached otherwise. A writer while passthrough
    /// readers are open is refused: the kernel would only take a passthrough open, and writes
    /// must reach the daemon.
    fn reserve_mode(&self, inode: &Inode, write: bool, cached: bool) -> FsResult<IoMode> {
        let mut open = inode.open.lock();
        if write && open.passthrough > 0 {
            // close(2) returns before its RELEASE reaches us, so a reader that just closed may
            // still be counted: give its RELEASE a moment before refusing the writer.
            let deadline = std::time::Instant::now() + PASSTHROUGH_RELEASE_WAIT;
            while open.passthrough > 0
                && !inode
                    .passthrough_gone
                    .wait_until(&mut open, deadline)
                    .timed_out()
            {}
        }
        if !write && !cached && open.cached == 0 && self.passthrough_enabled() {
            open.passthrough += 1;
            Ok(IoMode::Passthrough)
        } else if open.passthrough > 0 {
            Err(FsError::errno(
                libc::ETXTBSY,
                "open for writing while read by passthrough",
            ))
        } else {
            open.cached += 1;
            Ok(IoMode::Cached)
        }
    }

    fn unreserve_mode(&self, inode: &Inode, mode: IoMode) {
        let mut open = inode.open.lock();
        match mode {
            IoMode::Cached => open.cached -= 1,
            IoMode::Passthrough => {
                open.passthrough -= 1;
                if open.passthrough == 0 {
                    inode.passthrough_gone.notify_all();
                }
            }
        }
    }

    fn insert_handle(&self, inode: &Inode, file: File, mode: IoMode) -> (Arc<Handle>, u64) {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let handle = Arc::new(Handle {
            ino: inode.ino,
            file,
            mode: Mutex::new(mode),
        });
        self.handles.insert(fh, Arc::clone(&handle));
        (handle, fh)
    }

    /// The kernel refused passthrough for this open: serve it through the daemon instead, if
    /// no other passthrough open of the inode is alive (the kernel would refuse a cached one).
    pub fn demote_passthrough(&self, fh: u64) -> FsResult<IoMode> {
        let handle = self.handle(fh)?;
        let inode = self.inode(handle.ino)?;
        let mut open = inode.open.lock();
        let mut mode = handle.mode.lock();
        if *mode == IoMode::Passthrough {
            if open.passthrough > 1 {
                return Err(FsError::errno(
                    libc::EIO,
                    "passthrough refused while other passthrough opens exist",
                ));
            }
            open.passthrough -= 1;
            open.cached += 1;
            *mode = IoMode::Cached;
            inode.passthrough_gone.notify_all();
        }
        Ok(*mode)
    }

    /// Closes a file handle; returns the mode it had.
    pub fn release(&self, fh: u64) -> FsResult<IoMode> {
        let (_, handle) = self
            .handles
            .remove(&fh)
            .ok_or_else(|| FsError::errno(libc::EBADF, "release of unknown handle"))?;
        let mode = handle.mode();
        if let Some(inode) = self.inodes.get(handle.ino) {
            self.unreserve_mode(&inode, mode);
        }
        Ok(mode)
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        let handle = self.handle(fh)?;
        self.fetch(handle.ino, offset, offset.saturating_add(size as u64))?;
        let buf = read_at_most(&handle.file, offset, size as usize).ctx("read")?;
        self.stats.count(&self.stats.reads);
        self.stats.add(&self.stats.read_bytes, buf.len() as u64);
        Ok(buf)
    }

    /// Writes `data` at `offset`. `kill_suidgid`: the writer lacks CAP_FSETID, so the set-id
    /// bits go, as a local filesystem would do (the kernel leaves this to us, which spares a
    /// `security.capability` lookup per write).
    pub fn write(&self, fh: u64, offset: u64, data: &[u8], kill_suidgid: bool) -> FsResult<u32> {
        let handle = self.handle(fh)?;
        // Bytes around the written ones keep coming from the store: whole chunks are local
        // before the write (and before a frozen file saves its old bytes).
        self.fetch(handle.ino, offset, offset.saturating_add(data.len() as u64))?;
        let _barrier = self.data_mutation()?;
        // Recorded before anything changes, set-id bits included: a write whose record
        // failed changes nothing.
        self.journal_file_op(
            handle.ino,
            Op::Write {
                ino: handle.ino,
                offset,
                len: data.len() as u64,
            },
        )?;
        if kill_suidgid {
            self.kill_suidgid(handle.ino, &handle.file)?;
        }
        self.freeze_before_change_fd(handle.ino, offset, offset + data.len() as u64, &handle.file)?;
        let mut done = 0;
        while done < data.len() {
            match handle.file.write_at(&data[done..], offset + done as u64) {
                Ok(0) => return Err(FsError::errno(libc::EIO, "write wrote nothing")),
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // Out of space part way: like write(2), report what was written (the caller
                // retries the rest and gets the error then).
                Err(_) if done > 0 => break,
                Err(e) => return Err(FsError::io("write", e)),
            }
        }
        self.stats.count(&self.stats.writes);
        self.stats.add(&self.stats.write_bytes, done as u64);
        Ok(done as u32)
    }

    /// close(2) of one descriptor of an open file. Every write already reached the backing
    /// file, which is local, so there is nothing to push; the handle must exist.
    pub fn flush(&self, fh: u64) -> FsResult<()> {
        self.handle(fh).map(|_| ())
    }

    /// Clears set-user-id, and set-group-id when group-executable, like the VFS does when an
    /// unprivileged process writes or truncates.
    fn kill_suidgid(&self, ino: u64, fd: &impl std::os::fd::AsFd) -> FsResult<()> {
        let st = rustix::fs::fstat(fd).ctx("stat for set-id bits")?;
        let mut mode = st.st_mode & 0o7777;
        mode &= !libc::S_ISUID;
        if mode & libc::S_IXGRP != 0 {
            mode &= !libc::S_ISGID;
        }
        if mode != st.st_mode & 0o7777 {
            self.journal_file_op(ino, Op::Meta { ino, dir: None })?;
            rustix::fs::fchmod(fd, Mode::from_raw_mode(mode)).ctx("clear set-id bits")?;
        }
        Ok(())
    }

    pub fn fsync(&self, ino: u64, fh: u64, datasync: bool) -> FsResult<()> {
        self.stats.count(&self.stats.fsyncs);
        self.journal_fsync(ino);
        let handle = self.handle(fh)?;
        if datasync {
            rustix::fs::fdatasync(&handle.file).ctx("fdatasync")
        } else {
            rustix::fs::fsync(&handle.file).ctx("fsync")
        }
    }

    /// Notes an fsync in the journal. The record changes no dirty state and precedes no
    /// mutation, so failing to write it (a full disk) must not fail the fsync itself.
    fn journal_fsync(&self, ino: u64) {
        if let Err(e) = self.journal.append(Op::Fsync { ino }) {
            tracing::debug!("fsync of inode {ino} not recorded: {e}");
        }
    }

    pub fn fallocate(&self, fh: u64, offset: u64, len: u64, mode: i32) -> FsResult<()> {
        let handle = self.handle(fh)?;
        // Collapsing or inserting a range moves every byte after it.
        let len = if mode & (libc::FALLOC_FL_COLLAPSE_RANGE | libc::FALLOC_FL_INSERT_RANGE) != 0 {
            u64::MAX - offset
        } else {
            len
        };
        // Bytes it keeps (or moves) must be local first.
        self.fetch(handle.ino, offset, offset.saturating_add(len))?;
        let _barrier = self.data_mutation()?;
        self.freeze_before_change_fd(handle.ino, offset, offset.saturating_add(len), &handle.file)?;
        self.journal_file_op(
            handle.ino,
            Op::Write {
                ino: handle.ino,
                offset,
                len,
            },
        )?;
        rustix::fs::fallocate(
            &handle.file,
            rustix::fs::FallocateFlags::from_bits_retain(mode as u32),
            offset,
            len,
        )
        .ctx("fallocate")
    }

    /// SEEK_DATA and SEEK_HOLE (the kernel answers the other whences itself).
    pub fn lseek(&self, fh: u64, offset: i64, whence: i32) -> FsResult<i64> {
        let handle = self.handle(fh)?;
        if matches!(whence, libc::SEEK_DATA | libc::SEEK_HOLE) && !self.whole(handle.ino) {
            // Holes of a file still being fetched are not the file's holes: the whole file
            // counts as data, which lseek(2) allows.
            let size = rustix::fs::fstat(&handle.file).ctx("lseek stat")?.st_size as u64;
            let offset = offset as u64;
            if offset >= size {
                return Err(FsError::errno(libc::ENXIO, "lseek past the end"));
            }
            return Ok(if whence == libc::SEEK_DATA {
                offset
            } else {
                size
            } as i64);
        }
        let pos = match whence {
            libc::SEEK_DATA => rustix::fs::SeekFrom::Data(offset as u64),
            libc::SEEK_HOLE => rustix::fs::SeekFrom::Hole(offset as u64),
            libc::SEEK_SET => rustix::fs::SeekFrom::Start(offset as u64),
            libc::SEEK_END => rustix::fs::SeekFrom::End(offset),
            libc::SEEK_CUR => rustix::fs::SeekFrom::Current(offset),
            _ => return Err(FsError::errno(libc::EINVAL, "lseek whence")),
        };
        let at = rustix::fs::seek(&handle.file, pos).ctx("lseek")?;
        Ok(at as i64)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn copy_file_range(
        &self,
        fh_in: u64,
        offset_in: u64,
        fh_out: u64,
        offset_out: u64,
        len: u64,
    ) -> FsResult<u32> {
        let src = self.handle(fh_in)?;
        let dst = self.handle(fh_out)?;
        let len = len.min(u32::MAX as u64 & !0xfff);
        self.fetch(src.ino, offset_in, offset_in.saturating_add(len))?;
        self.fetch(dst.ino, offset_out, offset_out.saturating_add(len))?;
        let _barrier = self.data_mutation()?;
        self.freeze_before_change_fd(
            dst.ino,
            offset_out,
            offset_out.saturating_add(len),
            &dst.file,
        )?;
        self.journal_file_op(
            dst.ino,
            Op::Write {
                ino: dst.ino,
                offset: offset_out,
                len,
            },
        )?;
        let mut off_in = offset_in;
        let mut off_out = offset_out;
        let n = rustix::fs::copy_file_range(
            &src.file,
            Some(&mut off_in),
            &dst.file,
            Some(&mut off_out),
            len as usize,
        )
        .ctx("copy_file_range")?;
        self.stats.count(&self.stats.writes);
        self.stats.add(&self.stats.write_bytes, n as u64);
        Ok(n as u32)
    }

    // ---- directories -----------------------------------------------------------------

    pub fn opendir(&self, ino: u64) -> FsResult<u64> {
        let inode = self.inode(ino)?;
        if inode.kind != FileType::Directory {
            return Err(FsError::errno(libc::ENOTDIR, "opendir"));
        }
        self.materialize(&inode)?;
        let entries = self.read_dir_entries(&inode)?;
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.dirs.insert(
            fh,
            Arc::new(Mutex::new(DirHandle {
                ino,
                entries: Arc::new(entries),
                read_once: false,
            })),
        );
        Ok(fh)
    }

    fn read_dir_entries(&self, inode: &Inode) -> FsResult<Vec<DirEntry>> {
        // The inode's descriptor is O_PATH, which cannot list: open the directory itself.
        let fd = rustix::fs::openat(
            &inode.fd,
            c".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .ctx("opendir")?;
        let mut dir = rustix::fs::Dir::new(fd).ctx("opendir")?;
        let mut entries = Vec::new();
        while let Some(entry) = dir.read() {
            let entry = entry.ctx("readdir")?;
            let name = OsStr::from_bytes(entry.file_name().to_bytes()).to_os_string();
            let kind = match entry.file_type() {
                rustix::fs::FileType::Directory => FileType::Directory,
                rustix::fs::FileType::Symlink => FileType::Symlink,
                rustix::fs::FileType::Fifo => FileType::NamedPipe,
                rustix::fs::FileType::Socket => FileType::Socket,
                rustix::fs::FileType::CharacterDevice => FileType::CharDevice,
                rustix::fs::FileType::BlockDevice => FileType::BlockDevice,
                _ => FileType::RegularFile,
            };
            entries.push(DirEntry {
                ino: self.inodes.fuse_ino(entry.ino()),
                kind,
                name,
            });
        }
        Ok(entries)
    }

    /// The entries of an open directory from index `offset` on; offset 0 after a first read
    /// is a rewind and rereads the directory.
    pub fn readdir(&self, fh: u64, offset: u64) -> FsResult<DirEntries> {
        let dh = self
            .dirs
            .get(&fh)
            .map(|d| Arc::clone(d.value()))
            .ok_or_else(|| FsError::errno(libc::EBADF, "directory handle not known"))?;
        let mut dh = dh.lock();
        if offset == 0 && dh.read_once {
            let inode = self.inode(dh.ino)?;
            dh.entries = Arc::new(self.read_dir_entries(&inode)?);
        }
        dh.read_once = true;
        Ok(DirEntries {
            entries: Arc::clone(&dh.entries),
            start: usize::try_from(offset).unwrap_or(usize::MAX),
        })
    }

    /// Looks up one entry for readdirplus (counts a kernel reference).
    pub fn readdirplus_entry(&self, dir_ino: u64, name: &OsStr) -> FsResult<Entry> {
        let dir = self.inode(dir_ino)?;
        self.materialize(&dir)?;
        self.lookup_in(&dir, name)
    }

    pub fn releasedir(&self, fh: u64) {
        self.dirs.remove(&fh);
    }

    pub fn fsyncdir(&self, ino: u64, datasync: bool) -> FsResult<()> {
        self.stats.count(&self.stats.fsyncs);
        self.journal_fsync(ino);
        let inode = self.inode(ino)?;
        let fd = rustix::fs::openat(
            &inode.fd,
            c".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .ctx("fsyncdir open")?;
        if datasync {
            rustix::fs::fdatasync(&fd).ctx("fsyncdir")
        } else {
            rustix::fs::fsync(&fd).ctx("fsyncdir")
        }
    }

    pub fn statfs(&self) -> FsResult<rustix::fs::StatVfs> {
        let root = self.inode(ROOT_INO)?;
        rustix::fs::fstatvfs(&root.fd).ctx("statfs")
    }

    // ---- extended attributes ---------------------------------------------------------

    fn xattr_path(&self, inode: &Inode, name: Option<&OsStr>) -> FsResult<CString> {
        if inode.kind == FileType::Symlink {
            return Err(FsError::errno(libc::EOPNOTSUPP, "xattr on a symlink"));
        }
        // The kernel does not enforce POSIX ACLs for this filesystem, so storing them would
        // only pretend.
        if let Some(name) = name
            && name.as_bytes().starts_with(b"system.posix_acl_")
        {
            return Err(FsError::errno(libc::EOPNOTSUPP, "POSIX ACLs"));
        }
        Ok(Self::proc_path(&inode.fd))
    }

    pub fn getxattr(&self, ino: u64, name: &OsStr, size: u32) -> FsResult<XattrReply> {
        let inode = self.inode(ino)?;
        let path = self.xattr_path(&inode, Some(name))?;
        if size == 0 {
            let n = rustix::fs::getxattr_query(path.as_c_str(), name).ctx("getxattr")?;
            return Ok(XattrReply::Size(n as u32));
        }
        let mut buf = vec![0u8; size as usize];
        let n = rustix::fs::getxattr(path.as_c_str(), name, &mut buf[..]).ctx("getxattr")?;
        buf.truncate(n);
        Ok(XattrReply::Data(buf))
    }

    pub fn listxattr(&self, ino: u64, size: u32) -> FsResult<XattrReply> {
        let inode = self.inode(ino)?;
        if inode.kind == FileType::Symlink {
            return Ok(if size == 0 {
                XattrReply::Size(0)
            } else {
                XattrReply::Data(Vec::new())
            });
        }
        let path = Self::proc_path(&inode.fd);
        let mut buf = vec![0u8; if size == 0 { 64 * 1024 } else { size as usize }];
        let n = rustix::fs::listxattr(path.as_c_str(), &mut buf[..]).ctx("listxattr")?;
        buf.truncate(n);
        Ok(if size == 0 {
            XattrReply::Size(n as u32)
        } else {
            XattrReply::Data(buf)
        })
    }

    pub fn setxattr(&self, ino: u64, name: &OsStr, value: &[u8], flags: i32) -> FsResult<()> {
        let inode = self.inode(ino)?;
        let path = self.xattr_path(&inode, Some(name))?;
        let _barrier = self.mutation()?;
        self.journal_meta(&inode)?;
        rustix::fs::setxattr(
            path.as_c_str(),
            name,
            value,
            rustix::fs::XattrFlags::from_bits_retain(flags as u32),
        )
        .ctx("setxattr")
    }

    pub fn removexattr(&self, ino: u64, name: &OsStr) -> FsResult<()> {
        let inode = self.inode(ino)?;
        let path = self.xattr_path(&inode, Some(name))?;
        let _barrier = self.mutation()?;
        self.journal_meta(&inode)?;
        rustix::fs::removexattr(path.as_c_str(), name).ctx("removexattr")
    }

    fn journal_meta(&self, inode: &Inode) -> FsResult<()> {
        if inode.kind == FileType::Directory {
            self.journal.append(Op::Meta {
                ino: inode.ino,
                dir: Some(self.path_of(inode.ino).unwrap_or_default()),
            })?;
            Ok(())
        } else {
            self.journal_file_op(
                inode.ino,
                Op::Meta {
                    ino: inode.ino,
                    dir: None,
                },
            )
        }
    }

    /// access(2): checked against the mode bits as the kernel would (it normally checks
    /// itself, with default_permissions).
    pub fn access(&self, ino: u64, mask: i32, caller: Caller) -> FsResult<()> {
        let attr = self.getattr(ino)?;
        if mask == libc::F_OK {
            return Ok(());
        }
        let perm = attr.perm as i32;
        let granted = if caller.uid == 0 {
            let any_x = perm & 0o111 != 0 || attr.kind == FileType::Directory;
            libc::R_OK | libc::W_OK | if any_x { libc::X_OK } else { 0 }
        } else if caller.uid == attr.uid {
            (perm >> 6) & 7
        } else if caller.gid == attr.gid {
            (perm >> 3) & 7
        } else {
            perm & 7
        };
        if mask & !granted != 0 {
            return Err(FsError::errno(libc::EACCES, "access"));
        }
        Ok(())
    }
}

/// The answer to getxattr/listxattr: the size asked for, or the bytes.
#[derive(Debug)]
pub enum XattrReply {
    Size(u32),
    Data(Vec<u8>),
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

/// Reads up to `size` bytes at `offset` (fewer only at end of file) into a new buffer. The
/// bytes go straight into the buffer's spare capacity (`rustix::buffer::spare_capacity`
/// extends its length by what each `pread` filled), so the buffer is never zeroed first:
/// a read costs its copy, not a memset of up to 1 MiB as well.
fn read_at_most(file: &File, offset: u64, size: usize) -> rustix::io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(size);
    while buf.len() < size {
        let at = offset + buf.len() as u64;
        match rustix::io::pread(file, rustix::buffer::spare_capacity(&mut buf), at) {
            Ok(0) => break,
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(buf)
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

fn writable(flags: i32) -> bool {
    flags & libc::O_ACCMODE != libc::O_RDONLY
}

/// Flags for opening the backing file of an open(2) with `flags`. O_APPEND is dropped because
/// the kernel supplies the offset of every write (and pwrite ignores it under O_APPEND);
/// O_SYNC/O_DSYNC because the kernel sends fsync after such writes; O_DIRECT because the
/// kernel aligns nothing for us. Writers get O_RDWR so shared mappings can be read back.
fn backing_open_flags(flags: i32) -> OFlags {
    let mut out = if writable(flags) {
        OFlags::RDWR
    } else {
        OFlags::RDONLY
    };
    out |= OFlags::CLOEXEC;
    if flags & libc::O_TRUNC != 0 {
        out |= OFlags::TRUNC;
    }
    if flags & libc::O_NOATIME != 0 {
        out |= OFlags::NOATIME;
    }
    if flags & libc::O_EXCL != 0 {
        out |= OFlags::EXCL;
    }
    out
}

fn file_type(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

fn node_kind(kind: FileType) -> NodeKind {
    match kind {
        FileType::Directory => NodeKind::Dir,
        FileType::Symlink => NodeKind::Symlink,
        FileType::NamedPipe => NodeKind::Fifo,
        FileType::Socket => NodeKind::Socket,
        FileType::CharDevice => NodeKind::CharDev,
        FileType::BlockDevice => NodeKind::BlockDev,
        FileType::RegularFile => NodeKind::File,
    }
}

fn system_time(secs: i64, nsecs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsecs as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::from_nanos(nsecs as u64)
    }
}

fn timespec(t: Option<TimeSpec>) -> Timespec {
    match t {
        None => Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_OMIT,
        },
        Some(TimeSpec::Now) => Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_NOW,
        },
        Some(TimeSpec::At(t)) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Timespec {
                tv_sec: d.as_secs() as i64,
                tv_nsec: d.subsec_nanos() as _,
            },
            Err(e) => {
                let d = e.duration();
                let mut secs = -(d.as_secs() as i64);
                let mut nsec = d.subsec_nanos() as i64;
                if nsec > 0 {
                    secs -= 1;
                    nsec = 1_000_000_000 - nsec;
                }
                Timespec {
                    tv_sec: secs,
                    tv_nsec: nsec as _,
                }
            }
        },
    }
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
        // SAFETY: setfsgid/setfsuid take plain integers and touch only this thread's
        // credentials; they cannot violate memory safety.
        unsafe {
            libc::setfsgid(caller.gid);
            libc::setfsuid(caller.uid);
        }
        CallerCreds {
            restore: Some((own_uid, own_gid)),
        }
    }
}

impl Drop for CallerCreds {
    fn drop(&mut self) {
        if let Some((uid, gid)) = self.restore {
            // SAFETY: as in `assume`.
            unsafe {
                libc::setfsuid(uid);
                libc::setfsgid(gid);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;

    use owsfs_journal::JournalOptions;

    use super::*;

    struct Fixture {
        _dir: tempfile::TempDir,
        backing: PathBuf,
        core: Core,
    }

    const ROOT: Caller = Caller { uid: 0, gid: 0 };

    fn fixture(passthrough: bool) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join("backing");
        std::fs::create_dir(&backing).unwrap();
        let (journal, _) = Journal::open(
            &dir.path().join("journal"),
            &backing,
            JournalOptions::default(),
        )
        .unwrap();
        let core = Core::new(
            &backing,
            Arc::new(journal),
            CoreOptions {
                passthrough,
                ..CoreOptions::default()
            },
        )
        .unwrap();
        Fixture {
            _dir: dir,
            backing,
            core,
        }
    }

    fn name(s: &str) -> &OsStr {
        OsStr::new(s)
    }

    #[test]
    fn create_write_read_and_the_journal_sees_it() {
        let f = fixture(true);
        let d = f.core.mkdir(ROOT_INO, name("d"), 0o755, ROOT).unwrap();
        let dino = d.attr.ino.0;
        let (e, h, fh) = f
            .core
            .create(dino, name("x"), 0o644, libc::O_RDWR, ROOT)
            .unwrap();
        assert_eq!(
            h.mode(),
            IoMode::Cached,
            "a writer is served through the cache"
        );
        assert_eq!(f.core.write(fh, 10, b"hello", false).unwrap(), 5);
        assert_eq!(f.core.read(fh, 10, 100).unwrap(), b"hello");
        f.core.fsync(e.attr.ino.0, fh, false).unwrap();
        assert_eq!(f.core.release(fh).unwrap(), IoMode::Cached);
        assert_eq!(
            std::fs::read(f.backing.join("d/x")).unwrap()[10..],
            *b"hello"
        );

        let dirty = f.core.journal().dirty();
        let file = &dirty.files[&e.attr.ino.0];
        assert_eq!(file.path.as_deref(), Some(Path::new("d/x")));
        assert!(file.created);
        assert_eq!(file.extents.iter().collect::<Vec<_>>(), vec![(10, 15)]);
        assert!(dirty.dirs.contains(Path::new("")) && dirty.dirs.contains(Path::new("d")));
        // The inode number is the backing file's.
        let ino = std::fs::metadata(f.backing.join("d/x")).unwrap().ino();
        assert_eq!(e.attr.ino.0, ino);
    }

    #[test]
    fn lookups_are_counted_and_forgotten() {
        let f = fixture(true);
        std::fs::write(f.backing.join("a"), b"a").unwrap();
        let e1 = f.core.lookup(ROOT_INO, name("a")).unwrap();
        let e2 = f.core.lookup(ROOT_INO, name("a")).unwrap();
        assert_eq!(e1.attr.ino, e2.attr.ino);
        let before = f.core.inode_count();
        f.core.forget(e1.attr.ino.0, 1);
        assert_eq!(f.core.inode_count(), before, "one reference is left");
        f.core.forget(e1.attr.ino.0, 1);
        assert_eq!(f.core.inode_count(), before - 1);
        assert_eq!(
            f.core.getattr(e1.attr.ino.0).unwrap_err().to_errno(),
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
            f.core.lookup(ROOT_INO, name("..")).unwrap_err().to_errno(),
            libc::EINVAL
        );
    }

    #[test]
    fn the_inode_budget_bounds_descriptors_and_recovers_after_forget() {
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join("backing");
        std::fs::create_dir(&backing).unwrap();
        for i in 0..4 {
            std::fs::write(backing.join(format!("f{i}")), b"x").unwrap();
        }
        let (journal, _) = Journal::open(
            &dir.path().join("journal"),
            &backing,
            JournalOptions::default(),
        )
        .unwrap();
        // The root counts as one: room for two more.
        let opts = CoreOptions {
            inode_budget: 3,
            ..CoreOptions::default()
        };
        let core = Core::new(&backing, Arc::new(journal), opts).unwrap();
        let a = core.lookup(ROOT_INO, name("f0")).unwrap().attr.ino.0;
        core.lookup(ROOT_INO, name("f1")).unwrap();
        assert_eq!(
            core.lookup(ROOT_INO, name("f2")).unwrap_err().to_errno(),
            libc::ENFILE
        );
        // Known inodes are still found; a forgotten one makes room.
        core.lookup(ROOT_INO, name("f0")).unwrap();
        core.forget(a, 2);
        core.lookup(ROOT_INO, name("f2")).unwrap();
    }

    #[test]
    fn io_modes_never_mix_passthrough_and_cached_opens() {
        let f = fixture(true);
        std::fs::write(f.backing.join("a"), b"abc").unwrap();
        let ino = f.core.lookup(ROOT_INO, name("a")).unwrap().attr.ino.0;
        let (r1, fh1) = f.core.open(ino, libc::O_RDONLY, false).unwrap();
        assert_eq!(r1.mode(), IoMode::Passthrough);
        // A writer while a passthrough reader is open is refused, and changes nothing.
        assert_eq!(
            f.core
                .open(ino, libc::O_RDWR | libc::O_TRUNC, false)
                .unwrap_err()
                .to_errno(),
            libc::ETXTBSY
        );
        assert_eq!(std::fs::read(f.backing.join("a")).unwrap(), b"abc");
        f.core.release(fh1).unwrap();
        // Once the reader is gone, the writer opens; readers then share the cached mode.
        let (w, fhw) = f.core.open(ino, libc::O_WRONLY, false).unwrap();
        assert_eq!(w.mode(), IoMode::Cached);
        let (r, fhr) = f.core.open(ino, libc::O_RDONLY, false).unwrap();
        assert_eq!(r.mode(), IoMode::Cached);
        f.core.release(fhw).unwrap();
        f.core.release(fhr).unwrap();
        // A refused passthrough is demoted to the cache.
        let (r, fh) = f.core.open(ino, libc::O_RDONLY, false).unwrap();
        assert_eq!(r.mode(), IoMode::Passthrough);
        assert_eq!(f.core.demote_passthrough(fh).unwrap(), IoMode::Cached);
        f.core.release(fh).unwrap();
        // With passthrough off (the default), everything is cached and nothing is refused.
        let g = fixture(false);
        std::fs::write(g.backing.join("a"), b"abc").unwrap();
        let ino = g.core.lookup(ROOT_INO, name("a")).unwrap().attr.ino.0;
        let (r, _) = g.core.open(ino, libc::O_RDONLY, false).unwrap();
        assert_eq!(r.mode(), IoMode::Cached);
        let (w, _) = g.core.open(ino, libc::O_RDWR, false).unwrap();
        assert_eq!(w.mode(), IoMode::Cached);
    }

    #[test]
    fn rename_and_unlink_update_paths_in_the_journal() {
        let f = fixture(true);
        let a = f
            .core
            .mkdir(ROOT_INO, name("a"), 0o755, ROOT)
            .unwrap()
            .attr
            .ino
            .0;
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
            dirty.files[&e.attr.ino.0].path.as_deref(),
            Some(Path::new("b/f"))
        );
        // Later records about the file use its new path.
        let (_, fh) = f.core.open(e.attr.ino.0, libc::O_WRONLY, false).unwrap();
        f.core.write(fh, 1, b"y", false).unwrap();
        f.core.release(fh).unwrap();
        assert_eq!(std::fs::read(f.backing.join("b/f")).unwrap(), b"xy");
        f.core.unlink(a, name("f")).unwrap();
        let dirty = f.core.journal().dirty();
        assert_eq!(dirty.files[&e.attr.ino.0].path, None);
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
        assert_eq!(
            f.core.inodes.path_of(a.attr.ino.0),
            Some(PathBuf::from("b"))
        );
        assert_eq!(
            f.core.inodes.path_of(b.attr.ino.0),
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
                libc::RENAME_EXCHANGE,
            )
            .unwrap();
        assert_eq!(
            f.core.inodes.path_of(a.attr.ino.0),
            Some(PathBuf::from("c"))
        );
        assert_eq!(
            f.core.inodes.path_of(c.attr.ino.0),
            Some(PathBuf::from("b"))
        );
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
        };
        // The caller needs write access to the directory, as on a local disk.
        let d = f
            .core
            .mkdir(ROOT_INO, name("open"), 0o777, ROOT)
            .unwrap()
            .attr
            .ino
            .0;
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
            .attr
            .ino
            .0;
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

    #[test]
    fn readdir_lists_and_rewinds() {
        let f = fixture(true);
        for n in ["a", "b", "c"] {
            std::fs::write(f.backing.join(n), n).unwrap();
        }
        let fh = f.core.opendir(ROOT_INO).unwrap();
        let all = f.core.readdir(fh, 0).unwrap();
        let mut names: Vec<_> = all
            .iter()
            .map(|(_, e)| e.name.to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, vec![".", "..", "a", "b", "c"]);
        let offsets: Vec<u64> = all.iter().map(|(next, _)| next).collect();
        assert_eq!(
            offsets,
            vec![1, 2, 3, 4, 5],
            "each entry says where to go on"
        );
        let rest = f.core.readdir(fh, 3).unwrap();
        assert_eq!(rest.len(), 2);
        assert_eq!(
            rest.iter().map(|(next, _)| next).collect::<Vec<_>>(),
            vec![4, 5]
        );
        assert!(f.core.readdir(fh, 99).unwrap().is_empty());
        std::fs::write(f.backing.join("d"), b"d").unwrap();
        assert_eq!(f.core.readdir(fh, 0).unwrap().len(), 6, "offset 0 rereads");
        f.core.releasedir(fh);
    }

    /// Counts, per thread, the bytes allocated, and among them those allocated zero-filled
    /// (`vec![0; n]` asks for those), so tests can check what a call allocates.
    struct CountingAlloc;

    thread_local! {
        static ZEROED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
        static ALLOCATED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    fn count(cell: &'static std::thread::LocalKey<std::cell::Cell<usize>>, n: usize) {
        let _ = cell.try_with(|c| c.set(c.get() + n));
    }

    // SAFETY: every method forwards to the system allocator with the caller's arguments,
    // which uphold GlobalAlloc's contract; the counter is a const-initialized thread local
    // without a destructor, so counting allocates nothing.
    unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
        unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
            count(&ALLOCATED, layout.size());
            // SAFETY: forwarded as is (see the impl).
            unsafe { std::alloc::System.alloc(layout) }
        }

        unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
            count(&ALLOCATED, layout.size());
            count(&ZEROED, layout.size());
            // SAFETY: forwarded as is (see the impl).
            unsafe { std::alloc::System.alloc_zeroed(layout) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
            // SAFETY: forwarded as is (see the impl).
            unsafe { std::alloc::System.dealloc(ptr, layout) }
        }

        unsafe fn realloc(
            &self,
            ptr: *mut u8,
            layout: std::alloc::Layout,
            new_size: usize,
        ) -> *mut u8 {
            count(&ALLOCATED, new_size.saturating_sub(layout.size()));
            // SAFETY: forwarded as is (see the impl).
            unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
        }
    }

    #[global_allocator]
    static ALLOC: CountingAlloc = CountingAlloc;

    fn zeroed_bytes() -> usize {
        ZEROED.with(|z| z.get())
    }

    fn allocated_bytes() -> usize {
        ALLOCATED.with(|a| a.get())
    }

    /// A readdir reply takes its entries from the open directory's listing without copying
    /// the rest of it: a listing of n entries costs O(n) over all its replies, not O(n²).
    #[test]
    fn readdir_copies_no_entries() {
        let f = fixture(false);
        for i in 0..5000 {
            std::fs::write(f.backing.join(format!("entry-{i:05}")), b"").unwrap();
        }
        let fh = f.core.opendir(ROOT_INO).unwrap();
        let before = allocated_bytes();
        let rest = f.core.readdir(fh, 100).unwrap();
        let allocated = allocated_bytes() - before;
        assert!(
            allocated < 1024,
            "readdir at offset 100 allocated {allocated} bytes for {} entries",
            rest.len()
        );
        assert_eq!(rest.len(), 5002 - 100);
        f.core.releasedir(fh);
    }

    /// A read fills a buffer that was never zeroed, and returns what the file has: all of
    /// it in the middle, fewer bytes at the end, none past it.
    #[test]
    fn reads_do_not_zero_their_buffer() {
        let f = fixture(false);
        let content: Vec<u8> = (0..(1 << 20) + 5).map(|i| (i % 251) as u8).collect();
        std::fs::write(f.backing.join("big"), &content).unwrap();
        let ino = f.core.lookup(ROOT_INO, name("big")).unwrap().attr.ino.0;
        let (_, fh) = f.core.open(ino, libc::O_RDONLY, false).unwrap();
        let before = zeroed_bytes();
        let data = f.core.read(fh, 0, 1 << 20).unwrap();
        assert!(
            zeroed_bytes() - before < 4096,
            "a 1 MiB read zero-filled {} bytes",
            zeroed_bytes() - before
        );
        assert!(data == content[..1 << 20]);
        assert_eq!(f.core.read(fh, 1 << 20, 4096).unwrap(), content[1 << 20..]);
        assert_eq!(f.core.read(fh, 1000, 7).unwrap(), content[1000..1007]);
        assert!(f.core.read(fh, 2 << 20, 4096).unwrap().is_empty());
        assert!(f.core.read(fh, 0, 0).unwrap().is_empty());
        f.core.release(fh).unwrap();
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

    /// Copy-on-first-write side files go on the cache's file system (beside the backing
    /// directory), not to $TMPDIR.
    #[test]
    fn side_files_go_beside_the_backing_directory() {
        let f = fixture(false);
        std::fs::write(f.backing.join("frozen"), vec![1u8; 8192]).unwrap();
        let ino = f.core.lookup(ROOT_INO, name("frozen")).unwrap().attr.ino.0;
        let bino = f.core.fuse_ino(ino);
        let _frozen = f
            .core
            .freezer()
            .freeze([(bino, PathBuf::from("frozen"), 8192)]);
        let (_, fh) = f.core.open(ino, libc::O_WRONLY, false).unwrap();
        f.core.write(fh, 0, b"changed", false).unwrap();
        let side = f
            .core
            .freezer()
            .side_file_path(bino)
            .expect("the write saved the old bytes in a side file");
        let cache = std::fs::canonicalize(f._dir.path()).unwrap();
        assert!(
            side.starts_with(&cache) && !side.starts_with(&f.backing),
            "side file {} is not beside the backing directory {}",
            side.display(),
            f.backing.display()
        );
        assert_eq!(f.core.freezer().side_dir(), cache);
        f.core.release(fh).unwrap();
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
            ino: 99,
            kind: NodeKind::Dir,
            path: PathBuf::from(&name),
        });
        // Pad the segment until its last page has room for `meta` but not `meta + create`.
        let room = |j: &Journal| 4096 - j.stats().segment_offset % 4096;
        while !(meta..meta + create).contains(&room(&journal)) {
            journal.append(Op::Fsync { ino: 1 }).unwrap();
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

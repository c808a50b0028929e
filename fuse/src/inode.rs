//! The inode table: one entry per inode the kernel holds a reference to.
//!
//! Each inode keeps an `O_PATH` descriptor of its backing file, so operations address it by
//! handle rather than by path (renames and unlinks of open files need no bookkeeping), and the
//! backing inode cannot be freed and its number reused while the kernel still knows it. FUSE
//! inode numbers are the backing inode numbers (with the root's and 1 swapped: [`InoMap`]), so
//! hard links share one number and the numbers are stable across remounts of the same cache.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use owsfs_journal::{BackingIno, FuseIno, InoMap, NodeKind};
use parking_lot::Mutex;

/// The FUSE inode number of the workspace root.
pub const ROOT_INO: FuseIno = FuseIno::ROOT;

/// Handles of forgotten inodes kept for file-handle lookups, at most (some 60 to 100 bytes
/// each with the map's own); past it they are all dropped, and handles of those inodes go
/// stale (ESTALE).
const FORGOTTEN_HANDLES: usize = 1 << 20;

/// The backing file handle of an inode (None where the filesystem has none), and the
/// generation derived from it (FNV-1a of its bytes): the handle holds the backing inode's own
/// generation, so a reused inode number gets another one.
fn backing_handle(fd: &OwnedFd) -> (Option<Box<[u8]>>, u32) {
    match owsfs_local::handle::of(fd.as_fd(), Path::new("")) {
        Ok(h) => {
            let g = h.iter().fold(0x811c_9dc5u32, |g, b| {
                (g ^ u32::from(*b)).wrapping_mul(0x0100_0193)
            });
            (Some(h.into_boxed_slice()), g)
        }
        Err(_) => (None, 0),
    }
}

/// Open files of one inode, by the kernel I/O mode they put it in. The kernel refuses to mix
/// passthrough and cached opens of one inode; these counts are an upper bound of the kernel's
/// (they rise before the kernel's and fall after), so deciding from them is safe.
#[derive(Debug, Default)]
pub(crate) struct OpenCounts {
    pub cached: u32,
    pub passthrough: u32,
}

#[derive(Debug)]
pub struct Inode {
    pub ino: FuseIno,
    pub kind: NodeKind,
    /// The table's era when this inode entered it: an inode of an earlier era belongs to a
    /// tree a live rollback replaced ([`InodeTable::next_era`]).
    pub(crate) era: u64,
    pub(crate) fd: OwnedFd,
    nlookup: AtomicU64,
    /// Tick of the table's clock at the last lookup: the oldest go first when the table must
    /// shrink.
    last_used: AtomicU64,
    /// The directory and name this inode was last seen under; None once unlinked. Exact for
    /// directories (they have one parent); for hard-linked files it is one of the names.
    loc: Mutex<Option<(FuseIno, OsString)>>,
    pub(crate) open: Mutex<OpenCounts>,
    /// Signalled when the last passthrough open of this inode is released.
    pub(crate) passthrough_gone: parking_lot::Condvar,
    /// Held shared by a read from the backing file until its reply is sent, and exclusively
    /// by a direct write while it writes: a read that got the old bytes has put them in the
    /// page cache before the write drops those pages.
    pub(crate) direct_io: parking_lot::RwLock<()>,
    /// The backing file handle, kept once the kernel forgets the inode so that a file handle
    /// of it (`open_by_handle_at`, NFS) can open it again.
    pub(crate) handle: Option<Box<[u8]>>,
    /// What file handles of this inode carry: see [`backing_handle`].
    pub generation: u32,
    /// Opened again for a daemon that took over the kernel connection: the kernel's count of
    /// references is not known, so a FORGET may take more than this table counted.
    revived: bool,
}

impl Inode {
    /// Opened again for a daemon that took over the connection (its kernel references and
    /// opens are not all known).
    pub(crate) fn is_revived(&self) -> bool {
        self.revived
    }

    pub(crate) fn set_loc(&self, parent: FuseIno, name: &OsStr) {
        let mut loc = self.loc.lock();
        match &*loc {
            Some((p, n)) if *p == parent && n == name => {}
            _ => *loc = Some((parent, name.to_os_string())),
        }
    }

    /// Forgets the location if it is `(parent, name)`: that name was removed.
    pub(crate) fn clear_loc_if(&self, parent: FuseIno, name: &OsStr) {
        let mut loc = self.loc.lock();
        if matches!(&*loc, Some((p, n)) if *p == parent && n == name) {
            *loc = None;
        }
    }
}

/// Maps backing inode numbers to FUSE inode numbers and holds the inodes the kernel knows.
pub struct InodeTable {
    map: DashMap<FuseIno, Arc<Inode>>,
    /// The root directory is presented as `ROOT_INO`, and a backing inode numbered `ROOT_INO`
    /// (impossible on ext4, possible elsewhere) takes its number.
    inos: InoMap,
    clock: AtomicU64,
    /// Entries in `map`, kept alongside it so that counting costs no shard locks.
    count: std::sync::atomic::AtomicUsize,
    /// Raised by a live rollback: inodes of earlier eras are stale (ESTALE), the root aside.
    era: AtomicU64,
    /// Backing handles of inodes the kernel forgot, by number: a lookup of "." in one of them
    /// (a file handle decoded after the kernel evicted its inode) opens it by this handle.
    /// Only inodes the daemon handed out are in it, so a forged handle reaches nothing outside
    /// the workspace.
    forgotten: DashMap<FuseIno, Box<[u8]>>,
    /// Every inode handed to the kernel, on disk for a daemon that takes over the connection
    /// (`crate::nodes`); unset when the connection ends with this daemon.
    log: std::sync::OnceLock<crate::nodes::NodeLog>,
    /// The inodes an earlier daemon of this connection handed the kernel, by their backing
    /// handles: a request for one that is not in the table opens it again.
    revivable: DashMap<FuseIno, Box<[u8]>>,
    /// This table's daemon took over a connection: the kernel may send FORGETs of nodes an
    /// earlier daemon handed out, counted against an inode that took the number since.
    successor: std::sync::atomic::AtomicBool,
    /// With the node log: the file and directory handles that may be open (this daemon's,
    /// and earlier daemons' not known to be released), with the inode and backing handle
    /// each was opened on.
    opens: DashMap<u64, (FuseIno, Box<[u8]>)>,
    /// With the node log: the latest requests whose change was made (`Logged::done`), at
    /// most `DONE_KEPT`, oldest first.
    done: Mutex<std::collections::VecDeque<u64>>,
}

/// How many made changes the table remembers: far more than requests can be in flight.
const DONE_KEPT: usize = 4096;

impl InodeTable {
    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }

    pub fn new(root_fd: OwnedFd, root_backing_ino: BackingIno) -> Self {
        // The kernel made the root at mount with generation 0, and takes another for a
        // different inode (which it would then mark bad).
        let (handle, _) = backing_handle(&root_fd);
        let generation = 0;
        let map = DashMap::new();
        map.insert(
            ROOT_INO,
            Arc::new(Inode {
                ino: ROOT_INO,
                kind: NodeKind::Dir,
                era: 0,
                fd: root_fd,
                // The root is never forgotten.
                nlookup: AtomicU64::new(1 << 62),
                last_used: AtomicU64::new(u64::MAX),
                loc: Mutex::new(None),
                open: Mutex::new(OpenCounts::default()),
                passthrough_gone: parking_lot::Condvar::new(),
                direct_io: parking_lot::RwLock::new(()),
                handle,
                generation,
                revived: false,
            }),
        );
        InodeTable {
            map,
            inos: InoMap::new(root_backing_ino),
            clock: AtomicU64::new(0),
            count: std::sync::atomic::AtomicUsize::new(1),
            era: AtomicU64::new(0),
            forgotten: DashMap::new(),
            log: std::sync::OnceLock::new(),
            revivable: DashMap::new(),
            successor: std::sync::atomic::AtomicBool::new(false),
            opens: DashMap::new(),
            done: Mutex::new(std::collections::VecDeque::new()),
        }
    }

    /// Keeps the node log from now on, with the inodes an earlier daemon of the connection
    /// handed out (`revivable`, already in the log).
    pub(crate) fn keep_log(
        &self,
        log: crate::nodes::NodeLog,
        logged: crate::nodes::Logged,
        successor: bool,
    ) {
        self.successor.store(successor, Ordering::Relaxed);
        for (ino, handle) in logged.nodes {
            self.revivable.insert(ino, handle);
        }
        for (fh, opened) in logged.opens {
            self.opens.insert(fh, opened);
        }
        self.done.lock().extend(logged.done);
        let _ = self.log.set(log);
    }

    /// Logs that the change of request `unique` is made, before its answer (with the node
    /// log only).
    pub(crate) fn log_done(&self, unique: u64) {
        let Some(log) = self.log.get() else { return };
        {
            let mut done = self.done.lock();
            if done.len() == DONE_KEPT {
                done.pop_front();
            }
            done.push_back(unique);
        }
        let records = log.append_done(unique);
        self.maybe_rewrite(log, records);
    }

    /// Whether an earlier daemon (or this one) logged the change of request `unique` made.
    pub(crate) fn was_done(&self, unique: u64) -> bool {
        self.done.lock().contains(&unique)
    }

    /// Logs that handle `fh` was opened on `inode` (with the node log only).
    pub(crate) fn log_open(&self, fh: u64, inode: &Inode) {
        let (Some(log), Some(handle)) = (self.log.get(), &inode.handle) else {
            return;
        };
        self.opens.insert(fh, (inode.ino, handle.clone()));
        let records = log.append_open(fh, inode.ino, handle);
        self.maybe_rewrite(log, records);
    }

    /// Logs that handle `fh` was released.
    pub(crate) fn log_closed(&self, fh: u64) {
        if let Some(log) = self.log.get()
            && self.opens.remove(&fh).is_some()
        {
            let records = log.append_closed(fh);
            self.maybe_rewrite(log, records);
        }
    }

    /// The backing handle of the file handle `fh` was opened on, if the log has it.
    pub(crate) fn opened_on(&self, fh: u64) -> Option<Box<[u8]>> {
        self.opens.get(&fh).map(|e| e.value().1.clone())
    }

    /// For a daemon that took over a connection, the backing handle of an inode the kernel
    /// refers to that is not in the table: the one this daemon kept when the kernel forgot it
    /// (newer: a FORGET of a node an earlier daemon handed out may have taken the count of a
    /// file that got its number since, while the kernel holds that file), else the one an
    /// earlier daemon logged.
    pub(crate) fn successor_handle(&self, ino: FuseIno) -> Option<Box<[u8]>> {
        if !self.successor.load(Ordering::Relaxed) {
            return None;
        }
        self.forgotten_handle(ino)
            .or_else(|| self.revivable_handle(ino))
    }

    /// The backing handle of an inode an earlier daemon of this connection handed out.
    pub(crate) fn revivable_handle(&self, ino: FuseIno) -> Option<Box<[u8]>> {
        self.revivable.get(&ino).map(|h| h.value().clone())
    }

    /// A new entry of the table, referenced once by the kernel.
    fn new_inode(
        &self,
        ino: FuseIno,
        kind: NodeKind,
        fd: OwnedFd,
        loc: Option<(FuseIno, OsString)>,
        (handle, generation): (Option<Box<[u8]>>, u32),
        revived: bool,
    ) -> Arc<Inode> {
        Arc::new(Inode {
            ino,
            kind,
            era: self.era(),
            fd,
            nlookup: AtomicU64::new(1),
            last_used: AtomicU64::new(self.tick()),
            loc: Mutex::new(loc),
            open: Mutex::new(OpenCounts::default()),
            passthrough_gone: parking_lot::Condvar::new(),
            direct_io: parking_lot::RwLock::new(()),
            handle,
            generation,
            revived,
        })
    }

    /// Puts an inode of an earlier daemon back in the table (opened again by its handle),
    /// unless a concurrent request did; either way returns it.
    pub(crate) fn revive(&self, ino: FuseIno, kind: NodeKind, fd: OwnedFd) -> Arc<Inode> {
        match self.map.entry(ino) {
            Entry::Occupied(e) => Arc::clone(e.get()),
            Entry::Vacant(e) => {
                let (handle, generation) = backing_handle(&fd);
                let inode = self.new_inode(ino, kind, fd, None, (handle, generation), true);
                e.insert(Arc::clone(&inode));
                self.count.fetch_add(1, Ordering::Relaxed);
                inode
            }
        }
    }

    /// Appends a new inode to the node log; past twice what the table and the revivable
    /// inodes hold (at least 65,536 records), the log is written again from them.
    fn log_new(&self, ino: FuseIno, handle: Option<&[u8]>) {
        let (Some(log), Some(handle)) = (self.log.get(), handle) else {
            return;
        };
        let records = log.append(ino, handle);
        self.maybe_rewrite(log, records);
    }

    /// Past twice what the table, the revivable inodes and the open handles hold (at least
    /// 65,536 records), writes the log again from them.
    fn maybe_rewrite(&self, log: &crate::nodes::NodeLog, records: usize) {
        if records <= 2 * (self.len() + self.revivable.len() + self.opens.len()).max(1 << 15) {
            return;
        }
        log.rewrite(|| {
            let mut all = crate::nodes::Logged::default();
            for e in self.revivable.iter() {
                all.nodes.insert(*e.key(), e.value().clone());
            }
            // A successor's FORGET may take more than the kernel gave up (a stale one of a
            // reused number): what it kept at one may still be the kernel's.
            if self.successor.load(Ordering::Relaxed) {
                for e in self.forgotten.iter() {
                    all.nodes.insert(*e.key(), e.value().clone());
                }
            }
            for e in self.map.iter() {
                if let Some(h) = &e.value().handle
                    && *e.key() != ROOT_INO
                {
                    all.nodes.insert(*e.key(), h.clone());
                }
            }
            for e in self.opens.iter() {
                all.opens.insert(*e.key(), e.value().clone());
            }
            all.done.extend(self.done.lock().iter().copied());
            all
        });
    }

    /// The current era.
    pub fn era(&self) -> u64 {
        self.era.load(Ordering::Acquire)
    }

    /// Whether `inode` belongs to the current tree. The root always does: a live rollback
    /// keeps the backing root and replaces what is below it.
    pub(crate) fn is_current(&self, inode: &Inode) -> bool {
        inode.ino == ROOT_INO || inode.era == self.era()
    }

    /// Starts a new era (a live rollback replaced the tree below the root): every inode the
    /// table holds, the root aside, becomes stale. They stay until the kernel forgets them,
    /// so their backing inodes (and numbers) stay taken meanwhile. Returns the names the
    /// kernel may hold in the root, for invalidation.
    pub(crate) fn next_era(&self) -> Vec<OsString> {
        self.era.fetch_add(1, Ordering::AcqRel);
        // The forgotten inodes belong to the replaced tree (moved to the cache's trash): a
        // file handle of one must not open it again, nor may a node id of an earlier daemon.
        self.forgotten.clear();
        self.revivable.clear();
        let mut names = Vec::new();
        for entry in self.map.iter() {
            let inode = entry.value();
            if inode.ino == ROOT_INO {
                continue;
            }
            // Their names stay: nothing is recorded through a stale inode (every mutation
            // of one fails), and the reaper needs them to ask the kernel to drop them.
            if let Some((parent, name)) = &*inode.loc.lock()
                && *parent == ROOT_INO
            {
                names.push(name.clone());
            }
        }
        names
    }

    /// The inodes of earlier eras the kernel still holds (a live rollback replaced them).
    pub(crate) fn stale(&self) -> Vec<FuseIno> {
        let era = self.era();
        self.map
            .iter()
            .filter(|e| e.value().ino != ROOT_INO && e.value().era != era)
            .map(|e| *e.key())
            .collect()
    }

    /// How this table's FUSE and backing inode numbers map to each other.
    pub fn inos(&self) -> InoMap {
        self.inos
    }

    /// The FUSE inode number of a backing inode number.
    pub fn fuse_ino(&self, ino: BackingIno) -> FuseIno {
        self.inos.fuse(ino)
    }

    /// The backing inode number of a FUSE inode number.
    pub fn backing_ino(&self, ino: FuseIno) -> BackingIno {
        self.inos.backing(ino)
    }

    pub fn get(&self, ino: FuseIno) -> Option<Arc<Inode>> {
        self.map.get(&ino).map(|r| Arc::clone(r.value()))
    }

    /// Counts one more kernel reference to an inode already in the table; its generation.
    pub(crate) fn reference_existing(
        &self,
        ino: FuseIno,
        parent: FuseIno,
        name: &OsStr,
    ) -> Option<u32> {
        // Holding the shard read guard while incrementing keeps a concurrent forget (which
        // needs the write guard) from removing the entry between the check and the increment.
        let inode = self.map.get(&ino)?;
        inode.nlookup.fetch_add(1, Ordering::Relaxed);
        inode.last_used.store(self.tick(), Ordering::Relaxed);
        inode.set_loc(parent, name);
        Some(inode.generation)
    }

    /// Counts one more kernel reference to a known inode without changing its recorded name
    /// (a new hard link is an alias, and a file handle's lookup knows no name); its
    /// generation.
    pub(crate) fn reference_keep_loc(&self, ino: FuseIno) -> Option<u32> {
        let inode = self.map.get(&ino)?;
        inode.nlookup.fetch_add(1, Ordering::Relaxed);
        inode.last_used.store(self.tick(), Ordering::Relaxed);
        Some(inode.generation)
    }

    /// The backing handle of an inode the kernel forgot, if the daemon handed it out.
    pub(crate) fn forgotten_handle(&self, ino: FuseIno) -> Option<Box<[u8]>> {
        self.forgotten.get(&ino).map(|h| h.value().clone())
    }

    /// Counts one more kernel reference, inserting the inode with `fd` if it is new. `place`:
    /// the directory and name it was found under (None: reached by a file handle).
    pub(crate) fn reference(
        &self,
        ino: FuseIno,
        kind: NodeKind,
        fd: OwnedFd,
        place: Option<(FuseIno, &OsStr)>,
    ) -> Arc<Inode> {
        match self.map.entry(ino) {
            Entry::Occupied(e) => {
                e.get().nlookup.fetch_add(1, Ordering::Relaxed);
                e.get().last_used.store(self.tick(), Ordering::Relaxed);
                if let Some((parent, name)) = place {
                    e.get().set_loc(parent, name);
                }
                Arc::clone(e.get())
            }
            Entry::Vacant(e) => {
                let (handle, generation) = backing_handle(&fd);
                self.forgotten.remove(&ino);
                // The same file an earlier daemon handed out (the kernel's count of it is not
                // known), or another that took its number since (that node is stale). Only a
                // successor has any: the first daemon's lookups take no lock for it.
                let revived = self.successor.load(Ordering::Relaxed)
                    && self
                        .revivable
                        .remove(&ino)
                        .is_some_and(|(_, old)| handle.as_deref() == Some(&old[..]));
                let loc = place.map(|(p, n)| (p, n.to_os_string()));
                let inode = self.new_inode(ino, kind, fd, loc, (handle, generation), revived);
                e.insert(Arc::clone(&inode));
                self.count.fetch_add(1, Ordering::Relaxed);
                self.log_new(ino, inode.handle.as_deref());
                inode
            }
        }
    }

    /// Drops `n` kernel references; the inode leaves the table at zero, and is returned then.
    pub fn forget(&self, ino: FuseIno, n: u64) -> Option<Arc<Inode>> {
        if ino == ROOT_INO {
            return None;
        }
        if let Entry::Occupied(e) = self.map.entry(ino) {
            // The entry's guard excludes every other change of the count.
            let before = e.get().nlookup.load(Ordering::Relaxed);
            e.get()
                .nlookup
                .store(before.saturating_sub(n), Ordering::Relaxed);
            debug_assert!(
                before >= n || e.get().revived || self.successor.load(Ordering::Relaxed),
                "forget of {n} on inode {ino} with {before} lookups"
            );
            if before <= n {
                // Kept before the inode leaves the table, so that a lookup by handle in
                // between finds one or the other; only of the current tree (an inode of an
                // earlier era is in the trash of a rollback).
                if let Some(h) = &e.get().handle
                    && e.get().era == self.era()
                {
                    if self.forgotten.len() >= FORGOTTEN_HANDLES {
                        tracing::debug!("{FORGOTTEN_HANDLES} handles of forgotten inodes: dropped");
                        self.forgotten.clear();
                    }
                    self.forgotten.insert(ino, h.clone());
                }
                let inode = e.remove();
                self.count.fetch_sub(1, Ordering::Relaxed);
                return Some(inode);
            }
        }
        None
    }

    /// The names of the `count` least recently looked-up non-directory inodes that no file
    /// handle keeps open, for asking the kernel to forget them.
    pub(crate) fn eviction_candidates(&self, count: usize) -> Vec<(FuseIno, OsString)> {
        let mut all: Vec<(u64, FuseIno, OsString)> = Vec::new();
        for entry in self.map.iter() {
            let inode = entry.value();
            // Directories stay: dropping a directory's name unhashes it even while it is some
            // process's working directory, and getcwd(2) then fails with ENOENT.
            if inode.ino == ROOT_INO || inode.kind == NodeKind::Dir {
                continue;
            }
            {
                let open = inode.open.lock();
                if open.cached > 0 || open.passthrough > 0 {
                    continue;
                }
            }
            if let Some((parent, name)) = inode.loc.lock().clone() {
                all.push((inode.last_used.load(Ordering::Relaxed), parent, name));
            }
        }
        if all.len() > count {
            all.select_nth_unstable_by_key(count, |c| c.0);
            all.truncate(count);
        }
        all.into_iter().map(|(_, p, n)| (p, n)).collect()
    }

    /// The path of an inode relative to the workspace root ("" is the root), if every
    /// directory above it is known. Used for journal records, not for I/O.
    pub fn path_of(&self, ino: FuseIno) -> Option<PathBuf> {
        let mut names: Vec<OsString> = Vec::new();
        let mut cur = ino;
        // Depth bound: a cycle would be a bug, not a reason to spin.
        for _ in 0..4096 {
            if cur == ROOT_INO {
                let mut path = PathBuf::new();
                for name in names.iter().rev() {
                    path.push(name);
                }
                return Some(path);
            }
            let inode = self.get(cur)?;
            let (parent, name) = inode.loc.lock().clone()?;
            names.push(name);
            cur = parent;
        }
        None
    }

    pub fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }
}

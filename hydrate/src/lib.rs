//! Lazy hydration: a cache restored from the store holds, at first, only the root directory's
//! entries. Every other directory is materialized on its first lookup or listing (entries with
//! their real size, mode, owner, times and xattrs; files sparse), and file bytes are fetched
//! chunk by chunk when first read or written around, while background workers fetch the rest
//! (`prefetch.rs`).
//!
//! State (in `state.db`, through the hydrator's own connection; `src/sync/local.rs`):
//! - `hyd_dirs`: directories not materialized yet: file handle, and their own tree entry.
//! - `hyd_files`: files not wholly local: file handle, tree entry (the chunks), the offset
//!   from which bytes never come from the store again (`valid_end`, lowered by truncates),
//!   and the byte ranges already local (`present`).
//! - `hyd_links`: hard-link keys met while materializing, and the inode they became.
//!
//! Invariants:
//! - A byte is served or changed only once it is local: reads and writes fetch every chunk
//!   they overlap first (a write's edges keep the store's bytes), and a fetched chunk is
//!   written only into ranges not yet local, under the file's lock, clipped to `valid_end`.
//! - The stored `present` never claims more than the backing file durably holds: a file's
//!   ranges are stored after an fdatasync of it. It may claim less; what the journal says was
//!   written since is added back at load, and a chunk fetched twice writes the same bytes.
//! - Inodes are named by file handle, so a freed and reused inode number never inherits the
//!   state of the inode it replaced.
//! - Materializing holds the core's barrier shared, so a cut sees a directory either pending
//!   (its subtree is the base generation's) or materialized with all its nodes known.

pub mod prefetch;
pub mod prepare;

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use dashmap::DashMap;
use owsfs_journal::{DirtyState, ExtentSet};
use owsfs_store::{
    BlobId, BlobRef, ChunkSpan, Content, FileContent, NodeKind, Store, Tree, TreeEntry,
};
use parking_lot::{Condvar, Mutex, MutexGuard};
use rusqlite::{Connection, OptionalExtension, params};
use rustix::fs::{AtFlags, Mode, OFlags};
use serde_json::{Value, json};

use owsfs_local::handle;
use owsfs_local::{NodeMap, decode_node, encode_node};

/// One GET fetches at most this much of a pack (adjacent chunks of one file usually sit
/// side by side in one pack).
const MAX_RUN: u64 = 8 << 20;

/// A file not wholly local.
struct FileState {
    ino: u64,
    handle: Vec<u8>,
    /// Its tree entry (from the generation it was restored from).
    node: Vec<u8>,
    content: FileContent,
    /// Bytes the content covers.
    len: u64,
    inner: Mutex<FileInner>,
}

struct FileInner {
    present: ExtentSet,
    valid_end: u64,
    /// Chunk spans by list group (one group for inline chunk lists), loaded on demand.
    groups: Vec<Option<Arc<Vec<ChunkSpan>>>>,
    /// Its last name is gone: nobody fetches it ahead any more.
    removed: bool,
    /// Changed since it was last stored.
    unsaved: bool,
}

impl FileInner {
    /// Bytes still to fetch.
    fn missing(&self, len: u64) -> u64 {
        let end = self.valid_end.min(len);
        end - self.present.total_len_below(end)
    }

    fn whole(&self, len: u64) -> bool {
        self.present.gaps(0, self.valid_end.min(len)).is_empty()
    }
}

trait BelowExt {
    fn total_len_below(&self, end: u64) -> u64;
}

impl BelowExt for ExtentSet {
    fn total_len_below(&self, end: u64) -> u64 {
        self.iter().map(|(s, e)| e.min(end).saturating_sub(s)).sum()
    }
}

/// A directory not materialized yet.
#[derive(Clone)]
struct DirState {
    handle: Vec<u8>,
    /// Its own tree entry: the subtree and the attributes to restore after materializing.
    node: Vec<u8>,
}

/// A pending directory that holds old material (entries of an older generation the cache
/// had): `hyd_warm`.
#[derive(Clone, Debug)]
struct Warm {
    /// The old material is exactly the directory's tree (same subtree id).
    same: bool,
    /// After an interrupted attempt: the inodes (u64 LE each) that attempt kept, the only
    /// old material still trusted.
    trust: Option<Vec<u8>>,
}

/// An inode of the older generation (`hyd_old`).
struct OldNode {
    /// A directory that was not materialized.
    pending: bool,
    entry: TreeEntry,
    node: Vec<u8>,
    /// The older generation's bytes the file holds.
    present: ExtentSet,
}

/// What an old entry keeps when its directory is reconciled.
enum Keep {
    /// The ranges of the new content that are local; `old_end`: where its old bytes end.
    File { present: ExtentSet, old_end: u64 },
    /// Pending, with its old material (if any) inside.
    Dir(Option<Warm>),
    /// A symlink with the same target.
    Other,
}

/// What materializing one directory made, stored in one transaction.
#[derive(Default)]
struct Batch {
    nodes: Vec<owsfs_local::NodeRow>,
    /// Files not wholly local.
    files: Vec<FileState>,
    /// Directories left pending, with their warm row.
    dirs: Vec<(u64, DirState, Option<Warm>)>,
    links: Vec<(u64, Vec<u8>)>,
    /// Files already whole, and the bytes local of all files.
    whole_files: i64,
    kept_bytes: i64,
    /// `hyd_old` rows used up.
    old_done: Vec<u64>,
}

/// One chunk being fetched; others that need it wait here.
#[derive(Default)]
struct Inflight {
    result: Mutex<Option<Result<Bytes, String>>>,
    cv: Condvar,
}

/// Hydration progress, for `owsfs status` and the progress bar.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    pub files_total: u64,
    pub files_present: u64,
    pub bytes_total: u64,
    pub bytes_present: u64,
    pub dirs_pending: u64,
    pub files_pending: u64,
    pub fetched_bytes: u64,
    pub fetches: u64,
    /// Bytes per second over the last few seconds.
    pub rate: f64,
    pub done: bool,
    pub generation: u64,
}

pub struct Hydrator {
    store: Arc<Store>,
    db: Mutex<Connection>,
    /// The backing root, opened for reading: the mount descriptor for handles.
    root: OwnedFd,
    root_ino: u64,
    nodes: Arc<NodeMap>,
    files: DashMap<u64, Arc<FileState>>,
    dirs: DashMap<u64, DirState>,
    active: AtomicBool,
    materializing: Mutex<()>,
    inflight: Mutex<HashMap<BlobId, Arc<Inflight>>>,
    /// Hard links met while materializing: key → handle of the inode.
    links: Mutex<HashMap<u64, Vec<u8>>>,
    /// Files whose state must be stored (or dropped) at the next save.
    unsaved: Mutex<HashSet<u64>>,
    total_files: AtomicU64,
    total_bytes: AtomicU64,
    missing_files: AtomicI64,
    missing_bytes: AtomicI64,
    counters_unsaved: AtomicBool,
    generation: u64,
    fetched_bytes: AtomicU64,
    fetches: AtomicU64,
    window: Mutex<VecDeque<(Instant, u64)>>,
    /// What programs wait on now (fetches and directory materializations), and when the
    /// last of it ended: the prefetch yields to both.
    pub(crate) foreground: Foreground,
    /// Files opened during this mount: backing inode → (order, path).
    access: Mutex<HashMap<u64, (u64, PathBuf)>>,
    access_tick: AtomicU64,
    is_root: bool,
}

fn err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// A fetch that failed: logged, and EIO to the program (the message rides along for the
/// daemon's own callers, e.g. the mount).
fn eio(msg: String) -> io::Error {
    tracing::error!("{msg}");
    io::Error::other(msg)
}

impl Hydrator {
    /// Loads the hydration state of the cache whose backing directory is `backing`, adding
    /// back what the journal's dirty state says was written or truncated since it was stored.
    pub fn open(
        state_db: &Path,
        backing: &Path,
        store: Arc<Store>,
        nodes: Arc<NodeMap>,
        dirty: &DirtyState,
    ) -> anyhow::Result<Arc<Hydrator>> {
        let conn = Connection::open(state_db)
            .with_context(|| format!("cannot open {}", state_db.display()))?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(Duration::from_secs(30))?;
        let root = rustix::fs::open(
            backing,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .with_context(|| format!("cannot open {}", backing.display()))?;
        let root_ino = rustix::fs::fstat(&root)?.st_ino;
        let meta = |k: &str| -> anyhow::Result<i64> {
            Ok(conn
                .query_row("SELECT value FROM meta WHERE key = ?1", [k], |r| {
                    r.get::<_, String>(0)
                })
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0))
        };
        let h = Hydrator {
            store,
            total_files: AtomicU64::new(meta("hyd_total_files")? as u64),
            total_bytes: AtomicU64::new(meta("hyd_total_bytes")? as u64),
            missing_files: AtomicI64::new(meta("hyd_missing_files")?),
            missing_bytes: AtomicI64::new(meta("hyd_missing_bytes")?),
            generation: meta("hyd_generation")? as u64,
            db: Mutex::new(conn),
            root,
            root_ino,
            nodes,
            files: DashMap::new(),
            dirs: DashMap::new(),
            active: AtomicBool::new(false),
            materializing: Mutex::new(()),
            inflight: Mutex::new(HashMap::new()),
            links: Mutex::new(HashMap::new()),
            unsaved: Mutex::new(HashSet::new()),
            counters_unsaved: AtomicBool::new(false),
            fetched_bytes: AtomicU64::new(0),
            fetches: AtomicU64::new(0),
            window: Mutex::new(VecDeque::new()),
            foreground: Foreground::new(),
            access: Mutex::new(HashMap::new()),
            access_tick: AtomicU64::new(0),
            is_root: rustix::process::geteuid().is_root(),
        };
        h.load(dirty)?;
        let h = Arc::new(h);
        h.update_active();
        Ok(h)
    }

    fn load(&self, dirty: &DirtyState) -> anyhow::Result<()> {
        let db = self.db.lock();
        let mut stmt = db.prepare("SELECT ino, handle, node FROM hyd_dirs")?;
        for row in stmt.query_map([], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get(1)?, r.get(2)?))
        })? {
            let (ino, handle, node) = row?;
            self.dirs.insert(ino, DirState { handle, node });
        }
        drop(stmt);
        let mut stmt = db.prepare("SELECT ino, handle, node, valid_end, present FROM hyd_files")?;
        type Row = (u64, Vec<u8>, Vec<u8>, u64, Vec<u8>);
        let rows: Vec<Row> = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)? as u64,
                    r.get(1)?,
                    r.get(2)?,
                    r.get::<_, i64>(3)? as u64,
                    r.get(4)?,
                ))
            })?
            .collect::<Result<_, _>>()?;
        drop(stmt);
        drop(db);
        for (ino, handle, node, valid_end, present) in rows {
            let mut st = self.file_state(ino, handle, node)?;
            {
                let inner = st.inner.get_mut();
                inner.valid_end = valid_end;
                inner.present = decode_ranges(&present);
                // Writes and truncates the journal holds may be newer than the stored state.
                let fuse_ino = if ino == self.root_ino { 1 } else { ino };
                if let Some(d) = dirty.files.get(&fuse_ino) {
                    if d.created {
                        // A new inode with a reused number (its handle would be stale anyway).
                        inner.valid_end = 0;
                    }
                    if let Some(t) = d.truncated_to {
                        inner.valid_end = inner.valid_end.min(t);
                    }
                    for (s, e) in d.extents.iter() {
                        inner.present.insert(s, e);
                    }
                    inner.unsaved = true;
                }
            }
            let whole = st.inner.get_mut().whole(st.len);
            if whole {
                self.unsaved.lock().insert(ino);
            } else {
                if st.inner.get_mut().unsaved {
                    self.unsaved.lock().insert(ino);
                }
                self.files.insert(ino, Arc::new(st));
            }
        }
        let links: Vec<(u64, Vec<u8>)> = {
            let db = self.db.lock();
            let mut stmt = db.prepare("SELECT key, handle FROM hyd_links")?;
            stmt.query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))?
                .collect::<Result<_, _>>()?
        };
        self.links.lock().extend(links);
        Ok(())
    }

    fn file_state(&self, ino: u64, handle: Vec<u8>, node: Vec<u8>) -> anyhow::Result<FileState> {
        let entry = decode_node(&node)?;
        let Content::File(content) = entry.content else {
            anyhow::bail!("hydration state of inode {ino} is not a file");
        };
        let (len, groups) = match &content {
            FileContent::Empty => (0, Vec::new()),
            FileContent::Chunks(c) => (c.iter().map(|r| r.len as u64).sum(), vec![None]),
            FileContent::List(l) => (l.iter().map(|l| l.covered).sum(), vec![None; l.len()]),
        };
        Ok(FileState {
            ino,
            handle,
            node,
            content,
            len,
            inner: Mutex::new(FileInner {
                present: ExtentSet::new(),
                valid_end: len,
                groups,
                removed: false,
                unsaved: false,
            }),
        })
    }

    fn update_active(&self) {
        self.active.store(
            !self.files.is_empty() || !self.dirs.is_empty(),
            Ordering::Release,
        );
    }

    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    pub fn root_ino(&self) -> u64 {
        self.root_ino
    }

    pub fn root_fd(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }

    // ---- directories --------------------------------------------------------------------

    pub fn dir_is_pending(&self, ino: u64) -> bool {
        self.dirs.contains_key(&ino)
    }

    /// Any directory still pending (for the prefetch), with a descriptor of it.
    pub(crate) fn some_pending_dir(&self, skip: &HashSet<u64>) -> Option<(u64, OwnedFd)> {
        let candidates: Vec<(u64, Vec<u8>)> = self
            .dirs
            .iter()
            .filter(|e| !skip.contains(e.key()))
            .take(16)
            .map(|e| (*e.key(), e.value().handle.clone()))
            .collect();
        for (ino, h) in candidates {
            match handle::open(self.root.as_fd(), &h, libc::O_PATH | libc::O_DIRECTORY) {
                Ok(fd) => return Some((ino, fd)),
                Err(e) => tracing::warn!("hydrate: directory inode {ino} cannot be opened: {e}"),
            }
        }
        None
    }

    /// Materializes directory `ino` (an `O_PATH` descriptor of it in `dir`): every entry of
    /// its tree is created (directories pending, files sparse and pending), then its own
    /// attributes are set again. The caller holds the core's barrier shared.
    ///
    /// A directory without old material (made empty by an earlier materialization) is
    /// emptied first: entries of an attempt that died half-way are all it can hold. A
    /// directory with old material (a warm remount, `hyd_warm`) keeps what did not change:
    /// see [`Hydrator::reconcile`]; one whose old material is exactly its tree is taken as it
    /// is, without fetching the tree.
    pub fn materialize_dir(&self, ino: u64, dir: BorrowedFd<'_>) -> io::Result<()> {
        let one = self.materializing.lock();
        self.materialize_locked(ino, dir, one)
    }

    /// [`Hydrator::materialize_dir`] for the prefetch. With `give_way`, when a program waits
    /// on a fetch or a directory once the lock is ours, hands the lock on (fairly, so a
    /// program's materialization waiting for it goes next) and returns false.
    pub(crate) fn materialize_dir_in_background(
        &self,
        ino: u64,
        dir: BorrowedFd<'_>,
        give_way: bool,
    ) -> io::Result<bool> {
        let one = self.materializing.lock();
        if give_way && self.foreground.busy(Duration::ZERO) {
            MutexGuard::unlock_fair(one);
            return Ok(false);
        }
        self.materialize_locked(ino, dir, one)?;
        Ok(true)
    }

    fn materialize_locked(
        &self,
        ino: u64,
        dir: BorrowedFd<'_>,
        _one: MutexGuard<'_, ()>,
    ) -> io::Result<()> {
        let Some(state) = self.dirs.get(&ino).map(|d| d.clone()) else {
            return Ok(());
        };
        let started = Instant::now();
        let entry = decode_node(&state.node).map_err(err)?;
        let Content::Dir(tree_ref) = entry.content else {
            return Err(err(format!(
                "hydration state of directory {ino} holds no tree"
            )));
        };
        let dirfd = open_for_reading(dir)?;
        let warm = self.warm_row(ino)?;
        let mut batch = Batch::default();
        let mut how = "kept as it was";
        let same = warm.as_ref().is_some_and(|w| w.same && w.trust.is_none());
        if !same || !self.keep_same(&dirfd, &mut batch)? {
            batch = Batch::default();
            let tree = Tree::load(&*self.store, &tree_ref).map_err(|e| {
                eio(format!(
                    "hydrate: cannot fetch tree {} of a directory (inode {ino}): {e}",
                    tree_ref.id
                ))
            })?;
            match warm {
                Some(w) => {
                    how = "reconciled with its old entries";
                    self.reconcile(
                        ino,
                        &dirfd,
                        &tree,
                        &tree_ref.id,
                        w.trust.as_deref(),
                        &mut batch,
                    )?;
                }
                None => {
                    how = "made";
                    clear_dir(&dirfd)?;
                    for e in &tree.entries {
                        self.create_fresh(&dirfd, e, &tree_ref.id, &mut batch)?;
                    }
                }
            }
        }
        // The directory's own attributes, changed by the creations.
        if ino != self.root_ino {
            owsfs_local::write::set_attrs(dirfd.as_fd(), None, &entry, self.is_root)?;
        }
        rustix::fs::fsync(&dirfd)?;
        let entries = batch.nodes.len();
        self.commit_batch(ino, batch)?;
        tracing::debug!(
            "hydrate: materialized directory {ino} ({how}): {entries} nodes in {:?}",
            started.elapsed()
        );
        Ok(())
    }

    /// Creates entry `e` of tree `tree_id` in `dir` as the store has it: a directory
    /// pending, a file sparse (or a link to the inode its hard-link key already became).
    fn create_fresh(
        &self,
        dir: &OwnedFd,
        e: &TreeEntry,
        tree_id: &BlobId,
        batch: &mut Batch,
    ) -> io::Result<()> {
        let name = OsStr::from_bytes(&e.name);
        if e.link_key != 0 && e.kind == NodeKind::File {
            let known = self.links.lock().get(&e.link_key).cloned();
            if let Some(h) = known {
                match handle::open(self.root.as_fd(), &h, libc::O_PATH) {
                    Ok(fd) => {
                        rustix::fs::linkat(&fd, c"", dir, name, AtFlags::EMPTY_PATH)?;
                        return Ok(());
                    }
                    Err(err) => tracing::warn!(
                        "hydrate: the other names of a hard-linked file are gone ({err}); \
                         {} becomes a file of its own",
                        String::from_utf8_lossy(&e.name)
                    ),
                }
            }
        }
        if owsfs_local::write::create(dir.as_fd(), name, e)? == owsfs_local::write::Created::Skipped
        {
            return Ok(());
        }
        owsfs_local::write::set_attrs(dir.as_fd(), Some(name), e, self.is_root)?;
        let h = handle::of(dir.as_fd(), Path::new(name))?;
        let st = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
        let node = encode_node(e).map_err(err)?;
        match e.kind {
            NodeKind::Dir => {
                batch.nodes.push((st.st_ino, b'd', node.clone()));
                batch
                    .dirs
                    .push((st.st_ino, DirState { handle: h, node }, None));
            }
            NodeKind::File => {
                if e.link_key != 0 {
                    batch.links.push((e.link_key, h.clone()));
                    self.links.lock().insert(e.link_key, h.clone());
                }
                batch.nodes.push((st.st_ino, b'f', node.clone()));
                self.add_file(
                    st.st_ino,
                    h,
                    node,
                    e,
                    Some(tree_id),
                    ExtentSet::new(),
                    batch,
                )?;
            }
            _ => {}
        }
        Ok(())
    }

    /// Adds file `ino` (entry `e`, bytes `present` already local) to `batch`: whole, or to
    /// be fetched.
    #[allow(clippy::too_many_arguments)]
    fn add_file(
        &self,
        ino: u64,
        handle: Vec<u8>,
        node: Vec<u8>,
        e: &TreeEntry,
        tree_id: Option<&BlobId>,
        present: ExtentSet,
        batch: &mut Batch,
    ) -> io::Result<()> {
        let have = present.total_len_below(e.size);
        batch.kept_bytes += have as i64;
        if have == e.size {
            batch.whole_files += 1;
            return Ok(());
        }
        let fs = self.file_state(ino, handle, node).map_err(err)?;
        if fs.len != e.size {
            let tree = tree_id.map_or("the cache's older generation".into(), |t| {
                format!("tree {t}")
            });
            return Err(eio(format!(
                "hydrate: {tree}: {} has size {} but its chunks cover {} bytes",
                String::from_utf8_lossy(&e.name),
                e.size,
                fs.len
            )));
        }
        fs.inner.lock().present = present;
        batch.files.push(fs);
        Ok(())
    }

    /// The warm row of directory `ino`: it holds old material.
    fn warm_row(&self, ino: u64) -> io::Result<Option<Warm>> {
        let db = self.db.lock();
        let mut stmt = db
            .prepare_cached("SELECT same, trust FROM hyd_warm WHERE ino = ?1")
            .map_err(err)?;
        stmt.query_row([ino as i64], |r| {
            Ok(Warm {
                same: r.get::<_, i64>(0)? != 0,
                trust: r.get(1)?,
            })
        })
        .optional()
        .map_err(err)
    }

    /// What the cache's older generation had at inode `ino` (`hyd_old`).
    fn old_node(&self, ino: u64) -> io::Result<Option<OldNode>> {
        /// state, node, valid_end, present
        type Row = (i64, Vec<u8>, Option<i64>, Option<Vec<u8>>);
        let row: Option<Row> = {
            let db = self.db.lock();
            let mut stmt = db
                .prepare_cached(
                    "SELECT state, node, valid_end, present FROM hyd_old WHERE ino = ?1",
                )
                .map_err(err)?;
            stmt.query_row([ino as i64], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .optional()
            .map_err(err)?
        };
        let Some((state, node, valid_end, present)) = row else {
            return Ok(None);
        };
        let entry = decode_node(&node).map_err(err)?;
        // The bytes of the older generation that are local: all of a whole file, the stored
        // ranges below `valid_end` of a partial one.
        let present = match state {
            0 => std::iter::once((0, entry.size))
                .filter(|r| r.1 > 0)
                .collect(),
            1 => {
                let end = (valid_end.unwrap_or(0).max(0) as u64).min(entry.size);
                clip(&decode_ranges(&present.unwrap_or_default()), end)
            }
            _ => ExtentSet::new(),
        };
        Ok(Some(OldNode {
            pending: state == 2,
            entry,
            node,
            present,
        }))
    }

    /// The directory's old material is exactly its tree: each entry is kept as it is, with
    /// the node and state it had. False, with nothing changed, when an entry is not known
    /// as expected (then the tree decides).
    fn keep_same(&self, dir: &OwnedFd, batch: &mut Batch) -> io::Result<bool> {
        for (name, st) in list_dir(dir)? {
            let ino = st.st_ino;
            let kind = st.st_mode & libc::S_IFMT;
            if kind != libc::S_IFREG && kind != libc::S_IFDIR {
                continue;
            }
            let Some(old) = self.old_node(ino)? else {
                return Ok(false);
            };
            let h = handle::of(dir.as_fd(), Path::new(&name))?;
            match (&old.entry.content, kind) {
                (Content::File(_), libc::S_IFREG)
                    if !old.pending
                        && st.st_size as u64 == old.entry.size
                        && !self.linked_elsewhere(old.entry.link_key, dir, &name)? =>
                {
                    if old.entry.link_key != 0 {
                        batch.links.push((old.entry.link_key, h.clone()));
                    }
                    batch.nodes.push((ino, b'f', old.node.clone()));
                    self.add_file(ino, h, old.node, &old.entry, None, old.present, batch)?;
                }
                (Content::Dir(_), libc::S_IFDIR) => {
                    let warm = if old.pending {
                        self.warm_row(ino)?
                    } else {
                        Some(Warm {
                            same: true,
                            trust: None,
                        })
                    };
                    batch.nodes.push((ino, b'd', old.node.clone()));
                    batch.dirs.push((
                        ino,
                        DirState {
                            handle: h,
                            node: old.node,
                        },
                        warm,
                    ));
                }
                _ => return Ok(false),
            }
            batch.old_done.push(ino);
        }
        let mut links = self.links.lock();
        for (k, h) in &batch.links {
            links.insert(*k, h.clone());
        }
        Ok(true)
    }

    /// Materializes directory `ino` over its old material: an old entry is kept where the
    /// tree has an entry of the same name and kind and the cache knows what the old one holds
    /// (a file keeps the ranges whose chunks did not change, a directory stays pending with
    /// its old material inside, a symlink with the same target stays); everything else old
    /// goes, and the tree's other entries are made as on a fresh cache.
    ///
    /// Before anything changes, the kept inodes are stored as the directory's `trust`: a
    /// retry after a crash trusts only them (any other entry may be one this attempt made,
    /// with an inode number an old row happens to name), and a kept file that shrinks has
    /// its old row clipped first.
    fn reconcile(
        &self,
        ino: u64,
        dir: &OwnedFd,
        tree: &Tree,
        tree_id: &BlobId,
        trust: Option<&[u8]>,
        batch: &mut Batch,
    ) -> io::Result<()> {
        let trust: Option<HashSet<u64>> = trust.map(|t| {
            t.chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
                .collect()
        });
        let by_name: HashMap<&[u8], &TreeEntry> =
            tree.entries.iter().map(|e| (&e.name[..], e)).collect();
        let mut keep: Vec<(std::ffi::OsString, rustix::fs::Stat, &TreeEntry, Keep)> = Vec::new();
        let mut remove: Vec<(std::ffi::OsString, bool, u64)> = Vec::new();
        let mut clipped: Vec<(u64, u64, Vec<u8>)> = Vec::new();
        for (name, st) in list_dir(dir)? {
            let decision = match by_name.get(name.as_bytes()) {
                Some(e) if trust.as_ref().is_none_or(|t| t.contains(&st.st_ino)) => {
                    self.keep_decision(dir, &name, &st, e)?
                }
                _ => None,
            };
            match decision {
                Some(k) => {
                    if let Keep::File { old_end, .. } = &k
                        && *old_end > by_name[name.as_bytes()].size
                    {
                        let e = by_name[name.as_bytes()];
                        if let Some(old) = self.old_node(st.st_ino)? {
                            clipped.push((
                                st.st_ino,
                                e.size,
                                encode_ranges(&clip(&old.present, e.size)),
                            ));
                        }
                    }
                    let e = by_name[name.as_bytes()];
                    keep.push((name, st, e, k));
                }
                None => {
                    let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
                    remove.push((name, is_dir, st.st_ino));
                }
            }
        }
        {
            let kept: Vec<u8> = keep.iter().flat_map(|k| k.1.st_ino.to_le_bytes()).collect();
            let mut db = self.db.lock();
            let tx = db.transaction().map_err(err)?;
            tx.execute(
                "UPDATE hyd_warm SET trust = ?2 WHERE ino = ?1",
                params![ino as i64, kept],
            )
            .map_err(err)?;
            for (i, end, present) in &clipped {
                tx.execute(
                    "UPDATE hyd_old SET state = 1, valid_end = ?2, present = ?3 WHERE ino = ?1",
                    params![*i as i64, *end as i64, present],
                )
                .map_err(err)?;
            }
            tx.commit().map_err(err)?;
        }
        for (name, is_dir, old_ino) in remove {
            remove_entry(dir, &name, is_dir)?;
            batch.old_done.push(old_ino);
        }
        let mut kept_names: HashSet<Vec<u8>> = HashSet::new();
        for (name, st, e, k) in keep {
            self.apply_keep(dir, &name, &st, e, k, Some(tree_id), batch)?;
            kept_names.insert(name.as_bytes().to_vec());
            batch.old_done.push(st.st_ino);
        }
        for e in &tree.entries {
            if !kept_names.contains(&e.name) {
                self.create_fresh(dir, e, tree_id, batch)?;
            }
        }
        fail::fail_point!("reconcile-midway");
        Ok(())
    }

    /// Whether old entry `name` (`st`) can stay as entry `e` of the new tree, and what of it.
    fn keep_decision(
        &self,
        dir: &OwnedFd,
        name: &OsStr,
        st: &rustix::fs::Stat,
        e: &TreeEntry,
    ) -> io::Result<Option<Keep>> {
        let kind = st.st_mode & libc::S_IFMT;
        Ok(match (&e.content, kind) {
            (Content::File(new), libc::S_IFREG) if st.st_nlink == 1 => {
                let Some(old) = self.old_node(st.st_ino)? else {
                    return Ok(None);
                };
                let Content::File(was) = &old.entry.content else {
                    return Ok(None);
                };
                let local = st.st_size as u64;
                if old.pending
                    || (local != old.entry.size && local != e.size)
                    || self.linked_elsewhere(e.link_key, dir, name)?
                {
                    return Ok(None);
                }
                let present = clip(&old.present, local);
                let present = if was == new {
                    present
                } else {
                    self.unchanged_ranges(was, new, &present, st.st_ino)?
                };
                Some(Keep::File {
                    present,
                    old_end: old.entry.size.min(local),
                })
            }
            (Content::Dir(new), libc::S_IFDIR) => {
                let Some(old) = self.old_node(st.st_ino)? else {
                    return Ok(None);
                };
                let Content::Dir(was) = &old.entry.content else {
                    return Ok(None);
                };
                let warm = if old.pending {
                    // Pending in the older generation too: its own old material, if any.
                    self.warm_row(st.st_ino)?.map(|w| Warm {
                        same: w.same && was.id == new.id,
                        trust: w.trust,
                    })
                } else {
                    Some(Warm {
                        same: was.id == new.id,
                        trust: None,
                    })
                };
                Some(Keep::Dir(warm))
            }
            (Content::Symlink(target), libc::S_IFLNK) => {
                let now = rustix::fs::readlinkat(dir, name, Vec::new())?;
                (now.as_bytes() == &target[..]).then_some(Keep::Other)
            }
            _ => None,
        })
    }

    /// Hard-link key `key` already belongs to another inode than `name`'s (then `name` must
    /// become a link to it, not stay a file of its own).
    fn linked_elsewhere(&self, key: u64, dir: &OwnedFd, name: &OsStr) -> io::Result<bool> {
        if key == 0 {
            return Ok(false);
        }
        let Some(h) = self.links.lock().get(&key).cloned() else {
            return Ok(false);
        };
        Ok(handle::of(dir.as_fd(), Path::new(name))? != h)
    }

    /// Applies a kept entry: size and attributes of the new tree, and its place in `batch`.
    #[allow(clippy::too_many_arguments)]
    fn apply_keep(
        &self,
        dir: &OwnedFd,
        name: &OsStr,
        st: &rustix::fs::Stat,
        e: &TreeEntry,
        keep: Keep,
        tree_id: Option<&BlobId>,
        batch: &mut Batch,
    ) -> io::Result<()> {
        let ino = st.st_ino;
        if let Keep::File { .. } = keep
            && st.st_size as u64 != e.size
        {
            let fd = rustix::fs::openat(
                dir,
                name,
                OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            rustix::fs::ftruncate(&fd, e.size)?;
            rustix::fs::fsync(&fd)?;
        }
        if e.kind == NodeKind::File || e.kind == NodeKind::Dir {
            owsfs_local::write::drop_other_xattrs(dir.as_fd(), name, e)?;
        }
        owsfs_local::write::set_attrs(dir.as_fd(), Some(name), e, self.is_root)?;
        let node = encode_node(e).map_err(err)?;
        match keep {
            Keep::File { present, .. } => {
                let h = handle::of(dir.as_fd(), Path::new(name))?;
                if e.link_key != 0 {
                    batch.links.push((e.link_key, h.clone()));
                    self.links.lock().insert(e.link_key, h.clone());
                }
                batch.nodes.push((ino, b'f', node.clone()));
                self.add_file(ino, h, node, e, tree_id, present, batch)?;
            }
            Keep::Dir(warm) => {
                let h = handle::of(dir.as_fd(), Path::new(name))?;
                batch.nodes.push((ino, b'd', node.clone()));
                batch.dirs.push((ino, DirState { handle: h, node }, warm));
            }
            Keep::Other => {}
        }
        Ok(())
    }

    /// The ranges of `present` (bytes of content `was`) whose chunks content `new` has at the
    /// same offsets.
    fn unchanged_ranges(
        &self,
        was: &FileContent,
        new: &FileContent,
        present: &ExtentSet,
        ino: u64,
    ) -> io::Result<ExtentSet> {
        let a = self.content_spans(was, ino)?;
        let b = self.content_spans(new, ino)?;
        let mut same = ExtentSet::new();
        let (mut i, mut j) = (0, 0);
        while i < a.len() && j < b.len() {
            let (x, y) = (&a[i], &b[j]);
            if x.offset == y.offset {
                if x.r.id == y.r.id && x.r.len == y.r.len {
                    same.insert(x.offset, x.end());
                }
                i += 1;
                j += 1;
            } else if x.offset < y.offset {
                i += 1;
            } else {
                j += 1;
            }
        }
        let mut out = ExtentSet::new();
        for (s, e) in same.iter() {
            let mut at = s;
            for (gs, ge) in present.gaps(s, e) {
                if gs > at {
                    out.insert(at, gs);
                }
                at = ge;
            }
            if at < e {
                out.insert(at, e);
            }
        }
        Ok(out)
    }

    /// Every chunk of a file's content, at its offset (chunk lists fetched).
    fn content_spans(&self, c: &FileContent, ino: u64) -> io::Result<Vec<ChunkSpan>> {
        let refs: Vec<BlobRef> = match c {
            FileContent::Empty => Vec::new(),
            FileContent::Chunks(c) => c.clone(),
            FileContent::List(l) => {
                let mut v = Vec::new();
                for g in l {
                    v.extend(self.list_refs(g, ino)?);
                }
                v
            }
        };
        let mut at = 0u64;
        Ok(refs
            .into_iter()
            .map(|r| {
                let s = ChunkSpan { r, offset: at };
                at += r.len as u64;
                s
            })
            .collect())
    }

    /// Stores what materializing directory `ino` made, and makes it live.
    fn commit_batch(&self, ino: u64, batch: Batch) -> io::Result<()> {
        // Crash window: the entries are made and durable, not recorded.
        fail::fail_point!("materialize-before-commit");
        let Batch {
            nodes,
            files,
            dirs,
            links,
            whole_files,
            kept_bytes,
            old_done,
        } = batch;
        self.nodes
            .add(nodes, |rows| {
                let mut db = self.db.lock();
                let tx = db.transaction()?;
                {
                    let mut put_node = tx.prepare_cached(
                        "INSERT OR REPLACE INTO nodes (ino, kind, content) VALUES (?1, ?2, ?3)",
                    )?;
                    for (ino, kind, content) in rows {
                        put_node.execute(params![*ino as i64, *kind as i64, content])?;
                    }
                    let mut put_file = tx.prepare_cached(
                        "INSERT OR REPLACE INTO hyd_files (ino, handle, node, valid_end, present)
                         VALUES (?1, ?2, ?3, ?4, ?5)",
                    )?;
                    for f in &files {
                        let present = encode_ranges(&f.inner.lock().present);
                        put_file.execute(params![
                            f.ino as i64,
                            f.handle,
                            f.node,
                            f.len as i64,
                            present
                        ])?;
                    }
                    let mut put_dir = tx.prepare_cached(
                        "INSERT OR REPLACE INTO hyd_dirs (ino, handle, node) VALUES (?1, ?2, ?3)",
                    )?;
                    let mut put_warm = tx.prepare_cached(
                        "INSERT OR REPLACE INTO hyd_warm (ino, same, trust) VALUES (?1, ?2, ?3)",
                    )?;
                    let mut no_warm = tx.prepare_cached("DELETE FROM hyd_warm WHERE ino = ?1")?;
                    for (ino, d, warm) in &dirs {
                        put_dir.execute(params![*ino as i64, d.handle, d.node])?;
                        match warm {
                            Some(w) => {
                                put_warm.execute(params![*ino as i64, w.same as i64, w.trust])?
                            }
                            None => no_warm.execute([*ino as i64])?,
                        };
                    }
                    let mut put_link = tx.prepare_cached(
                        "INSERT OR REPLACE INTO hyd_links (key, handle) VALUES (?1, ?2)",
                    )?;
                    for (k, h) in &links {
                        put_link.execute(params![*k as i64, h])?;
                    }
                    let mut old = tx.prepare_cached("DELETE FROM hyd_old WHERE ino = ?1")?;
                    for i in &old_done {
                        old.execute([*i as i64])?;
                    }
                    tx.execute("DELETE FROM hyd_dirs WHERE ino = ?1", [ino as i64])?;
                    no_warm.execute([ino as i64])?;
                }
                tx.commit()?;
                Ok(())
            })
            .map_err(err)?;
        for (ino, d, _) in dirs {
            self.dirs.insert(ino, d);
        }
        for f in files {
            self.files.insert(f.ino, Arc::new(f));
        }
        self.dirs.remove(&ino);
        if whole_files > 0 || kept_bytes > 0 {
            self.missing_files.fetch_sub(whole_files, Ordering::Relaxed);
            self.missing_bytes.fetch_sub(kept_bytes, Ordering::Relaxed);
            self.counters_unsaved.store(true, Ordering::Relaxed);
        }
        self.update_active();
        Ok(())
    }

    // ---- files --------------------------------------------------------------------------

    pub fn is_whole(&self, ino: u64) -> bool {
        !self.files.contains_key(&ino)
    }

    /// Any file still missing bytes, not in `skip` (for the prefetch).
    pub(crate) fn some_partial_file(&self, skip: &HashSet<u64>) -> Option<u64> {
        self.files
            .iter()
            .find(|e| !skip.contains(e.key()) && !e.value().inner.lock().removed)
            .map(|e| *e.key())
    }

    /// Missing chunk spans overlapping `[start, end)`, at most `limit` bytes of them (at least
    /// one span), loading list blobs as needed.
    fn missing_spans(
        &self,
        f: &FileState,
        start: u64,
        end: u64,
        limit: u64,
    ) -> io::Result<Vec<ChunkSpan>> {
        let mut out = Vec::new();
        let mut bytes = 0u64;
        let (valid_end, ngroups) = {
            let inner = f.inner.lock();
            (inner.valid_end, inner.groups.len())
        };
        let end = end.min(valid_end).min(f.len);
        if start >= end {
            return Ok(out);
        }
        let mut group_start = 0u64;
        for g in 0..ngroups {
            let covered = match &f.content {
                FileContent::List(l) => l[g].covered,
                _ => f.len,
            };
            let group_end = group_start + covered;
            if group_end <= start {
                group_start = group_end;
                continue;
            }
            if group_start >= end {
                break;
            }
            let spans = self.group_spans(f, g, group_start)?;
            let inner = f.inner.lock();
            for s in spans.iter() {
                if s.end() <= start {
                    continue;
                }
                if s.offset >= end {
                    break;
                }
                let clip_end = s.end().min(inner.valid_end);
                if s.offset < clip_end && !inner.present.gaps(s.offset, clip_end).is_empty() {
                    out.push(*s);
                    bytes += s.r.len as u64;
                    if bytes >= limit {
                        return Ok(out);
                    }
                }
            }
            drop(inner);
            group_start = group_end;
        }
        Ok(out)
    }

    /// The chunks of one list group, fetched and checked.
    fn list_refs(&self, l: &owsfs_store::tree::ListRef, ino: u64) -> io::Result<Vec<BlobRef>> {
        let b = &l.blob;
        let data = owsfs_store::read_blob(&self.store, b).map_err(|e| {
            eio(format!(
                "hydrate: cannot fetch chunk list {} (in {}) of inode {ino}: {e}",
                b.id,
                b.pack.key(),
            ))
        })?;
        let object = format!("list {} in {}", b.id, b.pack.key());
        let refs = owsfs_store::tree::decode_list(&object, &data)
            .map_err(|e| eio(format!("hydrate: {e}")))?;
        let sum: u64 = refs.iter().map(|r| r.len as u64).sum();
        if sum != l.covered {
            return Err(eio(format!(
                "hydrate: {object} covers {sum} bytes, the tree says {}",
                l.covered
            )));
        }
        Ok(refs)
    }

    fn group_spans(&self, f: &FileState, g: usize, offset: u64) -> io::Result<Arc<Vec<ChunkSpan>>> {
        if let Some(s) = &f.inner.lock().groups[g] {
            return Ok(Arc::clone(s));
        }
        let refs: Vec<BlobRef> = match &f.content {
            FileContent::Empty => Vec::new(),
            FileContent::Chunks(c) => c.clone(),
            FileContent::List(l) => self.list_refs(&l[g], f.ino)?,
        };
        let mut at = offset;
        let spans: Vec<ChunkSpan> = refs
            .into_iter()
            .map(|r| {
                let s = ChunkSpan { r, offset: at };
                at += r.len as u64;
                s
            })
            .collect();
        let spans = Arc::new(spans);
        f.inner.lock().groups[g] = Some(Arc::clone(&spans));
        Ok(spans)
    }

    /// Makes `[start, end)` of file `ino` local. `foreground`: a program waits for it.
    pub fn fetch_range(&self, ino: u64, start: u64, end: u64, foreground: bool) -> io::Result<()> {
        let Some(f) = self.files.get(&ino).map(|f| Arc::clone(&f)) else {
            return Ok(());
        };
        self.fetch_file_range(&f, start, end, foreground)
    }

    /// Fetches every missing span of `[start, end)`, at most 64 MiB per round. `foreground`:
    /// counted as a program's wait once there is something to fetch (a read of what is local
    /// already does not hold the prefetch back).
    fn fetch_file_range(
        &self,
        f: &Arc<FileState>,
        start: u64,
        end: u64,
        foreground: bool,
    ) -> io::Result<()> {
        let mut at = start;
        let mut waited_on = None;
        loop {
            let spans = self.missing_spans(f, at, end, 64 << 20)?;
            let Some(last) = spans.last() else {
                return Ok(());
            };
            if foreground && waited_on.is_none() {
                waited_on = Some(self.foreground.begin());
            }
            at = last.end();
            let data = self.fetch_chunks(&spans)?;
            self.write_spans(f, &spans, &data)?;
        }
    }

    /// Fetches the next at most `step` missing bytes of file `ino` from `from` on (for the
    /// prefetch). Returns where it stopped, or None when nothing is missing from there.
    pub(crate) fn fetch_step(&self, ino: u64, from: u64, step: u64) -> io::Result<Option<u64>> {
        let Some(f) = self.files.get(&ino).map(|f| Arc::clone(&f)) else {
            return Ok(None);
        };
        let spans = self.missing_spans(&f, from, u64::MAX, step)?;
        let Some(last) = spans.last() else {
            return Ok(None);
        };
        let next = last.end();
        let data = self.fetch_chunks(&spans)?;
        self.write_spans(&f, &spans, &data)?;
        Ok(Some(next))
    }

    /// Fetches and verifies chunks; a chunk another thread is fetching is waited for, not
    /// fetched twice. Adjacent chunks of one pack are fetched with one ranged GET.
    fn fetch_chunks(&self, spans: &[ChunkSpan]) -> io::Result<Vec<Bytes>> {
        let mut mine: Vec<usize> = Vec::new();
        let mut waits: Vec<(usize, Arc<Inflight>)> = Vec::new();
        {
            let mut inflight = self.inflight.lock();
            for (i, s) in spans.iter().enumerate() {
                match inflight.get(&s.r.id) {
                    Some(w) => waits.push((i, Arc::clone(w))),
                    None => {
                        inflight.insert(s.r.id, Arc::new(Inflight::default()));
                        mine.push(i);
                    }
                }
            }
        }
        let mut out: Vec<Option<Bytes>> = vec![None; spans.len()];
        let mut failure: Option<io::Error> = None;
        // Runs: same pack, each chunk right after the previous one.
        let mut k = 0;
        while k < mine.len() {
            let first = spans[mine[k]].r;
            let mut j = k + 1;
            let mut end = first.offset + first.len as u64;
            while j < mine.len() {
                let r = spans[mine[j]].r;
                if r.pack != first.pack || r.offset != end || end - first.offset >= MAX_RUN {
                    break;
                }
                end += r.len as u64;
                j += 1;
            }
            let got = if failure.is_none() {
                let run: Vec<_> = mine[k..j].iter().map(|&i| spans[i].r).collect();
                owsfs_store::read_blob_run(&self.store, &run).map_err(|e| e.to_string())
            } else {
                Err("an earlier chunk of the same read failed".to_string())
            };
            for (t, &i) in mine[k..j].iter().enumerate() {
                let r = spans[i].r;
                let res = got.as_ref().map(|b| b[t].clone()).map_err(|e| e.clone());
                if let Ok(d) = &res {
                    out[i] = Some(d.clone());
                } else if let Err(e) = &res
                    && failure.is_none()
                {
                    failure = Some(eio(format!(
                        "hydrate: cannot fetch chunk {} from {}: {e}",
                        r.id,
                        r.pack.key()
                    )));
                }
                let w = self.inflight.lock().remove(&r.id);
                if let Some(w) = w {
                    *w.result.lock() = Some(res);
                    w.cv.notify_all();
                }
            }
            if got.is_ok() {
                self.count_fetched(end - first.offset);
            }
            k = j;
        }
        for (i, w) in waits {
            let mut res = w.result.lock();
            while res.is_none() {
                w.cv.wait(&mut res);
            }
            match res.as_ref() {
                Some(Ok(b)) => out[i] = Some(b.clone()),
                Some(Err(e)) if failure.is_none() => {
                    failure = Some(eio(format!(
                        "hydrate: cannot fetch chunk {} from {}: {e}",
                        spans[i].r.id,
                        spans[i].r.pack.key()
                    )));
                }
                Some(Err(_)) => {}
                None => {}
            }
        }
        if let Some(e) = failure {
            return Err(e);
        }
        Ok(out.into_iter().map(|b| b.unwrap_or_default()).collect())
    }

    fn count_fetched(&self, n: u64) {
        self.fetched_bytes.fetch_add(n, Ordering::Relaxed);
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let mut w = self.window.lock();
        let now = Instant::now();
        w.push_back((now, n));
        while w
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > Duration::from_secs(5))
        {
            w.pop_front();
        }
    }

    /// Writes fetched chunks into the ranges of the file that are not local yet, and starts
    /// their writeback (so a later fdatasync, the save's or the unmount's, has less to wait
    /// for; waiting for it here too was tried: no shorter pause, and a slower prefetch).
    fn write_spans(
        &self,
        f: &Arc<FileState>,
        spans: &[ChunkSpan],
        data: &[Bytes],
    ) -> io::Result<()> {
        let fd = match handle::open(self.root.as_fd(), &f.handle, libc::O_WRONLY) {
            Ok(fd) => File::from(fd),
            Err(e) if e.raw_os_error() == Some(libc::ESTALE) => {
                // The inode is gone: nobody can read it any more.
                self.forget_file(f.ino);
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let mut inner = f.inner.lock();
        let before = inner.missing(f.len);
        let mut written: Option<(u64, u64)> = None;
        for (s, d) in spans.iter().zip(data) {
            let clip_end = s.end().min(inner.valid_end);
            for (a, b) in inner.present.gaps(s.offset, clip_end) {
                let lo = (a - s.offset) as usize;
                let hi = (b - s.offset) as usize;
                owsfs_local::write::write_at(&fd, a, &d[lo..hi])?;
                written = Some(written.map_or((a, b), |(x, y)| (x.min(a), y.max(b))));
            }
            if s.offset < clip_end {
                inner.present.insert(s.offset, clip_end);
            }
        }
        let after = inner.missing(f.len);
        let removed = inner.removed;
        inner.unsaved = true;
        let whole = inner.whole(f.len);
        drop(inner);
        if let Some((a, b)) = written {
            // SAFETY: a plain syscall on a descriptor we own.
            unsafe {
                libc::sync_file_range(
                    std::os::fd::AsRawFd::as_raw_fd(&fd),
                    a as i64,
                    (b - a) as i64,
                    libc::SYNC_FILE_RANGE_WRITE,
                );
            }
        }
        if !removed {
            self.missing_bytes
                .fetch_sub(before.saturating_sub(after) as i64, Ordering::Relaxed);
        }
        self.unsaved.lock().insert(f.ino);
        if whole {
            self.files.remove(&f.ino);
            if !removed {
                self.missing_files.fetch_sub(1, Ordering::Relaxed);
            }
            self.update_active();
        }
        self.counters_unsaved.store(true, Ordering::Relaxed);
        Ok(())
    }

    fn forget_file(&self, ino: u64) {
        if let Some((_, f)) = self.files.remove(&ino) {
            let inner = f.inner.lock();
            if !inner.removed {
                self.missing_bytes
                    .fetch_sub(inner.missing(f.len) as i64, Ordering::Relaxed);
                self.missing_files.fetch_sub(1, Ordering::Relaxed);
            }
            self.unsaved.lock().insert(ino);
            self.counters_unsaved.store(true, Ordering::Relaxed);
        }
        self.update_active();
    }

    pub fn truncate(&self, ino: u64, size: u64) {
        let Some(f) = self.files.get(&ino).map(|f| Arc::clone(&f)) else {
            return;
        };
        let mut inner = f.inner.lock();
        if size >= inner.valid_end {
            return;
        }
        let before = inner.missing(f.len);
        inner.valid_end = size;
        let after = inner.missing(f.len);
        inner.unsaved = true;
        let whole = inner.whole(f.len);
        let removed = inner.removed;
        drop(inner);
        if !removed {
            self.missing_bytes
                .fetch_sub(before.saturating_sub(after) as i64, Ordering::Relaxed);
        }
        self.unsaved.lock().insert(ino);
        self.counters_unsaved.store(true, Ordering::Relaxed);
        if whole {
            self.files.remove(&ino);
            if !removed {
                self.missing_files.fetch_sub(1, Ordering::Relaxed);
            }
            self.update_active();
        }
    }

    /// A new inode got number `ino`: state of an older inode with that number goes (unless
    /// the handle still opens: then it is the same file, opened with O_CREAT).
    pub fn created(&self, ino: u64) {
        let Some(f) = self.files.get(&ino).map(|f| Arc::clone(&f)) else {
            return;
        };
        if let Err(e) = handle::open(self.root.as_fd(), &f.handle, libc::O_PATH)
            && e.raw_os_error() == Some(libc::ESTALE)
        {
            f.inner.lock().removed = true;
            self.forget_file(ino);
        }
    }

    pub fn removed(&self, ino: u64) {
        let Some(f) = self.files.get(&ino).map(|f| Arc::clone(&f)) else {
            return;
        };
        let mut inner = f.inner.lock();
        if inner.removed {
            return;
        }
        inner.removed = true;
        let missing = inner.missing(f.len);
        drop(inner);
        self.missing_bytes
            .fetch_sub(missing as i64, Ordering::Relaxed);
        self.missing_files.fetch_sub(1, Ordering::Relaxed);
        self.counters_unsaved.store(true, Ordering::Relaxed);
    }

    pub fn opened(&self, ino: u64, path: Option<&Path>) {
        let Some(path) = path else {
            return;
        };
        let tick = self.access_tick.fetch_add(1, Ordering::Relaxed);
        let mut a = self.access.lock();
        a.insert(ino, (tick, path.to_path_buf()));
        // Bounded: the oldest half goes when it grows past the limit.
        if a.len() > 2 * owsfs_local::access::ACCESS_LIMIT {
            let mut ticks: Vec<u64> = a.values().map(|(t, _)| *t).collect();
            ticks.sort_unstable();
            let cut = ticks[ticks.len() / 2];
            a.retain(|_, (t, _)| *t >= cut);
        }
    }

    /// Paths opened during this mount, most recent first.
    pub fn accessed_paths(&self) -> Vec<String> {
        let a = self.access.lock();
        let mut v: Vec<(u64, String)> = a
            .values()
            .map(|(t, p)| (*t, p.to_string_lossy().into_owned()))
            .collect();
        v.sort_unstable_by_key(|x| std::cmp::Reverse(x.0));
        v.into_iter().map(|(_, p)| p).collect()
    }

    // ---- persistence --------------------------------------------------------------------

    /// Stores what changed: each changed file's ranges (after an fdatasync of it, so the
    /// stored ranges are durable bytes), files now whole or gone dropped, and the counters.
    /// Called every 250 ms (the saver), before the journal forgets a cut, and at unmount.
    pub fn save(&self) -> anyhow::Result<()> {
        let inos: Vec<u64> = std::mem::take(&mut *self.unsaved.lock())
            .into_iter()
            .collect();
        if inos.is_empty() && !self.counters_unsaved.swap(false, Ordering::Relaxed) {
            return Ok(());
        }
        // (inode, Some((valid_end, present)) to update, None to drop)
        type Row = (u64, Option<(u64, Vec<u8>)>);
        let mut rows: Vec<Row> = Vec::new();
        // The files whose bytes must be durable before the rows are: a partial file's
        // ranges are taken before its sync (a chunk written after the snapshot is not
        // claimed), a whole file's state goes only after its bytes are durable.
        let mut to_sync: Vec<OwnedFd> = Vec::new();
        for ino in inos {
            match self.files.get(&ino).map(|f| Arc::clone(&f)) {
                Some(f) => {
                    {
                        let mut inner = f.inner.lock();
                        inner.unsaved = false;
                        rows.push((ino, Some((inner.valid_end, encode_ranges(&inner.present)))));
                    }
                    if let Ok(fd) = handle::open(self.root.as_fd(), &f.handle, libc::O_RDONLY) {
                        to_sync.push(fd);
                    }
                }
                None => rows.push((ino, None)),
            }
        }
        {
            let db = self.db.lock();
            let mut stmt = db.prepare_cached("SELECT handle FROM hyd_files WHERE ino = ?1")?;
            for (ino, r) in &rows {
                if r.is_none()
                    && let Ok(h) = stmt.query_row([*ino as i64], |r| r.get::<_, Vec<u8>>(0))
                    && let Ok(fd) = handle::open(self.root.as_fd(), &h, libc::O_RDONLY)
                {
                    to_sync.push(fd);
                }
            }
        }
        // One syncfs instead of many fdatasyncs (each a journal commit) when many files
        // were fetched since the last save, e.g. a directory of small files.
        if to_sync.len() > 16 {
            rustix::fs::syncfs(&self.root)?;
        } else {
            for fd in &to_sync {
                rustix::fs::fdatasync(fd)?;
            }
        }
        drop(to_sync);
        // Crash window: the bytes are durable, the ranges not recorded.
        fail::fail_point!("hydrate-save-midway");
        let mut db = self.db.lock();
        let tx = db.transaction()?;
        {
            let mut upd = tx.prepare_cached(
                "UPDATE hyd_files SET valid_end = ?2, present = ?3 WHERE ino = ?1",
            )?;
            let mut del = tx.prepare_cached("DELETE FROM hyd_files WHERE ino = ?1")?;
            for (ino, r) in &rows {
                match r {
                    Some((valid_end, present)) => {
                        upd.execute(params![*ino as i64, *valid_end as i64, present])?;
                    }
                    None => {
                        del.execute([*ino as i64])?;
                    }
                }
            }
            let mut meta = tx.prepare_cached(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            )?;
            meta.execute(params![
                "hyd_missing_files",
                self.missing_files.load(Ordering::Relaxed).to_string()
            ])?;
            meta.execute(params![
                "hyd_missing_bytes",
                self.missing_bytes.load(Ordering::Relaxed).to_string()
            ])?;
            if self.files.is_empty() && self.dirs.is_empty() {
                tx.execute("DELETE FROM hyd_links", [])?;
            }
            if self.dirs.is_empty() {
                // No directory left to reconcile: the older generation's rows are spent.
                tx.execute_batch("DELETE FROM hyd_old; DELETE FROM hyd_warm;")?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    // ---- progress -----------------------------------------------------------------------

    pub fn progress(&self) -> Progress {
        let total_files = self.total_files.load(Ordering::Relaxed);
        let total_bytes = self.total_bytes.load(Ordering::Relaxed);
        let done = !self.is_active();
        let clamp = |missing: i64, total: u64| {
            if done {
                total
            } else {
                total.saturating_sub(missing.max(0) as u64)
            }
        };
        let rate = {
            let w = self.window.lock();
            let bytes: u64 = w.iter().map(|(_, n)| n).sum();
            match w.front() {
                Some((t, _)) => {
                    let secs = t.elapsed().as_secs_f64().max(1.0);
                    bytes as f64 / secs
                }
                None => 0.0,
            }
        };
        Progress {
            files_total: total_files,
            files_present: clamp(self.missing_files.load(Ordering::Relaxed), total_files),
            bytes_total: total_bytes,
            bytes_present: clamp(self.missing_bytes.load(Ordering::Relaxed), total_bytes),
            dirs_pending: self.dirs.len() as u64,
            files_pending: self.files.len() as u64,
            fetched_bytes: self.fetched_bytes.load(Ordering::Relaxed),
            fetches: self.fetches.load(Ordering::Relaxed),
            rate,
            done,
            generation: self.generation,
        }
    }

    pub fn status(&self) -> Value {
        json!(self.progress())
    }
}

/// Work a program waits on: how much is under way, and when the last of it ended. The
/// prefetch holds back its next step while either says a program is busy, because a program's
/// reads come one after another (a B-tree walk is one fetch per level) and a prefetch step sent
/// in a gap between two of them delays the next.
pub(crate) struct Foreground {
    running: AtomicUsize,
    /// Nanoseconds from `epoch` to the end of the last foreground work (0: none yet).
    last_end: AtomicU64,
    epoch: Instant,
}

impl Foreground {
    fn new() -> Foreground {
        Foreground {
            running: AtomicUsize::new(0),
            last_end: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// Marks foreground work under way until the guard is dropped.
    pub(crate) fn begin(&self) -> ForegroundGuard<'_> {
        self.running.fetch_add(1, Ordering::AcqRel);
        ForegroundGuard { fg: self }
    }

    /// Whether foreground work is under way or ended less than `quiet` ago.
    pub(crate) fn busy(&self, quiet: Duration) -> bool {
        if self.running.load(Ordering::Acquire) > 0 {
            return true;
        }
        let end = self.last_end.load(Ordering::Acquire);
        end != 0
            && (self.epoch.elapsed().as_nanos() as u64).saturating_sub(end)
                < quiet.as_nanos() as u64
    }
}

pub(crate) struct ForegroundGuard<'a> {
    fg: &'a Foreground,
}

impl Drop for ForegroundGuard<'_> {
    fn drop(&mut self) {
        let now = (self.fg.epoch.elapsed().as_nanos() as u64).max(1);
        self.fg.last_end.fetch_max(now, Ordering::AcqRel);
        self.fg.running.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The core's view of the hydrator.
pub struct CoreHook {
    pub hyd: Arc<Hydrator>,
}

impl owsfs_fuse::Hydrate for CoreHook {
    fn active(&self) -> bool {
        self.hyd.is_active()
    }
    fn dir_pending(&self, ino: u64) -> bool {
        self.hyd.dir_is_pending(ino)
    }
    fn materialize(&self, ino: u64, dir: BorrowedFd<'_>) -> io::Result<()> {
        let _waited_on = self.hyd.foreground.begin();
        self.hyd.materialize_dir(ino, dir)
    }
    fn fetch(&self, ino: u64, start: u64, end: u64) -> io::Result<()> {
        self.hyd.fetch_range(ino, start, end, true)
    }
    fn whole(&self, ino: u64) -> bool {
        self.hyd.is_whole(ino)
    }
    fn truncate(&self, ino: u64, size: u64) {
        self.hyd.truncate(ino, size)
    }
    fn created(&self, ino: u64) {
        self.hyd.created(ino)
    }
    fn removed(&self, ino: u64) {
        self.hyd.removed(ino)
    }
    fn opened(&self, ino: u64, path: Option<&Path>) {
        self.hyd.opened(ino, path)
    }
}

fn encode_ranges(set: &ExtentSet) -> Vec<u8> {
    let mut out = Vec::with_capacity(set.len() * 16);
    for (s, e) in set.iter() {
        out.extend_from_slice(&s.to_le_bytes());
        out.extend_from_slice(&e.to_le_bytes());
    }
    out
}

fn decode_ranges(b: &[u8]) -> ExtentSet {
    b.chunks_exact(16)
        .map(|c| {
            let s = u64::from_le_bytes(c[..8].try_into().unwrap_or_default());
            let e = u64::from_le_bytes(c[8..].try_into().unwrap_or_default());
            (s, e)
        })
        .collect()
}

/// Removes every entry of a directory (what an interrupted materialization left).
fn clear_dir(dir: &OwnedFd) -> io::Result<()> {
    for (name, st) in list_dir(dir)? {
        remove_entry(dir, &name, st.st_mode & libc::S_IFMT == libc::S_IFDIR)?;
    }
    Ok(())
}

/// Removes `name` from `dir`, a directory with everything below it.
fn remove_entry(dir: &OwnedFd, name: &OsStr, is_dir: bool) -> io::Result<()> {
    if is_dir {
        let sub = rustix::fs::openat(
            dir,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        clear_dir(&sub)?;
        rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)?;
    } else {
        rustix::fs::unlinkat(dir, name, AtFlags::empty())?;
    }
    Ok(())
}

/// The entries of `dir`, each with its own (not followed) status.
fn list_dir(dir: &OwnedFd) -> io::Result<Vec<(std::ffi::OsString, rustix::fs::Stat)>> {
    let mut d = rustix::fs::Dir::new(open_for_reading(dir.as_fd())?)?;
    let mut v = Vec::new();
    while let Some(e) = d.read() {
        let e = e?;
        let n = e.file_name().to_bytes();
        if n == b"." || n == b".." {
            continue;
        }
        let name = OsStr::from_bytes(n).to_os_string();
        let st = rustix::fs::statat(dir, name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW)?;
        v.push((name, st));
    }
    Ok(v)
}

/// Directory `dir` (any descriptor of it, `O_PATH` too) opened again for reading.
fn open_for_reading(dir: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    Ok(rustix::fs::openat(
        dir,
        c".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// `set` below `end`.
fn clip(set: &ExtentSet, end: u64) -> ExtentSet {
    set.iter()
        .filter(|(s, _)| *s < end)
        .map(|(s, e)| (s, e.min(end)))
        .collect()
}

/// The access list of the cache's base generation (empty when it has none or it cannot be
/// read: it only orders the prefetch).
pub fn access_list(
    store: &Store,
    ws: &owsfs_store::Workspace,
    local: &owsfs_local::LocalState,
) -> Vec<String> {
    let read = || -> anyhow::Result<Vec<String>> {
        let Some(base) = local.base()? else {
            return Ok(Vec::new());
        };
        let Some(r) = ws.read_generation(base.generation)?.access else {
            return Ok(Vec::new());
        };
        let data = owsfs_store::read_blob(store, &r)?;
        owsfs_local::access::decode(&data).with_context(|| format!("access list {}", r.id))
    };
    read().unwrap_or_else(|e| {
        tracing::warn!("cannot read the access list of the base generation: {e:#}");
        Vec::new()
    })
}

/// The thread that stores the hydration state every second and, for a foreground mount,
/// draws the progress bar on stderr until everything is local.
pub struct Saver {
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Saver {
    /// Stops the thread at once (it is woken from its wait), without a last save: the
    /// caller saves after the last cut.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.lock().take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

/// Starts the saver; with `progress`, it also reports the hydration there until everything
/// is local.
pub fn spawn_saver(
    hyd: Arc<Hydrator>,
    progress: Option<Arc<dyn owsfs_local::progress::Progress>>,
) -> Saver {
    let stop = Arc::new(AtomicBool::new(false));
    let s = Arc::clone(&stop);
    let thread = std::thread::Builder::new()
        .name("owsfs-hydrate".into())
        .spawn(move || {
            let mut progress = progress.filter(|_| hyd.is_active());
            if let Some(p) = &progress {
                let now = hyd.progress();
                p.begin(
                    &format!("hydrating generation {}", now.generation),
                    now.bytes_total,
                    now.files_total,
                );
            }
            loop {
                // Woken early by `Saver::stop`.
                std::thread::park_timeout(Duration::from_millis(250));
                if s.load(Ordering::Acquire) {
                    break;
                }
                if let Err(e) = hyd.save() {
                    tracing::warn!("cannot store the hydration state: {e:#}");
                }
                if let Some(bar) = &progress {
                    let p = hyd.progress();
                    bar.update(p.bytes_present, p.files_present);
                    if p.done {
                        bar.finish();
                        progress = None;
                    }
                }
            }
            if let Some(bar) = &progress {
                bar.finish();
            }
        })
        .ok();
    Saver {
        stop,
        thread: Mutex::new(thread),
    }
}

/// `hydrating: [#####.....] 48% 1.2/2.5 GiB, 310/1200 files, 85.3 MB/s`
pub fn progress_line(p: &Progress) -> String {
    let frac = if p.bytes_total == 0 {
        if p.done { 1.0 } else { 0.0 }
    } else {
        p.bytes_present as f64 / p.bytes_total as f64
    };
    let width = 20;
    let filled = ((frac * width as f64).round() as usize).min(width);
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    format!(
        "{} [{}{}] {:3.0}% {:.2}/{:.2} GiB, {}/{} files, {:.1} MB/s",
        if p.done { "hydrated " } else { "hydrating" },
        "#".repeat(filled),
        ".".repeat(width - filled),
        frac * 100.0,
        gib(p.bytes_present),
        gib(p.bytes_total),
        p.files_present,
        p.files_total,
        p.rate / 1e6
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn foreground_is_busy_while_running_and_for_the_quiet_time_after() {
        let fg = Foreground::new();
        let quiet = Duration::from_millis(40);
        assert!(!fg.busy(quiet), "nothing ran yet");
        let a = fg.begin();
        let b = fg.begin();
        assert!(fg.busy(Duration::ZERO));
        drop(a);
        assert!(fg.busy(Duration::ZERO), "one is still running");
        drop(b);
        assert!(!fg.busy(Duration::ZERO));
        assert!(
            fg.busy(Duration::from_secs(3600)),
            "ended within the quiet time"
        );
        std::thread::sleep(quiet + Duration::from_millis(10));
        assert!(!fg.busy(quiet), "quiet for longer than the quiet time");
    }
}

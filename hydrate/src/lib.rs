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

mod batch;
mod fetch;
pub mod full;
mod materialize;
pub mod prefetch;
pub mod prepare;
mod progress;
pub mod ranges;
pub mod reconcile;
mod save;
mod warm;

use materialize::{list_dir, remove_entry};
pub(crate) use progress::Foreground;
pub use progress::{Saver, progress_line, spawn_saver};
use ranges::clip;
use save::{decode_ranges, encode_ranges};

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
use owsfs_journal::{BackingIno, DirtyState, ExtentSet, InoMap};
use owsfs_store::{
    BlobId, BlobRef, ChunkSpan, Content, FileContent, NodeKind, Store, Tree, TreeEntry,
};
use parking_lot::{Condvar, Mutex, MutexGuard};
use rusqlite::{Connection, OptionalExtension, params};
use rustix::fs::{AtFlags, Mode, OFlags};
use serde_json::{Value, json};

use owsfs_local::handle;
use owsfs_local::{Kind, NodeMap, decode_node, encode_node};

/// One GET fetches at most this much of a pack (adjacent chunks of one file usually sit
/// side by side in one pack).
const MAX_RUN: u64 = 8 << 20;

/// A file not wholly local.
pub(crate) struct FileState {
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
        ranges::missing_below(&self.present, self.valid_end.min(len))
    }

    fn whole(&self, len: u64) -> bool {
        ranges::whole_below(&self.present, self.valid_end.min(len))
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
    /// Files inserted into `files` so far (the prefetch's pack order is rebuilt when it grew).
    files_added: AtomicU64,
    /// Small partial files in pack order, for the prefetch (`batch.rs`).
    pack_order: Mutex<batch::PackOrder>,
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
    generation: AtomicU64,
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
        let h = Hydrator {
            store,
            total_files: AtomicU64::new(0),
            total_bytes: AtomicU64::new(0),
            missing_files: AtomicI64::new(0),
            missing_bytes: AtomicI64::new(0),
            generation: AtomicU64::new(0),
            db: Mutex::new(conn),
            root,
            root_ino,
            nodes,
            files: DashMap::new(),
            files_added: AtomicU64::new(0),
            pack_order: Mutex::new(batch::PackOrder::default()),
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
        h.load_counters();
        h.load(dirty)?;
        let h = Arc::new(h);
        h.update_active();
        Ok(h)
    }

    /// Loads the hydration state again, after the cache was made a lazy copy of another
    /// generation below the same backing root (a live rollback). Whatever this hydrator knew
    /// goes, the paths opened included (they named the old tree). The caller makes sure no
    /// fetch, materialization or save runs meanwhile (the prefetch and the saver stopped,
    /// kernel requests held back, the sync agent's cache state locked).
    pub fn reload(&self, dirty: &DirtyState) -> anyhow::Result<()> {
        self.files.clear();
        self.dirs.clear();
        self.links.lock().clear();
        self.unsaved.lock().clear();
        self.access.lock().clear();
        self.counters_unsaved.store(false, Ordering::Relaxed);
        self.load_counters();
        self.load(dirty)?;
        self.update_active();
        Ok(())
    }

    /// The stored totals and the generation (0 where none is stored).
    fn load_counters(&self) {
        let db = self.db.lock();
        let meta = |k: &str| -> i64 {
            db.query_row("SELECT value FROM meta WHERE key = ?1", [k], |r| {
                r.get::<_, String>(0)
            })
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
        };
        let r = Ordering::Relaxed;
        self.total_files.store(meta("hyd_total_files") as u64, r);
        self.total_bytes.store(meta("hyd_total_bytes") as u64, r);
        self.missing_files.store(meta("hyd_missing_files"), r);
        self.missing_bytes.store(meta("hyd_missing_bytes"), r);
        self.generation.store(meta("hyd_generation") as u64, r);
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
                let inos = InoMap::new(BackingIno(self.root_ino));
                if let Some(d) = dirty.files.get(&inos.fuse(BackingIno(ino))) {
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
                self.files_added.fetch_add(1, Ordering::Release);
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
}

/// The core's view of the hydrator.
pub struct CoreHook {
    pub hyd: Arc<Hydrator>,
}

impl owsfs_fuse::Hydrate for CoreHook {
    fn active(&self) -> bool {
        self.hyd.is_active()
    }
    fn dir_pending(&self, ino: BackingIno) -> bool {
        self.hyd.dir_is_pending(ino.0)
    }
    fn materialize(&self, ino: BackingIno, dir: BorrowedFd<'_>) -> io::Result<()> {
        let _waited_on = self.hyd.foreground.begin();
        self.hyd.materialize_dir(ino.0, dir)
    }
    fn fetch(&self, ino: BackingIno, start: u64, end: u64) -> io::Result<()> {
        self.hyd.fetch_range(ino.0, start, end, true)
    }
    fn whole(&self, ino: BackingIno) -> bool {
        self.hyd.is_whole(ino.0)
    }
    fn truncate(&self, ino: BackingIno, size: u64) {
        self.hyd.truncate(ino.0, size)
    }
    fn created(&self, ino: BackingIno) {
        self.hyd.created(ino.0)
    }
    fn removed(&self, ino: BackingIno) {
        self.hyd.removed(ino.0)
    }
    fn opened(&self, ino: BackingIno, path: Option<&Path>) {
        self.hyd.opened(ino.0, path)
    }
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

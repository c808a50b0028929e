//! The sync agent: cuts the journal into generations and commits them to the store.
//!
//! One thread runs cuts one at a time: every `--commit-interval` when anything is dirty, at
//! once when `owsfs sync` asks, and a last time at unmount. A cut:
//! 1. `syncfs` on the mount, so dirty pages of shared mmaps (and of the writeback cache) have
//!    reached the daemon;
//! 2. under the write barrier: the journal position and dirty state, the listings of the
//!    directories to rebuild, and the files to read, frozen (copy-on-first-write);
//! 3. after the barrier: the frozen files' dirty ranges are re-chunked, new blobs packed and
//!    uploaded, trees built bottom up;
//! 4. the generation record is committed (create-if-absent of the next slot);
//! 5. the cache's state records the new base, and the journal forgets what the cut covered.

pub mod build;
pub mod capture;
mod gc;
pub mod lease;
mod packer;
pub mod pages;
mod rollback;

/// How long a throttled write waits for a cut's push of the kernel's pages before it goes
/// through anyway (the push may need the FUSE thread the write holds).
pub const PUSH_WAIT: Duration = Duration::from_millis(20);

/// How long a writer over the lag bounds waits, while commits fail on a full cache disk, for
/// an attempt that succeeds before it gets ENOSPC.
const LOCAL_FULL_WAIT: Duration = Duration::from_secs(5);
pub mod wal;

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use crossbeam_channel::{Receiver, Sender, bounded, never, select};
use owsfs_fuse::Core;
use owsfs_store::Store;
use owsfs_store::generation::{CommitError, GenKind, GenStats, GenerationRecord, Workspace};
use parking_lot::{Condvar, Mutex};
use rustix::fs::OFlags;
use serde::{Deserialize, Serialize};

use self::build::SqlitePosition;
pub use self::rollback::RollbackDone;
use owsfs_local::{Base, Kind, LocalState};

/// What the agent needs of the writer lease: a commit is attempted only while it is good,
/// and a commit that finds its slot fenced loses it (fail-stop).
pub trait LeaseCheck: Send + Sync {
    /// The epoch this mount's commits carry.
    fn epoch(&self) -> u64;
    /// Ok while the lease is good for at least `ahead`.
    fn check(&self, ahead: Duration) -> anyhow::Result<()>;
    fn is_lost(&self) -> bool;
    /// Fail-stop: writes stop, nothing more is committed.
    fn lose(&self, why: &str);
    /// A commit whose slot write started at `started` (the store's clock) landed: it counts
    /// as a renewal of the lease (lease version 2).
    fn committed(&self, _started: Instant) {}
}

/// What the agent needs of lazy hydration (a cache restored lazily holds bytes and
/// directories that are not local yet).
pub trait Hydration: Send + Sync {
    /// Makes bytes `[start, end)` of backing inode `ino` local before a cut reads them.
    fn fetch(&self, ino: u64, start: u64, end: u64) -> std::io::Result<()>;
    /// The directory is not materialized: its subtree is the base generation's.
    fn dir_pending(&self, ino: u64) -> bool;
    /// Stores the hydration state; called before the journal forgets a cut.
    fn save(&self) -> anyhow::Result<()>;
    /// Paths opened during this mount, most recent first (the next access list).
    fn accessed_paths(&self) -> Vec<String>;
}

/// A cache with nothing left to fetch.
pub struct AllLocal;

impl Hydration for AllLocal {
    fn fetch(&self, _: u64, _: u64, _: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn dir_pending(&self, _: u64) -> bool {
        false
    }
    fn save(&self) -> anyhow::Result<()> {
        Ok(())
    }
    fn accessed_paths(&self) -> Vec<String> {
        Vec::new()
    }
}

/// How the agent paces itself.
#[derive(Clone, Debug)]
pub struct SyncOptions {
    pub commit_interval: Duration,
    /// Writers slow down while the oldest unsynced change is older than this...
    pub max_lag: Duration,
    /// ...or while more than this many bytes are unsynced.
    pub max_lag_bytes: u64,
}

/// Why `owsfs sync` did not get its generation.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("the mount is shutting down")]
    ShuttingDown,
    #[error("not durable after {after:?}: {why}")]
    NotDurable { after: Duration, why: String },
    /// The lease was lost (fail-stop): nothing more is uploaded from this mount.
    #[error(
        "writes were stopped ({0}); nothing more goes to the store from this mount: its \
         unsynced changes stay in its cache (`owsfs recover` turns them into a workspace)"
    )]
    Stopped(String),
}

/// The agent's state, for `owsfs status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentStatus {
    pub store: String,
    /// The store as a `--store` URL (`store` is for people).
    #[serde(default)]
    pub store_url: String,
    /// Why writes fail with EROFS (fail-stop), if they do.
    pub writes_stopped: Option<String>,
    pub workspace: String,
    /// Where the workspace was forked from, when it is a fork.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forked_from: Option<owsfs_store::ForkSource>,
    /// The newest durable generation.
    pub generation: u64,
    pub epoch: u64,
    /// Age of the oldest unsynced change.
    pub lag_secs: f64,
    pub lag_bytes: u64,
    pub commits: u64,
    pub commit_failures: u64,
    pub last_commit: Option<CommitInfo>,
    pub last_error: Option<String>,
    pub throttled_ms: u64,
    pub store_requests: owsfs_store::StatsSnapshot,
}

/// What the last successful commit did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CommitInfo {
    pub generation: u64,
    pub time_unix_ms: u64,
    pub bytes_new: u64,
    pub blobs_new: u64,
    pub packs_new: u64,
    pub bytes_read: u64,
    pub files: u64,
    pub cut_ms: u64,
    pub total_ms: u64,
}

struct AgentState {
    head: u64,
    epoch: u64,
    /// Every journal record up to this seq is in a durable generation.
    durable_seq: u64,
    /// `owsfs sync` waits for this seq to be durable.
    requested_seq: u64,
    /// The journal was dirty when the agent started (replayed after a crash, or a rescan),
    /// and no commit has covered that state yet. Its changes carry no seq of their own
    /// when nothing was recorded before (a rescan of a new journal is at seq 0), so
    /// `durable_seq` alone cannot say they are not durable.
    inherited_dirty: bool,
    /// An `owsfs sync` waits for the inherited state.
    inherited_requested: bool,
    stop: bool,
    last_error: Option<String>,
    last_commit: Option<CommitInfo>,
    commits: u64,
    failures: u64,
    previous_sqlite: Vec<SqlitePosition>,
}

impl AgentState {
    /// A commit covering the journal up to `seq` landed (`info.generation`): everything up
    /// to `seq`, and what the journal held when the agent started, is durable.
    fn committed(&mut self, seq: u64, sqlite: Vec<SqlitePosition>, info: CommitInfo) {
        self.head = info.generation;
        self.durable_seq = self.durable_seq.max(seq);
        self.inherited_dirty = false;
        self.commits += 1;
        self.last_error = None;
        self.previous_sqlite = sqlite;
        self.last_commit = Some(info);
    }
}

pub struct SyncAgent {
    core: Arc<Core>,
    store: Arc<Store>,
    ws: Workspace,
    local: Mutex<LocalState>,
    opts: SyncOptions,
    root_fd: OwnedFd,
    /// The syncfs of the mount (by a helper process, `pages`). Each cut opens the mountpoint
    /// and closes it again: a descriptor kept open would make the unmount fail with EBUSY.
    pages: Mutex<Option<Arc<pages::PagePusher>>>,
    st: Mutex<AgentState>,
    cv: Condvar,
    /// A cut is pushing dirty pages through the mount: writers must not be throttled, or the
    /// cut would wait for them while they wait for it.
    syncing: AtomicBool,
    /// Set (every 20 ms, by the lag watcher, and by the agent's loop) while the lag is over
    /// its bounds, so the data write path checks one atomic rather than the journal's lock.
    over_lag: AtomicBool,
    /// The last commit failed because the cache's own disk is full (state.db, side files):
    /// waiting for a commit cannot help, so writers over the lag get ENOSPC instead.
    local_full: AtomicBool,
    /// Time for the agent's decisions (the store's clock).
    clock: Arc<dyn owsfs_store::Clock>,
    /// Wakes the agent's loop: a sync request, a writer over the lag bounds.
    wake_tx: Sender<()>,
    wake_rx: Receiver<()>,
    /// Dropped at stop: the agent's loop and the lag watcher wake and end.
    stop_tx: Mutex<Option<Sender<()>>>,
    stop_rx: Receiver<()>,
    /// At the last exact lag check: the journal's `written_bytes()` and the dirty bytes.
    /// Their sum, plus what was written since, bounds the dirty bytes from above, so a data
    /// write can tell it is safely under `--max-lag-bytes` without the journal's lock.
    mark_written: AtomicU64,
    mark_dirty: AtomicU64,
    mark_lock: Mutex<()>,
    pub throttled_ms: AtomicU64,
    /// How long successful commits took, from the cut to the record in the store.
    pub commit_latency: owsfs_fuse::stats::Histogram,
    pub store_url: String,
    /// The writer lease: checked before every commit; lost (fail-stop) when a commit finds
    /// its slot fenced.
    keeper: Arc<dyn LeaseCheck>,
    /// Lazy hydration: what is not local yet (fetched before a cut reads it).
    hyd: Arc<dyn Hydration>,
    /// The base generation's access list (paths), carried on after this mount's own.
    inherited_access: Mutex<Vec<String>>,
    /// What the GC runs condemned, as last read (`gc.rs`).
    gc: Mutex<owsfs_store::gc::GcWatch>,
    /// One commit at a time, from its cut to its state updated: the agent's thread, a
    /// `commit_now`, a live rollback.
    commit_lock: Mutex<()>,
}

impl SyncAgent {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        core: Arc<Core>,
        store: Arc<Store>,
        ws: Workspace,
        local: LocalState,
        opts: SyncOptions,
        previous_sqlite: Vec<SqlitePosition>,
        head: u64,
        keeper: Arc<dyn LeaseCheck>,
        hyd: Arc<dyn Hydration>,
        inherited_access: Vec<String>,
    ) -> anyhow::Result<Arc<SyncAgent>> {
        let root_fd = owsfs_sys::fs::open_path(
            rustix::fs::CWD,
            core.backing_root(),
            OFlags::DIRECTORY | OFlags::CLOEXEC,
        )
        .context("open backing root")?;
        let clean_seq = core.journal().clean_seq();
        let durable_seq = clean_seq.unwrap_or(0);
        let store_url = store.url().to_string();
        let clock = Arc::clone(store.clock());
        let (wake_tx, wake_rx) = bounded(1);
        let (stop_tx, stop_rx) = bounded(0);
        // The first change after a cut wakes the agent: a clean journal is not looked at on
        // a period.
        let on_change = wake_tx.clone();
        core.journal().on_change(Box::new(move || {
            let _ = on_change.try_send(());
        }));
        Ok(Arc::new(SyncAgent {
            core,
            store,
            ws,
            local: Mutex::new(local),
            opts,
            root_fd,
            pages: Mutex::new(None),
            st: Mutex::new(AgentState {
                head,
                epoch: keeper.epoch(),
                durable_seq,
                requested_seq: 0,
                inherited_dirty: clean_seq.is_none(),
                inherited_requested: false,
                stop: false,
                last_error: None,
                last_commit: None,
                commits: 0,
                failures: 0,
                previous_sqlite,
            }),
            cv: Condvar::new(),
            syncing: AtomicBool::new(false),
            over_lag: AtomicBool::new(false),
            local_full: AtomicBool::new(false),
            clock,
            wake_tx,
            wake_rx,
            stop_tx: Mutex::new(Some(stop_tx)),
            stop_rx,
            mark_written: AtomicU64::new(0),
            mark_dirty: AtomicU64::new(0),
            mark_lock: Mutex::new(()),
            throttled_ms: AtomicU64::new(0),
            commit_latency: Default::default(),
            store_url,
            keeper,
            hyd,
            inherited_access: Mutex::new(inherited_access),
            gc: Mutex::default(),
            commit_lock: Mutex::new(()),
        }))
    }

    /// Where the workspace is mounted; called once the mount exists.
    pub fn set_mount(&self, mountpoint: &std::path::Path) {
        *self.pages.lock() = Some(Arc::new(pages::PagePusher::new(mountpoint)));
    }

    /// syncfs on the mount, so dirty pages of shared mmaps and of the writeback cache have
    /// reached the daemon before the barrier.
    pub fn push_dirty_pages(&self) {
        let Some(pages) = self.pages.lock().clone() else {
            return;
        };
        self.syncing.store(true, Ordering::Release);
        let r = pages.push();
        self.syncing.store(false, Ordering::Release);
        if let Err(e) = r {
            tracing::warn!("sync: {e:#}");
        }
    }

    /// Backpressure, called by data writes before they start: while the unsynced changes
    /// are over their bounds, the writer wakes the agent and waits for a commit.
    ///
    /// While a cut pushes the kernel's pages through the mount (`syncing`), the page writeback
    /// it waits for goes through at once, and other writes wait for the push to end, but only
    /// briefly: a FUSE thread held here could be the one the push needs, so after
    /// [`PUSH_WAIT`] they go through too.
    ///
    /// While commits fail because the cache's own disk is full, a writer over the bounds gets
    /// ENOSPC (`Err`) rather than waiting for a commit that cannot come: a full disk answers
    /// so on a local filesystem too. It waits for one more attempt first (at most a second
    /// away while the disk is full), so that once space is freed the first writes already go
    /// through. The kernel's page writeback is let through (it fails on its own if no space
    /// is left).
    pub fn throttle(&self, page_writeback: bool) -> Result<(), i32> {
        if page_writeback && self.syncing.load(Ordering::Acquire) {
            return Ok(());
        }
        if !self.over_lag.load(Ordering::Relaxed) {
            let grown = self
                .core
                .journal()
                .written_bytes()
                .saturating_sub(self.mark_written.load(Ordering::Acquire));
            if self.mark_dirty.load(Ordering::Relaxed) + grown <= self.opts.max_lag_bytes {
                return Ok(());
            }
        }
        let started = Instant::now();
        let mut push_seen: Option<Instant> = None;
        let mut refused = Ok(());
        // The failed commits counted when the disk was first seen full by this writer.
        let mut full_since: Option<u64> = None;
        loop {
            if self.keeper.is_lost() || !self.lagging() {
                break;
            }
            if !page_writeback && self.local_full.load(Ordering::Relaxed) {
                let failures = self.st.lock().failures;
                let f0 = *full_since.get_or_insert(failures);
                if failures != f0 || started.elapsed() >= LOCAL_FULL_WAIT {
                    refused = Err(libc::ENOSPC);
                    break;
                }
            }
            if self.syncing.load(Ordering::Acquire) {
                let since = *push_seen.get_or_insert_with(Instant::now);
                if page_writeback || since.elapsed() >= PUSH_WAIT {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            // Make sure a cut is coming, then wait for a commit (or its failure) to end. The
            // timeout only bounds a missed wake-up: the lag is looked at again either way.
            let _ = self.wake_tx.try_send(());
            let mut st = self.st.lock();
            if st.stop {
                break;
            }
            self.cv.wait_for(&mut st, Duration::from_millis(100));
        }
        let waited = started.elapsed().as_millis() as u64;
        if waited > 0 {
            self.throttled_ms.fetch_add(waited, Ordering::Relaxed);
        }
        refused
    }

    /// The agent's thread: cuts until stopped, then a last one if anything is dirty.
    pub fn run(self: &Arc<Self>) {
        // The lag is also watched while a cut uploads, which can take long: writers must feel
        // the bound then too.
        let watcher = {
            let me = Arc::clone(self);
            std::thread::Builder::new()
                .name("owsfs-lag".into())
                .spawn(move || me.watch_lag())
        };
        if let Err(e) = &watcher {
            tracing::warn!("sync: cannot start the lag watcher: {e}");
        }
        self.run_loop();
        if let Ok(w) = watcher {
            let _ = w.join();
        }
    }

    /// Refreshes `over_lag` every 20 ms until stopped. (The age bound has no event: it is
    /// crossed by time passing.)
    fn watch_lag(&self) {
        loop {
            // After a fail-stop nothing will be uploaded: writers fail with EROFS rather than
            // wait.
            let lagging = !self.keeper.is_lost() && self.lagging();
            self.over_lag.store(lagging, Ordering::Relaxed);
            select! {
                recv(self.stop_rx) -> _ => break,
                recv(self.clock.after(Duration::from_millis(20))) -> _ => {}
            }
        }
        self.over_lag.store(false, Ordering::Relaxed);
    }

    /// Cuts when a cut is due (the commit interval after the last attempt, while anything is
    /// dirty), asked for (`owsfs sync`), or forced by the lag bounds; waits in one `select!`
    /// on wake-ups, the next deadline and the stop channel. Failed commits back off.
    fn run_loop(self: &Arc<Self>) {
        let mut last_attempt = self.clock.now();
        let mut backoff = Duration::ZERO;
        loop {
            if !self.wait_for_work(last_attempt, backoff) {
                break;
            }
            last_attempt = self.clock.now();
            match self.commit_once() {
                Ok(_) => {
                    backoff = Duration::ZERO;
                    self.local_full.store(false, Ordering::Relaxed);
                }
                Err(e) => {
                    let full = local_disk_full(&e);
                    self.local_full.store(full, Ordering::Relaxed);
                    // A full cache disk costs nothing to try again: retried within a second
                    // of space coming back.
                    let most = if full {
                        Duration::from_secs(1)
                    } else {
                        Duration::from_secs(30)
                    };
                    backoff = (backoff * 2).clamp(Duration::from_millis(200), most);
                    tracing::warn!("sync: commit failed (retrying in {backoff:?}): {e:#}");
                    let mut st = self.st.lock();
                    st.last_error = Some(format!("{e:#}"));
                    st.failures += 1;
                    self.cv.notify_all();
                }
            }
        }
        self.final_cut();
    }

    /// Waits until a cut should start; false when stopped.
    fn wait_for_work(&self, last_attempt: Instant, backoff: Duration) -> bool {
        loop {
            let wait = {
                let mut st = self.st.lock();
                if st.stop {
                    return false;
                }
                if let Some(seq) = self.core.journal().clean_seq() {
                    // Nothing dirty: everything handed out so far is durable.
                    if seq > st.durable_seq || st.inherited_dirty {
                        st.durable_seq = st.durable_seq.max(seq);
                        st.inherited_dirty = false;
                        self.cv.notify_all();
                    }
                }
                let since = self.clock.now().saturating_duration_since(last_attempt);
                if self.keeper.is_lost() {
                    // Fail-stop: nothing more goes to the store; the unsynced changes stay in
                    // the cache. Only the stop ends the wait.
                    Duration::MAX
                } else {
                    let wanted = st.requested_seq > st.durable_seq
                        || (st.inherited_requested && st.inherited_dirty);
                    let dirty = self.core.journal().is_dirty();
                    let lagging = self.lagging();
                    self.over_lag.store(lagging, Ordering::Relaxed);
                    let due_in = (self.opts.commit_interval + backoff).saturating_sub(since);
                    let backed_off = since >= backoff;
                    if wanted || (backed_off && (lagging || (dirty && due_in.is_zero()))) {
                        return true;
                    }
                    // A clean journal wakes the agent when it becomes dirty (`on_change`).
                    // Dirty, the agent waits for the commit interval, or for the oldest change
                    // to reach `--max-lag`, whichever comes first.
                    let age_left = || {
                        let (_, age) = self.core.journal().lag();
                        age.map_or(self.opts.max_lag, |a| self.opts.max_lag.saturating_sub(a))
                    };
                    match (wanted || lagging, dirty) {
                        (true, _) => backoff.saturating_sub(since),
                        (false, true) => due_in.min(age_left().max(backoff)),
                        (false, false) => Duration::MAX,
                    }
                }
            };
            let deadline = if wait == Duration::MAX {
                never()
            } else {
                self.clock.after(wait)
            };
            select! {
                recv(self.stop_rx) -> _ => {}
                recv(self.wake_rx) -> _ => {}
                recv(deadline) -> _ => {}
            }
        }
    }

    /// The mount is gone: a last cut, retried a few times, so an unmount leaves nothing
    /// unsynced that the store can take.
    fn final_cut(&self) {
        for attempt in 0..5 {
            if !self.core.journal().is_dirty() || self.keeper.is_lost() {
                break;
            }
            match self.commit_once() {
                Ok(g) => {
                    tracing::info!("sync: final generation {g} committed");
                    break;
                }
                Err(e) => {
                    tracing::warn!("sync: final commit failed (attempt {}): {e:#}", attempt + 1);
                    self.st.lock().last_error = Some(format!("{e:#}"));
                    self.clock.sleep(Duration::from_millis(200 << attempt));
                }
            }
        }
        if !self.keeper.is_lost() {
            self.ws.flush_head_hint();
        }
    }

    /// Unsynced changes are older than `--max-lag` or larger than `--max-lag-bytes`.
    fn lagging(&self) -> bool {
        let (bytes, age) = {
            // One checker at a time, and the dirty mark published before its written mark,
            // so a data write that sees a new written mark also sees the matching dirty one.
            let _one = self.mark_lock.lock();
            let written = self.core.journal().written_bytes();
            let (bytes, age) = self.core.journal().lag();
            self.mark_dirty.store(bytes, Ordering::Relaxed);
            self.mark_written.store(written, Ordering::Release);
            (bytes, age)
        };
        bytes > self.opts.max_lag_bytes || age.is_some_and(|a| a > self.opts.max_lag)
    }

    /// Stops the thread after its last cut.
    pub fn stop(&self) {
        self.over_lag.store(false, Ordering::Relaxed);
        self.st.lock().stop = true;
        self.stop_tx.lock().take();
        self.cv.notify_all();
    }

    /// `owsfs sync`: everything written before the call is durable when this returns Ok,
    /// with the newest generation number.
    ///
    /// While commits fail for want of space in the cache itself, waiting cannot help: the
    /// call fails once an attempt made after it failed that way too.
    pub fn sync(&self, timeout: Duration) -> Result<u64, SyncError> {
        let started = Instant::now();
        let deadline = started + timeout;
        let journal = self.core.journal();
        let target = journal.stats().last_seq;
        let mut st = self.st.lock();
        st.requested_seq = st.requested_seq.max(target);
        st.inherited_requested |= st.inherited_dirty;
        let failures_before = st.failures;
        let _ = self.wake_tx.try_send(());
        while st.durable_seq < target || st.inherited_dirty {
            if st.stop {
                return Err(SyncError::ShuttingDown);
            }
            if st.failures != failures_before && self.local_full.load(Ordering::Relaxed) {
                return Err(SyncError::NotDurable {
                    after: started.elapsed(),
                    why: format!(
                        "the cache's disk is full ({}); free space in it and sync again",
                        st.last_error.as_deref().unwrap_or("no space")
                    ),
                });
            }
            if let Some(why) = self.core.writes_stopped() {
                return Err(SyncError::Stopped(why.to_string()));
            }
            // A fail-stop does not wake this wait (the keeper does not know the agent): it is
            // looked at every 200 ms.
            let until = deadline.min(Instant::now() + Duration::from_millis(200));
            if self.cv.wait_until(&mut st, until).timed_out() && Instant::now() >= deadline {
                return Err(SyncError::NotDurable {
                    after: timeout,
                    why: st
                        .last_error
                        .clone()
                        .unwrap_or_else(|| "the upload is still running".into()),
                });
            }
        }
        Ok(st.head)
    }

    /// One cut and commit now, on the caller's thread (for `owsfs recover`, with no agent
    /// thread running). Returns the generation number.
    pub fn commit_now(&self) -> anyhow::Result<u64> {
        self.commit_once()
    }

    /// One cut and commit. Returns the generation number.
    fn commit_once(&self) -> anyhow::Result<u64> {
        self.commit_once_with(true)
    }

    /// One cut and commit; `push_pages`: a syncfs of the mount first (not while kernel
    /// requests are held back: it would wait on them).
    fn commit_once_with(&self, push_pages: bool) -> anyhow::Result<u64> {
        // 1. Dirty pages of mmaps and of the writeback cache reach the daemon first (not after
        // the unmount: nothing serves the mount any more).
        if push_pages && !self.st.lock().stop {
            self.push_dirty_pages();
        }
        let _one = self.commit_lock.lock();
        self.commit_locked()
    }

    /// A cut and commit, with the commit lock held.
    fn commit_locked(&self) -> anyhow::Result<u64> {
        let started = Instant::now();
        let journal = self.core.journal();
        let mut local = self.local.lock();
        self.gc_refresh(&mut local)?;
        let full = local.base()?.is_none();
        let inos = self.core.ino_map();
        // 2. The barrier: a consistent cut (its time is kept: `hydrate/src/reconcile.rs`).
        let cut_unix_ms = self.clock.unix_ms();
        let (seq, dirty, captured, frozen) = {
            let _barrier = self.core.barrier();
            let (seq, dirty) = journal.cut()?;
            let known = KnownNodes(&local, &*self.hyd);
            let captured = capture::capture(&self.root_fd, &dirty, &known, inos, full)?;
            local.node_map().mark_capture();
            let frozen = self.core.freezer().freeze(captured.to_read.iter().cloned());
            (seq, dirty, captured, frozen)
        };
        let cut_ms = started.elapsed().as_millis() as u64;
        // Crash windows (`store/FORMAT.md`, "Crash windows"), in the order a cut meets them.
        fail::fail_point!("commit-after-cut");
        // 3. Read, chunk, pack, upload.
        let previous_sqlite = self.st.lock().previous_sqlite.clone();
        let built = build::build(
            &self.store,
            &local,
            &self.root_fd,
            &captured,
            &dirty,
            &frozen,
            self.core.freezer(),
            inos,
            &previous_sqlite,
            &|ino, start, end| self.hyd.fetch(ino, start, end),
            &self.access_list(),
        );
        let built = match built {
            Ok(b) => b,
            Err(e) => {
                self.core.freezer().finish_all();
                return Err(e);
            }
        };
        fail::fail_point!("commit-after-packs");
        // 4. Commit the generation.
        let (head, epoch) = self.head_epoch();
        let number = head + 1;
        self.gc_check(&mut local, &built.packs_used, number)?;
        // Noted before the commit: if the daemon dies between the commit and the cache's
        // update, the next mount recognises the generation as this cache's own.
        local.set_meta(
            "pending",
            &format!("{number} {}", serde_json::to_string(&built.root)?),
        )?;
        let now_ms = self.clock.unix_ms();
        let record = GenerationRecord {
            workspace: self.ws.name().to_string(),
            number,
            parent: (head > 0).then_some(head),
            epoch,
            kind: GenKind::Commit,
            time_unix_ms: now_ms,
            root: Some(built.root),
            access: built.access,
            sqlite: built.sqlite.clone(),
            stats: GenStats {
                files: built.files,
                dirs: built.dirs,
                bytes_total: built.bytes_total,
                bytes_new: built.bytes_new,
                blobs_new: built.blobs_new,
                packs_new: built.packs_new,
                journal_seq: seq,
                cut_ms,
                upload_ms: started.elapsed().as_millis() as u64 - cut_ms,
                rollback_to: None,
            },
        };
        fail::fail_point!("commit-after-pending");
        self.write_slot(&record)?;
        fail::fail_point!("commit-after-slot");
        // 5. The cache's new base, then the journal forgets what the cut covered.
        drop(local);
        let base = Base {
            generation: number,
            epoch,
            root: serde_json::to_string(&built.root)?,
        };
        let mut l = self.local.lock();
        l.commit(&base, built.update)?;
        l.set_meta("base_cut_unix_ms", &cut_unix_ms.to_string())?;
        drop(l);
        fail::fail_point!("commit-after-state");
        // What the journal forgets must be in the stored hydration state first.
        self.hyd.save()?;
        journal.committed(seq)?;
        // A commit someone waits for (`owsfs sync`, a handoff) updates the HEAD hint at once;
        // the periodic ones leave it to the next due one (`HINT_EVERY`).
        let asked = {
            let st = self.st.lock();
            st.requested_seq > st.durable_seq || st.inherited_requested
        };
        if asked {
            self.ws.flush_head_hint();
        }
        let total_ms = self.commit_latency.observe(started.elapsed()).as_millis() as u64;
        let mut st = self.st.lock();
        st.committed(
            seq,
            built.sqlite,
            CommitInfo {
                generation: number,
                time_unix_ms: now_ms,
                bytes_new: built.bytes_new,
                blobs_new: built.blobs_new,
                packs_new: built.packs_new,
                bytes_read: built.bytes_read,
                files: captured.to_read.len() as u64,
                cut_ms,
                total_ms,
            },
        );
        log_commit(st.last_commit.as_ref(), epoch);
        self.cv.notify_all();
        tracing::debug!(
            "sync: generation {number}: {} new bytes in {total_ms} ms",
            built.bytes_new
        );
        Ok(number)
    }

    /// Writes the generation's slot, if the lease is still good (the fence in the store is the
    /// hard guarantee). A slot written counts as a renewal of the lease.
    fn write_slot(&self, record: &GenerationRecord) -> anyhow::Result<()> {
        let (number, epoch) = (record.number, record.epoch);
        self.keeper
            .check(Duration::ZERO)
            .with_context(|| format!("not committing generation {number}"))?;
        let slot_started = self.clock.now();
        match self.ws.commit(record) {
            Ok(()) => {
                self.keeper.committed(slot_started);
                Ok(())
            }
            Err(CommitError::SlotTaken { number, existing }) if existing.epoch == epoch => {
                // Our own earlier attempt landed although its answer was lost (the epoch is
                // this mount's alone). The journal still covers it: go on on top of it.
                let mut st = self.st.lock();
                st.head = st.head.max(number);
                bail!(
                    "generation {number} of this mount landed although its answer was lost; \
                     the next cut goes on top of it"
                );
            }
            Err(CommitError::SlotTaken { number, existing }) => {
                let why = format!(
                    "generation slot {number} was taken at epoch {} (this mount has epoch \
                     {epoch}): another node took the workspace over",
                    existing.epoch
                );
                self.keeper.lose(&why);
                bail!("commit refused: {why}");
            }
            Err(e) => Err(e).with_context(|| format!("commit generation {number}")),
        }
    }

    /// The access list for the next generation: what this mount opened, most recent first,
    /// then what the base generation's list held. Empty when there is nothing.
    fn access_list(&self) -> Vec<u8> {
        let mut seen = std::collections::HashSet::new();
        let paths: Vec<String> = self
            .hyd
            .accessed_paths()
            .into_iter()
            .chain(self.inherited_access.lock().iter().cloned())
            .filter(|p| seen.insert(p.clone()))
            .take(owsfs_local::access::ACCESS_LIMIT)
            .collect();
        owsfs_local::access::encode(&paths)
    }

    /// The last commit error, if the last attempt failed.
    pub fn last_error(&self) -> Option<String> {
        self.st.lock().last_error.clone()
    }

    /// The newest generation this agent knows and the epoch its commits carry.
    fn head_epoch(&self) -> (u64, u64) {
        let st = self.st.lock();
        (st.head, st.epoch)
    }

    /// The workspace this agent commits to.
    pub fn workspace(&self) -> &Workspace {
        &self.ws
    }

    /// For `owsfs status`.
    pub fn status(&self) -> AgentStatus {
        let st = self.st.lock();
        let (lag_bytes, lag_age) = self.core.journal().lag();
        AgentStatus {
            store: self.store_url.clone(),
            store_url: self.store.url().to_url(),
            writes_stopped: self.core.writes_stopped().map(str::to_string),
            workspace: self.ws.name().to_string(),
            forked_from: self.ws.info().forked_from.clone(),
            generation: st.head,
            epoch: st.epoch,
            lag_secs: lag_age.map_or(0.0, |a| a.as_secs_f64()),
            lag_bytes,
            commits: st.commits,
            commit_failures: st.failures,
            last_commit: st.last_commit.clone(),
            last_error: st.last_error.clone(),
            throttled_ms: self.throttled_ms.load(Ordering::Relaxed),
            store_requests: self.store.stats_snapshot(),
        }
    }
}

/// The cache's base generation as identities for [`capture::capture`].
struct KnownNodes<'a>(&'a LocalState, &'a dyn Hydration);

impl capture::Known for KnownNodes<'_> {
    fn has_file(&self, ino: u64) -> bool {
        self.0.node_kind(ino) == Some(Kind::File)
    }
    fn has_dir(&self, ino: u64) -> bool {
        self.0.node_kind(ino) == Some(Kind::Dir)
    }
    fn pending_dir(&self, ino: u64) -> bool {
        self.1.dir_pending(ino)
    }
}

/// A commit failed because the cache's own disk is full: a local write (SQLite's state.db,
/// a side file, the journal) said ENOSPC or EDQUOT. Not a store's full disk (a `file://`
/// store's error is a `StoreError`), where writers are held back by the lag bounds instead.
fn local_disk_full(e: &anyhow::Error) -> bool {
    if e.chain()
        .any(|c| c.downcast_ref::<owsfs_store::StoreError>().is_some())
    {
        return false;
    }
    e.chain().any(|c| {
        c.downcast_ref::<rusqlite::Error>()
            .is_some_and(|r| r.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull))
            || c.downcast_ref::<std::io::Error>()
                .is_some_and(|io| matches!(io.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)))
    })
}

/// The one info line per commit.
fn log_commit(c: Option<&CommitInfo>, epoch: u64) {
    if let Some(c) = c {
        tracing::info!(
            generation = c.generation,
            epoch,
            files = c.files,
            bytes_new = c.bytes_new,
            cut_ms = c.cut_ms,
            total_ms = c.total_ms,
            "committed"
        );
    }
}

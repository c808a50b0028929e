//! The journal: open (replay, cut, rescan), group append, rotation, clean close.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, MutexGuard};
use serde::{Deserialize, Serialize};

use crate::error::JournalError;
use crate::op::{Ino, Op, Seq};
use crate::record;
use crate::replay;
use crate::segment::{self, BootId};
use crate::state::DirtyState;

mod failed;
mod resume;

use resume::{Resumed, resume};

/// Name of the marker written by [`Journal::close_clean`].
pub const CLEAN_MARKER: &str = "CLEAN";
/// Name of the file whose `flock` keeps two processes from appending to one journal.
pub const LOCK_FILE: &str = "LOCK";

/// How to open a journal.
#[derive(Clone, Debug)]
pub struct JournalOptions {
    /// Rotate to a new segment once the current one is larger than this (64 MiB by default).
    pub segment_bytes: u64,
    /// Boot id to record and compare against; None reads `/proc/sys/kernel/random/boot_id`.
    /// At most 36 bytes. For tests.
    pub boot_id: Option<String>,
    /// Disk space kept allocated past the end of the current segment (1 MiB by default; 0:
    /// none), so that the records of operations that free space (unlink, rmdir, rename,
    /// truncate) can still be written when the file system is full. See FORMAT.md
    /// ("Space reserve").
    pub reserve_bytes: u64,
    /// Rescan the backing directory whatever the segments say, for this reason: the backing
    /// directory of an adopted directory may have changed while nothing was mounted on it.
    pub rescan: Option<String>,
}

impl Default for JournalOptions {
    fn default() -> Self {
        JournalOptions {
            segment_bytes: 64 << 20,
            boot_id: None,
            reserve_bytes: 1 << 20,
            rescan: None,
        }
    }
}

/// What [`Journal::open`] (or [`Journal::inspect`]) found.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Recovery {
    /// Segments read.
    pub segments: usize,
    /// Op records replayed (snapshots not counted).
    pub records: u64,
    /// "segment N cut at offset X: reason" when the last segment ended in a partial record.
    /// `inspect` reports where open would cut, without cutting.
    pub torn_tail: Option<String>,
    /// Why the journal could not be trusted and the backing directory was rescanned.
    /// `inspect` reports why open would rescan, without rescanning.
    pub rescan: Option<String>,
    /// The CLEAN marker was present.
    pub clean: bool,
    /// Highest sequence number read; appending continues after it.
    pub last_seq: Seq,
}

/// Counters since open, and the size of the dirty state.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct JournalStats {
    /// Last sequence number handed out.
    pub last_seq: Seq,
    /// Current segment number.
    pub segment: u64,
    /// Bytes written to the current segment.
    pub segment_offset: u64,
    /// Op records appended since open.
    pub records: u64,
    /// Batch writes since open (records/batches = group size); rotation snapshots not counted.
    pub batches: u64,
    /// Bytes of op records written since open.
    pub bytes: u64,
    /// Segment rotations since open.
    pub rotations: u64,
    /// Entries in `DirtyState::files`.
    pub dirty_files: u64,
    /// Entries in `DirtyState::dirs`.
    pub dirty_dirs: u64,
    /// `DirtyState::dirty_bytes()`.
    pub dirty_bytes: u64,
    /// Why the journal refuses records (a failed write it cannot recover from, or closed), if
    /// it does: every mutation of the workspace then fails with EIO until the daemon is
    /// restarted.
    pub failed: Option<String>,
    /// Why the journal accepts only the records of operations that free space, if it does
    /// (its file system is full): the others fail with ENOSPC until space is freed.
    pub low_space: Option<String>,
    /// Batch writes that failed since open (their operations failed and were not performed).
    pub failed_batches: u64,
}

/// Where a file is, as the caller knows it at the file's first change since a cut
/// ([`Journal::append_file_op`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Place {
    /// At this path (one of its names).
    Path(PathBuf),
    /// It has names, but none the caller knows: the cut must look for it.
    Unknown,
    /// It has no name (unlinked while open): no tree holds it.
    Nameless,
}

/// A known path, or none; `None` is taken for [`Place::Nameless`].
impl From<Option<PathBuf>> for Place {
    fn from(p: Option<PathBuf>) -> Place {
        p.map_or(Place::Nameless, Place::Path)
    }
}

/// The write journal of one backing directory. Cheap to share: all methods take `&self` and
/// the journal is `Send + Sync`.
///
/// Dropping a journal leaves it unclean on purpose (no CLEAN marker): only
/// [`Journal::close_clean`] vouches that every record reached the disk.
pub struct Journal {
    dir: PathBuf,
    inner: Mutex<Inner>,
    /// Signalled whenever a batch write ends (successfully or not).
    written: Condvar,
    /// Holds the `flock` on `DIR/LOCK` for as long as the journal is open.
    /// Released by [`Journal::close_clean`]: a closed journal takes no records, so the next
    /// daemon may open it while this one is still exiting.
    lock: Mutex<Option<File>>,
    /// Bytes of all `Write` records appended since open: a cheap upper bound on how much the
    /// dirty state can have grown since a given moment (for backpressure).
    written_bytes: std::sync::atomic::AtomicU64,
    /// Called when the first change since the last cut is appended (see [`Journal::on_change`]).
    on_change: parking_lot::RwLock<Option<Box<dyn Fn() + Send + Sync>>>,
}

struct Inner {
    /// Everything not yet in a durable generation: what snapshots hold and replay rebuilds.
    state: DirtyState,
    /// What changed since the last [`Journal::cut`] (a subset of `state`).
    live: DirtyState,
    /// When `state` last went from empty to non-empty (the age of the oldest unsynced change).
    dirty_since: Option<Instant>,
    /// When `live` last went from empty to non-empty.
    live_since: Option<Instant>,
    /// Seq of the last cut that has not been committed yet.
    pending_cut: Option<Seq>,
    /// Shared with the leader, which writes without holding the mutex.
    file: Arc<File>,
    segment: u64,
    /// Bytes in the current segment, counting only completed writes.
    offset: u64,
    boot: BootId,
    segment_bytes: u64,
    /// Encoded records waiting for the next batch write.
    buf: Vec<u8>,
    /// The previous batch's buffer, kept to reuse its allocation.
    spare: Vec<u8>,
    next_seq: Seq,
    /// The outcome of the records in `buf`, shared with their appenders.
    batch: Arc<Batch>,
    /// A leader is writing a batch right now.
    writing: bool,
    /// Why nothing more is appended: a failure the journal cannot recover from, or closed.
    poisoned: Option<String>,
    /// The in-memory state may hold operations that were never performed (a failed write
    /// whose records could not be dropped from it): no cut may use it.
    state_lost: bool,
    reserve: Reserve,
    /// No rotation for size before the segment reaches this offset (after a failed one).
    rotate_after: u64,
    records: u64,
    batches: u64,
    failed_batches: u64,
    bytes: u64,
    rotations: u64,
    /// Offset just past the current segment's snapshot (its first record).
    snapshot_end: u64,
    /// Called by the leader just before each batch write, without the lock: lets tests hold
    /// a write in flight (to force batching), make it fail, or write only part of it. `None`:
    /// the write goes ahead; `Some(r)`: `r` stands for its outcome.
    #[cfg(test)]
    write_hook: Option<WriteHook>,
}

#[cfg(test)]
pub(crate) type WriteHook = Arc<dyn Fn(&File, &[u8]) -> Option<io::Result<()>> + Send + Sync>;

/// The outcome of one batch write, shared by every appender whose record is in it, so that
/// they all fail together when it fails.
#[derive(Default)]
struct Batch {
    outcome: OnceLock<Result<(), Failure>>,
}

/// Why a batch was not written: enough to give each of its appenders the same error.
#[derive(Clone, Debug)]
enum Failure {
    /// The write failed with this OS error (or this message, when it had no errno).
    Write {
        path: PathBuf,
        errno: Option<i32>,
        text: String,
    },
    /// The journal stopped accepting records before the batch could be written.
    Poisoned(String),
}

impl Failure {
    fn error(&self, dir: &Path) -> JournalError {
        match self {
            Failure::Write { path, errno, text } => JournalError::io(
                "write records to segment",
                path.clone(),
                match errno {
                    Some(n) => io::Error::from_raw_os_error(*n),
                    None => io::Error::other(text.clone()),
                },
            ),
            Failure::Poisoned(reason) => JournalError::Poisoned {
                dir: dir.to_path_buf(),
                reason: reason.clone(),
            },
        }
    }
}

const ENOSPC: i32 = rustix::io::Errno::NOSPC.raw_os_error();
const EDQUOT: i32 = rustix::io::Errno::DQUOT.raw_os_error();
const EFBIG: i32 = rustix::io::Errno::FBIG.raw_os_error();

/// Errors that mean "no space": the journal recovers from them once space is freed.
fn is_no_space(errno: Option<i32>) -> bool {
    matches!(errno, Some(ENOSPC | EDQUOT))
}

/// Disk space kept allocated past the end of the current segment (FORMAT.md, "Space reserve").
struct Reserve {
    /// Its size; 0 disables it.
    bytes: u64,
    /// `fallocate` works on the journal's file system.
    supported: bool,
    /// The current segment's space is allocated up to here (as far as this journal knows).
    end: u64,
    /// Set while the reserve cannot be refilled (the file system is full): only the records
    /// of operations that free space are accepted, and they use the reserve. The errno and
    /// the reason.
    low: Option<(i32, String)>,
}

/// Operations that free disk space or need none, whose records may use the reserve. Not
/// `Fsync`: a program that fsyncs in a loop on a full disk would use up the reserve that
/// unlink needs, and an fsync does not fail for want of its record.
fn frees_space(op: &Op) -> bool {
    matches!(
        op,
        Op::Remove { .. } | Op::Rename { .. } | Op::Truncate { .. } | Op::Unplace { .. }
    )
}

impl Journal {
    /// Opens (or creates) the journal in `dir` for the backing directory `backing_root`,
    /// replays it and returns what recovery found. See FORMAT.md ("Opening") for the order of
    /// the steps and for when the backing directory is rescanned.
    pub fn open(
        dir: &Path,
        backing_root: &Path,
        opts: JournalOptions,
    ) -> Result<(Journal, Recovery), JournalError> {
        fs::create_dir_all(dir)
            .map_err(|e| JournalError::io("create journal directory", dir, e))?;
        let lock = lock_dir(dir)?;
        let boot = BootId::resolve(opts.boot_id.as_deref())?;
        let clean_path = dir.join(CLEAN_MARKER);
        let clean = match fs::symlink_metadata(&clean_path) {
            Ok(_) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(JournalError::io("look for clean marker", clean_path, e)),
        };
        segment::remove_temporaries(dir)?;
        let mut replay = replay::replay(dir, Some(boot), clean)?;
        // Asked for, not found necessary: said at info, not as a warning.
        let asked = opts.rescan.is_some() && replay.recovery.rescan.is_none();
        if let Some(why) = &opts.rescan {
            replay.recovery.rescan.get_or_insert_with(|| why.clone());
        }
        let Resumed {
            state,
            mut recovery,
            last_seq,
            file,
            segment,
            offset,
            snapshot_end,
        } = resume(dir, backing_root, boot, replay, asked)?;
        recovery.clean = clean;
        if clean {
            // Only now: until here nothing was appended, so CLEAN still vouched for what a
            // crash in the steps above left (the new segment of a new boot included).
            remove_clean_marker(dir)?;
        }

        let journal = Journal {
            dir: dir.to_path_buf(),
            inner: Mutex::new(Inner {
                dirty_since: (!state.is_empty()).then(Instant::now),
                live_since: (!state.is_empty()).then(Instant::now),
                live: state.clone(),
                pending_cut: None,
                state,
                file: Arc::new(file),
                segment,
                offset,
                boot,
                segment_bytes: opts.segment_bytes,
                buf: Vec::new(),
                spare: Vec::new(),
                next_seq: last_seq + 1,
                batch: Arc::default(),
                writing: false,
                poisoned: None,
                state_lost: false,
                reserve: Reserve {
                    bytes: opts.reserve_bytes,
                    supported: true,
                    end: offset,
                    low: None,
                },
                rotate_after: 0,
                records: 0,
                batches: 0,
                failed_batches: 0,
                bytes: 0,
                rotations: 0,
                snapshot_end,
                #[cfg(test)]
                write_hook: None,
            }),
            written: Condvar::new(),
            lock: Mutex::new(Some(lock)),
            written_bytes: std::sync::atomic::AtomicU64::new(0),
            on_change: parking_lot::RwLock::new(None),
        };
        {
            let mut g = journal.inner.lock();
            journal.top_up(&mut g);
        }
        Ok((journal, recovery))
    }

    /// Replays without modifying anything (no tail truncation, no rescan, CLEAN left in
    /// place): for `owsfs journal inspect`. The state is what replay reached; `Recovery`
    /// says where open would cut a torn tail or why it would rescan. The rule about unclean
    /// reboots uses the running kernel's boot id, and is skipped if it cannot be read.
    pub fn inspect(dir: &Path) -> Result<(DirtyState, Recovery), JournalError> {
        let clean = dir.join(CLEAN_MARKER).exists();
        let boot = BootId::resolve(None).ok();
        let r = replay::replay(dir, boot, clean)?;
        let mut recovery = r.recovery;
        recovery.clean = clean;
        Ok((r.state, recovery))
    }

    /// The journal directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends `op`, applies it to the dirty state and returns once its record has been
    /// handed to the kernel by write(2) (never synced). Concurrent callers share write calls.
    ///
    /// On an error the operation must not be performed: its record is not in the journal
    /// (nor in the dirty state). Errors of a full file system (`to_errno()` ENOSPC, EDQUOT)
    /// are passing: later appends succeed once space is freed.
    pub fn append(&self, op: Op) -> Result<Seq, JournalError> {
        let mut g = self.inner.lock();
        self.admit(&mut g, &op)?;
        let seq = self.push(&mut g, &op)?;
        let batch = Arc::clone(&g.batch);
        self.wait_written(g, &batch)?;
        Ok(seq)
    }

    /// Like [`Journal::append`], but first appends `Touch { ino, path }` if `ino` has no entry
    /// in the dirty state, so the file's path is known from its first mutation; where the
    /// file has names but none is known ([`Place::Unknown`]), `Unplace { ino }` follows, so
    /// that the cut looks for it. `place_of` is called under the journal lock, at most once,
    /// and must not call back into the journal (it would deadlock). Returns the seq of `op`.
    pub fn append_file_op<P: Into<Place>>(
        &self,
        ino: Ino,
        place_of: impl FnOnce() -> P,
        op: Op,
    ) -> Result<Seq, JournalError> {
        let mut g = self.inner.lock();
        self.admit(&mut g, &op)?;
        if !g.live.files.contains_key(&ino) {
            let (path, unplaced) = match place_of().into() {
                Place::Path(p) => (Some(p), false),
                Place::Unknown => (None, true),
                Place::Nameless => (None, false),
            };
            self.push(&mut g, &Op::Touch { ino, path })?;
            if unplaced {
                self.push(&mut g, &Op::Unplace { ino })?;
            }
        }
        let seq = self.push(&mut g, &op)?;
        let batch = Arc::clone(&g.batch);
        self.wait_written(g, &batch)?;
        Ok(seq)
    }

    /// A copy of the dirty state: everything not yet in a durable generation.
    pub fn dirty(&self) -> DirtyState {
        self.inner.lock().state.clone()
    }

    /// Whether anything changed since the last durable generation.
    /// Calls `f` whenever a record is appended while nothing had changed since the last
    /// [`Journal::cut`] (the sync agent's wake-up: a clean journal has become dirty). `f` runs
    /// under the journal's lock and must not block.
    pub fn on_change(&self, f: Box<dyn Fn() + Send + Sync>) {
        *self.on_change.write() = Some(f);
    }

    pub fn is_dirty(&self) -> bool {
        !self.inner.lock().state.is_empty()
    }

    /// When nothing is dirty: the last seq handed out (everything up to it is durable).
    pub fn clean_seq(&self) -> Option<Seq> {
        let g = self.inner.lock();
        g.state.is_empty().then_some(g.next_seq - 1)
    }

    /// Starts a cut: returns the seq of the last record it covers and everything not yet in a
    /// durable generation (including what an earlier, failed cut covered). The caller must hold
    /// the write barrier, so that no mutation is between its record and its operation. Changes
    /// from here on are tracked apart, so that [`Journal::committed`] can forget exactly what
    /// the cut covered.
    pub fn cut(&self) -> Result<(Seq, DirtyState), JournalError> {
        let mut g = self.settle(self.inner.lock());
        if g.state_lost {
            return Err(self.poisoned_error(&g));
        }
        let last = g.next_seq - 1;
        g.live = DirtyState::default();
        g.live_since = None;
        g.pending_cut = Some(last);
        Ok((last, g.state.clone()))
    }

    /// The cut that ended at `seq` is durable: only what changed after it stays dirty. Starts a
    /// new segment whose snapshot holds just that and removes the older segments, so the
    /// journal does not grow between generations. A crash before this leaves the older
    /// segments, whose replay gives a superset: the cut's changes are uploaded again, which is
    /// harmless.
    pub fn committed(&self, seq: Seq) -> Result<(), JournalError> {
        let mut g = self.inner.lock();
        if g.pending_cut != Some(seq) {
            return Err(JournalError::Poisoned {
                dir: self.dir.clone(),
                reason: format!(
                    "committed({seq}) does not match the pending cut {:?}",
                    g.pending_cut
                ),
            });
        }
        g = self.settle(g);
        if g.poisoned.is_some() {
            return Err(self.poisoned_error(&g));
        }
        g.pending_cut = None;
        g.state = g.live.clone();
        g.dirty_since = g.live_since;
        // Without the new segment the current one stays in use: its replay gives a superset
        // of the state (the cut's changes would be uploaded again), which is harmless.
        if let Err(e) = self.rotate(&mut g) {
            tracing::warn!(
                "journal {}: could not start a new segment after a commit ({e}); appending \
                 to segment {} goes on",
                self.dir.display(),
                g.segment
            );
        }
        Ok(())
    }

    /// Unsynced bytes (dirty extents) and the age of the oldest unsynced change.
    pub fn lag(&self) -> (u64, Option<Duration>) {
        let g = self.inner.lock();
        if g.state.is_empty() {
            return (0, None);
        }
        (g.state.dirty_bytes(), g.dirty_since.map(|t| t.elapsed()))
    }

    /// Bytes of `Write` records appended since open (see `written_bytes`).
    pub fn written_bytes(&self) -> u64 {
        self.written_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Counters since open.
    pub fn stats(&self) -> JournalStats {
        let g = self.inner.lock();
        JournalStats {
            last_seq: g.next_seq - 1,
            segment: g.segment,
            segment_offset: g.offset,
            records: g.records,
            batches: g.batches,
            bytes: g.bytes,
            rotations: g.rotations,
            dirty_files: g.state.files.len() as u64,
            dirty_dirs: g.state.dirs.len() as u64,
            dirty_bytes: g.state.dirty_bytes(),
            failed: g.poisoned.clone(),
            low_space: g.reserve.low.as_ref().map(|(_, why)| why.clone()),
            failed_batches: g.failed_batches,
        }
    }

    /// Flushes, fdatasyncs the segment and writes the CLEAN marker (then fsyncs the
    /// directory), so that the next open trusts the journal even after a reboot.
    pub fn close_clean(&self) -> Result<(), JournalError> {
        // Wait for every record handed to the journal so far.
        let mut g = self.settle(self.inner.lock());
        if g.poisoned.is_some() {
            return Err(self.poisoned_error(&g));
        }
        // From here on the journal takes no records: the CLEAN marker must not lie.
        g.poisoned = Some("the journal was closed (unmount); no more records are accepted".into());
        let seg_path = segment::segment_path(&self.dir, g.segment);
        g.file
            .sync_data()
            .map_err(|e| JournalError::io("fdatasync segment", &seg_path, e))?;
        // Crash window: every record synced, no CLEAN.
        fail::fail_point!("journal-close-before-clean");
        let marker = self.dir.join(CLEAN_MARKER);
        File::create(&marker)
            .and_then(|f| f.sync_all())
            .map_err(|e| JournalError::io("write clean marker", &marker, e))?;
        // Crash window: CLEAN written, its name not yet durable.
        fail::fail_point!("journal-close-after-clean");
        segment::sync_dir(&self.dir)?;
        drop(g);
        self.lock.lock().take();
        Ok(())
    }

    /// The error for appenders of a poisoned journal.
    fn poisoned_error(&self, g: &Inner) -> JournalError {
        JournalError::Poisoned {
            dir: self.dir.clone(),
            reason: g
                .poisoned
                .clone()
                .unwrap_or_else(|| "an earlier write failed".into()),
        }
    }

    /// Refuses `op` before anything is buffered when the journal takes no records, or takes
    /// only those of operations that free space and `op` is not one (and the reserve still
    /// cannot be refilled).
    fn admit(&self, g: &mut Inner, op: &Op) -> Result<(), JournalError> {
        if g.poisoned.is_some() {
            return Err(self.poisoned_error(g));
        }
        if g.reserve.low.is_some() && !frees_space(op) {
            self.top_up(g);
            if let Some((errno, _)) = &g.reserve.low {
                return Err(JournalError::io(
                    "reserve space for records in",
                    segment::segment_path(&self.dir, g.segment),
                    io::Error::from_raw_os_error(*errno),
                ));
            }
        }
        Ok(())
    }

    /// Encodes `op` into the batch buffer under the lock and applies it to the state, so
    /// buffer order, seq order and state order are one order.
    fn push(&self, g: &mut Inner, op: &Op) -> Result<Seq, JournalError> {
        if g.poisoned.is_some() {
            return Err(self.poisoned_error(g));
        }
        let seq = g.next_seq;
        record::encode_op(&mut g.buf, seq, op)?;
        g.next_seq += 1;
        g.records += 1;
        // A record that changes nothing (`Fsync`) neither starts
        // the age of unsynced changes nor wakes the sync agent.
        let was_clean = g.state.is_empty();
        let live_was_empty = g.live.is_empty();
        g.state.apply(op);
        g.live.apply(op);
        if was_clean && !g.state.is_empty() {
            g.dirty_since = Some(Instant::now());
        }
        if live_was_empty && !g.live.is_empty() {
            g.live_since = Some(Instant::now());
            if let Some(f) = self.on_change.read().as_ref() {
                f();
            }
        }
        if let Op::Write { len, .. } = op {
            self.written_bytes
                .fetch_add(*len, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(seq)
    }

    /// Waits until `batch` is written (or has failed). The first waiter to find no write in
    /// progress becomes the leader: it takes the whole buffer and writes it with one call,
    /// without the lock, while later appenders fill the next batch.
    fn wait_written<'a>(
        &'a self,
        mut g: MutexGuard<'a, Inner>,
        batch: &Batch,
    ) -> Result<(), JournalError> {
        loop {
            if let Some(outcome) = batch.outcome.get() {
                return outcome.clone().map_err(|f| f.error(&self.dir));
            }
            if g.writing {
                self.written.wait(&mut g);
                continue;
            }
            // Batches end in order and the one in flight has ended, so `batch` is the buffer.
            self.write_batch(&mut g);
        }
    }

    /// Waits until every record handed to the journal so far is written or has failed (and
    /// the state holds exactly the written ones).
    fn settle<'a>(&'a self, mut g: MutexGuard<'a, Inner>) -> MutexGuard<'a, Inner> {
        loop {
            if g.writing {
                self.written.wait(&mut g);
            } else if g.buf.is_empty() {
                return g;
            } else {
                self.write_batch(&mut g);
            }
        }
    }

    /// Writes the buffered records as one batch (the caller is the leader: no write is in
    /// flight) and settles the batch's outcome.
    fn write_batch(&self, g: &mut MutexGuard<'_, Inner>) {
        let batch = std::mem::take(&mut g.batch);
        if g.buf.is_empty() {
            let _ = batch.outcome.set(Ok(()));
            return;
        }
        if g.poisoned.is_some() {
            // Poisoning already dropped these records from the state; see `failed_write`.
            g.buf.clear();
            let _ = batch.outcome.set(Err(Failure::Poisoned(
                g.poisoned.clone().unwrap_or_default(),
            )));
            self.written.notify_all();
            return;
        }
        let spare = std::mem::take(&mut g.spare);
        let mut bytes = std::mem::replace(&mut g.buf, spare);
        let file = Arc::clone(&g.file);
        #[cfg(test)]
        let hook = g.write_hook.clone();
        g.writing = true;
        let result = MutexGuard::unlocked(g, || {
            #[cfg(test)]
            if let Some(hook) = hook
                && let Some(result) = hook(&file, &bytes)
            {
                return result;
            }
            segment::append_records(&file, &bytes)
        });
        g.writing = false;
        match result {
            Ok(()) => {
                let len = bytes.len() as u64;
                g.offset += len;
                g.bytes += len;
                g.batches += 1;
                bytes.clear();
                g.spare = bytes;
                let _ = batch.outcome.set(Ok(()));
                self.top_up(g);
                if g.wants_rotation() && g.reserve.low.is_none() && g.offset >= g.rotate_after {
                    self.rotate_for_size(g);
                }
            }
            Err(e) => {
                let failure = self.failed_write(g, e);
                let _ = batch.outcome.set(Err(failure));
            }
        }
        self.written.notify_all();
    }

    /// Keeps `reserve.bytes` (at least) allocated past the end of the segment: when less is
    /// left, allocates twice that, so that this costs one `fallocate` per `reserve.bytes`
    /// appended. While that fails for lack of space, only the records of operations that
    /// free space are accepted (`admit`); they use what is left of the reserve.
    fn top_up(&self, g: &mut Inner) {
        let r = &g.reserve;
        if r.bytes == 0 || !r.supported || r.end >= g.offset + r.bytes {
            return;
        }
        let want = 2 * r.bytes;
        match segment::preallocate(&g.file, g.offset, want) {
            Ok(()) => {
                g.reserve.end = g.offset + want;
                if g.reserve.low.take().is_some() {
                    tracing::info!(
                        "journal {}: space is back; every operation is accepted again",
                        self.dir.display()
                    );
                }
            }
            // Interrupted: tried again after the next batch.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_no_space(e.raw_os_error()) => {
                if g.reserve.low.is_none() {
                    tracing::warn!(
                        "journal {}: no space for its reserve ({e}); until space is freed, \
                         only unlink, rmdir, rename and truncate are accepted, other \
                         changes fail with \"{e}\"",
                        self.dir.display()
                    );
                }
                g.reserve.low = Some((
                    e.raw_os_error().unwrap_or(ENOSPC),
                    format!(
                        "the file system of {} is full ({e}): only unlink, rmdir, rename and \
                         truncate are accepted until space is freed",
                        self.dir.display()
                    ),
                ));
            }
            Err(e) => {
                // No fallocate here (or it failed otherwise): appends simply fail with the
                // file system's error when it is full.
                tracing::info!(
                    "journal {}: no space reserve ({e}); on a full disk, unlink and rename \
                     may fail too",
                    self.dir.display()
                );
                g.reserve.supported = false;
                g.reserve.low = None;
            }
        }
    }

    /// Rotation because the segment grew past its size; a failure (a full disk) leaves the
    /// current segment in use and is retried after another sixteenth of `segment_bytes`.
    fn rotate_for_size(&self, g: &mut Inner) {
        if let Err(e) = self.rotate(g) {
            tracing::warn!(
                "journal {}: could not start a new segment ({e}); appending to segment {} \
                 goes on",
                self.dir.display(),
                g.segment
            );
            g.rotate_after = g.offset + g.segment_bytes / 16;
        }
    }

    /// Starts the next segment with a snapshot of the whole state, then removes the older
    /// segments. Called by a leader with the lock held and no write in flight. The snapshot
    /// also covers records buffered since the last batch, which are therefore dropped from
    /// the buffer and count as written. On an error nothing changed: the current segment
    /// stays in use.
    fn rotate(&self, g: &mut Inner) -> Result<(), JournalError> {
        let seq = g.next_seq - 1;
        let n = g.segment + 1;
        let (file, len) = segment::create_segment(
            &self.dir,
            n,
            g.boot,
            seq,
            &g.state,
            "journal-rotate-before-rename",
        )?;
        g.buf.clear();
        let _ = std::mem::take(&mut g.batch).outcome.set(Ok(()));
        g.file = Arc::new(file);
        g.segment = n;
        g.offset = len;
        g.snapshot_end = len;
        g.rotations += 1;
        g.rotate_after = 0;
        g.reserve.end = len;
        // Crash window: the new segment in place, the old ones still there.
        fail::fail_point!("journal-rotate-after-rename");
        segment::remove_segments_before(&self.dir, n);
        self.top_up(g);
        Ok(())
    }
}

impl Inner {
    /// The segment is over its size, and its records outweigh its snapshot. The second
    /// condition matters only when the dirty state's snapshot is itself near or above
    /// `segment_bytes`: rotating then after every batch would rewrite the whole state each
    /// time, so rotation waits until at least as many record bytes as snapshot bytes were
    /// appended, which keeps the extra writing of snapshots at most equal to the records'.
    fn wants_rotation(&self) -> bool {
        let snapshot = self.snapshot_end - segment::HEADER_LEN as u64;
        self.offset > self.segment_bytes && self.offset - self.snapshot_end >= snapshot
    }
}

/// Removes the CLEAN marker and makes its removal durable before anything is appended: a
/// stale CLEAN surviving a power loss would hide records lost from this run.
fn remove_clean_marker(dir: &Path) -> Result<(), JournalError> {
    let path = dir.join(CLEAN_MARKER);
    fs::remove_file(&path).map_err(|e| JournalError::io("remove clean marker", path, e))?;
    // Crash window: CLEAN removed, the removal not yet durable.
    fail::fail_point!("journal-open-after-unclean");
    segment::sync_dir(dir)
}

/// Held shared while a journal takes its lock, and exclusively by a test while it spawns a
/// child process: until the child execs, it holds copies of all the test process's file
/// descriptors, and with them the `flock` of a journal closed meanwhile, which would make
/// reopening that journal fail with `Locked` (`crash_tests`).
#[cfg(test)]
static SPAWNING: parking_lot::RwLock<()> = parking_lot::RwLock::new(());

/// Takes the exclusive lock of the journal directory.
fn lock_dir(dir: &Path) -> Result<File, JournalError> {
    #[cfg(test)]
    let _spawning = SPAWNING.read();
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| JournalError::io("open lock file", &path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(JournalError::Locked {
            dir: dir.to_path_buf(),
        }),
        Err(TryLockError::Error(e)) => Err(JournalError::io("lock", path, e)),
    }
}

#[cfg(test)]
mod crash_tests;
#[cfg(test)]
mod tests;

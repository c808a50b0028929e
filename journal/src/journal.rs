//! The journal: open (replay, cut, rescan), group append, rotation, clean close.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, MutexGuard};
use serde::{Deserialize, Serialize};

use crate::error::JournalError;
use crate::op::{Ino, Op, Seq};
use crate::record;
use crate::replay::{self, Replay};
use crate::segment::{self, BootId};
use crate::state::{self, DirtyState};

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
}

impl Default for JournalOptions {
    fn default() -> Self {
        JournalOptions {
            segment_bytes: 64 << 20,
            boot_id: None,
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
    /// Why the journal refuses records (a failed write, or closed), if it does: every
    /// mutation of the workspace then fails with EIO until the daemon is restarted.
    pub failed: Option<String>,
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
    /// Every seq up to this one has been handed to the kernel.
    written: Seq,
    /// A leader is writing a batch right now.
    writing: bool,
    /// The first failed write; once set, nothing more is appended.
    poisoned: Option<String>,
    records: u64,
    batches: u64,
    bytes: u64,
    rotations: u64,
    /// Offset just past the current segment's snapshot (its first record).
    snapshot_end: u64,
    /// Called by the leader just before each batch write, without the lock: lets tests hold
    /// a write in flight (to force batching) or make it fail.
    #[cfg(test)]
    write_hook: Option<WriteHook>,
}

#[cfg(test)]
pub(crate) type WriteHook = Arc<dyn Fn() -> io::Result<()> + Send + Sync>;

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
        let clean = match fs::remove_file(&clean_path) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(JournalError::io("remove clean marker", clean_path, e)),
        };
        if clean {
            // A stale CLEAN surviving a power loss would hide records lost from this run.
            segment::sync_dir(dir)?;
        }
        segment::remove_temporaries(dir)?;

        let Replay {
            mut state,
            mut recovery,
            last_seq,
            tail,
            obsolete,
            max_segment,
        } = replay::replay(dir, Some(boot), clean)?;
        recovery.clean = clean;

        let (file, segment, offset, snapshot_end) = if let Some(why) = &recovery.rescan {
            // Nothing is cut: the damaged segments are replaced as a whole.
            recovery.torn_tail = None;
            tracing::warn!(
                "journal {}: rescanning backing directory {}: {why}",
                dir.display(),
                backing_root.display()
            );
            state = state::rescan_excluding(backing_root, dir_id(dir))?;
            let n = max_segment + 1;
            let (file, len) = segment::create_segment(dir, n, boot, last_seq, &state)?;
            segment::remove_segments_before(dir, n);
            (file, n, len, len)
        } else if let Some(tail) = tail {
            for path in &obsolete {
                if let Err(e) = fs::remove_file(path) {
                    tracing::warn!(
                        "journal: could not remove superseded segment {}: {e}",
                        path.display()
                    );
                }
            }
            if let Some(torn) = &recovery.torn_tail {
                tracing::warn!(
                    "journal {}: torn tail: {torn} ({} bytes dropped)",
                    dir.display(),
                    tail.file_len - tail.valid_len
                );
            }
            if tail.boot == boot {
                let file = OpenOptions::new()
                    .append(true)
                    .open(&tail.path)
                    .map_err(|e| JournalError::io("open segment", &tail.path, e))?;
                if tail.valid_len < tail.file_len {
                    file.set_len(tail.valid_len)
                        .map_err(|e| JournalError::io("cut torn tail of segment", &tail.path, e))?;
                }
                (file, tail.segment, tail.valid_len, tail.snapshot_end)
            } else {
                // The header must name the boot that writes the segment's tail, for the rule
                // about unclean reboots. A torn tail goes away with the old segment.
                let n = tail.segment + 1;
                let (file, len) = segment::create_segment(dir, n, boot, last_seq, &state)?;
                segment::remove_segments_before(dir, n);
                (file, n, len, len)
            }
        } else if backing_has_entries(backing_root, dir)? {
            // No journal at all, yet the backing directory holds files: whatever changed them
            // went unrecorded (the journal was deleted, or never written), so all of it is dirty.
            let why = "no journal, but the backing directory is not empty".to_string();
            tracing::warn!(
                "journal {}: rescanning backing directory {}: {why}",
                dir.display(),
                backing_root.display()
            );
            state = state::rescan_excluding(backing_root, dir_id(dir))?;
            recovery.rescan = Some(why);
            let n = max_segment + 1;
            let (file, len) = segment::create_segment(dir, n, boot, last_seq, &state)?;
            (file, n, len, len)
        } else {
            let n = max_segment + 1;
            let (file, len) = segment::create_segment(dir, n, boot, 0, &state)?;
            (file, n, len, len)
        };

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
                written: last_seq,
                writing: false,
                poisoned: None,
                records: 0,
                batches: 0,
                bytes: 0,
                rotations: 0,
                snapshot_end,
                #[cfg(test)]
                write_hook: None,
            }),
            written: Condvar::new(),
            lock: Mutex::new(Some(lock)),
            written_bytes: std::sync::atomic::AtomicU64::new(0),
        };
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
    pub fn append(&self, op: Op) -> Result<Seq, JournalError> {
        let mut g = self.inner.lock();
        let seq = self.push(&mut g, &op)?;
        self.wait_written(g, seq)
    }

    /// Like [`Journal::append`], but first appends `Touch { ino, path: path_of() }` if `ino`
    /// has no entry in the dirty state, so the file's path is known from its first mutation.
    /// `path_of` is called under the journal lock, at most once, and must not call back into
    /// the journal (it would deadlock). Returns the seq of `op`.
    pub fn append_file_op(
        &self,
        ino: Ino,
        path_of: impl FnOnce() -> Option<PathBuf>,
        op: Op,
    ) -> Result<Seq, JournalError> {
        let mut g = self.inner.lock();
        if !g.live.files.contains_key(&ino) {
            let path = path_of();
            self.push(&mut g, &Op::Touch { ino, path })?;
        }
        let seq = self.push(&mut g, &op)?;
        self.wait_written(g, seq)
    }

    /// A copy of the dirty state: everything not yet in a durable generation.
    pub fn dirty(&self) -> DirtyState {
        self.inner.lock().state.clone()
    }

    /// Whether anything changed since the last durable generation.
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
        let mut g = self.inner.lock();
        let last = g.next_seq - 1;
        if g.written < last {
            self.wait_written(g, last)?;
            g = self.inner.lock();
        }
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
        let last = g.next_seq - 1;
        if g.written < last {
            self.wait_written(g, last)?;
            g = self.inner.lock();
        }
        if let Some(reason) = &g.poisoned {
            return Err(JournalError::Poisoned {
                dir: self.dir.clone(),
                reason: reason.clone(),
            });
        }
        g.pending_cut = None;
        g.state = g.live.clone();
        g.dirty_since = g.live_since;
        let result = self.rotate(&mut g);
        if let Err(e) = &result {
            tracing::error!("journal {}: {e}", self.dir.display());
            g.poisoned = Some(e.to_string());
        }
        result
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
        }
    }

    /// Flushes, fdatasyncs the segment and writes the CLEAN marker (then fsyncs the
    /// directory), so that the next open trusts the journal even after a reboot.
    pub fn close_clean(&self) -> Result<(), JournalError> {
        let mut g = self.inner.lock();
        // Wait for every record handed to the journal so far; a failed write reports here.
        if g.written < g.next_seq - 1 || g.poisoned.is_some() {
            let last = g.next_seq - 1;
            self.wait_written(g, last)?;
            g = self.inner.lock();
        }
        // From here on the journal takes no records: the CLEAN marker must not lie.
        g.poisoned = Some("the journal was closed (unmount); no more records are accepted".into());
        let seg_path = segment::segment_path(&self.dir, g.segment);
        g.file
            .sync_data()
            .map_err(|e| JournalError::io("fdatasync segment", &seg_path, e))?;
        let marker = self.dir.join(CLEAN_MARKER);
        File::create(&marker)
            .and_then(|f| f.sync_all())
            .map_err(|e| JournalError::io("write clean marker", &marker, e))?;
        segment::sync_dir(&self.dir)?;
        drop(g);
        self.lock.lock().take();
        Ok(())
    }

    /// Encodes `op` into the batch buffer under the lock and applies it to the state, so
    /// buffer order, seq order and state order are one order.
    fn push(&self, g: &mut Inner, op: &Op) -> Result<Seq, JournalError> {
        if let Some(reason) = &g.poisoned {
            return Err(JournalError::Poisoned {
                dir: self.dir.clone(),
                reason: reason.clone(),
            });
        }
        let seq = g.next_seq;
        record::encode_op(&mut g.buf, seq, op)?;
        g.next_seq += 1;
        g.records += 1;
        if g.state.is_empty() {
            g.dirty_since = Some(Instant::now());
        }
        if g.live.is_empty() {
            g.live_since = Some(Instant::now());
        }
        g.state.apply(op);
        g.live.apply(op);
        if let Op::Write { len, .. } = op {
            self.written_bytes
                .fetch_add(*len, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(seq)
    }

    /// Waits until `seq` is written. The first waiter to find no write in progress becomes
    /// the leader: it takes the whole buffer and writes it with one call, without the lock,
    /// while later appenders fill the next batch.
    fn wait_written<'a>(
        &'a self,
        mut g: MutexGuard<'a, Inner>,
        seq: Seq,
    ) -> Result<Seq, JournalError> {
        loop {
            if g.written >= seq {
                return Ok(seq);
            }
            if let Some(reason) = &g.poisoned {
                return Err(JournalError::Poisoned {
                    dir: self.dir.clone(),
                    reason: reason.clone(),
                });
            }
            if g.writing {
                self.written.wait(&mut g);
                continue;
            }
            let spare = std::mem::take(&mut g.spare);
            let mut batch = std::mem::replace(&mut g.buf, spare);
            let batch_last = g.next_seq - 1;
            let file = Arc::clone(&g.file);
            #[cfg(test)]
            let hook = g.write_hook.clone();
            g.writing = true;
            let result = MutexGuard::unlocked(&mut g, || {
                #[cfg(test)]
                if let Some(hook) = hook {
                    hook()?;
                }
                (&*file).write_all(&batch)
            });
            g.writing = false;
            match result {
                Ok(()) => {
                    let len = batch.len() as u64;
                    g.written = batch_last;
                    g.offset += len;
                    g.bytes += len;
                    g.batches += 1;
                    batch.clear();
                    g.spare = batch;
                    if g.wants_rotation()
                        && let Err(e) = self.rotate(&mut g)
                    {
                        tracing::error!("journal {}: {e}", self.dir.display());
                        g.poisoned = Some(e.to_string());
                    }
                }
                Err(e) => {
                    let e = JournalError::io(
                        "write records to segment",
                        segment::segment_path(&self.dir, g.segment),
                        e,
                    );
                    tracing::error!("{e}");
                    g.poisoned = Some(e.to_string());
                    self.written.notify_all();
                    // The leader reports the cause itself; the other appenders of the batch
                    // and all later ones get `Poisoned`.
                    return Err(e);
                }
            }
            self.written.notify_all();
        }
    }

    /// Starts the next segment with a snapshot of the whole state, then removes the older
    /// segments. Called by a leader with the lock held and no write in flight. The snapshot
    /// also covers records buffered since the last batch, which are therefore dropped from
    /// the buffer and count as written.
    fn rotate(&self, g: &mut Inner) -> Result<(), JournalError> {
        let seq = g.next_seq - 1;
        let n = g.segment + 1;
        let (file, len) = segment::create_segment(&self.dir, n, g.boot, seq, &g.state)?;
        g.buf.clear();
        g.written = seq;
        g.file = Arc::new(file);
        g.segment = n;
        g.offset = len;
        g.snapshot_end = len;
        g.rotations += 1;
        segment::remove_segments_before(&self.dir, n);
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

/// Takes the exclusive lock of the journal directory.
fn lock_dir(dir: &Path) -> Result<File, JournalError> {
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

/// `(dev, ino)` of the journal directory, so a rescan can skip it when it lies inside the
/// backing directory.
fn dir_id(dir: &Path) -> Option<(u64, u64)> {
    fs::metadata(dir).ok().map(|m| (m.dev(), m.ino()))
}

#[cfg(test)]
mod tests;

/// Whether `backing_root` has any entry other than the journal directory itself.
fn backing_has_entries(backing_root: &Path, journal_dir: &Path) -> Result<bool, JournalError> {
    let entries = fs::read_dir(backing_root)
        .map_err(|e| JournalError::io("list backing directory", backing_root, e))?;
    let journal = journal_dir.canonicalize().ok();
    for entry in entries {
        let entry =
            entry.map_err(|e| JournalError::io("list backing directory", backing_root, e))?;
        if journal.is_some() && entry.path().canonicalize().ok() == journal {
            continue;
        }
        return Ok(true);
    }
    Ok(false)
}

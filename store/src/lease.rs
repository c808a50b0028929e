//! The per-workspace writer lease (see `FORMAT.md`).
//!
//! The lease is a sequence of sealed records in `workspaces/W/lease/<n as 20 digits>`, each
//! written once with create-if-absent. Record `n + 1` is the only way to change the lease:
//! the holder renews by writing it with its own epoch, a new holder takes over by writing it
//! with the next epoch, and the holder releases by writing it in state `released`. As all of
//! them race for the same key, exactly one wins each step: a renewal and a takeover can never
//! both succeed. This needs nothing but create-if-absent, which every backend has.
//!
//! Expiry is never judged from wall clocks. A node that wants the lease notes, on its own
//! monotonic clock, when it first saw the newest record; if no newer record appears within
//! that record's TTL, the lease has lapsed. The holder stops writing `margin` earlier than the
//! TTL after the *start* of its last successful renewal, which is earlier than any other node
//! can have started counting.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::backend::{PutOutcome, Store};
use crate::clock::{Clock, SystemClock};
use crate::error::{Result, StoreError};
use crate::generation::{Workspace, seal_json, unseal_json_since};

/// Version 2: the holder's commits count as renewals (it renews only while it does not
/// commit), so an observer also watches the newest generation slot ([`LeaseWatch`]). An owsfs
/// that reads only version 1 refuses a version 2 record ("upgrade owsfs") instead of taking
/// a lease over from a holder that commits.
pub const LEASE_VERSION: u64 = 2;

/// Who holds (or held) a lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// The cache's node id (`CACHE/node-id`).
    pub node: String,
    pub host: String,
    pub pid: u32,
    /// Random per mount: tells two mounts of one node apart.
    pub session: String,
    /// Which cache directory, exactly: boot id, path and device/inode. A mount of the same
    /// cache (which holds the cache's lock, so the holder's process is gone) may take the
    /// lease over at once.
    #[serde(default)]
    pub cache: String,
    /// Where the holder mounted the workspace: an absolute path, empty for a command that
    /// holds the lease briefly (and in records written before owsfs 0.2). A mount that took
    /// its workspace's name from its mountpoint compares it with its own path.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mountpoint: String,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "node {} on host {} (pid {})",
            self.node, self.host, self.pid
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaseState {
    Held,
    Released,
}

/// One step of a workspace's lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub workspace: String,
    /// Position in the sequence (the object's key).
    pub seq: u64,
    pub epoch: u64,
    pub state: LeaseState,
    pub holder: Holder,
    pub ttl_ms: u64,
    /// Informational only: never compared with another node's clock.
    pub time_unix_ms: u64,
}

impl LeaseRecord {
    pub fn ttl(&self) -> Duration {
        Duration::from_millis(self.ttl_ms)
    }

    /// The sealed text: header line, JSON body line, blake3 of the body line.
    pub fn seal(&self) -> Result<Bytes> {
        seal_json("owsfs-lease", LEASE_VERSION, "lease record", self)
    }

    /// Parses and verifies a sealed record read from `object`.
    pub fn unseal(object: &str, b: &[u8]) -> Result<LeaseRecord> {
        let r: LeaseRecord = unseal_json_since("owsfs-lease", 1, LEASE_VERSION, object, b)?;
        let bad = |what: &str| StoreError::corrupt(object, what);
        if r.epoch == 0 || r.ttl_ms == 0 {
            return Err(bad("epoch and ttl must be positive"));
        }
        Ok(r)
    }
}

/// Why a lease operation did not go through.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// Someone else wrote the next record first.
    #[error("the lease of workspace {workspace:?} moved on: {}", describe(.current))]
    Lost {
        workspace: String,
        current: Box<LeaseRecord>,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn describe(r: &LeaseRecord) -> String {
    match r.state {
        LeaseState::Held => format!("held by {} at epoch {}", r.holder, r.epoch),
        LeaseState::Released => format!("released by {} at epoch {}", r.holder, r.epoch),
    }
}

/// Records kept behind the newest: older ones are deleted as the lease moves on.
const KEEP: u64 = 4;

/// Old records are deleted this many at a time (one request on S3), so that a renewal costs
/// one request, its PUT, plus a sixteenth of a delete.
const TIDY_BATCH: u64 = 16;

/// The lease of one workspace.
#[derive(Clone, Debug)]
pub struct Lease {
    ws: Workspace,
}

impl Lease {
    pub fn new(ws: &Workspace) -> Lease {
        Lease { ws: ws.clone() }
    }

    fn store(&self) -> &Store {
        self.ws.store()
    }

    fn prefix(&self) -> String {
        format!("workspaces/{}/lease/", self.ws.name())
    }

    fn key(&self, seq: u64) -> String {
        format!("{}{seq:020}", self.prefix())
    }

    fn read(&self, seq: u64) -> Result<LeaseRecord> {
        let key = self.key(seq);
        let b = self.store().get(&key)?;
        let r = LeaseRecord::unseal(&key, &b)?;
        if r.seq != seq || r.workspace != self.ws.name() {
            return Err(StoreError::corrupt(
                &key,
                format!("record says workspace {:?} step {}", r.workspace, r.seq),
            ));
        }
        Ok(r)
    }

    /// Who held the lease at `epoch`, from `newest` and the records kept behind it. Best
    /// effort, for messages: `None` when the epoch is older than the kept records reach, or
    /// a record cannot be read.
    pub fn holder_at(&self, newest: &LeaseRecord, epoch: u64) -> Option<Holder> {
        if newest.epoch == epoch {
            return Some(newest.holder.clone());
        }
        (newest.seq.saturating_sub(KEEP).max(1)..newest.seq)
            .rev()
            .filter_map(|seq| self.read(seq).ok())
            .find(|r| r.epoch == epoch)
            .map(|r| r.holder)
    }

    /// The newest record, from `newest` back through the records kept behind it, whose holder
    /// was a mount (it names a mountpoint; commands that hold the lease briefly name none).
    /// Best effort, like [`Lease::holder_at`].
    pub fn last_mount(&self, newest: &LeaseRecord) -> Option<LeaseRecord> {
        if !newest.holder.mountpoint.is_empty() {
            return Some(newest.clone());
        }
        (newest.seq.saturating_sub(KEEP).max(1)..newest.seq)
            .rev()
            .filter_map(|seq| self.read(seq).ok())
            .find(|r| !r.holder.mountpoint.is_empty())
    }

    /// The newest lease record, or `None` if the workspace never had a holder. A malformed
    /// record, or one of a newer format, is an error: nobody takes over on a guess.
    pub fn current(&self) -> Result<Option<LeaseRecord>> {
        for _ in 0..5 {
            let prefix = self.prefix();
            let mut newest = self
                .store()
                .list(&prefix)?
                .iter()
                .filter_map(|k| {
                    let s = k.strip_prefix(&prefix)?;
                    (s.len() == 20 && s.bytes().all(|c| c.is_ascii_digit()))
                        .then(|| s.parse::<u64>().ok())
                        .flatten()
                })
                .max();
            let Some(mut n) = newest.take() else {
                return Ok(None);
            };
            // A listing may lag behind a write: probe forward.
            while self.store().exists(&self.key(n + 1))? {
                n += 1;
            }
            match self.read(n) {
                Ok(r) => return Ok(Some(r)),
                // Deleted between the listing and the read: the lease moved on; look again.
                Err(e) if e.is_not_found() => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Invalid(format!(
            "the lease of workspace {:?} keeps changing; try again",
            self.ws.name()
        )))
    }

    /// Takes the lease over a damaged newest record (`--steal --force`): the step after the
    /// highest one, with an epoch two above every readable record's and `min_epoch` (the
    /// newest generation's). The damaged step was at most one above the record before it, so
    /// its holder, if alive, is fenced like any forced-out holder. Returns the new record and
    /// the damaged step's key.
    pub fn replace_damaged(
        &self,
        holder: &Holder,
        ttl: Duration,
        min_epoch: u64,
    ) -> std::result::Result<(LeaseRecord, String), LeaseError> {
        let prefix = self.prefix();
        let seqs: Vec<u64> = self
            .store()
            .list(&prefix)?
            .iter()
            .filter_map(|k| k.strip_prefix(&prefix)?.parse::<u64>().ok())
            .collect();
        let mut n = seqs.iter().copied().max().unwrap_or(0);
        while self.store().exists(&self.key(n + 1))? {
            n += 1;
        }
        let readable = seqs
            .iter()
            .filter_map(|&s| self.read(s).ok())
            .map(|r| r.epoch)
            .max()
            .unwrap_or(0);
        let next = LeaseRecord {
            workspace: self.ws.name().into(),
            seq: n + 1,
            epoch: readable.max(min_epoch) + 2,
            state: LeaseState::Held,
            holder: holder.clone(),
            ttl_ms: ttl.as_millis().max(1) as u64,
            time_unix_ms: self.store().clock().unix_ms(),
        };
        self.write(&next)?;
        Ok((next, self.key(n)))
    }

    /// Writes record `next`; `Lost` if another record took the step.
    fn write(&self, next: &LeaseRecord) -> std::result::Result<(), LeaseError> {
        let key = self.key(next.seq);
        match self.store().put_if_absent(&key, next.seal()?)? {
            PutOutcome::Created | PutOutcome::AlreadyIdentical => {}
            PutOutcome::Conflict(b) => {
                let current = LeaseRecord::unseal(&key, &b)?;
                return Err(LeaseError::Lost {
                    workspace: self.ws.name().into(),
                    current: Box::new(current),
                });
            }
        }
        // Crash window: the step is written, the old steps are still there.
        fail::fail_point!("lease-before-tidy");
        // Tidy up, a batch of steps at a time; a failure only leaves extra objects behind.
        if let Some(old) = tidy_range(next.seq) {
            let keys: Vec<String> = old.map(|seq| self.key(seq)).collect();
            if let Err(e) = self.store().delete_many(&keys) {
                tracing::debug!("cannot delete old lease records {keys:?}: {e}");
            }
        }
        Ok(())
    }

    /// Takes the lease with the next epoch, as the step after `after` (the newest record, as
    /// read; `None` for a workspace that never had one). The caller decides whether `after`
    /// may be taken over (released, lapsed, or forced).
    pub fn acquire(
        &self,
        after: Option<&LeaseRecord>,
        holder: &Holder,
        ttl: Duration,
    ) -> std::result::Result<LeaseRecord, LeaseError> {
        let next = LeaseRecord {
            workspace: self.ws.name().into(),
            seq: after.map_or(1, |r| r.seq + 1),
            epoch: after.map_or(1, |r| r.epoch + 1),
            state: LeaseState::Held,
            holder: holder.clone(),
            ttl_ms: ttl.as_millis().max(1) as u64,
            time_unix_ms: self.store().clock().unix_ms(),
        };
        self.write(&next)?;
        Ok(next)
    }

    /// As [`Lease::acquire`], with an epoch above `min_epoch` too (a copy of generation
    /// records of that epoch is coming: the next holder must fence after them).
    pub fn acquire_above(
        &self,
        after: Option<&LeaseRecord>,
        holder: &Holder,
        ttl: Duration,
        min_epoch: u64,
    ) -> std::result::Result<LeaseRecord, LeaseError> {
        let next = LeaseRecord {
            workspace: self.ws.name().into(),
            seq: after.map_or(1, |r| r.seq + 1),
            epoch: after.map_or(0, |r| r.epoch).max(min_epoch) + 1,
            state: LeaseState::Held,
            holder: holder.clone(),
            ttl_ms: ttl.as_millis().max(1) as u64,
            time_unix_ms: self.store().clock().unix_ms(),
        };
        self.write(&next)?;
        Ok(next)
    }

    /// Renews `held` (the holder's newest record); returns the new newest record.
    pub fn renew(&self, held: &LeaseRecord) -> std::result::Result<LeaseRecord, LeaseError> {
        let next = LeaseRecord {
            seq: held.seq + 1,
            time_unix_ms: self.store().clock().unix_ms(),
            ..held.clone()
        };
        self.write(&next)?;
        Ok(next)
    }

    /// Releases `held`: the next node may take the lease at once.
    pub fn release(&self, held: &LeaseRecord) -> std::result::Result<LeaseRecord, LeaseError> {
        let next = LeaseRecord {
            seq: held.seq + 1,
            state: LeaseState::Released,
            time_unix_ms: self.store().clock().unix_ms(),
            ..held.clone()
        };
        self.write(&next)?;
        Ok(next)
    }
}

/// Watches a lease held by someone else, on this node's monotonic clock.
///
/// The holder shows it is alive by a new lease step or by a new generation slot (its
/// commits count as renewals, lease version 2): the lease lapses once neither changed for the
/// newest step's TTL, counted from when this node first saw them as they are. Watching slots
/// as well can only make a lapse later, never earlier, so a holder of version 1 (which renews
/// whatever it commits) is judged as before or more patiently.
#[derive(Debug)]
pub struct LeaseWatch {
    /// The newest step and newest slot last seen, and when this node first saw that pair.
    seen: Option<((u64, Option<u64>), Instant)>,
    clock: Arc<dyn Clock>,
}

impl Default for LeaseWatch {
    fn default() -> Self {
        Self::new()
    }
}

impl LeaseWatch {
    /// A watch on the system clock.
    pub fn new() -> LeaseWatch {
        LeaseWatch::with_clock(SystemClock::shared())
    }

    /// A watch on `clock` (normally the store's, [`Store::clock`]).
    pub fn with_clock(clock: Arc<dyn Clock>) -> LeaseWatch {
        LeaseWatch { seen: None, clock }
    }

    /// Notes the newest record and the newest generation slot (`None`: none yet) as read
    /// now. Returns how long both have stayed as they are, as far as this node can tell.
    pub fn observe(&mut self, r: &LeaseRecord, newest_slot: Option<u64>) -> Duration {
        let now = self.clock.now();
        let key = (r.seq, newest_slot);
        match self.seen {
            Some((k, at)) if k == key => now.saturating_duration_since(at),
            _ => {
                self.seen = Some((key, now));
                Duration::ZERO
            }
        }
    }

    /// Whether `r` (just observed, with the newest slot) has lapsed: neither a newer record
    /// nor a newer slot within its TTL.
    pub fn lapsed(&mut self, r: &LeaseRecord, newest_slot: Option<u64>) -> bool {
        r.state == LeaseState::Released || self.observe(r, newest_slot) >= r.ttl()
    }

    /// How much longer `r` can stay unrenewed before it lapses, by this node's clock.
    pub fn remaining(&mut self, r: &LeaseRecord, newest_slot: Option<u64>) -> Duration {
        r.ttl().saturating_sub(self.observe(r, newest_slot))
    }
}

/// The old steps that writing step `seq` deletes: every `TIDY_BATCH`th step deletes the
/// batch of steps that fell more than `KEEP` behind since the last batch. So the batches
/// cover every step, and at most `KEEP + TIDY_BATCH` steps stay behind the newest.
fn tidy_range(seq: u64) -> Option<std::ops::RangeInclusive<u64>> {
    let last = seq.checked_sub(KEEP + 1).filter(|l| *l >= 1)?;
    (last % TIDY_BATCH == 0).then(|| last.saturating_sub(TIDY_BATCH - 1).max(1)..=last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ManualClock, StoreOptions};

    fn holder(node: &str) -> Holder {
        Holder {
            node: node.into(),
            host: "h".into(),
            pid: 1,
            session: format!("s-{node}"),
            cache: String::new(),
            mountpoint: String::new(),
        }
    }

    fn lease() -> Lease {
        lease_on(SystemClock::shared())
    }

    fn lease_on(clock: Arc<dyn Clock>) -> Lease {
        let opts = StoreOptions {
            clock,
            ..StoreOptions::default()
        };
        let store =
            Store::open(&format!("memory://t{:016x}", rand::random::<u64>()), opts).unwrap();
        let name = format!("w{}", rand::random::<u64>());
        let ws = Workspace::open_or_create(&store, &name).unwrap();
        Lease::new(&ws)
    }

    #[test]
    fn acquire_renew_release_and_takeover() {
        let l = lease();
        assert_eq!(l.current().unwrap(), None);
        let a = l
            .acquire(None, &holder("a"), Duration::from_secs(10))
            .unwrap();
        assert_eq!((a.seq, a.epoch), (1, 1));
        let a2 = l.renew(&a).unwrap();
        assert_eq!(l.current().unwrap(), Some(a2.clone()));
        let r = l.release(&a2).unwrap();
        assert_eq!(r.state, LeaseState::Released);
        let b = l
            .acquire(Some(&r), &holder("b"), Duration::from_secs(10))
            .unwrap();
        assert_eq!((b.seq, b.epoch), (4, 2));
        assert_eq!(l.current().unwrap().unwrap().holder.node, "b");
    }

    #[test]
    fn a_renewal_and_a_takeover_cannot_both_win() {
        let l = lease();
        let a = l
            .acquire(None, &holder("a"), Duration::from_secs(10))
            .unwrap();
        // b decides a has lapsed and takes over first; a's renewal then loses.
        let b = l
            .acquire(Some(&a), &holder("b"), Duration::from_secs(10))
            .unwrap();
        match l.renew(&a) {
            Err(LeaseError::Lost { current, .. }) => assert_eq!(*current, b),
            other => panic!("renewal after takeover: {other:?}"),
        }
        // And the other way round: a renews first, b's takeover of the old step loses.
        let l = lease();
        let a = l
            .acquire(None, &holder("a"), Duration::from_secs(10))
            .unwrap();
        let a2 = l.renew(&a).unwrap();
        match l.acquire(Some(&a), &holder("b"), Duration::from_secs(10)) {
            Err(LeaseError::Lost { current, .. }) => assert_eq!(*current, a2),
            other => panic!("takeover of a renewed lease: {other:?}"),
        }
    }

    #[test]
    fn old_records_are_deleted_and_the_newest_found() {
        let l = lease();
        let mut r = l
            .acquire(None, &holder("a"), Duration::from_secs(10))
            .unwrap();
        let before = l.store().stats_snapshot();
        for _ in 0..51 {
            r = l.renew(&r).unwrap();
        }
        // Step 52: batches went at steps 21 (1..=16) and 37 (17..=32); 33..=52 are left.
        assert_eq!(l.current().unwrap().unwrap().seq, 52);
        let left = l.store().list(&l.prefix()).unwrap();
        assert_eq!(left.len() as u64, KEEP + TIDY_BATCH, "{left:?}");
        let after = l.store().stats_snapshot();
        assert_eq!(after.puts - before.puts, 51, "one PUT per renewal");
        assert_eq!(after.deletes - before.deletes, 2, "one request per batch");
        // Step 53 deletes 33..=48.
        l.renew(&r).unwrap();
        let left = l.store().list(&l.prefix()).unwrap();
        assert_eq!(left.len() as u64, KEEP + 1, "{left:?}");
    }

    #[test]
    fn tidy_batches_cover_every_old_step_once() {
        let mut deleted = Vec::new();
        for seq in 1..=500 {
            if let Some(r) = tidy_range(seq) {
                assert!(*r.end() + KEEP < seq, "step {seq} deletes a kept step");
                deleted.extend(r);
            }
        }
        let expect: Vec<u64> = (1..=deleted.len() as u64).collect();
        assert_eq!(deleted, expect);
        assert!(deleted.len() as u64 + KEEP + TIDY_BATCH >= 500);
    }

    #[test]
    fn malformed_or_newer_records_are_errors() {
        let l = lease();
        let a = l
            .acquire(None, &holder("a"), Duration::from_secs(10))
            .unwrap();
        l.store()
            .put(&l.key(2), Bytes::from_static(b"owsfs-lease 1\n{}\nbad\n"))
            .unwrap();
        let e = l.current().unwrap_err().to_string();
        assert!(e.contains("lease/00000000000000000002"), "{e}");
        let newer = a.seal().unwrap();
        let newer = String::from_utf8(newer.to_vec())
            .unwrap()
            .replace("owsfs-lease 2", "owsfs-lease 9");
        l.store().put(&l.key(2), Bytes::from(newer)).unwrap();
        let e = l.current().unwrap_err();
        assert!(
            matches!(e, StoreError::UnsupportedVersion { found: 9, .. }),
            "{e}"
        );
    }

    #[test]
    fn a_watch_judges_lapse_on_its_own_clock() {
        let clock = Arc::new(ManualClock::new());
        let l = lease_on(clock.clone());
        let a = l
            .acquire(None, &holder("a"), Duration::from_millis(100))
            .unwrap();
        let mut w = LeaseWatch::with_clock(l.store().clock().clone());
        assert!(!w.lapsed(&a, None));
        clock.advance(Duration::from_millis(60));
        assert_eq!(w.remaining(&a, None), Duration::from_millis(40));
        let a2 = l.renew(&a).unwrap();
        // A renewal restarts the count.
        assert!(!w.lapsed(&a2, None));
        clock.advance(Duration::from_millis(60));
        assert!(!w.lapsed(&a2, None));
        clock.advance(Duration::from_millis(39));
        assert!(!w.lapsed(&a2, None));
        assert_eq!(w.remaining(&a2, None), Duration::from_millis(1));
        clock.advance(Duration::from_millis(1));
        assert!(w.lapsed(&a2, None));
        assert_eq!(w.remaining(&a2, None), Duration::ZERO);
        let r = l.release(&a2).unwrap();
        assert!(LeaseWatch::with_clock(clock).lapsed(&r, None));
    }

    #[test]
    fn a_new_generation_slot_counts_as_a_renewal() {
        let clock = Arc::new(ManualClock::new());
        let l = lease_on(clock.clone());
        let a = l
            .acquire(None, &holder("a"), Duration::from_millis(100))
            .unwrap();
        let mut w = LeaseWatch::with_clock(clock.clone());
        assert!(!w.lapsed(&a, Some(7)));
        clock.advance(Duration::from_millis(90));
        // The holder committed slot 8 instead of renewing: the count starts again.
        assert!(!w.lapsed(&a, Some(8)));
        clock.advance(Duration::from_millis(90));
        assert!(!w.lapsed(&a, Some(8)));
        assert_eq!(w.remaining(&a, Some(8)), Duration::from_millis(10));
        clock.advance(Duration::from_millis(10));
        assert!(w.lapsed(&a, Some(8)));
    }

    #[test]
    fn a_version_1_record_is_still_read() {
        let clock = Arc::new(ManualClock::new());
        let l = lease_on(clock.clone());
        let a = l
            .acquire(None, &holder("a"), Duration::from_secs(10))
            .unwrap();
        let sealed = String::from_utf8(a.seal().unwrap().to_vec()).unwrap();
        assert!(sealed.starts_with("owsfs-lease 2\n"), "{sealed}");
        let v1 = sealed.replace("owsfs-lease 2", "owsfs-lease 1");
        l.store().put(&l.key(1), Bytes::from(v1)).unwrap();
        assert_eq!(l.current().unwrap(), Some(a));
    }

    #[test]
    fn wall_clock_steps_neither_lapse_nor_extend_a_lease() {
        let clock = Arc::new(ManualClock::new());
        let l = lease_on(clock.clone());
        let a = l
            .acquire(None, &holder("a"), Duration::from_secs(10))
            .unwrap();
        let mut w = LeaseWatch::with_clock(clock.clone());
        assert!(!w.lapsed(&a, None));
        // A day forwards, then back to 1970: the watch does not notice.
        clock.set_unix_ms(clock.unix_ms() + 86_400_000);
        assert!(!w.lapsed(&a, None));
        clock.set_unix_ms(0);
        assert!(!w.lapsed(&a, None));
        clock.advance(Duration::from_secs(10));
        assert!(w.lapsed(&a, None));
    }

    #[test]
    fn records_carry_the_store_clocks_wall_time() {
        let clock = Arc::new(ManualClock::starting_at_unix_ms(1_234_000));
        let l = lease_on(clock.clone());
        let a = l
            .acquire(None, &holder("a"), Duration::from_secs(10))
            .unwrap();
        assert_eq!(a.time_unix_ms, 1_234_000);
        clock.advance(Duration::from_millis(2500));
        assert_eq!(l.renew(&a).unwrap().time_unix_ms, 1_236_500);
    }
}

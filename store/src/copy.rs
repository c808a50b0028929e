//! Copying a workspace between stores (`owsfs copy`): its kept generation records (or one),
//! its snapshots and retention policy, and the packs they reach that the destination lacks.
//! Every pack is verified blob by blob before it is written; copying again after changes
//! moves only what is new (`FORMAT.md`, "Copy").

use std::collections::HashSet;

use crate::backend::Store;
use crate::error::{Result, StoreError};
use crate::generation::{GenNumber, GenerationRecord, Workspace};
use crate::ids::PackId;
use crate::lease::{Holder, Lease, LeaseRecord, LeaseState};
use crate::pack::ParsedPack;
use crate::progress::Progress;

/// What a copy did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CopyReport {
    pub generations_copied: u64,
    /// Already in the destination, the same.
    pub generations_present: u64,
    pub snapshots_copied: u64,
    pub packs_copied: u64,
    pub packs_present: u64,
    pub bytes_copied: u64,
    /// The destination's newest generation after the copy.
    pub head: Option<GenNumber>,
}

/// Copies workspace `src` (all its generation records, or only `only`) into workspace
/// `dst_name` of store `dst`. The destination's records must be the source's (same numbers,
/// epochs and trees) wherever both have one: a destination written since the last copy has
/// diverged and is refused. While copying, the destination's lease is held, at an epoch above
/// every copied record's, so the next mount there fences after them.
pub fn copy_workspace(
    src: &Workspace,
    only: Option<&GenerationRecord>,
    dst: &Store,
    dst_name: &str,
    holder: &Holder,
    progress: &dyn Progress,
) -> Result<CopyReport> {
    let mut report = CopyReport::default();
    let records: Vec<GenerationRecord> = match only {
        Some(r) => vec![r.clone()],
        None => {
            let mut v = Vec::new();
            for n in src.list_generations()? {
                match src.read_generation(n) {
                    Ok(r) => v.push(r),
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(e),
                }
            }
            v
        }
    };
    if records.is_empty() {
        return Err(StoreError::Invalid(format!(
            "workspace {:?} has no generation to copy",
            src.name()
        )));
    }
    let dws = Workspace::open_or_create(dst, dst_name)?;
    let max_epoch = records.iter().map(|r| r.epoch).max().unwrap_or(0);
    let lease = Lease::new(&dws);
    let mut hold = Hold {
        held: take_lease(&lease, holder, max_epoch, dst_name)?,
        lease: &lease,
        clock: std::sync::Arc::clone(dst.clock()),
        renewed: dst.clock().now(),
    };
    let result = copy_under_lease(
        src,
        &records,
        only.is_none(),
        &dws,
        &mut hold,
        progress,
        &mut report,
    );
    let released = lease.release(&hold.held);
    result?;
    released.map_err(|e| StoreError::Invalid(format!("the copy is done, but: {e}")))?;
    report.head = dws.head()?;
    Ok(report)
}

/// The destination's lease while a copy runs, renewed every third of its TTL.
struct Hold<'a> {
    held: LeaseRecord,
    lease: &'a Lease,
    clock: std::sync::Arc<dyn crate::clock::Clock>,
    renewed: std::time::Instant,
}

impl Hold<'_> {
    fn keep(&mut self) -> Result<()> {
        if self.clock.now().duration_since(self.renewed) > COPY_TTL / 3 {
            self.held = self.lease.renew(&self.held).map_err(|e| {
                StoreError::Invalid(format!("the copy lost the destination's lease: {e}"))
            })?;
            self.renewed = self.clock.now();
        }
        Ok(())
    }
}

/// The copy proper, generation by generation in ascending order: the packs a generation
/// reaches that no earlier one did (missing ones copied and verified; present ones checked
/// against the destination's GC), then its record. Each record is written right after its
/// packs, so the destination's GC finds them referenced at its next mark.
fn copy_under_lease(
    src: &Workspace,
    records: &[GenerationRecord],
    whole: bool,
    dws: &Workspace,
    hold: &mut Hold<'_>,
    progress: &dyn Progress,
    report: &mut CopyReport,
) -> Result<()> {
    let dst = dws.store();
    let dst_name = dws.name();
    // Divergence: every record both have must be the same state; nothing is copied below
    // the destination's newest record (it may have pruned some).
    let theirs: Vec<GenNumber> = dws.list_generations()?;
    let theirs_newest = theirs.last().copied().unwrap_or(0);
    let max_ours = records.iter().map(|r| r.number).max().unwrap_or(0);
    if theirs_newest > max_ours {
        return Err(diverged(
            dst_name,
            theirs_newest,
            "is newer than anything copied",
        ));
    }
    for &n in &theirs {
        if let Some(s) = records.iter().find(|r| r.number == n) {
            let d = dws.read_generation(n)?;
            if (d.epoch, d.kind, d.root) != (s.epoch, s.kind, s.root) {
                return Err(diverged(dst_name, n, "holds another state"));
            }
        }
    }
    let to_copy: Vec<&GenerationRecord> = records
        .iter()
        .filter(|r| r.number > theirs_newest)
        .collect();
    report.generations_present = (records.len() - to_copy.len()) as u64;
    let present: HashSet<String> = dst.list("packs/")?.into_iter().collect();
    let mut watch = crate::gc::GcWatch::default();
    let mut marker = crate::gc::Marker::default();
    let mut scratch = crate::gc::GcReport::default();
    let mut done: HashSet<PackId> = HashSet::new();
    progress.begin("copying", 0, to_copy.len() as u64);
    for (i, r) in to_copy.iter().enumerate() {
        let roots: Vec<_> = r.root.into_iter().collect();
        let mut packs: Vec<PackId> = marker
            .mark(src.store(), &roots, &crate::progress::Silent, &mut scratch)?
            .packs()
            .collect();
        packs.extend(r.access.map(|a| a.pack));
        if watch.stale(dst.clock().now()) {
            watch.refresh(dst, 0, dst.clock().now())?;
        }
        for p in packs {
            if !done.insert(p) {
                continue;
            }
            let key = p.key();
            if present.contains(&key) {
                if watch.at_risk(&p) {
                    return Err(StoreError::Invalid(format!(
                        "pack {} of the destination, which this copy needs, was just condemned \
                         by its GC; nothing beyond generation {} was copied: run the copy again \
                         after the destination's next GC",
                        p.to_hex(),
                        r.number.saturating_sub(1)
                    )));
                }
                report.packs_present += 1;
            } else {
                copy_pack(src.store(), dst, p, &present, &mut done, report, 0)?;
            }
            hold.keep()?;
        }
        let mut r = (*r).clone();
        r.workspace = dst_name.to_string();
        match dws.commit(&r) {
            Ok(()) => {}
            Err(crate::generation::CommitError::SlotTaken { number, .. }) => {
                return Err(diverged(dst_name, number, "was written during the copy"));
            }
            Err(crate::generation::CommitError::Invalid(m)) => return Err(StoreError::Invalid(m)),
            Err(crate::generation::CommitError::Store(e)) => return Err(e),
        }
        report.generations_copied += 1;
        progress.update(report.bytes_copied, i as u64 + 1);
        hold.keep()?;
    }
    progress.finish();
    // Snapshots of copied generations, and the retention policy (unless the destination has
    // its own).
    let copied: HashSet<GenNumber> = records.iter().map(|r| r.number).collect();
    for s in src.list_snapshots()? {
        if !copied.contains(&s.generation) {
            continue;
        }
        let r = records
            .iter()
            .find(|r| r.number == s.generation)
            .expect("copied")
            .clone();
        let r = GenerationRecord {
            workspace: dst_name.to_string(),
            ..r
        };
        match dws.create_snapshot(&s.name, &r, s.auto.as_deref()) {
            Ok(_) => report.snapshots_copied += 1,
            Err(crate::snapshot::SnapshotError::Exists { .. }) => {}
            Err(crate::snapshot::SnapshotError::Store(e)) => return Err(e),
            Err(e) => return Err(StoreError::Invalid(e.to_string())),
        }
        hold.keep()?;
    }
    if whole && dws.retention_if_set()?.is_none() {
        dws.set_retention(&src.retention()?)?;
    }
    Ok(())
}

/// Copies pack `p` (verified). A pack the source's GC repacked is copied as its forwards: the
/// packs they point to first, then the records, so the destination reads the moved blobs
/// where the source does.
fn copy_pack(
    src: &crate::backend::Store,
    dst: &crate::backend::Store,
    p: PackId,
    present: &HashSet<String>,
    done: &mut HashSet<PackId>,
    report: &mut CopyReport,
    hops: usize,
) -> Result<()> {
    let key = p.key();
    let data = match src.get(&key) {
        Ok(d) => d,
        Err(e) if e.is_not_found() && hops < crate::forward::MAX_HOPS => {
            let f = crate::forward::read(src, &p)?;
            if f.keys.is_empty() {
                return Err(e);
            }
            let targets: HashSet<PackId> = f.targets().collect();
            for t in targets {
                if done.insert(t) && !present.contains(&t.key()) {
                    copy_pack(src, dst, t, present, done, report, hops + 1)?;
                }
            }
            for k in &f.keys {
                let b = src.get(k)?;
                // Verified before it is copied, like every object.
                let _: crate::forward::ForwardRecord = crate::generation::unseal_json(
                    "owsfs-forward",
                    crate::forward::FORWARD_VERSION,
                    k,
                    &b,
                )?;
                dst.put_if_absent(k, b)?;
            }
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let parsed = ParsedPack::parse(p, data.clone())?;
    for e in parsed.entries() {
        parsed.entry_blob(e)?;
    }
    dst.put(&key, data.clone())?;
    report.packs_copied += 1;
    report.bytes_copied += data.len() as u64;
    Ok(())
}

fn diverged(name: &str, n: GenNumber, how: &str) -> StoreError {
    StoreError::Invalid(format!(
        "workspace {name:?} in the destination has diverged: its generation {n} {how}; copy to \
         a new name (DEST#NEW) instead"
    ))
}

/// How long the copy's hold on the destination's lease lasts without renewal.
const COPY_TTL: std::time::Duration = std::time::Duration::from_secs(60);

/// Takes the destination's lease at an epoch above `min_epoch`; refused while someone holds
/// it (a mount there).
fn take_lease(lease: &Lease, holder: &Holder, min_epoch: u64, name: &str) -> Result<LeaseRecord> {
    let current = lease.current()?;
    if let Some(c) = &current
        && c.state == LeaseState::Held
    {
        return Err(StoreError::Invalid(format!(
            "workspace {name:?} in the destination is held by {} (epoch {}): unmount it there \
             first (a holder that died: mount it with --steal and unmount it)",
            c.holder, c.epoch
        )));
    }
    lease
        .acquire_above(current.as_ref(), holder, COPY_TTL, min_epoch)
        .map_err(|e| StoreError::Invalid(e.to_string()))
}

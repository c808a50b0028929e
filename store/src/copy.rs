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
use crate::pack::{BlobRef, ParsedPack};
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
    let mut packs = Packs {
        src: src.store(),
        dst,
        present: dst.list("packs/")?.into_iter().collect(),
        watch: crate::gc::GcWatch::default(),
        whole: HashSet::new(),
        forwarded: HashSet::new(),
        report,
    };
    let mut marker = crate::gc::Marker::default();
    let mut scratch = crate::gc::GcReport::default();
    progress.begin("copying", 0, to_copy.len() as u64);
    for (i, r) in to_copy.iter().enumerate() {
        let roots: Vec<_> = r.root.into_iter().collect();
        let mut refs = marker.mark(src.store(), &roots, &crate::progress::Silent, &mut scratch)?;
        if let Some(a) = &r.access {
            refs.insert(a);
        }
        if packs.watch.stale(dst.clock().now()) {
            packs.watch.refresh(dst, 0, dst.clock().now())?;
        }
        for (p, blobs) in refs.by_pack_blobs() {
            packs
                .ensure(p, &blobs, 0)
                .map_err(|e| at_generation(e, r.number))?;
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
        packs.report.generations_copied += 1;
        progress.update(packs.report.bytes_copied, i as u64 + 1);
        hold.keep()?;
    }
    dws.flush_head_hint();
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

/// The copy's view of the packs: what the destination has, its GC's view, and what was
/// copied.
struct Packs<'a> {
    src: &'a Store,
    dst: &'a Store,
    present: HashSet<String>,
    watch: crate::gc::GcWatch,
    /// Packs in the destination whole (copied or found there).
    whole: HashSet<PackId>,
    /// Blobs of packs the source repacked, already readable in the destination.
    forwarded: HashSet<(PackId, u64)>,
    report: &'a mut CopyReport,
}

impl Packs<'_> {
    /// Makes `blobs` (named in pack `p` by the trees copied) readable in the destination: the
    /// pack, copied and verified unless the destination has it (and its GC did not just
    /// condemn it); or, for a pack the source's GC repacked, the packs its forwards send those
    /// blobs to, then its forward records.
    fn ensure(&mut self, p: PackId, blobs: &[BlobRef], hops: usize) -> Result<()> {
        if self.whole.contains(&p) {
            return Ok(());
        }
        let key = p.key();
        if self.present.contains(&key) {
            if self.watch.at_risk(&p) {
                return Err(at_risk(&format!("pack {}", p.to_hex())));
            }
            self.report.packs_present += 1;
            self.whole.insert(p);
            return Ok(());
        }
        let data = match self.src.get(&key) {
            Ok(d) => d,
            Err(e) if e.is_not_found() && hops < crate::forward::MAX_HOPS => {
                return self.ensure_forwarded(p, blobs, hops, e);
            }
            Err(e) => return Err(e),
        };
        let parsed = ParsedPack::parse(p, data.clone())?;
        for e in parsed.entries() {
            parsed.entry_blob(e)?;
        }
        self.dst.put(&key, data.clone())?;
        self.present.insert(key);
        self.whole.insert(p);
        self.report.packs_copied += 1;
        self.report.bytes_copied += data.len() as u64;
        Ok(())
    }

    fn ensure_forwarded(
        &mut self,
        p: PackId,
        blobs: &[BlobRef],
        hops: usize,
        missing: StoreError,
    ) -> Result<()> {
        let todo: Vec<BlobRef> = blobs
            .iter()
            .filter(|b| !self.forwarded.contains(&(p, b.offset)))
            .copied()
            .collect();
        if todo.is_empty() {
            return Ok(());
        }
        let f = crate::forward::read(self.src, &p)?;
        let mut by_target: Vec<(PackId, Vec<BlobRef>)> = Vec::new();
        for b in &todo {
            let Some(t) = f.next(b) else {
                return Err(missing);
            };
            match by_target.iter_mut().find(|(q, _)| *q == t.pack) {
                Some((_, v)) => v.push(t),
                None => by_target.push((t.pack, vec![t])),
            }
        }
        for (t, tb) in by_target {
            self.ensure(t, &tb, hops + 1)?;
        }
        if self.watch.forwards_at_risk(&p) {
            return Err(at_risk(&format!("the forwards of pack {}", p.to_hex())));
        }
        for k in &f.keys {
            let b = self.src.get(k)?;
            // Verified before it is copied, like every object.
            let _: crate::forward::ForwardRecord = crate::generation::unseal_json(
                "owsfs-forward",
                crate::forward::FORWARD_VERSION,
                k,
                &b,
            )?;
            self.dst.put_if_absent(k, b)?;
        }
        self.forwarded.extend(todo.iter().map(|b| (p, b.offset)));
        Ok(())
    }
}

fn at_risk(what: &str) -> StoreError {
    StoreError::Invalid(format!(
        "{what} of the destination, which this copy needs, was just condemned by its GC"
    ))
}

/// A copy error, saying how far the copy got.
fn at_generation(e: StoreError, n: GenNumber) -> StoreError {
    match e {
        StoreError::Invalid(m) if m.contains("just condemned") => StoreError::Invalid(format!(
            "{m}; nothing beyond generation {} was copied: run the copy again after the \
             destination's next GC",
            n.saturating_sub(1)
        )),
        e => e,
    }
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

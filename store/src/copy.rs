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
    // Divergence: every record both have must be the same state.
    let theirs: Vec<GenNumber> = dws.list_generations()?;
    let ours: HashSet<GenNumber> = records.iter().map(|r| r.number).collect();
    let max_ours = records.iter().map(|r| r.number).max().unwrap_or(0);
    for &n in &theirs {
        if n > max_ours {
            return Err(diverged(dst_name, n, "is newer than anything copied"));
        }
        if !ours.contains(&n) {
            continue;
        }
        let d = dws.read_generation(n)?;
        let s = records
            .iter()
            .find(|r| r.number == n)
            .expect("listed above");
        if (d.epoch, d.kind, d.root) != (s.epoch, s.kind, s.root) {
            return Err(diverged(dst_name, n, "holds another state"));
        }
    }
    let to_copy: Vec<&GenerationRecord> = records
        .iter()
        .filter(|r| !theirs.contains(&r.number))
        .collect();
    report.generations_present = (records.len() - to_copy.len()) as u64;

    // The destination's lease, above every epoch copied.
    let max_epoch = records.iter().map(|r| r.epoch).max().unwrap_or(0);
    let lease = Lease::new(&dws);
    let mut held = take_lease(&lease, holder, max_epoch, dst_name)?;
    let clock = std::sync::Arc::clone(dst.clock());
    let mut renewed = clock.now();
    let result = (|| -> Result<()> {
        // Packs first: a record is written only once everything it reaches is there.
        let roots: Vec<_> = to_copy.iter().filter_map(|r| r.root).collect();
        let mut blobs: Vec<PackId> = to_copy
            .iter()
            .filter_map(|r| r.access)
            .map(|a| a.pack)
            .collect();
        let mut scratch = crate::gc::GcReport::default();
        let mut packs: Vec<PackId> = crate::gc::mark(src.store(), &roots, progress, &mut scratch)?
            .into_iter()
            .collect();
        packs.append(&mut blobs);
        packs.sort_unstable_by_key(|p| p.0);
        packs.dedup();
        let present: HashSet<String> = dst.list("packs/")?.into_iter().collect();
        progress.begin("copying packs", 0, packs.len() as u64);
        for (i, p) in packs.iter().enumerate() {
            let key = p.key();
            if present.contains(&key) {
                report.packs_present += 1;
            } else {
                let data = src.store().get(&key)?;
                let parsed = ParsedPack::parse(*p, data.clone())?;
                for e in parsed.entries() {
                    parsed.entry_blob(e)?;
                }
                dst.put(&key, data.clone())?;
                report.packs_copied += 1;
                report.bytes_copied += data.len() as u64;
            }
            progress.update(report.bytes_copied, i as u64 + 1);
            if clock.now().duration_since(renewed) > COPY_TTL / 3 {
                held = lease.renew(&held).map_err(|e| {
                    StoreError::Invalid(format!("the copy lost the destination's lease: {e}"))
                })?;
                renewed = clock.now();
            }
        }
        progress.finish();
        for r in &to_copy {
            let mut r = (*r).clone();
            r.workspace = dst_name.to_string();
            match dws.commit(&r) {
                Ok(()) => {}
                Err(crate::generation::CommitError::SlotTaken { number, .. }) => {
                    return Err(diverged(dst_name, number, "was written during the copy"));
                }
                Err(crate::generation::CommitError::Invalid(m)) => {
                    return Err(StoreError::Invalid(m));
                }
                Err(crate::generation::CommitError::Store(e)) => return Err(e),
            }
            report.generations_copied += 1;
        }
        // Snapshots of copied generations, and the retention policy.
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
        }
        if only.is_none() {
            dws.set_retention(&src.retention()?)?;
        }
        Ok(())
    })();
    let released = lease.release(&held);
    result?;
    released.map_err(|e| StoreError::Invalid(format!("the copy is done, but: {e}")))?;
    report.head = dws.head()?;
    Ok(report)
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

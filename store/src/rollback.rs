//! Rollback of a workspace that is not mounted (`owsfs rollback --workspace W REF`): a new
//! generation whose tree is REF's, after an automatic snapshot of the state it replaces, so a
//! rollback is undone by another rollback (`FORMAT.md`, "Rollback").

use std::time::Duration;

use crate::error::{Result, StoreError};
use crate::generation::{CommitError, GenKind, GenNumber, GenStats, GenerationRecord, Workspace};
use crate::lease::{Holder, Lease, LeaseState};

/// What a rollback did.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RolledBack {
    /// The new generation, holding `to`'s tree.
    pub generation: GenNumber,
    pub to: GenNumber,
    /// The automatic snapshot of the state it replaced (undo: roll back to it).
    pub snapshot: Option<String>,
}

/// Commits, under the workspace's lease (refused while a mount holds it), a generation with
/// the tree of commit `to`, after an automatic snapshot `auto-rollback-N` of the newest commit
/// (older automatic snapshots beyond `keep` roll off).
pub fn rollback(
    ws: &Workspace,
    to: &GenerationRecord,
    holder: &Holder,
    keep: usize,
) -> Result<RolledBack> {
    let root = match (to.kind, to.root) {
        (GenKind::Commit, Some(r)) => r,
        _ => {
            return Err(StoreError::Invalid(format!(
                "generation {} is a fence, not a state",
                to.number
            )));
        }
    };
    let lease = Lease::new(ws);
    let current = lease.current()?;
    if let Some(c) = &current
        && c.state == LeaseState::Held
    {
        return Err(StoreError::Invalid(format!(
            "workspace {:?} is mounted by {} (epoch {}): roll the mount back on its node \
             (`owsfs rollback MOUNTPOINT REF`), or unmount it first (a holder that died: mount \
             it with --steal and unmount it)",
            ws.name(),
            c.holder,
            c.epoch
        )));
    }
    let head = ws.head()?.ok_or_else(|| {
        StoreError::Invalid(format!("workspace {:?} has no generation", ws.name()))
    })?;
    let parent = ws.read_generation(head)?;
    let held = lease
        .acquire_above(
            current.as_ref(),
            holder,
            Duration::from_secs(60),
            parent.epoch,
        )
        .map_err(|e| StoreError::Invalid(e.to_string()))?;
    let result = (|| -> Result<RolledBack> {
        let snapshot = match ws.newest_commit(head)? {
            Some(newest) if keep > 0 => match ws.auto_snapshot("rollback", &newest, keep) {
                Ok((s, _)) => Some(s.name),
                Err(crate::snapshot::SnapshotError::Store(e)) => return Err(e),
                Err(e) => return Err(StoreError::Invalid(e.to_string())),
            },
            _ => None,
        };
        let record = rollback_record(ws, to, root, head, held.epoch);
        match ws.commit_checked(&record, Some(&parent)) {
            Ok(()) => {}
            Err(CommitError::SlotTaken { number, .. }) => {
                return Err(StoreError::Invalid(format!(
                    "generation {number} was written during the rollback; nothing was changed, \
                     run it again"
                )));
            }
            Err(CommitError::Invalid(m)) => return Err(StoreError::Invalid(m)),
            Err(CommitError::Store(e)) => return Err(e),
        }
        Ok(RolledBack {
            generation: head + 1,
            to: to.number,
            snapshot,
        })
    })();
    let released = lease.release(&held);
    let r = result?;
    released.map_err(|e| StoreError::Invalid(format!("rolled back, but: {e}")))?;
    Ok(r)
}

/// The record of a rollback's generation: slot `head + 1` at `epoch`, holding commit `to`'s
/// tree (`root`), SQLite positions, access list and size.
pub fn rollback_record(
    ws: &Workspace,
    to: &GenerationRecord,
    root: crate::pack::BlobRef,
    head: GenNumber,
    epoch: u64,
) -> GenerationRecord {
    GenerationRecord {
        workspace: ws.name().to_string(),
        number: head + 1,
        parent: (head > 0).then_some(head),
        epoch,
        kind: GenKind::Commit,
        time_unix_ms: ws.store().clock().unix_ms(),
        root: Some(root),
        sqlite: to.sqlite.clone(),
        stats: GenStats {
            files: to.stats.files,
            dirs: to.stats.dirs,
            bytes_total: to.stats.bytes_total,
            rollback_to: Some(to.number),
            ..GenStats::default()
        },
        access: to.access,
    }
}

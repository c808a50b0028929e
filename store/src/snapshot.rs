//! Snapshots: names for generations, kept until deleted (`FORMAT.md`, "Snapshot").
//!
//! A snapshot of workspace W is the sealed record `workspaces/W/snapshots/NAME`. It names one
//! commit and carries its root tree, so reading a snapshot's tree does not need the
//! generation record. Named snapshots stay until deleted; automatic ones (taken before a
//! handoff or a rollback, named `auto-REASON-N`) are rolled off, oldest first, beyond a count.

use serde::{Deserialize, Serialize};

use crate::backend::PutOutcome;
use crate::error::{Result, StoreError};
use crate::generation::{
    GenKind, GenNumber, GenStats, GenerationRecord, Workspace, seal_json, unseal_json,
    valid_workspace_name,
};
use crate::pack::BlobRef;

pub const SNAPSHOT_VERSION: u64 = 1;

/// One snapshot record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub workspace: String,
    pub name: String,
    /// The commit it names.
    pub generation: GenNumber,
    /// That commit's root tree.
    pub root: BlobRef,
    /// When that commit was made.
    pub generation_time_unix_ms: u64,
    /// When the snapshot was taken.
    pub time_unix_ms: u64,
    /// Why an automatic snapshot was taken (`handoff`, `rollback`); absent for a named one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto: Option<String>,
    /// The commit's numbers (files, bytes).
    #[serde(default)]
    pub stats: GenStats,
}

impl Snapshot {
    pub fn is_auto(&self) -> bool {
        self.auto.is_some()
    }
}

/// Why a snapshot could not be made.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(
        "a snapshot named {name:?} already exists (generation {generation}); delete it first or pick another name"
    )]
    Exists { name: String, generation: GenNumber },
    #[error("there is no snapshot named {name:?} in workspace {workspace:?}")]
    Missing { workspace: String, name: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Checks a snapshot name a person chose: a workspace name's characters, and neither a
/// generation number, `HEAD`, nor the `auto-` prefix of automatic snapshots, so that a name
/// never reads as another kind of reference.
pub fn check_snapshot_name(name: &str) -> std::result::Result<(), String> {
    if !valid_workspace_name(name) {
        return Err(format!(
            "invalid snapshot name {name:?}: use 1 to 128 of A-Z a-z 0-9 . _ -, not starting with '.'"
        ));
    }
    if name.bytes().all(|c| c.is_ascii_digit()) {
        return Err(format!(
            "invalid snapshot name {name:?}: a number names a generation; add a letter"
        ));
    }
    if name == "HEAD" || name.starts_with("auto-") {
        return Err(format!(
            "invalid snapshot name {name:?}: HEAD and names starting with auto- are owsfs's own"
        ));
    }
    Ok(())
}

/// The name of an automatic snapshot of generation `n`.
pub fn auto_name(reason: &str, n: GenNumber) -> String {
    format!("auto-{reason}-{n}")
}

impl Workspace {
    fn snapshot_key(&self, name: &str) -> String {
        format!("workspaces/{}/snapshots/{name}", self.name())
    }

    /// Names commit `record`. A person's name is checked by [`check_snapshot_name`]; `auto` is
    /// the reason of an automatic snapshot (its name is then [`auto_name`]). Taking the same
    /// snapshot again (same name, same generation) succeeds; a name already used for another
    /// generation is [`SnapshotError::Exists`].
    pub fn create_snapshot(
        &self,
        name: &str,
        record: &GenerationRecord,
        auto: Option<&str>,
    ) -> std::result::Result<Snapshot, SnapshotError> {
        match auto {
            Some(reason) if name == auto_name(reason, record.number) => {}
            Some(_) => {
                return Err(
                    StoreError::Invalid(format!("{name:?} is not an automatic name")).into(),
                );
            }
            None => check_snapshot_name(name).map_err(StoreError::Invalid)?,
        }
        let root = match (record.kind, record.root) {
            (GenKind::Commit, Some(root)) => root,
            _ => {
                return Err(StoreError::Invalid(format!(
                    "generation {} is a fence, not a state: name a commit",
                    record.number
                ))
                .into());
            }
        };
        let snap = Snapshot {
            workspace: self.name().to_string(),
            name: name.to_string(),
            generation: record.number,
            root,
            generation_time_unix_ms: record.time_unix_ms,
            time_unix_ms: self.store().clock().unix_ms(),
            auto: auto.map(str::to_string),
            stats: record.stats,
        };
        let key = self.snapshot_key(name);
        let sealed = seal_json("owsfs-snapshot", SNAPSHOT_VERSION, "snapshot", &snap)?;
        match self.store().put_if_absent(&key, sealed)? {
            PutOutcome::Created | PutOutcome::AlreadyIdentical => Ok(snap),
            PutOutcome::Conflict(b) => {
                let existing = self.parse_snapshot(&key, name, &b)?;
                if existing.generation == snap.generation && existing.root == snap.root {
                    Ok(existing)
                } else {
                    Err(SnapshotError::Exists {
                        name: name.to_string(),
                        generation: existing.generation,
                    })
                }
            }
        }
    }

    fn parse_snapshot(&self, key: &str, name: &str, b: &[u8]) -> Result<Snapshot> {
        let s: Snapshot = unseal_json("owsfs-snapshot", SNAPSHOT_VERSION, key, b)?;
        if s.workspace != self.name() || s.name != name {
            return Err(StoreError::corrupt(
                key,
                format!(
                    "record says workspace {:?} snapshot {:?}",
                    s.workspace, s.name
                ),
            ));
        }
        Ok(s)
    }

    /// Reads and verifies snapshot `name`.
    pub fn read_snapshot(&self, name: &str) -> std::result::Result<Snapshot, SnapshotError> {
        if !valid_workspace_name(name) {
            return Err(self.missing(name));
        }
        let key = self.snapshot_key(name);
        match self.store().get(&key) {
            Ok(b) => Ok(self.parse_snapshot(&key, name, &b)?),
            Err(e) if e.is_not_found() => Err(self.missing(name)),
            Err(e) => Err(e.into()),
        }
    }

    fn missing(&self, name: &str) -> SnapshotError {
        SnapshotError::Missing {
            workspace: self.name().to_string(),
            name: name.to_string(),
        }
    }

    /// Every snapshot, oldest generation first (ties by name). A record that fails its
    /// checks is an error naming it: a snapshot is never skipped silently.
    pub fn list_snapshots(&self) -> Result<Vec<Snapshot>> {
        let prefix = format!("workspaces/{}/snapshots/", self.name());
        let mut out = Vec::new();
        for key in self.store().list(&prefix)? {
            let Some(name) = key.strip_prefix(&prefix) else {
                continue;
            };
            let b = match self.store().get(&key) {
                Ok(b) => b,
                // Deleted since the listing.
                Err(e) if e.is_not_found() => continue,
                Err(e) => return Err(e),
            };
            out.push(self.parse_snapshot(&key, name, &b)?);
        }
        out.sort_by(|a, b| (a.generation, &a.name).cmp(&(b.generation, &b.name)));
        Ok(out)
    }

    /// Deletes snapshot `name`; a missing one is [`SnapshotError::Missing`].
    pub fn delete_snapshot(&self, name: &str) -> std::result::Result<Snapshot, SnapshotError> {
        let snap = self.read_snapshot(name)?;
        self.store().delete(&self.snapshot_key(name))?;
        Ok(snap)
    }

    /// Takes an automatic snapshot of commit `record` (`reason`: `handoff`, `rollback`) and
    /// rolls the oldest automatic snapshots of the same reason off beyond `keep` (so handoffs
    /// never push a rollback's undo out). Named snapshots are never touched. Returns the
    /// snapshot and the names rolled off.
    pub fn auto_snapshot(
        &self,
        reason: &str,
        record: &GenerationRecord,
        keep: usize,
    ) -> std::result::Result<(Snapshot, Vec<String>), SnapshotError> {
        let snap = self.create_snapshot(&auto_name(reason, record.number), record, Some(reason))?;
        let mut autos: Vec<Snapshot> = self
            .list_snapshots()?
            .into_iter()
            .filter(|s| s.auto.as_deref() == Some(reason))
            .collect();
        // Oldest first; the one just taken is never rolled off, even with `keep` 0.
        autos.sort_by_key(|s| (s.generation, s.time_unix_ms));
        let excess = autos.len().saturating_sub(keep.max(1));
        let mut rolled = Vec::new();
        for s in autos.into_iter().take(excess) {
            if s.name == snap.name {
                continue;
            }
            self.store().delete(&self.snapshot_key(&s.name))?;
            rolled.push(s.name);
        }
        Ok((snap, rolled))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Store, StoreOptions};
    use crate::ids::{BlobId, PackId};
    use bytes::Bytes;

    fn commit(ws: &Workspace, n: GenNumber) -> GenerationRecord {
        let r = GenerationRecord {
            workspace: ws.name().into(),
            number: n,
            parent: (n > 1).then(|| n - 1),
            epoch: 1,
            kind: GenKind::Commit,
            time_unix_ms: 1000 * n,
            root: Some(BlobRef::plain(
                BlobId::of(&n.to_le_bytes()),
                PackId::random(),
                16,
                8,
            )),
            sqlite: Vec::new(),
            stats: GenStats {
                files: n,
                bytes_total: 10 * n,
                ..Default::default()
            },
            access: None,
        };
        ws.commit(&r).unwrap();
        r
    }

    fn ws() -> Workspace {
        let store = Store::open(
            &format!("memory://t{:016x}", rand::random::<u64>()),
            StoreOptions::default(),
        )
        .unwrap();
        Workspace::open_or_create(&store, "w").unwrap()
    }

    #[test]
    fn names_that_read_as_other_references_are_refused() {
        for bad in [
            "42",
            "HEAD",
            "auto-x",
            "",
            ".hidden",
            "a/b",
            "10m ago",
            "2026-01-01T00:00:00Z",
        ] {
            assert!(check_snapshot_name(bad).is_err(), "{bad:?} was accepted");
        }
        for good in ["before-migration", "v1.2", "a_b", "x42"] {
            check_snapshot_name(good).unwrap();
        }
    }

    #[test]
    fn a_snapshot_names_a_commit_until_deleted() {
        let ws = ws();
        let g1 = commit(&ws, 1);
        let g2 = commit(&ws, 2);
        let s = ws.create_snapshot("first", &g1, None).unwrap();
        assert_eq!((s.generation, s.root), (1, g1.root.unwrap()));
        assert_eq!(s.stats.bytes_total, 10);
        // Again, the same: fine. Another generation under the same name: refused.
        ws.create_snapshot("first", &g1, None).unwrap();
        match ws.create_snapshot("first", &g2, None) {
            Err(SnapshotError::Exists { generation: 1, .. }) => {}
            other => panic!("{other:?}"),
        }
        ws.create_snapshot("second", &g2, None).unwrap();
        let names: Vec<String> = ws
            .list_snapshots()
            .unwrap()
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(names, ["first", "second"]);
        assert_eq!(ws.read_snapshot("second").unwrap().generation, 2);
        ws.delete_snapshot("first").unwrap();
        assert!(matches!(
            ws.read_snapshot("first"),
            Err(SnapshotError::Missing { .. })
        ));
        assert!(matches!(
            ws.delete_snapshot("first"),
            Err(SnapshotError::Missing { .. })
        ));
    }

    #[test]
    fn a_fence_cannot_be_named() {
        let ws = ws();
        commit(&ws, 1);
        let f = ws.fence(2).unwrap();
        let fence = ws.read_generation(f).unwrap();
        assert!(ws.create_snapshot("f", &fence, None).is_err());
    }

    #[test]
    fn automatic_snapshots_roll_off_oldest_first_and_named_ones_stay() {
        let ws = ws();
        let g1 = commit(&ws, 1);
        ws.create_snapshot("keep-me", &g1, None).unwrap();
        for n in 2..=6 {
            let g = commit(&ws, n);
            let (_, rolled) = ws.auto_snapshot("handoff", &g, 3).unwrap();
            if n <= 4 {
                assert!(rolled.is_empty(), "{rolled:?}");
            } else {
                assert_eq!(rolled, [auto_name("handoff", n - 3)]);
            }
        }
        let names: Vec<String> = ws
            .list_snapshots()
            .unwrap()
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(
            names,
            [
                "keep-me",
                "auto-handoff-4",
                "auto-handoff-5",
                "auto-handoff-6"
            ]
        );
        // The same generation again takes no second snapshot.
        let g6 = ws.read_generation(6).unwrap();
        ws.auto_snapshot("handoff", &g6, 3).unwrap();
        assert_eq!(ws.list_snapshots().unwrap().len(), 4);
        // Another reason counts apart: a rollback's snapshot outlives any number of handoffs.
        let g7 = commit(&ws, 7);
        ws.auto_snapshot("rollback", &g7, 3).unwrap();
        for n in 8..=12 {
            let g = commit(&ws, n);
            ws.auto_snapshot("handoff", &g, 3).unwrap();
        }
        assert!(ws.read_snapshot("auto-rollback-7").is_ok());
    }

    #[test]
    fn a_damaged_snapshot_is_an_error_not_a_skip() {
        let ws = ws();
        let g1 = commit(&ws, 1);
        ws.create_snapshot("s", &g1, None).unwrap();
        let key = "workspaces/w/snapshots/s";
        let mut b = ws.store().get(key).unwrap().to_vec();
        let at = b.len() / 2;
        b[at] ^= 1;
        ws.store().put(key, Bytes::from(b)).unwrap();
        assert!(ws.list_snapshots().unwrap_err().is_corrupt());
        assert!(matches!(
            ws.read_snapshot("s"),
            Err(SnapshotError::Store(e)) if e.is_corrupt()
        ));
    }
}

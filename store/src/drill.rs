//! Drill records: the outcome of a restore drill of one generation, kept in the store so that
//! every node's `owsfs log` and `owsfs status` show when the backups were last proven
//! (`FORMAT.md`, "Drill record").

use serde::{Deserialize, Serialize};

use crate::error::{Result, StoreError};
use crate::generation::{GenNumber, Workspace, seal_json, unseal_json};

pub const DRILL_VERSION: u64 = 1;

/// How many drill records a workspace keeps (older ones are deleted when a new one is
/// written).
pub const DRILLS_KEPT: usize = 100;

/// The integrity check of one SQLite database.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatabaseCheck {
    pub path: String,
    /// What `PRAGMA integrity_check` said (`ok` when sound).
    pub integrity: String,
}

/// One drill.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrillRecord {
    pub workspace: String,
    pub generation: GenNumber,
    /// When the drill ended.
    pub time_unix_ms: u64,
    pub duration_ms: u64,
    pub ok: bool,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub files: u64,
    pub dirs: u64,
    pub bytes: u64,
    #[serde(default)]
    pub databases: Vec<DatabaseCheck>,
    /// Who ran it (host name).
    #[serde(default)]
    pub host: String,
}

impl Workspace {
    fn drills_prefix(&self) -> String {
        format!("workspaces/{}/drills/", self.name())
    }

    /// Stores a drill's outcome and deletes the oldest records beyond [`DRILLS_KEPT`].
    pub fn record_drill(&self, r: &DrillRecord) -> Result<()> {
        let key = format!(
            "{}{:020}-{:020}",
            self.drills_prefix(),
            r.time_unix_ms,
            r.generation
        );
        self.store()
            .put(&key, seal_json("owsfs-drill", DRILL_VERSION, "drill", r)?)?;
        let keys = self.store().list(&self.drills_prefix())?;
        if keys.len() > DRILLS_KEPT {
            for old in &keys[..keys.len() - DRILLS_KEPT] {
                self.store().delete(old)?;
            }
        }
        Ok(())
    }

    /// The drill records, oldest first. A damaged record is an error naming it.
    pub fn list_drills(&self) -> Result<Vec<DrillRecord>> {
        let prefix = self.drills_prefix();
        let mut out = Vec::new();
        for key in self.store().list(&prefix)? {
            let b = match self.store().get(&key) {
                Ok(b) => b,
                Err(e) if e.is_not_found() => continue,
                Err(e) => return Err(e),
            };
            let r: DrillRecord = unseal_json("owsfs-drill", DRILL_VERSION, &key, &b)?;
            if r.workspace != self.name() {
                return Err(StoreError::corrupt(
                    &key,
                    "the record names another workspace",
                ));
            }
            out.push(r);
        }
        out.sort_by_key(|r| (r.time_unix_ms, r.generation));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Store, StoreOptions};

    fn rec(n: u64, t: u64, ok: bool) -> DrillRecord {
        DrillRecord {
            workspace: "w".into(),
            generation: n,
            time_unix_ms: t,
            duration_ms: 5,
            ok,
            error: (!ok).then(|| "corrupt object packs/ab/…".into()),
            files: 3,
            dirs: 1,
            bytes: 10,
            databases: vec![DatabaseCheck {
                path: "app.db".into(),
                integrity: "ok".into(),
            }],
            host: "vm".into(),
        }
    }

    #[test]
    fn drills_are_kept_newest_last_and_bounded() {
        let store = Store::open(
            &format!("memory://t{:016x}", rand::random::<u64>()),
            StoreOptions::default(),
        )
        .unwrap();
        let ws = Workspace::open_or_create(&store, "w").unwrap();
        assert!(ws.list_drills().unwrap().is_empty());
        for i in 0..(DRILLS_KEPT as u64 + 5) {
            ws.record_drill(&rec(i % 7, 1000 + i, i % 3 != 0)).unwrap();
        }
        let all = ws.list_drills().unwrap();
        assert_eq!(all.len(), DRILLS_KEPT);
        assert_eq!(all.first().unwrap().time_unix_ms, 1005);
        assert_eq!(
            all.last().unwrap(),
            &rec(
                (DRILLS_KEPT as u64 + 4) % 7,
                1000 + DRILLS_KEPT as u64 + 4,
                true
            )
        );
    }
}

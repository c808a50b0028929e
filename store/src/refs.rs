//! References to a state of a workspace, as people write them: a generation number, a
//! snapshot name, `HEAD`, or a time (`10m ago`, `2026-12-06T10:00:00Z`). Resolving one gives
//! the commit record that holds that state.

use std::time::Duration;

use crate::error::{Result, StoreError};
use crate::generation::{GenKind, GenNumber, GenerationRecord, Workspace};
use crate::snapshot::SnapshotError;

/// A parsed reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GenRef {
    /// The newest commit.
    Head,
    /// Generation N (a fence stands for the commit before it: the same state).
    Number(GenNumber),
    /// A snapshot by name.
    Snapshot(String),
    /// The newest commit made at or before this Unix time (ms).
    Time(u64),
    /// The newest commit made at least this long ago (resolved against the store's clock).
    Ago(Duration),
}

impl std::fmt::Display for GenRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GenRef::Head => write!(f, "HEAD"),
            GenRef::Number(n) => write!(f, "generation {n}"),
            GenRef::Snapshot(s) => write!(f, "snapshot {s:?}"),
            GenRef::Time(ms) => match jiff::Timestamp::from_millisecond(*ms as i64) {
                Ok(t) => write!(f, "{t}"),
                Err(_) => write!(f, "@{ms}ms"),
            },
            GenRef::Ago(d) => write!(f, "{} ago", humantime::format_duration(*d)),
        }
    }
}

impl std::str::FromStr for GenRef {
    type Err = String;

    /// `HEAD`, a number, `DURATION ago` (`10m ago`, `1h30m ago`, `2 days ago`), an RFC 3339
    /// time, or a snapshot name. Snapshot names can be none of the others
    /// ([`crate::snapshot::check_snapshot_name`]).
    fn from_str(s: &str) -> std::result::Result<GenRef, String> {
        let t = s.trim();
        if t.is_empty() {
            return Err(
                "an empty reference: give a generation number, a snapshot name, \
                        HEAD, or a time such as `10m ago`"
                    .into(),
            );
        }
        if t == "HEAD" || t == "head" || t == "latest" {
            return Ok(GenRef::Head);
        }
        if t.bytes().all(|c| c.is_ascii_digit()) {
            return t
                .parse()
                .map(GenRef::Number)
                .map_err(|_| format!("{t:?} is too large for a generation number"));
        }
        if let Some(d) = t.strip_suffix("ago") {
            let d = d.trim();
            return humantime::parse_duration(d)
                .map(GenRef::Ago)
                .map_err(|e| format!("{t:?}: {d:?} is not a duration ({e}); e.g. `10m ago`"));
        }
        if t.contains(':') || (t.contains('-') && t.starts_with(|c: char| c.is_ascii_digit())) {
            let ts: jiff::Timestamp = t.parse().map_err(|e| {
                format!("{t:?} is not an RFC 3339 time ({e}); e.g. 2026-12-06T10:00:00Z")
            })?;
            let ms =
                u64::try_from(ts.as_millisecond()).map_err(|_| format!("{t:?} is before 1970"))?;
            return Ok(GenRef::Time(ms));
        }
        if crate::generation::valid_workspace_name(t) {
            return Ok(GenRef::Snapshot(t.to_string()));
        }
        Err(format!(
            "{t:?} is not a reference: give a generation number, a snapshot name, HEAD, a time \
             such as `10m ago` or 2026-12-06T10:00:00Z"
        ))
    }
}

/// Why a reference did not resolve.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("workspace {workspace:?} has no commit{}", at.as_ref().map(|a| format!(" at or before {a}")).unwrap_or_default())]
    NoCommit {
        workspace: String,
        at: Option<String>,
    },
    #[error("workspace {workspace:?} has no generation {number} (the newest is {head})")]
    NoGeneration {
        workspace: String,
        number: GenNumber,
        head: GenNumber,
    },
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Workspace {
    /// The commit record that holds the state `r` names. A fence stands for the newest commit
    /// before it (a fence changes no file). A time gives the newest commit made at or before
    /// it (commit times are the writers' wall clocks: nearly, not strictly, in order; the
    /// search assumes order).
    pub fn resolve(&self, r: &GenRef) -> std::result::Result<GenerationRecord, ResolveError> {
        let no_commit = |at: Option<String>| ResolveError::NoCommit {
            workspace: self.name().to_string(),
            at,
        };
        let head = self.head()?.ok_or_else(|| no_commit(None))?;
        match r {
            GenRef::Head => self.newest_commit(head)?.ok_or_else(|| no_commit(None)),
            GenRef::Number(n) => {
                if *n == 0 || *n > head {
                    return Err(ResolveError::NoGeneration {
                        workspace: self.name().to_string(),
                        number: *n,
                        head,
                    });
                }
                self.commit_at_or_before(*n)?
                    .ok_or_else(|| no_commit(Some(r.to_string())))
            }
            GenRef::Snapshot(name) => {
                let s = self.read_snapshot(name)?;
                let record = match self.read_generation(s.generation) {
                    Ok(r) => r,
                    // Pruned by a GC that listed before the snapshot was taken: the snapshot
                    // carries the tree (which that GC's successors keep), not the SQLite
                    // positions.
                    Err(e) if e.is_not_found() => GenerationRecord {
                        workspace: s.workspace.clone(),
                        number: s.generation,
                        parent: s.generation.checked_sub(1).filter(|&p| p > 0),
                        epoch: 0,
                        kind: GenKind::Commit,
                        time_unix_ms: s.generation_time_unix_ms,
                        root: Some(s.root),
                        sqlite: Vec::new(),
                        stats: s.stats,
                        access: None,
                    },
                    Err(e) => return Err(e.into()),
                };
                if record.root != Some(s.root) {
                    return Err(StoreError::corrupt(
                        self.generation_key(s.generation),
                        format!("snapshot {name:?} names another tree than this record"),
                    )
                    .into());
                }
                Ok(record)
            }
            GenRef::Time(ms) => self
                .commit_at_time(*ms)?
                .ok_or_else(|| no_commit(Some(r.to_string()))),
            GenRef::Ago(d) => {
                let now = self.store().clock().unix_ms();
                let ms = now.saturating_sub(u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
                self.commit_at_time(ms)?
                    .ok_or_else(|| no_commit(Some(r.to_string())))
            }
        }
    }

    /// The newest commit at or before slot `n`, stepping over fences and slots that are gone.
    fn commit_at_or_before(&self, n: GenNumber) -> Result<Option<GenerationRecord>> {
        let numbers = self.list_generations()?;
        let end = numbers.partition_point(|&g| g <= n);
        for &g in numbers[..end].iter().rev() {
            match self.read_generation(g) {
                Ok(r) if r.kind == GenKind::Commit => return Ok(Some(r)),
                Ok(_) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    /// The newest commit made at or before Unix time `ms`: a binary search over the slots by
    /// their records' times, then back over fences.
    fn commit_at_time(&self, ms: u64) -> Result<Option<GenerationRecord>> {
        let numbers = self.list_generations()?;
        let (mut lo, mut hi) = (0usize, numbers.len());
        // Invariant: slots before `lo` are at or before `ms`, slots from `hi` after it.
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.read_generation(numbers[mid])?.time_unix_ms <= ms {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        match lo.checked_sub(1) {
            Some(i) => self.commit_at_or_before(numbers[i]),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Store, StoreOptions};
    use crate::clock::ManualClock;
    use crate::generation::GenStats;
    use crate::ids::{BlobId, PackId};
    use crate::pack::BlobRef;
    use std::sync::Arc;

    #[test]
    fn references_parse() {
        let p = |s: &str| s.parse::<GenRef>();
        assert_eq!(p("HEAD"), Ok(GenRef::Head));
        assert_eq!(p("42"), Ok(GenRef::Number(42)));
        assert_eq!(p("10m ago"), Ok(GenRef::Ago(Duration::from_secs(600))));
        assert_eq!(p("1h 30m ago"), Ok(GenRef::Ago(Duration::from_secs(5400))));
        assert_eq!(
            p("2days ago"),
            Ok(GenRef::Ago(Duration::from_secs(172_800)))
        );
        assert_eq!(
            p("2026-12-06T10:00:00Z"),
            Ok(GenRef::Time(1_796_551_200_000))
        );
        assert_eq!(
            p("2026-12-06T11:00:00+01:00"),
            Ok(GenRef::Time(1_796_551_200_000))
        );
        assert_eq!(
            p("before-upgrade"),
            Ok(GenRef::Snapshot("before-upgrade".into()))
        );
        for bad in [
            "",
            "ten minutes ago",
            "2026-13-01T00:00:00Z",
            "a/b",
            "99999999999999999999999",
        ] {
            assert!(p(bad).is_err(), "{bad:?} parsed");
        }
    }

    fn commit(ws: &Workspace, n: GenNumber, time: u64) {
        let r = GenerationRecord {
            workspace: ws.name().into(),
            number: n,
            parent: (n > 1).then(|| n - 1),
            epoch: 1,
            kind: GenKind::Commit,
            time_unix_ms: time,
            root: Some(BlobRef::plain(
                BlobId::of(&n.to_le_bytes()),
                PackId::random(),
                16,
                8,
            )),
            sqlite: Vec::new(),
            stats: GenStats::default(),
            access: None,
        };
        ws.commit(&r).unwrap();
    }

    #[test]
    fn references_resolve_to_commits() {
        let clock = Arc::new(ManualClock::new());
        let store = Store::open(
            &format!("memory://t{:016x}", rand::random::<u64>()),
            StoreOptions {
                clock: clock.clone(),
                ..Default::default()
            },
        )
        .unwrap();
        let ws = Workspace::open_or_create(&store, "w").unwrap();
        let err = ws.resolve(&GenRef::Head).unwrap_err();
        assert!(matches!(err, ResolveError::NoCommit { .. }), "{err}");
        // Commits at t = 10 s, 20 s, 30 s; a fence at 35 s; a commit at 40 s.
        for n in 1..=3 {
            commit(&ws, n, 10_000 * n);
        }
        clock.set_unix_ms(35_000);
        assert_eq!(ws.fence(2).unwrap(), 4);
        commit(&ws, 5, 40_000);
        let at = |r: GenRef| ws.resolve(&r).map(|g| g.number);
        assert_eq!(at(GenRef::Head).unwrap(), 5);
        assert_eq!(at(GenRef::Number(2)).unwrap(), 2);
        assert_eq!(
            at(GenRef::Number(4)).unwrap(),
            3,
            "a fence is the commit before it"
        );
        assert!(matches!(
            ws.resolve(&GenRef::Number(6)),
            Err(ResolveError::NoGeneration { head: 5, .. })
        ));
        assert_eq!(at(GenRef::Time(25_000)).unwrap(), 2);
        assert_eq!(at(GenRef::Time(30_000)).unwrap(), 3);
        assert_eq!(at(GenRef::Time(36_000)).unwrap(), 3);
        assert_eq!(at(GenRef::Time(99_000)).unwrap(), 5);
        assert!(matches!(
            ws.resolve(&GenRef::Time(9_999)),
            Err(ResolveError::NoCommit { at: Some(_), .. })
        ));
        clock.set_unix_ms(45_000);
        assert_eq!(at(GenRef::Ago(Duration::from_secs(20))).unwrap(), 2);
        let g2 = ws.read_generation(2).unwrap();
        ws.create_snapshot("two", &g2, None).unwrap();
        assert_eq!(at(GenRef::Snapshot("two".into())).unwrap(), 2);
        assert!(matches!(
            ws.resolve(&GenRef::Snapshot("nope".into())),
            Err(ResolveError::Snapshot(SnapshotError::Missing { .. }))
        ));
    }
}

//! Which workspace a mount attaches, said out loud. A mount without `--workspace` takes the
//! name of its mountpoint, so two different directories with one base name would attach one
//! workspace without a word; the rule here refuses that. And every mount says, in one line,
//! whether it created its workspace or attached an existing one, and at which generation.

use std::path::Path;

use anyhow::bail;
use owsfs_store::generation::{GenerationRecord, Workspace};
use owsfs_store::lease::{Holder, Lease, LeaseRecord};

/// What the store said about a workspace before this mount touched its lease.
pub struct Before {
    /// The workspace's marker was made by this mount.
    pub created: bool,
    /// The newest lease record of a mount: who mounted the workspace last, and where (a
    /// command that held the lease since, `rollback` or `copy`, names no mountpoint).
    pub last: Option<LeaseRecord>,
    /// The newest commit.
    pub head: Option<GenerationRecord>,
    /// Who wrote the newest commit (when the lease records still say).
    pub writer: Option<Holder>,
}

impl Before {
    /// Reads the newest lease record and the newest commit of `ws` (none of either for a
    /// workspace this mount created). Best effort: what cannot be read is left out, and the
    /// lease phase that follows reports a damaged or unreachable lease, naming the way out
    /// (`--steal --force` takes the lease over a damaged record).
    pub fn read(ws: &Workspace, created: bool) -> Before {
        Self::try_read(ws, created).unwrap_or_else(|e| {
            // The lease phase reports the damage; the default-name rule cannot be checked.
            tracing::warn!(
                "workspace {:?}: cannot read its lease and newest generation ({e:#}): the \
                 mountpoint it was last mounted at is not checked",
                ws.name()
            );
            Before {
                created,
                last: None,
                head: None,
                writer: None,
            }
        })
    }

    fn try_read(ws: &Workspace, created: bool) -> anyhow::Result<Before> {
        if created {
            return Ok(Before {
                created,
                last: None,
                head: None,
                writer: None,
            });
        }
        let lease = Lease::new(ws);
        let newest = lease.current()?;
        let head = match ws.head()? {
            Some(h) => ws.newest_commit(h)?,
            None => None,
        };
        let writer = match (&newest, &head) {
            (Some(l), Some(g)) => lease.holder_at(l, g.epoch),
            _ => None,
        };
        let last = newest.and_then(|n| lease.last_mount(&n));
        Ok(Before {
            created,
            last,
            head,
            writer,
        })
    }
}

/// How the mount came by its workspace's name and its cache.
pub struct Naming<'a> {
    /// `--workspace` was given.
    pub explicit_name: bool,
    /// `--cache` was given (or the mount helper's source).
    pub explicit_cache: bool,
    /// The workspace the cache holds already (its `state.db`), if any.
    pub cache_holds: Option<&'a str>,
}

/// Refuses a mount that took its workspace's name from its mountpoint when that workspace
/// was last mounted at another path: that is two directories that share a base name, not
/// one workspace moving. Exempt: a name given with `--workspace`, and a cache named with
/// `--cache` that holds the workspace already (its own mount again, wherever it is).
pub fn check_default_name(
    ws: &Workspace,
    store_url: &str,
    mountpoint: &Path,
    naming: &Naming<'_>,
    before: &Before,
) -> anyhow::Result<()> {
    if naming.explicit_name || (naming.explicit_cache && naming.cache_holds == Some(ws.name())) {
        return Ok(());
    }
    let Some(last) = &before.last else {
        return Ok(());
    };
    let here = mountpoint.to_string_lossy();
    if last.holder.mountpoint.is_empty() || last.holder.mountpoint == here {
        return Ok(());
    }
    let name = ws.name();
    bail!(
        "workspace {name:?} in {store_url} was last mounted at {} (host {}), and this mount at \
         {here} took the same name from its mountpoint: pass --workspace {name} to attach it on \
         purpose, or --workspace NEW_NAME for a new one",
        last.holder.mountpoint,
        last.holder.host
    );
}

/// The one line a mount says about its workspace: "created workspace W in STORE", or
/// "attached workspace W at generation N (written by node X on host H at TIME)".
pub fn announce(ws: &Workspace, store_url: &str, before: &Before) -> String {
    let name = ws.name();
    if before.created {
        return format!("created workspace {name:?} in {store_url}");
    }
    let Some(g) = &before.head else {
        return format!("attached workspace {name:?} in {store_url} (no generation yet)");
    };
    let time = time_of(g.time_unix_ms);
    // Each acquisition of the lease has an epoch of its own: the lease record of the
    // generation's epoch names its writer.
    let by = match &before.writer {
        Some(h) => format!("node {} on host {}", h.node, h.host),
        None => format!("the holder of lease epoch {}", g.epoch),
    };
    format!(
        "attached workspace {name:?} in {store_url} at generation {} (written by {by} at {time})",
        g.number
    )
}

/// A store time as RFC 3339 to the second (UTC), or the raw milliseconds if out of range.
fn time_of(unix_ms: u64) -> String {
    i64::try_from(unix_ms)
        .ok()
        .and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok())
        .map(|t| t.round(jiff::Unit::Second).unwrap_or(t).to_string())
        .unwrap_or_else(|| format!("{unix_ms} ms after the epoch"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use owsfs_store::lease::LeaseState;

    fn record(mountpoint: &str, epoch: u64) -> LeaseRecord {
        LeaseRecord {
            workspace: "data".into(),
            seq: 3,
            epoch,
            state: LeaseState::Released,
            holder: Holder {
                node: "n1".into(),
                host: "h1".into(),
                pid: 7,
                session: "s".into(),
                cache: String::new(),
                mountpoint: mountpoint.into(),
            },
            ttl_ms: 30_000,
            time_unix_ms: 0,
        }
    }

    fn ws() -> (tempfile::TempDir, Workspace) {
        let dir = tempfile::tempdir().unwrap();
        let store = owsfs_store::Store::open(
            &format!("file://{}", dir.path().display()),
            Default::default(),
        )
        .unwrap();
        let ws = Workspace::open_or_create(&store, "data").unwrap();
        (dir, ws)
    }

    #[test]
    fn a_default_name_from_another_path_is_refused_unless_named_or_its_cache() {
        let (_d, ws) = ws();
        let before = Before {
            created: false,
            last: Some(record("/tmp/a/data", 2)),
            head: None,
            writer: None,
        };
        let naming = |explicit_name, explicit_cache, cache_holds| Naming {
            explicit_name,
            explicit_cache,
            cache_holds,
        };
        let mp = Path::new("/srv/b/data");
        let e = check_default_name(&ws, "S", mp, &naming(false, false, None), &before)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/tmp/a/data") && e.contains("/srv/b/data"),
            "{e}"
        );
        assert!(e.contains("--workspace data"), "{e}");
        // The default cache (named after the mountpoint's base name) does not exempt it.
        assert!(
            check_default_name(&ws, "S", mp, &naming(false, false, Some("data")), &before).is_err()
        );
        // Named on purpose, or its own cache named again: attached.
        check_default_name(&ws, "S", mp, &naming(true, false, None), &before).unwrap();
        check_default_name(&ws, "S", mp, &naming(false, true, Some("data")), &before).unwrap();
        // A named cache of another workspace is no exemption.
        assert!(
            check_default_name(&ws, "S", mp, &naming(false, true, Some("other")), &before).is_err()
        );
        // The same path (on any host), an older record without a path, or no mount yet.
        check_default_name(
            &ws,
            "S",
            Path::new("/tmp/a/data"),
            &naming(false, false, None),
            &before,
        )
        .unwrap();
        let old = Before {
            created: false,
            last: Some(record("", 2)),
            head: None,
            writer: None,
        };
        check_default_name(&ws, "S", mp, &naming(false, false, None), &old).unwrap();
        let never = Before {
            created: false,
            last: None,
            head: None,
            writer: None,
        };
        check_default_name(&ws, "S", mp, &naming(false, false, None), &never).unwrap();
    }

    #[test]
    fn the_announcement_names_what_happened() {
        let (_d, ws) = ws();
        let created = Before {
            created: true,
            last: None,
            head: None,
            writer: None,
        };
        assert_eq!(
            announce(&ws, "S", &created),
            "created workspace \"data\" in S"
        );
        let before = Before {
            created: false,
            last: Some(record("/x", 4)),
            head: None,
            writer: None,
        };
        assert_eq!(
            announce(&ws, "S", &before),
            "attached workspace \"data\" in S (no generation yet)"
        );
        assert_eq!(time_of(1_700_000_000_123), "2023-11-14T22:13:20Z");
    }
}

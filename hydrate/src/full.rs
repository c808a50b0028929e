//! A new cache restored in full before the mount serves it: what a system without file
//! handles does instead of lazy hydration (macOS), or any system asked to
//! (`OWSFS_RESTORE_IN_FULL=1`).
//!
//! Crash safety: `CACHE/restore.pending` is made durable before the first byte is restored
//! into the backing directory, and removed only after the restored tree is flushed and the new
//! base (with every node) is committed to `state.db`. A prepare that finds the marker
//! ([`recover`]) empties the backing directory when no base was committed, so the restore
//! starts again; a cache never holds a half-restored tree that its state calls whole.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use owsfs_local::{Base, LocalState};
use owsfs_store::generation::Workspace;

/// Set to `1` (or `true`, `yes`, `on`) to make every mount restore in full, as systems
/// without file handles do.
pub const RESTORE_IN_FULL_ENV: &str = "OWSFS_RESTORE_IN_FULL";

/// Whether a new cache gets the whole generation before the mount serves it, not a lazy copy:
/// where the system has no file handles, or when `OWSFS_RESTORE_IN_FULL` asks.
pub fn restores_in_full() -> bool {
    !owsfs_sys::handle::SUPPORTED || asked(std::env::var(RESTORE_IN_FULL_ENV).ok().as_deref())
}

/// Whether the variable's value asks for it.
fn asked(value: Option<&str>) -> bool {
    value.is_some_and(|v| matches!(v.trim(), "1" | "true" | "yes" | "on"))
}

/// The marker of a full restore in progress, beside the backing directory.
fn marker(backing: &Path) -> PathBuf {
    backing.with_file_name("restore.pending")
}

/// Finishes what a full restore interrupted by a crash left: without a committed base, the
/// backing directory's partial tree goes (the restore runs again); with one, only the marker.
pub fn recover(local: &LocalState, backing: &Path) -> anyhow::Result<()> {
    let pending = marker(backing);
    if !pending.exists() {
        return Ok(());
    }
    if local.base()?.is_none() {
        tracing::info!(
            "an interrupted full restore left {}: removing its partial tree",
            backing.display()
        );
        empty_dir(backing)?;
    }
    fs::remove_file(&pending).with_context(|| format!("remove {}", pending.display()))
}

/// Restores generation `record` (tree `root`) in full into the empty `backing`, flushes it,
/// then records the new base with every node, in one transaction.
pub fn restore(
    ws: &Workspace,
    local: &mut LocalState,
    backing: &Path,
    record: &owsfs_store::GenerationRecord,
    root: owsfs_store::BlobRef,
    warm: bool,
) -> anyhow::Result<()> {
    let h = record.number;
    if warm {
        bail!(
            "the cache {} holds an older generation, and fetching only what changed needs file \
             handles, which this system lacks: mount on a new --cache",
            backing.display()
        );
    }
    let started = std::time::Instant::now();
    let pending = marker(backing);
    durable_create(&pending)?;
    let progress = owsfs_local::progress::Silent;
    let update = owsfs_local::restore::restore(ws.store(), ws.store(), &root, backing, &progress)
        .with_context(|| {
        format!("cannot restore generation {h} of workspace {:?}", ws.name())
    })?;
    // Every restored byte durable before the state says the tree is whole.
    let dir = fs::File::open(backing).with_context(|| format!("open {}", backing.display()))?;
    owsfs_sys::fs::syncfs(&dir).with_context(|| format!("flush {}", backing.display()))?;
    // Crash window: the tree is restored and flushed, the base not recorded (`recover`
    // empties the backing directory, and the restore runs again).
    fail::fail_point!("full-restore-before-commit");
    let base = Base {
        generation: h,
        epoch: record.epoch,
        root: serde_json::to_string(&root)?,
    };
    local.commit(&base, update)?;
    // Crash window: the base is committed, the marker still there (`recover` removes it).
    fail::fail_point!("full-restore-after-commit");
    fs::remove_file(&pending).with_context(|| format!("remove {}", pending.display()))?;
    tracing::info!(
        "generation {h} of workspace {:?} restored in full ({} files, {} bytes, {:.1}s)",
        ws.name(),
        record.stats.files,
        record.stats.bytes_total,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Creates `path` and makes it and its name durable.
fn durable_create(path: &Path) -> anyhow::Result<()> {
    let f = fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    f.sync_all()
        .with_context(|| format!("flush {}", path.display()))?;
    if let Some(parent) = path.parent() {
        fs::File::open(parent)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("flush {}", parent.display()))?;
    }
    Ok(())
}

/// Removes everything in `dir`, also what a restore left without write permission (a
/// directory of mode 0555 cannot lose its entries until its owner gives itself write back).
fn empty_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let entries = fs::read_dir(dir).with_context(|| format!("list {}", dir.display()))?;
    for e in entries {
        let e = e?;
        let p = e.path();
        let ft = e.file_type()?;
        if ft.is_dir() {
            fs::set_permissions(&p, fs::Permissions::from_mode(0o700))
                .with_context(|| format!("chmod {}", p.display()))?;
            empty_dir(&p)?;
            fs::remove_dir(&p).with_context(|| format!("remove {}", p.display()))?;
        } else {
            fs::remove_file(&p).with_context(|| format!("remove {}", p.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn emptying_removes_read_only_directories_too() {
        let d = tempfile::tempdir().unwrap();
        let sub = d.path().join("a/b");
        fs::create_dir_all(&sub).unwrap();
        fs::write(sub.join("f"), b"x").unwrap();
        std::os::unix::fs::symlink("/nonexistent", d.path().join("l")).unwrap();
        fs::set_permissions(&sub, fs::Permissions::from_mode(0o555)).unwrap();
        fs::set_permissions(d.path().join("a"), fs::Permissions::from_mode(0o555)).unwrap();
        empty_dir(d.path()).unwrap();
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 0);
    }

    #[test]
    fn the_environment_asks_only_with_a_true_value() {
        assert!(asked(Some("1")) && asked(Some("true")) && asked(Some(" yes ")));
        assert!(!asked(Some("0")) && !asked(Some("")) && !asked(Some("no")) && !asked(None));
    }
}

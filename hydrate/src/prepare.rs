//! Before mounting: match the cache with the workspace in the store, making a new (or stale,
//! clean) cache a lazy copy of the newest generation (`src/hydrate/`).

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use owsfs_journal::Journal;
use owsfs_store::generation::Workspace;

use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;

use owsfs_store::{Content, NodeKind, TreeEntry};

use owsfs_local::{Base, Cache, LocalState, Totals};
use owsfs_store::generation::SqliteState as SqlitePosition;

/// Checks that the cache belongs to this workspace and store, and brings its base up to the
/// store's newest generation when that is safe. Returns the SQLite positions of the base
/// generation (carried into the next one for databases it does not touch), and the newest
/// generation, which the next commit follows.
pub fn prepare_base(
    ws: &Workspace,
    local: &mut LocalState,
    cache: &Cache,
    journal: &Journal,
    store_url: &str,
    head: u64,
) -> anyhow::Result<(Vec<SqlitePosition>, u64)> {
    if let Some(w) = local.meta("workspace")?
        && w != ws.name()
    {
        bail!(
            "the cache {} holds workspace {w:?}, not {:?}: use --workspace {w}, or another --cache",
            cache.root.display(),
            ws.name()
        );
    }
    if let Some(s) = local.meta("store")?
        && s != store_url
    {
        bail!(
            "the cache {} belongs to the store {s}, not {store_url}: use --store {s}, or another --cache",
            cache.root.display()
        );
    }
    crate::full::recover(local, &cache.backing)?;
    // The newest commit (fences carry no tree). Read after this mount's own fence, so no
    // other node can commit after it.
    let newest = ws
        .newest_commit(head)
        .context("cannot find the newest generation")?;
    let newest_n = newest.as_ref().map(|r| r.number);
    let base = local.base()?;
    let restore_head = match (&base, newest_n) {
        (None, None) => None,
        (None, Some(h))
            if newest
                .as_ref()
                .is_some_and(|r| own_commit(local, ws, r).unwrap_or(false)) =>
        {
            // This cache's first commit landed, and it died before recording it: its journal
            // covers everything it ever held, so it goes on from there.
            tracing::info!(
                "generation {h}, this cache's first commit, landed just before it stopped; \
                 continuing"
            );
            None
        }
        // `check_adopted` found the adopted directory holding generation h.
        (None, Some(_)) if cache.adopted().is_some() => None,
        (None, Some(h)) => {
            if dir_has_entries(&cache.backing)? {
                bail!(
                    "workspace {:?} exists in {store_url} (generation {h}), but the cache {} \
                     already holds other files: mount on a new --cache to restore it",
                    ws.name(),
                    cache.root.display()
                );
            }
            Some(false)
        }
        (Some(b), None) => bail!(
            "the cache {} holds generation {} of workspace {:?}, but {store_url} has no \
             generation of it: wrong --store?",
            cache.root.display(),
            b.generation,
            ws.name()
        ),
        (Some(b), Some(h)) if h == b.generation => {
            let record = ws.read_generation(h)?;
            let root = record.root.map(|r| serde_json::to_string(&r)).transpose()?;
            if root.as_deref() != Some(b.root.as_str()) {
                bail!(
                    "the cache {} and {store_url} disagree on generation {h} of workspace {:?} \
                     (different root trees): mount on a new --cache",
                    cache.root.display(),
                    ws.name()
                );
            }
            None
        }
        (Some(b), Some(h))
            if h > b.generation
                && newest
                    .as_ref()
                    .is_some_and(|r| own_commit(local, ws, r).unwrap_or(false)) =>
        {
            // This cache committed generation h and died before recording it: its journal
            // still covers everything since its base, so it goes on from there.
            tracing::info!(
                "generation {h} was committed by this cache just before it stopped; continuing"
            );
            None
        }
        (Some(b), Some(h)) if h > b.generation => {
            if journal.is_dirty() {
                bail!(
                    "the cache {} has changes not in the store, and the store has newer \
                     generations ({} → {h}) written elsewhere; refusing to mix them. Mount on a \
                     new --cache to get generation {h}",
                    cache.root.display(),
                    b.generation
                );
            }
            tracing::info!(
                "the store has generation {h}, the cache {}: fetching what changed",
                b.generation
            );
            Some(true)
        }
        (Some(b), Some(h)) => bail!(
            "the cache {} holds generation {} of workspace {:?}, newer than the store's newest \
             ({h}): wrong --store, or the store lost data",
            cache.root.display(),
            b.generation,
            ws.name()
        ),
    };
    local.set_meta("workspace", ws.name())?;
    local.set_meta("store", store_url)?;
    // Whatever interrupted work left (the old tree of a live rollback included), whether or
    // not the cache is restored now.
    remove_leftovers(&cache.root)?;
    let Some(record) = newest else {
        return Ok((Vec::new(), head));
    };
    let sqlite: Vec<SqlitePosition> = record.sqlite.clone();
    let Some(warm) = restore_head else {
        return Ok((sqlite, head));
    };
    copy_of(ws, local, &cache.backing, &record, warm)?;
    Ok((sqlite, head))
}

/// A read-only mount's cache: a lazy copy of `record`, any generation of `ws`. A cache with
/// changes that are not in the store (a writer's) is refused; one that holds another
/// generation keeps what did not change (warm).
pub fn prepare_read_only(
    ws: &Workspace,
    local: &mut LocalState,
    cache: &Cache,
    journal: &Journal,
    store_url: &str,
    record: &owsfs_store::GenerationRecord,
) -> anyhow::Result<Vec<SqlitePosition>> {
    for (key, want) in [("workspace", ws.name()), ("store", store_url)] {
        if let Some(have) = local.meta(key)?
            && have != want
        {
            bail!(
                "the cache {} holds {key} {have:?}, not {want:?}: use another --cache",
                cache.root.display()
            );
        }
    }
    if journal.is_dirty() {
        bail!(
            "the cache {} has changes that are not in the store (a writer's cache): a read-only \
             mount needs a cache of its own (--cache DIR)",
            cache.root.display()
        );
    }
    let root = record.root.map(|r| serde_json::to_string(&r)).transpose()?;
    crate::full::recover(local, &cache.backing)?;
    let base = local.base()?;
    remove_leftovers(&cache.root)?;
    match &base {
        Some(b) if b.generation == record.number && Some(b.root.as_str()) == root.as_deref() => {}
        None if dir_has_entries(&cache.backing)? => bail!(
            "the cache {} already holds files: mount on a new --cache",
            cache.root.display()
        ),
        _ => copy_of(ws, local, &cache.backing, record, base.is_some())?,
    }
    local.set_meta("workspace", ws.name())?;
    local.set_meta("store", store_url)?;
    Ok(record.sqlite.clone())
}

/// The root tree of generation `record` (a fence has none).
fn tree_of(
    ws: &Workspace,
    record: &owsfs_store::GenerationRecord,
) -> anyhow::Result<owsfs_store::BlobRef> {
    match record.root {
        Some(root) => Ok(root),
        None => bail!(
            "generation {} of workspace {:?} has no tree",
            record.number,
            ws.name()
        ),
    }
}

/// Makes the cache a copy of generation `record`: lazy, or in full (`restores_in_full`).
fn copy_of(
    ws: &Workspace,
    local: &mut LocalState,
    backing: &Path,
    record: &owsfs_store::GenerationRecord,
    warm: bool,
) -> anyhow::Result<()> {
    if crate::full::restores_in_full() {
        let root = tree_of(ws, record)?;
        crate::full::restore(ws, local, backing, record, root, warm)
    } else {
        lazy_restore(ws, local, backing, record, warm)
    }
}

/// Makes the cache a lazy copy of generation `record`. Lazy: only the root's tree is fetched
/// (when the hydrator materializes the root); every other directory and every byte follows on
/// demand. Warm: what the cache holds of its older generation stays, and is kept where it did
/// not change.
fn lazy_restore(
    ws: &Workspace,
    local: &mut LocalState,
    backing: &Path,
    record: &owsfs_store::GenerationRecord,
    warm: bool,
) -> anyhow::Result<()> {
    let h = record.number;
    let root = tree_of(ws, record)?;
    let started = std::time::Instant::now();
    let root_dir =
        fs::File::open(backing).with_context(|| format!("open {}", backing.display()))?;
    let root_handle =
        owsfs_local::handle::of(root_dir.as_fd(), Path::new("")).with_context(|| {
            format!(
                "cannot take a file handle of {} (lazy hydration needs a filesystem with \
                 file handles, and root)",
                backing.display()
            )
        })?;
    let root_ino = root_dir.metadata()?.ino();
    let root_entry = TreeEntry {
        name: b"n".to_vec(),
        kind: NodeKind::Dir,
        mode: 0o755,
        uid: 0,
        gid: 0,
        mtime_sec: 0,
        mtime_nsec: 0,
        size: 0,
        rdev: 0,
        link_key: 0,
        xattrs: Vec::new(),
        content: Content::Dir(root),
    };
    local.lazy_restore(
        &Base {
            generation: h,
            epoch: record.epoch,
            root: serde_json::to_string(&root)?,
        },
        (
            root_ino,
            &root_handle,
            &owsfs_local::encode_node(&root_entry)?,
        ),
        Totals {
            files: record.stats.files,
            dirs: record.stats.dirs,
            bytes: record.stats.bytes_total,
        },
        warm,
    )?;
    // Crash window: the new base is recorded, the root not materialized yet.
    fail::fail_point!("lazy-restore-after-commit");
    tracing::info!(
        "generation {h} of workspace {:?} will be fetched on demand ({} files, {} bytes; \
         prepared in {:.3}s)",
        ws.name(),
        record.stats.files,
        record.stats.bytes_total,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// What interrupted work left in the cache directory (a restore, a set-aside backing, the
/// old trees of live rollbacks): removed before the cache is prepared.
fn remove_leftovers(cache_root: &Path) -> anyhow::Result<()> {
    for leftover in ["restore.tmp", "backing.old", TRASH] {
        let p = cache_root.join(leftover);
        if p.exists() {
            fs::remove_dir_all(&p).with_context(|| format!("remove {}", p.display()))?;
        }
    }
    Ok(())
}

/// Where a live rollback puts the old tree (`CACHE/rollback.trash/N`).
pub const TRASH: &str = "rollback.trash";

/// A live rollback's rebase, first step: the cache's state (`state.db`), whose journal is
/// clean and which holds generation `record`'s parent, becomes that of a lazy copy of
/// `record` below the same backing root (whose inode, and so the mount's root, stays): the
/// root pending, nothing else known. One transaction: on error nothing changed. From its
/// commit on, the next mount of the cache materializes the root afresh, removing whatever
/// the old tree left in it.
pub fn rebase_state(
    ws: &Workspace,
    local: &mut LocalState,
    backing: &Path,
    record: &owsfs_store::GenerationRecord,
) -> anyhow::Result<()> {
    if crate::full::restores_in_full() {
        bail!(
            "a live rollback needs lazy hydration, which this system cannot do (no file \
             handles): unmount, then roll back"
        );
    }
    lazy_restore(ws, local, backing, record, false)
}

/// A live rollback's rebase, second step: every entry of the backing root moves into
/// `CACHE/rollback.trash/N` (N: the new generation), so nothing of the old tree is reachable
/// from the root; open files keep their inodes there. Returns that directory, for
/// [`remove_trash`] once the new tree serves.
pub fn move_aside(cache_root: &Path, backing: &Path, generation: u64) -> anyhow::Result<PathBuf> {
    let trash = cache_root.join(TRASH).join(generation.to_string());
    fs::create_dir_all(&trash).with_context(|| format!("create {}", trash.display()))?;
    let root = fs::File::open(backing).with_context(|| format!("open {}", backing.display()))?;
    let into = fs::File::open(&trash).with_context(|| format!("open {}", trash.display()))?;
    for entry in fs::read_dir(backing).with_context(|| format!("list {}", backing.display()))? {
        let name = entry?.file_name();
        match rustix::fs::renameat(&root, name.as_os_str(), into.as_fd(), name.as_os_str()) {
            Ok(()) => {}
            // The backing directory is a file system of its own: removed in place (slower).
            Err(rustix::io::Errno::XDEV) => {
                let path = backing.join(&name);
                let r = if path.symlink_metadata()?.is_dir() {
                    fs::remove_dir_all(&path)
                } else {
                    fs::remove_file(&path)
                };
                r.with_context(|| format!("remove {}", path.display()))?;
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("move {} aside", backing.join(&name).display()));
            }
        }
    }
    Ok(trash)
}

/// Removes the old tree a live rollback set aside (in the background: it can be large).
pub fn remove_trash(trash: PathBuf) {
    let spawned = std::thread::Builder::new()
        .name("owsfs-trash".into())
        .spawn(move || {
            if let Err(e) = fs::remove_dir_all(&trash) {
                tracing::warn!("cannot remove {}: {e}", trash.display());
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot start the thread that removes the old tree: {e}");
    }
}

/// An adopted directory (`owsfs mount DIR --adopt`, reached by `backing`) of a workspace that
/// has commits: unless this cache's base is the newest commit (or this cache made it), DIR
/// must hold exactly the newest commit's tree, and the cache then forgets its base (its
/// journal was rescanned: the next cut reads DIR whole). Anything else is refused, naming the
/// first difference: an adopted directory is never overwritten or merged.
pub fn check_adopted(
    ws: &Workspace,
    local: &mut LocalState,
    dir: &Path,
    backing: &Path,
    cache_root: &Path,
    head: u64,
) -> anyhow::Result<()> {
    let Some(newest) = ws.newest_commit(head)? else {
        return Ok(());
    };
    let holds = local.meta("workspace")?;
    if holds.as_deref().is_some_and(|w| w != ws.name()) {
        // Refused by `prepare_base`, which names both.
        return Ok(());
    }
    let base = local.base()?;
    if base.as_ref().is_some_and(|b| b.generation == newest.number)
        || own_commit(local, ws, &newest)?
    {
        return Ok(());
    }
    if let Err(e) = owsfs_local::drill::check_tree(ws.store(), &newest, backing) {
        let keep = match &base {
            Some(b) => format!(
                " This cache last held generation {}; changes it never committed can be kept \
                 with `owsfs recover --cache {} --as NEW_NAME`.",
                b.generation,
                cache_root.display()
            ),
            None => String::new(),
        };
        bail!(
            "workspace {:?} exists in the store (generation {}), and {} does not hold exactly \
             that generation ({e:#}); an existing workspace is adopted only by a directory that \
             does. To get the workspace, mount it without --adopt on an empty directory (with \
             another --cache); to keep these files as a new workspace, adopt them with \
             --workspace NEW_NAME.{keep}",
            ws.name(),
            newest.number,
            dir.display()
        );
    }
    tracing::info!(
        "{} holds generation {} of workspace {:?}: adopted as it is",
        dir.display(),
        newest.number,
        ws.name()
    );
    local.forget_base()?;
    Ok(())
}

/// Whether the cache's unsynced changes must be set aside before mounting: the store has a
/// newer commit than the cache's base, written by another node (a takeover), while the cache
/// still has changes that are not in the store. They are never merged. Returns why.
pub fn diverged(
    ws: &Workspace,
    local: &LocalState,
    journal_dirty: bool,
    head: u64,
) -> anyhow::Result<Option<String>> {
    let Some(base) = local.base()? else {
        return Ok(None);
    };
    if !journal_dirty || local.meta("workspace")?.as_deref() != Some(ws.name()) {
        return Ok(None);
    }
    let Some(newest) = ws.newest_commit(head)? else {
        return Ok(None);
    };
    if newest.number <= base.generation || own_commit(local, ws, &newest)? {
        return Ok(None);
    }
    Ok(Some(format!(
        "the cache has changes made after generation {} (epoch {}) that are not in the store, \
         and generation {} (epoch {}) was committed by another node since",
        base.generation, base.epoch, newest.number, newest.epoch
    )))
}

/// Whether the store's commit `r` came from this cache: noted as pending before it was
/// committed, or written under the lease epoch this cache last held (a commit whose answer was
/// lost). Either way the journal still covers it.
fn own_commit(
    local: &LocalState,
    ws: &Workspace,
    r: &owsfs_store::GenerationRecord,
) -> anyhow::Result<bool> {
    // A live rollback committed it and died before the cache became its copy: the cache
    // still holds the tree it replaced, which the journal does not turn into this one.
    if let Some(rb) = local.meta("rollback")?
        && let Some(root) = r.root
        && rb == format!("{} {}", r.number, serde_json::to_string(&root)?)
    {
        return Ok(false);
    }
    if local
        .meta("lease_epoch")?
        .and_then(|e| e.parse::<u64>().ok())
        == Some(r.epoch)
    {
        return Ok(true);
    }
    own_pending(local, ws, r.number)
}

/// The store's generation `h` is the one this cache noted as pending before committing it.
fn own_pending(local: &LocalState, ws: &Workspace, h: u64) -> anyhow::Result<bool> {
    let Some(p) = local.meta("pending")? else {
        return Ok(false);
    };
    let Some((n, root)) = p.split_once(' ') else {
        return Ok(false);
    };
    if n.parse::<u64>().ok() != Some(h) {
        return Ok(false);
    }
    let record = ws.read_generation(h)?;
    Ok(record
        .root
        .map(|r| serde_json::to_string(&r))
        .transpose()?
        .as_deref()
        == Some(root))
}

fn dir_has_entries(dir: &Path) -> anyhow::Result<bool> {
    Ok(fs::read_dir(dir)
        .with_context(|| format!("list {}", dir.display()))?
        .next()
        .is_some())
}

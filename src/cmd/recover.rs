//! `owsfs recover --cache DIR --as NEW`: the unsynced changes of a cache (after a crash, a
//! fail-stop, or set aside at mount) become a new workspace, a fork of the cache's last
//! generation plus those changes. Nothing is merged into the original workspace.
//!
//! No mount is needed: the mount's phases without the FUSE session. The journal is replayed,
//! and the same cut the sync agent makes is taken from the backing directory, under a lease of
//! the new workspace. The unchanged data is referenced in the store, not copied, so the fork
//! must live in the cache's store. Afterwards the cache belongs to the new workspace and can
//! be mounted as it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use owsfs_fuse::CoreOptions;
use owsfs_hydrate::prefetch::PrefetchOptions;
use owsfs_local::{Cache, LocalState};
use owsfs_store::BlobRef;
use owsfs_store::generation::{GenKind, GenStats, GenerationRecord, Workspace};
use owsfs_sync::SyncOptions;
use owsfs_sync::lease::Takeover;

use crate::mount::lease::{LeaseGuard, LeaseRequest};
use crate::mount::{OpenCache, Prepared, ServiceOptions, Services};

#[derive(Args, Debug)]
pub struct RecoverArgs {
    /// The cache (or a directory set aside in CACHE/aside/) holding the unsynced changes. No
    /// daemon may be running on it.
    #[arg(long)]
    pub cache: PathBuf,
    /// The name of the new workspace (the fork). It must not exist yet.
    #[arg(long = "as", value_name = "NEW_NAME")]
    pub as_name: String,
    /// The store [default: the one the cache belongs to]. It must be that store: the cache's
    /// unchanged data is referenced there, not copied.
    #[arg(long, env = "OWSFS_STORE")]
    pub store: Option<String>,
}

pub fn run(args: &RecoverArgs) -> anyhow::Result<()> {
    let cache = Cache::open(&args.cache)?;
    for dest in &cache.finished_aside {
        eprintln!("owsfs: {}", crate::mount::aside_notice(dest));
    }
    let cache_root = cache.root.clone();
    let adopted = cache.adopted().map(Path::to_path_buf);
    let state_path = cache.root.join("state.db");
    if !state_path.exists() {
        bail!(
            "{} has no cache state (state.db): it never held a workspace, nothing to recover",
            cache.root.display()
        );
    }
    let mut local = LocalState::open(&state_path)?;
    let (Some(old_ws), Some(cache_store), Some(base)) = (
        local.meta("workspace")?,
        local.meta("store")?,
        local.base()?,
    ) else {
        bail!(
            "{} holds no generation of any workspace: nothing to fork from",
            cache.root.display()
        );
    };
    let store_url = args.store.clone().unwrap_or_else(|| cache_store.clone());
    if store_url != cache_store {
        bail!(
            "the cache {} belongs to the store {cache_store}; a fork must be made there (its \
             unchanged data is referenced, not copied): use --store {cache_store}",
            cache.root.display()
        );
    }
    let name = &args.as_name;
    if name == &old_ws {
        bail!(
            "--as must name a new workspace, not {old_ws:?}: unsynced changes are never merged \
             into the workspace they came from"
        );
    }
    // The base's generation must still be in the store (a GC that pruned it may have deleted
    // packs its unchanged files point into: then everything is uploaded again), and a pin
    // keeps it from GC while the recover runs.
    let (base_alive, _base_pin) = pin_base(&store_url, &old_ws, &base)?;
    // Phase 1: the journal.
    let open = OpenCache::from_cache(cache)?;
    let dirty = open.journal.dirty();
    eprintln!(
        "owsfs: {} holds generation {} of workspace {old_ws:?} and changes not in the store: \
         {} file(s), {} dir(s), {} bytes ({} journal records){}",
        open.cache.root.display(),
        base.generation,
        dirty.files.len(),
        dirty.dirs.len(),
        dirty.dirty_bytes(),
        open.recovery.records,
        if open.recovery.clean {
            ""
        } else {
            " left by a daemon that did not stop cleanly"
        }
    );

    // Phase 2: the new workspace, which must not exist yet. One that holds fences only was
    // begun by a recover that did not finish, and is taken on. One whose newest commit has
    // this cache's tree while nothing is unsynced was made by a recover of this cache that
    // stopped before the cache was handed to it (a crash): that recover is finished.
    let store = crate::mount::open_store(&store_url)?;
    let ws = Workspace::open_or_create(&store, name)
        .with_context(|| format!("cannot create workspace {name:?} in {store_url}"))?;
    // Only a workspace this cache's own recover began (it noted the name first) is taken on.
    let ours = local.meta("recovering_as")?.as_deref() == Some(name.as_str());
    let head = ws.head()?;
    let finishing = match head.map(|h| ws.newest_commit(h)).transpose()?.flatten() {
        None if head.is_none() || ours => false,
        Some(r) if ours && made_here(&open, &base, &r) => true,
        _ => bail!("workspace {name:?} already exists in {store_url}: choose another name"),
    };
    // Phase 3: its lease.
    let lease = LeaseGuard::take(LeaseRequest {
        ws: &ws,
        cache: &open.cache,
        ttl: Duration::from_secs(30),
        takeover: Takeover::Refuse,
        notice: &mut |m| eprintln!("owsfs: {m}"),
        note_stop: false,
        mountpoint: None,
    })?;
    if finishing {
        return finish_earlier_recover(&ws, lease, local, &open, &base, &cache_root);
    }
    // Noted before the new workspace gets anything: a rerun after a crash takes on only a
    // workspace this note names.
    local.set_meta("recovering_as", name)?;
    let head = ws.fence(lease.epoch())?;
    // Crash window: the new workspace holds a fence only.
    fail::fail_point!("recover-after-fence");
    // Checked again under the lease: a concurrent recover to the same name may have won.
    if ws.newest_commit(head)?.is_some() {
        bail!("workspace {name:?} was just created by someone else: choose another name");
    }
    let OpenCache {
        cache,
        journal,
        recovery,
    } = open;
    // The lease is given back whatever happens: the new workspace holds only a fence until
    // the commit lands, and nothing of the cache is served.
    let journal = Arc::new(journal);
    if !base_alive {
        eprintln!(
            "owsfs: generation {} of {old_ws:?} is no longer in the store (pruned): every file \
             of the cache is uploaded again",
            base.generation
        );
        local.forget_base()?;
    }
    let g = if base_alive && !journal.is_dirty() {
        fork_as_is(&ws, lease, local, &base, head, &journal)?
    } else {
        drop(local);
        fork_with_changes(&store, &ws, lease, cache, journal, recovery, head)?
    };
    println!("{g}");
    eprintln!(
        "owsfs: workspace {name:?} (generation {g}) holds generation {} of {old_ws:?} plus the \
         unsynced changes of {}; the cache now belongs to {name:?}: mount it with {}",
        base.generation,
        cache_root.display(),
        mount_hint(&cache_root, adopted.as_deref(), name)
    );
    Ok(())
}

/// Pins the cache's base generation in its old workspace and reads its record again under the
/// pin: whether it is still in the store with the cache's tree (else a GC pruned it, and its
/// packs may be gone), and the pin.
fn pin_base(
    store_url: &str,
    old_ws: &str,
    base: &owsfs_local::Base,
) -> anyhow::Result<(bool, Option<crate::mount::readonly::PinGuard>)> {
    let store = crate::mount::open_store(store_url)?;
    let same_root = |r: &GenerationRecord| -> anyhow::Result<bool> {
        Ok(r.root
            .map(|r| serde_json::to_string(&r))
            .transpose()?
            .as_deref()
            == Some(base.root.as_str()))
    };
    let Some(old) = Workspace::open_existing(&store, old_ws)? else {
        return Ok((false, None));
    };
    let r = match old.read_generation(base.generation) {
        Ok(r) if same_root(&r)? => r,
        Ok(_) => return Ok((false, None)),
        Err(e) if e.is_not_found() => return Ok((false, None)),
        Err(e) => return Err(e.into()),
    };
    let id = format!("recover-{:016x}", rand::random::<u64>());
    let pin = crate::mount::readonly::PinGuard::take(&old, &id, &r)?;
    match old.read_generation(base.generation) {
        Ok(again) if same_root(&again)? => Ok((true, Some(pin))),
        Ok(_) => Ok((false, None)),
        Err(e) if e.is_not_found() => Ok((false, None)),
        Err(e) => Err(e.into()),
    }
}

/// The cache holds nothing unsynced: the fork's first commit is the cache's generation as it
/// is (its tree is referenced, not copied).
fn fork_as_is(
    ws: &Workspace,
    lease: LeaseGuard,
    mut local: LocalState,
    base: &owsfs_local::Base,
    head: u64,
    journal: &owsfs_journal::Journal,
) -> anyhow::Result<u64> {
    let name = ws.name().to_string();
    // Nothing unsynced: the fork is the cache's generation as it is.
    let root: BlobRef =
        serde_json::from_str(&base.root).context("the cache state's base root is unreadable")?;
    let record = GenerationRecord {
        workspace: name.clone(),
        number: head + 1,
        parent: Some(head),
        epoch: lease.epoch(),
        kind: GenKind::Commit,
        time_unix_ms: jiff::Timestamp::now().as_millisecond() as u64,
        root: Some(root),
        sqlite: Vec::new(),
        stats: GenStats::default(),
        access: None,
    };
    lease.keeper().check(Duration::ZERO)?;
    ws.commit(&record)?;
    let mut b = base.clone();
    b.generation = head + 1;
    b.epoch = lease.epoch();
    local.commit(&b, Default::default())?;
    local.belong_to(&name, lease.epoch())?;
    drop(local);
    journal.close_clean()?;
    lease.hand_off(String::new).map_err(anyhow::Error::msg)?;
    Ok(head + 1)
}

/// One cut of the backing directory on this thread: the mount's phase 5 without a mount.
fn fork_with_changes(
    store: &Arc<owsfs_store::Store>,
    ws: &Workspace,
    lease: LeaseGuard,
    cache: Cache,
    journal: Arc<owsfs_journal::Journal>,
    recovery: owsfs_journal::Recovery,
    head: u64,
) -> anyhow::Result<u64> {
    let name = ws.name().to_string();
    let state_path = cache.root.join("state.db");
    let (services, _rest) = Services::start(
        store,
        ws,
        Some(&lease),
        Prepared {
            local: LocalState::open(&state_path)?,
            cache,
            journal: Arc::clone(&journal),
            recovery,
            head,
            previous_sqlite: Vec::new(),
        },
        ServiceOptions {
            sync: SyncOptions {
                commit_interval: Duration::from_secs(3600),
                max_lag: Duration::from_secs(3600),
                max_lag_bytes: u64::MAX,
            },
            core: CoreOptions {
                passthrough: false,
                inode_budget: 4096,
                side_dir: None,
                adopted: false,
                succession: None,
            },
            prefetch: PrefetchOptions {
                workers: 0,
                bandwidth: 0,
            },
            serving: false,
        },
    )?;
    let started = Instant::now();
    let epoch = lease.epoch();
    let g = services
        .agent
        .commit_now()
        .with_context(|| format!("cannot make workspace {name:?}"))?;
    // Crash window: the fork is committed, the cache still belongs to the old workspace.
    fail::fail_point!("recover-after-commit");
    eprintln!(
        "owsfs: generation {g} of {name:?} committed in {:.2}s",
        started.elapsed().as_secs_f64()
    );
    let (clean, handed) = crate::mount::handoff(services, lease, &journal, 0);
    if !clean {
        anyhow::bail!(
            "generation {g} of {name:?} is committed, but the cache's journal could not be closed: {}",
            handed.err().unwrap_or_default()
        );
    }
    if let Err(e) = handed {
        // The fork is made; only its lease is left to lapse (30 s).
        eprintln!("owsfs: warning: {e}");
    }
    // Only now does the cache belong to the fork (a failed recover leaves it as it was).
    LocalState::open(&state_path)?.belong_to(&name, epoch)?;
    Ok(g)
}

/// Whether commit `r` was made from this cache: it has the cache's tree and nothing is unsynced.
fn made_here(open: &OpenCache, base: &owsfs_local::Base, r: &GenerationRecord) -> bool {
    !open.journal.is_dirty()
        && r.root
            .and_then(|r| serde_json::to_string(&r).ok())
            .as_deref()
            == Some(&base.root)
}

/// The workspace was made from this cache by a recover that stopped before the cache was
/// handed to it: finish that one (the cache now belongs to the fork).
fn finish_earlier_recover(
    ws: &Workspace,
    lease: LeaseGuard,
    mut local: LocalState,
    open: &OpenCache,
    base: &owsfs_local::Base,
    cache_root: &std::path::Path,
) -> anyhow::Result<()> {
    let name = ws.name();
    let newest = ws
        .head()?
        .map(|h| ws.newest_commit(h))
        .transpose()?
        .flatten();
    let Some(r) = newest.filter(|r| made_here(open, base, r)) else {
        bail!("workspace {name:?} was just changed by someone else: choose another name");
    };
    local.commit(
        &owsfs_local::Base {
            generation: r.number,
            epoch: r.epoch,
            root: base.root.clone(),
        },
        Default::default(),
    )?;
    local.belong_to(name, lease.epoch())?;
    drop(local);
    open.journal.close_clean()?;
    lease.hand_off(String::new).map_err(anyhow::Error::msg)?;
    println!("{}", r.number);
    eprintln!(
        "owsfs: workspace {name:?} (generation {}) was made from {} by an earlier recover \
         that stopped before the end; the cache now belongs to {name:?}: mount it with {}",
        r.number,
        cache_root.display(),
        mount_hint(cache_root, open.cache.adopted(), name)
    );
    Ok(())
}

/// The command that mounts the recovered cache: at its adopted directory, if it has one.
fn mount_hint(cache_root: &Path, adopted: Option<&Path>, name: &str) -> String {
    match adopted {
        Some(dir) => format!(
            "`owsfs mount {} --adopt --cache {} --workspace {name}`",
            dir.display(),
            cache_root.display()
        ),
        None => format!(
            "`owsfs mount MOUNTPOINT --cache {} --workspace {name}`",
            cache_root.display()
        ),
    }
}

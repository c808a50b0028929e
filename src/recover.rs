//! `owsfs recover --cache DIR --as NEW`: the unsynced changes of a cache (after a crash, a
//! fail-stop, or set aside at mount) become a new workspace, a fork of the cache's last
//! generation plus those changes. Nothing is merged into the original workspace.
//!
//! No mount is needed: the journal is replayed, and the same cut the sync agent makes is
//! taken from the backing directory, under a lease of the new workspace. The unchanged data is
//! referenced in the store, not copied, so the fork must live in the cache's store. Afterwards
//! the cache belongs to the new workspace and can be mounted as it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use owsfs_fuse::{Core, CoreOptions};
use owsfs_journal::{Journal, JournalOptions};
use owsfs_store::BlobRef;
use owsfs_store::generation::{GenKind, GenStats, GenerationRecord, Workspace};

use owsfs_local::{Cache, LocalState};
use owsfs_sync::lease::{Keeper, Takeover};
use owsfs_sync::{SyncAgent, SyncOptions};

use crate::cli::RecoverArgs;

pub fn recover(args: &RecoverArgs) -> anyhow::Result<()> {
    let cache = Cache::open(&args.cache)?;
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
    let (journal, recovery) =
        Journal::open(&cache.journal, &cache.backing, JournalOptions::default())
            .with_context(|| format!("cannot open the journal in {}", cache.journal.display()))?;
    let dirty = journal.dirty();
    eprintln!(
        "owsfs: {} holds generation {} of workspace {old_ws:?} and changes not in the store: \
         {} file(s), {} dir(s), {} bytes ({} journal records){}",
        cache.root.display(),
        base.generation,
        dirty.files.len(),
        dirty.dirs.len(),
        dirty.dirty_bytes(),
        recovery.records,
        if recovery.clean {
            ""
        } else {
            " left by a daemon that did not stop cleanly"
        }
    );

    let store = Arc::new(
        owsfs_store::Store::open(
            &store_url,
            owsfs_store::StoreOptions {
                faults: owsfs_store::FaultConfig::from_env()?,
                ..owsfs_store::StoreOptions::default()
            },
        )
        .with_context(|| format!("cannot use the store {store_url}"))?,
    );
    let name = &args.as_name;
    if name == &old_ws {
        bail!(
            "--as must name a new workspace, not {old_ws:?}: unsynced changes are never merged \
             into the workspace they came from"
        );
    }
    let ws = Workspace::open_or_create(&store, name)
        .with_context(|| format!("cannot create workspace {name:?} in {store_url}"))?;
    if ws.head()?.is_some() {
        bail!("workspace {name:?} already exists in {store_url}: choose another name");
    }
    let holder = owsfs_sync::lease::holder(&cache)?;
    let (held, acquired_at) = owsfs_sync::lease::acquire(
        &ws,
        &holder,
        Duration::from_secs(30),
        Takeover::Refuse,
        &mut |m| eprintln!("owsfs: {m}"),
    )?;
    let core_slot: Arc<std::sync::OnceLock<Arc<Core>>> = Arc::default();
    let keeper = {
        let core_slot = Arc::clone(&core_slot);
        Keeper::new(
            &ws,
            held,
            acquired_at,
            Box::new(move |why| {
                if let Some(core) = core_slot.get() {
                    core.stop_writes(why);
                }
            }),
        )
    };
    let keeper_thread = {
        let k = Arc::clone(&keeper);
        std::thread::spawn(move || k.run())
    };
    let result = (|| -> anyhow::Result<u64> {
        let head = ws.fence(keeper.epoch())?;
        // Checked again under the lease: a concurrent recover to the same name may have won.
        if ws.newest_commit(head)?.is_some() {
            bail!("workspace {name:?} was just created by someone else: choose another name");
        }
        let journal = Arc::new(journal);
        if !journal.is_dirty() {
            // Nothing unsynced: the fork is the cache's generation as it is.
            let root: BlobRef = serde_json::from_str(&base.root)
                .context("the cache state's base root is unreadable")?;
            let record = GenerationRecord {
                workspace: name.clone(),
                number: head + 1,
                parent: Some(head),
                epoch: keeper.epoch(),
                kind: GenKind::Commit,
                time_unix_ms: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
                root: Some(root),
                sqlite: Vec::new(),
                stats: GenStats::default(),
                access: None,
            };
            keeper.check(Duration::ZERO)?;
            ws.commit(&record)?;
            let mut b = base.clone();
            b.generation = head + 1;
            b.epoch = keeper.epoch();
            local.commit(&b, Default::default())?;
            local.set_meta("workspace", name)?;
            journal.close_clean()?;
            return Ok(head + 1);
        }
        let core = Arc::new(
            Core::new(
                &cache.backing,
                Arc::clone(&journal),
                CoreOptions {
                    passthrough: false,
                    inode_budget: 4096,
                    side_dir: None,
                },
            )
            .map_err(|e| anyhow::anyhow!("cannot open the backing directory: {e}"))?,
        );
        let _ = core_slot.set(Arc::clone(&core));
        // A lazily restored cache: what the cut reads but is not local yet is fetched.
        let hyd = owsfs_hydrate::Hydrator::open(
            &state_path,
            &cache.backing,
            Arc::clone(&store),
            local.node_map(),
            &journal.dirty(),
        )?;
        let agent = SyncAgent::new(
            Arc::clone(&core),
            Arc::clone(&store),
            ws.clone(),
            local,
            SyncOptions {
                commit_interval: Duration::from_secs(3600),
                max_lag: Duration::from_secs(3600),
                max_lag_bytes: u64::MAX,
            },
            Vec::new(),
            head,
            Arc::clone(&keeper) as Arc<dyn owsfs_sync::LeaseCheck>,
            Arc::new(crate::daemon::Lazy(Arc::clone(&hyd))),
            Vec::new(),
        )?;
        let started = Instant::now();
        let g = agent.commit_now()?;
        eprintln!(
            "owsfs: generation {g} of {name:?} committed in {:.2}s",
            started.elapsed().as_secs_f64()
        );
        agent.stop();
        hyd.save()?;
        journal.close_clean()?;
        // Only now does the cache belong to the fork (a failed recover leaves it as it was).
        LocalState::open(&state_path)?.set_meta("workspace", name)?;
        Ok(g)
    })();
    keeper.stop();
    let _ = keeper_thread.join();
    if let Err(e) = keeper.release() {
        tracing::warn!("{e:#}");
    }
    let g = result.with_context(|| format!("cannot make workspace {name:?}"))?;
    println!("{g}");
    eprintln!(
        "owsfs: workspace {name:?} (generation {g}) holds generation {} of {old_ws:?} plus the \
         unsynced changes of {}; the cache now belongs to {name:?}: mount it with `owsfs mount \
         MOUNTPOINT --cache {} --workspace {name}`",
        base.generation,
        cache.root.display(),
        cache.root.display()
    );
    Ok(())
}

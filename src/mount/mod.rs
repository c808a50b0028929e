//! The life of a mount, as named phases. Each phase returns what it made, owned by guards
//! whose `Drop` undoes it, so an error anywhere unwinds what came before:
//!
//! 1. [`OpenCache::open`]: the cache (locked) and its journal (replayed);
//! 2. [`open_workspace`]: the store and the workspace in it;
//! 3. [`LeaseGuard::take`]: the writer lease and its keeper;
//! 4. [`prepare`]: the fence, unsynced changes of a diverged cache set aside, the cache
//!    matched with the store (a new cache becomes a lazy copy of the newest generation);
//! 5. [`Services::start`]: the hydrator, the filesystem core and the sync agent;
//! 6. [`Mounted::mount`]: the FUSE session; [`Services::run`] starts the background threads;
//! 7. serving, until the kernel ends the session;
//! 8. [`handoff`]: the last cut, then the lease is released (promise 3).
//!
//! `owsfs recover` uses phases 1, 3 and 5 without a mount.

pub mod adopt;
pub mod background;
pub mod daemon;
pub mod identity;
pub mod lease;
pub mod metrics;
mod mounted;
mod prepare;
pub mod readonly;
pub mod rollback;
pub mod server;
pub mod supervisor;
pub mod upkeep;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use owsfs_fuse::{Core, CoreOptions};
use owsfs_hydrate::Hydrator;
use owsfs_hydrate::prefetch::{PrefetchOptions, Prefetcher};
use owsfs_journal::{Journal, JournalOptions, Recovery};
use owsfs_local::{Cache, LocalState};
use owsfs_store::generation::Workspace;
use owsfs_store::{Store, StoreOptions};
use owsfs_sync::{SyncAgent, SyncOptions};

use self::background::Readiness;
use self::daemon::Daemon;
use self::lease::{LeaseGuard, LeaseRequest};
pub use self::mounted::Mounted;
pub use self::prepare::{Prepared, aside_notice, prepare};
use crate::args::MountOpts;
use crate::options::MountOptions;
use crate::{mountpoint, options};

/// How long a mount waits for a previous daemon of its cache that is finishing its last
/// commit.
pub const PREVIOUS_DAEMON_WAIT: std::time::Duration = std::time::Duration::from_secs(300);

/// Phase 1: a cache, locked for this process, and its journal, replayed.
pub struct OpenCache {
    pub cache: Cache,
    pub journal: Journal,
    pub recovery: Recovery,
}

impl OpenCache {
    pub fn open(dir: &Path) -> anyhow::Result<OpenCache> {
        Self::from_cache(Cache::open(dir)?)
    }

    /// As [`OpenCache::open`], waiting up to `wait` for a previous daemon of the cache that is
    /// finishing its last commit. `adopt`: the directory `--adopt` serves (the mountpoint); a
    /// cache that adopted a directory is mounted only that way.
    pub fn open_waiting(
        dir: &Path,
        wait: std::time::Duration,
        notice: &mut dyn FnMut(&str),
        adopt: Option<&Path>,
    ) -> anyhow::Result<OpenCache> {
        let mut cache = Cache::open_waiting(dir, wait, notice)?;
        match (adopt, cache.adopted()) {
            (Some(d), _) => cache.adopt(d)?,
            // An adoption refused before the cache held anything binds nothing.
            (None, Some(_)) if !cache.held_a_workspace()? => cache.unadopt()?,
            (None, Some(d)) => anyhow::bail!(
                "the cache {} adopted {}: mount it with `owsfs mount {} --adopt`",
                cache.root.display(),
                d.display(),
                d.display()
            ),
            (None, None) => {}
        }
        Self::from_cache(cache)
    }

    /// The workspace this cache holds already (from its `state.db`; none for a new cache).
    pub fn holds(&self) -> anyhow::Result<Option<String>> {
        let path = self.cache.root.join("state.db");
        if !path.exists() {
            return Ok(None);
        }
        LocalState::open(&path)?.meta("workspace")
    }

    /// Replays the journal of a cache already open.
    pub fn from_cache(cache: Cache) -> anyhow::Result<OpenCache> {
        let (journal, recovery) = open_journal(&cache)?;
        Ok(OpenCache {
            cache,
            journal,
            recovery,
        })
    }
}

fn open_journal(cache: &Cache) -> anyhow::Result<(Journal, Recovery)> {
    // An adopted directory is a plain directory while nothing is mounted on it: whatever
    // changed it then went unrecorded, so it is read whole (the next cut uploads only the
    // chunks the cache does not know to be stored).
    let adopted = cache
        .adopted()
        .map(|d| format!("{} is an adopted directory", d.display()));
    let opts = JournalOptions {
        rescan: adopted.clone(),
        ..JournalOptions::default()
    };
    let (journal, recovery) = Journal::open(&cache.journal, &cache.backing, opts)
        .with_context(|| format!("cannot open the journal in {}", cache.journal.display()))?;
    if let Some(tail) = &recovery.torn_tail {
        tracing::warn!("journal: torn tail cut: {tail}");
    }
    match &recovery.rescan {
        Some(why) if Some(why) == adopted.as_ref() => {
            tracing::info!("journal: rescanned the backing directory: {why}")
        }
        Some(why) => tracing::warn!("journal: rescanned the backing directory: {why}"),
        None => {}
    }
    tracing::info!(
        "journal: replayed {} record(s) from {} segment(s){}",
        recovery.records,
        recovery.segments,
        if recovery.clean {
            " (clean shutdown)"
        } else {
            ""
        }
    );
    Ok((journal, recovery))
}

/// The store at `url`, with the fault injection the environment asks for (tests), compressing
/// as `OWSFS_COMPRESSION` says (default zstd:1).
pub fn open_store(url: &str) -> anyhow::Result<Arc<Store>> {
    let compression = match std::env::var("OWSFS_COMPRESSION") {
        Ok(s) => s
            .parse()
            .map_err(|e| anyhow::anyhow!("OWSFS_COMPRESSION: {e}"))?,
        Err(_) => owsfs_store::Compression::default(),
    };
    open_store_compressing(url, compression)
}

/// [`open_store`], compressing new blobs as `compression` says.
pub fn open_store_compressing(
    url: &str,
    compression: owsfs_store::Compression,
) -> anyhow::Result<Arc<Store>> {
    let mut opts = StoreOptions {
        compression,
        faults: owsfs_store::FaultConfig::from_env()?,
        ..StoreOptions::default()
    };
    // Test hook: how often writers read the GC runs (a GC's grace must be 4 times this).
    if let Ok(s) = std::env::var("OWSFS_GC_REFRESH") {
        opts.gc_refresh = crate::args::parse_duration(&s)
            .map_err(|e| anyhow::anyhow!("OWSFS_GC_REFRESH: {e}"))?;
    }
    match Store::open(url, opts) {
        Ok(s) => Ok(Arc::new(s)),
        // These name the store and say what to check already.
        Err(
            e @ (owsfs_store::StoreError::Access { .. }
            | owsfs_store::StoreError::Config { .. }
            | owsfs_store::StoreError::NotOwsfsStore { .. }),
        ) => Err(e.into()),
        Err(e) => Err(anyhow::Error::new(e).context(format!("cannot use the store {url}"))),
    }
}

/// Phase 2: the store and the workspace `name` in it (created when missing), and what the
/// store said of it before this mount (see [`identity`]).
pub fn open_workspace(
    url: &str,
    name: &str,
    compression: owsfs_store::Compression,
) -> anyhow::Result<(Arc<Store>, Workspace, identity::Before)> {
    let store = open_store_compressing(url, compression)?;
    let (ws, created) = Workspace::open_or_create_noting(&store, name)
        .with_context(|| format!("cannot open workspace {name} in {url}"))?;
    let before = identity::Before::read(&ws, created);
    Ok((store, ws, before))
}

/// How the services run.
pub struct ServiceOptions {
    pub sync: SyncOptions,
    pub core: CoreOptions,
    pub prefetch: PrefetchOptions,
    /// A mount that will serve (not `owsfs recover`): the root directory is materialized
    /// and the access list read.
    pub serving: bool,
}

impl ServiceOptions {
    /// A serving mount's: `-o` and the mount's flags, with the agent's `sync` options.
    pub fn serving(opts: &MountOpts, o: &MountOptions, sync: SyncOptions) -> ServiceOptions {
        ServiceOptions {
            sync,
            core: CoreOptions {
                passthrough: o.passthrough,
                inode_budget: background::inode_budget(o.max_inodes),
                side_dir: None,
                adopted: false,
                succession: None,
            },
            prefetch: PrefetchOptions {
                workers: opts.prefetch,
                bandwidth: opts.prefetch_bandwidth,
            },
            serving: true,
        }
    }
}

/// Phase 5: the hydrator, the core and the sync agent. Their threads start with
/// [`Services::run`]; dropping the services stops every thread they started.
pub struct Services {
    pub hyd: Arc<Hydrator>,
    pub core: Arc<Core>,
    pub agent: Arc<SyncAgent>,
    inherited_access: Vec<String>,
    /// The prefetch and the hydration saver, which a live rollback stops and starts again.
    pub hydration: Arc<HydrationThreads>,
    threads: Threads,
}

/// The background threads of a serving mount, each kept as soon as it runs, so that a
/// failure half-way through [`Services::run`] still stops (and joins) what had started.
#[derive(Default)]
struct Threads {
    agent: Option<std::thread::JoinHandle<()>>,
    reaper: Option<Reaper>,
}

/// The background hydration of a serving mount: the prefetch workers and the saver of the
/// hydration state.
pub struct HydrationThreads {
    hyd: Arc<Hydrator>,
    core: Arc<Core>,
    opts: PrefetchOptions,
    bar: std::sync::OnceLock<Arc<dyn owsfs_local::progress::Progress>>,
    running: parking_lot::Mutex<(Option<Arc<Prefetcher>>, Option<owsfs_hydrate::Saver>)>,
    /// Set when the services stop: nothing starts again.
    closed: std::sync::atomic::AtomicBool,
}

impl HydrationThreads {
    /// Starts the prefetch (`access`: the paths to fetch first) and the saver.
    pub fn start(&self, access: Vec<String>) {
        let mut running = self.running.lock();
        if self.closed.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let prefetch = Prefetcher::start(
            Arc::clone(&self.hyd),
            Arc::clone(&self.core),
            access,
            self.opts,
        );
        let saver = owsfs_hydrate::spawn_saver(Arc::clone(&self.hyd), self.bar.get().cloned());
        *running = (Some(prefetch), Some(saver));
    }

    /// Stops both (each worker finishes its step); no last save.
    pub fn stop(&self) {
        let (prefetch, saver) = std::mem::take(&mut *self.running.lock());
        if let Some(p) = prefetch {
            p.stop();
        }
        if let Some(s) = saver {
            s.stop();
        }
    }
}

impl Services {
    /// `lease`: the writer's; `None` for a read-only mount (its agent commits nothing).
    pub fn start(
        store: &Arc<Store>,
        ws: &Workspace,
        lease: Option<&LeaseGuard>,
        prepared: Prepared,
        opts: ServiceOptions,
    ) -> anyhow::Result<(Services, PreparedRest)> {
        let Prepared {
            cache,
            journal,
            recovery,
            local,
            head,
            previous_sqlite,
        } = prepared;
        let mut opts = opts;
        if cache.adopted().is_some() {
            // Side files go to the cache, not beside the user's directory.
            opts.core.adopted = true;
            opts.core.side_dir.get_or_insert_with(|| cache.root.clone());
        }
        // Lazy hydration: the root's entries are made now (its tree is the one fetch a mount
        // of a new cache needs); everything else on demand and in the background.
        let hyd = Hydrator::open(
            &cache.root.join("state.db"),
            &cache.backing,
            Arc::clone(store),
            local.node_map(),
            &journal.dirty(),
        )?;
        if opts.serving && hyd.dir_is_pending(hyd.root_ino()) {
            hyd.materialize_dir(hyd.root_ino(), hyd.root_fd())
                .context("cannot fetch the root directory")?;
        }
        let inherited_access = if opts.serving {
            owsfs_hydrate::access_list(store, ws, &local)
        } else {
            Vec::new()
        };
        let core = Arc::new(
            Core::new(&cache.backing, Arc::clone(&journal), opts.core)
                .map_err(|e| anyhow::anyhow!("cannot open the backing directory: {e}"))?,
        );
        let keeper: Arc<dyn owsfs_sync::LeaseCheck> = match lease {
            Some(l) => {
                l.attach(&core);
                Arc::clone(l.keeper()) as Arc<dyn owsfs_sync::LeaseCheck>
            }
            None => Arc::new(readonly::NoLease),
        };
        core.set_hydrator(Arc::new(owsfs_hydrate::CoreHook {
            hyd: Arc::clone(&hyd),
        }));
        let stopped = cache.root.join("stopped.json");
        if opts.serving
            && let Ok(note) = std::fs::read_to_string(&stopped)
        {
            tracing::info!("an earlier mount of this cache stopped writing: {note}");
            let _ = std::fs::remove_file(&stopped);
        }
        let agent = SyncAgent::new(
            Arc::clone(&core),
            Arc::clone(store),
            ws.clone(),
            local,
            opts.sync,
            previous_sqlite,
            head,
            keeper,
            Arc::new(Lazy(Arc::clone(&hyd))),
            inherited_access.clone(),
        )?;
        {
            let weak = Arc::downgrade(&agent);
            core.set_throttle(Box::new(move |page_writeback| match weak.upgrade() {
                Some(a) => a.throttle(page_writeback),
                None => Ok(()),
            }));
        }
        fail::fail_point!("mount-services", |_| Err(anyhow::anyhow!(
            "fail point mount-services"
        )));
        Ok((
            Services {
                hydration: Arc::new(HydrationThreads {
                    hyd: Arc::clone(&hyd),
                    core: Arc::clone(&core),
                    opts: opts.prefetch,
                    bar: std::sync::OnceLock::new(),
                    running: parking_lot::Mutex::new((None, None)),
                    closed: std::sync::atomic::AtomicBool::new(false),
                }),
                hyd,
                core,
                agent,
                inherited_access,
                threads: Threads::default(),
            },
            PreparedRest {
                cache,
                journal,
                recovery,
            },
        ))
    }

    /// Starts the background threads of a serving mount: the sync agent, the prefetch, the
    /// hydration saver and the inode reaper.
    pub fn run(
        &mut self,
        mountpoint: &Path,
        invalidators: (owsfs_fuse::Invalidator, owsfs_fuse::InodeInvalidator),
        progress_bar: bool,
    ) -> anyhow::Result<()> {
        self.agent.set_mount(mountpoint);
        let agent = Arc::clone(&self.agent);
        self.threads.agent = Some(
            std::thread::Builder::new()
                .name("owsfs-sync".into())
                .spawn(move || agent.run())
                .context("cannot start the sync thread")?,
        );
        // The kernel keeps inodes cached while memory allows, but each one holds a
        // descriptor here: when the table nears its budget, ask the kernel to drop the
        // oldest names.
        self.core.set_invalidators(invalidators.0, invalidators.1);
        if progress_bar {
            let _ = self
                .hydration
                .bar
                .set(Arc::new(crate::progress::Bar::new()));
        }
        self.hydration
            .start(std::mem::take(&mut self.inherited_access));
        self.threads.reaper = Some(Reaper::start(Arc::clone(&self.core))?);
        Ok(())
    }

    /// Stops the background work in the handoff's order: the reaper, the prefetch and the
    /// saver at once; then the agent, after its last cut. Returns the phases' times in ms.
    fn stop(&mut self) -> (u128, u128, u128) {
        let ending = Instant::now();
        let t = std::mem::take(&mut self.threads);
        if let Some(r) = t.reaper {
            r.stop();
        }
        let (prefetch, saver) = {
            let mut running = self.hydration.running.lock();
            self.hydration
                .closed
                .store(true, std::sync::atomic::Ordering::Release);
            std::mem::take(&mut *running)
        };
        if let Some(p) = prefetch {
            p.stop();
        }
        let prefetch_ms = ending.elapsed().as_millis();
        if let Some(s) = saver {
            s.stop();
        }
        let saver_ms = ending.elapsed().as_millis();
        // The last cut: everything written before the unmount goes to the store.
        self.agent.stop();
        if t.agent.is_some_and(|a| a.join().is_err()) {
            tracing::error!("the sync thread panicked");
        }
        (prefetch_ms, saver_ms, ending.elapsed().as_millis())
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What phase 5 leaves of phase 4 besides the services: the cache and its journal.
pub struct PreparedRest {
    pub cache: Cache,
    pub journal: Arc<Journal>,
    pub recovery: Recovery,
}

/// The thread that asks the kernel to forget inodes when the table nears its budget. Dropping
/// the stop sender ends it; `stop` joins it.
struct Reaper {
    stop: Option<crossbeam_channel::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Reaper {
    fn start(core: Arc<Core>) -> anyhow::Result<Reaper> {
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let thread = std::thread::Builder::new()
            .name("owsfs-reaper".into())
            .spawn(move || core.run_reaper(&stopped))
            .context("cannot start the inode reaper thread")?;
        Ok(Reaper {
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    fn stop(mut self) {
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Phase 8, the handoff promise: once the session has ended, everything written before the
/// unmount goes to the store (the agent's last cut), the hydration state is stored, and only
/// then, and only if nothing is left unsynced and the lease was not lost, is the lease
/// released, so the next node can mount at once. The journal is closed cleanly last.
///
/// When everything is in the store, the newest commit gets an automatic snapshot
/// (`auto-handoff-N`), and automatic snapshots beyond `keep_snapshots` are rolled off (0: none
/// taken).
///
/// Returns whether the journal was closed cleanly (the cache may then be let go at once),
/// and whether the workspace was handed off.
pub fn handoff(
    mut services: Services,
    lease: LeaseGuard,
    journal: &Journal,
    keep_snapshots: usize,
) -> (bool, Result<(), String>) {
    let ending = Instant::now();
    let (prefetch_ms, saver_ms, cut_ms) = services.stop();
    if let Err(e) = services.hyd.save() {
        tracing::error!("cannot store the hydration state: {e:#}");
    }
    let agent = Arc::clone(&services.agent);
    drop(services);
    if keep_snapshots > 0 && !journal.is_dirty() && !lease.keeper().is_lost() {
        snapshot_before_handoff(&agent, keep_snapshots);
    }
    // Crash window: the last cut is in the store, the lease still held.
    fail::fail_point!("handoff-after-cut");
    let handed = lease.hand_off(|| {
        agent
            .last_error()
            .unwrap_or_else(|| "no error recorded".into())
    });
    let closed = journal
        .close_clean()
        .map_err(|e| format!("cannot close the journal cleanly: {e}"));
    tracing::info!(
        "session ended: prefetch stopped after {prefetch_ms} ms, saver after {saver_ms} ms, \
         last cut done after {cut_ms} ms, handed off after {} ms",
        ending.elapsed().as_millis()
    );
    let clean = closed.is_ok();
    let result = closed.and(handed.map_err(|e| format!("unmounted, but not handed off: {e}")));
    (clean, result)
}

/// The end of a read-only mount: the threads stopped, the hydration state stored, the
/// journal closed; true when it closed cleanly.
pub fn shut_down(mut services: Services, journal: &Journal) -> bool {
    services.stop();
    if let Err(e) = services.hyd.save() {
        tracing::error!("cannot store the hydration state: {e:#}");
    }
    drop(services);
    match journal.close_clean() {
        Ok(()) => true,
        Err(e) => {
            tracing::error!("cannot close the journal cleanly: {e}");
            false
        }
    }
}

/// The automatic snapshot of a handoff. A failure is logged: the handoff does not depend on
/// it (everything is in the store already).
fn snapshot_before_handoff(agent: &SyncAgent, keep: usize) {
    let ws = agent.workspace();
    let head = agent.status().generation;
    let taken = ws
        .newest_commit(head)
        .map_err(owsfs_store::SnapshotError::from)
        .and_then(|record| match record {
            Some(r) => ws.auto_snapshot("handoff", &r, keep).map(Some),
            None => Ok(None),
        });
    match taken {
        Ok(Some((s, rolled))) => tracing::info!(
            "snapshot {} of generation {}{}",
            s.name,
            s.generation,
            if rolled.is_empty() {
                String::new()
            } else {
                format!("; rolled off {}", rolled.join(", "))
            }
        ),
        Ok(None) => {}
        Err(e) => tracing::warn!("no automatic snapshot before the handoff: {e}"),
    }
}

/// `owsfs mount` in the daemon: every phase, then serving until unmounted.
pub fn serve(
    mountpoint: &Path,
    opts: &MountOpts,
    o: &MountOptions,
    cache_dir: &Path,
    ready: &Readiness,
    mut worker: Option<supervisor::Worker>,
) -> anyhow::Result<()> {
    let resume = worker.as_mut().and_then(|w| w.resume.take());
    let mountpoint = serving_point(mountpoint, opts, resume.is_some())?;
    mountpoint::check_dev_fuse()?;
    // The process umask stays as it is: it also applies to the cache, the journal and a
    // file:// store, which must not become writable by everyone. New nodes get exactly the
    // mode the kernel sends (the core restores bits the umask took, see fuse/src/core.rs).
    // A previous daemon of this cache may still be finishing its last commit (`umount`, then
    // `mount` at once): wait for it, bounded.
    let mut say = |m: &str| {
        tracing::info!("{m}");
        ready.notice(m);
    };
    let adopt = opts.adopt.then_some(mountpoint.as_path());
    let open = OpenCache::open_waiting(cache_dir, PREVIOUS_DAEMON_WAIT, &mut say, adopt)?;

    // A bad or busy --metrics address fails the mount before it takes anything.
    let metrics_listener = opts.metrics.as_deref().map(metrics::bind).transpose()?;
    let store_url = opts.store.url()?;
    if opts.adopt {
        adopt::check(
            &mountpoint,
            &store_url,
            opts.drill_scratch.as_deref(),
            ready,
        )?;
    }
    let ws_name = match &opts.workspace {
        Some(w) => w.clone(),
        None => default_name(opts, &open, &mountpoint)?,
    };
    let (store, ws, before) = open_workspace(&store_url, &ws_name, opts.compression)?;
    refuse_template(&ws, opts.edit_template)?;
    check_identity(opts, &open, &ws, &store_url, &mountpoint, &before)?;

    // Declared before the lease and the services, so that on an error exit it is dropped
    // after them: the cache's lock is let go only once the services' last cut is done and
    // the lease is handled (locals drop in reverse order).
    let mut cache_lock: Option<Cache> = None;
    // The writer lease, then a fence: from here on no other node can commit.
    let mut lease = LeaseGuard::take(LeaseRequest {
        ws: &ws,
        cache: &open.cache,
        ttl: opts.lease.lease_ttl,
        // A daemon that takes over a connection takes back only this cache's own lease (an
        // earlier daemon of it died holding it): never one another node took meanwhile.
        takeover: if resume.is_some() {
            owsfs_sync::lease::Takeover::Refuse
        } else {
            opts.lease.takeover()
        },
        notice: &mut say,
        note_stop: true,
        mountpoint: Some(&mountpoint),
    })?;
    let succession = succession(worker.as_ref(), &open.cache);
    let prepared = prepare(open, &ws, &lease, &store_url, ready, resume.is_some())?;
    let mut service_opts = ServiceOptions::serving(opts, o, sync_options(opts));
    service_opts.core.succession = succession;
    let (mut services, rest) = Services::start(&store, &ws, Some(&lease), prepared, service_opts)?;
    let PreparedRest {
        cache,
        journal,
        recovery,
    } = rest;
    let cache_root = cache.root.clone();
    let adopted = cache.adopted().map(Path::to_path_buf);
    let node = cache.node_id()?;
    cache_lock.replace(cache);
    let session = mounted::WriterSession {
        core: &services.core,
        agent: &services.agent,
        mountpoint: &mountpoint,
        o,
        fsname: &fsname(opts, &cache_root),
    };
    let mut mounted = session.attach(worker.as_ref(), resume)?;
    lease.serving(&journal);
    services.run(&mountpoint, mounted.invalidators(), opts.foreground)?;

    let upkeep = upkeep::Upkeep::start(
        Arc::clone(&store),
        ws.clone(),
        upkeep::UpkeepOptions {
            drill_every: opts.drill_every,
            scratch: opts
                .drill_scratch
                .clone()
                .unwrap_or_else(std::env::temp_dir),
            gc_every: opts.gc_every,
            gc_grace: opts.gc_grace,
        },
        &node,
    )?;
    let daemon = Arc::new(Daemon::new(
        &services,
        Some(Arc::clone(lease.keeper())),
        Arc::clone(&upkeep.last),
        Arc::clone(&upkeep.last_gc),
        mountpoint.clone(),
        cache_root.clone(),
        recovery,
    ));
    writer_daemon(&daemon, &services, &store, &mut mounted, adopted.as_deref());
    let control = server::Server::start(Arc::clone(&daemon))?;
    let metrics = daemon.serve_metrics(metrics_listener)?;
    daemon::spawn_signal_handler(Arc::clone(&daemon))?;
    fail::fail_point!("mount-before-ready", |_| Err(anyhow::anyhow!(
        "fail point mount-before-ready"
    )));
    tracing::info!(
        "mounted {} (cache {})",
        mountpoint.display(),
        cache_root.display()
    );
    announce(&ws, &store_url, &before, adopted.as_deref(), ready);
    ready.ready();
    mounted.resend();

    let served = mounted
        .serve()
        .map_err(|e| format!("the FUSE session failed: {e}"));
    // A new mount of the cache now waits for this one's last commit instead of failing.
    if let Some(cache) = cache_lock.as_ref() {
        cache.mark_stopping();
    }
    drop(upkeep);
    let (clean, handed) = handoff(services, lease, &journal, opts.keep_snapshots);
    drop(metrics);
    drop(control);
    if clean && let Some(cache) = cache_lock.as_mut() {
        // Another daemon may open the cache while this process exits.
        cache.release();
    }
    let result = served.and(handed);
    match &result {
        Ok(()) => tracing::info!("unmounted {}; journal closed cleanly", mountpoint.display()),
        Err(e) => tracing::error!("{e}"),
    }
    daemon.finish(result.clone());
    daemon.drain_waiters();
    result.map_err(anyhow::Error::msg)
}

/// Says what the mount attached (`identity::announce`), in the log and to the user.
fn announce(
    ws: &Workspace,
    store_url: &str,
    before: &identity::Before,
    adopted: Option<&Path>,
    ready: &Readiness,
) {
    let mut said = identity::announce(ws, store_url, before);
    if let Some(dir) = adopted {
        said.push_str(&format!(
            "; serving the files of {} in place",
            dir.display()
        ));
    }
    tracing::info!("{said}");
    ready.notice(&said);
}

/// What a writer's daemon has beyond a read-only one's: the live rollback, and what it adopted.
fn writer_daemon(
    daemon: &Daemon,
    services: &Services,
    store: &Arc<Store>,
    mounted: &mut Mounted,
    adopted: Option<&Path>,
) {
    if let Some(dir) = adopted {
        daemon.set_adopted(dir.to_path_buf());
    }
    daemon.set_rollback(rollback::Rollback {
        core: Arc::clone(&services.core),
        agent: Arc::clone(&services.agent),
        hyd: Arc::clone(&services.hyd),
        store: Arc::clone(store),
        hydration: Arc::clone(&services.hydration),
        forget: mounted.forgetter(),
        cache_root: daemon.cache().to_path_buf(),
        backing: services.core.backing_root().to_path_buf(),
        one: parking_lot::Mutex::new(()),
    });
}

/// The default-name rule (`identity::check_default_name`) for this mount.
pub fn check_identity(
    opts: &MountOpts,
    open: &OpenCache,
    ws: &Workspace,
    store_url: &str,
    mountpoint: &Path,
    before: &identity::Before,
) -> anyhow::Result<()> {
    identity::check_default_name(
        ws,
        store_url,
        mountpoint,
        &identity::Naming {
            explicit_name: opts.workspace.is_some(),
            explicit_cache: opts.cache_is_explicit(),
            cache_holds: open.holds()?.as_deref(),
        },
        before,
    )
}

/// The workspace of a mount without `--workspace`: the one a cache named with `--cache` (or
/// as the mount helper's source) holds already, else the mountpoint's base name.
pub fn default_name(
    opts: &MountOpts,
    open: &OpenCache,
    mountpoint: &Path,
) -> anyhow::Result<String> {
    if opts.cache_is_explicit()
        && let Some(w) = open.holds()?
    {
        return Ok(w);
    }
    Ok(mountpoint::name_of(mountpoint))
}

/// The source the mount table shows: the mount helper's STORE_URL#WORKSPACE (what an fstab
/// line says, so that `mount -a` finds it mounted), without user information, or the cache.
pub fn fsname(opts: &MountOpts, cache_root: &Path) -> String {
    match &opts.fsname {
        Some(f) => crate::cmd::redact_url(f),
        None => cache_root.to_string_lossy().into_owned(),
    }
}

/// A template is read-mostly: a writer mount of it must say it edits it.
pub fn refuse_template(ws: &Workspace, edit: bool) -> anyhow::Result<()> {
    if !edit
        && let Some(m) = ws
            .template()
            .with_context(|| format!("cannot read whether {} is a template", ws.name()))?
    {
        anyhow::bail!(
            "workspace {name} is a template (marked by {by}): mount it --read-only, fork it \
             (`owsfs fork {name} NEW`) and mount the fork, or pass --edit-template to change the \
             template itself",
            name = ws.name(),
            by = m.by
        );
    }
    Ok(())
}

/// Parses `-o` and runs [`serve`] (the daemon side of `owsfs mount`).
pub fn serve_args(
    mountpoint: &Path,
    opts: &MountOpts,
    cache_dir: &Path,
    ready: &Readiness,
    worker: Option<supervisor::Worker>,
) -> anyhow::Result<()> {
    let mut o = options::parse(&opts.options)?;
    if worker.is_none() {
        o = o.unsupervised();
    }
    if opts.read_only || opts.at.is_some() {
        let at: owsfs_store::GenRef = opts
            .at
            .as_deref()
            .unwrap_or("HEAD")
            .parse()
            .map_err(anyhow::Error::msg)?;
        return readonly::serve(mountpoint, opts, &o, cache_dir, ready, &at);
    }
    serve(mountpoint, opts, &o, cache_dir, ready, worker)
}

/// Where a daemon serves: a mountpoint checked for a new mount, or for a daemon that takes
/// over a connection, the mount that is there (served by nobody until it does).
fn serving_point(
    mountpoint: &Path,
    opts: &MountOpts,
    taking_over: bool,
) -> anyhow::Result<PathBuf> {
    if taking_over {
        fail::fail_point!("resume-start", |_| Err(anyhow::anyhow!(
            "fail point resume-start"
        )));
        return mountpoint::absolute(mountpoint);
    }
    mountpoint::check_mountable(mountpoint, opts.adopt)
}

/// What a supervised daemon keeps for the one after it, in its cache. Without a supervisor,
/// the orphans an earlier supervised mount of the cache left go: nobody holds them any more.
fn succession(
    worker: Option<&supervisor::Worker>,
    cache: &Cache,
) -> Option<owsfs_fuse::Succession> {
    let Some(worker) = worker else {
        let _ = std::fs::remove_dir_all(cache.root.join("orphans"));
        return None;
    };
    Some(owsfs_fuse::Succession {
        node_log: cache.root.join("nodes"),
        orphans: cache.root.join("orphans"),
        incarnation: worker.incarnation,
    })
}

/// The sync agent's settings a mount's flags give.
fn sync_options(opts: &MountOpts) -> SyncOptions {
    SyncOptions {
        commit_interval: opts.commit_interval,
        max_lag: opts.max_lag,
        max_lag_bytes: opts.max_lag_bytes,
    }
}

/// The hydrator, as the sync agent sees it.
pub struct Lazy(pub Arc<Hydrator>);

impl owsfs_sync::Hydration for Lazy {
    fn fetch(&self, ino: u64, start: u64, end: u64) -> std::io::Result<()> {
        self.0.fetch_range(ino, start, end, false)
    }
    fn dir_pending(&self, ino: u64) -> bool {
        self.0.dir_is_pending(ino)
    }
    fn save(&self) -> anyhow::Result<()> {
        self.0.save()
    }
    fn accessed_paths(&self) -> Vec<String> {
        self.0.accessed_paths()
    }
}

//! A read-only mount of any generation (`owsfs mount --at REF --read-only`): no lease and no
//! fence, so any number of them run beside the writer, on any node. The kernel refuses every
//! write (the mount is `ro`: EROFS); the cache is a lazy copy of the generation; a pin in the
//! store (renewed while mounted, removed at unmount) keeps the generation from GC.

use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use crossbeam_channel::{Sender, select};
use owsfs_store::{GenRef, GenerationRecord, Store, Workspace};
use owsfs_sync::SyncOptions;

use super::background::Readiness;
use super::{Daemon, Mounted, OpenCache, Prepared, PreparedRest, ServiceOptions, Services, server};
use crate::args::MountOpts;
use crate::mountpoint;
use crate::options::MountOptions;

/// How long a pin lasts without renewal; renewed every third of it.
pub const PIN_TTL: Duration = Duration::from_secs(600);

/// The lease a read-only mount does not have: its agent never commits.
pub struct NoLease;

impl owsfs_sync::LeaseCheck for NoLease {
    fn epoch(&self) -> u64 {
        0
    }
    fn check(&self, _ahead: Duration) -> anyhow::Result<()> {
        anyhow::bail!("a read-only mount commits nothing")
    }
    fn is_lost(&self) -> bool {
        false
    }
    fn lose(&self, _why: &str) {}
}

/// `owsfs status`'s lease line of a read-only mount.
pub fn lease_status() -> owsfs_sync::lease::LeaseStatus {
    owsfs_sync::lease::LeaseStatus {
        state: "none (read-only mount)".into(),
        holder: String::new(),
        node: String::new(),
        epoch: 0,
        ttl_secs: 0.0,
        last_renewal_secs_ago: 0.0,
        good_for_secs: 0.0,
        renewals: 0,
        commits_as_renewals: 0,
        renewal_failures: 0,
        last_error: None,
        lost: None,
    }
}

/// The pin of a read-only mount, renewed by a thread; dropping it stops the thread and removes
/// the pin.
pub struct PinGuard {
    ws: Workspace,
    id: String,
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl PinGuard {
    pub fn take(ws: &Workspace, id: &str, record: &GenerationRecord) -> anyhow::Result<PinGuard> {
        let root = record.root.context("a fence has no tree to pin")?;
        let holder = format!(
            "read-only mount on {} (pid {})",
            rustix::system::uname().nodename().to_string_lossy(),
            std::process::id()
        );
        ws.pin(id, record.number, root, &holder, PIN_TTL)
            .with_context(|| format!("cannot pin generation {}", record.number))?;
        let (stop, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let thread = {
            let (ws, id, n) = (ws.clone(), id.to_string(), record.number);
            let clock = Arc::clone(ws.store().clock());
            std::thread::Builder::new()
                .name("owsfs-pin".into())
                .spawn(move || {
                    loop {
                        select! {
                            recv(stop_rx) -> _ => return,
                            recv(clock.after(PIN_TTL / 3)) -> _ => {
                                if let Err(e) = ws.pin(&id, n, root, &holder, PIN_TTL) {
                                    tracing::warn!("cannot renew the pin of generation {n}: {e}");
                                }
                            }
                        }
                    }
                })?
        };
        Ok(PinGuard {
            ws: ws.clone(),
            id: id.to_string(),
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Err(e) = self.ws.unpin(&self.id) {
            tracing::warn!("cannot remove pin {} (it expires by itself): {e}", self.id);
        }
    }
}

/// `owsfs mount --read-only [--at REF]` in the daemon.
pub fn serve(
    mountpoint: &Path,
    opts: &MountOpts,
    o: &MountOptions,
    cache_dir: &Path,
    ready: &Readiness,
    at: &GenRef,
) -> anyhow::Result<()> {
    let mountpoint = mountpoint::check_mountable(mountpoint, false)?;
    mountpoint::check_dev_fuse()?;
    let open = OpenCache::open(cache_dir)?;
    if let Some(dir) = open.cache.adopted() {
        anyhow::bail!(
            "the cache {} adopted {}: a read-only mount needs a cache of its own (another --cache)",
            open.cache.root.display(),
            dir.display()
        );
    }
    // A bad or busy --metrics address fails the mount before it takes anything.
    let metrics_listener = opts
        .metrics
        .as_deref()
        .map(super::metrics::bind)
        .transpose()?;
    let store_url = opts.store.url()?;
    let ws_name = match &opts.workspace {
        Some(w) => w.clone(),
        None => super::default_name(opts, &open, &mountpoint)?,
    };
    let store: Arc<Store> = super::open_store(&store_url)?;
    let ws = Workspace::open_existing(&store, &ws_name)?
        .with_context(|| format!("there is no workspace {ws_name:?} in {store_url}"))?;
    let record = ws
        .resolve(at)
        .with_context(|| format!("cannot find {at} of workspace {ws_name:?}"))?;
    let mut before = super::identity::Before::read(&ws, false);
    super::check_identity(opts, &open, &ws, &store_url, &mountpoint, &before)?;
    before.head = Some(record.clone());
    let node = open.cache.node_id()?;
    let pin = PinGuard::take(
        &ws,
        &format!("ro-{node}-{:08x}", rand::random::<u32>()),
        &record,
    )?;
    let OpenCache {
        cache,
        journal,
        recovery,
    } = open;
    let mut local = owsfs_local::LocalState::open(&cache.root.join("state.db"))?;
    let journal = Arc::new(journal);
    let previous_sqlite = owsfs_hydrate::prepare::prepare_read_only(
        &ws, &mut local, &cache, &journal, &store_url, &record,
    )?;
    let mut o = o.clone();
    o.read_only = true;
    let (mut services, rest) = Services::start(
        &store,
        &ws,
        None,
        Prepared {
            cache,
            journal,
            recovery,
            local,
            head: record.number,
            previous_sqlite,
        },
        // Its agent has nothing to commit: the kernel refuses every write.
        ServiceOptions::serving(
            opts,
            &o,
            SyncOptions {
                commit_interval: Duration::from_secs(86_400),
                max_lag: Duration::from_secs(86_400),
                max_lag_bytes: u64::MAX,
            },
        ),
    )?;
    let PreparedRest {
        cache,
        journal,
        recovery,
    } = rest;
    let cache_root = cache.root.clone();
    let mut cache_lock = Some(cache);
    let mounted = Mounted::mount(
        &services.core,
        &mountpoint,
        &o,
        &super::fsname(opts, &cache_root),
        false,
        None,
    )?;
    services.run(&mountpoint, mounted.invalidators(), opts.foreground)?;
    let daemon = Arc::new(Daemon::new(
        &services,
        None,
        Arc::default(),
        Arc::default(),
        mountpoint.clone(),
        cache_root.clone(),
        recovery,
    ));
    daemon.set_read_only_at(record.number);
    let control = server::Server::start(Arc::clone(&daemon))?;
    let metrics = daemon.serve_metrics(metrics_listener)?;
    super::daemon::spawn_signal_handler(Arc::clone(&daemon))?;
    tracing::info!(
        "mounted generation {} of {ws_name:?} read-only at {} (cache {})",
        record.number,
        mountpoint.display(),
        cache_root.display()
    );
    let said = format!(
        "{}, read-only",
        super::identity::announce(&ws, &store_url, &before)
    );
    tracing::info!("{said}");
    ready.notice(&said);
    ready.ready();
    let served = mounted
        .serve()
        .map_err(|e| format!("the FUSE session failed: {e}"));
    let clean = super::shut_down(services, &journal);
    // The pin goes before the unmount is answered: whoever waits for it finds it gone.
    drop(pin);
    drop(metrics);
    drop(control);
    if clean && let Some(cache) = cache_lock.as_mut() {
        cache.release();
    }
    match &served {
        Ok(()) => tracing::info!("unmounted {}", mountpoint.display()),
        Err(e) => tracing::error!("{e}"),
    }
    daemon.finish(served.clone());
    daemon.drain_waiters();
    served.map_err(anyhow::Error::msg)
}

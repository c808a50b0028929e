//! What the control socket and the signal handler need of a serving mount: its state, a
//! sync, and the unmount, which answers once the session has ended and the workspace is
//! handed off.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use owsfs_fuse::Core;
use owsfs_hydrate::Hydrator;
use owsfs_journal::Recovery;
use owsfs_sync::SyncAgent;
use owsfs_sync::lease::Keeper;
use parking_lot::{Condvar, Mutex};

use crate::control::{ControlError, Status, SyncStatus, True};

pub struct Daemon {
    last_drill: super::upkeep::LastDrill,
    last_gc: super::upkeep::LastGc,
    core: Arc<Core>,
    sync: Arc<SyncAgent>,
    /// The writer's lease keeper; `None` on a read-only mount.
    keeper: Option<Arc<Keeper>>,
    hyd: Arc<Hydrator>,
    mountpoint: PathBuf,
    cache: PathBuf,
    started: Instant,
    recovery: Recovery,
    /// A read-only mount's generation.
    read_only_at: std::sync::OnceLock<u64>,
    /// Where `--metrics` serves.
    metrics_addr: std::sync::OnceLock<String>,
    /// What a live rollback needs (a writer's mount).
    rollback: std::sync::OnceLock<super::rollback::Rollback>,
    /// The directory `--adopt` serves in place.
    adopted: std::sync::OnceLock<PathBuf>,
    /// Set when the session has ended and the journal is closed: Ok, or the error.
    finished: Mutex<Option<Result<(), String>>>,
    finished_cv: Condvar,
    /// Control connections waiting to report the end of the session; the process stays until
    /// they have answered.
    waiters: Mutex<usize>,
    waiters_cv: Condvar,
}

/// How long an unmount of an adopted directory waits for the commit it makes first.
const ADOPTED_SYNC_BEFORE_UNMOUNT: Duration = Duration::from_secs(60);

impl Daemon {
    /// The daemon of the mount `services` serve, under `keeper`'s lease.
    pub fn new(
        services: &super::Services,
        keeper: Option<Arc<Keeper>>,
        last_drill: super::upkeep::LastDrill,
        last_gc: super::upkeep::LastGc,
        mountpoint: PathBuf,
        cache: PathBuf,
        recovery: Recovery,
    ) -> Daemon {
        Daemon {
            last_drill,
            last_gc,
            core: Arc::clone(&services.core),
            sync: Arc::clone(&services.agent),
            keeper,
            hyd: Arc::clone(&services.hyd),
            mountpoint,
            cache,
            started: Instant::now(),
            recovery,
            read_only_at: std::sync::OnceLock::new(),
            metrics_addr: std::sync::OnceLock::new(),
            rollback: std::sync::OnceLock::new(),
            adopted: std::sync::OnceLock::new(),
            finished: Mutex::new(None),
            finished_cv: Condvar::new(),
            waiters: Mutex::new(0),
            waiters_cv: Condvar::new(),
        }
    }

    /// Marks the mount read-only, at generation `n` (for the status).
    pub fn set_read_only_at(&self, n: u64) {
        let _ = self.read_only_at.set(n);
    }

    /// Serves `--metrics` on `listener` (bound before the mount), if asked for: the server
    /// lives as long as what this returns.
    pub fn serve_metrics(
        self: &Arc<Self>,
        listener: Option<std::net::TcpListener>,
    ) -> anyhow::Result<Option<super::metrics::MetricsServer>> {
        let Some(listener) = listener else {
            return Ok(None);
        };
        let server = super::metrics::MetricsServer::start(listener, Arc::clone(self))?;
        let _ = self.metrics_addr.set(server.addr().to_string());
        Ok(Some(server))
    }

    /// Makes the mount one that can be rolled back live.
    pub fn set_rollback(&self, r: super::rollback::Rollback) {
        let _ = self.rollback.set(r);
    }

    /// Says that the mount serves the adopted directory `dir` in place.
    pub fn set_adopted(&self, dir: PathBuf) {
        let _ = self.adopted.set(dir);
    }

    /// `owsfs rollback MOUNTPOINT REF`: a new generation with REF's tree, served at once.
    pub fn rollback(
        &self,
        to: &str,
        keep_snapshots: usize,
        timeout: Duration,
    ) -> Result<crate::control::LiveRollback, ControlError> {
        if let Some(dir) = self.adopted.get() {
            return Err(ControlError::Other(format!(
                "{} is an adopted directory: a live rollback would replace its own files, which \
                 owsfs does not do yet; restore REF elsewhere with `owsfs restore`",
                dir.display()
            )));
        }
        match self.rollback.get() {
            Some(r) => r.run(to, keep_snapshots, timeout),
            None => Err(ControlError::Other(format!(
                "{} is a read-only mount: it cannot be rolled back (mount another generation \
                 with `owsfs mount --read-only --at REF`)",
                self.mountpoint.display()
            ))),
        }
    }

    pub fn cache(&self) -> &std::path::Path {
        &self.cache
    }

    /// The latency histograms of FUSE requests, by kind (for the metrics).
    pub fn fuse_latency(
        &self,
    ) -> impl Iterator<Item = (owsfs_fuse::stats::OpKind, &owsfs_fuse::stats::Histogram)> {
        owsfs_fuse::stats::OpKind::ALL
            .into_iter()
            .map(|k| (k, &self.core.stats.latency[k as usize]))
    }

    /// The latency of commits (for the metrics).
    pub fn commit_latency(&self) -> owsfs_fuse::stats::HistogramSnapshot {
        self.sync.commit_latency.snapshot()
    }

    /// The state of the mount, for `owsfs status`.
    pub fn status(&self, dirty: bool) -> Status {
        let core = &self.core;
        let journal = core.journal();
        Status {
            ok: True,
            schema: crate::control::STATUS_SCHEMA,
            mountpoint: self.mountpoint.clone(),
            cache: self.cache.clone(),
            backing: self
                .adopted
                .get()
                .cloned()
                .unwrap_or_else(|| core.backing_root().to_path_buf()),
            pid: std::process::id(),
            supervisor: super::supervisor::supervision(),
            uptime_secs: self.started.elapsed().as_secs_f64(),
            passthrough: core.passthrough_enabled(),
            io_uring: owsfs_fuse::fuser::uring_served(),
            inodes: core.inode_count(),
            inode_budget: core.inode_budget(),
            open_files: core.open_handles(),
            journal: journal.stats(),
            recovery: self.recovery.clone(),
            ops: core.stats.snapshot(),
            log_lines_dropped: crate::logwriter::dropped_lines(),
            read_only_at: self.read_only_at.get().copied(),
            metrics: self.metrics_addr.get().cloned(),
            sync: SyncStatus {
                agent: self.sync.status(),
                lease: match &self.keeper {
                    Some(k) => k.status(),
                    None => super::readonly::lease_status(),
                },
                hydration: self.hyd.progress(),
                drill: self.last_drill.lock().clone(),
                gc: self.last_gc.lock().clone(),
            },
            dirty: dirty.then(|| serde_json::to_value(journal.dirty()).unwrap_or_default()),
        }
    }

    /// Whether `owsfs restart` can replace this daemon: only a supervisor keeps the
    /// connection while no daemon serves it.
    pub fn may_restart(&self) -> Result<(), ControlError> {
        if super::supervisor::supervision().is_none() {
            return Err(ControlError::Other(
                "this mount has no supervisor to keep its connection (a --foreground or \
                 read-only mount): unmount and mount it again instead"
                    .into(),
            ));
        }
        if !super::supervisor::CONNECTION_KEPT.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(ControlError::Other(
                "this mount's supervisor does not keep its connection (it is served through \
                 FUSE over io_uring, or the kernel cannot send requests again): unmount and \
                 mount it again instead"
                    .into(),
            ));
        }
        if self.sync.status().writes_stopped.is_some() {
            return Err(ControlError::Other(
                "writes are stopped on this mount (see owsfs status): unmount it, and \
                 `owsfs recover` the cache if the status says so"
                    .into(),
            ));
        }
        Ok(())
    }

    /// The end of this daemon for `owsfs restart`: requests are held back (those in flight
    /// are answered first, for at most 10 s), no mutation or cut is half done, and the
    /// process exits at once with [`super::supervisor::RESTART_EXIT`]. What it leaves is
    /// what a crash would leave, less the half-done work: the next daemon replays the
    /// journal, and the kernel sends it the requests held back here.
    pub fn exit_for_restart(&self) -> ! {
        tracing::info!("restarting: holding requests back, then handing the connection on");
        let _requests = self.core.hold_requests_for(Duration::from_secs(10));
        let _mutations = self.core.barrier_for(Duration::from_secs(10));
        if let Err(e) = self.hyd.save() {
            tracing::warn!("hydration state not saved before the restart: {e:#}");
        }
        tracing::info!("exiting for the next daemon");
        // SAFETY: _exit ends the process at once: nothing is dropped, so the mount stays.
        unsafe { libc::_exit(super::supervisor::RESTART_EXIT) }
    }

    /// `owsfs sync`: the newest generation once everything written before the call is
    /// durable.
    pub fn sync(&self, timeout: Duration) -> Result<u64, ControlError> {
        self.sync.sync(timeout).map_err(|e| match e {
            owsfs_sync::SyncError::ShuttingDown => ControlError::ShuttingDown,
            owsfs_sync::SyncError::NotDurable { after, why } => ControlError::NotDurable {
                secs: after.as_secs_f64(),
                why,
            },
            e @ owsfs_sync::SyncError::Stopped(_) => ControlError::Other(e.to_string()),
        })
    }

    /// `owsfs snapshot create` on a mount: everything written before the call made durable,
    /// then the newest commit named `name`.
    pub fn snapshot(
        &self,
        name: &str,
        timeout: Duration,
    ) -> Result<owsfs_store::Snapshot, ControlError> {
        owsfs_store::snapshot::check_snapshot_name(name).map_err(ControlError::BadRequest)?;
        let g = self.sync(timeout)?;
        let ws = self.sync.workspace();
        let record = ws
            .newest_commit(g)
            .map_err(|e| ControlError::Other(format!("cannot read generation {g}: {e}")))?
            .ok_or_else(|| {
                ControlError::Other(format!(
                    "workspace {:?} has no commit yet (nothing was ever written): nothing to name",
                    ws.name()
                ))
            })?;
        ws.create_snapshot(name, &record, None)
            .map_err(|e| ControlError::Other(e.to_string()))
    }

    /// `owsfs unmount`: unmounts and waits until the session has ended and the workspace is
    /// handed off (`lazy`: only until the mount is detached); true when it was only detached.
    ///
    /// The unmount call runs on a thread of its own, because the kernel returns from it only
    /// after it has freed the page cache of every file (about 30 ms per GiB cached), and it
    /// does that after the session has ended: the answer does not wait for it.
    pub fn unmount_and_wait(self: &Arc<Self>, lazy: bool) -> Result<bool, ControlError> {
        // This request's own outcome of the call (an earlier request's EBUSY is not ours).
        // Set under `finished`'s lock, so the wait below cannot miss it.
        let called: Arc<Mutex<Option<Result<(), ControlError>>>> = Arc::default();
        {
            let daemon = Arc::clone(self);
            let called = Arc::clone(&called);
            std::thread::Builder::new()
                .name("owsfs-umount".into())
                .spawn(move || {
                    let r = daemon.unmount(lazy);
                    let guard = daemon.finished.lock();
                    *called.lock() = Some(r);
                    drop(guard);
                    daemon.finished_cv.notify_all();
                })
                .map_err(|e| {
                    ControlError::Other(format!("cannot start the unmount thread: {e}"))
                })?;
        }
        let mut finished = self.finished.lock();
        loop {
            // Taken apart from the match, so `called` is not locked while waiting.
            let outcome = called.lock().clone();
            match (outcome, &*finished) {
                (Some(Err(why)), _) => return Err(why),
                (Some(Ok(())), _) if lazy => return Ok(true),
                (_, Some(done)) if !lazy => {
                    return done.clone().map(|()| false).map_err(ControlError::Unmount);
                }
                _ => self.finished_cv.wait(&mut finished),
            }
        }
    }

    /// Unmounts the workspace; the serving thread then hands off and exits.
    pub fn unmount(&self, lazy: bool) -> Result<(), ControlError> {
        if let Some(dir) = self.adopted.get() {
            // Once unmounted, an adopted directory is a plain one that anybody may write, and
            // the last cut reads it then: commit first, while every write goes through the
            // mount, so that the last cut holds only what came in the moment before.
            if let Err(e) = self.sync(ADOPTED_SYNC_BEFORE_UNMOUNT) {
                tracing::warn!(
                    "the commit before unmounting the adopted directory {} failed: {e}",
                    dir.display()
                );
            }
        }
        let how = owsfs_sys::mount::UnmountHow { lazy, force: false };
        // A user's mount goes through the setuid fusermount3 helper.
        match owsfs_sys::mount::unmount(&self.mountpoint, how) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                Err(ControlError::Busy(self.mountpoint.clone()))
            }
            Err(e) => Err(ControlError::Other(format!(
                "cannot unmount {}: {e}",
                self.mountpoint.display()
            ))),
        }
    }

    /// Registers a control connection that will report the end of the session: the process
    /// does not exit until the returned guard is dropped (or 5 s pass).
    pub fn waiter(&self) -> Waiter<'_> {
        *self.waiters.lock() += 1;
        Waiter { daemon: self }
    }

    /// Gives waiting control connections a moment to answer before the process exits.
    pub fn drain_waiters(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut w = self.waiters.lock();
        while *w > 0 {
            if self.waiters_cv.wait_until(&mut w, deadline).timed_out() {
                break;
            }
        }
    }

    /// The session has ended: how the handoff went.
    pub fn finish(&self, result: Result<(), String>) {
        *self.finished.lock() = Some(result);
        self.finished_cv.notify_all();
    }
}

/// Keeps the daemon process alive until a control connection has answered.
pub struct Waiter<'a> {
    daemon: &'a Daemon,
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        *self.daemon.waiters.lock() -= 1;
        self.daemon.waiters_cv.notify_all();
    }
}

/// SIGINT and SIGTERM unmount cleanly (or detach, when the mount is busy).
pub fn spawn_signal_handler(daemon: Arc<Daemon>) -> anyhow::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .context("cannot install signal handlers")?;
    std::thread::Builder::new()
        .name("owsfs-signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                tracing::info!("signal {sig}: unmounting");
                if let Err(e) = daemon.unmount(false) {
                    tracing::warn!("{e}; detaching instead");
                    if let Err(e) = daemon.unmount(true) {
                        tracing::error!("cannot unmount: {e}");
                    }
                }
            }
        })
        .context("cannot start the signal thread")?;
    Ok(())
}

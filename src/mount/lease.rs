//! The lease phase: the workspace's writer lease, held by a guard. The guard runs the keeper
//! (renewals and the fail-stop watchdog) and, when dropped, stops it and gives the lease back
//! when that is safe: always before the mount served anything, and afterwards only when
//! nothing unsynced is left (otherwise the lease lapses after its TTL, and the changes stay
//! in the cache for the next mount of it).

use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use owsfs_fuse::Core;
use owsfs_journal::Journal;
use owsfs_local::Cache;
use owsfs_store::generation::Workspace;
use owsfs_sync::lease::{Keeper, Takeover};

/// What becomes of the lease when its guard goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Release {
    /// Give it back (nothing was served yet).
    Always,
    /// Give it back only if the journal holds nothing unsynced.
    IfClean,
    /// Already handed off, or lost.
    Done,
}

/// The writer lease of one workspace, taken for this process.
pub struct LeaseGuard {
    keeper: Arc<Keeper>,
    thread: Option<JoinHandle<()>>,
    /// Fail-stop stops writes through this core once it exists.
    core: Arc<OnceLock<Arc<Core>>>,
    journal: Option<Arc<Journal>>,
    release: Release,
}

/// How to take a lease.
pub struct LeaseRequest<'a> {
    pub ws: &'a Workspace,
    pub cache: &'a Cache,
    pub ttl: Duration,
    pub takeover: Takeover,
    /// Progress while waiting for another holder, for the user.
    pub notice: &'a mut dyn FnMut(&str),
    /// Written at fail-stop (`CACHE/stopped.json`): informational, for the next mount.
    pub note_stop: bool,
    /// The mount's path, recorded in the lease (see `identity::check_default_name`).
    pub mountpoint: Option<&'a std::path::Path>,
}

impl LeaseGuard {
    /// Takes the lease (waiting or stealing as asked) and starts keeping it.
    pub fn take(req: LeaseRequest<'_>) -> anyhow::Result<LeaseGuard> {
        let ws = req.ws;
        let mut holder = owsfs_sync::lease::holder(req.cache)?;
        if let Some(mp) = req.mountpoint {
            holder.mountpoint = mp.to_string_lossy().into_owned();
        }
        let (held, acquired_at) =
            owsfs_sync::lease::acquire(ws, &holder, req.ttl, req.takeover, req.notice)?;
        tracing::info!(
            "lease of workspace {:?} taken at epoch {} ({holder})",
            ws.name(),
            held.epoch
        );
        let core: Arc<OnceLock<Arc<Core>>> = Arc::default();
        let on_lost = {
            let core = Arc::clone(&core);
            let stopped = req.note_stop.then(|| req.cache.root.join("stopped.json"));
            let ws_name = ws.name().to_string();
            let epoch = held.epoch;
            move |why: &str| {
                if let Some(path) = &stopped {
                    let note = serde_json::json!({
                        "workspace": ws_name,
                        "epoch": epoch,
                        "reason": why,
                        "time_unix_ms": jiff::Timestamp::now().as_millisecond(),
                    });
                    if let Err(e) = std::fs::write(path, note.to_string()) {
                        tracing::warn!("cannot write {}: {e}", path.display());
                    }
                }
                if let Some(core) = core.get() {
                    core.stop_writes(why);
                }
            }
        };
        let keeper = Keeper::new(ws, held, acquired_at, Box::new(on_lost));
        let mut guard = LeaseGuard {
            keeper: Arc::clone(&keeper),
            thread: None,
            core,
            journal: None,
            release: Release::Always,
        };
        // From here on an error gives the lease back (the guard's drop).
        fail::fail_point!("mount-after-lease", |_| Err(anyhow::anyhow!(
            "fail point mount-after-lease"
        )));
        guard.thread = Some(
            std::thread::Builder::new()
                .name("owsfs-lease".into())
                .spawn(move || keeper.run())
                .context("cannot start the lease thread")?,
        );
        Ok(guard)
    }

    pub fn keeper(&self) -> &Arc<Keeper> {
        &self.keeper
    }

    pub fn epoch(&self) -> u64 {
        self.keeper.epoch()
    }

    /// Fail-stop stops writes through `core` from now on (and at once if the lease was lost
    /// before it existed).
    pub fn attach(&self, core: &Arc<Core>) {
        let _ = self.core.set(Arc::clone(core));
        if let Some(why) = self.keeper.lost_reason() {
            core.stop_writes(&why);
        }
    }

    /// The mount serves from now on: the lease is given back only once everything `journal`
    /// holds is in the store.
    pub fn serving(&mut self, journal: &Arc<Journal>) {
        self.journal = Some(Arc::clone(journal));
        self.release = Release::IfClean;
    }

    /// The handoff's last step: stops the keeper and releases the lease if nothing is left
    /// unsynced. `why_dirty` says why the journal still holds changes, for the message.
    pub fn hand_off(mut self, why_dirty: impl FnOnce() -> String) -> Result<(), String> {
        self.stop();
        self.release = Release::Done;
        if self.keeper.is_lost() {
            return Err(
                "writes were stopped (fail-stop); the lease is not ours to release".to_string(),
            );
        }
        if self.journal.as_ref().is_some_and(|j| j.is_dirty()) {
            return Err(format!(
                "the last changes could not be committed ({}); they stay in the cache and go to \
                 the store at the next mount of it. The lease was not released: it lapses {:.0}s \
                 after the last renewal",
                why_dirty(),
                self.keeper.ttl().as_secs_f64()
            ));
        }
        match self.keeper.release() {
            Ok(()) => {
                tracing::info!("lease released");
                Ok(())
            }
            Err(e) => Err(format!("cannot release the lease: {e:#}")),
        }
    }

    fn stop(&mut self) {
        self.keeper.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        self.stop();
        let release = match self.release {
            Release::Done => false,
            Release::Always => true,
            Release::IfClean => !self.journal.as_ref().is_some_and(|j| j.is_dirty()),
        };
        if self.keeper.is_lost() {
            return;
        }
        if !release {
            if self.release != Release::Done {
                tracing::warn!(
                    "the lease is kept until it lapses: unsynced changes stay in the cache"
                );
            }
            return;
        }
        match self.keeper.release() {
            Ok(()) => tracing::info!("lease released"),
            Err(e) => tracing::warn!("cannot release the lease: {e:#}"),
        }
    }
}

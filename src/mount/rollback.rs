//! The rollback of a live mount (`owsfs rollback MOUNTPOINT REF`): a new generation whose tree
//! is REF's, and the mount serving it at once, lazily hydrated. In order:
//!
//! 1. everything written so far is made durable, while writers go on;
//! 2. the prefetch and the hydration saver stop, and kernel requests are held back
//!    ([`Core::hold_requests`]): nothing sees the tree half replaced;
//! 3. under the sync agent's cache lock ([`SyncAgent::rollback_to`]): what was written since
//!    step 1 is committed, the newest commit gets an automatic snapshot, the new generation
//!    is committed, and the cache becomes its lazy copy below the same backing root (the old
//!    entries go to `CACHE/rollback.trash/N`); every inode, handle and open directory from
//!    before becomes stale ([`Core::replaced_tree`]); the hydrator loads its new state and
//!    materializes the root (one fetch: the root's tree);
//! 4. requests flow again, and the kernel is told to drop every cached name (a notification
//!    may wait on a directory lock a held-back request holds, so this comes after);
//! 5. the prefetch starts on the new tree; the old tree is removed in the background.
//!
//! SEMANTICS.md ("Rollback") says what programs see.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use owsfs_fuse::{Core, ROOT_INO};
use owsfs_hydrate::Hydrator;
use owsfs_store::Store;
use owsfs_store::generation::{GenerationRecord, Workspace};
use owsfs_sync::SyncAgent;
use parking_lot::Mutex;

use super::HydrationThreads;
use crate::control::{ControlError, LiveRollback};

/// How the kernel is told that every name it cached is gone.
pub struct Forget {
    pub notifier: owsfs_fuse::fuser::Notifier,
    /// Drops every cached name, negative ones included, at once (Linux 6.16 and root); without
    /// it, each name the root holds is invalidated (deeper ones go with them), and a name
    /// cached as absent stays so until its timeout.
    pub epoch: Option<owsfs_fuse::EpochNotifier>,
}

impl Forget {
    /// The attributes of what the kernel still holds of the old tree (files open across the
    /// rollback): its next use asks the daemon, which answers ESTALE. Their pages stay. Sent
    /// while requests are still held back: an attribute-only invalidation takes no lock a
    /// held-back request may hold, and no write(2) can slip in before it.
    fn drop_attributes(&self, stale: &[owsfs_fuse::FuseIno]) {
        for ino in stale {
            let _ = self
                .notifier
                .inval_inode(owsfs_fuse::fuser::INodeNo(ino.0), -1, 0);
        }
    }

    fn forget(&self, root_names: &[std::ffi::OsString]) {
        let root = owsfs_fuse::fuser::INodeNo(ROOT_INO.0);
        let by_epoch = match &self.epoch {
            Some(e) => match e.inc_epoch() {
                Ok(()) => true,
                Err(err) => {
                    tracing::info!(
                        "rollback: the kernel does not take FUSE_NOTIFY_INC_EPOCH ({err}); \
                         invalidating the root's names one by one"
                    );
                    false
                }
            },
            None => false,
        };
        if !by_epoch {
            for name in root_names {
                if let Err(e) = self.notifier.inval_entry(root, name) {
                    tracing::debug!("rollback: invalidate {name:?}: {e}");
                }
            }
        }
        // The root's attributes (times, link count) and any listing the kernel kept.
        if let Err(e) = self.notifier.inval_inode(root, 0, 0) {
            tracing::debug!("rollback: invalidate the root: {e}");
        }
    }
}

/// What a live rollback works with: the serving mount's parts.
pub struct Rollback {
    pub core: Arc<Core>,
    pub agent: Arc<SyncAgent>,
    pub hyd: Arc<Hydrator>,
    pub store: Arc<Store>,
    pub hydration: Arc<HydrationThreads>,
    pub forget: Forget,
    pub cache_root: PathBuf,
    pub backing: PathBuf,
    /// One rollback at a time.
    pub one: Mutex<()>,
}

impl Rollback {
    /// Rolls the mount back to `spec` (a reference); answers once the new tree is served.
    pub fn run(
        &self,
        spec: &str,
        keep: usize,
        timeout: Duration,
    ) -> Result<LiveRollback, ControlError> {
        let _one = self.one.lock();
        let started = Instant::now();
        let ws = self.agent.workspace().clone();
        let r: owsfs_store::GenRef = spec.parse().map_err(ControlError::BadRequest)?;
        ws.resolve(&r)
            .map_err(|e| ControlError::Other(e.to_string()))?;
        // 1. Writers go on meanwhile; the rest of their changes is committed in step 3. The
        // kernel's dirty pages (shared mmaps, the writeback cache) are pushed first: a clean
        // journal would not make the sync push them.
        self.agent.push_dirty_pages();
        self.agent.sync(timeout).map_err(|e| match e {
            owsfs_sync::SyncError::ShuttingDown => ControlError::ShuttingDown,
            e => ControlError::Other(format!("not rolled back: {e}")),
        })?;
        // 2.
        self.hydration.stop();
        let held_at = Instant::now();
        let held = self.core.hold_requests();
        let mut names = Vec::new();
        let mut replaced = false;
        let mut hydrator_ok = true;
        let mut trash = None;
        let mut to = None;
        // 3. REF is read again there, milliseconds before the commit.
        let resolve = || -> anyhow::Result<GenerationRecord> {
            let r = ws.resolve(&r)?;
            to = Some(r.clone());
            Ok(r)
        };
        let done = self.agent.rollback_to(resolve, keep, |local, record| {
            owsfs_hydrate::prepare::rebase_state(&ws, local, &self.backing, record)?;
            // From here on the cache's state is the new tree's: the mount follows it whatever
            // fails (the root, pending, is emptied when it is materialized).
            let moved =
                owsfs_hydrate::prepare::move_aside(&self.cache_root, &self.backing, record.number);
            names = self.core.replaced_tree();
            replaced = true;
            if let Err(e) = self.hyd.reload(&self.core.journal().dirty()) {
                hydrator_ok = false;
                return Err(e.context("cannot load the new tree's hydration state"));
            }
            trash = Some(moved?);
            // One fetch (the root's tree); if the store does not answer now, the first
            // lookup fetches it.
            let root = self.hyd.root_ino();
            if let Err(e) = self
                .core
                .with_barrier_shared(|| self.hyd.materialize_dir(root, self.hyd.root_fd()))
            {
                tracing::warn!("rollback: the root directory is fetched on first use: {e}");
            }
            Ok(())
        });
        // 4.
        if replaced {
            self.forget.drop_attributes(&self.core.stale_inodes());
        }
        drop(held);
        if replaced {
            self.forget.forget(&names);
        }
        let visible_ms = held_at.elapsed().as_secs_f64() * 1000.0;
        // 5.
        let access = match (&done, &to) {
            (Ok(_), Some(to)) => {
                let access = self.access_list(&ws, to);
                self.agent.set_inherited_access(access.clone());
                access
            }
            // Nothing changed (or the mount stopped writing): the prefetch goes on with what
            // is pending, in no particular order.
            _ => Vec::new(),
        };
        // A hydrator that could not load its state is left alone (the mount stopped writing;
        // its next mount starts from the cache's state).
        if hydrator_ok {
            self.hydration.start(access);
        }
        if let Some(t) = trash {
            owsfs_hydrate::prepare::remove_trash(t);
        }
        let done = done.map_err(|e| ControlError::Other(format!("{e:#}")))?;
        tracing::info!(
            "rolled back to generation {} as generation {} (visible after {visible_ms:.1} ms{})",
            done.to,
            done.generation,
            done.snapshot
                .as_deref()
                .map(|s| format!("; the state before is snapshot {s}"))
                .unwrap_or_default()
        );
        Ok(LiveRollback {
            generation: done.generation,
            to: done.to,
            snapshot: done.snapshot,
            visible_ms,
            total_ms: started.elapsed().as_secs_f64() * 1000.0,
        })
    }

    /// The access list of generation `to` (now the base's), to order the prefetch; empty
    /// when it has none or it cannot be read.
    fn access_list(&self, ws: &Workspace, to: &GenerationRecord) -> Vec<String> {
        let Some(r) = to.access else {
            return Vec::new();
        };
        let read = || -> anyhow::Result<Vec<String>> {
            let data = owsfs_store::read_blob(&self.store, &r)?;
            owsfs_local::access::decode(&data)
        };
        read().unwrap_or_else(|e| {
            tracing::warn!(
                "cannot read the access list of generation {} of {}: {e:#}",
                to.number,
                ws.name()
            );
            Vec::new()
        })
    }
}

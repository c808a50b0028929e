//! Phase 6: the FUSE session, mounted.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use owsfs_fuse::durable::Waiter;
use owsfs_fuse::{AdapterOptions, Core, MountSettings};

use super::{rollback, supervisor};
use crate::options::MountOptions;

/// Phase 6: the FUSE session, mounted. Until it has served, dropping it detaches the mount.
pub struct Mounted {
    session: Option<owsfs_fuse::fuser::Session<owsfs_fuse::FuseAdapter>>,
    mountpoint: PathBuf,
    epoch: Option<owsfs_fuse::EpochNotifier>,
    /// This daemon took over the connection: the kernel is to send unanswered requests again.
    resend: bool,
}

impl Mounted {
    /// Mounts. `resumable`: a supervisor will keep the connection for the daemon after this
    /// one ([`Mounted::hand_over`]).
    pub fn mount(
        core: &Arc<Core>,
        mountpoint: &Path,
        o: &MountOptions,
        fsname: &str,
        resumable: bool,
        durable: Option<Arc<Waiter>>,
    ) -> anyhow::Result<Mounted> {
        let (adapter, settings) = Self::settings(o, fsname, durable);
        let (session, epoch) =
            owsfs_fuse::mount(Arc::clone(core), adapter, mountpoint, &settings, resumable)
                .with_context(|| format!("cannot mount on {}", mountpoint.display()))?;
        Ok(Mounted {
            session: Some(session),
            mountpoint: mountpoint.to_path_buf(),
            epoch,
            resend: false,
        })
    }

    /// Takes over the live connection of the mount at `mountpoint`, whose daemon died or was
    /// replaced; the requests it left unanswered come again once this one serves.
    pub fn resume(
        core: &Arc<Core>,
        mountpoint: &Path,
        o: &MountOptions,
        fsname: &str,
        r: supervisor::Resume,
        durable: Option<Arc<Waiter>>,
    ) -> anyhow::Result<Mounted> {
        let (adapter, settings) = Self::settings(o, fsname, durable);
        let (session, epoch) =
            owsfs_fuse::resume(Arc::clone(core), adapter, r.device, &r.init, &settings)
                .with_context(|| {
                    format!(
                        "cannot take over the connection of {}",
                        mountpoint.display()
                    )
                })?;
        Ok(Mounted {
            session: Some(session),
            mountpoint: mountpoint.to_path_buf(),
            epoch: Some(epoch),
            resend: true,
        })
    }

    /// Gives the supervisor the connection (a worker that mounted it; a later one's
    /// supervisor has it already).
    pub fn hand_over(&self, worker: &supervisor::Worker) -> anyhow::Result<()> {
        if self.resend {
            supervisor::CONNECTION_KEPT.store(true, std::sync::atomic::Ordering::Relaxed);
            return Ok(());
        }
        let session = self.session.as_ref().expect("a mounted session");
        let (Some(epoch), Some(init)) = (&self.epoch, session.init_request()) else {
            anyhow::bail!("this mount's connection cannot be handed over (not mounted as root)");
        };
        if session.serves_uring() {
            // Linux (6.18) sends again only the requests read from /dev/fuse: those a dead
            // daemon held in its io_uring entries would wait for good.
            tracing::warn!(
                "served through FUSE over io_uring: the kernel cannot send a dead daemon's \
                 requests again, so this daemon's death will end the mount (and `owsfs \
                 restart` is refused); mount with -o uring=off to keep the mount across it"
            );
            return Ok(());
        }
        if !owsfs_fuse::kernel_resends(init) {
            // Without FUSE_NOTIFY_RESEND (Linux < 6.9) the calls a dead daemon had read would
            // wait for good: its death must end the connection, as it always did.
            tracing::warn!(
                "the kernel cannot send unanswered requests again (FUSE_NOTIFY_RESEND, Linux \
                 6.9): this daemon's death will end the mount"
            );
            return Ok(());
        }
        worker.hand_over(&epoch.device()?, init)?;
        supervisor::CONNECTION_KEPT.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Asks the kernel for the requests an earlier daemon left unanswered (after a takeover).
    pub fn resend(&self) {
        if let (true, Some(epoch)) = (self.resend, &self.epoch) {
            match epoch.resend() {
                Ok(()) => tracing::info!("asked the kernel to send unanswered requests again"),
                Err(e) => tracing::warn!(
                    "the kernel cannot send unanswered requests again ({e}): programs that \
                     were waiting for the dead daemon wait for good"
                ),
            }
        }
    }

    fn settings(
        o: &MountOptions,
        fsname: &str,
        durable: Option<Arc<Waiter>>,
    ) -> (AdapterOptions, MountSettings) {
        let adapter = AdapterOptions {
            entry_ttl: o.entry_timeout,
            attr_ttl: o.attr_timeout,
            negative_ttl: o.negative_timeout,
            max_write: o.max_write,
            writeback_cache: o.writeback_cache,
            posix_acl: o.posix_acl,
            strict: o.strict,
            durable,
            uring: o.uring,
        };
        let settings = MountSettings {
            fsname: fsname.to_string(),
            threads: o.threads,
            flags: o.kernel.clone(),
            read_only: o.read_only,
            // As many serving threads as /dev/fuse would have, spread over the CPUs.
            uring_threads: match o.uring {
                owsfs_fuse::Uring::Off => 0,
                _ => o
                    .threads
                    .div_ceil(std::thread::available_parallelism().map_or(1, |n| n.get()))
                    .max(1),
            },
        };
        (adapter, settings)
    }

    /// What a live rollback tells the kernel: every cached name goes.
    pub fn forgetter(&mut self) -> rollback::Forget {
        rollback::Forget {
            notifier: self
                .session
                .as_ref()
                .map(|s| s.notifier())
                .expect("a mounted session"),
            epoch: self.epoch.as_ref().and_then(|e| e.try_clone().ok()),
        }
    }

    /// Ask the kernel to drop a name (for the inode reaper), and an inode's cached attributes
    /// or pages (after the daemon changed them behind the kernel).
    pub fn invalidators(&self) -> (owsfs_fuse::Invalidator, owsfs_fuse::InodeInvalidator) {
        let session = self.session.as_ref().expect("a mounted session");
        let names = session.notifier();
        let attrs = session.notifier();
        (
            Box::new(move |parent, name| {
                names.inval_entry(owsfs_fuse::fuser::INodeNo(parent.0), name)
            }),
            std::sync::Arc::new(move |ino, offset, len| {
                attrs.inval_inode(owsfs_fuse::fuser::INodeNo(ino.0), offset, len)
            }),
        )
    }

    /// Phase 7: serves until the kernel ends the session (an unmount).
    pub fn serve(mut self) -> std::io::Result<()> {
        match self.session.take() {
            Some(s) => s.run(),
            None => Ok(()),
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        // A connection taken over is the supervisor's to end: a daemon that fails before it
        // serves leaves it for the next one.
        if self.session.take().is_some() && !self.resend {
            // Never served: nobody should find a dead mount here.
            let lazy = owsfs_sys::mount::UnmountHow {
                lazy: true,
                force: false,
            };
            let _ = owsfs_sys::mount::unmount(&self.mountpoint, lazy);
        }
    }
}

/// Phase 6 of a writer's mount: its session mounted, or taken over from a dead daemon, with
/// the durability thread, and handed to the supervisor.
pub struct WriterSession<'a> {
    pub core: &'a Arc<Core>,
    pub agent: &'a Arc<owsfs_sync::SyncAgent>,
    pub mountpoint: &'a Path,
    pub o: &'a MountOptions,
    pub fsname: &'a str,
}

impl WriterSession<'_> {
    pub fn attach(
        self,
        worker: Option<&supervisor::Worker>,
        resume: Option<supervisor::Resume>,
    ) -> anyhow::Result<Mounted> {
        let durable = Arc::new(
            Waiter::start(Arc::new(AgentDurable {
                agent: Arc::clone(self.agent),
                timeout: self.o.strict_timeout,
            }))
            .context("cannot start the durability thread")?,
        );
        let (core, mp, o, fsname) = (self.core, self.mountpoint, self.o, self.fsname);
        let mounted = match resume {
            Some(r) => Mounted::resume(core, mp, o, fsname, r, Some(durable))?,
            None => Mounted::mount(core, mp, o, fsname, worker.is_some(), Some(durable))?,
        };
        if let Some(w) = worker {
            mounted.hand_over(w)?;
        }
        Ok(mounted)
    }
}

/// What strict fsyncs and `OWSFS_IOC_SYNC` wait for: the agent's sync (everything the journal
/// recorded before the call durable in the store), at most `timeout`.
struct AgentDurable {
    agent: Arc<owsfs_sync::SyncAgent>,
    timeout: std::time::Duration,
}

impl owsfs_fuse::durable::Durable for AgentDurable {
    fn wait(&self, push_pages: bool) -> Result<u64, (i32, String)> {
        if push_pages {
            self.agent.push_dirty_pages();
        }
        self.agent.sync(self.timeout).map_err(|e| {
            let errno = match &e {
                owsfs_sync::SyncError::NotDurable { why, .. } if why.contains("disk is full") => {
                    libc::ENOSPC
                }
                _ => libc::EIO,
            };
            (errno, e.to_string())
        })
    }
}

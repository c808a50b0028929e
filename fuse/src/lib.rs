//! owsfs-fuse: the passthrough filesystem core ([`Core`]) and its thin fuser adapter
//! ([`FuseAdapter`]).
//!
//! Architecture invariant: every mutation of the backing directory made through the core is
//! appended to the journal before it is performed, so the journal's dirty state is always a
//! superset of what changed.

mod adapter;
mod core;
pub mod durable;
mod error;
mod freeze;
mod hydrate;
mod inode;
mod kind;
pub mod nodes;
pub mod stats;

use std::io;
use std::path::Path;
use std::sync::Arc;

pub use adapter::{AdapterOptions, FuseAdapter, Uring};
pub use core::{
    Caller, Core, CoreOptions, DirEntries, DirEntry, Entry, InodeInvalidator, Invalidator, IoMode,
    SetAttr, Succession, TimeSpec, XattrReply,
};
pub use error::{FsError, FsResult};
pub use freeze::{Freezer, Frozen};
pub use hydrate::Hydrate;
pub use inode::ROOT_INO;
pub use owsfs_journal::{BackingIno, FuseIno, InoMap};
pub use stats::{Stats, StatsSnapshot};

pub use fuser;

/// `openat` for the daemon's own opens of backing files and directories, with `O_NOATIME`:
/// the workspace is noatime, and getattr reports the backing atime, which the backing
/// filesystem (relatime) would otherwise move on the daemon's reads (serving reads, reading
/// around writes, listing directories, cutting generations). `O_NOATIME` needs the file's
/// owner or CAP_FOWNER; a daemon with neither opens without it.
pub fn openat_noatime<P: rustix::path::Arg + Copy>(
    dir: impl std::os::fd::AsFd,
    path: P,
    flags: rustix::fs::OFlags,
) -> rustix::io::Result<std::os::fd::OwnedFd> {
    let m = rustix::fs::Mode::empty();
    match rustix::fs::openat(&dir, path, flags | owsfs_sys::fs::NOATIME, m) {
        Err(rustix::io::Errno::PERM) => rustix::fs::openat(&dir, path, flags, m),
        r => r,
    }
}

/// How a session is mounted.
#[derive(Clone, Debug)]
pub struct MountSettings {
    /// Shown as the mount source in /proc/mounts (owsfs uses the cache directory).
    pub fsname: String,
    /// Worker threads reading /dev/fuse.
    pub threads: usize,
    /// Kernel mount flags from `-o` (nosuid, nodev, noexec, ...). Without `dev` and `suid`
    /// the mount is nodev,nosuid.
    pub flags: Vec<String>,
    pub read_only: bool,
    /// Threads (each with its ring entry) per CPU serving FUSE over io_uring, when INIT
    /// settled it; zero: /dev/fuse only.
    pub uring_threads: usize,
}

/// A descriptor of the session's `/dev/fuse`, for what fuser has no call for: notifications
/// without arguments, and handing the connection to another process.
pub struct EpochNotifier(std::os::fd::OwnedFd);

impl EpochNotifier {
    /// Asks the kernel to drop every cached name of the mount at once (FUSE_NOTIFY_INC_EPOCH,
    /// Linux 6.16): each cached entry, negative ones too, is looked up again before its next
    /// use. An error (EINVAL from an older kernel) says it was not taken.
    pub fn inc_epoch(&self) -> io::Result<()> {
        /// `fuse_notify_code::FUSE_NOTIFY_INC_EPOCH` (protocol 7.44).
        const FUSE_NOTIFY_INC_EPOCH: i32 = 8;
        self.notify(FUSE_NOTIFY_INC_EPOCH)
    }

    /// Asks the kernel to send again every request an earlier daemon of this connection read
    /// and never answered (FUSE_NOTIFY_RESEND, Linux 6.9): they go back to the queue, marked
    /// `FUSE_UNIQUE_RESEND`, and this daemon serves them.
    pub fn resend(&self) -> io::Result<()> {
        /// `fuse_notify_code::FUSE_NOTIFY_RESEND` (protocol 7.40).
        const FUSE_NOTIFY_RESEND: i32 = 7;
        self.notify(FUSE_NOTIFY_RESEND)
    }

    fn notify(&self, code: i32) -> io::Result<()> {
        // struct fuse_out_header { u32 len; i32 error (the code); u64 unique (0) }.
        let mut msg = [0u8; 16];
        msg[..4].copy_from_slice(&16u32.to_ne_bytes());
        msg[4..8].copy_from_slice(&code.to_ne_bytes());
        let n = rustix::io::write(&self.0, &msg)?;
        if n != msg.len() {
            return Err(io::Error::other("short write of a notification"));
        }
        Ok(())
    }

    /// Another descriptor of the connection (for the supervisor that keeps it open).
    pub fn device(&self) -> io::Result<std::os::fd::OwnedFd> {
        Ok(rustix::io::fcntl_dupfd_cloexec(&self.0, 0)?)
    }

    pub fn try_clone(&self) -> io::Result<EpochNotifier> {
        self.device().map(EpochNotifier)
    }
}

/// Whether the kernel of a connection resends unanswered requests when asked
/// (`FUSE_HAS_RESEND`, flag bit 39 of its INIT, Linux 6.9): `init_request` is the INIT as
/// `fuser::Session::init_request` returns it.
pub fn kernel_resends(init_request: &[u8]) -> bool {
    // struct fuse_in_header (40 bytes), then fuse_init_in: major, minor, max_readahead,
    // flags, flags2 (u32 each, native endian); bit 39 is bit 7 of flags2.
    const FLAGS2: usize = 40 + 16;
    init_request
        .get(FLAGS2..FLAGS2 + 4)
        .map(|b| u32::from_ne_bytes(b.try_into().expect("4 bytes")))
        .is_some_and(|flags2| flags2 & (1 << 7) != 0)
}

/// fuser's settings of a session: who may use the mount and how many threads serve it. A
/// connection that must outlive this daemon (`resumable`) is read through one descriptor by
/// every thread: the kernel ends the requests in flight on a cloned descriptor when it
/// closes, which the daemon's death would do.
fn session_config(settings: &MountSettings, resumable: bool) -> fuser::Config {
    let root = rustix::process::geteuid().is_root();
    let mut config = fuser::Config::default();
    // Other users of the machine see the workspace like any local directory; the kernel still
    // enforces permissions (default_permissions).
    config.acl = if root {
        fuser::SessionACL::All
    } else {
        fuser::SessionACL::Owner
    };
    // macFUSE serves one thread, without cloned devices.
    config.n_threads = Some(if owsfs_sys::mount::FUSE_CLONE_FD {
        settings.threads.max(1)
    } else {
        1
    });
    config.clone_fd = owsfs_sys::mount::FUSE_CLONE_FD && !resumable;
    config.uring_threads = settings.uring_threads;
    config
}

/// Takes over a mounted connection whose daemon died or was replaced: `device` is its
/// `/dev/fuse` descriptor, kept open meanwhile by the supervisor, and `init_request` the
/// kernel's INIT of it (`fuser::Session::init_request`). The core answers what the kernel
/// asks from now on; the requests the earlier daemon left unanswered are asked again once
/// the returned notifier's `resend` is called.
pub fn resume(
    core: Arc<Core>,
    adapter: AdapterOptions,
    device: std::os::fd::OwnedFd,
    init_request: &[u8],
    settings: &MountSettings,
) -> io::Result<(fuser::Session<FuseAdapter>, EpochNotifier)> {
    let config = session_config(settings, true);
    let notifier = EpochNotifier(rustix::io::fcntl_dupfd_cloexec(&device, 0)?);
    let adapter = FuseAdapter::new(core, adapter);
    let session = fuser::Session::resume(adapter, device, config.acl, config, init_request)?;
    Ok((session, notifier))
}

/// Mounts `core` at `mountpoint` as filesystem type `fuse.owsfs`; the returned session is
/// mounted and initialised (the kernel's INIT has been answered), so the mount is ready when
/// this returns. On any failure nothing stays mounted. With it, when the daemon holds
/// `/dev/fuse` itself (root), a way to drop every cached name ([`EpochNotifier`]).
pub fn mount(
    core: Arc<Core>,
    adapter: AdapterOptions,
    mountpoint: &Path,
    settings: &MountSettings,
    resumable: bool,
) -> io::Result<(fuser::Session<FuseAdapter>, Option<EpochNotifier>)> {
    let root = rustix::process::geteuid().is_root();
    let mut config = session_config(settings, resumable);
    config.uring_root = Some(mountpoint.to_path_buf());
    let max_write = adapter.max_write;
    let adapter = FuseAdapter::new(core, adapter);
    if !root {
        // An unprivileged mount goes through the setuid fusermount3 helper.
        config.mount_options = vec![
            fuser::MountOption::FSName(settings.fsname.clone()),
            fuser::MountOption::Subtype("owsfs".into()),
            fuser::MountOption::DefaultPermissions,
        ];
        return fuser::Session::new(adapter, mountpoint, &config).map(|s| (s, None));
    }

    let kernel = owsfs_sys::mount::KernelFlags {
        read_only: settings.read_only,
        names: settings.flags.clone(),
    };
    let Some(dev) = owsfs_sys::mount::mount_fuse(&settings.fsname, mountpoint, &kernel, true)?
    else {
        // Not Linux: macFUSE mounts through fuser's library path.
        config.mount_options = vec![
            fuser::MountOption::FSName(settings.fsname.clone()),
            fuser::MountOption::Subtype("owsfs".into()),
            fuser::MountOption::DefaultPermissions,
        ];
        if settings.read_only {
            config.mount_options.push(fuser::MountOption::RO);
        }
        return fuser::Session::new(adapter, mountpoint, &config).map(|s| (s, None));
    };
    let dev = std::fs::File::from(dev);
    let epoch = dev.try_clone().ok().map(|d| EpochNotifier(d.into()));
    match fuser::Session::from_fd(adapter, std::os::fd::OwnedFd::from(dev), config.acl, config) {
        Ok(session) => {
            // After INIT, which sets the readahead to at most the kernel's default.
            if let Err(e) =
                owsfs_sys::mount::raise_readahead(mountpoint, u64::from(max_write) / 1024)
            {
                tracing::info!("readahead left as it is: {e}");
            }
            Ok((session, epoch))
        }
        Err(e) => {
            let lazy = owsfs_sys::mount::UnmountHow {
                lazy: true,
                force: false,
            };
            let _ = owsfs_sys::mount::unmount(mountpoint, lazy);
            Err(e)
        }
    }
}

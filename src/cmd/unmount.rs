//! `owsfs unmount`: the last generation, the lease released, the journal closed cleanly.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;

use crate::control::client::{self, ClientError};

#[derive(Args, Debug)]
pub struct UnmountArgs {
    /// The mountpoint of a running owsfs mount.
    pub mountpoint: PathBuf,
    /// Detach now even if files are open; the daemon finishes when the last one is closed.
    #[arg(long, short = 'l', env = "OWSFS_LAZY")]
    pub lazy: bool,
    /// (internal) Run by umount(8) as /sbin/umount.fuse.owsfs: never worse than umount(8)
    /// without a helper (see [`as_umount_helper`]).
    #[arg(long, hide = true)]
    pub umount_helper: bool,
    /// (internal, with --umount-helper) umount -f.
    #[arg(long, hide = true)]
    pub force: bool,
}

/// How long umount(8), through the helper, waits for the daemon's answer (its handoff)
/// before it unmounts in the kernel itself.
const HELPER_WAIT: Duration = Duration::from_secs(60);

pub fn run(args: &UnmountArgs) -> anyhow::Result<()> {
    if args.umount_helper {
        return as_umount_helper(args);
    }
    unmount(args, None)
}

/// Detaches at once; the last user of the mount finishes.
const LAZY: owsfs_sys::mount::UnmountHow = owsfs_sys::mount::UnmountHow {
    lazy: true,
    force: false,
};

/// umount(8)'s helper: a lazy unmount detaches in the kernel at once (the daemon hands off
/// when the session ends, as it always does); a plain one asks the daemon, so that it returns
/// once the handoff is done, and falls back to the kernel's unmount when the daemon does not
/// answer within `HELPER_WAIT` or cannot be asked (a hung daemon must not hang umount).
fn as_umount_helper(args: &UnmountArgs) -> anyhow::Result<()> {
    let mp = crate::mountpoint::absolute(&args.mountpoint)?;
    let how = owsfs_sys::mount::UnmountHow {
        lazy: args.lazy,
        force: args.force,
    };
    let kernel = |why: &str| -> anyhow::Result<()> {
        if crate::mountpoint::find_owsfs(&mp)?.is_none() {
            return Ok(());
        }
        if !why.is_empty() {
            eprintln!("owsfs: {why}; unmounting {} in the kernel", mp.display());
        }
        owsfs_sys::mount::unmount(&mp, how)
            .with_context(|| format!("cannot unmount {}", mp.display()))
    };
    if args.lazy || args.force {
        return kernel("");
    }
    match unmount(args, Some(HELPER_WAIT)) {
        Ok(()) => Ok(()),
        // umount(8)'s own answer to a busy mount.
        Err(e)
            if e.downcast_ref::<ClientError>().is_some_and(|c| {
                matches!(
                    c,
                    ClientError::Refused(crate::control::ControlError::Busy(_))
                )
            }) =>
        {
            Err(e)
        }
        Err(e) => kernel(&format!("{e:#}")),
    }
}

fn unmount(args: &UnmountArgs, timeout: Option<Duration>) -> anyhow::Result<()> {
    match client::unmount_within(&args.mountpoint, args.lazy, timeout) {
        Ok(_) => Ok(()),
        Err(ClientError::DaemonGone {
            mountpoint, cache, ..
        }) => {
            if crate::mountpoint::find_owsfs(&mountpoint)?.is_none() {
                // The session ended, then the daemon died before it answered: in the
                // handoff. There is no mount to remove, and the handoff's outcome is unknown.
                bail!(
                    "the daemon of {} died during the unmount, after the mount was gone (see \
                     {}): the last changes may not be in the store and the lease may not be \
                     released; the next mount of {} commits whatever is left",
                    mountpoint.display(),
                    cache.join("owsfs.log").display(),
                    cache.display()
                );
            }
            // Nobody serves this mount any more: remove it so the path is usable again.
            owsfs_sys::mount::unmount(&mountpoint, LAZY).with_context(|| {
                format!("cannot remove the dead mount at {}", mountpoint.display())
            })?;
            eprintln!(
                "owsfs: the daemon of {} was not running; removed the dead mount (its journal \
                 is replayed at the next mount of {})",
                mountpoint.display(),
                cache.display()
            );
            Ok(())
        }
        Err(ClientError::CacheGone {
            mountpoint, cache, ..
        }) => unmount_without_cache(&mountpoint, &cache),
        Err(e) => Err(e.into()),
    }
}

/// How long a daemon whose cache was deleted gets to end its mount after SIGTERM.
const STOP_WAIT: Duration = Duration::from_secs(30);

/// The cache (and with it the control socket) was deleted under a live mount: the daemon is
/// found through the mount (its command line names the mountpoint or the cache) and asked to
/// unmount with SIGTERM, as a foreground mount is; a mount still there after `STOP_WAIT`, or
/// one without a daemon, is detached.
fn unmount_without_cache(mountpoint: &Path, cache: &Path) -> anyhow::Result<()> {
    let daemons = daemons_of(mountpoint, cache);
    for pid in &daemons {
        // SAFETY: kill(2) with a pid read from /proc and a valid signal.
        if unsafe { libc::kill(*pid, libc::SIGTERM) } != 0 {
            let e = std::io::Error::last_os_error();
            anyhow::bail!(
                "the cache {} of {} was deleted, and its daemon (pid {pid}) cannot be stopped: \
                 {e}",
                cache.display(),
                mountpoint.display()
            );
        }
    }
    let start = Instant::now();
    while !daemons.is_empty()
        && start.elapsed() < STOP_WAIT
        && crate::mountpoint::find_owsfs(mountpoint)?.is_some()
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let detached = crate::mountpoint::find_owsfs(mountpoint)?.is_some();
    if detached {
        owsfs_sys::mount::unmount(mountpoint, LAZY)
            .with_context(|| format!("cannot remove the mount at {}", mountpoint.display()))?;
    }
    let pids: Vec<String> = daemons.iter().map(i32::to_string).collect();
    eprintln!(
        "owsfs: the cache {} of {} was deleted, and the changes that were only in it with it; {}",
        cache.display(),
        mountpoint.display(),
        match (daemons.is_empty(), detached) {
            (true, _) => "no daemon serves the mount: detached it".to_string(),
            (false, false) => format!("stopped its daemon (pid {})", pids.join(", ")),
            (false, true) => format!(
                "its daemon (pid {}) did not end the mount within {} s: detached it",
                pids.join(", "),
                STOP_WAIT.as_secs()
            ),
        }
    );
    Ok(())
}

/// The owsfs daemons whose command line names this mountpoint or this cache.
fn daemons_of(mountpoint: &Path, cache: &Path) -> Vec<i32> {
    crate::mountpoint::daemons()
        .into_iter()
        .filter(|d| {
            d.mountpoint.as_deref() == Some(mountpoint) || d.cache.as_deref() == Some(cache)
        })
        .map(|d| d.pid)
        .collect()
}

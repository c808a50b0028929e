//! `owsfs mount`: mounts a workspace, in the background unless `--foreground`; returns once
//! the mount is ready.

use std::path::PathBuf;

use clap::Args;

use crate::args::MountOpts;
use crate::mount::background::{self, DAEMON_CHILD_ENV, Readiness};
use crate::mount::supervisor;

#[derive(Args, Debug, Clone)]
pub struct MountArgs {
    /// Where the workspace appears: an existing, empty directory.
    pub mountpoint: PathBuf,
    #[command(flatten)]
    pub opts: MountOpts,
}

pub fn run(args: MountArgs) -> anyhow::Result<()> {
    // Checked here too, so a bad option fails before anything starts.
    let o = crate::options::parse(&args.opts.options)?;
    if o.remount {
        return remount(&args.mountpoint, &o);
    }
    let cache = args.opts.cache_dir(&args.mountpoint)?;
    let child = std::env::var_os(DAEMON_CHILD_ENV).is_some();
    if !(args.opts.foreground || child) {
        return background::spawn_background(&args.mountpoint, &args.opts, &cache);
    }
    let worker = supervisor::Worker::from_env()?;
    background::init_logging(&args.opts.log, args.opts.log_format);
    // A background writer's daemon runs under a supervisor, which keeps its connection: as
    // root on Linux (a mount through fusermount3 or macFUSE hands no descriptor of it over,
    // and opening inodes again by handle needs CAP_DAC_READ_SEARCH), and without kernel
    // passthrough (its backing ids and open modes die with the daemon).
    let supervised = !(args.opts.read_only || args.opts.at.is_some())
        && cfg!(target_os = "linux")
        && rustix::process::geteuid().is_root()
        && !o.passthrough;
    if child && supervised && worker.is_none() {
        let code = supervisor::supervise(&args.mountpoint)?;
        std::process::exit(code);
    }
    // A worker that takes over a live connection has nobody waiting for its readiness.
    let ready = Readiness::new(child && worker.as_ref().is_none_or(|w| w.resume.is_none()));
    crate::mount::serve_args(&args.mountpoint, &args.opts, &cache, &ready, worker).inspect_err(
        |e| {
            ready.failed(e);
        },
    )
}

/// `mount -o remount,ro|rw,...`: changes the flags of the owsfs mount at `mountpoint` (the
/// kernel's: read-only for the whole mount, nosuid, nodev, noexec, noatime for this mount
/// point); the daemon goes on serving. Writes to a read-only mount fail with EROFS in the
/// kernel before they reach the daemon.
fn remount(mountpoint: &std::path::Path, o: &crate::options::MountOptions) -> anyhow::Result<()> {
    let mp = crate::mountpoint::absolute(mountpoint)?;
    if crate::mountpoint::find_owsfs(&mp)?.is_none() {
        anyhow::bail!("{} is not an owsfs mount: nothing to remount", mp.display());
    }
    let flags = owsfs_sys::mount::KernelFlags {
        read_only: o.read_only,
        names: o.kernel.clone(),
    };
    owsfs_sys::mount::remount(&mp, &flags)?;
    Ok(())
}

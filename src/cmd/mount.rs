//! `owsfs mount`: mounts a workspace, in the background unless `--foreground`; returns once
//! the mount is ready.

use std::path::PathBuf;

use clap::Args;

use crate::args::MountOpts;
use crate::mount::background::{self, DAEMON_CHILD_ENV, Readiness};

#[derive(Args, Debug, Clone)]
pub struct MountArgs {
    /// Where the workspace appears: an existing, empty directory.
    pub mountpoint: PathBuf,
    #[command(flatten)]
    pub opts: MountOpts,
}

pub fn run(args: MountArgs) -> anyhow::Result<()> {
    // Checked here too, so a bad option fails before anything starts.
    crate::options::parse(&args.opts.options)?;
    let cache = args.opts.cache_dir(&args.mountpoint)?;
    let child = std::env::var_os(DAEMON_CHILD_ENV).is_some();
    if !(args.opts.foreground || child) {
        return background::spawn_background(&args.mountpoint, &args.opts, &cache);
    }
    let ready = Readiness::new(child);
    background::init_logging(&args.opts.log);
    crate::mount::serve_args(&args.mountpoint, &args.opts, &cache, &ready).inspect_err(|e| {
        ready.failed(e);
    })
}

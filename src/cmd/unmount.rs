//! `owsfs unmount`: the last generation, the lease released, the journal closed cleanly.

use std::path::PathBuf;

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
}

pub fn run(args: &UnmountArgs) -> anyhow::Result<()> {
    match client::unmount(&args.mountpoint, args.lazy) {
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
            rustix::mount::unmount(&mountpoint, rustix::mount::UnmountFlags::DETACH).with_context(
                || format!("cannot remove the dead mount at {}", mountpoint.display()),
            )?;
            eprintln!(
                "owsfs: the daemon of {} was not running; removed the dead mount (its journal \
                 is replayed at the next mount of {})",
                mountpoint.display(),
                cache.display()
            );
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

//! `owsfs handoff`: like a clean unmount, but a dead daemon is an error (nothing was handed
//! off) and success is said.

use std::path::PathBuf;

use clap::Args;

#[derive(Args, Debug)]
pub struct HandoffArgs {
    /// The mountpoint of a running owsfs mount.
    pub mountpoint: PathBuf,
}

pub fn run(args: &HandoffArgs) -> anyhow::Result<()> {
    crate::control::client::unmount(&args.mountpoint, false)?;
    eprintln!(
        "owsfs: {} handed off: everything written is in the store and the lease is released",
        args.mountpoint.display()
    );
    Ok(())
}

//! `owsfs sync`: prints the generation that holds everything written before the call.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

#[derive(Args, Debug)]
pub struct SyncArgs {
    /// The mountpoint of a running owsfs mount.
    pub mountpoint: PathBuf,
    /// Give up after this long (e.g. 30s, 5m).
    #[arg(long, env = "OWSFS_SYNC_TIMEOUT", default_value = "5m", value_parser = crate::args::parse_duration)]
    pub timeout: Duration,
}

pub fn run(args: &SyncArgs) -> anyhow::Result<()> {
    let g = crate::control::client::sync(&args.mountpoint, args.timeout)?;
    println!("{g}");
    Ok(())
}

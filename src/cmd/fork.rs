//! `owsfs fork SRC[@REF] NEW`: a new workspace starting from a state of another; no data is
//! copied.

use clap::Args;
use owsfs_store::Workspace;

use super::target;
use crate::args::StoreArgs;

#[derive(Args, Debug)]
pub struct ForkArgs {
    /// The source workspace, and optionally the state to start from: SRC, SRC@GEN,
    /// SRC@SNAPSHOT, SRC@'10m ago', SRC@2026-12-06T10:00:00Z [default: its newest commit].
    pub source: String,
    /// The name of the new workspace (it must not exist).
    pub new: String,
    #[command(flatten)]
    pub store: StoreArgs,
}

pub fn run(args: &ForkArgs) -> anyhow::Result<()> {
    let (src, r) = target::split_ref(&args.source)?;
    let t = target::open_existing(&args.store, &src)?;
    let record = t.resolve(&r)?;
    let fork = Workspace::fork(&t.store, &args.new, &t.ws, &record)?;
    println!("{}", fork.name());
    eprintln!(
        "workspace {} is a fork of {} at generation {} ({} files, {} bytes); mount it with \
         `owsfs mount MOUNTPOINT --workspace {}`",
        fork.name(),
        t.ws.name(),
        record.number,
        record.stats.files,
        record.stats.bytes_total,
        fork.name()
    );
    Ok(())
}

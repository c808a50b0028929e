//! `owsfs restore`: a state of a workspace into a new directory, every object verified.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use owsfs_store::GenRef;

use crate::args::StoreArgs;

#[derive(Args, Debug)]
pub struct RestoreArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// The workspace to restore.
    #[arg(long, env = "OWSFS_WORKSPACE")]
    pub workspace: String,
    /// The state to restore: a generation number, a snapshot name, `10m ago`, an RFC 3339
    /// time [default: the newest commit].
    #[arg(long, value_name = "REF")]
    pub at: Option<GenRef>,
    /// The generation (the same as --at N).
    #[arg(long, conflicts_with = "at")]
    pub generation: Option<u64>,
    /// Where to restore: a directory that does not exist yet, or is empty.
    pub dest: PathBuf,
}

pub fn run(args: &RestoreArgs) -> anyhow::Result<()> {
    let t = super::target::open_existing(&args.store, &args.workspace)?;
    let r = match (&args.at, args.generation) {
        (Some(r), _) => r.clone(),
        (None, Some(n)) => GenRef::Number(n),
        (None, None) => GenRef::Head,
    };
    let record = t.resolve(&r)?;
    let n = record.number;
    let root = record
        .root
        .with_context(|| format!("generation {n} has no tree"))?;
    // The restore refuses a directory that is not empty, and leaves nothing half-restored.
    super::target::restore_into(&t.store, &root, &args.dest)
        .with_context(|| format!("cannot restore generation {n} of {:?}", args.workspace))?;
    println!("{n}");
    Ok(())
}

//! `owsfs restore`: a generation of a workspace into a new directory, every object verified.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::args::StoreArgs;

#[derive(Args, Debug)]
pub struct RestoreArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// The workspace to restore.
    #[arg(long, env = "OWSFS_WORKSPACE")]
    pub workspace: String,
    /// The generation [default: the newest].
    #[arg(long)]
    pub generation: Option<u64>,
    /// Where to restore: a directory that does not exist yet, or is empty.
    pub dest: PathBuf,
}

pub fn run(args: &RestoreArgs) -> anyhow::Result<()> {
    let (store, ws, url) = super::log::open_existing(&args.store, &args.workspace)?;
    let record = match args.generation {
        Some(n) => ws
            .read_generation(n)
            .with_context(|| format!("cannot read generation {n}"))?,
        None => {
            let head = ws.head()?.with_context(|| {
                format!("workspace {:?} in {url} has no generation", args.workspace)
            })?;
            ws.newest_commit(head)?.with_context(|| {
                format!(
                    "workspace {:?} in {url} has no commit yet (only fences)",
                    args.workspace
                )
            })?
        }
    };
    let n = record.number;
    let root = record.root.with_context(|| {
        format!(
            "generation {n} is a fence (a new writer took the lease), not a state: restore \
             the commit before it"
        )
    })?;
    // The restore refuses a directory that is not empty.
    std::fs::create_dir_all(&args.dest)
        .with_context(|| format!("cannot create {}", args.dest.display()))?;
    let bar = crate::progress::Bar::new();
    owsfs_local::restore::restore(&store, &store, &root, &args.dest, &bar)
        .with_context(|| format!("cannot restore generation {n} of {:?}", args.workspace))?;
    println!("{n}");
    Ok(())
}

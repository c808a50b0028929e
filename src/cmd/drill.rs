//! `owsfs drill [REF]`: prove that a generation restores. It is restored into a temporary
//! directory through the one restore path and checked (hashes, tree shape, totals, `PRAGMA
//! integrity_check` of each SQLite database); the outcome is recorded in the store, where
//! `owsfs log` and `owsfs status` show it.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use owsfs_store::drill::DrillRecord;

use super::target;
use crate::args::StoreArgs;

#[derive(Args, Debug)]
pub struct DrillArgs {
    /// The state to drill: REF (of --workspace) or WORKSPACE@REF [default: HEAD].
    pub state: Option<String>,
    #[command(flatten)]
    pub store: StoreArgs,
    /// The workspace of a REF given without WORKSPACE@.
    #[arg(long, env = "OWSFS_WORKSPACE")]
    pub workspace: Option<String>,
    /// Where to make the temporary directory [default: $TMPDIR]. It needs room for the
    /// whole generation; it is removed afterwards.
    #[arg(long, value_name = "DIR")]
    pub scratch: Option<PathBuf>,
    /// Print the drill record as JSON.
    #[arg(long, env = "OWSFS_JSON")]
    pub json: bool,
}

pub fn run(args: &DrillArgs) -> anyhow::Result<()> {
    let spec = args.state.as_deref().unwrap_or("HEAD");
    let (t, record) = target::resolve_spec(&args.store, args.workspace.as_deref(), spec)?;
    let bar = crate::progress::Bar::new();
    let scratch = args.scratch.clone().unwrap_or_else(std::env::temp_dir);
    let r = owsfs_local::drill::run(&t.store, &t.ws, &record, &scratch, "owsfs-drill-", &bar)?;
    t.ws.record_drill(&r)
        .context("the drill ran, but its outcome could not be recorded in the store")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!("{}", if r.ok { "ok" } else { "FAILED" });
    }
    eprintln!("{}", summary(&r));
    if !r.ok {
        anyhow::bail!(
            "the drill of generation {} of {} FAILED: {}",
            r.generation,
            r.workspace,
            r.error.as_deref().unwrap_or("?")
        );
    }
    Ok(())
}

/// One line about a drill, for people.
pub fn summary(r: &DrillRecord) -> String {
    if r.ok {
        format!(
            "drill of generation {} of {}: ok, {} files, {} directories, {} bytes, {} SQLite \
             databases intact, in {} ms",
            r.generation,
            r.workspace,
            r.files,
            r.dirs,
            r.bytes,
            r.databases.len(),
            r.duration_ms
        )
    } else {
        format!(
            "drill of generation {} of {}: FAILED after {} ms: {}",
            r.generation,
            r.workspace,
            r.duration_ms,
            r.error.as_deref().unwrap_or("?")
        )
    }
}

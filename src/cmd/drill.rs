//! `owsfs drill [REF]`: prove that a generation restores. It is restored into a temporary
//! directory through the one restore path and checked (hashes, tree shape, totals, `PRAGMA
//! integrity_check` of each SQLite database); the outcome is recorded in the store, where
//! `owsfs log` and `owsfs status` show it.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use owsfs_store::drill::DrillRecord;
use owsfs_store::{GenerationRecord, Store, Workspace};

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
    let r = drill(&t.store, &t.ws, &record, args.scratch.as_deref(), &bar)?;
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

/// Runs a drill of `record` and records its outcome in the store. An error means the drill
/// could not be run or recorded (no scratch space, the store unreachable for the record); a
/// failed check is a record with `ok: false`.
pub fn drill(
    store: &Store,
    ws: &Workspace,
    record: &GenerationRecord,
    scratch: Option<&std::path::Path>,
    progress: &dyn owsfs_local::progress::Progress,
) -> anyhow::Result<DrillRecord> {
    let started = Instant::now();
    let mut b = tempfile::Builder::new();
    b.prefix("owsfs-drill-");
    let dir = match scratch {
        Some(s) => b.tempdir_in(s),
        None => b.tempdir(),
    }
    .context("cannot make the drill's temporary directory")?;
    let outcome = owsfs_local::drill::drill(store, record, dir.path(), progress);
    let (ok, error, checked) = match outcome {
        Ok(c) => (true, None, c),
        Err(e) => (false, Some(format!("{e:#}")), Default::default()),
    };
    let r = DrillRecord {
        workspace: ws.name().to_string(),
        generation: record.number,
        time_unix_ms: store.clock().unix_ms(),
        duration_ms: started.elapsed().as_millis() as u64,
        ok,
        error,
        files: checked.files,
        dirs: checked.dirs,
        bytes: checked.bytes,
        databases: checked.databases,
        host: rustix::system::uname()
            .nodename()
            .to_string_lossy()
            .into_owned(),
    };
    drop(dir);
    ws.record_drill(&r)
        .context("the drill ran, but its outcome could not be recorded in the store")?;
    Ok(r)
}

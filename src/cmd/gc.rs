//! `owsfs gc`: retention applied to every workspace of the store, then unreferenced packs
//! condemned and, a grace later, deleted (`store/FORMAT.md`, "GC"). Safe beside live
//! writers and readers.

use std::time::Duration;

use clap::Args;
use owsfs_store::gc::{self, GcOptions, GcReport};

use crate::args::StoreArgs;

#[derive(Args, Debug)]
pub struct GcArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// Report what would be deleted; delete nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// A pack is deleted only this long after a run condemned it, and a generation only
    /// once it is this old. Writers must be able to commit within half of it.
    #[arg(long, default_value = "1h", value_parser = parse_grace)]
    pub grace: Duration,
    /// Packs that also hold dead blobs are repacked (their live blobs moved into new packs,
    /// the old ones deleted a grace later), the deadest first, until the dead bytes left are
    /// at most this percentage of the live bytes.
    #[arg(long, default_value_t = 10.0, value_name = "PERCENT")]
    pub max_unused: f64,
    /// At most this many bytes of packs are read per run to repack them (0: no repacking).
    #[arg(long, default_value = "2GiB", value_parser = crate::args::parse_bytes, value_name = "SIZE")]
    pub repack_budget: u64,
    /// Print the report as JSON.
    #[arg(long, env = "OWSFS_JSON")]
    pub json: bool,
}

/// A grace of at least a second (tests); an hour is the default.
fn parse_grace(s: &str) -> Result<Duration, String> {
    let d = crate::args::parse_duration(s)?;
    if d < Duration::from_secs(1) {
        return Err(format!("{s:?} is too short for a grace (at least 1s)"));
    }
    Ok(d)
}

pub fn run(args: &GcArgs) -> anyhow::Result<()> {
    let url = args.store.url()?;
    let store = crate::mount::open_store(&url)?;
    let bar = crate::progress::Bar::new();
    let report = gc::collect(
        &store,
        &GcOptions {
            grace: args.grace,
            dry_run: args.dry_run,
            repack_budget: args.repack_budget,
            max_unused: args.max_unused / 100.0,
        },
        &bar,
    )?;
    if args.json {
        let mut v = serde_json::to_value(&report)?;
        v["requests"] = serde_json::to_value(store.stats_snapshot())?;
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print(&report, args.dry_run, &url);
    }
    Ok(())
}

fn print(r: &GcReport, dry: bool, url: &str) {
    if let Some(why) = &r.skipped {
        println!("{url}: skipped: {why}");
        return;
    }
    let verb = if dry { "would delete" } else { "deleted" };
    println!(
        "{url}: {} workspaces, {} generations ({} kept), {} snapshots",
        r.workspaces, r.generations, r.generations_kept, r.snapshots
    );
    println!(
        "{verb} {} generation records, {} packs ({} bytes); {} objects in all",
        r.generations_pruned, r.packs_deleted, r.bytes_deleted, r.objects_deleted
    );
    println!(
        "packs: {} in the store, {} referenced, {} unreferenced (deleted by a later run a grace \
         from now unless referenced again); {} trees read",
        r.packs, r.packs_live, r.packs_condemned, r.trees_read
    );
    if r.packs_repacked > 0 {
        let verb = if dry { "would move" } else { "moved" };
        println!(
            "repacked: {} packs holding dead blobs ({verb} {} live bytes into {} new packs; the \
             old packs are deleted by a later run a grace from now)",
            r.packs_repacked, r.repack_bytes_moved, r.repack_packs_written
        );
    }
    if r.forwards_deleted > 0 {
        println!("{} forward records deleted", r.forwards_deleted);
    }
    if let Some(n) = r.run {
        println!("run {n} recorded in gc/runs/");
    }
}

//! `owsfs snapshot`: name a generation (create), list the names, delete one.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use owsfs_store::{GenRef, Snapshot};

use super::target::{self, WorkspaceArgs};

#[derive(Args, Debug)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    pub command: SnapshotCommand,
}

#[derive(Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Name a state of the workspace. On a MOUNTPOINT: cut a generation, wait until it is
    /// durable, and name it. With --workspace: name the newest commit in the store (or --at).
    Create(CreateArgs),
    /// List the snapshots: name, generation, time, size.
    List(ListArgs),
    /// Delete a snapshot (its generation is then kept only as retention says).
    Delete(DeleteArgs),
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// The snapshot's name: letters, digits, . _ - (not all digits, not auto-…).
    pub name: String,
    /// The mountpoint of a running mount (instead of --workspace).
    pub mountpoint: Option<PathBuf>,
    #[command(flatten)]
    pub target: WorkspaceArgs,
    /// With --workspace: name this state instead of the newest (a generation number, a
    /// snapshot, `10m ago`, an RFC 3339 time).
    #[arg(long, value_name = "REF", conflicts_with = "mountpoint")]
    pub at: Option<GenRef>,
    /// On a mount: give up if the cut is not durable after this long.
    #[arg(long, default_value = "5m", value_parser = crate::args::parse_duration)]
    pub timeout: Duration,
    /// Print the snapshot as JSON.
    #[arg(long, env = "OWSFS_JSON")]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// The mountpoint of a running mount (instead of --workspace).
    pub mountpoint: Option<PathBuf>,
    #[command(flatten)]
    pub target: WorkspaceArgs,
    /// Print JSON (one array of snapshot records).
    #[arg(long, env = "OWSFS_JSON")]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct DeleteArgs {
    pub name: String,
    /// The mountpoint of a running mount (instead of --workspace).
    pub mountpoint: Option<PathBuf>,
    #[command(flatten)]
    pub target: WorkspaceArgs,
}

pub fn run(args: &SnapshotArgs) -> anyhow::Result<()> {
    match &args.command {
        SnapshotCommand::Create(a) => create(a),
        SnapshotCommand::List(a) => list(a),
        SnapshotCommand::Delete(a) => {
            let t = target::open(&a.target, a.mountpoint.as_deref())?;
            let s = t.ws.delete_snapshot(&a.name)?;
            eprintln!(
                "deleted snapshot {} (generation {} of {})",
                s.name, s.generation, s.workspace
            );
            Ok(())
        }
    }
}

fn create(a: &CreateArgs) -> anyhow::Result<()> {
    owsfs_store::snapshot::check_snapshot_name(&a.name).map_err(anyhow::Error::msg)?;
    let snap = match (&a.mountpoint, &a.target.workspace) {
        (Some(mp), None) => crate::control::client::snapshot(mp, &a.name, a.timeout)?,
        _ => {
            let t = target::open(&a.target, a.mountpoint.as_deref())?;
            let record = t.resolve(a.at.as_ref().unwrap_or(&GenRef::Head))?;
            t.ws.create_snapshot(&a.name, &record, None)?
        }
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&snap)?);
    } else {
        println!("{}", snap.generation);
        eprintln!(
            "snapshot {} names generation {} of {}",
            snap.name, snap.generation, snap.workspace
        );
    }
    Ok(())
}

fn list(a: &ListArgs) -> anyhow::Result<()> {
    let t = target::open(&a.target, a.mountpoint.as_deref())?;
    let snaps = t.ws.list_snapshots()?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&snaps)?);
        return Ok(());
    }
    if snaps.is_empty() {
        println!("workspace {:?} has no snapshots", t.ws.name());
        return Ok(());
    }
    println!(
        "{:<32} {:>8} {:<23} {:>8} {:>12}  kind",
        "name", "gen", "time (UTC)", "files", "size"
    );
    for s in &snaps {
        print_row(s);
    }
    Ok(())
}

fn print_row(s: &Snapshot) {
    println!(
        "{:<32} {:>8} {:<23} {:>8} {:>12}  {}",
        s.name,
        s.generation,
        super::log::utc(s.generation_time_unix_ms),
        s.stats.files,
        s.stats.bytes_total,
        s.auto
            .as_deref()
            .map_or("named".to_string(), |r| format!("automatic ({r})"))
    );
}

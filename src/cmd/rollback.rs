//! `owsfs rollback [MOUNTPOINT] REF`: a new generation whose tree is REF's, after an
//! automatic snapshot of the state it replaces (undo: roll back to that snapshot). On a
//! MOUNTPOINT, the daemon does it live (`mount/rollback.rs`); with `--workspace`, the
//! workspace must not be mounted.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use super::target::{self, WorkspaceArgs};

#[derive(Args, Debug)]
pub struct RollbackArgs {
    /// The state to go back to: a generation number, a snapshot name, `10m ago`, an RFC 3339
    /// time. With two arguments, the first is the MOUNTPOINT of a live mount: its tree
    /// changes at once (files open before see ESTALE; SEMANTICS.md, "Rollback").
    #[arg(num_args = 1..=2, required = true, value_name = "[MOUNTPOINT] REF")]
    pub args: Vec<String>,
    #[command(flatten)]
    pub target: WorkspaceArgs,
    /// Automatic snapshots to keep (one is taken before the rollback).
    #[arg(long, default_value_t = 5, value_name = "N")]
    pub keep_snapshots: usize,
    /// On a mount: how long everything written before the rollback may take to reach the
    /// store.
    #[arg(long, default_value = "5m", value_parser = crate::args::parse_duration)]
    pub timeout: std::time::Duration,
    /// With --workspace: roll back a template (`owsfs template mark`), which is read-mostly.
    #[arg(long)]
    pub edit_template: bool,
}

pub fn run(args: &RollbackArgs) -> anyhow::Result<()> {
    let (mountpoint, spec) = match args.args.as_slice() {
        [r] => (None, r.as_str()),
        [m, r] => (Some(PathBuf::from(m)), r.as_str()),
        // clap takes a positional again after an option: `rollback A --workspace W B C`.
        more => anyhow::bail!(
            "rollback takes REF, or MOUNTPOINT REF; got {} arguments: {}",
            more.len(),
            more.join(" ")
        ),
    };
    if let Some(mp) = &mountpoint {
        let done = crate::control::client::rollback(mp, spec, args.keep_snapshots, args.timeout)
            .with_context(|| format!("cannot roll {} back to {spec}", mp.display()))?;
        println!("{}", done.generation);
        eprintln!(
            "{} now holds the state of generation {} (generation {}, visible after {:.0} ms){}",
            mp.display(),
            done.to,
            done.generation,
            done.visible_ms,
            done.snapshot
                .as_deref()
                .map(|s| format!("; undo with `owsfs rollback {} {s}`", mp.display()))
                .unwrap_or_default()
        );
        return Ok(());
    }
    let r: owsfs_store::GenRef = spec.parse().map_err(anyhow::Error::msg)?;
    let t = target::open(&args.target, None)?;
    crate::mount::refuse_template(&t.ws, args.edit_template)?;
    let to = t.resolve(&r)?;
    let done = owsfs_store::rollback::rollback(
        &t.ws,
        &to,
        &target::cli_holder("rollback"),
        args.keep_snapshots,
    )
    .with_context(|| format!("cannot roll {:?} back to {r}", t.ws.name()))?;
    println!("{}", done.generation);
    eprintln!(
        "generation {} of {} holds the state of generation {}{}",
        done.generation,
        t.ws.name(),
        done.to,
        done.snapshot
            .as_deref()
            .map(|s| format!(
                "; undo with `owsfs rollback --workspace {} {s}`",
                t.ws.name()
            ))
            .unwrap_or_default()
    );
    Ok(())
}

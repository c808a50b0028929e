//! `owsfs journal --cache DIR`: replays a stopped cache's journal read-only and prints the
//! dirty set.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;

#[derive(Args, Debug)]
pub struct JournalArgs {
    /// The cache directory whose journal to read.
    #[arg(long, env = "OWSFS_CACHE")]
    pub cache: PathBuf,
    /// Print JSON instead of text.
    #[arg(long, env = "OWSFS_JSON")]
    pub json: bool,
}

pub fn run(args: &JournalArgs) -> anyhow::Result<()> {
    let (cache, json) = (&args.cache, args.json);
    let dir = cache.join("journal");
    if !dir.is_dir() {
        bail!("{} has no journal: is it an owsfs cache?", cache.display());
    }
    let (state, recovery) = owsfs_journal::Journal::inspect(&dir)
        .with_context(|| format!("cannot read the journal in {}", dir.display()))?;
    if json {
        let out = serde_json::json!({ "recovery": recovery, "dirty": state });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "journal {}: {} segment(s), {} record(s){}{}",
        dir.display(),
        recovery.segments,
        recovery.records,
        recovery
            .torn_tail
            .as_deref()
            .map(|t| format!(", torn tail: {t}"))
            .unwrap_or_default(),
        recovery
            .rescan
            .as_deref()
            .map(|t| format!(", would rescan: {t}"))
            .unwrap_or_default(),
    );
    println!(
        "dirty: {} file(s), {} dir(s), {} byte(s)",
        state.files.len(),
        state.dirs.len(),
        state.dirty_bytes()
    );
    for dir in &state.dirs {
        println!("  dir  /{}", dir.display());
    }
    for (ino, f) in &state.files {
        let path = f
            .path
            .as_ref()
            .map(|p| format!("/{}", p.display()))
            .unwrap_or_else(|| "(unlinked)".into());
        println!(
            "  file {path} ino={ino} extents={} bytes={}{}{}{}",
            f.extents.len(),
            f.extents.total_len(),
            if f.created { " created" } else { "" },
            if f.meta { " meta" } else { "" },
            f.truncated_to
                .map(|s| format!(" truncated_to={s}"))
                .unwrap_or_default()
        );
    }
    Ok(())
}

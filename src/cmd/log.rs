//! `owsfs log`: the generations of a workspace, read from the store.

use anyhow::Context;
use clap::Args;
use owsfs_store::Store;
use owsfs_store::generation::Workspace;

use crate::args::StoreArgs;

#[derive(Args, Debug)]
pub struct LogArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// The workspace whose generations to list.
    #[arg(long, env = "OWSFS_WORKSPACE")]
    pub workspace: String,
    /// Print JSON (one array of generation records).
    #[arg(long, env = "OWSFS_JSON")]
    pub json: bool,
}

/// Opens an existing workspace (never creates one): the store, the workspace and the URL.
pub fn open_existing(store: &StoreArgs, name: &str) -> anyhow::Result<(Store, Workspace, String)> {
    let url = store.url()?;
    let store = Store::open(&url, owsfs_store::StoreOptions::default())
        .with_context(|| format!("cannot use the store {url}"))?;
    let marker = format!("workspaces/{name}/workspace.json");
    if !store.exists(&marker)? {
        anyhow::bail!("there is no workspace {name:?} in {url}");
    }
    let ws = Workspace::open_or_create(&store, name)
        .with_context(|| format!("cannot open workspace {name:?} in {url}"))?;
    Ok((store, ws, url))
}

pub fn run(args: &LogArgs) -> anyhow::Result<()> {
    let (_store, ws, _url) = open_existing(&args.store, &args.workspace)?;
    let mut records = Vec::new();
    for n in ws.list_generations()? {
        records.push(ws.read_generation(n)?);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&records)?);
        return Ok(());
    }
    if records.is_empty() {
        println!("workspace {:?} has no generations yet", args.workspace);
        return Ok(());
    }
    println!(
        "{:>6} {:>6} {:<24} {:>8} {:>12} {:>12} {:>7}  sqlite",
        "gen", "epoch", "time (UTC)", "files", "size", "uploaded", "ms"
    );
    for r in &records {
        if r.kind == owsfs_store::GenKind::Fence {
            println!(
                "{:>6} {:>6} {:<24} {:>8}  (fence: a new writer took the lease at epoch {})",
                r.number,
                r.epoch,
                utc(r.time_unix_ms),
                "-",
                r.epoch
            );
            continue;
        }
        let positions: Vec<String> = r
            .sqlite
            .iter()
            .map(|p| match &p.wal {
                Some(w) => format!("{}@frame {}", p.path, w.last_commit_frame),
                None => p.path.clone(),
            })
            .collect();
        println!(
            "{:>6} {:>6} {:<24} {:>8} {:>12} {:>12} {:>7}  {}",
            r.number,
            r.epoch,
            utc(r.time_unix_ms),
            r.stats.files,
            r.stats.bytes_total,
            r.stats.bytes_new,
            r.stats.cut_ms + r.stats.upload_ms,
            positions.join(" ")
        );
    }
    Ok(())
}

/// `YYYY-MM-DD HH:MM:SS.mmm` in UTC.
fn utc(ms: u64) -> String {
    match jiff::Timestamp::from_millisecond(ms as i64) {
        Ok(t) => t.strftime("%Y-%m-%d %H:%M:%S%.3f").to_string(),
        Err(_) => format!("@{ms}ms"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_times() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00.000");
        assert_eq!(super::utc(1_764_979_200_123), "2025-12-06 00:00:00.123");
    }
}

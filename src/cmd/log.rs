//! `owsfs log`: the generations of a workspace, read from the store.

use clap::Args;
use owsfs_store::retention::{self, GenSummary};

use crate::args::StoreArgs;

#[derive(Args, Debug)]
pub struct LogArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// The workspace whose generations to list.
    #[arg(long, env = "OWSFS_WORKSPACE")]
    pub workspace: String,
    /// Print JSON: one array of generation records, each with the snapshots naming it.
    #[arg(long, env = "OWSFS_JSON")]
    pub json: bool,
}

/// One element of `owsfs log --json`: the generation record, with the snapshots that name it
/// and, on a fork's first generation, where it came from.
#[derive(serde::Serialize)]
struct LogEntry<'a> {
    #[serde(flatten)]
    record: &'a owsfs_store::GenerationRecord,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    snapshots: Vec<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    forked_from: Option<&'a owsfs_store::ForkSource>,
    /// The newest drill of this generation.
    #[serde(skip_serializing_if = "Option::is_none")]
    drill: Option<&'a owsfs_store::drill::DrillRecord>,
    /// Why the retention policy keeps it (empty: a GC may delete it once it is older than
    /// the grace).
    kept: Vec<&'static str>,
}

pub fn run(args: &LogArgs) -> anyhow::Result<()> {
    let ws = super::target::open_existing(&args.store, &args.workspace)?.ws;
    let mut records = Vec::new();
    for n in ws.list_generations()? {
        records.push(ws.read_generation(n)?);
    }
    let snapshots = ws.list_snapshots()?;
    let drills = ws.list_drills()?;
    // Oldest first: the last one of a generation is its newest.
    let drill_of = |n: u64| drills.iter().rev().find(|d| d.generation == n);
    let policy = ws.retention()?;
    let summaries: Vec<GenSummary> = records
        .iter()
        .map(|r| GenSummary {
            number: r.number,
            kind: r.kind,
            time_unix_ms: r.time_unix_ms,
        })
        .collect();
    let snap_gens: Vec<u64> = snapshots.iter().map(|s| s.generation).collect();
    let fork_gens: Vec<u64> = ws.forks()?.into_iter().map(|(_, n)| n).collect();
    let now = ws.store().clock().unix_ms();
    let kept = retention::plan(&policy, now, &summaries, &snap_gens, &fork_gens, &[]);
    let why = |n: u64| -> Vec<&'static str> {
        kept.get(&n)
            .map(|r| r.iter().map(|r| r.as_str()).collect())
            .unwrap_or_default()
    };
    let forked_from = ws.info().forked_from.as_ref();
    let names_of = |n: u64| -> Vec<&str> {
        snapshots
            .iter()
            .filter(|s| s.generation == n)
            .map(|s| s.name.as_str())
            .collect()
    };
    let fork_start = |r: &owsfs_store::GenerationRecord| r.number == 1 && r.epoch == 0;
    if args.json {
        let out: Vec<LogEntry<'_>> = records
            .iter()
            .map(|r| LogEntry {
                record: r,
                snapshots: names_of(r.number),
                forked_from: forked_from.filter(|_| fork_start(r)),
                drill: drill_of(r.number),
                kept: why(r.number),
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    if let Some(f) = forked_from {
        println!(
            "workspace {:?} is a fork of {:?} at generation {}",
            args.workspace, f.workspace, f.generation
        );
    }
    if records.is_empty() {
        println!("workspace {:?} has no generations yet", args.workspace);
        return Ok(());
    }
    println!("retention: {policy}");
    if let Some(m) = ws.template()? {
        println!(
            "template: read-mostly since {} (marked by {}); start from it with `owsfs fork {} NEW`",
            jiff::Timestamp::from_millisecond(m.since_unix_ms as i64)
                .map(|t| t.strftime("%Y-%m-%d %H:%M:%S UTC").to_string())
                .unwrap_or_default(),
            m.by,
            ws.name()
        );
    }
    println!(
        "{:>6} {:>6} {:<24} {:>8} {:>12} {:>12} {:>7}  sqlite",
        "gen", "epoch", "time (UTC)", "files", "size", "uploaded", "ms"
    );
    for r in &records {
        let names = names_of(r.number);
        let mut marks = if names.is_empty() {
            String::new()
        } else {
            format!("  [snapshot {}]", names.join(", "))
        };
        if let Some(to) = r.stats.rollback_to {
            marks.push_str(&format!("  [rollback to {to}]"));
        }
        let reasons = why(r.number);
        if reasons.is_empty() {
            marks.push_str("  (not kept: goes at a GC)");
        } else if reasons != ["recent"] {
            marks.push_str(&format!("  (kept: {})", reasons.join(", ")));
        }
        match drill_of(r.number) {
            Some(d) if d.ok => marks.push_str(&format!("  [drill ok {}]", utc(d.time_unix_ms))),
            Some(d) => marks.push_str(&format!(
                "  [DRILL FAILED {}: {}]",
                utc(d.time_unix_ms),
                d.error.as_deref().unwrap_or("?")
            )),
            None => {}
        }
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
        let mut positions: Vec<String> = r
            .sqlite
            .iter()
            .map(|p| match &p.wal {
                Some(w) => format!("{}@frame {}", p.path, w.last_commit_frame),
                None => p.path.clone(),
            })
            .collect();
        if fork_start(r) && forked_from.is_some() {
            positions.insert(0, "(the fork's start)".into());
        }
        println!(
            "{:>6} {:>6} {:<24} {:>8} {:>12} {:>12} {:>7}  {}{marks}",
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
pub fn utc(ms: u64) -> String {
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

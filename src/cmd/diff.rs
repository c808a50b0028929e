//! `owsfs diff A B`: what changed between two states, read from the store. Equal subtrees are
//! skipped by id, so the cost grows with the difference.

use anyhow::Context;
use clap::Args;
use owsfs_store::diff::{Change, DiffEntry, DiffStats, diff_trees};
use owsfs_store::tree::{Content, lookup, write_file};
use owsfs_store::{BlobRef, GenerationRecord, Store};
use serde::Serialize;

use super::target::{self, Target};
use crate::args::StoreArgs;

#[derive(Args, Debug)]
pub struct DiffArgs {
    /// The older state: REF (of --workspace) or WORKSPACE@REF. A REF is a generation number,
    /// a snapshot name, HEAD, `10m ago` or an RFC 3339 time.
    pub from: String,
    /// The newer state, the same way [default: HEAD].
    pub to: Option<String>,
    #[command(flatten)]
    pub store: StoreArgs,
    /// The workspace of a REF given without WORKSPACE@.
    #[arg(long, env = "OWSFS_WORKSPACE")]
    pub workspace: Option<String>,
    /// Print JSON: both states, the changes, and the SQLite tables with --sqlite.
    #[arg(long, env = "OWSFS_JSON")]
    pub json: bool,
    /// For each SQLite database that changed, count the rows of each table on both sides
    /// (reads those databases from the store).
    #[arg(long)]
    pub sqlite: bool,
}

/// One side of the diff.
#[derive(Serialize)]
struct Side {
    workspace: String,
    generation: u64,
    time_unix_ms: u64,
}

/// Row counts of one table before and after (`None`: the table is not there).
#[derive(Serialize)]
struct TableRows {
    name: String,
    before: Option<u64>,
    after: Option<u64>,
}

#[derive(Serialize)]
struct SqliteDiff {
    path: String,
    tables: Vec<TableRows>,
}

#[derive(Serialize)]
struct DiffOut {
    from: Side,
    to: Side,
    changes: Vec<DiffEntry>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sqlite: Option<Vec<SqliteDiff>>,
    stats: DiffStats,
}

fn side(args: &DiffArgs, spec: &str) -> anyhow::Result<(Target, GenerationRecord)> {
    target::resolve_spec(&args.store, args.workspace.as_deref(), spec)
}

pub fn run(args: &DiffArgs) -> anyhow::Result<()> {
    let (ta, ra) = side(args, &args.from)?;
    let (tb, rb) = side(args, args.to.as_deref().unwrap_or("HEAD"))?;
    if ta.url != tb.url {
        anyhow::bail!("both states must be in one store");
    }
    let root = |r: &GenerationRecord| -> anyhow::Result<BlobRef> {
        r.root
            .with_context(|| format!("generation {} has no tree", r.number))
    };
    let (a, b) = (root(&ra)?, root(&rb)?);
    let store: &Store = &ta.store;
    let (changes, stats) = diff_trees(store, &a, &b).context("cannot compare the trees")?;
    let sqlite = if args.sqlite {
        Some(sqlite_tables(store, &ra, &rb, &a, &b, &changes)?)
    } else {
        None
    };
    let out = DiffOut {
        from: Side {
            workspace: ta.ws.name().to_string(),
            generation: ra.number,
            time_unix_ms: ra.time_unix_ms,
        },
        to: Side {
            workspace: tb.ws.name().to_string(),
            generation: rb.number,
            time_unix_ms: rb.time_unix_ms,
        },
        changes,
        sqlite,
        stats,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    print_text(&out);
    Ok(())
}

fn print_text(out: &DiffOut) {
    for e in &out.changes {
        let detail = match e.change {
            Change::Renamed => format!("{} -> {}", e.from.as_deref().unwrap_or("?"), e.path),
            Change::TypeChanged => format!(
                "{} ({:?} -> {:?})",
                e.path,
                e.old_kind.unwrap_or(e.kind),
                e.kind
            ),
            _ => {
                let mut s = e.path.clone();
                if e.kind == owsfs_store::NodeKind::Dir {
                    s.push('/');
                }
                let mut notes: Vec<String> = Vec::new();
                if let Some((x, y)) = e.mode {
                    notes.push(format!("mode {x:o} -> {y:o}"));
                }
                notes.extend(
                    e.what
                        .iter()
                        .filter(|w| **w != "mode")
                        .map(|w| w.to_string()),
                );
                if !notes.is_empty() {
                    s.push_str(&format!("  ({})", notes.join(", ")));
                }
                s
            }
        };
        println!("{}  {detail}", e.change.letter());
    }
    if let Some(dbs) = &out.sqlite {
        for db in dbs {
            for t in &db.tables {
                let n = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
                println!(
                    "sqlite  {}: table {}: {} -> {} rows",
                    db.path,
                    t.name,
                    n(t.before),
                    n(t.after)
                );
            }
        }
    }
    eprintln!(
        "{} changes from generation {} of {} to generation {} of {} ({} trees read, {} equal subtrees skipped)",
        out.changes.len(),
        out.from.generation,
        out.from.workspace,
        out.to.generation,
        out.to.workspace,
        out.stats.trees_read,
        out.stats.subtrees_skipped
    );
}

/// Row counts per table of each SQLite database either generation recorded and the diff
/// touches, read into a temporary directory (the database with its `-wal`).
fn sqlite_tables(
    store: &Store,
    ra: &GenerationRecord,
    rb: &GenerationRecord,
    a: &BlobRef,
    b: &BlobRef,
    changes: &[DiffEntry],
) -> anyhow::Result<Vec<SqliteDiff>> {
    let mut paths: Vec<&str> = ra
        .sqlite
        .iter()
        .chain(&rb.sqlite)
        .map(|s| s.path.as_str())
        .collect();
    paths.sort_unstable();
    paths.dedup();
    let touched = |p: &str| {
        changes.iter().any(|c| {
            [Some(c.path.as_str()), c.from.as_deref()]
                .into_iter()
                .flatten()
                .any(|x| x == p || x == format!("{p}-wal") || p.starts_with(&format!("{x}/")))
        })
    };
    let mut out = Vec::new();
    for p in paths.into_iter().filter(|p| touched(p)) {
        let before = count_rows(store, a, p)?;
        let after = count_rows(store, b, p)?;
        let mut names: Vec<&String> = before.keys().chain(after.keys()).collect();
        names.sort();
        names.dedup();
        let tables = names
            .into_iter()
            .map(|n| TableRows {
                name: n.clone(),
                before: before.get(n).copied(),
                after: after.get(n).copied(),
            })
            .filter(|t| t.before != t.after)
            .collect();
        out.push(SqliteDiff {
            path: p.to_string(),
            tables,
        });
    }
    Ok(out)
}

/// Rows per table of the database at `path` in tree `root` (empty when it is not there).
fn count_rows(
    store: &Store,
    root: &BlobRef,
    path: &str,
) -> anyhow::Result<std::collections::BTreeMap<String, u64>> {
    let mut out = std::collections::BTreeMap::new();
    let dir = tempfile::Builder::new()
        .prefix("owsfs-diff-")
        .tempdir()
        .context("cannot make a temporary directory")?;
    let db = dir.path().join("db");
    for (suffix, dest) in [("", db.clone()), ("-wal", dir.path().join("db-wal"))] {
        let Some(e) = lookup(store, root, &format!("{path}{suffix}"))? else {
            if suffix.is_empty() {
                return Ok(out);
            }
            continue;
        };
        let Content::File(content) = &e.content else {
            continue;
        };
        let mut f = std::fs::File::create(&dest)
            .with_context(|| format!("cannot create {}", dest.display()))?;
        write_file(store, content, &mut f)
            .with_context(|| format!("cannot read {path}{suffix}"))?;
    }
    let conn = rusqlite::Connection::open(&db)
        .with_context(|| format!("{path} does not open as a SQLite database"))?;
    let names: Vec<String> = conn
        .prepare(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'",
        )?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for n in names {
        let q = format!("SELECT count(*) FROM \"{}\"", n.replace('"', "\"\""));
        let c: i64 = conn.query_row(&q, [], |r| r.get(0))?;
        out.insert(n, c.max(0) as u64);
    }
    Ok(out)
}

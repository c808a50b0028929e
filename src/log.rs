//! `owsfs log`: the generations of a workspace, read from the store.

use anyhow::Context;

use crate::cli::LogArgs;

/// Opens an existing workspace (never creates one).
fn open_workspace(
    store: &crate::cli::StoreArgs,
    name: &str,
) -> anyhow::Result<(
    owsfs_store::Store,
    owsfs_store::generation::Workspace,
    String,
)> {
    let url = crate::cli::store_url(store)?;
    let store = owsfs_store::Store::open(&url, owsfs_store::StoreOptions::default())
        .with_context(|| format!("cannot use the store {url}"))?;
    let marker = format!("workspaces/{name}/workspace.json");
    if !store.exists(&marker)? {
        anyhow::bail!("there is no workspace {name:?} in {url}");
    }
    let ws = owsfs_store::generation::Workspace::open_or_create(&store, name)
        .with_context(|| format!("cannot open workspace {name:?} in {url}"))?;
    Ok((store, ws, url))
}

/// `owsfs restore`.
pub fn restore(args: &crate::cli::RestoreArgs) -> anyhow::Result<()> {
    let (store, ws, url) = open_workspace(&args.store, &args.workspace)?;
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
    match std::fs::read_dir(&args.dest) {
        Ok(mut d) => {
            if d.next().is_some() {
                anyhow::bail!("{} is not empty", args.dest.display());
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(&args.dest)
                .with_context(|| format!("cannot create {}", args.dest.display()))?
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", args.dest.display())),
    }
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    owsfs_local::restore::restore(&store, &store, &root, &args.dest, &mut |p| {
        if tty {
            eprint!(
                "\rrestoring generation {n}: {}/{} files, {}/{} MiB   ",
                p.files,
                p.files_total,
                p.bytes >> 20,
                p.bytes_total >> 20
            );
        }
    })
    .with_context(|| format!("cannot restore generation {n} of {:?}", args.workspace))?;
    if tty {
        eprintln!();
    }
    println!("{n}");
    Ok(())
}

pub fn run(args: &LogArgs) -> anyhow::Result<()> {
    let (_store, ws, _url) = open_workspace(&args.store, &args.workspace)?;
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
    let secs = (ms / 1000) as i64;
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{:03}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

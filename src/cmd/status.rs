//! `owsfs status`: the state of a mounted workspace.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::control::client;

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The mountpoint of a running owsfs mount.
    pub mountpoint: PathBuf,
    /// Print JSON instead of text.
    #[arg(long, env = "OWSFS_JSON")]
    pub json: bool,
    /// Also list the dirty set (files with their dirty extents, and dirty directories).
    #[arg(long, env = "OWSFS_DIRTY")]
    pub dirty: bool,
}

/// The daemon, and its supervisor if it has one.
fn print_processes(v: &crate::control::Status) {
    let transport = match v.io_uring {
        Some(n) => format!("FUSE over io_uring ({n} requests)"),
        None => "the FUSE device".to_string(),
    };
    println!(
        "daemon       pid {}, up {:.0}s, passthrough {}, requests through {transport}",
        v.pid,
        v.uptime_secs,
        if v.passthrough { "on" } else { "off" }
    );
    if let Some(s) = &v.supervisor {
        // The daemon's death is a pause: the supervisor keeps the connection.
        let replaced = match s.daemon {
            0 => "the first daemon".to_string(),
            1 => "1 daemon replaced".to_string(),
            n => format!("{n} daemons replaced"),
        };
        println!("supervisor   pid {} ({replaced})", s.pid);
    }
}

pub fn run(args: &StatusArgs) -> anyhow::Result<()> {
    let v = client::status(&args.mountpoint, args.dirty, Duration::from_secs(30))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let j = &v.journal;
    let ops = &v.ops;
    println!("mountpoint   {}", v.mountpoint.display());
    println!("cache        {}", v.cache.display());
    println!("backing      {}", v.backing.display());
    print_processes(&v);
    println!(
        "journal      seq {}, segment {} at {} bytes; {} records in {} writes since mount",
        j.last_seq, j.segment, j.segment_offset, j.records, j.batches
    );
    if let Some(why) = &j.failed {
        println!(
            "journal      FAILED, writes are refused with EIO: {why}; the cache's disk cannot be \
             trusted: check it, then remount"
        );
    }
    if let Some(why) = &j.low_space {
        println!(
            "journal      LOW ON SPACE: {why}; changes fail with ENOSPC until space is freed \
             (unlink, rename and truncate still work)"
        );
    }
    if j.failed_batches > 0 {
        println!(
            "journal      {} appends failed since mount",
            j.failed_batches
        );
    }
    if v.log_lines_dropped > 0 {
        println!(
            "log          {} lines could not be written (disk full?)",
            v.log_lines_dropped
        );
    }
    println!(
        "dirty        {} files, {} dirs, {} bytes",
        j.dirty_files, j.dirty_dirs, j.dirty_bytes
    );
    println!(
        "ops          {} lookups, {} opens ({} passthrough), {} reads ({} bytes), {} writes ({} bytes), {} fsyncs, {} errors",
        ops.lookups,
        ops.opens,
        ops.opens_passthrough,
        ops.reads,
        ops.read_bytes,
        ops.writes,
        ops.write_bytes,
        ops.fsyncs,
        ops.errors
    );
    let s = &v.sync.agent;
    println!("store        {} workspace {}", s.store, s.workspace);
    if let Some(n) = v.read_only_at {
        println!("read-only    generation {n}: no lease; every write fails with EROFS");
    }
    if let Some(f) = &s.forked_from {
        println!(
            "forked from  workspace {} at generation {}",
            f.workspace, f.generation
        );
    }
    let newest = match &s.last_commit {
        Some(c) => format!(
            ", committed {:.1}s ago",
            (jiff::Timestamp::now().as_millisecond() - c.time_unix_ms as i64).max(0) as f64
                / 1000.0
        ),
        None => String::new(),
    };
    println!(
        "generation   {} (durable){newest}; {} commits, {} failed since mount",
        s.generation, s.commits, s.commit_failures
    );
    println!(
        "lag          {:.1}s, {} bytes unsynced; writers throttled {} ms in total",
        s.lag_secs, s.lag_bytes, s.throttled_ms
    );
    if let Some(e) = &s.last_error {
        println!("last error   {e}");
    }
    let l = &v.sync.lease;
    if v.read_only_at.is_some() {
        println!("lease        {}", l.state);
    } else {
        println!(
            "lease        {} epoch {} by {}; renewed {:.1}s ago, good for {:.1}s (ttl {:.1}s)",
            l.state, l.epoch, l.holder, l.last_renewal_secs_ago, l.good_for_secs, l.ttl_secs,
        );
    }
    let p = &v.sync.hydration;
    println!(
        "hydration    {}; {} directories and {} files pending, {} bytes fetched in {} requests",
        owsfs_hydrate::progress_line(p),
        p.dirs_pending,
        p.files_pending,
        p.fetched_bytes,
        p.fetches
    );
    if let Some(d) = &v.sync.drill {
        let ago = (jiff::Timestamp::now().as_millisecond() - d.time_unix_ms as i64).max(0) / 1000;
        if d.ok {
            println!(
                "drill        ok: generation {} restored and verified {ago}s ago on {}",
                d.generation, d.host
            );
        } else {
            println!(
                "DRILL FAILED generation {}, {ago}s ago on {}: {}",
                d.generation,
                d.host,
                d.error.as_deref().unwrap_or("?")
            );
        }
    }
    if let Some(g) = &v.sync.gc {
        let ago = (jiff::Timestamp::now().as_millisecond() - g.time_unix_ms as i64).max(0) / 1000;
        match (&g.report, &g.error) {
            (Some(r), _) => println!(
                "gc           {ago}s ago: {} generation records and {} packs ({} bytes) deleted, \
                 {} packs condemned",
                r.generations_pruned, r.packs_deleted, r.bytes_deleted, r.packs_condemned
            ),
            (None, e) => println!("GC FAILED    {ago}s ago: {}", e.as_deref().unwrap_or("?")),
        }
    }
    if let Some(why) = v.writes_stopped() {
        println!("WRITES STOPPED (EROFS): {why}");
    }
    if let Some(t) = &v.recovery.torn_tail {
        println!("recovery     torn tail cut: {t}");
    }
    if let Some(t) = &v.recovery.rescan {
        println!("recovery     rescanned: {t}");
    }
    if let Some(d) = &v.dirty {
        print_dirty(d);
    }
    Ok(())
}

/// The dirty set, one line per directory and file, as `owsfs journal` prints it.
fn print_dirty(d: &serde_json::Value) {
    for dir in d["dirs"].as_array().into_iter().flatten() {
        println!("  dir  /{}", dir.as_str().unwrap_or("?"));
    }
    for (ino, f) in d["files"].as_object().into_iter().flatten() {
        let path = f["path"]
            .as_str()
            .map(|p| format!("/{p}"))
            .unwrap_or_else(|| "(unlinked)".into());
        let extents = f["extents"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        let bytes: u64 = extents
            .iter()
            .filter_map(|r| Some(r[1].as_u64()?.saturating_sub(r[0].as_u64()?)))
            .sum();
        println!(
            "  file {path} ino={ino} extents={} bytes={bytes}{}{}{}",
            extents.len(),
            if f["created"] == true { " created" } else { "" },
            if f["meta"] == true { " meta" } else { "" },
            f["truncated_to"]
                .as_u64()
                .map(|s| format!(" truncated_to={s}"))
                .unwrap_or_default()
        );
    }
}

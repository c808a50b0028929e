//! Scenario 4: corruption. The workload runs to its end, then one random object gets a bit
//! flip or is truncated: a pack (chunks, trees and the pack index live in packs), the newest
//! generation record, a lease object, or a segment of the local journal. Every reader must
//! then give a clear error or the right data: a restore, a drill and a lazily fetching mount
//! of the store; a remount of the cache for the journal (whose next commit must match what
//! the mount showed). Wrong data, a panic or a silent loss breaks the promise.

use std::io::ErrorKind;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Output;

use anyhow::{Context as _, Result, bail};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::check::{Verdict, capture, model_after, prefix};
use crate::model::{Model, Node, is_sqlite};
use crate::node::{Mount, brief};
use crate::workload::{Cfg, read_log};
use crate::{Broken, Ctx, Figures};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Pack,
    Generation,
    Lease,
    Journal,
}

/// How a reader took the damage.
#[derive(Debug, PartialEq, Eq)]
enum Took {
    /// It failed with a clear error.
    Refused,
    /// It served exactly the right data.
    Right,
}

/// Damages `bytes`: flips bits of one byte, or cuts the end off. Says what it did.
fn damage(rng: &mut StdRng, bytes: &mut Vec<u8>) -> String {
    if bytes.is_empty() {
        bytes.push(0);
        return "an empty object given a byte".into();
    }
    if rng.gen_bool(0.7) {
        let at = rng.gen_range(0..bytes.len());
        let mask: u8 = rng.gen_range(1..=255);
        bytes[at] ^= mask;
        format!("byte {at} of {} xor {mask:#04x}", bytes.len())
    } else {
        let len = rng.gen_range(0..bytes.len());
        let was = bytes.len();
        bytes.truncate(len);
        format!("truncated from {was} to {len} bytes")
    }
}

/// A failed command's error is clear: it says something, no panic, no backtrace.
fn clear(what: &str, out: &Output) -> Result<Took> {
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("panicked") || err.contains("RUST_BACKTRACE") {
        return Err(Broken(format!(
            "{what} panicked on a corrupted object:\n{}",
            brief(out)
        ))
        .into());
    }
    if err.trim().is_empty() {
        return Err(Broken(format!("{what} failed without saying why")).into());
    }
    Ok(Took::Refused)
}

/// Reads every file of the model through a lazily fetching mount: each read gives the right
/// bytes or EIO, never other bytes.
fn read_all(mp: &Path, model: &Model) -> Result<Took> {
    let mut refused = false;
    for (path, node) in &model.paths {
        let Node::File(ino) = node else {
            continue;
        };
        match std::fs::read(mp.join(path)) {
            Ok(data) if is_sqlite(path) || data == model.inodes[ino] => {}
            Ok(data) => {
                return Err(Broken(format!(
                    "the mount served wrong bytes for {path} ({} bytes, want {})",
                    data.len(),
                    model.inodes[ino].len()
                ))
                .into());
            }
            Err(e) if e.raw_os_error() == Some(libc::EIO) => refused = true,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(Broken(format!("the mount lost {path}: {e}")).into());
            }
            Err(e) => bail!("read {path} through the mount: {e}"),
        }
    }
    // The databases and their companions: right (as far as SQLite can tell) or EIO.
    let db_files: Vec<_> = std::fs::read_dir(mp)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| is_sqlite(&n.to_string_lossy()))
        })
        .collect();
    for p in db_files {
        match std::fs::read(&p) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EIO) => refused = true,
            Err(e) => bail!("read {} through the mount: {e}", p.display()),
        }
    }
    Ok(if refused { Took::Refused } else { Took::Right })
}

pub fn trial(ctx: &Ctx, n: u64, figs: &mut Figures) -> Result<String> {
    // A store of its own: every pack in it is one of this workspace's.
    let dir = ctx.work.join(format!("corrupt-{n}"));
    std::fs::create_dir_all(&dir)?;
    let ctx = &ctx.own_store(&format!("corrupt-{n}"), &dir);
    let mut rng = StdRng::seed_from_u64(ctx.seed ^ n.wrapping_mul(0xD6E8_FEB8_6659_FD93));
    let ws = format!("corrupt-{n}");
    let target = [
        Target::Pack,
        Target::Pack,
        Target::Generation,
        Target::Lease,
        Target::Journal,
    ][rng.gen_range(0..5)];
    // For the journal, syncs along the way: the journal then holds only what changed since
    // the last one, and a commit relies on it to know what changed.
    let cfg = Cfg {
        seed: rng.r#gen(),
        max_big: 256 << 10,
        sync_weight: if target == Target::Journal { 4 } else { 0 },
    };
    let ops = rng.gen_range(50..300);
    figs.trials += 1;

    // The workload, to its end.
    let (mp, cache) = (dir.join("mnt"), dir.join("cache"));
    std::fs::create_dir_all(&mp)?;
    let args: Vec<String> = ["--commit-interval", "1h", "--max-lag", "1h"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mount = ctx.owsfs.mount(&mp, &cache, &ws, &args, &[])?;
    let log = dir.join("workload.log");
    let status = std::process::Command::new(&ctx.self_exe)
        .process_group(0)
        .arg("workload")
        .arg("--mount")
        .arg(&mp)
        .arg("--log")
        .arg(&log)
        .args(["--seed", &cfg.seed.to_string()])
        .args(["--max-big", &cfg.max_big.to_string()])
        .args(["--sync-weight", &cfg.sync_weight.to_string()])
        .args(["--pause-us", "0", "--max-ops"])
        .arg(ops.to_string())
        .arg("--owsfs")
        .arg(&ctx.owsfs.bin)
        .status()?;
    if !status.success() || read_log(&log)?.done != ops {
        bail!("the workload did not complete its {ops} operations");
    }
    let model = model_after(&cfg, ops);
    if target == Target::Journal {
        // Everything is in the journal: no generation was cut since the mount's fence.
        mount.kill9(mount.pid()?)?;
    } else {
        mount.unmount()?;
    }
    drop(mount);

    // The damage.
    let (object, what) = match target {
        Target::Journal => {
            let mut segs: Vec<_> = std::fs::read_dir(cache.join("journal"))?
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "seg"))
                .collect();
            segs.sort();
            let seg = segs.last().context("no journal segment")?.clone();
            let mut b = std::fs::read(&seg)?;
            let what = damage(&mut rng, &mut b);
            std::fs::write(&seg, &b)?;
            (seg.display().to_string(), what)
        }
        _ => {
            let prefix = match target {
                Target::Pack => "packs/".to_string(),
                Target::Generation => format!("workspaces/{ws}/gens/"),
                _ => format!("workspaces/{ws}/lease/"),
            };
            let keys = ctx.raw.keys(&prefix);
            let key = match target {
                Target::Generation => keys.last(),
                _ => keys.get(rng.gen_range(0..keys.len().max(1))),
            }
            .with_context(|| format!("no object under {prefix}"))?
            .clone();
            let mut b = ctx.raw.get(&key)?;
            let what = damage(&mut rng, &mut b);
            ctx.raw.put(&key, &b)?;
            (key, what)
        }
    };
    figs.corruptions += 1;

    let took = if target == Target::Journal {
        journal_readers(ctx, &dir, &mp, &cache, &ws, &args, &cfg, ops)?
    } else {
        store_readers(ctx, &dir, &ws, &cfg, ops, &model)?
    };
    figs.detected += 1;
    ctx.passed(&dir)?;
    Ok(format!("{target:?} {object}: {what}: {took}"))
}

/// After a damaged journal segment: the remount refuses clearly, or shows every completed
/// operation and commits exactly what it shows.
#[allow(clippy::too_many_arguments)]
fn journal_readers(
    ctx: &Ctx,
    dir: &Path,
    mp: &Path,
    cache: &Path,
    ws: &str,
    args: &[String],
    cfg: &Cfg,
    ops: u64,
) -> Result<String> {
    let m = match ctx.owsfs.mount(mp, cache, ws, args, &[]) {
        Ok(m) => m,
        Err(e) => {
            let text = format!("{e:#}");
            if text.contains("panicked") {
                return Err(Broken(format!("the remount panicked: {text}")).into());
            }
            return Ok(format!(
                "remount refused: {}",
                text.lines().next().unwrap_or("")
            ));
        }
    };
    let shown = judge(dir, mp, cfg, ops, "remount after a damaged journal")?;
    let replay = m.log_tail(400);
    m.unmount()?;
    drop::<Mount>(m);
    let restored = dir.join("restored");
    ctx.owsfs.restore(ws, &restored, &[])?;
    judge(
        dir,
        &restored,
        cfg,
        shown,
        "the generation committed after a damaged journal",
    )?;
    let rescan = replay.contains("rescan");
    Ok(format!(
        "remount served every operation{}, and committed them",
        if rescan { " (after a rescan)" } else { "" }
    ))
}

fn judge(dir: &Path, root: &Path, cfg: &Cfg, ops: u64, what: &str) -> Result<u64> {
    let found = capture(root, dir)?;
    match prefix(&found, cfg, ops, ops) {
        Verdict::Prefix(j) => Ok(j),
        v => Err(Broken(format!("{what}: {v:?}")).into()),
    }
}

/// After a damaged store object: restore, drill and a fresh mount each refuse clearly or
/// serve the right data.
fn store_readers(
    ctx: &Ctx,
    dir: &Path,
    ws: &str,
    cfg: &Cfg,
    ops: u64,
    model: &Model,
) -> Result<String> {
    let restored = dir.join("restored");
    let dest = restored.display().to_string();
    let store = ctx.owsfs.store.clone();
    let out = ctx.owsfs.run(
        &["restore", "--store", &store, "--workspace", ws, &dest],
        &[],
    )?;
    let restore = if out.status.success() {
        judge(dir, &restored, cfg, ops, "restore of a damaged store")?;
        Took::Right
    } else {
        clear("owsfs restore", &out)?
    };
    let out = ctx
        .owsfs
        .run(&["drill", "--store", &store, "--workspace", ws], &[])?;
    let drill = if out.status.success() {
        Took::Right
    } else {
        clear("owsfs drill", &out)?
    };
    if drill == Took::Right && restore == Took::Refused {
        return Err(Broken("the drill passed a generation that restore refused".into()).into());
    }
    let (mp, cache) = (dir.join("fresh-mnt"), dir.join("fresh-cache"));
    std::fs::create_dir_all(&mp)?;
    let args = vec!["--prefetch".to_string(), "0".into()];
    let mount = match ctx.owsfs.mount(&mp, &cache, ws, &args, &[]) {
        Ok(m) => {
            let took = read_all(&mp, model)?;
            // A refused read leaves the cache unfinished; its unmount need not be clean.
            let _ = m.unmount();
            took
        }
        Err(e) => {
            let text = format!("{e:#}");
            if text.contains("panicked") {
                return Err(Broken(format!("the mount panicked: {text}")).into());
            }
            if crate::node::is_mounted(&mp) {
                return Err(Broken("a failed mount left a mount behind".into()).into());
            }
            Took::Refused
        }
    };
    Ok(format!(
        "restore {restore:?}, drill {drill:?}, lazy mount {mount:?}"
    ))
}

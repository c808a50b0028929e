//! Scenario 5: full disks and a lost store.
//!
//! - `cache`: the cache lives on a small tmpfs that a hog file fills while the workload runs.
//!   Writers get ENOSPC (never EIO), the daemon lives on, and once the hog is removed the
//!   commits go on by themselves: the newest generation then holds every completed operation.
//! - `store`: a `file://` store on a small tmpfs, nearly full. Commits fail with "no space" in
//!   the daemon's status, writers are held back by `--max-lag` (never failed), and once space
//!   is back everything reaches the store.
//! - `lost`: the store is unreachable (failing or black-holed) for longer than the lease TTL.
//!   The holder fail-stops (writers get EROFS), and `owsfs recover` turns its cache into a new
//!   workspace holding every completed operation.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::check::{Verdict, capture, prefix};
use crate::workload::{Cfg, read_log};
use crate::{Broken, Ctx, Figures};

/// A tmpfs of a trial's own, unmounted (lazily) when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, mib: u64) -> Result<Tmpfs> {
        std::fs::create_dir_all(dir)?;
        let ok = Command::new("mount")
            .process_group(0)
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir)
            .status()?
            .success();
        if !ok {
            bail!("cannot mount a tmpfs on {}", dir.display());
        }
        Ok(Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // A daemon log on it goes beside it first: a failed trial's directory is kept.
        let log = self.0.join("cache/owsfs.log");
        if let (true, Some(parent), Some(name)) =
            (log.exists(), self.0.parent(), self.0.file_name())
        {
            let _ = std::fs::copy(
                &log,
                parent.join(format!("{}-owsfs.log", name.to_string_lossy())),
            );
        }
        let _ = Command::new("umount")
            .process_group(0)
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

fn start_workload(ctx: &Ctx, cfg: &Cfg, mp: &Path, dir: &Path, ops: u64) -> Result<Child> {
    Command::new(&ctx.self_exe)
        .process_group(0)
        .arg("workload")
        .arg("--mount")
        .arg(mp)
        .arg("--log")
        .arg(dir.join("workload.log"))
        .args(["--seed", &cfg.seed.to_string()])
        .args(["--max-big", &cfg.max_big.to_string()])
        .args(["--sync-weight", &cfg.sync_weight.to_string()])
        .args(["--pause-us", "300", "--max-ops", &ops.to_string()])
        .arg("--owsfs")
        .arg(&ctx.owsfs.bin)
        .env("XDG_DATA_HOME", &ctx.owsfs.data_home)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("workload.err"))?)
        .spawn()
        .context("start the workload")
}

/// Waits for the workload; one still running after `limit` is stuck: where it and the
/// daemon of `cache` wait is written to `DIR/hang.txt`, and the trial fails.
fn wait(child: &mut Child, limit: Duration, dir: &Path, cache: &Path) -> Result<bool> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(s) = child.try_wait()? {
            return Ok(s.success());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::write(dir.join("hang.txt"), hang_report(child.id(), cache));
    let _ = child.kill();
    let _ = child.wait();
    bail!(
        "the workload did not end within {limit:?} (where it and the daemon wait: {})",
        dir.join("hang.txt").display()
    )
}

/// Elsewhere than Linux, no process shows its kernel stacks.
#[cfg(not(target_os = "linux"))]
fn hang_report(_workload: u32, _cache: &Path) -> String {
    String::from("(no kernel stacks on this system)\n")
}

/// The kernel stacks and system calls of every thread of the workload and of the daemon
/// serving `cache` (its pid is in `cache/lock`), and the daemon's status.
#[cfg(target_os = "linux")]
fn hang_report(workload: u32, cache: &Path) -> String {
    let mut out = String::new();
    let daemon = std::fs::read_to_string(cache.join("lock"))
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string));
    let mut pids = vec![("workload", workload.to_string())];
    pids.extend(daemon.map(|p| ("daemon", p)));
    for (who, pid) in pids {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        for t in tasks {
            let read = |f: &str| std::fs::read_to_string(t.join(f)).unwrap_or_default();
            out += &format!(
                "== {who} {pid} task {} ({}): syscall {}{}\n",
                t.file_name().unwrap_or_default().to_string_lossy(),
                read("comm").trim(),
                read("syscall"),
                read("stack")
            );
        }
    }
    out
}

/// Checks the tree at `root` holds exactly the first `done` operations (the next perhaps in
/// part).
fn judge(
    root: &Path,
    scratch: &Path,
    cfg: &Cfg,
    done: u64,
    what: &str,
    figs: &mut Figures,
) -> Result<()> {
    let found = capture(root, scratch)?;
    match prefix(&found, cfg, done, done) {
        Verdict::Prefix(_) => Ok(()),
        Verdict::Lost { prefix, lo } => {
            figs.lost += 1;
            Err(Broken(format!(
                "{what}: the state after {prefix} operations, {lo} completed"
            ))
            .into())
        }
        v => {
            figs.inconsistent += 1;
            Err(Broken(format!("{what}: {v:?}")).into())
        }
    }
}

/// `owsfs sync` until it succeeds (commits resume by themselves once space is back).
fn sync_within(ctx: &Ctx, mp: &Path, limit: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        let out = ctx.owsfs.run(&["sync", &mp.display().to_string()], &[])?;
        if out.status.success() {
            return Ok(());
        }
        if start.elapsed() > limit {
            return Err(Broken(format!(
                "commits did not resume within {limit:?} of space coming back: {}",
                crate::node::brief(&out)
            ))
            .into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The workload's error output must be one of `allowed` (or empty).
fn errors_were(dir: &Path, allowed: &[&str], what: &str) -> Result<String> {
    let err = std::fs::read_to_string(dir.join("workload.err")).unwrap_or_default();
    if !err.trim().is_empty() && !allowed.iter().any(|a| err.contains(a)) {
        return Err(Broken(format!("{what}: the workload failed with: {}", err.trim())).into());
    }
    Ok(err.lines().next().unwrap_or("").chars().take(120).collect())
}

pub fn trial(ctx: &Ctx, n: u64, figs: &mut Figures) -> Result<String> {
    let mut rng = StdRng::seed_from_u64(ctx.seed ^ n.wrapping_mul(0x8CB9_2BA7_2F3D_8DD7));
    let dir = ctx.work.join(format!("full-{n}"));
    std::fs::create_dir_all(&dir)?;
    let ctx = &ctx.own_store(&format!("full-{n}"), &dir);
    let cfg = Cfg {
        seed: rng.r#gen(),
        max_big: 1 << 20,
        sync_weight: 2,
    };
    let file_store = matches!(ctx.raw, crate::raw::Raw::File(_));
    let kind = match rng.gen_range(0..3) {
        1 if file_store => "store",
        2 => "lost",
        _ => "cache",
    };
    figs.trials += 1;
    let summary = match kind {
        "cache" => cache_full(ctx, &dir, n, &cfg, &mut rng, figs)?,
        "store" => store_full(ctx, &dir, n, &cfg, &mut rng, figs)?,
        _ => store_lost(ctx, &dir, n, &cfg, &mut rng, figs)?,
    };
    ctx.passed(&dir)?;
    Ok(format!("{kind}: {summary}"))
}

fn cache_full(
    ctx: &Ctx,
    dir: &Path,
    n: u64,
    cfg: &Cfg,
    rng: &mut StdRng,
    figs: &mut Figures,
) -> Result<String> {
    let mib = rng.gen_range(24..64);
    let fs = Tmpfs::mount(&dir.join("cachefs"), mib)?;
    let (mp, cache) = (dir.join("mnt"), fs.0.join("cache"));
    std::fs::create_dir_all(&mp)?;
    let ws = format!("full-cache-{n}");
    let args = vec!["--commit-interval".to_string(), "200ms".into()];
    let mount = ctx.owsfs.mount(&mp, &cache, &ws, &args, &[])?;
    let mut child = start_workload(ctx, cfg, &mp, dir, 1500)?;
    std::thread::sleep(Duration::from_millis(rng.gen_range(100..800)));
    // The hog fills the disk through the mount: ENOSPC, as on a local disk.
    let hog = mp.join("hog");
    let e = {
        use std::io::Write as _;
        let mut f = std::fs::File::create(&hog).context("create the hog")?;
        let block = vec![0x5au8; 1 << 20];
        loop {
            if let Err(e) = f.write_all(&block) {
                break e;
            }
        }
    };
    if e.raw_os_error() != Some(libc::ENOSPC) {
        return Err(Broken(format!(
            "a write to a full cache failed with {e}, not ENOSPC"
        ))
        .into());
    }
    std::thread::sleep(Duration::from_millis(rng.gen_range(200..1500)));
    std::fs::remove_file(&hog).context("remove the hog through the mount")?;
    wait(&mut child, Duration::from_secs(120), dir, &cache)?;
    let stopped = errors_were(
        dir,
        &["No space left", "disk is full", "database or disk is full"],
        "a full cache",
    )?;
    let done = read_log(&dir.join("workload.log"))?.done;
    sync_within(ctx, &mp, Duration::from_secs(60))?;
    mount.unmount()?;
    drop(mount);
    let restored = dir.join("restored");
    ctx.owsfs.restore(&ws, &restored, &[])?;
    judge(
        &restored,
        dir,
        cfg,
        done,
        "the newest generation after a full cache",
        figs,
    )?;
    drop(fs);
    Ok(format!(
        "{mib} MiB cache filled, {done} ops done{}",
        if stopped.is_empty() {
            String::new()
        } else {
            format!(", workload stopped: {stopped}")
        }
    ))
}

fn store_full(
    ctx: &Ctx,
    dir: &Path,
    n: u64,
    cfg: &Cfg,
    rng: &mut StdRng,
    figs: &mut Figures,
) -> Result<String> {
    let fs = Tmpfs::mount(&dir.join("storefs"), 64)?;
    // Ballast leaves only a few MiB for the store.
    let free = rng.gen_range(1..5u64);
    let ballast = fs.0.join("ballast");
    std::fs::write(&ballast, vec![0u8; ((64 - free) << 20) as usize])?;
    let mut owsfs = ctx.owsfs.clone();
    owsfs.store = format!("file://{}", fs.0.join("store").display());
    let (mp, cache) = (dir.join("mnt"), dir.join("cache"));
    std::fs::create_dir_all(&mp)?;
    let ws = format!("full-store-{n}");
    let args: Vec<String> = ["--commit-interval", "200ms", "--max-lag", "1s"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mount = owsfs.mount(&mp, &cache, &ws, &args, &[])?;
    let mut child = start_workload(ctx, cfg, &mp, dir, 600)?;
    // The store fills up; commits fail and writers are held back.
    let full_for = Duration::from_millis(rng.gen_range(1500..4000));
    std::thread::sleep(full_for);
    let log = std::fs::read_to_string(cache.join("owsfs.log")).unwrap_or_default();
    let said_full = log.contains("No space left") || log.contains("no space");
    std::fs::remove_file(&ballast)?;
    let ok = wait(&mut child, Duration::from_secs(180), dir, &cache)?;
    errors_were(
        dir,
        &[],
        "a full store (writers must be held back, not failed)",
    )?;
    if !ok {
        bail!("the workload failed");
    }
    let done = read_log(&dir.join("workload.log"))?.done;
    sync_within(ctx, &mp, Duration::from_secs(60))?;
    mount.unmount()?;
    drop(mount);
    let restored = dir.join("restored");
    owsfs.restore(&ws, &restored, &[])?;
    judge(
        &restored,
        dir,
        cfg,
        done,
        "the newest generation after a full store",
        figs,
    )?;
    drop(fs);
    Ok(format!(
        "store full for {full_for:?} ({} MiB free; {}), {done} ops done",
        free,
        if said_full {
            "commits failed: no space"
        } else {
            "the store did not fill"
        }
    ))
}

fn store_lost(
    ctx: &Ctx,
    dir: &Path,
    n: u64,
    cfg: &Cfg,
    rng: &mut StdRng,
    figs: &mut Figures,
) -> Result<String> {
    let (mp, cache) = (dir.join("mnt"), dir.join("cache"));
    std::fs::create_dir_all(&mp)?;
    let ws = format!("full-lost-{n}");
    let partition = dir.join("partition");
    let env = vec![(
        "OWSFS_FAULTS".to_string(),
        format!(
            "rate=0,partition={},log={}",
            partition.display(),
            dir.join("faults.log").display()
        ),
    )];
    let args: Vec<String> = ["--commit-interval", "200ms", "--lease-ttl", "2s"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mount = ctx.owsfs.mount(&mp, &cache, &ws, &args, &env)?;
    let mut child = start_workload(ctx, cfg, &mp, dir, u64::MAX)?;
    std::thread::sleep(Duration::from_millis(rng.gen_range(300..1500)));
    let hang = rng.gen_bool(0.5);
    std::fs::write(&partition, if hang { "hang" } else { "fail" })?;
    // The holder stops writing before its lease lapses: the workload ends on EROFS.
    wait(&mut child, Duration::from_secs(60), dir, &cache)?;
    let _ = std::fs::remove_file(&partition);
    // SQLite turns the EROFS of its journal's create into "unable to open database file"
    // (and its last errno is then a stat's ENOENT), or reopens the database read-only.
    errors_were(
        dir,
        &[
            "Read-only file system",
            "readonly database",
            "unable to open database file",
        ],
        "a lost store",
    )?;
    let p = read_log(&dir.join("workload.log"))?;
    // Its unmount cannot hand off: the unsynced tail stays in the cache.
    let _ = mount.unmount();
    drop(mount);
    // The newest generation: at least what was synced.
    let restored = dir.join("restored");
    ctx.owsfs.restore(&ws, &restored, &[])?;
    let found = capture(&restored, dir)?;
    if !matches!(prefix(&found, cfg, p.synced, p.done), Verdict::Prefix(_)) {
        figs.lost += 1;
        return Err(
            Broken("the newest generation after a fail-stop lost synced work".into()).into(),
        );
    }
    std::fs::remove_dir_all(&restored)?;
    // `owsfs recover` keeps the unsynced tail: all completed operations.
    let fork = format!("{ws}-recovered");
    ctx.owsfs.ok(
        &[
            "recover",
            "--cache",
            &cache.display().to_string(),
            "--as",
            &fork,
        ],
        &[],
    )?;
    ctx.owsfs.restore(&fork, &restored, &[])?;
    judge(&restored, dir, cfg, p.done, "the recovered workspace", figs)?;
    figs.faults += crate::crash::count_faults(&dir.join("faults.log"));
    Ok(format!(
        "store {} until fail-stop; {} ops done, {} synced; recovered as {fork}",
        if hang { "black-holed" } else { "failing" },
        p.done,
        p.synced
    ))
}

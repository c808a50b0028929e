//! Scenarios 1 and 2: the mixed workload, `kill -9` of the daemon at a random moment, then a
//! restore of the newest generation on a fresh cache, a remount of the same cache, and a
//! restore after its clean unmount, each checked against the workload's model. With faults,
//! the daemon and the restores run behind the fault-injecting store layer.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::check::{Verdict, capture, prefix};
use crate::workload::{Cfg, Progress, read_log};
use crate::{Broken, Ctx, Figures};

/// A trial's random choices.
#[derive(Debug)]
struct Plan {
    cfg: Cfg,
    pause: Duration,
    commit_interval: &'static str,
    kill_after: Duration,
    /// `OWSFS_FAULTS` of the daemon and of the restores.
    faults: Option<String>,
}

fn plan(ctx: &Ctx, rng: &mut StdRng, faults: bool, dir: &Path) -> Plan {
    let max_big = [64 << 10, 1 << 20, 4 << 20][rng.gen_range(0..3)];
    Plan {
        cfg: Cfg {
            seed: rng.r#gen(),
            max_big: if ctx.short {
                max_big.min(1 << 20)
            } else {
                max_big
            },
            sync_weight: [0, 2, 6][rng.gen_range(0..3)],
        },
        pause: Duration::from_micros([0, 200, 2000][rng.gen_range(0..3)]),
        commit_interval: ["50ms", "200ms", "1s"][rng.gen_range(0..3)],
        // Under faults a long run lets the daemon work longer before the kill, so that a trial
        // meets more of them (most store calls come from commits, a few per second).
        kill_after: Duration::from_millis(rng.gen_range(
            100..match (ctx.short, faults) {
                (true, _) => 2500,
                (false, false) => 4000,
                (false, true) => 10_000,
            },
        )),
        faults: faults.then(|| {
            format!(
                "rate={},seed={},delay_ms=1500,store_timeout_ms=1000,log={}",
                if ctx.short {
                    [0.02, 0.05, 0.1, 0.2]
                } else {
                    [0.05, 0.1, 0.2, 0.3]
                }[rng.gen_range(0..4)],
                rng.r#gen::<u32>(),
                dir.join("faults.log").display()
            )
        }),
    }
}

/// Starts the workload (this binary's `workload` command) against `mp`.
fn start_workload(ctx: &Ctx, plan: &Plan, mp: &Path, log: &Path, err: &Path) -> Result<Child> {
    Command::new(&ctx.self_exe)
        .process_group(0)
        .arg("workload")
        .arg("--mount")
        .arg(mp)
        .arg("--log")
        .arg(log)
        .arg("--seed")
        .arg(plan.cfg.seed.to_string())
        .arg("--max-big")
        .arg(plan.cfg.max_big.to_string())
        .arg("--sync-weight")
        .arg(plan.cfg.sync_weight.to_string())
        .arg("--pause-us")
        .arg(plan.pause.as_micros().to_string())
        .arg("--owsfs")
        .arg(&ctx.owsfs.bin)
        .env("XDG_DATA_HOME", &ctx.owsfs.data_home)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(err)?)
        .spawn()
        .context("start the workload")
}

/// Waits for the workload to end by itself (its mount is gone); kills it after a minute.
fn reap(child: &mut Child) -> Result<()> {
    let start = Instant::now();
    loop {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the workload did not end within 60 s of its daemon's death");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Checks a tree against the workload: a prefix of `lo..=hi` operations.
fn judge(
    what: &str,
    root: &Path,
    scratch: &Path,
    cfg: &Cfg,
    lo: u64,
    hi: u64,
    figs: &mut Figures,
) -> Result<u64> {
    let found = capture(root, scratch).with_context(|| format!("{what}: read the tree"))?;
    match prefix(&found, cfg, lo, hi) {
        Verdict::Prefix(j) => Ok(j),
        Verdict::Lost { prefix, lo } => {
            figs.lost += 1;
            Err(Broken(format!(
                "{what}: the tree is the state after {prefix} operations, but {lo} had completed \
                 (or were synced) before"
            ))
            .into())
        }
        Verdict::Inconsistent {
            closest,
            differences,
        } => {
            figs.inconsistent += 1;
            Err(Broken(format!(
                "{what}: no prefix of operations {lo}..={hi} matches; closest {closest}: {}",
                differences.join("; ")
            ))
            .into())
        }
    }
}

/// Restores, retrying a restore that failed (under injected faults a restore may run out of
/// retries; one that succeeds must be right).
fn restore(ctx: &Ctx, ws: &str, dest: &Path, env: &[(String, String)]) -> Result<()> {
    let mut last = None;
    for _ in 0..5 {
        let _ = std::fs::remove_dir_all(dest);
        match ctx.owsfs.restore(ws, dest, env) {
            Ok(()) => return Ok(()),
            Err(e) if !env.is_empty() => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.expect("tried"))
}

/// One crash trial: the workload against a fresh workspace, the daemon killed, the three
/// checks. `Err(Broken)` when a promise broke.
pub fn trial(ctx: &Ctx, n: u64, faults: bool, figs: &mut Figures) -> Result<String> {
    let name = if faults { "faults" } else { "crash" };
    let mut rng =
        StdRng::seed_from_u64(ctx.seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(faults));
    let dir = ctx.work.join(format!("{name}-{n}"));
    std::fs::create_dir_all(&dir)?;
    let ctx = &ctx.own_store(&format!("{name}-{n}"), &dir);
    let plan = plan(ctx, &mut rng, faults, &dir);
    let ws = format!("{name}-{n}");
    let (mp, cache) = (dir.join("mnt"), dir.join("cache"));
    std::fs::create_dir_all(&mp)?;
    let env: Vec<(String, String)> = plan
        .faults
        .iter()
        .map(|f| ("OWSFS_FAULTS".to_string(), f.clone()))
        .collect();
    let args = vec!["--commit-interval".to_string(), plan.commit_interval.into()];
    figs.trials += 1;

    // The workload runs until the daemon dies under it.
    let mount = ctx.owsfs.mount(&mp, &cache, &ws, &args, &env)?;
    let pid = mount.pid()?;
    let (log, err) = (dir.join("workload.log"), dir.join("workload.err"));
    let mut child = start_workload(ctx, &plan, &mp, &log, &err)?;
    std::thread::sleep(plan.kill_after);
    // A workload that ended before the kill, having done nothing, could not run at all (a
    // harness fault). One that fails after the kill met the dead daemon, as it should: on a
    // slow machine that can happen before its first operation (seen in a long run: a 130 ms
    // kill and SQLite's "disk I/O error" on its first write).
    let ended_before_kill = child.try_wait()?.is_some();
    // The dead mount stays until the workload has ended: detached earlier, its next calls
    // would go to the directory underneath and count as done (seen in a long run: a workload
    // whose `owsfs sync` failed at the kill went on, and wrote into the bare mountpoint).
    mount.kill9_keep_mount(pid)?;
    figs.kills += 1;
    reap(&mut child)?;
    mount.unmount_dead()?;
    let p: Progress = read_log(&log)?;
    let errors = std::fs::read_to_string(&err).unwrap_or_default();
    if ended_before_kill && p.done == 0 && !errors.is_empty() {
        bail!("the workload failed at once: {errors}");
    }
    drop(mount);

    // 1. The newest generation, restored on a fresh cache: a prefix no shorter than the last
    // acknowledged sync.
    let restored = dir.join("restored");
    match restore(ctx, &ws, &restored, &env) {
        // Killed before the first commit: nothing was committed, so nothing can be lost
        // unless a sync was acknowledged (then the check below fails).
        Err(e) if format!("{e:#}").contains("has no commit") => std::fs::create_dir(&restored)?,
        r => r?,
    }
    let at_kill = judge(
        "newest generation after the kill",
        &restored,
        &dir,
        &plan.cfg,
        p.synced,
        p.done,
        figs,
    )?;
    std::fs::remove_dir_all(&restored)?;

    // 2. The same cache mounted again: every completed operation is there. (A store that
    // refuses this mount is no reason to skip the trial: its journal replay is the check.)
    let mount = ctx
        .owsfs
        .mount(&mp, &cache, &ws, &args, &env)
        .map_err(|e| match e.downcast::<crate::node::StoreRefused>() {
            Ok(r) => anyhow::anyhow!("the remount of the crashed cache: {}", r.0),
            Err(e) => e,
        })?;
    let live = judge(
        "remount of the cache",
        &mp,
        &dir,
        &plan.cfg,
        p.done,
        p.done,
        figs,
    )?;
    mount.unmount()?;
    drop(mount);

    // 3. After the clean unmount, the newest generation is that state.
    restore(ctx, &ws, &restored, &env)?;
    judge(
        "newest generation after the remount's unmount",
        &restored,
        &dir,
        &plan.cfg,
        live,
        live,
        figs,
    )?;
    if n.is_multiple_of(ctx.drill_every) {
        ctx.owsfs
            .ok(
                &["drill", "--store", &ctx.owsfs.store, "--workspace", &ws],
                &[],
            )
            .context("drill of the trial's newest generation")?;
        figs.drills += 1;
    }
    let injected = count_faults(&dir.join("faults.log"));
    figs.faults += injected;
    ctx.passed(&dir)?;
    Ok(format!(
        "{} ops done, {} synced ({} syncs, {} failed), newest generation = {at_kill} ops, \
         faults {injected}, commit every {}, kill at {:?}",
        p.done, p.synced, p.syncs, p.sync_failures, plan.commit_interval, plan.kill_after
    ))
}

/// Lines of a fault log: one per injected fault.
pub fn count_faults(log: &Path) -> u64 {
    std::fs::read_to_string(log)
        .map(|s| s.lines().count() as u64)
        .unwrap_or(0)
}

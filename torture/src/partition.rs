//! Scenario 3: partitions and takeovers. Two or three nodes share one workspace with a short
//! lease TTL. The holder appends lines to a file of its own tenure and syncs now and then,
//! while the harness cuts its store access (failing or black-holed requests) and restores it,
//! hands the workspace over cleanly, or takes it over by force, alone or with two nodes racing.
//! At the end the generation log must show epochs that never go back (at most one epoch commits
//! at a time, and none commits after a newer one fenced it), and the newest generation must
//! hold every line each tenure synced.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::crash::count_faults;
use crate::node::Mount;
use crate::{Broken, Ctx, Figures};

const TTL: &str = "2s";

/// One node's time as the holder.
struct Tenure {
    id: u64,
    mount: Mount,
    /// While this file exists the node's store requests fail (or hang, if it says so).
    partition: PathBuf,
    stop: Arc<AtomicBool>,
    /// Lines appended, and lines appended before the last acknowledged `owsfs sync`.
    written: Arc<AtomicU64>,
    acked: Arc<AtomicU64>,
    writer: Option<JoinHandle<()>>,
}

fn line(tenure: u64, k: u64) -> String {
    format!("tenure {tenure} line {k}\n")
}

/// Appends a line at a time to `t{id}.txt`, and syncs every ten lines, until stopped or a
/// write fails (EROFS once the node stopped writing).
fn writer(
    mp: PathBuf,
    owsfs: PathBuf,
    id: u64,
    stop: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
    acked: Arc<AtomicU64>,
) {
    use std::io::Write as _;
    let path = mp.join(format!("t{id}.txt"));
    let mut k = 0;
    while !stop.load(Ordering::Relaxed) {
        let ok = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(line(id, k).as_bytes()));
        if ok.is_err() {
            return;
        }
        k += 1;
        written.store(k, Ordering::SeqCst);
        if k.is_multiple_of(10) {
            let synced = std::process::Command::new(&owsfs)
                .process_group(0)
                .arg("sync")
                .arg(&mp)
                .output()
                .is_ok_and(|o| o.status.success());
            if synced {
                acked.store(k, Ordering::SeqCst);
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

struct Trial<'a> {
    ctx: &'a Ctx,
    dir: PathBuf,
    ws: String,
    rng: StdRng,
    next_tenure: u64,
    /// Every tenure's (id, lines written, lines synced), once it ended.
    ended: Vec<(u64, u64, u64)>,
    figs: &'a mut Figures,
}

impl Trial<'_> {
    /// Mounts a new tenure on a fresh cache; `steal`: `--steal`, `--steal --force` or nothing.
    fn start(&mut self, steal: &[&str]) -> Result<Tenure> {
        let id = self.next_tenure;
        self.next_tenure += 1;
        let base = self.dir.join(format!("tenure-{id}"));
        let (mp, cache) = (base.join("mnt"), base.join("cache"));
        std::fs::create_dir_all(&mp)?;
        let partition = base.join("partition");
        let mut args: Vec<String> = ["--lease-ttl", TTL, "--commit-interval", "200ms"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(steal.iter().map(|s| s.to_string()));
        let env = vec![(
            "OWSFS_FAULTS".to_string(),
            format!(
                "rate=0,partition={},log={}",
                partition.display(),
                self.dir.join("faults.log").display()
            ),
        )];
        let mount = self.ctx.owsfs.mount(&mp, &cache, &self.ws, &args, &env)?;
        let (stop, written, acked) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let w = {
            let (mp, bin) = (mp.clone(), self.ctx.owsfs.bin.clone());
            let (s, wr, a) = (stop.clone(), written.clone(), acked.clone());
            std::thread::spawn(move || writer(mp, bin, id, s, wr, a))
        };
        Ok(Tenure {
            id,
            mount,
            partition,
            stop,
            written,
            acked,
            writer: Some(w),
        })
    }

    /// Ends a tenure: heals its partition, stops its writer, and unmounts it (cleanly when
    /// `clean`, which must then succeed unless the holder fail-stopped meanwhile; a fenced or
    /// stopped node's unmount may complain). Returns whether it handed the workspace off.
    fn end(&mut self, mut t: Tenure, clean: bool) -> Result<bool> {
        let _ = std::fs::remove_file(&t.partition);
        t.stop.store(true, Ordering::Relaxed);
        if let Some(w) = t.writer.take() {
            let _ = w.join();
        }
        let r = t.mount.unmount();
        self.ended.push((
            t.id,
            t.written.load(Ordering::SeqCst),
            t.acked.load(Ordering::SeqCst),
        ));
        let handed = match r {
            Ok(()) => true,
            // It stopped writing (a partition that outlasted its lease's margin) just before:
            // not a clean handoff, but no broken promise either.
            Err(e) if format!("{e:#}").contains("fail-stop") => false,
            Err(e) if clean => {
                return Err(e.context(format!("clean handoff of tenure {}", t.id)));
            }
            Err(_) => false,
        };
        drop(t.mount);
        Ok(handed)
    }

    /// A takeover (without force) from a holder that stopped writing. A renewal it had in
    /// flight when the store black-holed it may land after the partition heals, and a node
    /// watching the lease then sees it renewed and refuses; the next try waits out that last
    /// renewal.
    fn steal_stopped(&mut self) -> Result<Tenure> {
        let mut last = None;
        for _ in 0..3 {
            match self.start(&["--steal"]) {
                Ok(t) => return Ok(t),
                Err(e) if format!("{e:#}").contains("renewed its lease") => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.expect("tried"))
    }

    /// Cuts the holder's store access for a while (failing or black-holed requests).
    fn partition(&mut self, t: &Tenure) -> Result<()> {
        let hang = self.rng.gen_bool(0.5);
        std::fs::write(&t.partition, if hang { "hang" } else { "fail" })?;
        let d = Duration::from_millis(self.rng.gen_range(200..4000));
        std::thread::sleep(d);
        std::fs::remove_file(&t.partition)?;
        Ok(())
    }
}

/// The generations' (number, epoch, kind), from `owsfs log --json`.
fn log(ctx: &Ctx, ws: &str) -> Result<Vec<(u64, u64, String)>> {
    let out = ctx.owsfs.ok(
        &[
            "log",
            "--json",
            "--store",
            &ctx.owsfs.store,
            "--workspace",
            ws,
        ],
        &[],
    )?;
    let v: serde_json::Value = serde_json::from_str(&out).context("log json")?;
    let mut gens = Vec::new();
    for g in v.as_array().context("log is not an array")? {
        gens.push((
            g["number"].as_u64().context("number")?,
            g["epoch"].as_u64().context("epoch")?,
            g["kind"].as_str().unwrap_or("?").to_string(),
        ));
    }
    gens.sort();
    Ok(gens)
}

/// Epochs never go back along the generations: a commit of epoch e after one of a newer epoch
/// is a commit from a stale (fenced) holder.
pub fn epochs_in_order(gens: &[(u64, u64, String)]) -> std::result::Result<(), String> {
    for w in gens.windows(2) {
        if w[1].1 < w[0].1 {
            return Err(format!(
                "generation {} ({}) has epoch {} after generation {} ({}) of epoch {}",
                w[1].0, w[1].2, w[1].1, w[0].0, w[0].2, w[0].1
            ));
        }
    }
    Ok(())
}

/// Checks tenure `id`'s file in a restored tree: whole lines of that tenure in order, at
/// least the synced ones, at most the written ones (and one in flight).
fn check_tenure(root: &Path, id: u64, written: u64, acked: u64) -> std::result::Result<(), String> {
    let text = match std::fs::read_to_string(root.join(format!("t{id}.txt"))) {
        Ok(t) => t,
        Err(_) if acked == 0 => return Ok(()),
        Err(e) => return Err(format!("t{id}.txt: {e}, but {acked} lines were synced")),
    };
    let lines = text.split_inclusive('\n').count() as u64;
    let want: String = (0..lines).map(|k| line(id, k)).collect();
    if text != want {
        return Err(format!("t{id}.txt is not the tenure's lines in order"));
    }
    if lines < acked || lines > written + 1 {
        return Err(format!(
            "t{id}.txt has {lines} lines; {acked} were synced, {written} written"
        ));
    }
    Ok(())
}

/// One trial: a holder and takeovers for `duration`, then the checks.
pub fn trial(ctx: &Ctx, n: u64, figs: &mut Figures) -> Result<String> {
    let dir = ctx.work.join(format!("partition-{n}"));
    std::fs::create_dir_all(&dir)?;
    let ctx = &ctx.own_store(&format!("partition-{n}"), &dir);
    let mut t = Trial {
        ctx,
        ws: format!("partition-{n}"),
        rng: StdRng::seed_from_u64(ctx.seed ^ n.wrapping_mul(0xA24B_AED4_963E_E407)),
        dir: dir.clone(),
        next_tenure: 0,
        ended: Vec::new(),
        figs,
    };
    t.figs.trials += 1;
    let duration = Duration::from_secs(if ctx.short { 8 } else { 30 });
    let start = Instant::now();
    let mut holder = t.start(&[])?;
    let (mut partitions, mut handoffs, mut races, mut stopped) = (0, 0, 0, 0);
    while start.elapsed() < duration {
        std::thread::sleep(Duration::from_millis(t.rng.gen_range(300..1500)));
        match t.rng.gen_range(0..10) {
            // A partition that may or may not outlast the lease.
            0..=2 => {
                t.partition(&holder)?;
                partitions += 1;
                std::thread::sleep(Duration::from_millis(200));
                if holder.writer.as_ref().is_some_and(|w| w.is_finished()) {
                    // It stopped writing (its lease would have lapsed): another node waits
                    // the lease out and takes over, without force.
                    let next = t.steal_stopped()?;
                    t.figs.takeovers += 1;
                    t.end(holder, false)?;
                    holder = next;
                    stopped += 1;
                }
            }
            // A forced takeover while the holder is cut off (or, one time in three, while it
            // is fine): it must stop committing.
            3..=5 => {
                if t.rng.gen_bool(0.66) {
                    std::fs::write(&holder.partition, "fail")?;
                }
                let next = t.start(&["--steal", "--force"])?;
                t.figs.takeovers += 1;
                t.end(holder, false)?;
                holder = next;
            }
            // Two nodes take over by force at once: both may win in turn, never together.
            6 => {
                std::fs::write(&holder.partition, "fail")?;
                let (a, b) = std::thread::scope(|s| {
                    let ha = s.spawn(|| race_mount(ctx, &dir, &t.ws, n, 0));
                    let hb = s.spawn(|| race_mount(ctx, &dir, &t.ws, n, 1));
                    (ha.join(), hb.join())
                });
                let won = [a, b]
                    .into_iter()
                    .filter_map(|r| r.ok().and_then(|r| r.ok()))
                    .count();
                t.figs.takeovers += won as u64;
                races += 1;
                // The racers only took the lease; the holder's successor is a fresh tenure.
                let next = t.start(&["--steal", "--force"])?;
                t.figs.takeovers += 1;
                t.end(holder, false)?;
                holder = next;
            }
            // A clean handoff (a holder that stopped writing is taken over instead).
            _ if holder.writer.as_ref().is_some_and(|w| w.is_finished()) => {
                let next = t.steal_stopped()?;
                t.figs.takeovers += 1;
                t.end(holder, false)?;
                holder = next;
                stopped += 1;
            }
            _ => {
                if t.end(holder, true)? {
                    holder = t.start(&[])?;
                    handoffs += 1;
                } else {
                    holder = t.steal_stopped()?;
                    t.figs.takeovers += 1;
                    stopped += 1;
                }
            }
        }
    }
    let clean = !holder.writer.as_ref().is_some_and(|w| w.is_finished());
    if !t.end(holder, clean)? {
        // The last holder stopped: a last takeover commits the final state.
        let last = t.steal_stopped()?;
        t.figs.takeovers += 1;
        t.end(last, true)?;
    }
    let restored = dir.join("restored");
    ctx.owsfs.restore(&t.ws, &restored, &[])?;
    let gens = log(ctx, &t.ws)?;
    if let Err(e) = epochs_in_order(&gens) {
        t.figs.inconsistent += 1;
        return Err(Broken(format!("partition trial {n}: {e}")).into());
    }
    for &(id, written, acked) in &t.ended {
        if let Err(e) = check_tenure(&restored, id, written, acked) {
            t.figs.lost += 1;
            return Err(Broken(format!("partition trial {n}, newest generation: {e}")).into());
        }
    }
    let faults = count_faults(&dir.join("faults.log"));
    t.figs.faults += faults;
    let tenures = t.ended.len();
    ctx.passed(&dir)?;
    Ok(format!(
        "{tenures} tenures, {partitions} partitions ({stopped} holders stopped), {handoffs} \
         handoffs, {races} races, \
         {} generations, epochs up to {}, {faults} requests refused by partitions",
        gens.len(),
        gens.last().map_or(0, |g| g.1)
    ))
}

/// A racer: `--steal --force` on a fresh cache, then a plain unmount. Ok(Ok) when it won the
/// lease for a while.
fn race_mount(ctx: &Ctx, dir: &Path, ws: &str, n: u64, i: u32) -> Result<Result<()>> {
    let base = dir.join(format!("racer-{n}-{i}-{}", rand::random::<u32>()));
    let (mp, cache) = (base.join("mnt"), base.join("cache"));
    std::fs::create_dir_all(&mp)?;
    let args: Vec<String> = ["--lease-ttl", TTL, "--steal", "--force"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let m = match ctx.owsfs.mount(&mp, &cache, ws, &args, &[]) {
        Ok(m) => m,
        Err(e) => return Ok(Err(e)),
    };
    std::fs::write(mp.join(format!("racer-{i}.txt")), b"raced\n").ok();
    let _ = m.unmount();
    drop(m);
    if is_stuck(&mp) {
        bail!("racer {i}'s mount is still there");
    }
    Ok(Ok(()))
}

fn is_stuck(mp: &Path) -> bool {
    crate::node::is_mounted(mp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_that_go_back_are_caught() {
        let g = |v: &[(u64, u64)]| -> Vec<(u64, u64, String)> {
            v.iter().map(|(n, e)| (*n, *e, "commit".into())).collect()
        };
        assert!(epochs_in_order(&g(&[(1, 1), (2, 1), (3, 2), (4, 2)])).is_ok());
        assert!(epochs_in_order(&g(&[(1, 1), (2, 2), (3, 1)])).is_err());
    }

    #[test]
    fn tenure_files_are_checked() {
        let t = tempfile::tempdir().unwrap();
        let text: String = (0..5).map(|k| line(3, k)).collect();
        std::fs::write(t.path().join("t3.txt"), &text).unwrap();
        assert!(check_tenure(t.path(), 3, 5, 5).is_ok());
        assert!(
            check_tenure(t.path(), 3, 9, 6).is_err(),
            "synced lines missing"
        );
        assert!(
            check_tenure(t.path(), 3, 3, 0).is_err(),
            "more than written"
        );
        assert!(check_tenure(t.path(), 4, 0, 0).is_ok());
        assert!(check_tenure(t.path(), 4, 3, 1).is_err());
        std::fs::write(t.path().join("t3.txt"), text.replace("line 2", "line 9")).unwrap();
        assert!(check_tenure(t.path(), 3, 5, 0).is_err());
    }
}

//! Upkeep run by the daemon, on one thread: drills (`--drill-every`: the newest commit or,
//! every other time, a random older one) and GC (`--gc-every`: retention, then the GC of the
//! whole store); the newest drill record and the last GC for `owsfs status`. A failed drill
//! or GC is an error in the log and in the status.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, select};
use owsfs_store::drill::DrillRecord;
use owsfs_store::gc::{GcOptions, GcReport};
use owsfs_store::{GenKind, Store, Workspace};
use parking_lot::Mutex;
use rand::Rng;
use serde::{Deserialize, Serialize};

/// The newest drill of the workspace, as the daemon last saw it.
pub type LastDrill = Arc<Mutex<Option<DrillRecord>>>;

/// The daemon's last GC run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GcOutcome {
    pub time_unix_ms: u64,
    pub duration_ms: u64,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<GcReport>,
}

pub type LastGc = Arc<Mutex<Option<GcOutcome>>>;

/// What the daemon does besides serving.
#[derive(Clone, Debug)]
pub struct UpkeepOptions {
    pub drill_every: Option<Duration>,
    /// Where drills restore.
    pub scratch: PathBuf,
    pub gc_every: Option<Duration>,
    pub gc_grace: Duration,
}

/// The upkeep thread. Dropping it stops the thread; a drill in progress is waited for a
/// little, then cut short (its directory removed now or at the next start, under the cache's
/// lock); a GC in progress is left to the process's end (a GC stopped at any point is safe).
pub struct Upkeep {
    stop: Option<Sender<()>>,
    busy: Arc<AtomicBool>,
    /// Set at drop: a drill still running is not recorded (it is cut short).
    cancelled: Arc<AtomicBool>,
    scratch: PathBuf,
    prefix: String,
    /// Disconnected when the thread ends (it holds the sender).
    done: Receiver<()>,
    thread: Option<JoinHandle<()>>,
    pub last: LastDrill,
    pub last_gc: LastGc,
}

/// How often the newest drill record is read again from the store.
const REFRESH: Duration = Duration::from_secs(300);

/// How long a stop waits for a drill in progress before cutting it short.
const FINISH_WAIT: Duration = Duration::from_secs(5);

/// Where the daemon's drills restore: `SCRATCH/owsfs-drill-NODE-…`.
fn prefix(node: &str) -> String {
    format!("owsfs-drill-{node}-")
}

/// What the thread shares with its owner.
struct Shared {
    busy: Arc<AtomicBool>,
    cancelled: Arc<AtomicBool>,
    last: LastDrill,
    last_gc: LastGc,
}

impl Upkeep {
    /// Reads the newest drill record, then drills and collects on their periods.
    pub fn start(
        store: Arc<Store>,
        ws: Workspace,
        opts: UpkeepOptions,
        node: &str,
    ) -> anyhow::Result<Upkeep> {
        let prefix = prefix(node);
        remove_leftovers(&opts.scratch, &prefix);
        let (stop_tx, stop_rx) = crossbeam_channel::bounded(0);
        let (done_tx, done) = crossbeam_channel::bounded::<()>(0);
        let shared = Shared {
            busy: Arc::default(),
            cancelled: Arc::default(),
            last: Arc::default(),
            last_gc: Arc::default(),
        };
        let (busy, cancelled, last, last_gc) = (
            Arc::clone(&shared.busy),
            Arc::clone(&shared.cancelled),
            Arc::clone(&shared.last),
            Arc::clone(&shared.last_gc),
        );
        let scratch = opts.scratch.clone();
        let thread = {
            let prefix = prefix.clone();
            std::thread::Builder::new()
                .name("owsfs-upkeep".into())
                .spawn(move || {
                    let _done = done_tx;
                    run(&store, &ws, &opts, &prefix, &stop_rx, &shared);
                })?
        };
        Ok(Upkeep {
            stop: Some(stop_tx),
            busy,
            cancelled,
            scratch,
            prefix,
            done,
            thread: Some(thread),
            last,
            last_gc,
        })
    }
}

impl Drop for Upkeep {
    fn drop(&mut self) {
        self.stop.take();
        self.cancelled.store(true, Ordering::Release);
        let Some(t) = self.thread.take() else {
            return;
        };
        let _ = self.done.recv_timeout(FINISH_WAIT);
        if t.is_finished() {
            let _ = t.join();
        } else if self.busy.load(Ordering::Acquire) {
            tracing::info!("a drill in progress was cut short by the unmount");
            remove_leftovers(&self.scratch, &self.prefix);
        }
    }
}

/// Removes drill directories a daemon of this cache left behind (killed mid-drill).
fn remove_leftovers(scratch: &Path, prefix: &str) {
    let Ok(rd) = std::fs::read_dir(scratch) else {
        return;
    };
    for e in rd.flatten() {
        if e.file_name().to_string_lossy().starts_with(prefix) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

fn run(
    store: &Store,
    ws: &Workspace,
    opts: &UpkeepOptions,
    prefix: &str,
    stop: &Receiver<()>,
    shared: &Shared,
) {
    let refresh = || match ws.list_drills() {
        Ok(d) => *shared.last.lock() = d.into_iter().next_back(),
        Err(e) => tracing::warn!("cannot read the drill records: {e}"),
    };
    refresh();
    let clock = Arc::clone(store.clock());
    let mut next_drill = opts.drill_every.map(|d| clock.now() + d);
    let mut next_gc = opts.gc_every.map(|d| clock.now() + d);
    let mut round = 0u64;
    loop {
        // Drills run elsewhere (`owsfs drill`) show in the status within REFRESH.
        let drill_due = next_drill.map_or(crossbeam_channel::never(), |t| clock.at(t));
        let gc_due = next_gc.map_or(crossbeam_channel::never(), |t| clock.at(t));
        select! {
            recv(stop) -> _ => return,
            recv(clock.after(REFRESH)) -> _ => refresh(),
            recv(drill_due) -> _ => {
                next_drill = opts.drill_every.map(|d| clock.now() + d);
                round += 1;
                if !drill(store, ws, &opts.scratch, prefix, round.is_multiple_of(2), shared) {
                    return;
                }
            }
            recv(gc_due) -> _ => {
                next_gc = opts.gc_every.map(|d| clock.now() + d);
                collect(store, opts.gc_grace, shared);
            }
        }
    }
}

/// One GC run of the whole store, logged and kept for the status.
fn collect(store: &Store, grace: Duration, shared: &Shared) {
    let started = std::time::Instant::now();
    let r = owsfs_store::gc::collect(
        store,
        &GcOptions {
            grace,
            ..GcOptions::default()
        },
        &owsfs_local::progress::Silent,
    );
    let outcome = GcOutcome {
        time_unix_ms: store.clock().unix_ms(),
        duration_ms: started.elapsed().as_millis() as u64,
        error: r.as_ref().err().map(|e| e.to_string()),
        report: r.as_ref().ok().cloned(),
    };
    match &r {
        Ok(r) if r.skipped.is_some() => {
            tracing::info!("gc: {}", r.skipped.as_deref().unwrap_or_default());
            return;
        }
        Ok(r) => tracing::info!(
            "gc: {} generation records and {} packs ({} bytes) deleted, {} packs condemned, in {} ms",
            r.generations_pruned,
            r.packs_deleted,
            r.bytes_deleted,
            r.packs_condemned,
            outcome.duration_ms
        ),
        Err(e) => tracing::error!("gc failed: {e}"),
    }
    *shared.last_gc.lock() = Some(outcome);
}

/// One drill; false when the upkeep was cancelled meanwhile (stop).
fn drill(
    store: &Store,
    ws: &Workspace,
    scratch: &Path,
    prefix: &str,
    older: bool,
    shared: &Shared,
) -> bool {
    let record = match pick(ws, older) {
        Ok(Some(r)) => r,
        Ok(None) => return true,
        Err(e) => {
            tracing::warn!("drill: cannot choose a generation: {e}");
            return true;
        }
    };
    // Pinned while it is drilled, and read again under the pin: a generation another host's GC
    // is pruning is skipped, not reported as a failed drill.
    let pin_id = format!("drill-{:016x}", rand::random::<u64>());
    let _pin = match super::readonly::PinGuard::take(ws, &pin_id, &record) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!("drill: cannot pin generation {}: {e:#}", record.number);
            return true;
        }
    };
    match ws.read_generation(record.number) {
        Ok(r) if r.root == record.root => {}
        _ => return true,
    }
    shared.busy.store(true, Ordering::Release);
    let r = owsfs_local::drill::run(
        store,
        ws,
        &record,
        scratch,
        prefix,
        &owsfs_local::progress::Silent,
    );
    shared.busy.store(false, Ordering::Release);
    if shared.cancelled.load(Ordering::Acquire) {
        return false;
    }
    if let Ok(r) = &r
        && let Err(e) = ws.record_drill(r)
    {
        tracing::warn!("cannot record the drill's outcome in the store: {e}");
    }
    match r {
        Ok(r) => {
            if r.ok {
                tracing::info!("{}", crate::cmd::drill::summary(&r));
            } else {
                tracing::error!("{}", crate::cmd::drill::summary(&r));
            }
            *shared.last.lock() = Some(r);
        }
        Err(e) => tracing::error!("drill of generation {}: {e:#}", record.number),
    }
    true
}

/// The newest commit, or (`older`) a random commit before it.
fn pick(ws: &Workspace, older: bool) -> anyhow::Result<Option<owsfs_store::GenerationRecord>> {
    let Some(head) = ws.head()? else {
        return Ok(None);
    };
    let Some(newest) = ws.newest_commit(head)? else {
        return Ok(None);
    };
    if !older {
        return Ok(Some(newest));
    }
    let before: Vec<u64> = ws
        .list_generations()?
        .into_iter()
        .filter(|&n| n < newest.number)
        .collect();
    for _ in 0..8 {
        let Some(&n) = before.get(rand::thread_rng().gen_range(0..before.len().max(1))) else {
            break;
        };
        match ws.read_generation(n) {
            Ok(r) if r.kind == GenKind::Commit => return Ok(Some(r)),
            Ok(_) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Some(newest))
}

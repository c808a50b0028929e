//! Drills run by the daemon (`--drill-every`): each period, a drill of the newest commit or,
//! every other time, of a random older one; the newest drill record for `owsfs status`. A
//! failed drill is an error in the log and in the status.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, select};
use owsfs_store::drill::DrillRecord;
use owsfs_store::{GenKind, Store, Workspace};
use parking_lot::Mutex;
use rand::Rng;

/// The newest drill of the workspace, as the daemon last saw it.
pub type LastDrill = Arc<Mutex<Option<DrillRecord>>>;

/// The drill thread. Dropping it stops the thread; a drill in progress is not waited for
/// (its directory is removed at the next start, under the cache's lock).
pub struct Drills {
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
}

/// How often the newest drill record is read again from the store.
const REFRESH: Duration = Duration::from_secs(300);

/// Where the daemon's drills restore: `SCRATCH/owsfs-drill-NODE-…`.
fn prefix(node: &str) -> String {
    format!("owsfs-drill-{node}-")
}

impl Drills {
    /// Reads the newest drill record, then (with an `every`) drills on that period.
    pub fn start(
        store: Arc<Store>,
        ws: Workspace,
        every: Option<Duration>,
        scratch: PathBuf,
        node: &str,
    ) -> anyhow::Result<Drills> {
        let prefix = prefix(node);
        remove_leftovers(&scratch, &prefix);
        let (stop_tx, stop_rx) = crossbeam_channel::bounded(0);
        let busy = Arc::new(AtomicBool::new(false));
        let cancelled = Arc::new(AtomicBool::new(false));
        let last: LastDrill = Arc::default();
        let (done_tx, done) = crossbeam_channel::bounded::<()>(0);
        let thread = {
            let flags = Flags {
                busy: Arc::clone(&busy),
                cancelled: Arc::clone(&cancelled),
            };
            let last = Arc::clone(&last);
            let (scratch, prefix) = (scratch.clone(), prefix.clone());
            std::thread::Builder::new()
                .name("owsfs-drills".into())
                .spawn(move || {
                    let _done = done_tx;
                    run(
                        &store, &ws, every, &scratch, &prefix, &stop_rx, &flags, &last,
                    );
                })?
        };
        Ok(Drills {
            stop: Some(stop_tx),
            busy,
            cancelled,
            scratch,
            prefix,
            done,
            thread: Some(thread),
            last,
        })
    }
}

/// The drill thread's side of the flags.
struct Flags {
    busy: Arc<AtomicBool>,
    cancelled: Arc<AtomicBool>,
}

/// How long a stop waits for a drill in progress before cutting it short.
const FINISH_WAIT: Duration = Duration::from_secs(5);

impl Drop for Drills {
    fn drop(&mut self) {
        self.stop.take();
        self.cancelled.store(true, Ordering::Release);
        let Some(t) = self.thread.take() else {
            return;
        };
        // A short drill is let finish; a long one is cut short by removing its directory
        // (its restore then fails, and a cancelled drill is not recorded).
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

#[allow(clippy::too_many_arguments)]
fn run(
    store: &Store,
    ws: &Workspace,
    every: Option<Duration>,
    scratch: &Path,
    prefix: &str,
    stop: &Receiver<()>,
    flags: &Flags,
    last: &Mutex<Option<DrillRecord>>,
) {
    let refresh = || match ws.list_drills() {
        Ok(d) => *last.lock() = d.into_iter().next_back(),
        Err(e) => tracing::warn!("cannot read the drill records: {e}"),
    };
    refresh();
    let clock = Arc::clone(store.clock());
    let mut next = every.map(|d| clock.now() + d);
    let mut round = 0u64;
    loop {
        // Drills run elsewhere (`owsfs drill`) show in the status within REFRESH.
        let due = next.map_or(crossbeam_channel::never(), |t| clock.at(t));
        select! {
            recv(stop) -> _ => return,
            recv(clock.after(REFRESH)) -> _ => {
                refresh();
                continue;
            }
            recv(due) -> _ => {}
        }
        next = every.map(|d| clock.now() + d);
        round += 1;
        let record = match pick(ws, round.is_multiple_of(2)) {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!("drill: cannot choose a generation: {e}");
                continue;
            }
        };
        flags.busy.store(true, Ordering::Release);
        let r = owsfs_local::drill::run(
            store,
            ws,
            &record,
            scratch,
            prefix,
            &owsfs_local::progress::Silent,
        );
        flags.busy.store(false, Ordering::Release);
        if flags.cancelled.load(Ordering::Acquire) {
            return;
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
                *last.lock() = Some(r);
            }
            Err(e) => tracing::error!("drill of generation {}: {e:#}", record.number),
        }
    }
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

//! Background hydration: workers that fetch what nobody asked for yet. First the files the
//! previous holder opened (most recent first, from the newest generation's access list),
//! then every directory still pending, then every file still missing bytes. Bounded in
//! concurrency and bandwidth, and yielding to reads a program waits on.

use std::collections::{HashSet, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, after, bounded, select};
use owsfs_fuse::Core;
use parking_lot::Mutex;
use rustix::fs::OFlags;

use super::Hydrator;

/// One prefetch step fetches at most this much. (1 MiB steps were tried: no shorter handoff
/// pause measured, and full hydration 40-60% slower; bench/RESULTS.md, notes.)
const STEP: u64 = 4 << 20;
/// How long a prefetch step waits for reads a program waits on, at most.
const YIELD_MAX: Duration = Duration::from_millis(200);
/// A program counts as busy for this long after its last fetch or materialization ended: the
/// gap between two reads of one query is far shorter.
const QUIET: Duration = Duration::from_millis(30);

#[derive(Clone, Copy, Debug)]
pub struct PrefetchOptions {
    /// Workers; 0 turns the prefetch off (only what is read is fetched).
    pub workers: usize,
    /// Bytes per second for all workers together; 0 for no limit.
    pub bandwidth: u64,
}

struct Shared {
    hyd: Arc<Hydrator>,
    core: Arc<Core>,
    opts: PrefetchOptions,
    stop: AtomicBool,
    /// Disconnected at stop: every wait of a worker ends at once.
    stop_rx: Receiver<()>,
    paths: Mutex<VecDeque<String>>,
    claimed: Mutex<HashSet<u64>>,
    /// When the bandwidth allows the next byte.
    next_at: Mutex<Instant>,
}

pub struct Prefetcher {
    shared: Arc<Shared>,
    stop_tx: Mutex<Option<Sender<()>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Prefetcher {
    /// Starts the workers; `access` is the previous holder's access list.
    pub fn start(
        hyd: Arc<Hydrator>,
        core: Arc<Core>,
        access: Vec<String>,
        opts: PrefetchOptions,
    ) -> Arc<Prefetcher> {
        let (stop_tx, stop_rx) = bounded(0);
        let shared = Arc::new(Shared {
            hyd,
            core,
            opts,
            stop: AtomicBool::new(false),
            stop_rx,
            paths: Mutex::new(access.into_iter().collect()),
            claimed: Mutex::new(HashSet::new()),
            next_at: Mutex::new(Instant::now()),
        });
        let mut threads = Vec::new();
        if shared.hyd.is_active() {
            for i in 0..opts.workers {
                let s = Arc::clone(&shared);
                match std::thread::Builder::new()
                    .name(format!("owsfs-prefetch{i}"))
                    .spawn(move || s.run())
                {
                    Ok(t) => threads.push(t),
                    Err(e) => tracing::warn!("cannot start a prefetch worker: {e}"),
                }
            }
        }
        Arc::new(Prefetcher {
            shared,
            stop_tx: Mutex::new(Some(stop_tx)),
            threads: Mutex::new(threads),
        })
    }

    /// Stops the workers (each finishes its step).
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::Release);
        self.stop_tx.lock().take();
        for t in self.threads.lock().drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Prefetcher {
    /// Dropped without [`Prefetcher::stop`] (an error exit), the workers still end.
    fn drop(&mut self) {
        self.stop();
    }
}

impl Shared {
    fn run(&self) {
        let mut failures = 0u32;
        while !self.stop.load(Ordering::Acquire) {
            match self.one() {
                Ok(true) => failures = 0,
                Ok(false) => {
                    if !self.hyd.is_active() {
                        tracing::info!("hydration complete: every file is local");
                        return;
                    }
                    self.nap(Duration::from_millis(50));
                }
                Err(e) => {
                    failures += 1;
                    let wait = Duration::from_millis(100 << failures.min(7));
                    tracing::warn!("prefetch: {e:#}; retrying in {wait:?}");
                    self.nap(wait);
                }
            }
        }
    }

    /// One piece of work; false when there was none.
    fn one(&self) -> anyhow::Result<bool> {
        self.yield_to_readers();
        let next_path = self.paths.lock().pop_front();
        if let Some(p) = next_path {
            self.path(Path::new(&p))?;
            return Ok(true);
        }
        let skip = self.claimed.lock().clone();
        if let Some((ino, fd)) = self.hyd.some_pending_dir(&skip) {
            if !self.claim(ino) {
                return Ok(true);
            }
            let r = self.materialize(ino, &fd);
            self.claimed.lock().remove(&ino);
            r?;
            return Ok(true);
        }
        if self.small_files()? {
            return Ok(true);
        }
        if let Some(ino) = self.hyd.some_partial_file(&skip) {
            if !self.claim(ino) {
                return Ok(true);
            }
            let r = self.file(ino);
            self.claimed.lock().remove(&ino);
            r?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Fetches the next run of small files that lie back to back in a pack (one GET for
    /// many files); false when none is left.
    fn small_files(&self) -> anyhow::Result<bool> {
        let run = self.hyd.small_file_run(STEP, &|ino| self.claim(ino))?;
        if run.is_empty() {
            return Ok(false);
        }
        let got = self.hyd.fetch_files(&run);
        {
            let mut claimed = self.claimed.lock();
            for (f, _) in &run {
                claimed.remove(&f.ino);
            }
        }
        self.pace(got?);
        Ok(true)
    }

    fn claim(&self, ino: u64) -> bool {
        self.claimed.lock().insert(ino)
    }

    /// Materializes directory `ino`, giving the materialization lock to a program that waits
    /// (for at most `YIELD_MAX`).
    fn materialize(&self, ino: u64, fd: &OwnedFd) -> anyhow::Result<()> {
        let deadline = Instant::now() + YIELD_MAX;
        loop {
            if self.stop.load(Ordering::Acquire) {
                // Unmounting: the directory stays pending, for the next mount.
                return Ok(());
            }
            let give_way = Instant::now() < deadline;
            let done = self.core.with_barrier_shared(|| {
                self.hyd
                    .materialize_dir_in_background(ino, fd.as_fd(), give_way)
            })?;
            if done {
                return Ok(());
            }
            self.yield_to_readers();
        }
    }

    /// Walks to `path` (materializing on the way) and fetches it whole if it is a file.
    fn path(&self, path: &Path) -> anyhow::Result<()> {
        let mut cur: OwnedFd = owsfs_sys::fs::open_path(
            self.hyd.root_fd(),
            c".",
            OFlags::DIRECTORY | OFlags::CLOEXEC,
        )?;
        let mut ino = self.hyd.root_ino();
        let mut is_dir = true;
        for c in path.components() {
            let Component::Normal(name) = c else {
                continue;
            };
            if !is_dir {
                return Ok(());
            }
            if self.hyd.dir_is_pending(ino) {
                self.yield_to_readers();
                self.materialize(ino, &cur)?;
                if self.stop.load(Ordering::Acquire) {
                    return Ok(());
                }
            }
            let next =
                match owsfs_sys::fs::open_path(&cur, name, OFlags::NOFOLLOW | OFlags::CLOEXEC) {
                    Ok(fd) => fd,
                    // Gone or renamed since it was recorded: nothing to do.
                    Err(_) => return Ok(()),
                };
            let st = rustix::fs::fstat(&next)?;
            ino = st.st_ino;
            is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
            cur = next;
        }
        if !is_dir && !self.hyd.is_whole(ino) && self.claim(ino) {
            let r = self.file(ino);
            self.claimed.lock().remove(&ino);
            r?;
        }
        Ok(())
    }

    /// Fetches file `ino` whole, step by step.
    fn file(&self, ino: u64) -> anyhow::Result<()> {
        let mut at = 0u64;
        while !self.stop.load(Ordering::Acquire) {
            self.yield_to_readers();
            let before = self.hyd.fetched_bytes.load(Ordering::Relaxed);
            match self.hyd.fetch_step(ino, at, STEP)? {
                Some(next) => at = next,
                None => return Ok(()),
            }
            let n = self.hyd.fetched_bytes.load(Ordering::Relaxed) - before;
            self.pace(n);
        }
        Ok(())
    }

    /// Waits (a bounded while) until no program has waited on a fetch or a directory for
    /// `QUIET`.
    fn yield_to_readers(&self) {
        let deadline = Instant::now() + YIELD_MAX;
        loop {
            // While a program's wait is under way its end is not an event here: look again
            // every 2 ms; after it, wait out the quiet time.
            let wait = match self.hyd.foreground.quiet_in(QUIET) {
                Some(d) if d.is_zero() => return,
                Some(d) => d,
                None => Duration::from_millis(2),
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || !self.nap(wait.min(left)) {
                return;
            }
        }
    }

    /// Sleeps `d`, or until the workers are stopped (the unmount waits for them); false when
    /// stopped.
    fn nap(&self, d: Duration) -> bool {
        select! {
            recv(self.stop_rx) -> _ => false,
            recv(after(d)) -> _ => true,
        }
    }

    /// Keeps all workers together under the bandwidth limit.
    fn pace(&self, bytes: u64) {
        if self.opts.bandwidth == 0 || bytes == 0 {
            return;
        }
        let wait = {
            let mut next = self.next_at.lock();
            let now = Instant::now();
            if *next < now {
                *next = now;
            }
            *next += Duration::from_secs_f64(bytes as f64 / self.opts.bandwidth as f64);
            next.saturating_duration_since(now)
        };
        self.nap(wait);
    }
}

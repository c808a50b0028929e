//! Progress: the counters for `owsfs status`, the saver thread that stores the state and
//! reports the progress, and the foreground work the prefetch yields to.

use super::*;

impl Hydrator {
    pub fn progress(&self) -> Progress {
        let total_files = self.total_files.load(Ordering::Relaxed);
        let total_bytes = self.total_bytes.load(Ordering::Relaxed);
        let done = !self.is_active();
        let clamp = |missing: i64, total: u64| {
            if done {
                total
            } else {
                total.saturating_sub(missing.max(0) as u64)
            }
        };
        let rate = {
            let w = self.window.lock();
            let bytes: u64 = w.iter().map(|(_, n)| n).sum();
            match w.front() {
                Some((t, _)) => {
                    let secs = t.elapsed().as_secs_f64().max(1.0);
                    bytes as f64 / secs
                }
                None => 0.0,
            }
        };
        Progress {
            files_total: total_files,
            files_present: clamp(self.missing_files.load(Ordering::Relaxed), total_files),
            bytes_total: total_bytes,
            bytes_present: clamp(self.missing_bytes.load(Ordering::Relaxed), total_bytes),
            dirs_pending: self.dirs.len() as u64,
            files_pending: self.files.len() as u64,
            fetched_bytes: self.fetched_bytes.load(Ordering::Relaxed),
            fetches: self.fetches.load(Ordering::Relaxed),
            rate,
            done,
            generation: self.generation.load(Ordering::Relaxed),
        }
    }

    pub fn status(&self) -> Value {
        json!(self.progress())
    }
}

/// Work a program waits on: how much is under way, and when the last of it ended. The
/// prefetch holds back its next step while either says a program is busy, because a program's
/// reads come one after another (a B-tree walk is one fetch per level) and a prefetch step sent
/// in a gap between two of them delays the next.
pub(crate) struct Foreground {
    running: AtomicUsize,
    /// Nanoseconds from `epoch` to the end of the last foreground work (0: none yet).
    last_end: AtomicU64,
    epoch: Instant,
}

impl Foreground {
    pub(crate) fn new() -> Foreground {
        Foreground {
            running: AtomicUsize::new(0),
            last_end: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// Marks foreground work under way until the guard is dropped.
    pub(crate) fn begin(&self) -> ForegroundGuard<'_> {
        self.running.fetch_add(1, Ordering::AcqRel);
        ForegroundGuard { fg: self }
    }

    /// How long until foreground work has been over for `quiet` (zero: it is); None while
    /// some is under way.
    pub(crate) fn quiet_in(&self, quiet: Duration) -> Option<Duration> {
        if self.running.load(Ordering::Acquire) > 0 {
            return None;
        }
        let end = self.last_end.load(Ordering::Acquire);
        if end == 0 {
            return Some(Duration::ZERO);
        }
        let since = (self.epoch.elapsed().as_nanos() as u64).saturating_sub(end);
        Some(Duration::from_nanos(
            (quiet.as_nanos() as u64).saturating_sub(since),
        ))
    }

    /// Whether foreground work is under way or ended less than `quiet` ago.
    pub(crate) fn busy(&self, quiet: Duration) -> bool {
        if self.running.load(Ordering::Acquire) > 0 {
            return true;
        }
        let end = self.last_end.load(Ordering::Acquire);
        end != 0
            && (self.epoch.elapsed().as_nanos() as u64).saturating_sub(end)
                < quiet.as_nanos() as u64
    }
}

pub(crate) struct ForegroundGuard<'a> {
    fg: &'a Foreground,
}

impl Drop for ForegroundGuard<'_> {
    fn drop(&mut self) {
        let now = (self.fg.epoch.elapsed().as_nanos() as u64).max(1);
        self.fg.last_end.fetch_max(now, Ordering::AcqRel);
        self.fg.running.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The thread that stores the hydration state every 250 ms and, for a foreground mount,
/// draws the progress bar on stderr until everything is local.
pub struct Saver {
    stop_tx: Mutex<Option<crossbeam_channel::Sender<()>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Saver {
    /// Stops the thread at once (its wait ends), without a last save: the caller saves after
    /// the last cut.
    pub fn stop(&self) {
        self.stop_tx.lock().take();
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
    }
}

impl Drop for Saver {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts the saver; with `progress`, it also reports the hydration there until everything
/// is local.
pub fn spawn_saver(
    hyd: Arc<Hydrator>,
    progress: Option<Arc<dyn owsfs_local::progress::Progress>>,
) -> Saver {
    let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
    let thread = std::thread::Builder::new()
        .name("owsfs-hydrate".into())
        .spawn(move || {
            let mut progress = progress.filter(|_| hyd.is_active());
            if let Some(p) = &progress {
                let now = hyd.progress();
                p.begin(
                    &format!("hydrating generation {}", now.generation),
                    now.bytes_total,
                    now.files_total,
                );
            }
            let ticker = crossbeam_channel::tick(Duration::from_millis(250));
            loop {
                crossbeam_channel::select! {
                    recv(stop_rx) -> _ => break,
                    recv(ticker) -> _ => {}
                }
                if let Err(e) = hyd.save() {
                    tracing::warn!("cannot store the hydration state: {e:#}");
                }
                if let Some(bar) = &progress {
                    let p = hyd.progress();
                    bar.update(p.bytes_present, p.files_present);
                    if p.done {
                        bar.finish();
                        progress = None;
                    }
                }
            }
            if let Some(bar) = &progress {
                bar.finish();
            }
        })
        .ok();
    Saver {
        stop_tx: Mutex::new(Some(stop_tx)),
        thread: Mutex::new(thread),
    }
}

/// `hydrating: [#####.....] 48% 1.2/2.5 GiB, 310/1200 files, 85.3 MB/s`
pub fn progress_line(p: &Progress) -> String {
    let frac = if p.bytes_total == 0 {
        if p.done { 1.0 } else { 0.0 }
    } else {
        p.bytes_present as f64 / p.bytes_total as f64
    };
    let width = 20;
    let filled = ((frac * width as f64).round() as usize).min(width);
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    format!(
        "{} [{}{}] {:3.0}% {:.2}/{:.2} GiB, {}/{} files, {:.1} MB/s",
        if p.done { "hydrated " } else { "hydrating" },
        "#".repeat(filled),
        ".".repeat(width - filled),
        frac * 100.0,
        gib(p.bytes_present),
        gib(p.bytes_total),
        p.files_present,
        p.files_total,
        p.rate / 1e6
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn foreground_is_busy_while_running_and_for_the_quiet_time_after() {
        let fg = Foreground::new();
        let quiet = Duration::from_millis(40);
        assert!(!fg.busy(quiet), "nothing ran yet");
        let a = fg.begin();
        let b = fg.begin();
        assert!(fg.busy(Duration::ZERO));
        drop(a);
        assert!(fg.busy(Duration::ZERO), "one is still running");
        drop(b);
        assert!(!fg.busy(Duration::ZERO));
        assert!(
            fg.busy(Duration::from_secs(3600)),
            "ended within the quiet time"
        );
        std::thread::sleep(quiet + Duration::from_millis(10));
        assert!(!fg.busy(quiet), "quiet for longer than the quiet time");
    }
}

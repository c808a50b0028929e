//! Progress of long work (`owsfs_local::progress::Progress`, reported by the libraries): a bar
//! (indicatif) when stderr is a terminal, and otherwise a plain line every few seconds and one
//! at the end, for logs and CI.

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use owsfs_local::progress::Progress;
use parking_lot::Mutex;

/// How often a plain line is printed [`OWSFS_PROGRESS_EVERY`, default 5s].
const PLAIN_EVERY: Duration = Duration::from_secs(5);

/// A bar of bytes, with the item count beside it; plain lines off a terminal.
pub struct Bar {
    bar: ProgressBar,
    /// Off a terminal: what the plain lines say.
    plain: Option<Mutex<Plain>>,
}

struct Plain {
    every: Duration,
    what: String,
    total_bytes: u64,
    total_items: u64,
    bytes: u64,
    items: u64,
    started: Instant,
    printed: Instant,
}

impl Plain {
    fn line(&self, done: bool) -> String {
        let secs = self.started.elapsed().as_secs_f64();
        let size = |b: u64| bytesize::ByteSize(b).to_string();
        let mut out = format!("owsfs: {}: {}", self.what, size(self.bytes));
        if self.total_bytes > 0 {
            out.push_str(&format!(
                " of {} ({:.0} %)",
                size(self.total_bytes),
                100.0 * self.bytes as f64 / self.total_bytes as f64
            ));
        }
        if self.total_items > 0 {
            out.push_str(&format!(", {} of {} files", self.items, self.total_items));
        }
        let rate = if secs > 0.0 {
            (self.bytes as f64 / secs) as u64
        } else {
            0
        };
        out.push_str(&format!(", {}/s", size(rate)));
        if done {
            out.push_str(&format!(", done in {secs:.1} s"));
        }
        out
    }
}

impl Bar {
    pub fn new() -> Bar {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "{msg:24} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {prefix} ({eta})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("#>."),
        );
        let plain = (!rustix::termios::isatty(std::io::stderr())).then(|| {
            let every = std::env::var("OWSFS_PROGRESS_EVERY")
                .ok()
                .and_then(|s| humantime::parse_duration(&s).ok())
                .unwrap_or(PLAIN_EVERY);
            let now = Instant::now();
            Mutex::new(Plain {
                every,
                what: String::new(),
                total_bytes: 0,
                total_items: 0,
                bytes: 0,
                items: 0,
                started: now,
                printed: now,
            })
        });
        Bar { bar, plain }
    }
}

impl Default for Bar {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress for Bar {
    fn begin(&self, what: &str, total_bytes: u64, total_items: u64) {
        self.bar.set_message(what.to_string());
        self.bar.set_length(total_bytes);
        self.bar.set_position(0);
        self.bar.set_prefix(format!("0/{total_items} files"));
        self.bar.reset_eta();
        if let Some(p) = &self.plain {
            let mut p = p.lock();
            let now = Instant::now();
            p.what = what.to_string();
            (p.total_bytes, p.total_items, p.bytes, p.items) = (total_bytes, total_items, 0, 0);
            (p.started, p.printed) = (now, now);
        }
    }

    fn update(&self, bytes: u64, items: u64) {
        self.bar.set_position(bytes);
        let total = self
            .bar
            .prefix()
            .rsplit_once('/')
            .map(|(_, t)| t.to_string())
            .unwrap_or_default();
        self.bar.set_prefix(format!("{items}/{total}"));
        if let Some(p) = &self.plain {
            let mut p = p.lock();
            (p.bytes, p.items) = (bytes, items);
            if p.printed.elapsed() >= p.every {
                p.printed = Instant::now();
                eprintln!("{}", p.line(false));
            }
        }
    }

    fn finish(&self) {
        self.bar.finish();
        if let Some(p) = &self.plain {
            let p = p.lock();
            // Short work ends quietly, as it began.
            if p.started.elapsed() >= p.every {
                eprintln!("{}", p.line(true));
            }
        }
    }
}

//! Progress bars on the terminal (indicatif), for the progress the libraries report
//! (`owsfs_local::progress::Progress`). Nothing is drawn when stderr is not a terminal.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use owsfs_local::progress::Progress;

/// A bar of bytes, with the item count beside it.
pub struct Bar {
    bar: ProgressBar,
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
        Bar { bar }
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
    }

    fn finish(&self) {
        self.bar.finish();
    }
}

//! Crash points for tests: with `OWSFS_CRASH_AT=NAME` in its environment, the daemon dies
//! (as by `kill -9`: no cleanup, no unwinding) when it reaches the point named NAME, so a
//! test can check what a crash there leaves. Without the variable a point costs one load.
//!
//! Points: `reconcile-midway` (`src/hydrate/`: a warm directory's old entries removed and
//! new ones made, before its new state is stored).

use std::sync::OnceLock;

pub fn here(name: &str) {
    static AT: OnceLock<Option<String>> = OnceLock::new();
    if AT
        .get_or_init(|| std::env::var("OWSFS_CRASH_AT").ok())
        .as_deref()
        == Some(name)
    {
        tracing::error!("crash point {name}: dying now (OWSFS_CRASH_AT)");
        // SAFETY: _exit ends the process at once; nothing of ours runs after it.
        unsafe { libc::_exit(137) };
    }
}

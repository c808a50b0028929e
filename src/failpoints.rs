//! Fail points, for tests: every crash window of the store and commit side and of the journal
//! (tabled in `store/FORMAT.md` and `journal/FORMAT.md`, "Crash windows and their fail
//! points") and some phases of a mount have a named point (`fail::fail_point!`).
//! They cost a registry lookup when reached and do nothing unless configured here, from the
//! environment of the process (a background daemon inherits it):
//!
//! - `OWSFS_CRASH_AT=NAME[,NAME...]`: the process dies at once when it reaches NAME, as by
//!   `kill -9` (no cleanup, no unwinding, exit status 137), so a test can check what a crash
//!   there leaves. With `OWSFS_CRASH_ARMED_BY=PATH` as well, the points fire only while PATH
//!   exists, so a test can let a mount work normally (a first `owsfs sync`, the periodic
//!   lease renewals) and arm the crash when its workload is where it wants it;
//! - `OWSFS_WORKER_CRASH_AT=NAME[,NAME...]`: the same, but the daemon alone dies (its
//!   supervisor lives and starts the next one), also held back by `OWSFS_CRASH_ARMED_BY`;
//! - `FAILPOINTS=NAME=ACTIONS;...`: the `fail` crate's actions (`return`, `panic`,
//!   `sleep(MS)`, `N*return`...), e.g. `mount-after-lease=return` makes that phase fail.

use anyhow::{Context, bail};

/// Configures the fail points the environment names.
pub fn setup_from_env() -> anyhow::Result<()> {
    if let Ok(spec) = std::env::var("FAILPOINTS") {
        for part in spec.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((name, actions)) = part.split_once('=') else {
                bail!("FAILPOINTS: {part:?} is not NAME=ACTIONS");
            };
            fail::cfg(name.trim(), actions.trim())
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("FAILPOINTS: {part:?}"))?;
        }
    }
    let armed_by = std::env::var_os("OWSFS_CRASH_ARMED_BY").map(std::path::PathBuf::from);
    crash_points("OWSFS_WORKER_CRASH_AT", &armed_by, false)?;
    crash_points("OWSFS_CRASH_AT", &armed_by, true)?;
    Ok(())
}

/// The crash points variable `var` names: the process dies there as by `kill -9` (status
/// 137), while `armed_by` exists if given; with `node`, a worker's supervisor dies too (the
/// node's death; without it, the daemon's own, which its supervisor survives).
fn crash_points(
    var: &'static str,
    armed_by: &Option<std::path::PathBuf>,
    node: bool,
) -> anyhow::Result<()> {
    let Ok(names) = std::env::var(var) else {
        return Ok(());
    };
    for name in names.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let owned = name.to_string();
        let armed_by = armed_by.clone();
        fail::cfg_callback(name, move || {
            if armed_by.as_ref().is_some_and(|p| !p.exists()) {
                return;
            }
            if tracing::dispatcher::has_been_set() {
                tracing::error!("crash point {owned}: dying now ({var})");
            } else {
                // A command without a log (`owsfs recover`) says it on stderr.
                eprintln!("owsfs: crash point {owned}: dying now ({var})");
            }
            if node && let Some(s) = crate::mount::supervisor::supervision() {
                // SAFETY: kill(2) takes plain integers.
                unsafe { libc::kill(s.pid as i32, libc::SIGKILL) };
            }
            // SAFETY: _exit ends the process at once; nothing of ours runs after it.
            unsafe { libc::_exit(137) };
        })
        .map_err(anyhow::Error::msg)?;
    }
    Ok(())
}

//! The syncfs of the mount before each cut, done by a helper process.
//!
//! A cut first pushes the kernel's dirty pages (shared mmaps, the writeback cache) to the
//! daemon with syncfs(2) on the mount. That call is a FUSE request to the daemon itself. Made
//! from a thread of the daemon, it turned `kill -9` into a hang: once a FUSE thread has read
//! the request, the kernel waits for its answer uninterruptibly; the killed daemon's FUSE
//! threads are gone, yet the waiting thread keeps the process, and with it `/dev/fuse`, alive,
//! so the connection is never aborted and the mount, `owsfs sync` and `owsfs unmount` hang
//! until someone aborts it in `/sys/fs/fuse/connections` (found by the torture harness).
//!
//! So the daemon asks a child process to do it, over a pipe: `HELPER_ARG MOUNTPOINT`, one
//! line `sync` per call, one line `ok` or `error ...` back. A killed daemon then dies whole:
//! its end of the pipe closes, `/dev/fuse` closes, the kernel aborts the connection, the
//! helper's pending request fails, and the helper exits on the closed pipe.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use anyhow::{Context, bail};
use parking_lot::Mutex;

/// The first argument that makes the owsfs binary run [`helper_main`].
pub const HELPER_ARG: &str = "__owsfs-syncfs-helper";

struct Helper {
    child: Child,
    to: ChildStdin,
    from: BufReader<ChildStdout>,
}

/// The daemon's side: starts the helper on first use, and again if it died.
pub struct PagePusher {
    mountpoint: PathBuf,
    helper: Mutex<Option<Helper>>,
}

impl PagePusher {
    /// Starts the helper at once, so the first cut does not wait for it (writers are not
    /// held back while a cut pushes pages); if it cannot start, the first push tries again.
    pub fn new(mountpoint: &Path) -> PagePusher {
        let p = PagePusher {
            mountpoint: mountpoint.to_path_buf(),
            helper: Mutex::new(None),
        };
        match p.start() {
            Ok(h) => *p.helper.lock() = Some(h),
            Err(e) => tracing::warn!("sync: {e:#}"),
        }
        p
    }

    fn start(&self) -> anyhow::Result<Helper> {
        // This very binary, whatever its path is now (an upgrade may have replaced it).
        let mut child = Command::new(owsfs_sys::process::self_exe())
            .arg(HELPER_ARG)
            .arg(&self.mountpoint)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start the syncfs helper")?;
        let to = child.stdin.take().context("helper stdin")?;
        let from = BufReader::new(child.stdout.take().context("helper stdout")?);
        Ok(Helper { child, to, from })
    }

    /// syncfs(2) on the mount, through the helper.
    pub fn push(&self) -> anyhow::Result<()> {
        let mut h = self.helper.lock();
        if h.is_none() {
            *h = Some(self.start()?);
        }
        let helper = h.as_mut().expect("started");
        let mut answer = String::new();
        let r = writeln!(helper.to, "sync")
            .and_then(|()| helper.to.flush())
            .and_then(|()| helper.from.read_line(&mut answer));
        match r {
            Ok(n) if n > 0 && answer.trim() == "ok" => Ok(()),
            Ok(n) if n > 0 => bail!("syncfs of {}: {}", self.mountpoint.display(), answer.trim()),
            other => {
                // The helper is gone: the next call starts another.
                if let Some(mut old) = h.take() {
                    let _ = old.child.kill();
                    let _ = old.child.wait();
                }
                bail!("the syncfs helper stopped: {other:?}")
            }
        }
    }
}

impl Drop for PagePusher {
    fn drop(&mut self) {
        if let Some(h) = self.helper.get_mut().take() {
            // Its input closes: it exits.
            let Helper {
                mut child,
                to,
                from,
                ..
            } = h;
            drop(to);
            drop(from);
            let _ = child.wait();
        }
    }
}

/// The helper process: for each `sync` line on stdin, open the mountpoint, syncfs, close, and
/// answer. Ends when stdin closes. Never returns.
pub fn helper_main(mountpoint: &Path) -> ! {
    owsfs_sys::process::close_fuse_descriptors();
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        if line.trim() != "sync" {
            continue;
        }
        let answer = match std::fs::File::open(mountpoint) {
            Ok(f) => match owsfs_sys::fs::syncfs(&f) {
                Ok(()) => "ok".to_string(),
                Err(e) => format!("error: syncfs: {e}"),
            },
            Err(e) => format!("error: open: {e}"),
        };
        if writeln!(out, "{answer}")
            .and_then(|()| out.flush())
            .is_err()
        {
            break;
        }
    }
    std::process::exit(0)
}

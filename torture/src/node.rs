//! Driving the `owsfs` binary: mounts (unmounted when dropped, also after a failure), kills,
//! syncs and restores, each in a node's own environment.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

/// The binary and the store every node of a run uses.
#[derive(Clone, Debug)]
pub struct Owsfs {
    pub bin: PathBuf,
    pub store: String,
    /// The store's environment (S3 credentials).
    pub env: Vec<(String, String)>,
    /// `XDG_DATA_HOME` of every command, so nothing lands in the user's own.
    pub data_home: PathBuf,
}

/// A mount that the store refused with temporary errors (a server error, a timeout) four times
/// in a row. That is the right answer of a mount whose store is failing, not a broken promise,
/// so the run counts the trial as skipped and goes on.
#[derive(Debug)]
pub struct StoreRefused(pub String);

impl std::fmt::Display for StoreRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StoreRefused {}

/// The first and last lines of a command's output, for an error message.
pub fn brief(out: &Output) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    let lines: Vec<&str> = text.lines().collect();
    if lines.len() <= 12 {
        return lines.join("\n");
    }
    format!(
        "{}\n...\n{}",
        lines[..4].join("\n"),
        lines[lines.len() - 8..].join("\n")
    )
}

impl Owsfs {
    pub fn command(&self, env: &[(String, String)]) -> Command {
        let mut c = Command::new(&self.bin);
        // Its own process group: a Ctrl-C of the harness reaches the harness alone.
        c.process_group(0)
            .env_remove("OWSFS_CACHE")
            .env_remove("OWSFS_FAULTS")
            .env("XDG_DATA_HOME", &self.data_home)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .envs(env.iter().map(|(k, v)| (k, v)));
        c
    }

    /// Runs `owsfs ARGS` with the store's environment and `env`.
    pub fn run(&self, args: &[&str], env: &[(String, String)]) -> Result<Output> {
        self.command(env)
            .args(args)
            .output()
            .with_context(|| format!("run {} {}", self.bin.display(), args.join(" ")))
    }

    /// Runs `owsfs ARGS`, failing with its output unless it succeeds.
    pub fn ok(&self, args: &[&str], env: &[(String, String)]) -> Result<String> {
        let out = self.run(args, env)?;
        if !out.status.success() {
            bail!("owsfs {} failed:\n{}", args.join(" "), brief(&out));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// `owsfs mount MP --cache CACHE --store S --workspace W ARGS`.
    pub fn mount(
        &self,
        mp: &Path,
        cache: &Path,
        workspace: &str,
        args: &[String],
        env: &[(String, String)],
    ) -> Result<Mount> {
        let mut a = vec![
            "mount".to_string(),
            mp.display().to_string(),
            "--cache".into(),
            cache.display().to_string(),
            "--store".into(),
            self.store.clone(),
            "--workspace".into(),
            workspace.into(),
            // The checker's promise is write-through's: every operation that completed
            // survives the node's death. With the writeback cache (the default) a SQLite
            // commit under synchronous=NORMAL stays in the kernel's pages until the kernel
            // writes them back, and the node's death may take it, as a power loss would.
            "-o".into(),
            "writeback_cache=off".into(),
        ];
        a.extend(args.iter().cloned());
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let m = Mount {
            mp: mp.to_path_buf(),
            cache: cache.to_path_buf(),
            owsfs: self.clone(),
        };
        // A store that answers a few requests of the mount with a server error (SeaweedFS's
        // 500 on a loaded machine: opendal's "temporary") fails the mount with a clear error,
        // which is right but no broken promise: such a mount is tried again.
        let mut out = self.run(&a, env)?;
        for _ in 0..3 {
            if out.status.success() || !String::from_utf8_lossy(&out.stderr).contains("(temporary)")
            {
                break;
            }
            std::thread::sleep(std::time::Duration::from_secs(1));
            out = self.run(&a, env)?;
        }
        if !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("(temporary)") {
            return Err(StoreRefused(format!(
                "owsfs mount {} failed four times on the store's temporary errors:\n{}{}",
                mp.display(),
                brief(&out),
                m.log_tail(10)
            ))
            .into());
        }
        if !out.status.success() {
            bail!(
                "owsfs mount {} failed:\n{}{}",
                mp.display(),
                brief(&out),
                m.log_tail(10)
            );
        }
        if !is_mounted(mp) {
            bail!(
                "owsfs mount {} returned but nothing is mounted",
                mp.display()
            );
        }
        Ok(m)
    }

    /// `owsfs restore` of the newest generation of `workspace` into `dest` (a fresh directory).
    pub fn restore(&self, workspace: &str, dest: &Path, env: &[(String, String)]) -> Result<()> {
        let dest = dest.display().to_string();
        self.ok(
            &[
                "restore",
                "--store",
                &self.store,
                "--workspace",
                workspace,
                &dest,
            ],
            env,
        )
        .map(drop)
    }
}

/// Is an owsfs mount at `mp`?
pub fn is_mounted(mp: &Path) -> bool {
    owsfs_sys::mount::table()
        .unwrap_or_default()
        .iter()
        .any(|m| m.mountpoint == mp && owsfs_sys::mount::is_owsfs(m))
}

/// Is process `pid` gone (or a zombie)?
pub fn is_gone(pid: i32) -> bool {
    owsfs_sys::process::has_exited(pid as u32)
}

/// Waits until `f` holds or `timeout` passes; whether it held.
pub fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    f()
}

/// A mounted workspace; dropping it unmounts it (`owsfs unmount`, else `umount -l`).
pub struct Mount {
    pub mp: PathBuf,
    pub cache: PathBuf,
    owsfs: Owsfs,
}

impl Mount {
    /// The daemon's pid, from `owsfs status`.
    pub fn pid(&self) -> Result<i32> {
        let out = self
            .owsfs
            .ok(&["status", "--json", &self.mp.display().to_string()], &[])?;
        let v: serde_json::Value = serde_json::from_str(&out).context("status json")?;
        v["pid"]
            .as_i64()
            .map(|p| p as i32)
            .context("no pid in owsfs status")
    }

    /// `kill -9` of the daemon `pid`; returns once it and its cache lock are gone and the dead
    /// mount is removed.
    pub fn kill9(&self, pid: i32) -> Result<()> {
        self.kill9_keep_mount(pid)?;
        self.unmount_dead()
    }

    /// `kill -9` of the daemon, leaving its dead mount in place: a process still working in
    /// it gets ENOTCONN for every call, where after the dead mount is detached its paths would
    /// lead into the plain directory underneath (and its writes land there).
    pub fn kill9_keep_mount(&self, pid: i32) -> Result<()> {
        // The node dies: the daemon's supervisor first (the process that started it with the
        // same command line), which would otherwise start another daemon on the connection.
        if let Some(sup) = owsfs_sys::process::supervisor_of(pid as u32) {
            rustix::process::kill_process(
                rustix::process::Pid::from_raw(sup as i32).context("pid")?,
                rustix::process::Signal::KILL,
            )
            .with_context(|| format!("kill -9 of the supervisor {sup}"))?;
        }
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(pid).context("pid")?,
            rustix::process::Signal::KILL,
        )
        .with_context(|| format!("kill -9 {pid}"))?;
        if !wait_for(Duration::from_secs(30), || is_gone(pid)) {
            bail!("daemon {pid} still alive 30 s after SIGKILL");
        }
        self.wait_unlocked()
    }

    /// Waits until no process holds the cache's lock (a killed daemon's threads exit after
    /// its leader).
    pub fn wait_unlocked(&self) -> Result<()> {
        let free = wait_for(Duration::from_secs(30), || {
            let Ok(f) = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(self.cache.join("lock"))
            else {
                return true;
            };
            rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_ok()
        });
        if !free {
            bail!("the cache {} stays locked", self.cache.display());
        }
        Ok(())
    }

    /// Removes the mount of a dead daemon.
    pub fn unmount_dead(&self) -> Result<()> {
        if is_mounted(&self.mp) {
            self.owsfs
                .ok(&["unmount", &self.mp.display().to_string()], &[])?;
        }
        if is_mounted(&self.mp) {
            bail!("the dead mount {} is still there", self.mp.display());
        }
        Ok(())
    }

    /// A clean `owsfs unmount` (the last generation is committed). A mount still busy for a
    /// moment (a process of the trial exiting, its files not yet closed by the kernel) is
    /// tried again for up to 10 s.
    pub fn unmount(&self) -> Result<()> {
        let mp = self.mp.display().to_string();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let out = self.owsfs.run(&["unmount", &mp], &[])?;
            if out.status.success() {
                break;
            }
            let busy = String::from_utf8_lossy(&out.stderr).contains("is busy");
            if !busy || std::time::Instant::now() >= deadline {
                bail!(
                    "owsfs unmount {mp} failed:\n{}{}",
                    brief(&out),
                    self.log_tail(10)
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        if is_mounted(&self.mp) {
            bail!("unmount returned but {} is mounted", self.mp.display());
        }
        Ok(())
    }

    /// The last `n` lines of the daemon's log.
    pub fn log_tail(&self, n: usize) -> String {
        let log = std::fs::read_to_string(self.cache.join("owsfs.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        format!(
            "\n--- {} ---\n{}",
            self.cache.join("owsfs.log").display(),
            lines[lines.len().saturating_sub(n)..].join("\n")
        )
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if !is_mounted(&self.mp) {
            return;
        }
        let _ = self
            .owsfs
            .run(&["unmount", &self.mp.display().to_string()], &[]);
        if is_mounted(&self.mp) {
            let _ = Command::new("umount")
                .process_group(0)
                .arg("-l")
                .arg(&self.mp)
                .status();
        }
    }
}

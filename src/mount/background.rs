//! A mount in the background: `owsfs mount` re-executes itself as a daemon in a new session
//! (stderr to `CACHE/owsfs.log`) and waits on a pipe for `READY`, `NOTICE msg` or
//! `ERROR msg`, so it returns only once the mount is usable, or fails with the daemon's
//! message.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, bail};
use owsfs_local::Cache;

use crate::args::MountOpts;
use crate::mountpoint;

/// Set in the environment of the background daemon a foreground `owsfs mount` starts.
pub const DAEMON_CHILD_ENV: &str = "OWSFS_DAEMON_CHILD";

/// Reports to the `owsfs mount` that started this daemon whether the mount is ready.
pub struct Readiness {
    child: bool,
}

impl Readiness {
    /// A foreground mount (`child: false`), or the background daemon a `owsfs mount` waits for.
    pub fn new(child: bool) -> Readiness {
        Readiness { child }
    }

    pub fn ready(&self) {
        if self.child {
            // From now on the daemon outlives the `owsfs mount` that started it.
            owsfs_sys::process::die_with_parent(None);
            println!("READY");
            let _ = std::io::stdout().flush();
            // The parent stops reading: point stdout at the log (stderr) from here on.
            let _ = rustix::stdio::dup2_stdout(std::io::stderr().as_fd());
        }
    }

    /// A message for the user while the mount is not ready yet (e.g. waiting for a lease).
    pub fn notice(&self, msg: &str) {
        if self.child {
            println!("NOTICE {}", msg.replace('\n', " "));
            let _ = std::io::stdout().flush();
        } else {
            eprintln!("owsfs: {msg}");
        }
    }

    pub fn failed(&self, e: &anyhow::Error) {
        if self.child {
            println!("ERROR {}", format!("{e:#}").replace('\n', " "));
            let _ = std::io::stdout().flush();
        }
    }
}

/// Logs to stderr (a background daemon's is its log file), filtered and formatted as asked.
pub fn init_logging(filter: &str, format: crate::args::LogFormat) {
    use tracing_subscriber::prelude::*;
    let env = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Never a secret in a log, whatever the filter asks for: below INFO, nothing from the
    // request signer (`reqsign*`), which logs the credentials it tries at DEBUG. A filter of
    // its own after the user's, so no directive of theirs can let it through.
    let no_secrets = tracing_subscriber::filter::filter_fn(|m| {
        !(m.target().starts_with("reqsign") && *m.level() > tracing::Level::INFO)
    });
    let layer = tracing_subscriber::fmt::layer().with_writer(crate::logwriter::LossyStderr);
    let registry = tracing_subscriber::registry();
    let _ = match format {
        crate::args::LogFormat::Text => registry
            .with(
                layer
                    .with_ansi(rustix::termios::isatty(std::io::stderr()))
                    .with_filter(env)
                    .with_filter(no_secrets),
            )
            .try_init(),
        crate::args::LogFormat::Json => registry
            .with(
                layer
                    .json()
                    .with_ansi(false)
                    .with_filter(env)
                    .with_filter(no_secrets),
            )
            .try_init(),
    };
}

/// Starts the daemon in the background and returns once it reports the mount ready.
pub fn spawn_background(mountpoint: &Path, opts: &MountOpts, cache: &Path) -> anyhow::Result<()> {
    // The daemon checks these again, but failing here is quicker and plainer.
    mountpoint::check_mountable(mountpoint, opts.adopt)?;
    mountpoint::check_dev_fuse()?;
    // The log lives in the cache; the daemon checks the cache properly itself.
    std::fs::create_dir_all(cache).with_context(|| {
        format!(
            "cannot create cache directory {}: choose a writable place with --cache DIR",
            cache.display()
        )
    })?;
    let log_path = Cache::log_path(cache);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open the daemon log {}", log_path.display()))?;
    let exe = std::env::current_exe().context("cannot find the owsfs executable")?;
    let mut cmd = Command::new(exe);
    cmd.arg("mount")
        .arg(mountpoint)
        .arg("--cache")
        .arg(cache)
        .args(opts.to_args());
    if !opts.cache_is_explicit() {
        cmd.arg("--default-cache");
    }
    cmd.env(DAEMON_CHILD_ENV, "1")
        .env_remove("OWSFS_FOREGROUND")
        // Not /dev/null: a container may lack it; a closed pipe reads as end of file too.
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log));
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::setsid()?;
            // Until it reports ready, the daemon dies with the `owsfs mount` that waits for it
            // (e.g. an interrupted `--wait`), so it cannot take a lease for nobody.
            owsfs_sys::process::die_with_parent(Some(libc::SIGTERM));
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("cannot start the owsfs daemon")?;
    drop(child.stdin.take());
    let stdout = child
        .stdout
        .take()
        .context("the daemon's stdout pipe is missing")?;
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap_or_default();
        if line == "READY" {
            return Ok(());
        }
        if let Some(msg) = line.strip_prefix("NOTICE ") {
            if !opts.quiet {
                eprintln!("owsfs: {msg}");
            }
            continue;
        }
        if let Some(msg) = line.strip_prefix("ERROR ") {
            let _ = child.wait();
            bail!("{msg}");
        }
    }
    let status = child.wait().context("cannot wait for the daemon")?;
    let tail = std::fs::read_to_string(&log_path)
        .map(|s| {
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(10)..].join("\n")
        })
        .unwrap_or_default();
    bail!(
        "the daemon exited ({status}) before the mount was ready; its log {} ends with:\n{tail}",
        log_path.display()
    )
}

/// Raises the open-file limit as far as allowed and returns it. Every inode the kernel holds
/// keeps a descriptor open, so this bounds how many inodes the kernel can cache at once.
fn raise_nofile_limit() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let lim = getrlimit(Resource::Nofile);
    let hard = lim.maximum.unwrap_or(u64::MAX);
    // Root may go past the hard limit, up to the kernel's per-process ceiling.
    let ceiling = owsfs_sys::process::open_files_ceiling().unwrap_or(hard);
    for target in [ceiling.max(hard), hard] {
        let want = rustix::process::Rlimit {
            current: Some(target),
            maximum: Some(target),
        };
        if setrlimit(Resource::Nofile, want).is_ok() {
            return target;
        }
    }
    let got = getrlimit(Resource::Nofile).current.unwrap_or(1024);
    tracing::warn!("cannot raise the open file limit; it stays at {got}");
    got
}

/// How many inodes the kernel may keep cached (each holds a descriptor in the daemon): the
/// open file limit, raised as far as allowed, less a reserve for the journal, the control
/// socket and open files; at most `max_inodes` (`-o max_inodes`).
pub fn inode_budget(max_inodes: Option<usize>) -> usize {
    let nofile = raise_nofile_limit();
    let fd_budget = nofile.saturating_sub(4096).max(1024) as usize;
    let budget = max_inodes.map_or(fd_budget, |m| m.min(fd_budget));
    tracing::info!("open file limit {nofile}: up to {budget} inodes cached by the kernel");
    budget
}

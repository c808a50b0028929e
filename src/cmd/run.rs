//! `owsfs run [mount flags] --mount DIR -- CMD ARGS...`: the container entrypoint wrapper.
//!
//! Mounts (in the background, like `owsfs mount`), runs CMD in a process group of its own once
//! the workspace is ready, and forwards signals to that group. When CMD exits, what is left of
//! its group gets SIGTERM (then SIGKILL after the grace period), the workspace is handed off,
//! and `owsfs run` exits with CMD's status. On SIGTERM/SIGINT, CMD gets the signal and the
//! grace period, then the same. If the mount stops writing (fail-stop: the lease was lost),
//! CMD gets SIGTERM and then SIGKILL after the grace period, so it cannot act on a workspace
//! it no longer owns, and `owsfs run` exits with status 75.

use std::ffi::OsString;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, ExitStatus};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use crossbeam_channel::{Receiver, after, never, select, tick, unbounded};
use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2};

use super::mount::MountArgs;
use crate::args::MountOpts;
use crate::control::ControlError;
use crate::control::client::{self, ClientError};

/// Exit status when the lease was lost and CMD was stopped.
pub const EXIT_FAIL_STOP: u8 = 75;

#[derive(Args, Debug)]
#[command(
    after_help = "Exit status: CMD's (128+N if a signal N ended it); 75 when the \
                        workspace's lease was lost and CMD was stopped; 1 when the mount or the \
                        handoff failed."
)]
pub struct RunArgs {
    /// Where to mount the workspace for CMD.
    #[arg(long = "mount", value_name = "DIR")]
    pub mount: PathBuf,
    /// How long CMD has to exit after SIGTERM (forwarded, or on fail-stop) before SIGKILL.
    #[arg(long, env = "OWSFS_GRACE", default_value = "10s", value_parser = crate::args::parse_duration)]
    pub grace: Duration,
    #[command(flatten)]
    pub opts: MountOpts,
    /// The command and its arguments (after --).
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

pub fn run(args: RunArgs) -> ExitCode {
    match run_inner(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("owsfs run: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn kill(pid: i32, sig: i32) -> bool {
    // SAFETY: kill(2) takes plain integers.
    unsafe { libc::kill(pid, sig) == 0 }
}

/// Why CMD is being stopped.
enum Stopping {
    Signal,
    FailStop(String),
}

/// Signals caught from the start, so one that arrives early is not lost.
fn catch_signals(mounting: Arc<AtomicBool>) -> anyhow::Result<Receiver<i32>> {
    let mut signals =
        signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2])
            .context("cannot install signal handlers")?;
    let (tx, rx) = unbounded();
    std::thread::Builder::new()
        .name("owsfs-run-signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if matches!(sig, SIGTERM | SIGINT) && mounting.load(Ordering::SeqCst) {
                    // Still mounting (e.g. waiting for the lease): give up; the daemon, not
                    // ready yet, dies with us.
                    eprintln!("owsfs run: signal {sig} while mounting: giving up");
                    std::process::exit(128 + sig);
                }
                if tx.send(sig).is_err() {
                    break;
                }
            }
        })
        .context("cannot start the signal thread")?;
    Ok(rx)
}

fn run_inner(args: RunArgs) -> anyhow::Result<ExitCode> {
    let mounting = Arc::new(AtomicBool::new(true));
    let signals = catch_signals(Arc::clone(&mounting))?;

    // An entrypoint should not need a mkdir before it.
    if !args.mount.exists() {
        std::fs::create_dir_all(&args.mount).with_context(|| {
            format!("cannot create the mount directory {}", args.mount.display())
        })?;
    }
    let mut opts = args.opts.clone();
    opts.foreground = false;
    super::mount::run(MountArgs {
        mountpoint: args.mount.clone(),
        opts,
    })
    .context("cannot mount the workspace")?;
    mounting.store(false, Ordering::SeqCst);
    let mp = args.mount.as_path();

    if let Ok(sig) = signals.try_recv() {
        eprintln!("owsfs run: signal {sig} before CMD started: handing off");
        handoff(mp)?;
        return Ok(ExitCode::from(128 + sig as u8));
    }

    let tty = rustix::termios::isatty(std::io::stdin());
    let mut cmd = Command::new(&args.command[0]);
    cmd.args(&args.command[1..]).process_group(0);
    // A working directory inside the mountpoint (`WORKDIR /workspace`) still names the
    // directory under the mount: CMD would write beside the workspace, not in it. Entered again
    // by its path (by CMD only: this process must not keep the mount busy), it is the mount's.
    if let Ok(cwd) = std::env::current_dir()
        && mp.canonicalize().is_ok_and(|m| cwd.starts_with(m))
    {
        cmd.current_dir(&cwd);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let _ = handoff(mp);
            anyhow::bail!("cannot run {:?}: {e}", args.command[0]);
        }
    };
    let pgid = child.id() as i32;
    if tty {
        give_terminal(pgid);
    }
    let exited = {
        let (tx, rx) = unbounded::<std::io::Result<ExitStatus>>();
        std::thread::Builder::new()
            .name("owsfs-run-wait".into())
            .spawn(move || {
                let _ = tx.send(child.wait());
            })
            .context("cannot start the wait thread")?;
        rx
    };

    let (status, stopping) = supervise(mp, pgid, args.grace, &signals, &exited)?;
    if tty {
        give_terminal(rustix::process::getpgrp().as_raw_nonzero().get());
    }
    // What CMD left running in its group is stopped too: it must not write after the handoff.
    // (No event tells when a process group is empty: this waits by looking.)
    if kill(-pgid, 0) {
        kill(-pgid, SIGTERM);
        let deadline = Instant::now() + args.grace;
        while kill(-pgid, 0) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        kill(-pgid, libc::SIGKILL);
    }
    let code = match (status.code(), status.signal()) {
        (Some(c), _) => c.clamp(0, 255) as u8,
        (None, Some(sig)) => 128 + sig as u8,
        _ => 1,
    };
    if let Some(Stopping::FailStop(why)) = stopping {
        if let Err(e) = super::unmount::run(&super::unmount::UnmountArgs {
            mountpoint: mp.to_path_buf(),
            lazy: false,
            umount_helper: false,
            force: false,
        }) {
            eprintln!("owsfs run: {e:#}");
        }
        eprintln!("owsfs run: CMD was stopped because the workspace lease was lost: {why}");
        return Ok(ExitCode::from(EXIT_FAIL_STOP));
    }
    handoff(mp)?;
    Ok(ExitCode::from(code))
}

/// Waits for CMD to exit: forwards signals, watches the mount for a fail-stop every 200 ms,
/// and kills CMD's group when the grace period after SIGTERM has passed.
fn supervise(
    mp: &Path,
    pgid: i32,
    grace: Duration,
    signals: &Receiver<i32>,
    exited: &Receiver<std::io::Result<ExitStatus>>,
) -> anyhow::Result<(ExitStatus, Option<Stopping>)> {
    let ticker = tick(Duration::from_millis(200));
    // Once the signal thread is gone (its channel disconnected) it is waited on no more: a
    // disconnected channel would wake the loop at once, over and over.
    let mut signals = signals.clone();
    let mut stopping: Option<Stopping> = None;
    let mut deadline: Receiver<Instant> = never();
    let mut status_failures = 0u32;
    loop {
        select! {
            recv(exited) -> r => {
                let status = r
                    .context("the wait thread ended")?
                    .context("cannot wait for CMD")?;
                return Ok((status, stopping));
            }
            recv(signals) -> sig => {
                let Ok(sig) = sig else {
                    signals = never();
                    continue;
                };
                kill(-pgid, sig);
                if matches!(sig, SIGTERM | SIGINT) && stopping.is_none() {
                    eprintln!("owsfs run: signal {sig} passed to CMD; it has {grace:?} to exit");
                    stopping = Some(Stopping::Signal);
                    deadline = after(grace);
                }
            }
            recv(ticker) -> _ => {
                if matches!(stopping, Some(Stopping::FailStop(_))) {
                    continue;
                }
                if let Some(why) = writes_stopped(mp, &mut status_failures) {
                    eprintln!(
                        "owsfs run: the workspace stopped taking writes ({why}); stopping CMD \
                         (SIGTERM, SIGKILL after {grace:?})"
                    );
                    kill(-pgid, SIGTERM);
                    stopping = Some(Stopping::FailStop(why));
                    deadline = after(grace);
                }
            }
            recv(deadline) -> _ => {
                eprintln!("owsfs run: CMD did not exit within {grace:?}: SIGKILL");
                kill(-pgid, libc::SIGKILL);
                deadline = never();
            }
        }
    }
}

/// Hands the workspace off (retrying while the mount is busy), so the next node can mount.
fn handoff(mp: &Path) -> anyhow::Result<()> {
    let mut tries = 0;
    loop {
        match client::unmount(mp, false) {
            Ok(_) => {
                eprintln!(
                    "owsfs: {} handed off: everything written is in the store and the lease is \
                     released",
                    mp.display()
                );
                return Ok(());
            }
            Err(ClientError::Refused(ControlError::Busy(_))) if tries < 50 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(e).context("the handoff failed"),
        }
    }
}

/// Why the mount at `mp` stopped taking writes, if it did, or its daemon is gone (or has not
/// answered five status requests in a row).
fn writes_stopped(mp: &Path, failures: &mut u32) -> Option<String> {
    match client::status(mp, false, Duration::from_secs(2)) {
        Ok(s) => {
            *failures = 0;
            s.writes_stopped().map(str::to_string)
        }
        Err(e) if e.daemon_gone() => Some(format!("the owsfs daemon is gone: {e}")),
        Err(e) => {
            *failures += 1;
            (*failures >= 5).then(|| format!("the owsfs daemon does not answer: {e}"))
        }
    }
}

/// Makes `pgid` the terminal's foreground process group (job control, as a shell does).
fn give_terminal(pgid: i32) {
    // SAFETY: plain libc calls on our own stdin; SIGTTOU is ignored around tcsetpgrp so a
    // background caller is not stopped by it.
    unsafe {
        let old = libc::signal(libc::SIGTTOU, libc::SIG_IGN);
        libc::tcsetpgrp(0, pgid);
        libc::signal(libc::SIGTTOU, old);
    }
}

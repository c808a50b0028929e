//! `owsfs run [mount flags] --mount DIR -- CMD ARGS...`: the container entrypoint wrapper.
//!
//! Mounts (in the background, like `owsfs mount`), runs CMD in a process group of its own once
//! the workspace is ready, and forwards signals to that group. When CMD exits, what is left of
//! its group gets SIGTERM (then SIGKILL after the grace period), the workspace is handed off,
//! and `owsfs run` exits with CMD's status. On SIGTERM/SIGINT, CMD gets the signal and the
//! grace period, then the same. If the mount stops writing (fail-stop: the lease was lost),
//! CMD gets SIGTERM and then SIGKILL after the grace period, so it cannot act on a workspace
//! it no longer owns, and `owsfs run` exits with status 75.

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, ExitCode};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context;
use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2};

use crate::cli::{MountArgs, RunArgs};
use crate::{control, daemon};

/// Exit status when the lease was lost and CMD was stopped.
pub const EXIT_FAIL_STOP: u8 = 75;

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

fn run_inner(args: RunArgs) -> anyhow::Result<ExitCode> {
    // Signals are caught before the mount, so one that arrives early is not lost.
    let mut signals =
        signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2])
            .context("cannot install signal handlers")?;
    let (tx, rx) = mpsc::channel::<i32>();
    let mounting = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    {
        let mounting = std::sync::Arc::clone(&mounting);
        std::thread::Builder::new()
            .name("owsfs-run-signals".into())
            .spawn(move || {
                for sig in signals.forever() {
                    if matches!(sig, SIGTERM | SIGINT)
                        && mounting.load(std::sync::atomic::Ordering::SeqCst)
                    {
                        // Still mounting (e.g. waiting for the lease): give up; the daemon,
                        // not ready yet, dies with us.
                        eprintln!("owsfs run: signal {sig} while mounting: giving up");
                        std::process::exit(128 + sig);
                    }
                    if tx.send(sig).is_err() {
                        break;
                    }
                }
            })
            .context("cannot start the signal thread")?;
    }

    // An entrypoint should not need a mkdir before it.
    if !args.mount.exists() {
        std::fs::create_dir_all(&args.mount).with_context(|| {
            format!("cannot create the mount directory {}", args.mount.display())
        })?;
    }
    let mut opts = args.opts.clone();
    opts.foreground = false;
    daemon::mount(MountArgs {
        mountpoint: args.mount.clone(),
        opts,
    })
    .context("cannot mount the workspace")?;
    mounting.store(false, std::sync::atomic::Ordering::SeqCst);
    let mp = args.mount.as_path();

    if let Ok(sig) = rx.try_recv() {
        eprintln!("owsfs run: signal {sig} before CMD started: handing off");
        handoff(mp)?;
        return Ok(ExitCode::from(128 + sig as u8));
    }

    let tty = rustix::termios::isatty(std::io::stdin());
    let mut cmd = Command::new(&args.command[0]);
    cmd.args(&args.command[1..]).process_group(0);
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

    let mut stopping: Option<(Stopping, Instant)> = None;
    let mut killed = false;
    let mut last_check = Instant::now();
    let mut status_failures = 0u32;
    let status = loop {
        if let Some(status) = child.try_wait().context("cannot wait for CMD")? {
            break status;
        }
        while let Ok(sig) = rx.try_recv() {
            kill(-pgid, sig);
            if matches!(sig, SIGTERM | SIGINT) && stopping.is_none() {
                eprintln!(
                    "owsfs run: signal {sig} passed to CMD; it has {:?} to exit",
                    args.grace
                );
                stopping = Some((Stopping::Signal, Instant::now()));
            }
        }
        if last_check.elapsed() >= Duration::from_millis(200) {
            last_check = Instant::now();
            if let Some(why) = writes_stopped(mp, &mut status_failures)
                && !matches!(stopping, Some((Stopping::FailStop(_), _)))
            {
                eprintln!(
                    "owsfs run: the workspace stopped taking writes ({why}); stopping CMD \
                     (SIGTERM, SIGKILL after {:?})",
                    args.grace
                );
                kill(-pgid, SIGTERM);
                stopping = Some((Stopping::FailStop(why), Instant::now()));
            }
        }
        if let Some((_, since)) = &stopping
            && !killed
            && since.elapsed() >= args.grace
        {
            eprintln!(
                "owsfs run: CMD did not exit within {:?}: SIGKILL",
                args.grace
            );
            kill(-pgid, libc::SIGKILL);
            killed = true;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if tty {
        give_terminal(rustix::process::getpgrp().as_raw_nonzero().get());
    }
    // What CMD left running in its group is stopped too: it must not write after the handoff.
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
    if let Some((Stopping::FailStop(why), _)) = stopping {
        if let Err(e) = control::unmount(mp, false) {
            eprintln!("owsfs run: {e:#}");
        }
        eprintln!("owsfs run: CMD was stopped because the workspace lease was lost: {why}");
        return Ok(ExitCode::from(EXIT_FAIL_STOP));
    }
    handoff(mp)?;
    Ok(ExitCode::from(code))
}

/// Hands the workspace off (retrying while the mount is busy), so the next node can mount.
fn handoff(mp: &Path) -> anyhow::Result<()> {
    let mut tries = 0;
    loop {
        match control::handoff(mp) {
            Ok(()) => return Ok(()),
            Err(e) if tries < 50 && format!("{e:#}").contains("busy") => {
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
    match control::status_value(mp) {
        Ok(v) => {
            *failures = 0;
            v["sync"]["writes_stopped"].as_str().map(str::to_string)
        }
        Err(e) if control::daemon_gone(&e) => Some(format!("the owsfs daemon is gone: {e:#}")),
        Err(e) => {
            *failures += 1;
            (*failures >= 5).then(|| format!("the owsfs daemon does not answer: {e:#}"))
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

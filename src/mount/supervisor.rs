//! The supervisor: a small process that keeps a mount's FUSE connection open across the death
//! of the daemon that serves it, and starts the next one.
//!
//! A background `owsfs mount` starts the supervisor (the `owsfs mount` process again, with
//! `OWSFS_DAEMON_CHILD` set); the supervisor starts the serving daemon (the *worker*, the same
//! command line with [`WORKER_ENV`] set). The worker mounts, and hands the supervisor a
//! descriptor of its `/dev/fuse` connection and the kernel's INIT request over a socket
//! (`SCM_RIGHTS`). While any process holds the descriptor the connection lives: when the
//! worker dies (`kill -9`, a panic, out of memory), the kernel keeps every request it had read
//! and left unanswered, and queues the new ones. The supervisor then starts another worker
//! with the descriptor and the INIT request; it takes over the connection without a new
//! mount (`owsfs_fuse::resume`), opens the inodes and files the kernel still refers to again
//! from what the dead one left (`CACHE/nodes`), and asks the kernel to send the unanswered
//! requests again (FUSE_NOTIFY_RESEND). Programs see a pause.
//!
//! `owsfs restart MOUNTPOINT` uses the same path on purpose: the worker holds requests back,
//! and exits with [`RESTART_EXIT`]; the supervisor starts the binary now at its path.
//!
//! The supervisor has no filesystem logic: it starts processes, relays the first one's
//! readiness to `owsfs mount`, forwards SIGTERM and SIGINT, and holds a descriptor. It gives
//! up after [`CRASH_LIMIT`] deaths within [`CRASH_WINDOW`]: it detaches the mount and closes
//! the connection, so programs get ENOTCONN instead of waiting for good.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, IoSlice, IoSliceMut, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};

/// Set in a worker's environment: `INCARNATION:CHANNEL_FD`, then for a worker that takes over
/// a live connection `:DEVICE_FD:INIT_HEX`.
pub const WORKER_ENV: &str = "OWSFS_WORKER";

/// A worker's exit status that asks for the next worker at once (`owsfs restart`).
pub const RESTART_EXIT: i32 = 75;

/// Deaths of workers within [`CRASH_WINDOW`] after which the supervisor gives up.
pub const CRASH_LIMIT: usize = 5;
pub const CRASH_WINDOW: Duration = Duration::from_secs(60);

/// The supervisor's pid, in a worker (0 elsewhere): a crash point kills it too, since it
/// stands for the death of the node (`failpoints`).
pub static SUPERVISOR_PID: AtomicI32 = AtomicI32::new(0);

/// The supervisor holds this worker's connection, so that it outlives the worker (it was
/// handed over, by this worker or an earlier one). Not for a mount served through io_uring,
/// nor on a kernel that cannot send requests again (`Mounted::hand_over`).
pub static CONNECTION_KEPT: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Which daemon of the connection this worker is (set with [`SUPERVISOR_PID`]).
static INCARNATION: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);

/// The supervisor of this process, for the status; None when there is none (any more: a
/// dead supervisor's daemon is reparented).
pub fn supervision() -> Option<crate::control::Supervision> {
    let pid = SUPERVISOR_PID.load(Ordering::Relaxed);
    let parent = rustix::process::getppid().map_or(0, |p| p.as_raw_nonzero().get());
    (pid > 0 && pid == parent).then(|| crate::control::Supervision {
        pid: pid as u32,
        daemon: INCARNATION.load(Ordering::Relaxed),
    })
}

/// What a worker got from its supervisor.
pub struct Worker {
    /// 0 for the worker that mounts; each later one counts one more.
    pub incarnation: u16,
    channel: OwnedFd,
    /// A live connection to take over (every worker after the first).
    pub resume: Option<Resume>,
}

/// A connection an earlier worker mounted.
pub struct Resume {
    pub device: OwnedFd,
    pub init: Vec<u8>,
}

/// Takes ownership of a descriptor number this process inherited, and marks it close-on-exec.
fn inherited(fd: RawFd) -> anyhow::Result<OwnedFd> {
    if fd < 3 {
        bail!("{WORKER_ENV}: descriptor {fd} is not one a supervisor passes");
    }
    // SAFETY: the supervisor left this descriptor open for this process, and nothing else in
    // it knows the number.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::CLOEXEC)
        .with_context(|| format!("{WORKER_ENV}: descriptor {} is not open", fd.as_raw_fd()))?;
    Ok(fd)
}

impl Worker {
    /// The worker this process is, if a supervisor started it; the variable is removed, so
    /// that nothing this process starts takes it for its own.
    pub fn from_env() -> anyhow::Result<Option<Worker>> {
        let Some(spec) = std::env::var_os(WORKER_ENV) else {
            return Ok(None);
        };
        // SAFETY: called once at start, before any thread of ours reads the environment.
        unsafe { std::env::remove_var(WORKER_ENV) };
        let spec = spec.to_string_lossy().into_owned();
        let parts: Vec<&str> = spec.split(':').collect();
        let bad = || anyhow::anyhow!("{WORKER_ENV}={spec:?} is malformed");
        let num = |s: &str| s.parse::<i32>().map_err(|_| bad());
        let (incarnation, channel, resume) = match parts.as_slice() {
            [i, c] => (i, num(c)?, None),
            [i, c, d, init] => {
                let init = hex::decode(init).map_err(|_| bad())?;
                (i, num(c)?, Some((num(d)?, init)))
            }
            _ => return Err(bad()),
        };
        let incarnation: u16 = incarnation.parse().map_err(|_| bad())?;
        let channel = inherited(channel)?;
        let resume = match resume {
            Some((d, init)) => Some(Resume {
                device: inherited(d)?,
                init,
            }),
            None => None,
        };
        let parent = rustix::process::getppid().map_or(0, |p| p.as_raw_nonzero().get());
        SUPERVISOR_PID.store(parent, Ordering::Relaxed);
        INCARNATION.store(incarnation, Ordering::Relaxed);
        // A panic anywhere ends this daemon, so that its supervisor starts the next one: a
        // serving thread that unwound would leave the kernel's request answered with EIO and
        // one reader fewer, and after a few nobody would read the connection.
        let report = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            report(info);
            tracing::error!("{info}: this daemon ends, and its supervisor starts the next one");
            std::process::abort();
        }));
        Ok(Some(Worker {
            incarnation,
            channel,
            resume,
        }))
    }

    /// Gives the supervisor the mounted connection: a descriptor of it and its INIT request.
    pub fn hand_over(&self, device: &OwnedFd, init: &[u8]) -> anyhow::Result<()> {
        let fds = [device.as_fd()];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
            bail!("cannot pass the FUSE descriptor: no room for it");
        }
        rustix::net::sendmsg(
            &self.channel,
            &[IoSlice::new(init)],
            &mut control,
            SendFlags::empty(),
        )
        .context("cannot hand the FUSE connection to the supervisor")?;
        Ok(())
    }
}

/// The connection the supervisor holds, once the first worker handed it over.
struct Held {
    device: OwnedFd,
    init: Vec<u8>,
}

/// Takes what workers handed over since the last look (the newest wins).
fn receive(channel: &OwnedFd, held: &mut Option<Held>) {
    loop {
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let mut buf = vec![0u8; 4096];
        let got = rustix::net::recvmsg(
            channel,
            &mut [IoSliceMut::new(&mut buf)],
            &mut control,
            RecvFlags::DONTWAIT,
        );
        let Ok(got) = got else { return };
        let mut device = None;
        for msg in control.drain() {
            if let RecvAncillaryMessage::ScmRights(fds) = msg {
                device = fds.into_iter().next();
            }
        }
        if let Some(device) = device {
            let _ = rustix::io::fcntl_setfd(&device, rustix::io::FdFlags::CLOEXEC);
            buf.truncate(got.bytes);
            *held = Some(Held { device, init: buf });
        }
    }
}

/// Whether the kernel connection is over (unmounted, or aborted): its descriptor polls as
/// an error then.
fn connection_ended(device: &OwnedFd) -> bool {
    let mut fds = [rustix::event::PollFd::new(
        device,
        rustix::event::PollFlags::IN,
    )];
    let timeout = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    match rustix::event::poll(&mut fds, Some(&timeout)) {
        Ok(_) => fds[0].revents().contains(rustix::event::PollFlags::ERR),
        Err(_) => true,
    }
}

fn describe(status: &ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(s)) => format!("was killed by signal {s}"),
        _ => status.to_string(),
    }
}

/// The worker in charge now, for forwarding signals to it.
static CURRENT: AtomicI32 = AtomicI32::new(0);

/// SIGTERM or SIGINT came: the mount is to end, so no worker is started after this one.
static STOPPING: AtomicI32 = AtomicI32::new(0);

/// Forwards SIGTERM and SIGINT to the worker in charge: they ask it to unmount.
fn forward_signals() -> anyhow::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    std::thread::Builder::new()
        .name("owsfs-signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if sig == SIGHUP {
                    continue;
                }
                STOPPING.store(sig, Ordering::SeqCst);
                let pid = CURRENT.load(Ordering::SeqCst);
                if pid > 0 {
                    // SAFETY: kill(2) takes plain integers.
                    unsafe { libc::kill(pid, sig) };
                }
            }
        })?;
    Ok(())
}

/// Runs the supervisor of the mount at `mountpoint`: starts workers with this process's
/// command line until one ends the mount. Returns the exit status for this process.
pub fn supervise(mountpoint: &Path) -> anyhow::Result<i32> {
    // The binary at this path now: `owsfs restart` after an upgrade starts the new one.
    let exe: PathBuf = std::env::current_exe().context("cannot find the owsfs executable")?;
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let (ours, theirs) = rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::DGRAM,
        SocketFlags::CLOEXEC,
        None,
    )
    .context("cannot make the supervisor's socket")?;
    forward_signals()?;
    let mut held: Option<Held> = None;
    let mut deaths: VecDeque<Instant> = VecDeque::new();
    let mut ready = false;
    let mut incarnation: u16 = 0;
    loop {
        let mut spec = format!("{incarnation}:{}", theirs.as_raw_fd());
        if let Some(h) = &held {
            spec.push_str(&format!(
                ":{}:{}",
                h.device.as_raw_fd(),
                hex::encode(&h.init)
            ));
        }
        let mut cmd = Command::new(&exe);
        cmd.args(&args)
            .env(WORKER_ENV, &spec)
            .stdin(Stdio::null())
            .stdout(if ready {
                Stdio::from(std::io::stderr().as_fd().try_clone_to_owned()?)
            } else {
                Stdio::piped()
            });
        let pass: Vec<RawFd> = std::iter::once(theirs.as_raw_fd())
            .chain(held.as_ref().map(|h| h.device.as_raw_fd()))
            .collect();
        let first = !ready;
        // SAFETY: fcntl(2) and prctl(2) on this process, in the child before exec.
        unsafe {
            cmd.pre_exec(move || {
                for fd in &pass {
                    let fd = std::os::fd::BorrowedFd::borrow_raw(*fd);
                    rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty())?;
                }
                if first {
                    // Until it is ready, the first worker dies with the supervisor (which
                    // dies with the `owsfs mount` waiting for it): it must not take the
                    // lease for nobody. `Readiness::ready` lifts this.
                    owsfs_sys::process::die_with_parent(Some(libc::SIGTERM));
                }
                Ok(())
            });
        }
        let spawned = cmd.spawn();
        let status = match spawned {
            Ok(mut child) => {
                CURRENT.store(child.id() as i32, Ordering::SeqCst);
                // A stop asked for while no worker was in charge goes to this one.
                let stop = STOPPING.load(Ordering::SeqCst);
                if stop != 0 {
                    // SAFETY: kill(2) takes plain integers.
                    unsafe { libc::kill(child.id() as i32, stop) };
                }
                if !ready && let Some(out) = child.stdout.take() {
                    ready = relay_readiness(out);
                }
                let status = child.wait().context("cannot wait for the owsfs daemon")?;
                CURRENT.store(0, Ordering::SeqCst);
                status
            }
            // The binary may be missing for a moment (an upgrade): a death like any other.
            Err(e) if !first => {
                tracing::error!(
                    "cannot start the next owsfs daemon ({}): {e}",
                    exe.display()
                );
                ExitStatus::from_raw(127 << 8)
            }
            Err(e) => return Err(e).context("cannot start the owsfs daemon"),
        };
        receive(&ours, &mut held);
        let ended = held.as_ref().is_none_or(|h| connection_ended(&h.device));
        if STOPPING.load(Ordering::SeqCst) != 0 && !status.success() && !ended {
            // Asked to stop while a worker died or started: nothing is to serve any more.
            tracing::warn!(
                "the daemon of {} {} while the mount was being stopped: detaching it; the \
                 cache keeps every change",
                mountpoint.display(),
                describe(&status)
            );
            detach(mountpoint);
            return Ok(status.code().unwrap_or(1));
        }
        if held.is_none() && ready && !status.success() {
            return Ok(ended_with_its_daemon(mountpoint, &status));
        }
        if status.success() || ended || !ready {
            if !ready && held.is_some() {
                // Failed before it was ready: nothing may find a dead mount there.
                detach(mountpoint);
            }
            return Ok(status.code().unwrap_or(1));
        }
        if status.code() == Some(RESTART_EXIT) {
            tracing::info!("restarting the daemon of {}", mountpoint.display());
        } else {
            let now = Instant::now();
            deaths.push_back(now);
            while deaths
                .front()
                .is_some_and(|t| now.duration_since(*t) > CRASH_WINDOW)
            {
                deaths.pop_front();
            }
            if deaths.len() >= CRASH_LIMIT {
                tracing::error!(
                    "the daemon of {} died {} times within {}s (the last {}): giving up; the \
                     mount is detached and programs using it get ENOTCONN. The cache keeps \
                     every change; see this log, then mount again",
                    mountpoint.display(),
                    deaths.len(),
                    CRASH_WINDOW.as_secs(),
                    describe(&status)
                );
                detach(mountpoint);
                return Ok(1);
            }
            tracing::error!(
                "the daemon of {} {}: starting another on the same connection (programs \
                 wait meanwhile)",
                mountpoint.display(),
                describe(&status)
            );
            // The second death in a row waits 100 ms, then 200, 400...
            if deaths.len() > 1 {
                std::thread::sleep(Duration::from_millis(100 << (deaths.len() - 2)));
            }
        }
        incarnation = incarnation.checked_add(1).context("too many daemons")?;
    }
}

/// A worker that kept its connection to itself (FUSE over io_uring, or a kernel that cannot
/// send requests again) died, and the connection with it: the dead mount is detached, and
/// the log says why. Returns the exit code.
fn ended_with_its_daemon(mountpoint: &Path, status: &ExitStatus) -> i32 {
    tracing::error!(
        "the daemon of {} {}; its connection died with it (it served through FUSE over \
         io_uring, or the kernel cannot send requests again), so the mount has ended and \
         programs using it got ENOTCONN. The cache keeps every change: mount again",
        mountpoint.display(),
        describe(status)
    );
    detach(mountpoint);
    status.code().unwrap_or(1)
}

/// Relays the first worker's `READY`, `NOTICE` and `ERROR` lines to the `owsfs mount` that
/// waits for them; true once it said `READY`. From then on this process outlives that
/// `owsfs mount`, and writes nothing more to it.
fn relay_readiness(out: std::process::ChildStdout) -> bool {
    let mut stdout = std::io::stdout();
    for line in BufReader::new(out).lines() {
        let Ok(line) = line else { break };
        if line == "READY" {
            // Before the line: `owsfs mount` exits as soon as it reads it.
            owsfs_sys::process::die_with_parent(None);
        }
        let _ = writeln!(stdout, "{line}");
        let _ = stdout.flush();
        if line == "READY" {
            let _ = rustix::stdio::dup2_stdout(std::io::stderr().as_fd());
            return true;
        }
        if line.starts_with("ERROR ") {
            break;
        }
    }
    false
}

/// Detaches the mount, so that nothing finds a dead one; the connection ends when the
/// supervisor's descriptor closes.
fn detach(mountpoint: &Path) {
    let lazy = owsfs_sys::mount::UnmountHow {
        lazy: true,
        force: false,
    };
    if let Err(e) = owsfs_sys::mount::unmount(mountpoint, lazy) {
        tracing::warn!("cannot detach {}: {e}", mountpoint.display());
    }
}

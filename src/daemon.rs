//! The mount daemon: opens the cache and journal, mounts, serves until unmounted, and closes
//! the journal cleanly.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use owsfs_fuse::{AdapterOptions, Core, CoreOptions, MountSettings};
use owsfs_journal::{Journal, JournalOptions, Recovery};
use parking_lot::{Condvar, Mutex};

use crate::cache::Cache;
use crate::cli::{MountArgs, default_cache};
use crate::lease::Keeper;
use crate::sync::local::LocalState;
use crate::sync::{SyncAgent, SyncOptions};
use crate::{control, mountpoint, options};

/// Set in the environment of the background daemon a foreground `owsfs mount` starts.
const DAEMON_CHILD_ENV: &str = "OWSFS_DAEMON_CHILD";

/// What the control socket and signal handlers need of a running mount.
pub struct Daemon {
    pub core: Arc<Core>,
    pub sync: Arc<SyncAgent>,
    pub mountpoint: PathBuf,
    pub cache: PathBuf,
    pub started: Instant,
    pub recovery: Recovery,
    /// Set when the session has ended and the journal is closed: Ok, or the error.
    finished: Mutex<Option<Result<(), String>>>,
    finished_cv: Condvar,
    /// Control connections waiting to report the end of the session; the process stays until
    /// they have answered.
    waiters: Mutex<usize>,
    waiters_cv: Condvar,
}

impl Daemon {
    /// `owsfs unmount`: unmounts and waits until the session has ended and the workspace is
    /// handed off (`lazy`: only until the mount is detached); true when it was only detached.
    ///
    /// The unmount call runs on a thread of its own, because the kernel returns from it only
    /// after it has freed the page cache of every file (about 30 ms per GiB cached), and it
    /// does that after the session has ended: the answer does not wait for it.
    pub fn unmount_and_wait(self: &Arc<Self>, lazy: bool) -> Result<bool, String> {
        // This request's own outcome of the call (an earlier request's EBUSY is not ours).
        // Set under `finished`'s lock, so the wait below cannot miss it.
        let called: Arc<Mutex<Option<Result<(), String>>>> = Arc::default();
        {
            let daemon = Arc::clone(self);
            let called = Arc::clone(&called);
            std::thread::Builder::new()
                .name("owsfs-umount".into())
                .spawn(move || {
                    let r = daemon.unmount(lazy).map_err(|e| format!("{e:#}"));
                    let guard = daemon.finished.lock();
                    *called.lock() = Some(r);
                    drop(guard);
                    daemon.finished_cv.notify_all();
                })
                .map_err(|e| format!("cannot start the unmount thread: {e}"))?;
        }
        let mut finished = self.finished.lock();
        loop {
            // Taken apart from the match, so `called` is not locked while waiting.
            let outcome = called.lock().clone();
            match (outcome, &*finished) {
                (Some(Err(why)), _) => return Err(why),
                (Some(Ok(())), _) if lazy => return Ok(true),
                (_, Some(done)) if !lazy => return done.clone().map(|()| false),
                _ => self.finished_cv.wait(&mut finished),
            }
        }
    }

    /// Unmounts the workspace; the serving thread then closes the journal and exits.
    pub fn unmount(&self, lazy: bool) -> anyhow::Result<()> {
        let flags = if lazy {
            rustix::mount::UnmountFlags::DETACH
        } else {
            rustix::mount::UnmountFlags::empty()
        };
        match rustix::mount::unmount(&self.mountpoint, flags) {
            Ok(()) => Ok(()),
            Err(rustix::io::Errno::BUSY) => bail!(
                "{} is busy (a process has a file open or its working directory inside); close \
                 it, or use `owsfs unmount --lazy` to detach now and finish when it closes",
                self.mountpoint.display()
            ),
            Err(rustix::io::Errno::PERM) => {
                // An unprivileged mount is unmounted through the setuid helper.
                let mut cmd = Command::new("fusermount3");
                cmd.arg("-u");
                if lazy {
                    cmd.arg("-z");
                }
                let status = cmd
                    .arg(&self.mountpoint)
                    .status()
                    .context("cannot run fusermount3 to unmount")?;
                if !status.success() {
                    bail!("fusermount3 -u {} failed", self.mountpoint.display());
                }
                Ok(())
            }
            Err(e) => {
                Err(e).with_context(|| format!("cannot unmount {}", self.mountpoint.display()))
            }
        }
    }

    /// Registers a control connection that will report the end of the session: the process
    /// does not exit until the returned guard is dropped (or 5 s pass).
    pub fn waiter(&self) -> Waiter<'_> {
        *self.waiters.lock() += 1;
        Waiter { daemon: self }
    }

    /// Gives waiting control connections a moment to answer before the process exits.
    fn drain_waiters(&self) {
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        let mut w = self.waiters.lock();
        while *w > 0 {
            if self.waiters_cv.wait_until(&mut w, deadline).timed_out() {
                break;
            }
        }
    }

    fn finish(&self, result: Result<(), String>) {
        *self.finished.lock() = Some(result);
        self.finished_cv.notify_all();
    }
}

/// Keeps the daemon process alive until a control connection has answered.
pub struct Waiter<'a> {
    daemon: &'a Daemon,
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        *self.daemon.waiters.lock() -= 1;
        self.daemon.waiters_cv.notify_all();
    }
}

/// `owsfs mount`.
pub fn mount(args: MountArgs) -> anyhow::Result<()> {
    let opts = options::parse(&args.options)?;
    let cache = match &args.cache {
        Some(c) => c.clone(),
        None => default_cache(&args.mountpoint)?,
    };
    let child = std::env::var_os(DAEMON_CHILD_ENV).is_some();
    if args.foreground || child {
        let ready = Readiness { child };
        init_logging(&args.log);
        match serve(&args, &opts, &cache, &ready) {
            Ok(()) => Ok(()),
            Err(e) => {
                ready.failed(&e);
                Err(e)
            }
        }
    } else {
        spawn_background(&args, &cache)
    }
}

/// Reports to the `owsfs mount` that started this daemon whether the mount is ready.
struct Readiness {
    child: bool,
}

impl Readiness {
    fn ready(&self) {
        if self.child {
            // From now on the daemon outlives the `owsfs mount` that started it.
            // SAFETY: prctl with plain integer arguments.
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, 0) };
            println!("READY");
            let _ = std::io::stdout().flush();
            // The parent stops reading: point stdout at the log (stderr) from here on.
            let _ = rustix::stdio::dup2_stdout(std::io::stderr().as_fd());
        }
    }

    /// A message for the user while the mount is not ready yet (e.g. waiting for a lease).
    fn notice(&self, msg: &str) {
        if self.child {
            println!("NOTICE {}", msg.replace('\n', " "));
            let _ = std::io::stdout().flush();
        } else {
            eprintln!("owsfs: {msg}");
        }
    }

    fn failed(&self, e: &anyhow::Error) {
        if self.child {
            println!("ERROR {}", format!("{e:#}").replace('\n', " "));
            let _ = std::io::stdout().flush();
        }
    }
}

fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(crate::logwriter::LossyStderr)
        .with_ansi(rustix::termios::isatty(std::io::stderr()))
        .try_init();
}

/// Starts the daemon in the background and returns once it reports the mount ready.
fn spawn_background(args: &MountArgs, cache: &Path) -> anyhow::Result<()> {
    // The daemon checks these again, but failing here is quicker and plainer.
    mountpoint::check_mountable(&args.mountpoint)?;
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
        .arg(&args.mountpoint)
        .arg("--cache")
        .arg(cache)
        .arg("--log")
        .arg(&args.log);
    for o in &args.options {
        cmd.arg("-o").arg(o);
    }
    if let Some(s) = &args.store.store {
        cmd.arg("--store").arg(s);
    }
    if let Some(w) = &args.workspace {
        cmd.arg("--workspace").arg(w);
    }
    cmd.arg("--commit-interval")
        .arg(format!("{}ms", args.commit_interval.as_millis()))
        .arg("--max-lag")
        .arg(format!("{}ms", args.max_lag.as_millis()))
        .arg("--max-lag-bytes")
        .arg(args.max_lag_bytes.to_string())
        .arg("--prefetch")
        .arg(args.prefetch.to_string())
        .arg("--prefetch-bandwidth")
        .arg(args.prefetch_bandwidth.to_string())
        .args(args.lease.to_args());
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
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
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
            eprintln!("owsfs: {msg}");
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
    let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(hard);
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

fn serve(
    args: &MountArgs,
    opts: &options::MountOptions,
    cache_dir: &Path,
    ready: &Readiness,
) -> anyhow::Result<()> {
    let mountpoint = mountpoint::check_mountable(&args.mountpoint)?;
    mountpoint::check_dev_fuse()?;
    let mut cache = Cache::open(cache_dir)?;
    let nofile = raise_nofile_limit();
    // Keep descriptors back for the journal, the control socket and open files.
    let fd_budget = nofile.saturating_sub(4096).max(1024) as usize;
    let inode_budget = opts.max_inodes.map_or(fd_budget, |m| m.min(fd_budget));
    tracing::info!("open file limit {nofile}: up to {inode_budget} inodes cached by the kernel");

    let (mut journal, mut recovery) =
        Journal::open(&cache.journal, &cache.backing, JournalOptions::default())
            .with_context(|| format!("cannot open the journal in {}", cache.journal.display()))?;
    if let Some(tail) = &recovery.torn_tail {
        tracing::warn!("journal: torn tail cut: {tail}");
    }
    if let Some(why) = &recovery.rescan {
        tracing::warn!("journal: rescanned the backing directory: {why}");
    }
    tracing::info!(
        "journal: replayed {} record(s) from {} segment(s){}",
        recovery.records,
        recovery.segments,
        if recovery.clean {
            " (clean shutdown)"
        } else {
            ""
        }
    );

    // The store and the workspace; a new cache of an existing workspace is restored here,
    // before anything can see the backing directory.
    let store_url = crate::cli::store_url(&args.store)?;
    let store_opts = owsfs_store::StoreOptions {
        faults: owsfs_store::FaultConfig::from_env()?,
        ..owsfs_store::StoreOptions::default()
    };
    let store = Arc::new(
        owsfs_store::Store::open(&store_url, store_opts)
            .with_context(|| format!("cannot use the store {store_url}"))?,
    );
    let ws_name = match &args.workspace {
        Some(w) => w.clone(),
        None => mountpoint::name_of(&mountpoint),
    };
    let ws = owsfs_store::generation::Workspace::open_or_create(&store, &ws_name)
        .with_context(|| format!("cannot open workspace {ws_name} in {store_url}"))?;

    // The writer lease, then a fence: from here on no other node can commit.
    let holder = crate::lease::holder(&cache)?;
    let (held, acquired_at) = crate::lease::acquire(
        &ws,
        &holder,
        args.lease.lease_ttl,
        args.lease.takeover(),
        &mut |m| {
            tracing::info!("{m}");
            ready.notice(m);
        },
    )?;
    tracing::info!(
        "lease of workspace {ws_name:?} taken at epoch {} ({holder})",
        held.epoch
    );
    let core_slot: Arc<std::sync::OnceLock<Arc<Core>>> = Arc::default();
    let keeper = {
        let core_slot = Arc::clone(&core_slot);
        let stopped = cache.root.join("stopped.json");
        let ws_name = ws_name.clone();
        let epoch = held.epoch;
        Keeper::new(
            &ws,
            held,
            acquired_at,
            Box::new(move |why| {
                let note = serde_json::json!({
                    "workspace": ws_name,
                    "epoch": epoch,
                    "reason": why,
                    "time_unix_ms": std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as u64),
                });
                if let Err(e) = std::fs::write(&stopped, note.to_string()) {
                    tracing::warn!("cannot write {}: {e}", stopped.display());
                }
                if let Some(core) = core_slot.get() {
                    core.stop_writes(why);
                }
            }),
        )
    };
    let keeper_thread = {
        let k = Arc::clone(&keeper);
        Mutex::new(Some(
            std::thread::Builder::new()
                .name("owsfs-lease".into())
                .spawn(move || k.run())
                .context("cannot start the lease thread")?,
        ))
    };
    let stop_keeper = || {
        keeper.stop();
        if let Some(t) = keeper_thread.lock().take() {
            let _ = t.join();
        }
    };
    // Until the mount serves, a failure hands the lease back at once.
    let give_back = |e: anyhow::Error| -> anyhow::Error {
        stop_keeper();
        if let Err(r) = keeper.release() {
            tracing::warn!("{r:#}");
        }
        e
    };
    let head = ws
        .fence(keeper.epoch())
        .with_context(|| format!("cannot fence workspace {ws_name}"))
        .map_err(give_back)?;
    tracing::info!("generation {head}: fence of epoch {}", keeper.epoch());

    let mut local = LocalState::open(&cache.root.join("state.db")).map_err(give_back)?;
    if let Some(why) =
        crate::sync::prepare::diverged(&ws, &local, journal.is_dirty(), head).map_err(give_back)?
    {
        // Never merged: the unsynced changes go aside, whole, for `owsfs recover`.
        drop(local);
        drop(journal);
        let name = format!(
            "{}-epoch{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            keeper.epoch()
        );
        let dest = cache
            .set_aside(
                &name,
                &serde_json::json!({"workspace": ws_name, "store": store_url, "reason": why}),
            )
            .map_err(give_back)?;
        tracing::warn!(
            "{why}: they are kept in {}; make them a workspace of their own with `owsfs recover \
             --cache {} --as NEW_NAME`",
            dest.display(),
            dest.display()
        );
        ready.notice(&format!(
            "unsynced changes of an earlier mount were set aside in {} (recover them with \
             `owsfs recover --cache {} --as NEW_NAME`)",
            dest.display(),
            dest.display()
        ));
        (journal, recovery) =
            Journal::open(&cache.journal, &cache.backing, JournalOptions::default())
                .with_context(|| format!("cannot open the journal in {}", cache.journal.display()))
                .map_err(give_back)?;
        local = LocalState::open(&cache.root.join("state.db")).map_err(give_back)?;
    }
    let journal = Arc::new(journal);
    let (previous_sqlite, head) =
        crate::sync::prepare::prepare_base(&ws, &mut local, &cache, &journal, &store_url, head)
            .map_err(give_back)?;
    if keeper.is_lost() {
        return Err(give_back(anyhow::anyhow!(
            "the lease was lost while preparing the cache"
        )));
    }
    // Commits of this mount carry this epoch; a later mount of this cache knows them as its own.
    local
        .set_meta("lease_epoch", &keeper.epoch().to_string())
        .map_err(give_back)?;

    // Lazy hydration: the root's entries are made now (its tree is the one fetch a mount of
    // a new cache needs); everything else on demand and in the background.
    let hyd = crate::hydrate::Hydrator::open(
        &cache.root.join("state.db"),
        &cache.backing,
        Arc::clone(&store),
        local.node_map(),
        &journal.dirty(),
    )
    .map_err(give_back)?;
    if hyd.dir_is_pending(hyd.root_ino()) {
        hyd.materialize_dir(hyd.root_ino(), hyd.root_fd())
            .context("cannot fetch the root directory")
            .map_err(give_back)?;
    }
    let inherited_access = crate::hydrate::access_list(&store, &ws, &local);
    let core = Arc::new(
        Core::new(
            &cache.backing,
            Arc::clone(&journal),
            CoreOptions {
                passthrough: opts.passthrough,
                inode_budget,
                side_dir: None,
            },
        )
        .map_err(|e| give_back(anyhow::anyhow!("cannot open the backing directory: {e}")))?,
    );
    let _ = core_slot.set(Arc::clone(&core));
    core.set_hydrator(Arc::new(crate::hydrate::CoreHook {
        hyd: Arc::clone(&hyd),
    }));
    // Lost between the check above and now: `on_lost` found no core to stop.
    if let Some(why) = keeper.lost_reason() {
        core.stop_writes(&why);
    }
    if let Ok(note) = std::fs::read_to_string(cache.root.join("stopped.json")) {
        tracing::info!("an earlier mount of this cache stopped writing: {note}");
        let _ = std::fs::remove_file(cache.root.join("stopped.json"));
    }
    let adapter = AdapterOptions {
        entry_ttl: opts.entry_timeout,
        attr_ttl: opts.attr_timeout,
        negative_ttl: opts.negative_timeout,
        max_write: opts.max_write,
        writeback_cache: opts.writeback_cache,
    };
    let settings = MountSettings {
        fsname: cache.root.to_string_lossy().into_owned(),
        threads: opts.threads,
        flags: opts.kernel.clone(),
        read_only: opts.read_only,
    };
    let agent = SyncAgent::new(
        Arc::clone(&core),
        Arc::clone(&store),
        ws,
        local,
        SyncOptions {
            commit_interval: args.commit_interval,
            max_lag: args.max_lag,
            max_lag_bytes: args.max_lag_bytes,
        },
        previous_sqlite,
        head,
        Arc::clone(&keeper),
        Arc::clone(&hyd),
        inherited_access.clone(),
    )
    .map_err(give_back)?;
    {
        let weak = Arc::downgrade(&agent);
        core.set_throttle(Box::new(move || {
            if let Some(a) = weak.upgrade() {
                a.throttle();
            }
        }));
    }
    let session = owsfs_fuse::mount(Arc::clone(&core), adapter, &mountpoint, &settings)
        .with_context(|| format!("cannot mount on {}", mountpoint.display()))
        .map_err(give_back)?;
    agent.set_mount(&mountpoint);
    let agent_thread = {
        let agent = Arc::clone(&agent);
        std::thread::Builder::new()
            .name("owsfs-sync".into())
            .spawn(move || agent.run())
            .context("cannot start the sync thread")?
    };
    // The kernel keeps inodes cached while memory allows, but each one holds a descriptor
    // here: when the table nears its budget, ask the kernel to drop the oldest names.
    let notifier = session.notifier();
    core.set_invalidator(Box::new(move |parent, name| {
        notifier.inval_entry(owsfs_fuse::fuser::INodeNo(parent), name)
    }));
    let prefetch = crate::hydrate::prefetch::Prefetcher::start(
        Arc::clone(&hyd),
        Arc::clone(&core),
        inherited_access,
        crate::hydrate::prefetch::PrefetchOptions {
            workers: args.prefetch,
            bandwidth: args.prefetch_bandwidth,
        },
    );
    let saver = crate::hydrate::spawn_saver(Arc::clone(&hyd), args.foreground);
    let reaper_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let core = Arc::clone(&core);
        let stop = Arc::clone(&reaper_stop);
        std::thread::Builder::new()
            .name("owsfs-reaper".into())
            .spawn(move || core.run_reaper(&stop))
            .context("cannot start the inode reaper thread")?;
    }

    let daemon = Arc::new(Daemon {
        core,
        sync: Arc::clone(&agent),
        mountpoint: mountpoint.clone(),
        cache: cache.root.clone(),
        started: Instant::now(),
        recovery,
        finished: Mutex::new(None),
        finished_cv: Condvar::new(),
        waiters: Mutex::new(0),
        waiters_cv: Condvar::new(),
    });
    let control = match control::Server::start(Arc::clone(&daemon)) {
        Ok(c) => c,
        Err(e) => {
            let _ = daemon.unmount(true);
            return Err(e);
        }
    };
    spawn_signal_handler(Arc::clone(&daemon))?;
    tracing::info!(
        "mounted {} (cache {})",
        mountpoint.display(),
        cache.root.display()
    );
    ready.ready();

    let served = session.run();
    let ending = Instant::now();
    reaper_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    prefetch.stop();
    let prefetch_ms = ending.elapsed().as_millis();
    saver.stop();
    let stopped_ms = ending.elapsed().as_millis();
    // The last cut: everything written before the unmount goes to the store.
    agent.stop();
    if agent_thread.join().is_err() {
        tracing::error!("the sync thread panicked");
    }
    let cut_ms = ending.elapsed().as_millis();
    if let Err(e) = hyd.save() {
        tracing::error!("cannot store the hydration state: {e:#}");
    }
    // Hand off: the lease is released only when everything written is in the store.
    stop_keeper();
    let handoff = if keeper.is_lost() {
        Err("writes were stopped (fail-stop); the lease is not ours to release".to_string())
    } else if journal.is_dirty() {
        Err(format!(
            "the last changes could not be committed ({}); they stay in the cache and go to \
             the store at the next mount of it. The lease was not released: it lapses {:.0}s \
             after the last renewal",
            agent
                .last_error()
                .unwrap_or_else(|| "no error recorded".into()),
            args.lease.lease_ttl.as_secs_f64()
        ))
    } else {
        match keeper.release() {
            Ok(()) => {
                tracing::info!("lease released");
                Ok(())
            }
            Err(e) => Err(format!("cannot release the lease: {e:#}")),
        }
    };
    let closed = journal.close_clean();
    tracing::info!(
        "session ended: prefetch stopped after {prefetch_ms} ms, saver after {stopped_ms} ms, \
         last cut done after {cut_ms} ms, handed off after {} ms",
        ending.elapsed().as_millis()
    );
    drop(control);
    if closed.is_ok() {
        cache.release();
    }
    let result = match (&served, &closed, &handoff) {
        (Ok(()), Ok(()), Ok(())) => Ok(()),
        (Err(e), _, _) => Err(format!("the FUSE session failed: {e}")),
        (_, Err(e), _) => Err(format!("cannot close the journal cleanly: {e}")),
        (_, _, Err(e)) => Err(format!("unmounted, but not handed off: {e}")),
    };
    match &result {
        Ok(()) => tracing::info!("unmounted {}; journal closed cleanly", mountpoint.display()),
        Err(e) => tracing::error!("{e}"),
    }
    daemon.finish(result.clone());
    daemon.drain_waiters();
    result.map_err(anyhow::Error::msg)
}

fn spawn_signal_handler(daemon: Arc<Daemon>) -> anyhow::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .context("cannot install signal handlers")?;
    std::thread::Builder::new()
        .name("owsfs-signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                tracing::info!("signal {sig}: unmounting");
                if let Err(e) = daemon.unmount(false) {
                    tracing::warn!("{e:#}; detaching instead");
                    if let Err(e) = daemon.unmount(true) {
                        tracing::error!("cannot unmount: {e:#}");
                    }
                }
            }
        })
        .context("cannot start the signal thread")?;
    Ok(())
}

//! The control socket of a running daemon (`CACHE/control.sock`) and the commands that use it.
//!
//! Protocol: one JSON request line, one JSON response line. Requests:
//! `{"cmd":"status","dirty":bool}` and `{"cmd":"unmount","lazy":bool}`. Every response has
//! `"ok": bool` and, when not ok, `"error": "..."`.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::daemon::Daemon;
use crate::mountpoint;
use owsfs_local::Cache;

/// Unix socket paths are limited to ~108 bytes; reaching the socket through an open
/// descriptor of its directory keeps the path short whatever the cache path is.
fn short_socket_path(dir: &Path) -> anyhow::Result<(OwnedFd, PathBuf)> {
    let fd = rustix::fs::open(
        dir,
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .with_context(|| format!("cannot open {}", dir.display()))?;
    let path = PathBuf::from(format!("/proc/self/fd/{}/control.sock", fd.as_raw_fd()));
    Ok((fd, path))
}

/// The listening side, run by the daemon. Dropping it stops accepting and removes the socket.
pub struct Server {
    socket: PathBuf,
    stop: Arc<AtomicBool>,
}

impl Server {
    pub fn start(daemon: Arc<Daemon>) -> anyhow::Result<Server> {
        let socket = Cache::socket_path(&daemon.cache);
        // The cache lock is held, so a socket left here belongs to a dead daemon.
        let _ = std::fs::remove_file(&socket);
        let (_dirfd, short) = short_socket_path(&daemon.cache)?;
        let listener = UnixListener::bind(&short)
            .with_context(|| format!("cannot create the control socket {}", socket.display()))?;
        // Only the daemon's user may stop it or read its state.
        std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot restrict the control socket {}", socket.display()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        std::thread::Builder::new()
            .name("owsfs-control".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if stop2.load(Ordering::Relaxed) {
                        break;
                    }
                    let conn = match conn {
                        Ok(conn) => conn,
                        Err(e) => {
                            // EMFILE and the like: do not spin; the next client retries.
                            tracing::warn!("control socket: cannot accept: {e}");
                            std::thread::sleep(Duration::from_millis(50));
                            continue;
                        }
                    };
                    let daemon = Arc::clone(&daemon);
                    let _ = std::thread::Builder::new()
                        .name("owsfs-control-conn".into())
                        .spawn(move || {
                            if let Err(e) = handle(&daemon, conn) {
                                tracing::debug!("control connection: {e:#}");
                            }
                        });
                }
            })
            .context("cannot start the control thread")?;
        Ok(Server { socket, stop })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn handle(daemon: &Arc<Daemon>, conn: UnixStream) -> anyhow::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let req: Value = serde_json::from_str(&line).context("bad request")?;
    let mut conn = conn;
    let reply = match req["cmd"].as_str() {
        Some("status") => status_of(daemon, req["dirty"].as_bool().unwrap_or(false)),
        Some("sync") => {
            let timeout = Duration::from_secs_f64(req["timeout_secs"].as_f64().unwrap_or(300.0));
            match daemon.sync.sync(timeout) {
                Ok(g) => json!({"ok": true, "generation": g}),
                Err(e) => json!({"ok": false, "error": format!("{e:#}")}),
            }
        }
        Some("unmount") => {
            let lazy = req["lazy"].as_bool().unwrap_or(false);
            // Registered before unmounting, so the process cannot exit before the answer.
            let _waiter = daemon.waiter();
            let reply = match daemon.unmount_and_wait(lazy) {
                Err(e) => json!({"ok": false, "error": e}),
                Ok(true) => json!({"ok": true, "detached": true}),
                Ok(false) => json!({"ok": true}),
            };
            writeln!(conn, "{reply}")?;
            return Ok(());
        }
        other => json!({"ok": false, "error": format!("unknown command {other:?}")}),
    };
    writeln!(conn, "{reply}")?;
    Ok(())
}

fn status_of(daemon: &Daemon, dirty: bool) -> Value {
    let core = &daemon.core;
    let journal = core.journal();
    let mut v = json!({
        "ok": true,
        "mountpoint": daemon.mountpoint,
        "cache": daemon.cache,
        "backing": core.backing_root(),
        "pid": std::process::id(),
        "uptime_secs": daemon.started.elapsed().as_secs_f64(),
        "passthrough": core.passthrough_enabled(),
        "inodes": core.inode_count(),
        "inode_budget": core.inode_budget(),
        "open_files": core.open_handles(),
        "journal": journal.stats(),
        "recovery": daemon.recovery,
        "ops": core.stats.snapshot(),
        "sync": daemon.sync.status(),
    });
    v["sync"]["lease"] = daemon.keeper.status();
    v["sync"]["hydration"] = daemon.hyd.status();
    if dirty {
        v["dirty"] = serde_json::to_value(journal.dirty()).unwrap_or(Value::Null);
    }
    v
}

/// Sends one request to the daemon serving `mountpoint`.
fn request(mountpoint: &Path, req: Value, timeout: Option<Duration>) -> anyhow::Result<Value> {
    let Some(mount) = mountpoint::find_owsfs(mountpoint)? else {
        bail!("{} is not an owsfs mount", mountpoint.display());
    };
    let cache = PathBuf::from(&mount.source);
    let (_dirfd, short) = short_socket_path(&cache).with_context(|| {
        format!(
            "the cache {} of the mount at {} is gone",
            cache.display(),
            mountpoint.display()
        )
    })?;
    let conn = UnixStream::connect(&short).map_err(|e| DaemonGone {
        mountpoint: mount.mountpoint.clone(),
        cache: cache.clone(),
        source: e,
    })?;
    conn.set_read_timeout(timeout)?;
    let mut w = conn.try_clone()?;
    writeln!(w, "{req}")?;
    let mut line = String::new();
    match BufReader::new(conn).read_line(&mut line) {
        // The daemon died with the connection open (e.g. killed while its threads exit).
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
            return Err(DaemonGone {
                mountpoint: mount.mountpoint.clone(),
                cache,
                source: e,
            }
            .into());
        }
        Ok(0) => {
            return Err(DaemonGone {
                mountpoint: mount.mountpoint.clone(),
                cache,
                source: std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
            }
            .into());
        }
        Err(e) => return Err(e).context("the daemon did not answer"),
        Ok(_) => {}
    }
    let v: Value = serde_json::from_str(&line).context("the daemon sent a bad answer")?;
    if v["ok"].as_bool() != Some(true) {
        bail!("{}", v["error"].as_str().unwrap_or("the daemon refused"));
    }
    Ok(v)
}

/// The daemon of a mount does not answer: it died, leaving the mount behind.
#[derive(Debug, thiserror::Error)]
#[error(
    "the owsfs daemon of {} does not answer at {}/control.sock ({source}); if it died, run \
     `owsfs unmount {}` to remove the dead mount",
    mountpoint.display(), cache.display(), mountpoint.display()
)]
struct DaemonGone {
    mountpoint: PathBuf,
    cache: PathBuf,
    source: std::io::Error,
}

/// `owsfs handoff`: like a clean unmount, but a dead daemon is an error (nothing was handed
/// off) and success is said.
pub fn handoff(mountpoint: &Path) -> anyhow::Result<()> {
    request(mountpoint, json!({"cmd": "unmount", "lazy": false}), None)?;
    eprintln!(
        "owsfs: {} handed off: everything written is in the store and the lease is released",
        mountpoint.display()
    );
    Ok(())
}

/// `owsfs unmount`.
pub fn unmount(mountpoint: &Path, lazy: bool) -> anyhow::Result<()> {
    match request(mountpoint, json!({"cmd": "unmount", "lazy": lazy}), None) {
        Ok(_) => Ok(()),
        Err(e) => match e.downcast_ref::<DaemonGone>() {
            Some(gone) => {
                // Nobody serves this mount any more: remove it so the path is usable again.
                rustix::mount::unmount(&gone.mountpoint, rustix::mount::UnmountFlags::DETACH)
                    .with_context(|| {
                        format!(
                            "cannot remove the dead mount at {}",
                            gone.mountpoint.display()
                        )
                    })?;
                eprintln!(
                    "owsfs: the daemon of {} was not running; removed the dead mount (its \
                     journal is replayed at the next mount of {})",
                    gone.mountpoint.display(),
                    gone.cache.display()
                );
                Ok(())
            }
            None => Err(e),
        },
    }
}

/// `owsfs sync`: prints the generation that holds everything written before the call.
pub fn sync(mountpoint: &Path, timeout: Duration) -> anyhow::Result<()> {
    let v = request(
        mountpoint,
        json!({"cmd": "sync", "timeout_secs": timeout.as_secs_f64()}),
        Some(timeout + Duration::from_secs(10)),
    )?;
    println!("{}", v["generation"]);
    Ok(())
}

/// `owsfs status`.
/// The status of the mount at `mountpoint`, as JSON (for `owsfs run`).
pub fn status_value(mountpoint: &Path) -> anyhow::Result<Value> {
    request(
        mountpoint,
        json!({"cmd": "status", "dirty": false}),
        Some(Duration::from_secs(2)),
    )
}

/// Whether `e` (from a request) says no daemon serves the mount any more.
pub fn daemon_gone(e: &anyhow::Error) -> bool {
    e.downcast_ref::<DaemonGone>().is_some() || format!("{e}").contains("is not an owsfs mount")
}

pub fn status(mountpoint: &Path, as_json: bool, dirty: bool) -> anyhow::Result<()> {
    let v = request(
        mountpoint,
        json!({"cmd": "status", "dirty": dirty}),
        Some(Duration::from_secs(30)),
    )?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let j = &v["journal"];
    let ops = &v["ops"];
    println!("mountpoint   {}", v["mountpoint"].as_str().unwrap_or("?"));
    println!("cache        {}", v["cache"].as_str().unwrap_or("?"));
    println!("backing      {}", v["backing"].as_str().unwrap_or("?"));
    println!(
        "daemon       pid {}, up {:.0}s, passthrough {}",
        v["pid"],
        v["uptime_secs"].as_f64().unwrap_or(0.0),
        if v["passthrough"].as_bool() == Some(true) {
            "on"
        } else {
            "off"
        }
    );
    println!(
        "journal      seq {}, segment {} at {} bytes; {} records in {} writes since mount",
        j["last_seq"], j["segment"], j["segment_offset"], j["records"], j["batches"]
    );
    if let Some(why) = j["failed"].as_str() {
        println!(
            "journal      FAILED, writes are refused with EIO: {why}; fix the cause (disk full?) \
             and remount"
        );
    }
    println!(
        "dirty        {} files, {} dirs, {} bytes",
        j["dirty_files"], j["dirty_dirs"], j["dirty_bytes"]
    );
    println!(
        "ops          {} lookups, {} opens ({} passthrough), {} reads ({} bytes), {} writes ({} bytes), {} fsyncs, {} errors",
        ops["lookups"],
        ops["opens"],
        ops["opens_passthrough"],
        ops["reads"],
        ops["read_bytes"],
        ops["writes"],
        ops["write_bytes"],
        ops["fsyncs"],
        ops["errors"]
    );
    let s = &v["sync"];
    println!(
        "store        {} workspace {}",
        s["store"].as_str().unwrap_or("?"),
        s["workspace"].as_str().unwrap_or("?")
    );
    let newest = match s["last_commit"]["time_unix_ms"].as_u64() {
        Some(ms) => format!(
            ", committed {:.1}s ago",
            (std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64)
                .saturating_sub(ms)) as f64
                / 1000.0
        ),
        None => String::new(),
    };
    println!(
        "generation   {} (durable){newest}; {} commits, {} failed since mount",
        s["generation"], s["commits"], s["commit_failures"]
    );
    println!(
        "lag          {:.1}s, {} bytes unsynced; writers throttled {} ms in total",
        s["lag_secs"].as_f64().unwrap_or(0.0),
        s["lag_bytes"],
        s["throttled_ms"]
    );
    if let Some(e) = s["last_error"].as_str() {
        println!("last error   {e}");
    }
    let l = &s["lease"];
    println!(
        "lease        {} epoch {} by {}; renewed {:.1}s ago, good for {:.1}s (ttl {:.1}s)",
        l["state"].as_str().unwrap_or("?"),
        l["epoch"],
        l["holder"].as_str().unwrap_or("?"),
        l["last_renewal_secs_ago"].as_f64().unwrap_or(0.0),
        l["good_for_secs"].as_f64().unwrap_or(0.0),
        l["ttl_secs"].as_f64().unwrap_or(0.0),
    );
    if let Ok(p) = serde_json::from_value::<owsfs_hydrate::Progress>(s["hydration"].clone()) {
        println!(
            "hydration    {}; {} directories and {} files pending, {} bytes fetched in {} \
             requests",
            owsfs_hydrate::progress_line(&p),
            p.dirs_pending,
            p.files_pending,
            p.fetched_bytes,
            p.fetches
        );
    }
    if let Some(why) = s["writes_stopped"].as_str() {
        println!("WRITES STOPPED (EROFS): {why}");
    }
    let r = &v["recovery"];
    if let Some(t) = r["torn_tail"].as_str() {
        println!("recovery     torn tail cut: {t}");
    }
    if let Some(t) = r["rescan"].as_str() {
        println!("recovery     rescanned: {t}");
    }
    if dirty && let Some(d) = v.get("dirty") {
        println!("{}", serde_json::to_string_pretty(d)?);
    }
    Ok(())
}

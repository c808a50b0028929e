//! The daemon's side of the control socket (`crate::control` has the protocol).

use std::io::{BufRead, BufReader, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use owsfs_local::Cache;

use super::daemon::Daemon;
use crate::control::{Answer, ControlError, Request, Response, Snapshotted, Synced, Unmounted};

/// The listening side. Dropping it stops accepting (the thread is woken and joined) and
/// removes the socket; connections already accepted still get their answer.
pub struct Server {
    socket: PathBuf,
    /// Closed at drop: the accept thread, polling its read end, wakes and ends.
    stop: Option<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    pub fn start(daemon: Arc<Daemon>) -> anyhow::Result<Server> {
        let socket = Cache::socket_path(daemon.cache());
        // The cache lock is held, so a socket left here belongs to a dead daemon.
        let _ = std::fs::remove_file(&socket);
        let (_dirfd, short) = crate::control::short_socket_path(daemon.cache())
            .with_context(|| format!("cannot open {}", daemon.cache().display()))?;
        let listener = UnixListener::bind(&short)
            .with_context(|| format!("cannot create the control socket {}", socket.display()))?;
        // Only the daemon's user may stop it or read its state.
        std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot restrict the control socket {}", socket.display()))?;
        listener
            .set_nonblocking(true)
            .context("cannot set up the control socket")?;
        let (stop_r, stop_w) = owsfs_sys::fs::pipe_cloexec().context("cannot make a pipe")?;
        let thread = std::thread::Builder::new()
            .name("owsfs-control".into())
            .spawn(move || accept_loop(&listener, &daemon, &stop_r))
            .context("cannot start the control thread")?;
        Ok(Server {
            socket,
            stop: Some(stop_w),
            thread: Some(thread),
        })
    }
}

/// Accepts connections until the stop pipe is closed, each answered on a thread of its own.
fn accept_loop(listener: &UnixListener, daemon: &Arc<Daemon>, stop: &OwnedFd) {
    use rustix::event::{PollFd, PollFlags, poll};
    loop {
        let mut fds = [
            PollFd::new(listener, PollFlags::IN),
            PollFd::new(stop, PollFlags::IN),
        ];
        match poll(&mut fds, None) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => {
                tracing::warn!("control socket: poll: {e}");
                return;
            }
        }
        if !fds[1].revents().is_empty() {
            return;
        }
        let conn = match listener.accept() {
            Ok((conn, _)) => conn,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                // EMFILE and the like: do not spin; the next client retries.
                tracing::warn!("control socket: cannot accept: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        // Answered in blocking mode (the listener's flag is not inherited on Linux, but be
        // sure).
        let _ = conn.set_nonblocking(false);
        let daemon = Arc::clone(daemon);
        let _ = std::thread::Builder::new()
            .name("owsfs-control-conn".into())
            .spawn(move || {
                if let Err(e) = handle(&daemon, conn) {
                    tracing::debug!("control connection: {e:#}");
                }
            });
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Closing the pipe's write end wakes the accept thread's poll.
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// A request on the socket: HTTP (`GET /status`, `POST /sync` with the request's JSON as the
/// body, ...; see `crate::control`), or one JSON line (the protocol before HTTP).
fn handle(daemon: &Arc<Daemon>, conn: UnixStream) -> anyhow::Result<()> {
    // A client that sends less than it said must not hold a thread for ever; the answer may
    // take long (a sync, an unmount), so the timeout is for reading the request only.
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut conn = conn;
    let http = crate::control::http::is_request_line(&line);
    let (request, refused) = if http {
        match crate::control::http::read_request(&line, &mut reader) {
            Ok(r) => (Ok(r), None),
            Err(r) => (Err(r.message), Some(r.status)),
        }
    } else {
        (
            serde_json::from_str::<Request>(&line).map_err(|e| e.to_string()),
            None,
        )
    };
    // An unmount registers before it starts, so the process cannot exit before the answer
    // is written.
    let _waiter = matches!(request, Ok(Request::Unmount { .. })).then(|| daemon.waiter());
    let restart = matches!(request, Ok(Request::Restart {}));
    let reply = answer(daemon, request);
    if http {
        crate::control::http::write_response(&mut conn, &reply, refused)?;
    } else {
        writeln!(conn, "{}", serde_json::to_string(&reply)?)?;
    }
    if restart && matches!(reply, Response::Ok(_)) {
        drop(conn);
        daemon.exit_for_restart();
    }
    Ok(())
}

fn answer(daemon: &Arc<Daemon>, request: Result<Request, String>) -> Response {
    match request {
        Err(e) => Response::err(ControlError::BadRequest(e)),
        Ok(Request::Status { dirty }) => {
            Response::ok(Answer::Status(Box::new(daemon.status(dirty))))
        }
        Ok(Request::Sync { timeout_secs }) => {
            let timeout =
                Duration::try_from_secs_f64(timeout_secs).unwrap_or(Duration::from_secs(300));
            match daemon.sync(timeout) {
                Ok(generation) => Response::ok(Answer::Synced(Synced {
                    ok: crate::control::True,
                    generation,
                })),
                Err(e) => Response::err(e),
            }
        }
        Ok(Request::Snapshot { name, timeout_secs }) => {
            let timeout =
                Duration::try_from_secs_f64(timeout_secs).unwrap_or(Duration::from_secs(300));
            match daemon.snapshot(&name, timeout) {
                Ok(snapshot) => Response::ok(Answer::Snapshotted(Box::new(Snapshotted {
                    ok: crate::control::True,
                    snapshot,
                }))),
                Err(e) => Response::err(e),
            }
        }
        Ok(Request::Rollback {
            to,
            keep_snapshots,
            timeout_secs,
        }) => {
            let timeout =
                Duration::try_from_secs_f64(timeout_secs).unwrap_or(Duration::from_secs(300));
            match daemon.rollback(&to, keep_snapshots, timeout) {
                Ok(rollback) => Response::ok(Answer::RolledBack(crate::control::RolledBack {
                    ok: crate::control::True,
                    rollback,
                })),
                Err(e) => Response::err(e),
            }
        }
        Ok(Request::Restart {}) => match daemon.may_restart() {
            Err(e) => Response::err(e),
            Ok(()) => Response::ok(Answer::Restarting(crate::control::Restarting {
                ok: crate::control::True,
                restarting: std::process::id(),
            })),
        },
        Ok(Request::Unmount { lazy }) => match daemon.unmount_and_wait(lazy) {
            Err(e) => Response::err(e),
            Ok(detached) => Response::ok(Answer::Unmounted(Unmounted {
                ok: crate::control::True,
                detached,
            })),
        },
    }
}

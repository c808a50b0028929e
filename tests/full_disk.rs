//! A full cache disk: the workspace answers ENOSPC (SQLite: SQLITE_FULL), never EIO, the
//! daemon lives on, and once space is freed every change and commit goes on by itself. Each
//! test puts its cache on a small tmpfs of its own, unmounted when the test ends.

mod common;

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

/// A tmpfs of the test's own, unmounted (lazily, so a daemon still exiting cannot keep it)
/// when dropped. Declare it before the workspace on it, so the workspace goes first.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::Builder::new()
            .prefix("owsfs-tmpfs-")
            .tempdir()
            .expect("tempdir");
        run_ok(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(dir.path()),
        );
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn free_bytes(&self) -> u64 {
        let st = rustix::fs::statvfs(self.path()).expect("statvfs");
        st.f_bavail * st.f_frsize
    }

    /// Removes `path` (in a workspace on this file system) and waits until its space is free.
    /// That can take a moment: a commit in flight may be reading the file (a cut pins the
    /// files it uploads), and the kernel forgets an unlinked inode asynchronously.
    fn remove_and_wait_for_space(&self, path: &Path) {
        let size = fs::metadata(path).expect("stat before removing").len();
        fs::remove_file(path).expect("remove a file on a full disk");
        assert!(
            wait_for(Duration::from_secs(60), || self.free_bytes() >= size / 2),
            "the space of {} was not freed: {} bytes free",
            path.display(),
            self.free_bytes()
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// A workspace whose cache is on `fs`, mounted write-through (`-o writeback_cache=off`): each
/// write(2) reaches the daemon, which answers ENOSPC itself. With the kernel's writeback cache
/// (the default), see `a_full_cache_disk_under_the_writeback_cache_fails_fsync_and_close`.
fn workspace_on(fs: &Tmpfs, extra: &[&str]) -> Workspace {
    let mut ws = Workspace::unmounted(None, "ws");
    ws.cache = fs.path().join("cache");
    ws.extra = extra.iter().map(|s| s.to_string()).collect();
    ws.opts = vec!["writeback_cache=off".into()];
    ws.mount();
    ws
}

/// With the kernel's writeback cache (the default), write(2) puts data in the kernel's page
/// cache, which has room; what the cache's disk cannot hold is reported when the file is
/// flushed, by fsync and by close (ENOSPC, as NFS does), and the workspace recovers once space
/// is freed.
#[test]
fn a_full_cache_disk_under_the_writeback_cache_fails_fsync_and_close() {
    if skip_fuse() {
        return;
    }
    let fs = Tmpfs::mount("48m");
    let mut ws = Workspace::unmounted(None, "ws");
    ws.cache = fs.path().join("cache");
    ws.mount();
    fs::write(ws.path("keep"), b"kept").unwrap();
    let chunk = vec![0x5a; 1 << 20];
    let mut f = File::create(ws.path("big")).unwrap();
    for _ in 0..64 {
        f.write_all(&chunk).unwrap();
    }
    let e = f.sync_all().expect_err("fsync of more than the disk holds");
    assert_enospc("fsync", &e);
    drop(f);
    fs.remove_and_wait_for_space(&ws.path("big"));
    // close(2) reports it to a program that never fsyncs (Python raises from close()).
    let out = Command::new("python3")
        .arg("-c")
        .arg(
            "import errno, sys\n\
             f = open(sys.argv[1], 'wb')\n\
             for i in range(64): f.write(b'Z' * (1 << 20))\n\
             try:\n\
             \x20   f.close()\n\
             except OSError as e:\n\
             \x20   print(errno.errorcode[e.errno]); raise SystemExit(7)",
        )
        .arg(ws.path("big"))
        .output()
        .unwrap();
    assert_eq!(
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).trim()
        ),
        (Some(7), "ENOSPC"),
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        ws.log_tail()
    );
    fs.remove_and_wait_for_space(&ws.path("big"));
    fs::write(ws.path("after"), b"after").unwrap();
    let g = ws.sync();
    let dest = restored(&ws, g);
    assert_eq!(fs::read(dest.join("keep")).unwrap(), b"kept");
    assert_eq!(fs::read(dest.join("after")).unwrap(), b"after");
    assert!(!dest.join("big").exists());
    ws.unmount();
}

/// Writes `path` until the file system is full; returns the error that stopped it.
fn fill(path: &Path) -> io::Error {
    let mut f = File::create(path).expect("create the filler");
    let chunk = vec![0x5a; 1 << 20];
    loop {
        if let Err(e) = f.write_all(&chunk) {
            return e;
        }
    }
}

fn assert_enospc(what: &str, e: &io::Error) {
    assert_eq!(
        e.raw_os_error(),
        Some(libc::ENOSPC),
        "{what}: expected ENOSPC, got {e}"
    );
}

/// The journal's health, as `owsfs status --json` shows it.
fn journal_status(ws: &Workspace) -> serde_json::Value {
    ws.status_json(false)["journal"].clone()
}

/// Restores generation `g` next to the workspace and returns where.
fn restored(ws: &Workspace, g: u64) -> PathBuf {
    let dest = ws.dir.path().join(format!("restored-{g}"));
    let out = ws.restore(Some(g), &dest);
    assert!(
        out.status.success(),
        "restore failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dest
}

/// The backing files fill up (a write through the mount fills the cache's disk): writes get
/// ENOSPC, SQLite says SQLITE_FULL, the daemon lives, and after `rm` everything goes on.
#[test]
fn a_full_cache_disk_gives_enospc_and_the_workspace_recovers() {
    if skip_fuse() {
        return;
    }
    let fs = Tmpfs::mount("48m");
    let ws = workspace_on(&fs, &[]);
    fs::write(ws.path("keep"), b"kept").unwrap();
    let db = rusqlite::Connection::open(ws.path("app.db")).unwrap();
    db.pragma_update(None, "journal_mode", "wal").unwrap();
    db.execute("create table t (x blob)", []).unwrap();
    db.execute("insert into t values (x'00')", []).unwrap();

    let e = fill(&ws.path("big"));
    assert_enospc("filling the disk through the mount", &e);
    // A directory needs no space on tmpfs, and the journal's records go into its reserve.
    for i in 0..300 {
        if let Err(e) = fs::create_dir(ws.path(&format!("d{i}"))) {
            assert_enospc(&format!("mkdir d{i}"), &e);
        }
    }
    let blob = vec![1u8; 4 << 20];
    let err = db
        .execute("insert into t values (?1)", [&blob])
        .expect_err("an insert on a full disk");
    assert_eq!(
        err.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DiskFull),
        "SQLite should say the disk is full: {err}"
    );
    // The daemon is alive and its journal is sound.
    assert!(fs::read_dir(ws.path("")).is_ok(), "{}", ws.log_tail());
    let j = journal_status(&ws);
    assert!(j["failed"].is_null(), "journal failed: {j}");

    // Space is freed: changes and commits go on without a remount.
    fs.remove_and_wait_for_space(&ws.path("big"));
    fs::write(ws.path("after"), b"after").unwrap();
    db.execute("insert into t values (?1)", [&blob]).unwrap();
    drop(db);
    let g = ws.sync();
    let dest = restored(&ws, g);
    assert_eq!(fs::read(dest.join("keep")).unwrap(), b"kept");
    assert_eq!(fs::read(dest.join("after")).unwrap(), b"after");
    assert!(!dest.join("big").exists());
    for i in 0..300 {
        assert!(
            dest.join(format!("d{i}")).is_dir(),
            "d{i} in generation {g}"
        );
    }
    let db = rusqlite::Connection::open(dest.join("app.db")).unwrap();
    let rows: i64 = db
        .query_row("select count(*) from t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 2);
    let ok: String = db
        .query_row("pragma integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
    ws.unmount();
}

/// The journal itself runs out of room (its appends fail): every change is refused with
/// ENOSPC and leaves the backing directory as it was, while unlink, rmdir, rename and
/// truncate still work (they use the journal's reserve), so space can be freed through the
/// mount; then everything is accepted again.
#[test]
fn a_full_journal_refuses_changes_with_enospc_but_lets_space_be_freed() {
    if skip_fuse() {
        return;
    }
    let fs = Tmpfs::mount("48m");
    let ws = workspace_on(&fs, &[]);
    // Long paths make big records, so the reserve runs low after a few hundred mkdirs.
    let mut deep = PathBuf::new();
    for i in 0..12 {
        deep.push(format!("{}{i}", "x".repeat(200)));
    }
    fs::create_dir_all(ws.path("").join(&deep)).unwrap();
    fs::write(ws.path("small"), b"small").unwrap();
    fs::write(ws.path("other"), b"other").unwrap();
    fs::create_dir(ws.path("empty")).unwrap();

    let e = fill(&ws.path("big"));
    assert_enospc("filling the disk through the mount", &e);
    let mut refused = None;
    for i in 0..5000 {
        let rel = deep.join(format!("{}{i}", "y".repeat(200)));
        if let Err(e) = fs::create_dir(ws.path("").join(&rel)) {
            assert_enospc(&format!("mkdir number {i}"), &e);
            refused = Some(rel);
            break;
        }
    }
    let rel = refused.expect("the journal ran out of room");
    assert!(
        !ws.backing("").join(&rel).exists(),
        "a refused mkdir left its directory in the backing directory"
    );
    let j = journal_status(&ws);
    assert!(j["failed"].is_null(), "journal failed: {j}");
    assert!(j["low_space"].is_string(), "journal not low on space: {j}");
    assert_enospc(
        "create",
        &File::create(ws.path("new")).expect_err("create on a full journal"),
    );
    assert!(!ws.backing("new").exists());
    assert_enospc(
        "symlink",
        &std::os::unix::fs::symlink("small", ws.path("link")).expect_err("symlink"),
    );

    // What frees space still works.
    fs::rename(ws.path("small"), ws.path("small2")).unwrap();
    File::options()
        .write(true)
        .open(ws.path("other"))
        .unwrap()
        .set_len(0)
        .unwrap();
    fs::remove_dir(ws.path("empty")).unwrap();
    fs.remove_and_wait_for_space(&ws.path("big"));

    // Space is back: everything is accepted again, without a remount.
    fs::create_dir(ws.path("").join(&rel)).unwrap();
    fs::write(ws.path("new"), b"new").unwrap();
    let j = journal_status(&ws);
    assert!(j["low_space"].is_null(), "still low on space: {j}");
    let g = ws.sync();
    let dest = restored(&ws, g);
    assert!(dest.join(&rel).is_dir());
    assert_eq!(fs::read(dest.join("new")).unwrap(), b"new");
    assert_eq!(fs::read(dest.join("small2")).unwrap(), b"small");
    assert_eq!(fs::read(dest.join("other")).unwrap(), b"");
    assert!(!dest.join("small").exists() && !dest.join("empty").exists());
    assert!(!dest.join("big").exists());
    ws.unmount();
}

/// The daemon's log is on the full disk too: lines that cannot be written are dropped and
/// counted; the daemon never dies of it (it used to abort: a failed log write panicked).
#[test]
fn the_daemon_outlives_a_log_it_cannot_write() {
    if skip_fuse() {
        return;
    }
    let fs = Tmpfs::mount("48m");
    // Every failed request is a log line at trace level (here getxattr: ENODATA).
    let ws = workspace_on(&fs, &["--log", "owsfs_fuse=trace,info"]);
    fs::write(ws.path("f"), b"f").unwrap();
    let e = fill(&ws.path("big"));
    assert_enospc("filling the disk through the mount", &e);
    let mut value = [0u8; 16];
    for i in 0..3000 {
        let name = format!("user.missing-{i}");
        assert_eq!(
            rustix::fs::getxattr(ws.path("f").as_path(), name.as_str(), &mut value[..]),
            Err(owsfs_sys::fs::no_xattr()),
            "{}",
            ws.log_tail()
        );
    }
    assert!(fs::read_dir(ws.path("")).is_ok(), "the mount died");
    ws.status_json(false);
    fs.remove_and_wait_for_space(&ws.path("big"));
    fs::write(ws.path("after"), b"after").unwrap();
    let _ = rustix::fs::getxattr(ws.path("f").as_path(), "user.missing", &mut value[..]);
    let log = fs::read_to_string(ws.cache.join("owsfs.log")).unwrap();
    assert!(
        log.contains("log line(s) could not be written"),
        "no note of the dropped lines in the log:{}",
        ws.log_tail()
    );
    ws.unmount();
}

/// The cache's disk is nearly full, from outside the workspace: small writes still fit, but
/// no commit can (state.db cannot grow). Writers over the lag bound get ENOSPC, as a full
/// local disk answers, instead of waiting for a commit that cannot come (they waited for
/// ever, found by the torture harness); once space is freed, commits and writes go on, and
/// every write that succeeded is in the next generation.
#[test]
fn commits_failing_on_a_full_cache_disk_give_writers_enospc_not_a_hang() {
    if skip_fuse() {
        return;
    }
    let fs = Tmpfs::mount("24m");
    let ws = workspace_on(&fs, &["--max-lag", "1s", "--commit-interval", "200ms"]);
    fs::write(ws.path("before"), b"before").unwrap();
    for i in 0..40 {
        fs::write(ws.path(&format!("f{i}")), b"start\n").unwrap();
    }
    ws.sync();
    // Ballast beside the cache takes every block left: appends inside the files' first
    // pages still fit, no commit does.
    let ballast = fs.path().join("ballast");
    let mut f = File::create(&ballast).unwrap();
    for chunk in [1 << 20, 4096] {
        let block = vec![0u8; chunk];
        while f.write_all(&block).is_ok() {}
    }
    drop(f);
    // Appends until one fails, then says which and why; `timeout` turns a hang into 124.
    let out = Command::new("timeout")
        .arg("120")
        .arg("python3")
        .arg("-c")
        .arg(
            "import os, time, errno\n\
             for i in range(1, 2001):\n\
             \x20   try:\n\
             \x20       with open('f%d' % (i % 40), 'a') as f: f.write('line%d\\n' % i)\n\
             \x20   except OSError as e:\n\
             \x20       print(i, errno.errorcode[e.errno]); raise SystemExit(7)\n\
             \x20   time.sleep(0.01)",
        )
        .current_dir(&ws.mp)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(7),
        "the writer should fail (status 7), not hang (124) nor write everything: {stdout}{}{}",
        String::from_utf8_lossy(&out.stderr),
        ws.log_tail()
    );
    let (failed_at, why) = stdout.trim().split_once(' ').unwrap();
    assert_eq!(why, "ENOSPC", "writers get ENOSPC, never EIO");
    let failed_at: u32 = failed_at.parse().unwrap();
    // `owsfs sync` fails too, once an attempt after it failed: it does not wait out its
    // timeout for a commit that cannot come.
    let out = ws.owsfs(&["sync", &ws.mp.to_string_lossy(), "--timeout", "60s"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("free space in it"),
        "owsfs sync on a full cache disk: {err}"
    );
    // Space comes back: commits go on by themselves, and so do writes.
    fs::remove_file(&ballast).unwrap();
    fs::write(ws.path("after"), b"after").unwrap();
    let g = ws.sync();
    let dest = restored(&ws, g);
    assert_eq!(fs::read(dest.join("after")).unwrap(), b"after");
    for i in 1..failed_at {
        let f = fs::read_to_string(dest.join(format!("f{}", i % 40))).unwrap();
        assert!(
            f.lines().any(|l| l == format!("line{i}")),
            "line{i} succeeded but is not in generation {g}"
        );
    }
    ws.unmount();
}

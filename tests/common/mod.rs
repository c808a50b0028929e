//! Shared helpers of the real-mount tests: a mounted workspace in a temporary directory that
//! is always unmounted, even when the test fails.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub const OWSFS: &str = env!("CARGO_BIN_EXE_owsfs");

/// True (and a note printed) when the caller asked to skip FUSE tests. That is the only way
/// these tests skip: without the variable, a machine without FUSE fails them.
pub fn skip_fuse() -> bool {
    if std::env::var("OWSFS_SKIP_FUSE_TESTS").as_deref() == Ok("1") {
        eprintln!("skipped: OWSFS_SKIP_FUSE_TESTS=1");
        return true;
    }
    false
}

pub fn owsfs(args: &[&str]) -> Output {
    Command::new(OWSFS)
        .args(args)
        .env_remove("OWSFS_CACHE")
        .env("XDG_DATA_HOME", test_data_home())
        .output()
        .expect("run owsfs")
}

/// A data directory of this test process, so the default store (`$XDG_DATA_HOME/owsfs/store`)
/// of one test is never another's.
pub fn test_data_home() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("owsfs-test-data-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create test data home");
    dir
}

pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn sh(script: &str, dir: &Path) -> Output {
    run_ok(Command::new("sh").arg("-ec").arg(script).current_dir(dir))
}

/// Whether an owsfs mount is at `mp` (per /proc/self/mountinfo).
pub fn is_mounted(mp: &Path) -> bool {
    owsfs_sys::mount::table()
        .unwrap_or_default()
        .iter()
        .any(|m| m.mountpoint == mp && owsfs_sys::mount::is_owsfs(m))
}

/// Turns the kernel's FUSE over io_uring on (`enable_uring`, as root: CI machines are their
/// own) and says whether the kernel has it; where it has none (before Linux 6.14) a note
/// is printed and the io_uring tests have nothing to run.
pub fn uring_offered() -> bool {
    let on = owsfs_sys::fs::turn_fuse_uring_on().expect("turn FUSE over io_uring on (needs root)");
    if !on {
        println!("skipped: this kernel has no FUSE over io_uring (Linux 6.14 or later)");
    }
    on
}

/// A workspace mounted for one test.
pub struct Workspace {
    pub dir: tempfile::TempDir,
    pub mp: PathBuf,
    pub cache: PathBuf,
    pub opts: Vec<String>,
    /// `--store` (a `file://` store in the test's directory unless set otherwise).
    pub store: String,
    /// `--workspace`.
    pub name: String,
    /// More arguments for `owsfs mount` (e.g. `--commit-interval`).
    pub extra: Vec<String>,
    /// Environment of the mount daemon (e.g. S3 credentials).
    pub env: Vec<(String, String)>,
}

impl Workspace {
    pub fn new() -> Workspace {
        Self::with_options(&[])
    }

    /// A workspace that never cuts a generation while mounted (commit interval of a day), for
    /// tests that compare the journal's dirty set with everything changed since the mount.
    pub fn without_cuts(opts: &[&str]) -> Workspace {
        let mut ws = Self::unmounted(None, "ws");
        ws.opts = opts.iter().map(|s| s.to_string()).collect();
        ws.extra = vec!["--commit-interval".into(), "1d".into()];
        ws.mount();
        ws
    }

    pub fn with_options(opts: &[&str]) -> Workspace {
        let dir = tempfile::Builder::new()
            .prefix("owsfs-test-")
            .tempdir()
            .expect("tempdir");
        let mp = dir.path().join("mnt");
        let cache = dir.path().join("cache");
        std::fs::create_dir(&mp).expect("mkdir mountpoint");
        let store = format!("file://{}", dir.path().join("store").display());
        let ws = Workspace {
            dir,
            mp,
            cache,
            opts: opts.iter().map(|s| s.to_string()).collect(),
            store,
            name: "ws".into(),
            extra: Vec::new(),
            env: Vec::new(),
        };
        ws.mount();
        ws
    }

    /// A workspace not mounted yet, on `store`; call [`Workspace::mount`].
    pub fn unmounted(store: Option<&str>, name: &str) -> Workspace {
        let dir = tempfile::Builder::new()
            .prefix("owsfs-test-")
            .tempdir()
            .expect("tempdir");
        let mp = dir.path().join("mnt");
        let cache = dir.path().join("cache");
        std::fs::create_dir(&mp).expect("mkdir mountpoint");
        let store = match store {
            Some(s) => s.to_string(),
            None => format!("file://{}", dir.path().join("store").display()),
        };
        Workspace {
            dir,
            mp,
            cache,
            opts: Vec::new(),
            store,
            name: name.into(),
            extra: Vec::new(),
            env: Vec::new(),
        }
    }

    /// Runs owsfs as this workspace would, asserting success; the trimmed stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.owsfs(args);
        assert!(
            out.status.success(),
            "owsfs {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Sets workspace `name`'s retention (in this workspace's store) to the newest generation
    /// only, so that a GC prunes everything else once it is older than the grace.
    pub fn keep_only_newest(&self, name: &str) {
        self.ok(&[
            "retention",
            "--store",
            &self.store,
            "--workspace",
            name,
            "--keep-all",
            "0s",
            "--hourly",
            "0s",
            "--daily",
            "0s",
        ]);
    }

    /// Writers (and `owsfs gc`) of this workspace read the GC runs every 200 ms, so that a
    /// test may collect with a grace of 1 s.
    pub fn fast_gc(&mut self) {
        self.env.push(("OWSFS_GC_REFRESH".into(), "200ms".into()));
    }

    /// Runs owsfs with this workspace's environment.
    pub fn owsfs(&self, args: &[&str]) -> Output {
        Command::new(OWSFS)
            .args(args)
            .env_remove("OWSFS_CACHE")
            .env("XDG_DATA_HOME", test_data_home())
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .expect("run owsfs")
    }

    /// `owsfs sync`: the generation number.
    pub fn sync(&self) -> u64 {
        let out = self.owsfs(&["sync", &self.mp.to_string_lossy()]);
        assert!(
            out.status.success(),
            "owsfs sync failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("generation number")
    }

    pub fn mount(&self) {
        let out = self.try_mount();
        assert!(
            out.status.success(),
            "owsfs mount failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
        assert!(
            is_mounted(&self.mp),
            "mount returned but nothing is mounted"
        );
    }

    /// `owsfs mount` with this workspace's arguments, whatever its outcome.
    pub fn try_mount(&self) -> Output {
        let mut args = vec![
            "mount".to_string(),
            self.mp.to_string_lossy().into_owned(),
            "--cache".into(),
            self.cache.to_string_lossy().into_owned(),
            "--store".into(),
            self.store.clone(),
            "--workspace".into(),
            self.name.clone(),
        ];
        for o in &self.opts {
            args.push("-o".into());
            args.push(o.clone());
        }
        args.extend(self.extra.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.owsfs(&args)
    }

    /// `owsfs log --json` of this workspace's store: every generation record.
    pub fn log_json(&self) -> Vec<serde_json::Value> {
        let out = self.owsfs(&[
            "log",
            "--json",
            "--store",
            &self.store,
            "--workspace",
            &self.name,
        ]);
        assert!(
            out.status.success(),
            "owsfs log failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        match serde_json::from_slice(&out.stdout).expect("log json") {
            serde_json::Value::Array(v) => v,
            other => panic!("owsfs log --json is not an array: {other}"),
        }
    }

    /// `owsfs restore` of generation `generation` (the newest when `None`) into `dest`.
    pub fn restore(&self, generation: Option<u64>, dest: &Path) -> Output {
        let mut args = vec![
            "restore".to_string(),
            "--store".into(),
            self.store.clone(),
            "--workspace".into(),
            self.name.clone(),
        ];
        if let Some(g) = generation {
            args.push("--generation".into());
            args.push(g.to_string());
        }
        args.push(dest.to_string_lossy().into_owned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.owsfs(&args)
    }

    /// `kill -9` of the daemon and its supervisor (the node's death), then the dead mount is
    /// removed (`owsfs unmount`).
    pub fn kill_daemon(&self) {
        let pid = self.daemon_pid();
        kill_9_node(pid);
        let gone = wait_for(Duration::from_secs(30), || {
            owsfs_sys::process::has_exited(pid as u32)
        });
        assert!(gone, "daemon {pid} still alive after SIGKILL");
        wait_cache_unlocked(&self.cache);
        let out = owsfs(&["unmount", &self.mp.to_string_lossy()]);
        assert!(
            out.status.success(),
            "owsfs unmount of the dead mount failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!is_mounted(&self.mp), "the dead mount is still there");
    }

    pub fn unmount(&self) {
        let out = owsfs(&["unmount", &self.mp.to_string_lossy()]);
        assert!(
            out.status.success(),
            "owsfs unmount failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
        assert!(!is_mounted(&self.mp), "unmount returned but still mounted");
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mp.join(rel)
    }

    pub fn backing(&self, rel: &str) -> PathBuf {
        self.cache.join("backing").join(rel)
    }

    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.cache.join("owsfs.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        format!(
            "\n--- daemon log tail ---\n{}",
            lines[lines.len().saturating_sub(20)..].join("\n")
        )
    }

    /// The daemon's pid, from its status.
    pub fn daemon_pid(&self) -> i32 {
        let v = self.status_json(false);
        v["pid"].as_i64().expect("pid in status") as i32
    }

    pub fn status_json(&self, dirty: bool) -> serde_json::Value {
        let mut args = vec!["status", "--json"];
        if dirty {
            args.push("--dirty");
        }
        let mp = self.mp.to_string_lossy().into_owned();
        args.push(&mp);
        let out = owsfs(&args);
        assert!(
            out.status.success(),
            "owsfs status failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
        serde_json::from_slice(&out.stdout).expect("status json")
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        if !is_mounted(&self.mp) {
            return;
        }
        let _ = owsfs(&["unmount", &self.mp.to_string_lossy()]);
        if is_mounted(&self.mp) {
            let _ = Command::new("umount").arg("-l").arg(&self.mp).status();
        }
    }
}

/// Unmounts whatever owsfs mount is at the path when dropped, so a failing test leaves
/// nothing mounted.
pub struct MountGuard(pub PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        if is_mounted(&self.0) {
            let _ = owsfs(&["unmount", &self.0.to_string_lossy()]);
        }
        if is_mounted(&self.0) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// Waits until `f` is true or the timeout passes.
/// `kill -9` of daemon `pid` and of its supervisor, if it has one (the process that started
/// it with the same command line): the node's death, which leaves a dead mount (ENOTCONN).
/// The daemon's death alone is a pause (`tests/supervisor.rs`). Returns the supervisor's pid.
pub fn kill_9_node(pid: i32) -> Option<u32> {
    let supervisor = owsfs_sys::process::supervisor_of(pid as u32);
    let kill = |p: i32| {
        // SAFETY: kill(2) takes plain integers and touches no memory of ours.
        let rc = unsafe { libc::kill(p, libc::SIGKILL) };
        assert_eq!(rc, 0, "kill -9 {p}");
    };
    if let Some(p) = supervisor {
        kill(p as i32);
    }
    kill(pid);
    supervisor
}

pub fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

/// What a directory tree holds: relative path → `d` for a directory, `f:` + content for a
/// file, `l:` + target for a symlink.
pub fn snapshot(root: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut std::collections::BTreeMap<String, Vec<u8>>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
            .map(|e| e.expect("dir entry").path())
            .collect();
        entries.sort();
        for p in entries {
            let rel = p
                .strip_prefix(root)
                .expect("under root")
                .to_string_lossy()
                .into_owned();
            let md = std::fs::symlink_metadata(&p).expect("lstat");
            if md.is_dir() {
                out.insert(rel, b"d".to_vec());
                walk(root, &p, out);
            } else if md.file_type().is_symlink() {
                let mut v = b"l:".to_vec();
                v.extend(std::fs::read_link(&p).unwrap().to_string_lossy().as_bytes());
                out.insert(rel, v);
            } else {
                let mut v = b"f:".to_vec();
                v.extend(std::fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display())));
                out.insert(rel, v);
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// Deterministic incompressible bytes.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (x >> 56) as u8
        })
        .collect()
}

/// A tree as `snapshot` gives it.
pub type Snapshot = std::collections::BTreeMap<String, Vec<u8>>;

/// A workspace's tree without SQLite's shared-memory files (never part of a generation).
pub fn tree(root: &Path) -> Snapshot {
    let mut s = snapshot(root);
    s.retain(|k, _| !k.ends_with("-shm"));
    s
}

/// Asserts two trees are equal, naming the first difference (not dumping file contents).
pub fn assert_same_tree(got: &Snapshot, want: &Snapshot, what: &str) {
    let gk: Vec<&String> = got.keys().collect();
    let wk: Vec<&String> = want.keys().collect();
    assert_eq!(gk, wk, "{what}: different files");
    for (k, v) in want {
        let g = &got[k];
        assert!(g == v, "{what}: {k} differs: {}", describe_difference(g, v));
    }
}

/// Where `got` first differs from `want`, and what it holds from there (for a message).
pub fn describe_difference(got: &[u8], want: &[u8]) -> String {
    let first = got
        .iter()
        .zip(want)
        .position(|(g, w)| g != w)
        .unwrap_or(got.len().min(want.len()));
    let zeros = got[first..].iter().filter(|b| **b == 0).count();
    let sample: Vec<String> = got[first..]
        .iter()
        .take(32)
        .map(|b| format!("{b:02x}"))
        .collect();
    format!(
        "{} bytes, want {}; the same up to byte {first}, then {} bytes of which {zeros} are \
         zero, starting {}",
        got.len(),
        want.len(),
        got.len() - first,
        sample.join("")
    )
}

/// Prints `{"integrity": ..., "rows": [k...]}` of table t of the database at argv[1] (opened
/// read-only when argv[2] is "ro").
const SQL_CHECK: &str = r#"
import json, sqlite3, sys
path = sys.argv[1]
if len(sys.argv) > 2 and sys.argv[2] == "ro":
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
else:
    db = sqlite3.connect(path)
integrity = "\n".join(r[0] for r in db.execute("PRAGMA integrity_check"))
rows = [r[0] for r in db.execute("SELECT k FROM t ORDER BY k")]
print(json.dumps({"integrity": integrity, "rows": rows}))
"#;

/// (integrity_check, keys of table t) of the database `db`.
pub fn sql_check(db: &Path, read_only: bool) -> (String, Vec<u64>) {
    let mut cmd = Command::new("python3");
    cmd.args(["-c", SQL_CHECK]).arg(db);
    if read_only {
        cmd.arg("ro");
    }
    let out = run_ok(&mut cmd);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("check json");
    let rows = v["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| r.as_u64().expect("row key"))
        .collect();
    (
        v["integrity"].as_str().unwrap_or_default().to_string(),
        rows,
    )
}

/// The keys of table t in `root/app.db`, checked on a copy (so the workspace is not changed):
/// `integrity_check` must be ok.
pub fn db_rows(root: &Path, what: &str) -> Vec<u64> {
    let copy = tempfile::Builder::new()
        .prefix("owsfs-db-")
        .tempdir()
        .unwrap();
    for f in ["app.db", "app.db-wal"] {
        if root.join(f).exists() {
            std::fs::copy(root.join(f), copy.path().join(f)).unwrap();
        }
    }
    let (integrity, rows) = sql_check(&copy.path().join("app.db"), false);
    assert_eq!(integrity, "ok", "{what}: integrity_check");
    rows
}

/// Waits until the daemon `pid` of a workspace started with `OWSFS_CRASH_AT=point` is gone,
/// checks that its log names the crash point, and removes its dead mount.
pub fn crashed(ws: &Workspace, pid: i32, point: &str) {
    let gone = wait_for(Duration::from_secs(60), || {
        owsfs_sys::process::has_exited(pid as u32)
    });
    assert!(gone, "{point}: the daemon did not die{}", ws.log_tail());
    wait_cache_unlocked(&ws.cache);
    assert_crash_logged(ws, point);
    if is_mounted(&ws.mp) {
        assert!(
            std::fs::metadata(&ws.mp).is_err(),
            "{point}: the mount still answers after its daemon died"
        );
        let out = owsfs(&["unmount", &ws.mp.to_string_lossy()]);
        assert!(
            out.status.success(),
            "owsfs unmount of the dead mount: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(
        !is_mounted(&ws.mp),
        "{point}: the dead mount is still there"
    );
}

/// Asserts the daemon's log says it died at the crash point `point`.
pub fn assert_crash_logged(ws: &Workspace, point: &str) {
    let log = std::fs::read_to_string(ws.cache.join("owsfs.log")).unwrap_or_default();
    assert!(
        log.contains(&format!("crash point {point}: dying now")),
        "the crash point {point} was not reached{}",
        ws.log_tail()
    );
}

/// Adds `rows` rows to table `t` of `DIR/app.db` (WAL mode), created when missing.
pub fn write_db(dir: &Path, rows: u32) {
    let script = format!(
        "import sqlite3; db = sqlite3.connect('{}'); db.execute('PRAGMA journal_mode=WAL'); \
         db.execute('CREATE TABLE IF NOT EXISTS t (k INTEGER PRIMARY KEY, v TEXT)'); \
         db.executemany('INSERT INTO t (v) VALUES (?)', [('row',)] * {rows}); db.commit()",
        dir.join("app.db").display()
    );
    run_ok(std::process::Command::new("python3").args(["-c", &script]));
}

/// Waits until nothing holds the cache's lock. A killed daemon's leader shows as a zombie
/// while its other threads are still exiting, and the lock goes only with the last of them.
pub fn wait_cache_unlocked(cache: &Path) {
    let free = wait_for(Duration::from_secs(30), || {
        let Ok(f) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(cache.join("lock"))
        else {
            return true;
        };
        rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_ok()
    });
    assert!(
        free,
        "the cache {} stays locked after its daemon died",
        cache.display()
    );
}

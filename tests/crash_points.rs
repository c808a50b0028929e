//! A crash at every crash window of the commit protocol, the fence, the lease, the set-aside,
//! the lazy restore, hydration's save and `owsfs recover` (the table "Crash windows" in
//! `store/FORMAT.md`). Each window has a named fail point; the daemon (or `owsfs recover`) is
//! started with `OWSFS_CRASH_AT=NAME` and dies there as by `kill -9` (exit status 137,
//! `src/failpoints.rs`). With `OWSFS_CRASH_ARMED_BY=PATH` the point fires only once the test
//! creates PATH, so a first `owsfs sync` can succeed and the workload can run first.
//!
//! Every test first checks that the crash happened where it should (the daemon's log names
//! the point, the daemon is gone and so is its mount), then the recovery: the crashed cache
//! mounts again and has everything the workload completed (SQLite's `integrity_check` ok),
//! another node sees the newest committed generation (and nothing of a commit that did not
//! land), `owsfs log` has contiguous numbers, epochs that never go down and a fence first in
//! every epoch, and nothing `owsfs sync` acknowledged is lost.

mod common;

#[path = "../testkit/seaweed.rs"]
mod seaweed;
#[path = "common/stores.rs"]
mod stores;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use common::*;
use stores::TestStore;

/// Rows argv[2]..=argv[3] of table t in `app.db` (WAL mode), one transaction each, and a file
/// `files/K` for each, written under a temporary name and renamed into place. With argv[4] ==
/// "hold", automatic checkpoints are off and the database stays open after the last commit
/// (the WAL holds the rows) until stdin closes; "ready" is printed once every row is in.
const WORKLOAD: &str = r#"
import os, sqlite3, sys
mp, a, b, hold = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "hold"
os.makedirs(f"{mp}/files", exist_ok=True)
db = sqlite3.connect(f"{mp}/app.db", isolation_level=None)
assert db.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
if hold:
    db.execute("PRAGMA wal_autocheckpoint=0")
db.execute("CREATE TABLE IF NOT EXISTS t(k INTEGER PRIMARY KEY, v TEXT)")
for k in range(a, b + 1):
    db.execute("BEGIN")
    db.execute("INSERT INTO t VALUES (?, ?)", (k, f"row {k} " * 60))
    db.execute("COMMIT")
    with open(f"{mp}/files/{k}.tmp", "w") as f:
        f.write(f"file {k}\n" * (k * 50))
    os.rename(f"{mp}/files/{k}.tmp", f"{mp}/files/{k}")
print("ready", flush=True)
if hold:
    sys.stdin.read()
db.close()
"#;

/// Kills a child process (a workload holding its database open) when dropped.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the workload for rows `a..=b` to its end.
fn workload(ws: &Workspace, a: u64, b: u64) {
    run_ok(
        Command::new("python3")
            .args(["-c", WORKLOAD])
            .arg(&ws.mp)
            .args([a.to_string(), b.to_string(), "close".into()]),
    );
}

/// Runs the workload for rows `a..=b` and returns once every row is committed, with the
/// database still open.
fn workload_holding(ws: &Workspace, a: u64, b: u64) -> KillOnDrop {
    let mut child = KillOnDrop(
        Command::new("python3")
            .args(["-c", WORKLOAD])
            .arg(&ws.mp)
            .args([a.to_string(), b.to_string(), "hold".into()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the workload"),
    );
    let mut line = String::new();
    BufReader::new(child.0.stdout.as_mut().expect("workload stdout"))
        .read_line(&mut line)
        .expect("read the workload's output");
    assert_eq!(line.trim(), "ready", "the workload failed{}", ws.log_tail());
    child
}

/// Checks the database under `root` on a copy (so the workspace is not changed): integrity
/// ok, and rows exactly `1..=rows`.
fn check_db(root: &Path, rows: u64, what: &str) {
    let got = db_rows(root, what);
    assert_eq!(got, (1..=rows).collect::<Vec<_>>(), "{what}: rows");
}

/// The log's records by number: (number, epoch, kind). Checks the rules every crash must
/// leave intact: numbers 1..=n without a gap, each record's parent the one before it, epochs
/// that never go down, and every epoch beginning with its holder's fence.
fn checked_log(ws: &Workspace) -> Vec<(u64, u64, String)> {
    let log = ws.log_json();
    let mut v: Vec<(u64, u64, String)> = log
        .iter()
        .map(|r| {
            assert_eq!(
                r["parent"].as_u64(),
                r["number"]
                    .as_u64()
                    .unwrap()
                    .checked_sub(1)
                    .filter(|p| *p > 0),
                "parent of {r}"
            );
            (
                r["number"].as_u64().unwrap(),
                r["epoch"].as_u64().unwrap(),
                r["kind"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    v.sort();
    let numbers: Vec<u64> = v.iter().map(|r| r.0).collect();
    assert_eq!(numbers, (1..=v.len() as u64).collect::<Vec<_>>(), "{v:?}");
    for w in v.windows(2) {
        assert!(w[1].1 >= w[0].1, "the epoch goes down: {v:?}");
        if w[1].1 > w[0].1 {
            assert_eq!(
                w[1].2, "fence",
                "epoch {} starts without a fence: {v:?}",
                w[1].1
            );
        }
    }
    assert_eq!(v.first().map(|r| r.2.as_str()), Some("fence"), "{v:?}");
    v
}

/// A mount that must die at `point` before it is ready.
fn mount_crashes(ws: &mut Workspace, point: &str) {
    ws.env.push(("OWSFS_CRASH_AT".into(), point.into()));
    let out = ws.try_mount();
    ws.env.pop();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "{point}: the mount succeeded{}",
        ws.log_tail()
    );
    // The daemon dies as by `kill -9`, and its supervisor with it (the node's death).
    assert!(
        err.contains("exit status: 137") || err.contains("signal: 9 (SIGKILL)"),
        "{point}: {err}"
    );
    assert_crash_logged(ws, point);
    assert!(!is_mounted(&ws.mp), "{point}: a mount is left behind");
    // The log of the next mount starts after this one's.
    let _ = std::fs::remove_file(ws.cache.join("owsfs.log"));
}

// ---- The cut and the commit, the lease's renewal and release, the handoff ---------------------

/// What makes the crashed mount reach its point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Trigger {
    /// `owsfs sync` (the commit interval is an hour: no other cut runs).
    Sync,
    /// The next lease renewal (a TTL of 3 s renews every second).
    Renewal,
    /// `owsfs unmount`: the handoff.
    Unmount,
}

struct Window {
    point: &'static str,
    trigger: Trigger,
    /// Whether the generation of the crashed cut is in the store.
    landed: bool,
}

const fn w(point: &'static str, trigger: Trigger, landed: bool) -> Window {
    Window {
        point,
        trigger,
        landed,
    }
}

/// The windows of the commit protocol where the store matters (packs up, slot taken or not,
/// HEAD behind), run against both stores.
const COMMIT_WINDOWS: &[Window] = &[
    w("commit-after-packs", Trigger::Sync, false),
    w("commit-after-pending", Trigger::Sync, false),
    w("commit-before-head", Trigger::Sync, true),
    w("commit-after-slot", Trigger::Sync, true),
];

/// The windows of the commit protocol that only the cache sees, run against `file://`.
const LOCAL_COMMIT_WINDOWS: &[Window] = &[
    w("commit-after-cut", Trigger::Sync, false),
    w("commit-after-state", Trigger::Sync, true),
];

/// `file://`'s create-if-absent, met first by the generation slot after the arming (lease
/// steps, the other users, do not come for an hour).
const CAS_WINDOWS: &[Window] = &[
    w("cas-before-link", Trigger::Sync, false),
    w("cas-after-link", Trigger::Sync, true),
];

const LEASE_WINDOWS: &[Window] = &[
    w("lease-after-renew", Trigger::Renewal, false),
    w("handoff-after-cut", Trigger::Unmount, true),
    w("lease-after-release", Trigger::Unmount, true),
];

/// The step of a renewal written, the old steps not deleted yet (only the cache's view of
/// the store differs, so `file://` only).
const LEASE_TIDY_WINDOW: Window = w("lease-before-tidy", Trigger::Renewal, false);

/// Node A runs the workload (rows 1..=20, then `owsfs sync`, then rows 21..=40) and crashes at
/// the window. Another node B then serves the newest committed generation: rows 21..=40 only
/// if the crashed cut landed. After B, A's own cache mounts again with all 40 rows, commits
/// them, and the log and the newest generation agree.
fn crash_in_window(store: &TestStore, name: &str, win: &Window) {
    let point = win.point;
    let ttl = if win.trigger == Trigger::Renewal {
        "3s"
    } else {
        "1h"
    };
    // No cut but the ones the test asks for: no interval, no lag bound.
    let mut a = store.workspace(
        name,
        &[
            "--commit-interval",
            "1h",
            "--max-lag",
            "1h",
            "--lease-ttl",
            ttl,
        ],
    );
    let arm = a.dir.path().join("armed");
    a.env.push(("OWSFS_CRASH_AT".into(), point.into()));
    a.env
        .push(("OWSFS_CRASH_ARMED_BY".into(), arm.to_string_lossy().into()));
    a.mount();
    a.env.truncate(a.env.len() - 2);
    let pid = a.daemon_pid();
    workload(&a, 1, 20);
    let g1 = a.sync();
    let want1 = tree(&a.mp);
    let held = if win.trigger == Trigger::Unmount {
        workload(&a, 21, 40);
        None
    } else {
        Some(workload_holding(&a, 21, 40))
    };
    let want2 = tree(&a.mp);
    std::fs::write(&arm, b"").unwrap();
    match win.trigger {
        Trigger::Sync => {
            let out = a.owsfs(&["sync", &a.mp.to_string_lossy()]);
            assert!(
                !out.status.success(),
                "{point}: owsfs sync succeeded: {}{}",
                String::from_utf8_lossy(&out.stdout),
                a.log_tail()
            );
        }
        Trigger::Renewal => {}
        Trigger::Unmount => {
            // The session ends before the handoff: the command cannot say how it ended.
            let out = owsfs(&["unmount", &a.mp.to_string_lossy()]);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success() && err.contains("died during the unmount"),
                "{point}: owsfs unmount: {}: {err}",
                out.status
            );
        }
    }
    drop(held);
    crashed(&a, pid, point);
    if store.url.starts_with("file://") {
        check_store_leftovers(store, name, point, g1);
    }

    // Another node: the newest committed generation, nothing of a cut that did not land. A
    // crash in a renewal is waited out (the lease lapses); otherwise the holder is known dead.
    let steal: &[&str] = match win.trigger {
        Trigger::Renewal => &["--steal"],
        _ if point == "lease-after-release" => &[],
        _ => &["--steal", "--force"],
    };
    let b = store.workspace(name, steal);
    b.mount();
    let (want_b, rows_b) = if win.landed {
        (&want2, 40)
    } else {
        (&want1, 20)
    };
    assert_same_tree(&tree(&b.mp), want_b, &format!("{point}: another node"));
    check_db(&b.mp, rows_b, &format!("{point}: another node"));
    b.unmount();

    // The crashed cache: nothing the workload completed is lost, and it commits on top.
    a.mount();
    assert_same_tree(&tree(&a.mp), &want2, &format!("{point}: remount"));
    check_db(&a.mp, 40, &format!("{point}: remount"));
    std::fs::write(a.path("files/after.txt"), b"after the crash\n").unwrap();
    let want3 = tree(&a.mp);
    let g3 = a.sync();
    a.unmount();

    let log = checked_log(&a);
    let commit = |n: u64| log.iter().any(|r| r.0 == n && r.2 == "commit");
    assert!(
        commit(g1),
        "{point}: synced generation {g1} is gone: {log:?}"
    );
    let a_epoch = log[g1 as usize - 1].1;
    assert_eq!(
        log[g1 as usize].2 == "commit" && log[g1 as usize].1 == a_epoch,
        win.landed,
        "{point}: what follows generation {g1}: {log:?}"
    );
    assert!(
        g3 > g1 && commit(g3) && log.last().unwrap().0 == g3,
        "{point}: {g3} {log:?}"
    );
    let dest = a.dir.path().join("restored");
    let out = a.restore(None, &dest);
    assert!(
        out.status.success(),
        "{point}: restore: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same_tree(&tree(&dest), &want3, &format!("{point}: newest generation"));
    check_db(&dest, 40, &format!("{point}: newest generation"));
}

/// What a crash leaves in a `file://` store, where the window says something particular.
fn check_store_leftovers(store: &TestStore, name: &str, point: &str, g1: u64) {
    let ws = store.root().join("workspaces").join(name);
    let slot = |n: u64| ws.join("gens").join(format!("{n:020}")).exists();
    // The temporaries in `.tmp/` holding generation `n`'s record; with `linked`, those that
    // are the slot itself (a hard link of it).
    let temporaries = |n: u64, linked: bool| {
        let slot_ino = std::fs::metadata(ws.join("gens").join(format!("{n:020}"))).map(|m| m.ino());
        std::fs::read_dir(store.root().join(".tmp"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().ends_with(".cas"))
            .filter(|p| {
                let text = std::fs::read_to_string(p).unwrap_or_default();
                text.starts_with("owsfs-generation 1\n")
                    && text.contains(&format!("\"number\":{n},"))
                    && (!linked
                        || slot_ino.as_ref().ok() == Some(&std::fs::metadata(p).unwrap().ino()))
            })
            .count()
    };
    match point {
        "commit-before-head" => {
            assert!(slot(g1 + 1), "{point}: no slot {}", g1 + 1);
            let head = std::fs::read_to_string(ws.join("HEAD")).unwrap();
            assert!(
                head.starts_with(&format!("owsfs-head 1 {g1} ")),
                "{point}: HEAD hint {head:?}"
            );
        }
        "cas-before-link" => {
            assert!(!slot(g1 + 1), "{point}: slot {} exists", g1 + 1);
            assert_eq!(
                temporaries(g1 + 1, false),
                1,
                "{point}: temporary of the record"
            );
        }
        "cas-after-link" => {
            assert!(slot(g1 + 1), "{point}: no slot {}", g1 + 1);
            assert_eq!(
                temporaries(g1 + 1, true),
                1,
                "{point}: the slot's temporary"
            );
        }
        _ => {}
    }
}

/// The crash lands the cache's *first* commit (no generation of it recorded locally yet):
/// the same cache mounts again with everything, and commits on top. Found by the torture
/// harness: the remount took the cache for a stranger's ("already holds other files").
fn crash_in_the_first_commit(store: &TestStore, name: &str, point: &str) {
    let mut a = store.workspace(name, &["--commit-interval", "1h", "--max-lag", "1h"]);
    let arm = a.dir.path().join("armed");
    a.env.push(("OWSFS_CRASH_AT".into(), point.into()));
    a.env
        .push(("OWSFS_CRASH_ARMED_BY".into(), arm.to_string_lossy().into()));
    a.mount();
    a.env.truncate(a.env.len() - 2);
    let pid = a.daemon_pid();
    workload(&a, 1, 20);
    let want = tree(&a.mp);
    std::fs::write(&arm, b"").unwrap();
    let out = a.owsfs(&["sync", &a.mp.to_string_lossy()]);
    assert!(!out.status.success(), "{point}: owsfs sync succeeded");
    crashed(&a, pid, point);
    a.mount();
    assert_same_tree(&tree(&a.mp), &want, &format!("{point}: remount"));
    check_db(&a.mp, 20, &format!("{point}: remount"));
    std::fs::write(a.path("files/after.txt"), b"after the crash\n").unwrap();
    let want = tree(&a.mp);
    a.unmount();
    let dest = a.dir.path().join("restored");
    let out = a.restore(None, &dest);
    assert!(
        out.status.success(),
        "{point}: restore: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same_tree(&tree(&dest), &want, &format!("{point}: newest generation"));
}

#[test]
fn crash_in_the_first_commit_file() {
    if skip_fuse() {
        return;
    }
    let store = TestStore::file();
    for (i, point) in ["commit-before-head", "commit-after-slot", "cas-after-link"]
        .iter()
        .enumerate()
    {
        crash_in_the_first_commit(&store, &format!("first{i}"), point);
    }
}

#[test]
fn crash_in_the_first_commit_seaweedfs() {
    if skip_fuse() {
        return;
    }
    let store = TestStore::seaweed("crash-first");
    for (i, point) in ["commit-before-head", "commit-after-slot"]
        .iter()
        .enumerate()
    {
        crash_in_the_first_commit(&store, &format!("first{i}"), point);
    }
}

#[test]
fn crash_in_the_commit_protocol_file() {
    if skip_fuse() {
        return;
    }
    let store = TestStore::file();
    let windows = COMMIT_WINDOWS
        .iter()
        .chain(LOCAL_COMMIT_WINDOWS)
        .chain(CAS_WINDOWS);
    for (i, win) in windows.enumerate() {
        crash_in_window(&store, &format!("c{i}"), win);
    }
}

#[test]
fn crash_in_the_commit_protocol_seaweedfs() {
    if skip_fuse() {
        return;
    }
    let store = TestStore::seaweed("crash-commit");
    for (i, win) in COMMIT_WINDOWS.iter().enumerate() {
        crash_in_window(&store, &format!("c{i}"), win);
    }
}

#[test]
fn crash_in_lease_renewal_and_handoff_file() {
    if skip_fuse() {
        return;
    }
    let store = TestStore::file();
    for (i, win) in LEASE_WINDOWS.iter().chain([&LEASE_TIDY_WINDOW]).enumerate() {
        crash_in_window(&store, &format!("l{i}"), win);
    }
}

#[test]
fn crash_in_lease_renewal_and_handoff_seaweedfs() {
    if skip_fuse() {
        return;
    }
    let store = TestStore::seaweed("crash-lease");
    for (i, win) in LEASE_WINDOWS.iter().enumerate() {
        crash_in_window(&store, &format!("l{i}"), win);
    }
}

// ---- Mounting: the lease, the fence, the lazy restore ------------------------------------

/// (point, whether the crashing cache holds an older generation: a warm remount). The first
/// three, where the store matters, run against both stores; the lazy restore's against
/// `file://` only.
const MOUNT_WINDOWS: &[(&str, bool)] = &[
    ("mount-after-lease", false),
    ("fence-before-head", false),
    ("fence-after-slot", false),
    ("lazy-restore-before-commit", false),
    ("lazy-restore-after-commit", false),
    ("lazy-restore-before-commit", true),
    ("lazy-restore-after-commit", true),
];

/// Node B's mount dies at `point` before it is ready; B's next mount of the same cache takes
/// the lease over at once and serves A's newest generation, and what B writes then is
/// committed after a fence of its own.
fn crash_while_mounting(store: &TestStore, name: &str, point: &str, warm: bool) {
    let a = store.workspace(name, &["--commit-interval", "1h"]);
    a.mount();
    workload(&a, 1, 20);
    a.unmount();
    let mut b = store.workspace(name, &["--lease-ttl", "1h"]);
    if warm {
        b.mount();
        check_db(&b.mp, 20, &format!("{point}: first mount"));
        b.unmount();
    }
    a.mount();
    workload(&a, 21, 40);
    let want = tree(&a.mp);
    a.unmount();
    let before = checked_log(&a).len() as u64;

    mount_crashes(&mut b, point);
    let log = checked_log(&a);
    // Every window after the lease's is after the fence too.
    let fenced = point != "mount-after-lease";
    assert_eq!(
        log.len() as u64,
        before + fenced as u64,
        "{point}: the crashed mount's fence: {log:?}"
    );
    if point == "fence-before-head" && store.url.starts_with("file://") {
        let head =
            std::fs::read_to_string(store.root().join(format!("workspaces/{name}/HEAD"))).unwrap();
        assert!(
            head.starts_with(&format!("owsfs-head 1 {before} ")),
            "{point}: HEAD hint {head:?}"
        );
    }

    b.mount();
    assert_same_tree(&tree(&b.mp), &want, &format!("{point}: remount"));
    check_db(&b.mp, 40, &format!("{point}: remount"));
    std::fs::write(b.path("files/b.txt"), b"written by B after its crash\n").unwrap();
    let g = b.sync();
    let want = tree(&b.mp);
    b.unmount();
    let log = checked_log(&b);
    assert_eq!(log.last().map(|r| (r.0, r.2.as_str())), Some((g, "commit")));

    let c = store.workspace(name, &[]);
    c.mount();
    assert_same_tree(&tree(&c.mp), &want, &format!("{point}: another node"));
    c.unmount();
}

#[test]
fn crash_while_mounting_file() {
    if skip_fuse() {
        return;
    }
    let store = TestStore::file();
    for (i, (point, warm)) in MOUNT_WINDOWS.iter().enumerate() {
        crash_while_mounting(&store, &format!("m{i}"), point, *warm);
    }
}

#[test]
fn crash_while_mounting_seaweedfs() {
    if skip_fuse() {
        return;
    }
    let store = TestStore::seaweed("crash-mount");
    for (i, (point, warm)) in MOUNT_WINDOWS[..3].iter().enumerate() {
        crash_while_mounting(&store, &format!("m{i}"), point, *warm);
    }
}

// ---- Setting unsynced changes aside, and `owsfs recover` ---------------------------------

fn recover(cache: &Path, name: &str, store: &TestStore, crash_at: Option<&str>) -> Output {
    let mut cmd = Command::new(OWSFS);
    cmd.args(["recover", "--cache"])
        .arg(cache)
        .args(["--as", name, "--store", &store.url])
        .env_remove("OWSFS_CACHE")
        .env("XDG_DATA_HOME", test_data_home())
        .envs(store.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    if let Some(p) = crash_at {
        cmd.env("OWSFS_CRASH_AT", p);
    }
    cmd.output().expect("run owsfs recover")
}

/// `owsfs recover` dies at `point`; run again, it finishes the job.
fn recover_after_crash(cache: &Path, name: &str, store: &TestStore, point: &str) {
    let out = recover(cache, name, store, Some(point));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(137), "{point}: {err}");
    assert!(
        err.contains(&format!("crash point {point}: dying now")),
        "{point}: {err}"
    );
    let out = recover(cache, name, store, None);
    assert!(
        out.status.success(),
        "{point}: owsfs recover run again: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The newest generation of workspace `name`, restored.
fn restored(store: &TestStore, name: &str, dest: &Path) -> Snapshot {
    let mut ws = Workspace::unmounted(Some(&store.url), name);
    ws.env = store.env.clone();
    let out = ws.restore(None, dest);
    assert!(
        out.status.success(),
        "restore {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    tree(dest)
}

fn aside_dirs(cache: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(cache.join("aside"))
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// A's unsynced tail (rows 21..=30) must go aside when A remounts after B took over and
/// committed; the mount dies in the middle of moving it (`aside-midway`). The next mount
/// serves B's generation, and the tail is whole in one aside directory, from which `owsfs
/// recover` makes a fork; that recover dies after its fence and is run again. Then A gets a
/// tail again, and a recover of A's cache dies after its commit and is run again.
#[test]
fn crash_while_setting_aside_and_recovering() {
    if skip_fuse() {
        return;
    }
    let store = TestStore::file();
    let mut a = store.workspace("w", &["--commit-interval", "1h"]);
    a.mount();
    workload(&a, 1, 20);
    a.sync();
    workload(&a, 21, 30);
    let tail = tree(&a.mp);
    a.kill_daemon();

    let b = store.workspace("w", &["--steal", "--force"]);
    b.mount();
    std::fs::write(b.path("files/b.txt"), b"B\n").unwrap();
    b.sync();
    let want_b = tree(&b.mp);
    b.unmount();

    mount_crashes(&mut a, "aside-midway");
    let out = a.try_mount();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "aside-midway: remount: {err}{}",
        a.log_tail()
    );
    assert!(
        err.contains("were set aside in"),
        "aside-midway: no notice: {err}"
    );
    assert_same_tree(&tree(&a.mp), &want_b, "aside-midway: remount");
    a.unmount();
    let aside = aside_dirs(&a.cache);
    assert_eq!(aside.len(), 1, "aside-midway: {aside:?}");
    for part in ["backing", "journal", "state.db", "aside.json", "cache.json"] {
        assert!(
            aside[0].join(part).exists(),
            "aside-midway: {} lacks {part}",
            aside[0].display()
        );
    }

    recover_after_crash(&aside[0], "fork1", &store, "recover-after-fence");
    let dest = a.dir.path().join("fork1");
    assert_same_tree(&restored(&store, "fork1", &dest), &tail, "fork1");
    check_db(&dest, 30, "fork1");
    let log = checked_log(&Workspace::unmounted(Some(&store.url), "fork1"));
    assert_eq!(
        log.iter().map(|r| r.2.as_str()).collect::<Vec<_>>(),
        ["fence", "fence", "commit"],
        "fork1: the crashed recover's fence, then the finished one's: {log:?}"
    );

    // A again, with a tail of its own after B's generation; then a crash.
    a.mount();
    workload(&a, 31, 35);
    let tail = tree(&a.mp);
    a.kill_daemon();
    recover_after_crash(&a.cache, "fork2", &store, "recover-after-commit");
    let dest = a.dir.path().join("fork2");
    assert_same_tree(&restored(&store, "fork2", &dest), &tail, "fork2");
    // The cache now belongs to the fork.
    a.name = "fork2".into();
    a.mount();
    assert_same_tree(&tree(&a.mp), &tail, "fork2 on the recovered cache");
    a.unmount();
    let log = checked_log(&a);
    assert_eq!(
        log.iter().filter(|r| r.2 == "commit").count(),
        1,
        "fork2: one commit, whatever the crash: {log:?}"
    );
}

// ---- Hydration: materializing a directory, storing what was fetched ------------------------

/// A fresh node dies twice while hydrating: once while materializing a directory (its entries
/// made, not recorded), once while storing what it fetched of a big file (the bytes on disk,
/// their ranges not recorded). Each next mount of the cache makes the directory again and
/// fetches what it lacks again, and serves exactly the generation plus the write it made
/// before the second crash.
#[test]
fn crash_while_hydrating() {
    if skip_fuse() {
        return;
    }
    const BIG: usize = 8 << 20;
    let store = TestStore::file();
    let a = store.workspace("w", &[]);
    a.mount();
    let mut big = noise(BIG, 7);
    std::fs::write(a.path("big.bin"), &big).unwrap();
    workload(&a, 1, 20);
    let mut want = tree(&a.mp);
    a.unmount();

    let mut b = store.workspace("w", &["--prefetch", "0"]);
    let arm = b.dir.path().join("armed");
    let crash_env = |point: &str| {
        vec![
            ("OWSFS_CRASH_AT".to_string(), point.to_string()),
            (
                "OWSFS_CRASH_ARMED_BY".to_string(),
                arm.to_string_lossy().into_owned(),
            ),
        ]
    };

    let point = "materialize-before-commit";
    b.env = crash_env(point);
    b.mount();
    b.env.clear();
    let pid = b.daemon_pid();
    std::fs::write(&arm, b"").unwrap();
    let listed = std::fs::read_dir(b.path("files")).map(|d| d.count());
    assert!(listed.is_err(), "{point}: files/ was listed: {listed:?}");
    crashed(&b, pid, point);
    std::fs::remove_file(&arm).unwrap();

    let point = "hydrate-save-midway";
    b.env = crash_env(point);
    b.mount();
    b.env.clear();
    let pid = b.daemon_pid();
    let mut head = vec![0u8; 1 << 20];
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(b.path("big.bin"))
        .unwrap();
    f.read_exact_at(&mut head, 0).unwrap();
    assert!(head[..] == big[..1 << 20]);
    let patch = noise(4096, 8);
    f.write_all_at(&patch, 3 << 20).unwrap();
    big[3 << 20..(3 << 20) + 4096].copy_from_slice(&patch);
    drop(f);
    std::fs::write(&arm, b"").unwrap();
    // A fetch after the arming: the next save (within 250 ms) has something to store.
    let mut buf = vec![0u8; 1 << 20];
    let _ = std::fs::File::open(b.path("big.bin")).map(|f| f.read_exact_at(&mut buf, 6 << 20));
    crashed(&b, pid, point);

    b.mount();
    let mut expect_big = b"f:".to_vec();
    expect_big.extend_from_slice(&big);
    want.insert("big.bin".into(), expect_big);
    assert_same_tree(&tree(&b.mp), &want, "after both crashes");
    check_db(&b.mp, 20, point);
    b.unmount();
    let c = store.workspace("w", &[]);
    c.mount();
    assert_same_tree(&tree(&c.mp), &want, "another node");
    c.unmount();
}

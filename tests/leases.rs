//! The writer lease, end to end through real mounts: one writer per workspace at a time, a
//! clean handoff at unmount, fail-stop (EROFS) of a partitioned holder and a fence that keeps
//! its late commits out, takeover after a crash, and refusal of a malformed lease or a cloned
//! node id. Most tests run against a `file://` store and a real S3 server (SeaweedFS on
//! loopback). Each "node" is a cache of its own (`TestStore::workspace`) on the same store.
//!
//! No test asserts on time: waits are bounded only to turn a hang into a failure, and the
//! measured durations are printed.

mod common;

#[path = "../testkit/seaweed.rs"]
mod seaweed;
#[path = "common/stores.rs"]
mod stores;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use stores::TestStore;

/// Inserts row (k, v) into table t of the database at argv[1] (WAL mode), then closes it.
const SQL_INSERT: &str = r#"
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
assert db.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
db.execute("CREATE TABLE IF NOT EXISTS t(k INTEGER PRIMARY KEY, v TEXT)")
db.execute("BEGIN")
for k in sys.argv[2].split(","):
    db.execute("INSERT INTO t VALUES (?, ?)", (int(k), sys.argv[3] * int(k)))
db.execute("COMMIT")
db.close()
"#;

/// The workload of `tests/generations.rs`: k = 1..=N, an SQLite (WAL) commit of row k, then
/// `files/k`, then `files/k.tmp` renamed to `files/k.done`.
const WORKLOAD: &str = r#"
import os, sqlite3, sys, time
mp, n = sys.argv[1], int(sys.argv[2])
os.makedirs(f"{mp}/files", exist_ok=True)
db = sqlite3.connect(f"{mp}/app.db", isolation_level=None)
assert db.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
db.execute("PRAGMA wal_autocheckpoint=16")
db.execute("CREATE TABLE IF NOT EXISTS t(k INTEGER PRIMARY KEY)")
for k in range(1, n + 1):
    db.execute("BEGIN")
    db.execute("INSERT INTO t VALUES (?)", (k,))
    db.execute("COMMIT")
    with open(f"{mp}/files/{k}", "w") as f:
        f.write(f"{k}\n")
    with open(f"{mp}/files/{k}.tmp", "w") as f:
        f.write(f"{k} done\n")
    os.rename(f"{mp}/files/{k}.tmp", f"{mp}/files/{k}.done")
    time.sleep(0.02)
db.close()
"#;

fn python(script: &str, args: &[&str]) -> std::process::Output {
    run_ok(Command::new("python3").arg("-c").arg(script).args(args))
}

fn sql_insert(db: &Path, keys: &[u64], tag: &str) {
    let keys: Vec<String> = keys.iter().map(u64::to_string).collect();
    python(SQL_INSERT, &[&db.to_string_lossy(), &keys.join(","), tag]);
}

fn node_id(ws: &Workspace) -> String {
    std::fs::read_to_string(ws.cache.join("node-id"))
        .expect("read CACHE/node-id")
        .trim()
        .to_string()
}

fn hostname() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

fn append(path: &Path, text: &str) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    f.write_all(text.as_bytes())
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The log's records, sorted by generation number: (number, epoch, kind).
fn epochs(ws: &Workspace) -> Vec<(u64, u64, String)> {
    let mut v: Vec<(u64, u64, String)> = ws
        .log_json()
        .iter()
        .map(|r| {
            (
                r["number"].as_u64().expect("number"),
                r["epoch"].as_u64().expect("epoch"),
                r["kind"].as_str().expect("kind").to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Epochs never go down along the log; `newer` has a fence, and it comes after every record
/// of `older`.
fn check_epoch_rule(log: &[(u64, u64, String)], older: u64, newer: u64) {
    assert!(newer > older, "epoch {newer} is not newer than {older}");
    for w in log.windows(2) {
        assert!(
            w[1].1 >= w[0].1,
            "epoch goes down from generation {} (epoch {}) to {} (epoch {}): {log:?}",
            w[0].0,
            w[0].1,
            w[1].0,
            w[1].1
        );
    }
    let fence = log
        .iter()
        .find(|(_, e, k)| *e == newer && k == "fence")
        .unwrap_or_else(|| panic!("no fence of epoch {newer} in {log:?}"));
    assert_eq!(
        log.iter().find(|(_, e, _)| *e == newer),
        Some(fence),
        "the first record of epoch {newer} is not its fence: {log:?}"
    );
    if let Some(late) = log.iter().find(|(n, e, _)| *e <= older && *n > fence.0) {
        panic!(
            "generation {} of epoch {} follows the fence {} of epoch {newer}: {log:?}",
            late.0, late.1, fence.0
        );
    }
    assert!(
        log.iter().any(|(_, e, k)| *e == older && k == "fence"),
        "no fence of epoch {older} in {log:?}"
    );
}

fn lease_status(ws: &Workspace) -> serde_json::Value {
    ws.status_json(false)["sync"].clone()
}

/// Removes a file when dropped (a partition must not outlive its test, or the unmount of the
/// partitioned node at the end would have to wait for the store).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Kills a child process when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// ---- 1. Mutual exclusion -----------------------------------------------------------------

#[test]
fn mutual_exclusion_and_handoff_file() {
    if skip_fuse() {
        return;
    }
    mutual_exclusion_and_handoff(&TestStore::file());
}

#[test]
fn mutual_exclusion_and_handoff_seaweedfs() {
    if skip_fuse() {
        return;
    }
    mutual_exclusion_and_handoff(&TestStore::seaweed("owsfs-leases"));
}

/// Node B cannot mount while A holds the lease (the error names A); once A unmounts, B
/// mounts at once, without flags, and sees everything A wrote.
fn mutual_exclusion_and_handoff(store: &TestStore) {
    let a = store.workspace("excl", &[]);
    let b = store.workspace("excl", &[]);
    a.mount();
    for d in ["src/lib", "docs/deep/er", "data"] {
        std::fs::create_dir_all(a.path(d)).unwrap();
    }
    std::fs::write(a.path("README"), b"owsfs lease test\n").unwrap();
    std::fs::write(a.path("src/main.rs"), b"fn main() {}\n").unwrap();
    std::fs::write(a.path("src/lib/mod.rs"), b"pub mod x;\n".repeat(50)).unwrap();
    std::fs::write(a.path("big.bin"), noise(300_000, 3)).unwrap();
    std::os::unix::fs::symlink("README", a.path("link")).unwrap();
    sql_insert(&a.path("data/app.db"), &(1..=50).collect::<Vec<_>>(), "a");
    a.sync();
    // After the sync: these go to the store only with A's last cut at unmount.
    std::fs::write(a.path("docs/deep/er/notes.md"), b"# notes\n").unwrap();
    sql_insert(&a.path("data/app.db"), &(51..=80).collect::<Vec<_>>(), "b");
    append(&a.path("README"), "appended\n").unwrap();

    let out = b.try_mount();
    let err = stderr(&out);
    eprintln!("refused mount: {}", err.trim());
    assert!(
        !out.status.success(),
        "B mounted a workspace A holds{}",
        b.log_tail()
    );
    assert!(!is_mounted(&b.mp), "the refused mount left a mount behind");
    let a_id = node_id(&a);
    assert_eq!(a_id.len(), 16, "node id {a_id:?}");
    assert!(
        err.contains(&format!("node {a_id}")),
        "the error does not name A's node id {a_id}: {err}"
    );
    assert!(
        err.contains(&format!("host {}", hostname())),
        "the error does not name the host {}: {err}",
        hostname()
    );
    assert!(
        err.contains("--wait") && err.contains("--steal"),
        "the error does not mention --wait / --steal: {err}"
    );
    // A is untouched by the attempt.
    std::fs::write(a.path("after-refusal.txt"), b"A still writes\n").unwrap();

    let want = tree(&a.mp);
    let a_epoch = lease_status(&a)["lease"]["epoch"].as_u64().unwrap();
    let t0 = Instant::now();
    a.unmount();
    b.mount();
    eprintln!("handoff A → B: {:?}", t0.elapsed());
    let got = tree(&b.mp);
    assert_same_tree(&got, &want, "B after the handoff");
    let s = lease_status(&b);
    assert_eq!(s["lease"]["state"], "held", "{s}");
    assert_eq!(s["lease"]["node"].as_str(), Some(node_id(&b).as_str()));
    let b_epoch = s["lease"]["epoch"].as_u64().unwrap();
    let (integrity, rows) = sql_check(&b.path("data/app.db"), true);
    assert_eq!(integrity, "ok");
    assert_eq!(rows, (1..=80).collect::<Vec<_>>());
    // Now A is the one refused, naming B.
    let out = a.try_mount();
    let err = stderr(&out);
    assert!(!out.status.success(), "A mounted while B holds the lease");
    assert!(!is_mounted(&a.mp), "the refused mount left a mount behind");
    assert!(
        err.contains(&format!("node {}", node_id(&b))),
        "the error does not name B: {err}"
    );
    b.unmount();
    check_epoch_rule(&epochs(&b), a_epoch, b_epoch);
}

// ---- 2. Partition: fail-stop and fence -----------------------------------------------------

#[test]
fn partition_fail_stop_and_fence_file() {
    if skip_fuse() {
        return;
    }
    partition_fail_stop_and_fence(&TestStore::file(), Partition::Fail);
}

#[test]
fn partition_fail_stop_and_fence_seaweedfs() {
    if skip_fuse() {
        return;
    }
    partition_fail_stop_and_fence(&TestStore::seaweed("owsfs-leases"), Partition::Fail);
}

#[test]
fn partition_hang_fail_stop_and_fence_file() {
    if skip_fuse() {
        return;
    }
    partition_fail_stop_and_fence(&TestStore::file(), Partition::Hang);
}

#[test]
fn partition_hang_fail_stop_and_fence_seaweedfs() {
    if skip_fuse() {
        return;
    }
    partition_fail_stop_and_fence(&TestStore::seaweed("owsfs-leases"), Partition::Hang);
}

/// How the partitioned node's store requests behave.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Partition {
    /// Every request fails at once.
    Fail,
    /// Every request blocks until the partition heals (a black hole).
    Hang,
}

/// A partitioned holder stops writing (EROFS) before its lease can lapse, keeps serving
/// reads, and stays stopped after the partition heals; B steals the lapsed lease, and no
/// record of A's epoch follows B's fence (also once A's hung requests go through).
fn partition_fail_stop_and_fence(store: &TestStore, mode: Partition) {
    let mut a = store.workspace("part", &["--lease-ttl", "2s", "--commit-interval", "200ms"]);
    let work = tempfile::Builder::new()
        .prefix("owsfs-partition-")
        .tempdir()
        .unwrap();
    let partition = work.path().join("partition");
    a.env.push((
        "OWSFS_FAULTS".into(),
        format!("partition={}", partition.display()),
    ));
    a.mount();
    // Declared after A: dropped (the partition healed) before A is unmounted.
    let _heal = RemoveOnDrop(partition.clone());
    std::fs::create_dir(a.path("d")).unwrap();
    std::fs::write(a.path("d/synced.txt"), b"synced before the partition\n").unwrap();
    std::fs::write(a.path("big.bin"), noise(200_000, 9)).unwrap();
    a.sync();
    let synced = tree(&a.mp);
    let a_status = lease_status(&a);
    assert_eq!(a_status["lease"]["state"], "held", "{a_status}");
    let a_epoch = a_status["lease"]["epoch"].as_u64().unwrap();

    let content: &[u8] = match mode {
        Partition::Fail => b"fail",
        Partition::Hang => b"hang",
    };
    std::fs::write(&partition, content).unwrap();
    let t0 = Instant::now();
    let mut ok_writes = 0u64;
    let refused = loop {
        match append(&a.path("during.log"), &format!("line {ok_writes}\n")) {
            Ok(()) => ok_writes += 1,
            Err(e) if e.raw_os_error() == Some(libc::EROFS) => break e,
            Err(e) => panic!(
                "write {ok_writes} after the partition failed with {e}, not EROFS{}",
                a.log_tail()
            ),
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "writes still succeed 120 s into the partition{}",
            a.log_tail()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!(
        "partition ({mode:?}): {ok_writes} writes went through, then EROFS after {:?}: {refused}",
        t0.elapsed()
    );
    // Reads go on: what was synced and what was written locally since.
    assert_eq!(
        std::fs::read(a.path("d/synced.txt")).unwrap(),
        b"synced before the partition\n"
    );
    let during = std::fs::read_to_string(a.path("during.log")).unwrap_or_default();
    assert_eq!(during.lines().count() as u64, ok_writes, "{during}");
    assert_eq!(std::fs::read_dir(a.path("d")).unwrap().count(), 1);
    let err = std::fs::write(a.path("d/new.txt"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "create: {err}");
    let err = std::fs::create_dir(a.path("newdir")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "mkdir: {err}");
    let s = lease_status(&a);
    assert_eq!(s["lease"]["state"], "lost", "{s}");
    assert!(
        s["lease"]["lost"].as_str().is_some_and(|r| !r.is_empty()),
        "no reason in sync.lease.lost: {s}"
    );
    assert!(
        s["writes_stopped"].as_str().is_some_and(|r| !r.is_empty()),
        "no reason in sync.writes_stopped: {s}"
    );
    eprintln!(
        "lost: {}; writes_stopped: {}",
        s["lease"]["lost"], s["writes_stopped"]
    );

    // B waits until A's lease has lapsed (A cannot renew it) and takes it.
    let b = store.workspace("part", &["--steal", "--lease-ttl", "2s"]);
    let t1 = Instant::now();
    b.mount();
    eprintln!("B stole the lease after {:?}", t1.elapsed());
    let b_epoch = lease_status(&b)["lease"]["epoch"].as_u64().unwrap();
    assert!(b_epoch > a_epoch, "B's epoch {b_epoch}, A's {a_epoch}");
    // B sees exactly what A made durable: nothing A wrote during the partition.
    assert_same_tree(&tree(&b.mp), &synced, "B after stealing the lease");
    std::fs::write(b.path("from-b.txt"), b"written by B\n").unwrap();
    append(&b.path("d/synced.txt"), "B was here\n").unwrap();
    b.sync();

    // The partition heals: A stays stopped, and nothing of A's reaches the store.
    std::fs::remove_file(&partition).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let err = append(&a.path("during.log"), "after the heal\n").unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(libc::EROFS),
        "A writes after the heal: {err}"
    );
    let s = lease_status(&a);
    assert_eq!(s["lease"]["state"], "lost", "{s}");
    assert_eq!(
        std::fs::read(a.path("d/synced.txt")).unwrap(),
        b"synced before the partition\n",
        "A reads after the heal"
    );
    let log = epochs(&b);
    eprintln!("log: {log:?}");
    check_epoch_rule(&log, a_epoch, b_epoch);

    // A was fenced: its unmount may say so, but the mount must go.
    let out = owsfs(&["unmount", &a.mp.to_string_lossy()]);
    eprintln!(
        "unmount of the fenced node: {} {}",
        out.status,
        stderr(&out).trim()
    );
    assert!(!is_mounted(&a.mp), "A is still mounted after its unmount");
    check_epoch_rule(&epochs(&b), a_epoch, b_epoch);
    let b_tree = tree(&b.mp);
    b.unmount();
    check_epoch_rule(&epochs(&b), a_epoch, b_epoch);
    // A fresh node sees B's state, not A's unsynced writes.
    let c = store.workspace("part", &[]);
    c.mount();
    assert_same_tree(&tree(&c.mp), &b_tree, "a fresh node after the fence");
    c.unmount();

    // A's own cache, mounted again (the store reachable): B's state, with A's writes of the
    // partition set aside, never merged.
    let out = owsfs(&["journal", "--json", "--cache", &a.cache.to_string_lossy()]);
    assert!(out.status.success(), "owsfs journal: {}", stderr(&out));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("journal json");
    let dirty = j["dirty"]["files"]
        .as_object()
        .is_some_and(|f| !f.is_empty());
    a.env.retain(|(k, _)| k != "OWSFS_FAULTS");
    let out = a.try_mount();
    assert!(
        out.status.success(),
        "A's cache cannot mount again: {}{}",
        stderr(&out),
        a.log_tail()
    );
    eprintln!(
        "A's journal dirty: {dirty}; remount: {}",
        stderr(&out).trim()
    );
    assert_same_tree(&tree(&a.mp), &b_tree, "A's cache after the fence");
    let aside = std::fs::read_dir(a.cache.join("aside")).map_or(0, |d| d.count());
    assert_eq!(
        aside,
        usize::from(dirty),
        "A's unsynced writes of the partition set aside (dirty: {dirty})"
    );
    a.unmount();
    check_epoch_rule(&epochs(&a), a_epoch, b_epoch);
}

// ---- 3. Crash takeover ---------------------------------------------------------------------

#[test]
fn crash_takeover_with_force_file() {
    if skip_fuse() {
        return;
    }
    crash_takeover_with_force(&TestStore::file());
}

#[test]
fn crash_takeover_with_force_seaweedfs() {
    if skip_fuse() {
        return;
    }
    crash_takeover_with_force(&TestStore::seaweed("owsfs-leases"));
}

/// `kill -9` of the holder in the middle of a SQLite workload: `--steal --force` on another
/// node takes over at once and serves exactly the newest commit, with an intact database.
fn crash_takeover_with_force(store: &TestStore) {
    let a = store.workspace("crash", &["--commit-interval", "200ms"]);
    a.mount();
    let a_epoch = lease_status(&a)["lease"]["epoch"].as_u64().unwrap();
    let workload = Command::new("python3")
        .args(["-c", WORKLOAD])
        .arg(&a.mp)
        .arg("100000")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the workload");
    let mut workload = KillOnDrop(workload);
    let reached = |k: u64| {
        let p = a.path(&format!("files/{k}.done"));
        wait_for(Duration::from_secs(120), || p.exists())
    };
    assert!(reached(20), "the workload did not reach 20{}", a.log_tail());
    let g1 = a.sync();
    assert!(reached(40), "the workload did not reach 40{}", a.log_tail());
    let g2 = a.sync();
    assert!(g2 > g1);
    assert!(reached(60), "the workload did not reach 60{}", a.log_tail());
    a.kill_daemon();
    let _ = workload.0.kill();
    let status = workload.0.wait().unwrap();
    eprintln!("workload ended: {status}");

    let b = store.workspace("crash", &["--steal", "--force"]);
    let t0 = Instant::now();
    b.mount();
    eprintln!("forced takeover: {:?}", t0.elapsed());
    let b_epoch = lease_status(&b)["lease"]["epoch"].as_u64().unwrap();
    let got = tree(&b.mp);

    let work = tempfile::Builder::new()
        .prefix("owsfs-crash-")
        .tempdir()
        .unwrap();
    let dest = work.path().join("restore");
    let out = b.restore(None, &dest);
    assert!(out.status.success(), "owsfs restore: {}", stderr(&out));
    let restored_gen: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("restored generation number");
    assert!(restored_gen >= g2, "restored {restored_gen}, synced {g2}");
    assert_same_tree(&got, &tree(&dest), "B vs the newest commit");

    // The database, as B serves it, is intact and holds at least what was synced.
    let db_copy = work.path().join("db");
    std::fs::create_dir(&db_copy).unwrap();
    for f in ["app.db", "app.db-wal"] {
        if b.path(f).exists() {
            std::fs::copy(b.path(f), db_copy.join(f)).unwrap();
        }
    }
    let (integrity, rows) = sql_check(&db_copy.join("app.db"), false);
    assert_eq!(integrity, "ok", "integrity_check of B's app.db");
    let m = rows.len() as u64;
    assert_eq!(rows, (1..=m).collect::<Vec<_>>(), "rows are not 1..={m}");
    assert!(m >= 40, "only {m} rows, but row 40 was synced");
    eprintln!("B serves generation {restored_gen} with {m} rows");

    let log = epochs(&b);
    check_epoch_rule(&log, a_epoch, b_epoch);

    // B commits on top; then the crashed node's own cache mounts again (B handed off). A's
    // changes that never reached the store are not merged into B's: A shows B's state, and
    // they are set aside in A's cache, if there were any.
    std::fs::write(b.path("from-b.txt"), b"written by B after the takeover\n").unwrap();
    b.sync();
    let b_tree = tree(&b.mp);
    b.unmount();
    check_epoch_rule(&epochs(&b), a_epoch, b_epoch);

    let out = owsfs(&["journal", "--json", "--cache", &a.cache.to_string_lossy()]);
    assert!(out.status.success(), "owsfs journal: {}", stderr(&out));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("journal json");
    let dirty = j["dirty"]["files"]
        .as_object()
        .is_some_and(|f| !f.is_empty())
        || j["dirty"]["dirs"].as_array().is_some_and(|d| !d.is_empty());
    let out = a.try_mount();
    let notice = stderr(&out);
    assert!(
        out.status.success(),
        "the crashed node's cache cannot mount after the handoff: {notice}{}",
        a.log_tail()
    );
    eprintln!("A's journal dirty: {dirty}; A's remount: {}", notice.trim());
    assert_same_tree(&tree(&a.mp), &b_tree, "the crashed node after B's handoff");
    let aside: Vec<PathBuf> = std::fs::read_dir(a.cache.join("aside"))
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    if dirty {
        assert_eq!(
            aside.len(),
            1,
            "A's unsynced changes were not set aside: {aside:?}"
        );
        assert!(aside[0].join("aside.json").exists(), "{aside:?}");
        assert!(
            notice.contains("set aside"),
            "no notice of the set-aside: {notice}"
        );
    } else {
        assert!(aside.is_empty(), "a clean journal was set aside: {aside:?}");
    }
    let c_epoch = lease_status(&a)["lease"]["epoch"].as_u64().unwrap();
    a.unmount();
    let log = epochs(&a);
    check_epoch_rule(&log, a_epoch, b_epoch);
    check_epoch_rule(&log, b_epoch, c_epoch);
    assert_same_tree(
        &{
            let dest = work.path().join("final");
            let out = a.restore(None, &dest);
            assert!(out.status.success(), "owsfs restore: {}", stderr(&out));
            tree(&dest)
        },
        &b_tree,
        "the newest commit after A's remount",
    );
}

// ---- 4. Handoff loop -----------------------------------------------------------------------

#[test]
fn handoff_loop_loses_nothing_file() {
    if skip_fuse() {
        return;
    }
    handoff_loop_loses_nothing(&TestStore::file(), "file");
}

#[test]
fn handoff_loop_loses_nothing_seaweedfs() {
    if skip_fuse() {
        return;
    }
    handoff_loop_loses_nothing(&TestStore::seaweed("owsfs-leases"), "seaweedfs");
}

const HANDOFFS: usize = 20;

/// 20 handoffs between two nodes, each after the holder appended to files and a table: the
/// new holder always sees the old holder's last state. Prints the pauses (from the start of
/// the old node's unmount to the first read on the new node).
fn handoff_loop_loses_nothing(store: &TestStore, what: &str) {
    let nodes = [store.workspace("loop", &[]), store.workspace("loop", &[])];
    nodes[0].mount();
    std::fs::create_dir(nodes[0].path("logs")).unwrap();
    std::fs::write(nodes[0].path("logs/handoffs.log"), b"").unwrap();
    let mut pauses = Vec::new();
    let mut holder = 0;
    for i in 0..HANDOFFS {
        let cur = &nodes[holder];
        let next = &nodes[1 - holder];
        append(
            &cur.path("logs/handoffs.log"),
            &format!("handoff {i} from node {holder}\n"),
        )
        .unwrap();
        append(
            &cur.path(&format!("logs/{}.txt", i % 3)),
            &format!("{i}\n").repeat(i + 1),
        )
        .unwrap();
        std::fs::write(
            cur.path(&format!("blob-{}", i % 4)),
            noise(20_000, i as u64),
        )
        .unwrap();
        sql_insert(&cur.path("app.db"), &[i as u64 + 1], &format!("n{holder}"));
        let want = tree(&cur.mp);

        let t0 = Instant::now();
        cur.unmount();
        next.mount();
        let first = std::fs::read(next.path("logs/handoffs.log")).unwrap();
        let pause = t0.elapsed();
        pauses.push(pause);
        assert!(
            first.ends_with(format!("handoff {i} from node {holder}\n").as_bytes()),
            "handoff {i}: the first read on node {} does not show the last append",
            1 - holder
        );
        assert_same_tree(&tree(&next.mp), &want, &format!("handoff {i}"));
        holder = 1 - holder;
    }
    let last = &nodes[holder];
    let (integrity, rows) = sql_check(&last.path("app.db"), true);
    assert_eq!(integrity, "ok");
    assert_eq!(rows, (1..=HANDOFFS as u64).collect::<Vec<_>>());
    last.unmount();

    let log = epochs(last);
    for w in log.windows(2) {
        assert!(w[1].1 >= w[0].1, "epochs go down: {log:?}");
    }
    let fences = log.iter().filter(|r| r.2 == "fence").count();
    assert_eq!(fences, HANDOFFS + 1, "one fence per mount: {log:?}");

    let mut ms: Vec<u128> = pauses.iter().map(Duration::as_millis).collect();
    ms.sort();
    let pct = |p: usize| ms[(ms.len() * p / 100).min(ms.len() - 1)];
    println!(
        "HANDOFF_PAUSE_MS store={what} n={} p50={} p90={} max={} all={ms:?}",
        ms.len(),
        pct(50),
        pct(90),
        ms[ms.len() - 1]
    );
}

// ---- 5. Bad input --------------------------------------------------------------------------

/// (name, contents) of every lease object of `ws` in a `file://` store.
fn lease_objects(root: &Path, ws: &str) -> Vec<(String, Vec<u8>)> {
    let dir = root.join(format!("workspaces/{ws}/lease"));
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

/// A malformed newest lease object: a mount fails naming it and saying what to do, and no
/// lease object is written; `--steal --force` takes the lease over it, at an epoch above any
/// it could have held, and the workspace's data is intact.
#[test]
fn malformed_lease_object_is_refused_and_named() {
    if skip_fuse() {
        return;
    }
    let store = TestStore::file();
    let a = store.workspace("bad", &[]);
    a.mount();
    std::fs::write(a.path("f.txt"), b"kept\n").unwrap();
    a.unmount();
    for case in ["checksum", "garbage", "truncated"] {
        let before = lease_objects(&store.root(), "bad");
        let (newest_name, newest) = before.last().cloned().expect("a lease object");
        let newest_seq: u64 = newest_name.parse().expect("20-digit name");
        let text = String::from_utf8(newest).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(lines[0], "owsfs-lease 2");
        let epoch = |l: &str| -> u64 {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["epoch"].as_u64().unwrap()
        };
        let old_epoch = epoch(lines[1]);
        let next_key = format!("workspaces/bad/lease/{:020}", newest_seq + 1);
        let next_path = store.root().join(&next_key);
        // The next step of the lease, malformed in its own way.
        let content = match case {
            "checksum" => {
                let changed = lines[1].replacen("\"state\":\"released\"", "\"state\":\"held\"", 1);
                assert_ne!(changed, lines[1], "{text}");
                format!("{}\n{}\n{}\n", lines[0], changed, lines[2])
            }
            "garbage" => "owsfs-lease 2\n{}\nbad\n".to_string(),
            _ => text[..text.len() / 2].to_string(),
        };
        std::fs::write(&next_path, &content).unwrap();
        let listed = lease_objects(&store.root(), "bad");
        for who in [
            "a fresh node",
            "the last holder",
            "a fresh node with --steal",
        ] {
            let ws = match who {
                "the last holder" => {
                    let mut w = store.workspace("bad", &[]);
                    w.cache = a.cache.clone();
                    w
                }
                "a fresh node with --steal" => store.workspace("bad", &["--steal"]),
                _ => store.workspace("bad", &[]),
            };
            let out = ws.try_mount();
            let err = stderr(&out);
            eprintln!("{case}, {who}: {}", err.trim());
            assert!(
                !out.status.success(),
                "{case}: {who} mounted over a malformed lease object{}",
                ws.log_tail()
            );
            assert!(!is_mounted(&ws.mp), "{case}: {who}: a mount was left");
            assert!(
                err.contains(&next_key) && err.contains("--steal --force"),
                "{case}: {who}: the error does not name {next_key} and the way out: {err}"
            );
            assert_eq!(
                lease_objects(&store.root(), "bad"),
                listed,
                "{case}: {who}: the lease objects changed"
            );
        }
        // --steal --force takes it over the damaged step, two epochs above the step before.
        let mut f = store.workspace("bad", &["--steal", "--force"]);
        f.cache = a.cache.clone();
        f.mount();
        assert_eq!(std::fs::read(f.path("f.txt")).unwrap(), b"kept\n", "{case}");
        let after = lease_objects(&store.root(), "bad");
        let (taken_name, taken) = after
            .iter()
            .find(|(n, _)| n.parse::<u64>().unwrap() == newest_seq + 2)
            .cloned()
            .unwrap_or_else(|| panic!("{case}: no lease step above the damaged one: {after:?}"));
        let taken = String::from_utf8(taken).unwrap();
        assert!(
            epoch(taken.lines().nth(1).unwrap()) >= old_epoch + 2,
            "{case}: step {taken_name} took epoch {taken} after epoch {old_epoch}"
        );
        assert!(
            f.log_tail().contains("is damaged"),
            "{case}{}",
            f.log_tail()
        );
        f.unmount();
    }
}

/// Two caches with one node id: the second cannot take the lease the first holds and renews.
#[test]
fn node_id_clash_is_refused() {
    if skip_fuse() {
        return;
    }
    let store = TestStore::file();
    let a = store.workspace("clash", &["--lease-ttl", "2s"]);
    a.mount();
    std::fs::write(a.path("a.txt"), b"A\n").unwrap();
    // B's cache exists (made by a mount of another workspace), then gets A's node id.
    let mut b = store.workspace("other", &["--lease-ttl", "2s"]);
    b.mount();
    b.unmount();
    let a_id = node_id(&a);
    assert_ne!(node_id(&b), a_id, "two new caches got the same node id");
    std::fs::write(b.cache.join("node-id"), format!("{a_id}\n")).unwrap();
    b.name = "clash".into();
    let t0 = Instant::now();
    let out = b.try_mount();
    let err = stderr(&out);
    eprintln!("clash refused after {:?}: {}", t0.elapsed(), err.trim());
    assert!(
        !out.status.success(),
        "a cache with A's node id mounted A's workspace{}",
        b.log_tail()
    );
    assert!(!is_mounted(&b.mp), "the refused mount left a mount behind");
    assert!(
        err.contains("same node id"),
        "the error does not mention the same node id: {err}"
    );
    // A was not disturbed.
    let s = lease_status(&a);
    assert_eq!(s["lease"]["state"], "held", "{s}");
    assert!(s["writes_stopped"].is_null(), "{s}");
    std::fs::write(a.path("a2.txt"), b"A again\n").unwrap();
    a.sync();
    a.unmount();
}

// ---- 6. Same-cache remount after kill -9 ----------------------------------------------------

/// After `kill -9` of the holder, another node is refused (the lease has not lapsed), but a
/// remount of the same cache takes the lease over at once, without flags or waiting.
#[test]
fn same_cache_remount_after_kill_takes_over() {
    if skip_fuse() {
        return;
    }
    let store = TestStore::file();
    // A TTL far longer than the test: only the same-cache rule can let the remount in.
    let a = store.workspace("samecache", &["--lease-ttl", "1h"]);
    a.mount();
    std::fs::write(a.path("synced.txt"), b"synced\n").unwrap();
    a.sync();
    std::fs::write(a.path("unsynced.txt"), b"in the journal only\n").unwrap();
    let a_epoch = lease_status(&a)["lease"]["epoch"].as_u64().unwrap();
    a.kill_daemon();

    let other = store.workspace("samecache", &[]);
    let out = other.try_mount();
    assert!(
        !out.status.success(),
        "another node mounted while the dead holder's lease is held"
    );
    assert!(!is_mounted(&other.mp));
    assert!(
        stderr(&out).contains(&format!("node {}", node_id(&a))),
        "{}",
        stderr(&out)
    );

    let t0 = Instant::now();
    let out = a.try_mount();
    eprintln!(
        "same-cache remount: {:?}: {}",
        t0.elapsed(),
        stderr(&out).trim()
    );
    assert!(
        out.status.success(),
        "the same cache could not remount: {}{}",
        stderr(&out),
        a.log_tail()
    );
    assert!(is_mounted(&a.mp));
    let log = std::fs::read_to_string(a.cache.join("owsfs.log")).unwrap_or_default();
    assert!(
        log.contains("held by an earlier mount of this cache"),
        "the daemon log does not show a same-cache takeover{}",
        a.log_tail()
    );
    assert!(
        !log.contains("waiting up to"),
        "the remount waited for its own dead lease to lapse{}",
        a.log_tail()
    );
    let b_epoch = lease_status(&a)["lease"]["epoch"].as_u64().unwrap();
    assert!(b_epoch > a_epoch, "epoch {b_epoch} after {a_epoch}");
    assert_eq!(std::fs::read(a.path("synced.txt")).unwrap(), b"synced\n");
    assert_eq!(
        std::fs::read(a.path("unsynced.txt")).unwrap(),
        b"in the journal only\n",
        "the journal of the killed mount was not replayed"
    );
    a.sync();
    a.unmount();
    check_epoch_rule(&epochs(&a), a_epoch, b_epoch);
}

// ---- 7. --wait and --steal against a live holder --------------------------------------------

/// `--steal` gives up while the holder keeps renewing; `--wait` waits for the holder's
/// unmount (a release) and then for a dead holder's lease to lapse.
#[test]
fn wait_for_release_or_lapse_and_steal_refused_while_renewed() {
    if skip_fuse() {
        return;
    }
    let store = TestStore::file();
    let a = store.workspace("waiting", &["--lease-ttl", "2s"]);
    a.mount();
    std::fs::write(a.path("a.txt"), b"from A\n").unwrap();

    let thief = store.workspace("waiting", &["--steal", "--lease-ttl", "2s"]);
    let t0 = Instant::now();
    let out = thief.try_mount();
    let err = stderr(&out);
    eprintln!(
        "--steal against a live holder, after {:?}: {}",
        t0.elapsed(),
        err.trim()
    );
    assert!(
        !out.status.success(),
        "--steal took a lease that is renewed"
    );
    assert!(!is_mounted(&thief.mp));
    assert!(err.contains("renewed"), "{err}");
    let s = lease_status(&a);
    assert_eq!(s["lease"]["state"], "held", "A after the failed steal: {s}");
    assert!(s["writes_stopped"].is_null(), "{s}");

    // --wait: mounts once A unmounts, not before. Nothing in the scope may panic before A is
    // gone: the scope would wait for the waiting mount forever.
    let b = store.workspace("waiting", &["--wait", "--lease-ttl", "2s"]);
    let a_pid = a.daemon_pid();
    let (early, wrote, unmounted, out) = std::thread::scope(|scope| {
        let waiter = scope.spawn(|| b.try_mount());
        std::thread::sleep(Duration::from_secs(3));
        let early = (waiter.is_finished(), is_mounted(&b.mp));
        let wrote = std::fs::write(a.path("a2.txt"), b"A, while B waits\n");
        let un = owsfs(&["unmount", &a.mp.to_string_lossy()]);
        if is_mounted(&a.mp) {
            // Let A's lease lapse so the waiting mount ends.
            kill_9_node(a_pid);
        }
        (early, wrote, un, waiter.join().expect("the waiting mount"))
    });
    assert_eq!(
        early,
        (false, false),
        "(--wait returned, B mounted) while A holds the lease"
    );
    wrote.expect("A writes while B waits");
    assert!(
        unmounted.status.success(),
        "A's unmount: {}",
        stderr(&unmounted)
    );
    assert!(!is_mounted(&a.mp));
    assert!(
        out.status.success(),
        "--wait failed after A's release: {}{}",
        stderr(&out),
        b.log_tail()
    );
    assert!(is_mounted(&b.mp));
    assert_eq!(
        std::fs::read(b.path("a2.txt")).unwrap(),
        b"A, while B waits\n"
    );
    std::fs::write(b.path("b.txt"), b"from B\n").unwrap();
    b.sync();
    let want = tree(&b.mp);

    // --wait for a dead holder: its lease lapses after its TTL.
    b.kill_daemon();
    let c = store.workspace("waiting", &["--wait"]);
    let t1 = Instant::now();
    let out = c.try_mount();
    eprintln!(
        "--wait for a dead holder: {:?}: {}",
        t1.elapsed(),
        stderr(&out).trim()
    );
    assert!(
        out.status.success(),
        "--wait failed for a dead holder: {}{}",
        stderr(&out),
        c.log_tail()
    );
    assert_same_tree(&tree(&c.mp), &want, "C after B died");
    c.unmount();
    let log = epochs(&c);
    for w in log.windows(2) {
        assert!(w[1].1 >= w[0].1, "epochs go down: {log:?}");
    }
    assert_eq!(
        log.iter().filter(|r| r.2 == "fence").count(),
        3,
        "one fence per mount: {log:?}"
    );
}

// ---- 8. Forced takeover of a live holder ---------------------------------------------------

#[test]
fn forced_takeover_fences_a_live_holder_file() {
    if skip_fuse() {
        return;
    }
    forced_takeover_fences_a_live_holder(&TestStore::file());
}

#[test]
fn forced_takeover_fences_a_live_holder_seaweedfs() {
    if skip_fuse() {
        return;
    }
    forced_takeover_fences_a_live_holder(&TestStore::seaweed("owsfs-leases"));
}

/// `--steal --force` against a holder that is alive (the operator was wrong): the holder
/// finds its lease or its next generation slot taken and stops writing; none of its commits
/// follows the new holder's fence, and the new holder starts from the old one's last commit.
fn forced_takeover_fences_a_live_holder(store: &TestStore) {
    let a = store.workspace(
        "forced",
        &["--lease-ttl", "2s", "--commit-interval", "50ms"],
    );
    a.mount();
    let a_epoch = lease_status(&a)["lease"]["epoch"].as_u64().unwrap();
    std::fs::create_dir(a.path("w")).unwrap();
    a.sync();
    let b = store.workspace("forced", &["--steal", "--force", "--lease-ttl", "2s"]);
    // A writes (and its agent commits) without pause until it is stopped.
    let (written, b_tree) = std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            let mut i = 0u64;
            let t0 = Instant::now();
            loop {
                let r = append(&a.path("w/log"), &format!("line {i}\n"))
                    .and_then(|()| std::fs::write(a.path(&format!("w/{}", i % 10)), i.to_string()));
                match r {
                    Ok(()) => i += 1,
                    Err(e) => return (i, Some(e)),
                }
                if t0.elapsed() > Duration::from_secs(120) {
                    return (i, None);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        // Let a few commits through first.
        let start = a.status_json(false)["sync"]["commits"].as_u64().unwrap();
        wait_for(Duration::from_secs(60), || {
            a.status_json(false)["sync"]["commits"].as_u64().unwrap() >= start + 3
        });
        let out = b.try_mount();
        let b_tree = out.status.success().then(|| tree(&b.mp));
        let (n, err) = writer.join().unwrap();
        assert!(
            out.status.success(),
            "--steal --force failed: {}{}",
            stderr(&out),
            b.log_tail()
        );
        let err = err.unwrap_or_else(|| panic!("A still writes 120 s after the takeover"));
        assert_eq!(
            err.raw_os_error(),
            Some(libc::EROFS),
            "A's write {n} failed with {err}, not EROFS{}",
            a.log_tail()
        );
        (n, b_tree.unwrap())
    });
    let s = lease_status(&a);
    eprintln!(
        "A wrote {written} times; lost: {}; writes_stopped: {}",
        s["lease"]["lost"], s["writes_stopped"]
    );
    assert_eq!(s["lease"]["state"], "lost", "{s}");
    assert!(s["writes_stopped"].as_str().is_some(), "{s}");
    let b_epoch = lease_status(&b)["lease"]["epoch"].as_u64().unwrap();
    let log = epochs(&b);
    eprintln!("log: {log:?}");
    check_epoch_rule(&log, a_epoch, b_epoch);

    // B started from A's last commit (the newest record of A's epoch before B's fence).
    let last_a = log
        .iter()
        .filter(|(_, e, k)| *e == a_epoch && k == "commit")
        .map(|r| r.0)
        .max()
        .expect("a commit of A");
    let work = tempfile::Builder::new()
        .prefix("owsfs-forced-")
        .tempdir()
        .unwrap();
    let dest = work.path().join("last-a");
    let out = b.restore(Some(last_a), &dest);
    assert!(out.status.success(), "owsfs restore: {}", stderr(&out));
    assert_same_tree(&b_tree, &tree(&dest), "B at its mount vs A's last commit");

    std::fs::write(b.path("w/from-b"), b"B\n").unwrap();
    b.sync();
    let out = owsfs(&["unmount", &a.mp.to_string_lossy()]);
    eprintln!(
        "unmount of the fenced node: {} {}",
        out.status,
        stderr(&out).trim()
    );
    assert!(!is_mounted(&a.mp), "A is still mounted after its unmount");
    let want = tree(&b.mp);
    b.unmount();
    check_epoch_rule(&epochs(&b), a_epoch, b_epoch);
    let c = store.workspace("forced", &[]);
    c.mount();
    assert_same_tree(
        &tree(&c.mp),
        &want,
        "a fresh node after the forced takeover",
    );
    c.unmount();
}

/// After a fail-stop, writes fail at once with EROFS even when the unsynced changes are older
/// than `--max-lag` (backpressure would otherwise wait forever for an upload that will not
/// come), so a writer never hangs on a stopped mount.
#[test]
fn a_stopped_mount_never_makes_writers_wait() {
    if skip_fuse() {
        return;
    }
    let store = TestStore::file();
    let mut a = store.workspace(
        "stuck",
        &[
            "--lease-ttl",
            "2s",
            "--max-lag",
            "500ms",
            "--max-lag-bytes",
            "64KiB",
        ],
    );
    let part = a.cache.with_file_name("partition");
    a.env.push((
        "OWSFS_FAULTS".into(),
        format!("partition={}", part.display()),
    ));
    a.mount();
    std::fs::write(a.path("before"), b"synced").unwrap();
    a.sync();
    let _heal = RemoveOnDrop(part.clone());
    std::fs::write(&part, b"").unwrap();
    // Unsynced bytes over the byte bound, then wait for the fail-stop.
    let _ = std::fs::write(a.path("big"), vec![7u8; 256 << 10]);
    assert!(
        wait_for(
            Duration::from_secs(30),
            || lease_status(&a)["lease"]["state"] == "lost"
        ),
        "no fail-stop{}",
        a.log_tail()
    );
    std::thread::sleep(Duration::from_secs(1));
    // Each write runs on a thread: one that hangs fails the test instead of the suite.
    for what in ["append", "truncate"] {
        let path = a.path("before");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let r = match what {
                "append" => append(&path, "more"),
                _ => std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .and_then(|f| f.set_len(1)),
            };
            let _ = tx.send(r);
        });
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(Err(e)) => assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{what}: {e}"),
            Ok(Ok(())) => panic!("{what} on a stopped mount succeeded"),
            Err(_) => panic!("{what} on a stopped mount hangs{}", a.log_tail()),
        }
    }
    assert_eq!(std::fs::read(a.path("before")).unwrap(), b"synced");
    std::fs::remove_file(&part).unwrap();
    let out = a.owsfs(&["unmount", &a.mp.to_string_lossy()]);
    assert!(!is_mounted(&a.mp), "{}", stderr(&out));
}

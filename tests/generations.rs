//! Generations, end to end on a real mount: every generation a running workload leaves in the
//! store is a consistent prefix of it, and what `owsfs sync` (or a cut) made durable survives a
//! `kill -9` of the daemon. Each test runs against a `file://` store and a real S3 server
//! (SeaweedFS on loopback).

mod common;

#[path = "../testkit/seaweed.rs"]
mod seaweed;
#[path = "common/stores.rs"]
mod stores;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use stores::TestStore;

/// Loops k = 1..=N: an SQLite (WAL) commit of row k, then `files/k`, then `files/k.tmp`
/// renamed to `files/k.done`. Small WAL autocheckpoint so checkpoints happen during the run.
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
    time.sleep(0.04)
db.close()
"#;

/// Opens a restored database and prints `integrity_check` and the rows of t.
const CHECK_DB: &str = r#"
import json, os, sqlite3, sys
path = sys.argv[1]
if not os.path.exists(path):
    print(json.dumps({"integrity": "ok", "rows": None}))
    sys.exit(0)
db = sqlite3.connect(path)
integrity = [r[0] for r in db.execute("PRAGMA integrity_check")]
try:
    rows = [r[0] for r in db.execute("SELECT k FROM t ORDER BY k")]
except sqlite3.OperationalError as e:
    if "no such table" not in str(e):
        raise
    rows = None
print(json.dumps({"integrity": "\n".join(integrity), "rows": rows}))
"#;

const N: u64 = 150;

#[test]
fn consistency_every_generation_is_a_prefix_file() {
    if skip_fuse() {
        return;
    }
    consistency_every_generation_is_a_prefix(&TestStore::file());
}

#[test]
fn consistency_every_generation_is_a_prefix_seaweedfs() {
    if skip_fuse() {
        return;
    }
    consistency_every_generation_is_a_prefix(&TestStore::seaweed("owsfs-gens"));
}

/// What one restored generation holds, checked against the workload's order.
#[derive(Debug, PartialEq)]
struct Observed {
    /// Rows 1..=m.
    m: u64,
    /// files/1..=j.
    j: u64,
    /// files/1.done..=d.done.
    d: u64,
    /// files/k.tmp, if one is there.
    tmp: Option<u64>,
}

/// Checks that `dir` (a restored generation) is a state the workload passed through; returns
/// what it holds. `what` names the generation in messages.
fn check_prefix(dir: &Path, what: &str) -> Observed {
    let out = run_ok(
        Command::new("python3")
            .args(["-c", CHECK_DB])
            .arg(dir.join("app.db")),
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("check json");
    assert_eq!(v["integrity"], "ok", "{what}: integrity_check: {v}");
    let rows: Vec<u64> = v["rows"]
        .as_array()
        .map(|a| a.iter().map(|r| r.as_u64().unwrap()).collect())
        .unwrap_or_default();
    let m = rows.len() as u64;
    assert_eq!(
        rows,
        (1..=m).collect::<Vec<_>>(),
        "{what}: rows are not a prefix 1..=m"
    );

    let mut plain = Vec::new();
    let mut done = Vec::new();
    let mut tmp = Vec::new();
    let files = dir.join("files");
    let mut contents = BTreeMap::new();
    if files.exists() {
        for e in std::fs::read_dir(&files).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            let content = std::fs::read(e.path()).unwrap();
            let (list, num) = if let Some(n) = name.strip_suffix(".done") {
                (&mut done, n)
            } else if let Some(n) = name.strip_suffix(".tmp") {
                (&mut tmp, n)
            } else {
                (&mut plain, name.as_str())
            };
            let k: u64 = num
                .parse()
                .unwrap_or_else(|_| panic!("{what}: unexpected file files/{name}"));
            list.push(k);
            contents.insert(name.clone(), content);
        }
    }
    plain.sort();
    done.sort();
    let j = plain.len() as u64;
    let d = done.len() as u64;
    assert_eq!(
        plain,
        (1..=j).collect::<Vec<_>>(),
        "{what}: files/k not a prefix"
    );
    assert_eq!(
        done,
        (1..=d).collect::<Vec<_>>(),
        "{what}: files/k.done not a prefix"
    );
    // files/k present ⇒ row k present.
    assert!(j <= m, "{what}: files/{j} present but rows only up to {m}");
    // row k+1 present ⇒ files/k.done present.
    assert!(
        d + 1 >= m,
        "{what}: row {m} present but files/k.done only up to {d}"
    );
    assert!(d <= j, "{what}: files/{d}.done without files/{d}");
    assert!(j <= d + 1, "{what}: files/{j} but .done only up to {d}");
    // At most one temporary, the one in flight.
    assert!(tmp.len() <= 1, "{what}: leftover temporaries {tmp:?}");
    let tmp = tmp.first().copied();
    if let Some(k) = tmp {
        assert!(
            k == j && d + 1 == j,
            "{what}: files/{k}.tmp is not the one in flight (files up to {j}, done up to {d})"
        );
        let c = &contents[&format!("{k}.tmp")];
        assert!(
            format!("{k} done\n").as_bytes().starts_with(c),
            "{what}: files/{k}.tmp holds {c:?}"
        );
    }
    for k in 1..=j {
        let c = &contents[&k.to_string()];
        let want = format!("{k}\n");
        // The last one may have been cut between its create and its write.
        let ok = c == want.as_bytes() || (k == j && want.as_bytes().starts_with(c));
        assert!(ok, "{what}: files/{k} holds {c:?}");
    }
    for k in 1..=d {
        assert_eq!(
            contents[&format!("{k}.done")],
            format!("{k} done\n").as_bytes(),
            "{what}: files/{k}.done"
        );
    }
    Observed { m, j, d, tmp }
}

fn consistency_every_generation_is_a_prefix(store: &TestStore) {
    let ws = store.workspace("gens", &["--commit-interval", "100ms"]);
    ws.mount();
    let out = Command::new("python3")
        .args(["-c", WORKLOAD])
        .arg(&ws.mp)
        .arg(N.to_string())
        .stdin(Stdio::null())
        .output()
        .expect("run workload");
    assert!(
        out.status.success(),
        "workload failed: {}{}",
        String::from_utf8_lossy(&out.stderr),
        ws.log_tail()
    );
    let last = ws.sync();
    ws.unmount();

    let log = ws.log_json();
    let gens: Vec<u64> = log
        .iter()
        .filter(|r| r["kind"] == "commit")
        .map(|r| r["number"].as_u64().expect("number"))
        .collect();
    assert!(
        gens.len() >= 5,
        "only {} generations were cut during the workload: {gens:?}",
        gens.len()
    );
    assert!(
        gens.contains(&last),
        "generation {last} acknowledged by `owsfs sync` is not in the log: {gens:?}"
    );

    let work = tempfile::Builder::new()
        .prefix("owsfs-restores-")
        .tempdir()
        .unwrap();
    let mut previous: Option<Observed> = None;
    let mut mid_run = 0;
    for &g in &gens {
        let dest = work.path().join(g.to_string());
        let out = ws.restore(Some(g), &dest);
        assert!(
            out.status.success(),
            "owsfs restore --generation {g} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let o = check_prefix(&dest, &format!("generation {g}"));
        if o.m > 0 && o.m < N {
            mid_run += 1;
        }
        // Generations follow each other in time: each one is at least as far as the last.
        if let Some(p) = &previous {
            assert!(
                o.m >= p.m && o.j >= p.j && o.d >= p.d,
                "generation {g} ({o:?}) is behind the one before it ({p:?})"
            );
        }
        previous = Some(o);
    }
    assert!(
        mid_run >= 3,
        "only {mid_run} generations were cut in the middle of the workload"
    );
    let newest = previous.unwrap();
    assert_eq!(
        newest,
        Observed {
            m: N,
            j: N,
            d: N,
            tmp: None
        },
        "the newest generation holds the whole workload"
    );

    // The newest generation, mounted on a fresh cache, is what restore gives.
    let dest = work.path().join("newest");
    let out = ws.restore(None, &dest);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let restored = snapshot(&dest);
    let fresh = store.workspace("gens", &[]);
    fresh.mount();
    let mounted = snapshot(&fresh.mp);
    fresh.unmount();
    let keys = |m: &BTreeMap<String, Vec<u8>>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(
        keys(&mounted),
        keys(&restored),
        "fresh-cache mount and restore list different files"
    );
    for (k, v) in &restored {
        assert!(
            mounted[k] == *v,
            "{k} differs between the mount and restore"
        );
    }
    check_prefix(&dest, "restored newest generation");
}

#[test]
fn durability_after_sync_and_kill_9_file() {
    if skip_fuse() {
        return;
    }
    durability_after_sync_and_kill_9(&TestStore::file());
}

#[test]
fn durability_after_sync_and_kill_9_seaweedfs() {
    if skip_fuse() {
        return;
    }
    durability_after_sync_and_kill_9(&TestStore::seaweed("owsfs-gens"));
}

/// `owsfs sync`, then `kill -9`: a fresh cache gets the file. The commit interval is long, so
/// only the sync can have made it durable.
fn durability_after_sync_and_kill_9(store: &TestStore) {
    let ws = store.workspace("dur", &["--commit-interval", "1h"]);
    ws.mount();
    std::fs::create_dir(ws.path("d")).unwrap();
    std::fs::write(ws.path("d/synced.txt"), b"made durable by owsfs sync\n").unwrap();
    let g = ws.sync();
    assert!(g >= 1);
    ws.kill_daemon();

    let fresh = store.workspace("dur", &["--steal", "--force"]);
    fresh.mount();
    assert_eq!(
        std::fs::read(fresh.path("d/synced.txt")).unwrap_or_default(),
        b"made durable by owsfs sync\n",
        "the synced file on a fresh cache{}",
        fresh.log_tail()
    );
    fresh.unmount();
}

#[test]
fn durability_after_interval_cut_and_kill_9_file() {
    if skip_fuse() {
        return;
    }
    durability_after_interval_cut_and_kill_9(&TestStore::file());
}

#[test]
fn durability_after_interval_cut_and_kill_9_seaweedfs() {
    if skip_fuse() {
        return;
    }
    durability_after_interval_cut_and_kill_9(&TestStore::seaweed("owsfs-gens"));
}

/// No `owsfs sync`: the agent's own cut (every 200 ms) makes the write durable; once a
/// generation with it is in the store, `kill -9` loses nothing.
fn durability_after_interval_cut_and_kill_9(store: &TestStore) {
    let ws = store.workspace("dur2", &["--commit-interval", "200ms"]);
    ws.mount();
    let content = b"made durable by the agent's own cut\n".repeat(100);
    std::fs::write(ws.path("cut.txt"), &content).unwrap();
    let work = tempfile::Builder::new()
        .prefix("owsfs-restores-")
        .tempdir()
        .unwrap();
    let mut checked = std::collections::BTreeSet::new();
    let found = wait_for(Duration::from_secs(60), || {
        for r in ws.log_json() {
            let g = r["number"].as_u64().unwrap();
            if r["kind"] != "commit" || !checked.insert(g) {
                continue;
            }
            let dest = work.path().join(g.to_string());
            let out = ws.restore(Some(g), &dest);
            assert!(
                out.status.success(),
                "owsfs restore --generation {g}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            if std::fs::read(dest.join("cut.txt")).ok().as_deref() == Some(&content[..]) {
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        false
    });
    assert!(
        found,
        "no generation holds cut.txt within 60 s{}",
        ws.log_tail()
    );
    ws.kill_daemon();

    let fresh = store.workspace("dur2", &["--steal", "--force"]);
    fresh.mount();
    assert_eq!(
        std::fs::read(fresh.path("cut.txt")).unwrap_or_default(),
        content,
        "the cut file on a fresh cache{}",
        fresh.log_tail()
    );
    fresh.unmount();
}

/// A generation's stats count the whole tree, not only the directories its cut rebuilt.
#[test]
fn generation_stats_count_the_whole_tree() {
    if skip_fuse() {
        return;
    }
    let store = TestStore::file();
    let ws = store.workspace("totals", &["--commit-interval", "1h"]);
    ws.mount();
    for d in ["a", "a/deep", "b"] {
        std::fs::create_dir(ws.path(d)).unwrap();
    }
    for (f, n) in [("a/1", 100), ("a/deep/2", 2000), ("b/3", 30), ("top", 4)] {
        std::fs::write(ws.path(f), vec![b'x'; n]).unwrap();
    }
    let g1 = ws.sync();
    // Only b/ changes: a/ and a/deep/ are not rebuilt.
    std::fs::write(ws.path("b/4"), vec![b'y'; 5]).unwrap();
    let g2 = ws.sync();
    ws.unmount();
    let log = ws.log_json();
    let stats = |g: u64| {
        let r = log
            .iter()
            .find(|r| r["number"].as_u64() == Some(g))
            .unwrap_or_else(|| panic!("generation {g} in {log:?}"));
        (
            r["stats"]["files"].as_u64().unwrap(),
            r["stats"]["dirs"].as_u64().unwrap(),
            r["stats"]["bytes_total"].as_u64().unwrap(),
        )
    };
    assert_eq!(stats(g1), (4, 4, 2134), "generation {g1}");
    assert_eq!(stats(g2), (5, 4, 2139), "generation {g2}");
}

/// Backpressure (promise 10): with a slow store and `--max-lag-bytes 1MiB`, a writer that
/// could fill 16 MiB at once is slowed so that the unsynced bytes stay near the bound, the
/// status shows the throttling, and everything written ends up durable.
#[test]
fn backpressure_bounds_the_unsynced_bytes() {
    if skip_fuse() {
        return;
    }
    const BOUND: u64 = 1 << 20;
    const WRITE: usize = 64 << 10;
    let store = TestStore::file();
    let mut ws = store.workspace(
        "lag",
        &["--commit-interval", "50ms", "--max-lag-bytes", "1MiB"],
    );
    // Write-through: with the kernel's writeback cache the bound is passed by the pages the
    // kernel holds (SEMANTICS.md, promise 10).
    ws.opts = vec!["writeback_cache=off".into()];
    // Every store request takes 100 ms more: a commit takes several hundred ms.
    ws.env.push((
        "OWSFS_FAULTS".into(),
        "rate=1,seed=1,kinds=timeout,delay_ms=100".into(),
    ));
    ws.mount();
    let path = ws.path("big.bin");
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        let mut f = std::fs::File::create(&path).unwrap();
        let mut all = Vec::new();
        for i in 0..256u32 {
            let block: Vec<u8> = (0..WRITE as u32)
                .map(|j| (j.wrapping_mul(31) ^ i.wrapping_mul(2654435761)) as u8)
                .collect();
            f.write_all(&block).unwrap();
            all.extend_from_slice(&block);
        }
        all
    });
    let mut max_lag = 0u64;
    let mut samples = 0;
    while !writer.is_finished() {
        let s = ws.status_json(false);
        if let Some(b) = s["sync"]["lag_bytes"].as_u64() {
            max_lag = max_lag.max(b);
            samples += 1;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let written = writer.join().unwrap();
    let s = ws.status_json(false);
    let throttled = s["sync"]["throttled_ms"].as_u64().expect("throttled_ms");
    eprintln!("max unsynced {max_lag} bytes over {samples} samples; throttled {throttled} ms");
    assert!(samples > 0, "no lag in the status: {s}");
    // Writes pass the bound while a cut pushes the kernel's pages through the mount (they
    // must: the push needs a FUSE thread, and throttled writers hold them), so a few blocks
    // more get through, more on a loaded machine (CI saw 1.31 MiB): "near the bound" is
    // within half of it, far below the 16 MiB the writer would reach unthrottled.
    assert!(
        max_lag <= BOUND + BOUND / 2,
        "unsynced bytes reached {max_lag}, the bound is {BOUND}{}",
        ws.log_tail()
    );
    assert!(
        throttled > 0,
        "16 MiB against a 1 MiB bound was never throttled: {s}"
    );
    let g = ws.sync();
    ws.kill_daemon();

    let fresh = store.workspace("lag", &["--steal", "--force"]);
    fresh.mount();
    assert!(
        std::fs::read(fresh.path("big.bin")).unwrap() == written,
        "generation {g} on a fresh cache differs from what was written"
    );
    fresh.unmount();
}

/// An operation whose journal record is written but which then fails must not lose the
/// changes below it: `rmdir` of a non-empty directory and `rename` onto a non-empty
/// directory fail with ENOTEMPTY after their records; the files written below both still go
/// into the next generation. (Before the fix, the next generation kept their old content.)
#[test]
fn a_refused_rmdir_or_rename_loses_no_change_below_it() {
    if skip_fuse() {
        return;
    }
    let ws = Workspace::with_options(&[]);
    std::fs::create_dir_all(ws.path("d")).unwrap();
    std::fs::create_dir_all(ws.path("src/sub")).unwrap();
    std::fs::create_dir_all(ws.path("dst")).unwrap();
    std::fs::write(ws.path("d/x"), b"v1").unwrap();
    std::fs::write(ws.path("src/sub/y"), b"v1").unwrap();
    std::fs::write(ws.path("dst/z"), b"v1").unwrap();
    ws.sync();
    std::fs::write(ws.path("d/x"), b"v2").unwrap();
    std::fs::write(ws.path("src/sub/y"), b"v2").unwrap();
    std::fs::write(ws.path("dst/z"), b"v2").unwrap();
    let e = std::fs::remove_dir(ws.path("d")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOTEMPTY), "{e}");
    let e = std::fs::rename(ws.path("src"), ws.path("dst")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOTEMPTY), "{e}");
    let g = ws.sync();
    let dest = ws.dir.path().join("restored");
    let out = ws.restore(Some(g), &dest);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (path, want) in [("d/x", "v2"), ("src/sub/y", "v2"), ("dst/z", "v2")] {
        assert_eq!(
            std::fs::read_to_string(dest.join(path)).unwrap(),
            want,
            "{path} in generation {g}"
        );
    }
}

/// A written file keeps its new content in the store when the name the journal knows it by
/// goes while it keeps another name (an unlink, or a rename over it): the next cut walks the
/// whole tree to find it. (Before the fix, the other name kept the old content in the store.)
#[test]
fn a_written_file_keeps_its_change_when_one_of_its_names_goes() {
    if skip_fuse() {
        return;
    }
    let ws = Workspace::with_options(&[]);
    for d in ["h", "l", "m", "n"] {
        std::fs::create_dir(ws.path(d)).unwrap();
    }
    std::fs::write(ws.path("h/x"), b"v1").unwrap();
    std::fs::hard_link(ws.path("h/x"), ws.path("l/y")).unwrap();
    std::fs::write(ws.path("m/x"), b"v1").unwrap();
    std::fs::hard_link(ws.path("m/x"), ws.path("n/y")).unwrap();
    ws.sync();
    // Unlinked by the name it was written through.
    std::fs::write(ws.path("h/x"), b"v2-longer").unwrap();
    std::fs::remove_file(ws.path("h/x")).unwrap();
    // Replaced by a rename over the name it was written through.
    std::fs::write(ws.path("m/x"), b"v2-longer").unwrap();
    std::fs::write(ws.path("m/z"), b"z").unwrap();
    std::fs::rename(ws.path("m/z"), ws.path("m/x")).unwrap();
    let g = ws.sync();
    let dest = ws.dir.path().join("restored");
    let out = ws.restore(Some(g), &dest);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (path, want) in [("l/y", "v2-longer"), ("n/y", "v2-longer"), ("m/x", "z")] {
        assert_eq!(
            std::fs::read_to_string(dest.join(path)).unwrap(),
            want,
            "{path} in generation {g}"
        );
    }
    assert!(!dest.join("h/x").exists());
}

/// A clean file that loses the name the daemon knows it by, and is written afterwards through
/// a descriptor opened before, keeps the change in the store under its other name: its first
/// change since the cut finds no path while the file still has names, so the cut looks for
/// it. (Before the fix, `l/y` kept the old content in the store.)
#[test]
fn a_clean_file_written_after_losing_a_name_keeps_the_change() {
    if skip_fuse() {
        return;
    }
    use std::os::unix::fs::FileExt;
    let ws = Workspace::with_options(&[]);
    for d in ["h", "l", "m", "n"] {
        std::fs::create_dir(ws.path(d)).unwrap();
    }
    std::fs::write(ws.path("h/x"), b"v1").unwrap();
    std::fs::hard_link(ws.path("h/x"), ws.path("l/y")).unwrap();
    std::fs::write(ws.path("m/x"), b"v1").unwrap();
    std::fs::hard_link(ws.path("m/x"), ws.path("n/y")).unwrap();
    ws.sync();
    // Unlinked by the name it was opened through, then written.
    let h = std::fs::OpenOptions::new()
        .write(true)
        .open(ws.path("h/x"))
        .unwrap();
    std::fs::remove_file(ws.path("h/x")).unwrap();
    h.write_all_at(b"v2-longer", 0).unwrap();
    // Replaced by a rename over the name it was opened through, then written.
    let m = std::fs::OpenOptions::new()
        .write(true)
        .open(ws.path("m/x"))
        .unwrap();
    std::fs::write(ws.path("m/z"), b"z").unwrap();
    std::fs::rename(ws.path("m/z"), ws.path("m/x")).unwrap();
    m.write_all_at(b"v2-longer", 0).unwrap();
    drop((h, m));
    let g = ws.sync();
    let dest = ws.dir.path().join("restored");
    let out = ws.restore(Some(g), &dest);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (path, want) in [("l/y", "v2-longer"), ("n/y", "v2-longer"), ("m/x", "z")] {
        assert_eq!(
            std::fs::read_to_string(dest.join(path)).unwrap(),
            want,
            "{path} in generation {g}"
        );
    }
    assert!(!dest.join("h/x").exists());
}

/// A clean hard-linked file loses one of its names in another directory: the next generation
/// shows the name left as an ordinary file (no hard-link key of several), so a drill passes.
/// Found by the torture harness: the name left kept the key in a directory the cut reused,
/// and the drill failed with "hard-link key K has only one name".
#[test]
fn a_hard_link_removed_elsewhere_leaves_no_stale_key() {
    if skip_fuse() {
        return;
    }
    let ws = Workspace::new();
    std::fs::create_dir(ws.path("d1")).unwrap();
    std::fs::create_dir(ws.path("d2")).unwrap();
    std::fs::write(ws.path("d1/a"), b"linked").unwrap();
    std::fs::hard_link(ws.path("d1/a"), ws.path("d2/b")).unwrap();
    ws.sync();
    std::fs::remove_file(ws.path("d2/b")).unwrap();
    ws.sync();
    let out = ws.owsfs(&["drill", "--store", &ws.store, "--workspace", &ws.name]);
    assert!(
        out.status.success(),
        "drill: {}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    ws.unmount();
}

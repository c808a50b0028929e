//! The daemon dies at the journal's crash windows (the table "Crash windows and their fail
//! points" in `journal/FORMAT.md`) while it serves a real mount: in the rotation that follows
//! a commit, in the clean close of an unmount, in a batch write under a workload, and while
//! opening the journal at mount. The daemon is started with `OWSFS_CRASH_AT=NAME` and dies
//! there as by `kill -9` (exit status 137, `src/failpoints.rs`); with
//! `OWSFS_CRASH_ARMED_BY=PATH` the point fires only once the test creates PATH.
//!
//! Every test checks that the crash happened where it should (the log names the point) and
//! what it left in the journal directory, then that the same cache mounts again with
//! everything the workload completed (SQLite's `integrity_check` ok), that `owsfs sync`
//! works on top of it, and that the newest generation holds exactly the tree.

mod common;

use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

/// Rows argv[2]..=argv[3] of table t in `app.db` (WAL mode), one transaction each, and a file
/// `files/K` for each. With argv[4] = PATH, runs on past argv[3] until an error (the daemon
/// died), appending each K to PATH once its row and file are done.
const WORKLOAD: &str = r#"
import os, sqlite3, sys
mp, a, b = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
progress = open(sys.argv[4], "a") if len(sys.argv) > 4 else None
os.makedirs(f"{mp}/files", exist_ok=True)
db = sqlite3.connect(f"{mp}/app.db", isolation_level=None)
assert db.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
db.execute("CREATE TABLE IF NOT EXISTS t(k INTEGER PRIMARY KEY, v TEXT)")
k = a
try:
    while k <= b or progress:
        db.execute("BEGIN")
        db.execute("INSERT INTO t VALUES (?, ?)", (k, f"row {k} " * 60))
        db.execute("COMMIT")
        with open(f"{mp}/files/{k}", "w") as f:
            f.write(f"file {k}\n" * (k % 97 * 20 + 1))
        if progress:
            progress.write(f"{k}\n")
            progress.flush()
        k += 1
except (OSError, sqlite3.Error):
    if not progress:
        raise
"#;

fn workload(ws: &Workspace, a: u64, b: u64) {
    run_ok(
        Command::new("python3")
            .args(["-c", WORKLOAD])
            .arg(&ws.mp)
            .args([a.to_string(), b.to_string()]),
    );
}

/// A workspace whose daemon dies at `point` once `armed()` exists; no cut but those the test
/// asks for.
fn crashing_workspace(point: &str) -> Workspace {
    let mut ws = Workspace::unmounted(None, "ws");
    ws.extra = ["--commit-interval", "1h", "--max-lag", "1h"]
        .map(String::from)
        .to_vec();
    ws.env = vec![
        ("OWSFS_CRASH_AT".into(), point.into()),
        (
            "OWSFS_CRASH_ARMED_BY".into(),
            armed(&ws).to_string_lossy().into_owned(),
        ),
    ];
    ws
}

fn armed(ws: &Workspace) -> std::path::PathBuf {
    ws.dir.path().join("armed")
}

/// Names in the cache's journal directory (segments, `.tmp`s, CLEAN).
fn journal_files(ws: &Workspace) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(ws.cache.join("journal"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "LOCK")
        .collect();
    v.sort();
    v
}

/// The crashed cache mounts again with `want` (and `rows` rows), writes one more file, syncs
/// it and unmounts; the newest generation is then exactly the tree.
fn remount_and_sync(ws: &mut Workspace, want: &Snapshot, rows: u64, what: &str) {
    ws.env.clear();
    ws.mount();
    assert_same_tree(&tree(&ws.mp), want, &format!("{what}: remount"));
    assert_eq!(
        db_rows(&ws.mp, what),
        (1..=rows).collect::<Vec<_>>(),
        "{what}: rows"
    );
    std::fs::write(ws.path("files/after.txt"), b"after the crash\n").unwrap();
    let want = tree(&ws.mp);
    ws.sync();
    ws.unmount();
    let dest = ws.dir.path().join("restored");
    let out = ws.restore(None, &dest);
    assert!(
        out.status.success(),
        "{what}: restore: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same_tree(&tree(&dest), &want, &format!("{what}: newest generation"));
}

/// `owsfs sync` commits, then dies in the journal's rotation (`committed`): before the new
/// segment's rename (a `.seg.tmp` is left) or after it (two segments are left). The
/// generation landed; the same cache replays the journal (a superset of what changed since,
/// or exactly that) and goes on.
#[test]
fn crash_in_the_journals_rotation_after_a_commit() {
    if skip_fuse() {
        return;
    }
    for point in [
        "journal-rotate-before-rename",
        "journal-rotate-after-rename",
    ] {
        let mut ws = crashing_workspace(point);
        ws.mount();
        let pid = ws.daemon_pid();
        workload(&ws, 1, 20);
        // Not armed yet: this commit's rotation goes through.
        let g1 = ws.sync();
        workload(&ws, 21, 40);
        let want = tree(&ws.mp);
        std::fs::write(armed(&ws), b"").unwrap();
        let out = ws.owsfs(&["sync", &ws.mp.to_string_lossy()]);
        assert!(!out.status.success(), "{point}: owsfs sync succeeded");
        crashed(&ws, pid, point);
        let left = journal_files(&ws);
        let (tmps, segs) = (
            left.iter().filter(|n| n.ends_with(".seg.tmp")).count(),
            left.iter().filter(|n| n.ends_with(".seg")).count(),
        );
        match point {
            "journal-rotate-before-rename" => assert_eq!((tmps, segs), (1, 1), "{left:?}"),
            _ => assert_eq!((tmps, segs), (0, 2), "{left:?}"),
        }
        let log = ws.log_json();
        assert!(
            log.iter()
                .any(|r| r["number"].as_u64() == Some(g1 + 1) && r["kind"] == "commit"),
            "{point}: the crashed sync's generation landed: {log:?}"
        );
        remount_and_sync(&mut ws, &want, 40, point);
    }
}

/// `owsfs unmount` hands off (the last cut committed, the lease released), then the daemon
/// dies closing the journal: before CLEAN (the segment synced) or after it (its name not yet
/// synced). Another node sees the last cut; the same cache replays and goes on.
#[test]
fn crash_while_closing_the_journal() {
    if skip_fuse() {
        return;
    }
    for point in ["journal-close-before-clean", "journal-close-after-clean"] {
        let mut ws = crashing_workspace(point);
        ws.mount();
        let pid = ws.daemon_pid();
        workload(&ws, 1, 20);
        ws.sync();
        workload(&ws, 21, 40);
        let want = tree(&ws.mp);
        std::fs::write(armed(&ws), b"").unwrap();
        let out = owsfs(&["unmount", &ws.mp.to_string_lossy()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("died during the unmount"),
            "{point}: owsfs unmount: {}: {err}",
            out.status
        );
        crashed(&ws, pid, point);
        let clean = journal_files(&ws).contains(&"CLEAN".to_string());
        assert_eq!(
            clean,
            point == "journal-close-after-clean",
            "{point}: CLEAN"
        );

        let other = Workspace::unmounted(Some(&ws.store), "ws");
        other.mount();
        assert_same_tree(&tree(&other.mp), &want, &format!("{point}: another node"));
        other.unmount();
        remount_and_sync(&mut ws, &want, 40, point);
    }
}

/// The daemon dies in a batch write, half of it written (`journal-batch-torn`), while a
/// workload of SQLite transactions and files runs. The next mount cuts the torn tail; every
/// row and file the workload completed is there.
#[test]
fn crash_in_a_torn_batch_under_a_workload() {
    if skip_fuse() {
        return;
    }
    let point = "journal-batch-torn";
    let mut ws = crashing_workspace(point);
    ws.mount();
    let pid = ws.daemon_pid();
    workload(&ws, 1, 10);
    ws.sync();
    let progress = ws.dir.path().join("progress");
    let mut child: Child = Command::new("python3")
        .args(["-c", WORKLOAD])
        .arg(&ws.mp)
        .args(["11", "11"])
        .arg(&progress)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let done = || -> Vec<u64> {
        std::fs::read_to_string(&progress)
            .unwrap_or_default()
            .lines()
            .map(|l| l.parse().unwrap())
            .collect()
    };
    assert!(
        wait_for(Duration::from_secs(60), || done().len() >= 10),
        "the workload made no progress{}",
        ws.log_tail()
    );
    std::fs::write(armed(&ws), b"").unwrap();
    crashed(&ws, pid, point);
    let status = child.wait().unwrap();
    assert!(status.success(), "the workload: {status}");
    let done = done();
    let last = *done.last().unwrap();

    ws.env.clear();
    ws.mount();
    let log = std::fs::read_to_string(ws.cache.join("owsfs.log")).unwrap_or_default();
    assert!(
        log.contains("torn tail cut"),
        "no torn tail{}",
        ws.log_tail()
    );
    let rows = db_rows(&ws.mp, point);
    assert!(
        rows.len() as u64 >= last && rows.iter().copied().eq(1..=rows.len() as u64),
        "{point}: rows {rows:?}, the workload completed 1..={last}"
    );
    for k in 1..=last {
        let got = std::fs::read(ws.path(&format!("files/{k}"))).unwrap();
        assert_eq!(
            got,
            format!("file {k}\n")
                .repeat((k % 97 * 20 + 1) as usize)
                .as_bytes()
        );
    }
    let want = tree(&ws.mp);
    ws.unmount();
    remount_and_sync(&mut ws, &want, rows.len() as u64, point);
}

/// Opening the journal at mount dies: after removing CLEAN (a clean unmount before), and in
/// the middle of a rescan (a damaged segment header before). The next mount serves the tree.
#[test]
fn crash_while_opening_the_journal() {
    if skip_fuse() {
        return;
    }
    let mut ws = Workspace::unmounted(None, "ws");
    ws.extra = ["--commit-interval", "1h"].map(String::from).to_vec();
    ws.mount();
    workload(&ws, 1, 20);
    let want = tree(&ws.mp);
    ws.unmount();
    for point in ["journal-open-after-unclean", "journal-rescan-midway"] {
        if point == "journal-rescan-midway" {
            let seg = journal_files(&ws)
                .into_iter()
                .find(|n| n.ends_with(".seg"))
                .unwrap();
            let path = ws.cache.join("journal").join(seg);
            let mut bytes = std::fs::read(&path).unwrap();
            bytes[0] ^= 0x40;
            std::fs::write(&path, bytes).unwrap();
        }
        ws.env = vec![("OWSFS_CRASH_AT".into(), point.into())];
        let out = ws.try_mount();
        ws.env.clear();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success()
                && (err.contains("exit status: 137") || err.contains("signal: 9 (SIGKILL)")),
            "{point}: {err}{}",
            ws.log_tail()
        );
        assert_crash_logged(&ws, point);
        assert!(!is_mounted(&ws.mp), "{point}: a mount is left behind");
        // After a clean unmount, CLEAN goes at the end of the open: a crash in the rescan
        // leaves it (it vouches for nothing a rescan would trust).
        let left = journal_files(&ws);
        match point {
            "journal-open-after-unclean" => {
                assert!(!left.contains(&"CLEAN".to_string()), "{point}: {left:?}");
            }
            _ => assert!(left.iter().any(|n| n.ends_with(".seg.tmp")), "{left:?}"),
        }
        let _ = std::fs::remove_file(ws.cache.join("owsfs.log"));
        ws.mount();
        assert_same_tree(&tree(&ws.mp), &want, point);
        assert_eq!(db_rows(&ws.mp, point), (1..=20).collect::<Vec<_>>());
        ws.unmount();
    }
    let log_before = ws.log_json().len();
    remount_and_sync(&mut ws, &want, 20, "after both");
    assert!(ws.log_json().len() > log_before);
}

/// The journal's last segment cut short on disk (damage, not a crash: records of operations
/// that were performed are gone) after a `kill -9`: the remount finds the files that differ
/// from the last generation without a record and the next commit holds them. Found by the
/// torture harness: the commit kept the old chunks of a file that had grown (and could then
/// never be encoded), or silently missed an overwrite.
#[test]
fn a_journal_cut_short_loses_nothing_the_backing_files_hold() {
    if skip_fuse() {
        return;
    }
    let ws = Workspace::unmounted(None, "ws");
    let mut ws = ws;
    ws.extra = vec!["--commit-interval".into(), "1h".into()];
    ws.mount();
    std::fs::create_dir(ws.path("d")).unwrap();
    std::fs::write(ws.path("d/grows"), vec![b'a'; 5000]).unwrap();
    std::fs::write(ws.path("d/overwritten"), vec![b'b'; 70_000]).unwrap();
    std::fs::write(ws.path("kept"), b"untouched").unwrap();
    ws.sync();
    // After the base: records the damage will drop.
    let journal = ws.cache.join("journal");
    let segment = || {
        let mut segs: Vec<_> = std::fs::read_dir(&journal)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "seg"))
            .collect();
        segs.sort();
        segs.pop().expect("a segment")
    };
    let before = std::fs::metadata(segment()).unwrap().len();
    std::fs::OpenOptions::new()
        .append(true)
        .open(ws.path("d/grows"))
        .unwrap()
        .write_all(&vec![b'c'; 200_000])
        .unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(ws.path("d/overwritten"))
        .unwrap()
        .write_all_at(b"changed in place", 30_000)
        .unwrap();
    std::fs::create_dir(ws.path("new")).unwrap();
    std::fs::write(ws.path("new/file"), b"created").unwrap();
    let want = tree(&ws.mp);
    ws.kill_daemon();
    // Everything after the base's records goes, and half a record more.
    let seg = segment();
    let len = std::fs::metadata(&seg).unwrap().len();
    assert!(
        len > before,
        "the changes were not journaled in {}",
        seg.display()
    );
    std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(before + 7)
        .unwrap();
    ws.mount();
    assert_same_tree(&tree(&ws.mp), &want, "remount");
    ws.sync();
    let log = std::fs::read_to_string(ws.cache.join("owsfs.log")).unwrap();
    ws.unmount();
    let dest = ws.dir.path().join("restored");
    let out = ws.restore(None, &dest);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same_tree(&tree(&dest), &want, "newest generation");
    assert!(
        log.contains("without a journal record"),
        "the remount did not say it found changes the journal lost:\n{log}"
    );
}

/// The same with a file the journal still has dirty: the records kept name one range of it,
/// the records lost another. After the torn tail the whole file is read again.
#[test]
fn a_journal_cut_short_loses_no_range_of_a_file_it_still_has_dirty() {
    if skip_fuse() {
        return;
    }
    let mut ws = Workspace::unmounted(None, "ws");
    ws.extra = vec!["--commit-interval".into(), "1h".into()];
    ws.mount();
    std::fs::write(ws.path("f"), noise(4 << 20, 3)).unwrap();
    ws.sync();
    let journal = ws.cache.join("journal");
    let segment = || {
        let mut segs: Vec<_> = std::fs::read_dir(&journal)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "seg"))
            .collect();
        segs.sort();
        segs.pop().expect("a segment")
    };
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(ws.path("f"))
        .unwrap();
    f.write_all_at(b"kept record", 1000).unwrap();
    let kept = std::fs::metadata(segment()).unwrap().len();
    f.write_all_at(b"lost record", 3 << 20).unwrap();
    drop(f);
    let want = tree(&ws.mp);
    ws.kill_daemon();
    let seg = segment();
    assert!(std::fs::metadata(&seg).unwrap().len() > kept);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(kept + 5)
        .unwrap();
    ws.mount();
    assert_same_tree(&tree(&ws.mp), &want, "remount");
    ws.sync();
    ws.unmount();
    let dest = ws.dir.path().join("restored");
    let out = ws.restore(None, &dest);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same_tree(&tree(&dest), &want, "newest generation");
}

//! The rollback of a live mount (`owsfs rollback MOUNTPOINT REF`): the tree changes at once
//! while a writer keeps writing, files open before answer ESTALE, nothing acknowledged is
//! lost (the undo brings it back), a mount of a lazily hydrated cache rolls back too, and a
//! daemon that dies between the commit and the cache's change finishes the rollback at its
//! next mount. Each scenario runs on `file://` and on SeaweedFS.

mod common;

#[path = "../testkit/seaweed.rs"]
mod seaweed;
#[path = "common/stores.rs"]
mod stores;

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use stores::TestStore;

/// `owsfs rollback MP REF` on the mount: the new generation, and the reference that undoes it.
fn rollback(ws: &Workspace, to: &str) -> (u64, String) {
    let mp = ws.mp.to_string_lossy().into_owned();
    let out = ws.owsfs(&["rollback", &mp, to]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "rollback to {to}: {stderr}{}",
        ws.log_tail()
    );
    let generation = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let undo = stderr
        .split(&format!("undo with `owsfs rollback {mp} "))
        .nth(1)
        .and_then(|s| s.split('`').next())
        .unwrap_or_else(|| panic!("the undo is not said: {stderr}"))
        .to_string();
    (generation, undo)
}

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

fn without(mut t: Snapshot, name: &str) -> Snapshot {
    t.remove(name);
    t
}

/// A rollback while a writer writes, files open across it, then its undo.
fn live_rollback_and_undo(store: &TestStore) {
    // Cuts only when asked: the rollback's own sync does the work. Write-through: the stream
    // below counts what write(2) acknowledged, which the writeback cache holds in the kernel
    // (SEMANTICS.md, the live rollback); `writes_open_across_a_rollback_fail_with_the_writeback_cache`
    // covers the default.
    let mut a = store.workspace("live", &["--commit-interval", "1h"]);
    a.opts = vec!["writeback_cache=off".into()];
    a.mount();
    let mp = a.mp.to_string_lossy().into_owned();
    std::fs::create_dir_all(a.path("src/deep")).unwrap();
    std::fs::write(a.path("src/main.rs"), b"fn main() {}\n").unwrap();
    std::fs::write(a.path("src/deep/gone-later"), noise(300_000, 1)).unwrap();
    std::fs::write(a.path("big.bin"), noise(5 << 20, 2)).unwrap();
    write_db(&a.mp, 100);
    a.ok(&["snapshot", "create", "good", &mp]);
    let v1 = tree(&a.mp);

    std::fs::write(a.path("src/main.rs"), b"fn main() { broken() }\n").unwrap();
    std::fs::remove_file(a.path("src/deep/gone-later")).unwrap();
    std::fs::write(a.path("junk"), b"junk\n").unwrap();
    OpenOptions::new()
        .write(true)
        .open(a.path("big.bin"))
        .unwrap()
        .write_all_at(b"patched", 4 << 20)
        .unwrap();
    write_db(&a.mp, 50);
    // The kernel now caches these names as absent; after the rollback they exist.
    assert!(!a.path("src/deep/gone-later").exists());
    let v2 = tree(&a.mp);

    // Open across the rollback: a reader, a writer, and a writer that goes on writing until
    // the rollback stops it, counting what was acknowledged.
    let reader = File::open(a.path("big.bin")).unwrap();
    let mut writer = OpenOptions::new()
        .append(true)
        .open(a.path("junk"))
        .unwrap();
    let acked = Arc::new(AtomicU64::new(0));
    let streamer = {
        let acked = Arc::clone(&acked);
        let path = a.path("stream");
        std::thread::spawn(move || {
            let mut f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .unwrap();
            for n in 0u64.. {
                match f.write(format!("line {n}\n").as_bytes()) {
                    Ok(k) => acked.fetch_add(k as u64, Ordering::SeqCst),
                    Err(e) => return e,
                };
                std::thread::sleep(Duration::from_millis(1));
            }
            unreachable!()
        })
    };
    assert!(wait_for(Duration::from_secs(10), || acked
        .load(Ordering::SeqCst)
        > 1000));

    let (g, undo) = rollback(&a, "good");
    assert!(undo.starts_with("auto-rollback-"), "{undo}");
    let err = streamer.join().unwrap();
    assert_eq!(
        errno(&err),
        libc::ESTALE,
        "the writer of a replaced file: {err}"
    );
    let acked = acked.load(Ordering::SeqCst);

    assert_same_tree(&tree(&a.mp), &v1, "after the rollback");
    let (integrity, rows) = sql_check(&a.path("app.db"), true);
    assert_eq!((integrity.as_str(), rows.len()), ("ok", 100));
    // A read of a file open before: its old bytes where the kernel still has them cached,
    // ESTALE where it must ask the daemon; never the new tree's bytes.
    let old = &v2["big.bin"][2..];
    let mut buf = vec![0u8; 4096];
    for at in [0usize, 4 << 20] {
        match reader.read_at(&mut buf, at as u64) {
            Ok(n) => assert!(
                buf[..n] == old[at..at + n],
                "a read at {at} of a file open before served other bytes than its old ones"
            ),
            Err(e) => assert_eq!(errno(&e), libc::ESTALE, "a read of a file open before: {e}"),
        }
    }
    let e = reader.sync_all().err();
    assert!(
        e.as_ref().is_none_or(|e| errno(e) == libc::ESTALE),
        "fsync of a file open before: {e:?}"
    );
    let e = writer.write_all(b"more\n").unwrap_err();
    assert_eq!(
        errno(&e),
        libc::ESTALE,
        "a write of a file open before: {e}"
    );
    drop((reader, writer));
    let status = a.status_json(false);
    assert_eq!(status["sync"]["generation"], g, "{status}");

    // The rolled-back tree is an ordinary one: written, committed.
    std::fs::write(a.path("after"), b"written after the rollback\n").unwrap();
    std::fs::write(a.path("src/main.rs"), b"fn main() { fixed() }\n").unwrap();
    let fixed = a.sync();
    assert!(fixed > g);

    // The undo: the state before the rollback, with everything the writer was told it wrote.
    let (g2, _) = rollback(&a, &undo);
    assert!(g2 > fixed);
    let now = tree(&a.mp);
    assert_eq!(
        now.get("stream").map(Vec::len),
        Some(2 + acked as usize),
        "the stream holds exactly what was acknowledged before the rollback"
    );
    assert_same_tree(&without(now.clone(), "stream"), &v2, "after the undo");
    let (integrity, rows) = sql_check(&a.path("app.db"), true);
    assert_eq!((integrity.as_str(), rows.len()), ("ok", 150));
    let snapshots = a.ok(&["snapshot", "list", &mp]);
    assert!(snapshots.contains(&undo), "{snapshots}");
    let log = a.ok(&["log", "--store", &a.store, "--workspace", "live"]);
    assert_eq!(log.matches("[rollback to ").count(), 2, "{log}");
    let last = tree(&a.mp);
    a.unmount();

    // History keeps every state: the rollback, the fix after it, the undo.
    let restored = |at: &str| {
        let dest = a.dir.path().join(format!("restore-{at}"));
        a.ok(&[
            "restore",
            "--store",
            &a.store,
            "--workspace",
            "live",
            "--at",
            at,
            &dest.to_string_lossy(),
        ]);
        tree(&dest)
    };
    assert_same_tree(&restored(&g.to_string()), &v1, "the rollback's generation");
    let after_fix = restored(&fixed.to_string());
    assert_eq!(
        after_fix.get("after").map(Vec::as_slice),
        Some(&b"f:written after the rollback\n"[..])
    );
    assert_same_tree(&restored("HEAD"), &last, "HEAD after the undo");
    a.ok(&["drill", "--store", &a.store, "--workspace", "live", "HEAD"]);

    // A mount of a new cache (another node), lazily hydrated: nothing read yet, rolled back.
    let b = store.workspace("live", &[]);
    b.mount();
    let (_, _) = rollback(&b, "good");
    assert_same_tree(&tree(&b.mp), &v1, "a lazy mount rolled back");
    b.unmount();
}

#[test]
fn live_rollback_and_undo_file() {
    if skip_fuse() {
        return;
    }
    live_rollback_and_undo(&TestStore::file());
}

#[test]
fn live_rollback_and_undo_seaweedfs() {
    if skip_fuse() {
        return;
    }
    live_rollback_and_undo(&TestStore::seaweed("live-rollback"));
}

/// The daemon dies after the rollback's commit, before its cache became the new tree's copy:
/// the next mount of that cache serves the rolled-back tree (the journal does not cover the
/// commit), and goes on from it. Dying before the commit changes nothing.
fn rollback_crash(store: &TestStore, point: &str) {
    let mut a = store.workspace("crash", &["--commit-interval", "1h"]);
    a.env
        .push(("OWSFS_CRASH_AT".to_string(), point.to_string()));
    a.mount();
    let mp = a.mp.to_string_lossy().into_owned();
    std::fs::write(a.path("a"), b"one\n").unwrap();
    std::fs::create_dir(a.path("d")).unwrap();
    std::fs::write(a.path("d/x"), noise(100_000, 3)).unwrap();
    a.ok(&["snapshot", "create", "one", &mp]);
    let v1 = tree(&a.mp);
    std::fs::write(a.path("a"), b"two\n").unwrap();
    std::fs::write(a.path("d/y"), b"y\n").unwrap();
    a.sync();
    let v2 = tree(&a.mp);
    let pid = a.daemon_pid();
    let out = a.owsfs(&["rollback", &mp, "one"]);
    assert!(!out.status.success(), "the daemon died: no answer");
    crashed(&a, pid, point);
    a.env.retain(|(k, _)| k != "OWSFS_CRASH_AT");
    a.mount();
    let want = if point == "rollback-after-commit" {
        &v1
    } else {
        &v2
    };
    assert_same_tree(&tree(&a.mp), want, point);
    std::fs::write(a.path("next"), b"next\n").unwrap();
    let g = a.sync();
    let mut want = want.clone();
    want.insert("next".into(), tree(&a.mp)["next"].clone());
    assert_same_tree(&tree(&a.mp), &want, point);
    a.unmount();
    let dest = a.dir.path().join("restored");
    a.ok(&[
        "restore",
        "--store",
        &a.store,
        "--workspace",
        "crash",
        "--at",
        &g.to_string(),
        &dest.to_string_lossy(),
    ]);
    assert_same_tree(&tree(&dest), &want, point);
}

#[test]
fn live_rollback_crash_after_commit_file() {
    if skip_fuse() {
        return;
    }
    rollback_crash(&TestStore::file(), "rollback-after-commit");
}

#[test]
fn live_rollback_crash_before_commit_file() {
    if skip_fuse() {
        return;
    }
    rollback_crash(&TestStore::file(), "rollback-before-commit");
}

#[test]
fn live_rollback_crash_after_commit_seaweedfs() {
    if skip_fuse() {
        return;
    }
    rollback_crash(
        &TestStore::seaweed("rollback-crash"),
        "rollback-after-commit",
    );
}

/// With the writeback cache (the default), a file open across a live rollback takes no more
/// writes: the rollback drops the kernel's attributes of the old tree's inodes, so the next
/// write(2) asks the daemon, which answers ESTALE (instead of pages that would be dropped).
#[test]
fn writes_open_across_a_rollback_fail_with_the_writeback_cache() {
    if skip_fuse() {
        return;
    }
    let store = TestStore::file();
    let a = store.workspace("wb", &["--commit-interval", "1h"]);
    a.mount();
    let mp = a.mp.to_string_lossy().into_owned();
    std::fs::write(a.path("kept"), b"before\n").unwrap();
    a.ok(&["snapshot", "create", "good", &mp]);
    let mut writer = OpenOptions::new()
        .create(true)
        .append(true)
        .open(a.path("stream"))
        .unwrap();
    writer.write_all(b"line\n").unwrap();
    rollback(&a, "good");
    let e = writer.write_all(b"after\n").unwrap_err();
    assert_eq!(
        errno(&e),
        libc::ESTALE,
        "a write of a file open before: {e}"
    );
    drop(writer);
    assert!(!a.path("stream").exists());
    assert_eq!(std::fs::read(a.path("kept")).unwrap(), b"before\n");
    a.unmount();
}

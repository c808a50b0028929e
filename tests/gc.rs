//! GC beside live work: a writer that keeps rewriting files with contents it had before
//! (so its deduplication index points into packs GC condemns), a fork written on another node
//! and hydrating lazily there, and exports of HEAD, while `owsfs gc` runs 100 times with a
//! short grace and a short retention. Afterwards every kept generation of both workspaces
//! passes a drill, and each workspace's newest generation holds exactly what was written.
//! On `file://` and on SeaweedFS.

mod common;

#[path = "../testkit/seaweed.rs"]
mod seaweed;
#[path = "common/stores.rs"]
mod stores;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use stores::TestStore;

const ROUNDS: usize = 100;

/// Rewrites files of `dir` until `stop`, with contents from one of two sets that take turns
/// every 3 seconds: a set's chunks leave every kept generation, GC condemns and deletes their
/// packs, and then the same chunks come back, which the writer's deduplication index still
/// knows in those packs.
fn churn(
    dir: std::path::PathBuf,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let pool: Vec<Vec<u8>> = (0..6)
            .map(|i| noise(80_000 + 7_000 * i, seed * 100 + i as u64))
            .collect();
        let started = std::time::Instant::now();
        let mut x = seed;
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            let phase = (started.elapsed().as_secs() / 3 % 2) as usize;
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let f = dir.join(format!("f{}", (x >> 33) % 4));
            if (x >> 40).is_multiple_of(7) {
                let _ = std::fs::remove_file(&f);
            } else {
                std::fs::write(&f, &pool[phase * 3 + ((x >> 45) % 3) as usize]).unwrap();
            }
            n += 1;
            std::thread::sleep(Duration::from_millis(15));
        }
        n
    })
}

fn gc_races_writers_readers_and_forks(store: &TestStore) {
    // Writers read the GC runs every 200 ms (R), so the protocol holds with any grace G above
    // 2R plus the time δ from a writer's last reading to its slot write landing
    // (store/FORMAT.md, "GC"). A grace of 1 s left δ 600 ms, which a debug build on a loaded
    // 2-core machine exceeded once (a SQLite fsync and the slot's PUT under load); 3 s leaves
    // it 2.6 s and still lets 100 rounds delete packs.
    let mut a = store.workspace("src", &["--commit-interval", "50ms"]);
    a.fast_gc();
    a.mount();
    std::fs::write(a.path("base"), noise(300_000, 1)).unwrap();
    let g = a.sync();
    a.ok(&["fork", &format!("src@{g}"), "fork", "--store", &a.store]);
    // The fork's node hydrates lazily (no prefetch) while it is written.
    let mut b = store.workspace("fork", &["--commit-interval", "50ms", "--prefetch", "0"]);
    b.fast_gc();
    b.mount();
    for w in ["src", "fork"] {
        a.ok(&[
            "retention",
            "--store",
            &a.store,
            "--workspace",
            w,
            "--keep-all",
            "2s",
            "--hourly",
            "0s",
            "--daily",
            "0s",
        ]);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let writers = [
        churn(a.mp.clone(), 1, Arc::clone(&stop)),
        churn(b.mp.clone(), 2, Arc::clone(&stop)),
    ];
    let mut deleted = 0u64;
    let mut condemned = 0u64;
    let mut repacked = 0u64;
    for round in 0..ROUNDS {
        // Every pack with a dead blob is repacked: blobs move, with forwards, under the
        // writers, the lazy reader and the exports.
        let out = a.ok(&[
            "gc",
            "--store",
            &a.store,
            "--grace",
            "3s",
            "--max-unused",
            "0",
            "--json",
        ]);
        let r: serde_json::Value = serde_json::from_str(&out).unwrap();
        deleted += r["packs_deleted"].as_u64().unwrap();
        condemned += r["packs_condemned"].as_u64().unwrap();
        repacked += r["packs_repacked"].as_u64().unwrap();
        if round % 10 == 0 {
            // A reader of the store: HEAD exported whole while GC runs.
            let dest = a.dir.path().join(format!("export-{round}"));
            a.ok(&[
                "export",
                "src@HEAD",
                &dest.to_string_lossy(),
                "--store",
                &a.store,
            ]);
            // The lazy node reads a file it may not have fetched yet.
            let _ = std::fs::read(b.path("base")).unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        assert!(w.join().unwrap() > 50);
    }
    let (want_a, want_b) = (tree(&a.mp), tree(&b.mp));
    a.sync();
    b.sync();
    assert!(
        deleted > 0,
        "GC deleted nothing in {ROUNDS} rounds ({condemned} condemned)"
    );
    assert!(repacked > 0, "GC repacked nothing in {ROUNDS} rounds");
    a.unmount();
    b.unmount();
    // One more GC a grace later: the last condemned packs go too.
    std::thread::sleep(Duration::from_millis(3100));
    a.ok(&["gc", "--store", &a.store, "--grace", "3s"]);

    for (ws, name, want) in [(&a, "src", &want_a), (&b, "fork", &want_b)] {
        let log = {
            let out = ws.owsfs(&["log", "--json", "--store", &ws.store, "--workspace", name]);
            assert!(out.status.success());
            serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout).unwrap()
        };
        let commits: Vec<u64> = log
            .iter()
            .filter(|r| r["kind"] == "commit")
            .map(|r| r["number"].as_u64().unwrap())
            .collect();
        assert!(!commits.is_empty());
        for n in &commits {
            let out = ws.owsfs(&[
                "drill",
                &n.to_string(),
                "--store",
                &ws.store,
                "--workspace",
                name,
            ]);
            assert!(
                out.status.success(),
                "{name}: generation {n} of the kept {commits:?} fails its drill: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let dest = ws.dir.path().join(format!("final-{name}"));
        ws.ok(&[
            "restore",
            "--store",
            &ws.store,
            "--workspace",
            name,
            &dest.to_string_lossy(),
        ]);
        assert_same_tree(&tree(&dest), want, name);
    }
}

#[test]
fn gc_races_writers_readers_and_forks_file() {
    if skip_fuse() {
        return;
    }
    gc_races_writers_readers_and_forks(&TestStore::file());
}

#[test]
fn gc_races_writers_readers_and_forks_seaweedfs() {
    if skip_fuse() {
        return;
    }
    gc_races_writers_readers_and_forks(&TestStore::seaweed("gc-race"));
}

/// A cache whose base generation a GC pruned (and whose packs it deleted) is recovered by
/// uploading every file again: the fork holds all of it, and passes a drill.
#[test]
fn recover_of_a_cache_whose_base_was_collected_uploads_everything() {
    if skip_fuse() {
        return;
    }
    let store = TestStore::file();
    let mut a = store.workspace("old", &["--commit-interval", "1h"]);
    a.fast_gc();
    a.mount();
    for i in 0..4 {
        std::fs::write(a.path(&format!("kept{i}")), noise(150_000, 10 + i)).unwrap();
    }
    a.sync();
    std::fs::write(a.path("tail"), b"not synced\n").unwrap();
    let want = tree(&a.mp);
    a.kill_daemon();

    // Another node takes over, replaces every file, and GC runs until the old base's packs
    // are gone.
    let mut b = store.workspace("old", &["--steal", "--force"]);
    b.fast_gc();
    b.mount();
    for i in 0..4 {
        std::fs::remove_file(b.path(&format!("kept{i}"))).unwrap();
    }
    std::fs::write(b.path("other"), b"b\n").unwrap();
    b.sync();
    b.unmount();
    a.keep_only_newest("old");
    let mut deleted = 0;
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(1100));
        let out = a.ok(&["gc", "--store", &a.store, "--grace", "1s", "--json"]);
        let r: serde_json::Value = serde_json::from_str(&out).unwrap();
        deleted += r["packs_deleted"].as_u64().unwrap();
    }
    assert!(deleted > 0, "the old base's packs were not collected");

    let out = a.owsfs(&[
        "recover",
        "--cache",
        &a.cache.to_string_lossy(),
        "--as",
        "saved",
        "--store",
        &a.store,
    ]);
    assert!(
        out.status.success(),
        "recover: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("uploaded again"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    a.ok(&["drill", "--store", &a.store, "--workspace", "saved"]);
    let dest = a.dir.path().join("saved");
    a.ok(&[
        "restore",
        "--store",
        &a.store,
        "--workspace",
        "saved",
        &dest.to_string_lossy(),
    ]);
    assert_same_tree(&tree(&dest), &want, "the recovered fork");
}

/// `--gc-every`: the daemon applies retention and collects on its own; `owsfs status` shows
/// the last run; what is kept still drills.
fn the_daemon_collects_on_a_schedule(store: &TestStore) {
    let mut a = store.workspace(
        "src",
        &[
            "--commit-interval",
            "50ms",
            "--gc-every",
            "300ms",
            "--gc-grace",
            "1s",
        ],
    );
    a.fast_gc();
    a.mount();
    a.keep_only_newest("src");
    for i in 0..6 {
        std::fs::write(a.path("f"), noise(120_000, i)).unwrap();
        a.sync();
    }
    let collected = wait_for(Duration::from_secs(60), || {
        let s = a.status_json(false);
        s["sync"]["gc"]["report"]["packs_deleted"].as_u64() > Some(0)
    });
    assert!(collected, "no GC deleted anything{}", a.log_tail());
    let text = a.ok(&["status", &a.mp.to_string_lossy()]);
    assert!(text.contains("gc           "), "{text}");
    let want = tree(&a.mp);
    a.sync();
    a.unmount();
    a.ok(&["drill", "--store", &a.store, "--workspace", "src"]);
    let dest = a.dir.path().join("final");
    a.ok(&[
        "restore",
        "--store",
        &a.store,
        "--workspace",
        "src",
        &dest.to_string_lossy(),
    ]);
    assert_same_tree(&tree(&dest), &want, "after the daemon's GCs");
}

#[test]
fn the_daemon_collects_on_a_schedule_file() {
    if skip_fuse() {
        return;
    }
    the_daemon_collects_on_a_schedule(&TestStore::file());
}

#[test]
fn the_daemon_collects_on_a_schedule_seaweedfs() {
    if skip_fuse() {
        return;
    }
    the_daemon_collects_on_a_schedule(&TestStore::seaweed("gc-daemon"));
}

/// A GC that dies right after publishing its run record (before deleting) loses nothing, and
/// the next run finishes the work.
#[test]
fn a_gc_killed_after_publishing_loses_nothing() {
    if skip_fuse() {
        return;
    }
    let store = TestStore::file();
    let mut a = store.workspace("src", &[]);
    a.fast_gc();
    a.mount();
    a.keep_only_newest("src");
    for i in 0..4 {
        std::fs::write(a.path("f"), noise(100_000, i)).unwrap();
        a.sync();
    }
    let want = tree(&a.mp);
    a.unmount();
    std::thread::sleep(Duration::from_millis(1100));
    let mut crash = store.workspace("src", &[]);
    crash.fast_gc();
    crash
        .env
        .push(("OWSFS_CRASH_AT".into(), "gc-after-publish".into()));
    let out = crash.owsfs(&["gc", "--store", &a.store, "--grace", "1s"]);
    assert_eq!(
        out.status.code(),
        Some(137),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        store.keys("gc/runs/").len(),
        1,
        "the run record was written"
    );
    std::thread::sleep(Duration::from_millis(1100));
    let out = a.ok(&["gc", "--store", &a.store, "--grace", "1s", "--json"]);
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(r["packs_deleted"].as_u64() > Some(0), "{r}");
    a.ok(&["drill", "--store", &a.store, "--workspace", "src"]);
    let dest = a.dir.path().join("final");
    a.ok(&[
        "restore",
        "--store",
        &a.store,
        "--workspace",
        "src",
        &dest.to_string_lossy(),
    ]);
    assert_same_tree(&tree(&dest), &want, "after a crashed GC");
}

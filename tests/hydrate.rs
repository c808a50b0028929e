//! Lazy hydration, end to end: a workspace mounted on a fresh cache serves exactly the store's
//! bytes while they are fetched on demand (random reads, concurrent readers, writes into a
//! file not fetched yet), and a daemon killed half-way continues where it stopped. Each test
//! runs against a `file://` store and a real S3 server (SeaweedFS on loopback).

mod common;

#[path = "../testkit/seaweed.rs"]
mod seaweed;
#[path = "common/stores.rs"]
mod stores;

use std::os::unix::fs::FileExt;
use std::time::Duration;

use common::*;
use stores::TestStore;

const BIG: usize = 64 << 20;

/// Writes a 64 MiB file (and a few small ones) through a first node, and hands off.
fn seed(store: &TestStore) -> Vec<u8> {
    let data = noise(BIG, 7);
    let a = store.workspace("ws", &[]);
    a.mount();
    std::fs::create_dir_all(a.path("d/e")).unwrap();
    std::fs::write(a.path("d/e/big.bin"), &data).unwrap();
    std::fs::write(a.path("d/small.txt"), b"small\n").unwrap();
    std::os::unix::fs::symlink("e/big.bin", a.path("d/link")).unwrap();
    a.sync();
    a.unmount();
    data
}

fn hydration(ws: &Workspace) -> serde_json::Value {
    ws.status_json(false)["sync"]["hydration"].clone()
}

/// Random offsets of a file nothing has fetched yet return exactly its bytes, and only the
/// chunks around them are fetched.
fn random_reads(store: &TestStore) {
    let data = seed(store);
    let b = store.workspace("ws", &["--prefetch", "0"]);
    b.mount();
    let h = hydration(&b);
    assert_eq!(h["done"], false, "{h}");
    assert_eq!(
        std::fs::metadata(b.path("d/e/big.bin")).unwrap().len(),
        BIG as u64,
        "the size is right before any byte is fetched"
    );
    assert_eq!(std::fs::read(b.path("d/small.txt")).unwrap(), b"small\n");
    assert_eq!(
        std::fs::read_link(b.path("d/link")).unwrap().to_str(),
        Some("e/big.bin")
    );
    let f = std::fs::File::open(b.path("d/e/big.bin")).unwrap();
    let mut x = 12345u64;
    for _ in 0..200 {
        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        let off = (x >> 20) as usize % BIG;
        let len = ((x >> 8) as usize % 70_000 + 1).min(BIG - off);
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, off as u64).unwrap();
        assert!(buf == data[off..off + len], "bytes at {off}+{len} differ");
    }
    let fetched = hydration(&b)["fetched_bytes"].as_u64().unwrap();
    assert!(
        fetched < BIG as u64,
        "200 small reads fetched {fetched} bytes, the whole file is {BIG}"
    );
    drop(f);
    // The rest, in one go.
    assert!(std::fs::read(b.path("d/e/big.bin")).unwrap() == data);
    b.unmount();
}

#[test]
fn random_reads_of_an_unfetched_file_file() {
    if skip_fuse() {
        return;
    }
    random_reads(&TestStore::file());
}

#[test]
fn random_reads_of_an_unfetched_file_seaweedfs() {
    if skip_fuse() {
        return;
    }
    random_reads(&TestStore::seaweed("owsfs-hyd"));
}

/// Two processes reading the same unfetched file at once both get its bytes.
fn concurrent_readers(store: &TestStore) {
    let data = seed(store);
    let b = store.workspace("ws", &["--prefetch", "0"]);
    b.mount();
    let path = b.path("d/e/big.bin");
    let readers: Vec<_> = (0..2)
        .map(|i| {
            std::process::Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "dd if='{}' bs=1M iflag=direct status=none skip={} | sha256sum",
                    path.display(),
                    i
                ))
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let sums: Vec<String> = readers
        .into_iter()
        .map(|c| String::from_utf8(c.wait_with_output().unwrap().stdout).unwrap())
        .collect();
    let want = |skip: usize| {
        let out = std::process::Command::new("sha256sum")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().unwrap().write_all(&data[skip << 20..])?;
                c.wait_with_output()
            })
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(sums[0], want(0), "reader 1");
    assert_eq!(sums[1], want(1), "reader 2");
    let h = hydration(&b);
    let fetched = h["fetched_bytes"].as_u64().unwrap();
    assert!(
        fetched < 2 * BIG as u64,
        "two readers fetched {fetched} bytes: chunks were fetched twice ({h})"
    );
    b.unmount();
}

#[test]
fn two_readers_of_one_unfetched_file_file() {
    if skip_fuse() {
        return;
    }
    concurrent_readers(&TestStore::file());
}

#[test]
fn two_readers_of_one_unfetched_file_seaweedfs() {
    if skip_fuse() {
        return;
    }
    concurrent_readers(&TestStore::seaweed("owsfs-hyd"));
}

/// A write in the middle of an unfetched file keeps the store's bytes around it, locally and
/// in the generation it goes into; a truncate needs no fetch.
fn write_into_unfetched(store: &TestStore) {
    let data = seed(store);
    let b = store.workspace("ws", &["--prefetch", "0"]);
    b.mount();
    let mut want = data.clone();
    let mid = BIG / 2 + 12_345;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(b.path("d/e/big.bin"))
        .unwrap();
    f.write_all_at(b"written in the middle", mid as u64)
        .unwrap();
    want[mid..mid + 21].copy_from_slice(b"written in the middle");
    drop(f);
    let before = hydration(&b)["fetched_bytes"].as_u64().unwrap();
    assert!(before < (1 << 20), "a 21-byte write fetched {before} bytes");
    b.sync();
    assert!(
        std::fs::read(b.path("d/e/big.bin")).unwrap() == want,
        "local copy"
    );
    // A truncate of another unfetched copy fetches nothing.
    b.unmount();
    let c = store.workspace("ws", &["--prefetch", "0"]);
    c.mount();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(c.path("d/e/big.bin"))
        .unwrap();
    f.set_len(1000).unwrap();
    drop(f);
    assert_eq!(
        hydration(&c)["fetched_bytes"].as_u64(),
        Some(0),
        "truncate fetched"
    );
    assert!(std::fs::read(c.path("d/e/big.bin")).unwrap() == want[..1000]);
    std::fs::rename(c.path("d/small.txt"), c.path("small-moved.txt")).unwrap();
    c.sync();
    c.unmount();
    let d = store.workspace("ws", &["--prefetch", "0"]);
    d.mount();
    assert!(std::fs::read(d.path("d/e/big.bin")).unwrap() == want[..1000]);
    assert_eq!(
        std::fs::read(d.path("small-moved.txt")).unwrap(),
        b"small\n"
    );
    d.unmount();
    // And the write itself is in the store: a restore shows it.
    let dest = tempfile::tempdir().unwrap();
    let out = d.restore(Some(d.log_json().len() as u64 - 1), &dest.path().join("r"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_write_into_an_unfetched_file_keeps_the_rest_file() {
    if skip_fuse() {
        return;
    }
    write_into_unfetched(&TestStore::file());
}

#[test]
fn a_write_into_an_unfetched_file_keeps_the_rest_seaweedfs() {
    if skip_fuse() {
        return;
    }
    write_into_unfetched(&TestStore::seaweed("owsfs-hyd"));
}

/// `kill -9` while the background fetch runs; the remount of the same cache goes on from
/// what was already local and ends with every byte right.
fn kill_during_hydration(store: &TestStore) {
    let data = seed(store);
    let b = store.workspace("ws", &["--prefetch", "1", "--prefetch-bandwidth", "8MiB"]);
    b.mount();
    assert!(
        wait_for(Duration::from_secs(30), || {
            hydration(&b)["bytes_present"].as_u64().unwrap_or(0) > 8 << 20
        }),
        "the prefetch does not progress: {}",
        hydration(&b)
    );
    b.kill_daemon();
    b.mount();
    let h = hydration(&b);
    let present = h["bytes_present"].as_u64().unwrap();
    assert!(
        present >= 4 << 20,
        "the remount lost what was fetched before the kill: {h}"
    );
    assert!(std::fs::read(b.path("d/e/big.bin")).unwrap() == data);
    let fetched = hydration(&b)["fetched_bytes"].as_u64().unwrap();
    assert!(
        fetched < BIG as u64,
        "the remount fetched {fetched} bytes again (the file is {BIG})"
    );
    assert!(
        wait_for(Duration::from_secs(60), || hydration(&b)["done"] == true),
        "hydration never completes: {}",
        hydration(&b)
    );
    b.unmount();
    b.mount();
    assert_eq!(hydration(&b)["done"], true);
    assert!(std::fs::read(b.path("d/e/big.bin")).unwrap() == data);
    b.unmount();
}

#[test]
fn kill_9_during_hydration_then_remount_continues_file() {
    if skip_fuse() {
        return;
    }
    kill_during_hydration(&TestStore::file());
}

#[test]
fn kill_9_during_hydration_then_remount_continues_seaweedfs() {
    if skip_fuse() {
        return;
    }
    kill_during_hydration(&TestStore::seaweed("owsfs-hyd"));
}

/// A cache that holds an older generation fetches only what changed since: unchanged files
/// stay where they are (same backing inode), a changed file keeps the chunks that did not
/// move, and everything reads back as the newest generation has it, also on a third node
/// after the warm node writes on top. `whole`: the cache had all of the older generation;
/// otherwise a part (the first quarter of the big file, some directories). `crash`: the
/// first warm mount dies half-way through reconciling the root (old entries removed, new
/// ones made, nothing stored), and the next mount must still come out right.
fn warm_remount(store: &TestStore, whole: bool, crash: bool) {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let big = noise(BIG, 11);
    let a = store.workspace("ws", &[]);
    a.mount();
    for d in ["d/e", "keep/sub", "gone_dir/x", "kind"] {
        std::fs::create_dir_all(a.path(d)).unwrap();
    }
    std::fs::write(a.path("d/e/big.bin"), &big).unwrap();
    std::fs::write(a.path("keep/k1.txt"), b"kept\n").unwrap();
    std::fs::write(a.path("keep/sub/k2.bin"), noise(1 << 20, 12)).unwrap();
    std::fs::write(a.path("gone.txt"), b"gone\n").unwrap();
    std::fs::write(a.path("gone_dir/x/y.txt"), b"y\n").unwrap();
    std::fs::write(a.path("mode.txt"), b"mode\n").unwrap();
    std::fs::write(a.path("grow.bin"), noise(2 << 20, 13)).unwrap();
    std::os::unix::fs::symlink("d/e/big.bin", a.path("link")).unwrap();
    a.sync();
    a.unmount();

    // B holds that generation, wholly or in part.
    let mut b = store.workspace("ws", if whole { &[] } else { &["--prefetch", "0"] });
    b.mount();
    if whole {
        assert!(
            wait_for(Duration::from_secs(60), || hydration(&b)["done"] == true),
            "hydration never completes: {}",
            hydration(&b)
        );
    } else {
        let mut head = vec![0u8; BIG / 4];
        std::fs::File::open(b.path("d/e/big.bin"))
            .unwrap()
            .read_exact_at(&mut head, 0)
            .unwrap();
        assert!(head[..] == big[..BIG / 4]);
        assert_eq!(std::fs::read(b.path("keep/k1.txt")).unwrap(), b"kept\n");
    }
    let backing = b.cache.join("backing");
    let ino = |rel: &str| std::fs::symlink_metadata(backing.join(rel)).unwrap().ino();
    let big_ino = ino("d/e/big.bin");
    let k2_ino = whole.then(|| ino("keep/sub/k2.bin"));
    b.unmount();

    // A changes some of it.
    a.mount();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(a.path("d/e/big.bin"))
        .unwrap();
    f.write_all_at(&noise(1 << 20, 14), 32 << 20).unwrap();
    drop(f);
    let mut grow = std::fs::OpenOptions::new()
        .append(true)
        .open(a.path("grow.bin"))
        .unwrap();
    std::io::Write::write_all(&mut grow, &noise(1 << 20, 15)).unwrap();
    drop(grow);
    std::fs::remove_file(a.path("gone.txt")).unwrap();
    std::fs::remove_dir_all(a.path("gone_dir")).unwrap();
    std::fs::set_permissions(a.path("mode.txt"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::remove_dir(a.path("kind")).unwrap();
    std::fs::write(a.path("kind"), b"a file now\n").unwrap();
    std::fs::write(a.path("new.txt"), b"new\n").unwrap();
    std::fs::remove_file(a.path("link")).unwrap();
    std::os::unix::fs::symlink("grow.bin", a.path("link")).unwrap();
    let want = snapshot(&a.mp);
    a.sync();
    a.unmount();

    // B again: warm. Nothing is fetched at the mount; reading everything fetches the
    // changes only.
    b.extra = vec!["--prefetch".into(), "0".into()];
    if crash {
        b.env
            .push(("OWSFS_CRASH_AT".into(), "reconcile-midway".into()));
        let _ = b.try_mount();
        let _ = std::fs::read_dir(&b.mp).map(|d| d.count());
        assert!(
            wait_for(Duration::from_secs(30), || {
                let _ = owsfs(&["unmount", &b.mp.to_string_lossy()]);
                !is_mounted(&b.mp)
            }),
            "the crashed mount does not go away"
        );
        let log = std::fs::read_to_string(b.cache.join("owsfs.log")).unwrap_or_default();
        assert!(
            log.contains("crash point reconcile-midway"),
            "the crash point was not reached:{}",
            b.log_tail()
        );
        b.env.pop();
    }
    b.mount();
    assert_eq!(hydration(&b)["fetched_bytes"].as_u64(), Some(0));
    // About 2 MiB changed (plus the chunks around the change, trees and lists); a cache that
    // had only a quarter of the big file fetches the rest of it too.
    let limit = if whole {
        12 << 20
    } else {
        (BIG as u64) * 3 / 4 + (12 << 20)
    };
    let got = snapshot(&b.mp);
    assert!(
        got == want,
        "the warm node does not see the newest generation"
    );
    let fetched = hydration(&b)["fetched_bytes"].as_u64().unwrap();
    assert!(
        fetched < limit,
        "the warm remount fetched {fetched} bytes (at most {limit} expected)"
    );
    assert_eq!(
        ino("d/e/big.bin"),
        big_ino,
        "the changed file was made anew"
    );
    if let Some(k2) = k2_ino {
        assert_eq!(
            ino("keep/sub/k2.bin"),
            k2,
            "an unchanged file was made anew"
        );
    }
    let mode = std::fs::metadata(b.path("mode.txt")).unwrap().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(
        wait_for(Duration::from_secs(30), || hydration(&b)["done"] == true),
        "hydration never completes: {}",
        hydration(&b)
    );

    // B writes on top; a fresh node C sees B's generation.
    std::fs::write(b.path("keep/k1.txt"), b"changed on b\n").unwrap();
    std::fs::write(b.path("keep/sub/after.txt"), b"after\n").unwrap();
    let want = snapshot(&b.mp);
    b.sync();
    b.unmount();
    b.mount();
    assert_eq!(hydration(&b)["done"], true);
    assert!(snapshot(&b.mp) == want, "B's own remount differs");
    b.unmount();
    let c = store.workspace("ws", &[]);
    c.mount();
    assert!(
        snapshot(&c.mp) == want,
        "a fresh node does not see B's generation"
    );
    c.unmount();
}

#[test]
fn warm_remount_fetches_only_what_changed_file() {
    if skip_fuse() {
        return;
    }
    warm_remount(&TestStore::file(), true, false);
}

#[test]
fn warm_remount_fetches_only_what_changed_seaweedfs() {
    if skip_fuse() {
        return;
    }
    warm_remount(&TestStore::seaweed("owsfs-hyd"), true, false);
}

#[test]
fn warm_remount_after_a_crash_while_reconciling_file() {
    if skip_fuse() {
        return;
    }
    warm_remount(&TestStore::file(), true, true);
}

#[test]
fn warm_remount_after_a_crash_while_reconciling_seaweedfs() {
    if skip_fuse() {
        return;
    }
    warm_remount(&TestStore::seaweed("owsfs-hyd"), true, true);
}

#[test]
fn warm_remount_of_a_partly_hydrated_cache_file() {
    if skip_fuse() {
        return;
    }
    warm_remount(&TestStore::file(), false, false);
}

#[test]
fn warm_remount_of_a_partly_hydrated_cache_seaweedfs() {
    if skip_fuse() {
        return;
    }
    warm_remount(&TestStore::seaweed("owsfs-hyd"), false, false);
}

/// Two names of one file in two directories stay one file on a new node, after a change
/// made through one name only (the other directory is not rebuilt by that cut).
fn hard_links_across_directories(store: &TestStore) {
    use std::os::unix::fs::MetadataExt;
    let a = store.workspace("ws", &[]);
    a.mount();
    std::fs::create_dir_all(a.path("a")).unwrap();
    std::fs::create_dir_all(a.path("b")).unwrap();
    std::fs::write(a.path("a/f"), b"one\n").unwrap();
    std::fs::hard_link(a.path("a/f"), a.path("b/g")).unwrap();
    a.sync();
    std::fs::write(a.path("a/f"), b"two, longer\n").unwrap();
    std::fs::write(a.path("a/other"), b"x\n").unwrap();
    a.sync();
    a.unmount();
    let c = store.workspace("ws", &[]);
    c.mount();
    assert_eq!(std::fs::read(c.path("b/g")).unwrap(), b"two, longer\n");
    assert_eq!(std::fs::read(c.path("a/f")).unwrap(), b"two, longer\n");
    let (f, g) = (
        std::fs::metadata(c.path("a/f")).unwrap(),
        std::fs::metadata(c.path("b/g")).unwrap(),
    );
    assert_eq!(f.ino(), g.ino(), "the two names became two files");
    // A cut on this node rebuilds a/ only (b/ keeps the entry node A wrote).
    std::fs::write(c.path("a/new"), b"n\n").unwrap();
    c.sync();
    c.unmount();
    let d = store.workspace("ws", &[]);
    d.mount();
    let (f, g) = (
        std::fs::metadata(d.path("a/f")).unwrap(),
        std::fs::metadata(d.path("b/g")).unwrap(),
    );
    assert_eq!(
        f.ino(),
        g.ino(),
        "the two names became two files on a third node"
    );
    std::fs::write(d.path("b/g"), b"three\n").unwrap();
    assert_eq!(std::fs::read(d.path("a/f")).unwrap(), b"three\n");
    d.unmount();
}

#[test]
fn hard_links_across_directories_file() {
    if skip_fuse() {
        return;
    }
    hard_links_across_directories(&TestStore::file());
}

/// Two files of an older generation that the newer one makes one (hard-linked) come back as
/// one file on a warm remount.
#[test]
fn warm_remount_links_names_that_became_one_file() {
    use std::os::unix::fs::MetadataExt;
    if skip_fuse() {
        return;
    }
    let store = TestStore::file();
    let a = store.workspace("ws", &[]);
    a.mount();
    std::fs::create_dir_all(a.path("x")).unwrap();
    std::fs::create_dir_all(a.path("y")).unwrap();
    std::fs::write(a.path("x/a"), b"same\n").unwrap();
    std::fs::write(a.path("y/b"), b"same\n").unwrap();
    a.sync();
    a.unmount();
    let b = store.workspace("ws", &[]);
    b.mount();
    assert!(
        wait_for(Duration::from_secs(30), || hydration(&b)["done"] == true),
        "hydration never completes: {}",
        hydration(&b)
    );
    b.unmount();
    a.mount();
    std::fs::remove_file(a.path("y/b")).unwrap();
    std::fs::hard_link(a.path("x/a"), a.path("y/b")).unwrap();
    a.sync();
    a.unmount();
    b.mount();
    let (x, y) = (
        std::fs::metadata(b.path("x/a")).unwrap(),
        std::fs::metadata(b.path("y/b")).unwrap(),
    );
    assert_eq!(x.ino(), y.ino(), "the two names stayed two files");
    std::fs::write(b.path("y/b"), b"changed\n").unwrap();
    assert_eq!(std::fs::read(b.path("x/a")).unwrap(), b"changed\n");
    b.unmount();
}

/// A directory lazy hydration has not fetched yet keeps its subtree in the next generation
/// even when the dirty state names its path: a chmod of it (which does not fetch it), and a
/// rename of it onto a path the dirty state still holds (an rmdir and a rename keep their old
/// places marked). Before the fix, the cut listed the empty backing directory and committed
/// it empty: the files below it were gone from the store.
fn pending_directory_keeps_its_subtree(store: &TestStore) {
    let a = store.workspace("ws", &[]);
    a.mount();
    std::fs::create_dir_all(a.path("d/sub")).unwrap();
    std::fs::create_dir_all(a.path("e/sub")).unwrap();
    std::fs::write(a.path("d/f1"), b"one\n").unwrap();
    std::fs::write(a.path("d/sub/f2"), b"two\n").unwrap();
    std::fs::write(a.path("e/f3"), b"three\n").unwrap();
    std::fs::write(a.path("e/sub/f4"), b"four\n").unwrap();
    a.sync();
    a.unmount();

    // A fresh node that fetches nothing in the background: d and e stay pending.
    let b = store.workspace("ws", &["--prefetch", "0"]);
    b.mount();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(b.path("d"), std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::create_dir(b.path("m")).unwrap();
    std::fs::remove_dir(b.path("m")).unwrap();
    std::fs::rename(b.path("e"), b.path("m")).unwrap();
    let g = b.sync();
    b.unmount();

    let dest = b.dir.path().join("restored");
    let out = b.restore(Some(g), &dest);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (path, want) in [
        ("d/f1", "one\n"),
        ("d/sub/f2", "two\n"),
        ("m/f3", "three\n"),
        ("m/sub/f4", "four\n"),
    ] {
        assert_eq!(
            std::fs::read_to_string(dest.join(path)).unwrap_or_default(),
            want,
            "{path} in generation {g}"
        );
    }
    let mode = std::fs::metadata(dest.join("d"))
        .unwrap()
        .permissions()
        .mode()
        & 0o7777;
    assert_eq!(mode, 0o700, "the chmod of the pending directory");
    assert!(!dest.join("e").exists());
}

#[test]
fn a_pending_directory_keeps_its_subtree_file() {
    if skip_fuse() {
        return;
    }
    pending_directory_keeps_its_subtree(&TestStore::file());
}

#[test]
fn a_pending_directory_keeps_its_subtree_seaweedfs() {
    if skip_fuse() {
        return;
    }
    pending_directory_keeps_its_subtree(&TestStore::seaweed("owsfs-pending"));
}

/// Reading a file that is fetched lazily does not change its mtime: not through the mount
/// after a remount (when the kernel's cached attributes are gone), nor in the backing file
/// (which a crash's reconciliation would take for a local change). Found by the torture
/// harness's reconciliation after a crash.
#[test]
fn fetching_a_file_keeps_its_mtime() {
    if skip_fuse() {
        return;
    }
    let store = TestStore::file();
    let a = store.workspace("w", &[]);
    a.mount();
    std::fs::write(a.path("old.bin"), noise(3 << 20, 5)).unwrap();
    let old = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_577_836_800);
    std::fs::File::options()
        .write(true)
        .open(a.path("old.bin"))
        .unwrap()
        .set_modified(old)
        .unwrap();
    a.unmount();
    let b = store.workspace("w", &["--prefetch", "0"]);
    b.mount();
    let mut buf = vec![0u8; 4096];
    std::fs::File::open(b.path("old.bin"))
        .unwrap()
        .read_exact_at(&mut buf, 1 << 20)
        .unwrap();
    assert_eq!(
        std::fs::metadata(b.backing("old.bin"))
            .unwrap()
            .modified()
            .unwrap(),
        old,
        "the fetch changed the backing file's mtime"
    );
    b.unmount();
    b.mount();
    assert_eq!(
        std::fs::metadata(b.path("old.bin"))
            .unwrap()
            .modified()
            .unwrap(),
        old,
        "the mtime seen through the mount changed after a read"
    );
    b.unmount();
}

/// What a system without file handles (macOS) does instead of lazy hydration, forced here
/// by `OWSFS_RESTORE_IN_FULL`: a mount on a new cache restores the newest generation in full
/// before it serves, then works as any mount: its changes commit, and a next node sees them.
/// A warm remount (which would need handles) and a live rollback are refused.
fn restore_in_full(store: &TestStore) {
    let data = seed(store);
    let mut b = store.workspace("ws", &["--prefetch", "0"]);
    // A crash once the tree is restored, before the state records it: the next mount
    // removes the partial tree and restores again. A crash just after: it goes on.
    let full = ("OWSFS_RESTORE_IN_FULL".to_string(), "1".to_string());
    for point in ["full-restore-before-commit", "full-restore-after-commit"] {
        b.env = store.env.clone();
        b.env.push(full.clone());
        b.env.push(("OWSFS_CRASH_AT".into(), point.into()));
        let out = b.try_mount();
        assert!(!out.status.success(), "{point}: the mount died there");
        assert!(
            b.cache.join("restore.pending").exists(),
            "{point}: the marker stays"
        );
    }
    b.env = store.env.clone();
    b.env.push(full);
    b.mount();
    assert!(!b.cache.join("restore.pending").exists());
    assert!(
        b.log_tail().contains("interrupted full restore"),
        "{}",
        b.log_tail()
    );
    // Everything is in the cache before the first read: nothing pending, the bytes on disk.
    assert_eq!(
        std::fs::read(b.cache.join("backing/d/e/big.bin")).unwrap(),
        data,
        "restored before any read"
    );
    assert_eq!(std::fs::read(b.path("d/small.txt")).unwrap(), b"small\n");
    assert_eq!(
        std::fs::read_link(b.path("d/link")).unwrap().to_str(),
        Some("e/big.bin")
    );
    std::fs::write(b.path("d/small.txt"), b"changed\n").unwrap();
    std::fs::write(b.path("new.txt"), b"new\n").unwrap();
    b.sync();
    b.unmount();
    // The next node (lazy) sees the change; the unchanged big file kept its content.
    let c = store.workspace("ws", &[]);
    c.mount();
    assert_eq!(std::fs::read(c.path("d/small.txt")).unwrap(), b"changed\n");
    assert_eq!(std::fs::read(c.path("new.txt")).unwrap(), b"new\n");
    assert_eq!(std::fs::read(c.path("d/e/big.bin")).unwrap(), data);
    std::fs::write(c.path("later.txt"), b"later\n").unwrap();
    c.sync();
    c.unmount();
    // b's cache holds an older generation now: fetching only the difference needs handles.
    let out = b.try_mount();
    assert!(!out.status.success(), "a warm remount without handles");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("new --cache"), "{err}");
}

#[test]
fn restore_in_full_where_there_are_no_file_handles_file() {
    if skip_fuse() {
        return;
    }
    restore_in_full(&TestStore::file());
}

#[test]
fn restore_in_full_where_there_are_no_file_handles_seaweedfs() {
    if skip_fuse() {
        return;
    }
    restore_in_full(&TestStore::seaweed("owsfs-full"));
}

/// Many small files hydrate with a few ranged GETs, not one per file: the commit packs them
/// back to back, and the prefetch fetches runs of them in pack order. Every byte matches.
fn small_files_in_few_gets(store: &TestStore) {
    const FILES: u64 = 600;
    let a = store.workspace("small", &[]);
    a.mount();
    let mut want = std::collections::BTreeMap::new();
    for d in 0..6 {
        std::fs::create_dir(a.path(&format!("d{d}"))).unwrap();
    }
    for i in 0..FILES {
        let name = format!("d{}/f{i:04}.bin", i % 6);
        // 3-12 KiB of noise each: one chunk per file, stored plain.
        let data = noise(3072 + (i as usize * 1531) % 9216, 1000 + i);
        std::fs::write(a.path(&name), &data).unwrap();
        want.insert(name, data);
    }
    a.sync();
    a.unmount();

    let b = store.workspace("small", &[]);
    b.mount();
    assert!(
        wait_for(Duration::from_secs(60), || hydration(&b)["done"] == true),
        "hydration never completes: {}",
        hydration(&b)
    );
    let h = hydration(&b);
    let fetches = h["fetches"].as_u64().unwrap();
    assert!(
        fetches * 10 <= FILES,
        "{fetches} ranged GETs for {FILES} small files (batches expected): {h}"
    );
    for (name, data) in &want {
        assert!(
            std::fs::read(b.path(name)).unwrap() == *data,
            "{name} differs after hydration"
        );
    }
    b.unmount();
}

#[test]
fn small_files_hydrate_in_few_gets_file() {
    if skip_fuse() {
        return;
    }
    small_files_in_few_gets(&TestStore::file());
}

#[test]
fn small_files_hydrate_in_few_gets_seaweedfs() {
    if skip_fuse() {
        return;
    }
    small_files_in_few_gets(&TestStore::seaweed("owsfs-hydrate"));
}

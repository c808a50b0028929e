//! The mount's lifecycle: whichever phase fails after the lease was taken, the mount gives
//! the lease back and leaves nothing mounted, so another node mounts at once (without
//! `--wait` or `--steal`). The failures come from fail points (`FAILPOINTS=NAME=return`,
//! `src/failpoints.rs`) and from a real refusal (a cache of another workspace).

mod common;

#[path = "../testkit/seaweed.rs"]
mod seaweed;
#[path = "common/stores.rs"]
mod stores;

use common::*;
use stores::TestStore;

/// The phases that can fail after the lease is taken, as fail points.
const POINTS: &[&str] = &["mount-after-lease", "mount-services", "mount-before-ready"];

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A mount of workspace `name` that fails at `point` leaves the lease free: another node
/// mounts the workspace at once, sees what was there, and can write.
fn failed_mount_gives_the_lease_back(store: &TestStore, name: &str, point: &str) {
    // Written by a first node, so the failing mount has a generation to prepare.
    let first = store.workspace(name, &[]);
    first.mount();
    std::fs::write(first.path("kept.txt"), b"kept\n").unwrap();
    first.unmount();

    // An hour's TTL: a lease that is not given back would refuse the next mount for an hour.
    let mut a = store.workspace(name, &["--lease-ttl", "1h"]);
    a.env.push(("FAILPOINTS".into(), format!("{point}=return")));
    let out = a.try_mount();
    assert!(
        !out.status.success(),
        "{point}: the mount should have failed{}",
        a.log_tail()
    );
    assert!(
        stderr(&out).contains(&format!("fail point {point}")),
        "{point}: {}",
        stderr(&out)
    );
    assert!(
        !is_mounted(&a.mp),
        "{point}: a failed mount left a mount behind"
    );

    let b = store.workspace(name, &[]);
    let out = b.try_mount();
    assert!(
        out.status.success(),
        "{point}: the lease was not given back: {}{}",
        stderr(&out),
        b.log_tail()
    );
    assert_eq!(std::fs::read(b.path("kept.txt")).unwrap(), b"kept\n");
    std::fs::write(b.path("after.txt"), b"b\n").unwrap();
    b.sync();
    b.unmount();
}

#[test]
fn a_mount_that_fails_after_taking_the_lease_leaves_none_held_file() {
    if skip_fuse() {
        return;
    }
    for (i, point) in POINTS.iter().enumerate() {
        let store = TestStore::file();
        failed_mount_gives_the_lease_back(&store, &format!("w{i}"), point);
    }
}

#[test]
fn a_mount_that_fails_after_taking_the_lease_leaves_none_held_seaweedfs() {
    if skip_fuse() {
        return;
    }
    let store = TestStore::seaweed("lifecycle");
    for (i, point) in POINTS.iter().enumerate() {
        failed_mount_gives_the_lease_back(&store, &format!("w{i}"), point);
    }
}

/// A real refusal after the lease: the cache holds another workspace. The lease of the
/// workspace asked for is given back.
#[test]
fn a_cache_of_another_workspace_is_refused_and_the_lease_given_back() {
    if skip_fuse() {
        return;
    }
    let store = TestStore::file();
    let mut a = store.workspace("one", &["--lease-ttl", "1h"]);
    a.mount();
    std::fs::write(a.path("f"), b"1").unwrap();
    a.unmount();
    a.name = "two".into();
    let out = a.try_mount();
    assert!(
        !out.status.success(),
        "mounted workspace two on a cache of one"
    );
    assert!(
        stderr(&out).contains("holds workspace \"one\""),
        "{}",
        stderr(&out)
    );
    assert!(!is_mounted(&a.mp));
    let b = store.workspace("two", &[]);
    let out = b.try_mount();
    assert!(
        out.status.success(),
        "the lease of two was not given back: {}{}",
        stderr(&out),
        b.log_tail()
    );
    b.unmount();
}

/// The daemon leaves its umask alone: a new workspace's root is 0755, and nothing in the
/// cache or in a `file://` store becomes writable by other users (a daemon that cleared its
/// umask made both world-writable: any local user could then delete generations or write
/// lease records).
#[test]
fn nothing_the_daemon_creates_is_world_writable() {
    use std::os::unix::fs::PermissionsExt;
    if skip_fuse() {
        return;
    }
    let store = TestStore::file();
    let a = store.workspace("perm", &[]);
    a.mount();
    let root = std::fs::metadata(&a.mp).unwrap().permissions().mode() & 0o7777;
    assert_eq!(root, 0o755, "the root of a new workspace");
    std::fs::write(a.path("f"), b"x").unwrap();
    a.sync();
    a.unmount();
    let mut writable = Vec::new();
    for top in [store.root(), a.cache.clone()] {
        let mut stack = vec![top];
        while let Some(p) = stack.pop() {
            let md = std::fs::symlink_metadata(&p).unwrap();
            if md.file_type().is_symlink() {
                continue;
            }
            if md.permissions().mode() & 0o002 != 0 {
                writable.push(p.clone());
            }
            if md.is_dir() {
                for e in std::fs::read_dir(&p).unwrap() {
                    stack.push(e.unwrap().path());
                }
            }
        }
    }
    assert!(writable.is_empty(), "writable by everyone: {writable:?}");
}

/// `umount MOUNTPOINT` then at once `mount` again (plain umount(8), as fstab and systemd do):
/// the old daemon is still committing the last changes, and the new mount waits for it
/// (saying so) instead of failing with "in use by another owsfs daemon". Found by running a
/// standard conformance suite against owsfs.
#[test]
fn a_mount_right_after_umount_waits_for_the_last_commit() {
    if skip_fuse() {
        return;
    }
    let mut ws = Workspace::unmounted(None, "ws");
    ws.extra = vec!["--commit-interval".into(), "1h".into()];
    // Every store request takes 150 ms more: the last commit takes a while.
    ws.env.push((
        "OWSFS_FAULTS".into(),
        "rate=1,seed=3,kinds=slow,slow_ms=150".into(),
    ));
    ws.mount();
    for i in 0..20 {
        std::fs::write(ws.path(&format!("f{i}")), format!("file {i}\n")).unwrap();
    }
    let want = tree(&ws.mp);
    let out = std::process::Command::new("umount")
        .arg(&ws.mp)
        .output()
        .unwrap();
    assert!(out.status.success(), "umount: {}", stderr(&out));
    let out = ws.try_mount();
    let err = stderr(&out);
    assert!(
        out.status.success(),
        "the mount after umount failed: {err}{}",
        ws.log_tail()
    );
    assert!(
        err.contains("finishing its last commit"),
        "the mount did not say it waited (the old daemon was already gone?): {err}"
    );
    assert_same_tree(&tree(&ws.mp), &want, "after the remount");
    ws.unmount();
}

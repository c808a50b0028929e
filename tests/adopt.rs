//! `owsfs mount DIR --adopt`: a directory with files in it becomes the workspace in place.
//! The first generation uploads what was there; a crash, a remount and a handoff to another
//! node keep everything; after unmount DIR is a plain directory with the latest contents; an
//! existing workspace is adopted only by a directory that holds exactly its newest
//! generation; changes made while nothing was mounted are committed at the next mount. The
//! main test runs against a `file://` store and a real S3 server (SeaweedFS on loopback).

mod common;

#[path = "../testkit/seaweed.rs"]
mod seaweed;
#[path = "common/stores.rs"]
mod stores;

use std::fs;
use std::path::Path;
use std::process::Output;

use common::*;
use stores::TestStore;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A project as a user has it: a SQLite database, a source tree, a symlink.
fn project(dir: &Path) {
    write_db(dir, 50);
    fs::write(dir.join("README"), b"hello\n").unwrap();
    fs::create_dir(dir.join("src")).unwrap();
    fs::write(dir.join("src/data.bin"), noise(300_000, 1)).unwrap();
    std::os::unix::fs::symlink("README", dir.join("link")).unwrap();
}

/// The newest generation of `ws`'s workspace, restored into a new directory.
fn restored(ws: &Workspace, what: &str) -> Snapshot {
    let dest = tempfile::Builder::new()
        .prefix("owsfs-adopt-restore-")
        .tempdir()
        .unwrap();
    let out = ws.restore(None, &dest.path().join("r"));
    assert!(out.status.success(), "{what}: restore: {}", stderr(&out));
    tree(&dest.path().join("r"))
}

fn adopt_crash_remount_handoff(store: &TestStore) {
    let a = store.workspace("proj", &["--adopt"]);
    project(&a.mp);
    let original = tree(&a.mp);

    // Without --adopt, a directory with files in it is refused, and the refusal says how.
    let plain = store.workspace("proj", &[]);
    let out = plain.owsfs(&[
        "mount",
        &a.mp.to_string_lossy(),
        "--cache",
        &plain.cache.to_string_lossy(),
        "--store",
        &store.url,
        "--workspace",
        "proj",
    ]);
    assert!(!out.status.success(), "a non-empty mountpoint was mounted");
    assert!(stderr(&out).contains("--adopt"), "{}", stderr(&out));
    assert!(!is_mounted(&a.mp));

    // Adopted: the mount shows the files that were there, and the first generation has them.
    let out = a.try_mount();
    assert!(out.status.success(), "{}{}", stderr(&out), a.log_tail());
    assert!(
        stderr(&out).contains("in place"),
        "the mount does not say it adopted: {}",
        stderr(&out)
    );
    assert_same_tree(
        &tree(&a.mp),
        &original,
        "the adopted files through the mount",
    );
    assert!(
        !a.cache.join("backing/README").exists(),
        "the files were copied"
    );
    a.sync();
    assert_same_tree(&restored(&a, "first"), &original, "the first generation");

    // Changed through the mount; one more write completes after the last sync.
    write_db(&a.mp, 25);
    fs::write(a.path("src/new.txt"), b"new\n").unwrap();
    fs::remove_file(a.path("README")).unwrap();
    a.sync();
    fs::write(a.path("after-sync"), b"completed before the crash\n").unwrap();
    let before_crash = tree(&a.mp);

    // kill -9: the directory is plain again and holds everything that completed.
    a.kill_daemon();
    assert_same_tree(&tree(&a.mp), &before_crash, "the directory after the crash");
    assert_eq!(db_rows(&a.mp, "after the crash").len(), 75);

    // Remounted on the same cache: the same files, and the tail reaches the store.
    a.mount();
    assert_same_tree(&tree(&a.mp), &before_crash, "the remount after the crash");
    a.sync();
    assert_same_tree(
        &restored(&a, "after the crash"),
        &before_crash,
        "the commit after the crash",
    );
    a.unmount();
    assert_same_tree(
        &tree(&a.mp),
        &before_crash,
        "the directory after the unmount",
    );

    // Handed off: another node mounts the workspace (an empty mountpoint, its own cache).
    let b = store.workspace("proj", &[]);
    b.mount();
    assert_same_tree(&tree(&b.mp), &before_crash, "the other node");
    assert_eq!(db_rows(&b.mp, "the other node").len(), 75);
    fs::write(b.path("from-b"), b"b\n").unwrap();
    b.unmount();

    // The first directory no longer holds the newest generation: adopting it is refused,
    // naming the difference, and it is left as it was.
    let out = a.try_mount();
    assert!(!out.status.success(), "a stale directory was adopted");
    let err = stderr(&out);
    assert!(
        err.contains("does not hold exactly") && err.contains("from-b"),
        "{err}"
    );
    assert!(!is_mounted(&a.mp));
    assert_same_tree(&tree(&a.mp), &before_crash, "the refused directory");
}

#[test]
fn adopt_change_crash_remount_and_hand_off_file() {
    if skip_fuse() {
        return;
    }
    adopt_crash_remount_handoff(&TestStore::file());
}

#[test]
fn adopt_change_crash_remount_and_hand_off_seaweedfs() {
    if skip_fuse() {
        return;
    }
    adopt_crash_remount_handoff(&TestStore::seaweed("owsfs-adopt"));
}

/// An existing workspace is adopted only by a directory that holds exactly its newest
/// generation; then the directory's later offline changes are committed at the next mount,
/// and the cache stays bound to its directory.
#[test]
fn an_existing_workspace_is_adopted_only_by_its_newest_generation() {
    if skip_fuse() {
        return;
    }
    let a = Workspace::new();
    fs::write(a.path("f"), b"one\n").unwrap();
    fs::create_dir(a.path("d")).unwrap();
    fs::write(a.path("d/g"), noise(70_000, 2)).unwrap();
    a.sync();
    a.unmount();

    let mut c = Workspace::unmounted(Some(&a.store), "ws");
    c.extra = vec!["--adopt".into()];
    // Other contents: refused, naming the first difference; nothing changes.
    fs::write(c.mp.join("f"), b"two\n").unwrap();
    let out = c.try_mount();
    assert!(!out.status.success(), "other contents were adopted");
    assert!(stderr(&out).contains("d is missing"), "{}", stderr(&out));
    assert_eq!(fs::read(c.mp.join("f")).unwrap(), b"two\n");
    assert!(!is_mounted(&c.mp));

    // The newest generation, restored there: adopted.
    fs::remove_dir_all(&c.mp).unwrap();
    let out = a.restore(None, &c.mp);
    assert!(out.status.success(), "{}", stderr(&out));
    c.mount();
    fs::write(c.path("h"), b"from c\n").unwrap();
    c.sync();
    c.unmount();

    // Changed while nothing is mounted: the next mount commits it.
    fs::write(c.mp.join("f"), b"edited offline\n").unwrap();
    fs::remove_file(c.mp.join("d/g")).unwrap();
    fs::write(c.mp.join("new"), b"made offline\n").unwrap();
    let offline = tree(&c.mp);
    c.mount();
    c.sync();
    c.unmount();
    assert_same_tree(
        &restored(&a, "offline changes"),
        &offline,
        "the offline changes",
    );

    // The cache adopted that directory and no other; a plain mount of it is refused.
    let other = a.dir.path().join("other");
    fs::create_dir(&other).unwrap();
    for extra in [&["--adopt"][..], &[]] {
        let mut args = vec![
            "mount",
            other.to_str().unwrap(),
            "--cache",
            c.cache.to_str().unwrap(),
            "--store",
            &c.store,
            "--workspace",
            "ws",
        ];
        args.extend(extra);
        let out = c.owsfs(&args);
        assert!(!out.status.success(), "{args:?} was mounted");
        assert!(stderr(&out).contains("adopted"), "{}", stderr(&out));
        assert!(!is_mounted(&other));
    }
}

/// Unmounts the owsfs mount at the path, then the volume under it, when dropped.
struct Volume(std::path::PathBuf);

impl Drop for Volume {
    fn drop(&mut self) {
        drop(MountGuard(self.0.clone()));
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// A directory that is a mount of its own (a container's volume) is adopted too, and keeps
/// the latest contents once unmounted.
#[test]
fn a_volume_mountpoint_is_adopted() {
    if skip_fuse() {
        return;
    }
    let mut ws = Workspace::unmounted(None, "vol");
    ws.extra = vec!["--adopt".into()];
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64m", "tmpfs"])
        .arg(&ws.mp)
        .status()
        .unwrap();
    assert!(mounted.success());
    let _volume = Volume(ws.mp.clone());
    // A mount below the directory is refused, also when the directory is named through a
    // symlink.
    let below = ws.mp.join("sub");
    fs::create_dir(&below).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&below)
        .status()
        .unwrap();
    assert!(mounted.success());
    let _below = Volume(below.clone());
    let link = ws.dir.path().join("link");
    std::os::unix::fs::symlink(&ws.mp, &link).unwrap();
    let out = ws.owsfs(&[
        "mount",
        &link.to_string_lossy(),
        "--adopt",
        "--cache",
        &ws.cache.to_string_lossy(),
        "--store",
        &ws.store,
        "--workspace",
        "vol",
    ]);
    assert!(!out.status.success(), "adopted with a mount below");
    assert!(stderr(&out).contains("mount below it"), "{}", stderr(&out));
    drop(_below);
    fs::remove_dir(&below).unwrap();
    write_db(&ws.mp, 10);
    ws.mount();
    write_db(&ws.mp, 5);
    ws.sync();
    ws.unmount();
    assert_eq!(db_rows(&ws.mp, "the volume").len(), 15);
    let want = tree(&ws.mp);
    assert_same_tree(
        &restored(&ws, "the volume"),
        &want,
        "the volume's generation",
    );
}

/// What an adopted directory refuses: a process that holds the directory before the mount, a
/// store inside it, a live rollback, a read-only mount of its cache; and a refused adoption
/// leaves its cache free for another use.
#[test]
fn what_an_adopted_directory_refuses() {
    if skip_fuse() {
        return;
    }
    let mut ws = Workspace::unmounted(None, "refusals");
    ws.extra = vec!["--adopt".into()];
    fs::write(ws.mp.join("f"), b"mine\n").unwrap();
    let mp = ws.mp.to_string_lossy().into_owned();

    // A process working inside the directory would write beside the mount.
    let mut holder = std::process::Command::new("sleep")
        .arg("60")
        .current_dir(&ws.mp)
        .spawn()
        .unwrap();
    let out = ws.try_mount();
    let _ = holder.kill();
    let _ = holder.wait();
    assert!(!out.status.success(), "adopted while a process held it");
    assert!(
        stderr(&out).contains("in use") && stderr(&out).contains("sleep"),
        "{}",
        stderr(&out)
    );
    assert!(!is_mounted(&ws.mp));

    // A file:// store inside the directory would be written through the mount.
    let inner = format!("file://{}/.store", ws.mp.display());
    let out = ws.owsfs(&[
        "mount",
        &mp,
        "--adopt",
        "--cache",
        &ws.dir.path().join("c-inner").to_string_lossy(),
        "--store",
        &inner,
        "--workspace",
        "refusals",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("inside the adopted directory"),
        "{}",
        stderr(&out)
    );

    // That cache was refused before it held anything: it serves another directory freely.
    let other = ws.dir.path().join("other");
    fs::create_dir(&other).unwrap();
    let _guard = MountGuard(other.clone());
    let out = ws.owsfs(&[
        "mount",
        &other.to_string_lossy(),
        "--cache",
        &ws.cache.to_string_lossy(),
        "--store",
        &ws.store,
        "--workspace",
        "elsewhere",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        owsfs(&["unmount", &other.to_string_lossy()])
            .status
            .success()
    );
    fs::remove_dir_all(&ws.cache).unwrap();

    // Adopted: no live rollback (it would replace the directory's own files).
    ws.mount();
    let g = ws.sync();
    fs::write(ws.path("g"), b"later\n").unwrap();
    ws.sync();
    let out = ws.owsfs(&["rollback", &mp, &g.to_string()]);
    assert!(
        !out.status.success(),
        "an adopted directory was rolled back live"
    );
    assert!(
        stderr(&out).contains("adopted directory"),
        "{}",
        stderr(&out)
    );
    assert_eq!(fs::read(ws.path("g")).unwrap(), b"later\n");
    ws.unmount();

    // Its cache serves no read-only mount.
    let ro = ws.dir.path().join("ro");
    fs::create_dir(&ro).unwrap();
    let _ro_guard = MountGuard(ro.clone());
    let out = ws.owsfs(&[
        "mount",
        &ro.to_string_lossy(),
        "--read-only",
        "--cache",
        &ws.cache.to_string_lossy(),
        "--store",
        &ws.store,
        "--workspace",
        "refusals",
    ]);
    assert!(
        !out.status.success(),
        "a read-only mount used the adopted cache"
    );
    assert!(stderr(&out).contains("adopted"), "{}", stderr(&out));
    assert_eq!(fs::read(ws.mp.join("g")).unwrap(), b"later\n");
}

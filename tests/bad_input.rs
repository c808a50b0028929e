//! Bad input to `owsfs mount`: each gets a clear error and leaves nothing mounted.

mod common;

use std::process::Command;

use common::*;

fn mount_fails(mp: &std::path::Path, cache: &std::path::Path, extra: &[&str]) -> String {
    let was_mounted = is_mounted(mp);
    // Should the mount wrongly succeed, it is still removed when the assertion fails.
    let _guard = (!was_mounted).then(|| MountGuard(mp.to_path_buf()));
    let mut args = vec![
        "mount",
        mp.to_str().unwrap(),
        "--cache",
        cache.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = owsfs(&args);
    assert!(!out.status.success(), "mount unexpectedly succeeded");
    assert_eq!(
        is_mounted(mp),
        was_mounted,
        "a failed mount changed what is mounted"
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    for line in err.lines() {
        assert!(
            line.chars().count() <= 300,
            "an error line over 300 characters: {line}"
        );
    }
    err
}

#[test]
fn mountpoint_missing_not_empty_or_already_mounted() {
    if skip_fuse() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");

    let err = mount_fails(&dir.path().join("missing"), &cache, &[]);
    assert!(err.contains("does not exist"), "{err}");

    let full = dir.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("x"), b"x").unwrap();
    let err = mount_fails(&full, &cache, &[]);
    assert!(err.contains("not empty"), "{err}");

    let file = dir.path().join("file");
    std::fs::write(&file, b"").unwrap();
    let err = mount_fails(&file, &cache, &[]);
    assert!(err.contains("not a directory"), "{err}");

    let err = mount_fails(&full, &cache, &["-o", "no_such_option"]);
    assert!(err.contains("unknown mount option"), "{err}");

    // Mounted once; a second mount on the same place, or of the same cache, is refused.
    let ws = Workspace::new();
    let err = mount_fails(&ws.mp, &dir.path().join("other-cache"), &[]);
    assert!(err.contains("already a mountpoint"), "{err}");
    assert!(is_mounted(&ws.mp), "the first mount is untouched");
    let mp2 = dir.path().join("mp2");
    std::fs::create_dir(&mp2).unwrap();
    let err = mount_fails(&mp2, &ws.cache, &[]);
    assert!(err.contains("in use by another owsfs daemon"), "{err}");
}

#[test]
fn unwritable_cache_is_refused() {
    if skip_fuse() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ro = dir.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    // A read-only filesystem refuses even root.
    run_ok(
        Command::new("mount")
            .args(["-t", "tmpfs", "-o", "ro,size=1m", "owsfs-test-ro"])
            .arg(&ro),
    );
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(ro.clone());
    let mp = dir.path().join("mp");
    std::fs::create_dir(&mp).unwrap();
    let err = mount_fails(&mp, &ro.join("cache"), &[]);
    assert!(
        err.contains("cache directory") && err.contains("--cache"),
        "{err}"
    );

    // A cache path that is a file.
    let file = dir.path().join("afile");
    std::fs::write(&file, b"").unwrap();
    let err = mount_fails(&mp, &file, &["--foreground"]);
    assert!(err.contains("cache"), "{err}");

    // A non-empty directory that is not an owsfs cache is not taken over.
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("precious"), b"data").unwrap();
    let err = mount_fails(&mp, &other, &[]);
    assert!(err.contains("not an owsfs cache"), "{err}");
    assert_eq!(std::fs::read(other.join("precious")).unwrap(), b"data");
}

#[test]
#[cfg(target_os = "linux")] // mount(8) helpers, /proc/self/mountinfo, unshare
fn missing_dev_fuse_is_explained() {
    if skip_fuse() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mp = dir.path().join("mp");
    std::fs::create_dir(&mp).unwrap();
    // In a private mount namespace, an empty /dev hides /dev/fuse from the daemon only.
    let script = format!(
        "mount -t tmpfs owsfs-test-dev /dev && {} mount {} --cache {}; echo \"rc=$?\"; \
         grep -c ' {} ' /proc/self/mountinfo || true",
        OWSFS,
        mp.display(),
        dir.path().join("cache").display(),
        mp.display()
    );
    let out = run_ok(Command::new("unshare").args(["-m", "sh", "-c", &script]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/dev/fuse"), "{stderr}");
    assert!(stdout.contains("rc=1"), "{stdout}");
    assert!(
        stdout.trim_end().ends_with('0'),
        "nothing mounted: {stdout}"
    );
}

#[test]
fn unmount_and_status_of_something_else_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = owsfs(&["status", dir.path().to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an owsfs mount"));
    let out = owsfs(&["unmount", dir.path().to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an owsfs mount"));
}

//! POSIX behaviour that a standard conformance suite found missing (issue 15), each through a
//! real mount: atime that holds still, direct I/O seen by buffered readers, xattrs on symlinks,
//! POSIX ACLs, `O_TMPFILE` and file handles.

mod common;

use std::fs::{self, OpenOptions};
use std::os::unix::fs::{MetadataExt, symlink};
use std::path::Path;
use std::time::Duration;

use common::*;

/// Two days ago: old enough that relatime would move it on the next read.
fn two_days_ago() -> rustix::fs::Timespec {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    rustix::fs::Timespec {
        tv_sec: (now - Duration::from_secs(2 * 86_400)).as_secs() as i64,
        tv_nsec: 0,
    }
}

fn set_atime(p: &Path, t: rustix::fs::Timespec) {
    rustix::fs::utimensat(
        rustix::fs::CWD,
        p,
        &rustix::fs::Timestamps {
            last_access: t,
            last_modification: rustix::fs::Timespec {
                tv_sec: 0,
                tv_nsec: rustix::fs::UTIME_OMIT,
            },
        },
        rustix::fs::AtFlags::empty(),
    )
    .unwrap();
}

#[test]
fn atime_holds_still() {
    atime_holds_still_with(&[]);
}

#[test]
fn atime_holds_still_passthrough() {
    atime_holds_still_with(&["passthrough=on"]);
}

/// The mount is noatime: reads through it do not move atime, and neither do the daemon's own
/// reads of the backing files and directories (serving reads, reading around a write, cutting
/// a generation), which the backing filesystem would otherwise count (relatime) and getattr
/// would then report.
fn atime_holds_still_with(opts: &[&str]) {
    if skip_fuse() {
        return;
    }
    let ws = Workspace::with_options(opts);
    let f = ws.path("f");
    let d = ws.path("d");
    fs::create_dir(&d).unwrap();
    fs::write(d.join("inner"), b"inner").unwrap();
    fs::write(&f, noise(300_000, 1)).unwrap();
    let old = two_days_ago();
    set_atime(&f, old);
    set_atime(&d, old);
    let atimes = || {
        (
            fs::metadata(&f).unwrap().atime(),
            fs::metadata(&d).unwrap().atime(),
            fs::metadata(ws.backing("f")).unwrap().atime(),
            fs::metadata(ws.backing("d")).unwrap().atime(),
        )
    };
    let want = (old.tv_sec, old.tv_sec, old.tv_sec, old.tv_sec);
    assert_eq!(atimes(), want);
    // Reads through the mount, with the kernel's page cache dropped so that they reach the
    // daemon (or, with passthrough, the backing file).
    fs::write("/proc/sys/vm/drop_caches", b"1").unwrap();
    assert_eq!(fs::read(&f).unwrap(), noise(300_000, 1));
    assert_eq!(fs::read_dir(&d).unwrap().count(), 1);
    assert_eq!(atimes(), want, "after reads");
    // A write of part of a page: the kernel reads the rest of the page first.
    fs::write("/proc/sys/vm/drop_caches", b"1").unwrap();
    let w = OpenOptions::new().write(true).open(&f).unwrap();
    std::os::unix::fs::FileExt::write_at(&w, b"xyz", 5).unwrap();
    drop(w);
    assert_eq!(atimes().1, old.tv_sec);
    assert_eq!(atimes().3, old.tv_sec);
    set_atime(&f, old);
    // A cut reads the file's bytes and walks the directory.
    fs::write(d.join("more"), b"more").unwrap();
    set_atime(&d, old);
    ws.sync();
    assert_eq!(atimes(), want, "after a cut");
}

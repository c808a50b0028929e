//! Small promises of the mount that a local disk keeps without thinking: new files get exactly
//! the mode the program asked for (whatever the daemon's own umask), and an ioctl the
//! workspace does not implement (isatty's TCGETS) is an ordinary ENOTTY, not a log line; a
//! sequential read asks the daemon for as much at a time as a write may carry.

mod common;

use std::fs::{self, File};
use std::os::unix::fs::PermissionsExt;

use common::*;

fn mode(path: &std::path::Path) -> u32 {
    fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
}

/// The kernel hands the daemon modes already masked by the caller's umask; the daemon's own
/// umask (here 077, inherited from this test) must take nothing more away. The library no
/// longer sets the process umask to 0 behind the daemon's back, so this is what checks that
/// creations restore the bits.
#[test]
fn new_nodes_get_the_mode_the_caller_asked_for() {
    if skip_fuse() {
        return;
    }
    // Each test runs in its own process (nextest), so this umask is this test's alone.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let ws = Workspace::new();
    let dir = ws.path("");
    sh("umask 0; mkdir d; touch f; mkfifo p; mkdir -m 1777 t", &dir);
    assert_eq!(mode(&ws.path("d")), 0o777);
    assert_eq!(mode(&ws.path("f")), 0o666);
    assert_eq!(mode(&ws.path("p")), 0o666);
    assert_eq!(mode(&ws.path("t")), 0o1777);
    sh("umask 027; mkdir e; touch g", &dir);
    assert_eq!(mode(&ws.path("e")), 0o750);
    assert_eq!(mode(&ws.path("g")), 0o640);
    // The backing files agree (they are what the next generation records).
    assert_eq!(mode(&ws.backing("d")), 0o777);
    assert_eq!(mode(&ws.backing("f")), 0o666);
    ws.unmount();
}

/// `isatty()` of a workspace file asks the file system for TCGETS: the answer is ENOTTY, as
/// on a local disk, and the daemon's log gets no warning for it (fuser's default logged one
/// per call and answered ENOSYS).
#[test]
fn isatty_on_a_workspace_file_is_a_quiet_enotty() {
    if skip_fuse() {
        return;
    }
    let ws = Workspace::new();
    fs::write(ws.path("f"), b"not a terminal").unwrap();
    let f = File::open(ws.path("f")).unwrap();
    for _ in 0..20 {
        assert!(!rustix::termios::isatty(&f));
        assert_eq!(
            rustix::termios::tcgetattr(&f).unwrap_err(),
            rustix::io::Errno::NOTTY
        );
    }
    drop(f);
    ws.unmount();
    let log = fs::read_to_string(ws.cache.join("owsfs.log")).unwrap();
    let noisy: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("ioctl") || l.contains("Not Implemented"))
        .collect();
    assert!(noisy.is_empty(), "the log mentions ioctls: {noisy:#?}");
}

#[cfg(target_os = "linux")]
/// A FUSE mount starts with 128 KiB of readahead, so a sequential read would reach the daemon
/// in 128 KiB requests; the daemon raises it to its max_write (1 MiB), one request per MiB.
#[test]
fn a_sequential_read_reaches_the_daemon_a_mebibyte_at_a_time() {
    if skip_fuse() {
        return;
    }
    let ws = Workspace::new();
    let path = ws.path("big");
    fs::write(&path, noise(32 << 20, 5)).unwrap();
    let reads = |ws: &Workspace| ws.status_json(false)["ops"]["reads"].as_u64().unwrap();
    let file = File::open(&path).unwrap();
    file.sync_all().unwrap();
    // Out of the kernel's cache, so that the read below goes to the daemon.
    rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
    let before = reads(&ws);
    let mut data = Vec::new();
    std::io::Read::read_to_end(&mut &file, &mut data).unwrap();
    assert_eq!(data.len(), 32 << 20);
    let asked = reads(&ws) - before;
    assert!(
        (1..=48).contains(&asked),
        "{asked} read requests for 32 MiB (128 KiB each would be 256)"
    );
    drop(file);
    ws.unmount();
}

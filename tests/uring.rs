//! FUSE over io_uring (`-o uring=on`): the workloads served through the kernel's rings leave
//! what they leave natively, and a daemon's death, which the kernel cannot hide from the
//! programs on such a mount (it sends again only what was read from /dev/fuse), ends the mount
//! cleanly instead of leaving programs waiting for good.
#![cfg(target_os = "linux")]

mod common;
#[path = "common/workloads.rs"]
mod workloads;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use workloads::{Inputs, finish};

fn served_through_rings(ws: &Workspace) -> u64 {
    let v = ws.status_json(false);
    v["io_uring"]
        .as_u64()
        .unwrap_or_else(|| panic!("the mount does not serve through io_uring: {v}"))
}

#[test]
fn workloads_through_io_uring_leave_what_they_leave_natively() {
    if skip_fuse() || !uring_offered() {
        return;
    }
    let inputs = Inputs::new();
    let native = inputs.native();
    let ws = Workspace::with_options(&["uring=on"]);
    let before = served_through_rings(&ws);
    finish(inputs.start(&ws.mp), &ws);
    let served = served_through_rings(&ws) - before;
    // tar alone makes several requests for each of its 1,200 files.
    assert!(
        served > 5_000,
        "only {served} requests came through the rings"
    );
    let v = ws.status_json(false);
    assert_eq!(v["ops"]["errors"], 0, "no request failed: {v}");
    workloads::Outcome::of(&ws.mp).assert_same(&native, &ws);
    ws.sync();
    ws.unmount();
    let restored = ws.dir.path().join("restored");
    let out = ws.restore(None, &restored);
    assert!(out.status.success(), "{out:?}");
    workloads::Outcome::of(&restored).assert_same(&native, &ws);
}

#[test]
fn a_daemon_death_under_io_uring_ends_the_mount_cleanly() {
    if skip_fuse() || !uring_offered() {
        return;
    }
    let mut ws = Workspace::with_options(&["uring=on"]);
    served_through_rings(&ws);
    let kept = ws.path("kept");
    {
        let mut f = std::fs::File::create(&kept).unwrap();
        std::io::Write::write_all(&mut f, b"fsynced before the death").unwrap();
        f.sync_all().unwrap();
    }
    // The supervisor cannot keep such a connection, so it cannot replace the daemon.
    let out = ws.owsfs(&["restart", &ws.mp.to_string_lossy()]);
    assert!(!out.status.success(), "owsfs restart succeeded");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("io_uring"), "unclear refusal: {said}");
    // A program writing when the daemon dies gets an error, not a wait without end.
    let mut writer = Command::new("bash")
        .arg("-c")
        .arg("for i in $(seq 1 1000000); do echo $i > f$((i % 100)) || exit 3; done")
        .current_dir(&ws.mp)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let pid = ws.daemon_pid();
    // SAFETY: kill(2) takes plain integers.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    assert!(
        wait_for(Duration::from_secs(30), || writer
            .try_wait()
            .unwrap()
            .is_some()),
        "the writer still waits 30 s after the daemon's death"
    );
    let _ = writer.kill();
    assert_eq!(
        writer.wait().unwrap().code(),
        Some(3),
        "the writer saw no error"
    );
    assert!(
        wait_for(Duration::from_secs(30), || !is_mounted(&ws.mp)),
        "the dead mount is still there{}",
        ws.log_tail()
    );
    let log = std::fs::read_to_string(ws.cache.join("owsfs.log")).unwrap();
    assert!(
        log.contains("its connection died with it"),
        "no word of the death{}",
        ws.log_tail()
    );
    // Everything that completed before is in the cache: the next mount has it.
    wait_cache_unlocked(&ws.cache);
    ws.opts.clear();
    ws.mount();
    assert_eq!(std::fs::read(&kept).unwrap(), b"fsynced before the death");
    ws.unmount();
}

/// Strict fsyncs and the sync ioctl answer late, from the thread that waits for the store,
/// while the ioctl makes the kernel write the dirty pages of a mapping back, through the
/// rings too. With one entry per queue (`threads=1`), a thread that held its entry until
/// the late answer would leave that writeback nobody to serve it.
const LATE_ANSWERS: &str = r#"
import fcntl, mmap, os, struct, sys, threading
root = sys.argv[1]
def sync_ioctl():
    fd = os.open(root, os.O_RDONLY)
    buf = bytearray(8)
    fcntl.ioctl(fd, 0x80086F01, buf, True)
    os.close(fd)
path = os.path.join(root, "mapped")
with open(path, "wb") as f:
    f.truncate(1 << 20)
fd = os.open(path, os.O_RDWR)
m = mmap.mmap(fd, 1 << 20)
errors = []
def fsyncs(n):
    try:
        for i in range(10):
            with open(os.path.join(root, "s%d-%d" % (n, i)), "w") as f:
                f.write("x" * 5000)
                f.flush()
                os.fsync(f.fileno())
    except Exception as e:
        errors.append(e)
threads = [threading.Thread(target=fsyncs, args=(n,)) for n in range(4)]
for t in threads:
    t.start()
for r in range(8):
    m[r * 4096:(r + 1) * 4096] = bytes([r + 1]) * 4096
    sync_ioctl()
for t in threads:
    t.join()
m.close()
os.close(fd)
if errors:
    raise SystemExit(repr(errors))
"#;

#[test]
fn late_answers_through_io_uring_keep_the_rings_serving() {
    if skip_fuse() || !uring_offered() {
        return;
    }
    let ws = Workspace::with_options(&[
        "uring=on,durability=strict,writeback_cache=on,threads=1,strict_timeout=20",
    ]);
    served_through_rings(&ws);
    let mut child = Command::new("python3")
        .args(["-c", LATE_ANSWERS])
        .arg(&ws.mp)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let finished = wait_for(Duration::from_secs(120), || {
        child.try_wait().unwrap().is_some()
    });
    if !finished {
        // Its calls wait for the daemon: only ending the connection lets them go.
        let _ = owsfs_sys::fs::abort_fuse_connection(&ws.mp);
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        finished && out.status.success(),
        "the late answers did not all come (finished: {finished}): {}{}",
        String::from_utf8_lossy(&out.stderr),
        ws.log_tail()
    );
    let v = ws.status_json(false);
    assert_eq!(v["ops"]["errors"], 0, "no request failed: {v}");
    // What the strict fsyncs and the ioctl answered for is in the store.
    ws.unmount();
    let restored = ws.dir.path().join("restored");
    let out = ws.restore(None, &restored);
    assert!(out.status.success(), "{out:?}");
    let mapped = std::fs::read(restored.join("mapped")).unwrap();
    for r in 0..8 {
        assert!(
            mapped[r * 4096..(r + 1) * 4096]
                .iter()
                .all(|b| *b == r as u8 + 1),
            "page {r} of the mapping"
        );
    }
    for n in 0..4 {
        for i in 0..10 {
            let got = std::fs::read(restored.join(format!("s{n}-{i}"))).unwrap();
            assert_eq!(got.len(), 5000, "s{n}-{i}");
        }
    }
}

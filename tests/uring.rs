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

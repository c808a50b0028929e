//! The supervisor keeps a mount's connection when its daemon dies: `kill -9` of the daemon (not
//! of the supervisor) in the middle of workloads is a pause for them, not an error, and what
//! they leave is byte for byte what they leave on a native directory. `owsfs restart` takes the
//! same path on purpose; a daemon that keeps dying ends in a clean unmount.
#![cfg(target_os = "linux")]

mod common;
#[path = "common/workloads.rs"]
mod workloads;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use workloads::{Inputs, Outcome, finish};

/// The pid of the daemon serving `ws` other than `old`, once one answers.
fn next_daemon(ws: &Workspace, old: i32) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = ws.owsfs(&["status", "--json", &ws.mp.to_string_lossy()]);
        if out.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let pid = v["pid"].as_i64().unwrap() as i32;
            if pid != old {
                return pid;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no daemon took over from {old}{}",
            ws.log_tail()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn finished_already(workloads: &mut [(&'static str, Child)]) -> Vec<&'static str> {
    workloads
        .iter_mut()
        .filter_map(|(n, c)| c.try_wait().unwrap().map(|_| n))
        .map(|n| *n)
        .collect()
}

/// Runs the workloads on a mount with `opts`, replacing its daemon three times meanwhile by
/// `replace`; they must finish and leave what they leave natively.
fn replaced_mid_workload(opts: &[&str], replace: impl Fn(&Workspace, i32)) {
    if skip_fuse() {
        return;
    }
    let inputs = Inputs::new();
    let native = inputs.native();
    let ws = Workspace::with_options(opts);
    let mut workloads = inputs.start(&ws.mp);
    let mut pid = ws.daemon_pid();
    for round in 0..3 {
        std::thread::sleep(Duration::from_millis(if round == 0 { 150 } else { 400 }));
        if round == 0 {
            let done = finished_already(&mut workloads);
            assert!(
                done.is_empty(),
                "{done:?} finished before the first replacement: the test proves nothing"
            );
        }
        replace(&ws, pid);
        pid = next_daemon(&ws, pid);
    }
    finish(workloads, &ws);
    let v = ws.status_json(false);
    assert_eq!(
        v["supervisor"]["daemon"], 3,
        "three daemons after the first: {v}"
    );
    assert_eq!(v["ops"]["errors"], 0, "no request failed: {v}");
    Outcome::of(&ws.mp).assert_same(&native, &ws);
    // And what the last daemon commits is what a new node sees.
    ws.sync();
    ws.unmount();
    let restored = ws.dir.path().join("restored");
    let out = ws.restore(None, &restored);
    assert!(out.status.success(), "{out:?}");
    Outcome::of(&restored).assert_same(&native, &ws);
}

fn kill_9(_: &Workspace, pid: i32) {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
}

#[test]
fn kill_9_of_the_daemon_mid_workload_is_a_pause() {
    replaced_mid_workload(&[], kill_9);
}

/// Write-through (`-o writeback_cache=off`) too. In the default mode, with the kernel's
/// writeback cache, pages the kernel accepted and the dead daemon never saw are written to
/// the next one.
#[test]
fn kill_9_of_the_daemon_mid_workload_write_through_is_a_pause() {
    replaced_mid_workload(&["writeback_cache=off"], kill_9);
}

#[test]
fn restart_mid_workload_is_a_pause() {
    replaced_mid_workload(&[], |ws, _| {
        let out = ws.owsfs(&["restart", &ws.mp.to_string_lossy()]);
        assert!(
            out.status.success(),
            "owsfs restart: {}{}",
            String::from_utf8_lossy(&out.stderr),
            ws.log_tail()
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("restarted the daemon"),
            "{out:?}"
        );
    });
}

/// A daemon that dies at every start ends, after five deaths within a minute, in a detached
/// mount and a clear message: a program waiting on the mount gets an error, not a hang.
#[test]
fn a_crash_loop_ends_in_a_clean_unmount() {
    if skip_fuse() {
        return;
    }
    let mut ws = Workspace::unmounted(None, "ws");
    ws.env
        .push(("FAILPOINTS".into(), "resume-start=return".into()));
    ws.mount();
    std::fs::write(ws.path("a"), b"kept").unwrap();
    let pid = ws.daemon_pid();
    let supervisor = ws.status_json(false)["supervisor"]["pid"].as_i64().unwrap() as i32;
    kill_9(&ws, pid);
    // A program that asks the mount meanwhile waits, then gets an error.
    let waiting = Command::new("cat")
        .arg(ws.path("b"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(60), || !is_mounted(&ws.mp)),
        "still mounted{}",
        ws.log_tail()
    );
    assert!(
        wait_for(Duration::from_secs(10), || {
            owsfs_sys::process::has_exited(supervisor as u32)
        }),
        "the supervisor is still there"
    );
    let out = waiting.wait_with_output().unwrap();
    assert!(!out.status.success(), "cat of a missing file succeeded");
    let log = std::fs::read_to_string(ws.cache.join("owsfs.log")).unwrap();
    assert!(
        log.contains("died 5 times within 60s") && log.contains("giving up"),
        "{}",
        ws.log_tail()
    );
    assert_eq!(log.matches("fail point resume-start").count(), 4, "{log}");
    // The cache keeps everything: a plain mount goes on from it.
    wait_cache_unlocked(&ws.cache);
    ws.env.clear();
    ws.mount();
    assert_eq!(std::fs::read(ws.path("a")).unwrap(), b"kept");
    ws.unmount();
}

/// Writes `strict.txt` and fsyncs it, then `synced.txt` and asks `OWSFS_IOC_SYNC` on the mount's
/// root; prints the generation the ioctl returned.
const STRICT_WRITES: &str = r#"
import fcntl, os, struct, sys
root = sys.argv[1]
with open(os.path.join(root, "strict.txt"), "w") as f:
    f.write("fsynced under durability=strict\n")
    f.flush()
    os.fsync(f.fileno())
with open(os.path.join(root, "synced.txt"), "w") as f:
    f.write("before the sync ioctl\n")
fd = os.open(root, os.O_RDONLY)
buf = bytearray(8)
fcntl.ioctl(fd, 0x80086F01, buf, True)
print(struct.unpack("=Q", buf)[0])
"#;

/// What a strict fsync or the sync ioctl answered for is in the store: after the node dies
/// (the daemon and its supervisor, `kill -9`), a mount on another cache has it.
#[test]
fn strict_fsyncs_and_the_sync_ioctl_survive_the_node() {
    if skip_fuse() {
        return;
    }
    let mut ws = Workspace::unmounted(None, "ws");
    ws.opts = vec!["durability=strict".into()];
    // No commits of its own: only the fsync and the ioctl make anything durable.
    ws.extra = vec!["--commit-interval".into(), "1d".into()];
    ws.mount();
    let out = run_ok(
        Command::new("python3")
            .args(["-c", STRICT_WRITES])
            .arg(&ws.mp),
    );
    let generation: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert!(generation >= 2, "the ioctl names a commit: {generation}");
    // Written after the ioctl: not promised, and with no commit before the kill, not kept.
    std::fs::write(ws.path("late.txt"), b"after").unwrap();
    kill_9_node(ws.daemon_pid());
    wait_cache_unlocked(&ws.cache);
    let out = owsfs(&["unmount", &ws.mp.to_string_lossy()]);
    assert!(out.status.success(), "{out:?}");

    let mut other = Workspace::unmounted(Some(&ws.store), "ws");
    other.extra = vec!["--steal".into(), "--force".into()];
    other.mount();
    assert_eq!(
        std::fs::read_to_string(other.path("strict.txt")).unwrap(),
        "fsynced under durability=strict\n"
    );
    assert_eq!(
        std::fs::read_to_string(other.path("synced.txt")).unwrap(),
        "before the sync ioctl\n"
    );
    assert!(!other.path("late.txt").exists(), "nothing committed it");
    other.unmount();
}

/// A change the daemon made before it died, unanswered: the kernel sends the request again to
/// the next daemon, which finds it done and answers as if it had done it (no EEXIST or ENOENT
/// for the program).
#[test]
fn a_change_done_before_the_daemon_died_is_answered_once() {
    if skip_fuse() {
        return;
    }
    let mut ws = Workspace::unmounted(None, "ws");
    let armed = ws.dir.path().join("armed");
    ws.env.push((
        "OWSFS_WORKER_CRASH_AT".into(),
        "fuse-after-mkdir,fuse-after-create,fuse-after-unlink,fuse-after-rename".into(),
    ));
    ws.env.push((
        "OWSFS_CRASH_ARMED_BY".into(),
        armed.to_string_lossy().into_owned(),
    ));
    ws.mount();
    std::fs::write(ws.path("old"), b"to be removed").unwrap();
    std::fs::write(ws.path("from"), b"to be renamed").unwrap();
    type Step<'a> = Box<dyn Fn() -> std::io::Result<()> + 'a>;
    let steps: [(&str, Step<'_>); 4] = [
        ("mkdir", Box::new(|| std::fs::create_dir(ws.path("dir")))),
        (
            "create",
            Box::new(|| {
                use std::io::Write;
                let mut f = std::fs::File::options()
                    .write(true)
                    .create_new(true)
                    .open(ws.path("new"))?;
                f.write_all(b"written through the answered create")
            }),
        ),
        ("unlink", Box::new(|| std::fs::remove_file(ws.path("old")))),
        (
            "rename",
            Box::new(|| std::fs::rename(ws.path("from"), ws.path("to"))),
        ),
    ];
    for (i, (what, step)) in steps.iter().enumerate() {
        std::fs::write(&armed, b"").unwrap();
        let r = step();
        std::fs::remove_file(&armed).unwrap();
        r.unwrap_or_else(|e| {
            panic!(
                "{what} after the daemon died doing it: {e}{}",
                ws.log_tail()
            )
        });
        let v = ws.status_json(false);
        assert_eq!(
            v["supervisor"]["daemon"],
            i + 1,
            "{what}: the daemon died: {v}"
        );
    }
    assert!(ws.path("dir").is_dir());
    assert_eq!(
        std::fs::read(ws.path("new")).unwrap(),
        b"written through the answered create"
    );
    assert!(!ws.path("old").exists());
    assert_eq!(std::fs::read(ws.path("to")).unwrap(), b"to be renamed");
    assert!(!ws.path("from").exists());
    let log = std::fs::read_to_string(ws.cache.join("owsfs.log")).unwrap();
    assert_eq!(
        log.matches("finds its change made by the daemon before")
            .count(),
        4,
        "{log}"
    );
    ws.unmount();
}

/// `rename(RENAME_EXCHANGE)` leaves nothing in the tree to tell it was done: done twice, it
/// would swap the names back. The daemon records it before its answer; the next one answers
/// the resent request as done.
#[test]
fn an_exchange_done_before_the_daemon_died_is_not_done_twice() {
    if skip_fuse() {
        return;
    }
    let mut ws = Workspace::unmounted(None, "ws");
    ws.env
        .push(("OWSFS_WORKER_CRASH_AT".into(), "fuse-after-rename".into()));
    ws.mount();
    std::fs::write(ws.path("x"), b"was x").unwrap();
    std::fs::write(ws.path("y"), b"was y").unwrap();
    use std::os::unix::ffi::OsStrExt;
    let c = |p: PathBuf| std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    let (x, y) = (c(ws.path("x")), c(ws.path("y")));
    // SAFETY: renameat2(2) with two NUL-terminated paths that outlive the call.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            x.as_ptr(),
            libc::AT_FDCWD,
            y.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    assert_eq!(r, 0, "{}{}", std::io::Error::last_os_error(), ws.log_tail());
    let v = ws.status_json(false);
    assert_eq!(v["supervisor"]["daemon"], 1, "the daemon died: {v}");
    assert_eq!(std::fs::read(ws.path("x")).unwrap(), b"was y");
    assert_eq!(std::fs::read(ws.path("y")).unwrap(), b"was x");
    let log = std::fs::read_to_string(ws.cache.join("owsfs.log")).unwrap();
    assert!(
        log.contains("finds its exchange made by the daemon before"),
        "{log}"
    );
    ws.unmount();
}

/// A file removed while open keeps its contents across the daemon's death (SQLite's temporary
/// files, `tmpfile()`): the program goes on reading and writing it.
#[test]
fn a_file_removed_while_open_survives_the_daemon() {
    if skip_fuse() {
        return;
    }
    let ws = Workspace::new();
    let script = r#"
import os, sys, tempfile
root, go = sys.argv[1], sys.argv[2]
unnamed = tempfile.TemporaryFile(dir=root)  # O_TMPFILE
unnamed.write(b"unnamed\n")
unnamed.flush()
path = os.path.join(root, "scratch")
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
os.write(fd, b"before the death\n")
os.fsync(fd)
os.unlink(path)
replaced = os.path.join(root, "replaced")
with open(replaced, "w") as f:
    f.write("old")
old = os.open(replaced, os.O_RDONLY)
with open(replaced + ".new", "w") as f:
    f.write("new")
os.rename(replaced + ".new", replaced)
print("ready", flush=True)
sys.stdin.readline()  # the daemon is killed meanwhile
os.write(fd, b"after the death\n")
os.lseek(fd, 0, os.SEEK_SET)
print(os.read(fd, 100).decode().replace("\n", "|"))
print(os.read(old, 100).decode())
print(os.fstat(fd).st_nlink)
unnamed.write(b"still there\n")
unnamed.flush()
unnamed.seek(0)
print(unnamed.read().decode().replace("\n", "|"))
"#;
    let mut child = Command::new("python3")
        .args(["-c", script])
        .arg(&ws.mp)
        .arg("go")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    use std::io::{BufRead, Write};
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    let pid = ws.daemon_pid();
    kill_9(&ws, pid);
    next_daemon(&ws, pid);
    writeln!(child.stdin.take().unwrap()).unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert!(child.wait().unwrap().success(), "{rest}{}", ws.log_tail());
    assert_eq!(
        rest,
        "before the death|after the death|\nold\n0\nunnamed|still there|\n",
        "{}",
        ws.log_tail()
    );
    assert!(!ws.path("scratch").exists());
    assert_eq!(std::fs::read_to_string(ws.path("replaced")).unwrap(), "new");
    ws.unmount();
    // The next mount empties the orphanage.
    ws.mount();
    assert_eq!(
        std::fs::read_dir(ws.cache.join("orphans")).unwrap().count(),
        0
    );
}

/// A file a program opened and mapped under one daemon, removed under the next one (which
/// never saw it: the kernel had its name), keeps its data for the program, and the files made
/// after it keep theirs. Found by a restart loop under SQLite, which removes its shared-memory
/// file while mapped: the new daemon freed the backing inode, a file tar made took its number,
/// and the shared memory's pages were written into that file.
#[test]
fn a_mapped_file_removed_after_a_restart_keeps_its_pages_to_itself() {
    if skip_fuse() {
        return;
    }
    let ws = Workspace::new();
    let script = r#"
import mmap, os, sys
root = sys.argv[1]
path = os.path.join(root, "held")
fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
os.ftruncate(fd, 32768)
m = mmap.mmap(fd, 32768)
m[0:5] = b"first"
m.flush()
print("ready", flush=True)
sys.stdin.readline()  # the daemon is replaced meanwhile
os.unlink(path)
# Files made now would take the number of a freed backing inode.
for i in range(300):
    with open(os.path.join(root, "n%d" % i), "wb") as f:
        f.write(b"new %d" % i)
m[0:6] = b"second"
m[32760:32768] = b"the last"
m.flush()
os.fsync(fd)
print(os.pread(fd, 6, 0).decode(), os.pread(fd, 8, 32760).decode(), flush=True)
m.close()
os.close(fd)
"#;
    let mut child = Command::new("python3")
        .args(["-c", script])
        .arg(&ws.mp)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    use std::io::{BufRead, Write};
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    let pid = ws.daemon_pid();
    let restarted = ws.owsfs(&["restart", &ws.mp.to_string_lossy()]);
    assert!(restarted.status.success(), "{restarted:?}");
    next_daemon(&ws, pid);
    writeln!(child.stdin.take().unwrap()).unwrap();
    let output = child.wait_with_output().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stderr),
        ws.log_tail()
    );
    assert_eq!(rest, "second the last\n");
    for i in 0..300 {
        let got = std::fs::read(ws.path(&format!("n{i}"))).unwrap();
        assert_eq!(
            got,
            format!("new {i}").into_bytes(),
            "n{i}: {}",
            describe_difference(&got, format!("new {i}").as_bytes())
        );
    }
    assert!(!ws.path("held").exists());
    ws.unmount();
}

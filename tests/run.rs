//! `owsfs run` (the container entrypoint) and `owsfs recover`, through real mounts, against a
//! `file://` store and SeaweedFS on loopback: CMD's exit status is passed through, SIGTERM
//! leads to a handoff, a fail-stop kills CMD, a CMD that ignores SIGTERM is still stopped, and
//! the unsynced tail of a crashed node becomes a fork.

mod common;

#[path = "../testkit/seaweed.rs"]
mod seaweed;
#[path = "common/stores.rs"]
mod stores;

use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::Duration;

use common::*;
use stores::TestStore;

/// `owsfs run` for `ws`, with `extra` flags, running `sh -c script` (MP in the script is the
/// mountpoint).
fn run_cmd(ws: &Workspace, extra: &[&str], script: &str) -> Command {
    let mut cmd = Command::new(OWSFS);
    cmd.arg("run")
        .arg("--mount")
        .arg(&ws.mp)
        .arg("--cache")
        .arg(&ws.cache)
        .arg("--store")
        .arg(&ws.store)
        .arg("--workspace")
        .arg(&ws.name)
        .args(&ws.extra)
        .args(extra)
        .arg("--")
        .arg("sh")
        .arg("-c")
        .arg(script)
        .env_remove("OWSFS_CACHE")
        .env("XDG_DATA_HOME", test_data_home())
        .env("MP", &ws.mp)
        .envs(ws.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

fn wait_child(child: Child, timeout: Duration) -> Output {
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => out.expect("wait for owsfs run"),
        Err(_) => {
            // SAFETY: kill(2) on our child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("owsfs run did not finish within {timeout:?}");
        }
    }
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on our child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

fn code(status: ExitStatus) -> i32 {
    status.code().unwrap_or(-1)
}

fn err(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Another node mounts the workspace without waiting: the lease was released.
fn read_on_another_node(store: &TestStore, name: &str, rel: &str) -> Vec<u8> {
    let other = store.workspace(name, &[]);
    let out = other.try_mount();
    assert!(
        out.status.success(),
        "the workspace was not handed off: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let data = std::fs::read(other.path(rel)).unwrap_or_default();
    other.unmount();
    data
}

#[test]
fn exit_status_is_passed_through_after_a_handoff_file() {
    if skip_fuse() {
        return;
    }
    exit_status_is_passed_through_after_a_handoff(&TestStore::file());
}

#[test]
fn exit_status_is_passed_through_after_a_handoff_seaweedfs() {
    if skip_fuse() {
        return;
    }
    exit_status_is_passed_through_after_a_handoff(&TestStore::seaweed("owsfs-run"));
}

fn exit_status_is_passed_through_after_a_handoff(store: &TestStore) {
    let ws = store.workspace("run1", &[]);
    let out = run_cmd(&ws, &[], r#"echo written-by-cmd > "$MP/f" && exit 7"#)
        .output()
        .unwrap();
    assert_eq!(code(out.status), 7, "{}", err(&out));
    assert!(!is_mounted(&ws.mp), "owsfs run left the mount behind");
    assert_eq!(
        read_on_another_node(store, "run1", "f"),
        b"written-by-cmd\n"
    );
    // A command that cannot start: the mount is handed off, and the error says why.
    let out = run_cmd(&ws, &[], "exit 0").output().unwrap();
    assert_eq!(code(out.status), 0, "{}", err(&out));
    let out = Command::new(OWSFS)
        .args(["run", "--mount"])
        .arg(&ws.mp)
        .args(["--cache"])
        .arg(&ws.cache)
        .args(["--store", &ws.store, "--workspace", &ws.name, "--"])
        .arg("/nonexistent/owsfs-test-cmd")
        .envs(ws.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .unwrap();
    assert_ne!(code(out.status), 0);
    assert!(err(&out).contains("owsfs-test-cmd"), "{}", err(&out));
    assert!(!is_mounted(&ws.mp));
}

#[test]
fn sigterm_is_passed_on_and_leads_to_a_handoff_file() {
    if skip_fuse() {
        return;
    }
    sigterm_is_passed_on_and_leads_to_a_handoff(&TestStore::file());
}

#[test]
fn sigterm_is_passed_on_and_leads_to_a_handoff_seaweedfs() {
    if skip_fuse() {
        return;
    }
    sigterm_is_passed_on_and_leads_to_a_handoff(&TestStore::seaweed("owsfs-run"));
}

fn sigterm_is_passed_on_and_leads_to_a_handoff(store: &TestStore) {
    let ws = store.workspace("run2", &[]);
    let child = run_cmd(
        &ws,
        &[],
        r#"trap 'echo got-term > "$MP/term"; exit 3' TERM
           echo started > "$MP/started"
           while :; do sleep 0.05; done"#,
    )
    .spawn()
    .unwrap();
    assert!(
        wait_for(Duration::from_secs(30), || ws.path("started").exists()),
        "CMD did not start"
    );
    signal(&child, libc::SIGTERM);
    let out = wait_child(child, Duration::from_secs(60));
    assert_eq!(code(out.status), 3, "{}", err(&out));
    assert!(!is_mounted(&ws.mp));
    assert_eq!(read_on_another_node(store, "run2", "term"), b"got-term\n");
}

#[test]
fn a_command_that_ignores_sigterm_is_still_stopped_file() {
    if skip_fuse() {
        return;
    }
    a_command_that_ignores_sigterm_is_still_stopped(&TestStore::file());
}

#[test]
fn a_command_that_ignores_sigterm_is_still_stopped_seaweedfs() {
    if skip_fuse() {
        return;
    }
    a_command_that_ignores_sigterm_is_still_stopped(&TestStore::seaweed("owsfs-run"));
}

/// The pid CMD wrote into `pid` (the shell creates the file before it writes into it).
fn wait_pid(ws: &Workspace) -> i32 {
    let read_pid = || {
        std::fs::read_to_string(ws.path("pid"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
    };
    assert!(
        wait_for(Duration::from_secs(30), || read_pid().is_some()),
        "CMD did not start"
    );
    read_pid().unwrap()
}

fn a_command_that_ignores_sigterm_is_still_stopped(store: &TestStore) {
    let ws = store.workspace("run3", &[]);
    let child = run_cmd(
        &ws,
        &["--grace", "1s"],
        r#"trap '' TERM
           echo $$ > "$MP/pid"
           while :; do sleep 0.05; done"#,
    )
    .spawn()
    .unwrap();
    let pid = wait_pid(&ws);
    signal(&child, libc::SIGTERM);
    let out = wait_child(child, Duration::from_secs(60));
    assert_eq!(
        out.status.code(),
        Some(128 + libc::SIGKILL),
        "killed CMD's status: {}",
        err(&out)
    );
    assert!(err(&out).contains("SIGKILL"), "{}", err(&out));
    assert!(owsfs_sys::process::has_exited(pid as u32), "CMD still runs");
    assert!(!is_mounted(&ws.mp));
    assert!(!read_on_another_node(store, "run3", "pid").is_empty());
}

#[test]
fn fail_stop_kills_the_command_file() {
    if skip_fuse() {
        return;
    }
    fail_stop_kills_the_command(&TestStore::file());
}

#[test]
fn fail_stop_kills_the_command_seaweedfs() {
    if skip_fuse() {
        return;
    }
    fail_stop_kills_the_command(&TestStore::seaweed("owsfs-run"));
}

/// The store becomes unreachable (a partition): the lease cannot be renewed, the mount stops
/// writing, and CMD, which ignores SIGTERM, is killed; `owsfs run` exits 75 with the reason.
fn fail_stop_kills_the_command(store: &TestStore) {
    let mut ws = store.workspace("run4", &["--lease-ttl", "2s"]);
    let part = ws.cache.with_file_name("partition");
    ws.env.push((
        "OWSFS_FAULTS".into(),
        format!("partition={}", part.display()),
    ));
    let child = run_cmd(
        &ws,
        &["--grace", "1s"],
        r#"trap '' TERM
           echo $$ > "$MP/pid"
           i=0
           while :; do i=$((i+1)); echo $i >> "$MP/counter" 2>/dev/null; sleep 0.05; done"#,
    )
    .spawn()
    .unwrap();
    let pid = wait_pid(&ws);
    std::fs::write(&part, b"").unwrap();
    let out = wait_child(child, Duration::from_secs(60));
    std::fs::remove_file(&part).unwrap();
    assert_eq!(
        out.status.code(),
        Some(75),
        "owsfs run after a fail-stop: {}",
        err(&out)
    );
    assert!(
        err(&out).contains("lease"),
        "the reason is given: {}",
        err(&out)
    );
    assert!(owsfs_sys::process::has_exited(pid as u32), "CMD still runs");
    assert!(!is_mounted(&ws.mp), "the mount is left behind");
}

#[test]
fn recover_turns_the_unsynced_tail_of_a_crashed_node_into_a_fork_file() {
    if skip_fuse() {
        return;
    }
    recover_turns_the_unsynced_tail_into_a_fork(&TestStore::file());
}

#[test]
fn recover_turns_the_unsynced_tail_of_a_crashed_node_into_a_fork_seaweedfs() {
    if skip_fuse() {
        return;
    }
    recover_turns_the_unsynced_tail_into_a_fork(&TestStore::seaweed("owsfs-run"));
}

fn recover_turns_the_unsynced_tail_into_a_fork(store: &TestStore) {
    let a = store.workspace("crashy", &["--commit-interval", "1h"]);
    a.mount();
    std::fs::create_dir(a.path("d")).unwrap();
    std::fs::write(a.path("d/synced"), b"in the store\n").unwrap();
    a.sync();
    std::fs::write(a.path("d/tail"), b"only in the cache\n").unwrap();
    std::fs::write(a.path("d/synced"), b"changed in the cache\n").unwrap();
    a.kill_daemon();

    // Another node takes over: it has the synced state only, and moves on.
    let b = store.workspace("crashy", &["--steal", "--force"]);
    b.mount();
    assert_eq!(
        std::fs::read(b.path("d/synced")).unwrap(),
        b"in the store\n"
    );
    assert!(!b.path("d/tail").exists());
    std::fs::write(b.path("d/b"), b"b\n").unwrap();
    b.unmount();

    // A workspace someone else made, that holds only the fence of its first mount, is not a
    // recover's to take on.
    let other = store.workspace("taken", &[]);
    other.mount();
    other.unmount();
    let out = a.owsfs(&[
        "recover",
        "--cache",
        &a.cache.to_string_lossy(),
        "--as",
        "taken",
        "--store",
        &a.store,
    ]);
    assert!(!out.status.success(), "recover took on another's workspace");
    assert!(err(&out).contains("already exists"), "{}", err(&out));

    // The crashed node's tail becomes a fork; the workspace itself is untouched.
    let out = a.owsfs(&[
        "recover",
        "--cache",
        &a.cache.to_string_lossy(),
        "--as",
        "crashy-tail",
        "--store",
        &a.store,
    ]);
    assert!(out.status.success(), "owsfs recover: {}", err(&out));
    let work = tempfile::tempdir().unwrap();
    let fork = Workspace::unmounted(Some(&a.store), "crashy-tail");
    let mut fork = fork;
    fork.env = a.env.clone();
    let r = fork.restore(None, &work.path().join("fork"));
    assert!(r.status.success(), "restore the fork: {}", err(&r));
    let got = snapshot(&work.path().join("fork"));
    assert_eq!(got["d/tail"], b"f:only in the cache\n");
    assert_eq!(got["d/synced"], b"f:changed in the cache\n");
    assert!(
        !got.contains_key("d/b"),
        "the fork has the other node's file"
    );
    let mut orig = Workspace::unmounted(Some(&a.store), "crashy");
    orig.env = a.env.clone();
    let r = orig.restore(None, &work.path().join("orig"));
    assert!(r.status.success(), "{}", err(&r));
    let got = snapshot(&work.path().join("orig"));
    assert!(!got.contains_key("d/tail"), "the tail was merged silently");
    assert_eq!(got["d/b"], b"f:b\n");
    // Recovering into an existing workspace, or the original one, is refused.
    for name in ["crashy", "crashy-tail"] {
        let out = a.owsfs(&[
            "recover",
            "--cache",
            &a.cache.to_string_lossy(),
            "--as",
            name,
            "--store",
            &a.store,
        ]);
        assert!(!out.status.success(), "recover --as {name} was accepted");
    }
}

/// After a recover, the cache knows the fork's lease epoch, not the old workspace's. A commit
/// that another node makes to the fork at the epoch this cache last held in the old workspace
/// is not taken for the cache's own: the cache shows it at its next mount (it used to go on
/// from its old base and never show the other node's files).
#[test]
fn a_recovered_cache_takes_no_commit_of_the_fork_for_its_own() {
    if skip_fuse() {
        return;
    }
    let store = TestStore::file();
    let epoch = |ws: &Workspace| {
        ws.status_json(false)["sync"]["lease"]["epoch"]
            .as_u64()
            .unwrap()
    };
    let mut a = store.workspace("old", &["--commit-interval", "1h"]);
    for round in 0..2 {
        a.mount();
        std::fs::write(a.path("round"), format!("{round}\n")).unwrap();
        a.sync();
        a.unmount();
    }
    a.mount();
    let old_epoch = epoch(&a);
    assert!(old_epoch >= 3, "epoch {old_epoch}");
    std::fs::write(a.path("tail"), b"tail\n").unwrap();
    a.kill_daemon();
    let out = a.owsfs(&[
        "recover",
        "--cache",
        &a.cache.to_string_lossy(),
        "--as",
        "fork",
        "--store",
        &a.store,
    ]);
    assert!(out.status.success(), "owsfs recover: {}", err(&out));

    // Another node mounts the fork until it holds the old workspace's epoch, and commits.
    loop {
        let b = store.workspace("fork", &[]);
        b.mount();
        let e = epoch(&b);
        assert!(e <= old_epoch, "skipped epoch {old_epoch}: {e}");
        if e == old_epoch {
            std::fs::write(b.path("from-b"), b"b\n").unwrap();
            b.sync();
            b.unmount();
            break;
        }
        b.unmount();
    }
    a.name = "fork".into();
    a.mount();
    assert_eq!(std::fs::read(a.path("tail")).unwrap(), b"tail\n");
    assert_eq!(
        std::fs::read(a.path("from-b")).unwrap_or_default(),
        b"b\n",
        "the other node's commit is missing{}",
        a.log_tail()
    );
    a.unmount();
}

/// An entrypoint started in the mountpoint (`WORKDIR /workspace`): CMD's relative paths land
/// in the workspace, not in the directory under the mount. Also when the directory's own
/// files are adopted (`--adopt`).
#[test]
fn a_command_started_in_the_mountpoint_writes_into_the_workspace() {
    if skip_fuse() {
        return;
    }
    let store = TestStore::file();
    for (name, extra) in [("wd1", &[][..]), ("wd2", &["--adopt"][..])] {
        let ws = store.workspace(name, &[]);
        if !extra.is_empty() {
            std::fs::write(ws.mp.join("shipped"), b"in the image\n").unwrap();
        }
        let out = run_cmd(
            &ws,
            extra,
            "echo relative > rel.txt && cat shipped 2>/dev/null; true",
        )
        .current_dir(&ws.mp)
        .output()
        .unwrap();
        assert!(out.status.success(), "{name}: {}", err(&out));
        assert_eq!(
            read_on_another_node(&store, name, "rel.txt"),
            b"relative\n",
            "{name}"
        );
    }
}

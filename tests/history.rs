//! History as users reach it: snapshots (named on a live mount, automatic at each handoff and
//! rolled off), references (numbers, snapshot names, times), and forks written beside their
//! source on another node. Each scenario runs on `file://` and on SeaweedFS.

mod common;

#[path = "../testkit/seaweed.rs"]
mod seaweed;
#[path = "common/stores.rs"]
mod stores;

use std::process::Output;

use common::*;
use stores::TestStore;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs owsfs, asserting failure; the stderr.
fn refused(ws: &Workspace, args: &[&str]) -> String {
    let out = ws.owsfs(args);
    assert!(
        !out.status.success(),
        "owsfs {} was accepted: {}",
        args.join(" "),
        stdout(&out)
    );
    stderr(&out)
}

/// `owsfs restore` of `name` at `at` into a fresh directory; its tree.
fn restored(ws: &Workspace, name: &str, at: &str) -> Snapshot {
    let dest = ws
        .dir
        .path()
        .join(format!("restore-{name}-{}", at.replace(' ', "_")));
    ws.ok(&[
        "restore",
        "--store",
        &ws.store,
        "--workspace",
        name,
        "--at",
        at,
        &dest.to_string_lossy(),
    ]);
    tree(&dest)
}

fn snapshot_names(ws: &Workspace) -> Vec<String> {
    let out = ws.ok(&["snapshot", "list", "--json", &ws.mp.to_string_lossy()]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect()
}

/// Snapshots on a live mount, references, restore at each, automatic snapshots rolled off.
fn snapshots_name_states(store: &TestStore) {
    let a = store.workspace("src", &["--commit-interval", "1h", "--keep-snapshots", "2"]);
    a.mount();
    let mp = a.mp.to_string_lossy().into_owned();
    std::fs::create_dir(a.path("src")).unwrap();
    std::fs::write(a.path("src/main.rs"), b"fn main() {}\n").unwrap();
    write_db(&a.mp, 100);
    let v1 = tree(&a.mp);
    // Named on the mount: the cut is made and durable first (the interval is an hour).
    let g1: u64 = a
        .ok(&["snapshot", "create", "before", &mp])
        .parse()
        .unwrap();
    // The same name for the same state again: accepted (nothing changed).
    a.ok(&["snapshot", "create", "before", &mp]);
    for bad in ["42", "auto-x", "a/b", "HEAD"] {
        let err = refused(&a, &["snapshot", "create", bad, &mp]);
        assert!(err.contains("invalid snapshot name"), "{bad}: {err}");
    }
    let between = jiff::Timestamp::now().to_string();
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(a.path("src/main.rs"), b"fn main() { v2() }\n").unwrap();
    std::fs::remove_file(a.path("src/main.rs")).unwrap();
    std::fs::write(a.path("notes.txt"), b"v2\n").unwrap();
    write_db(&a.mp, 50);
    let v2 = tree(&a.mp);
    let g2 = a.sync();
    assert!(g2 > g1, "{g2} after {g1}");
    let err = refused(&a, &["snapshot", "create", "before", &mp]);
    assert!(err.contains("already exists"), "{err}");
    // What changed, from the snapshot to now.
    let out = a.ok(&[
        "diff",
        "before",
        "--store",
        &a.store,
        "--workspace",
        "src",
        "--json",
        "--sqlite",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let changes: Vec<(String, String)> = v["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["change"].as_str().unwrap().to_string(),
                c["path"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for want in [("removed", "src/main.rs"), ("added", "notes.txt")] {
        assert!(
            changes.contains(&(want.0.to_string(), want.1.to_string())),
            "{want:?} not in {changes:?}"
        );
    }
    assert!(
        changes
            .iter()
            .all(|(_, p)| p.starts_with("app.db") || p == "src/main.rs" || p == "notes.txt"),
        "{changes:?}"
    );
    assert_eq!(v["from"]["generation"], g1);
    assert_eq!(v["to"]["generation"], g2);
    assert_eq!(
        v["sqlite"],
        serde_json::json!([{"path": "app.db", "tables": [{"name": "t", "before": 100, "after": 150}]}])
    );
    let text = a.ok(&[
        "diff",
        &format!("src@{g1}"),
        &format!("src@{g2}"),
        "--store",
        &a.store,
    ]);
    assert!(text.lines().any(|l| l == "A  notes.txt"), "{text}");
    assert!(text.lines().any(|l| l == "D  src/main.rs"), "{text}");
    let err = refused(&a, &["diff", "before", "--store", &a.store]);
    assert!(err.contains("--workspace"), "{err}");
    assert_eq!(snapshot_names(&a), ["before"]);
    // Every way to name v1 and v2.
    assert_same_tree(&restored(&a, "src", "before"), &v1, "--at before");
    assert_same_tree(&restored(&a, "src", &g1.to_string()), &v1, "--at g1");
    assert_same_tree(&restored(&a, "src", &between), &v1, "--at a time");
    assert_same_tree(&restored(&a, "src", "HEAD"), &v2, "--at HEAD");
    assert_same_tree(&restored(&a, "src", "0s ago"), &v2, "--at 0s ago");
    let (integrity, rows) = sql_check(&a.dir.path().join("restore-src-before/app.db"), true);
    assert_eq!((integrity.as_str(), rows.len()), ("ok", 100));
    let err = refused(
        &a,
        &[
            "restore",
            "--store",
            &a.store,
            "--workspace",
            "src",
            "--at",
            "nope",
            "/tmp/x-never",
        ],
    );
    assert!(err.contains("no snapshot named \"nope\""), "{err}");
    // A name given offline, at an older state.
    a.ok(&[
        "snapshot",
        "create",
        "first",
        "--store",
        &a.store,
        "--workspace",
        "src",
        "--at",
        &g1.to_string(),
    ]);

    // An automatic snapshot at each handoff; beyond two, the oldest rolls off. Named ones stay.
    a.unmount();
    let mut autos = Vec::new();
    for round in 0..3 {
        a.mount();
        std::fs::write(a.path("round"), format!("{round}\n")).unwrap();
        a.unmount();
        let log = a.log_json();
        let head = log.last().unwrap()["number"].as_u64().unwrap();
        autos.push(format!("auto-handoff-{head}"));
    }
    a.mount();
    let names = snapshot_names(&a);
    let kept: Vec<&str> = autos[1..].iter().map(String::as_str).collect();
    let mut want = vec!["before", "first"];
    want.extend(kept.iter().copied());
    let mut got: Vec<&str> = names.iter().map(String::as_str).collect();
    got.sort_unstable();
    want.sort_unstable();
    assert_eq!(got, want);
    // `owsfs log` marks the named generations.
    let log = a.ok(&["log", "--store", &a.store, "--workspace", "src"]);
    let line = log
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{g1} ")))
        .unwrap_or_else(|| panic!("no line for {g1}: {log}"));
    assert!(line.contains("[snapshot before, first]"), "{line}");
    let json = a.log_json();
    let entry = json
        .iter()
        .find(|r| r["number"].as_u64() == Some(g1))
        .unwrap();
    assert_eq!(entry["snapshots"], serde_json::json!(["before", "first"]));
    a.ok(&["snapshot", "delete", "before", &mp]);
    let err = refused(&a, &["snapshot", "delete", "before", &mp]);
    assert!(err.contains("no snapshot named"), "{err}");
    assert!(!snapshot_names(&a).contains(&"before".to_string()));
    a.unmount();
}

#[test]
fn snapshots_name_states_file() {
    if skip_fuse() {
        return;
    }
    snapshots_name_states(&TestStore::file());
}

#[test]
fn snapshots_name_states_seaweedfs() {
    if skip_fuse() {
        return;
    }
    snapshots_name_states(&TestStore::seaweed("history-snap"));
}

/// A fork is mounted on another node and written while its source keeps being written on the
/// first; each ends with exactly its own changes.
fn a_fork_goes_its_own_way(store: &TestStore) {
    let a = store.workspace("src", &[]);
    a.mount();
    std::fs::create_dir(a.path("data")).unwrap();
    for i in 0..20 {
        std::fs::write(
            a.path(&format!("data/{i}.bin")),
            noise(50_000 + i * 1000, i as u64),
        )
        .unwrap();
    }
    write_db(&a.mp, 200);
    std::os::unix::fs::symlink("data/0.bin", a.path("link")).unwrap();
    std::fs::hard_link(a.path("data/3.bin"), a.path("data/hard")).unwrap();
    std::fs::set_permissions(
        a.path("data/4.bin"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let base = tree(&a.mp);
    let g = a.sync();

    // The fork, from the source's newest commit, while the source stays mounted.
    let fork_name = a.ok(&["fork", &format!("src@{g}"), "fork", "--store", &a.store]);
    assert_eq!(fork_name, "fork");
    let err = refused(&a, &["fork", "src", "fork", "--store", &a.store]);
    assert!(err.contains("already exists"), "{err}");
    let err = refused(&a, &["fork", "nope", "other", "--store", &a.store]);
    assert!(err.contains("no workspace \"nope\""), "{err}");

    let b = store.workspace("fork", &[]);
    b.mount();
    assert_same_tree(&tree(&b.mp), &base, "the fork at its start");
    let status = b.status_json(false);
    assert_eq!(
        status["sync"]["forked_from"],
        serde_json::json!({"workspace": "src", "generation": g})
    );

    // Both written at once.
    std::fs::write(a.path("data/0.bin"), b"source only\n").unwrap();
    std::fs::write(a.path("from-source"), b"a\n").unwrap();
    std::fs::write(b.path("data/1.bin"), b"fork only\n").unwrap();
    std::fs::remove_file(b.path("data/2.bin")).unwrap();
    write_db(&b.mp, 10);
    // Checked before the trees are taken: a read-only open of a WAL database may make its
    // empty `-wal` file, which the next commit then holds.
    let (integrity, rows) = sql_check(&b.mp.join("app.db"), true);
    assert_eq!((integrity.as_str(), rows.len()), ("ok", 210));
    let (ta, tb) = (tree(&a.mp), tree(&b.mp));
    assert!(!tb.contains_key("from-source"));
    assert_eq!(ta["data/1.bin"], base["data/1.bin"]);
    assert_eq!(tb["data/0.bin"], base["data/0.bin"]);
    a.sync();
    b.sync();
    assert_same_tree(&restored(&a, "src", "HEAD"), &ta, "the source");
    assert_same_tree(&restored(&b, "fork", "HEAD"), &tb, "the fork");
    assert_same_tree(
        &restored(&b, "fork", "1"),
        &base,
        "the fork's first generation",
    );

    // Exported as a plain tree, a tar and a tar.zst: the same files, links and modes.
    let out = a.dir.path();
    a.ok(&[
        "export",
        "fork@HEAD",
        &out.join("fork-dir").to_string_lossy(),
        "--store",
        &a.store,
    ]);
    assert_same_tree(&tree(&out.join("fork-dir")), &tb, "export to a directory");
    let err = refused(
        &a,
        &[
            "export",
            "fork@HEAD",
            &out.join("fork-dir").to_string_lossy(),
            "--store",
            &a.store,
        ],
    );
    assert!(err.contains("not empty"), "{err}");
    a.ok(&[
        "export",
        "src@HEAD",
        &out.join("src.tar").to_string_lossy(),
        "--store",
        &a.store,
    ]);
    a.ok(&[
        "export",
        &g.to_string(),
        &out.join("base.tar.zst").to_string_lossy(),
        "--store",
        &a.store,
        "--workspace",
        "src",
    ]);
    let zst = std::fs::read(out.join("base.tar.zst")).unwrap();
    std::fs::write(out.join("base.tar"), zstd::decode_all(&zst[..]).unwrap()).unwrap();
    for (archive, want) in [("src.tar", &ta), ("base.tar", &base)] {
        let dir = out.join(format!("x-{archive}"));
        std::fs::create_dir(&dir).unwrap();
        run_ok(
            std::process::Command::new("tar")
                .arg("-xf")
                .arg(out.join(archive))
                .arg("-C")
                .arg(&dir),
        );
        assert_same_tree(&tree(&dir), want, archive);
        let md = std::fs::metadata(dir.join("data/4.bin")).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&md.permissions()) & 0o7777,
            0o755
        );
        let md = std::fs::metadata(dir.join("data/hard")).unwrap();
        assert_eq!(
            std::os::unix::fs::MetadataExt::nlink(&md),
            2,
            "{archive}: hard link"
        );
    }
    let err = refused(
        &a,
        &[
            "export",
            "src@nope",
            &out.join("n.tar").to_string_lossy(),
            "--store",
            &a.store,
        ],
    );
    assert!(err.contains("no snapshot named"), "{err}");
    assert!(!out.join("n.tar").exists());

    // A fork and its source compare like two states of one workspace.
    let text = b.ok(&["diff", "src@HEAD", "fork@HEAD", "--store", &b.store]);
    for want in [
        "D  from-source",
        "D  data/2.bin",
        "M  data/0.bin  (content",
        "M  data/1.bin  (content",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(want)),
            "{want:?} not in {text}"
        );
    }

    // The log says where the fork came from.
    let log = b.ok(&["log", "--store", &b.store, "--workspace", "fork"]);
    assert!(
        log.contains(&format!("is a fork of \"src\" at generation {g}")),
        "{log}"
    );
    let json = b.log_json();
    assert_eq!(json[0]["forked_from"]["workspace"], "src");
    assert_eq!(json[0]["epoch"], 0);
    a.unmount();
    b.unmount();
}

#[test]
fn a_fork_goes_its_own_way_file() {
    if skip_fuse() {
        return;
    }
    a_fork_goes_its_own_way(&TestStore::file());
}

#[test]
fn a_fork_goes_its_own_way_seaweedfs() {
    if skip_fuse() {
        return;
    }
    a_fork_goes_its_own_way(&TestStore::seaweed("history-fork"));
}

/// A drill proves a generation restores, and catches a damaged pack and a missing one; each
/// outcome is recorded in the store and shown by `owsfs log`.
fn drills_prove_and_catch(store: &TestStore) {
    let a = store.workspace("src", &[]);
    a.mount();
    std::fs::create_dir(a.path("data")).unwrap();
    for i in 0..8 {
        std::fs::write(a.path(&format!("data/{i}.bin")), noise(200_000, i)).unwrap();
    }
    std::os::unix::fs::symlink("data/0.bin", a.path("link")).unwrap();
    std::fs::hard_link(a.path("data/3.bin"), a.path("data/hard")).unwrap();
    write_db(&a.mp, 300);
    let g = a.sync();
    a.unmount();
    let drill = |state: &str| {
        a.owsfs(&[
            "drill",
            state,
            "--store",
            &a.store,
            "--workspace",
            "src",
            "--json",
        ])
    };
    let out = drill(&g.to_string());
    assert!(out.status.success(), "drill: {}", stderr(&out));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["ok"], true);
    // Eight files, a second name of one, the database (its WAL is gone once closed).
    assert_eq!(r["files"], 10, "{r}");
    assert_eq!(
        r["databases"],
        serde_json::json!([{"path": "app.db", "integrity": "ok"}])
    );
    let log = a.ok(&["log", "--store", &a.store, "--workspace", "src"]);
    assert!(log.contains("[drill ok"), "{log}");

    // A byte flipped in the middle of the largest pack.
    let packs = store.keys("packs/");
    let largest = packs
        .iter()
        .max_by_key(|k| store.get(k).len())
        .unwrap()
        .clone();
    let good = store.get(&largest);
    let mut bad = good.clone();
    let at = bad.len() / 2;
    bad[at] ^= 0x40;
    store.put(&largest, &bad);
    let out = drill(&g.to_string());
    assert!(!out.status.success(), "a drill passed over a damaged pack");
    let err = stderr(&out);
    assert!(err.contains("FAILED") && err.contains("corrupt"), "{err}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["ok"], false);
    let log = a.ok(&["log", "--store", &a.store, "--workspace", "src"]);
    assert!(log.contains("[DRILL FAILED"), "{log}");

    // Put back, then lost.
    store.put(&largest, &good);
    assert!(drill("HEAD").status.success());
    store.delete(&largest);
    let out = drill("HEAD");
    assert!(!out.status.success(), "a drill passed without a pack");
    let err = stderr(&out);
    assert!(err.contains("does not exist"), "{err}");
    // A restore that fails half-way leaves nothing: a directory it made is removed, an empty
    // one it was given is emptied again.
    let made = a.dir.path().join("half");
    let given = a.dir.path().join("given");
    std::fs::create_dir(&given).unwrap();
    for dest in [&made, &given] {
        let out = a.owsfs(&[
            "restore",
            "--store",
            &a.store,
            "--workspace",
            "src",
            &dest.to_string_lossy(),
        ]);
        assert!(!out.status.success(), "a restore without a pack succeeded");
    }
    assert!(!made.exists(), "a failed restore left its directory");
    assert_eq!(
        std::fs::read_dir(&given).unwrap().count(),
        0,
        "a failed restore left files"
    );
    let json = a.log_json();
    let entry = json
        .iter()
        .find(|e| e["number"].as_u64() == Some(g))
        .unwrap();
    assert_eq!(entry["drill"]["ok"], false, "{entry}");
}

#[test]
fn drills_prove_and_catch_file() {
    if skip_fuse() {
        return;
    }
    drills_prove_and_catch(&TestStore::file());
}

#[test]
fn drills_prove_and_catch_seaweedfs() {
    if skip_fuse() {
        return;
    }
    drills_prove_and_catch(&TestStore::seaweed("history-drill"));
}

/// `--drill-every`: the daemon drills on its own; `owsfs status` shows the newest outcome, a
/// failure loudly.
fn the_daemon_drills_on_a_schedule(store: &TestStore) {
    let scratch = tempfile::tempdir().unwrap();
    let a = store.workspace(
        "src",
        &[
            "--drill-every",
            "300ms",
            "--drill-scratch",
            &scratch.path().to_string_lossy(),
        ],
    );
    a.mount();
    for i in 0..4 {
        std::fs::write(a.path(&format!("f{i}")), noise(100_000, i)).unwrap();
    }
    write_db(&a.mp, 10);
    let g = a.sync();
    let drilled = wait_for(std::time::Duration::from_secs(60), || {
        let s = a.status_json(false);
        s["sync"]["drill"]["ok"] == true && s["sync"]["drill"]["generation"].as_u64() >= Some(g)
    });
    assert!(drilled, "no drill in the status{}", a.log_tail());
    let text = a.ok(&["status", &a.mp.to_string_lossy()]);
    assert!(text.contains("drill        ok"), "{text}");
    // Lose every pack: the next drill fails, loudly.
    for k in store.keys("packs/") {
        store.delete(&k);
    }
    let failed = wait_for(std::time::Duration::from_secs(60), || {
        a.status_json(false)["sync"]["drill"]["ok"] == false
    });
    assert!(failed, "no failed drill in the status{}", a.log_tail());
    let text = a.ok(&["status", &a.mp.to_string_lossy()]);
    assert!(text.contains("DRILL FAILED"), "{text}");
    assert!(a.log_tail().contains("FAILED"), "{}", a.log_tail());
    a.unmount();
    // Nothing is left in the scratch directory.
    assert_eq!(std::fs::read_dir(scratch.path()).unwrap().count(), 0);
}

#[test]
fn the_daemon_drills_on_a_schedule_file() {
    if skip_fuse() {
        return;
    }
    the_daemon_drills_on_a_schedule(&TestStore::file());
}

#[test]
fn the_daemon_drills_on_a_schedule_seaweedfs() {
    if skip_fuse() {
        return;
    }
    the_daemon_drills_on_a_schedule(&TestStore::seaweed("history-drills"));
}

/// Laptop to cloud and back: a copy to a second store, a change, a second copy that moves
/// only the difference, a mount of the copy on a fresh cache, a change there, and the copy
/// back; a copy of one state under another name; a diverged destination refused.
fn copy_between_stores(cloud: &TestStore) {
    let laptop = TestStore::file();
    let mut a = laptop.workspace("proj", &[]);
    a.env.extend(cloud.env.iter().cloned());
    a.mount();
    std::fs::create_dir(a.path("src")).unwrap();
    for i in 0..6 {
        std::fs::write(a.path(&format!("src/{i}.bin")), noise(200_000, 40 + i)).unwrap();
    }
    write_db(&a.mp, 100);
    a.ok(&["snapshot", "create", "v1", &a.mp.to_string_lossy()]);
    let v1 = tree(&a.mp);
    a.unmount();
    let copy = |from: &str, to: &str| -> serde_json::Value {
        serde_json::from_str(&a.ok(&["copy", from, to, "--json"])).unwrap()
    };
    let src = format!("{}#proj", laptop.url);
    let first = copy(&src, &cloud.url);
    assert!(first["packs_copied"].as_u64() > Some(0), "{first}");
    // v1 and the unmount's automatic snapshot.
    assert_eq!(first["snapshots_copied"], 2, "{first}");

    // A change on the laptop; the second copy moves only it.
    a.mount();
    std::fs::write(a.path("src/0.bin"), b"changed\n").unwrap();
    let v2 = tree(&a.mp);
    a.unmount();
    let second = copy(&src, &cloud.url);
    assert!(second["generations_present"].as_u64() > Some(0), "{second}");
    assert!(second["packs_present"].as_u64() > Some(0), "{second}");
    assert!(
        second["bytes_copied"].as_u64().unwrap() * 4 < first["bytes_copied"].as_u64().unwrap(),
        "the second copy moved too much: {second} after {first}"
    );

    // Mounted in the cloud on a fresh cache: the laptop's newest state and its snapshot.
    let c = cloud.workspace("proj", &[]);
    c.mount();
    assert_same_tree(&tree(&c.mp), &v2, "the copy");
    let snaps = c.ok(&["snapshot", "list", &c.mp.to_string_lossy()]);
    assert!(snaps.contains("v1"), "{snaps}");
    std::fs::write(c.path("from-cloud"), b"cloud\n").unwrap();
    let v3 = tree(&c.mp);
    c.unmount();
    // The cloud copy was written: copying the laptop over it is refused...
    let out = a.owsfs(&["copy", &src, &cloud.url]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("diverged"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // ... and copying it back works; the laptop mounts it and goes on.
    copy(&format!("{}#proj", cloud.url), &laptop.url);
    let mut b = laptop.workspace("proj", &[]);
    b.env.extend(cloud.env.iter().cloned());
    b.mount();
    assert_same_tree(&tree(&b.mp), &v3, "copied back");
    std::fs::write(b.path("again"), b"laptop\n").unwrap();
    b.sync();
    b.unmount();

    // One state under another name.
    let one = copy(
        &format!("{}#proj@v1", laptop.url),
        &format!("{}#proj-v1", cloud.url),
    );
    assert_eq!(one["generations_copied"], 1, "{one}");
    let d = cloud.workspace("proj-v1", &[]);
    d.mount();
    assert_same_tree(&tree(&d.mp), &v1, "one state copied");
    d.unmount();
    d.ok(&["drill", "--store", &cloud.url, "--workspace", "proj-v1"]);
}

#[test]
fn copy_between_stores_file() {
    if skip_fuse() {
        return;
    }
    copy_between_stores(&TestStore::file());
}

#[test]
fn copy_between_stores_seaweedfs() {
    if skip_fuse() {
        return;
    }
    copy_between_stores(&TestStore::seaweed("history-copy"));
}

/// Read-only mounts of older generations beside the writer: every write fails with EROFS,
/// they keep showing their generation while the writer commits and GC runs (their pins hold
/// it), they hydrate lazily from it, and their pins go with them.
fn read_only_mounts_beside_the_writer(store: &TestStore) {
    let mut a = store.workspace("src", &["--commit-interval", "50ms"]);
    a.fast_gc();
    a.mount();
    std::fs::create_dir(a.path("d")).unwrap();
    for i in 0..5 {
        std::fs::write(a.path(&format!("d/{i}.bin")), noise(150_000, 70 + i)).unwrap();
    }
    std::os::unix::fs::symlink("d/0.bin", a.path("link")).unwrap();
    let v1 = tree(&a.mp);
    a.ok(&["snapshot", "create", "first", &a.mp.to_string_lossy()]);
    let mut ro1 = store.workspace("src", &["--at", "first", "--prefetch", "0"]);
    ro1.fast_gc();
    ro1.mount();
    let mut ro2 = store.workspace("src", &["--read-only", "--prefetch", "0"]);
    ro2.fast_gc();
    ro2.mount();
    assert_eq!(store.keys("workspaces/src/pins/").len(), 2);
    let status = ro1.status_json(false);
    assert!(status["read_only_at"].as_u64().is_some(), "{status}");
    let text = ro1.ok(&["status", &ro1.mp.to_string_lossy()]);
    assert!(text.contains("read-only    generation"), "{text}");

    // Every kind of write is refused.
    let p = |rel: &str| ro1.path(rel);
    let erofs = |what: &str, r: std::io::Result<()>| {
        let e = r.expect_err(what);
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{what}: {e}");
    };
    erofs("create", std::fs::write(p("new"), b"x"));
    erofs(
        "write",
        std::fs::OpenOptions::new()
            .write(true)
            .open(p("d/1.bin"))
            .map(|_| ()),
    );
    erofs("mkdir", std::fs::create_dir(p("newdir")));
    erofs("unlink", std::fs::remove_file(p("d/2.bin")));
    erofs("rmdir", std::fs::remove_dir(p("d")));
    erofs("rename", std::fs::rename(p("d/3.bin"), p("moved")));
    erofs("symlink", std::os::unix::fs::symlink("x", p("l2")));
    erofs("link", std::fs::hard_link(p("d/3.bin"), p("h")));
    erofs(
        "chmod",
        std::fs::set_permissions(
            p("d/4.bin"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        ),
    );

    // The writer goes on and a GC with a short retention runs; the mounts show their state.
    for i in 0..5 {
        std::fs::remove_file(a.path(&format!("d/{i}.bin"))).unwrap();
        std::fs::write(a.path(&format!("new{i}")), noise(50_000, 90 + i)).unwrap();
        a.sync();
    }
    a.keep_only_newest("src");
    a.ok(&["snapshot", "delete", "first", &a.mp.to_string_lossy()]);
    for _ in 0..3 {
        std::thread::sleep(std::time::Duration::from_millis(1100));
        a.ok(&["gc", "--store", &a.store, "--grace", "1s"]);
    }
    assert_same_tree(&tree(&ro1.mp), &v1, "the read-only mount of `first`");
    assert_same_tree(
        &tree(&ro2.mp),
        &v1,
        "the read-only mount of HEAD at its start",
    );
    assert!(!tree(&a.mp).contains_key("d/0.bin"));
    ro1.unmount();
    ro2.unmount();
    assert!(
        store.keys("workspaces/src/pins/").is_empty(),
        "pins left behind"
    );
    a.unmount();
}

#[test]
fn read_only_mounts_beside_the_writer_file() {
    if skip_fuse() {
        return;
    }
    read_only_mounts_beside_the_writer(&TestStore::file());
}

#[test]
fn read_only_mounts_beside_the_writer_seaweedfs() {
    if skip_fuse() {
        return;
    }
    read_only_mounts_beside_the_writer(&TestStore::seaweed("history-ro"));
}

/// A rollback to a snapshot, then its undo; refused while the workspace is mounted.
fn rollback_and_undo(store: &TestStore) {
    let a = store.workspace("src", &[]);
    a.mount();
    std::fs::write(a.path("a"), b"v1\n").unwrap();
    write_db(&a.mp, 10);
    a.ok(&["snapshot", "create", "good", &a.mp.to_string_lossy()]);
    let v1 = tree(&a.mp);
    std::fs::write(a.path("a"), b"v2 (bad)\n").unwrap();
    std::fs::write(a.path("junk"), b"junk\n").unwrap();
    write_db(&a.mp, 5);
    let v2 = tree(&a.mp);
    let args = |r: &str| -> Vec<String> {
        ["rollback", "--store", &a.store, "--workspace", "src", r]
            .map(String::from)
            .to_vec()
    };
    let run = |r: &str| a.owsfs(&args(r).iter().map(String::as_str).collect::<Vec<_>>());
    let out = run("good");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unmount it first"));
    a.unmount();

    let out = run("good");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let undo = String::from_utf8_lossy(&out.stderr)
        .split("undo with `owsfs rollback --workspace src ")
        .nth(1)
        .and_then(|s| s.split('`').next())
        .expect("the undo is said")
        .to_string();
    a.mount();
    assert_same_tree(&tree(&a.mp), &v1, "after the rollback");
    let (integrity, rows) = sql_check(&a.mp.join("app.db"), true);
    assert_eq!((integrity.as_str(), rows.len()), ("ok", 10));
    a.unmount();
    let out = run(&undo);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    a.mount();
    assert_same_tree(&tree(&a.mp), &v2, "after the undo");
    // History is kept: the bad state, the rollback and its undo are all generations.
    std::fs::write(a.path("after"), b"goes on\n").unwrap();
    a.sync();
    a.unmount();
    a.ok(&["drill", "--store", &a.store, "--workspace", "src"]);
}

#[test]
fn rollback_and_undo_file() {
    if skip_fuse() {
        return;
    }
    rollback_and_undo(&TestStore::file());
}

#[test]
fn rollback_and_undo_seaweedfs() {
    if skip_fuse() {
        return;
    }
    rollback_and_undo(&TestStore::seaweed("history-rollback"));
}

/// A template is read-mostly: writer mounts refused unless they edit it; read-only mounts and
/// forks (with the template's access list) are what it is for; unmarked, it is ordinary.
fn templates_are_read_mostly(store: &TestStore) {
    let mut t = store.workspace("tpl", &[]);
    t.mount();
    std::fs::create_dir(t.path("lib")).unwrap();
    std::fs::write(t.path("lib/base.py"), b"BASE = 1\n").unwrap();
    std::fs::write(t.path("data.bin"), noise(1 << 20, 7)).unwrap();
    write_db(&t.mp, 20);
    // Opened, so it is on the template's access list (a fork's mount fetches it first).
    std::fs::read(t.path("data.bin")).unwrap();
    let v = tree(&t.mp);
    t.unmount();

    t.ok(&[
        "template",
        "mark",
        "--store",
        &t.store,
        "--workspace",
        "tpl",
    ]);
    let list = t.ok(&["template", "list", "--json", "--store", &t.store]);
    assert!(list.contains("\"workspace\": \"tpl\""), "{list}");
    let log = t.ok(&["log", "--store", &t.store, "--workspace", "tpl"]);
    assert!(log.contains("template: read-mostly"), "{log}");
    let out = t.try_mount();
    assert!(!out.status.success(), "a writer mount of a template");
    assert!(stderr(&out).contains("is a template"), "{}", stderr(&out));
    let err = refused(
        &t,
        &["rollback", "--store", &t.store, "--workspace", "tpl", "1"],
    );
    assert!(err.contains("is a template"), "{err}");

    let ro = store.workspace("tpl", &["--read-only"]);
    ro.mount();
    assert_same_tree(&tree(&ro.mp), &v, "a read-only mount of the template");
    ro.unmount();

    // Start from it: a fork, written; the template stays as it was.
    t.ok(&["fork", "--store", &t.store, "tpl", "proj"]);
    let p = store.workspace("proj", &[]);
    p.mount();
    assert_same_tree(&tree(&p.mp), &v, "the fork of the template");
    std::fs::write(p.path("lib/base.py"), b"BASE = 2\n").unwrap();
    let g = p.sync();
    p.unmount();
    let gens = p.log_json();
    let first = gens
        .iter()
        .find(|r| r["number"] == 1)
        .expect("generation 1");
    let tpl_head = t.log_json().last().cloned().unwrap();
    assert_eq!(
        first["access"], tpl_head["access"],
        "the fork starts with the template's access list"
    );
    assert!(first["access"].is_object(), "{first}");
    assert!(g > 1);
    assert_same_tree(
        &restored(&t, "tpl", "HEAD"),
        &v,
        "the template after the fork",
    );

    // Edited on purpose, then unmarked.
    t.extra.push("--edit-template".into());
    t.mount();
    std::fs::write(t.path("lib/base.py"), b"BASE = 3\n").unwrap();
    t.unmount();
    t.extra.clear();
    t.ok(&[
        "template",
        "unmark",
        "--store",
        &t.store,
        "--workspace",
        "tpl",
    ]);
    t.mount();
    assert_eq!(std::fs::read(t.path("lib/base.py")).unwrap(), b"BASE = 3\n");
    t.unmount();
}

#[test]
fn templates_are_read_mostly_file() {
    if skip_fuse() {
        return;
    }
    templates_are_read_mostly(&TestStore::file());
}

#[test]
fn templates_are_read_mostly_seaweedfs() {
    if skip_fuse() {
        return;
    }
    templates_are_read_mostly(&TestStore::seaweed("history-template"));
}

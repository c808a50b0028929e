//! Real workloads through a real mount: SQLite in WAL mode from several processes, git, tar.

mod common;

use std::process::{Command, Stdio};

use common::*;

const SQLITE_WRITER: &str = r#"
import sqlite3, sys, time
db, who, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
con = sqlite3.connect(db, timeout=60, isolation_level=None)
con.execute("PRAGMA journal_mode=WAL")
con.execute("PRAGMA synchronous=FULL")
con.execute("CREATE TABLE IF NOT EXISTS t (who TEXT, i INTEGER, pad BLOB)")
for i in range(n):
    for attempt in range(1000):
        try:
            con.execute("BEGIN IMMEDIATE")
            con.execute("INSERT INTO t VALUES (?, ?, randomblob(300))", (who, i))
            con.execute("COMMIT")
            break
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) and "busy" not in str(e):
                raise
            try:
                con.execute("ROLLBACK")
            except sqlite3.OperationalError:
                pass
            time.sleep(0.001)
    else:
        sys.exit("gave up on a locked database")
con.close()
"#;

const SQLITE_READER: &str = r#"
import sqlite3, sys, os, time
db, done = sys.argv[1], sys.argv[2]
while not os.path.exists(db):
    time.sleep(0.01)
con = sqlite3.connect(db, timeout=60, isolation_level=None)
last, reads = 0, 0
while True:
    finished = os.path.exists(done)
    try:
        n = con.execute("SELECT count(*) FROM t").fetchone()[0]
    except sqlite3.OperationalError as e:
        if "no such table" in str(e) or "locked" in str(e):
            time.sleep(0.005)
            continue
        raise
    assert n >= last, f"count went backwards: {n} < {last}"
    last, reads = n, reads + 1
    if finished:
        break
    time.sleep(0.002)
print(reads, last)
"#;

const SQLITE_CHECK: &str = r#"
import sqlite3, sys
con = sqlite3.connect(sys.argv[1])
print(con.execute("PRAGMA integrity_check").fetchone()[0])
print(con.execute("SELECT who, count(*) FROM t GROUP BY who ORDER BY who").fetchall())
"#;

#[test]
fn sqlite_wal_two_writers_and_a_reader() {
    if skip_fuse() {
        return;
    }
    let ws = Workspace::new();
    let db = ws.path("app.db");
    let done = ws.dir.path().join("writers-done");
    let n = 300;
    let reader = Command::new("python3")
        .args(["-c", SQLITE_READER])
        .arg(&db)
        .arg(&done)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start reader");
    // Create the schema first so both writers start on a WAL database.
    run_ok(
        Command::new("python3")
            .args(["-c", SQLITE_WRITER])
            .arg(&db)
            .args(["setup", "0"]),
    );
    let writers: Vec<_> = ["w1", "w2"]
        .iter()
        .map(|who| {
            Command::new("python3")
                .args(["-c", SQLITE_WRITER])
                .arg(&db)
                .arg(who)
                .arg(n.to_string())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start writer")
        })
        .collect();
    for w in writers {
        let out = w.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "writer failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::write(&done, b"").unwrap();
    let out = reader.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "reader failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let check = run_ok(Command::new("python3").args(["-c", SQLITE_CHECK]).arg(&db));
    let text = String::from_utf8_lossy(&check.stdout);
    assert_eq!(
        text.trim(),
        format!("ok\n[('w1', {n}), ('w2', {n})]"),
        "integrity and row counts"
    );
    // The -shm file is shared through mmap between the processes; the WAL exists.
    assert!(ws.backing("app.db-wal").exists() || ws.backing("app.db").exists());
}

/// A real source tree: this repository's own sources (no network needed).
fn source_tarball(into: &std::path::Path) -> std::path::PathBuf {
    let root = env!("CARGO_MANIFEST_DIR");
    let tar = into.join("src.tar");
    // Only the source directories: the work tree may hold benchmark scratch and mounts.
    run_ok(
        Command::new("tar")
            .arg("-cf")
            .arg(&tar)
            .arg("-C")
            .arg(root)
            .args([
                "Cargo.toml",
                "Cargo.lock",
                "src",
                "fuse",
                "journal",
                "store",
                "tests",
            ]),
    );
    tar
}

#[test]
fn tar_extract_and_git_commit_of_a_source_tree() {
    if skip_fuse() {
        return;
    }
    let ws = Workspace::new();
    let tar = source_tarball(ws.dir.path());
    std::fs::create_dir(ws.path("tree")).unwrap();
    run_ok(
        Command::new("tar")
            .arg("-xf")
            .arg(&tar)
            .arg("-C")
            .arg(ws.path("tree")),
    );
    // The extracted tree is byte-identical to the tarball's content.
    let native = ws.dir.path().join("native");
    std::fs::create_dir(&native).unwrap();
    run_ok(
        Command::new("tar")
            .arg("-xf")
            .arg(&tar)
            .arg("-C")
            .arg(&native),
    );
    run_ok(
        Command::new("diff")
            .arg("-r")
            .arg("--no-dereference")
            .arg(&native)
            .arg(ws.path("tree")),
    );
    sh(
        "git init -q . && git -c user.name=t -c user.email=t@example.invalid add -A && \
         git -c user.name=t -c user.email=t@example.invalid commit -qm import && \
         git fsck --strict && git status --porcelain | wc -l | grep -qx 0",
        &ws.path("tree"),
    );
    // The same commit from a native copy has the same tree id: git saw identical content.
    sh(
        "git init -q . && git -c user.name=t -c user.email=t@example.invalid add -A",
        &native,
    );
    let a = sh("git write-tree", &native);
    let b = sh("git rev-parse HEAD^{tree}", &ws.path("tree"));
    assert_eq!(
        String::from_utf8_lossy(&a.stdout),
        String::from_utf8_lossy(&b.stdout)
    );
}

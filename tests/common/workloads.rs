//! The workloads the supervisor and io_uring tests run on a mount and on a native directory:
//! dd, tar, and SQLite in WAL and in DELETE mode, and what they leave. Included with
//! `#[path = "common/workloads.rs"] mod workloads;` beside `mod common;`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::common::*;

/// SQLite in autocommit with `synchronous=FULL`: argv[1] the database, argv[2] the journal
/// mode, argv[3] the rows. Every row is its own transaction.
const SQLITE: &str = r#"
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA journal_mode=" + sys.argv[2])
db.execute("PRAGMA synchronous=FULL")
db.execute("CREATE TABLE t(k INTEGER PRIMARY KEY, v TEXT)")
for i in range(int(sys.argv[3])):
    db.execute("INSERT INTO t VALUES(?, ?)", (i, "row %d " % i * 8))
    if i % 50 == 49:
        db.execute("UPDATE t SET v = v || '!' WHERE k % 7 = 0")
db.close()
"#;

/// The rows of a database as SQL text (`iterdump`), which is what must match.
const DUMP: &str = r#"
import sqlite3, sys
db = sqlite3.connect("file:" + sys.argv[1] + "?mode=ro", uri=True)
print("\n".join(db.iterdump()))
"#;

/// The inputs of the workloads, made once per test outside any mount.
pub struct Inputs {
    pub dir: tempfile::TempDir,
    blob: PathBuf,
    tarball: PathBuf,
}

impl Inputs {
    pub fn new() -> Inputs {
        let dir = tempfile::Builder::new()
            .prefix("owsfs-inputs-")
            .tempdir()
            .unwrap();
        let blob = dir.path().join("blob");
        std::fs::write(&blob, noise(24 << 20, 17)).unwrap();
        let src = dir.path().join("src");
        for d in 0..30 {
            let sub = src.join(format!("d{d}"));
            std::fs::create_dir_all(&sub).unwrap();
            for f in 0..40 {
                let len = (d * 977 + f * 131) % 9000;
                std::fs::write(
                    sub.join(format!("f{f}.txt")),
                    noise(len, (d * 100 + f) as u64),
                )
                .unwrap();
            }
        }
        std::os::unix::fs::symlink("d0/f0.txt", src.join("link")).unwrap();
        let tarball = dir.path().join("src.tar");
        run_ok(
            Command::new("tar")
                .arg("-cf")
                .arg(&tarball)
                .arg("-C")
                .arg(&src)
                .arg("."),
        );
        Inputs { dir, blob, tarball }
    }

    /// Starts the four workloads in `root`: dd, tar, SQLite in WAL and in DELETE mode.
    pub fn start(&self, root: &Path) -> Vec<(&'static str, Child)> {
        std::fs::create_dir_all(root.join("tree")).unwrap();
        let spawn = |name: &'static str, cmd: &mut Command| {
            let child = cmd
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("start {name}: {e}"));
            (name, child)
        };
        vec![
            spawn(
                "dd",
                Command::new("dd")
                    .arg(format!("if={}", self.blob.display()))
                    .arg(format!("of={}", root.join("blob").display()))
                    .args(["bs=4k", "oflag=dsync", "conv=fsync"]),
            ),
            spawn(
                "tar",
                Command::new("tar")
                    .arg("-xf")
                    .arg(&self.tarball)
                    .arg("-C")
                    .arg(root.join("tree")),
            ),
            spawn(
                "sqlite wal",
                Command::new("python3")
                    .args(["-c", SQLITE])
                    .arg(root.join("wal.db"))
                    .args(["wal", "1500"]),
            ),
            spawn(
                "sqlite delete",
                Command::new("python3")
                    .args(["-c", SQLITE])
                    .arg(root.join("delete.db"))
                    .args(["delete", "1000"]),
            ),
        ]
    }

    /// What the workloads leave on a native directory.
    pub fn native(&self) -> Outcome {
        let root = self.dir.path().join("native");
        std::fs::create_dir(&root).unwrap();
        for (name, child) in self.start(&root) {
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "native {name} failed: {out:?}");
        }
        Outcome::of(&root)
    }
}

/// What the workloads left: the files dd and tar wrote, the databases' rows.
#[derive(Debug, PartialEq)]
pub struct Outcome {
    blob: Vec<u8>,
    tree: Snapshot,
    wal: String,
    delete: String,
}

impl Outcome {
    pub fn of(root: &Path) -> Outcome {
        let dump = |db: &str| {
            let out = run_ok(
                Command::new("python3")
                    .args(["-c", DUMP])
                    .arg(root.join(db)),
            );
            String::from_utf8(out.stdout).unwrap()
        };
        Outcome {
            blob: std::fs::read(root.join("blob")).unwrap(),
            tree: tree(&root.join("tree")),
            wal: dump("wal.db"),
            delete: dump("delete.db"),
        }
    }

    /// Every way this outcome differs from `native`, each said in a line.
    pub fn differences(&self, native: &Outcome) -> Vec<String> {
        let mut out = Vec::new();
        if self.blob != native.blob {
            out.push(format!(
                "dd's file: {}",
                describe_difference(&self.blob, &native.blob)
            ));
        }
        if self.tree.keys().ne(native.tree.keys()) {
            out.push("tar: other files than natively".to_string());
        }
        for (k, v) in &native.tree {
            if let Some(g) = self.tree.get(k)
                && g != v
            {
                out.push(format!("tar: {k}: {}", describe_difference(g, v)));
            }
        }
        if self.wal != native.wal {
            out.push("the WAL database differs from native".to_string());
        }
        if self.delete != native.delete {
            out.push("the DELETE-mode database differs from native".to_string());
        }
        out
    }

    /// Asserts the outcome is native's; the message has every difference, and the log lines
    /// of `ws`'s daemons that say more.
    pub fn assert_same(&self, native: &Outcome, ws: &Workspace) {
        let differences = self.differences(native);
        if differences.is_empty() {
            return;
        }
        let log = std::fs::read_to_string(ws.cache.join("owsfs.log")).unwrap_or_default();
        let said: Vec<&str> = log
            .lines()
            .filter(|l| !l.contains(" DEBUG ") && !l.contains(" TRACE "))
            .collect();
        panic!(
            "{}\n--- the daemons' log (info and above, last 80 lines) ---\n{}",
            differences.join("\n"),
            said[said.len().saturating_sub(80)..].join("\n")
        );
    }
}

/// Waits for every workload; each must succeed.
pub fn finish(workloads: Vec<(&'static str, Child)>, ws: &Workspace) {
    for (name, child) in workloads {
        let out = child.wait_with_output().unwrap();
        if !out.status.success() {
            let log = std::fs::read_to_string(ws.cache.join("owsfs.log")).unwrap_or_default();
            let warnings: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("inode "))
                .collect();
            panic!(
                "{name} failed: {}\n--- warnings of the daemons ---\n{}",
                String::from_utf8_lossy(&out.stderr),
                warnings.join("\n")
            );
        }
    }
}

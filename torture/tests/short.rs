//! `owsfs-torture --short` on each store, as CI runs it: a few trials of every scenario against
//! real mounts of the owsfs binary. A broken promise fails the test with the harness's report.

use std::path::PathBuf;
use std::process::Command;

/// The owsfs binary the workspace's build put beside this test's directory (`target/debug`),
/// or `OWSFS_BIN`.
fn owsfs_bin() -> PathBuf {
    if let Ok(b) = std::env::var("OWSFS_BIN") {
        return b.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target directory")
        .join("owsfs");
    assert!(
        bin.exists(),
        "{} is missing: build it first (cargo build --bin owsfs), or set OWSFS_BIN",
        bin.display()
    );
    bin
}

fn short(store: &str) {
    if std::env::var("OWSFS_SKIP_FUSE_TESTS").as_deref() == Ok("1") {
        eprintln!("OWSFS_SKIP_FUSE_TESTS=1: skipped");
        return;
    }
    let work = tempfile::Builder::new()
        .prefix("owsfs-torture-")
        .tempdir()
        .expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_owsfs-torture"))
        .args(["--short", "--stores", store, "--owsfs"])
        .arg(owsfs_bin())
        .arg("--work")
        .arg(work.path())
        .output()
        .expect("run owsfs-torture");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    if !out.status.success() {
        // The failing trial's files, for a look.
        let _ = work.keep();
    }
    assert!(
        out.status.success(),
        "owsfs-torture --short failed:\n{text}"
    );
    assert!(
        text.contains("inconsistent states | lost acknowledged writes"),
        "no figure table:\n{text}"
    );
}

#[test]
fn torture_short_file() {
    short("file");
}

#[test]
fn torture_short_seaweedfs() {
    short("s3");
}

/// The fuzz targets for a few seconds each, as CI runs them (`fuzz --for 10m` in long mode).
#[test]
fn torture_fuzz_short() {
    let work = tempfile::Builder::new()
        .prefix("owsfs-fuzz-")
        .tempdir()
        .expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_owsfs-torture"))
        .arg("--owsfs")
        .arg(owsfs_bin())
        .arg("--work")
        .arg(work.path())
        .args(["fuzz", "--for", "3s"])
        .output()
        .expect("run owsfs-torture fuzz");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    if !out.status.success() {
        let _ = work.keep();
    }
    assert!(out.status.success(), "owsfs-torture fuzz failed:\n{text}");
    for target in [
        "journal",
        "tree",
        "list",
        "generation",
        "lease",
        "wal",
        "url",
        "cli",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(&format!("{target} |"))),
            "no line for fuzz target {target}:\n{text}"
        );
    }
}

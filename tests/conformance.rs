//! The conformance suites (pjdfstest and fsx) on a fresh mount, through `xfstests/run`.
//! `OWSFS_FSX_OPS` sets the fsx operation count (default 100,000, the floor).

mod common;

use std::process::Command;

use common::*;

#[test]
fn pjdfstest_and_fsx_pass_on_a_fresh_mount() {
    let ops = std::env::var("OWSFS_FSX_OPS").unwrap_or_else(|_| "100000".into());
    conformance(&ops, "");
}

/// The same suites without the kernel writeback cache (every write through to the daemon;
/// fewer fsx operations: the default mode, with the cache, carries the 100,000).
#[test]
fn pjdfstest_and_fsx_pass_write_through() {
    conformance("20000", "writeback_cache=off");
}

/// And with kernel passthrough for read-only opens.
#[test]
fn pjdfstest_and_fsx_pass_with_passthrough() {
    conformance("20000", "passthrough=on");
}

/// And served through FUSE over io_uring (where the kernel has it: CI turns it on).
#[test]
fn pjdfstest_and_fsx_pass_through_io_uring() {
    if skip_fuse() || !uring_offered() {
        return;
    }
    conformance("20000", "uring=on");
}

fn conformance(ops: &str, options: &str) {
    if skip_fuse() {
        return;
    }
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("bash")
        .arg(format!("{root}/xfstests/run"))
        .args(["--fsx-ops", ops])
        .env("OWSFS_BIN", OWSFS)
        .env("OWSFS_OPTIONS", options)
        .current_dir(root)
        .output()
        .expect("run xfstests/run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}\n{stderr}");
    assert!(
        out.status.success(),
        "conformance failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let all = format!("{stdout}{stderr}");
    assert!(all.contains("pjdfstest ok"), "pjdfstest ran and passed");
    assert!(all.contains("fsx ok"), "fsx ran and passed");
}

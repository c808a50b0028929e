//! Reference-model tests (STYLE.md, "Tests in tiers", tier 2; after mountpoint-s3's
//! `tests/reftests/`).
//!
//! 1. `core_matches_the_model`: random sequences of namespace and data operations run on
//!    `owsfs_fuse::Core` and on an in-memory model (`model.rs`); after every step the outcome
//!    (Ok or the errno) must match, and the whole tree read through the core and read directly
//!    from the backing directory must both equal the model.
//!
//! `OWSFS_PROPTEST_CASES=N` runs N cases instead of the default 128. Shrunk failures
//! are kept below as named regression tests.

mod harness;
mod model;
mod ops;
mod tree;

use std::collections::HashMap;
use std::sync::Arc;

use owsfs_journal::{Journal, JournalOptions};
use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestError, TestRunner};

use crate::harness::CoreFs;
use crate::model::{Body, Model};
use crate::ops::{Op, Resolve, SLOTS};

/// Cases per property: `OWSFS_PROPTEST_CASES`, or `default`.
fn config(default: u32) -> ProptestConfig {
    let cases = std::env::var("OWSFS_PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        // Failures are kept as named tests below, not in files beside the sources.
        failure_persistence: None,
        max_shrink_iters: 4096,
        ..ProptestConfig::default()
    }
}

/// Longest operation sequence generated.
const MAX_OPS: usize = 40;

fn outcome(r: &Result<(), i32>) -> String {
    match r {
        Ok(()) => "Ok".into(),
        Err(e) => format!("Err({})", std::io::Error::from_raw_os_error(*e)),
    }
}

/// The operations done, one per line, as Rust: what a regression test replays.
fn listing(ops: &[Op]) -> String {
    ops.iter().map(|op| format!("    {op:?},\n")).collect()
}

/// Runs `steps` on a core over an empty backing directory and on the model, comparing after
/// every step. A failure lists the operations done.
fn run_against_model(steps: &[impl Resolve]) -> Result<(), String> {
    let mut done = Vec::new();
    run_steps(steps, &mut done)
        .map_err(|e| format!("{e}\nthe operations done:\n{}", listing(&done)))
}

/// Drops operations one at a time while `fails` still holds.
fn minimize<T: Clone>(mut list: Vec<T>, fails: impl Fn(&[T]) -> bool) -> Vec<T> {
    let mut i = 0;
    while i < list.len() {
        let mut smaller = list.clone();
        smaller.remove(i);
        if fails(&smaller) {
            list = smaller;
        } else {
            i += 1;
        }
    }
    list
}

/// The operations of a failing `steps`, minimized.
fn smaller_sequence(steps: &[impl Resolve]) -> String {
    let mut done = Vec::new();
    let _ = run_steps(steps, &mut done);
    let smaller = minimize(done, |ops| run_steps(ops, &mut Vec::new()).is_err());
    format!("a smaller sequence that fails too:\n{}", listing(&smaller))
}

fn run_steps(steps: &[impl Resolve], done: &mut Vec<Op>) -> Result<(), String> {
    let dir = tempfile::tempdir().expect("temporary directory");
    let backing = dir.path().join("backing");
    std::fs::create_dir(&backing).expect("backing directory");
    let (journal, _) = Journal::open(
        &dir.path().join("journal"),
        &backing,
        JournalOptions::default(),
    )
    .expect("open the journal");
    let mut fs = CoreFs::new(&backing, Arc::new(journal));
    let mut model = Model::default();
    let mut ids = Ids::default();
    for (i, step) in steps.iter().enumerate() {
        let op = &step.resolve(&model);
        done.push(op.clone());
        let expected = model.apply(op);
        let got = fs.apply(op);
        if got != expected {
            return Err(format!(
                "step {i}, {op:?}: the core answered {}, the model {}",
                outcome(&got),
                outcome(&expected)
            ));
        }
        check_step(&model, &mut fs, &backing, &mut ids)
            .map_err(|e| format!("after step {i}, {op:?}:\n{e}"))?;
    }
    fs.close_all();
    for slot in 0..SLOTS {
        model.apply(&Op::Close { slot }).expect("close");
    }
    check_step(&model, &mut fs, &backing, &mut ids).map_err(|e| format!("after closing:\n{e}"))
}

/// The inode number of each model inode, as the core and the backing directory show it.
#[derive(Default)]
struct Ids {
    core: HashMap<model::Id, u64>,
    disk: HashMap<model::Id, u64>,
}

/// The core and the backing directory both show the model's tree, and the same inode numbers;
/// files open in slots read back the model's content through their handles.
fn check_step(
    model: &Model,
    fs: &mut CoreFs,
    backing: &std::path::Path,
    ids: &mut Ids,
) -> Result<(), String> {
    let core = fs.observe()?;
    tree::check(
        model,
        &core,
        "the tree read through the core",
        &mut ids.core,
    )?;
    let disk = tree::disk_tree(backing);
    tree::check(model, &disk, "the backing directory", &mut ids.disk)?;
    for ((path, c), (_, d)) in core.walk().into_iter().zip(disk.walk()).skip(1) {
        if c.ino != d.ino {
            return Err(format!(
                "/{path}: the core says inode {}, the backing directory {}",
                c.ino, d.ino
            ));
        }
    }
    for slot in 0..SLOTS {
        match (model.handles[slot], fs.read_slot(slot)) {
            (None, None) => {}
            (Some(id), Some(Ok(data))) => {
                let Body::File(expected) = &model.node(id).body else {
                    return Err(format!("slot {slot}: the model holds a non-file"));
                };
                if data != *expected {
                    return Err(format!(
                        "slot {slot}: the open file reads back differently{} ({} bytes, model {})",
                        tree::first_difference(&data, expected),
                        data.len(),
                        expected.len()
                    ));
                }
            }
            (m, c) => return Err(format!("slot {slot}: model {m:?}, core {c:?}")),
        }
    }
    Ok(())
}

/// Checks `run` on `config(128)` cases of `strategy`. Proptest shrinks a failure; the panic
/// then shows the shrunk case's failure and `smaller(case)` (a minimization of its resolved
/// operations, run once rather than at every shrinking step).
fn property<S: Strategy>(
    strategy: S,
    run: impl Fn(&S::Value) -> Result<(), String>,
    smaller: impl Fn(&S::Value) -> String,
) {
    let mut runner = TestRunner::new(config(128));
    match runner.run(&strategy, |case| run(&case).map_err(TestCaseError::fail)) {
        Ok(()) => {}
        Err(TestError::Fail(why, case)) => panic!("{why}\n{}", smaller(&case)),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn core_matches_the_model() {
    property(
        ops::steps(MAX_OPS),
        |steps| run_against_model(steps),
        |steps| smaller_sequence(steps),
    );
}

// ---- regression tests: shrunk sequences found by the properties above ----------------------

use crate::ops::Mode;
use crate::ops::RenameMode::*;
use crate::ops::XattrMode::*;
use Op::*;

fn replay(ops: &[Op]) {
    if let Err(e) = run_against_model(ops) {
        panic!("{e}");
    }
}

/// Smoke test of the driver itself: every kind of operation once, on one path each.
#[test]
fn every_operation_once() {
    replay(&[
        Mkdir {
            path: "a",
            mode: Mode(0o2775),
        },
        Mkdir {
            path: "a/b",
            mode: Mode(0o755),
        },
        Write {
            path: "a/b/c",
            create: Some(Mode(0o644)),
            excl: true,
            trunc: false,
            offset: 5000,
            len: 10,
            fill: 1,
        },
        Truncate {
            path: "a/b/c",
            size: 100_000,
        },
        Link {
            from: "a/b/c",
            to: "b",
        },
        Symlink {
            path: "c",
            target: "../b",
        },
        Chmod {
            path: "b",
            mode: Mode(0o4755),
        },
        SetMtime {
            path: "c",
            secs: 1_600_000_000,
            nsecs: 123_456_789,
        },
        SetMtime {
            path: "a",
            secs: -86_400,
            nsecs: 5,
        },
        SetXattr {
            path: "a/b",
            name: "user.a",
            value: "value",
            mode: OnlyCreate,
        },
        SetXattr {
            path: "b",
            name: "user.b",
            value: "",
            mode: Any,
        },
        RemoveXattr {
            path: "a/b",
            name: "user.a",
        },
        Fsync {
            path: "a/b/c",
            datasync: true,
        },
        Fsync {
            path: "a",
            datasync: false,
        },
        Open { slot: 0, path: "b" },
        Unlink { path: "b" },
        Unlink { path: "a/b/c" },
        WriteFh {
            slot: 0,
            offset: 1,
            len: 3,
            fill: 9,
        },
        TruncateFh { slot: 0, size: 2 },
        FsyncFh { slot: 0 },
        Rename {
            from: "a/b",
            to: "b",
            mode: Plain,
        },
        Rename {
            from: "b",
            to: "a",
            mode: Exchange,
        },
        Rename {
            from: "b",
            to: "a/b",
            mode: NoReplace,
        },
        Rmdir { path: "a/b" },
        Close { slot: 0 },
    ]);
}

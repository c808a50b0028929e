//! A crash at each of the journal's crash windows (FORMAT.md, "Crash windows and their fail
//! points"). Each test runs its workload in a child process, this test binary running just
//! that test, which performs operations on a backing directory the way the daemon does (the
//! record first, the operation once `append` returned) and is killed with SIGKILL at the
//! window's fail point: no unwinding, no destructor, nothing but what the kernel holds.
//! The test then checks what the crash left on disk, reopens the journal and checks the
//! recovery: no rescan where none is due, the torn tail cut, every change the workload
//! completed covered by the replayed dirty state (compared with the backing directory), the
//! state equal to the one the workload last saw where that is determined, and appending
//! going on after it.

use std::io::Write;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::journal::*;
use harness::*;

mod harness;

// ---- Appending ----------------------------------------------------------------------------

/// A batch of seven records is torn in its fourth (`journal-batch-torn`): the next open cuts
/// the torn record, keeps the three whole ones before it (intents, not performed), and every
/// operation the workload performed is covered.
#[test]
fn a_batch_torn_by_a_crash_is_cut_and_no_completed_change_is_lost() {
    let case = crash(
        "a_batch_torn_by_a_crash_is_cut_and_no_completed_change_is_lost",
        "journal-batch-torn",
        |case| {
            let j = worked(case, big(BOOT_A), 40);
            let d = Daemon::new(&j, case);
            let files: Vec<PathBuf> = d.files.lock().iter().take(8).cloned().collect();
            // The first write waits until the other seven records are buffered behind it;
            // they go out as the next batch, which is torn.
            let start = j.stats().records;
            case.note("before", j.stats().last_seq);
            let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
            let go_rx = Mutex::new(go_rx);
            let calls = AtomicU32::new(0);
            j.inner.lock().write_hook = Some(Arc::new(move |_: &File, _: &[u8]| {
                match calls.fetch_add(1, Ordering::SeqCst) {
                    0 => go_rx.lock().recv().unwrap(),
                    1 => arm(),
                    _ => {}
                }
                None
            }));
            std::thread::scope(|s| {
                let d = &d;
                s.spawn(|| d.write(&files[0], 3, b"torn batch"));
                while j.stats().records < start + 1 {
                    std::thread::yield_now();
                }
                for f in &files[1..] {
                    s.spawn(move || d.write(f, 3, b"torn batch"));
                }
                while j.stats().records < start + 8 {
                    std::thread::yield_now();
                }
                go_tx.send(()).unwrap();
            });
        },
    );
    let seg = segment::segment_path(&case.journal(), *case.segments().last().unwrap());
    let len_before = fs::metadata(&seg).unwrap().len();
    let before = case.noted("before");
    assert!(case.done().into_iter().max() <= Some(before + 1));
    let (j, rec) = case.open(big(BOOT_A));
    assert!(rec.torn_tail.is_some() && rec.rescan.is_none(), "{rec:?}");
    assert!(
        fs::metadata(&seg).unwrap().len() < len_before,
        "the torn tail is cut"
    );
    // The first thread's record, then the torn batch's whole records; whether the first
    // thread performed its write before the crash is a race, which coverage allows for.
    assert_eq!(
        rec.last_seq,
        before + 1 + 3,
        "the batch's whole records before the torn one are replayed"
    );
    drop(j);
    reopen_and_go_on(&case, big(BOOT_A));
}

/// A failed write (no space) that appended half its batch, and a crash before the segment is
/// cut back (`journal-failed-before-cut`): the next open cuts the partial record; the
/// operation was not performed.
#[test]
fn a_crash_before_a_failed_write_is_cut_back() {
    let case = crash(
        "a_crash_before_a_failed_write_is_cut_back",
        "journal-failed-before-cut",
        |case| {
            let j = worked(case, big(BOOT_A), 30);
            fail_next_write_halfway(&j);
            arm();
            let d = Daemon::new(&j, case);
            let f = d.files.lock().first().cloned().unwrap();
            d.write(&f, 0, b"never performed");
        },
    );
    let last_done = case.done().into_iter().max().unwrap();
    let rec = reopen_and_go_on(&case, big(BOOT_A));
    assert!(rec.torn_tail.is_some() && rec.rescan.is_none(), "{rec:?}");
    assert_eq!(rec.last_seq, last_done, "the failed record is cut away");
}

/// The same, with the crash after the cut-back (`journal-failed-after-cut`): the segment
/// ends with the last whole record already.
#[test]
fn a_crash_after_a_failed_write_is_cut_back() {
    let case = crash(
        "a_crash_after_a_failed_write_is_cut_back",
        "journal-failed-after-cut",
        |case| {
            let j = worked(case, big(BOOT_A), 30);
            case.expect(&j.dirty());
            fail_next_write_halfway(&j);
            arm();
            let d = Daemon::new(&j, case);
            let f = d.files.lock().first().cloned().unwrap();
            d.write(&f, 0, b"never performed");
        },
    );
    let last_done = case.done().into_iter().max().unwrap();
    let expected = case.expected();
    let (j, rec) = case.open(big(BOOT_A));
    assert!(rec.torn_tail.is_none() && rec.rescan.is_none(), "{rec:?}");
    assert_eq!(rec.last_seq, last_done);
    assert_eq!(j.dirty(), expected);
    drop(j);
    reopen_and_go_on(&case, big(BOOT_A));
}

/// The next batch writes the middle of a record, then fails with ENOSPC.
fn fail_next_write_halfway(j: &Journal) {
    j.inner.lock().write_hook = Some(Arc::new(|file: &File, bytes: &[u8]| {
        let mut f = file;
        f.write_all(&bytes[..segment::torn_len(bytes)]).unwrap();
        Some(Err(io::Error::from_raw_os_error(28)))
    }));
}

// ---- Rotation -----------------------------------------------------------------------------

/// Segments this small rotate every few dozen steps of the workload.
const SMALL: u64 = 2048;

/// Rotations for size with small segments: the workload runs until the first one after it
/// arms the point.
fn rotate_for_size(case: &Case) {
    let j = worked(case, opts(BOOT_A, SMALL), 100);
    assert!(j.stats().rotations > 0, "no rotation: {:?}", j.stats());
    arm();
    Daemon::new(&j, case).steps(100..600);
}

/// `journal-rotate-before-rename`, in a rotation for size: `N+1.seg.tmp` written, segment N
/// in use. The next open removes the `.tmp` and replays N.
#[test]
fn a_crash_in_a_rotation_before_its_rename() {
    let case = crash(
        "a_crash_in_a_rotation_before_its_rename",
        "journal-rotate-before-rename",
        rotate_for_size,
    );
    assert_eq!(case.temporaries(), 1, "the new segment's .tmp");
    assert_eq!(case.segments().len(), 1);
    let rec = reopen_and_go_on(&case, opts(BOOT_A, SMALL));
    assert!(rec.torn_tail.is_none() && rec.rescan.is_none(), "{rec:?}");
    assert_eq!(case.temporaries(), 0);
}

/// `journal-rotate-after-rename`, in a rotation for size: segments N and N+1. The next open
/// replays from N+1's snapshot and removes N.
#[test]
fn a_crash_in_a_rotation_after_its_rename() {
    let case = crash(
        "a_crash_in_a_rotation_after_its_rename",
        "journal-rotate-after-rename",
        rotate_for_size,
    );
    let segs = case.segments();
    assert_eq!(segs.len(), 2, "{segs:?}");
    let rec = reopen_and_go_on(&case, opts(BOOT_A, SMALL));
    assert!(rec.torn_tail.is_none() && rec.rescan.is_none(), "{rec:?}");
    assert_eq!(rec.segments, 1, "replay starts at the new snapshot");
    assert!(
        !case.segments().contains(&segs[0]),
        "the old one is removed"
    );
}

/// A cut, more changes, then the commit's rotation (`committed`), which the point kills. The
/// base of later states is the backing directory at the cut; the state the reopen must give
/// is recorded by `expect` (the whole state before the commit, or the changes since the cut).
fn commit_and_rotate(case: &Case, after_rename: bool) {
    let j = worked(case, big(BOOT_A), 40);
    let (seq, _) = j.cut().unwrap();
    if after_rename {
        case.set_base();
    }
    let d = Daemon::new(&j, case);
    d.steps(40..60);
    let g = j.inner.lock();
    case.expect(if after_rename { &g.live } else { &g.state });
    drop(g);
    arm();
    j.committed(seq).unwrap();
}

/// `journal-rotate-before-rename` reached through `committed` after a generation: the next
/// open replays the old segment, a superset of the state (the committed changes too).
#[test]
fn a_crash_in_a_commits_rotation_before_its_rename() {
    let case = crash(
        "a_crash_in_a_commits_rotation_before_its_rename",
        "journal-rotate-before-rename",
        |case| commit_and_rotate(case, false),
    );
    assert_eq!(case.temporaries(), 1);
    let (j, rec) = case.open(big(BOOT_A));
    assert!(rec.rescan.is_none() && rec.torn_tail.is_none(), "{rec:?}");
    assert_eq!(j.dirty(), case.expected(), "the state before the commit");
    drop(j);
    reopen_and_go_on(&case, big(BOOT_A));
}

/// `journal-rotate-after-rename` reached through `committed`: the next open replays the new
/// segment, whose snapshot holds only what changed after the cut.
#[test]
fn a_crash_in_a_commits_rotation_after_its_rename() {
    let case = crash(
        "a_crash_in_a_commits_rotation_after_its_rename",
        "journal-rotate-after-rename",
        |case| commit_and_rotate(case, true),
    );
    assert_eq!(case.segments().len(), 2);
    let (j, rec) = case.open(big(BOOT_A));
    assert!(rec.rescan.is_none() && rec.torn_tail.is_none(), "{rec:?}");
    assert_eq!(j.dirty(), case.expected(), "the changes after the cut");
    assert_eq!(case.segments().len(), 1);
    drop(j);
    reopen_and_go_on(&case, big(BOOT_A));
}

/// A clean close during boot A, then an open during boot B, which rotates at once to a new
/// segment for the new boot, and dies there.
fn reopen_after_a_reboot(case: &Case) {
    let j = worked(case, big(BOOT_A), 40);
    case.expect(&j.dirty());
    j.close_clean().unwrap();
    drop(j);
    arm();
    case.open(big(BOOT_B));
}

/// `journal-rotate-before-rename` in the rotation of an open after a reboot: the new
/// segment's `.tmp` written, the old segment and CLEAN still there. The next open trusts the
/// journal as the crashed one did: no rescan. (Open used to remove CLEAN first, so a crash
/// here cost a rescan of the whole backing directory: the newest segment named the old boot
/// and nothing vouched for it any more.)
#[test]
fn a_crash_in_the_rotation_after_a_reboot_before_its_rename() {
    let case = crash(
        "a_crash_in_the_rotation_after_a_reboot_before_its_rename",
        "journal-rotate-before-rename",
        reopen_after_a_reboot,
    );
    assert!(case.clean_marker());
    assert_eq!(case.temporaries(), 1);
    let (j, rec) = case.open(big(BOOT_B));
    assert!(rec.rescan.is_none() && rec.clean, "{rec:?}");
    assert_eq!(j.dirty(), case.expected());
    assert!(!case.clean_marker());
    drop(j);
    reopen_and_go_on(&case, big(BOOT_B));
}

/// `journal-rotate-after-rename` in the same rotation: the new segment names the new boot;
/// the next open replays it without a rescan.
#[test]
fn a_crash_in_the_rotation_after_a_reboot_after_its_rename() {
    let case = crash(
        "a_crash_in_the_rotation_after_a_reboot_after_its_rename",
        "journal-rotate-after-rename",
        reopen_after_a_reboot,
    );
    assert_eq!(case.segments().len(), 2);
    assert!(case.clean_marker());
    let (j, rec) = case.open(big(BOOT_B));
    assert!(rec.rescan.is_none() && rec.clean, "{rec:?}");
    assert_eq!(j.dirty(), case.expected());
    assert_eq!(case.segments().len(), 1);
    drop(j);
    reopen_and_go_on(&case, big(BOOT_B));
}

// ---- Rescan -------------------------------------------------------------------------------

/// An unclean shutdown during boot A, then an open during boot B, which rescans and dies
/// while writing the rescan's segment.
fn rescan_after_a_reboot(case: &Case) {
    drop(worked(case, big(BOOT_A), 40));
    arm();
    case.open(big(BOOT_B));
}

/// `journal-rescan-midway`: the rescan's segment written as `.tmp`, the old segments still
/// there. The next open removes the `.tmp` and rescans again.
#[test]
fn a_crash_while_writing_a_rescan() {
    let case = crash(
        "a_crash_while_writing_a_rescan",
        "journal-rescan-midway",
        rescan_after_a_reboot,
    );
    assert_eq!(case.temporaries(), 1);
    let (j, rec) = case.open(big(BOOT_B));
    let why = rec.rescan.unwrap_or_default();
    assert!(why.contains("unclean shutdown across a reboot"), "{why}");
    assert_eq!(j.dirty(), DirtyState::rescan(&case.backing()).unwrap());
    assert_eq!(case.temporaries(), 0);
    drop(j);
    reopen_and_go_on(&case, big(BOOT_B));
}

/// `journal-rescan-after-rename`: the rescan's segment in place, the old one still there. The
/// next open starts at the rescan's snapshot (no second rescan) and removes the old one.
#[test]
fn a_crash_after_writing_a_rescan() {
    let case = crash(
        "a_crash_after_writing_a_rescan",
        "journal-rescan-after-rename",
        rescan_after_a_reboot,
    );
    assert_eq!(case.segments().len(), 2);
    let (j, rec) = case.open(big(BOOT_B));
    assert!(rec.rescan.is_none(), "{rec:?}");
    assert_eq!(j.dirty(), DirtyState::rescan(&case.backing()).unwrap());
    assert_eq!(case.segments().len(), 1);
    drop(j);
    reopen_and_go_on(&case, big(BOOT_B));
}

// ---- Open ---------------------------------------------------------------------------------

/// `journal-create-before-rename`: the first open of an empty backing directory dies before
/// its segment 1 is in place. The next open starts a fresh journal.
#[test]
fn a_crash_while_creating_a_journal() {
    let case = crash(
        "a_crash_while_creating_a_journal",
        "journal-create-before-rename",
        |case| {
            arm();
            case.open(big(BOOT_A));
        },
    );
    assert_eq!((case.temporaries(), case.segments().len()), (1, 0));
    let rec = reopen_and_go_on(&case, big(BOOT_A));
    assert!(rec.rescan.is_none() && rec.last_seq == 0, "{rec:?}");
}

/// `journal-open-after-unclean`: an open after a clean close dies once it removed CLEAN. The
/// next open replays without a rescan during the same boot; after a reboot it rescans, since
/// nothing vouches for the journal any more.
#[test]
fn a_crash_after_an_open_removed_clean() {
    let case = crash(
        "a_crash_after_an_open_removed_clean",
        "journal-open-after-unclean",
        |case| {
            let j = worked(case, big(BOOT_A), 40);
            case.expect(&j.dirty());
            j.close_clean().unwrap();
            drop(j);
            arm();
            case.open(big(BOOT_A));
        },
    );
    assert!(!case.clean_marker());
    let rebooted = Case {
        dir: case.dir.with_extension("rebooted"),
    };
    copy_tree(&case.dir, &rebooted.dir);
    let (_, rec) = rebooted.open(big(BOOT_B));
    assert!(rec.rescan.is_some(), "{rec:?}");

    let (j, rec) = case.open(big(BOOT_A));
    assert!(rec.rescan.is_none() && !rec.clean, "{rec:?}");
    assert_eq!(j.dirty(), case.expected());
    drop(j);
    reopen_and_go_on(&case, big(BOOT_A));
}

fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &to.join(e.file_name()));
        } else {
            fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// `journal-open-cleanup-midway`: an open dies after removing one of two leftover `.tmp`
/// segments. The next open removes the other and replays.
#[test]
fn a_crash_while_removing_leftover_temporaries() {
    let case = crash(
        "a_crash_while_removing_leftover_temporaries",
        "journal-open-cleanup-midway",
        |case| {
            let j = worked(case, big(BOOT_A), 40);
            case.expect(&j.dirty());
            drop(j);
            for n in [7, 8] {
                let tmp = case.journal().join(format!("{n:020}.seg.tmp"));
                fs::write(tmp, b"unfinished").unwrap();
            }
            arm();
            case.open(big(BOOT_A));
        },
    );
    assert_eq!(case.temporaries(), 1);
    let (j, rec) = case.open(big(BOOT_A));
    assert!(rec.rescan.is_none(), "{rec:?}");
    assert_eq!(j.dirty(), case.expected());
    assert_eq!(case.temporaries(), 0);
    drop(j);
    reopen_and_go_on(&case, big(BOOT_A));
}

/// `journal-open-before-cut`: an open that found a torn tail dies before cutting it. The
/// next open finds and cuts the same tail.
#[test]
fn a_crash_before_an_open_cuts_a_torn_tail() {
    let case = crash(
        "a_crash_before_an_open_cuts_a_torn_tail",
        "journal-open-before-cut",
        |case| {
            let j = worked(case, big(BOOT_A), 40);
            case.expect(&j.dirty());
            drop(j);
            let mut torn = Vec::new();
            record::encode_op(
                &mut torn,
                1 << 40,
                &Op::Fsync {
                    ino: crate::FuseIno(1),
                },
            )
            .unwrap();
            let seg = segment::list_segments(&case.journal())
                .unwrap()
                .pop()
                .unwrap();
            let f = OpenOptions::new().append(true).open(seg.1).unwrap();
            (&f).write_all(&torn[..torn.len() / 2]).unwrap();
            arm();
            case.open(big(BOOT_A));
        },
    );
    let (j, rec) = case.open(big(BOOT_A));
    assert!(rec.torn_tail.is_some() && rec.rescan.is_none(), "{rec:?}");
    assert_eq!(j.dirty(), case.expected());
    drop(j);
    reopen_and_go_on(&case, big(BOOT_A));
}

// ---- Clean close --------------------------------------------------------------------------

/// `close_clean` dies at `point`, after the segment was synced.
fn close(case: &Case) {
    let j = worked(case, big(BOOT_A), 40);
    case.expect(&j.dirty());
    arm();
    j.close_clean().unwrap();
}

/// `journal-close-before-clean`: the segment synced, no CLEAN. The next open replays it as
/// after any crash of the daemon.
#[test]
fn a_crash_while_closing_before_clean() {
    let case = crash(
        "a_crash_while_closing_before_clean",
        "journal-close-before-clean",
        close,
    );
    assert!(!case.clean_marker());
    let (j, rec) = case.open(big(BOOT_A));
    assert!(rec.rescan.is_none() && !rec.clean, "{rec:?}");
    assert_eq!(j.dirty(), case.expected());
    drop(j);
    reopen_and_go_on(&case, big(BOOT_A));
}

/// `journal-close-after-clean`: CLEAN written and synced, the directory not. CLEAN vouches
/// for the segment, which was synced before it: even after a reboot the journal is trusted.
#[test]
fn a_crash_while_closing_after_clean() {
    let case = crash(
        "a_crash_while_closing_after_clean",
        "journal-close-after-clean",
        close,
    );
    assert!(case.clean_marker());
    let (j, rec) = case.open(big(BOOT_B));
    assert!(rec.rescan.is_none() && rec.clean, "{rec:?}");
    assert_eq!(j.dirty(), case.expected());
    drop(j);
    reopen_and_go_on(&case, big(BOOT_B));
}
